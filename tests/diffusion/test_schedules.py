"""Noise schedules against hand-computed values; the parameterisation conversions invert."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax.diffusion import schedules
from prefopt_jax.diffusion.schedules import Schedule


def test_linear_schedule_by_hand():
    s = Schedule("linear", num_steps=3, beta_start=0.1, beta_end=0.3)
    np.testing.assert_allclose(s.betas, [0.1, 0.2, 0.3], rtol=1e-12)
    np.testing.assert_allclose(s.alpha_bars, [0.9, 0.72, 0.504], rtol=1e-12)
    np.testing.assert_allclose(s.alphas, np.sqrt([0.9, 0.72, 0.504]), rtol=1e-12)
    np.testing.assert_allclose(s.sigmas, np.sqrt([0.1, 0.28, 0.496]), rtol=1e-12)


def test_linear_ddpm_endpoints():
    """Ho et al.'s schedule: alpha_bar starts at 1 - 1e-4 and ends near 4.0e-5."""
    s = Schedule("linear", num_steps=1000)
    assert s.alpha_bars[0] == pytest.approx(1 - 1e-4, abs=1e-12)
    assert s.alpha_bars[-1] == pytest.approx(4.04e-5, rel=0.01)
    assert np.all(np.diff(s.alpha_bars) < 0)


def test_cosine_schedule_matches_the_closed_form():
    """alpha_bar_t = f((t+1)/T)/f(0) until the last level, where beta is clipped to 0.999."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    s = Schedule("cosine", num_steps=4)
    expected = [f(1 / 4) / f(0), f(2 / 4) / f(0), f(3 / 4) / f(0)]
    np.testing.assert_allclose(s.alpha_bars[:3], expected, rtol=1e-12)
    assert s.betas[-1] == 0.999
    assert s.alpha_bars[-1] == pytest.approx(expected[-1] * 0.001, rel=1e-12)
    big = Schedule("cosine", num_steps=1000)
    assert big.alpha_bars[0] == pytest.approx(f(1e-3) / f(0), rel=1e-12)
    assert big.alpha_bars[499] == pytest.approx(f(0.5) / f(0), rel=1e-12)


def test_alpha_sigma_and_q_sample():
    s = Schedule("linear", num_steps=3, beta_start=0.1, beta_end=0.3)
    alpha, sigma = s.alpha_sigma(jnp.array([0, 2]))
    assert alpha.shape == sigma.shape == (2, 1, 1, 1)
    np.testing.assert_allclose(alpha[:, 0, 0, 0], np.sqrt([0.9, 0.504]), rtol=1e-6)
    x0 = jnp.ones((2, 2, 2, 1))
    eps = jnp.full((2, 2, 2, 1), 2.0)
    x_t = s.q_sample(x0, jnp.array([0, 2]), eps)
    np.testing.assert_allclose(x_t[:, 0, 0, 0], [math.sqrt(0.9) + 2 * math.sqrt(0.1),
                                                  math.sqrt(0.504) + 2 * math.sqrt(0.496)],
                               rtol=1e-6)


def test_conversions_by_hand():
    alpha, sigma, x0, eps = 0.6, 0.8, 1.0, 2.0
    x_t = alpha * x0 + sigma * eps  # 2.2
    assert schedules.v_target(x0, eps, alpha, sigma) == pytest.approx(0.4)
    assert schedules.v_to_x0(x_t, 0.4, alpha, sigma) == pytest.approx(1.0)
    assert schedules.v_to_eps(x_t, 0.4, alpha, sigma) == pytest.approx(2.0)
    assert schedules.eps_to_x0(x_t, eps, alpha, sigma) == pytest.approx(1.0)
    assert schedules.x0_to_eps(x_t, x0, alpha, sigma) == pytest.approx(2.0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_conversions_invert_each_other(prediction):
    """In float64 numpy (the conversions are plain arithmetic), down to alpha = 0.016."""
    s = Schedule("cosine", num_steps=100)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 5, 4, 4, 2))
    t_b = np.array([0, 10, 50, 90, 98])
    alpha, sigma = s.alphas[t_b][:, None, None, None], s.sigmas[t_b][:, None, None, None]
    x_t = alpha * x0 + sigma * eps
    pred = schedules.target(x0, eps, alpha, sigma, prediction)
    back_x0, back_eps = schedules.to_x0_eps(pred, x_t, alpha, sigma, prediction)
    np.testing.assert_allclose(back_x0, x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(back_eps, eps, rtol=1e-9, atol=1e-9)


def test_bad_names_fail_loudly():
    with pytest.raises(ValueError, match="kind='quadratic'"):
        Schedule("quadratic")
    with pytest.raises(ValueError, match="prediction='x0'"):
        schedules.target(1.0, 1.0, 0.6, 0.8, "x0")
