"""What a user watches: TensorBoard events beside metrics.jsonl, and `plot` of several runs."""

import glob
import os
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxdp.analysis.viz import loss_figure, save_loss_plot
from jaxdp.cli.main import main
from jaxdp.errors import JaxdpError
from jaxdp.lm import train_and_evaluate
from jaxdp.runtime.metrics import MetricsWriter, read_metrics


def read_events(workdir: str) -> list:
  """Every Event of the TensorBoard files in `workdir`, parsed from the TFRecord framing
  (u64 length, u32 crc, payload, u32 crc) with the protobuf schema TensorBoard reads."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      assert len(payload) == length, f"truncated record in {path}"
      events.append(event_pb2.Event.FromString(payload))
      offset += 12 + length + 4
  return events


def scalars(workdir: str) -> dict[str, dict[int, float]]:
  out: dict[str, dict[int, float]] = {}
  for event in read_events(workdir):
    for value in event.summary.value:
      if value.HasField("simple_value"):
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A real tiny run of 10 steps on 2 devices, and a second run's metrics written through
  MetricsWriter (its losses 10% higher): plot reads only metrics.jsonl, so one training suffices."""
  from jaxdp.lm.config import load_preset
  config = load_preset("tiny_cpu")
  config.num_steps, config.eval_every = 10, 5
  real = str(tmp_path_factory.mktemp("runs") / "tiny")
  train_and_evaluate(config, real, devices=jax.devices()[:2], progress=False)
  other = str(tmp_path_factory.mktemp("runs") / "other")
  writer = MetricsWriter(other)
  for record in read_metrics(real):
    writer.write({k: v * 1.1 if k.endswith("_loss") else v for k, v in record.items()})
  writer.close()
  return [real, other]


def test_tensorboard_events_hold_every_logged_scalar(runs):
  records = read_metrics(runs[0])
  logged = scalars(runs[0])
  expected_tags = {"train_loss", "lr", "grad_norm", "tokens_per_sec", "eval_loss"}
  assert expected_tags <= set(logged)
  checked = 0
  for record in records:
    if "event" in record:
      continue
    for field, value in record.items():
      if field == "step":
        continue
      if isinstance(value, list):  # Per-device or per-process values: one tag per index.
        for i, v in enumerate(value):
          np.testing.assert_allclose(logged[f"{field}/{i}"][record["step"]], v, rtol=1e-6)
      else:
        np.testing.assert_allclose(logged[field][record["step"]], value, rtol=1e-6)  # float32.
      checked += 1
  assert checked >= 4 * 2 + 2  # Train fields at steps 5 and 10, eval loss at 5 and 10.


def test_tensorboard_events_record_the_start_event_as_text(runs):
  texts = [v.tensor.string_val[0].decode() for e in read_events(runs[0]) for v in e.summary.value
           if v.tag.startswith("events")]
  assert any('"event": "start"' in t and '"strategy": "dp"' in t for t in texts)


def test_metrics_writer_logs_any_numeric_field_as_a_scalar(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  writer.write({"step": 3, "train_loss": np.float32(2.5), "mfu": 0.41, "note": "text"})
  writer.close()
  logged = scalars(str(tmp_path))
  assert logged["mfu"] == {3: pytest.approx(0.41)}
  assert logged["train_loss"] == {3: 2.5}
  assert "note" not in logged


def test_plot_draws_one_line_per_run_in_each_panel(runs):
  figure = loss_figure(runs)
  train_axes, eval_axes = figure.axes
  for axes, field in ((train_axes, "train_loss"), (eval_axes, "eval_loss")):
    lines = axes.get_lines()
    assert [line.get_label() for line in lines] == ["tiny", "other"]
    for line, workdir in zip(lines, runs):
      logged = [(r["step"], r[field]) for r in read_metrics(workdir) if field in r]
      np.testing.assert_allclose(np.stack(line.get_data(), axis=1), logged)


def test_plot_command_writes_a_png(runs, tmp_path):
  out = str(tmp_path / "curves.png")
  assert main(["jaxdp", "plot", *runs, "--out", out]) == 0
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_workdir_without_metrics_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(JaxdpError, match="has no metrics.jsonl"):
    save_loss_plot([str(tmp_path)], str(tmp_path / "x.png"))
  assert main(["jaxdp", "plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
  assert "jaxdp: error: plot:" in capsys.readouterr().err


def test_plot_out_under_a_file_or_dangling_symlink_is_one_line(tmp_path):
  afile = tmp_path / "notes.txt"
  afile.write_text("x")
  dangling = tmp_path / "dangling"
  dangling.symlink_to(tmp_path / "missing")
  for out in (afile / "loss.png", dangling / "loss.png", afile / "sub" / "loss.png"):
    with pytest.raises(JaxdpError, match="which is a file or a dangling symlink"):
      save_loss_plot([str(tmp_path)], str(out))
  assert not (tmp_path / "missing").exists()
