"""What objectives need, as the step supplies it, equals a direct computation on the tiny model.

In every layout (padded, packed, prefix-shared: the gold completion is a third branch of the
prompt): tpo's gold completion log-probs, tgdpo's per-token rewards `b (log pi_dpo -
log pi_ref)` of a frozen DPO teacher, and aligndistil's vocabulary terms (student, teacher and
reference logits), against each sequence scored alone by a full forward pass with full logits.
The step computes them in chunks of 5 positions, so the chunking is exercised too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.data import synthetic
from prefopt_jax.losses.tokenlevel import aligndistil_terms
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models.spec import ModelSpec, load_model
from prefopt_jax.train import build, optim, step as step_lib
from prefopt_jax.train.reference import ReferenceConfig
from prefopt_jax.train.state import policy_params

OPT = optim.OptimConfig(learning_rate=1e-2, schedule="constant")
SPEC = ModelSpec(overrides={"num_layers": 2})
TEACHER = build.TeacherConfig(source="tiny", seed=1, beta=0.5)
SLOTS, REAL = 4, 3  # one filler slot


def batch_of(kind: str, layout: str):
    data = synthetic.tiny_data(kind, 8, seed=2, vocab_size=61)
    config = data_lib.LayoutConfig(kind=layout, row_length=64 if "packed" in layout else None)
    batch = data_lib.make_batch(data, np.arange(REAL), SLOTS, config)
    return data, build.stack_micro([batch])


def scored_inputs(loss: str, batch_m, teacher=None):
    """The objective's inputs as the step builds them (jitted, no gradient step)."""
    algo = build.AlgoConfig(loss, (), ReferenceConfig(kind="frozen"), teacher=teacher)
    model = load_model(SPEC)[0]
    frozen, teacher_graphdef = build.load_teachers(algo, SPEC, model.config.vocab_size)
    graphdef, params, base, rest = build.split_model(model, None, 0)
    setup = build.make_setup(graphdef, algo, OPT, None, 5, teacher_graphdef)
    mesh = sharding_lib.make_mesh((1, 1, 1))
    state, _ = build.place_state(setup, params, base, rest, batch_m, mesh, 0, frozen=frozen)

    def inputs(state, batch):
        scores = step_lib.score(setup, policy_params(setup, state), state, batch)
        return step_lib.objective_inputs(setup, scores, batch)

    with jax.set_mesh(mesh):
        return jax.device_get(jax.jit(inputs)(state, jax.tree.map(lambda x: x[0], batch_m)))


@functools.lru_cache(maxsize=None)
def models():
    """(policy = reference at the start, teacher): the run's initial model and the teacher."""
    return load_model(SPEC)[0], load_model(ModelSpec(overrides={"num_layers": 2}, seed=1))[0]


@nnx.jit
def _forward(model, tokens_bt, positions_bt):
    return model(tokens_bt, positions_bt)


def full_logits(model, prompt, completion) -> np.ndarray:
    """Float32 logits `[len(completion), V]` of a sequence scored alone (no layout, no padding).

    Jitted: one compile per sequence length (eager dispatch compiles every op per length)."""
    tokens = np.concatenate([prompt, completion]).astype(np.int32)[None]
    logits = _forward(model, jnp.asarray(tokens), jnp.arange(tokens.shape[1])[None])[0]
    start = len(prompt) - 1
    return np.asarray(logits[start:start + len(completion)], np.float32)


def token_logps(logits_cv, completion) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(logits_cv, axis=-1))[np.arange(len(completion)),
                                                                completion]


@pytest.mark.parametrize("layout", data_lib.LAYOUTS)
def test_tpo_scores_the_gold_completion(layout):
    data, batch_m = batch_of("triple", layout)
    inputs = scored_inputs("tpo", batch_m)
    policy, _ = models()
    for p in range(REAL):
        gold = data.completion(p, 2)
        want = token_logps(full_logits(policy, data.prompt(p), gold), gold)
        got = inputs.extras["gold_logps_pc"][p]
        np.testing.assert_allclose(got[:len(gold)], want, rtol=1e-5, atol=1e-5)
        assert inputs.extras["gold_mask_pc"][p].sum() == len(gold)
        np.testing.assert_array_equal(got[len(gold):], 0.0)


