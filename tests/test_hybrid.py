"""Hybrid (hierarchical) sharding: a "replica" mesh axis outside "data" on 8 emulated devices.

ZeRO splits the state within a data group of 4 and keeps one copy per replica group; the batch
is split over both axes. Each run below is 10 tiny_cpu steps, shared through a module fixture.
"""

import jax
import numpy as np
import pytest

from jaxdp import parallel
from jaxdp.analysis import verify
from jaxdp.errors import JaxdpError
from jaxdp.lm import build
from jaxdp.lm.config import load_preset, validate
from jaxdp.parallel import hlo

NUM_STEPS = 10
ZERO = ("zero1", "zero2", "zero3")
LOSS_RTOL = 1e-5
pytestmark = pytest.mark.slow  # Five 10-step runs and nine compiled steps on 8 devices.


def hybrid(strategy, replica=2, data=4):
  return verify.Case(f"{strategy}@r{replica}x{data}", strategy, data=data, replica=replica)


@pytest.fixture(scope="module")
def runs():
  """(losses, final state, trainer) per case, and the compiled step's HLO text per case. One
  block: every kind of array the strategies split and exchange, half the compiling."""
  config = load_preset("tiny_cpu")
  config.model.n_layer = 1
  cases = {"dp@8": verify.Case("dp", "dp")}
  cases.update({f"{s}@r2x4": hybrid(s) for s in ("dp",) + ZERO})
  out, texts = {}, {}
  for name, case in cases.items():
    out[name] = verify.run_case(config, jax.devices()[:8], case, NUM_STEPS)
    texts[name] = compiled_text(out[name][2])
  for strategy in ZERO:  # Compiled only: the flat (one-axis) ZeRO step to compare with.
    texts[f"{strategy}@8"] = compiled_text(build(verify.case_config(
        config, verify.Case(strategy, strategy)), jax.devices()[:8]))
  # zero3 on 4 devices: a 4-way split of params and optimizer state, at initialisation.
  out["zero3@4"] = build(verify.case_config(config, verify.Case("zero3", "zero3")),
                         jax.devices()[:4]).init_state()
  return out, texts


def compiled_text(trainer) -> str:
  return trainer.train_step.lower(trainer.abstract_state(), trainer.train_batch(0)).compile().as_text()


def test_the_hybrid_mesh_has_the_replica_axis_outside_data_and_the_default_has_none():
  mesh = parallel.make_mesh(jax.devices()[:8], data=4, replica=2)
  assert mesh.axis_names == ("replica", "data", "model") and mesh.devices.shape == (2, 4, 1)
  # Each data group is 4 consecutive devices (one host's, when a process drives 4).
  assert [d.id for d in mesh.devices[1, :, 0]] == [d.id for d in jax.devices()[4:8]]
  assert parallel.batch_axes(mesh) == ("replica", "data")
  default = parallel.make_mesh(jax.devices()[:8])
  assert default.axis_names == ("data", "model") and parallel.batch_axes(default) == "data"


@pytest.mark.parametrize("strategy", ZERO + ("dp",))
def test_hybrid_equals_dp_step_by_step(runs, strategy):
  runs, _ = runs
  losses, state, trainer = runs[f"{strategy}@r2x4"]
  assert dict(trainer.mesh.shape) == {"replica": 2, "data": 4, "model": 1}
  want_losses, want_state, _ = runs["dp@8"]  # Flat dp on 8 devices, itself tested against one.
  np.testing.assert_allclose(losses, want_losses, rtol=LOSS_RTOL)
  diff = verify.relative_differences(losses, state, want_losses, want_state)
  assert diff["params"] <= verify.DEFAULT_TOLERANCE["params"], diff


def per_device_bytes(tree, device) -> int:
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


@pytest.mark.parametrize("strategy", ZERO)
def test_hybrid_state_per_device_is_a_4_way_shard(runs, strategy):
  """Every device of the 2x4 mesh holds what a device of a plain 4-device ZeRO run holds."""
  runs, _ = runs
  _, state, trainer = runs[f"{strategy}@r2x4"]
  _, dp_state, _ = runs["dp@8"]
  state4 = runs["zero3@4"]
  split = parallel.ZERO_PARTS[strategy]
  for device in jax.devices()[:8]:
    for part in ("params", "opt_state"):
      got = per_device_bytes(getattr(state, part), device)
      if part in split:
        assert got == per_device_bytes(getattr(state4, part), jax.devices()[0]), (part, device)
        assert got < per_device_bytes(getattr(dp_state, part), device) / 3.9
      else:
        assert got == per_device_bytes(getattr(dp_state, part), device), (part, device)


def crossing_replica(text, mesh):
  """(op, bytes per device, op_name metadata) of each collective whose groups span "replica"."""
  found = []
  for line in text.splitlines():
    instr = hlo._INSTR.match(line)
    if instr and "replica" in hlo.group_axes(hlo.replica_groups(instr.group("rest"), 8)[0],
                                              dict(mesh.shape)):
      found.append((instr.group("op"), line))
  return found


