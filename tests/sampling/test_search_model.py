"""Contract tests for `prefopt_jax.sampling.search` and scorers on a tiny random Transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import ModelConfig, Transformer
from prefopt_jax.models.heads import RewardHead
from prefopt_jax.sampling import scorers, search
from prefopt_jax.sampling.generate import SamplingConfig, generate

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [3, 1, 4]]
# One sampling config for every sampling test: one compile.
SAMPLE = SamplingConfig(max_new_tokens=5, temperature=1.0, stop_ids=(13,))


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ref():
    return Transformer(CONFIG, rngs=nnx.Rngs(1))


@nnx.jit(static_argnames="return_hidden")
def forward(model, tokens_bt, positions_bt, return_hidden=False):
    """Jitted full forward (eager dispatch compiles every op of it, per shape)."""
    return model(tokens_bt, positions_bt, return_hidden=return_hidden)


def full_forward_logps(model, pairs):
    """Per-token log-probs of each `(prompt, completion)`, by one uncached batched forward.

    Rows are right-padded, which causal attention never looks at.
    """
    seqs = [list(p) + list(c) for p, c in pairs]
    width = max(map(len, seqs))
    tokens = np.asarray([s + [0] * (width - len(s)) for s in seqs])
    logits = forward(model, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(width), tokens.shape))
    logp_btv = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    return [logp_btv[r, len(p) - 1 + np.arange(len(c)), np.asarray(c, int)]
            for r, (p, c) in enumerate(pairs)]


def test_beam_width_one_is_greedy(model):
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.0))
    stop = int(greedy.tokens_bn[0, 2])
    greedy_stop = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.0,
                                                          stop_ids=(stop,)), pad_id=0)
    out = search.beam_search(model, PROMPTS, search.BeamConfig(
        num_beams=1, max_new_tokens=6, length_penalty=0.0, stop_ids=(stop,)))
    np.testing.assert_array_equal(out.tokens_bwc[:, 0], greedy_stop.tokens_bn)
    np.testing.assert_array_equal(out.lengths_bw[:, 0], greedy_stop.lengths_b)
    np.testing.assert_allclose(out.logps_bwc[:, 0], greedy_stop.logps_bn, atol=1e-5)


def test_beam_scores_rewards_and_eos_by_full_forward(model, ref):
    stop = 13
    config = search.BeamConfig(num_beams=4, max_new_tokens=5, length_penalty=1.0,
                               stop_ids=(stop,))
    out = search.beam_search(model, PROMPTS, config, ref_model=ref, beta=0.5, pad_id=-1)
    assert out.tokens_bwc.shape == (3, 4, 5) and out.scores_bw.shape == (3, 4)
    assert np.all(np.diff(out.scores_bw, axis=-1) <= 1e-6)  # best first
    pairs = [(p, out.tokens_bwc[b, w, :out.lengths_bw[b, w]])
             for b, p in enumerate(PROMPTS) for w in range(4)]
    logps_all, ref_logps_all = full_forward_logps(model, pairs), full_forward_logps(ref, pairs)
    for row, (_, completion) in enumerate(pairs):
        b, w = divmod(row, 4)
        n = len(completion)
        # A stop token can only be the last token; after the length comes padding.
        assert stop not in completion[:-1] and np.all(out.tokens_bwc[b, w, n:] == -1)
        assert n == 5 or completion[-1] == stop
        logps, ref_logps = logps_all[row], ref_logps_all[row]
        np.testing.assert_allclose(out.logps_bwc[b, w, :n], logps, atol=1e-4)
        np.testing.assert_allclose(out.sum_logps_bw[b, w], logps.sum(), atol=1e-4)
        np.testing.assert_allclose(out.scores_bw[b, w], logps.sum() / n, atol=1e-4)
        np.testing.assert_allclose(out.rewards_bw[b, w], 0.5 * (logps.sum() - ref_logps.sum()),
                                   atol=1e-4)
    for b in range(3):
        assert len({tuple(c) for _, c in pairs[4 * b:4 * b + 4]}) == 4
    again = search.beam_search(model, PROMPTS, config, pad_id=-1)
    np.testing.assert_array_equal(out.tokens_bwc, again.tokens_bwc)


def target_fraction(token):
    """A synthetic reward: the fraction of completion tokens equal to `token`."""
    def scorer(candidates):
        mask = np.asarray(candidates.mask_bnc, np.float32)
        hits = (np.asarray(candidates.tokens_bnc) == token) * mask
        return hits.sum(-1) / np.maximum(mask.sum(-1), 1)
    return scorer


def test_best_of_n_picks_the_best_and_is_seeded(model):
    config = SAMPLE
    scorer = target_fraction(7)
    out = search.best_of_n(model, PROMPTS, scorer, 8, config, rng=3)
    assert out.tokens_bkc.shape == (3, 1, 5) and out.scores_bn.shape == (3, 8)
    np.testing.assert_array_equal(out.index_bk[:, 0], np.argmax(out.scores_bn, axis=-1))
    best = np.take_along_axis(out.candidates.tokens_bnc, out.index_bk[..., None], axis=1)
    np.testing.assert_array_equal(out.tokens_bkc, best)
    again = search.best_of_n(model, PROMPTS, scorer, 8, config, rng=3)
    np.testing.assert_array_equal(out.candidates.tokens_bnc, again.candidates.tokens_bnc)
    # Rows of one prompt are different samples.
    assert len({tuple(t) for t in out.candidates.tokens_bnc[0]}) > 1


def test_rejection_sample_shapes(model):
    config = SAMPLE
    out = search.rejection_sample(model, PROMPTS, target_fraction(7), n=6, num_accept=3,
                                  config=config, beta=0.5, rng=1)
    assert out.tokens_bkc.shape == (3, 3, 5) and out.mask_bkc.shape == (3, 3, 5)
    assert all(len(set(row)) == 3 for row in out.index_bk)


def test_implicit_reward_model_and_ensemble_scorers(model, ref):
    config = SAMPLE
    cands = search.sample_candidates(model, PROMPTS, 3, config, rng=2)
    implicit = scorers.ImplicitRewardScorer(model, ref, beta=0.1)(cands)
    # Sampling's own log-probs and the batched rescoring agree.
    np.testing.assert_allclose(scorers.completion_logps(model, cands), cands.logps_bnc, atol=1e-4)
    head = RewardHead(CONFIG.hidden_size, rngs=nnx.Rngs(2))
    rm = scorers.RewardModelScorer(model, head)(cands)
    pairs = [(p, cands.tokens_bnc[b, n, :cands.mask_bnc[b, n].sum()])
             for b, p in enumerate(PROMPTS) for n in range(3)]
    logps_all, ref_logps_all = full_forward_logps(model, pairs), full_forward_logps(ref, pairs)
    want = [0.1 * (a.sum() - r.sum()) for a, r in zip(logps_all, ref_logps_all)]
    np.testing.assert_allclose(implicit.reshape(-1), want, atol=1e-4)
    # Right-padded rows: the reward head reads each row at its own last real token.
    seqs = [list(p) + list(c) for p, c in pairs]
    width = max(map(len, seqs))
    tokens = jnp.asarray([s + [0] * (width - len(s)) for s in seqs])
    hidden = forward(model, tokens, jnp.broadcast_to(jnp.arange(width), tokens.shape),
                     return_hidden=True)
    want_rm = head(hidden, index_b=[len(s) - 1 for s in seqs])
    np.testing.assert_allclose(rm.reshape(-1), want_rm, atol=1e-4)
    members = [lambda c: implicit, lambda c: rm, target_fraction(7)]
    stack = np.stack([implicit, rm, target_fraction(7)(cands)])
    for name, want in [("mean", stack.mean(0)), ("wco", stack.min(0)),
                       ("uwo", stack.mean(0) - 0.5 * stack.var(0))]:
        np.testing.assert_allclose(scorers.EnsembleScorer(members, name)(cands), want, atol=1e-5)
    with pytest.raises(ValueError, match="ensemble aggregation"):
        scorers.EnsembleScorer(members, "median")


def test_text_scorer_decodes_the_masked_completion():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    cands = scorers.Candidates([[1]], np.asarray([[[4, 5, 0], [6, 0, 0]]]),
                               np.asarray([[[1, 1, 0], [1, 0, 0]]]))
    scorer = scorers.TextScorer(lambda text: float(len(text)), Tok())
    assert scorer.texts(cands) == [["4 5", "6"]]
    np.testing.assert_array_equal(scorer(cands), [[3.0, 1.0]])
    batched = scorers.TextScorer(lambda texts: [len(t) for t in texts], Tok(), batched=True)
    np.testing.assert_array_equal(batched(cands), [[3.0, 1.0]])


def test_guided_decoding_reduces_to_the_base_model(model, ref):
    config = SAMPLE
    base = generate(model, PROMPTS, config, rng=4)
    # beta = 0, or a DPO policy equal to its reference: the guide is a no-op.
    for dpo, beta in [(ref, 0.0), (ref, 2.0)]:
        out = search.guided_generate(model, dpo, ref, PROMPTS, config, beta=beta, rng=4)
        np.testing.assert_array_equal(out.tokens_bn, base.tokens_bn)
        np.testing.assert_allclose(out.logps_bn, base.logps_bn, atol=1e-4)
    # With beta = 1 and base == ref the product is the DPO policy itself.
    out = search.guided_generate(ref, model, ref, PROMPTS, config, beta=1.0, rng=4)
    np.testing.assert_allclose(out.logps_bn, base.logps_bn, atol=1e-4)
