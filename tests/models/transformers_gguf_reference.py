"""Reference log-probs and greedy replies, from transformers' own GGUF loader (a script).

Usage: ``python transformers_gguf_reference.py GGUF_PATH OUT.npz``. Writes ``ids`` (the chat
formatted by the GGUF tokenizer's chat template), ``logps`` (log p(ids[t] | ids[:t]) for
t >= 1, float32 PyTorch), and for each of GREEDY_PROMPTS ``greedy_prompt_<i>`` (one user turn
with the generation prompt, as ``commands.generate.chat_prompt_ids`` formats it) and
``greedy_<i>`` (the tokens of transformers' greedy ``generate``, at most GREEDY_NEW), and
``pad_token_id`` (its GGUF tokenizer's, which ``generate`` was given). test_real_model.py runs
it in a subprocess so that it overlaps our own load of the same file, one transformers load for
both comparisons; it imports no prefopt_jax code.
"""

import functools
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And what river flows through it?"},
    {"role": "assistant", "content": "The Seine flows through Paris."},
]
GREEDY_PROMPTS = ["Write a two-sentence review of a rainy day.",
                  "List three facts about the moon."]
GREEDY_NEW = 40


def load_model(path: Path):
    """transformers' own GGUF load (dequantised to float32, q/k rows un-permuted by it)."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def main(gguf_path: str, out_path: str) -> None:
    # transformers' GGUF loader asks gguf for the same read-only tensor-name table once per
    # module of the model (397 times for SmolLM2, 5-10 s); the table depends on its arguments
    # alone, so one copy serves every call (the saved reference is bit-identical). Set here, in
    # the script's own process only.
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)
    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    model = load_model(path)
    with torch.no_grad():
        logits_tv = model(torch.tensor([ids])).logits[0].float()
    logps_tv = torch.log_softmax(logits_tv, dim=-1)
    logps_t = logps_tv[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    out = dict(ids=np.asarray(ids, np.int32), logps=logps_t.numpy().astype(np.float32),
               pad_token_id=np.asarray(tokenizer.pad_token_id))
    for i, prompt in enumerate(GREEDY_PROMPTS):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            new = model.generate(torch.tensor([prompt_ids]), max_new_tokens=GREEDY_NEW,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out[f"greedy_prompt_{i}"] = np.asarray(prompt_ids, np.int32)
        out[f"greedy_{i}"] = new[0, len(prompt_ids):].numpy()
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
