"""Every kind of writer jaxdp has, on a real full disk (issue 30, kind 1): `jaxdp prepare` and
`jaxdp export` into a full --out, a run whose writes fail mid-run, TensorBoard's writer thread, and a
hang report into a full hang/ folder. Each is one line naming the path (exit status 2, or the
hang report's line inside the watchdog's own), no traceback, nothing half-written that a later
command would accept, and the same command works once space is freed.

The disk is conftest's 4 MiB `tmpfs` (skipped where mounting is denied). Checkpoint saves on a
full disk are tests/test_disk_full.py's.
"""

import os

from cli_inprocess import run
import jax
import pytest

from jaxdp.errors import JaxdpError, WriteFailed
from jaxdp.lm import hf_export, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime import loop
from jaxdp.runtime.heartbeat import Monitor
from jaxdp.runtime.hooks import Hook
from jaxdp.runtime.metrics import MetricsWriter

EXPORTED = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json")


def _nearly_fill(mount: str, fill, left: int) -> None:
  """Fills `mount`, then frees `left` bytes: a write larger than that fails part way."""
  fill(mount)
  filler = os.path.join(mount, "filler")
  os.truncate(filler, max(0, os.path.getsize(filler) - left))


def _one_line(done, path: str) -> str:
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2, done.stderr
  assert "Traceback" not in done.stderr, done.stderr
  assert lines and lines[-1].startswith("jaxdp: error: "), done.stderr
  assert [line for line in lines if line.startswith("jaxdp: error: ")] == lines[-1:], done.stderr
  assert path in lines[-1] and "No space left on device" in lines[-1], lines[-1]
  return lines[-1]


class _FillAt(Hook):
  def __init__(self, step, fill):
    self.step, self.fill = step, fill

  def after_step(self, ctx, step, metrics):
    if step == self.step:
      self.fill()


@pytest.mark.parametrize("writer", ["prepare", "export", "run_logs", "tensorboard", "hang_report"])
def test_a_full_disk_is_one_line_for_every_writer(writer, tmpfs, fill, tmp_path, capfd,
                                                  monkeypatch):
  if writer == "prepare":
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 8000)  # ~350 KB of tokens.
    out = os.path.join(tmpfs, "data")
    _nearly_fill(tmpfs, fill, 64 * 1024)  # tokens.bin (uint16: ~700 KB) fails part way.
    print(_one_line(run(capfd, "prepare", str(text), "--out", out, "--progress=false"), out))
    # Nothing a training run would take: no manifest, no tokens (prepare removes its own files).
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert not os.path.exists(os.path.join(out, "tokens.bin"))
    os.remove(os.path.join(tmpfs, "filler"))
    assert run(capfd, "prepare", str(text), "--out", out, "--progress=false").returncode == 0
    assert os.path.exists(os.path.join(out, "manifest.json"))
  elif writer == "export":
    c = load_preset("tiny_cpu")  # Exportable (learned positions); the final state is saved.
    c.num_steps, c.eval_every, c.checkpoint_every, c.model.positions = 1, 0, 0, "learned"
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir, devices=jax.devices()[:1], progress=False)
    out = os.path.join(tmpfs, "hf")
    _nearly_fill(tmpfs, fill, 16 * 1024)  # The weights (hundreds of KB) fail part way.
    with pytest.raises(WriteFailed) as failed:
      hf_export.export(workdir, out)
    message = str(failed.value)
    print(message)
    assert "\n" not in message and out in message and "No space left" in message, message
    # No config.json (what transformers loads first) nor any other file of a half export.
    assert not [n for n in os.listdir(out) if n.split(".partial-")[0] in EXPORTED], os.listdir(out)
    os.remove(os.path.join(tmpfs, "filler"))
    assert set(hf_export.export(workdir, out)["files"]) == set(EXPORTED)
    assert set(EXPORTED) <= set(os.listdir(out))
  elif writer == "run_logs":
    # No checkpoints: what fails are metrics.jsonl, TensorBoard's thread, the run's log.
    c = load_preset("tiny_cpu")
    for k, v in {"num_steps": 12, "lr_decay_steps": 12, "log_every": 1, "eval_every": 0,
                 "checkpoint_every": 0}.items():
      c[k] = v
    workdir = os.path.join(tmpfs, "run")
    original = loop.builtin_hooks
    monkeypatch.setattr(loop, "builtin_hooks", lambda ctx, user, log, *rest: original(
        ctx, list(user) + [_FillAt(2, lambda: fill(tmpfs))], log, *rest))
    with pytest.raises(WriteFailed) as failed:
      train_and_evaluate(c, workdir, devices=jax.devices()[:2], progress=False)
    message = str(failed.value)
    print(message)
    assert "\n" not in message and workdir in message and "No space left" in message, message
    assert isinstance(failed.value, JaxdpError)  # The CLI's one line and exit status 2.
  elif writer == "tensorboard":
    # TensorBoard writes on its own thread: its refusal is raised at the next record. 100
    # scalars are ~1 KB of metrics.jsonl (which fits in its last page) but ~5 KB of events.
    writer_ = MetricsWriter(os.path.join(tmpfs, "run"))
    writer_.write({"step": 0, "loss": 1.0})
    fill(tmpfs)
    with pytest.raises(WriteFailed) as failed:
      for step in range(1, 50):
        writer_.write({"step": step, **{f"m{k}": 1.0 for k in range(100)}})
    writer_.close()
    message = str(failed.value)
    assert "\n" not in message and "No space left" in message, message
    assert os.path.join(tmpfs, "run", "events.out.tfevents.") in message, message
  else:
    hang = os.path.join(tmpfs, "w")
    monitor = Monitor(hang, timeout_s=10.0)
    os.makedirs(os.path.join(hang, "hang"))
    fill(tmpfs)
    assert monitor.dump("a test") is None
    print(monitor.report_failure)
    assert "\n" not in monitor.report_failure, monitor.report_failure
    assert os.path.join(hang, "hang", "process-0.txt") in monitor.report_failure
    assert "No space left on device" in monitor.report_failure
    assert os.listdir(os.path.join(hang, "hang")) == []  # No half report.
    os.remove(os.path.join(tmpfs, "filler"))
    assert monitor.dump("a test") == os.path.join(hang, "hang", "process-0.txt")
