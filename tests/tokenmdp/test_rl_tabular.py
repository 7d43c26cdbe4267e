"""Registered online RL losses on the exact tabular token MDP, trained on their own samples.

Derivation. RLOO shapes the reward with the sampled log-ratio, `r'(y) = R(y) - b log
pi_old(y)/pi_ref(y)`, and its loss `-A(y) log pi(y)` with the leave-one-out baseline is, on
policy, an unbiased estimate of `-grad J`, where `J(pi) = E_pi R - b KL(pi || pi_ref)` (the
gradient of the log-ratio inside the expectation has mean `E_pi grad log pi = 0`). `J` is
maximised by `pi*(y) ∝ pi_ref(y) exp(R(y)/b)`, the soft-optimal policy of the token MDP, and
`J(pi*) - J(pi) = b KL(pi || pi*)` exactly. So stochastic ascent drives `KL(pi || pi*)` to a
noise floor set by the step size and the group size; the test asks for a 20-fold fall from the
reference's gap and checks the identity at the end. With `b = 0` the same estimator is the
policy gradient of `E_pi R`, which then rises (averaged over seeds) at every checkpoint.

GRPO and Dr. GRPO with the same KL term in the reward (their own `beta` 0) reach `pi*` too. With
GRPO's k3 estimate in the loss instead they do not: on policy, `grad E[k3] = E[(1 - pi_ref/pi)
grad log pi] = grad CE(pi_ref, pi)`, the gradient of the token-level reverse KL
`KL(pi_ref || pi)`, a different regulariser with a different optimum (measured: 0.26-0.72
nats from `pi*` after 400-1600 steps, against 0.0015 with the KL in the reward).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prefopt_jax import losses
from prefopt_jax.losses.base import RolloutInputs
from prefopt_jax.tokenmdp import tabular

G = 8  # samples per prompt


def train(mdp, beta, steps, seed, lr=0.1, loss="rloo", kl_in_reward=False, runs=1,
          trace=False):
    """Tabular logits after `steps` updates of objective `loss` on G samples per prompt, from
    the reference. `kl_in_reward`: `r - b log pi_old/pi_ref` as the reward, the loss's own
    KL weight 0 (rloo shapes its reward itself). `trace`: the logits after every step of
    each of `runs` independent runs, `[runs, steps, P, N, V]`."""
    tree = mdp.tree
    nodes_sh, tokens_sh = jnp.asarray(tree.nodes_sh), jnp.asarray(tree.tokens_sh)
    rewards_ps = jnp.asarray(tabular.sequence_rewards(mdp), jnp.float32)
    ref_logits = jnp.asarray(mdp.ref_logits_pnv, jnp.float32)
    prompts = mdp.num_prompts
    loss_fn = losses.get(loss)
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
        ref_nc = token_logps(ref_logits, prompt_n, seq_n)
        rewards_n = rewards_ps[prompt_n, seq_n]
        if kl_in_reward:
            old_nc = jax.lax.stop_gradient(token_logps(logits, prompt_n, seq_n))
            rewards_n = rewards_n - beta * (old_nc - ref_nc).sum(-1)

        def objective(params):
            inputs = RolloutInputs(logps_nc=token_logps(params, prompt_n, seq_n),
                                   mask_nc=jnp.ones((prompts * G, tree.horizon)),
                                   rewards_n=rewards_n, ref_logps_nc=ref_nc)
            return losses.mean_loss(loss_fn(inputs, group_size=G,
                                            beta=0.0 if kl_in_reward else beta))

        updates, opt_state = tx.update(jax.grad(objective)(logits), opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), None

    def body(carry, key):
        carry, _ = step(carry, key)
        return carry, carry[0]

    def run(keys):
        return jax.lax.scan(body, (ref_logits, tx.init(ref_logits)), keys)[1]

    keys = jax.random.split(jax.random.key(seed), (runs, steps))
    logits_rinv = np.asarray(jax.jit(jax.vmap(run))(keys), np.float64)
    return logits_rinv if trace else logits_rinv[0, -1]


def test_rloo_approaches_the_kl_regularised_optimum():
    mdp = tabular.random_mdp(vocab_size=3, horizon=2, num_prompts=2, beta=0.5,
                             terminal_reward=True, seed=3)
    star = tabular.optimal_sequence_logps(mdp)
    rewards = tabular.sequence_rewards(mdp)
    ref = tabular.sequence_logps(mdp.ref_logits_pnv, mdp.tree)

    def objective(logps):  # J = E R - b KL(pi || pi_ref)
        return tabular.expected_reward(logps, rewards) - mdp.beta * tabular.kl(logps, ref)

    start = tabular.kl(ref, star)  # 2.29 nats here
    trained = tabular.sequence_logps(train(mdp, mdp.beta, steps=400, seed=0), mdp.tree)
    gap = tabular.kl(trained, star)  # 0.0013 here
    assert start > 1.0, start  # the reference is far from pi*
    assert gap < 0.01 and tabular.kl(star, trained) < 0.01, (start, gap)
    np.testing.assert_allclose(objective(star) - objective(trained), mdp.beta * gap, rtol=1e-6)
    # The KL weight decides the optimum: trained with b = 0.1 the policy stays far from pi*_0.5.
    other = tabular.sequence_logps(train(mdp, 0.1, steps=400, seed=0), mdp.tree)
    assert tabular.kl(other, star) > 0.3


def test_without_kl_the_expected_reward_rises_at_every_checkpoint():
    mdp = tabular.random_mdp(vocab_size=3, horizon=2, num_prompts=2, beta=1.0,
                             terminal_reward=True, seed=4)
    rewards = tabular.sequence_rewards(mdp)
    logits_rinv = train(mdp, 0.0, 80, seed=0, lr=0.05, runs=8, trace=True)
    curve = [tabular.expected_reward(tabular.sequence_logps(mdp.ref_logits_pnv, mdp.tree),
                                     rewards)]
    for step in (10, 20, 40, 80):  # the mean over 8 runs after each checkpoint step
        curve.append(np.mean([tabular.expected_reward(tabular.sequence_logps(x, mdp.tree),
                                                      rewards)
                              for x in logits_rinv[:, step - 1]]))
    assert np.all(np.diff(curve) > 0), curve
    assert curve[-1] > curve[0] + 0.5 * (rewards.max(-1).mean() - curve[0]), curve


def test_grpo_reaches_pi_star_with_the_kl_in_the_reward_not_with_k3_in_the_loss():
    mdp = tabular.random_mdp(vocab_size=3, horizon=2, num_prompts=2, beta=0.5,
                             terminal_reward=True, seed=3)
    star = tabular.optimal_sequence_logps(mdp)

    def gap(**kw):
        return tabular.kl(tabular.sequence_logps(train(mdp, mdp.beta, 400, 0, **kw), mdp.tree),
                          star)

    for loss in ("grpo", "dr_grpo"):
        assert gap(loss=loss, kl_in_reward=True) < 0.01, loss
        assert gap(loss=loss) > 0.1, loss  # k3 in the loss: the reverse KL's optimum
