"""DDPM and DDIM samplers: per-step log-probs against direct Gaussian densities, recomputation
under other parameters, determinism, and an analytic point-mass target."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.diffusion import sampling, schedules
from prefopt_jax.diffusion.sampling import SamplerConfig
from prefopt_jax.diffusion.schedules import Schedule

LINEAR = Schedule("linear", num_steps=1000)
COSINE = Schedule("cosine", num_steps=1000)


class PointMass:
    """The exact denoiser of data that is always the constant image ``c``:
    ``eps = (x_t - alpha_t c) / sigma_t``, or its ``v``."""

    image_shape = (2, 2, 1)

    def __init__(self, schedule, c, prediction):
        self.schedule, self.c, self.prediction = schedule, c, prediction

    def __call__(self, x_bhwc, t_b, labels_b):
        alpha, sigma = self.schedule.alpha_sigma(t_b)
        eps = (x_bhwc - alpha * self.c) / sigma
        return schedules.target(self.c, eps, alpha, sigma, self.prediction)

    def numpy(self, x_bhwc, t):
        """The same prediction in float64 numpy at one level ``t``."""
        alpha, sigma = self.schedule.alphas[t], self.schedule.sigmas[t]
        eps = (x_bhwc - alpha * self.c) / sigma
        return eps if self.prediction == "epsilon" else alpha * eps - sigma * self.c


class Affine:
    """A simple epsilon-predictor whose x_0 guess varies with x_t, t and the label."""

    prediction = "epsilon"
    image_shape = (2, 2, 1)

    def __call__(self, x_bhwc, t_b, labels_b):
        return (0.5 * x_bhwc + 1e-3 * t_b[:, None, None, None]
                + 0.1 * labels_b[:, None, None, None])


POINT_EPS = PointMass(LINEAR, 0.7, "epsilon")
POINT_V = PointMass(COSINE, -0.4, "v")
POINT_V_CLIPPED = PointMass(COSINE, 1.5, "v")
AFFINE = Affine()
LABELS = jnp.array([0, 3, 7, 10])
DDPM_GUIDED = SamplerConfig("ddpm", num_steps=5, guidance=2.0)


def _gaussian_logp(x_bhwc, mean_bhwc, var):
    """Direct float64 density of N(mean, var I), summed over pixels."""
    return np.sum(-0.5 * (x_bhwc - mean_bhwc) ** 2 / var - 0.5 * np.log(2 * math.pi * var),
                  axis=(1, 2, 3))


def _levels(schedule, config, i):
    ladder = sampling.timesteps(schedule, config.num_steps)
    return ladder[i], schedule.alpha_bars[ladder[i]], schedule.alpha_bars[ladder[i + 1]]


@pytest.fixture(scope="module")
def guided_run(random_dit_split):
    """A random DiT, and a DDPM trajectory of it with guidance 2 (shared by several tests)."""
    graphdef, state = random_dit_split()
    trajectory = sampling.sample((graphdef, state), LABELS, jax.random.key(0), schedule=LINEAR,
                                 config=DDPM_GUIDED)
    return graphdef, state, trajectory


def test_timesteps_ladder():
    np.testing.assert_array_equal(sampling.timesteps(Schedule(num_steps=11), 5),
                                  [10, 8, 6, 4, 2, 0])
    np.testing.assert_array_equal(sampling.timesteps(LINEAR, 4), [999, 749, 500, 250, 0])
    with pytest.raises(ValueError, match="num_steps=11 exceeds"):
        sampling.timesteps(Schedule(num_steps=11), 11)
    with pytest.raises(ValueError, match="eta=1.5"):
        SamplerConfig(eta=1.5)


def test_ddpm_logps_are_the_gaussian_densities(guided_run, forward):
    """Recompute each step's posterior mean and variance in float64 from the trajectory and
    the model's guided prediction; the residuals must also be standard normal."""
    graphdef, state, trajectory = guided_run
    model = nnx.merge(graphdef, state)
    xs = np.asarray(trajectory.xs_sbhwc, np.float64)
    assert xs.shape == (6, 4, 8, 8, 1) and trajectory.logps_sb.shape == (5, 4)
    np.testing.assert_array_equal(trajectory.images_bhwc, trajectory.xs_sbhwc[-1])
    np.testing.assert_array_equal(trajectory.timesteps_s, [999, 799, 599, 400, 200, 0])
    null_b = jnp.full_like(LABELS, model.null_label)
    for i in range(5):
        t, a, a_next = _levels(LINEAR, DDPM_GUIDED, i)
        x_t = jnp.asarray(xs[i], jnp.float32)
        cond = np.asarray(forward(model, x_t, jnp.full(4, t), LABELS), np.float64)
        uncond = np.asarray(forward(model, x_t, jnp.full(4, t), null_b), np.float64)
        eps = uncond + 2.0 * (cond - uncond)
        x0 = (xs[i] - math.sqrt(1 - a) * eps) / math.sqrt(a)
        beta = 1 - a / a_next
        mean = (math.sqrt(a_next) * beta / (1 - a) * x0
                + math.sqrt(1 - beta) * (1 - a_next) / (1 - a) * xs[i])
        var = (1 - a_next) / (1 - a) * beta
        # The model runs here in another XLA program than in the sampler; its float32 rounding,
        # divided by the last step's std of 0.01, moves a log-prob near 200 by up to ~0.02.
        np.testing.assert_allclose(trajectory.logps_sb[i], _gaussian_logp(xs[i + 1], mean, var),
                                   rtol=1e-4, atol=5e-2)
        z2 = np.mean((xs[i + 1] - mean) ** 2 / var)
        assert 0.75 < z2 < 1.25, (i, z2)


