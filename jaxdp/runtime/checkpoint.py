"""Orbax checkpoints of the train state plus a JSON record of the run.

A checkpoint holds the state (params, optimizer state, step, rng) as global arrays, so it can be
restored into any sharding: another device count or strategy only changes the restore target.
The JSON item holds the config, the data position, the early-stopping record and a fingerprint
of every array.

Saves are atomic and asynchronous: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it
to `<step>` only when every item is complete, so a run killed mid-save leaves a temporary
directory (removed when the next manager starts), never a half-written step. Orbax does not
detect flipped bits in array files (tensorstore reads them back silently), hence the
fingerprints, which `restore` checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxdp.core.tree import path_names
from jaxdp.errors import JaxdpError, disk_error, os_reason, writing
from jaxdp.parallel import exchange
from jaxdp.runtime import paths

# WORKDIR/checkpoints.json records a checkpoint_dir other than WORKDIR/checkpoints (a bucket), so
# every reader of the workdir (resume, inspect, generate, export, evaluate, replay) finds it.
LOCATION_FILE = "checkpoints.json"


def parse_checkpoint_dir(value: str) -> str:
  """config.checkpoint_dir: "" (WORKDIR/checkpoints), a folder, or s3://BUCKET[/PREFIX] or
  gs://BUCKET[/PREFIX].

  Raises:
    JaxdpError: another URL scheme, or a URL without a bucket.
  """
  value = str(value)
  if "://" in value and not is_url(value):
    raise JaxdpError(f"config.checkpoint_dir={value!r}: only s3:// and gs:// URLs (or a folder) "
                     "are supported, e.g. s3://my-bucket/runs/exp1")
  if is_url(value) and not value.split("://", 1)[1].split("/", 1)[0]:
    raise JaxdpError(f"config.checkpoint_dir={value!r} names no bucket; give e.g. "
                     f"{value.split('://')[0]}://my-bucket/runs/exp1")
  return value


def is_url(path: str) -> bool:
  """Whether `path` is an object-storage URL (s3://bucket/..., gs://bucket/...)."""
  return str(path).startswith(paths.URL_SCHEMES)


def location(workdir: str) -> str:
  """Where the checkpoints of the run in `workdir` are: the checkpoint_dir its WORKDIR/
  checkpoints.json records (a bucket URL or another folder), else WORKDIR/checkpoints."""
  try:
    with open(os.path.join(workdir, LOCATION_FILE)) as f:
      found = json.load(f).get("checkpoint_dir")
    if isinstance(found, str) and found:
      return found
  except (OSError, ValueError, AttributeError):
    pass
  return os.path.join(workdir, "checkpoints")


def record_location(workdir: str, directory: str) -> None:
  """Writes WORKDIR/checkpoints.json naming `directory` (process 0; nothing for the default)."""
  default = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if jax.process_index() != 0 or (not is_url(directory) and os.path.abspath(directory) == default):
    return
  path = os.path.join(workdir, LOCATION_FILE)
  with writing(path, "writing"):
    os.makedirs(workdir, exist_ok=True)
    run_id = _claimed.get((os.path.abspath(workdir), directory))
    with open(path + ".partial", "w") as f:
      json.dump({"checkpoint_dir": directory, **({"run_id": run_id} if run_id else {})}, f)
    os.replace(path + ".partial", path)


def check_location(workdir: str, directory: str) -> None:
  """Refuses a config.checkpoint_dir `directory` other than the one where the run in `workdir`
  already keeps checkpoints: that run would start again from step 0 elsewhere while its
  metrics.jsonl goes on.

  Raises:
    JaxdpError: the workdir's checkpoints (WORKDIR/checkpoints, or the place its
      checkpoints.json records) hold steps and `directory` is another place.
  """
  def norm(path: str) -> str:
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)
  recorded = location(workdir)
  if not directory or norm(directory) == norm(recorded) or not exists(recorded):
    return
  from etils import epath
  try:
    steps = _saved_steps(epath.Path(recorded))
  except OSError:
    return  # Unreadable: the restore reports it.
  if steps:
    default = norm(recorded) == norm(os.path.join(workdir, "checkpoints"))
    keep = "without --config.checkpoint_dir" if default else f"with --config.checkpoint_dir={recorded}"
    raise JaxdpError(
        f"config.checkpoint_dir={directory!r}: the run in --workdir={workdir!r} keeps its "
        f"checkpoints in {recorded!r} (steps {', '.join(map(str, steps[-3:]))}), and this run would "
        f"start again from step 0 there; resume it {keep}, or give this run another --workdir "
        f"(--restore_from {_join(recorded, str(steps[-1]))} starts it from that checkpoint)")


def exists(path: str) -> bool:
  """Whether a checkpoint directory (local folder or bucket prefix) exists.

  Raises:
    JaxdpError: a bucket that cannot be read (credentials, endpoint, the `jaxdp[cloud]` extra).
  """
  if is_url(path):
    try:
      from etils import epath
      return epath.Path(path).exists()
    except ModuleNotFoundError as e:
      raise _needs_cloud(path, e) from None
    except Exception as e:  # noqa: BLE001 - fsspec/botocore raise many types; all mean "cannot read".
      raise JaxdpError(f"cannot read the checkpoints in {path!r} ({_first_line(e)}); check this job's "
                       "credentials for the bucket (docs/multihost.md), and AWS_ENDPOINT_URL for an "
                       "S3-compatible server") from None
  return os.path.isdir(path)


