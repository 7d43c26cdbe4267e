"""`prefopt eval`: evaluate a trained policy, or its implicit reward against an explicit one.

    prefopt eval CONFIG.gin [--gin.NAME=VALUE ...]
        the policy a training config exported (LoopConfig.output_dir/export) against the model it
        started from: reward / ranking / idealised accuracy on held-out pairs, sampled KL, win
        rate under a ground-truth reward, lengths; JSON to LoopConfig.output_dir/eval.json.
    prefopt eval implicit-vs-explicit --policy P --ref R --rm DIR --data heldout.jsonl \\
        [--shifted other.jsonl] [--beta 0.1] [--out result.json]
        implicit (b D) and explicit reward-model accuracy on the same pairs.

Example: prefopt eval configs/experiments/eval_dpo_tiny.gin --gin.LoopConfig.output_dir="'runs/x'"
"""

from __future__ import annotations

import argparse
import json

from prefopt_jax.commands.train import accept_gin_flags

IVE = "implicit-vs-explicit"


def register(subparsers) -> None:
    """Adds the `eval` sub-command."""
    p = subparsers.add_parser("eval", help="evaluate a policy (CONFIG.gin) or implicit vs "
                              "explicit reward models", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="+", help=f"gin files, or '{IVE}'")
    p.add_argument("--policy", help=f"{IVE}: the DPO policy (model folder, .gguf, name)")
    p.add_argument("--ref", help=f"{IVE}: its reference model")
    p.add_argument("--rm", help=f"{IVE}: reward-model folder (train_reward_model output)")
    p.add_argument("--data", help=f"{IVE}: held-out pairs (in-distribution)")
    p.add_argument("--shifted", default=None, help=f"{IVE}: pairs from a shifted distribution")
    p.add_argument("--beta", type=float, default=0.1, help=f"{IVE}: implicit-reward beta")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out", default=None, help="JSON output path")
    p.set_defaults(func=run)
    accept_gin_flags(p)


# The evaluation reads the training config's own specs.
SPEC_BINDINGS = ["evaluate.model = @ModelSpec()", "evaluate.data = @DataSpec()",
                 "evaluate.algo = @AlgoConfig()", "evaluate.loop = @LoopConfig()"]


def run(args: argparse.Namespace) -> int:
    if args.target[0] == IVE:
        return run_implicit_vs_explicit(args)
    from prefopt_jax import registry
    from prefopt_jax.evals import policy_eval

    output = [f"evaluate.output = '{args.out}'"] if args.out else []
    registry.parse(args.target, SPEC_BINDINGS + output + args.gin_bindings)
    print(json.dumps(policy_eval.evaluate(), indent=1, sort_keys=True))
    return 0


def run_implicit_vs_explicit(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("policy", "ref", "rm", "data") if not getattr(args, k)]
    if missing:
        raise SystemExit(f"{IVE} needs {' '.join(missing)}")
    from prefopt_jax.evals import policy_eval
    from prefopt_jax.models import from_pretrained
    from prefopt_jax.rewards import reward_model

    policy, tokenizer = from_pretrained(args.policy)
    ref, _ = from_pretrained(args.ref, load_tokenizer=False)
    rm, _ = reward_model.load(args.rm)
    result = policy_eval.implicit_vs_explicit(policy, ref, rm, tokenizer, args.data,
                                              args.shifted, args.beta, args.max_length)
    for name in ("in_distribution", "shifted"):
        if name in result:
            r = result[name]
            print(f"{name:<16} pairs {r['pairs']:>5}  implicit {r['implicit_accuracy']:.3f}  "
                  f"explicit {r['explicit_accuracy']:.3f}")
    if args.out:
        policy_eval.write_json(result, args.out)
    return 0
