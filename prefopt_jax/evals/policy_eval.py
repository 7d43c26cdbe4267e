"""Evaluate a trained policy (accuracies, KL, win rate, lengths) and its implicit reward model
against an explicit one.

Shape letters: `p` pairs, `q` sequences (chosen `2p`, rejected `2p + 1`), `c` completion
positions, `b` prompts, `n` samples per prompt.

On held-out pairs: reward accuracy of the implicit reward `b D`, ranking accuracy (also
length-normalised), idealised ranking accuracy (rater proportion `alpha`), and the accuracy of
an explicit reward model when one is given. On replies sampled for the held-out prompts:
sampled KL to the reference (k1, k3), win rate against the reference's replies under a
ground-truth reward, and response lengths. Every figure comes from `evals.metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import gin
import jax
import numpy as np
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.data.synthetic import tiny_data
from prefopt_jax.evals import metrics
from prefopt_jax.models.spec import load_model
from prefopt_jax.rewards import reward_model as rm_lib
from prefopt_jax.rewards import scorers as rm_scorers
from prefopt_jax.sampling import scorers, search
from prefopt_jax.sampling.generate import SamplingConfig
from prefopt_jax.scoring import logps as logps_lib

_token_logps = jax.jit(lambda graphdef, state, batch: logps_lib.token_logps(
    nnx.merge(graphdef, state), batch), static_argnums=0)


def sequence_logps(model, data: data_lib.TokenizedData, batch_size: int = 8):
    """(L_w `[P]`, L_l `[P]`, |y_w| `[P]`, |y_l| `[P]`): summed completion log-probs per pair."""
    graphdef, state = nnx.split(model)
    loader = data_lib.Loader(data, min(batch_size, len(data)),
                             data_lib.LayoutConfig(kind="padded"), shuffle=False)
    out = [[], [], [], []]
    for batch in loader:
        mask_qc = batch["completion_mask"]
        sums_q = (np.asarray(_token_logps(graphdef, state, batch)) * mask_qc).sum(-1)
        real_p = batch["pair_valid"] > 0
        for i, x_q in enumerate([sums_q, sums_q, mask_qc.sum(-1), mask_qc.sum(-1)]):
            out[i].append(x_q[i % 2::2][real_p])
    return tuple(np.concatenate(x) for x in out)


def pair_metrics(policy, ref, data, beta: float, alpha: float = 0.9, rm=None,
                 batch_size: int = 8) -> dict:
    """Implicit reward / ranking / idealised accuracy on pairs, and an explicit RM's accuracy."""
    l_w, l_l, n_w, n_l = sequence_logps(policy, data, batch_size)
    ref_w, ref_l, _, _ = sequence_logps(ref, data, batch_size)
    out = {
        "pairs": int(len(l_w)),
        "implicit_reward_accuracy": metrics.implicit_reward_accuracy(l_w, ref_w, l_l, ref_l, beta),
        "ranking_accuracy": metrics.ranking_accuracy(l_w, l_l),
        "ranking_accuracy_length_normalised": metrics.ranking_accuracy(l_w, l_l, n_w, n_l),
        "reference_ranking_accuracy": metrics.ranking_accuracy(ref_w, ref_l),
        "idealised_ranking_accuracy": metrics.idealised_ranking_accuracy(
            ref_w, ref_l, np.full(len(l_w), alpha), beta),
        "implicit_margin_mean": float(np.mean(beta * ((l_w - ref_w) - (l_l - ref_l)))),
    }
    if rm is not None:
        r_w, r_l = rm_lib.score_pairs(rm, data, batch_size)
        out["explicit_reward_accuracy"] = metrics.reward_accuracy(r_w, r_l)
    return out


def sample_metrics(policy, ref, prompts, ground_truth, config: SamplingConfig, seed: int = 0,
                   pad_id: int = 0) -> dict:
    """KL to the reference, win rate against the reference and lengths, from sampled replies."""
    ours = search.sample_candidates(policy, prompts, 1, config, seed, pad_id)
    theirs = search.sample_candidates(ref, prompts, 1, config, seed + 1, pad_id)
    ref_logps_bnc = scorers.completion_logps(ref, ours, pad_id)
    mask_qc = ours.mask_bnc.reshape(len(prompts), -1)
    logps_qc = ours.logps_bnc.reshape(mask_qc.shape)
    ref_qc = ref_logps_bnc.reshape(mask_qc.shape)
    lengths_q, ref_lengths_q = mask_qc.sum(-1), theirs.mask_bnc.reshape(len(prompts), -1).sum(-1)
    return {
        "prompts": len(prompts),
        "kl_k1": metrics.sampled_kl(logps_qc, ref_qc, mask_qc, "k1"),
        "kl_k3": metrics.sampled_kl(logps_qc, ref_qc, mask_qc, "k3"),
        "win_rate": metrics.win_rate(np.asarray(ground_truth(ours)).reshape(-1),
                                     np.asarray(ground_truth(theirs)).reshape(-1)),
        "lengths": metrics.length_stats(lengths_q),
        "reference_lengths": metrics.length_stats(ref_lengths_q),
    }


