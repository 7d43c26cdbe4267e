"""`prefopt convert SOURCE OUTPUT_DIR`: a model or a trained policy as a Hugging Face directory.

SOURCE is a built-in model name, a `.gguf` file, a Hugging Face model directory, or the output
directory of a `prefopt train` run (it holds `operative_config.gin` and `checkpoints/<step>/`).
A run's policy is rebuilt from its operative config: the model its `ModelSpec` names (for the
graph, the shapes and the tokenizer), then the first fields of the checkpointed `TrainState`
(step, trainable params, LoRA base, rest) are restored onto the CPU, and the run's own export
(`train.loop.export`) merges the adapters and writes the files. No data is read and no step is
compiled; the optimiser state is read but dropped.
"""

from __future__ import annotations

import argparse
import os
import shutil

from prefopt_jax.errors import ModelSourceError

EXAMPLES = """examples:
  prefopt convert smollm2-135m-instruct out/smollm2          # a built-in model
  prefopt convert model.Q8_0.gguf out/model --dtype bfloat16 # a GGUF file
  prefopt convert path/to/hf_model out/model_bf16 --dtype bfloat16
                                                             # a Hugging Face directory
  prefopt convert runs/dpo_smollm2_lora out/dpo              # a run: newest checkpoint, LoRA merged
  prefopt convert runs/dpo_smollm2_lora out/dpo_100 --step 100
"""


