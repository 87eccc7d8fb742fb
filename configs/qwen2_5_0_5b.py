"""Qwen2.5-0.5B's shape (Qwen Team 2024): 24 layers, 896 wide, 14 query heads sharing 2 key/value
heads of 64, SwiGLU of 4864, biases on q/k/v, tied head, rotary base 10^6: 494,032,768
parameters with its 151,936-row vocabulary (the model card's 0.49B, 0.36B without embeddings).

For continued pretraining from the checkpoint: `jaxdp prepare --tokenizer DIR/tokenizer.json`
(Qwen's 151,665 ids, padded here to the checkpoint's 151,936 rows) and
`--config.init_from=hf:DIR`; `jaxdp export` writes it back as Qwen2ForCausalLM.
"""

import ml_collections

from jaxdp.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.seq_len = 2048  # Context trained on (the checkpoint's rotary positions reach 32768).
  c.precision = "bf16"  # bf16 compute with fp32 master weights.
  c.model.family = "llama"  # Qwen2 is Llama with q/k/v biases.
  c.model.variant = "qwen2"  # Imported from and exported as Qwen2ForCausalLM.
  c.model.qkv_bias = True  # Biases on the q, k and v projections.
  c.model.n_layer = 24  # num_hidden_layers.
  c.model.d_model = 896  # hidden_size.
  c.model.n_head = 14  # num_attention_heads (head size 896 / 14 = 64).
  c.model.n_kv_head = 2  # num_key_value_heads.
  c.model.mlp_ratio = 4864 * 1.5 / 896  # SwiGLU width (2/3 of ratio x d_model) = intermediate_size 4864.
  c.model.tie_embeddings = True  # tie_word_embeddings.
  c.model.rope_theta = 1000000.0  # rope_theta.
  c.model.norm_eps = 1e-6  # rms_norm_eps.
  c.model.pad_vocab_to_multiple = 151936  # The checkpoint's vocab_size: any tokenizer up to it pads to it.
  return c
