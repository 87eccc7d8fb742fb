"""Checkpoints in S3 (config.checkpoint_dir=s3://...), against a real S3-compatible server
(moto_server) started here on 127.0.0.1: resume after SIGKILL bitwise; a damaged object (flipped,
deleted, truncated) falls back to the earlier step with the warning, while a read the bucket
refuses or cannot serve (credentials, an unreachable endpoint) is one line that moves nothing; a
missing, read-only or write-only bucket is one line before anything is written; a prefix belongs
to one workdir; credentials from the environment, a profile file or an instance role, without
stderr noise.
"""

import contextlib
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


@contextlib.contextmanager
def moto_server(**env):
  """A fresh moto_server on a free port of 127.0.0.1 (its environment extended by `env`);
  yields its endpoint URL."""
  if shutil.which("moto_server") is None:
    pytest.skip("moto_server (moto[server]) is not installed")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], env=dict(os.environ, **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  endpoint = f"http://127.0.0.1:{port}"
  deadline = time.time() + 60
  try:
    while True:
      try:
        urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
        break
      except OSError:
        assert time.time() < deadline and server.poll() is None, "moto_server did not start"
        time.sleep(0.2)
    yield endpoint
  finally:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3():
  """The environment of a fresh moto_server on a free port, with the bucket BUCKET."""
  with moto_server() as endpoint:
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


def test_a_damaged_object_falls_back_to_the_earlier_step_with_the_warning(s3, tmp_path, capfd):
  """Damage to a checkpoint in the bucket is detected as on a disk: a byte flipped in an array
  object (same size) is refused, at least once by the fingerprints alone (the object decodes);
  a deleted object is refused; a truncated one makes the resume warn, move the step to
  PREFIX.invalid/STEP and fall back to the step before."""
  from jaxdp.runtime.checkpoint import CorruptCheckpoint
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
  client = boto3.client("s3")
  data = [o for o in client.list_objects_v2(Bucket=BUCKET, Prefix="fallback/4/state/")["Contents"]
          if "/d/" in o["Key"]]
  key = max(data, key=lambda o: o["Size"])["Key"]
  pristine = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
  abstract = build(config(), jax.devices()[:2]).abstract_state()

  def refused(body) -> str:
    if body is None:
      client.delete_object(Bucket=BUCKET, Key=key)
    else:
      client.put_object(Bucket=BUCKET, Key=key, Body=body)
    ckpt = Checkpointer(workdir, create=False)
    try:
      with pytest.raises(CorruptCheckpoint, match="fingerprint mismatch|unreadable") as error:
        ckpt.restore(4, abstract)
    finally:
      ckpt.close()
    return str(error.value)
  # Where a flip lands decides who notices (see test_fault's flipped-bit test): several offsets.
  caught = []
  for fraction in (0.5, 0.3, 0.7, 0.4, 0.6, 0.2, 0.8, 0.45, 0.55, 0.35):
    flipped = bytearray(pristine)
    flipped[int(len(flipped) * fraction)] ^= 0x10
    caught.append("fingerprint mismatch" in refused(bytes(flipped)))
    if caught[-1]:
      break
  assert any(caught), "every flip was caught by orbax's decoder; none reached the fingerprints"
  assert "unreadable" in refused(None)
  client.put_object(Bucket=BUCKET, Key=key, Body=pristine[:len(pristine) // 2])
  capfd.readouterr()
  result = train_and_evaluate(config(num_steps=6, checkpoint_dir=url), workdir,
                              devices=jax.devices()[:2], progress=False)
  err = capfd.readouterr().err
  assert "falling back to the previous checkpoint" in err and "step 4 is unreadable" in err, err
  assert f"moved it to '{url}.invalid/4'" in err, err
  assert "<bound method" not in err  # The storage's own reason, not orbax's wrapper's.
  assert ".aws/credentials" not in err, err[-2000:]  # Nor when restoring.
  assert result["step"] == 6
  # Set aside in the run's own namespace PREFIX.invalid/, not in a folder sibling runs share.
  assert keys("fallback.invalid/4/") and not keys("checkpoints.invalid/")
  assert [r["step"] for r in read_metrics(workdir) if r.get("event") == "resume"] == [2]


def iam_checks(endpoint, on):
  """Switches moto_server's IAM checks (signatures, policies) on or off for the later requests."""
  request = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0" if on else b"inf",
                                   headers={"Content-Type": "text/plain"})
  urllib.request.urlopen(request, timeout=10)


def tiny_state():
  import jax.numpy as jnp
  state = {"w": jnp.arange(8, dtype=jnp.float32)}
  return state, {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=state["w"].sharding)}


def test_a_read_the_credentials_may_not_make_leaves_the_step_in_place(tmp_path, monkeypatch):
  """Credentials that may list and write the bucket but not read its objects (an IAM policy
  without s3:GetObject) are not damage: the resume stops in one line naming the step, its
  directory and the fix, leaves every object of both steps where it is (nothing under
  PREFIX.invalid/) and falls back to no older step."""
  from jaxdp.runtime.loop import RunRecord, restore
  state, abstract = tiny_state()
  with moto_server() as endpoint:
    client = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "x",
              "aws_secret_access_key": "x"}
    admin, iam = boto3.client("s3", **client), boto3.client("iam", **client)
    admin.create_bucket(Bucket="guarded")
    iam.create_user(UserName="lister")
    actions = ["s3:ListBucket", "s3:PutObject", "s3:DeleteObject"]  # No s3:GetObject.
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Resource": "*", "Action": actions}]}
    iam.put_user_policy(UserName="lister", PolicyName="p", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="lister")["AccessKey"]
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", key["AccessKeyId"]),
                        ("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])):
      monkeypatch.setenv(name, value)
    fresh_clients()
    try:
      # Saved and listed before the checks are on: moto_server refuses the signature of any
      # request whose query holds a "/" (a listing of run/), however it is signed; the reads
      # (a GET or HEAD of a key) are checked against the policy.
      ckpt = Checkpointer(str(tmp_path / "run"), directory="s3://guarded/run")
      for step in 1, 2:
        ckpt.save(step, state, {})
        ckpt.wait()
      saved = [o["Key"] for o in admin.list_objects_v2(Bucket="guarded", Prefix="run")["Contents"]]
      assert ckpt.refreshed_steps() == [1, 2]
      iam_checks(endpoint, on=True)
      try:
        with pytest.raises(JaxdpError) as refused:
          restore(ckpt, abstract, RunRecord())
        with pytest.raises(JaxdpError, match="cannot read checkpoint step 1 in 's3://guarded/run'"):
          ckpt.restore(1, abstract)
      finally:
        iam_checks(endpoint, on=False)
      ckpt.close()
    finally:
      fresh_clients()
    after = [o["Key"] for o in admin.list_objects_v2(Bucket="guarded", Prefix="run")["Contents"]]
  message = str(refused.value)
  assert "\n" not in message and message.startswith(
      "cannot read checkpoint step 2 in 's3://guarded/run' (An error occurred (403) "), message
  assert "the step was left in place" in message and "credentials" in message, message
  assert after == saved and [k for k in saved if k.startswith(("run/1/", "run/2/"))], after
  assert not [k for k in after if k.startswith("run.invalid/")], after


def test_an_unreachable_endpoint_leaves_the_step_in_place(s3, tmp_path, monkeypatch):
  """An endpoint that refuses connections while the resume reads the latest step is not damage
  either: one line naming the step and the connection, every object left in place, no fallback."""
  from jaxdp.runtime.loop import RunRecord, restore
  state, abstract = tiny_state()
  url = f"s3://{BUCKET}/unreachable"
  ckpt = Checkpointer(str(tmp_path / "run"), directory=url)
  for step in 1, 2:
    ckpt.save(step, state, {})
    ckpt.wait()
  saved = keys("unreachable/")
  with socket.socket() as s:  # A port that nothing listens on.
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
  monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
  monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would wait about 9 s.
  fresh_clients()
  try:
    with pytest.raises(JaxdpError) as refused:
      restore(ckpt, abstract, RunRecord())
  finally:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["AWS_ENDPOINT_URL"])
    fresh_clients()
  message = str(refused.value)
  assert "\n" not in message and message.startswith(
      f"cannot read checkpoint step 2 in '{url}' (Could not connect to the endpoint URL: "
      f"\"{closed}/"), message
  assert "the step was left in place" in message and "AWS_ENDPOINT_URL" in message, message
  assert keys("unreachable/") == saved and keys("unreachable/2/")
  assert not keys("unreachable.invalid/")
  assert ckpt.refreshed_steps() == [1, 2]
  ckpt.close()


