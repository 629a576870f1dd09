"""One optimizer step (TrainStep): forward + backward over the micro-batches, the gradients
averaged over data-parallel ranks, clip and AdamW, eagerly or replayed as CUDA graphs."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

from llamac import runtime
from llamac.dist import world
from llamac.engine import backend
from llamac.engine.tensor import Tensor
from llamac.model.llama import Llama
from llamac.train import fusions


def log(msg: str):
    """A line on stderr, from rank 0 only when data-parallel ranks train together."""
    if world.current().is_main:
        print(msg, file=sys.stderr, flush=True)


class TrainStep:
    """One optimizer step: forward + backward over `grad_accum` micro-batches, then clip and AdamW.

    On the GPU (cuda_graph on, no dropout) the first `warmup` steps run eagerly (kernels compile,
    caches such as the RoPE tables fill); the next one captures forward+backward of a micro-batch
    into a CUDA graph whose memory comes from a private pool, and every later step copies its batch
    into static input buffers and replays the graph: one launch instead of hundreds of Python-driven
    ones. With accumulation a second graph adds into the gradients the first one assigned. Without
    accumulation the fused AdamW step (clip included) is recorded into the same graph after the
    backward (optim.GraphUpdate: the host writes only the step's scalars before each replay); with
    it, or another optimizer, the optimizer runs eagerly after the graphs. A batch whose shapes
    differ from the captured ones runs eagerly. Nothing here waits for the GPU: the loss and norm
    stay device scalars.

    Data parallel (`reducer`, llamac.dist.reducer.GradReducer): the last micro-batch's backward
    reduces the gradients in buckets as they are produced, and the step waits for them before the
    optimizer. In the graphs that micro-batch has its own graph (the first one when there is no
    accumulation), so the reduction is recorded inside it, on NCCL's side stream. A batch may carry
    a fourth value, its loss weight (SFT: this rank's share of the step's loss tokens, times the
    world size), a device scalar in the graph.
    """

    def __init__(self, model, optimizer, grad_accum: int = 1, grad_clip: float | None = None,
                 cuda_graph: bool = True, warmup: int = 2, optimizer_in_graph: bool = True,
                 cpu_bf16: bool = False, reducer=None):
        self.cpu_bf16 = cpu_bf16    # the CPU's matrix products in bf16 (runtime cpu_bf16_products)
        self.model, self.optimizer = (fusions.fuse(model) if isinstance(model, Llama) else model), optimizer
        self.grad_accum, self.grad_clip, self.warmup = grad_accum, grad_clip, warmup
        self.reducer = reducer
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]   # frozen ones: no gradient
        self.device = self.params[0].device if self.params else "cpu"
        # a graph would replay one dropout mask: the model's, or the adapters' (train.lora)
        dropout = max(getattr(getattr(model, "config", None), "dropout", 0.0) or 0.0,
                      getattr(getattr(model, "lora", None), "dropout", 0.0))
        self.use_graph = bool(cuda_graph) and self.device == "cuda" and dropout == 0.0
        self.eager_steps = 0
        self.graphs = None          # [first micro-step graph, accumulating graph or None, last or None]
        self.pool = None            # the graphs' private memory pool
        self.graph_error = None     # why capture failed (then every step runs eagerly)
        self.update = None          # the optimizer step recorded in the graph (optim.GraphUpdate)
        self.optimizer_in_graph = optimizer_in_graph
        self.mismatch_warned = False

    @property
    def captured(self) -> bool:
        return self.graphs is not None

    def __call__(self, get_batch: Callable, lr: float):
        """get_batch(micro) -> (x, y, segments[, loss weight]); returns (mean loss, pre-clip grad norm)
        as device scalars (the loss times its weight)."""
        if self.cpu_bf16 and not runtime.options().cpu_bf16_products:
            with runtime.override(cpu_bf16_products=True):
                return self(get_batch, lr)
        batches = [get_batch(micro) for micro in range(self.grad_accum)]
        if self.use_graph and not self.captured and self.graph_error is None and self.eager_steps >= self.warmup:
            self._capture(batches[0])
        if self.captured and all(self._key(b) == self.key for b in batches):
            if self.update is not None:         # the optimizer is inside the graph: its scalars first
                self.update.prepare(lr, self.grad_clip)
            loss = self._replay(batches)
            norm = self.update.norm.copy() if self.update is not None else None
        else:
            if self.captured and not self.mismatch_warned:
                log("a batch's shapes differ from the captured CUDA graph's: that step runs eagerly")
                self.mismatch_warned = True
            loss = self._eager(batches)
            norm = None
        if norm is None:
            norm = self.optimizer.step(lr=lr, clip=self.grad_clip)
        if self.captured:
            self._bind_params()
        return loss, norm

    def _reducing(self, micro: int):
        """The reducer's hooks around the last micro-batch's backward."""
        if self.reducer is None or micro != self.grad_accum - 1:
            return contextlib.nullcontext()
        return self.reducer.reducing()

    @staticmethod
    def _weighted(loss, weight):
        return loss if weight is None else loss * (weight if isinstance(weight, Tensor) else float(weight))

    # ------------------------------------------------------------ eager
    def _eager(self, batches):
        self.optimizer.zero_grad()
        total = None
        for micro, (x, y, segments, *weight) in enumerate(batches):
            _, loss = self.model(x, y, segment_ids=segments)
            loss = self._weighted(loss, weight[0] if weight else None)
            with self._reducing(micro):
                (loss * (1.0 / self.grad_accum)).backward() if self.grad_accum > 1 else loss.backward()
            total = loss.data if total is None else total + loss.data
        if self.reducer is not None:
            self.reducer.finish()
        self.eager_steps += 1
        return total / self.grad_accum if self.grad_accum > 1 else total

    # ------------------------------------------------------------ CUDA graphs
    @staticmethod
    def _key(batch):
        return tuple(None if a is None else (tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", type(a))))
                     for a in batch)

    def _forward_backward(self, micro: int):
        x, y, segments, *weight = self.static
        _, loss = self.model(x, y, segment_ids=segments)
        loss = self._weighted(loss, Tensor(weight[0]) if weight else None)
        with self._reducing(micro):
            (loss * (1.0 / self.grad_accum)).backward() if self.grad_accum > 1 else loss.backward()
        if self.reducer is not None and micro == self.grad_accum - 1:
            self.reducer.finish()
        return loss.data

    def _capture(self, batch):
        xp = self.params[0].xp
        self.key = self._key(batch)
        self.static = tuple(None if a is None else xp.array(a, dtype=xp.float32 if i == 3 else None, copy=True)
                            for i, a in enumerate(batch))
        self._bind_params()
        # Arrays the graph reads but does not own must outlive it: the weights (rebound after
        # every optimizer step) and the RoPE tables the model caches.
        self.keep = list(getattr(self.model, "_rope_cache", {}).values())
        self.optimizer.zero_grad()
        backend.synchronize()
        backend.free_cached_gpu_memory()     # the eager steps' activations: not twice in memory
        make_update = getattr(self.optimizer, "graph_update", None)
        update = make_update() if self.optimizer_in_graph and self.grad_accum == 1 and make_update else None

        def step():
            loss = self._forward_backward(0)
            if update is not None and update.record():
                self.update = update
            return loss
        try:
            self.pool = backend.new_graph_pool()
            first, self.loss_first = backend.capture_graph(step, self.pool)
            if self.update is not None:
                self.update.bind()
            self.grads = [p.grad for p in self.params]
            graphs = [first, None, None]
            if self.grad_accum > 1:
                def accumulate(micro):
                    loss = self._forward_backward(micro)
                    if micro < self.grad_accum - 1 or self.reducer is None:
                        for i, p in enumerate(self.params):       # end in the first graph's buffers
                            if self.grads[i] is not None and p.grad is not self.grads[i]:
                                xp.copyto(self.grads[i], p.grad)
                                p.grad = self.grads[i]
                    return loss
                if self.grad_accum > 2 or self.reducer is None:
                    graphs[1], self.loss_accum = backend.capture_graph(lambda: accumulate(1), self.pool)
                if self.reducer is not None:     # the last micro-batch also reduces
                    graphs[2], self.loss_last = backend.capture_graph(lambda: accumulate(self.grad_accum - 1),
                                                                      self.pool)
        except Exception as exc:   # an op that cannot be captured: train eagerly, say why once
            self.graph_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"CUDA graph capture failed ({self.graph_error}); training eagerly "
                "(set train.cuda_graph: false to skip the attempt)")
            self.optimizer.zero_grad()
            self.pool = self.static = self.keep = self.update = None
            backend.release_gpu_memory()
            return
        self.graphs = graphs

    def release(self):
        """Drop the graphs, their buffers and the parameters' gradients, and give the graph pool's
        memory back to the driver (benchmarks that build one model after another)."""
        self.graphs = self.static = self.grads = self.keep = self.update = None
        self.loss_first = self.loss_accum = self.loss_last = None
        for p in self.params:
            p.grad = None
        if self.pool is not None:
            self.pool.free_all_blocks()
            self.pool = None

    def _bind_params(self):
        """Keep each weight at the address the graph was captured with: an optimizer that replaced
        p.data (the bf16 copy of an fp32 master) is copied back into the captured array."""
        if not hasattr(self, "bound"):
            self.bound = [p.data for p in self.params]
            return
        xp = self.params[0].xp
        for i, p in enumerate(self.params):
            if p.data is not self.bound[i]:
                xp.copyto(self.bound[i], p.data)
                p.data = self.bound[i]

    def _replay(self, batches):
        xp = self.params[0].xp
        total = None
        last = self.grad_accum - 1
        for micro, batch in enumerate(batches):
            for dst, src in zip(self.static, batch):
                if dst is not None:
                    xp.copyto(dst, xp.asarray(src))
            if micro == 0:
                graph, loss = self.graphs[0], self.loss_first
            elif micro == last and self.graphs[2] is not None:
                graph, loss = self.graphs[2], self.loss_last
            else:
                graph, loss = self.graphs[1], self.loss_accum
            graph.launch()
            total = loss.copy() if total is None else total + loss
        for p, g in zip(self.params, self.grads):
            p.grad = g
        if self.reducer is not None:
            self.reducer.bind_grads()
        return total / self.grad_accum if self.grad_accum > 1 else total
