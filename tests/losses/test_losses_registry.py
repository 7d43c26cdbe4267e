"""Registry: every spec name is present; unknown names fail with the known names listed."""

import pytest

import prefopt_jax.losses as losses

# ALGORITHMS.md section 1 (+ the MPO mixture), 2, 3 (token-level subset), 4 and 5 (RL losses).
SPEC_NAMES = [
    "dpo", "robust", "ipo", "hinge", "slic", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo",
    "cpo", "orpo", "tpo", "tpo_l", "rpo", "gamma_rank", "modpo", "vpo", "dno", "sppo", "mpo",
    "kto", "bco", "plackett_luce", "lipo_lambda",
    "tgdpo", "aligndistil", "cpl", "cpl_kl",
    "bradley_terry", "ensemble_mean", "wco", "uwo", "par",
    "ppo", "rto", "grpo", "dr_grpo", "dapo", "ngrpo", "pref_grpo", "rloo",
]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_name_registered(name):
    assert callable(losses.get(name))


def test_registry_is_exactly_the_spec():
    assert sorted(SPEC_NAMES) == losses.names()


def test_unknown_name_lists_known():
    with pytest.raises(losses.UnknownLossError) as err:
        losses.get("no_such_loss")
    assert isinstance(err.value, KeyError)
    message = str(err.value)
    assert "no_such_loss" in message
    for name in SPEC_NAMES:
        assert name in message


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        losses.register("dpo")(lambda inputs, state=None: None)


def test_unknown_hyperparameter_fails_loudly():
    from losses_cases import pair_case, pair_inputs
    with pytest.raises(TypeError):
        losses.get("dpo")(pair_inputs(pair_case()), betta=0.2)
    with pytest.raises(TypeError):
        losses.get("simpo")(pair_inputs(pair_case()), betta=0.2)


def test_missing_extras_named_in_error():
    from losses_cases import pair_case, pair_inputs
    inputs = pair_inputs(pair_case()).replace(extras={})
    for name, key in (("tpo", "gold_logps_pc"), ("modpo", "other_rewards_w_pk"),
                      ("sppo", "win_prob_w_p"), ("dno", "win_prob_w_p")):
        with pytest.raises(KeyError, match=key):
            losses.get(name)(inputs)
