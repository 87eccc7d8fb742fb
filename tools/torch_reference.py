"""A PyTorch reference of jaxdp's built-in GPT, for `tools/bench.py --compare torch`.

The same model and training rule as `jaxdp.models.gpt` with jaxdp's AdamW, written in plain
PyTorch so that the benchmark can time both on the same CPU threads (or the same GPU):

  model      pre-norm blocks: x + attn(LN1(x)), x + mlp(LN2(x)); LayerNorm eps 1e-6 (flax's
             default, jaxdp's gpt default); fused q/k/v projection with bias; rotary positions
             (Su et al. 2021) on the two halves of each head (jaxdp's `rotary`, not interleaved);
             causal softmax attention (torch's scaled_dot_product_attention); GELU with the tanh
             approximation (flax's `nn.gelu` default); final LayerNorm; output head tied to the
             token embedding.
  init       N(0, 0.02) for every kernel and the embedding, zero biases, unit LayerNorm scales
             (jaxdp's `models.common.init`).
  optimizer  AdamW (Loshchilov & Hutter 2019; b1, b2, eps 1e-8) with decoupled weight decay
             multiplied by the scheduled rate on matrices and the embedding only (not biases or
             LayerNorm parameters: jaxdp's decay mask), global-norm gradient clipping, and
             jaxdp's schedule: update i < warmup uses peak * (i + 1) / warmup, then cosine to
             min_lr_ratio * peak at decay_steps (`jaxdp.core.optimizer.learning_rate_schedule`).
  loss       token-weighted mean cross entropy over the global batch.

Parameters are stored in PyTorch's [out, in] layout; `load_jaxdp_params` copies a jaxdp
parameter tree in (tests/test_bench.py checks the parameter count and the loss at initialisation
against jaxdp's on the same weights). Shapes: B batch, T sequence, D d_model, H heads, K head
size (D / H), F MLP hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class GPTShape:
  """The fields of jaxdp's ModelConfig that the reference implements (gpt family, rope)."""
  vocab_size: int
  seq_len: int
  n_layer: int
  n_head: int
  d_model: int
  mlp_ratio: float = 4
  rope_theta: float = 10000.0
  eps: float = 1e-6

  @classmethod
  def of(cls, cfg: Any) -> GPTShape:
    """The reference's shape of a jaxdp `ModelConfig`.

    Raises:
      ValueError: a field the reference does not implement (family other than gpt, learned
        positions, dropout, padded vocabulary, untied head).
    """
    unsupported = {"family": cfg.family != "gpt", "positions": cfg.positions != "rope",
                   "dropout": cfg.dropout != 0, "tie_embeddings": not cfg.tie_embeddings,
                   "valid_vocab_size": bool(cfg.valid_vocab_size) and cfg.valid_vocab_size != cfg.vocab_size}
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
      raise ValueError(f"the PyTorch reference implements gpt with rope, no dropout, a tied head "
                       f"and no vocabulary padding; this model sets {', '.join(bad)}")
    return cls(cfg.vocab_size, cfg.seq_len, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.mlp_ratio,
               cfg.rope_theta, cfg.eps)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
  """Rotary position embedding of x [B, H, T, K] at positions 0..T-1, halves rotated as pairs."""
  t, k = x.shape[-2], x.shape[-1]
  freq = 1.0 / (theta ** (torch.arange(0, k, 2, dtype=torch.float32, device=x.device) / k))  # [K/2]
  angle = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * freq  # [T, K/2]
  sin, cos = angle.sin(), angle.cos()
  x1, x2 = x.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Block(nn.Module):
  """One pre-norm Transformer block."""

  def __init__(self, shape: GPTShape):
    super().__init__()
    d, f = shape.d_model, int(shape.mlp_ratio * shape.d_model)
    self.shape = shape
    self.ln1 = nn.LayerNorm(d, eps=shape.eps)
    self.qkv = nn.Linear(d, 3 * d)  # out index = (q/k/v, head, k) flattened, jaxdp's [D, 3, H, K].
    self.proj = nn.Linear(d, d)
    self.ln2 = nn.LayerNorm(d, eps=shape.eps)
    self.fc = nn.Linear(d, f)
    self.out = nn.Linear(f, d)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    h = self.shape.n_head
    q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # [B, H, T, K] each
    q, k = rotary(q, self.shape.rope_theta), rotary(k, self.shape.rope_theta)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, K]
    x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
    return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
  """tokens [B, T] int64 -> logits [B, T, V] float32."""

  def __init__(self, shape: GPTShape):
    super().__init__()
    self.shape = shape
    self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
    self.blocks = nn.ModuleList([Block(shape) for _ in range(shape.n_layer)])
    self.ln_f = nn.LayerNorm(shape.d_model, eps=shape.eps)
    self.reset_parameters()

  def reset_parameters(self) -> None:
    """jaxdp's initialisation: N(0, 0.02) kernels and embedding, zero biases, unit scales."""
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
      if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
        nn.init.zeros_(module.bias)
      if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    x = self.wte(tokens)  # [B, T, D]
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x) @ self.wte.weight.T  # [B, T, V], tied to the input embedding