def _needs_cloud(directory: str, e: ModuleNotFoundError) -> JaxdpError:
  return JaxdpError(f"config.checkpoint_dir={directory!r} needs the object-storage filesystems "
                    f"({e.name} is missing): pip install 'jaxdp[cloud]'")


def _join(directory: str, *names: str) -> str:
  return "/".join([directory.rstrip("/"), *names]) if is_url(directory) else os.path.join(directory, *names)


_object_storage_ready = False


def _object_storage() -> None:
  """Lets orbax write s3:// as it writes gs://, once per process.

  orbax 0.12 builds tensorstore specs for gs:// only (its OCDBT spec turns "s3://b/p" into the
  local path "s3:/b/p"); tensorstore itself has an s3 driver. Three small orbax helpers are
  wrapped so an s3:// path gets {"driver": "s3", ...}, with the endpoint and region from the
  standard AWS environment (AWS_ENDPOINT_URL, AWS_REGION or AWS_DEFAULT_REGION; credentials from
  the source the AWS chain would use, `s3_credentials`). Directory operations (listing, renames,
  deletes) go through etils epath, i.e. fsspec's s3fs/gcsfs (the `jaxdp[cloud]` extra).
  """
  global _object_storage_ready
  if _object_storage_ready:
    return
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  normalize, use_remote, kvstore = ts_utils._normalize_path, ts_utils._use_gcs_driver, \
      gcs_utils.get_kvstore_for_gcs  # noqa: SLF001

  def s3_normalize(path: str) -> str:
    return "s3://" + normalize(str(path)[5:]).lstrip("/") if str(path).startswith("s3://") \
        else normalize(path)

  def s3_kvstore(path: str) -> dict[str, Any]:
    if not str(path).startswith("s3://"):
      return kvstore(path)
    bucket, _, key = str(path)[5:].partition("/")
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
      spec["endpoint"] = endpoint
    if region:
      spec["aws_region"] = region
    elif endpoint:
      spec["aws_region"] = "us-east-1"  # An S3-compatible server (MinIO, moto) ignores it.
    credentials = s3_credentials()
    if credentials is not None:
      spec["aws_credentials"] = credentials
    return spec
  ts_utils._normalize_path = s3_normalize  # noqa: SLF001
  ts_utils._use_gcs_driver = lambda d: str(d).startswith("s3://") or use_remote(d)  # noqa: SLF001
  gcs_utils.get_kvstore_for_gcs = s3_kvstore
  _object_storage_ready = True


def s3_credentials() -> dict[str, Any] | None:
  """tensorstore's `aws_credentials` for the source the standard AWS chain would use, or None
  for tensorstore's own default chain.

  The chain's order (botocore's, which the bucket probe and s3fs use): keys in the environment,
  the profile (AWS_PROFILE, else "default") in the shared credentials file
  (AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials), web identity, the container's
  endpoint, the instance role (IMDS). Naming the source matters with tensorstore 0.1.86: its
  default chain logs about five stderr lines for the sources it tries and fails, at every
  checkpoint save and restore, and it never reads a profile it is not given by name with both
  files (keys in ~/.aws/credentials alone made the first save fail, PERMISSION_DENIED).
  None (the default chain) for web identity and for profiles defined in the config file
  (role_arn, sso), which only the default chain resolves.
  """
  env = os.environ
  if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
    return {"type": "environment"}
  profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
  aws = os.path.join(os.path.expanduser("~"), ".aws")
  shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(aws, "credentials")
  config = env.get("AWS_CONFIG_FILE") or os.path.join(aws, "config")
  if _profile_has_keys(shared, profile):
    # An absent config file is named as os.devnull: tensorstore then reads nothing from it
    # instead of logging a failure to open it.
    return {"type": "profile", "profile": profile, "credentials_file": shared,
            "config_file": config if os.path.isfile(config) else os.devnull}
  if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.path.isfile(config):
    return None
  if env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
    return {"type": "ecs"}
  return {"type": "imds"}  # An instance role (the endpoint from AWS_EC2_METADATA_SERVICE_ENDPOINT).


def _profile_has_keys(path: str, profile: str) -> bool:
  """Whether the credentials file at `path` gives `profile` an access key."""
  import configparser
  parser = configparser.ConfigParser(interpolation=None)
  try:
    parser.read(path)
  except (OSError, configparser.Error):
    return False
  return parser.has_option(profile, "aws_access_key_id")


def _fresh_listings(directory: str) -> None:
  """Forgets fsspec's cached listings of the bucket: s3fs and gcsfs keep a folder's listing for
  the life of the process, so a reader would never see a live run's newer steps."""
  from etils.epath import backend
  backend.fsspec_backend.fs(directory).invalidate_cache()


