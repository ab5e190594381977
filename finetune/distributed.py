"""Multi-host runs: every host (TPU VM worker, GPU node) runs the same `finetune train` command; this module
connects the processes before anything touches a device.

`initialize()` calls `jax.distributed.initialize` when the environment describes a multi-process job:
* explicitly: FINETUNE_COORDINATOR=host:port, FINETUNE_NUM_PROCESSES=n, FINETUNE_PROCESS_ID=i (any cluster, and
  the two-process test on one machine);
* or a cluster JAX recognises itself: a TPU pod slice (more than one host in TPU_WORKER_HOSTNAMES), a task of a
  SLURM step with more than one task (srun's variables) or Open MPI (OMPI_COMM_WORLD_SIZE > 1).
After it, each process loads only its part of every batch (`data.pipeline`: process_index / process_count) and
`jax.make_array_from_process_local_data` assembles the global arrays; orbax saves and restores sharded arrays from
every process; only process 0 writes metrics, summaries and wandb.
"""

from __future__ import annotations

import os

import jax

from finetune.errors import FinetuneError

EXPLICIT = ("FINETUNE_COORDINATOR", "FINETUNE_NUM_PROCESSES", "FINETUNE_PROCESS_ID")


# What JAX's own SLURM detection needs (jax._src.clusters.slurm_cluster, checked against jax 0.10's list): the
# variables `srun` sets for each task of a step. A shell inside an allocation (sbatch's batch script, salloc) has
# SLURM_NTASKS > 1 without them, and a `finetune train` started there is one process.
_SLURM_TASK_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _count(name: str) -> int:
  value = os.environ.get(name, "1") or "1"
  return int(value) if value.isdigit() else 1


def _slurm_task() -> bool:
  """A task of a SLURM step that has several (srun's variables, which JAX's detection reads)."""
  if not all(name in os.environ for name in _SLURM_TASK_VARIABLES) or _count("SLURM_NTASKS") <= 1:
    return False
  return _count("SLURM_STEP_NUM_TASKS") > 1 if "SLURM_STEP_NUM_TASKS" in os.environ else True


def _cluster_detected() -> bool:
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return len(hosts) > 1 or _slurm_task() or _count("OMPI_COMM_WORLD_SIZE") > 1


def initialize() -> bool:
  """Connects this process to the others of a multi-process job; returns whether it did (False: single process)."""
  given = [name for name in EXPLICIT if os.environ.get(name)]
  if given and len(given) != len(EXPLICIT):
    missing = [name for name in EXPLICIT if name not in given]
    raise FinetuneError(f"multi-process run: {', '.join(given)} set but {', '.join(missing)} missing; set all three")
  if not given and not _cluster_detected():
    return False
  for name in given[1:]:  # the process count and id (a bad one was reported as a failure to connect)
    if not os.environ[name].strip().isdigit():
      raise FinetuneError(f"multi-process run: {name}={os.environ[name]!r} is not a whole number")
  if given and int(os.environ["FINETUNE_PROCESS_ID"]) >= int(os.environ["FINETUNE_NUM_PROCESSES"]):
    raise FinetuneError(f"multi-process run: FINETUNE_PROCESS_ID={os.environ['FINETUNE_PROCESS_ID']} must be below "
                        f"FINETUNE_NUM_PROCESSES={os.environ['FINETUNE_NUM_PROCESSES']} (ids count from 0)")
  if not given and _count("OMPI_COMM_WORLD_SIZE") > 1 and "OMPI_MCA_orte_hnp_uri" not in os.environ:
    # JAX finds Open MPI's coordinator in OMPI_MCA_orte_hnp_uri (jax._src.clusters.ompi_cluster, as of jax 0.10),
    # which Open MPI 5's launcher (PRRTE) no longer sets: initialize() would fail with "coordinator_address".
    raise FinetuneError("an Open MPI launch without OMPI_MCA_orte_hnp_uri (Open MPI 5), whose coordinator JAX "
                        "cannot find: set FINETUNE_COORDINATOR=<rank 0's host>:<free port>, "
                        "FINETUNE_NUM_PROCESSES=$OMPI_COMM_WORLD_SIZE and FINETUNE_PROCESS_ID=$OMPI_COMM_WORLD_RANK")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # Host-only processes (the simulated test, CPU clusters) need a cross-process collectives backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if given:
      jax.distributed.initialize(coordinator_address=os.environ["FINETUNE_COORDINATOR"],
                                 num_processes=int(os.environ["FINETUNE_NUM_PROCESSES"]),
                                 process_id=int(os.environ["FINETUNE_PROCESS_ID"]))
    else:
      jax.distributed.initialize()  # TPU pod, SLURM or Open MPI: JAX reads the cluster's own environment
  except (ValueError, RuntimeError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise FinetuneError(f"could not connect the processes of a multi-process run ({reason}); start one process per "
                        "host (srun, mpirun, the TPU VM's workers) or set FINETUNE_COORDINATOR, "
                        "FINETUNE_NUM_PROCESSES and FINETUNE_PROCESS_ID") from None
  return True


def launched_process_index() -> int:
  """This process's rank in a multi-process launch, read from the launcher's environment without connecting (0 for
  a single process): for commands with one writer and no device work, as `finetune export`, which every worker of a
  `--worker=all` or srun launch would otherwise write into the same folder at once."""
  if os.environ.get("FINETUNE_PROCESS_ID", "").strip().isdigit():
    return int(os.environ["FINETUNE_PROCESS_ID"])
  for name, launched in (("TPU_WORKER_ID", len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
                                                  if h]) > 1),
                         ("SLURM_PROCID", _slurm_task()), ("OMPI_COMM_WORLD_RANK", _count("OMPI_COMM_WORLD_SIZE") > 1)):
    if launched and os.environ.get(name, "").strip().isdigit():
      return int(os.environ[name])
  return 0

