"""NCCLGroup: the collectives over NCCL (CuPy's binding, NVIDIA's NCCL library) on CuPy arrays.

Every collective runs on one side stream of its own: the side stream first waits for an event
recorded on the current stream (so it sees the gradients written so far), NCCL runs there, and
`Work.wait()` makes the current stream wait for the side stream's event. Compute keeps running
while a bucket is reduced, the host never waits, and the same calls recorded inside a CUDA-graph
capture become the graph's fork and join.

The unique id that ties the ranks' communicators together comes from rank 0: through MPI when
mpirun started the job, else through the TCP store at MASTER_ADDR:MASTER_PORT (MASTER_PORT + 1
under torchrun, whose own store holds MASTER_PORT; LLAMAC_STORE_PORT overrides both).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from llamac.dist.env import Launch
from llamac.dist.group import Group, Work
from llamac.engine import backend
from llamac.errors import LlamacError

# nccl.h's ncclDataType_t and ncclRedOp_t (a stable ABI)
_NCCL_TYPES = {np.dtype(np.int32): 2, np.dtype(np.int64): 4, np.dtype(np.float16): 6, np.dtype(np.float32): 7,
               np.dtype(np.float64): 8, backend.bfloat16: 9}
NCCL_SUM = 0


def _type(a) -> int:
    code = _NCCL_TYPES.get(np.dtype(a.dtype))
    if code is None or not a.flags.c_contiguous:
        raise LlamacError(f"NCCL collectives take contiguous int32/int64/float16/bfloat16/float32/float64 arrays, "
                          f"got {a.dtype}")
    return code


class NCCLWork(Work):
    def __init__(self, event):
        self.event = event

    def wait(self):
        backend.cupy_module().cuda.get_current_stream().wait_event(self.event)

    def done(self) -> bool:
        return bool(self.event.done)


def store_port(launch: Launch) -> int:
    if os.environ.get("LLAMAC_STORE_PORT"):
        return int(os.environ["LLAMAC_STORE_PORT"])
    if launch.master_port is None:
        raise LlamacError("MASTER_PORT is not set: rank 0 serves the NCCL rendezvous there")
    under_torchrun = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return launch.master_port + 1 if under_torchrun else launch.master_port


def unique_id(launch: Launch, nccl, timeout: float) -> tuple:
    """The communicator's unique id, made on rank 0 and handed to every rank."""
    if launch.world_size == 1:
        return nccl.get_unique_id()
    if launch.source == "mpi":
        from llamac.dist.mpi import mpi_module
        comm = mpi_module().COMM_WORLD
        return comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
    from llamac.dist.store import TCPStore
    if not launch.master_addr:
        raise LlamacError("MASTER_ADDR is not set: the ranks meet at rank 0's host (MASTER_ADDR:MASTER_PORT)")
    store = TCPStore(launch.master_addr, store_port(launch), is_server=launch.rank == 0, timeout=timeout)
    if launch.rank == 0:
        store.set("nccl_unique_id", json.dumps(list(nccl.get_unique_id())))
        for r in range(1, launch.world_size):   # serve until every rank has the id
            store.get(f"joined/{r}", timeout)
        store.close()
        return tuple(json.loads(store.data["nccl_unique_id"]))
    uid = tuple(json.loads(store.get("nccl_unique_id", timeout)))
    store.set(f"joined/{launch.rank}", "1")
    return uid


class NCCLGroup(Group):
    backend = "nccl"

    def __init__(self, launch: Launch, timeout: float):
        nccl = backend.nccl_module()
        cp = backend.cupy_module()
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.timeout = float(timeout)
        backend.use_device(launch.local_rank)
        self.comm = nccl.NcclCommunicator(self.world_size, unique_id(launch, nccl, timeout), self.rank)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.cp = cp

    def _on_side(self, run) -> NCCLWork:
        cp = self.cp
        ready = cp.cuda.Event(disable_timing=True)
        ready.record(cp.cuda.get_current_stream())
        self.stream.wait_event(ready)
        run(self.stream.ptr)
        done = cp.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return NCCLWork(done)

    def all_reduce(self, buf) -> Work:
        t = _type(buf)
        return self._on_side(lambda s: self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, t, NCCL_SUM, s))

    def reduce_scatter(self, send, recv) -> Work:
        if send.size != recv.size * self.world_size or send.dtype != recv.dtype:
            raise LlamacError(f"reduce_scatter: {send.size} {send.dtype} values do not split into "
                              f"{self.world_size} x {recv.size} {recv.dtype}")
        t = _type(send)
        return self._on_side(lambda s: self.comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, t, NCCL_SUM, s))

    def all_gather(self, buf) -> Work:
        if buf.size % self.world_size:
            raise LlamacError(f"all_gather: {buf.size} values do not split over {self.world_size} ranks")
        n, t = buf.size // self.world_size, _type(buf)
        own = buf.data.ptr + self.rank * n * buf.itemsize      # in place: NCCL reads this rank's slice
        return self._on_side(lambda s: self.comm.allGather(own, buf.data.ptr, n, t, s))

    def broadcast(self, buf, root: int = 0) -> Work:
        t = _type(buf)
        return self._on_side(lambda s: self.comm.broadcast(buf.data.ptr, buf.data.ptr, buf.size, t, root, s))

    def _host_wait(self, work: NCCLWork, what: str, timeout: float | None):
        """Block the host until `work` is done, polling, within the timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not work.done():
            if time.monotonic() > deadline:
                raise LlamacError(f"rank {self.rank}: {what} did not complete within "
                                  f"{self.timeout if timeout is None else timeout:.0f} s "
                                  "(another rank died or hung; LLAMAC_DIST_TIMEOUT)")
            time.sleep(1e-4)

    def barrier(self, timeout: float | None = None):
        token = self.cp.zeros(1, np.float32)
        self._host_wait(self.all_reduce(token), "barrier", timeout)

    def sum_host(self, values) -> np.ndarray:
        buf = self.cp.asarray(np.array(values, np.float64).reshape(-1))
        work = self.all_reduce(buf)
        self._host_wait(work, "all_reduce of host values", None)
        return buf.get()

    def close(self):
        if getattr(self, "comm", None) is not None:
            self.comm.destroy()
            self.comm = None

    def abort(self, code: int = 1):
        if getattr(self, "comm", None) is not None:
            self.comm.abort()
            self.comm = None