def _check_writable(directory: str) -> None:
  """One small object written and deleted under `directory`: a bucket that does not exist, or
  refuses this job's writes, is one line before training starts."""
  import socket

  from etils import epath
  # One object per process: the processes of a run probe at once, and must not delete each other's.
  probe = epath.Path(_join(directory, f".jaxdp-write-check-{socket.gethostname()}-{os.getpid()}"))
  try:
    probe.write_text("ok")
    probe.unlink()
  except ModuleNotFoundError as e:
    raise _needs_cloud(directory, e) from None
  except Exception as e:  # noqa: BLE001 - fsspec/botocore raise many types; all mean "cannot write".
    raise JaxdpError(f"config.checkpoint_dir={directory!r}: cannot write there ({_first_line(e)}); check "
                     "that the bucket exists and this job's credentials may write to it (endpoint "
                     "from AWS_ENDPOINT_URL for S3-compatible servers)") from None


def _first_line(e: BaseException) -> str:
  """The first line of the innermost cause of `e` (orbax and fsspec wrap the storage's own
  error in one that says less), at most 200 characters."""
  while e.__cause__ is not None:
    e = e.__cause__
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# Failures to reach or be let into the storage, as opposed to damaged bytes: a step that cannot
# be read for these reasons is intact, and moving it aside would restart the run from an older one.
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.ECONNREFUSED, errno.ECONNRESET,
                  errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                  errno.ENETDOWN}
# botocore's classes (matched by name: botocore is the optional `jaxdp[cloud]` extra). Its
# ConnectionError and HTTPClientError cover the endpoint-connection, timeout, proxy and TLS errors.
_ACCESS_CLASSES = {f"botocore.exceptions.{name}" for name in (
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "TokenRetrievalError", "SSOError", "ConnectionError", "HTTPClientError")}
# botocore ClientError codes (a HEAD request's error has only the HTTP status as its code).
_ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "InvalidToken",
                 "ExpiredToken", "SignatureDoesNotMatch", "RequestTimeTooSkewed",
                 "ServiceUnavailable", "SlowDown", "401", "403", "503"}
# Tensorstore raises ValueError("STATUS: ..."); it retries a connection that failed and then says
# "ABORTED: All N retry attempts failed: CURL error Could not connect to server ...".
_ACCESS_STATUS = re.compile(r"(PERMISSION_DENIED|UNAUTHENTICATED|UNAVAILABLE|DEADLINE_EXCEEDED"
                            r"|ABORTED: All \d+ retry attempts failed):")


def _access_error(e: BaseException) -> str | None:
  """The storage's reason when `e` (or an exception it wraps) says the storage refused this
  job's credentials or could not be reached, not that the bytes are bad; else None."""
  seen: BaseException | None = e
  for _ in range(20):
    if seen is None:
      return None
    names = {f"{c.__module__}.{c.__name__}" for c in type(seen).__mro__}
    response = getattr(seen, "response", None)  # botocore's ClientError.
    code = str(response.get("Error", {}).get("Code")) if isinstance(response, dict) else None
    if (isinstance(seen, (PermissionError, ConnectionError, TimeoutError, socket.gaierror))
        or (isinstance(seen, OSError) and seen.errno in _ACCESS_ERRNOS)
        or names & _ACCESS_CLASSES or code in _ACCESS_CODES
        or _ACCESS_STATUS.match(str(seen))):
      # Tensorstore appends its payloads ([http_response_body='<?xml ...']) to the status.
      return re.split(r" \[\w+='", _first_line(e), maxsplit=1)[0]
    seen = seen.__cause__ or seen.__context__
  return None


def step_directory(restore_from: str) -> tuple[str, int] | None:
  """(checkpoint directory, step) of a `--restore_from` checkpoint step directory
  (".../checkpoints/<step>" or "s3://BUCKET/PREFIX/<step>", a trailing slash allowed), or None
  when its name is not a step."""
  if is_url(restore_from):
    parent, _, name = restore_from.rstrip("/").rpartition("/")
    return (parent, int(name)) if name.isdigit() and "://" in parent else None
  path = os.path.abspath(restore_from.rstrip("/"))
  name = os.path.basename(path)
  return (os.path.dirname(path), int(name)) if name.isdigit() else None


OWNER_FILE = "jaxdp-run.json"  # In a bucket prefix: which run (id, workdir, host) it belongs to.
_claimed: dict[tuple[str, str], str] = {}  # {(workdir, checkpoint_dir): run id} claimed here.


def claim(workdir: str, directory: str) -> None:
  """Before a run writes anything: a bucket prefix `directory` must be writable and belong to
  the run in `workdir` (process 0; nothing for a folder).

  The first run to use a prefix writes PREFIX/jaxdp-run.json (a run id, its workdir, its host);
  the id is recorded in WORKDIR/checkpoints.json when the run starts (`record_location`).
  Another workdir naming the same prefix would silently resume (or overwrite) that run.

  Raises:
    JaxdpError: the bucket is missing or refuses writes, or the prefix belongs to another run.
  """
  if not is_url(directory) or jax.process_index() != 0:
    return
  directory = directory.rstrip("/")
  _object_storage()
  _fresh_listings(directory)
  with _logs_held():  # botocore's INFO lines would create WORKDIR/jaxdp.log of a refused run.
    _check_writable(directory)
    if workdir:
      try:
        _check_owner(workdir, directory)
      except JaxdpError:
        raise
      except Exception as e:  # noqa: BLE001 - a policy that lets this job write but not read or list.
        raise JaxdpError(f"config.checkpoint_dir={directory!r}: cannot read or list it "
                         f"({_first_line(e)}); this job's credentials must read, list and write "
                         "the prefix (a resume reads its checkpoints back)") from None


