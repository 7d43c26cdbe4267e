"""Token-level MDP view of preference optimization: implicit rewards, soft values, tabular testbed.

`implicit` (pure array functions) is imported here; `heatmap` and `tabular` are imported by name
(`prefopt_jax.tokenmdp.tabular`) so that `models.heads` can use `implicit` without pulling in the
losses or matplotlib.
"""

from prefopt_jax.tokenmdp import implicit  # noqa: F401
