"""Fast, single-process checks of the multi-host pieces: process-group resolution from flags and
cluster environments, the step watchdog's clock, launch's argument checks, process rows."""

import jax
import numpy as np
import pytest

from jaxdp import parallel
from jaxdp.errors import JaxdpError
from jaxdp.runtime import distributed, launch
from jaxdp.runtime.watchdog import EXIT_STATUS, StepWatchdog

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_STEP_NODELIST": "gpu[007-008,011]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
OMPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
        "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}
# What a pod of an Indexed Job sees (examples/k8s/train.yaml): the API host and its index.
K8S = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "2", "HOSTNAME": "localhost"}
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "KUBERNETES_", "JOB_COMPLETION_INDEX",
                    "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR", "TPU_", "CLOUD_TPU")


@pytest.fixture
def cluster_env(monkeypatch):
  """Clears every cluster variable, then returns a function that sets the given ones."""
  import os
  for name in list(os.environ):
    if name.startswith(CLUSTER_PREFIXES):
      monkeypatch.delenv(name)

  def set_env(values):
    for name, value in values.items():
      monkeypatch.setenv(name, value)
  return set_env


def test_no_flags_and_no_cluster_is_one_process(cluster_env):
  assert distributed.resolve() == distributed.ProcessGroup(num_processes=1, process_id=0)


def test_explicit_flags_define_the_group(cluster_env):
  group = distributed.resolve("10.0.0.1:1234", 2, 1)
  assert (group.coordinator, group.num_processes, group.process_id, group.source) == \
      ("10.0.0.1:1234", 2, 1, "flags")


def test_slurm_step_gives_group_first_host_and_one_gpu_per_task(cluster_env):
  cluster_env(SLURM)
  group = distributed.resolve()
  assert group.source == "slurm"
  assert (group.num_processes, group.process_id) == (4, 3)  # The step's tasks, not the job's.
  assert group.coordinator == f"gpu007:{61440 + 4242 % 4096}"  # JAX's port from the job id.
  assert group.local_device_ids == (1,)  # Two tasks on this node: each drives its own GPU.
  assert "described by slurm (JAX's cluster detection)" in group.describe()
  cluster_env({"CUDA_VISIBLE_DEVICES": "1"})
  assert distributed.resolve().local_device_ids is None  # SLURM bound GPUs to tasks already.


def test_one_slurm_task_per_node_drives_all_its_gpus(cluster_env):
  cluster_env(dict(SLURM, SLURM_STEP_TASKS_PER_NODE="1(x4)", SLURM_LOCALID="0"))
  assert distributed.resolve().local_device_ids is None  # JAX alone would bind GPU 0 only.


def test_flags_override_the_cluster_environment(cluster_env):
  cluster_env(SLURM)
  group = distributed.resolve(coordinator="head:999", process_id=0)
  assert (group.coordinator, group.process_id, group.num_processes, group.source) == \
      ("head:999", 0, 4, "slurm")


def test_open_mpi_gives_group_and_mpirun_host(cluster_env):
  cluster_env(OMPI)
  group = distributed.resolve()
  assert (group.source, group.num_processes, group.process_id) == ("ompi", 4, 2)
  assert group.coordinator == f"10.96.0.1:{61440 + 1531576320 // 4096 % 4096}"
  assert group.local_device_ids is None  # One rank per node drives all its GPUs.


def test_open_mpi_5_without_mpirun_address_asks_for_the_flags(cluster_env):
  cluster_env({k: v for k, v in OMPI.items() if k != "OMPI_MCA_orte_hnp_uri"})
  with pytest.raises(JaxdpError, match="OMPI_COMM_WORLD_SIZE=4: running under Open MPI 5.*"
                                       "give --coordinator HOST:PORT"):
    distributed.resolve()
  assert distributed.resolve("h:1", 4, 2).source == "flags"


