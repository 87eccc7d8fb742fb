"""ZeRO stages 1-3 and the 2-D mesh: same numbers as dp and one device, state split as ZeRO says."""

import functools
import json

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from jaxdp import parallel
from jaxdp.analysis import plan, verify
from jaxdp.core import step as steps
from jaxdp.errors import JaxdpError
from jaxdp.lm import build, load_for_inference, train_and_evaluate
from jaxdp.lm.config import load_preset, validate

NUM_STEPS = 10
ZERO = ("zero1", "zero2", "zero3")
LOSS_RTOL = 1e-5


def as_in_runs(config):
  """tiny_cpu `config` with the model and schedule of `runs` (one block, no warmup, a horizon of
  20 steps): a run of it on a (strategy, mesh) that `runs` trained compiles the same step, which
  the persistent compilation cache serves once `runs` has compiled it."""
  config.model.n_layer, config.warmup_steps, config.lr_decay_steps = 1, 0, 20
  return config


@pytest.fixture(scope="module")
def runs():
  """(losses, final state, trainer) of 10 tiny_cpu steps per (case, device count), and the
  one-device reference; every test below reads these instead of compiling its own steps.
  One block: it holds every kind of array ZeRO splits, at half tiny_cpu's compiling."""
  config = as_in_runs(load_preset("tiny_cpu"))
  out = {"reference": verify.run_reference(config, jax.devices()[0], NUM_STEPS)}
  for n in (4, 8):
    for strategy in ("dp",) + ZERO:
      out[strategy, n] = verify.run_case(config, jax.devices()[:n], verify.Case(strategy, strategy),
                                         NUM_STEPS)
  out["zero3@2x2", 4] = verify.run_case(config, jax.devices()[:4],
                                        verify.Case("zero3@2x2", "zero3", data=2, model=2), NUM_STEPS)
  return out


def assert_same_run(run, expected):
  losses, state, _ = run
  expected_losses, expected_state, _ = expected
  np.testing.assert_allclose(losses, expected_losses, rtol=LOSS_RTOL)
  diff = verify.relative_differences(losses, state, expected_losses, expected_state)
  assert diff["params"] <= verify.DEFAULT_TOLERANCE["params"], diff


@pytest.mark.parametrize("num_devices", [4, 8])
@pytest.mark.parametrize("strategy", ZERO)
def test_zero_matches_dp_step_by_step_and_final_params(runs, strategy, num_devices):
  assert_same_run(runs[strategy, num_devices], runs["dp", num_devices])
  assert_same_run(runs[strategy, num_devices], runs["reference"])


def test_2x2_mesh_matches_dp_on_4_devices(runs):
  _, state, trainer = runs["zero3@2x2", 4]
  assert dict(trainer.mesh.shape) == {"data": 2, "model": 2}
  qkv = state.params["block_0"]["attn"]["qkv"]["kernel"]  # [D, 3, H, K]: heads over "model"
  assert qkv.sharding.spec[2] == "model" and "data" in qkv.sharding.spec
  assert_same_run(runs["zero3@2x2", 4], runs["dp", 4])


def per_device_bytes(tree, device) -> int:
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


@pytest.mark.parametrize("strategy,split", [("zero1", ("opt_state",)),
                                            ("zero2", ("opt_state",)),
                                            ("zero3", ("opt_state", "params"))])
def test_zero_state_per_device_is_one_nth_of_dp(runs, strategy, split):
  """From the shards of the trained states: 1/8 of dp's bytes, plus the arrays kept whole."""
  n = 8
  _, dp_state, _ = runs["dp", n]
  _, state, trainer = runs[strategy, n]
  device = jax.devices()[0]
  report = parallel.replicated_report(strategy, trainer.dp.layout, trainer.abstract_state())
  for part in ("params", "opt_state"):
    dp_bytes = per_device_bytes(getattr(dp_state, part), device)
    got = per_device_bytes(getattr(state, part), device)
    if part in split:
      kept = sum(r["bytes"] for r in report if r["array"].startswith(part))
      assert got == (dp_bytes - kept) // n + kept, (part, got, dp_bytes, kept)
      assert kept <= dp_bytes / 1000  # Only scalars (Adam's step counts) stay whole here.
    else:
      assert got == dp_bytes, part
  assert {r["why"] for r in report} == {"a scalar"}, report


