"""Metrics out of the step: (sum, count) pairs to means, JSONL, TensorBoard and a progress line.

Only process 0 writes. Resuming truncates the JSONL log to the restored step, so a resumed run's
log equals an uninterrupted one's.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def means(metrics: dict) -> dict[str, float]:
    """(sum, count) pairs as plain float means (count 0 gives 0)."""
    out = {}
    for name, (total, count) in jax.device_get(metrics).items():
        out[name] = float(np.asarray(total) / max(float(np.asarray(count)), 1.0))
    return out


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records after `last_step` (written after the checkpoint we resume from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet.

    tensorboardX imports torch when it can (to accept torch tensors); that costs a `prefopt`
    process about 2 s and 200 MB, for scalars that are Python floats here. Marking
    torch absent for the duration of the import makes tensorboardX take its numpy-only path.
    """
    import sys

    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def quality(values: dict[str, float]) -> str:
    """The progress line's measure of the objective's own kind, with a trailing space.

    Pairwise and listwise objectives report reward accuracy; unpaired ones (KTO, BCO), which
    have no pairs, the mean implicit reward of desirable and undesirable completions.
    """
    if "rewards/accuracy" in values:
        return f"acc {values['rewards/accuracy']:.3f} "
    if "rewards/chosen" in values and "rewards/rejected" in values:
        return (f"reward desirable {values['rewards/chosen']:+.3f} "
                f"undesirable {values['rewards/rejected']:+.3f} ")
    return ""


class MetricsWriter:
    """JSONL + TensorBoard + progress; a no-op on processes other than 0."""

    def __init__(self, directory: str, total_steps: int, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.total_steps, self.start = total_steps, resume_step
        self.t0 = time.time()
        self.path = os.path.join(directory, "metrics.jsonl")
        if not self.active:
            return
        os.makedirs(directory, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        self.tb = summary_writer_class()(os.path.join(directory, "tb"))

    def write(self, step: int, values: dict[str, float]) -> None:
        """One record per step: JSONL line and TensorBoard scalars."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)

    def progress(self, step: int, values: dict[str, float], tokens: float) -> str:
        """Step, loss, reward accuracy, tokens, tokens/s and ETA as one line (process 0 prints).

        `tokens`: completion tokens trained on since this run (re)started, over all hosts
        (runs that train on no tokens, diffusion models, leave the token figures out).
        """
        elapsed = max(time.time() - self.t0, 1e-9)
        done = max(step - self.start, 1)
        eta = elapsed / done * (self.total_steps - step)
        rate = f"tokens {tokens:.0f} tok/s {tokens / elapsed:.0f} " if "tokens" in values else ""
        line = (f"step {step}/{self.total_steps} loss {values.get('loss', float('nan')):.4f} "
                f"{quality(values)}{rate}eta {eta:.0f}s")
        if self.active:
            print(line, flush=True)
        return line

    def close(self) -> None:
        if self.active:
            self.tb.close()