FAKE_MPI4PY = """
class _Comm:
  def __init__(self, rank, size):
    self._rank, self._size = rank, size
  def Get_rank(self):
    return self._rank
  def Get_size(self):
    return self._size
  def bcast(self, value, root=0):
    return "mpihost:4321" if self._rank != root else value
  def Split_type(self, kind):
    return _Comm(self._rank % 2, 2)

COMM_TYPE_SHARED = 1
COMM_WORLD = _Comm(3, 6)
"""


def test_mpi4py_when_asked_for(cluster_env, tmp_path, monkeypatch):
  """A fake mpi4py (rank 3 of 6, 2 per node) on sys.path: JAX's Mpi4pyCluster reads it."""
  (tmp_path / "mpi4py").mkdir()
  (tmp_path / "mpi4py" / "__init__.py").write_text("")
  (tmp_path / "mpi4py" / "MPI.py").write_text(FAKE_MPI4PY)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert distributed.resolve().num_processes == 1  # mpi4py is opt-in, as in JAX.
  group = distributed.resolve(cluster="mpi4py")
  assert (group.source, group.num_processes, group.process_id) == ("mpi4py", 6, 3)
  assert group.local_device_ids == (1,)  # Local rank 1 of 2 on this node.
  cluster_env({"JAX_COORDINATOR_PORT": "5555"})
  assert distributed.resolve(cluster="mpi4py", coordinator="rank0:7").coordinator == "rank0:7"


FAKE_KUBERNETES = """
import types
from . import client

class config:
  @staticmethod
  def load_incluster_config():
    pass
"""

FAKE_KUBERNETES_CLIENT = """
import types
from . import exceptions

def _ns(**kw):
  return types.SimpleNamespace(**kw)

JOB = _ns(metadata=_ns(name="jaxdp-train", labels={}), spec=_ns(parallelism=4))
POD = _ns(metadata=_ns(name="jaxdp-train-2-abcde", labels={"job-name": "jaxdp-train"},
                       owner_references=[_ns(controller=True, kind="Job")]),
          spec=_ns(subdomain="jaxdp-train"))

class CoreV1Api:
  def list_namespaced_pod(self, namespace, field_selector):
    return _ns(items=[POD])

class BatchV1Api:
  def read_namespaced_job(self, name, namespace):
    return JOB
"""


def test_kubernetes_indexed_job_pod(cluster_env, tmp_path, monkeypatch):
  """What a pod of examples/k8s/train.yaml sees, with a fake `kubernetes` client answering as
  the API server would: the Job's parallelism, the pod's index, pod 0's stable DNS name."""
  package = tmp_path / "kubernetes"
  package.mkdir()
  (package / "__init__.py").write_text(FAKE_KUBERNETES)
  (package / "client.py").write_text(FAKE_KUBERNETES_CLIENT)
  (package / "exceptions.py").write_text("class ApiException(Exception):\n  pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  from jax._src.clusters import K8sCluster
  monkeypatch.setattr(K8sCluster, "_namespace", classmethod(lambda cls: "default"))
  for cached in ("_pod", "_job", "_controller", "_headless_svc"):
    getattr(K8sCluster, cached).__func__.cache_clear()
  cluster_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "localhost"})
  assert distributed.resolve().num_processes == 1  # A pod outside an Indexed Job: one process.
  cluster_env(K8S)
  group = distributed.resolve()
  assert (group.source, group.num_processes, group.process_id) == ("k8s", 4, 2)
  assert group.coordinator == "jaxdp-train-0.jaxdp-train:55527"  # Pod 0 via the headless Service.
  assert group.local_device_ids is None  # One process per pod drives all its GPUs.
  assert distributed.resolve(coordinator="head:1").coordinator == "head:1"


def test_a_named_cluster_that_is_absent_is_an_error(cluster_env):
  with pytest.raises(JaxdpError, match="--cluster=slurm: this process does not run in a slurm"):
    distributed.resolve(cluster="slurm")


