"""The process's data-parallel group: started once from the launch environment, then current().

    group = world.init(device)      # SingleGroup when nothing launched us as a rank
    world.check_recipe(recipe, group.world_size)

On the CPU the ranks are MPI processes (mpirun, or `--procs N`, which runs mpirun); on the GPU
they are joined by NCCL, one GPU each (LOCAL_RANK), whoever launched them.
"""
from __future__ import annotations

import contextlib
import sys
import traceback

from llamac import runtime
from llamac.dist import env
from llamac.dist.group import Group, SingleGroup
from llamac.errors import LlamacError

_current: Group = SingleGroup()
_watchdog = None


def current() -> Group:
    return _current


def watchdog():
    """The rank's Watchdog (None in one process)."""
    return _watchdog


def init(device: str) -> Group:
    """The group of this process (made on the first call): SingleGroup, MPIGroup or NCCLGroup."""
    global _current, _watchdog
    if _current.distributed:
        return _current
    launch = env.from_env()
    if not launch.launched:
        return _current
    timeout = runtime.options().dist_timeout
    if device == "cpu":
        if launch.source != "mpi":
            if launch.world_size == 1:
                return _current
            raise LlamacError("on the CPU the ranks are MPI processes: start them with `--procs N` or "
                              "`mpirun -n N llamac ...` (RANK / WORLD_SIZE alone cannot connect CPU ranks)")
        from llamac.dist.mpi import MPIGroup
        group = MPIGroup(timeout, launch.local_rank)
    else:
        if launch.source == "mpi" and launch.world_size < 1:
            from llamac.dist.mpi import mpi_module
            comm = mpi_module().COMM_WORLD
            launch = env.Launch(comm.Get_rank(), comm.Get_size(), launch.local_rank, source="mpi")
        from llamac.dist.nccl import NCCLGroup
        group = NCCLGroup(launch, timeout)
    from llamac.dist.watchdog import Watchdog
    _current, _watchdog = group, Watchdog(group, timeout)
    return group


def check_recipe(recipe, world_size: int):
    """What a recipe must satisfy to train on `world_size` ranks, as one-line errors."""
    b = recipe.train.batch_size
    if b % world_size:
        raise LlamacError(f"train.batch_size ({b}) must be divisible by the number of ranks ({world_size}): "
                          "each rank takes an equal slice of every batch")


def rows(n: int, group: Group) -> slice:
    """This rank's rows of a global batch of n rows."""
    per = n // group.world_size
    return slice(group.rank * per, (group.rank + 1) * per)


@contextlib.contextmanager
def failures_end_the_job(group: Group):
    """A rank that fails says why in one line and ends the job (the others may wait in a
    collective for it); in one process errors propagate as usual."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if not group.distributed:
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        what = text if isinstance(exc, LlamacError) else f"{type(exc).__name__}: {text}"
        if not isinstance(exc, LlamacError):        # a bug: its traceback too, above the line
            traceback.print_exc()
        if not what.startswith(f"rank {group.rank}:"):
            what = f"rank {group.rank}: {what}"
        from llamac.dist.watchdog import report_failure
        sys.stderr.flush()
        report_failure(group, what)
