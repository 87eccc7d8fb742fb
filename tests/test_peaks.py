"""runtime/peaks.py's measured peak (CPUs, unknown accelerators): timed once per machine and kept
in a cache file, so later runs divide by the same peak and skip the timing."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from jaxdp.runtime import peaks


@pytest.fixture
def timed(monkeypatch, tmp_path):
  """The real matmul timer, counted; a fresh cache folder and no peak remembered in-process."""
  monkeypatch.setenv("JAXDP_CACHE_DIR", str(tmp_path / "cache"))
  calls = []
  real = peaks.matmul_flops_per_sec

  def counted(*args, **kwargs):
    calls.append(args)
    return real(*args, **kwargs)

  monkeypatch.setattr(peaks, "matmul_flops_per_sec", counted)
  peaks._measured.cache_clear()
  yield calls
  peaks._measured.cache_clear()


def test_a_measured_peak_is_kept_and_the_next_run_reads_it_without_timing(timed):
  devices = jax.devices()[:2]
  first = peaks.step_peak(devices, jnp.float32)
  assert timed and first.source == "measured" and first.flops_per_sec > 0
  assert "timed at start-up" in first.detail and peaks.peak_cache_path() in first.detail
  entries = json.load(open(peaks.peak_cache_path()))
  (key, entry), = entries.items()
  assert "2 devices" in key and "float32" in key and entry["flops_per_sec"] == first.flops_per_sec
  peaks._measured.cache_clear()  # A new process on the same machine.
  count = len(timed)
  again = peaks.step_peak(devices, jnp.float32)
  assert len(timed) == count  # Read, not timed.
  assert again.flops_per_sec == first.flops_per_sec
  assert f"timed {entry['measured_utc']}" in again.detail and "delete it to time again" in again.detail


def test_another_device_group_or_dtype_is_timed_for_itself(timed):
  peaks.step_peak(jax.devices()[:2], jnp.float32)
  count = len(timed)
  peaks.step_peak(jax.devices()[:1], jnp.float32)
  assert len(timed) > count
  count = len(timed)
  peaks.step_peak(jax.devices()[:1], jnp.bfloat16)
  assert len(timed) > count
  assert len(json.load(open(peaks.peak_cache_path()))) == 3


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"x": 1}'])
def test_an_unreadable_cache_is_timed_again_and_rewritten(timed, text):
  os.makedirs(os.path.dirname(peaks.peak_cache_path()))
  with open(peaks.peak_cache_path(), "w") as f:
    f.write(text)
  peak = peaks.step_peak(jax.devices()[:1], jnp.float32)
  assert timed and peak.flops_per_sec > 0
  entries = json.load(open(peaks.peak_cache_path()))
  assert any(e.get("flops_per_sec") == peak.flops_per_sec for e in entries.values()
             if isinstance(e, dict))


def test_a_cache_folder_that_cannot_be_written_still_gives_a_measured_peak(timed, tmp_path,
                                                                          monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("JAXDP_CACHE_DIR", str(blocker / "cache"))  # Under a file: not creatable.
  peak = peaks.step_peak(jax.devices()[:1], jnp.float32)
  assert timed and peak.flops_per_sec > 0 and "kept in" not in peak.detail


def test_the_cache_folder_follows_xdg_cache_home_without_jaxdp_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv("JAXDP_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert peaks.peak_cache_path() == str(tmp_path / "jaxdp" / "peaks.json")