def check_storage(directory: str) -> None:
  """In every process, before it joins the process group or writes anything: a bucket
  `directory` that does not exist or refuses writes is one line in each process (nothing for a
  folder). `claim` (process 0, later) checks the owner too.

  Raises:
    JaxdpError: the bucket is missing or refuses writes, or `jaxdp[cloud]` is not installed.
  """
  if is_url(directory):
    with _logs_held():
      _check_writable(directory.rstrip("/"))


def _check_owner(workdir: str, directory: str) -> None:
  import socket
  import uuid

  from etils import epath
  here, host = os.path.abspath(workdir), socket.gethostname()
  recorded = _recorded(workdir)
  # The workdir's own record, not what this process claimed before: the workdir may have been
  # deleted since (a second run in a notebook, a test).
  mine = recorded.get("run_id") if recorded.get("checkpoint_dir") == directory else None
  marker = epath.Path(_join(directory, OWNER_FILE))
  try:
    owner = json.loads(marker.read_text())
  except FileNotFoundError:
    owner = None
  except ValueError:
    owner = {}  # Unreadable: nobody's claim can be checked, so only a run with steps is refused.
  root = epath.Path(directory)
  steps = _saved_steps(root) if root.exists() else []
  if owner and owner.get("run_id") == mine:
    _claimed[here, directory] = mine
    return
  same_place = bool(owner) and owner.get("workdir") == here and owner.get("host") == host
  # Steps a save finished (an uncommitted one, from a run killed in its first save, is removed
  # by the next manager's start).
  committed = [s for s in steps if (root / str(s) / "commit_success.txt").exists()] if same_place else steps
  # A start of this same workdir that was refused or killed before its first checkpoint claims it again.
  again = same_place and not mine and not committed
  if same_place and not mine and not again:
    scheme = directory.split("://")[0]
    empty = (f"aws s3 rm --recursive {directory}/" if scheme == "s3"
             else f"gcloud storage rm --recursive {directory}/")
    raise JaxdpError(f"config.checkpoint_dir={directory!r} holds checkpoints (steps {committed[:5]}) of an "
                     f"earlier run in this same --workdir={here!r}, whose record of them "
                     f"({LOCATION_FILE}) is gone (the workdir was deleted or emptied): this run would "
                     f"resume them without their metrics; give this run its own prefix (e.g. "
                     f"--config.checkpoint_dir={directory}-2), or delete them first ({empty})")
  if (owner or steps) and not again and not (mine and not owner):
    whose = (f"the run in {owner.get('workdir')!r} on {owner.get('host')} (run id {owner.get('run_id')})"
             if owner else f"a run without an owner record (checkpoints at steps {steps[:5]})")
    fix = f"resume that run with --workdir {owner['workdir']}, " if owner and owner.get("workdir") else ""
    raise JaxdpError(f"config.checkpoint_dir={directory!r} belongs to {whose}, not to --workdir={here!r}: "
                     f"this run would resume or overwrite its checkpoints; give this run its own prefix "
                     f"(e.g. --config.checkpoint_dir={directory}-2), {fix}or start from one of its "
                     f"checkpoints with --restore_from {directory}/STEP and its own prefix")
  run_id = str((owner or {}).get("run_id") or uuid.uuid4().hex) if again else (mine or uuid.uuid4().hex)
  marker.write_text(json.dumps({"run_id": run_id, "workdir": here, "host": host}))
  _claimed[here, directory] = run_id


def _recorded(workdir: str) -> dict[str, Any]:
  """WORKDIR/checkpoints.json, or {} when absent or unreadable."""
  try:
    with open(os.path.join(workdir, LOCATION_FILE)) as f:
      found = json.load(f)
    return found if isinstance(found, dict) else {}
  except (OSError, ValueError):
    return {}


class _logs_held:  # noqa: N801 - used as a function-like context manager.
  """Keeps Python log records in memory while inside; replays them to the root logger's
  handlers on a normal exit, drops them when an exception leaves (the error line says it)."""

  def __enter__(self):
    import logging
    self.root = logging.getLogger()
    self.handlers = list(self.root.handlers)
    self.records: list[logging.LogRecord] = []
    holder = logging.Handler()
    holder.emit = self.records.append
    for h in self.handlers:
      self.root.removeHandler(h)
    self.root.addHandler(holder)
    self.holder = holder
    return self

  def __exit__(self, kind, *_):
    self.root.removeHandler(self.holder)
    for h in self.handlers:
      self.root.addHandler(h)
    if kind is None:
      for record in self.records:
        for h in self.handlers:
          if record.levelno >= h.level:
            h.handle(record)
    return False


