"""The gpt2_124m preset: GPT-2 small's 124M parameters with the padded 50304 vocabulary (closed
form against the initialised tree's shapes, nothing materialised), the reproductions'
hyperparameters, and a few CPU steps at reduced depth and batch."""

import math

import jax
import pytest

from jaxdp import models
from jaxdp.core.tree import count_params
from jaxdp.lm import train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.lm.spec import model_config
from jaxdp.models import gpt
from jaxdp.runtime.metrics import read_metrics


def test_gpt2_124m_has_124m_parameters_with_the_padded_vocabulary():
  config = load_preset("gpt2_124m")
  cfg = model_config(config, 50257)  # GPT-2's BPE vocabulary
  assert (cfg.vocab_size, cfg.valid_vocab_size) == (50304, 50257)
  model = models.build(cfg)
  abstract = jax.eval_shape(model.init_fn, jax.random.PRNGKey(0))  # Shapes only: no 0.5 GB init.
  n = count_params(jax.tree.map(lambda x: getattr(x, "value", x), abstract,
                                is_leaf=lambda x: hasattr(x, "value")))
  assert n == gpt.param_count(cfg) == 124_475_904  # nanoGPT's 124.48M (wpe included)
  # The closed form, written out: tied 50304 x 768 embedding, 1024 x 768 positions, 12 blocks of
  # 12 D^2 + 13 D, and the final LayerNorm.
  d = 768
  assert n == 50304 * d + 1024 * d + 12 * (12 * d * d + 13 * d) + 2 * d


def test_gpt2_124m_uses_the_reproductions_hyperparameters():
  c = load_preset("gpt2_124m")
  assert (c.model.n_layer, c.model.n_head, c.model.d_model, c.seq_len) == (12, 12, 768, 1024)
  assert (c.optimizer, c.learning_rate, c.b1, c.b2, c.weight_decay, c.grad_clip) == (
      "adamw", 6e-4, 0.9, 0.95, 0.1, 1.0)
  assert c.precision == "bf16" and c.warmup_steps > 0 and c.model.positions == "learned"
  assert c.global_batch_size * c.seq_len == 524_288 and c.grad_accum_steps > 1


@pytest.mark.slow
def test_gpt2_124m_trains_a_few_steps_on_cpu(tmp_path):
  """The preset as it is (bf16, 768 wide, 12 heads, learned positions, padded vocab, AdamW b2
  0.95, accumulation), with 2 layers, 128 context and 4 sequences so that it runs in seconds."""
  c = load_preset("gpt2_124m")
  c.model.n_layer, c.seq_len, c.global_batch_size, c.grad_accum_steps = 2, 128, 4, 2
  c.num_steps, c.warmup_steps, c.log_every, c.eval_every, c.eval_steps = 4, 2, 1, 0, 1
  result = train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:2], progress=False)
  assert result["step"] == 4
  lines = [r for r in read_metrics(str(tmp_path)) if "train_loss" in r]
  losses = [r["train_loss"] for r in lines]
  assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
  assert all(0 < r["mfu"] < 1 for r in lines)