def fresh_clients():
  """Forgets the S3 clients this process made (s3fs and etils keep one per process, bound to
  the endpoint and credentials of the environment they were made in)."""
  from etils.epath import backend
  import s3fs
  s3fs.S3FileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # noqa: SLF001


def train_in_process(capfd, workdir, url):
  """`jaxdp train` (in this process: its log goes to WORKDIR/jaxdp.log) with checkpoints at `url`."""
  handlers = logging.getLogger().handlers[:]  # `train` routes logging to its workdir: put it back.
  try:
    return run(capfd, "train", "--config", "tiny_cpu", "--cpu_devices", "8", "--workdir", workdir,
               "--progress=false", f"--config.checkpoint_dir={url}")
  finally:
    root = logging.getLogger()
    for h in root.handlers[:]:
      root.removeHandler(h)
    for h in handlers:
      root.addHandler(h)


def listing(folder):
  return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(folder) for f in files)


def test_a_missing_bucket_is_one_line_before_training(s3, tmp_path, capfd):
  """A missing bucket is refused in one line and nothing is written: a fresh workdir is not
  created; in an existing one (a previous run's, here a stand-in file) no file appears or
  changes (no jaxdp.log, metrics, events file, tokenizer/)."""
  fresh, existing = str(tmp_path / "fresh"), tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("kept")
  before = listing(existing)
  for workdir in fresh, str(existing):
    result = train_in_process(capfd, workdir, "s3://no-such-bucket/x")
    assert result.returncode == 2, result.stderr[-2000:]
    line, = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("jaxdp: error: config.checkpoint_dir='s3://no-such-bucket/x': cannot write there "
                           "(An error occurred (NoSuchBucket)"), line
    assert "bucket exists" in line
  assert not os.path.exists(fresh), os.listdir(fresh)
  assert listing(existing) == before


