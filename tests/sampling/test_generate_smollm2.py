"""Greedy generation from the real SmolLM2-135M-Instruct equals transformers' greedy `generate`."""

import numpy as np
import pytest

from prefopt_jax.commands.generate import chat_prompt_ids, stop_ids_of
from prefopt_jax.models.hf import builtin_path
from prefopt_jax.sampling.generate import SamplingConfig, generate

N_NEW = 40


@pytest.mark.real_model
def test_greedy_equals_transformers_generate(smollm2):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    prompts = ["Write a two-sentence review of a rainy day.",
               "List three facts about the moon."]
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    stop_ids = stop_ids_of(tokenizer)
    ours = generate(model, ids, SamplingConfig(max_new_tokens=N_NEW, temperature=0.0,
                                               stop_ids=stop_ids))

    path = builtin_path("smollm2-135m-instruct")
    reference = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for row, prompt_ids in enumerate(ids):
        with torch.no_grad():
            want = reference.generate(
                torch.tensor([prompt_ids]), max_new_tokens=N_NEW, do_sample=False,
                pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):].numpy()
        n = int(ours.lengths_b[row])
        np.testing.assert_array_equal(ours.tokens_bn[row, :n], want)
    # The comparison must cover a long reply: the second prompt runs the full budget.
    assert ours.lengths_b[1] >= 32
    assert stop_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
