"""GPT-2 small, 124M parameters (Radford et al. 2019), with the hyperparameters of the GPT-2
reproductions (nanoGPT, llm.c): AdamW b2 0.95, peak lr 6e-4 after 715 warmup steps, cosine to
6e-5, weight decay 0.1, gradient clipping at 1.0, ~0.5M tokens per step (512 x 1024) through
gradient accumulation, bf16 compute with fp32 master weights.

12 layers, 12 heads, 768 wide, 1024 context, learned positions, tied head. The vocabulary is the
tokenizer's padded to a multiple of 64 (GPT-2's 50257 -> 50304, which the matmul units prefer):
with a 50257-id tokenizer, e.g. data from `jaxdp prepare ... --tokenizer bpe --vocab_size 50257`,
this is 124,475,904 parameters. On the built-in byte corpus (256 ids) it is 86.0M parameters;
`--config.model.pad_vocab_to_multiple=50304` then gives GPT-2's exact shapes and FLOPs (the padding
ids are masked out of the loss), which is how tools/gpu_check.py benchmarks it.

Memory: 32 sequences per device per micro-batch (grad_accum_steps 16 on one device). On a GPU use
`--config.attention=cudnn` (fused attention: no 1024 x 1024 score matrices kept); on 8 devices
set grad_accum_steps=2 for the same 0.5M tokens per step.
"""

import ml_collections

from jaxdp.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_steps = 19073  # 10B tokens at 524,288 tokens per step, as the GPT-2 reproductions train.
  c.global_batch_size = 512  # Sequences per step: 512 x 1024 = 524,288 tokens.
  c.grad_accum_steps = 16  # 32 sequences per micro-batch on one device.
  c.seq_len = 1024  # GPT-2's context.
  c.learning_rate = 6e-4  # GPT-2 small's peak learning rate.
  c.min_lr_ratio = 0.1  # Cosine down to 6e-5.
  c.warmup_steps = 715  # 375M tokens of warmup, as in GPT-3's recipe.
  c.weight_decay = 0.1  # Decoupled, on weight matrices and embeddings.
  c.b1 = 0.9  # Adam first moment.
  c.b2 = 0.95  # Adam second moment: the GPT-2/3 reproductions' value.
  c.grad_clip = 1.0  # Global-norm clipping.
  c.log_every = 10  # A metrics line every 10 steps (~5M tokens).
  c.eval_every = 250  # Evaluate every 250 steps.
  c.eval_steps = 20  # Evaluate the first 20 x 512 validation windows, each once.
  c.checkpoint_every = 1000  # Checkpoint every 1000 steps.
  c.precision = "bf16"  # bf16 compute with fp32 master weights.
  c.remat = "none"  # No recomputation: fits at 32 sequences per micro-batch on a 40 GB+ GPU.
  c.model.n_layer = 12  # GPT-2 small depth.
  c.model.n_head = 12  # GPT-2 small heads.
  c.model.d_model = 768  # GPT-2 small width.
  c.model.positions = "learned"  # GPT-2's learned absolute positions.
  c.model.pad_vocab_to_multiple = 64  # 50257 -> 50304.
  return c
