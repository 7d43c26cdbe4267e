"""benchmarks/grpo_step.py's closing lines: each configuration at TRL's token counts, and the
least time that work takes at the measured matmul peak, checked by hand on made-up results."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def grpo_step():
    spec = importlib.util.spec_from_file_location(
        "grpo_step", os.path.join(ROOT, "benchmarks", "grpo_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours(layout, mode="full", dtype="float32"):
    return {"framework": "prefopt-jax", "layout": layout, "dtype": dtype, "mode": mode,
            "group_size": 4, "generation_tokens_per_s": 100.0, "update_tokens_per_s": 50.0,
            "body_params": 1000, "head_params": 200, "matmul_peak_flops": 1e6}


def test_equal_work_and_peak_bound_by_hand(grpo_step):
    trl = {"framework": "trl", "layout": "padded", "dtype": "float32", "mode": "full",
           "seconds_per_iteration": 30.0, "completion_tokens_per_iteration": 400,
           "update_tokens_per_iteration": 600}
    results = [trl, ours("prefix_packed"), ours("packed", mode="lora"),
               ours("padded", dtype="bfloat16"), {"framework": "prefopt-jax", "error": "x"}]
    lines = grpo_step.equal_work(results, target=3.0)
    assert [line["equal_work"] for line in lines] == ["prefix_packed"]  # same dtype and mode
    line = lines[0]
    seconds = 400 / 100 + 600 / 50  # TRL's completion and update tokens at our rates
    # Sampling: 2 per weight per completion token. Update: 8 per body weight per completion
    # token and per prompt token once per group of 4 (200 prompt tokens -> 50), 8 per
    # vocabulary weight per completion token.
    flops = 2 * 1200 * 400 + 8 * (1000 * (400 + 50) + 200 * 400)
    peak = flops / 1e6
    assert line["seconds_at_trl_tokens"] == pytest.approx(seconds, abs=0.01)
    assert line["speedup"] == pytest.approx(30.0 / seconds, abs=0.01)
    assert line["peak_seconds"] == pytest.approx(peak, abs=0.01)
    assert line["speedup_at_peak"] == pytest.approx(30.0 / peak, abs=0.01)
    assert line["share_of_peak"] == pytest.approx(peak / seconds, abs=0.01)
    assert line["share_for_target"] == pytest.approx(peak * 3 / 30.0, abs=0.01)


def test_lora_update_costs_six_flops_per_weight(grpo_step):
    trl = {"framework": "trl", "layout": "padded", "dtype": "float32", "mode": "lora",
           "seconds_per_iteration": 30.0, "completion_tokens_per_iteration": 400,
           "update_tokens_per_iteration": 600}
    line, = grpo_step.equal_work([trl, ours("packed", mode="lora")], target=2.0)
    flops = 2 * 1200 * 400 + 6 * (1000 * 450 + 200 * 400)
    assert line["peak_seconds"] == pytest.approx(flops / 1e6, abs=0.01)
    assert line["share_for_target"] == pytest.approx(flops / 1e6 * 2 / 30.0, abs=0.01)


@pytest.mark.parametrize("mode,per_weight", [("full", 6), ("lora", 4)])
def test_without_a_reference_the_update_costs_two_flops_per_weight_less(grpo_step, mode,
                                                                        per_weight):
    """At beta 0 neither side runs the reference's forward."""
    trl = {"framework": "trl", "layout": "padded", "dtype": "float32", "mode": mode,
           "seconds_per_iteration": 30.0, "completion_tokens_per_iteration": 400,
           "update_tokens_per_iteration": 600}
    line, = grpo_step.equal_work([trl, dict(ours("packed", mode=mode), beta=0.0)], target=2.0)
    flops = 2 * 1200 * 400 + per_weight * (1000 * 450 + 200 * 400)
    assert line["peak_seconds"] == pytest.approx(flops / 1e6, abs=0.01)
    assert grpo_step.flops_per_weight(mode, 0.04) == per_weight + 2
