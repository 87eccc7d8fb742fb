"""A reader's hold on a checkpoint step (issue 30, kind 6): the run writing the checkpoints keeps
a held step through its retention, whatever keep_last says, until the reader lets go; holds of
readers that died are ignored, and a step deleted before its hold was seen is reported as gone."""

import json
import os
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from jaxdp.runtime import checkpoint as ckpt
from jaxdp.runtime.checkpoint import Checkpointer, StepGone


def _state(step):
  return {"w": jnp.full((4,), float(step))}


@pytest.fixture
def run(tmp_path):
  """A writer keeping only its latest step (keep_last=1), as a run saving every step."""
  writer = Checkpointer(str(tmp_path), keep_last=1)

  def save(step):
    writer.save(step, _state(step), {"step": step})
    writer.wait()
  yield str(tmp_path), writer, save
  writer.close()


def test_a_held_step_outlives_keep_last_until_the_reader_lets_go(run):
  workdir, writer, save = run
  save(1)
  reader = Checkpointer(workdir, create=False)
  with reader.hold(1):
    save(2)
    save(3)
    assert writer.refreshed_steps() == [1, 3]  # keep_last=1 would have deleted step 1.
    state, meta = reader.restore(1, _state(0))
    assert meta["step"] == 1 and float(state["w"][0]) == 1.0
  save(4)
  assert writer.refreshed_steps() == [4]
  assert not os.path.exists(os.path.join(workdir, "checkpoints" + ckpt.HOLDS_SUFFIX))  # No trace.
  reader.close()


def test_a_step_deleted_before_the_hold_is_reported_gone(run):
  workdir, _, save = run
  save(1)
  reader = Checkpointer(workdir, create=False)
  save(2)  # Deletes step 1, which the reader had listed.
  with pytest.raises(StepGone):
    with reader.hold(1):
      pass
  reader.close()


def test_holds_of_readers_that_died_or_expired_are_ignored(run):
  workdir, writer, save = run
  holds = os.path.join(writer.directory + ckpt.HOLDS_SUFFIX)
  os.makedirs(holds)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  here = socket.gethostname()
  records = {"dead.json": {"step": 1, "host": here, "pid": int(dead.stdout), "time": time.time()},
             "expired.json": {"step": 2, "host": here + "-other", "pid": 1,
                              "time": time.time() - ckpt.HOLD_LEASE_S - 1},
             "live.json": {"step": 3, "host": here + "-other", "pid": 1, "time": time.time()}}
  for name, record in records.items():
    with open(os.path.join(holds, name), "w") as f:
      json.dump(record, f)
  assert ckpt.held_steps(writer.directory) == {3}
  for step in (1, 2, 3, 4):
    save(step)
  assert writer.refreshed_steps() == [3, 4]
