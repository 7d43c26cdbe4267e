"""Assemble a step from frozen configs: objective, StepSetup, the sharded state, the jitted step.

Everything here runs outside jit: it reads configs, checks the objective's declaration against
them, splits the model and places arrays; the returned step function is compiled once for the
batch shape it first sees.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from prefopt_jax import losses
from prefopt_jax.losses import ObjectiveError
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models.spec import ModelSpec, load_model
from prefopt_jax.train import critic as critic_lib, optim, reference, step as step_lib
from prefopt_jax.train.state import StepSetup, tree_shardings


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """A frozen DPO policy and its reference, for objectives that read a teacher.

    Token rewards (`tgdpo`: `b (log pi_dpo - log pi_ref)` per token), vocabulary logits
    (`aligndistil`) and implicit margins (`AlgoConfig.margins = ('implicit:teacher',)`) come
    from it. Attributes:
      source: the DPO policy: an exported HF directory (a run's `export/`), a .gguf, a built-in
        name, or a random source (`tiny`, `random:NAME`) for smoke runs.
      seed: initialises a random source.
      reference: its reference model (a source as above); None: the run's reference, which is
        the policy's starting point (reference kinds frozen, lora, precomputed).
      beta: the teacher's DPO beta `b`.
    """

    source: str | None = None
    seed: int = 1
    reference: str | None = None
    beta: float = 0.1


def _pairs(entries) -> tuple:
    """Gin hands over lists and dicts; keep hashable tuples (dicts as sorted item pairs)."""
    def one(x):
        if isinstance(x, dict):
            return tuple(sorted(x.items()))
        return tuple(one(v) for v in x) if isinstance(x, (list, tuple)) else x
    return tuple(one(e) for e in entries)


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """The objective as configs name it (see `losses.compose`, docs/objectives.md).

    Attributes:
      loss: a registry name (default dpo), or unset when `mix` is given.
      hyper: its hyper-parameters, checked against its signature; or keyed by objective,
        `{'dpo': {'beta': 0.1}, 'simpo': {...}}` (what configs/algos/*.gin write): the entry of
        the objective named is used, and an objective without an entry gets its defaults, so
        switching `loss` never carries another objective's values over.
      reference: the reference model (`ReferenceConfig`; kind 'auto' resolves per run).
      mix: a weighted sum, `[(name, weight), (name, weight, {hyper}), ...]` (MPO:
        `[('dpo', 0.8), ('bco_pair', 0.2), ('sft', 1.0)]`).
      modifiers: `[(name, {params}), ...]` applied in order: f_divergence, wpo, ld_dpo,
        reference_free (`losses.MODIFIERS`).
      teacher: a frozen DPO policy and its reference (`TeacherConfig`), for the needs
        token_rewards and teacher_logits and implicit margins.
      margins: other reward models whose rewards of each completion the objective reads (the
        margins need, MODPO): `'rm:DIR'` (a reward model `prefopt train` saved) or
        `'implicit:teacher'` (the teacher's implicit reward `b D`); computed once and cached.
      critic: the value model of objectives that need a critic (`train.critic.CriticConfig`;
        None: its defaults, a value head on the policy's trunk).
    """

    loss: str | None = None
    hyper: tuple = ()
    reference: reference.ReferenceConfig = reference.ReferenceConfig()
    mix: tuple = ()
    modifiers: tuple = ()
    teacher: TeacherConfig | None = None
    margins: tuple = ()
    critic: critic_lib.CriticConfig | None = None

    def __post_init__(self):
        hyper = dict(self.hyper)
        if keyed_by_objective(hyper):
            hyper = {k: tuple(sorted(dict(v).items())) for k, v in hyper.items()}
        object.__setattr__(self, "hyper", tuple(sorted(hyper.items())))
        object.__setattr__(self, "mix", _pairs(self.mix))
        object.__setattr__(self, "modifiers", _pairs(self.modifiers))
        object.__setattr__(self, "margins", tuple(self.margins))

    @property
    def name(self) -> str:
        """The objective's registry name ('mix' for a mix)."""
        return self.loss or ("mix" if self.mix else "dpo")

    def objective(self) -> losses.Objective:
        """The composed objective (registered name, hyper-parameters, mix and modifiers)."""
        return losses.compose(self.loss, self.own_hyper(),
                              [(n, w, dict(h[0]) if h else {}) for n, w, *h in self.mix],
                              [(n, dict(*p)) for n, *p in self.modifiers])


    def own_hyper(self) -> tuple:
        """The hyper-parameters of the objective named (from a keyed `hyper`, its entry)."""
        hyper = dict(self.hyper)
        if not (hyper and keyed_by_objective(hyper)):
            return self.hyper
        unknown = sorted(set(hyper) - set(losses.names()))
        if unknown:
            raise ObjectiveError(f"AlgoConfig.hyper has entries for unknown objectives "
                                 f"{unknown}; known: {', '.join(losses.names())}")
        if self.name not in hyper:
            note(f"AlgoConfig.hyper has entries for {', '.join(sorted(hyper))}, not "
                 f"{self.name!r}: {self.name} uses its defaults")
        return tuple(hyper.get(self.name, ()))

    def resolved(self, lora) -> AlgoConfig:
        """This config with reference kind 'auto' made concrete for a run (LoRA or not)."""
        if self.reference.kind != "auto":
            return self
        kind = ("none" if not self.objective().info.reference
                else "lora" if lora is not None else "frozen")
        return dataclasses.replace(self, reference=dataclasses.replace(self.reference, kind=kind))


def keyed_by_objective(hyper: dict) -> bool:
    """Whether a hyper dict is keyed by objective name (every value a dict of parameters)."""
    return bool(hyper) and all(isinstance(v, (dict, tuple)) and not isinstance(k, tuple)
                               and _is_param_table(v) for k, v in hyper.items())


def _is_param_table(value) -> bool:
    if isinstance(value, dict):
        return True
    return all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value)


@functools.cache
def note(text: str) -> None:
    """Print a configuration note once per process."""
    print(f"note: {text}", flush=True)


def check_needs(objective: losses.Objective, algo: AlgoConfig, lora, online: bool = False
                ) -> None:
    """Refuse, before any compute, configs that cannot supply what the objective declares."""
    algo = algo.resolved(lora)
    decl, ref = objective.info, reference.Reference(algo.reference)
    if decl.inputs == "reward":
        raise ObjectiveError(f"objective {objective.name!r} trains a reward model (reward "
                             "inputs), not a policy: `prefopt train` runs it as a reward-model "
                             "task (train.reward_model)")
    if decl.inputs == "rollout" and not online:
        raise ObjectiveError(
            f"objective {objective.name!r} trains on rollouts sampled from the policy: it runs "
            "in the online RL loop (train.trainer = @train_online, which `prefopt train` picks "
            "for it by default), not on a preference data set")
    if algo.reference.kind == "lora" and lora is None:
        raise ObjectiveError("reference kind 'lora' needs LoRA training (ModelSpec.lora)")
    if decl.reference and algo.reference.kind == "none":
        raise ObjectiveError(f"objective {objective.name!r} needs a reference; "
                             "ReferenceConfig.kind is 'none' (use frozen, lora, precomputed or "
                             "previous)")
    teacher = algo.teacher.source if algo.teacher else None
    for need in ("token_rewards", "teacher_logits"):
        if need in decl.needs and not teacher:
            raise ObjectiveError(
                f"objective {objective.name!r} needs {need}: {losses.NEEDS[need]}; set "
                "AlgoConfig.teacher = @TeacherConfig() and TeacherConfig.source (a DPO policy)")
    if "teacher_logits" in decl.needs and not (ref.has_params or algo.teacher.reference):
        raise ObjectiveError(
            f"objective {objective.name!r} needs the teacher's reference logits over the "
            f"vocabulary; reference kind {ref.kind!r} keeps no model: use frozen or lora, or "
            "set TeacherConfig.reference")
    if "margins" in decl.needs and not algo.margins:
        raise ObjectiveError(f"objective {objective.name!r} needs margins: "
                             f"{losses.NEEDS['margins']}; set AlgoConfig.margins, e.g. "
                             "['rm:runs/rm/reward_model'] or ['implicit:teacher']")
    if "margins" in decl.needs and "implicit:teacher" in algo.margins and not teacher:
        raise ObjectiveError("AlgoConfig.margins 'implicit:teacher' needs AlgoConfig.teacher = "
                             "@TeacherConfig() with TeacherConfig.source (a DPO policy)")
    if "mismatched" in decl.needs and not ref.scores_new_sequences:
        raise ObjectiveError(
            f"objective {objective.name!r} scores mismatched completions (prompt i, completion "
            f"i+1) under the reference; the {ref.kind!r} reference cache holds only the data's "
            "own pairs. Use reference kind frozen or lora, or set the hyper-parameter that "
            "replaces them (kto: z0) in AlgoConfig.hyper")


def make_setup(graphdef, algo: AlgoConfig, optim_config: optim.OptimConfig,
               lora: lora_lib.LoraConfig | None = None, logps_chunk: int = 512,
               teacher_graphdef=None, online: bool = False, critic=None) -> StepSetup:
    """The static half of a step; a bad objective, hyper-parameter, modifier or unmet need
    fails here, before any compute, with an `ObjectiveError` naming it. `online`: the step
    trains on rollouts (the online loop); `critic`: the critic's setup (`load_critic`)."""
    algo = algo.resolved(lora)
    objective = algo.objective()
    check_needs(objective, algo, lora, online)
    return StepSetup(graphdef=graphdef, tx=optim.build_optimizer(optim_config),
                     objective=objective, reference=reference.Reference(algo.reference),
                     lora=lora, logps_chunk=logps_chunk, fp32_state=optim_config.fp32_state,
                     teacher_beta=algo.teacher.beta if algo.teacher else 0.1,
                     teacher_graphdef=teacher_graphdef, critic=critic)


def check_accumulation(objective: losses.Objective, micro_batches: int) -> None:
    """Refuse (sorts) or warn (batch statistics) when a batch-coupled objective is accumulated.

    Under gradient accumulation each micro-batch is one call of the loss, so a statistic over
    "the batch" (KTO's z0 from mismatched rows, BCO's reward mean) is the micro-batch's; BCO's
    running mean still sees every example, in micro-batch order. A sort over the batch would
    sort each micro-batch alone: a different objective, not an approximation.
    """
    coupling = objective.info.coupling
    # Rollout objectives couple the samples of a group, which the online loop keeps together in
    # one example (grpo's `reinforce_pp` estimator, whose statistics span the batch, excepted).
    grouped = objective.info.inputs == "rollout" and \
        dict(objective.hyper).get("estimator") != "reinforce_pp"
    if micro_batches <= 1 or coupling == "none" or grouped:
        return
    if coupling == "sort":
        raise ObjectiveError(f"objective {objective.name!r} sorts over the global batch; with "
                             f"micro_batches={micro_batches} each micro-batch would be sorted "
                             "alone. Use micro_batches=1 (raise batch_size per device instead)")
    hint = ""
    if "mismatched" in objective.info.needs:
        hint = (" (mismatched completions pair examples of one micro-batch; set the "
                "hyper-parameter that replaces them, kto: z0, to decouple)")
    warnings.warn(f"objective {objective.name!r} couples examples through a batch statistic; "
                  f"with micro_batches={micro_batches} the statistic is per micro-batch{hint}",
                  stacklevel=2)


def initial_loss_state(setup: StepSetup, batch_m) -> Any:
    """The loss state a stateful objective starts from (structure from one abstract call)."""
    def probe(batch):
        scores = step_lib.zero_scores(setup, batch)
        return setup.objective(step_lib.objective_inputs(setup, scores, batch), None).state

    try:
        shapes = jax.eval_shape(probe, jax.tree.map(lambda x: x[0], batch_m))
    except ValueError as err:  # a hyper-parameter that does not fit the inputs (modpo weights)
        raise ObjectiveError(f"objective {setup.objective.name!r}: {err}") from err
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def split_model(model: nnx.Module, setup_lora: lora_lib.LoraConfig | None, seed: int):
    """(graphdef, trainable, base, rest): adapters train under LoRA, else the model's Params."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if setup_lora is None:
        return graphdef, params, None, rest
    adapters = lora_lib.init_adapters(params, setup_lora, jax.random.key(seed + 1))
    return graphdef, adapters, params, rest


def load_teachers(algo: AlgoConfig, model_spec: ModelSpec, vocab_size: int):
    """(frozen Params `{"teacher": ..., "teacher_ref": ... or None}`, the teacher's graphdef), or
    (None, None) when the objective reads no teacher. Teachers load in the policy's dtype."""
    needs = algo.objective().info.needs
    implicit_margins = "margins" in needs and "implicit:teacher" in algo.margins
    if not ({"token_rewards", "teacher_logits"} & set(needs) or implicit_margins):
        return None, None
    frozen, graphdef = {"teacher_ref": None}, None
    for key, source in (("teacher", algo.teacher.source), ("teacher_ref", algo.teacher.reference)):
        if source is None:
            continue
        spec = dataclasses.replace(model_spec, source=source, seed=algo.teacher.seed, lora=None)
        model, _ = load_model(spec)
        if model.config.vocab_size != vocab_size:
            raise ObjectiveError(f"TeacherConfig: {key} {source!r} has a vocabulary of "
                                 f"{model.config.vocab_size}, the policy {vocab_size}")
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        frozen[key] = {"params": params, "rest": rest}
    return frozen, graphdef


def load_critic(algo: AlgoConfig, model_spec: ModelSpec, policy_config,
                optim_config: optim.OptimConfig):
    """(critic setup, its initial arrays) when the objective needs a critic, else (None, None)."""
    if "critic" not in algo.objective().info.needs:
        return None, None
    return critic_lib.load_critic(algo.critic or critic_lib.CriticConfig(), model_spec,
                                  policy_config, optim_config)


def place_state(setup: StepSetup, params, base, rest, batch_m, mesh: Mesh, seed: int,
                donate: bool = False, frozen=None, critic=None):
    """The initial TrainState, built under jit with out_shardings from the logical axes.

    `donate=True` hands the model's arrays over to the state: where the mesh keeps them where
    they are (one device), the state's params (or LoRA base) reuse their buffers instead of
    copying them, so the weights are never held twice, and the arrays passed in (and the model
    they came from) are deleted. Where the mesh reshards them, the resharded copies are donated
    and the loaded arrays are freed when the caller drops the model. Use it when the model is
    not needed again, as `prefopt train` does. `frozen`: teachers' Params (`load_teachers`);
    `critic`: the critic's initial arrays (`load_critic`).
    """
    loss_state = initial_loss_state(setup, batch_m)

    def init(p, b, r, f, c):
        return step_lib.init_state(setup, p, b, r, loss_state, seed, f, c)

    abstract = jax.eval_shape(init, params, base, rest, frozen, critic)
    shardings = tree_shardings(abstract, mesh)
    arg_sh = tree_shardings((params, base, rest, frozen, critic), mesh)
    with jax.set_mesh(mesh):
        args = jax.device_put((params, base, rest, frozen, critic), arg_sh)
        donated = (0, 1, 2, 3, 4) if donate else ()
        state = jax.jit(init, out_shardings=shardings, donate_argnums=donated)(*args)
    return state, abstract


def build(model: nnx.Module, algo: AlgoConfig, optim_config: optim.OptimConfig, batch_m,
          mesh: Mesh, lora: lora_lib.LoraConfig | None = None, logps_chunk: int = 512,
          seed: int = 0, donate: bool = False, frozen=None, teacher_graphdef=None):
    """(setup, state, step_fn, batch_shardings) ready to train on batches shaped like `batch_m`.

    `donate=True`: the state takes over the model's arrays (`place_state`); `model` is unusable
    afterwards. `frozen`, `teacher_graphdef`: teachers (`load_teachers`) when the objective
    reads one.
    """
    graphdef, params, base, rest = split_model(model, lora, seed)
    setup = make_setup(graphdef, algo, optim_config, lora, logps_chunk, teacher_graphdef)
    state, abstract = place_state(setup, params, base, rest, batch_m, mesh, seed, donate, frozen)
    step_fn, _, batch_sh = step_lib.compile_train_step(setup, abstract, batch_m, mesh)
    return setup, state, step_fn, batch_sh


def stack_micro(batches: list[dict]) -> dict:
    """Stack micro-batches on a leading axis (the step's `m`)."""
    return {k: jnp.stack([jnp.asarray(b[k]) for b in batches]) for k in batches[0]}
