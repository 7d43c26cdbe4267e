"""Online RL on the policy's own samples: PPO and RTO (with a critic), GRPO, Dr. GRPO, DAPO,
NGRPO, Pref-GRPO and RLOO.

Shape letters: `b` prompts, `k` samples of one prompt (its group, G), `n` samples (`b k`),
`c` new-token positions, `p` groups in a batch.

A task of the shared driver (`train.driver`), like the iterative loop. Iteration t:

1. the next `RLConfig.prompts_per_iteration` prompts of the prompt data (a seeded order, pass
   after pass; each process takes its own slice);
2. G samples of each from the current policy (`sampling.generate.generate_groups`: the prompt
   is prefilled once and its KV cache copied to its G samples), keeping the sampler's
   per-token log-probs (temperature 1, the model's) as the behaviour policy's;
3. rewards: reward functions in TRL's convention and token scorers (`rewards.functions`),
   weighted; DAPO's soft overlong penalty; overlong samples filtered out when asked;
4. DAPO's dynamic sampling when asked: groups whose rewards all agree are dropped and further
   prompts sampled, up to `max_sampling_rounds` rounds (a shortfall is filled with dropped
   groups, which train nothing, and logged);
5. with a critic (ppo, rto; `train.critic`), its values of every sample before the first
   update, kept with the rollouts (GAE and value clipping read them in every update);
6. `epochs` passes over the groups, `minibatches` optimiser steps each, with the registered
   objective: each group is one example of G completions, so advantages are computed inside the
   loss from its own rewards, the importance ratio is against the behaviour log-probs, and the
   `prefix` layout scores the prompt once per group in the update as in generation
   (`prefix_packed`: once per run of samples, runs packed into short rows). With
   `RLConfig.target_kl`, a step whose approximate KL to the sampler exceeds it ends the
   iteration's updates.

`LoopConfig.steps` counts optimiser steps (`epochs * minibatches` per iteration, fewer after an
early stop). Each iteration's rollouts are kept in `output_dir/rollouts/` (the last two), so a
run killed mid-iteration resumes on the same rollouts; a run killed between iterations draws the
next ones from the restored policy with the same keys (one key per prompt draw and sample), so the
resumed run equals the uninterrupted one. Each process generates for its own prompts; a
sample's key depends on its prompt's draw number only, so two processes draw what one does.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import time

import gin
import jax
import numpy as np
from flax import nnx

from prefopt_jax import data as data_lib, losses
from prefopt_jax.data.layout import round_up
from prefopt_jax.data.tokenized import TokenizedData, from_lists
from prefopt_jax.errors import ConfigError, DataSourceError
from prefopt_jax.losses import ObjectiveError
from prefopt_jax.rewards import functions as reward_fns
from prefopt_jax.sampling import onpolicy
from prefopt_jax.sampling.generate import SamplingConfig, generate_groups
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.online.iterative import current_policy
from prefopt_jax.train import build, critic as critic_lib, driver, loop as loop_lib, tiny
from prefopt_jax.train import step as step_lib
from prefopt_jax.train.state import policy_params


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The online loop's settings (objective and KL: `AlgoConfig`; steps: `LoopConfig`).

    Attributes:
      prompts_per_iteration: prompts (groups) sampled per iteration, over all processes.
      group_size: samples per prompt (G); the objective's `group_size`.
      epochs: passes over each iteration's rollouts (mu).
      minibatches: optimiser steps per pass (each on `prompts_per_iteration / minibatches`
        groups).
      max_new_tokens, temperature, top_p, top_k, stop_ids: sampling (stop_ids empty: the
        tokenizer's end of sequence); min_new_tokens: no stop id is drawn before this many
        tokens (TRL's `generation_kwargs={"min_new_tokens": n}`).
      rewards: reward specs (`rewards.functions.resolve`; `scorer:SPEC` for a token scorer such
        as `scorer:rm:DIR`); reward_weights: their weights (None: all 1).
      dynamic_sampling: DAPO's: drop groups whose rewards all agree and sample more prompts, at
        most `max_sampling_rounds` rounds per iteration.
      overlong_filter: samples that reach `max_new_tokens` without a stop token train nothing.
      overlong_buffer: DAPO's soft overlong penalty over the last this many tokens before
        `max_new_tokens` (0: off), scaled by `overlong_penalty`.
      preference: the preference scorer of objectives that need group preferences (Pref-GRPO):
        `bradley_terry` (`sigma(scale (r_i - r_j))` on the rewards) or
        `'package.module:function'` called as `fn(prompts, completions_a, completions_b,
        **fields) -> P(a beats b)`; preference_scale: Bradley-Terry's scale.
      prompt_field: the prompt column of the prompt data.
      advantage_per_reward: each reward function's advantages are estimated on its own and
        then weighted and summed (multi-objective GRPO), instead of the advantages of the
        weighted sum; a KL or overlong shaping of the reward counts as one more function.
      target_kl: early stop: when a step's `approx_kl` (the token mean of
        `(log pi - log pi_old)^2 / 2`) exceeds it, the iteration's remaining update steps are
        skipped and the next step samples new rollouts (None: off).
    """

    prompts_per_iteration: int = 8
    group_size: int = 8
    epochs: int = 1
    minibatches: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple = ()
    min_new_tokens: int = 0
    rewards: tuple = ("math_answer",)
    reward_weights: tuple | None = None
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_filter: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    preference: str = "bradley_terry"
    preference_scale: float = 1.0
    prompt_field: str = "prompt"
    target_kl: float | None = None
    advantage_per_reward: bool = False

    def __post_init__(self):
        for name in ("stop_ids", "rewards"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(self.reward_weights))
        for name in ("prompts_per_iteration", "group_size", "epochs", "minibatches",
                     "max_sampling_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RLConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_iteration % self.minibatches:
            raise ConfigError(f"RLConfig.minibatches ({self.minibatches}) must divide "
                              f"prompts_per_iteration ({self.prompts_per_iteration})")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"RLConfig.target_kl must be > 0 (None: off), got "
                              f"{self.target_kl}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"RLConfig.min_new_tokens must be in [0, {self.max_new_tokens}] "
                              f"(max_new_tokens), got {self.min_new_tokens}")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ConfigError(f"RLConfig.overlong_buffer must be in [0, max_new_tokens), got "
                              f"{self.overlong_buffer}")

    @property
    def steps_per_iteration(self) -> int:
        return self.epochs * self.minibatches

    def sampling(self, stop_ids: tuple) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, stop_ids=stop_ids,
                              min_new_tokens=self.min_new_tokens)


