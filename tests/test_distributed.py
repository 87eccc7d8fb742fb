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


def test_no_flags_and_no_cluster_is_one_process():
  assert distributed.resolve(env={}) == distributed.ProcessGroup(num_processes=1, process_id=0)


def test_explicit_flags_define_the_group():
  group = distributed.resolve("10.0.0.1:1234", 2, 1, env={})
  assert (group.coordinator, group.num_processes, group.process_id, group.source) == \
      ("10.0.0.1:1234", 2, 1, "flags")


def test_slurm_step_gives_group_first_host_and_one_gpu_per_task():
  group = distributed.resolve(env=SLURM)
  assert group.source == "slurm"
  assert (group.num_processes, group.process_id) == (4, 3)  # The step's tasks, not the job's.
  assert group.coordinator == f"gpu007:{distributed.DERIVED_PORT_BASE + 4242 % 4096}"
  assert group.local_device_ids == (1,)  # Two tasks on this node: each drives its own GPU.
  bound = distributed.resolve(env=dict(SLURM, CUDA_VISIBLE_DEVICES="1"))
  assert bound.local_device_ids is None  # SLURM bound GPUs to tasks already.


def test_flags_override_the_cluster_environment():
  group = distributed.resolve(coordinator="head:999", env=SLURM)
  assert (group.coordinator, group.process_id, group.source) == ("head:999", 3, "slurm")


def test_open_mpi_gives_group_and_mpirun_host():
  group = distributed.resolve(env=OMPI)
  assert (group.source, group.num_processes, group.process_id) == ("ompi", 4, 2)
  assert group.coordinator.startswith("10.96.0.1:")
  assert group.local_device_ids is None  # One rank per node drives all its GPUs.


def test_open_mpi_without_coordinator_asks_for_the_flag():
  env = {k: v for k, v in OMPI.items() if k != "OMPI_MCA_orte_hnp_uri"}
  with pytest.raises(JaxdpError, match="needs --coordinator HOST:PORT.*ompi gives no coordinator"):
    distributed.resolve(env=env)


@pytest.mark.parametrize("flags, message", [
    (dict(num_processes=2, coordinator="h:1"), "needs --process_id"),
    (dict(num_processes=2, process_id=2, coordinator="h:1"), r"--process_id=2 must be in \[0, 2\)"),
    (dict(num_processes=2, process_id=0), "needs --coordinator"),
    (dict(num_processes=2, process_id=0, coordinator="nohost"), "is not HOST:PORT"),
])
def test_incomplete_flags_name_what_is_missing(flags, message):
  with pytest.raises(JaxdpError, match=message):
    distributed.resolve(env={}, **flags)


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
