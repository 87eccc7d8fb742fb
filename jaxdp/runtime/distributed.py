"""Joining a multi-process run: explicit flags, SLURM, Open MPI, or a single process.

`resolve` is pure: it reads the flags and a copy of the environment and says which process group
this process belongs to. `initialize` then calls `jax.distributed.initialize` before any device is
touched. JAX's own failure modes here are a native abort (unreachable coordinator) or a crash
(port taken), so both are checked first and turned into one-line errors naming the address.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
import sys
import threading
from typing import Mapping

from jaxdp.errors import JaxdpError

# Ports derived from a cluster job id fall in the top 4096 (ephemeral) ports, as JAX's own
# cluster detection does, so that every task of a job computes the same port.
DERIVED_PORT_BASE = 65536 - 4096


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Who this process is in a run."""
  num_processes: int
  process_id: int
  coordinator: str | None = None  # "HOST:PORT" served by process 0; None for one process.
  source: str = "single"  # Where the values came from: "single", "flags", "slurm" or "ompi".
  local_device_ids: tuple[int, ...] | None = None  # GPUs this process drives; None: all it sees.


def split_address(address: str) -> tuple[str, int]:
  """"host:port" or "[v6]:port" -> (host, port); a JaxdpError names a malformed one."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise JaxdpError(f"--coordinator={address!r} is not HOST:PORT (e.g. 10.0.0.1:12345)")
  return host, int(port)


def _first_slurm_host(nodelist: str) -> str:
  """First host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
  match = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist)
  if match is None:
    raise JaxdpError(f"cannot read the first host of SLURM_STEP_NODELIST={nodelist!r}; pass "
                     "--coordinator HOST:PORT")
  return match.group(1) + (match.group(2) or "")


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
  """This node's task count from SLURM_STEP_TASKS_PER_NODE ("4(x2),3") and SLURM_NODEID."""
  counts = []
  for part in env.get("SLURM_STEP_TASKS_PER_NODE", "1").split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if match:
      counts += [int(match.group(1))] * int(match.group(2) or 1)
  node = int(env.get("SLURM_NODEID", 0))
  return counts[node] if node < len(counts) else 1


def _one_gpu_each(local_rank: int, local_size: int, env: Mapping[str, str]):
  """Several processes on a node each drive GPU `local_rank`, unless the launcher already bound
  GPUs to tasks (CUDA_VISIBLE_DEVICES set); one process per node drives all of them."""
  if local_size > 1 and "CUDA_VISIBLE_DEVICES" not in env:
    return (local_rank,)
  return None


def _from_environment(env: Mapping[str, str]) -> dict:
  """The process group a cluster launcher describes in `env`, or {} outside one."""
  if all(k in env for k in ("SLURM_PROCID", "SLURM_STEP_NODELIST")) and (
      "SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    return dict(source="slurm",
                num_processes=int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))),
                process_id=int(env["SLURM_PROCID"]),
                coordinator=f"{_first_slurm_host(env['SLURM_STEP_NODELIST'])}:"
                            f"{DERIVED_PORT_BASE + job % 4096}",
                local_device_ids=_one_gpu_each(int(env.get("SLURM_LOCALID", 0)),
                                               _tasks_on_this_node(env), env))
  if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
    coordinator = None
    # Open MPI 4 names mpirun's host and job: "1531576320.0;tcp://10.0.0.1,10.1.0.1:34911".
    uri = env.get("OMPI_MCA_orte_hnp_uri", "")
    match = re.match(r"(\d+)\.\d+;tcp://([^,:;]+)", uri)
    if match:
      coordinator = f"{match.group(2)}:{DERIVED_PORT_BASE + int(match.group(1)) // 4096 % 4096}"
    return dict(source="ompi", num_processes=int(env["OMPI_COMM_WORLD_SIZE"]),
                process_id=int(env["OMPI_COMM_WORLD_RANK"]), coordinator=coordinator,
                local_device_ids=_one_gpu_each(int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                                               int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)), env))
  return {}


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None) -> ProcessGroup:
  """The process group from the flags, each overriding what a SLURM or Open MPI `env` says."""
  found = _from_environment(os.environ if env is None else env)
  flags = {k: v for k, v in dict(coordinator=coordinator, num_processes=num_processes,
                                 process_id=process_id).items() if v is not None}
  values = {**found, **flags}
  if flags and not found:
    values["source"] = "flags"
  n = values.get("num_processes", 1)
  if n < 1:
    raise JaxdpError(f"--num_processes={n} must be >= 1")
  if n == 1:
    return ProcessGroup(num_processes=1, process_id=0)
  if values.get("process_id") is None:
    raise JaxdpError(f"--num_processes={n} needs --process_id (0 to {n - 1}) for this process")
  if not 0 <= values["process_id"] < n:
    raise JaxdpError(f"--process_id={values['process_id']} must be in [0, {n}) for "
                     f"--num_processes={n}")
  if values.get("coordinator") is None:
    where = (f" ({values['source']} gives no coordinator address)" if found else "")
    raise JaxdpError(f"--num_processes={n} needs --coordinator HOST:PORT, the address where "
                     f"process 0 listens{where}")
  split_address(values["coordinator"])
  return ProcessGroup(**values)


def check_port_free(address: str) -> None:
  """Process 0 serves the coordinator on every interface at the address's port: fail early and
  clearly if something already listens there (JAX itself would crash)."""
  _, port = split_address(address)
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # No IPv6 on this host.
    with probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind((host, port))
        return
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          raise JaxdpError(f"--coordinator={address}: port {port} is already in use on this host "
                           "(process 0 serves the coordinator there); pick another port or stop "
                           "the program using it") from None
        if family == socket.AF_INET:
          raise


def _reachable(address: str, timeout_s: float = 1.0) -> bool:
  host, port = split_address(address)
  try:
    socket.create_connection((host, port), timeout=timeout_s).close()
    return True
  except OSError:
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: float = 300,
               env: Mapping[str, str] | None = None) -> ProcessGroup:
  """Joins the run described by the flags or the cluster environment; a no-op for one process.

  Must run before JAX touches a device. If the group has not formed within `timeout_s` seconds,
  the process prints which coordinator it waited for and exits with status 2 (JAX offers no way
  to interrupt a pending connection, so the exit is immediate).
  """
  group = resolve(coordinator, num_processes, process_id, env)
  if group.num_processes == 1:
    return group
  if timeout_s <= 0:
    raise JaxdpError(f"--init_timeout_s={timeout_s} must be positive")
  import jax
  # Cross-process collectives on CPU (tests, CPU clusters); GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if group.process_id == 0:
    check_port_free(group.coordinator)

  def give_up() -> None:
    reason = ("the coordinator answers, but not every process joined"
              if _reachable(group.coordinator) else "nothing answers at that address")
    print(f"jaxdp: error: process {group.process_id} of {group.num_processes} could not join the "
          f"run at coordinator {group.coordinator} within --init_timeout_s={timeout_s:g} ({reason}); "
          "check that every process was started with the same --coordinator and --num_processes "
          "and that this host can reach process 0", file=sys.stderr, flush=True)
    os._exit(2)

  timer = threading.Timer(timeout_s, give_up)
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(
        group.coordinator, group.num_processes, group.process_id,
        local_device_ids=list(group.local_device_ids) if group.local_device_ids else None,
        cluster_detection_method="deactivate",
        # JAX aborts natively at its own deadline: give ours time to speak first.
        initialization_timeout=int(timeout_s) + 30)
  finally:
    timer.cancel()
  return group
