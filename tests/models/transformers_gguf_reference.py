"""Reference per-token log-probs of a chat, from transformers' own GGUF loader (a script).

Usage: ``python transformers_gguf_reference.py GGUF_PATH OUT.npz``. Writes ``ids`` (the chat
formatted by the GGUF tokenizer's chat template) and ``logps`` (log p(ids[t] | ids[:t]) for
t >= 1, float32 PyTorch). test_real_model.py runs it in a subprocess so that it overlaps our
own load of the same file; it imports no prefopt_jax code.
"""

import sys
from pathlib import Path

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


def load_model(path: Path):
    """transformers' own GGUF load (dequantised to float32, q/k rows un-permuted by it)."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def main(gguf_path: str, out_path: str) -> None:
    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    model = load_model(path)
    with torch.no_grad():
        logits_tv = model(torch.tensor([ids])).logits[0].float()
    logps_tv = torch.log_softmax(logits_tv, dim=-1)
    logps_t = logps_tv[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    np.savez(out_path, ids=np.asarray(ids, np.int32), logps=logps_t.numpy().astype(np.float32))


if __name__ == "__main__":
    main(*sys.argv[1:3])
