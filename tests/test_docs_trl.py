"""docs/from_trl.md: every prefopt-jax binding its GRPOConfig table lists parses against the
configs and sets what it names; every objective hyper-parameter it names exists."""

import ast
import os
import re

import gin
import pytest

from prefopt_jax import losses, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "from_trl.md")


def table_rows() -> list[tuple[str, list[str]]]:
    """(TRL setting, bindings) of each row of the GRPOConfig table."""
    rows = []
    for line in open(DOC):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`") and "=" in cells[1]:
            rows.append((cells[0], [b.strip() for b in cells[1].strip("`").split(";")]))
    return rows


def test_the_table_is_read():
    rows = table_rows()
    assert len(rows) >= 20
    assert ("`num_generations=8`", ["RLConfig.group_size = 8"]) in rows


@pytest.mark.parametrize("setting,bindings", table_rows(), ids=lambda x: str(x)[:40])
def test_each_binding_parses_and_sets_its_value(setting, bindings):
    registry.parse([os.path.join(ROOT, "configs/experiments/grpo_tiny.gin")], bindings)
    for binding in bindings:
        name, value = (x.strip() for x in binding.split("=", 1))
        if value.startswith("@"):
            continue
        want = ast.literal_eval(value)
        got = gin.query_parameter(name)
        assert (list(got) if isinstance(got, tuple) else got) == want, binding
        if name == "AlgoConfig.hyper":
            for loss, params in want.items():
                unknown = set(params) - set(losses.hyper_defaults(losses.get(loss)))
                assert not unknown, f"{binding}: {loss} has no {unknown}"


def test_the_estimators_and_objectives_it_names_exist():
    text = open(DOC).read()
    for name in re.findall(r"'estimator': '(\w+)'", text):
        assert name in losses.advantages.ESTIMATORS, name
    for name in re.findall(r"AlgoConfig.loss = '(\w+)'", text):
        assert name in losses.names(), name
