"""Who this process is in a data-parallel job, from the environment its launcher set.

    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
        torchrun, `llamac ... --gpus N`, or any launcher that sets them (a Slurm script may export
        them from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)
    SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID (+ MASTER_ADDR / MASTER_PORT)
        `srun llamac pretrain ...` (the step's task count: a batch script's or salloc shell's own
        SLURM_NTASKS does not make a plain `llamac pretrain` one rank of many)
    OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK, PMI_RANK / PMI_SIZE, PMIX_RANK
        `mpirun -n N llamac pretrain ...` (Open MPI, MPICH, Intel MPI); MPI itself connects the ranks

In that order: the first family present wins. None of them: one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from llamac.errors import LlamacError


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    source: str = "none"        # none | env (torchrun style) | slurm | mpi

    @property
    def launched(self) -> bool:
        return self.source != "none"


def _int(env: Mapping[str, str], name: str, default=None, low: int = 0) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LlamacError(f"environment variable {name} is not set (a data-parallel launch sets it)")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LlamacError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < low:
        raise LlamacError(f"environment variable {name} must be at least {low}, got {value}")
    return value


def _port(env: Mapping[str, str]) -> Optional[int]:
    if not env.get("MASTER_PORT"):
        return None
    port = _int(env, "MASTER_PORT", low=1)
    if port > 65535:
        raise LlamacError(f"environment variable MASTER_PORT must be a TCP port (1-65535), got {port}")
    return port


def _check(launch: Launch) -> Launch:
    if launch.world_size < 1:
        raise LlamacError(f"the world size must be at least 1, got {launch.world_size} ({launch.source} launch)")
    if not 0 <= launch.rank < launch.world_size:
        raise LlamacError(f"rank {launch.rank} is outside the world of {launch.world_size} ranks ({launch.source} launch)")
    return launch


def from_env(env: Mapping[str, str] | None = None) -> Launch:
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env:
        world = _int(env, "WORLD_SIZE", low=1)
        rank = _int(env, "RANK")
        return _check(Launch(rank, world, _int(env, "LOCAL_RANK", default=rank), env.get("MASTER_ADDR") or None,
                             _port(env), "env"))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and "OMPI_COMM_WORLD_SIZE" not in env \
            and "PMI_SIZE" not in env and "PMIX_RANK" not in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS", low=1)
        if world > 1:
            rank = _int(env, "SLURM_PROCID")
            return _check(Launch(rank, world, _int(env, "SLURM_LOCALID", default=0), env.get("MASTER_ADDR") or None,
                                 _port(env), "slurm"))
    for size, rank, local in (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
                              ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID")):
        if size in env:
            r = _int(env, rank)
            return _check(Launch(r, _int(env, size, low=1), _int(env, local, default=0), source="mpi"))
    if "PMIX_RANK" in env:           # PMIx without Open MPI's names (srun --mpi=pmix): MPI says the size
        return Launch(_int(env, "PMIX_RANK"), 0, 0, source="mpi")
    return Launch()
