"""A small Llama on the built-in corpus: RMSNorm, SwiGLU, rotary positions, grouped-query
attention (4 query heads sharing 2 key/value heads), untied output head.

Sized like `default` (about the same parameters and steps), so the two families can be compared
at equal cost: `jaxdp train --config llama` next to `jaxdp train`.
"""

from jaxdp.configs import default


def get_config():
  c = default.get_config()
  c.model.family = "llama"
  c.model.n_kv_head = 2
  c.model.tie_embeddings = False
  c.model.mlp_ratio = 4
  return c
