"""A tiny Qwen2/Qwen2.5-style model (llama family, variant qwen2: biases on q, k and v, tied head)
small enough to compile and train in seconds on emulated CPU devices (tests, CI)."""

import ml_collections

from jaxdp.configs import tiny_cpu


def get_config() -> ml_collections.ConfigDict:
  c = tiny_cpu.get_config()
  c.model.family = "llama"  # Qwen2 is Llama with q/k/v biases.
  c.model.variant = "qwen2"  # Exported as Qwen2ForCausalLM.
  c.model.qkv_bias = True  # Qwen2's biases on the q, k and v projections.
  c.model.n_kv_head = 1  # Grouped-query attention, as every Qwen2.5 size has.
  c.model.tie_embeddings = True  # The small Qwen2.5 sizes tie their output head.
  c.model.rope_theta = 1000000.0  # Qwen2.5's rotary base.
  c.model.norm_eps = 1e-6  # Qwen2.5's rms_norm_eps.
  return c
