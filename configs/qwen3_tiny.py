"""A tiny Qwen3-style model (llama family, variant qwen3: RMSNorm on each head's q and k, a head
size of its own) small enough to compile and train in seconds on emulated CPU devices."""

import ml_collections

from jaxdp.configs import tiny_cpu


def get_config() -> ml_collections.ConfigDict:
  c = tiny_cpu.get_config()
  c.model.family = "llama"  # Qwen3 is Llama with q/k norms.
  c.model.variant = "qwen3"  # Exported as Qwen3ForCausalLM.
  c.model.qk_norm = True  # Qwen3's q_norm and k_norm.
  c.model.head_dim = 24  # Not d_model / n_head = 16, as Qwen3's heads are wider than that.
  c.model.n_kv_head = 1  # Grouped-query attention.
  c.model.tie_embeddings = True  # The small Qwen3 sizes tie their output head.
  c.model.rope_theta = 1000000.0  # Qwen3's rotary base.
  c.model.norm_eps = 1e-6  # Qwen3's rms_norm_eps.
  return c
