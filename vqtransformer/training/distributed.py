"""torch.distributed set-up from the launcher's environment.

``torchrun`` and ``accelerate launch`` already export RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT. A Slurm job with several tasks (``srun``, or submitit with
``tasks_per_node > 1``) exports SLURM_* instead; we translate those before the
Accelerator is created, so every launcher ends in the same ``env://`` initialisation.
"""

from __future__ import annotations

import os
import re


def _first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as ``node[01-04,07],gpu2`` -> ``node01``."""
    m = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def setup_from_slurm() -> bool:
    """Export torch.distributed variables from Slurm's when the job has several tasks.

    Also covers submitit's local executor (``hydra/launcher=submitit_local``, ``tasks_per_node > 1``),
    which describes its tasks with ``SUBMITIT_LOCAL_*``. Returns True when a multi-process world was
    described by Slurm or submitit.
    """
    if "RANK" in os.environ:
        return False
    if "SLURM_PROCID" not in os.environ:
        return _setup_from_submitit_local()
    ntasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")))
    if ntasks <= 1:
        return False
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    os.environ.setdefault("MASTER_ADDR", _first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    # a port derived from the job id: the same on every task, different for concurrent jobs
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))
    return True


def _setup_from_submitit_local() -> bool:
    ntasks = int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"))
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or ntasks <= 1:
        return False
    os.environ["RANK"] = os.environ["SUBMITIT_LOCAL_GLOBALID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SUBMITIT_LOCAL_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(ntasks))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # the job id is the pid of submitit's controller: the same for every task of the job
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0")) % 20000))
    return True


def global_rank() -> int:
    """This process's rank in a multi-process job, 0 when alone; readable before torch.distributed starts.

    ``RANK`` (torchrun, accelerate, or set by ``setup_from_slurm``), else ``SLURM_PROCID`` of a
    multi-task Slurm job, else submitit's local task id.
    """
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    if os.environ.get("SLURM_PROCID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ["SLURM_PROCID"])
    if os.environ.get("SUBMITIT_LOCAL_GLOBALID") and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        return int(os.environ["SUBMITIT_LOCAL_GLOBALID"])
    return 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
