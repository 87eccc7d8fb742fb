"""A tiny Mistral-style model (llama family, variant mistral: sliding-window attention, untied
head) small enough to compile and train in seconds on emulated CPU devices; the window (16) is
shorter than the context (32), so it matters."""

import ml_collections

from jaxdp.configs import tiny_cpu


def get_config() -> ml_collections.ConfigDict:
  c = tiny_cpu.get_config()
  c.model.family = "llama"  # Mistral is Llama with a sliding attention window.
  c.model.variant = "mistral"  # Exported as MistralForCausalLM.
  c.model.sliding_window = 16  # Each query sees its last 16 positions (half the context).
  c.model.n_kv_head = 1  # Grouped-query attention.
  c.model.tie_embeddings = False  # Mistral's output head is its own.
  return c
