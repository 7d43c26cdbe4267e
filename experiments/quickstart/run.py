"""The quickstart in one command: DPO + LoRA on SmolLM2-135M-Instruct, then the report.

    python experiments/quickstart/run.py [CONFIG.gin ...] [--gin.NAME=VALUE ...]

Trains exactly as `prefopt train CONFIG.gin` does (progress line per step; a restart resumes from
the newest checkpoint), then runs `report.py` on the run: held-out reward accuracy, mean
sentiment of greedy replies before and after, KL to the reference, replies side by side and
`curves.png`, all written to `LoopConfig.output_dir`. Takes the report's options too
(`--prompts`, `--max-new-tokens`, ...; see `report.py --help`).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402  (the sibling file; experiments/ is not an installed package)


def main(argv: list[str] | None = None) -> int:
    from prefopt_jax import hostmem, registry

    hostmem.keep_freed_memory()  # before JAX starts (see prefopt_jax/hostmem.py)
    args = report.parse_args(argv, __doc__.splitlines()[0])
    t0 = time.time()
    registry.parse(args.config, args.gin_bindings)
    registry.train()
    seconds = {"train": round(time.time() - t0, 1)}
    report.report(report.resolve(args.config, args.gin_bindings), args, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
