"""A model small enough to compile and train in seconds on emulated CPU devices (tests, CI)."""

import ml_collections

from jaxdp.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.num_steps = 20  # A handful of steps: enough to see the loss move.
  c.global_batch_size = 16  # Divisible by 1, 2, 4, 8 devices and by 2 or 4 micro-batches.
  c.seq_len = 32  # Short context keeps compilation and steps fast.
  c.warmup_steps = 5  # Warm up over the first quarter of the run.
  c.log_every = 5  # Log often: the run is short.
  c.eval_every = 10  # Evaluate twice.
  c.eval_steps = 2  # Evaluate the first 2 x 16 validation windows, each once.
  c.checkpoint_every = 10  # Checkpoint twice.
  c.model.n_layer = 2  # Two blocks.
  c.model.n_head = 2  # Two heads.
  c.model.d_model = 32  # Narrow residual stream.
  return c
