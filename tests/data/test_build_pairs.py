"""`prefopt data build-pairs` and the on-policy pair builder: valid rows, right order by score."""

import json

import numpy as np
import pytest

from prefopt_jax import cli
from prefopt_jax import data as data_lib
from prefopt_jax.data.synthetic import tiny_tokenizer
from prefopt_jax.sampling import onpolicy
from prefopt_jax.sampling.generate import SamplingConfig
from prefopt_jax.rewards import reward_model
from prefopt_jax.train import tiny
from prefopt_jax.models.spec import random_model


def length_scorer(c):
    return np.asarray(c.mask_bnc, np.float32).sum(-1)


@pytest.fixture(scope="module")
def policy():
    return random_model(tiny.config())


def test_select_pairs_modes():
    scores = np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0]])
    assert onpolicy.select_pairs(scores) == [(0, 1, 0)]
    assert sorted(onpolicy.select_pairs(scores, "all_pairs")) == [(0, 1, 0), (0, 1, 2), (0, 2, 0)]
    assert onpolicy.select_pairs(scores, "rso", accepted_ba=[[0, 2], [0, 1]]) == [(0, 2, 0)]


def test_win_probs_by_hand():
    scores = np.array([[0.0, 1.0, 1.0]])
    np.testing.assert_allclose(onpolicy.win_probs(scores, None), [[0.0, 0.75, 0.75]])
    s = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(onpolicy.win_probs(scores, 2.0),
                               [[1 - s, (s + 0.5) / 2, (s + 0.5) / 2]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["best_vs_worst", "rso"])
def test_pairs_are_ordered_by_score(policy, mode):
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    config = SamplingConfig(max_new_tokens=6, stop_ids=tuple(range(1, 25)))
    scored = onpolicy.sample_and_score(policy, prompts, length_scorer, 4, config, mode=mode,
                                       accept=3, rso_beta=10.0)
    data = onpolicy.to_tokenized(scored, with_win_probs=True)
    assert len(data) == len(scored.pairs) >= 1
    for i, (b, w, l) in enumerate(scored.pairs):
        assert list(data.prompt(i)) == prompts[b]
        assert len(data.completion(i, 0)) == scored.scores_bn[b, w] > scored.scores_bn[b, l]
        assert len(data.completion(i, 1)) == scored.scores_bn[b, l]
        if mode == "best_vs_worst":
            assert scored.scores_bn[b, w] == scored.scores_bn[b].max()
    assert np.all(data.fields["win_prob_chosen"] >= data.fields["win_prob_rejected"])


def test_command_writes_rows_the_data_module_reads(tmp_path):
    from prefopt_jax.models import save_pretrained

    tokenizer = tiny_tokenizer()
    model = random_model(tiny.config(vocab_size=len(tokenizer)))
    save_pretrained(model, tmp_path / "policy", tokenizer)
    rm = reward_model.new_reward_model(model, init_scale=1.0, seed=3)
    reward_model.save(rm, str(tmp_path / "rm"), tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": t}]}) + "\n"
                               for t in ["the cat sat", "why is the sun red", "yes or no"]))
    out = tmp_path / "pairs.jsonl"
    assert cli.main(["data", "build-pairs", str(prompts), "--out", str(out), "--model",
                     str(tmp_path / "policy"), "--scorer", f"rm:{tmp_path / 'rm'}", "--k", "4",
                     "--max-new-tokens", "8", "--pairs", "all_pairs"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert rows[0]["chosen"][0]["role"] == "assistant"
    data, report = data_lib.prepare(str(out), tokenizer, data_lib.DataConfig(cache_dir=None))
    assert len(data) == len(rows) and data.kind == "paired"
    np.testing.assert_allclose(data.field("score_chosen"), [r["score_chosen"] for r in rows])