def test_recomputed_logps(guided_run, random_dit_split):
    """Same parameters: the sampler's log-probs; other parameters: different ones."""
    graphdef, state, trajectory = guided_run
    recompute = jax.jit(lambda s, xs: sampling.step_logps(
        (graphdef, s), xs, LABELS, schedule=LINEAR, config=DDPM_GUIDED))
    np.testing.assert_allclose(recompute(state, trajectory.xs_sbhwc), trajectory.logps_sb,
                               rtol=1e-5, atol=1e-3)
    other = recompute(random_dit_split(seed=1)[1], trajectory.xs_sbhwc)
    assert np.min(np.abs(np.asarray(other - trajectory.logps_sb))) > 1e-2
    # One step per row, chosen per row (DDPO's random timesteps).
    steps_b = jnp.array([4, 0, 2, 2])
    rows = jnp.arange(4)
    one = jax.jit(lambda s: sampling.transition_logps(
        (graphdef, s), trajectory.xs_sbhwc[steps_b, rows], trajectory.xs_sbhwc[steps_b + 1, rows],
        LABELS, steps_b, schedule=LINEAR, config=DDPM_GUIDED))(state)
    np.testing.assert_allclose(one, trajectory.logps_sb[steps_b, rows], rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="trajectory of 4 steps"):
        sampling.step_logps((graphdef, state), trajectory.xs_sbhwc[:5], LABELS, schedule=LINEAR,
                            config=DDPM_GUIDED)


def test_ddim_logps_with_v_prediction_and_clipping():
    """DDIM (eta 0.5) in Song et al.'s form, recomputed in float64; x_0 = 1.5 is clipped to 1."""
    config = SamplerConfig("ddim", num_steps=8, eta=0.5, clip_x0=1.0)
    model = POINT_V_CLIPPED
    trajectory = sampling.sample(model, jnp.zeros(64, jnp.int32), jax.random.key(1),
                                 schedule=COSINE, config=config)
    xs = np.asarray(trajectory.xs_sbhwc, np.float64)
    for i in range(8):
        t, a, a_next = _levels(COSINE, config, i)
        alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
        x0 = np.clip(alpha * xs[i] - sigma * model.numpy(xs[i], t), -1, 1)
        eps = (xs[i] - alpha * x0) / sigma
        var = 0.25 * (1 - a_next) / (1 - a) * (1 - a / a_next)
        mean = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - var) * eps
        np.testing.assert_allclose(trajectory.logps_sb[i], _gaussian_logp(xs[i + 1], mean, var),
                                   rtol=1e-4, atol=2e-3)
        assert 0.75 < np.mean((xs[i + 1] - mean) ** 2 / var) < 1.25
    # The clipped x_0 pulls the samples to 1, not to the data's 1.5.
    np.testing.assert_allclose(trajectory.images_bhwc, 1.0, atol=0.05)


AFFINE_LABELS = jnp.arange(8) % 4
AFFINE_DDPM = SamplerConfig("ddpm", num_steps=10, clip_x0=2.0)