def test_a_missing_bucket_under_launch_is_refused_by_every_process_before_the_group_forms(s3, tmp_path):
  """Under `jaxdp launch` each process probes the bucket before it joins the group: one line
  each (no peer's timeline of a failed process), and no workdir (no hang/ heartbeat files)."""
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      [sys.executable, "-m", "jaxdp.cli.main", "launch", "--nprocs", "2", "--cpu_devices", "1", "--",
       "train", "--config", "tiny_cpu", "--workdir", workdir, "--progress=false",
       "--config.checkpoint_dir=s3://no-such-bucket/x"],
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  lines = (result.stdout + result.stderr).splitlines()
  refusal = "jaxdp: error: config.checkpoint_dir='s3://no-such-bucket/x': cannot write there"
  assert sorted(line[:4] for line in lines if line[4:].startswith(refusal)) == ["[0] ", "[1] "], lines
  assert not any("timeline" in line for line in lines), lines
  assert lines[-1].startswith("jaxdp launch: process ") and refusal in lines[-1], lines
  assert not os.path.exists(workdir), os.listdir(workdir)


def test_a_read_only_or_write_only_bucket_is_one_line_before_training(s3, tmp_path, capfd, monkeypatch):
  """Credentials that may read and list a bucket but not write it, or write but not read it (IAM
  policies, enforced by a moto_server of its own), are refused in one line each; the workdir's
  listing is unchanged."""
  with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="7") as endpoint:  # The 7 set-up calls below.
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "x",
             "aws_secret_access_key": "x"}
    boto3.client("s3", **admin).create_bucket(Bucket="guarded")
    iam = boto3.client("iam", **admin)
    users = {}
    for user, actions in (("reader", ["s3:GetObject", "s3:ListBucket"]),
                          ("writer", ["s3:PutObject", "s3:DeleteObject"])):
      iam.create_user(UserName=user)
      iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
          "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": actions}]}))
      users[user] = iam.create_access_key(UserName=user)["AccessKey"]
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("kept")
    before = listing(workdir)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    lines = {}
    for user, key in users.items():
      monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
      monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
      fresh_clients()
      try:
        result = train_in_process(capfd, str(workdir), "s3://guarded/run")
      finally:
        fresh_clients()
      assert result.returncode == 2, result.stderr[-2000:]
      lines[user], = [x for x in result.stderr.splitlines() if x.strip()]
  prefix = "jaxdp: error: config.checkpoint_dir='s3://guarded/run': "
  assert lines["reader"].startswith(prefix + "cannot write there (An error occurred (AccessDenied)"), lines
  assert lines["writer"].startswith(prefix + "cannot read or list it ("), lines
  assert "credentials must read, list and write" in lines["writer"]
  assert listing(workdir) == before


def test_credentials_from_a_profile_file_or_an_instance_role_save_without_noise(s3, tmp_path, capfd,
                                                                                 monkeypatch):
  """Without keys in the environment, tensorstore is given the source the AWS chain would use:
  its own default chain failed to read ~/.aws/credentials (the first save: PERMISSION_DENIED) and
  logged ~5 stderr lines per save for each source it tried. A checkpoint is saved and restored
  with a profile in ~/.aws/credentials, then with an instance role (moto serves the metadata
  endpoint); stderr stays empty."""
  import jax.numpy as jnp

  from jaxdp.runtime.checkpoint import s3_credentials
  state = {"w": jnp.arange(8, dtype=jnp.float32)}
  abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=state["w"].sharding)}
  monkeypatch.delenv("AWS_ACCESS_KEY_ID")
  monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
  home = tmp_path / "home"
  (home / ".aws").mkdir(parents=True)
  shared = home / ".aws" / "credentials"
  shared.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test\n")
  monkeypatch.setenv("HOME", str(home))
  for source in "profile", "imds":
    if source == "imds":
      shared.unlink()
      monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", s3["AWS_ENDPOINT_URL"])
      monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    assert s3_credentials()["type"] == source
    fresh_clients()
    capfd.readouterr()
    try:
      ckpt = Checkpointer(str(tmp_path / source), directory=f"s3://{BUCKET}/credentials-{source}")
      ckpt.save(1, state, {})
      ckpt.wait()
      back, _ = ckpt.restore(1, abstract)
      ckpt.close()
    finally:
      fresh_clients()
    assert np.asarray(back["w"]).tobytes() == np.asarray(state["w"]).tobytes()
    assert capfd.readouterr().err == "", source


