"""Every registered loss against its independent numpy transcription (losses_np_ref.py).

Random inputs with ragged masks, per-pair weights and filler examples full of garbage; the
same call checks that gradients are finite and exactly zero on the filler examples.
"""

import jax
import numpy as np
import pytest

import prefopt_jax.losses as losses
from losses_cases import CASES, default_hyper, family, loss_fn, text_names
from losses_np_ref import REFERENCES, RL, STATEFUL

# Non-default hyperparameters exercised in addition to the defaults.
VARIANTS = {
    "dpo": [{"beta": 0.3, "label_smoothing": 0.2}],
    "robust": [{"label_smoothing": 0.3}],
    "ipo": [{"beta": 0.5}],
    "slic": [{"delta": 2.0, "lam": 0.0}],
    "aot": [{"label_smoothing": 0.1}],
    "aot_unpaired": [{"beta": 0.5, "label_smoothing": 0.1}],
    "simpo": [{"beta": 5.0, "gamma_beta_ratio": 0.5, "label_smoothing": 0.1}],
    "discopop": [{"tau": 0.5}],
    "rpo": [{"alpha": 0.0005, "nll_reduction": "sum"}],
    "gamma_rank": [{"gamma": 0.5}],
    "modpo": [{"weights": (0.6, 0.3, 0.1)}],
    "vpo": [{"online": True, "alpha": 0.5}],
    "sppo": [{"beta": 0.1}],
    "cpl": [{"gamma": 0.9}],
    "kto": [{"lam_desirable": 1.3, "lam_undesirable": 0.7}, {"z0": 0.0}],
    "bradley_terry": [{"center_coef": 0.01}],
    "aligndistil": [{"temperature": 2.0, "beta2": 1.0}],
    "ppo": [{"kl_estimator": "k3", "whiten": False, "lam": 0.8}],
    "dapo": [{"epsilon_high": 0.28}],
    "rloo": [{"beta": 0.5}],
}

CALLS = [(name, {}) for name in text_names()]
CALLS += [(name, hyper) for name, hypers in VARIANTS.items() for hyper in hypers]


# The differentiable (policy) field of each input family, and its validity field.
POLICY = {"pairwise": ("logps_w_pc", "valid_p"), "unpaired": ("logps_nc", "valid_n"),
          "listwise": ("logps_pkc", "valid_p"), "reward": ("reward_w_p", "valid_p"),
          "distill": ("logits_ncv", "valid_n"), "rollout": ("logps_nc", "valid_n")}


def _loss_and_grads(fn, inputs, hyper, fam):
    """LossOutput and d mean_loss / d policy field, checking the gradient on the way."""
    field, valid_field = POLICY[fam]

    def loss(x):
        out = fn(inputs.replace(**{field: x}), **hyper)
        return losses.mean_loss(out), out

    (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(getattr(inputs, field))
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[np.asarray(getattr(inputs, valid_field)) == 0] == 0.0)
    return out, grad


def _ids(call):
    name, hyper = call
    return name + "".join(f"-{k}={v}" for k, v in hyper.items())


def test_every_registered_name_has_a_reference():
    assert sorted(REFERENCES) == text_names()


@pytest.mark.parametrize("call", CALLS, ids=[_ids(c) for c in CALLS])
def test_matches_numpy_reference(call):
    name, hyper = call
    fn, ref = loss_fn(name), REFERENCES[name]
    make_case, make_inputs = CASES[family(name)]
    extra = {"n_other": len(hyper["weights"]) - 1} if "weights" in hyper else {}
    case = make_case(seed=7, **extra)
    hyper = {**default_hyper(name, case), **hyper}
    inputs = make_inputs(case)
    out, grads = _loss_and_grads(fn, inputs, hyper, family(name))
    want = ref(case, **hyper)
    if name in STATEFUL:
        want, want_state = want
        np.testing.assert_allclose(out.state["mean"], want_state["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.state["count"], want_state["count"])
    want_count = case["valid"].sum()
    if name in RL:  # token-averaged RL losses count tokens, not sequences
        want, want_count = want
    np.testing.assert_allclose(out.loss_p, want, rtol=2e-5, atol=2e-5)
    total, count = out.metrics["loss"]
    np.testing.assert_allclose(total, want.sum(), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(count, want_count)


@pytest.mark.parametrize("name", ["bco", "bco_pair"])
def test_running_state_carried(name):
    """A second step starts from the returned state: the mean covers both batches."""
    make_case, make_inputs = CASES[family(name)]
    fn, ref = loss_fn(name), REFERENCES[name]
    case1, case2 = make_case(seed=1), make_case(seed=2)
    out1 = fn(make_inputs(case1))
    out2 = fn(make_inputs(case2), out1.state)
    _, state1 = ref(case1)
    want2, state2 = ref(case2, state=state1)
    np.testing.assert_allclose(out2.loss_p, want2, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out2.state["mean"], state2["mean"], rtol=1e-5)
