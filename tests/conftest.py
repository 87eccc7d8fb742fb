"""Eight emulated CPU devices for every test, set before JAX initialises its backend."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test session, shared with every CLI subprocess the
# tests start: the same tiny programs are compiled once, not once per process. A fresh folder per
# session, so no test passes on an executable compiled by an older version of the code.
_CACHE = tempfile.mkdtemp(prefix="jaxdp-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# jaxdp's own cache (the measured matmul peak of runtime/peaks.py) likewise: one per session, not
# the user's ~/.cache/jaxdp.
_JAXDP_CACHE = tempfile.mkdtemp(prefix="jaxdp-test-cache-")
atexit.register(shutil.rmtree, _JAXDP_CACHE, ignore_errors=True)
os.environ.setdefault("JAXDP_CACHE_DIR", _JAXDP_CACHE)
# XLA without its expensive optimisations (JAX's jax_disable_most_optimizations: LLVM at O0, no
# expensive passes), here and in every subprocess: the suite's tiny programs compile in about
# half the time (test_zero.py: 142 s of CPU -> 91 s) and compute the same functions. Tests whose
# subject is the bits XLA's default optimisations give to programs of different shapes (the
# fixed-order reduction across device counts, replay, restarts on another shape, two exchanges
# that must compute the same sums) keep the defaults: mark them `default_xla`
# (pytest_runtest_setup below switches, here and for their subprocesses). JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs every test with the defaults.
os.environ.setdefault(OPT_ENV := "JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# With those, XLA:CPU's older elemental emitter instead of its MLIR fusion emitters: the same
# functions again, at about two thirds of the compile time (test_zero.py: 98 s of CPU -> 57 s).
# XLA reads XLA_FLAGS once per process, so the flag is in the environment (for every subprocess)
# and each compilation in this process also gets it as a compile option that follows the switch
# below (default_xla tests compile with the fusion emitters, as users do).
FAST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
_FAST_COMPILES = os.environ[OPT_ENV] == "1"


def _with_fast_flags(flags: str, fast: bool) -> str:
  """An XLA_FLAGS value `flags` with conftest's FAST_XLA_FLAGS added (`fast`) or removed; any
  other flag is kept."""
  kept = [f for f in flags.split() if f != FAST_XLA_FLAGS]
  return " ".join(kept + ([FAST_XLA_FLAGS] if fast else []))


def _xla_flags(fast: bool) -> None:
  """Sets XLA_FLAGS for the subprocesses started from now on."""
  os.environ["XLA_FLAGS"] = _with_fast_flags(os.environ.get("XLA_FLAGS", ""), fast)


_xla_flags(_FAST_COMPILES)
_optimised = [not _FAST_COMPILES]  # What this process compiles with now.

import jax  # noqa: E402
from jax._src import compiler as _jax_compiler  # noqa: E402
import pytest  # noqa: E402

_get_compile_options = _jax_compiler.get_compile_options


def _compile_options(*args, **kwargs):
  """JAX's compile options, with the fusion-emitter choice of the current switch (a compile
  option, which wins over XLA_FLAGS, and is part of the persistent cache's key)."""
  overrides = dict(kwargs.pop("env_options_overrides", None) or {})
  overrides.setdefault("xla_cpu_use_fusion_emitters", _optimised[0])
  return _get_compile_options(*args, env_options_overrides=overrides, **kwargs)


_jax_compiler.get_compile_options = _compile_options

jax.config.update("jax_num_cpu_devices", 8)

from jaxdp.lm.config import load_preset  # noqa: E402

