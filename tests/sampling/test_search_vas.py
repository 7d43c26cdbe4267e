"""Value-augmented sampling: TD(lambda) targets by hand, value-head fit, and guided decoding."""

import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import ModelConfig, Transformer
from prefopt_jax.models.heads import ValueHead
from prefopt_jax.sampling import search, value
from prefopt_jax.sampling.generate import SamplingConfig, generate


def test_td_lambda_targets_by_hand():
    values = np.asarray([[0.1, 0.2, 0.3, 9.0], [0.5, 0.6, 9.0, 9.0]], np.float32)
    mask = np.asarray([[1, 1, 1, 0], [1, 1, 0, 0]])
    lam = 0.5
    got = np.asarray(value.td_lambda_targets(values, np.asarray([1.0, -1.0]), mask, lam))
    r2 = 1.0
    r1 = (1 - lam) * 0.3 + lam * r2
    r0 = (1 - lam) * 0.2 + lam * r1
    np.testing.assert_allclose(got[0], [r0, r1, r2, 0.0], atol=1e-6)
    np.testing.assert_allclose(got[1], [(1 - lam) * 0.6 + lam * -1.0, -1.0, 0.0, 0.0], atol=1e-6)
    # lambda = 1 is the Monte Carlo return: the terminal reward everywhere.
    mc = np.asarray(value.td_lambda_targets(values, np.asarray([1.0, -1.0]), mask, 1.0))
    np.testing.assert_allclose(mc, [[1, 1, 1, 0], [-1, -1, 0, 0]], atol=1e-6)


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    return Transformer(config, rngs=nnx.Rngs(0))


def test_value_guided_decoding_raises_a_synthetic_reward(model):
    prompts = [[1 + i, 2 + i, 3] for i in range(16)]
    config = SamplingConfig(max_new_tokens=6, temperature=1.0)
    cands = search.sample_candidates(model, prompts, 8, config, rng=0)
    # Reward: fraction of completion tokens equal to the base policy's favourite token.
    target = np.bincount(cands.tokens_bnc.reshape(-1), minlength=32).argmax()
    rewards_bn = (cands.tokens_bnc == target).mean(-1)
    head = ValueHead(32, init_scale=0.1, rngs=nnx.Rngs(1))
    loss_i = value.train_value_head(model, head, cands, rewards_bn, steps=300, learning_rate=0.01)
    assert loss_i[-1] < 0.5 * loss_i[0]
    base = generate(model, prompts * 4, config, rng=1)
    guided = search.value_guided_generate(model, head, prompts * 4, config, beta=20.0, top_k=20,
                                          rng=1)
    base_reward = (base.tokens_bn == target).mean()
    guided_reward = (guided.tokens_bn == target).mean()
    assert guided_reward > base_reward + 0.05, (base_reward, guided_reward)
    # beta = 0 is the base policy.
    plain = search.value_guided_generate(model, head, prompts * 4, config, beta=0.0, rng=1)
    np.testing.assert_array_equal(plain.tokens_bn, base.tokens_bn)
