"""Fault tolerance: kills, signals, corrupt checkpoints, config changes, NaNs, full disks.

Every run here uses the tiny_cpu model on 2 devices with the same schedule (lr_decay_steps=20),
so any run can be compared, step by step and bit by bit, with one uninterrupted reference (one
through the CLI, one in this process: each is compared with runs of its own kind).
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.core import step as steps
from jaxdp.core.state import TrainState
from jaxdp.data.pipeline import Batches
from jaxdp.errors import JaxdpError
from jaxdp.lm import build, restore_checkpoint, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime.checkpoint import Checkpointer, CorruptCheckpoint, fingerprints
from jaxdp.runtime.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"num_steps": 20, "lr_decay_steps": 20, "log_every": 1, "eval_every": 5,
             "checkpoint_every": 2}


def config(**overrides):
  c = load_preset("tiny_cpu")
  for k, v in {**OVERRIDES, **overrides}.items():
    c[k] = v
  return c


def devices():
  return jax.devices()[:2]


def train_losses(workdir):
  """{step: loss} of every train line; a step logged twice (before a kill and after) must agree."""
  out = {}
  for r in read_metrics(workdir):
    if "train_loss" in r:
      assert out.setdefault(r["step"], r["train_loss"]) == r["train_loss"], r
  return out


def restored_state(workdir, step=None):
  ckpt = Checkpointer(workdir, create=False)
  step = ckpt.latest_step() if step is None else step
  state, _ = ckpt.restore(step, build(config(), devices()).abstract_state())
  ckpt.close()
  return jax.device_get(state)


def assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of 8 of the 20 steps in this process: checkpoints at every even step
  and at the evaluation of step 5 (the last 3, 5, 6 and 8, and the best kept). Its readers need
  the latest checkpoint and the one 2 steps before it, and the losses of steps 1 to 6."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train_and_evaluate(config(num_steps=8), workdir, devices=devices(), progress=False)
  return workdir


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A finished 2-step run (its one checkpoint at step 2), trained once for the tests that copy it
  onto a small filesystem and then fill it or make it read-only."""
  workdir = str(tmp_path_factory.mktemp("two_steps") / "run")
  train_and_evaluate(config(num_steps=2), workdir, devices=devices(), progress=False)
  return workdir


def cli(workdir, *flags):
  """Starts `jaxdp train` on the reference config in a subprocess."""
  args = [sys.executable, "-m", "jaxdp.cli.main", "train", "--config", "tiny_cpu", "--cpu_devices", "2",
          "--workdir", workdir, "--progress=false"]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + list(flags)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
  """The reference run through the CLI on 2 CPU devices: bitwise comparisons need the same
  backend setup (in this process JAX has 8 devices, and a loss then differed in the last bit)."""
  workdir = str(tmp_path_factory.mktemp("cli_reference"))
  proc = cli(workdir)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  return workdir


def logged_step(workdir):
  try:
    return max([r["step"] for r in read_metrics(workdir) if "train_loss" in r], default=0)
  except (FileNotFoundError, json.JSONDecodeError):  # Not there yet, or a line half written.
    return 0


def wait_for(predicate, proc, timeout=120.0):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f"run ended before the kill point: {proc.communicate()}"
    assert time.time() < deadline, "kill point not reached"
    time.sleep(0.001)


def latest_complete_checkpoint(workdir):
  """The newest step whose save finished (orbax renames the temporary directory when done)."""
  steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
           if os.path.basename(p).isdigit()]
  return max(steps, default=0)