def test_a_reader_without_credentials_is_one_line(s3, tmp_path, capfd, monkeypatch):
  """`jaxdp inspect` (any reader: generate, export, evaluate, replay open the same Checkpointer)
  of a workdir whose checkpoints are in a bucket it cannot read says so in one line."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints.json").write_text(json.dumps({"checkpoint_dir": f"s3://{BUCKET}/elsewhere"}))
  for name in "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY":
    monkeypatch.delenv(name)
  monkeypatch.setenv("HOME", str(tmp_path))  # No ~/.aws; AWS_EC2_METADATA_DISABLED: no instance role.
  fresh_clients()
  try:
    result = run(capfd, "inspect", str(workdir))
    with pytest.raises(JaxdpError, match="cannot read the checkpoints in 's3://jaxdp-test/elsewhere' "
                                         r"\(Unable to locate credentials\)"):
      Checkpointer(str(workdir), create=False)
  finally:
    fresh_clients()
  assert result.returncode == 2, result.stderr[-2000:]
  line, = [x for x in result.stderr.splitlines() if x.strip()]
  assert line.startswith(f"jaxdp: error: cannot read the checkpoints in 's3://{BUCKET}/elsewhere'"), line


def test_the_credentials_source_follows_the_aws_chain(tmp_path, monkeypatch):
  from jaxdp.runtime.checkpoint import s3_credentials
  for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
               "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert s3_credentials() == {"type": "imds"}
  monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/x")
  assert s3_credentials() == {"type": "ecs"}
  monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token")
  assert s3_credentials() is None  # Web identity: only tensorstore's default chain has it.
  monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE")
  (tmp_path / ".aws").mkdir()
  config = tmp_path / ".aws" / "config"
  config.write_text("[profile job]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\n")
  assert s3_credentials() is None  # A profile the config file defines (a role, sso): the default chain.
  keys = tmp_path / "keys.ini"
  keys.write_text("[default]\naws_access_key_id = a\naws_secret_access_key = b\n[job]\naws_access_key_id = c\n")
  monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(keys))
  monkeypatch.setenv("AWS_PROFILE", "job")
  assert s3_credentials() == {"type": "profile", "profile": "job", "credentials_file": str(keys),
                              "config_file": str(config)}
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
  monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
  assert s3_credentials() == {"type": "environment"}


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
  # The owner's workdir deleted and started again: the prefix holds an earlier run of this same
  # path, whose record is gone; said so (not "belongs to the run in X, not to X").
  shutil.rmtree(first)
  with pytest.raises(JaxdpError) as refused:
    train_and_evaluate(config(num_steps=6, checkpoint_dir=url), first, devices=jax.devices()[:2],
                       progress=False)
  message = str(refused.value)
  assert "\n" not in message and "earlier run in this same --workdir" in message, message
  assert f"aws s3 rm --recursive {url}/" in message and f"--config.checkpoint_dir={url}-2" in message
  assert not os.path.exists(first)


def test_a_damaged_step_is_set_aside_beside_its_own_directory(tmp_path):
  """DIR.invalid/STEP, named after the checkpoint directory: WORKDIR/checkpoints.invalid for the
  default, never a folder beside DIR that sibling runs' directories (runs/a, runs/b) would share."""
  import jax.numpy as jnp
  state = {"w": jnp.arange(4, dtype=jnp.float32)}
  for directory in (str(tmp_path / "ckpts" / "a"), None):
    ckpt = Checkpointer(str(tmp_path / "run"), directory=directory)
    ckpt.save(1, state, {})
    ckpt.wait()
    moved = ckpt.set_aside(1)
    expected = (directory or str(tmp_path / "run" / "checkpoints")) + ".invalid"
    assert moved == os.path.join(expected, "1") and os.path.isdir(moved), moved
    assert ckpt.all_steps() == []
    ckpt.close()


def test_checkpoint_dir_other_schemes_are_refused():
  from jaxdp.runtime.checkpoint import parse_checkpoint_dir
  with pytest.raises(JaxdpError, match="only s3:// and gs://"):
    parse_checkpoint_dir("ftp://host/x")
  with pytest.raises(JaxdpError, match="names no bucket"):
    parse_checkpoint_dir("gs:///x")
  assert parse_checkpoint_dir("gs://b/runs/1") == "gs://b/runs/1"
