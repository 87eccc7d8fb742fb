"""Joining a multi-process run: explicit flags, the cluster JAX detects, or a single process.

`resolve` says which process group this process belongs to: the flags, each overriding what the
cluster environment says, where the environment is read by JAX's own cluster detection
(`jax._src.clusters`: SLURM, Open MPI, Kubernetes Indexed Jobs and JobSets, Cloud TPU / GKE, and
mpi4py when asked for, as `jax.distributed.initialize` itself does). jaxdp adds what that
detection lacks: one GPU per process only where several processes share a node and the launcher
did not bind GPUs (JAX binds one GPU per process whenever it knows a local rank, which leaves a
one-process-per-node run with one GPU), the port check, and the join timeout. `initialize` then
calls `jax.distributed.initialize` with the resolved values (its own detection switched off)
before any device is touched. JAX's own failure modes here are a native abort (unreachable
coordinator) or a crash (port taken), so both are checked first and turned into one-line errors
naming the address.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import errno
import os
import re
import socket
import sys
import threading

from jaxdp.errors import JaxdpError
from jaxdp.runtime import heartbeat

# --cluster values: JAX's detection names, plus "auto" (JAX's default order) and "none".
CLUSTERS = ("auto", "none", "slurm", "ompi", "k8s", "mpi4py", "gketpu", "gcetpu")
# Launchers JAX cannot read a coordinator from: running under one without flags is an error,
# not N unrelated single-process runs.
UNDETECTED = (("OMPI_COMM_WORLD_SIZE", "Open MPI 5 (mpirun does not publish its address)"),
              ("PMI_SIZE", "an MPI launcher (MPICH, Intel MPI)"),
              ("PMIX_SIZE", "a PMIx launcher"))


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Who this process is in a run."""
  num_processes: int
  process_id: int
  coordinator: str | None = None  # "HOST:PORT" served by process 0; None for one process.
  source: str = "single"  # "single", "flags", or the cluster that described it ("slurm", ...).
  local_device_ids: tuple[int, ...] | None = None  # GPUs this process drives; None: all it sees.

  def describe(self) -> str:
    """One line for the log: who this process is and where that came from."""
    where = {"flags": "the --coordinator/--num_processes/--process_id flags",
             "k8s": "Kubernetes (JAX's cluster detection)"}.get(
                 self.source, f"{self.source} (JAX's cluster detection)")
    gpus = (f", driving local device(s) {list(self.local_device_ids)}"
            if self.local_device_ids else "")
    return (f"jaxdp: process {self.process_id} of {self.num_processes}, coordinator "
            f"{self.coordinator}{gpus}; process group described by {where}")


def split_address(address: str) -> tuple[str, int]:
  """"host:port" or "[v6]:port" -> (host, port); a JaxdpError names a malformed one."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise JaxdpError(f"--coordinator={address!r} is not HOST:PORT (e.g. 10.0.0.1:12345)")
  return host, int(port)


def _cluster_name(env_type) -> str:
  return env_type.name or {"K8sCluster": "k8s"}.get(env_type.__name__, env_type.__name__)


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
  """This node's task count from SLURM_STEP_TASKS_PER_NODE ("4(x2),3") and SLURM_NODEID."""
  counts = []
  for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if match:
      counts += [int(match.group(1))] * int(match.group(2) or 1)
  node = int(env.get("SLURM_NODEID", 0))
  return counts[node] if node < len(counts) else 1


def _processes_on_this_node(source: str, env: Mapping[str, str]) -> int:
  """How many processes of the run share this node (JAX's detection does not say)."""
  if source == "slurm":
    return _slurm_tasks_on_this_node(env)
  if source == "ompi":
    return int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
  if source == "mpi4py":
    from mpi4py import MPI
    return int(MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size())
  return 1  # Kubernetes: one process per pod; TPU VMs: JAX never binds devices there.


