"""tools/bench.py in --quick mode on the tiny config: the report has every key, and the values
are finite and positive (timings themselves are never asserted)."""

import importlib.util
import math
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "bench.py")


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench", BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quick_bench_reports_every_key_finite_and_positive(bench, tmp_path):
  # One block: every key and every strategy of the report, half tiny_cpu's compiling.
  args, overrides = bench.parse_args(["--config", "tiny_cpu", "--quick", "--steps", "1",
                                      "--config.log_every=1", "--skip", "comm,memory",
                                      "--config.model.n_layer=1"])
  report = bench.run(args, overrides)
  for key in ("tokens_per_sec", "measured_peak_flops", "mfu", "loader_headroom", "compile_time_s",
              "flops_per_token_hlo", "flops_per_token_formula"):
    assert math.isfinite(report[key]) and report[key] > 0, key
  assert math.isfinite(report["overhead_vs_bare_loop"]) and report["overhead_vs_bare_loop"] > -1
  # The peak is the best of every matmul timed in the run (sizes, device groups, rounds).
  assert report["measured_peak_flops"] == max(max(v) for v in report["measured_peak_flops_rounds"].values())
  assert report["step_devices"] == min(os.cpu_count(), 8)
  scaling = report["scaling"]
  assert scaling["devices"] == [1, 2]
  for kind in ("weak", "strong"):
    for n in ("1", "2"):
      assert scaling[kind][n]["tokens_per_sec"] > 0 and scaling[kind][n]["efficiency"] > 0
  strategies = report["strategies"]["results"]
  assert set(strategies) == {"dp", "zero1", "zero2", "zero3"}
  for entry in strategies.values():
    assert entry["tokens_per_sec"] > 0 and entry["comm_bytes_per_step"] > 0
    assert entry["temp_bytes"] > 0 and entry["argument_bytes"] > 0
  # ZeRO-1 keeps 1/N of the optimizer state per device: less argument memory than dp.
  assert strategies["zero1"]["argument_bytes"] < strategies["dp"]["argument_bytes"]
  print(bench.table(report))


def test_bench_rejects_unknown_config_field(bench):
  from jaxdp.errors import JaxdpError
  from jaxdp.lm.config import load_preset
  with pytest.raises(JaxdpError, match="unknown config field 'model.widht'"):
    bench.apply_overrides(load_preset("tiny_cpu"), {"model.widht": "3"})


def test_bench_rejects_devices_that_do_not_divide_the_batch(bench):
  from jaxdp.errors import JaxdpError
  args, overrides = bench.parse_args(["--config", "tiny_cpu", "--quick", "--devices", "3"])
  with pytest.raises(JaxdpError, match="--devices 3: .*dividing global_batch_size"):
    bench.run(args, overrides)


def test_batch_sweep_times_the_first_evaluation_at_or_below_each_threshold():
  spec = importlib.util.spec_from_file_location(
      "batch_sweep", os.path.join(os.path.dirname(BENCH), "batch_sweep.py"))
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  records = [{"step": 10, "train_loss": 3.0, "tokens_per_sec": 5.0},  # Holds compile: ignored.
             {"step": 20, "train_loss": 2.6, "tokens_per_sec": 100.0},
             {"step": 20, "eval_loss": 2.6},
             {"step": 30, "train_loss": 2.4, "tokens_per_sec": 300.0},
             {"step": 40, "train_loss": 2.2, "tokens_per_sec": 200.0},
             {"step": 40, "eval_loss": 2.25}]
  result = sweep.summarize(records, tokens_per_step=50, thresholds=[2.6, 2.3, 2.0])
  assert result["tokens_per_sec"] == 200.0  # Median of 100, 300, 200.
  assert result["reached"]["2.6"] == {"step": 20, "seconds": 5.0}  # 20 steps x 50 tokens / 200.
  assert result["reached"]["2.3"] == {"step": 40, "seconds": 10.0}
  assert result["reached"]["2.0"] is None and result["final_eval_loss"] == 2.25
  table = sweep.markdown({16: result}, [2.6, 2.3, 2.0])
  assert "| 16 | 200 | step 20, 5.0 s | step 40, 10.0 s | not reached | 2.250 |" in table


def test_datasheet_peak_matches_gpu_names_and_is_absent_on_cpu(bench):
  import jax.numpy as jnp
  assert bench.datasheet_peak_flops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989.4e12
  assert bench.datasheet_peak_flops("NVIDIA H100 PCIe", jnp.bfloat16) == 756e12
  assert bench.datasheet_peak_flops("NVIDIA A100-SXM4-80GB", jnp.float32) == 156e12
  assert bench.datasheet_peak_flops("NVIDIA L40S", jnp.bfloat16) == 362e12  # Not "L4"'s 121e12.
  assert bench.datasheet_peak_flops("cpu", jnp.float32) is None


@pytest.mark.slow  # Compiles the prefill, decode and window steps of a tiny model.
def test_generate_mode_reports_cached_and_uncached_speeds(bench):
  args, overrides = bench.parse_args(["--config", "tiny_cpu", "--generate", "8", "--prompt_len",
                                      "4", "--quick", "--config.seq_len=16"])
  report = bench.run_generate(args, overrides)
  for key in ("tokens_per_sec_cached", "tokens_per_sec_uncached", "speedup"):
    assert math.isfinite(report[key]) and report[key] > 0, key
  assert report["greedy_outputs_identical"] is True
  assert (report["new_tokens"], report["prompt_tokens"], report["seq_len"]) == (8, 4, 16)
  too_long, overrides = bench.parse_args(["--config", "tiny_cpu", "--generate", "20"])
  with pytest.raises(Exception, match="exceed seq_len 32"):
    bench.run_generate(too_long, overrides)


