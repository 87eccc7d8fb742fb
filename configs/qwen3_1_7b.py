"""Qwen3-1.7B's shape (Qwen Team 2025): qwen3_0_6b 2048 wide with SwiGLU of 6144 (28 layers, 16
query heads sharing 8 key/value heads of 128, q/k norms, tied head): 1,720,574,976 parameters
with its 151,936-row vocabulary (the model card's 1.7B, 1.4B without embeddings).
"""

import ml_collections

from jaxdp.configs import qwen3_0_6b


def get_config() -> ml_collections.ConfigDict:
  c = qwen3_0_6b.get_config()
  c.model.d_model = 2048  # hidden_size.
  c.model.mlp_ratio = 4.5  # SwiGLU width (2/3 of ratio x d_model) = intermediate_size 6144.
  return c
