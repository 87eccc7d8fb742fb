"""tools/gpu_check.sh --dry-run: every check of the GPU script runs on the CPU at tiny sizes and the
report is complete (every check present and green, every result field present, marked as a dry
run), so the script is ready for the first GPU and cannot rot."""

import importlib.util
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def gpu_check_module():
  spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_dry_run_writes_a_complete_green_report(tmp_path):
  out = tmp_path / "gpu_check"
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("JAX_PLATFORMS", None)  # The script itself pins the dry run to the CPU.
  proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run"], capture_output=True, text=True,
                        env=env, timeout=900)
  assert (out / "gpu_check.json").exists(), proc.stdout + proc.stderr
  report = json.loads((out / "gpu_check.json").read_text())
  log = (out / "gpu_check.log").read_text()
  gc = gpu_check_module()
  assert report["dry_run"] is True
  assert list(report["checks"]) == list(gc.CHECKS)
  for name, check in report["checks"].items():
    assert check["status"] == "pass", (name, check["failures"], log[-3000:])
    missing = [f for f in gc.FIELDS[name] if f not in check["results"]]
    assert not missing, (name, missing)
    assert f"===== {name}:" in log
  assert report["all_green"] and proc.returncode == 0, proc.stdout
  # The numbers a reader looks for first.
  head = report["headline"]
  assert head["tokens_per_sec"] > 0 and 0 < head["mfu_measured_peak"] < 1
  precisions = report["checks"]["precisions"]["results"]
  assert all(precisions[p]["finite"] and precisions[p]["decreasing"] for p in ("fp32", "bf16", "fp16"))
  zero = report["checks"]["zero"]["results"]
  assert zero["num_devices"] == 2 and set(zero["losses"]) == {"dp", "zero1", "zero2", "zero3"}
  assert zero["collectives"]["zero3"].get("all-gather", 0) > 0  # zero3 gathers parameters.
  assert report["checks"]["generate"]["results"]["tokens_per_wall_sec"] > 0


def test_usage_errors_exit_2(tmp_path):
  for argv in ([], ["--dry-run"], [str(tmp_path), "--bogus"]):
    proc = subprocess.run(["bash", SCRIPT] + argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "gpu_check.sh" in proc.stderr + proc.stdout, argv


def test_a_spent_budget_skips_checks_but_still_writes_every_field(tmp_path):
  proc = subprocess.run(["python", os.path.join(ROOT, "tools", "gpu_check.py"), str(tmp_path),
                         "--dry-run", "--budget_s", "1"], capture_output=True, text=True, timeout=60)
  report = json.loads((tmp_path / "gpu_check.json").read_text())
  gc = gpu_check_module()
  assert proc.returncode == 1 and not report["all_green"]
  for name in gc.CHECKS:
    check = report["checks"][name]
    assert check["status"] == "skipped" and "time budget" in check["failures"][0]
    assert set(check["results"]) == set(gc.FIELDS[name])