@pytest.fixture(scope="module")
def default_plan():
  """`jaxdp plan` on the default config and 8 devices, in-process. One block (every kind of
  array the strategies split, a quarter of the default's compiling), the default widths."""
  config = load_preset("default")
  config.model.n_layer = 1
  return plan.plan(config, jax.devices()[:8])


def test_plan_reports_measured_bytes_per_strategy(default_plan):
  keys = {"params_bytes_per_device", "grads_bytes_per_device", "opt_state_bytes_per_device",
          "compiled_temp_bytes", "collective_bytes_per_step"}
  assert set(default_plan["strategies"]) == {"dp", "zero1", "zero2", "zero3"}
  for result in default_plan["strategies"].values():
    assert keys <= set(result)
    assert all(isinstance(result[k], int) and result[k] > 0 for k in keys)
  table = plan.format_table(default_plan)
  assert all(s in table for s in ("dp", "zero1", "zero2", "zero3", "paper"))


def test_plan_gradients_split_from_zero2_params_from_zero3(default_plan):
  r = default_plan["strategies"]
  dp = r["dp"]
  for name in ("zero1", "zero2", "zero3"):
    assert r[name]["opt_state_bytes_per_device"] < dp["opt_state_bytes_per_device"] / 7
  assert r["zero1"]["grads_bytes_per_device"] == dp["grads_bytes_per_device"]
  assert r["zero2"]["grads_bytes_per_device"] == dp["grads_bytes_per_device"] // 8
  assert r["zero2"]["params_bytes_per_device"] == dp["params_bytes_per_device"]
  assert r["zero3"]["params_bytes_per_device"] == dp["params_bytes_per_device"] // 8
  # Measured from the sharded arrays, they agree with the paper's formula (fp32 + Adam).
  for result in r.values():
    for key in ("params_bytes_per_device", "grads_bytes_per_device"):
      assert result[key] == result["paper"][key]


def test_zero1_compiled_step_holds_less_argument_memory_than_dp(default_plan):
  r = default_plan["strategies"]
  assert r["zero1"]["compiled_argument_bytes"] < r["dp"]["compiled_argument_bytes"]
  assert r["zero3"]["compiled_argument_bytes"] < r["zero1"]["compiled_argument_bytes"]


def test_plan_counts_collectives_from_hlo(default_plan):
  r = default_plan["strategies"]
  assert r["dp"]["collectives"].keys() == {"all-reduce"}  # One all-reduce of the gradients.
  assert "all-gather" in r["zero1"]["collectives"]  # Updated shards gathered into the params.
  grads = r["dp"]["grads_bytes_per_device"]
  assert grads <= r["dp"]["collectives"]["all-reduce"]["bytes"] < 1.01 * grads


def test_plan_is_json_serialisable(default_plan):
  """`jaxdp plan --json` prints json.dumps of this dict."""
  again = json.loads(json.dumps(default_plan))
  assert again["strategies"]["zero3"]["params_bytes_per_device"] == \
      default_plan["strategies"]["zero3"]["params_bytes_per_device"]


def test_verify_passes_on_default_config():
  config = load_preset("default")
  config.model.n_layer = 1  # The default widths and heads, one block: a quarter the compiling.
  cases = [verify.Case("zero3@4x2", "zero3", data=4, model=2)]  # Both mesh axes, every ZeRO part.
  results = verify.verify(config, jax.devices()[:8], 2, cases=cases)
  assert all(r["ok"] for r in results.values()), results


def forget_to_average(layout, loss_fn, tx, state_sharding):
  """A broken data-parallel step: each device applies its own rows' gradients."""
  del state_sharding
  body = functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx, axis_name=None)
  return jax.jit(jax.shard_map(body, mesh=layout.mesh, in_specs=(P(), parallel.BATCH_SPEC),
                               out_specs=(P(), P()), check_vma=False))


