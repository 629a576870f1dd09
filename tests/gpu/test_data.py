"""The token loader on the GPU: the CPU's batches, on the device (tests/test_data.py tests the loader)."""
import numpy as np

from llamac.data.loader import TokenLoader
from tests.test_data import shard  # noqa: F401  (the fixture)


def test_gpu_batches_are_the_cpu_batches_on_the_device(shard):
    from llamac.engine import backend
    cpu = TokenLoader(shard, 32, 4, seed=0, grad_accum=2)
    gpu = TokenLoader(shard, 32, 4, seed=0, grad_accum=2, device="cuda")   # prefetches on a thread
    for step in range(3):
        for micro_step in range(2):
            x, y = gpu.get_batch(step, micro_step)
            assert backend.device_of(x) == backend.device_of(y) == "cuda" and x.dtype == np.int64
            expected = cpu.get_batch(step, micro_step)
            assert (backend.to_numpy(x) == expected[0]).all() and (backend.to_numpy(y) == expected[1]).all()
    assert backend.device_of(gpu.eval_batches(1)[0][0]) == "cuda"
    gpu.close()
