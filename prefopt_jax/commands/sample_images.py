"""`prefopt sample-images`: sample a diffusion model per class and write a PNG grid.

    prefopt sample-images --model runs/digits/export --out grid.png --per-class 8 \\
        [--classes 0,3,7] [--sampler ddim --steps 50 --eta 0] [--guidance 2] \\
        [--reward classifier] [--seed 0]

Rows of the grid are classes, each image labelled with its class (and its reward when
`--reward` is given, whose mean per class is printed and written beside the PNG as JSON).
`--model` is a saved diffusion model (a run's `export/`) or a preset with random weights.
"""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    """Adds the `sample-images` sub-command."""
    p = subparsers.add_parser("sample-images", help="sample a diffusion model per class into a "
                              "PNG grid", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a saved diffusion model directory (a run's export/) or a preset")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--per-class", type=int, default=8, help="images per class (grid row)")
    p.add_argument("--classes", default=None, help="comma-separated labels (default: all)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--reward", default=None, help="score each image: classifier, contrast, "
                   "classifier:PATH or module:function")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="pixels per image pixel in the PNG")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefopt_jax.diffusion import sampling
    from prefopt_jax.diffusion.spec import DiffusionModelSpec, load
    from prefopt_jax.errors import ConfigError

    model, schedule = load(DiffusionModelSpec(source=args.model))
    classes = (list(range(model.config.num_classes)) if args.classes is None
               else [int(c) for c in args.classes.split(",") if c.strip()])
    bad = [c for c in classes if not 0 <= c < model.config.num_classes]
    if bad or args.per_class < 1:
        raise ConfigError(f"--classes/--per-class: the model has classes 0..."
                          f"{model.config.num_classes - 1}; got {bad or args.per_class}")
    try:
        config = sampling.SamplerConfig(method=args.sampler, num_steps=args.steps, eta=args.eta,
                                        guidance=args.guidance, clip_x0=1.0)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    images, labels = sample_grid(model, schedule, config, classes, args.per_class, args.seed)
    texts, report = [str(c) for c in labels], None
    if args.reward:
        report, texts = score(args.reward, images, labels)
    from prefopt_jax.diffusion.digits import save_grid
    save_grid(images, args.out, nrow=args.per_class, labels=texts, scale=args.scale)
    print(f"wrote {len(images)} samples to {os.path.abspath(args.out)}", flush=True)
    if report is not None:
        path = os.path.splitext(args.out)[0] + ".json"
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"mean {args.reward} reward {report['mean']:.4f} "
              f"(per class in {path})", flush=True)
    return 0


def sample_grid(model, schedule, config, classes, per_class: int, seed: int):
    """`per_class` samples of each class, class by class (numpy images and labels)."""
    import jax
    import numpy as np

    from prefopt_jax.diffusion import sampling

    labels = np.repeat(np.asarray(classes, np.int32), per_class)
    out = sampling.sample(model, labels, jax.random.key(seed), schedule=schedule, config=config)
    return np.asarray(out.images_bhwc), labels


def score(spec: str, images, labels) -> tuple[dict, list[str]]:
    """The reward of each image: a JSON report and each image's caption."""
    import numpy as np

    from prefopt_jax.diffusion.rewards import resolve_reward

    rewards = np.asarray(resolve_reward(spec)(images, labels), np.float64)
    per_class = {str(c): float(rewards[labels == c].mean()) for c in np.unique(labels)}
    report = {"reward": spec, "mean": float(rewards.mean()), "per_class": per_class,
              "samples": int(len(rewards))}
    return report, [f"{c} {r:.2f}" for c, r in zip(labels, rewards)]
