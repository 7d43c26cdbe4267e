"""Bradley-Terry reward models: a Transformer trunk read by a `RewardHead` at the last reply token.

Shape letters: `r` rows, `l` row length, `d` model width, `q` sequences (chosen `2p`, rejected
`2p + 1`), `c` completion positions, `p` pairs.

The module, its scoring of a batch in any layout, and its files (`save`/`load`). Training lives
in `prefopt_jax.train.reward_model`; scorers for search and the online loops in
`prefopt_jax.rewards.scorers`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.models.heads import RewardHead, last_index


class RewardModel(nnx.Module):
    """Trunk + head: one float32 score per sequence of a batch (docs/interfaces.md layout).

    `skip_id`: a Hugging Face sequence classifier's pad id. Transformers reads such a model at
    the sequence's last token that is not the pad id (with pad = end of turn, the token before
    a reply's closing one), or at the prompt's last token when the whole reply is pad ids; the
    model is read there too. None (prefopt's own reward models): the last reply token.
    """

    def __init__(self, trunk: nnx.Module, head: RewardHead, skip_id: int | None = None):
        self.trunk, self.head, self.skip_id = trunk, head, skip_id

    def read_mask(self, tokens_qc, mask_qc):
        """The reply positions the model may be read at (`skip_id` left out)."""
        if self.skip_id is None:
            return None
        return jnp.where(jnp.asarray(tokens_qc) == self.skip_id, 0, jnp.asarray(mask_qc))

    def __call__(self, batch) -> jax.Array:
        """Scores `[Q]`, read at each sequence's last completion token (see `skip_id`)."""
        hidden_rld = self.trunk(batch["tokens"], batch["positions"], batch["segment_ids"],
                                batch["branch_ids"], return_hidden=True)
        r, l, d = hidden_rld.shape
        index_q = last_token_index(batch["source_index"], batch["completion_mask"],
                                   self.read_mask(batch["target_tokens"],
                                                  batch["completion_mask"]))
        hidden_q1d = hidden_rld.reshape(r * l, d)[index_q][:, None]
        return self.head(hidden_q1d, index_b=jnp.zeros(hidden_q1d.shape[0], jnp.int32))


def last_token_index(source_index_qc, completion_mask_qc, read_mask_qc=None) -> jax.Array:
    """Flat index `r * L + t` `[Q]` of each sequence's last completion token, in any layout;
    with `read_mask_qc`, of its last token inside that mask, or of the prompt's last token (the
    source of the first reply token) when the mask holds none.

    The batch names only the *source* of each token (the position predicting it). Token c >= 1
    sits one past its source (token c - 1 of the same reply). Token 0 does too when the prompt
    has its own copy (padded, packed), but under prefix sharing every reply of an example has
    the shared prompt's last token as source, and the replies follow the prompt one after
    another in sequence order (data.layout, train.tiny): a 1-token reply's token sits past the
    earlier replies of its example, not right after the prompt. Replies of one example are
    recognised by their common first source; empty and filler sequences have length 0.
    """
    mask_qc = jnp.asarray(completion_mask_qc) > 0
    source_index_qc = jnp.asarray(source_index_qc, jnp.int32)
    read_qc = mask_qc if read_mask_qc is None else jnp.asarray(read_mask_qc) > 0
    last_q = last_index(read_qc)
    source_last_q = jnp.take_along_axis(source_index_qc, last_q[:, None], axis=1)[:, 0]
    first_q = source_index_qc[:, 0]
    length_q = mask_qc.sum(axis=1).astype(jnp.int32)
    order_q = jnp.arange(first_q.shape[0])
    earlier_qq = (first_q[:, None] == first_q[None, :]) & (order_q[None, :] < order_q[:, None])
    start_q = first_q + 1 + jnp.sum(jnp.where(earlier_qq, length_q[None, :], 0), axis=1)
    index_q = jnp.where(last_q >= 1, source_last_q + 1, start_q)
    return index_q if read_mask_qc is None else jnp.where(read_qc.any(axis=1), index_q, first_q)


def new_reward_model(trunk: nnx.Module, init_scale: float = 0.1, seed: int = 0,
                     skip_id: int | None = None) -> RewardModel:
    """A trunk with a fresh float32 `RewardHead` (small init: scores start near 0)."""
    head = RewardHead(trunk.config.hidden_size, init_scale=init_scale, rngs=nnx.Rngs(seed))
    return RewardModel(trunk, head, skip_id)


_scores = jax.jit(lambda graphdef, params, batch: nnx.merge(graphdef, params)(batch),
                  static_argnums=0)


def score_pairs(rm: RewardModel, data: data_lib.TokenizedData, batch_size: int = 16,
                layout: data_lib.LayoutConfig = data_lib.LayoutConfig()) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """(r_w `[P]`, r_l `[P]`) for every pair of `data`, in order (filler dropped)."""
    scores_nk = score_examples(rm, data, batch_size, layout)
    return scores_nk[:, 0], scores_nk[:, 1]


def score_examples(rm: RewardModel, data: data_lib.TokenizedData, batch_size: int = 16,
                   layout: data_lib.LayoutConfig = data_lib.LayoutConfig()) -> np.ndarray:
    """Scores `[N, K]` of every completion of every example of `data`, in order."""
    graphdef, params = nnx.split(rm)
    k = data.num_completions
    loader = data_lib.Loader(data, min(batch_size, len(data)), layout, shuffle=False)
    out = []
    for batch in loader:
        scores_pk = np.asarray(_scores(graphdef, params, batch)).reshape(-1, k)
        out.append(scores_pk[batch["pair_valid"] > 0])
    return np.concatenate(out)


def save(rm: RewardModel, directory: str, tokenizer=None) -> str:
    """The trunk in Hugging Face format (`trunk/`) and the head's Params (`head.npz`, with the
    `skip_id` of a model loaded from a HF classifier)."""
    from prefopt_jax.models import save_pretrained

    save_pretrained(rm.trunk, os.path.join(directory, "trunk"), tokenizer)
    head = nnx.to_pure_dict(nnx.state(rm.head, nnx.Param))
    skip = {} if rm.skip_id is None else {"skip_id": np.int64(rm.skip_id)}
    np.savez(os.path.join(directory, "head.npz"), kernel=np.asarray(head["out"]["kernel"]),
             bias=np.asarray(head["out"]["bias"]), **skip)
    return directory


def load(directory: str, dtype=jnp.float32) -> tuple[RewardModel, Any]:
    """(reward model, tokenizer) written by `save`, or of a Hugging Face reward model: a
    `*ForSequenceClassification` model with one label (TRL's RewardTrainer writes one), from
    a directory or a hub id, whose `score` becomes the head."""
    from prefopt_jax.models import from_pretrained, hf

    if os.path.exists(os.path.join(directory, "head.npz")):
        trunk, tokenizer = from_pretrained(os.path.join(directory, "trunk"), dtype=dtype)
        with np.load(os.path.join(directory, "head.npz")) as z:
            rm = new_reward_model(trunk, skip_id=int(z["skip_id"]) if "skip_id" in z else None)
            rm.head.out.kernel.set_value(jnp.asarray(z["kernel"]))
            rm.head.out.bias.set_value(jnp.asarray(z["bias"]))
        return rm, tokenizer
    path = hf.resolve_source(directory)
    if not hf.is_sequence_classifier(path):
        raise hf.CheckpointError(f"{directory}: not a reward model (neither the head.npz of a "
                                 "prefopt reward model nor a *ForSequenceClassification "
                                 "config.json)")
    classifier = hf.from_pretrained_classifier(path, dtype)
    labels = classifier.weight.shape[0]
    if labels != 1:
        raise hf.CheckpointError(f"{path}: a classifier of {labels} labels; a reward model gives "
                                 "one score (num_labels 1)")
    rm = new_reward_model(classifier.trunk, skip_id=classifier.pad_id)
    rm.head.out.kernel.set_value(jnp.asarray(classifier.weight.T))
    rm.head.out.bias.set_value(jnp.zeros(1, jnp.float32) if classifier.bias is None
                               else jnp.asarray(classifier.bias))
    return rm, classifier.tokenizer
