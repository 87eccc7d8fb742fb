"""Qwen3-0.6B's shape (Qwen Team 2025): 28 layers, 1024 wide, 16 query heads sharing 8 key/value
heads of 128 (wider than 1024 / 16), RMSNorm on each head's q and k, SwiGLU of 3072, tied head,
rotary base 10^6: 596,049,920 parameters with its 151,936-row vocabulary (the model card's 0.6B,
0.44B without embeddings).

For continued pretraining from the checkpoint: `jaxdp prepare --tokenizer DIR/tokenizer.json`
and `--config.init_from=hf:DIR`; `jaxdp export` writes it back as Qwen3ForCausalLM.
"""

import ml_collections

from jaxdp.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.seq_len = 2048  # Context trained on (the checkpoint's rotary positions reach 40960).
  c.precision = "bf16"  # bf16 compute with fp32 master weights.
  c.model.family = "llama"  # Qwen3 is Llama with q/k norms and its own head size.
  c.model.variant = "qwen3"  # Imported from and exported as Qwen3ForCausalLM.
  c.model.qk_norm = True  # q_norm and k_norm.
  c.model.head_dim = 128  # head_dim.
  c.model.n_layer = 28  # num_hidden_layers.
  c.model.d_model = 1024  # hidden_size.
  c.model.n_head = 16  # num_attention_heads.
  c.model.n_kv_head = 8  # num_key_value_heads.
  c.model.mlp_ratio = 4.5  # SwiGLU width (2/3 of ratio x d_model) = intermediate_size 3072.
  c.model.tie_embeddings = True  # tie_word_embeddings.
  c.model.rope_theta = 1000000.0  # rope_theta.
  c.model.norm_eps = 1e-6  # rms_norm_eps.
  c.model.pad_vocab_to_multiple = 151936  # The checkpoint's vocab_size: any tokenizer up to it pads to it.
  return c
