"""Reward-model training on the tiny model: a learnable synthetic preference, gin dispatch, I/O."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax import registry
from prefopt_jax.data.tokenized import from_lists
from prefopt_jax.rewards import calibration
from prefopt_jax.rewards import reward_model as rm_lib
from prefopt_jax.train import build, optim, tiny
from prefopt_jax.train import reward_model as rm_train
from prefopt_jax.models.spec import random_model

TARGET = 7  # the chosen reply always contains this token; the rejected never does


def target_pairs(n: int, seed: int):
    """Random pairs where the chosen reply contains TARGET at a random place."""
    rng = np.random.default_rng(seed)
    prompts, completions = [], []
    for _ in range(n):
        prompts.append(rng.integers(10, tiny.VOCAB, rng.integers(2, 6)))
        chosen = list(rng.integers(10, tiny.VOCAB, rng.integers(2, 7)))
        chosen.insert(int(rng.integers(0, len(chosen) + 1)), TARGET)
        completions += [chosen, list(rng.integers(10, tiny.VOCAB, rng.integers(2, 7)))]
    return from_lists("paired", 2, prompts, completions, np.arange(n), {})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rm = rm_lib.new_reward_model(random_model(tiny.config()))
    loader = data_lib.Loader(target_pairs(128, 0), 16, data_lib.LayoutConfig(kind="padded"),
                             num_epochs=None)
    config = optim.OptimConfig(learning_rate=3e-3, schedule="constant", total_steps=40)
    return rm_train.fit(rm, loader, build.AlgoConfig(loss="bradley_terry"), config, 40,
                        str(tmp_path_factory.mktemp("rm")))


def test_learns_synthetic_preference_on_heldout_pairs(trained):
    rm, values = trained
    assert values["rewards/accuracy"] > 0.9
    r_w, r_l = rm_lib.score_pairs(rm, target_pairs(64, 1))
    report = calibration.pair_report(r_w, r_l)
    assert report["pairs"] == 64 and report["accuracy"] > 0.85
    assert 0.0 <= report["ece"] <= 1.0


def test_scores_do_not_depend_on_layout(trained):
    rm, _ = trained
    data = target_pairs(8, 2)
    padded = rm_lib.score_pairs(rm, data, 4, data_lib.LayoutConfig(kind="padded"))
    packed = rm_lib.score_pairs(rm, data, 4, data_lib.LayoutConfig(kind="packed"))
    np.testing.assert_allclose(padded, packed, atol=1e-4)


def one_token_pairs():
    """Pairs whose chosen, rejected or both replies are a single token (and a longer control)."""
    prompts = [[11, 12, 13], [14, 15], [16, 17, 18, 19], [20, 21, 22]]
    completions = [[30], [31, 32, 33], [34, 35], [36], [37], [38], [39, 40], [41, 42, 43]]
    return from_lists("paired", 2, prompts, completions, np.arange(4), {})


@nnx.jit
def _alone_score(rm, tokens_bt, positions_bt, index_b):
    hidden = rm.trunk(tokens_bt, positions_bt, return_hidden=True)
    return rm.head(hidden, index_b=index_b)


def alone_scores(rm, data):
    """Each sequence scored by itself: one unpadded row, read at its last token.

    Jitted: one compile per sequence length (eager dispatch compiles every op per length)."""
    out = []
    for i in range(len(data)):
        for j in range(2):
            tokens = np.concatenate([data.prompt(i), data.completion(i, j)])[None]
            score = _alone_score(rm, tokens, np.arange(tokens.shape[1])[None],
                                 np.array([tokens.shape[1] - 1]))
            out.append(float(score[0]))
    return np.array(out).reshape(-1, 2).T


@pytest.mark.parametrize("kind", ["padded", "packed", "prefix"])
def test_last_token_index_points_at_each_last_reply_token(kind):
    batch = tiny.batch(kind, seed=3, n_pairs=6)
    lengths = batch["completion_mask"].sum(1).astype(int)
    assert (lengths == 1).any()
    index_q = np.asarray(rm_lib.last_token_index(batch["source_index"], batch["completion_mask"]))
    row_q, col_q = np.divmod(index_q, batch["tokens"].shape[1])
    np.testing.assert_array_equal(batch["tokens"][row_q, col_q],
                                  batch["target_tokens"][np.arange(len(lengths)), lengths - 1])
    # Each reply's own token: with RoPE positions, the last token's position is prompt + length.
    src_row, src_col = np.divmod(batch["source_index"][:, 0], batch["tokens"].shape[1])
    np.testing.assert_array_equal(batch["positions"][row_q, col_q],
                                  batch["positions"][src_row, src_col] + lengths)


@pytest.mark.parametrize("kind", data_lib.LAYOUTS)
def test_one_token_replies_score_as_if_alone_in_every_layout(kind):
    rm = rm_lib.new_reward_model(random_model(tiny.config()), init_scale=1.0)
    data = one_token_pairs()
    expect = alone_scores(rm, data)
    assert np.ptp(expect) > 1e-3
    got = rm_lib.score_pairs(rm, data, 4, data_lib.LayoutConfig(kind=kind))
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_search_scorer_agrees_on_one_token_replies():
    """The best-of-N scorer (left-padded prompts, its own forward) reads the same tokens."""
    from prefopt_jax.rewards import scorers as rm_scorers
    from prefopt_jax.sampling.scorers import Candidates

    rm = rm_lib.new_reward_model(random_model(tiny.config()), init_scale=1.0)
    data = one_token_pairs()
    tokens, mask = np.zeros((4, 2, 3), np.int32), np.zeros((4, 2, 3), np.int32)
    for i in range(4):
        for j in range(2):
            c = data.completion(i, j)
            tokens[i, j, :len(c)], mask[i, j, :len(c)] = c, 1
    cands = Candidates([list(data.prompt(i)) for i in range(4)], tokens, mask)
    np.testing.assert_allclose(rm_scorers.reward_model_scorer(rm)(cands).T,
                               alone_scores(rm, data), atol=1e-5)


def test_save_load_round_trip(trained, tmp_path):
    rm, _ = trained
    rm_lib.save(rm, str(tmp_path))
    back, _ = rm_lib.load(str(tmp_path))
    data = target_pairs(4, 3)
    np.testing.assert_allclose(rm_lib.score_pairs(back, data), rm_lib.score_pairs(rm, data),
                               atol=1e-5)


def test_gin_dispatch_with_lora(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    registry.parse(["configs/experiments/reward_model_tiny.gin", "configs/models/lora.gin"],
                   ["LoopConfig.steps = 2", f"LoopConfig.output_dir = '{tmp_path}'",
                    "DataSpec.tiny_examples = 8", "DataSpec.batch_size = 4",
                    "DataSpec.length_step = 64"])  # one batch shape: the step compiles once
    values = registry.train()
    assert np.isfinite(values["loss"])
    assert os.path.exists(tmp_path / "reward_model" / "head.npz")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def gin_run(out_dir, steps, *extra):
    registry.parse(["configs/experiments/reward_model_tiny.gin"],
                   [f"LoopConfig.steps = {steps}", f"LoopConfig.output_dir = '{out_dir}'",
                    "LoopConfig.checkpoint_every = 2", "LoopConfig.keep_checkpoints = 2",
                    "LoopConfig.export = False", "DataSpec.tiny_examples = 12",
                    "DataSpec.batch_size = 4",
                    # one batch shape (rows of 64): the step compiles once, not once per length
                    "DataSpec.length_step = 64",
                    # one schedule for runs of different lengths (unset, it follows their steps)
                    "OptimConfig.total_steps = 20", *extra])
    return registry.train()


def test_stop_and_restart_equals_uninterrupted(tmp_path, monkeypatch):
    """Stopped after 3 steps (mid-epoch, off the checkpoint grid), restarted to 7: same log."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    gin_run(clean, 7)
    gin_run(resumed, 3)
    assert sorted(os.listdir(resumed / "checkpoints"), key=int) == ["2", "3"]
    # Resume from step 2 instead (as after a kill during step 3's save); the records a killed
    # run wrote past its checkpoint are dropped on restart.
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    (resumed / "checkpoints" / "3").rename(resumed / "checkpoints" / "3.bak")
    gin_run(resumed, 7)
    records = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records(clean)] == list(range(1, 8))
    assert records(resumed) == records(clean)
    steps = [d for d in os.listdir(resumed / "checkpoints") if d.isdigit()]
    assert sorted(steps, key=int) == ["6", "7"]
