"""Checkpoints in S3 (config.checkpoint_dir=s3://...), against a real S3-compatible server
(moto_server) started here on 127.0.0.1: resume after SIGKILL bitwise, a deleted object falls
back to the earlier step with the warning, a missing bucket is one line before training.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from cli_inprocess import run
import jax
import numpy as np
import pytest

from jaxdp.errors import JaxdpError
from jaxdp.lm import build, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime.checkpoint import Checkpointer, describe, location
from jaxdp.runtime.metrics import read_metrics

pytest.importorskip("s3fs", reason="the jaxdp[cloud] extra (s3fs) is not installed")
boto3 = pytest.importorskip("boto3")
pytestmark = pytest.mark.multiprocess  # Every test here talks to a moto_server process.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "jaxdp-test"
OVERRIDES = {"num_steps": 6, "lr_decay_steps": 6, "log_every": 2, "eval_every": 0,
             "checkpoint_every": 2}


def config(**overrides):
  c = load_preset("tiny_cpu")
  for k, v in {**OVERRIDES, **overrides}.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def s3():
  """The environment of a fresh moto_server on a free port, with the bucket BUCKET."""
  if shutil.which("moto_server") is None:
    pytest.skip("moto_server (moto[server]) is not installed")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  endpoint = f"http://127.0.0.1:{port}"
  deadline = time.time() + 60
  while True:
    try:
      urllib.request.urlopen(endpoint, timeout=2)
      break
    except OSError:
      assert time.time() < deadline and server.poll() is None, "moto_server did not start"
      time.sleep(0.2)
  env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
         "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  boto3.client("s3").create_bucket(Bucket=BUCKET)
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


def keys(prefix):
  found = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
  return [o["Key"] for o in found]


def restored(workdir, step):
  ckpt = Checkpointer(workdir, create=False)
  state, _ = ckpt.restore(step, build(config(), jax.devices()[:2]).abstract_state())
  ckpt.close()
  return jax.device_get(state)


def cli(workdir, *flags, **env):
  args = [sys.executable, "-m", "jaxdp.cli.main", "train", "--config", "tiny_cpu", "--cpu_devices", "2",
          "--workdir", workdir, "--progress=false", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
          *flags]
  return subprocess.run(args, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **env),
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_mid_run_resumes_from_the_bucket_bitwise(s3, tmp_path):
  """`jaxdp train` with checkpoints in the bucket, SIGKILLed before update 5 (saved: 2, 4), then
  the same command: the final state is bitwise an uninterrupted local run's, and every reader of
  the workdir (resume, inspect's describe) finds the bucket from WORKDIR/checkpoints.json."""
  reference, workdir = str(tmp_path / "local"), str(tmp_path / "run")
  url = f"s3://{BUCKET}/sigkill"
  assert cli(reference).returncode == 0
  killed = cli(workdir, f"--config.checkpoint_dir={url}", JAXDP_TEST_DIE_AT_STEP="0:5")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert location(workdir) == url and not os.path.exists(os.path.join(workdir, "checkpoints"))
  # Step 4's asynchronous save may not have committed before the kill: then it is not listed.
  listed = [d["step"] for d in describe(workdir)]
  assert listed in ([2], [2, 4]), listed
  resumed = cli(workdir)  # No flag: the workdir records where its checkpoints are.
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resuming at step {listed[-1]}" in resumed.stdout + resumed.stderr
  assert f"{url}/6" in resumed.stdout + resumed.stderr  # The summary names the bucket's step.
  for a, b in zip(jax.tree.leaves(restored(workdir, 6)), jax.tree.leaves(restored(reference, 6)),
                  strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  strip = lambda rs: [{k: r.get(k) for k in ("step", "train_loss", "grad_norm", "lr")}  # noqa: E731
                      for r in rs if "train_loss" in r]
  assert strip(read_metrics(workdir)) == strip(read_metrics(reference))


def test_a_deleted_object_falls_back_to_the_earlier_step_with_the_warning(s3, tmp_path, capfd):
  workdir = str(tmp_path / "run")
  url = f"s3://{BUCKET}/fallback"
  capfd.readouterr()
  train_and_evaluate(config(num_steps=4, checkpoint_dir=url), workdir, devices=jax.devices()[:2],
                     progress=False)
  saving = capfd.readouterr()
  # Credentials from the environment are given to tensorstore: its default chain printed one
  # "Failed to open file ... .aws/credentials" line per array written (at fd level, from C++).
  assert ".aws/credentials" not in saving.err and "Failed to open" not in saving.err, saving.err[-2000:]
  assert f"checkpoints: {url}" in saving.out  # The banner names where checkpoints really go.
  data = [k for k in keys("fallback/4/state/") if "/d/" in k]
  assert data
  boto3.client("s3").delete_object(Bucket=BUCKET, Key=data[0])
  capfd.readouterr()
  result = train_and_evaluate(config(num_steps=6, checkpoint_dir=url), workdir,
                              devices=jax.devices()[:2], progress=False)
  err = capfd.readouterr().err
  assert "falling back to the previous checkpoint" in err and "step 4" in err, err
  assert ".aws/credentials" not in err, err[-2000:]  # Nor when restoring.
  assert result["step"] == 6
  # Set aside in the run's own namespace PREFIX.invalid/, not in a folder sibling runs share.
  assert keys("fallback.invalid/4/") and not keys("checkpoints.invalid/")
  assert [r["step"] for r in read_metrics(workdir) if r.get("event") == "resume"] == [2]


def test_a_missing_bucket_is_one_line_before_training(s3, tmp_path, capfd):
  """`jaxdp train` (in this process: its log goes to WORKDIR/jaxdp.log) refuses a missing bucket
  in one line and writes nothing: no workdir, no jaxdp.log, no tokenizer/."""
  workdir = str(tmp_path / "run")
  handlers = logging.getLogger().handlers[:]  # `train` routes logging to its workdir: put it back.
  try:
    result = run(capfd, "train", "--config", "tiny_cpu", "--cpu_devices", "8", "--workdir", workdir,
                 "--progress=false", "--config.checkpoint_dir=s3://no-such-bucket/x")
  finally:
    root = logging.getLogger()
    for h in root.handlers[:]:
      root.removeHandler(h)
    for h in handlers:
      root.addHandler(h)
  assert result.returncode == 2, result.stderr[-2000:]
  line, = [x for x in result.stderr.splitlines() if x.strip()]
  assert line.startswith("jaxdp: error: config.checkpoint_dir='s3://no-such-bucket/x': cannot write there")
  assert "bucket exists" in line
  assert not os.path.exists(workdir), os.listdir(workdir)


def test_a_prefix_belongs_to_one_workdir(s3, tmp_path, capfd):
  """A second workdir naming a prefix another run uses is refused in one line (naming both and
  the fixes) instead of silently resuming that run; the owner itself resumes; --restore_from
  the bucket starts the second workdir from that run's checkpoint under its own prefix."""
  first, second = str(tmp_path / "first"), str(tmp_path / "second")
  url = f"s3://{BUCKET}/shared"
  train_and_evaluate(config(num_steps=2, checkpoint_dir=url), first, devices=jax.devices()[:2],
                     progress=False)
  marker = json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key="shared/jaxdp-run.json")["Body"].read())
  with open(os.path.join(first, "checkpoints.json")) as f:
    assert json.load(f) == {"checkpoint_dir": url, "run_id": marker["run_id"]}
  assert marker["workdir"] == os.path.abspath(first)
  with pytest.raises(JaxdpError) as refused:
    train_and_evaluate(config(num_steps=4, checkpoint_dir=url), second, devices=jax.devices()[:2],
                       progress=False)
  message = str(refused.value)
  assert "\n" not in message and f"belongs to the run in {os.path.abspath(first)!r}" in message
  assert os.path.abspath(second) in message and "--restore_from" in message and "own prefix" in message
  assert not os.path.exists(second)
  assert [k for k in keys("shared/") if k.split("/")[1].isdigit()] and keys("shared/2/")
  # The owner resumes (no flag: its workdir records the prefix and the run id).
  assert train_and_evaluate(config(num_steps=4), first, devices=jax.devices()[:2],
                            progress=False)["step"] == 4
  # Starting from the other run's checkpoint, under a prefix of its own.
  result = train_and_evaluate(config(num_steps=6, checkpoint_dir=f"{url}-2"), second,
                              devices=jax.devices()[:2], progress=False, restore_from=f"{url}/4")
  assert result["step"] == 6 and keys("shared-2/6/") and not keys("shared/6/")


def test_checkpoint_dir_other_schemes_are_refused():
  from jaxdp.runtime.checkpoint import parse_checkpoint_dir
  with pytest.raises(JaxdpError, match="only s3:// and gs://"):
    parse_checkpoint_dir("ftp://host/x")
  with pytest.raises(JaxdpError, match="names no bucket"):
    parse_checkpoint_dir("gs:///x")
  assert parse_checkpoint_dir("gs://b/runs/1") == "gs://b/runs/1"
