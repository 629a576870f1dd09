"""The collective interface of data-parallel training, and its one-process implementation.

Every collective works in place on flat contiguous arrays (NumPy on the CPU, CuPy on the GPU) and
returns a Work; `wait()` orders what follows after it: on the CPU it blocks (with the collective
timeout), on the GPU it makes the current stream wait, so nothing syncs the host and the whole
step can sit in a CUDA graph. All ranks must issue the same collectives in the same order.
"""
from __future__ import annotations

import numpy as np


class Work:
    """A collective in flight."""

    def wait(self):
        return None

    def done(self) -> bool:
        return True


DONE = Work()


class Group:
    """rank / world_size and the collectives. Subclasses implement the `_`-less methods."""

    backend = "none"
    rank = 0
    world_size = 1
    local_rank = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a backend runs at all (a one-rank NCCL group does: the GPU tests compare it with none)."""
        return self.backend != "single"

    def all_reduce(self, buf) -> Work:
        """buf <- sum over ranks of buf."""
        raise NotImplementedError

    def reduce_scatter(self, send, recv) -> Work:
        """recv (n,) <- this rank's n-slice of the sum over ranks of send (world_size * n,)."""
        raise NotImplementedError

    def all_gather(self, buf) -> Work:
        """buf (world_size * n,): every rank's n-slice (its own at rank * n, in place) on every rank."""
        raise NotImplementedError

    def broadcast(self, buf, root: int = 0) -> Work:
        raise NotImplementedError

    def barrier(self, timeout: float | None = None):
        raise NotImplementedError

    def progress(self):
        """Let collectives in flight advance (MPI moves them only inside its calls)."""

    def close(self):
        pass

    # ------------------------------------------------------------ host values
    def sum_host(self, values) -> np.ndarray:
        """float64 host values summed over ranks (losses, counts, flags): blocks until done."""
        raise NotImplementedError

    def broadcast_arrays(self, arrays, root: int = 0):
        """Each array (any layout) set to root's, in place."""
        for a in arrays:
            if a.flags.c_contiguous:
                self.broadcast(a.reshape(-1), root).wait()
            else:
                flat = a.copy().reshape(-1)
                self.broadcast(flat, root).wait()
                a[...] = flat.reshape(a.shape)

    def describe(self) -> str:
        return f"{self.backend} rank {self.rank} of {self.world_size}"


class SingleGroup(Group):
    """One process: every collective is the identity."""

    backend = "single"

    def all_reduce(self, buf) -> Work:
        return DONE

    def reduce_scatter(self, send, recv) -> Work:
        recv[...] = send[: recv.size]
        return DONE

    def all_gather(self, buf) -> Work:
        return DONE

    def broadcast(self, buf, root: int = 0) -> Work:
        return DONE

    def barrier(self, timeout: float | None = None):
        return None

    def sum_host(self, values) -> np.ndarray:
        return np.asarray(values, np.float64)