@pytest.mark.parametrize("flags, message", [
    (dict(num_processes=2, coordinator="h:1"), "needs --process_id"),
    (dict(num_processes=2, process_id=2, coordinator="h:1"), r"--process_id=2 must be in \[0, 2\)"),
    (dict(num_processes=2, process_id=0), "needs --coordinator"),
    (dict(num_processes=2, process_id=0, coordinator="nohost"), "is not HOST:PORT"),
])
def test_incomplete_flags_name_what_is_missing(cluster_env, flags, message):
  with pytest.raises(JaxdpError, match=message):
    distributed.resolve(**flags)


class FakeResult:
  def __init__(self):
    self.ready = False

  def is_ready(self):
    return self.ready


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def watchdog(timeout_s=10.0):
  exits, clock = [], FakeClock()
  return StepWatchdog(timeout_s, 0, exit=exits.append, clock=clock), exits, clock


def test_watchdog_names_the_overdue_step_after_the_timeout(capsys):
  w, exits, clock = watchdog()
  first, second = FakeResult(), FakeResult()
  w.dispatched(1, first)
  first.ready = True
  w.check()
  w.dispatched(2, second)
  clock.now = 9.0
  w.check()
  assert exits == []
  clock.now = 10.5
  w.check()
  assert exits == [EXIT_STATUS]
  assert "step 2 did not finish within config.step_timeout_s=10 s (10.5 s since step 1 finished)" \
      in capsys.readouterr().err


def test_watchdog_leaves_the_first_step_and_paused_work_untimed():
  w, exits, clock = watchdog()
  first = FakeResult()
  w.dispatched(1, first)
  clock.now = 100.0  # Compiling.
  w.check()
  first.ready = True
  w.check()
  w.pause()
  clock.now = 200.0  # Evaluating, checkpointing.
  w.check()
  w.resume()
  clock.now = 205.0
  w.check()
  assert exits == []
  clock.now = 211.0  # Step 2 never dispatched (a stalled process): still caught.
  w.check()
  assert exits == [EXIT_STATUS]


def test_watchdog_off_starts_no_thread():
  with StepWatchdog(0, 0) as w:
    w.dispatched(1, FakeResult())
    assert not w._thread.is_alive()


@pytest.mark.parametrize("command, message", [
    (["generate"], "launch runs training"),
    ([], "launch runs training"),
    (["train", "--process_id=1"], "is set by launch"),
    (["train", "--cpu_devices=2"], "give --cpu_devices before '--'"),
])
def test_launch_rejects_commands_it_cannot_run(command, message):
  with pytest.raises(JaxdpError, match=message):
    launch.check_command(2, command)


def test_one_process_holds_every_row_of_the_batch():
  mesh = parallel.make_mesh(jax.devices()[:4])
  np.testing.assert_array_equal(parallel.process_rows(mesh, 16), np.arange(16))


def test_the_kubernetes_example_is_consistent_and_its_train_flags_parse():
  """examples/k8s/train.yaml: the pods' labels, subdomain and count agree with the Service and
  the Job (what JAX's K8sCluster reads), its preemption exit code is jaxdp's, and its
  `jaxdp train` arguments are accepted by the CLI."""
  import os
  yaml = pytest.importorskip("yaml")
  from jaxdp.cli import train
  from jaxdp.lm.config import load_preset
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                      "k8s", "train.yaml")
  docs = {d["kind"]: d for d in yaml.safe_load_all(open(path))}
  service, job = docs["Service"], docs["Job"]
  pod = job["spec"]["template"]
  assert service["spec"]["clusterIP"] == "None"
  assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
  assert pod["spec"]["subdomain"] == service["metadata"]["name"]
  assert job["spec"]["completionMode"] == "Indexed"
  assert job["spec"]["completions"] == job["spec"]["parallelism"]
  codes = [r["onExitCodes"]["values"] for r in job["spec"]["podFailurePolicy"]["rules"]
           if "onExitCodes" in r]
  assert codes == [[load_preset("default").preempt_exit_code]]
  [container] = pod["spec"]["containers"]
  assert container["command"] == ["jaxdp", "train"]
  train.COMMAND.parse(container["args"])