def save_in_progress(workdir):
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """A CLI run sent SIGTERM once step 3 is logged, with no periodic checkpoints (only the SIGTERM
  checkpoint can exist): (workdir, exit status, stdout + stderr). The SIGTERM test reads it; the
  SIGKILL test resumes a copy of it, killed again and again, up to the reference's last step."""
  workdir = str(tmp_path_factory.mktemp("preempted"))
  proc = cli(workdir, "--config.checkpoint_every=0")
  try:
    wait_for(lambda: logged_step(workdir) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return workdir, proc.returncode, out + err


def test_sigterm_checkpoints_current_step_exits_preempted_and_resumes(preempted):
  # Its resume, bit for bit, is the first run of test_sigkill_at_random_points_resumes_bitwise.
  workdir, status, output = preempted
  assert status == 75, output[-3000:]  # config.preempt_exit_code: saved, resumable.
  assert "SIGTERM: stopped after step" in output
  event = [r for r in read_metrics(workdir) if r.get("event") == "preempted"]
  assert len(event) == 1 and event[0]["signal"] == "SIGTERM"
  stopped = event[0]["step"]
  assert 3 <= stopped < 20
  assert Checkpointer(workdir, create=False).all_steps() == [stopped]


def test_sigkill_at_random_points_resumes_bitwise(preempted, cli_reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(preempted[0], workdir)  # Stopped by SIGTERM: its checkpoint is the only one.
  stopped = next(r["step"] for r in read_metrics(workdir) if r.get("event") == "preempted")
  rng = random.Random()
  seed = rng.randrange(10**6)
  rng.seed(seed)
  kills = []
  # 1: resumed from the SIGTERM checkpoint, killed during a save (its temporary directory
  # exists); 2, 3: after a random logged step.
  proc = cli(workdir)
  wait_for(lambda: save_in_progress(workdir), proc)
  proc.kill()
  proc.wait()
  kills.append(("during save", logged_step(workdir)))
  assert save_in_progress(workdir), "the kill did not land inside a save"
  for _ in range(2):
    start, saved = logged_step(workdir), latest_complete_checkpoint(workdir)
    # At step 16 at the latest, so that a new checkpoint (every 2 steps) lands before the run
    # ends at 20 however far the run got past the previous kill.
    target = min(rng.randint(start + 1, start + 6), 16)
    proc = cli(workdir)
    # Killed at a random step, but only once a new checkpoint is complete, so the next run
    # resumes from a checkpoint of its own.
    wait_for(lambda target=target, saved=saved: logged_step(workdir) >= target
             and latest_complete_checkpoint(workdir) > saved, proc)
    proc.kill()
    proc.wait()
    kills.append(("after step", logged_step(workdir)))
  proc = cli(workdir)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "done: step 20" in out, err
  assert not save_in_progress(workdir), "a crashed save's temporary directory was not cleaned"
  assert train_losses(workdir) == train_losses(cli_reference), (seed, kills)
  assert_bitwise_equal(restored_state(workdir), restored_state(cli_reference))
  events = [r for r in read_metrics(workdir) if r.get("event") in ("start", "resume")]
  # The SIGTERM run's start, then every run after it resumed; the first from the SIGTERM step.
  assert [r["event"] for r in events] == ["start"] + ["resume"] * 4, kills
  assert events[1]["step"] == stopped, (stopped, events)


def largest_array_file(workdir, step):
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


def test_truncated_latest_checkpoint_falls_back_with_warning(reference, tmp_path, capfd):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  latest = Checkpointer(workdir, create=False).latest_step()
  path = largest_array_file(workdir, latest)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  trainer = build(config(), devices())
  ckpt = Checkpointer(workdir)
  state, meta = restore_checkpoint(ckpt, trainer)
  assert int(state.step) == meta["step"] == latest - 2
  assert f"checkpoint step {latest} is unreadable" in capfd.readouterr().err
  assert latest not in ckpt.all_steps()
  assert os.path.isdir(os.path.join(workdir, "checkpoints.invalid", str(latest)))
  ckpt.close()
  # Training again re-creates the moved step, bit for bit.
  train_and_evaluate(config(num_steps=8), workdir, devices=devices(), progress=False)
  assert_bitwise_equal(restored_state(workdir), restored_state(reference))


def test_flipped_bit_in_array_file_is_detected_not_loaded(reference, tmp_path):
  """A bit flipped in an array file is never loaded. Where it lands decides who notices: in a
  compressed block's framing orbax itself fails to decode ("unreadable"); in the payload orbax
  reads it back without complaint, and only jaxdp's fingerprints catch it. OCDBT packs the arrays
  into its data files in the order the writer threads finish, so the byte at a given offset is
  not the same from run to run: several offsets are tried, every flip must be refused, and at
  least one must be one only the fingerprints catch."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  latest = Checkpointer(workdir, create=False).latest_step()
  path = largest_array_file(workdir, latest)
  pristine = open(path, "rb").read()
  abstract = build(config(), devices()).abstract_state()
  caught = []
  for fraction in (0.5, 0.3, 0.7, 0.4, 0.6, 0.2, 0.8, 0.45, 0.55, 0.35):
    data = bytearray(pristine)
    data[int(len(data) * fraction)] ^= 0x10
    open(path, "wb").write(data)
    ckpt = Checkpointer(workdir, create=False)
    try:
      with pytest.raises(CorruptCheckpoint, match="fingerprint mismatch|unreadable") as error:
        ckpt.restore(latest, abstract)
    finally:
      ckpt.close()
    caught.append("fingerprint mismatch" in str(error.value))
    if caught[-1]:
      break
  assert any(caught), "every flip was caught by orbax's decoder; none reached the fingerprints"


def test_data_changed_under_the_same_path_is_refused_on_resume(tmp_path):
  from jaxdp.data import builtin_corpus_path
  corpus = tmp_path / "corpus.txt"
  shutil.copy(builtin_corpus_path(), corpus)
  run = config(num_steps=2, checkpoint_every=2, eval_every=0)
  run.data.path = str(corpus)
  workdir = str(tmp_path / "run")
  train_and_evaluate(run, workdir, devices=devices(), progress=False)
  ckpt = Checkpointer(workdir, create=False)
  state, _ = restore_checkpoint(ckpt, build(run, devices()))  # Same bytes: resumes.
  assert int(state.step) == 2
  text = corpus.read_bytes()
  corpus.write_bytes(text.replace(b"ROMEO", b"ROMEX", 1))  # Same length, one byte differs.
  with pytest.raises(JaxdpError, match=r"the data at config.data.path=.*corpus.txt' changed "
                                       r"\(sha256 [0-9a-f]{12}\.\.\. -> [0-9a-f]{12}\.\.\.\).*--allow_config_change"):
    restore_checkpoint(ckpt, build(run, devices()))
  state, _ = restore_checkpoint(ckpt, build(run, devices()), allow_config_change=True)
  assert int(state.step) == 2
  ckpt.close()


def test_fingerprint_changes_with_any_flipped_bit_and_not_with_sharding():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5))
  base = fingerprints({"x": x})
  bits = np.asarray(x).view(np.uint32).copy()
  for index, bit in [(0, 0), (17, 31), (39, 12)]:
    flipped = bits.copy()
    flipped.flat[index] ^= np.uint32(1 << bit)
    assert fingerprints({"x": jnp.asarray(flipped.view(np.float32))}) != base
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  assert fingerprints({"x": sharded}) == base


def test_config_mismatch_is_refused_naming_fields(reference):
  ckpt = Checkpointer(reference, create=False)
  changed = config(seed=1, global_batch_size=32)
  with pytest.raises(JaxdpError, match=r"seed \(0 -> 1\); global_batch_size \(16 -> 32\)"):
    restore_checkpoint(ckpt, build(changed, devices()))
  state, _ = restore_checkpoint(ckpt, build(changed, devices()), allow_config_change=True)
  assert int(state.step) == 8
  # Length, evaluation and device count may change: 4 devices restore a 2-device checkpoint.
  allowed = config(num_steps=40, lr_decay_steps=20, eval_every=3)
  state, _ = restore_checkpoint(ckpt, build(allowed, jax.devices()[:4]))
  assert int(state.step) == 8 and len(state.params["ln_f"]["scale"].sharding.device_set) == 4
  ckpt.close()


def test_restore_from_picks_a_step_and_refuses_a_workdir_with_later_ones(reference, tmp_path):
  ckpt = Checkpointer(reference, create=False)
  earlier = ckpt.all_steps()[-2]
  source = os.path.join(reference, "checkpoints", str(earlier))
  fresh = Checkpointer(str(tmp_path))
  state, meta = restore_checkpoint(fresh, build(config(), devices()), restore_from=source)
  assert int(state.step) == meta["step"] == earlier
  fresh.close()
  with pytest.raises(JaxdpError, match="already has checkpoints at steps"):
    restore_checkpoint(ckpt, build(config(), devices()), restore_from=source)
  ckpt.close()


def poison(monkeypatch, bad_steps):
  """Makes the token weights of the given data steps NaN, so their loss and gradients are NaN."""
  original_at = Batches.at

  def at(self, start, size, rows=slice(None)):
    batch = original_at(self, start, size, rows)
    if start // size in bad_steps:  # A fixed global batch: step = first example / batch size.
      batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
    return batch
  monkeypatch.setattr(Batches, "at", at)


def test_nan_halt_reports_step_and_saves_last_good_state(reference, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  poison(monkeypatch, {3})  # The 4th step.
  with pytest.raises(JaxdpError, match="non-finite loss or gradients at step 4 .*checkpoint 3"):
    train_and_evaluate(config(num_steps=6), workdir, devices=devices(), progress=False)
  halt = [r for r in read_metrics(workdir) if r.get("event") == "nonfinite_halt"]
  assert halt == [{"step": 4, "event": "nonfinite_halt", "nan_policy": "halt", "skipped_steps": 0}]
  assert Checkpointer(workdir, create=False).latest_step() == 3
  monkeypatch.undo()
  # Resuming from the saved state retraces the reference: it was exactly the state after step 3.
  train_and_evaluate(config(num_steps=6), workdir, devices=devices(), progress=False)
  expected = train_losses(reference)
  assert train_losses(workdir) == {s: expected[s] for s in range(1, 7)}


def test_nan_skip_keeps_training_and_counts_skips(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  poison(monkeypatch, {1, 2})
  result = train_and_evaluate(config(num_steps=6, nan_policy="skip", max_consecutive_skips=2),
                              workdir, devices=devices(), progress=False)
  assert result["step"] == 6 and np.isfinite(result["train_loss"])
  lines = [r for r in read_metrics(workdir) if "train_loss" in r]
  assert [r["skipped_steps"] for r in lines] == [0, 1, 2, 2, 2, 2]
  # A NaN is written as null: metrics.jsonl is strict JSON (runtime.metrics.json_line).
  assert lines[1]["train_loss"] is None and lines[2]["train_loss"] is None
  state = restored_state(workdir)
  assert int(state.skipped_steps) == 2 and int(state.consecutive_skips) == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def tiny_state(step=5):
  return TrainState(step=jnp.int32(step), params={"w": jnp.ones(3)}, opt_state=(jnp.zeros(3),),
                    rng=jnp.zeros(2, jnp.uint32))


def test_checkpoint_of_other_shapes_is_refused_not_set_aside(tmp_path):
  # E.g. a checkpoint written before the MLP kernels became [out, in]: not damage, so the run
  # must stop with the reason instead of falling back to an older checkpoint or a fresh start.
  state = tiny_state()
  checkpoints = Checkpointer(str(tmp_path))
  checkpoints.save(5, state, {"step": 5})
  checkpoints.wait()
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                      sharding=x.sharding), tree)
  other = state.replace(params={"w": jnp.ones(4)})
  with pytest.raises(JaxdpError, match=r"step 5 .* other shapes than this model: params/w \(3,\) "
                                       r"\(model: \(4,\)\); .*use another --workdir"):
    checkpoints.restore(5, abstract(other))
  assert checkpoints.all_steps() == [5]
  restored, _ = checkpoints.restore(5, abstract(state))
  np.testing.assert_array_equal(restored.params["w"], state.params["w"])
  checkpoints.close()


def test_update_if_finite_drops_bad_updates_then_freezes_past_the_limit():
  old = tiny_state()
  update = lambda: ({"w": jnp.full(3, 2.0)}, (jnp.ones(3),), old.comm)
  state = old
  for expected_step, expected_skips in [(6, 1), (7, 2)]:  # Two dropped updates are allowed.
    state = steps.update_if_finite(state, jnp.bool_(False), update, max_consecutive_skips=2)
    assert int(state.step) == expected_step and int(state.skipped_steps) == expected_skips
    np.testing.assert_array_equal(state.params["w"], old.params["w"])
    np.testing.assert_array_equal(state.opt_state[0], old.opt_state[0])
  over = steps.update_if_finite(state, jnp.bool_(False), update, max_consecutive_skips=2)
  assert int(over.step) == 7 and int(over.consecutive_skips) == 3  # The third: step not taken.
  frozen = steps.update_if_finite(over, jnp.bool_(True), update, max_consecutive_skips=2)
  assert_bitwise_equal(frozen, over)  # Even a finite update cannot move a halted state.
  ok = steps.update_if_finite(state, jnp.bool_(True), update, max_consecutive_skips=2)
  assert int(ok.consecutive_skips) == 0 and int(ok.step) == 8 and int(ok.skipped_steps) == 2
  np.testing.assert_array_equal(ok.params["w"], update()[0]["w"])
  np.testing.assert_array_equal(ok.opt_state[0], update()[1][0])


def test_os_reason_finds_the_os_error_that_a_library_wrapped(tmp_path):
  from jaxdp.errors import os_reason
  try:
    try:
      raise OSError(28, "No space left on device")
    except OSError as inner:
      raise RuntimeError("failed to write checkpoint item") from inner
  except RuntimeError as wrapped:
    assert os_reason(wrapped, str(tmp_path)) == "No space left on device"
  # No OSError and a disk with room: the error's own first line.
  assert os_reason(ValueError("bad value\ndetails"), str(tmp_path)) == "bad value"


def test_after_a_full_disk_the_same_process_resumes_once_space_is_freed(tmpfs, fill, two_steps):
  """A notebook's fit that failed (full disk) leaves no lock or open file behind: freeing space
  and calling it again in the same process resumes the run."""
  workdir = os.path.join(tmpfs, "run")
  shutil.copytree(two_steps, workdir)
  fill(tmpfs)
  with pytest.raises(JaxdpError, match="No space left on device"):
    train_and_evaluate(config(num_steps=6), workdir, devices=devices(), progress=False)
  os.remove(os.path.join(tmpfs, "filler"))
  result = train_and_evaluate(config(num_steps=6), workdir, devices=devices(), progress=False)
  assert result["step"] == 6
  assert 6 in Checkpointer(workdir, create=False).all_steps()


def test_a_failed_metrics_flush_prints_nothing_when_the_interpreter_exits(tmpfs, fill):
  """The TensorBoard writer of a run that failed on a full disk does not retry its flush at exit
  (tensorboardX's atexit hook printed an "Exception ignored ... No space left" traceback)."""
  script = f"""
import os
from jaxdp.runtime.metrics import MetricsWriter
from jaxdp.errors import JaxdpError
writer = MetricsWriter({os.path.join(tmpfs, "run")!r})
with open({os.path.join(tmpfs, "filler")!r}, "wb", buffering=0) as f:
  try:
    while True:
      f.write(bytes(65536))
  except OSError:
    pass
try:
  for step in range(200):
    writer.write({{"step": step, "train_loss": 1.0, "note": "x" * 1000}})
except JaxdpError as e:
  print("failed:", e)
writer.close()
"""
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "failed:" in out.stdout and "No space left" in out.stdout
  assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("failure", ["full", "read_only"])
def test_full_or_read_only_workdir_gives_clear_error_and_earlier_checkpoint_restores(tmpfs, fill,
                                                                                    two_steps,
                                                                                    failure):
  workdir = os.path.join(tmpfs, "run")
  shutil.copytree(two_steps, workdir)
  assert Checkpointer(workdir, create=False).all_steps() == [2]
  if failure == "full":
    fill(tmpfs)
    match = "No space left on device"
  else:
    subprocess.run(["mount", "-o", "remount,ro", tmpfs], check=True)
    match = "Read-only file system"
  with pytest.raises(JaxdpError, match=f"(cannot write|failed) .*{match}"):
    train_and_evaluate(config(num_steps=6), workdir, devices=devices(), progress=False)
  state = restored_state(workdir, 2)
  assert int(state.step) == 2