def loss_sums(model: Callable[[torch.Tensor], torch.Tensor],
              batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
  """(sum of token losses, sum of token weights) of `batch` ("inputs", "targets" [B, T],
  "weights" [B, T]) under `model` (a GPT, or its torch.compile'd forward): jaxdp's loss_fn form."""
  logits = model(batch["inputs"])
  losses = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="none")
  weights = batch["weights"].flatten()
  return (losses * weights).sum(), weights.sum()


def loss_fn(model: Callable[[torch.Tensor], torch.Tensor],
            batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
  """Token-weighted mean cross entropy of `batch` (see `loss_sums`)."""
  total, weight = loss_sums(model, batch)
  return total / weight


def load_jaxdp_params(model: GPT, params: Mapping[str, Any]) -> None:
  """Copies jaxdp gpt parameters (an unboxed tree of arrays, e.g. `flax.core.meta.unbox` of the
  state's params) into `model` in place.

  Raises:
    KeyError/ValueError: a tree that is not a jaxdp gpt of `model`'s shape.
  """
  def put(target: torch.Tensor, value: Any) -> None:
    value = torch.from_numpy(np.asarray(value, dtype=np.float32).copy())
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
    with torch.no_grad():
      target.copy_(value.to(target.device))

  d = model.shape.d_model
  put(model.wte.weight, params["wte"]["embedding"])
  for i, block in enumerate(model.blocks):
    p = params[f"block_{i}"]
    put(block.ln1.weight, p["ln1"]["scale"])
    put(block.ln1.bias, p["ln1"]["bias"])
    put(block.ln2.weight, p["ln2"]["scale"])
    put(block.ln2.bias, p["ln2"]["bias"])
    put(block.qkv.weight, np.asarray(p["attn"]["qkv"]["kernel"]).reshape(d, 3 * d).T)
    put(block.qkv.bias, np.asarray(p["attn"]["qkv"]["bias"]).reshape(3 * d))
    put(block.proj.weight, np.asarray(p["attn"]["proj"]["kernel"]).reshape(d, d).T)
    put(block.proj.bias, p["attn"]["proj"]["bias"])
    put(block.fc.weight, p["mlp"]["fc"]["kernel"])  # jaxdp's Linear is [out, in] already.
    put(block.fc.bias, p["mlp"]["fc"]["bias"])
    put(block.out.weight, p["mlp"]["proj"]["kernel"])
    put(block.out.bias, p["mlp"]["proj"]["bias"])
  put(model.ln_f.weight, params["ln_f"]["scale"])
  put(model.ln_f.bias, params["ln_f"]["bias"])


def jaxdp_schedule(peak: float, warmup_steps: int, decay_steps: int, min_lr_ratio: float):
  """Factor of the peak rate for update i (0-based): jaxdp's warmup then cosine decay."""
  def factor(i: int) -> float:
    if i < warmup_steps:
      return (i + 1.0) / max(warmup_steps, 1)
    length = decay_steps - warmup_steps
    t = min(max((i - warmup_steps) / length, 0.0), 1.0) if length > 0 else 1.0
    return (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)) + min_lr_ratio
  return factor


def make_optimizer(model: GPT, *, learning_rate: float, weight_decay: float, b1: float, b2: float,
                   warmup_steps: int, decay_steps: int, min_lr_ratio: float):
  """(AdamW, LambdaLR) with jaxdp's decay mask (matrices and embedding) and schedule."""
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  fused = next(model.parameters()).is_cuda
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=learning_rate, betas=(b1, b2), eps=1e-8, fused=fused)
  schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, jaxdp_schedule(learning_rate, warmup_steps, decay_steps, min_lr_ratio))
  return optimizer, schedule


def param_count(model: nn.Module) -> int:
  """Parameters of `model` (the tied head counted once)."""
  return sum(p.numel() for p in model.parameters())
