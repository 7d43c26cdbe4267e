"""Registry: every spec name is present; unknown names fail with the known names listed."""

import pytest

import prefopt_jax.losses as losses

# The objectives of docs/objectives.md: pairwise (+ the MPO mixture), unpaired, listwise,
# token-level, reward models, online RL and the diffusion objectives.
SPEC_NAMES = [
    "dpo", "robust", "ipo", "hinge", "slic", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo",
    "cpo", "orpo", "tpo", "tpo_l", "rpo", "gamma_rank", "modpo", "vpo", "dno", "sppo", "mpo",
    "kto", "bco", "plackett_luce", "lipo_lambda",
    "tgdpo", "aligndistil", "cpl", "cpl_kl",
    "bradley_terry",
    "ppo", "rto", "grpo", "dr_grpo", "dapo", "ngrpo", "pref_grpo", "rloo",
    "diffusion_mse", "diffusion_dpo", "diffusion_kto", "rank_dpo", "seppo", "d3po", "ddpo",
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
        losses.register("dpo", inputs="pairwise", reference=True)(lambda inputs, state=None: None)


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


def test_every_objective_declares_what_it_reads():
    for name in losses.names():
        info = losses.info(name)
        assert info.name == name and info.inputs in losses.INPUTS and info.paper
        assert set(info.needs) <= set(losses.NEEDS)
        assert (info.token_terms is not None) == (info.inputs == "distill")


def test_declarations_are_checked_at_registration():
    for bad, match in [({"inputs": "pairs", "reference": True}, "unknown inputs 'pairs'"),
                       ({"inputs": "pairwise", "reference": True, "coupling": "global"},
                        "unknown coupling"),
                       ({"inputs": "pairwise", "reference": True, "needs": ("gold_logps",)},
                        "unknown or undeclared needs"),
                       ({"inputs": "pairwise", "reference": True,
                         "waived_by": {"gold": "alpha"}}, "unknown or undeclared needs")]:
        with pytest.raises(ValueError, match=match):
            losses.register("new_objective", **bad)
    assert "new_objective" not in losses.names()


def test_a_waived_need_drops_its_coupling():
    kto = losses.info("kto")
    assert kto.active_needs() == ("mismatched",) and kto.effective_coupling() == "batch"
    assert kto.active_needs({"z0": 0.0}) == () and kto.effective_coupling({"z0": 0.0}) == "none"
    assert losses.compose("kto", {"z0": 0.0}).info.coupling == "none"
    assert losses.info("aot").coupling == "sort"


def test_compose_checks_names_hyper_parameters_and_mixes():
    with pytest.raises(losses.ObjectiveError, match="'simpo' has no hyper-parameter 'betta'"):
        losses.compose("simpo", {"betta": 1.0})
    with pytest.raises(losses.ObjectiveError, match="needs hyper-parameter 'group_size'"):
        losses.compose("grpo")
    with pytest.raises(losses.ObjectiveError, match="leave AlgoConfig.loss unset"):
        losses.compose("dpo", mix=[("dpo", 1.0)])
    mixed = losses.compose(mix=[("dpo", 0.8), ("bco_pair", 0.2, {"beta": 0.2})])
    assert mixed.info.inputs == "pairwise" and mixed.info.coupling == "batch"
    wrapped = losses.compose("dpo", modifiers=[("wpo", {}), ("reference_free", {})])
    assert wrapped.info.needs == ("token_stats",) and not wrapped.info.reference
    assert wrapped.name == "reference_free(wpo(dpo))"


def test_a_setting_is_the_value_the_loss_sees():
    """`Objective.setting`: the value given, else the registered default, else `absent`; a
    modifier keeps the wrapped loss's values; a mix (whose parts keep theirs) answers None."""
    given = losses.compose("dapo", {"group_size": 4, "entropy_coef": 0.1})
    assert given.setting("entropy_coef") == 0.1
    default = losses.compose("dapo", {"group_size": 4})
    assert default.setting("entropy_coef") == 0.0 and default.setting("epsilon") == 0.2
    assert losses.compose("dpo").setting("entropy_coef", absent=0.0) == 0.0
    assert losses.compose("dpo").setting("beta") == 0.1
    wrapped = losses.compose("dpo", {"beta": 0.3}, modifiers=[("wpo", {})])
    assert wrapped.setting("beta") == 0.3 and wrapped.setting("label_smoothing") == 0.0
    mixed = losses.compose(mix=[("dapo", 1.0, {"group_size": 4, "entropy_coef": 0.1})])
    assert mixed.setting("entropy_coef", absent=0.0) is None


def test_a_kl_coefficient_of_0_declares_no_reference():
    """`reference_off`: the rollout objectives whose KL coefficient is 0 read no reference."""
    for name, key in (("grpo", "beta"), ("dr_grpo", "beta"), ("ngrpo", "beta"),
                      ("pref_grpo", "beta"), ("rloo", "beta"), ("ppo", "kl_coef")):
        group = {} if name == "ppo" else {"group_size": 4}
        assert losses.info(name).reference_off == key
        assert losses.compose(name, group).info.reference
        assert not losses.compose(name, {**group, key: 0.0}).info.reference
        assert losses.compose(name, {**group, key: 0.01}).info.reference
    assert losses.compose("rto").info.reference  # its token rewards read the reference
    assert not losses.compose("dapo", {"group_size": 4}).info.reference
