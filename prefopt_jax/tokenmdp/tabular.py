"""Exact tabular token MDP: soft-optimal Q*, V*, pi*, and preference training on every pair.

The MDP is deterministic with a small vocabulary ``V`` and a fixed horizon ``H``: a state is a
prompt (one of ``P`` roots) plus the tokens so far, every response has exactly ``H`` tokens, and
all ``S = V^H`` responses of a prompt are enumerated. Nodes of each prompt's tree are numbered
breadth first: the root is 0 and the child of node ``n`` by token ``a`` is ``V n + 1 + a``; nodes
``0..N-1`` (``N = (V^H - 1)/(V - 1)``) choose a token, nodes ``N..M-1`` are terminal. Response
``s`` is the base-``V`` number of its tokens, first token most significant.

Per prompt, the MDP carries a per-token reward ``r(s, a)`` and a reference ``pi_ref(a|s)``; the
sequence reward is ``R(y) = sum_t r(s_t, y_t)``. Soft value iteration at temperature ``b``
(the token-level MDP of "From r to Q*", reference folded in) gives
``Q*(s,a) = r + b log pi_ref + V*(s')``,
``V*(s) = b logsumexp_a Q*(s,a)/b``, ``V*(terminal) = 0``, ``b log pi* = Q* - V*``. The solver and
the exact sequence-level quantities use float64 numpy; training uses jax with the registry's
losses on ``PairwiseInputs`` gathered from tabular logits, exactly as the language model does.

A tabular policy is logits ``[P, N, V]`` (a pytree leaf); ``log_softmax`` over the last axis
gives ``log pi(a|s)``.

Shape suffixes: ``p`` prompts, ``n`` choice nodes, ``m`` all nodes (choice then terminal),
``v`` vocabulary (actions), ``s`` responses of a prompt, ``h`` response positions, ``k`` pairs,
``w`` beams, ``c`` beam candidates (beams x tokens), ``j`` top-k ranks, ``i`` optimisation steps.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prefopt_jax import losses
from prefopt_jax.tokenmdp import implicit


def _log_softmax(logits_xv):
    """float64 numpy log-softmax over the last axis."""
    logits_xv = np.asarray(logits_xv, np.float64)
    top_x1 = logits_xv.max(axis=-1, keepdims=True)
    return logits_xv - top_x1 - np.log(np.exp(logits_xv - top_x1).sum(axis=-1, keepdims=True))


def _logsumexp(x, axis=-1):
    """float64 numpy logsumexp."""
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.exp(x - top).sum(axis=axis))


@dataclasses.dataclass(frozen=True)
class Tree:
    """Index tables of the complete ``V``-ary tree of depth ``H`` (shared by all prompts)."""

    vocab_size: int
    horizon: int

    @property
    def num_nodes(self):
        """Choice nodes ``N`` (depths 0..H-1)."""
        return sum(self.vocab_size ** t for t in range(self.horizon))

    @property
    def num_all_nodes(self):
        """All nodes ``M`` including the ``V^H`` terminal ones."""
        return self.num_nodes + self.num_sequences

    @property
    def num_sequences(self):
        """Responses per prompt ``S = V^H``."""
        return self.vocab_size ** self.horizon

    @functools.cached_property
    def child_nv(self):
        """Child node of each choice node and token."""
        v = self.vocab_size
        return v * np.arange(self.num_nodes)[:, None] + 1 + np.arange(v)[None, :]

    @functools.cached_property
    def tokens_sh(self):
        """Tokens of every response, ``[S, H]``, first token most significant."""
        codes_s = np.arange(self.num_sequences)
        powers_h = self.vocab_size ** np.arange(self.horizon - 1, -1, -1)
        return (codes_s[:, None] // powers_h[None, :]) % self.vocab_size

    @functools.cached_property
    def nodes_sh(self):
        """The choice node at which each response picks its t-th token, ``[S, H]``."""
        nodes_sh = np.zeros_like(self.tokens_sh)
        for t in range(1, self.horizon):
            nodes_sh[:, t] = self.child_nv[nodes_sh[:, t - 1], self.tokens_sh[:, t - 1]]
        return nodes_sh

    @functools.cached_property
    def depth_n(self):
        """Depth (number of tokens so far) of each choice node."""
        return np.concatenate([np.full(self.vocab_size ** t, t) for t in range(self.horizon)])

    def level(self, depth):
        """Slice of the node numbers at ``depth`` (depth ``H`` are the terminal nodes)."""
        start = sum(self.vocab_size ** t for t in range(depth))
        return slice(start, start + self.vocab_size ** depth)


@dataclasses.dataclass(frozen=True)
class TokenMDP:
    """Rewards ``r(s, a)`` and reference logits per prompt, with the temperature ``beta``."""

    reward_pnv: np.ndarray
    ref_logits_pnv: np.ndarray
    beta: float
    tree: Tree

    @property
    def num_prompts(self):
        return self.reward_pnv.shape[0]

    @property
    def ref_logps_pnv(self):
        """``log pi_ref(a|s)``."""
        return _log_softmax(self.ref_logits_pnv)


def random_mdp(vocab_size=3, horizon=3, num_prompts=2, beta=1.0, reward_scale=1.0,
               ref_scale=1.0, terminal_reward=False, seed=0):
    """A random MDP: Gaussian per-token rewards and reference logits (std ``*_scale``).

    With ``terminal_reward`` only the last token is rewarded (the RLHF setting), else every token.
    """
    tree = Tree(vocab_size, horizon)
    rng = np.random.default_rng(seed)
    shape = (num_prompts, tree.num_nodes, vocab_size)
    reward_pnv = reward_scale * rng.standard_normal(shape)
    if terminal_reward:
        reward_pnv[:, tree.depth_n < horizon - 1] = 0.0
    ref_logits_pnv = ref_scale * rng.standard_normal(shape)
    return TokenMDP(reward_pnv, _log_softmax(ref_logits_pnv), float(beta), tree)


@dataclasses.dataclass(frozen=True)
class Solution:
    """Soft-optimal ``Q*`` ``[P, N, V]``, ``V*`` ``[P, M]`` (0 at terminals) and ``log pi*``."""

    q_pnv: np.ndarray
    values_pm: np.ndarray
    logps_pnv: np.ndarray


def solve(mdp):
    """Soft value iteration by backward induction over depths (exact, float64)."""
    tree, beta = mdp.tree, mdp.beta
    values_pm = np.zeros((mdp.num_prompts, tree.num_all_nodes))
    q_pnv = np.zeros(mdp.reward_pnv.shape)
    bonus_pnv = mdp.reward_pnv + beta * mdp.ref_logps_pnv
    for depth in range(tree.horizon - 1, -1, -1):
        nodes = tree.level(depth)
        q_pnv[:, nodes] = bonus_pnv[:, nodes] + values_pm[:, tree.child_nv[nodes]]
        values_pm[:, nodes] = beta * _logsumexp(q_pnv[:, nodes] / beta)
    logps_pnv = (q_pnv - values_pm[:, :tree.num_nodes, None]) / beta
    return Solution(q_pnv, values_pm, logps_pnv)


def identity_residual_pnv(mdp, values_pm, logps_pnv):
    """``b log pi/pi_ref - (r + V(s') - V(s))`` at every node and token (0 for ``pi*``, ``V*``)."""
    tree = mdp.tree
    implicit_pnv = mdp.beta * (_log_softmax(logps_pnv) - mdp.ref_logps_pnv)
    shaped_pnv = (mdp.reward_pnv + values_pm[:, tree.child_nv]
                  - values_pm[:, :tree.num_nodes, None])
    return implicit_pnv - shaped_pnv


# ---------------------------------------------------------------- exact sequence-level quantities


def sequence_rewards(mdp):
    """True sequence rewards ``R(y) = sum_t r(s_t, y_t)``, ``[P, S]``."""
    tree = mdp.tree
    return mdp.reward_pnv[:, tree.nodes_sh, tree.tokens_sh].sum(axis=-1)


def sequence_logps(logits_pnv, tree):
    """``log pi(y|x)`` of every response, ``[P, S]`` (float64)."""
    return _log_softmax(logits_pnv)[:, tree.nodes_sh, tree.tokens_sh].sum(axis=-1)


def optimal_sequence_logps(mdp):
    """The bandit solution ``pi*(y) ∝ pi_ref(y) exp(R(y)/b)``, ``[P, S]``, from sequences only."""
    scores_ps = sequence_logps(mdp.ref_logits_pnv, mdp.tree) + sequence_rewards(mdp) / mdp.beta
    return scores_ps - _logsumexp(scores_ps)[:, None]


def conditionals(seq_logps_ps, tree):
    """Per-node ``log pi(a|s)`` ``[P, N, V]`` of a distribution over responses given as ``[P, S]``.

    The mass of a node is the total probability of the responses through it; the conditional of
    token ``a`` at node ``s`` is ``mass(s||a) / mass(s)`` (nodes of zero mass give -inf/nan).
    """
    mass_pm = np.zeros((seq_logps_ps.shape[0], tree.num_all_nodes))
    mass_pm[:, tree.num_nodes:] = seq_logps_ps
    for depth in range(tree.horizon - 1, -1, -1):
        nodes = tree.level(depth)
        mass_pm[:, nodes] = _logsumexp(mass_pm[:, tree.child_nv[nodes]])
    return mass_pm[:, tree.child_nv] - mass_pm[:, :tree.num_nodes, None]


def kl(logps_ps, other_logps_ps):
    """Sequence-level ``KL(p || q)`` averaged over prompts (uniform prompt distribution)."""
    probs_ps = np.exp(logps_ps)
    return float(np.mean(np.sum(probs_ps * (logps_ps - other_logps_ps), axis=-1)))


def expected_reward(logps_ps, rewards_ps):
    """``E_{y~pi} R(y)`` averaged over prompts."""
    return float(np.mean(np.sum(np.exp(logps_ps) * rewards_ps, axis=-1)))


def win_rate(logps_ps, other_logps_ps, rewards_ps, bradley_terry=False):
    """``P(R(y) > R(y'))`` for ``y ~ p``, ``y' ~ q`` (ties count 1/2), averaged over prompts.

    With ``bradley_terry`` the win probability of a pair is ``sigma(R(y) - R(y'))`` instead.
    """
    diff_pss = rewards_ps[:, :, None] - rewards_ps[:, None, :]
    if bradley_terry:
        win_pss = 1.0 / (1.0 + np.exp(-diff_pss))
    else:
        win_pss = (diff_pss > 0) + 0.5 * (diff_pss == 0)
    probs_ps, other_probs_ps = np.exp(logps_ps), np.exp(other_logps_ps)
    return float(np.mean(np.einsum("ps,pt,pst->p", probs_ps, other_probs_ps, win_pss)))


def top_k(logps_ps, k):
    """The ``k`` most likely responses of each prompt: (indices ``[P, k]``, log-probs ``[P, k]``).

    Sorted by decreasing likelihood, ties by increasing response index.
    """
    order_pj = np.argsort(-logps_ps, axis=-1, kind="stable")[:, :k]
    return order_pj, np.take_along_axis(logps_ps, order_pj, axis=-1)


def beam_search(logits_pnv, tree, width, prompt=0):
    """Exact beam search of width ``width`` on a tabular policy for one prompt.

    Every step expands each beam by every token and keeps the ``width`` highest cumulative
    log-probs (ties by smaller response prefix). Returns (tokens ``[W, H]``, log-probs ``[W]``),
    best first; with ``width >= S`` nothing is pruned and the result is the exact ranking.
    """
    logp_nv = _log_softmax(logits_pnv[prompt])
    v = tree.vocab_size
    nodes_w = np.zeros(1, np.int64)
    logps_w = np.zeros(1)
    tokens_wh = np.zeros((1, 0), np.int64)
    for _ in range(tree.horizon):
        cand_logps_c = (logps_w[:, None] + logp_nv[nodes_w]).reshape(-1)
        cand_codes_c = (_codes(tokens_wh, v)[:, None] * v + np.arange(v)[None, :]).reshape(-1)
        # Highest log-prob first, equal scores by smaller prefix, so the cut is deterministic.
        keep_w = np.lexsort((cand_codes_c, -cand_logps_c))[:width]
        beam_w, token_w = keep_w // v, keep_w % v
        tokens_wh = np.concatenate([tokens_wh[beam_w], token_w[:, None]], axis=1)
        nodes_w, logps_w = tree.child_nv[nodes_w[beam_w], token_w], cand_logps_c[keep_w]
    return tokens_wh, logps_w


def _codes(tokens_wh, vocab_size):
    """Base-``V`` number of each row of tokens (the response index once complete)."""
    powers_h = vocab_size ** np.arange(tokens_wh.shape[1] - 1, -1, -1)
    return tokens_wh @ powers_h


# ---------------------------------------------------------------- preference data and training


@dataclasses.dataclass(frozen=True)
class PairSet:
    """Preference pairs: prompt, chosen and rejected response indices, weights summing to 1."""

    prompt_k: np.ndarray
    chosen_k: np.ndarray
    rejected_k: np.ndarray
    weight_k: np.ndarray


def _data_logps(mdp, data_logps_ps):
    """The data policy's response log-probs, ``pi_ref`` unless given."""
    if data_logps_ps is None:
        return sequence_logps(mdp.ref_logits_pnv, mdp.tree)
    return np.asarray(data_logps_ps, np.float64)


def all_pairs(mdp, data_logps_ps=None):
    """Every ordered pair of distinct responses, weighted by its chance to be (chosen, rejected).

    ``weight(y1 > y2) ∝ pi_data(y1) pi_data(y2) sigma(R(y1) - R(y2))`` within a prompt, and prompts
    weigh equally, so the weighted loss is the exact expected loss under Bradley-Terry labels
    from the true reward. Pairs of a response with itself are left out (the losses are constant
    on them), i.e. the expectation is conditioned on ``y1 != y2``.
    """
    logps_ps = _data_logps(mdp, data_logps_ps)
    rewards_ps = sequence_rewards(mdp)
    num_p, num_s = logps_ps.shape
    prompt_pss, chosen_pss, rejected_pss = np.meshgrid(
        np.arange(num_p), np.arange(num_s), np.arange(num_s), indexing="ij")
    keep_pss = chosen_pss != rejected_pss
    prompt_k, chosen_k, rejected_k = (prompt_pss[keep_pss], chosen_pss[keep_pss],
                                      rejected_pss[keep_pss])
    diff_k = rewards_ps[prompt_k, chosen_k] - rewards_ps[prompt_k, rejected_k]
    data_k = np.exp(logps_ps[prompt_k, chosen_k] + logps_ps[prompt_k, rejected_k])
    weight_k = data_k / (1 + np.exp(-diff_k))
    # Normalise within each prompt (conditioning on y1 != y2), then weigh prompts equally.
    prompt_total_p = np.bincount(prompt_k, weights=weight_k, minlength=num_p)
    weight_k = weight_k / (num_p * prompt_total_p[prompt_k])
    return PairSet(prompt_k, chosen_k, rejected_k, weight_k)


def flipped_pairs(pairs, rate):
    """The pair set in expectation over flipping each label with probability ``rate``: the same
    pairs weighted ``(1 - rate) w`` and the swapped pairs weighted ``rate w`` (the expectation of
    the data transform ``data.transforms.flip_labels`` over its random choices)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"flip rate must be in [0, 1], got {rate}")
    weight_k = np.asarray(pairs.weight_k, np.float64)
    return PairSet(np.concatenate([pairs.prompt_k, pairs.prompt_k]),
                   np.concatenate([pairs.chosen_k, pairs.rejected_k]),
                   np.concatenate([pairs.rejected_k, pairs.chosen_k]),
                   np.concatenate([(1 - rate) * weight_k, rate * weight_k]))


def sample_pairs(mdp, num_pairs, seed=0, data_logps_ps=None):
    """Pairs as a dataset would hold them: a uniform prompt, two responses from ``pi_data`` and a
    Bradley-Terry label from the true reward; each pair weighs ``1/num_pairs``."""
    logps_ps = _data_logps(mdp, data_logps_ps)
    rewards_ps = sequence_rewards(mdp)
    rng = np.random.default_rng(seed)
    prompt_k = rng.integers(0, mdp.num_prompts, num_pairs)
    cdf_ps = np.cumsum(np.exp(logps_ps), axis=-1)
    cdf_ps /= cdf_ps[:, -1:]
    num_s = logps_ps.shape[1]

    def draw():
        index_k = (rng.random(num_pairs)[:, None] > cdf_ps[prompt_k]).sum(axis=-1)
        return np.minimum(index_k, num_s - 1)

    first_k, second_k = draw(), draw()
    diff_k = rewards_ps[prompt_k, first_k] - rewards_ps[prompt_k, second_k]
    first_wins_k = rng.random(num_pairs) < 1 / (1 + np.exp(-diff_k))
    chosen_k = np.where(first_wins_k, first_k, second_k)
    rejected_k = np.where(first_wins_k, second_k, first_k)
    return PairSet(prompt_k, chosen_k, rejected_k, np.full(num_pairs, 1.0 / num_pairs))


def chosen_logps(pairs, tree, num_prompts):
    """Log-probs ``[P, S]`` of the chosen responses' distribution within each prompt.

    Its conditionals (``conditionals``) are the exact maximum-likelihood policy of SFT on the
    chosen responses.
    """
    mass_ps = np.zeros((num_prompts, tree.num_sequences))
    np.add.at(mass_ps, (pairs.prompt_k, pairs.chosen_k), pairs.weight_k)
    with np.errstate(divide="ignore"):
        return np.log(mass_ps / mass_ps.sum(axis=-1, keepdims=True))


def pairwise_inputs(logits_pnv, ref_logits_pnv, pairs, tree):
    """``PairwiseInputs`` of a pair set, per-token log-probs gathered from tabular logits.

    ``ref_logits_pnv`` None gives a reference-free input. The rows are the pairs, the columns the
    ``H`` response tokens (all real); weights are not set here (see ``expected_loss``).
    """
    prompt_k1 = jnp.asarray(pairs.prompt_k)[:, None]
    nodes_sh, tokens_sh = jnp.asarray(tree.nodes_sh), jnp.asarray(tree.tokens_sh)

    def gather(logits, seq_k):
        logp_pnv = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
        return logp_pnv[prompt_k1, nodes_sh[seq_k], tokens_sh[seq_k]]

    chosen_k, rejected_k = jnp.asarray(pairs.chosen_k), jnp.asarray(pairs.rejected_k)
    mask_kh = jnp.ones((len(pairs.prompt_k), tree.horizon), jnp.float32)
    has_ref = ref_logits_pnv is not None
    return losses.PairwiseInputs(
        logps_w_pc=gather(logits_pnv, chosen_k), logps_l_pc=gather(logits_pnv, rejected_k),
        mask_w_pc=mask_kh, mask_l_pc=mask_kh,
        ref_logps_w_pc=gather(ref_logits_pnv, chosen_k) if has_ref else None,
        ref_logps_l_pc=gather(ref_logits_pnv, rejected_k) if has_ref else None)


def pair_token_values(values_pnv, pairs, tree):
    """Per-node-and-token tabular values (e.g. frozen token rewards for ``tgdpo``) gathered along
    the chosen and rejected responses of each pair: two ``[K, H]`` arrays."""
    values_pnv = jnp.asarray(values_pnv, jnp.float32)
    prompt_k1 = jnp.asarray(pairs.prompt_k)[:, None]
    return tuple(values_pnv[prompt_k1, tree.nodes_sh[seq_k], tree.tokens_sh[seq_k]]
                 for seq_k in (pairs.chosen_k, pairs.rejected_k))


def expected_loss(logits_pnv, loss_fn, pairs, tree, ref_logits_pnv, hyper, extra_inputs=None):
    """The pair-weighted loss ``sum_k weight_k loss_k`` (the exact expectation for ``all_pairs``).

    Weights are applied here rather than through ``weight_p``, so any registered loss works.
    ``extra_inputs`` are further ``PairwiseInputs`` fields aligned with the pairs (``extras``,
    ``margin_p``, ``token_rewards_w_pc``, ...) for losses that need them.
    """
    inputs = pairwise_inputs(logits_pnv, ref_logits_pnv, pairs, tree)
    if extra_inputs:
        inputs = inputs.replace(**extra_inputs)
    out = loss_fn(inputs, **hyper)
    return jnp.sum(jnp.asarray(pairs.weight_k, jnp.float32) * out.loss_p)


def pair_reward_means(logits_pnv, ref_logits_pnv, pairs, tree, beta):
    """Pair-weighted mean implicit rewards ``b log pi(y)/pi_ref(y)`` of chosen and rejected."""
    inputs = pairwise_inputs(logits_pnv, ref_logits_pnv, pairs, tree)
    weight_k = jnp.asarray(pairs.weight_k, jnp.float32)

    def mean(logps_kh, ref_logps_kh, mask_kh):
        return jnp.sum(weight_k * implicit.sequence_rewards(logps_kh, ref_logps_kh, mask_kh, beta))

    return (mean(inputs.logps_w_pc, inputs.ref_logps_w_pc, inputs.mask_w_pc),
            mean(inputs.logps_l_pc, inputs.ref_logps_l_pc, inputs.mask_l_pc))


@dataclasses.dataclass(frozen=True)
class FitResult:
    """A trained tabular policy and its history, one entry per step ``i`` (before the update).

    ``chosen_reward_i`` / ``rejected_reward_i`` are pair-weighted mean implicit rewards
    ``b log pi/pi_ref`` with the MDP's ``b`` and the loss's reference.
    """

    logits_pnv: np.ndarray
    loss_i: np.ndarray
    grad_norm_i: np.ndarray
    chosen_reward_i: np.ndarray
    rejected_reward_i: np.ndarray


def _optimizer(optimizer, learning_rate):
    """An optax transformation from a name ("lbfgs", "adam") or the transformation itself."""
    if optimizer == "lbfgs":
        return optax.lbfgs()
    if optimizer == "adam":
        return optax.adam(learning_rate)
    return optimizer


def fit(mdp, loss, pairs, *, hyper=None, init_logits_pnv=None, ref_logits_pnv=None,
        extra_inputs=None, optimizer="lbfgs", steps=200, learning_rate=0.05, tol=1e-8):
    """Minimises a registered pairwise loss's weighted loss over ``pairs`` on a tabular policy.

    Args:
      mdp: the MDP (its tree, and its ``beta`` for the recorded implicit rewards).
      loss: a registry name ("dpo", "ipo", "simpo", ...) or a loss function.
      pairs: a ``PairSet`` (``all_pairs`` for the exact expected loss, or ``sample_pairs``).
      hyper: keyword hyperparameters of the loss (e.g. ``{"beta": mdp.beta}``); none by default.
      init_logits_pnv, ref_logits_pnv: start and loss reference; both default to ``pi_ref``.
      extra_inputs: further ``PairwiseInputs`` fields for losses that need them (see
        ``expected_loss``; ``pair_token_values`` gathers per-token ones).
      optimizer: "lbfgs", "adam" or an optax transformation (line-search ones need "lbfgs").
      steps: a fixed number of steps (one compiled scan); updates stop once the gradient norm
        falls below ``tol``.
    """
    loss_fn = losses.get(loss) if isinstance(loss, str) else loss
    ref = jnp.asarray(mdp.ref_logits_pnv if ref_logits_pnv is None else ref_logits_pnv,
                      jnp.float32)
    init = ref if init_logits_pnv is None else jnp.asarray(init_logits_pnv, jnp.float32)
    objective = functools.partial(expected_loss, loss_fn=loss_fn, pairs=pairs, tree=mdp.tree,
                                  ref_logits_pnv=ref, hyper=dict(hyper or {}),
                                  extra_inputs=extra_inputs)
    record = functools.partial(pair_reward_means, ref_logits_pnv=ref, pairs=pairs,
                               tree=mdp.tree, beta=mdp.beta)
    opt = _optimizer(optimizer, learning_rate)
    logits, history = _run(objective, record, opt, init, steps, tol, optimizer == "lbfgs")
    return FitResult(np.asarray(logits, np.float64), *(np.asarray(h) for h in history))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 4, 6))
def _run(objective, record, opt, init, steps, tol, line_search):
    """The optimisation loop: a scan that freezes the parameters once converged."""
    value_and_grad = (optax.value_and_grad_from_state(objective) if line_search
                      else lambda params, state: jax.value_and_grad(objective)(params))

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        grad_norm = optax.tree.norm(grad)
        updates, new_state = opt.update(grad, state, params, value=value, grad=grad,
                                        value_fn=objective)
        new_params = optax.apply_updates(params, updates)
        # Stop at convergence (or on a non-finite step) instead of wandering in float32 noise.
        done = (grad_norm < tol) | ~jnp.all(jnp.isfinite(new_params))
        carry = jax.tree.map(lambda old, new: jnp.where(done, old, new),
                             (params, state), (new_params, new_state))
        return carry, (value, grad_norm, *record(params))

    (params, _), history = jax.lax.scan(step, (init, opt.init(init)), None, length=steps)
    return params, history
