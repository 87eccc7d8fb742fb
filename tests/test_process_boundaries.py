"""Multi-process boundaries (issue 31): `DataParallel.put_batch` of a global batch without "ids"
on every process, and processes of one run that disagree on its config refused at start-up.

Each test starts 2 real JAX processes (2 CPU devices each, gloo collectives) on tiny work.
"""

import os
import subprocess
import sys
import textwrap

from conftest import cli_env
import jax
import numpy as np
import optax
import pytest

from jaxdp.runtime.launch import free_port

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = cli_env(PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))

# The README's "Your own model" example, stepped by hand on a global batch of {"x", "y"} (no
# "ids") and on a nested batch, printing the losses.
WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    from jaxdp.runtime.distributed import initialize
    initialize(sys.argv[1], 2, int(sys.argv[2]), timeout_s=120)
    import jax.numpy as jnp, numpy as np, optax, jaxdp

    def init_fn(rng):
      return {"w": 0.01 * jax.random.normal(rng, (16, 4)), "b": jnp.zeros(4)}

    def loss_fn(params, batch, rng):
      x = batch["x"] if "x" in batch else batch["inputs"]["x"]
      logits = x @ params["w"] + params["b"]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return losses.sum(), jnp.float32(losses.shape[0])

    def batch_of(step):
      rng = np.random.default_rng(step)
      return {"x": rng.normal(size=(8, 16)).astype(np.float32), "y": rng.integers(0, 4, 8)}

    dp = jaxdp.DataParallel(loss_fn, optax.sgd(0.1))
    state = dp.init_state(init_fn, seed=0)
    state, m0 = dp.step(state, batch_of(0))
    nested = batch_of(1)
    state, m1 = dp.step(state, {"inputs": {"x": nested["x"]}, "y": nested["y"]})
    print("LOSSES", float(m0["train_loss"]), float(m1["train_loss"]), flush=True)
""")


def _run_two(tmp_path, script, args_of):
  """Starts 2 processes of `script` joined at one coordinator; returns [(returncode, out, err)]."""
  path = tmp_path / "worker.py"
  path.write_text(script)
  address = f"127.0.0.1:{free_port()}"
  processes = [subprocess.Popen([sys.executable, str(path), address, str(i), *args_of(i)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
               for i in range(2)]
  try:
    outputs = [p.communicate(timeout=240) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def test_put_batch_of_a_global_batch_without_ids_on_two_processes(tmp_path):
  import jax.numpy as jnp

  import jaxdp
  results = _run_two(tmp_path, WORKER, lambda i: [])
  losses = []
  for code, out, err in results:
    assert code == 0, err[-3000:]
    losses.append([float(x) for x in next(l for l in out.splitlines() if l.startswith("LOSSES")).split()[1:]])
  assert losses[0] == losses[1]

  # The same two steps on one process with 4 devices.
  def init_fn(rng):
    return {"w": 0.01 * jax.random.normal(rng, (16, 4)), "b": jnp.zeros(4)}

  def loss_fn(params, batch, rng):
    x = batch["x"] if "x" in batch else batch["inputs"]["x"]
    logits = x @ params["w"] + params["b"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return loss.sum(), jnp.float32(loss.shape[0])

  def batch_of(step):
    rng = np.random.default_rng(step)
    return {"x": rng.normal(size=(8, 16)).astype(np.float32), "y": rng.integers(0, 4, 8)}

  dp = jaxdp.DataParallel(loss_fn, optax.sgd(0.1), devices=jax.devices()[:4])
  state = dp.init_state(init_fn, seed=0)
  state, m0 = dp.step(state, batch_of(0))
  nested = batch_of(1)
  state, m1 = dp.step(state, {"inputs": {"x": nested["x"]}, "y": nested["y"]})
  np.testing.assert_allclose(losses[0], [float(m0["train_loss"]), float(m1["train_loss"])], rtol=1e-6)


def test_processes_started_with_different_configs_are_refused_naming_the_field(tmp_path):
  """Two processes of one run, one with another learning rate: both exit 2 at start-up with one
  line naming config.learning_rate and process 1, before training or writing a checkpoint."""
  address = f"127.0.0.1:{free_port()}"
  processes = [subprocess.Popen(
      [sys.executable, "-m", "jaxdp.cli.main", "train", "--config", "tiny_cpu", "--progress=false",
       "--cpu_devices=2", "--config.num_steps=2", f"--config.learning_rate={lr}",
       "--workdir", str(tmp_path / "run"), f"--coordinator={address}", "--num_processes=2",
       f"--process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
      for i, lr in enumerate((1e-3, 2e-3))]
  try:
    outputs = [p.communicate(timeout=240) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for i, (p, (_, stderr)) in enumerate(zip(processes, outputs)):
    errors = [line for line in stderr.splitlines() if line.startswith("jaxdp: error: ")]
    assert p.returncode == 2, stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert ("the processes of this run disagree on config.learning_rate: process 1 has another "
            f"value than process 0 (process {i} has {(1e-3, 2e-3)[i]!r})") in errors[0], errors[0]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_agreement_fields_name_versions_data_and_config_but_not_local_paths():
  from jaxdp.runtime import agreement
  fields = agreement.fields({"learning_rate": 1e-3, "data": {"path": "/a", "packing": "none"}}, "abc")
  assert fields["data fingerprint"] == "abc" and fields["config.learning_rate"] == 1e-3
  assert "config.data.packing" in fields and "config.data.path" not in fields
  assert {"jaxdp version", "JAX version"} <= set(fields)
  agreement.check({"learning_rate": 1e-3}, None)  # One process: nothing to compare.
