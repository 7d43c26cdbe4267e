"""Writes docs/objectives.md from the registry (`prefopt_jax.losses`); rerun on change.

Every registered objective with its formula and notes (its docstring), hyper-parameters and
defaults, declared inputs, reference need, batch coupling, needs and paper; the modifiers; the
needs. A test fails when docs/objectives.md differs from what this writes.

    python docs/generate_objectives.py
"""

import inspect
import os

from prefopt_jax import losses
from prefopt_jax.losses.registry import COUPLINGS, REQUIRED

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "objectives.md")

HEAD = """# Objectives

Every objective prefopt-jax registers, generated from the registry by
`python docs/generate_objectives.py` (a test fails when this page is out of date). Pick one in
gin with `AlgoConfig.loss = 'NAME'` and `AlgoConfig.hyper = {...}` (`configs/algos/NAME.gin`
does both), or in Python with `prefopt_jax.losses.get('NAME')`. Each objective declares what it
reads, and `prefopt train` checks the declaration against the config and the data before any
compute: an unknown name or hyper-parameter, a modifier where it does not apply, or a need the
run cannot supply stops the run with a message naming it.

    prefopt train configs/experiments/tiny.gin configs/algos/NAME.gin   # any of them, in seconds
    prefopt train configs/experiments/diffusion_tiny.gin configs/algos/NAME.gin   # diffusion

Notation: prompt `x`, completion `y`, chosen `y_w` and rejected `y_l`; per-token log-probs
`l_t = log pi(y_t|s_t)` of completion tokens only; `L(y) = sum_t l_t`, `Lbar(y) = L(y)/|y|`;
`D(y) = L(y) - L_ref(y)`, `h = D_w - D_l`; `s` is the logistic function, `b` the KL
temperature (beta). Losses are means over real examples; metrics are (sum, count) pairs.
Diffusion objectives: image `x_0`, noised `x_t` at level `t`, denoising error
`e = mean_pixels (eps - eps_th(x_t, t, c))^2` and `e_ref` under the reference at the same `t`
and noise; trajectory objectives read each sampler step's log-prob `log p(x_{t-1} | x_t, c)`.
"""

TRAINED_BY = {"rollout": "the online RL loop (`prefopt train` picks `@train_online`): the "
                         "policy's own samples, rewarded by `RLConfig.rewards`",
              "reward": "the reward-model task: `prefopt train` trains a `RewardModel` "
                        "(trunk + `RewardHead`) and saves it to `output_dir/reward_model`"}


def defaults(fn) -> str:
    items = losses.hyper_defaults(fn).items()
    return ", ".join(f"`{k}` (required)" if v is REQUIRED else f"`{k}={v!r}`" for k, v in items)


def objective_section(name: str) -> list[str]:
    fn, info = losses.get(name), losses.info(name)
    doc = inspect.cleandoc(fn.__doc__ or "")
    waived = dict(info.waived_by)
    needs = ", ".join(f"`{n}`" + (f" (unless `{waived[n]}` is set)" if n in waived else "")
                      for n in info.needs) or "nothing beyond policy (and reference) log-probs"
    trained = TRAINED_BY.get(info.inputs, "`prefopt train` (the policy loop)")
    if info.inputs in losses.DIFFUSION_INPUTS:
        trained = ("the diffusion task (`prefopt train` picks `@train_diffusion`; "
                   "`configs/experiments/diffusion_tiny.gin`)")
    return [f"### `{name}`", "", doc, "",
            f"- inputs: `{info.inputs}`, {losses.INPUTS[info.inputs]}",
            f"- reference: {reference_text(info)}",
            f"- batch coupling: {info.coupling}",
            f"- needs: {needs}",
            f"- hyper-parameters: {defaults(fn) or 'none'}",
            f"- paper: {info.paper}",
            f"- config: `configs/algos/{name}.gin`; trained by {trained}", ""]


def reference_text(info) -> str:
    if not info.reference:
        return "not used"
    if info.reference_off:
        return (f"required, unless `{info.reference_off}` is 0: then it is not read, and "
                "ReferenceConfig.kind 'auto' builds none")
    return "required"


def reference_cell(info) -> str:
    if not info.reference:
        return "no"
    return f"yes (no at `{info.reference_off}` 0)" if info.reference_off else "yes"


def table() -> list[str]:
    rows = ["| name | inputs | reference | needs |", "|---|---|---|---|"]
    for name in losses.names():
        info = losses.info(name)
        rows.append(f"| [`{name}`](#{name}) | {info.inputs} | "
                    f"{reference_cell(info)} | {', '.join(info.needs) or '-'} |")
    return rows + [""]


def modifiers_section() -> list[str]:
    out = ["## Modifiers", "",
           "Wrappers of an objective, applied in order from `AlgoConfig.modifiers = [(name, "
           "{params}), ...]` (`configs/modifiers/`). `AlgoConfig.mix = [(name, weight), (name, "
           "weight, {hyper}), ...]` makes a weighted sum of objectives of one inputs type "
           "(`configs/modifiers/mix_mpo.gin`).", ""]
    for name, mod in sorted(losses.MODIFIERS.items()):
        params = list(inspect.signature(mod.apply).parameters.values())[1:]
        listed = ", ".join(f"`{p.name}`" + ("" if p.default is p.empty else f"={p.default!r}")
                           for p in params) or "none"
        extra = f"; adds the needs {', '.join(mod.needs)}" if mod.needs else ""
        drops = "; the result reads no reference" if mod.drops_reference else ""
        out += [f"### `{name}`", "", inspect.cleandoc(mod.apply.__doc__ or ""), "",
                f"- applies to: `{'`, `'.join(mod.inputs)}` objectives{extra}{drops}",
                f"- parameters: {listed}", ""]
    return out


def needs_section() -> list[str]:
    out = ["## Needs", "", "What the engine supplies beyond the policy's and the reference's "
           "log-probs, when an objective declares it:", "", "| need | what | from |", "|---|---|---|"]
    source = {"gold": "triple data", "mismatched": "built in the step from the batch",
              "token_rewards": "`AlgoConfig.teacher` (computed in the step, no gradient)",
              "teacher_logits": "`AlgoConfig.teacher` and the reference (in the log-prob chunks)",
              "margins": "`AlgoConfig.margins` (computed once, cached)",
              "win_probs": "data columns, or the iterative loop (`IterativeConfig.win_probs`)",
              "token_stats": "the policy's logits, in the log-prob chunks",
              "rollouts": "the online RL loop"}
    for need, what in losses.NEEDS.items():
        out.append(f"| `{need}` | {what} | {source.get(need, '')} |")
    out += ["", f"Batch coupling is one of {', '.join(COUPLINGS)}: `sort` objectives refuse "
            "gradient accumulation (each micro-batch would be sorted alone), `batch` ones warn "
            "(the statistic is per micro-batch).", "",
            "Reward aggregation (ensemble mean, WCO, UWO) and PAR shaping combine rewards and "
            "train nothing: they are `prefopt_jax.rewards.aggregate`, not objectives.", ""]
    return out


def render() -> str:
    lines = [HEAD, "## Index", "", *table(), "## The objectives", ""]
    for name in losses.names():
        lines += objective_section(name)
    lines += modifiers_section() + needs_section()
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    with open(PATH, "w") as f:
        f.write(render())