def test_compare_torch_reports_both_sides_on_the_same_run(bench, tmp_path):
  """--compare torch trains the same model on the same batches with jaxdp and the PyTorch
  reference: both sides' keys are present, their losses agree (same weights, data, AdamW), and
  the ratios are computed from the two sides' own numbers."""
  out = tmp_path / "compare.json"
  assert bench.main(["--compare", "torch", "--steps", "4", "--round_steps", "2",
                     "--compare_eval_every", "2", "--devices", "2", "--config.model.n_layer=1",
                     "--config.model.d_model=32", "--config.model.n_head=2", "--config.seq_len=16",
                     "--config.warmup_steps=2", "--out", str(out)]) == 0
  import json
  report = json.loads(out.read_text())
  compare = report["compare_torch"]
  for side in ("jaxdp", "torch"):
    assert compare[side]["tokens_per_sec"] > 0
    assert [e["step"] for e in compare[side]["eval"]] == [2, 4]
  assert report["ratio_vs_torch"] == compare["jaxdp"]["tokens_per_sec"] / compare["torch"]["tokens_per_sec"]
  assert abs(compare["loss_difference_at_end"]) < 1e-4 * compare["torch"]["train_loss_at_end"]
  for a, b in zip(compare["jaxdp"]["eval"], compare["torch"]["eval"]):
    assert abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"]
  # The default target is the higher final eval loss, which both sides reach at step 4.
  assert compare["target_loss"] == max(compare[s]["eval"][-1]["loss"] for s in ("jaxdp", "torch"))
  assert compare["torch"]["tokens_to_target"] == compare["jaxdp"]["tokens_to_target"] == 4 * 12 * 16
  assert report["time_to_target_ratio_vs_torch"] == (compare["torch"]["time_to_target_s"]
                                                     / compare["jaxdp"]["time_to_target_s"])


def test_compare_torch_refuses_a_model_the_reference_does_not_implement(bench):
  from jaxdp.errors import JaxdpError
  args, overrides = bench.parse_args(["--compare", "torch", "--steps", "2",
                                      "--config.model.positions=learned"])
  with pytest.raises(JaxdpError, match="--compare torch: .*positions"):
    bench.run_compare(args, overrides)


def test_profile_categories_name_each_kernel_of_a_compiled_program():
  """Each instruction of a compiled program gets the category of what it computes: a fusion
  holding a dot is a matmul, a sum a reduction, tanh elementwise, the psum a collective."""
  import sys
  sys.path.insert(0, os.path.dirname(BENCH))
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import profile_step

  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])

  def local(x, w):
    h = jnp.tanh(x @ w)  # [4, 8]
    return jax.lax.psum(jnp.sum(h, axis=1), "data")  # [4]

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))
  x = jax.device_put(jnp.ones((8, 8)), jax.NamedSharding(mesh, P("data")))
  w = jax.device_put(jnp.ones((8, 8)), jax.NamedSharding(mesh, P()))
  text = f.lower(x, w).compile().as_text()
  kinds = profile_step.categories(text)
  entry = text[text.index("ENTRY"):]
  top = [line.split("=")[0].strip().removeprefix("ROOT ").lstrip("%")
         for line in entry.splitlines()[1:] if " = " in line]
  found = {kinds[name] for name in top}
  assert {"matmul", "collective", "reduction"} <= found, {n: kinds[n] for n in top}
  assert all(kinds[n] == "collective" for n in top if "all-reduce" in n)
  assert all(kinds[n] != "matmul" for n in top if n.startswith(("param", "constant")))


def test_profile_reports_both_sides_with_every_traced_kernel_categorised(bench, tmp_path):
  """--profile traces jaxdp's step (jax.profiler) and the reference's (torch.profiler): every
  kernel in jaxdp's trace is an instruction of the compiled step (nothing uncategorised), each
  side's shares sum to 1, and the step runs at least its forward and weight-gradient matmuls
  (two per dot of the forward: 6 per block and the tied head)."""
  out = tmp_path / "profile.json"
  assert bench.main(["--profile", "--steps", "2", "--devices", "2", "--config.model.n_layer=1",
                     "--config.model.d_model=32", "--config.model.n_head=2",
                     "--config.seq_len=16", "--out", str(out)]) == 0
  import json
  report = json.loads(out.read_text())
  assert report["jaxdp"]["uncategorised_ms_per_step"] == 0.0
  assert report["jaxdp"]["devices"] == 2
  for side in ("jaxdp", "torch"):
    cats = report[side]["categories"]
    assert abs(sum(c["share"] for c in cats.values()) - 1.0) < 1e-9, cats
    assert cats["matmul"]["ms_per_step"] > 0 and report[side]["untraced_step_ms"] > 0
  assert report["jaxdp"]["categories"]["matmul"]["kernels_per_step"] >= 2 * (6 * 1 + 1)
  assert report["jaxdp"]["categories"]["collective"]["kernels_per_step"] >= 1  # The gradient all-reduce.