class StepGone(Exception):
  """The checkpoint step a reader chose was deleted (retention of a live run) before its hold."""


class CorruptCheckpoint(Exception):
  """A checkpoint that cannot be read back exactly (truncated, unreadable or fingerprint mismatch)."""


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (narrow types widened, 64-bit types split)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprints(tree) -> Any:
  """Per array: sum_i bits[i] * (2i + 1) mod 2**32.

  Integer sums wrap exactly whatever the reduction order, so the value does not depend on the
  sharding or device count; any single flipped bit changes it (the weight is odd).
  """
  def one(x):
    bits = _as_uint32(x).ravel()
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)
  return jax.tree.map(one, tree)


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path as names: shape} of the arrays of a state, of its abstract twin or of orbax metadata."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  # An NNX Variable is a leaf here (it has .shape) but orbax's metadata names its array
  # ".../value": the same array, so the trailing "value" is dropped from both.
  return {path_names(path, drop_value=True): tuple(leaf.shape) for path, leaf in leaves
          if hasattr(leaf, "shape")}


def fingerprints(state) -> dict[str, int]:
  """{array path: fingerprint} of a state, computed on its devices (only scalars are fetched)."""
  prints = jax.device_get(_fingerprints(state))
  return {jax.tree_util.keystr(path): int(value)
          for path, value in jax.tree_util.tree_leaves_with_path(prints)}


class _Pinned:
  """Preserves the steps in a set the Checkpointer adds to (`Checkpointer.pin`)."""

  def __init__(self, steps: set[int]):
    self.steps = steps

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [checkpoint.step in self.steps for checkpoint in checkpoints]


# A reader (inspect, generate, export, evaluate, replay) of a live run's checkpoints writes a hold
# for the step it reads into DIRECTORY.holds/, and the run's retention keeps held steps: without
# it, a run saving often with a small keep_last deletes the step a reader is halfway through.
HOLDS_SUFFIX = ".holds"
HOLD_LEASE_S = 3600.0  # A hold of a reader on another host that died unseen expires after this.


def _holds_dir(directory: str) -> str:
  return directory.rstrip("/").rstrip(os.sep) + HOLDS_SUFFIX


def held_steps(directory: str) -> set[int]:
  """The steps under `directory` that a live reader holds: a hold of a process on this host
  counts while that process lives; one from another host for HOLD_LEASE_S after it was taken."""
  import socket

  from etils import epath
  holds = epath.Path(_holds_dir(directory))
  try:
    files = list(holds.iterdir()) if holds.exists() else []
  except OSError:
    return set()
  host, now, held = socket.gethostname(), time.time(), set()
  for path in files:
    try:
      record = json.loads(path.read_text())
      step, pid, when = int(record["step"]), int(record["pid"]), float(record["time"])
    except (OSError, ValueError, KeyError, TypeError):
      continue  # Being written, or being removed: the next save looks again.
    if record.get("host") == host:
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        continue  # A reader that died without removing its hold.
      except PermissionError:
        pass  # Another user's live process.
    elif now - when > HOLD_LEASE_S:
      continue
    held.add(step)
  return held


class _Held:
  """Preserves the steps live readers hold (`held_steps`), looked up at each retention."""

  def __init__(self, directory: str):
    self.directory = directory

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    held = held_steps(self.directory) if checkpoints else set()
    return [checkpoint.step in held for checkpoint in checkpoints]


def _preservation_policy(keep_last: int, keep_every: int, pinned: set[int], directory: str):
  """Keep the last `keep_last`, every `keep_every`-th step, the best by validation loss, the
  `pinned` steps and the steps readers hold."""
  kept = [policies.LatestN(n=keep_last),
          policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                         keep_checkpoints_without_metrics=False), _Pinned(pinned),
          _Held(directory)]
  if keep_every:
    kept.append(policies.EveryNSteps(interval_steps=keep_every))
  return policies.AnyPreservationPolicy(kept)


T = TypeVar("T")


def _listed(read: Callable[[], T], again: Callable[[], bool] = lambda: True) -> T:
  """`read()`, an orbax call that lists the steps and then reads each one's metadata, tried up
  to 5 times while it fails on a vanished file and `again()` holds: a live run's retention can
  delete a step between the listing and the read, and a new listing no longer shows it."""
  for attempt in range(5):
    try:
      return read()
    except FileNotFoundError:
      if attempt == 4 or not again():
        raise
      time.sleep(0.2)
  raise AssertionError("unreachable")


def _saved_steps(root: Any) -> list[int]:
  """The step folders (names that are numbers) under `root` (an etils epath.Path), ascending."""
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


