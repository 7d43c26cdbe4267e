"""The `prefopt` command line: parses arguments and calls into the library; holds no logic.

Each sub-command lives in `prefopt_jax/commands/<name>.py` and exposes
`register(subparsers)` (adds its parser and sets `func`) so this file stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, imported lazily so `prefopt --help` does not import jax.
COMMANDS = ("generate", "data", "train", "eval", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"prefopt_jax.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"prefopt_jax.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from prefopt_jax import hostmem

    hostmem.keep_freed_memory()  # before the sub-command starts JAX (see hostmem.py)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
