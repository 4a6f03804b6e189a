"""Multi-process start-up: joins this process to the others through `jax.distributed.initialize`.

Where the coordinator address, the process count and this process's id come from, first found wins:
1. the arguments (main.py's --coordinator_address, --num_processes, --process_id);
2. the environment: JAX_COORDINATOR_ADDRESS (read by jax itself, as are JAX_COORDINATOR_PORT and
   JAX_LOCAL_DEVICE_IDS), JAX_NUM_PROCESSES and JAX_PROCESS_ID (read here; jax does not);
3. jax's cluster detection (jax 0.10), for whatever is still unknown:
   - Open MPI (`mpirun`; OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE / _RANK);
   - SLURM (`srun`; SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID:
     the first node of the step is the coordinator, on a port derived from the job id);
   - Cloud TPU VMs and pods, on GCE (metadata server) and GKE (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID);
   - Kubernetes Indexed Jobs and JobSets with a headless service (needs the `kubernetes` package,
     `pip install jax[k8s]`, and a service account that may read pods and jobs);
   - any MPI through mpi4py, only when asked for (jax's cluster_detection_method="mpi4py").
On CPU, cross-process collectives use gloo, jax's default (jax_cpu_collectives_implementation;
JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi picks MPI instead). Call this before anything that touches
a device. Once it has run, jax handles SIGTERM itself: see docs/multihost.md.
"""
from __future__ import annotations

import os

import jax

_HINT = ("pass --coordinator_address, --num_processes and --process_id (or set JAX_COORDINATOR_ADDRESS, "
         "JAX_NUM_PROCESSES and JAX_PROCESS_ID), or launch under SLURM, Open MPI, a Cloud TPU pod or a "
         "Kubernetes Indexed Job")


def _resolve(value: int | None, flag: str, env: str) -> tuple[int | None, str]:
    """(the flag's value, else the environment variable's, else None; the name it came from)."""
    if value is not None:
        return value, f"--{flag}"
    text = os.environ.get(env, "")
    if not text:
        return None, env
    try:
        return int(text), env
    except ValueError:
        raise ValueError(f"{env}={text!r} must be an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """jax.distributed.initialize with each unset argument taken from the environment or the cluster.

    Raises ValueError naming the flag or variable at fault, or saying what to set.
    """
    num_processes, num_name = _resolve(num_processes, "num_processes", "JAX_NUM_PROCESSES")
    process_id, id_name = _resolve(process_id, "process_id", "JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"{num_name}={num_processes} must be at least 1")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"{id_name}={process_id} must be in [0, {num_name}={num_processes})")
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and ":" not in address:
        name = "--coordinator_address" if coordinator_address else "JAX_COORDINATOR_ADDRESS"
        raise ValueError(f"{name}={address!r} must be host:port, e.g. 10.0.0.1:1234")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as e:  # jax's "coordinator_address should be defined." and the like
        raise ValueError(f"multi-process start-up: {str(e).rstrip('.')}; {_HINT}") from None