class Checkpointer:
  """Saves and restores (state, meta) pairs under WORKDIR/checkpoints/<step>."""

  def __init__(self, workdir: str, keep_last: int = 3, keep_every: int = 0, *, create: bool = True,
               directory: str | None = None):
    directory = directory or location(workdir)
    self.directory = directory.rstrip("/") if is_url(directory) else os.path.abspath(directory)
    self.remote = is_url(self.directory)
    if self.remote:
      _object_storage()
      _fresh_listings(self.directory)
      if create:
        claim(workdir, self.directory)
      else:
        exists(self.directory)  # A reader without access: one line, not orbax's traceback.
    self._pinned: set[int] = set()
    options = ocp.CheckpointManagerOptions(
        create=create, cleanup_tmp_directories=create,
        best_fn=lambda m: m["eval_loss"], best_mode="min",  # Makes orbax record eval_loss per step.
        preservation_policy=_preservation_policy(keep_last, keep_every, self._pinned, self.directory),
        # A bucket has no atomic rename of a folder: each step is written in place and counts
        # as saved only once its commit_success.txt exists (orbax's protocol for GCS).
        **({"atomicity_options": ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.COMMIT_FILE)} if self.remote else {}))
    try:
      self._manager = _listed(
          lambda: ocp.CheckpointManager(
              self.directory, options=options,
              item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}),
          again=lambda: not create and exists(self.directory))  # Not a missing directory.
    except OSError as e:
      raise JaxdpError(f"--workdir: cannot create {self.directory!r} ({e.strerror}); "
                       "pick a writable directory") from e

  def all_steps(self) -> list[int]:
    """The steps of the finished checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def refreshed_steps(self) -> list[int]:
    """The finished steps as they are now (re-listed: a live run may have saved or deleted some)."""
    if self.remote:
      _fresh_listings(self.directory)
    _listed(self._manager.reload)
    return self.all_steps()

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def pin(self, steps) -> None:
    """Keeps exactly these steps (besides keep_last, keep_every and the best) through later
    saves of this manager, e.g. the last checkpoint known to be good; replaces earlier pins."""
    self._pinned.clear()
    self._pinned.update(steps)

  def save(self, step: int, state, meta: dict[str, Any], eval_loss: float | None = None) -> None:
    """Starts an asynchronous save; training continues while it is written.

    `eval_loss` (when this step was evaluated) ranks the checkpoint for keeping the best one.
    """
    self.check()  # The previous save's error, if any, before starting another.
    meta = dict(meta, fingerprints=fingerprints(state))
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          metrics=None if eval_loss is None else {"eval_loss": eval_loss})
    except Exception as e:
      # Tensorstore reports a full or read-only disk as ValueError("RESOURCE_EXHAUSTED: ...").
      if isinstance(e, OSError) or disk_error(e):
        raise self._save_error(e) from e
      raise

  def check(self) -> None:
    """Raises JaxdpError now if a background save has failed (cheap: no waiting)."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  # Orbax re-raises the thread's error.
      raise self._save_error(e) from e

  def _save_error(self, e: Exception) -> JaxdpError:
    reason = _first_line(e) if self.remote else os_reason(e, self.directory)
    kept = self.all_steps()
    fix = ("check that this job's credentials may write the bucket and that it has room" if self.remote
           else "free disk space or pick a writable --workdir")
    return JaxdpError(
        f"saving a checkpoint to {self.directory!r} failed ({reason}); {fix}, "
        f"then resume (earlier checkpoints are intact: steps {kept or 'none'})")

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The JSON record saved with `step` (config, data position, fingerprints, ...); no array
    is read.

    Raises:
      JaxdpError: the storage refused this job or could not be reached (`_refuse_access`).
    """
    try:
      meta = ocp.args.Composite(meta=ocp.args.JsonRestore())
      return self._manager.restore(step, args=meta)["meta"]
    except Exception as e:  # pylint: disable=broad-except  # Orbax and fsspec raise many types.
      self._refuse_access(step, e)
      raise

  def _refuse_access(self, step: int, e: BaseException) -> None:
    """Raises JaxdpError when reading `step` failed on access (credentials, permissions, an
    unreachable endpoint), not on its bytes: the step is intact, and treating it as corrupt
    would move it aside and silently restart the run from an older step."""
    reason = _access_error(e)
    if reason is None:
      return
    fix = ("check this job's credentials for the bucket and its network (AWS_ENDPOINT_URL for "
           "S3-compatible servers)" if self.remote else "check that this job may read it")
    raise JaxdpError(f"cannot read checkpoint step {step} in {self.directory!r} ({reason}); the "
                     f"step was left in place: {fix}, and run the same command again") from e

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """Restores into the shardings carried by `abstract_state` (ShapeDtypeStructs).

    Per-device communication state (`state.comm`, [N, ...] per device) saved on another device
    count is read with its saved shapes and mapped to this one (exchange.resize_comm_state,
    with a warning saying what changes). Raises JaxdpError if the checkpoint holds arrays of
    other shapes (another model, or a checkpoint from a jaxdp with another parameter layout),
    or communication state of another method: that is not damage, and falling back to an
    older checkpoint would silently restart the run.

    Raises:
      JaxdpError: the arrays do not fit this run (above), or the storage refused this job or
        could not be reached (credentials, permissions, network: `_refuse_access`).
      CorruptCheckpoint: the files cannot be read or an array's fingerprint differs from the
        one saved with it.
    """
    try:
      stored = _shapes(self.item_metadata(step).tree)
    except Exception as e:  # pylint: disable=broad-except  # Unreadable: corruption, below.
      self._refuse_access(step, e)
      stored = None
    resized: dict[tuple[str, ...], tuple[int, ...]] = {}
    target = abstract_state
    if stored is not None:
      wanted = _shapes(abstract_state)
      resized = self._portable_comm(step, stored, wanted)
      other = [f"{'/'.join(path)} {stored[path]} (model: {wanted[path]})" for path in sorted(wanted)
               if path in stored and stored[path] != wanted[path] and path not in resized]
      if other:
        raise JaxdpError(f"checkpoint step {step} in {self.directory!r} holds arrays of other "
                         f"shapes than this model: {'; '.join(other[:3])}{' ...' if len(other) > 3 else ''};"
                         f" it was written for another model or parameter layout; use another --workdir")
      if resized:
        target = _with_saved_shapes(abstract_state, resized)
      # Another set of arrays (another optimizer, model or state layout) is a different run,
      # not damage: falling back to an older checkpoint would silently restart from scratch.
      missing = sorted(set(wanted) - set(stored))
      extra = sorted(set(stored) - set(wanted))
      if missing or extra:
        parts = ([f"lacks {', '.join('/'.join(p) for p in missing[:3])}"] if missing else []) + \
                ([f"has {', '.join('/'.join(p) for p in extra[:3])} that this run does not"]
                 if extra else [])
        raise JaxdpError(f"checkpoint step {step} in {self.directory!r} {' and '.join(parts)}: it "
                         "was written with another optimizer, model or state layout; resume "
                         "with the config it was trained with, or use another --workdir")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # Tensorstore raises plain Exception.
      self._refuse_access(step, e)
      raise CorruptCheckpoint(f"step {step} is unreadable ({_first_line(e)})") from e
    state, meta = restored["state"], restored["meta"]
    saved = meta.get("fingerprints")
    if saved is not None:
      bad = [path for path, value in fingerprints(state).items() if saved.get(path) != value]
      if bad:
        raise CorruptCheckpoint(f"step {step} has corrupted arrays (fingerprint mismatch): "
                                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    if resized:
      state = _resize_comm(state, abstract_state)
    return state, meta

  def _portable_comm(self, step: int, stored: dict, wanted: dict) -> dict:
    """{path: saved shape} of the per-device comm leaves to map from another device count;
    JaxdpError for comm state that cannot be carried over (another method's, or other sizes)."""
    def kinds(shapes):
      return {path[1] for path in shapes if len(path) > 1 and path[0] == "comm"}
    where = f"checkpoint step {step} in {self.directory!r}"
    saved_kinds, wanted_kinds = kinds(stored), kinds(wanted)
    if saved_kinds != wanted_kinds:
      def names(k):
        return ", ".join(f"{n} ({exchange.COMM_STATE_SOURCES.get(n, 'unknown')})"
                         for n in sorted(k)) or "none"
      raise JaxdpError(
          f"{where} keeps per-device communication state {names(saved_kinds)}, but this run "
          f"keeps {names(wanted_kinds)}: the communication settings changed, and one method's "
          "per-device state cannot be carried to another's; resume with the settings the "
          "checkpoint was saved with (`jaxdp inspect` shows its config), or use another --workdir")
    comm = {path: shape for path, shape in stored.items() if path[0] == "comm"}
    if not comm or all(wanted.get(path) == shape for path, shape in comm.items()):
      return {}
    if any(path not in wanted for path in comm):
      return {}  # Another tree layout: the other-shapes check or the restore reports it.
    saved_n = {shape[0] for shape in comm.values()}
    new_n = {wanted[path][0] for path in comm}
    other = [f"{'/'.join(path)} {shape} (this run: {wanted[path]})" for path, shape in comm.items()
             if shape[1:] != wanted[path][1:]]
    if other or len(saved_n) != 1 or len(new_n) != 1:
      causes = sorted({exchange.COMM_STATE_SOURCES.get(path[1], path[1]) for path in comm})
      raise JaxdpError(
          f"{where} holds per-device communication state of other sizes than this run's, beyond "
          f"the device count: {'; '.join(other[:3]) or sorted(comm.items())[:3]}; its settings "
          f"({'; '.join(causes)}) or the model changed, and the state cannot be mapped; resume "
          "with the settings the checkpoint was saved with, or use another --workdir")
    for note in exchange.resize_notes(saved_kinds, saved_n.pop(), new_n.pop()):
      _warn(f"checkpoint step {step}: {note}")
    return comm

  def set_aside(self, step: int) -> str:
    """Moves an invalid checkpoint out of the way (kept for inspection), to DIRECTORY.invalid/STEP
    (WORKDIR/checkpoints.invalid/STEP by default, PREFIX.invalid/STEP in a bucket): the run's own
    name, not a folder beside DIRECTORY that sibling runs' directories would share. Returns it."""
    target = _join(self.directory + ".invalid", str(step))
    if self.remote:
      import fsspec
      if jax.process_index() == 0:
        fs, source = fsspec.filesystem(self.directory.split("://")[0]), _join(self.directory, str(step))
        # Uncommitted first (readers then skip it), then copied aside object by object: a
        # bucket has no rename of a folder.
        fs.rm(_join(source, "commit_success.txt"))
        if fs.exists(target):
          fs.rm(target, recursive=True)
        fs.copy(source, target, recursive=True)
        fs.rm(source, recursive=True)
    if jax.process_index() == 0 and not self.remote:
      if os.path.exists(target):
        shutil.rmtree(target)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxdp_set_aside_{step}")
    self._manager.reload()
    return target

  def eval_loss(self, step: int) -> float | None:
    """The validation loss recorded with `step` (None if it was not evaluated)."""
    return (self._manager.metrics(step) or {}).get("eval_loss")

  def item_metadata(self, step: int):
    """Orbax's metadata of the state (shapes, dtypes) without reading any array."""
    return self._manager.item_metadata(step)["state"]

  def wait(self) -> None:
    """Blocks until the pending save is written; raises JaxdpError if it (or an earlier one) failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e
    self.check()

  def close(self) -> None:
    """Releases orbax's manager (call `wait` first to be sure the last save landed)."""
    self._manager.close()

  @contextlib.contextmanager
  def hold(self, step: int) -> Iterator[None]:
    """While inside, the run writing these checkpoints keeps `step` (its retention skips held
    steps: `held_steps`). On entry the step is listed again after the hold is in place.

    Raises:
      StepGone: `step` was deleted before the hold was seen (the caller may read another).
    """
    import socket
    import uuid

    from etils import epath
    path = epath.Path(_holds_dir(self.directory)) / f"{step}-{uuid.uuid4().hex[:12]}.json"
    record = {"step": step, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(2):  # Twice: another reader may remove the empty folder in between.
      try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        break
      except OSError:
        pass
    else:
      path = None  # A read-only place: no hold; the reader's retries still apply.
    try:
      if step not in self.refreshed_steps():
        raise StepGone(step)
      yield
    finally:
      if path is not None:
        try:
          path.unlink()
          if not self.remote:
            path.parent.rmdir()  # Only when no other reader holds a step: leaves no trace.
        except OSError:
          pass


def describe(path: str) -> list[dict[str, Any]]:
  """Each checkpoint under `path` (a workdir or its checkpoints/ folder), read from metadata only.

  [{step, meta (config, examples_seen, ...), eval_loss, disk_bytes,
    arrays: [(path, shape, dtype, bytes)]}], oldest first; no array is loaded.
  """
  directory = location(path) if not is_url(path) else path
  directory = directory if exists(directory) else path
  if not exists(directory):
    raise JaxdpError(f"{path!r} is not a directory; give a --workdir or its checkpoints/ folder")
  checkpoints = Checkpointer("", create=False, directory=directory)
  try:
    steps = []
    for step in checkpoints.all_steps():
      try:
        steps.append(_describe_step(checkpoints, step))
      except Exception:  # noqa: BLE001 - see below.
        # A live run's retention deleted it (file by file) while it was read: the steps still
        # there are shown. A step still listed a moment later is read again (damage raises).
        time.sleep(0.2)
        if step in checkpoints.refreshed_steps():
          steps.append(_describe_step(checkpoints, step))
    return steps
  finally:
    checkpoints.close()


def _describe_step(checkpoints: Checkpointer, step: int) -> dict[str, Any]:
  tree = checkpoints.item_metadata(step).tree
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  arrays = [(jax.tree_util.keystr(p), tuple(a.shape), str(np.dtype(a.dtype)),
             int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize)
            for p, a in leaves]
  step_dir = _join(checkpoints.directory, str(step))
  if checkpoints.remote:
    import fsspec
    disk = int(fsspec.filesystem(step_dir.split("://")[0]).du(step_dir))
  else:
    disk = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(step_dir) for f in files)
  return {"step": step, "meta": checkpoints.restore_meta(step), "arrays": arrays,
          "eval_loss": checkpoints.eval_loss(step), "disk_bytes": disk}


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"jaxdp: warning: {message}", file=sys.stderr, flush=True)


def _replicated_like(sharding):
  """Every device of `sharding`'s mesh holds the whole array (saved shapes need not divide it)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding


def _with_saved_shapes(abstract_state, saved: dict):
  """`abstract_state` whose leaves at the paths of `saved` take the saved shape, replicated."""
  def leaf(path, x):
    shape = saved.get(path_names(path))
    if shape is None:
      return x
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=_replicated_like(x.sharding))
  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def _resize_comm(state, abstract_state):
  """`state` whose comm leaves (read with their saved device count) are mapped to the device
  count and shardings of `abstract_state` (exchange.resize_comm_state)."""
  out = jax.tree.map(lambda a: a.sharding, abstract_state.comm)
  num_devices = jax.tree.leaves(abstract_state.comm)[0].shape[0]
  resize = jax.jit(lambda c, p: exchange.resize_comm_state(c, p, num_devices), out_shardings=out)
  return state.replace(comm=resize(state.comm, state.params))