def register(subparsers) -> None:
    """Adds the `convert` sub-command."""
    p = subparsers.add_parser(
        "convert", help="write a model or a training run's policy as a Hugging Face directory",
        description="Write a model, or a training run's policy with LoRA merged, as a "
                    "Hugging Face directory (config.json, model.safetensors, tokenizer).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="built-in model name, .gguf file, Hugging Face model "
                                  "directory, or a training run's output directory")
    p.add_argument("output_dir", help="where config.json, model.safetensors and the tokenizer "
                                      "files go")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameter dtype written (default: float32 for models, the run's "
                        "parameter dtype for runs)")
    p.add_argument("--step", type=int, default=None,
                   help="runs only: the checkpoint step to export (default: the newest)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Converts SOURCE into OUTPUT_DIR; user errors are ModelSourceError."""
    if is_run(args.source):
        out = convert_run(args.source, args.output_dir, args.step, args.dtype)
    else:
        if args.step is not None:
            raise ModelSourceError(f"--step {args.step}: {args.source} is not a training "
                                   "run's directory (no operative_config.gin there)")
        out = convert_model(args.source, args.output_dir, args.dtype)
    print(f"wrote {out}", flush=True)
    return 0


def is_run(source: str) -> bool:
    """Whether SOURCE is a training run (True) or a model (False); ModelSourceError if neither."""
    from prefopt_jax.models.hf import BUILTIN_MODELS

    if source in BUILTIN_MODELS or not os.path.exists(source):
        return False  # a built-in name wins over a same-named path; from_pretrained judges ids
    if os.path.isdir(source):
        # An export carries its run's operative_config.gin too; its config.json makes it a model.
        if os.path.exists(os.path.join(source, "config.json")):
            return False
        if os.path.exists(os.path.join(source, "operative_config.gin")):
            return True
        raise ModelSourceError(f"{source}: neither a training run (no operative_config.gin) "
                               "nor a Hugging Face model directory (no config.json)")
    if source.endswith(".gguf"):
        return False
    raise ModelSourceError(f"{source}: a file but not a .gguf file; pass a .gguf file, a model "
                           "directory, a training run's directory or a built-in name")


def convert_model(source: str, output_dir: str, dtype: str | None) -> str:
    """A built-in model, .gguf file or HF directory re-written as a HF directory."""
    import jax.numpy as jnp

    from prefopt_jax.models import from_pretrained, save_pretrained

    try:
        model, tokenizer = from_pretrained(source, dtype=jnp.dtype(dtype or "float32"))
    except (FileNotFoundError, ModelSourceError) as err:
        run = "" if os.path.exists(source) else "; or a training run's output directory"
        raise ModelSourceError(f"{err}{run}") from err
    return str(save_pretrained(model, output_dir, tokenizer))


def convert_run(run_dir: str, output_dir: str, step: int | None, dtype: str | None) -> str:
    """A run's policy at a checkpoint (the newest by default), LoRA merged, as a HF directory."""
    import jax.numpy as jnp

    from prefopt_jax.models import from_pretrained, save_pretrained
    from prefopt_jax.train import loop

    specs = run_specs(run_dir)
    ckpt = open_checkpoints(os.path.join(run_dir, "checkpoints"))
    try:
        step = checkpoint_step(ckpt, step)  # before loading the model: errors come quickly
        policy = restored_policy(specs, ckpt, step)
    finally:
        ckpt.close()
    out = loop.export(policy, output_dir)
    operative = os.path.join(out, "operative_config.gin")
    if os.path.exists(operative):  # gin saw only the bindings read here: give the run's own
        shutil.copyfile(os.path.join(run_dir, "operative_config.gin"), operative)
    spec = specs.model_spec
    if dtype and jnp.dtype(dtype) != jnp.dtype(spec.param_dtype or spec.dtype):
        # Cast after the export so LoRA merges in the run's own precision.
        model, _ = from_pretrained(out, dtype=jnp.dtype(dtype), load_tokenizer=False)
        save_pretrained(model, out)  # replaces config and weights; the tokenizer files stay
    return out


def run_specs(run_dir: str):
    """The run's model spec, algo and loop configs (`model_spec`, `algo`, `loop`) from its
    operative config; ModelSourceError for runs that did not train a policy."""
    import dataclasses
    import types

    import gin

    from prefopt_jax import registry
    from prefopt_jax.online import iterative
    from prefopt_jax.train import loop

    config = os.path.join(run_dir, "operative_config.gin")
    registry.parse([config], [])
    bound = gin.get_bindings("train")
    if "model" not in bound or "algo" not in bound:
        raise ModelSourceError(f"{config}: binds no train.model / train.algo; not the config "
                               "of a `prefopt train` run")
    trainer = bound.get("trainer") or registry.default_trainer(bound["algo"])
    if trainer not in (loop.train, iterative.train):
        raise ModelSourceError(
            f"{run_dir}: trained by {trainer.__module__}.{trainer.__name__}, not a policy; "
            "convert exports policy runs only (a reward model's run exports itself to "
            f"{os.path.join(run_dir, 'export')} when LoopConfig.export is on)")
    model = bound["model"]
    if bound.get("tiny"):  # the swap registry.train makes for `train.tiny = True`
        model = dataclasses.replace(model, source="tiny",
                                    lora=model.lora and dataclasses.replace(model.lora, rank=2))
    run_loop = dataclasses.replace(bound.get("loop", loop.LoopConfig()),
                                   output_dir=os.path.abspath(run_dir))
    return types.SimpleNamespace(model_spec=model, algo=bound["algo"], loop=run_loop)


def open_checkpoints(ckpt_dir: str):
    """The run's `Checkpointer`; ModelSourceError when the run saved none."""
    from prefopt_jax.train.checkpoint import Checkpointer

    if not os.path.isdir(ckpt_dir):
        raise ModelSourceError(f"{ckpt_dir}: missing; the run saved no checkpoint (it saves "
                               "every LoopConfig.checkpoint_every steps and on SIGTERM)")
    return Checkpointer(ckpt_dir, async_save=False)


def checkpoint_step(ckpt, step: int | None) -> int:
    """`step` (the newest when None) if the checkpoint is there, else ModelSourceError."""
    steps = sorted(ckpt.manager.all_steps())
    if not steps:
        raise ModelSourceError(f"{ckpt.directory}: no complete checkpoint (the run saves every "
                               "LoopConfig.checkpoint_every steps and on SIGTERM)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ModelSourceError(f"--step {step}: no such checkpoint in {ckpt.directory}; steps "
                               f"there: {', '.join(map(str, steps))}")
    return step


def restored_policy(specs, ckpt, step: int):
    """What `train.loop.export` reads of a `PolicyTask` (setup, state, tokenizer, specs), its
    state restored from a checkpoint."""
    import types

    import jax.numpy as jnp

    from prefopt_jax.models.spec import load_model
    from prefopt_jax.train import build
    from prefopt_jax.train.state import StepSetup, TrainState

    spec = specs.model_spec
    try:
        model, tokenizer = load_model(spec)
    except (FileNotFoundError, ModelSourceError) as err:
        raise ModelSourceError(f"the run's ModelSpec.source {spec.source!r}: {err}") from err
    graphdef, params, base, rest = build.split_model(model, spec.lora, 0)
    # TrainState's first fields; the rest (reference, optimiser, rng, ...) are not exported.
    head = TrainState(step=jnp.zeros((), jnp.int32), params=params, base=base, rest=rest,
                      ref=None, opt_state=None, loss_state=None, rng=None)
    state = restore_head(ckpt, step, head)
    setup = StepSetup(graphdef, tx=None, objective=specs.algo.objective(), reference=None,
                      lora=spec.lora)
    return types.SimpleNamespace(setup=setup, state=state, tokenizer=tokenizer,
                                 model_spec=spec, algo=specs.algo, loop=specs.loop)


def restore_head(ckpt, step: int, head):
    """`head` (a TrainState whose later fields are None) filled from a checkpoint's leading
    leaves: the checkpoint stores the state's flat leaves in order (`train.checkpoint`), and
    only those are placed (on the CPU, whatever mesh saved them)."""
    import jax

    saved = saved_leaves(ckpt.directory, step)
    wanted, treedef = jax.tree.flatten(head)
    check_head(wanted, saved, ckpt.directory, step)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    leaves, _ = ckpt.restore(step, saved, [cpu] * len(saved))
    print(f"restored step {step} from {ckpt.directory}", flush=True)
    return jax.tree.unflatten(treedef, leaves[:len(wanted)])


def saved_leaves(ckpt_dir: str, step: int) -> list:
    """Shape and dtype of each leaf a checkpoint's state holds, in leaf order."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    path = epath.Path(ckpt_dir) / str(step) / "state"  # the item Checkpointer.save names
    tree = ocp.StandardCheckpointHandler().metadata(path).tree
    return [jax.ShapeDtypeStruct(tree[k].shape, tree[k].dtype) for k in sorted(tree)]


def check_head(wanted: list, saved: list, ckpt_dir: str, step: int) -> None:
    """ModelSourceError unless the checkpoint starts with leaves shaped as the run's model."""
    if len(saved) < len(wanted):
        raise ModelSourceError(f"{ckpt_dir}/{step}: {len(saved)} arrays, fewer than the "
                               f"{len(wanted)} of the model its operative config describes")
    for i, (want, got) in enumerate(zip(wanted, saved)):
        if want.shape != got.shape or want.dtype != got.dtype:
            raise ModelSourceError(
                f"{ckpt_dir}/{step}: array {i} is {got.dtype}{list(got.shape)}, the model of "
                f"the run's operative config has {want.dtype}{list(want.shape)} there")
