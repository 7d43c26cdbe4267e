"""Generated files are current: docs/objectives.md and configs/algos/*.gin from the registry."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3],
                                                  os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_objectives_page_is_current():
    with open(os.path.join(ROOT, "docs", "objectives.md")) as f:
        current = f.read()
    assert current == script("docs/generate_objectives.py").render(), \
        "docs/objectives.md is stale: run python docs/generate_objectives.py"


def test_algos_configs_are_current():
    for path, text in script("configs/algos/generate.py").files().items():
        with open(path) as f:
            assert f.read() == text, f"{path} is stale: run python configs/algos/generate.py"


def test_objectives_page_lists_every_objective_and_modifier():
    from prefopt_jax import losses

    with open(os.path.join(ROOT, "docs", "objectives.md")) as f:
        page = f.read()
    for name in losses.names():
        assert f"### `{name}`" in page and losses.info(name).paper in page
    for name in losses.MODIFIERS:
        assert f"### `{name}`" in page
