"""The registered RLOO loss on the exact tabular token MDP, trained on its own samples.

Derivation. RLOO shapes the reward with the sampled log-ratio, `r'(y) = R(y) - b log
pi_old(y)/pi_ref(y)`, and its loss `-A(y) log pi(y)` with the leave-one-out baseline is, on
policy, an unbiased estimate of `-grad J`, where `J(pi) = E_pi R - b KL(pi || pi_ref)` (the
gradient of the log-ratio inside the expectation has mean `E_pi grad log pi = 0`). `J` is
maximised by `pi*(y) ∝ pi_ref(y) exp(R(y)/b)`, the soft-optimal policy of the token MDP, and
`J(pi*) - J(pi) = b KL(pi || pi*)` exactly. So stochastic ascent drives `KL(pi || pi*)` to a
noise floor set by the step size and the group size; the test asks for a 20-fold fall from the
reference's gap and checks the identity at the end. With `b = 0` the same estimator is the
policy gradient of `E_pi R`, which then rises (averaged over seeds) at every checkpoint.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prefopt_jax import losses
from prefopt_jax.losses.base import RolloutInputs
from prefopt_jax.tokenmdp import tabular

G = 8  # samples per prompt


def train_rloo(mdp, beta, steps, seed, lr=0.1):
    """Tabular logits after `steps` RLOO updates on G samples per prompt, from the reference."""
    tree = mdp.tree
    nodes_sh, tokens_sh = jnp.asarray(tree.nodes_sh), jnp.asarray(tree.tokens_sh)
    rewards_ps = jnp.asarray(tabular.sequence_rewards(mdp), jnp.float32)
    ref_logits = jnp.asarray(mdp.ref_logits_pnv, jnp.float32)
    prompts = mdp.num_prompts
    loss_fn = losses.get("rloo")
    tx = optax.adam(lr)

    def token_logps(logits_pnv, prompt_n, seq_n):
        logp_pnv = jax.nn.log_softmax(logits_pnv, -1)
        return logp_pnv[prompt_n[:, None], nodes_sh[seq_n], tokens_sh[seq_n]]  # [n, H]

    def step(carry, key):
        logits, opt_state = carry
        seq_logps_ps = token_logps(logits, jnp.repeat(jnp.arange(prompts), tree.num_sequences),
                                   jnp.tile(jnp.arange(tree.num_sequences), prompts)
                                   ).sum(-1).reshape(prompts, -1)
        seq_pg = jax.random.categorical(key, seq_logps_ps, axis=-1, shape=(G, prompts)).T
        prompt_n, seq_n = jnp.repeat(jnp.arange(prompts), G), seq_pg.reshape(-1)

        def loss(params):
            inputs = RolloutInputs(
                logps_nc=token_logps(params, prompt_n, seq_n),
                mask_nc=jnp.ones((prompts * G, tree.horizon)),
                rewards_n=rewards_ps[prompt_n, seq_n],
                ref_logps_nc=token_logps(ref_logits, prompt_n, seq_n))
            return losses.mean_loss(loss_fn(inputs, group_size=G, beta=beta))

        updates, opt_state = tx.update(jax.grad(loss)(logits), opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), None

    keys = jax.random.split(jax.random.key(seed), steps)
    (logits, _), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(
        (ref_logits, tx.init(ref_logits)), keys)
    return np.asarray(logits, np.float64)


def test_rloo_approaches_the_kl_regularised_optimum():
    mdp = tabular.random_mdp(vocab_size=3, horizon=2, num_prompts=2, beta=0.5,
                             terminal_reward=True, seed=3)
    star = tabular.optimal_sequence_logps(mdp)
    rewards = tabular.sequence_rewards(mdp)
    ref = tabular.sequence_logps(mdp.ref_logits_pnv, mdp.tree)

    def objective(logps):  # J = E R - b KL(pi || pi_ref)
        return tabular.expected_reward(logps, rewards) - mdp.beta * tabular.kl(logps, ref)

    start = tabular.kl(ref, star)  # 2.29 nats here
    trained = tabular.sequence_logps(train_rloo(mdp, mdp.beta, steps=400, seed=0), mdp.tree)
    gap = tabular.kl(trained, star)  # 0.0013 here
    assert start > 1.0, start  # the reference is far from pi*
    assert gap < 0.01 and tabular.kl(star, trained) < 0.01, (start, gap)
    np.testing.assert_allclose(objective(star) - objective(trained), mdp.beta * gap, rtol=1e-6)
    # The KL weight decides the optimum: trained with b = 0.1 the policy stays far from pi*_0.5.
    other = tabular.sequence_logps(train_rloo(mdp, 0.1, steps=400, seed=0), mdp.tree)
    assert tabular.kl(other, star) > 0.3


def test_without_kl_the_expected_reward_rises_at_every_checkpoint():
    mdp = tabular.random_mdp(vocab_size=3, horizon=2, num_prompts=2, beta=1.0,
                             terminal_reward=True, seed=4)
    rewards = tabular.sequence_rewards(mdp)
    curve = []
    for steps in (0, 10, 20, 40, 80):
        values = [tabular.expected_reward(tabular.sequence_logps(
            train_rloo(mdp, 0.0, steps, seed, lr=0.05), mdp.tree), rewards) if steps else
            tabular.expected_reward(tabular.sequence_logps(mdp.ref_logits_pnv, mdp.tree),
                                    rewards) for seed in range(8)]
        curve.append(np.mean(values))
    assert np.all(np.diff(curve) > 0), curve
    assert curve[-1] > curve[0] + 0.5 * (rewards.max(-1).mean() - curve[0]), curve