def load_pairs(source: str, tokenizer, max_length: int | None = 512) -> data_lib.TokenizedData:
    """Paired examples of a file (no cache: evaluation files are small)."""
    config = data_lib.DataConfig(max_length=max_length, cache_dir=None)
    return data_lib.prepare(source, tokenizer, config)[0]


def write_json(result: dict, path: str) -> None:
    """The result as indented JSON (directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


def implicit_vs_explicit(policy, ref, rm, tokenizer, heldout: str, shifted: str | None = None,
                         beta: float = 0.1, max_length: int | None = 512) -> dict:
    """Implicit (`b D`) and explicit reward accuracy on held-out pairs: in-distribution, shifted."""
    sets = {"in_distribution": heldout, "shifted": shifted}
    out = {"beta": beta}
    for name, source in sets.items():
        if source:
            data = load_pairs(source, tokenizer, max_length)
            res = pair_metrics(policy, ref, data, beta, rm=rm)
            out[name] = {"source": source, "pairs": res["pairs"],
                         "implicit_accuracy": res["implicit_reward_accuracy"],
                         "explicit_accuracy": res["explicit_reward_accuracy"]}
    return out


def policy_from_run(model_spec, loop_config):
    """(policy, reference, tokenizer): the run's exported policy and the model it started from."""
    from prefopt_jax.models import from_pretrained

    ref, tokenizer = load_model(dataclasses.replace(model_spec, lora=None))
    export = os.path.join(loop_config.output_dir, "export")
    if not os.path.isdir(export):
        raise FileNotFoundError(f"no exported policy at {export}: run `prefopt train` with this "
                                "config first (LoopConfig.export = True)")
    policy, _ = from_pretrained(export, dtype=ref.config.dtype, load_tokenizer=False)
    return policy, ref, tokenizer


def heldout_pairs(data_spec, heldout, tokenizer, seed: int, vocab_size: int):
    """The held-out pairs: a file, or fresh synthetic pairs for the tiny model."""
    if heldout:
        return load_pairs(heldout, tokenizer, data_spec.max_length)
    return tiny_data("paired", data_spec.tiny_examples, seed + 1, vocab_size)


@gin.configurable("evaluate")
def evaluate(model=gin.REQUIRED, data=gin.REQUIRED, algo=gin.REQUIRED, loop=gin.REQUIRED, *,
             heldout: str | None = None, reward_model: str | None = None, alpha: float = 0.9,
             ground_truth: str = "sentiment", num_prompts: int = 16, max_new_tokens: int = 64,
             temperature: float = 1.0, output: str | None = None) -> dict:
    """`prefopt eval CONFIG.gin`: evaluate the policy a training config exported.

    Reads the config's own specs (bound by the command), so the same file trains and evaluates.
    """
    policy, ref, tokenizer = policy_from_run(model, loop)
    beta = float(dict(algo.hyper).get("beta", 0.1))
    source = heldout or (None if data.source == "tiny" else data.source)
    pairs = heldout_pairs(data, source, tokenizer, loop.seed, ref.config.vocab_size)
    rm = None
    if reward_model:
        rm = rm_lib.load(reward_model)[0]
    result = {"beta": beta, "alpha": alpha, "heldout": source or "tiny synthetic pairs",
              "pairs": pair_metrics(policy, ref, pairs, beta, alpha, rm)}
    if tokenizer is None and ground_truth == "sentiment":
        ground_truth = "mean_token"  # the tiny model has no tokenizer to decode replies
    eos = None if tokenizer is None else tokenizer.eos_token_id
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_ids=() if eos is None else (int(eos),))
    prompts = [list(pairs.prompt(i)) for i in range(min(num_prompts, len(pairs)))]
    result["samples"] = sample_metrics(policy, ref, prompts,
                                       rm_scorers.from_spec(ground_truth, tokenizer), config,
                                       loop.seed)
    result["samples"]["ground_truth"] = ground_truth
    write_json(result, output or os.path.join(loop.output_dir, "eval.json"))
    return result
