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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And what river flows through it?"},
    {"role": "assistant", "content": "The Seine flows through Paris."},
]


def load_model(path: Path):
    """transformers' GGUF load; without accelerate (which from_pretrained demands for
    gguf_file=) the same transformers GGUF reader is called directly."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True,
                                       model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise SystemExit(f"transformers GGUF load: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        return model.eval()
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
