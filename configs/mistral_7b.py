"""Mistral-7B-v0.1's shape (Jiang et al. 2023): 32 layers, 4096 wide, 32 query heads sharing 8
key/value heads, SwiGLU of 14336, a 4096-position sliding attention window, untied head: 7,241,732,096
parameters with its 32,000-row vocabulary (the hub's 7.24B). A shape for planning and for
continued pretraining from the checkpoint (`--config.init_from=hf:DIR`); `jaxdp export` writes it
back as MistralForCausalLM.
"""

import ml_collections

from jaxdp.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.seq_len = 4096  # The window's length: every query sees its whole context.
  c.precision = "bf16"  # bf16 compute with fp32 master weights.
  c.model.family = "llama"  # Mistral is Llama with a sliding attention window.
  c.model.variant = "mistral"  # Imported from and exported as MistralForCausalLM.
  c.model.sliding_window = 4096  # sliding_window.
  c.model.n_layer = 32  # num_hidden_layers.
  c.model.d_model = 4096  # hidden_size.
  c.model.n_head = 32  # num_attention_heads (head size 128).
  c.model.n_kv_head = 8  # num_key_value_heads.
  c.model.mlp_ratio = 5.25  # SwiGLU width (2/3 of ratio x d_model) = intermediate_size 14336.
  c.model.tie_embeddings = False  # tie_word_embeddings.
  c.model.rope_theta = 10000.0  # rope_theta.
  c.model.norm_eps = 1e-5  # rms_norm_eps.
  c.model.pad_vocab_to_multiple = 32000  # The checkpoint's vocab_size: any tokenizer up to it pads to it.
  return c