@pytest.mark.parametrize("strategy", ZERO)
def test_only_the_gradient_exchange_crosses_the_replica_axis(runs, strategy):
  runs, texts = runs
  trainer = runs[f"{strategy}@r2x4"][2]
  crossing = crossing_replica(texts[f"{strategy}@r2x4"], trainer.mesh)
  assert crossing
  devices = trainer.mesh.devices.size
  health = []
  for op, line in crossing:
    if op == "all-gather" and f"f32[{devices}]" in line.split("=")[1] and "sqrt" in line:
      # The per-device gradient norms (runtime/health.py's device_grad_norm): one float32 from
      # each device, gathered so every device reports all of them; no parameter or state.
      health.append(line)
      continue
    # All-reduces of gradients (the backward pass's transposed ops) and of the loss and token
    # sums; never a parameter or optimizer-state all-gather.
    assert op == "all-reduce", line[:200]
    assert "transpose(jvp" in line or "reduce_sum" in line, line[:300]
  by_axes = hlo.bytes_by_axes(texts[f"{strategy}@r2x4"], dict(trainer.mesh.shape))
  over_replica = sum(v["bytes"] for axes, v in by_axes.items() if "replica" in axes)
  # Less the health gather's bytes (a few dozen), counted by the same HLO parser.
  over_replica -= sum(v["bytes"] for v in hlo.bytes_by_axes("\n".join(health), dict(trainer.mesh.shape)).values())
  # Never more than the same stage's gradient all-reduces over all 8 devices.
  flat = hlo.collective_bytes(texts[f"{strategy}@8"])["by_kind"]["all-reduce"]
  assert over_replica <= flat, (by_axes, flat)
  if strategy != "zero1":  # zero1 keeps whole gradients, so reduces them over every device.
    assert over_replica < 0.5 * flat, (by_axes, flat)
  if strategy == "zero3":
    # Pure zero3 on 8 gathers the parameters across every device; hybrid keeps that in "data".
    pure = hlo.bytes_by_axes(texts["zero3@8"], {"data": 8, "model": 1})
    print(f"zero3 bytes per device by axes: hybrid 2x4 "
          f"{ {k: int(v['bytes']) for k, v in by_axes.items()} }, pure 8 "
          f"{ {k: int(v['bytes']) for k, v in pure.items()} }")
    assert set(pure) == {"data"}
    assert over_replica < 0.5 * pure["data"]["bytes"]
    assert "all-gather" in by_axes["data"]["ops"]


def test_hlo_replica_groups_in_every_spelling():
  mesh_form = ("replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, "
               "to_apply=%add")
  assert hlo.replica_groups(mesh_form, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == \
      [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo.replica_groups("replica_groups={{0,1},{2,3}}, x", 4) == [[0, 1], [2, 3]]
  assert hlo.replica_groups("to_apply=%add", 4) == [[0, 1, 2, 3]]
  sizes = {"replica": 2, "data": 4, "model": 1}
  assert hlo.group_axes([0, 4], sizes) == ("replica",)
  assert hlo.group_axes([4, 5, 6, 7], sizes) == ("data",)
  assert hlo.group_axes(list(range(8)), sizes) == ("replica", "data")


def test_verify_covers_the_hybrid_meshes():
  names = [c.name for c in verify.default_cases(load_preset("tiny_cpu"), 8)]
  assert {"dp@r2x4", "zero1@r2x4", "zero2@r2x4", "zero3@r2x4"} <= set(names)


@pytest.mark.parametrize("fields,message", [
    ({"mesh.replica": 3}, "config.mesh.replica=3 x config.mesh.model=1 does not divide the 8"),
    ({"mesh.replica": 0}, "config.mesh.replica=0 must be >= 1"),
    ({"mesh.replica": 2, "mesh.data": 2}, r"config.mesh.replica=2 x config.mesh.data=2 .* != 8"),
    ({"mesh.replica": 2, "allreduce": "ring"}, "supports only the dense all-reduce"),
    ({"mesh.replica": 2, "global_batch_size": 12}, "= 8 x 1 = 8"),
])
def test_bad_hybrid_fields_are_named(tiny_config, fields, message):
  for name, value in fields.items():
    section, _, field = name.rpartition(".")
    (tiny_config[section] if section else tiny_config)[field] = value
  with pytest.raises(JaxdpError, match=message):
    validate(tiny_config, 8)


def test_hybrid_plan_reports_bytes_by_axes(tiny_config):
  from jaxdp.analysis import plan
  tiny_config.mesh.replica = 2
  result = plan.plan(tiny_config, jax.devices()[:8], strategies=["zero3"])["strategies"]["zero3"]
  assert result["mesh"] == {"replica": 2, "data": 4, "model": 1}
  assert result["collective_bytes_by_axes"]["data"] > 0
  assert "replica" in " ".join(result["collective_bytes_by_axes"])
  assert "sent per device by mesh axes: data" in plan.format_table(
      {"params": 1, "num_devices": 8, "strategies": {"zero3": result}})


def test_hybrid_build_splits_the_batch_over_both_axes(tiny_config):
  tiny_config.mesh.replica, tiny_config.strategy = 2, "zero2"
  trainer = build(tiny_config, jax.devices()[:8])
  batch = trainer.train_batch(0)
  spec = next(iter(batch.values())).sharding.spec
  assert spec[1] == ("replica", "data")
