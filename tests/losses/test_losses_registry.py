"""Registry: every spec name is present; unknown names fail with the known names listed."""

import pytest

import prefopt_jax.losses as losses

SPEC_NAMES = ["dpo", "ipo", "simpo"]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_name_registered(name):
    assert callable(losses.get(name))


def test_unknown_name_lists_known():
    with pytest.raises(losses.UnknownLossError) as err:
        losses.get("no_such_loss")
    message = str(err.value)
    assert "no_such_loss" in message
    for name in SPEC_NAMES:
        assert name in message


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        losses.register("dpo")(lambda inputs, state=None: None)