# The test command gives whole files to two pytest-xdist workers in collection order
# (--dist loadfile --no-loadscope-reorder). Longest first, so that the two workers end together
# instead of one running the long few-test files alone at the end (xdist's default order, by
# number of tests, put them last). Order from the junit times of a quiet 2-worker run (2026-12-07,
# summed per file), longest first; unlisted files follow in their usual order.
LONGEST_FILES = (
    "test_docs_run.py", "test_hangs.py", "test_launch_restarts.py", "test_fixed_order.py",
    "test_gpu_check.py", "test_multihost.py", "test_run_behaviour.py", "test_preemption.py",
    "test_zero.py", "test_models_cli.py", "test_fault.py", "test_notebooks.py",
    "test_huggingface.py", "test_eval_and_comm_state.py", "test_trustworthy_numbers.py",
    "test_measure.py", "test_object_storage.py", "test_qwen_mistral.py", "test_portable_runs.py",
    "test_resume_logs.py", "test_generic_api.py", "test_precision.py", "test_replay.py",
    "test_comm.py", "test_run_health.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  """XLA's default optimisations for tests marked `default_xla` (see OPT_ENV above), here and in
  the subprocesses they start; switched before any of the test's fixtures is built (a module's
  reference run must be compiled as the test's own). In-memory compiled programs are dropped at
  each switch, so no test runs a program compiled the other way (the persistent cache keys on
  the options: a switch back finds what it had)."""
  want = item.get_closest_marker("default_xla") is not None or not _FAST_COMPILES
  if _optimised[0] != want:
    os.environ[OPT_ENV] = "0" if want else "1"
    _xla_flags(not want)
    jax.config.update("jax_disable_most_optimizations", not want)
    jax.clear_caches()
    _optimised[0] = want


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.


@pytest.fixture
def tiny_config():
  """A fresh, mutable tiny_cpu config (each test may change fields)."""
  return load_preset("tiny_cpu")


# The canonical finished tiny run of the CLI: tiny_cpu, 2 steps on 2 emulated devices, every step
# logged, one eval batch; it ends with an evaluation and a checkpoint at step 2.
TINY_RUN_FLAGS = ("--config", "tiny_cpu", "--config.num_steps=2", "--config.eval_steps=1",
                  "--config.log_every=1", "--progress=false", "--cpu_devices", "2")


def cli_env(optimised: bool | None = None, **extra: str) -> dict:
  """The environment of a CLI subprocess: CPU devices (the command sets how many), conftest's
  shared compilation cache, and the running test's XLA optimisations, or XLA's defaults where
  `optimised` (a run whose bits another test compares with default_xla programs); `extra` adds
  variables (PYTHONPATH, ...)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  if optimised is not None:
    env[OPT_ENV] = "0" if optimised else "1"
  own = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                 if "xla_force_host_platform_device_count" not in f)  # Each command sets its own.
  env["XLA_FLAGS"] = _with_fast_flags(own, fast=env[OPT_ENV] == "1")
  return env


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, CompletedProcess) of `jaxdp train TINY_RUN_FLAGS`, trained once per test session
  (per xdist worker). Tests that only read a trained run use it as it is; a test that changes it
  (resumes, trains on, corrupts it) works on a copy (shutil.copytree into its tmp_path)."""
  import subprocess
  import sys
  workdir = tmp_path_factory.mktemp("tiny_run") / "run"
  # Compiled with XLA's defaults whatever the test that asks first: test_replay.py (default_xla)
  # replays its steps bitwise.
  done = subprocess.run([sys.executable, "-m", "jaxdp.cli.main", "train", *TINY_RUN_FLAGS,
                         "--workdir", str(workdir)], capture_output=True, text=True,
                        env=cli_env(optimised=True), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, done


@pytest.fixture
def tmpfs(tmp_path):
  """A real 4 MiB filesystem (tmpfs) mounted for the test, or a skip where mounting is denied."""
  import subprocess
  mount = str(tmp_path / "fs")
  os.makedirs(mount)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount],
                    capture_output=True).returncode != 0:
    pytest.skip("needs permission to mount a tmpfs (a real small or read-only filesystem)")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", mount], capture_output=True)


def fill_disk(mount: str) -> None:
  """Writes a filler file until the filesystem at `mount` is full (a few KiB stay free)."""
  with open(os.path.join(mount, "filler"), "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 65536)
    except OSError:
      pass


@pytest.fixture
def fill():
  return fill_disk
