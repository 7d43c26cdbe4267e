"""Hugging Face reward models (`*ForSequenceClassification`, what TRL's RewardTrainer writes)
as prefopt reward models: the scores of transformers (PyTorch, CPU) on the same token ids, read
where transformers reads them (the last token that is not the pad id)."""

import numpy as np
import pytest
import torch
import transformers

from prefopt_jax import data as data_lib
from prefopt_jax.data.tokenized import from_lists
from prefopt_jax.errors import ConfigError
from prefopt_jax.models.hf import CheckpointError
from prefopt_jax.rewards import reward_model
from prefopt_jax.rewards.functions import RewardFunctions

PAD = 3  # also the replies' closing token, as when a tokenizer's pad is its end of turn
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=PAD)
PROMPTS = [[5, 6, 7], [9, 10]]
# Replies ending with the pad id (read at the token before it), one without it, one that is
# nothing but the pad id (read at the prompt's last token), one of a single ordinary token.
REPLIES = [[[11, 12, 13, PAD], [14, 15]], [[PAD], [20]]]


def classifier(directory, num_labels=1, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY, num_labels=num_labels)  # untied, as Llama is
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # scores well away from 0
    model.save_pretrained(directory)
    return model


def transformers_scores(model) -> np.ndarray:
    with torch.no_grad():
        return np.array([[model(torch.tensor([prompt + reply])).logits[0, 0].item()
                          for reply in replies] for prompt, replies in zip(PROMPTS, REPLIES)])


def test_sampled_replies_score_as_transformers_scores_them(tmp_path):
    want = transformers_scores(classifier(tmp_path / "rm"))
    assert np.ptp(want) > 0.1
    tokens_bkc = np.zeros((2, 2, 4), np.int32)
    mask_bkc = np.zeros((2, 2, 4), np.int32)
    for b, replies in enumerate(REPLIES):
        for k, reply in enumerate(replies):
            tokens_bkc[b, k, :len(reply)], mask_bkc[b, k, :len(reply)] = reply, 1
    rewards = RewardFunctions([f"scorer:rm:{tmp_path / 'rm'}"])
    got = rewards([""] * 4, [""] * 4, tokens=(PROMPTS, tokens_bkc, mask_bkc)).total_n
    np.testing.assert_allclose(got, want.reshape(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["padded", "packed", "prefix"])
def test_batches_of_every_layout_score_as_transformers_does(kind, tmp_path):
    want = transformers_scores(classifier(tmp_path / "rm"))
    rm, tokenizer = reward_model.load(str(tmp_path / "rm"))
    assert tokenizer is None and rm.skip_id == PAD
    data = from_lists("paired", 2, PROMPTS, [r for replies in REPLIES for r in replies],
                      np.arange(2), {})
    got = reward_model.score_examples(rm, data, 2, data_lib.LayoutConfig(kind=kind))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if kind == "padded":  # saved in prefopt's own format, it keeps where it is read
        again, _ = reward_model.load(reward_model.save(rm, str(tmp_path / "ours")))
        assert again.skip_id == PAD
        np.testing.assert_array_equal(reward_model.score_examples(again, data, 2), got)


def test_what_is_no_reward_model_is_named(tmp_path):
    classifier(tmp_path / "three", num_labels=3)
    with pytest.raises(CheckpointError, match="a classifier of 3 labels; a reward model gives "
                                              "one score"):
        reward_model.load(str(tmp_path / "three"))
    causal = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    causal.save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError, match="not a reward model"):
        RewardFunctions([f"scorer:rm:{tmp_path / 'lm'}"])
