"""Hugging Face reward models (`*ForSequenceClassification`, what TRL's RewardTrainer writes)
as prefopt reward models: the scores of transformers (PyTorch, CPU) on the same token ids."""

import numpy as np
import pytest
import torch
import transformers

from prefopt_jax.errors import ConfigError
from prefopt_jax.models.hf import CheckpointError
from prefopt_jax.rewards import reward_model
from prefopt_jax.rewards.functions import RewardFunctions

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0)


def classifier(directory, num_labels=1, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY, num_labels=num_labels)  # untied, as Llama is
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # scores well away from 0
    model.save_pretrained(directory)
    return model


def test_a_sequence_classifier_scores_sampled_replies_as_transformers_does(tmp_path):
    theirs = classifier(tmp_path / "rm")
    prompts = [[5, 6, 7], [9, 10]]
    tokens_bkc = np.array([[[11, 12, 13, 3], [14, 15, 0, 0]], [[16, 17, 18, 19], [20, 0, 0, 0]]])
    mask_bkc = (tokens_bkc > 0).astype(np.int32)
    rewards = RewardFunctions([f"scorer:rm:{tmp_path / 'rm'}"])
    got = rewards([""] * 4, [""] * 4, tokens=(prompts, tokens_bkc, mask_bkc)).total_n
    with torch.no_grad():
        want = [theirs(torch.tensor([prompt + [int(t) for t in row if t]])).logits[0, 0].item()
                for prompt, rows in zip(prompts, tokens_bkc) for row in rows]
    assert np.ptp(want) > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    rm, tokenizer = reward_model.load(str(tmp_path / "rm"))
    assert tokenizer is None and rm.trunk.config.num_layers == 2


def test_what_is_no_reward_model_is_named(tmp_path):
    classifier(tmp_path / "three", num_labels=3)
    with pytest.raises(CheckpointError, match="a classifier of 3 labels; a reward model gives "
                                              "one score"):
        reward_model.load(str(tmp_path / "three"))
    causal = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    causal.save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError, match="not a reward model"):
        RewardFunctions([f"scorer:rm:{tmp_path / 'lm'}"])
