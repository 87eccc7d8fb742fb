"""Which global batch size and device count reach a loss soonest: `jaxdp plan --advise`.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv:1812.06162): training
to a fixed loss with batch B takes S steps and E = S * B examples, with

    S = S_min * (1 + B_noise / B)        E = E_min * (1 + B / B_noise)        E_min = S_min * B_noise

where B_noise is the gradient noise scale at that loss; its "simple" estimate B_simple =
tr(Sigma) / |G|^2 is what a jaxdp run logs as `grad_noise_scale_examples` (rows). One finished
run at batch B0 that reached the target in S0 steps fixes S_min = S0 / (1 + B_noise / B0); the
relations then predict the steps and examples of any other batch. Beside them, `jaxdp plan
--measure`'s predicted step time per strategy and device count (compute scaled by the batch,
communication as measured) turns steps into wall-clock seconds.

The paper's relations assume the learning rate is tuned for each batch size; a sweep that keeps
one learning rate (tools/batch_sweep.py) measures how far that assumption carries here, and
docs/benchmarks.md reports the prediction error against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import statistics
from typing import Any

from jaxdp.errors import JaxdpError


@dataclasses.dataclass(frozen=True)
class NoiseFit:
  """The empirical model of one target loss, fitted to one run.

  Attributes:
    target: the evaluation loss (nats/token) the fit is for.
    reference_batch: the run's global batch, in rows (sequences).
    reference_steps: the first step at whose evaluation the run's loss was <= target.
    b_noise: the gradient noise scale near the target, in rows: the mean of the run's logged
      `grad_noise_scale_examples` over the last quarter of the steps to the target (the noise
      scale grows as the loss falls, and the relations use its value at the target; the logged
      value is already a moving average, and the quarter averages out its remaining noise).
    s_min: the fewest steps any batch size could need (the large-batch limit).
    e_min: the fewest examples any batch size could need (the small-batch limit).
  """
  target: float
  reference_batch: int
  reference_steps: int
  b_noise: float
  s_min: float
  e_min: float

  def steps(self, batch: float) -> float:
    """Predicted optimizer steps to the target with global batch `batch` (rows)."""
    return self.s_min * (1.0 + self.b_noise / batch)

  def examples(self, batch: float) -> float:
    """Predicted examples (rows) to the target with global batch `batch`."""
    return self.e_min * (1.0 + batch / self.b_noise)


def fit_noise_model(records: Iterable[dict[str, Any]], batch: int, target: float | None = None
                    ) -> NoiseFit:
  """Fits S_min and B_noise to a run's metrics.jsonl records.

  Args:
    records: the run's metrics records (`jaxdp.runtime.metrics.read_metrics`).
    batch: the run's global batch, in rows.
    target: evaluation loss to fit for; None takes the run's last evaluation loss.

  Raises:
    JaxdpError: the run has no evaluation, never reached `target`, or logged no noise scale
      (one data-parallel device, or an exchange that never forms the dense mean gradient).
  """
  records = list(records)
  evals = [(r["step"], r["eval_loss"]) for r in records
           if isinstance(r.get("eval_loss"), (int, float)) and "step" in r]
  if not evals:
    raise JaxdpError("the run logged no evaluation loss: train it with --config.eval_every > 0 "
                     "(the advisor needs the steps it took to reach a loss)")
  target = evals[-1][1] if target is None else target
  reached = next((step for step, loss in evals if loss <= target), None)
  if reached is None:
    raise JaxdpError(f"--target={target:g} was never reached: the run's lowest evaluation loss is "
                     f"{min(loss for _, loss in evals):.4f}; give a --target at or above it")
  if reached <= 0:
    raise JaxdpError(f"--target={target:g} is met before training (step {reached}): give a lower "
                     "--target")
  noise = [r["grad_noise_scale_examples"] for r in records
           if 0.75 * reached <= r.get("step", -1) <= reached
           and isinstance(r.get("grad_noise_scale_examples"), (int, float))]
  if not noise:
    noise = [r["grad_noise_scale_examples"] for r in records
             if r.get("step", 1 << 62) <= reached
             and isinstance(r.get("grad_noise_scale_examples"), (int, float))]
  if not noise:
    raise JaxdpError("the run logged no grad_noise_scale_examples before reaching the target: "
                     "train the reference run data-parallel on 2 or more devices with the dense "
                     "exchange (or with --config.grad_accum_steps >= 2), logging at least every "
                     "few steps (--config.log_every)")
  b_noise = statistics.fmean(noise)
  if not b_noise > 0:
    raise JaxdpError(f"the run's noise scale near the target is {b_noise:g} rows, not positive: "
                     "log more steps before the target (--config.log_every) or choose a lower "
                     "--target")
  s_min = reached / (1.0 + b_noise / batch)
  return NoiseFit(target=target, reference_batch=batch, reference_steps=reached,
                  b_noise=b_noise, s_min=s_min, e_min=s_min * b_noise)


@dataclasses.dataclass(frozen=True)
class StepTime:
  """One measured candidate of `jaxdp plan --measure` at the reference batch.

  Attributes:
    strategy: dp, zero1, zero2 or zero3.
    devices: data-parallel devices it ran on.
    compute_s: predicted compute seconds per step at the reference batch.
    comm_s: predicted communication seconds per step (independent of the batch: the exchanged
      gradients and parameters do not grow with it).
    measured_s: the step's measured seconds, beside the prediction.
  """
  strategy: str
  devices: int
  compute_s: float
  comm_s: float
  measured_s: float

  def seconds(self, batch: int, reference_batch: int) -> float:
    """Predicted seconds per step at global batch `batch`: compute scales with the rows each
    device computes, communication does not."""
    return self.compute_s * batch / reference_batch + self.comm_s


def candidate_batches(reference_batch: int, device_counts: Sequence[int]) -> list[int]:
  """The reference batch times 1/4 ... 4, kept where some device count divides it."""
  out = []
  for factor in (0.25, 0.5, 1, 2, 4):
    b = int(reference_batch * factor)
    if b >= 1 and b == reference_batch * factor and any(b % n == 0 for n in device_counts):
      out.append(b)
  return out


def advise(fit: NoiseFit, step_times: Sequence[StepTime], batches: Sequence[int],
           seq_len: int) -> dict[str, Any]:
  """Predicted steps, tokens and wall-clock seconds to `fit.target` per (batch, device count,
  strategy), and the recommendation: the fewest predicted seconds.

  Args:
    fit: the noise model (`fit_noise_model`).
    step_times: measured candidates at the reference batch, one per (strategy, device count).
    batches: candidate global batches in rows; a pair whose device count does not divide the
      batch is left out.
    seq_len: tokens per row.

  Returns:
    {"fit": NoiseFit as a dict, "rows": [...sorted by seconds], "recommendation": {...}}.

  Raises:
    JaxdpError: no candidate batch is divisible by any measured device count.
  """
  rows: list[dict[str, Any]] = []
  for batch in batches:
    for t in step_times:
      if batch % t.devices:
        continue
      steps = fit.steps(batch)
      step_s = t.seconds(batch, fit.reference_batch)
      rows.append({"global_batch": batch, "devices": t.devices, "strategy": t.strategy,
                   "steps": steps, "examples": fit.examples(batch),
                   "tokens": fit.examples(batch) * seq_len, "step_s": step_s,
                   "seconds": steps * step_s})
  if not rows:
    raise JaxdpError(f"no candidate --batches ({', '.join(map(str, batches))}) is divisible by a "
                     f"device count measured ({sorted({t.devices for t in step_times})}): give "
                     "batches that are multiples of the device count")
  rows.sort(key=lambda r: (r["seconds"], r["devices"]))
  best = rows[0]
  reason = (f"global batch {best['global_batch']} on {best['devices']} device(s) with "
            f"{best['strategy']} is predicted to reach eval loss {fit.target:.4f} in "
            f"{best['seconds']:.1f} s ({best['steps']:.0f} steps of {best['step_s'] * 1e3:.2f} ms)")
  if best["global_batch"] > 2 * fit.b_noise:
    reason += (f"; it is above twice the noise scale ({fit.b_noise:.1f} rows), so it spends more "
               "examples than a smaller batch would (worth it only while steps are cheap)")
  return {"fit": dataclasses.asdict(fit), "rows": rows,
          "recommendation": {**best, "reason": reason}}


def step_times_from_measure(measured: dict[str, Any]) -> list[StepTime]:
  """`StepTime`s of the dense strategies in a `measure_plan` result (compressed and local
  methods change the optimisation, so the noise model does not carry to them)."""
  data = measured["mesh"].get("data", 1) * measured["mesh"].get("replica", 1)
  return [StepTime(strategy=r["candidate"], devices=data, compute_s=r["compute_s"],
                   comm_s=r["comm_s"], measured_s=r["measured_s"])
          for r in measured["candidates"] if not r["candidate"].startswith("dp + ")]


def measure_device_counts(measure: Callable[[int], dict[str, Any]], device_counts: Sequence[int],
                          say: Callable[[str], None] = lambda line: None) -> list[StepTime]:
  """Runs `measure(n)` (a `measure_plan` on the first n devices) per device count."""
  out: list[StepTime] = []
  for i, n in enumerate(device_counts):
    say(f"measuring step times on {n} device(s) ({i + 1}/{len(device_counts)})")
    out += step_times_from_measure(measure(n))
  return out


def format_advice(result: dict[str, Any]) -> str:
  """The `jaxdp plan --advise` table: per (global batch, device count) its fastest strategy,
  fastest first, then the advice (the JSON form keeps every strategy)."""
  fit = result["fit"]
  seen: set[tuple[int, int]] = set()
  best_rows = []
  for r in result["rows"]:  # Sorted by seconds: the first of each pair is its fastest.
    if (r["global_batch"], r["devices"]) not in seen:
      seen.add((r["global_batch"], r["devices"]))
      best_rows.append(r)
  lines = [f"noise model (McCandlish et al. 2018) for eval loss {fit['target']:.4f}: the run at "
           f"global batch {fit['reference_batch']} reached it at step {fit['reference_steps']}; "
           f"B_noise {fit['b_noise']:.1f} rows, S_min {fit['s_min']:.0f} steps, E_min "
           f"{fit['e_min']:,.0f} rows",
           f"{'global batch':>12}{'devices':>9}{'strategy':>10}{'steps':>9}{'tokens':>12}"
           f"{'step':>11}{'to target':>12}"]
  for r in best_rows:
    lines.append(f"{r['global_batch']:>12}{r['devices']:>9}{r['strategy']:>10}{r['steps']:>9.0f}"
                 f"{r['tokens']:>12,.0f}{r['step_s'] * 1e3:>9.2f}ms{r['seconds']:>11.1f}s")
  lines.append(f"recommended: {result['recommendation']['reason']}")
  return "\n".join(lines)