def detect(cluster: str = "auto", env: Mapping[str, str] | None = None) -> dict:
  """The process group JAX's cluster detection reads from this environment, or {} outside one.

  `cluster`: "auto" (JAX's order: the first cluster present, mpi4py only when asked for, as
  importing it starts MPI), "none", or one detection name (see CLUSTERS).
  Raises JaxdpError for a named cluster that is not present, or a detection that fails.
  """
  env = os.environ if env is None else env
  if cluster == "none":
    return {}
  from jax._src import clusters
  types = clusters.ClusterEnv._cluster_types
  if cluster == "auto":
    # A pod outside an Indexed Job (a notebook, a CI runner) is one process: not asking the
    # Kubernetes API there keeps a plain `jaxdp train` working in any pod.
    found = next((t for t in types if not t.opt_in_only_method
                  and (_cluster_name(t) != "k8s" or "JOB_COMPLETION_INDEX" in env)
                  and t.is_env_present()), None)
    if found is None:
      return {}
  else:
    found = next((t for t in types if _cluster_name(t) == cluster), None)
    if found is None or not found.is_env_present():
      raise JaxdpError(f"--cluster={cluster}: this process does not run in a {cluster} "
                       "environment; use --cluster=auto or give --coordinator, "
                       "--num_processes and --process_id")
  source = _cluster_name(found)
  try:
    # No DNS wait here (timeout None): the join itself waits, bounded by --init_timeout_s.
    coordinator = found.get_coordinator_address(
        timeout_secs=None, override_coordinator_port=env.get("JAX_COORDINATOR_PORT"))
    values = dict(source=source, coordinator=coordinator, num_processes=found.get_process_count(),
                  process_id=found.get_process_id())
    local = found.get_local_process_id()
    if source == "slurm" and "SLURM_STEP_NUM_TASKS" in env:
      # JAX counts the job's tasks (SLURM_NTASKS); a job step (srun), or the batch script
      # itself (one task), has its own count.
      values["num_processes"] = int(env["SLURM_STEP_NUM_TASKS"])
  except Exception as e:  # noqa: BLE001 - JAX's detectors raise RuntimeError, KeyError...
    raise JaxdpError(f"{source} environment detected, but JAX could not read the process group "
                     f"from it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     "give --coordinator, --num_processes and --process_id") from None
  # One GPU per process only where several share a node and the launcher did not bind GPUs
  # (CUDA_VISIBLE_DEVICES set per task, e.g. `srun --gpus-per-task=1`).
  if (local is not None and "CUDA_VISIBLE_DEVICES" not in env
      and _processes_on_this_node(source, env) > 1):
    values["local_device_ids"] = (int(local),)
  return values


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None,
            cluster: str = "auto") -> ProcessGroup:
  """The process group from the flags, each overriding what the detected cluster says."""
  env = os.environ if env is None else env
  if cluster not in CLUSTERS:
    raise JaxdpError(f"--cluster={cluster!r} is not one of {', '.join(CLUSTERS)}")
  flags = {k: v for k, v in dict(coordinator=coordinator, num_processes=num_processes,
                                 process_id=process_id).items() if v is not None}
  found = {} if len(flags) == 3 else detect(cluster, env)
  values = {**found, **flags}
  if flags and not found:
    values["source"] = "flags"
  if not found and not flags:
    for variable, launcher in UNDETECTED:
      if int(env.get(variable, "1") or 1) > 1:
        raise JaxdpError(f"{variable}={env[variable]}: running under {launcher}, which JAX's "
                         "cluster detection cannot read; give --coordinator HOST:PORT "
                         "--num_processes P --process_id I (or --cluster=mpi4py with mpi4py "
                         "installed)")
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
    raise JaxdpError(f"--num_processes={n} needs --coordinator HOST:PORT, the address where "
                     "process 0 listens")
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
               env: Mapping[str, str] | None = None, cluster: str = "auto",
               step_timeout_s: float = 0.0, workdir: str | None = None) -> ProcessGroup:
  """Joins the run described by the flags or the cluster environment; a no-op for one process.

  Must run before JAX touches a device. `step_timeout_s` (config.step_timeout_s; 0: unset) sets
  JAX's coordination heartbeat (`heartbeat_timeout_seconds`, which aborts a process natively when
  a peer misses it) after jaxdp's own judgement of a lost peer (runtime/heartbeat.py:
  step_timeout_s, or 60 s when unset, plus 60 s), so that a dead or frozen peer ends in jaxdp's
  exit 3 with a message naming it; process 0 serves the coordinator from a child process
  (runtime/coordinator.py), so that its own death is judged the same way, with `workdir`'s
  heartbeat files. If the group has not formed within `timeout_s` seconds, the process prints
  which coordinator it waited for and exits with status 2 (JAX offers no way to interrupt a
  pending connection, so the exit is immediate).
  """
  group = resolve(coordinator, num_processes, process_id, env, cluster)
  if group.num_processes == 1:
    return group
  if timeout_s <= 0:
    raise JaxdpError(f"--init_timeout_s={timeout_s} must be positive")
  import jax
  # Cross-process collectives on CPU (tests, CPU clusters); GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  coordinator = group.coordinator
  assert coordinator is not None, "resolve() gives every multi-process group a coordinator"
  bind: str | None = None  # JAX's default: process 0 serves the coordinator itself.
  if group.process_id == 0:
    check_port_free(coordinator)
    from jaxdp.runtime import coordinator as service
    from jaxdp.runtime.launch import free_port
    service.start(split_address(coordinator)[1], group.num_processes, step_timeout_s, workdir)
    # JAX starts a service in process 0 whatever it is told: an idle one on a spare local port,
    # which no process joins (they all join the child's).
    bind = f"127.0.0.1:{free_port()}"

  def give_up() -> None:
    reason = ("the coordinator answers, but not every process joined"
              if _reachable(coordinator) else "nothing answers at that address")
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
        # JAX aborts natively at its own deadlines: give ours time to speak first.
        initialization_timeout=int(timeout_s) + 30,
        heartbeat_timeout_seconds=heartbeat.jax_heartbeat_timeout_s(step_timeout_s),
        coordinator_bind_address=bind)
  finally:
    timer.cancel()
  return group

