"""Scoring: per-token log-probs (and per-token vocabulary statistics) of a batch under a model,
computed in chunks so no `[batch, length, vocab]` float32 logits exist."""
