"""MPIGroup: the collectives over mpi4py (MPI's standard Python binding) on NumPy buffers: the CPU.

Nonblocking collectives (Iallreduce, ...) let a bucket's reduction start while the backward goes
on; MPI moves them forward only inside its calls, so `progress()` tests them from the gradient
hooks. A wait polls with a deadline rather than blocking in MPI forever: a rank that died or hung
leaves the others a timeout naming the collective, not a deadlock.
"""
from __future__ import annotations

import time

import numpy as np

from llamac.dist.group import Group, Work
from llamac.errors import LlamacError


def mpi_module():
    """mpi4py's MPI, or a one-line error saying how to get it."""
    try:
        from mpi4py import MPI  # noqa: PLC0415 - the dist extra
    except Exception as exc:
        raise LlamacError(f"data parallel on the CPU needs mpi4py and an MPI library ({type(exc).__name__}: {exc}); "
                          "pip install 'llamac[dist]'") from None
    return MPI


_TYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64), np.dtype(np.int32))


def _buffer(a: np.ndarray):
    if not isinstance(a, np.ndarray) or a.dtype not in _TYPES or not a.flags.c_contiguous:
        raise LlamacError(f"MPI collectives take contiguous float32/float64/int32/int64 NumPy arrays, "
                          f"got {type(a).__name__} {getattr(a, 'dtype', '')}")
    return a


class MPIWork(Work):
    def __init__(self, group: "MPIGroup", request, what: str):
        self.group, self.request, self.what = group, request, what
        self.finished = False

    def done(self) -> bool:
        if not self.finished:
            self.finished = bool(self.request.Test())
        return self.finished

    def wait(self):
        if self.finished:
            return
        deadline = time.monotonic() + self.group.timeout
        pause = 0.0
        while not self.request.Test():
            if time.monotonic() > deadline:
                raise LlamacError(f"rank {self.group.rank}: {self.what} did not complete within "
                                  f"{self.group.timeout:.0f} s (another rank died or hung; LLAMAC_DIST_TIMEOUT)")
            time.sleep(pause)
            pause = min(pause + 1e-5, 1e-3)    # spin first: most waits are short
        self.finished = True
        self.group.pending = [w for w in self.group.pending if w is not self]


class MPIGroup(Group):
    backend = "mpi"

    def __init__(self, timeout: float, local_rank: int | None = None):
        MPI = mpi_module()
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = self.rank if local_rank is None else local_rank
        self.timeout = float(timeout)
        self.pending: list[MPIWork] = []

    def _work(self, request, what) -> MPIWork:
        work = MPIWork(self, request, what)
        self.pending.append(work)
        return work

    def all_reduce(self, buf) -> Work:
        return self._work(self.comm.Iallreduce(self.MPI.IN_PLACE, _buffer(buf), op=self.MPI.SUM),
                          f"all_reduce of {buf.size} values")

    def reduce_scatter(self, send, recv) -> Work:
        if send.size != recv.size * self.world_size:
            raise LlamacError(f"reduce_scatter: {send.size} values do not split into {self.world_size} x {recv.size}")
        return self._work(self.comm.Ireduce_scatter_block(_buffer(send), _buffer(recv), op=self.MPI.SUM),
                          f"reduce_scatter of {send.size} values")

    def all_gather(self, buf) -> Work:
        if buf.size % self.world_size:
            raise LlamacError(f"all_gather: {buf.size} values do not split over {self.world_size} ranks")
        return self._work(self.comm.Iallgather(self.MPI.IN_PLACE, _buffer(buf)), f"all_gather of {buf.size} values")

    def broadcast(self, buf, root: int = 0) -> Work:
        return self._work(self.comm.Ibcast(_buffer(buf), root=root), f"broadcast of {buf.size} values")

    def barrier(self, timeout: float | None = None):
        work = self._work(self.comm.Ibarrier(), "barrier")
        if timeout is None:
            work.wait()
            return
        saved, self.timeout = self.timeout, float(timeout)
        try:
            work.wait()
        finally:
            self.timeout = saved

    def progress(self):
        for work in self.pending:
            work.done()

    def sum_host(self, values) -> np.ndarray:
        buf = np.array(values, np.float64).reshape(-1)
        self.all_reduce(buf).wait()
        return buf

    def abort(self, code: int = 1):
        """End every rank of the job now (MPI_Abort): the others may sit in a collective."""
        self.comm.Abort(code)