# Prompts: the prompt column (text or messages) and every other column, for reward functions.

@dataclasses.dataclass
class Prompts:
    """The prompt data: token ids, the prompt as text (messages rendered by the chat template),
    other columns, and each conversational prompt's messages (None for a text prompt)."""

    ids: list
    texts: list
    fields: dict
    messages: list | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> tuple[list, list, dict, list]:
        messages = self.messages or [None] * len(self.ids)
        return ([self.ids[i] for i in index], [self.texts[i] for i in index],
                {k: [v[i] for i in index] for k, v in self.fields.items()},
                [messages[i] for i in index])


def reward_inputs(texts: list, messages: list, completions: list) -> tuple[list, list]:
    """Prompts and completions as reward functions see them, in TRL's convention: a text prompt
    and its completions as text; a conversational prompt as its messages and each completion as
    one assistant message, `[{"role": "assistant", "content": text}]`. `completions` holds
    `len(texts)` equal groups, rows `b G + k`."""
    g = len(completions) // max(len(texts), 1)
    prompts = [m if m is not None else t for t, m in zip(texts, messages)]
    return prompts, [c if messages[n // g] is None else [{"role": "assistant", "content": c}]
                     for n, c in enumerate(completions)]


def prompt_text(tokenizer, prompt) -> str:
    """What reward functions see as the prompt: the text, or messages rendered by the chat
    template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def load_prompts(source: str, tokenizer, field: str = "prompt", tiny_count: int = 16,
                 seed: int = 0) -> Prompts:
    """The prompts of a data source; `tiny`: random token prompts shown to rewards as ids, with
    a synthetic `answer` column (the digit sum of the ids mod 10), so answer-checking rewards
    run on the tiny model too."""
    if source == "tiny":
        ids = [[int(t) for t in p] for p, _, _ in tiny.pairs(tiny_count, seed)]
        return Prompts(ids, [" ".join(map(str, p)) for p in ids],
                       {"answer": [str(sum(p) % 10) for p in ids]})
    if tokenizer is None:
        raise ConfigError(f"DataSpec.source={source!r} needs a tokenizer and the model has none; "
                          "use DataSpec.source='tiny' or a model that ships its tokenizer")
    src = data_lib.open_source(source)
    rows = src.rows(0, len(src))
    if not rows:
        raise DataSourceError(f"{source}: no rows")
    columns = sorted({k for r in rows for k in r} - {field})
    ids, texts, messages = [], [], []
    for i, row in enumerate(rows):
        prompt = row.get(field)
        ok = isinstance(prompt, str) and prompt.strip() or (
            isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in prompt))
        if not ok:
            raise data_lib.DataError(i, field, "expected a non-empty string or a list of "
                                     "{role, content} messages").located(src)
        ids.append(onpolicy.prompt_ids(tokenizer, prompt))
        texts.append(prompt_text(tokenizer, prompt))
        messages.append(None if isinstance(prompt, str) else prompt)
    return Prompts(ids, texts, {k: [r.get(k) for r in rows] for k in columns}, messages)


def draw_order(count: int, start: int, stop: int, seed: int) -> np.ndarray:
    """Prompt indices of draws [start, stop): a seeded permutation per pass over the prompts."""
    draws = np.arange(start, stop)
    out = np.empty(len(draws), np.int64)
    for p in np.unique(draws // count):
        perm = np.random.default_rng([seed, int(p)]).permutation(count)
        here = draws // count == p
        out[here] = perm[draws[here] % count]
    return out


# Scoring: rewards, DAPO's overlong shaping, group preferences.

def decode(tokenizer, tokens: np.ndarray) -> str:
    """A completion as reward functions see it (ids separated by spaces without a tokenizer)."""
    if tokenizer is None:
        return " ".join(str(int(t)) for t in tokens)
    return tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)


def overlong_shaping(lengths_n: np.ndarray, max_new: int, buffer: int, scale: float):
    """DAPO's soft overlong penalty: 0 up to `max_new - buffer` tokens, then falling linearly
    to `-scale` at `max_new`."""
    if buffer == 0:
        return np.zeros(len(lengths_n))
    start = max_new - buffer
    return -scale * np.clip(lengths_n - start, 0, None) / buffer


def win_matrix(spec: str, scale: float, rewards_bk: np.ndarray, prompts: list,
               completions_bk: list, fields: dict) -> np.ndarray:
    """`[B, K, K]` probabilities that sample i of a group beats sample j (diagonal 0.5)."""
    b, k = rewards_bk.shape
    if spec == "bradley_terry":
        r = np.nan_to_num(rewards_bk.astype(np.float64))
        p = 1.0 / (1.0 + np.exp(-scale * (r[:, :, None] - r[:, None, :])))
        return p.astype(np.float32)
    _, fn = reward_fns.resolve(spec)
    pairs = [(g, i, j) for g in range(b) for i in range(k) for j in range(k) if i != j]
    args = ([prompts[g] for g, _, _ in pairs], [completions_bk[g][i] for g, i, _ in pairs],
            [completions_bk[g][j] for g, _, j in pairs])
    extra = {name: [col[g] for g, _, _ in pairs] for name, col in fields.items()}
    try:
        probs = [float(x) for x in fn(*args, **extra)]
    except Exception as err:  # noqa: BLE001 -- name the scorer, keep the cause
        raise reward_fns.RewardFunctionError(f"preference scorer {spec} failed: "
                                             f"{type(err).__name__}: {err}") from err
    out = np.full((b, k, k), 0.5, np.float32)
    for (g, i, j), value in zip(pairs, probs):
        out[g, i, j] = value
    return out


@dataclasses.dataclass
class Rollouts:
    """One process's groups of an iteration: prompts with their G completions as examples."""

    data: TokenizedData       # K = G completions per example; fields rewards, sample_valid
    old_logps_nkc: np.ndarray  # the sampler's per-token log-probs
    metrics: dict
    cursor: int                # the next prompt draw after this iteration
    old_values_nkc: np.ndarray | None = None  # the critic's values before the first update

    def save(self, path: str) -> None:
        """Written whole to a temporary file, then renamed: never half-written."""
        extra = {"old_logps_nkc": self.old_logps_nkc, "cursor": np.int64(self.cursor),
                 "metrics": np.array(json.dumps(self.metrics))}
        if self.old_values_nkc is not None:
            extra["old_values_nkc"] = self.old_values_nkc
        self.data.save(path, extra=extra)

    @classmethod
    def load(cls, path: str) -> Rollouts:
        with np.load(path) as z:
            extra = (z["old_logps_nkc"], json.loads(str(z["metrics"])), int(z["cursor"]),
                     z["old_values_nkc"] if "old_values_nkc" in z else None)
        return cls(TokenizedData.load(path), *extra)


class RolloutTask(loop_lib.PolicyTask):
    """The policy trained on groups sampled from itself (`driver.Task`)."""

    online = True

    def __init__(self, model_spec, data_spec, algo, optim_config, loop, *,
                 rl: RLConfig = RLConfig(), prompts: Prompts | None = None):
        self.rl, self.prompts, self.iteration, self.cursor = rl, prompts, 0, 0
        # The step number the current iteration began at, and whether the early stop (target
        # KL) ended its updates.
        self.iteration_start, self.stopped_early = 1, False
        check_run(algo, rl, data_spec, jax.process_count())
        algo = with_group_size(algo, rl.group_size)
        self.rollouts: Rollouts | None = None
        super().__init__(model_spec, data_spec, algo, optim_config, loop)

    def check_sources(self, model_spec, data_spec) -> None:
        """Prompt data needs only a prompt column: its existence is checked before loading."""
        loop_lib.check_sources(model_spec, data_spec, rows=False)

    def first_loader(self, model, vocab_size: int) -> data_lib.Loader:
        tokenizer = self.tokenizer
        if self.prompts is None:
            self.prompts = load_prompts(self.data_spec.source, tokenizer, self.rl.prompt_field,
                                        max(self.data_spec.tiny_examples,
                                            self.rl.prompts_per_iteration), self.loop.seed)
        self.rewards = reward_fns.RewardFunctions(self.rl.rewards, self.rl.reward_weights,
                                                  tokenizer=tokenizer)
        stops = self.rl.stop_ids or (() if tokenizer is None else (int(tokenizer.eos_token_id),))
        self.sampling = self.rl.sampling(stops)
        self.pad_id = 0 if tokenizer is None or tokenizer.pad_token_id is None else \
            int(tokenizer.pad_token_id)
        self.prompt_width = -(-max(len(p) for p in self.prompts.ids) // 16) * 16
        self.layout = rollout_layout(self.data_spec, self.prompts, self.rl,
                                     self.mesh.shape["data"] * self.mesh.shape["fsdp"],
                                     self.pad_id)
        if self.rewards.needs_reference and not self.setup.reference.has_params:
            raise ConfigError("a PAR reward (scorer:par:...) samples the reference policy; "
                              f"reference kind {self.setup.reference.kind!r} keeps no model "
                              "(use frozen or lora)")
        # Before the first update the policy is its own reference (kinds frozen and lora).
        policy = on_first_device(model)
        self.reference_model = policy if self.rewards.needs_reference else None
        kept = self.kept_iterations()
        if kept:  # a resumed run: kept rollouts give the shapes, nothing is sampled again
            self.iteration = kept[-1]
            return self.iteration_loader(self.iteration)
        return self.iteration_loader(0, policy)

    def kept_iterations(self) -> list[int]:
        """The iterations whose rollouts this process keeps in the run directory."""
        pattern = os.path.join(self.loop.output_dir, "rollouts",
                               f"iter_*.p{jax.process_index()}.npz")
        return sorted(int(os.path.basename(p)[5:11]) for p in glob.glob(pattern))

    def data_fillers(self, graphdef, initial, rest, teachers, teacher_graphdef) -> list:
        return [self.fill_old_logps] + ([self.fill_old_values] if self.old_values else [])

    @property
    def old_values(self) -> bool:
        """Whether the loss reads the critic's values at sampling time: with one update per
        iteration they are the current values, so none are computed."""
        return self.setup.critic is not None and self.rl.steps_per_iteration > 1

    # Rollouts of an iteration: kept on disk, or sampled from the policy.

    def rollout_path(self, t: int) -> str:
        return os.path.join(self.loop.output_dir, "rollouts",
                            f"iter_{t:06d}.p{jax.process_index()}.npz")

    def iteration_loader(self, t: int, policy=None) -> data_lib.Loader:
        """Iteration t's groups (kept, or sampled from `policy`) and a loader over them."""
        path = self.rollout_path(t)
        if os.path.exists(path):
            self.rollouts = Rollouts.load(path)
        else:
            if policy is None:
                raise FileNotFoundError(f"{path}: the rollouts of iteration {t}, which the "
                                        "checkpoint resumes, are missing")
            self.rollouts = self.sample(policy, self.cursor)
            self.rollouts.save(path)
            for old in glob.glob(os.path.join(os.path.dirname(path), "iter_*.npz")):
                if int(os.path.basename(old)[5:11]) < t - 1:
                    os.remove(old)
        self.cursor = self.rollouts.cursor
        self.index_of = {int(e): i for i, e in enumerate(self.rollouts.data.example_index_n)}
        groups = (self.rl.prompts_per_iteration // self.rl.minibatches // jax.process_count()
                  // self.data_spec.micro_batches)
        return data_lib.Loader(self.rollouts.data, groups, self.layout,
                               seed=self.loop.seed + t, num_epochs=None)

    def sample(self, policy, cursor: int) -> Rollouts:
        """Groups sampled and scored from draw `cursor` on (dynamic sampling: several rounds)."""
        rl, pc, pi = self.rl, jax.process_count(), jax.process_index()
        want, kept, dropped, rounds = rl.prompts_per_iteration // pc, [], [], 0
        start = time.perf_counter()
        gen_tokens = 0
        while True:
            draws = np.arange(cursor, cursor + rl.prompts_per_iteration)
            lo, hi = data_lib.shard_range(len(draws), pi, pc)
            groups = self.sample_groups(policy, draws[lo:hi])
            gen_tokens += int(sum(g["lengths_k"].sum() for g in groups))
            cursor += rl.prompts_per_iteration
            rounds += 1
            for g in groups:
                (kept if g["informative"] or not rl.dynamic_sampling else dropped).append(g)
            full = len(kept) >= want
            if not rl.dynamic_sampling or rounds >= rl.max_sampling_rounds or agreed(full):
                break
        seconds = time.perf_counter() - start
        chosen = (kept + dropped)[:want]  # a shortfall is made up with dropped groups
        metrics = rollout_metrics(chosen, self.rewards.names, rl.max_new_tokens)
        metrics.update({"generation/seconds": seconds,
                        "generation/tokens_per_s": gen_tokens / max(seconds, 1e-9),
                        "sampling_rounds": float(rounds)})
        if rl.dynamic_sampling:
            metrics["groups/dropped_fraction"] = len(dropped) / max(len(kept) + len(dropped), 1)
            metrics["groups/filled_with_dropped"] = float(max(0, want - len(kept)))
        if metrics["samples_valid"] == 0:
            build.note("an iteration has no sample to learn from: every reward function "
                       "returned None for every sample, or every sample was filtered as "
                       "overlong (samples_valid 0)")
        return self.to_rollouts(chosen, cursor, metrics)

    def sample_groups(self, policy, draws: np.ndarray) -> list[dict]:
        """G samples of the prompts of `draws`, scored: one dict per group."""
        rl, g = self.rl, self.rl.group_size
        ids, texts, fields, messages = self.prompts.take(draw_order(
            len(self.prompts), int(draws[0]), int(draws[-1]) + 1, self.loop.seed)
        ) if len(draws) else ([], [], {}, [])
        if not ids:
            return []
        # On this process's first device alone, outside the run's mesh: each process samples
        # its own prompts, with no collective.
        with jax.set_mesh(sharding_lib.make_mesh((1, 1, 1), devices=jax.local_devices()[:1])):
            base = jax.random.key(self.loop.seed)
            keys = jax.vmap(lambda d: jax.random.fold_in(base, d))(
                np.repeat(draws, g) * g + np.tile(np.arange(g), len(draws)))
            out = generate_groups(policy, ids, g, self.sampling, keys, self.pad_id,
                                  width=self.prompt_width)
        lengths_n = out.lengths_b
        completions = [out.tokens_bn[n, :lengths_n[n]] for n in range(len(lengths_n))]
        texts_n = [decode(self.tokenizer, c) for c in completions]
        rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
        shape = (len(ids), g, -1)
        reference = None
        if self.rewards.needs_reference:  # PAR's replies: a key per iteration's first draw
            reference = (self.reference_model, self.sampling,
                         int(np.random.default_rng([self.loop.seed, int(draws[0])]).integers(
                             2 ** 31)), self.pad_id)
        prompts_in, completions_in = reward_inputs(texts, messages, texts_n)
        scored = self.rewards(rep(prompts_in), completions_in,
                              {k: rep(v) for k, v in fields.items()},
                              tokens=(ids, out.tokens_bn.reshape(shape),
                                      out.mask_bn.reshape(shape)), reference=reference)
        stopped_n = np.array([len(c) > 0 and int(c[-1]) in self.sampling.stop_ids
                              for c in completions])
        truncated_n = (lengths_n >= rl.max_new_tokens) & ~stopped_n
        overlong_n = overlong_shaping(lengths_n, rl.max_new_tokens, rl.overlong_buffer,
                                      rl.overlong_penalty)
        total_n = scored.total_n + overlong_n
        valid_n = ~np.isnan(total_n) & ~(truncated_n & rl.overlong_filter)
        groups = []
        for b in range(len(ids)):
            s = slice(b * g, (b + 1) * g)
            r = total_n[s][valid_n[s]]
            groups.append({
                "draw": int(draws[b]), "prompt": ids[b], "prompt_text": texts[b],
                "fields": {k: v[b] for k, v in fields.items()},
                "completions": completions[s], "texts": texts_n[s],
                "old_logps_kc": out.logps_bn[s], "lengths_k": lengths_n[s],
                "rewards_k": total_n[s], "valid_k": valid_n[s], "truncated_k": truncated_n[s],
                "columns_km": scored.columns_nm[s], "overlong_k": overlong_n[s],
                "informative": len(r) > 1 and np.ptp(r) > 0})
        return groups

    def to_rollouts(self, groups: list[dict], cursor: int, metrics: dict) -> Rollouts:
        """The groups as examples of K = G completions with their rewards and log-probs."""
        g = self.rl.group_size
        rewards_bk = np.stack([x["rewards_k"] for x in groups]).astype(np.float32)
        fields = {"rewards": rewards_bk,
                  "sample_valid": np.stack([x["valid_k"] for x in groups]).astype(np.float32)}
        if self.rl.advantage_per_reward:
            columns = np.stack([x["columns_km"] for x in groups])
            weights = np.asarray(self.rewards.weights, np.float32)
            if self.rl.overlong_buffer:  # DAPO's overlong penalty: one more column, weight 1
                columns = np.concatenate(
                    [columns, np.stack([x["overlong_k"] for x in groups])[..., None]], -1)
                weights = np.append(weights, np.float32(1.0))
            fields["reward_columns"] = columns.astype(np.float32)
            fields["reward_weights"] = np.tile(weights, (len(groups), 1))
        if "group_preferences" in self.setup.needs:
            fields["win_probs"] = win_matrix(
                self.rl.preference, self.rl.preference_scale, rewards_bk,
                [x["prompt_text"] for x in groups], [x["texts"] for x in groups],
                {k: [x["fields"][k] for x in groups] for k in groups[0]["fields"]})
        data = from_lists("rollout", g, [x["prompt"] for x in groups],
                          [c for x in groups for c in x["completions"]],
                          [x["draw"] for x in groups], fields)
        old = np.stack([x["old_logps_kc"] for x in groups]).astype(np.float32)
        return Rollouts(data, old, metrics, cursor)

    def per_token(self, batch: dict, table_nkc: np.ndarray | None) -> np.ndarray:
        """`[Q, C]` rows of a per-sample table of the rollouts, aligned with the batch's targets
        (zeros without a table: only a shape probe sees that)."""
        q, c = batch["completion_mask"].shape
        g = self.rl.group_size
        out_qc = np.zeros((q, c), np.float32)
        for slot, e in enumerate(batch["example_index"]):
            if e < 0 or table_nkc is None:
                continue
            row = table_nkc[self.index_of[int(e)]]
            width = min(c, row.shape[-1])
            out_qc[slot * g:(slot + 1) * g, :width] = row[:, :width]
        return out_qc * batch["completion_mask"]

    def fill_old_logps(self, batch: dict) -> dict:
        """The behaviour log-probs `[Q, C]` of the batch's groups."""
        return dict(batch, old_logps=self.per_token(batch, self.rollouts.old_logps_nkc))

    def fill_old_values(self, batch: dict) -> dict:
        """The critic's values `[Q, C]` of the batch's groups before the iteration's updates."""
        return dict(batch, old_values=self.per_token(batch, self.rollouts.old_values_nkc))

    def compute_old_values(self) -> None:
        """The current critic's values of every sample of the iteration, kept with its rollouts
        (saved again, so a run killed mid-iteration resumes on the same ones)."""
        r = self.rollouts
        groups = self.loader.batch_size
        loader = data_lib.Loader(r.data, groups, self.layout, shuffle=False, num_epochs=1)
        out_nkc = np.zeros(r.old_logps_nkc.shape, np.float32)
        if self.values_fn is None:
            self.values_fn = critic_lib.batch_values_fn(self.setup, self.state_sh, self.mesh)
        keys = critic_lib.VALUE_KEYS
        for _ in range(-(-len(r.data) // (groups * self.micro_batches))):
            batch_m = driver.next_batch_m(loader, self.micro_batches)
            part = {k: batch_m[k] for k in keys}
            sh = step_lib.batch_shardings(part, self.mesh)
            values_mqc = driver.to_host(self.values_fn(self.state, driver.to_global(part, sh)))
            q = batch_m["completion_mask"].shape[1]
            local = values_mqc[:, jax.process_index() * q:(jax.process_index() + 1) * q]
            g, c = self.rl.group_size, out_nkc.shape[-1]
            for m, index in enumerate(batch_m["example_index"]):
                for slot, e in enumerate(index):
                    if e >= 0:
                        width = min(c, local.shape[-1])
                        out_nkc[self.index_of[int(e)], :, :width] = \
                            local[m, slot * g:(slot + 1) * g, :width]
        r.old_values_nkc = out_nkc
        r.save(self.rollout_path(self.iteration))

    def current_reference(self):
        """The reference model as a module on this process's first device (PAR samples it)."""
        params = self.setup.reference.params(self.state)
        return on_first_device(nnx.merge(self.setup.graphdef, driver.to_host(params),
                                         driver.to_host(self.state.rest)))

    def rollout_policy(self):
        """The current policy as a module to sample from: on one device the state's own arrays
        (no copy); across devices gathered to this host, each process sampling alone."""
        if self.mesh.size == 1:
            return on_first_device(nnx.merge(self.setup.graphdef, policy_params(
                self.setup, self.state), self.state.rest))
        return on_first_device(current_policy(self.setup, self.state))

    # The driver's hooks.

    values_fn = None

    def step(self, number: int):
        if number == 1 and self.iteration != 0:  # a fresh start beside kept rollouts
            self.iteration, self.iteration_start, self.stopped_early = 0, 1, False
            self.cursor = 0
            self.loader = self.iteration_loader(0, self.rollout_policy())
        done = number - self.iteration_start >= self.rl.steps_per_iteration
        if done or self.stopped_early:
            self.iteration += 1
            self.iteration_start, self.stopped_early = number, False
            if self.rewards.needs_reference:
                self.reference_model = self.current_reference()
            self.loader = self.iteration_loader(self.iteration, self.rollout_policy())
        if self.old_values and self.rollouts.old_values_nkc is None:
            self.compute_old_values()
        start = time.perf_counter()
        values, example_index = super().step(number)
        seconds = time.perf_counter() - start
        target = self.rl.target_kl
        if target is not None and values.get("approx_kl", 0.0) > target:
            self.stopped_early = True
        values = dict(values, **self.rollouts.metrics, iteration=self.iteration,
                      update_tokens_per_s=values.get("tokens", 0.0) / max(seconds, 1e-9))
        if target is not None:
            values["early_stopped"] = float(self.stopped_early)
        return values, example_index

    def data_state(self) -> dict:
        return {"iteration": self.iteration, "loader": self.loader.state_dict(),
                "iteration_start": self.iteration_start, "stopped_early": self.stopped_early}

    def restore(self, state, data_state: dict) -> None:
        self.state = state
        if data_state["iteration"] != self.iteration or self.rollouts is None:
            self.iteration = data_state["iteration"]
            self.loader = self.iteration_loader(self.iteration)
        self.loader.load_state_dict(data_state["loader"])
        self.iteration_start = data_state.get(
            "iteration_start", self.iteration * self.rl.steps_per_iteration + 1)
        self.stopped_early = data_state.get("stopped_early", False)


def on_first_device(model):
    """The model with its arrays committed to this process's first device (not copied when
    they are there already), so that the sampler compiles once for every iteration's policy."""
    graphdef, state = nnx.split(model)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return nnx.merge(graphdef, jax.device_put(state, local))


def agreed(full: bool) -> bool:
    """Whether every process has its groups (a collective on several)."""
    if jax.process_count() == 1:
        return full
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(full, np.int32))))


def rollout_metrics(groups: list[dict], names: tuple, max_new: int) -> dict:
    """Reward (each function's too; accuracy for 0/1 checks), lengths, truncation: over every
    process's groups (all processes hold as many)."""
    keys = ("rewards_k", "lengths_k", "truncated_k", "valid_k", "columns_km")
    arrays = {k: np.stack([x[k] for x in groups]).astype(np.float64) for k in keys}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        arrays = {k: np.concatenate(multihost_utils.process_allgather(v))
                  for k, v in arrays.items()}
    rewards, lengths = arrays["rewards_k"].ravel(), arrays["lengths_k"].ravel()
    columns = arrays["columns_km"].reshape(-1, len(names))
    valid = ~np.isnan(rewards)
    out = {"reward/mean": float(np.mean(rewards[valid])) if valid.any() else float("nan"),
           "reward/std": float(np.std(rewards[valid])) if valid.any() else float("nan"),
           "completion/length_mean": float(lengths.mean()),
           "completion/length_max": float(lengths.max()),
           "completion/truncated": float(arrays["truncated_k"].mean()),
           "samples_valid": float(arrays["valid_k"].mean())}
    for m, name in enumerate(names):
        col = columns[:, m][~np.isnan(columns[:, m])]
        if len(col):
            out[f"reward/{name}"] = float(col.mean())
            if np.isin(col, (0.0, 1.0)).all():
                out[f"accuracy/{name}"] = float(col.mean())
    return out


def rollout_layout(spec, prompts: Prompts, rl: RLConfig, row_multiple: int,
                   pad_id: int) -> data_lib.LayoutConfig:
    """Rollouts as rows of `spec.layout`: `padded` a row per sample, `prefix` a row per group
    (the prompt once), `packed` samples packed into rows of `spec.row_length` (default: the
    longest possible sample), `prefix_packed` groups cut into runs (the prompt, then as many
    samples as fit) packed into rows of `spec.row_length` (default: the longest prompt and four
    full-length samples).

    Padded and prefix rows take one of four lengths, a quarter to all of the longest possible
    row (the longest prompt with full-length samples), so the update compiles at most four
    times and samples that stop early do not pay for the longest row. Packed and prefix_packed
    rows have one length, and their count is rounded up to a sixteenth of the most a batch can
    need, so at most sixteen row counts compile (a run meets a few: 5 in 300 batches drawn
    from the GRPO benchmark's sample lengths) and a batch pays for less than a sixteenth of
    padding rows (in those batches eighths cost prefix_packed 5.6% more row positions). Short
    prefix_packed rows keep attention cheap and cutting groups leaves little padding, at the
    cost of a prompt copy per extra run."""
    longest, g, c = max(len(p) for p in prompts.ids), rl.group_size, rl.max_new_tokens
    unit = round_up(longest + (g if spec.layout.startswith("prefix") else 1) * c, 16)
    common = {"kind": spec.layout, "completion_buckets": (c,), "pad_id": pad_id}
    if spec.layout in ("padded", "prefix"):
        buckets = sorted({round_up(unit * q // 4, 16) for q in (1, 2, 3)} | {unit})
        return data_lib.LayoutConfig(length_buckets=tuple(buckets), row_multiple=row_multiple,
                                     **common)
    groups = max(1, rl.prompts_per_iteration // rl.minibatches // jax.process_count()
                 // spec.micro_batches)  # groups in one update batch

    def counted(most: int) -> int:  # row counts rounded up to a sixteenth of the most needed
        return math.lcm(row_multiple, max(1, most // 16))

    if spec.layout == "packed":
        length = max(spec.row_length or 0, unit)
        most = -(-groups * g // (length // unit))  # rows of full-length samples
        return data_lib.LayoutConfig(row_length=length, row_multiple=counted(most), **common)
    if spec.layout == "prefix_packed":
        length = spec.row_length or round_up(longest + min(g, 4) * c, 16)
        if length < longest + c:
            raise ConfigError(f"DataSpec.row_length {length} holds no run of the longest prompt "
                              f"({longest} tokens) and one sample of max_new_tokens ({c}); "
                              f"set it to at least {longest + c}")
        most = groups * -(-g // ((length - longest) // c))
        return data_lib.LayoutConfig(row_length=length, split_examples=True,
                                     row_multiple=counted(most), **common)
    raise ConfigError(f"unknown DataSpec.layout {spec.layout!r}")


def with_group_size(algo: build.AlgoConfig, group_size: int) -> build.AlgoConfig:
    """The objective's hyper-parameters with `group_size` = G (refusing a different one)."""
    hyper = dict(algo.own_hyper())
    if "group_size" not in losses.hyper_defaults(losses.get(algo.name)):
        return algo
    if "group_size" in hyper and hyper["group_size"] != group_size:
        raise ConfigError(f"AlgoConfig.hyper group_size {hyper['group_size']} differs from "
                          f"RLConfig.group_size {group_size}; set only RLConfig.group_size")
    hyper["group_size"] = group_size
    return dataclasses.replace(algo, hyper={algo.name: hyper})


def check_run(algo, rl: RLConfig, data_spec, processes: int) -> None:
    """Refuse settings the loop cannot honour, before any model loads."""
    if algo.mix or algo.modifiers:
        raise ObjectiveError("the online loop trains one registered RL objective (no mix or "
                             "modifiers)")
    info = losses.info(algo.name)
    if info.inputs != "rollout":
        rollout = [n for n in losses.names() if losses.info(n).inputs == "rollout"]
        raise ObjectiveError(f"objective {algo.name!r} trains on {info.inputs} data, not on "
                             f"rollouts; the online loop trains {', '.join(rollout)}")
    grouped = "group_size" in losses.hyper_defaults(losses.get(algo.name))
    if rl.advantage_per_reward and (not grouped or "group_preferences" in info.needs):
        raise ConfigError(f"RLConfig.advantage_per_reward: {algo.name} does not estimate group "
                          "advantages from the reward functions (grpo, dr_grpo, dapo, ngrpo and "
                          "rloo do)")
    if grouped and rl.group_size < 2:
        raise ConfigError(f"RLConfig.group_size must be >= 2 for {algo.name}: its advantages "
                          "compare a prompt's samples with each other")
    per_step = rl.prompts_per_iteration // rl.minibatches
    if per_step % processes:
        raise ConfigError(f"{per_step} groups per step do not split over {processes} processes")
    if (per_step // processes) % data_spec.micro_batches:
        raise ConfigError(f"DataSpec.micro_batches ({data_spec.micro_batches}) must divide the "
                          f"{per_step // processes} groups of a step on each process")


@gin.configurable("train_online")
def train(model_spec, data_spec, algo, optim_config, loop_config, *,
          rl: RLConfig = RLConfig()) -> dict:
    """Gin entry (`prefopt train` picks it for rollout objectives): prompts from
    `DataSpec.source` (a file with a `prompt` column, or `tiny`)."""
    task = functools.partial(RolloutTask, rl=rl)
    return loop_lib.train(model_spec, data_spec, algo, optim_config, loop_config, task)