def test_ddpm_is_ddim_with_eta_one():
    """Two formulas for the same step: same key, same trajectory and log-probs."""
    key = jax.random.key(2)
    ddpm = sampling.sample(AFFINE, AFFINE_LABELS, key, schedule=COSINE, config=AFFINE_DDPM)
    ddim = sampling.sample(AFFINE, AFFINE_LABELS, key, schedule=COSINE,
                           config=SamplerConfig("ddim", num_steps=10, eta=1.0, clip_x0=2.0))
    assert np.ptp(np.asarray(ddpm.images_bhwc)) > 0.1  # the predictor does not pin x_0
    np.testing.assert_allclose(ddim.xs_sbhwc, ddpm.xs_sbhwc, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ddim.logps_sb, ddpm.logps_sb, rtol=1e-4, atol=1e-2)


def test_ddpm_pairs_share_start_noise():
    """D3PO's pairs: one start noise, two step keys -> equal x_T, different chains; one key
    again -> the same chain."""
    noise = jax.random.normal(jax.random.key(6), (8, 2, 2, 1))
    run = lambda key: sampling.sample(AFFINE, AFFINE_LABELS, key, schedule=COSINE,  # noqa: E731
                                      config=AFFINE_DDPM, noise_bhwc=noise)
    a, b, a_again = run(jax.random.key(7)), run(jax.random.key(8)), run(jax.random.key(7))
    np.testing.assert_array_equal(a.xs_sbhwc[0], noise)
    np.testing.assert_array_equal(a.xs_sbhwc[0], b.xs_sbhwc[0])
    assert not np.allclose(a.xs_sbhwc[1], b.xs_sbhwc[1], atol=1e-3)
    np.testing.assert_array_equal(a.xs_sbhwc, a_again.xs_sbhwc)


POINT_V_DDIM = SamplerConfig("ddim", num_steps=20)


def test_ddim_eta_zero_is_deterministic():
    run = lambda key, noise=None: sampling.sample(  # noqa: E731
        POINT_V, jnp.zeros(64, jnp.int32), key, schedule=COSINE, config=POINT_V_DDIM,
        noise_bhwc=noise)
    first, again = run(jax.random.key(3)), run(jax.random.key(3))
    assert first.logps_sb is None
    np.testing.assert_array_equal(first.xs_sbhwc, again.xs_sbhwc)
    assert not np.allclose(run(jax.random.key(4)).xs_sbhwc, first.xs_sbhwc, atol=1e-3)
    # Only the start noise is random: other step keys change nothing.
    same_start = run(jax.random.key(5), first.xs_sbhwc[0])
    np.testing.assert_array_equal(same_start.xs_sbhwc, first.xs_sbhwc)
    with pytest.raises(ValueError, match="eta=0"):
        sampling.step_logps(POINT_V, first.xs_sbhwc, jnp.zeros(64, jnp.int32), schedule=COSINE,
                            config=POINT_V_DDIM)


def test_ddpm_with_the_exact_denoiser_follows_the_marginals():
    """Data = the constant 0.7: each level's samples are N(alpha_t 0.7, sigma_t^2) and the
    chain ends within a few sigma_0 = 0.01 of 0.7."""
    config = SamplerConfig("ddpm", num_steps=50)
    trajectory = sampling.sample(POINT_EPS, jnp.zeros(512, jnp.int32), jax.random.key(9),
                                 schedule=LINEAR, config=config)
    xs = np.asarray(trajectory.xs_sbhwc, np.float64).reshape(51, -1)
    ladder = sampling.timesteps(LINEAR, 50)
    for level in range(1, 51):
        t = ladder[level]
        alpha, sigma = LINEAR.alphas[t], LINEAR.sigmas[t]
        assert abs(xs[level].mean() - alpha * 0.7) < 0.1 * sigma + 1e-3, level
        assert abs(xs[level].std() / sigma - 1) < 0.1, level
    np.testing.assert_allclose(trajectory.images_bhwc, 0.7, atol=0.05)


def test_ddim_with_the_exact_v_predictor_lands_on_the_point():
    trajectory = sampling.sample(POINT_V, jnp.zeros(64, jnp.int32), jax.random.key(10),
                                 schedule=COSINE, config=POINT_V_DDIM)
    sigma_0 = COSINE.sigmas[0]
    np.testing.assert_allclose(trajectory.images_bhwc, -0.4, atol=5 * sigma_0)
