"""The `prefopt` command line: parses arguments and calls into the library; holds no logic.

Each sub-command lives in `prefopt_jax/commands/<name>.py` and exposes
`register(subparsers)` (adds its parser and sets `func`) so this file stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from prefopt_jax.errors import UserError

# Sub-command modules, imported lazily so `prefopt --help` does not import jax.
COMMANDS = ("generate", "data", "train", "eval", "convert", "sample_images")


USER_ERROR_STATUS = 2  # argparse's status for a bad command line; user errors share it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefopt", description=__doc__.splitlines()[0],
        epilog="Mistakes in configs, data, models or checkpoints print one short message and "
               "exit with status 2; --debug (anywhere) or PREFOPT_DEBUG=1 shows the traceback.")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of user errors (also PREFOPT_DEBUG=1)")
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
    # A config names the user's own code as 'module:function' (reward functions): found in the
    # working directory as under `python -m`, but after the installed packages, so a local
    # folder named like one (`datasets/`) never shadows it.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PREFOPT_DEBUG", "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"prefopt {args.command}: error: {user_message(err)}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS


def user_message(err: BaseException) -> str:
    """A user error's message without what gin appends on the way out of a configurable.

    Gin re-raises an error from inside a configured call with "In call to configurable ..."
    lines added; they name Python objects, not the user's binding, so they are dropped.
    """
    text = "".join(traceback.format_exception_only(err)).strip()
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    for name in (prefix, f"{type(err).__qualname__}: "):
        text = text.removeprefix(name)
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("In call to configurable")]
    return "\n".join(lines).strip()


if __name__ == "__main__":
    sys.exit(main())
