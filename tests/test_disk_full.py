"""A disk that fills during a run (issue 30, kind 1): one line naming the path and the reason,
what was saved intact, nothing corrupt, and the same run resumes once space is freed.

The disk is a real 4 MiB tmpfs (conftest's `tmpfs`, skipped where mounting is denied); "another
writer" is a hook of the run filling it after a given step.
"""

import os

import jax
import pytest

from jaxdp.errors import JaxdpError, WriteFailed, disk_error, writing
from jaxdp.lm import build, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime import loop
from jaxdp.runtime.checkpoint import Checkpointer
from jaxdp.runtime.hooks import Hook
from jaxdp.runtime.metrics import read_metrics


def config(**overrides):
  c = load_preset("tiny_cpu")
  for k, v in {"num_steps": 8, "lr_decay_steps": 8, "log_every": 5, "eval_every": 0,
               "checkpoint_every": 2, "keep_last": 2, **overrides}.items():
    c[k] = v
  return c


class _FillAfter(Hook):
  def __init__(self, step, fill):
    self.step, self.fill = step, fill

  def after_step(self, ctx, step, metrics):
    if step == self.step:
      self.fill()


@pytest.mark.parametrize("full_after", [3, 4], ids=["during_an_async_save", "at_a_save_step"])
def test_a_disk_filled_by_another_writer_is_one_line_and_the_run_resumes(tmpfs, fill, monkeypatch,
                                                                          full_after):
  """Filled after step 3 (while step 2's asynchronous save may still be writing) or after step 4
  (step 4's save starts on a full disk: tensorstore's RESOURCE_EXHAUSTED): one line naming the
  disk's reason and the intact checkpoints; every checkpoint listed restores; after freeing
  space the same call resumes from the newest one and finishes the run."""
  workdir = os.path.join(tmpfs, "run")
  original = loop.builtin_hooks
  monkeypatch.setattr(loop, "builtin_hooks", lambda ctx, user, log, *rest: original(
      ctx, list(user) + [_FillAfter(full_after, lambda: fill(tmpfs))], log, *rest))
  with pytest.raises(JaxdpError) as failed:
    train_and_evaluate(config(), workdir, devices=jax.devices()[:2], progress=False)
  message = str(failed.value)
  assert "\n" not in message and "No space left on device" in message, message
  assert "intact" in message and "resume" in message, message
  monkeypatch.setattr(loop, "builtin_hooks", original)
  checkpoints = Checkpointer(workdir, create=False)
  kept = checkpoints.all_steps()
  assert max(kept, default=0) <= 2  # Only complete steps are listed; step 4 never completed.
  abstract = build(config(), jax.devices()[:2]).abstract_state()
  for step in kept:  # Nothing corrupt: each listed checkpoint restores, fingerprints checked.
    assert int(checkpoints.restore(step, abstract)[0].step) == step
  checkpoints.close()
  os.remove(os.path.join(tmpfs, "filler"))
  result = train_and_evaluate(config(), workdir, devices=jax.devices()[:2], progress=False)
  assert result["step"] == 8
  resumed = [r["step"] for r in read_metrics(workdir) if r.get("event") == "resume"]
  assert resumed == kept[-1:]
  assert [r["step"] for r in read_metrics(workdir) if "train_loss" in r] == [5, 8]


def test_a_full_disk_at_start_up_is_one_line_and_writes_nothing_half(tmpfs, fill):
  """The disk is already full when the run starts: one line, no checkpoint listed, and the run
  starts normally once space is freed."""
  workdir = os.path.join(tmpfs, "run")
  fill(tmpfs)
  with pytest.raises(JaxdpError) as failed:
    train_and_evaluate(config(num_steps=2), workdir, devices=jax.devices()[:2], progress=False)
  assert "\n" not in str(failed.value) and "No space left on device" in str(failed.value)
  os.remove(os.path.join(tmpfs, "filler"))
  assert train_and_evaluate(config(num_steps=2), workdir, devices=jax.devices()[:2],
                            progress=False)["step"] == 2


def test_writing_maps_disk_refusals_and_passes_other_errors_through(tmp_path):
  """OSError ENOSPC/EROFS/EACCES and tensorstore's RESOURCE_EXHAUSTED/PERMISSION_DENIED text become
  WriteFailed naming the path; any other error is left alone."""
  import errno
  for error in (OSError(errno.ENOSPC, "No space left on device"),
                OSError(errno.EROFS, "Read-only file system"),
                ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/d/1": [OS error 28: '
                           'No space left on device]'),
                ValueError("PERMISSION_DENIED: Error opening file: Permission denied")):
    assert disk_error(error)
    with pytest.raises(WriteFailed, match=r"writing '/x/metrics.jsonl' failed \((No space|Read-only|"
                                          r"Permission).*intact \(steps 2, 4\)"):
      with writing("/x/metrics.jsonl", "writing", saved="steps 2, 4"):
        raise error
  with pytest.raises(KeyError):
    with writing(str(tmp_path), "writing"):
      raise KeyError("not a disk error")
