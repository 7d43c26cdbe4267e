"""Diffusion-DPO, Diffusion-KTO, D3PO and DDPO on scikit-learn's handwritten digits.

    python experiments/diffusion_digits/run.py [--steps 200] [--methods dpo,kto,d3po,ddpo]

1. `classifier`: a small CNN trained on the 1,438 training digits (16x16), kept at
   `runs/diffusion_digits/classifier.npz`; its probability of the conditioned class is the
   reward ("class alignment"), its penultimate features the space of the FID-like distance.
2. `pretrain`: the class-conditional DiT, `prefopt train
   configs/experiments/diffusion_pretrain_digits.gin` (skipped when its export exists).
3. `pairs`: 64 samples per class from the pre-trained model (DDIM, 20 steps, eta 1, the
   trajectory objectives' sampler), scored by the classifier; in each class the i-th best is
   paired with the (i+32)-th best: 320 pairs in `runs/diffusion_digits/pairs/pairs.jsonl`, rows
   `{"prompt": 3, "chosen": "samples.npy#17", "rejected": "samples.npy#40"}`.
4. Fine-tunes from the pre-trained model, one `prefopt train
   configs/experiments/diffusion_digits_finetune.gin configs/algos/NAME.gin` each (`METHODS`):
   Diffusion-DPO and Diffusion-KTO on the pairs (KTO reads chosen as desirable, rejected as
   undesirable), at the registry's beta and at a 10x smaller one; D3PO and DDPO on their own
   trajectories rewarded by the classifier. Runs whose export exists are kept.
5. Evaluation of the pre-trained model and every fine-tune on the same start noise: 50 samples
   per class with two samplers (the training one, and deterministic DDIM-50), mean class
   alignment (with its standard error), classifier accuracy of the samples, the FID-like
   distance to the 359 held-out real digits (what was given up), and a PNG grid per model.
Writes `results.json` and `grid_NAME.png` beside this file and prints the table of its README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RUNS = "runs/diffusion_digits"
CLASSIFIER = f"{RUNS}/classifier.npz"
PRETRAIN = "configs/experiments/diffusion_pretrain_digits.gin"
FINETUNE = "configs/experiments/diffusion_digits_finetune.gin"
# run name -> (objective, extra gin bindings). The registry defaults first (the papers' betas,
# set for Stable Diffusion's latents), then a 10x smaller beta or learning rate for the offline
# objectives; D3PO and DDPO with per-pixel step log-probs (the default, as their released code)
# and, for comparison, with the summed Gaussian density (`_sum` runs).
METHODS = {
    "dpo": ("diffusion_dpo", []),
    "dpo_beta500": ("diffusion_dpo", ["AlgoConfig.hyper={'diffusion_dpo': {'beta': 500.0}}"]),
    "kto": ("diffusion_kto", []),
    "kto_beta100": ("diffusion_kto", ["AlgoConfig.hyper={'diffusion_kto': {'beta': 100.0}}"]),
    "kto_lr1e-5": ("diffusion_kto", ["OptimConfig.learning_rate=1e-5"]),
    "d3po": ("d3po", []),
    "ddpo": ("ddpo", []),
    "d3po_lr3e-5": ("d3po", ["OptimConfig.learning_rate=3e-5"]),
    "ddpo_lr3e-5": ("ddpo", ["OptimConfig.learning_rate=3e-5"]),
    "d3po_sum_lr1e-5": ("d3po", ["DiffusionConfig.logp_per_pixel=False",
                                 "OptimConfig.learning_rate=1e-5"]),
    "ddpo_sum": ("ddpo", ["DiffusionConfig.logp_per_pixel=False"]),
    "ddpo_sum_lr1e-5": ("ddpo", ["DiffusionConfig.logp_per_pixel=False",
                                 "OptimConfig.learning_rate=1e-5"]),
}
TRAJECTORY = ("d3po", "ddpo")
PER_CLASS_PAIRS, PER_CLASS_EVAL, GRID_PER_CLASS = 64, 50, 8
PAIR_SEED, EVAL_SEED = 1, 2


def prefopt(*args) -> float:
    """`prefopt ARGS` from the repository root; its wall time in seconds."""
    t = time.time()
    subprocess.run([sys.executable, "-m", "prefopt_jax.cli", *args], cwd=ROOT, check=True)
    return time.time() - t


def path(rel: str) -> str:
    return os.path.join(ROOT, rel)


def samplers() -> dict:
    from prefopt_jax.diffusion.sampling import SamplerConfig
    return {"ddim20_eta1": SamplerConfig(method="ddim", num_steps=20, eta=1.0, clip_x0=1.0),
            "ddim50_eta0": SamplerConfig(method="ddim", num_steps=50, eta=0.0, clip_x0=1.0)}


def load_model(model_dir: str):
    """(model, schedule) of a saved diffusion model directory."""
    from prefopt_jax.diffusion.spec import DiffusionModelSpec, load
    return load(DiffusionModelSpec(source=path(model_dir)))


def sample(model, schedule, per_class: int, seed: int, config):
    """`per_class` samples of each class (numpy images, labels), in chunks of 200."""
    import jax

    from prefopt_jax.diffusion import sampling

    labels = np.repeat(np.arange(model.config.num_classes, dtype=np.int32), per_class)
    key, images = jax.random.key(seed), []
    for start in range(0, len(labels), 200):
        out = sampling.sample(model, labels[start:start + 200], jax.random.fold_in(key, start),
                              schedule=schedule, config=config)
        images.append(np.asarray(out.images_bhwc))
    return np.concatenate(images), labels


def build_pairs(reward_fn, model_dir: str, out_dir: str, per_class: int = PER_CLASS_PAIRS,
                seed: int = PAIR_SEED) -> dict:
    """Pairs of a model's own samples ranked by `reward_fn(images, labels)`: in each class the
    i-th best sample is chosen over the (i + per_class/2)-th best. Writes `samples.npy` and
    `pairs.jsonl` to `out_dir`; returns the pairs' summary."""
    images, labels = sample(*load_model(model_dir), per_class, seed, samplers()["ddim20_eta1"])
    reward = np.asarray(reward_fn(images, labels), np.float64)
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "samples.npy"), images)
    rows, half, chosen, rejected = [], per_class // 2, [], []
    for c in np.unique(labels):
        ranked = np.flatnonzero(labels == c)[np.argsort(-reward[labels == c], kind="stable")]
        for i in range(half):
            w, l = int(ranked[i]), int(ranked[i + half])
            rows.append({"prompt": int(c), "chosen": f"samples.npy#{w}",
                         "rejected": f"samples.npy#{l}"})
            chosen.append(reward[w])
            rejected.append(reward[l])
    with open(os.path.join(out_dir, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"pairs": len(rows), "sample_alignment": float(reward.mean()),
            "chosen_alignment": float(np.mean(chosen)),
            "rejected_alignment": float(np.mean(rejected))}


def evaluate(name: str, model_dir: str, clf, real_heldout) -> dict:
    """Class alignment, sample accuracy and the FID-like distance per sampler; a PNG grid."""
    from prefopt_jax.diffusion import rewards
    from prefopt_jax.diffusion.digits import save_grid

    out, (model, schedule) = {}, load_model(model_dir)
    for sampler, config in samplers().items():
        images, labels = sample(model, schedule, PER_CLASS_EVAL, EVAL_SEED, config)
        align = np.asarray(rewards.class_alignment(clf)(images, labels), np.float64)
        out[sampler] = {
            "alignment": float(align.mean()),
            "alignment_se": float(align.std(ddof=1) / np.sqrt(len(align))),
            "accuracy": rewards.accuracy(clf, images, labels),
            "fid_like": rewards.fid_like(clf, images, real_heldout),
            "contrast": float(np.mean(rewards.stroke_contrast(images)))}
        if sampler == "ddim20_eta1":
            pick = np.concatenate([np.flatnonzero(labels == c)[:GRID_PER_CLASS]
                                   for c in np.unique(labels)])
            save_grid(images[pick], os.path.join(HERE, f"grid_{name}.png"),
                      nrow=GRID_PER_CLASS, labels=[f"{a:.2f}" for a in align[pick]], scale=4)
    return out


def curve(run: str, key: str) -> list[float]:
    with open(path(f"{run}/metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r[key] for r in recs if key in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per objective")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known {list(METHODS)}")
    wall, results_path = {}, os.path.join(HERE, "results.json")
    old = json.load(open(results_path)) if os.path.exists(results_path) else {}
    wall.update(old.get("wall_seconds", {}))

    from prefopt_jax.diffusion import rewards
    from prefopt_jax.diffusion.digits import load_digits

    t = time.time()
    clf = rewards.load_or_train_classifier(path(CLASSIFIER))
    train_x, train_y = load_digits(16, "train")
    held_x, held_y = load_digits(16, "heldout")
    wall.setdefault("classifier", time.time() - t)
    real = {"classifier_heldout_accuracy": rewards.accuracy(clf, held_x, held_y),
            "fid_like_train_vs_heldout": rewards.fid_like(clf, train_x, held_x),
            "heldout_alignment": float(np.mean(rewards.class_alignment(clf)(held_x, held_y)))}

    fresh = set()  # models (re)made now: evaluated again, the others keep results.json's figures
    if not os.path.isdir(path(f"{RUNS}/pretrain/export")):
        wall["pretrain"] = prefopt("train", PRETRAIN)
        fresh.add("pretrained")
    if not os.path.exists(path(f"{RUNS}/pairs/pairs.jsonl")) or "pairs" not in old:
        t = time.time()
        old["pairs"] = build_pairs(rewards.class_alignment(clf), f"{RUNS}/pretrain/export",
                                   path(f"{RUNS}/pairs"))
        wall["pairs"] = time.time() - t
    for method in methods:
        run = f"{RUNS}/{method}"
        if os.path.isdir(path(f"{run}/export")):
            continue
        objective, bindings = METHODS[method]
        fresh.add(method)
        wall[method] = prefopt("train", FINETUNE, f"configs/algos/{objective}.gin",
                               f"--gin.LoopConfig.output_dir='{run}'",
                               f"--gin.LoopConfig.steps={args.steps}",
                               *[f"--gin.{b}" for b in bindings])
    t = time.time()
    models = {"pretrained": f"{RUNS}/pretrain/export"}
    models.update({m: f"{RUNS}/{m}/export" for m in METHODS
                   if os.path.isdir(path(f"{RUNS}/{m}/export"))})
    known = old.get("evaluation", {})
    evals = {name: known[name] if name in known and name not in fresh
             else evaluate(name, d, clf, held_x) for name, d in models.items()}
    wall["evaluation_last"] = time.time() - t
    training = {}
    for m in models:
        if m == "pretrained":
            continue
        key = "rewards/mean" if METHODS[m][0] in TRAJECTORY else "rewards/accuracy"
        c = curve(f"{RUNS}/{m}", key)
        training[m] = {"metric": key, "first_10": float(np.mean(c[:10])),
                       "last_10": float(np.mean(c[-10:])), "steps": len(c)}
    results = {"real_digits": real, "pairs": old["pairs"], "evaluation": evals,
               "training": training, "wall_seconds": wall, "steps": args.steps,
               "runs": {m: {"objective": METHODS[m][0], "gin": METHODS[m][1]} for m in METHODS}}
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"real held-out digits: classifier accuracy {real['classifier_heldout_accuracy']:.3f}, "
          f"alignment {real['heldout_alignment']:.3f}, FID-like train vs held-out "
          f"{real['fid_like_train_vs_heldout']:.2f}")
    print(f"pairs: {old['pairs']}")
    for sampler in samplers():
        print(f"\n{sampler}: {'model':16s} {'alignment':>16s} {'accuracy':>9s} "
              f"{'FID-like':>9s} {'contrast':>9s}")
        for name, ev in evals.items():
            e = ev[sampler]
            print(f"{'':{len(sampler) + 2}s}{name:16s} {e['alignment']:9.3f} ± "
                  f"{e['alignment_se']:.3f} {e['accuracy']:9.3f} {e['fid_like']:9.2f} "
                  f"{e['contrast']:9.3f}")
    print("training", training)
    print("wall seconds", {k: round(v) for k, v in wall.items()})


if __name__ == "__main__":
    main()
