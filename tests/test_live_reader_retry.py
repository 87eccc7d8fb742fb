"""A reader of a live workdir whose every latest step is deleted before it is read (a run saving
every step with keep_last=1 on a loaded host, found by fault injection for issue 30, kind 6)
falls back to a step that outlived a save instead of failing after its retries."""

import contextlib

import pytest

from jaxdp.errors import JaxdpError
import jaxdp.lm.run as lm_run


class _LiveRun:
  """Step 20 is kept by retention (the last step followed by a sane loss); each listing sees a
  newer latest step, which is deleted before any read of it completes."""

  def __init__(self):
    self.latest = 20

  def checkpointer(self, workdir, create=False):
    run = self

    class _Checkpointer:
      def __init__(self):
        run.latest += 1
        self.steps = [20, run.latest]

      def latest_step(self):
        return self.steps[-1]

      def all_steps(self):
        return list(self.steps)

      def refreshed_steps(self):
        run.latest += 1
        self.steps = [20, run.latest]
        return list(self.steps)

      def close(self):
        pass

      @contextlib.contextmanager
      def hold(self, step):  # Too late here: every newer step is gone before it is read.
        yield

    return _Checkpointer()


def test_reader_falls_back_to_a_kept_step_when_every_latest_is_deleted_under_it(monkeypatch):
  run = _LiveRun()
  monkeypatch.setattr(lm_run, "Checkpointer", run.checkpointer)
  monkeypatch.setattr(lm_run.time, "sleep", lambda s: None)

  def load(workdir, checkpoints, step):
    if step != 20:
      raise JaxdpError(f"--workdir={workdir!r}: checkpoint step {step} is unreadable (not found)")
    return "params", "module", "tokenizer"

  monkeypatch.setattr(lm_run, "_load_for_inference", load)
  assert lm_run.load_step_for_inference("w") == (20, "params", "module", "tokenizer")


def test_a_given_step_deleted_under_the_reader_is_still_refused(monkeypatch):
  run = _LiveRun()
  monkeypatch.setattr(lm_run, "Checkpointer", run.checkpointer)
  monkeypatch.setattr(lm_run.time, "sleep", lambda s: None)

  def load(workdir, checkpoints, step):
    raise JaxdpError("unreadable")

  monkeypatch.setattr(lm_run, "_load_for_inference", load)
  with pytest.raises(JaxdpError, match="deleted that checkpoint"):
    lm_run.load_step_for_inference("w", 21)
