"""GPT-2 small sizing (12 layers, 12 heads, 768 wide, 1024 context) for accelerator runs.

With the byte tokenizer (256 ids) this is 86.0M parameters, not GPT-2's 124M: GPT-2 spends 38.6M
of its 124M on a 50257 x 768 BPE embedding, which a byte vocabulary does not need. The 85.0M
transformer blocks are GPT-2 small's exactly; the step FLOPs per token (6N + 12 L T D) are
therefore ~0.63 GFLOP instead of GPT-2's ~0.86 GFLOP. bf16 compute, fp32 master weights.
"""

import ml_collections

from jaxdp.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_steps = 5000  # A short accelerator run; raise it for a full training.
  c.global_batch_size = 64  # Sequences per step: 64 x 1024 = 65k tokens.
  c.seq_len = 1024  # GPT-2's context.
  c.learning_rate = 6e-4  # GPT-2 small's peak learning rate.
  c.warmup_steps = 200  # Warm up over the first 4% of the run.
  c.log_every = 20  # Fetch metrics every 20 steps.
  c.eval_every = 500  # Evaluate every 500 steps.
  c.eval_steps = 16  # Evaluate the first 16 x 64 validation windows, each once.
  c.checkpoint_every = 1000  # Checkpoint every 1000 steps.
  c.precision = "bf16"  # bf16 compute with fp32 master weights (accelerators have bf16 matmul units).
  c.remat = "block"  # Keep matmul outputs, recompute the rest: fits 1024 context at this batch.
  c.model.n_layer = 12  # GPT-2 small depth.
  c.model.n_head = 12  # GPT-2 small heads.
  c.model.d_model = 768  # GPT-2 small width.
  c.model.positions = "learned"  # GPT-2 uses learned absolute positions.
  return c
