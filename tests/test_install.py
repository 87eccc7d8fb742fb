"""A non-editable install works from anywhere: presets, the built-in corpus and the API.

`pip install .` into a fresh virtual environment (sharing this interpreter's dependencies, so
nothing is downloaded), then run from another directory, where the checkout is not importable.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os, jaxdp
from jaxdp.lm.config import list_presets, load_preset, preset_path
from jaxdp.data import builtin_corpus_path
assert "site-packages" in jaxdp.__file__, jaxdp.__file__
assert {"default", "tiny_cpu", "llama"} <= set(list_presets()), list_presets()
assert "site-packages" in preset_path("tiny_cpu")
assert load_preset("llama").model.family == "llama"
assert os.path.getsize(builtin_corpus_path()) > 1_000_000
assert callable(jaxdp.DataParallel) and callable(jaxdp.fit)
print("ok")
"""


@pytest.mark.slow
def test_non_editable_install_finds_presets_corpus_and_api(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  # An editable install of this checkout is on the shared site-packages path: shadow it.
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "--force-reinstall", ROOT], check=True, cwd=tmp_path,
                 env=dict(os.environ, PIP_NO_INPUT="1"))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([python, "-c", PROBE], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
  cli = subprocess.run([str(venv / "bin" / "jaxdp"), "train", "--config", "tiny_cpu",
                        "--config.num_steps=2", "--config.eval_steps=1", "--progress=false",
                        "--cpu_devices", "2", "--workdir", str(tmp_path / "run")],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert cli.returncode == 0, cli.stderr[-2000:]