def test_verify_fails_on_a_strategy_that_forgets_to_average(tiny_config):
  as_in_runs(tiny_config)  # The reference step of runs; a missing average shows in any model.
  results = verify.verify(tiny_config, jax.devices()[:4], 3,
                          cases=[verify.Case("broken", "dp", compile_step=forget_to_average)])
  assert not results["broken"]["ok"]
  assert results["broken"]["loss"] > 100 * verify.DEFAULT_TOLERANCE["loss"]


def test_checkpoint_resumes_across_strategies_and_device_counts(tiny_config, tmp_path):
  """zero1 on 4 devices -> dp on 8 -> zero3 on 4 gives the losses of one uninterrupted run."""
  # One block: every kind of array each strategy shards. The strategies and device counts are
  # ones `runs` trained, so their steps come compiled (each resume changes both, up and down).
  config = as_in_runs(tiny_config)
  config.num_steps = 9
  config.eval_every, config.checkpoint_every, config.log_every = 0, 0, 1

  def train(workdir, strategy, num_devices, num_steps):
    config.strategy, config.num_steps = strategy, num_steps
    train_and_evaluate(config, str(workdir), devices=jax.devices()[:num_devices], progress=False)

  train(tmp_path / "whole", "zero1", 4, 9)
  for strategy, num_devices, num_steps in (("zero1", 4, 3), ("dp", 8, 6), ("zero3", 4, 9)):
    train(tmp_path / "pieces", strategy, num_devices, num_steps)

  def losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
      lines = [json.loads(line) for line in f]
    return {l["step"]: l["train_loss"] for l in lines if "train_loss" in l}

  whole, pieces = losses(tmp_path / "whole"), losses(tmp_path / "pieces")
  assert sorted(pieces) == list(range(1, 10))
  np.testing.assert_allclose([pieces[s] for s in range(1, 10)], [whole[s] for s in range(1, 10)],
                             rtol=LOSS_RTOL)
  starts = [l for l in map(json.loads, open(tmp_path / "pieces" / "metrics.jsonl"))
            if l.get("event") in ("start", "resume")]
  assert [(l["strategy"], l["num_devices"]) for l in starts] == [("zero1", 4), ("dp", 8), ("zero3", 4)]
  assert all(l["state_bytes_per_device"] > 0 for l in starts)


def test_offload_optimizer_on_cpu_is_an_error(tiny_config):
  tiny_config.strategy, tiny_config.offload_optimizer = "zero1", True
  with pytest.raises(JaxdpError, match="offload_optimizer"):
    build(tiny_config, jax.devices()[:2])


@pytest.mark.parametrize("fields,message", [
    ({"strategy": "dp", "mesh.model": 2}, "config.mesh.model=2 needs a jit strategy"),
    ({"strategy": "zero1", "mesh.model": 4}, "must divide config.model.n_head"),
    ({"strategy": "zero1", "mesh.model": 3}, "does not divide the 8 devices"),
    ({"strategy": "zero1", "mesh.data": 2, "mesh.model": 2}, "!= 8 devices"),
    ({"strategy": "dp", "offload_optimizer": True}, "needs a ZeRO strategy"),
])
def test_bad_mesh_or_strategy_fields_are_named(tiny_config, fields, message):
  for name, value in fields.items():
    section, _, field = name.rpartition(".")
    (tiny_config[section] if section else tiny_config)[field] = value
  with pytest.raises(JaxdpError, match=message):
    validate(tiny_config, 8)


def test_run_trained_on_a_2d_mesh_loads_for_inference_on_one_device(tiny_config, tmp_path):
  as_in_runs(tiny_config)  # The step of runs["zero3@2x2", 4], compiled once.
  tiny_config.strategy, tiny_config.num_steps, tiny_config.mesh.model = "zero3", 2, 2
  tiny_config.eval_every = tiny_config.checkpoint_every = 0
  train_and_evaluate(tiny_config, str(tmp_path), devices=jax.devices()[:4], progress=False)
  params, _, _ = load_for_inference(str(tmp_path))
  assert params["block_0"]["attn"]["qkv"]["kernel"].sharding.device_set == {jax.local_devices()[0]}