@pytest.mark.parametrize("layout", data_lib.LAYOUTS)
def test_tgdpo_token_rewards_are_the_teachers_implicit_rewards(layout):
    data, batch_m = batch_of("paired", layout)
    inputs = scored_inputs("tgdpo", batch_m, TEACHER)
    policy, teacher = models()
    for p in range(REAL):
        for side, got in ((0, inputs.token_rewards_w_pc[p]), (1, inputs.token_rewards_l_pc[p])):
            c = data.completion(p, side)
            prompt = data.prompt(p)
            want = TEACHER.beta * (token_logps(full_logits(teacher, prompt, c), c)
                                   - token_logps(full_logits(policy, prompt, c), c))
            assert np.ptp(want) > 1e-3
            np.testing.assert_allclose(got[:len(c)], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", data_lib.LAYOUTS)
def test_aligndistil_teacher_terms_equal_full_logits(layout):
    data, batch_m = batch_of("paired", layout)
    inputs = scored_inputs("aligndistil", batch_m, TEACHER)
    policy, teacher = models()
    for p in range(REAL):
        for side in (0, 1):
            c, q = data.completion(p, side), 2 * p + side
            logits = [full_logits(m, data.prompt(p), c) for m in (policy, teacher, policy)]
            want = aligndistil_terms(*logits)
            np.testing.assert_allclose(inputs.kl_nc[q][:len(c)], want["kl"], rtol=1e-4,
                                       atol=1e-6)
            np.testing.assert_allclose(inputs.teacher_weight_nc[q][:len(c)],
                                       want["teacher_weight"], rtol=1e-5)
    assert np.all(inputs.valid_n == np.repeat([1, 1, 1, 0], 2))


def write_rows(path, rows):
    import json
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_data_files_are_read_as_the_kind_the_objective_needs(tmp_path):
    """Triples feed tpo (and, gold left out, dpo); pairs feed kto as labelled singles; data that
    lacks a need (a gold completion, win probabilities) is refused naming the file and what is
    missing."""
    from prefopt_jax.losses import ObjectiveError
    from prefopt_jax.train import loop

    tokenizer = synthetic.tiny_tokenizer()
    vocab = len(tokenizer)
    rows = synthetic.synthetic_rows(6, "triple", seed=1)
    triples = write_rows(tmp_path / "triples.jsonl", rows)
    pairs = write_rows(tmp_path / "pairs.jsonl",
                       [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    spec = lambda source: loop.DataSpec(source=source, max_length=64, batch_size=2)  # noqa
    loader = loop.make_loader(spec(triples), tokenizer, 0, vocab, kind="triple")
    assert loader.data.kind == "triple" and loader.data.num_completions == 3
    as_pairs = loop.make_loader(spec(triples), tokenizer, 0, vocab, kind="paired").data
    assert as_pairs.num_completions == 2
    np.testing.assert_array_equal(as_pairs.completion(0, 1), loader.data.completion(0, 1))
    singles = loop.make_loader(spec(pairs), tokenizer, 0, vocab, kind="unpaired").data
    assert len(singles) == 12 and list(singles.fields["label"][:4]) == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="pairs.jsonl holds paired examples \\(chosen, rejected"
                                         "\\); the objective reads triple examples \\(prompt, "
                                         "gold, chosen, rejected\\)"):
        loop.make_loader(spec(pairs), tokenizer, 0, vocab, kind="triple")
    with pytest.raises(ObjectiveError, match="pairs.jsonl has no win_prob_chosen / "
                                             "win_prob_rejected columns"):
        loop.make_loader(spec(pairs), tokenizer, 0, vocab, kind="paired", win_probs=True)
    won = write_rows(tmp_path / "won.jsonl", [{**r, "win_prob_chosen": 0.7,
                                               "win_prob_rejected": 0.4} for r in rows])
    batch = loop.make_loader(spec(won), tokenizer, 0, vocab, win_probs=True).next_batch()
    np.testing.assert_allclose(batch["win_prob_chosen"], [0.7, 0.7])


def test_data_spec_applies_the_studies_transforms(tmp_path):
    """DataSpec.flip_rate swaps a seeded share of the pairs and DataSpec.relabel_with_scores
    doubles scored pairs with score-conditioned prompts, through the loader training uses; both
    are refused for synthetic data and a rate outside [0, 1] is refused at construction."""
    from prefopt_jax.train import loop

    tokenizer = synthetic.tiny_tokenizer()
    vocab = len(tokenizer)
    rows = [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}",
             "score_chosen": 0.5, "score_rejected": -0.5} for i in range(40)]
    path = write_rows(tmp_path / "scored.jsonl", rows)
    spec = lambda **kw: loop.DataSpec(source=path, max_length=64, batch_size=2, **kw)  # noqa
    clean = loop.make_loader(spec(), tokenizer, 0, vocab).data
    noisy = loop.make_loader(spec(flip_rate=0.5), tokenizer, 0, vocab).data
    flipped = noisy.fields["flipped"].astype(bool)
    assert 8 <= flipped.sum() <= 32
    for i in range(len(noisy)):
        side = 1 if flipped[i] else 0
        np.testing.assert_array_equal(noisy.completion(i, 0), clean.completion(i, side))
    relabelled = loop.make_loader(spec(relabel_with_scores=True), tokenizer, 0, vocab).data
    assert len(relabelled) == 80
    assert tokenizer.decode(list(relabelled.prompt(1))).endswith("rated -0.5.")
    np.testing.assert_array_equal(relabelled.completion(1, 0), clean.completion(0, 1))
    with pytest.raises(ValueError, match="DataSpec.flip_rate and DataSpec.relabel_with_scores"):
        loop.make_loader(loop.DataSpec(flip_rate=0.1), None, 0, vocab)
    with pytest.raises(ValueError, match="DataSpec.flip_rate must be in"):
        loop.DataSpec(flip_rate=1.5)
