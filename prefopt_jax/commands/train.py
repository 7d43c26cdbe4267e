"""`prefopt train CONFIG.gin [--gin.NAME=VALUE ...]`: parse gin, start (multi-host) training."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    """Adds the `train` sub-command."""
    p = subparsers.add_parser(
        "train", help="train a policy (or a reward model) from gin configs",
        description="Train from gin config files; later files and --gin.NAME=VALUE overrides "
                    "win over earlier ones. Every objective name, hyper-parameter and data or "
                    "model path is checked before a model loads. Started again in its "
                    "LoopConfig.output_dir, a run resumes from its newest intact checkpoint.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="+", help="gin files (later files override earlier ones); "
                   "then any number of --gin.NAME=VALUE (or --gin NAME=VALUE) overrides, "
                   "e.g. --gin.LoopConfig.steps=50")
    p.add_argument("--coordinator", default=os.environ.get("PREFOPT_COORDINATOR"),
                   help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=int,
                   default=int(os.environ.get("PREFOPT_NUM_PROCESSES", "0")) or None)
    p.add_argument("--process-id", type=int,
                   default=(int(os.environ["PREFOPT_PROCESS_ID"])
                            if "PREFOPT_PROCESS_ID" in os.environ else None))
    p.add_argument("--cpu-collectives", default=os.environ.get("PREFOPT_CPU_COLLECTIVES"),
                   help="e.g. gloo, for multi-process runs on CPU")
    p.set_defaults(func=run)
    accept_gin_flags(p)


EXAMPLES = """examples:
  prefopt train configs/experiments/tiny.gin configs/algos/simpo.gin
      SimPO on the tiny random model, in seconds
  prefopt train configs/experiments/dpo_smollm2_lora.gin --gin.DATA_PATH="'my_prefs.jsonl'" \\
      --gin.LoopConfig.steps=100 --gin.LoopConfig.output_dir="'runs/mine'"
      DPO with LoRA on SmolLM2 on your own TRL-format preference file
  --gin.AlgoConfig.loss="'ipo'"   switch the objective (it takes its own defaults)
  --gin.LoopConfig.overwrite=True train a finished run again from step 0
"""


def accept_gin_flags(parser) -> None:
    """Makes `parser` collect gin flags (`split_gin_args`) into `args.gin_bindings`.

    Such flags cannot be declared to argparse, so they are peeled off before it parses.
    """
    parser.set_defaults(gin_bindings=[])
    parse_known = parser.parse_known_args

    def parse_with_gin(arg_strings=None, namespace=None):
        try:
            rest, bindings = split_gin_args(list(arg_strings or []))
        except ValueError as err:
            parser.error(str(err))
        namespace, extra = parse_known(rest, namespace)
        namespace.gin_bindings = bindings
        return namespace, extra

    parser.parse_known_args = parse_with_gin


def split_gin_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate gin bindings from the other arguments: `--gin.NAME=VALUE`, and the forms gin
    users also type, `--gin NAME=VALUE` and `--gin=NAME=VALUE`."""
    bindings, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--gin."):
            bindings.append(arg[len("--gin."):])
        elif arg.startswith("--gin="):
            bindings.append(arg[len("--gin="):])
        elif arg == "--gin":
            binding = next(args, None)
            if binding is None:
                raise ValueError("--gin needs a binding after it, e.g. --gin LoopConfig.steps=50")
            bindings.append(binding)
        else:
            rest.append(arg)
    return rest, bindings


def init_distributed(args) -> None:
    """`jax.distributed.initialize` when launched on several hosts (flags, env or TPU)."""
    import jax
    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        jax.distributed.initialize()


def run(args: argparse.Namespace) -> int:
    from prefopt_jax import registry

    registry.parse(args.config, args.gin_bindings)
    init_distributed(args)
    registry.train()
    return 0
