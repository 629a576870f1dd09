"""The training loop shared by `pretrain` and `sft`: schedule, accumulation, clipping,
validation, atomic checkpoints with resume, Ctrl-C handling, metrics, plot and a sample."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from llamac import runtime
from llamac.config import Recipe
from llamac.engine import backend
from llamac.engine.tensor import manual_seed, no_grad
from llamac.errors import LlamacError
from llamac.model.llama import Llama
from llamac.train import checkpoint, fusions
from llamac.train.precision import compute_precision, resolve_dtype
from llamac.train.optim import AdamW, lr_at
from llamac.train.plot import plot_metrics

PEAK_FLOPS = {"bf16": 989e12, "fp32": 67e12}   # H100 SXM dense, for MFU on the GPU


def log(msg: str):
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
    """

    def __init__(self, model, optimizer, grad_accum: int = 1, grad_clip: float | None = None,
                 cuda_graph: bool = True, warmup: int = 2, optimizer_in_graph: bool = True,
                 cpu_bf16: bool = False):
        self.cpu_bf16 = cpu_bf16    # the CPU's matrix products in bf16 (runtime cpu_bf16_products)
        self.model, self.optimizer = (fusions.fuse(model) if isinstance(model, Llama) else model), optimizer
        self.grad_accum, self.grad_clip, self.warmup = grad_accum, grad_clip, warmup
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]   # frozen ones: no gradient
        self.device = self.params[0].device if self.params else "cpu"
        # a graph would replay one dropout mask: the model's, or the adapters' (train.lora)
        dropout = max(getattr(getattr(model, "config", None), "dropout", 0.0) or 0.0,
                      getattr(getattr(model, "lora", None), "dropout", 0.0))
        self.use_graph = bool(cuda_graph) and self.device == "cuda" and dropout == 0.0
        self.eager_steps = 0
        self.graphs = None          # [first micro-step graph, accumulating graph or None]
        self.pool = None            # the graphs' private memory pool
        self.graph_error = None     # why capture failed (then every step runs eagerly)
        self.update = None          # the optimizer step recorded in the graph (optim.GraphUpdate)
        self.optimizer_in_graph = optimizer_in_graph
        self.mismatch_warned = False

    @property
    def captured(self) -> bool:
        return self.graphs is not None

    def __call__(self, get_batch: Callable, lr: float):
        """get_batch(micro) -> (x, y, segments); returns (mean loss, pre-clip grad norm) as device scalars."""
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

    # ------------------------------------------------------------ eager
    def _eager(self, batches):
        self.optimizer.zero_grad()
        total = None
        for x, y, segments in batches:
            _, loss = self.model(x, y, segment_ids=segments)
            (loss * (1.0 / self.grad_accum)).backward() if self.grad_accum > 1 else loss.backward()
            total = loss.data if total is None else total + loss.data
        self.eager_steps += 1
        return total / self.grad_accum if self.grad_accum > 1 else total

    # ------------------------------------------------------------ CUDA graphs
    @staticmethod
    def _key(batch):
        return tuple(None if a is None else (tuple(a.shape), str(a.dtype)) for a in batch)

    def _forward_backward(self):
        x, y, segments = self.static
        _, loss = self.model(x, y, segment_ids=segments)
        (loss * (1.0 / self.grad_accum)).backward() if self.grad_accum > 1 else loss.backward()
        return loss.data

    def _capture(self, batch):
        xp = self.params[0].xp
        self.key = self._key(batch)
        self.static = tuple(None if a is None else xp.array(a, copy=True) for a in batch)
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
            loss = self._forward_backward()
            if update is not None and update.record():
                self.update = update
            return loss
        try:
            self.pool = backend.new_graph_pool()
            first, self.loss_first = backend.capture_graph(step, self.pool)
            if self.update is not None:
                self.update.bind()
            self.grads = [p.grad for p in self.params]
            graphs = [first, None]
            if self.grad_accum > 1:
                def accumulate():
                    loss = self._forward_backward()
                    for i, p in enumerate(self.params):       # end in the first graph's buffers
                        if self.grads[i] is not None and p.grad is not self.grads[i]:
                            xp.copyto(self.grads[i], p.grad)
                            p.grad = self.grads[i]
                    return loss
                graphs[1], self.loss_accum = backend.capture_graph(accumulate, self.pool)
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
        self.loss_first = self.loss_accum = None
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
        for micro, batch in enumerate(batches):
            for dst, src in zip(self.static, batch):
                if dst is not None:
                    xp.copyto(dst, xp.asarray(src))
            self.graphs[0 if micro == 0 else 1].launch()
            loss = self.loss_first if micro == 0 else self.loss_accum
            total = loss.copy() if total is None else total + loss
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return total / self.grad_accum if self.grad_accum > 1 else total


class Trainer:
    """Runs `recipe.train` over batches from `batch_fn(step, micro_step) -> (x, y, segments)`.

    `eval_fn(model) -> {"val_loss": ...}` is called every eval_every steps and at the end.
    Everything a resumed run needs is in the checkpoint: weights, AdamW moments, the step
    (which fixes the data position and learning rate) and the RNG state.
    """

    def __init__(self, recipe: Recipe, model: Llama, device: str, batch_fn: Callable, eval_fn: Callable,
                 tokenizer_path=None, tokens_per_step: int | None = None,
                 extra_state: dict | None = None):
        self.recipe, self.cfg, self.model, self.device = recipe, recipe.train, model, device
        self.batch_fn, self.eval_fn = batch_fn, eval_fn
        self.tokenizer_path = tokenizer_path
        self.extra_state = extra_state or {}      # saved in every checkpoint (e.g. the chat template)
        self.out_dir = Path(recipe.out_dir)
        self.tokens_per_step = tokens_per_step or self.cfg.batch_size * self.cfg.grad_accum * recipe.data.seq_len
        self.dtype, why = resolve_dtype(self.cfg.dtype, device)
        if self.cfg.dtype == "auto" or self.dtype != self.cfg.dtype:
            log(f"train.dtype {self.cfg.dtype}: {self.dtype} ({why})")
        self.cpu_bf16 = self.dtype == "bf16" and device == "cpu"
        fusions.fuse(model, recompute=self.cfg.recompute)    # before AdamW: it may re-lay wq | wk | wv
        # Frozen parameters (a LoRA run's base) get no optimizer state: only what trains is updated and saved.
        self.optimizer = AdamW(checkpoint.trainable_parameters(model), lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                               eps=self.cfg.eps, weight_decay=self.cfg.weight_decay)
        self.stepper = TrainStep(model, self.optimizer, self.cfg.grad_accum, self.cfg.grad_clip,
                                 cuda_graph=self.cfg.cuda_graph, cpu_bf16=self.cpu_bf16)
        self.step = 0
        self.already_finished = False   # run() found the run complete and did nothing
        self.stop_requested = False
        self.stop_signal = None
        self.metrics_path = self.out_dir / "metrics.jsonl"

    # ------------------------------------------------------------ state
    def resume_or_start(self, resume: bool):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        found = checkpoint.latest(self.out_dir)
        if found is not None and not resume:
            # --no-resume never deletes a previous run: it is moved aside.
            aside = checkpoint.checkpoint_root(self.out_dir).with_name(f"checkpoints.old-{int(time.time())}")
            os.replace(checkpoint.checkpoint_root(self.out_dir), aside)
            if self.metrics_path.exists():
                os.replace(self.metrics_path, aside / "metrics.jsonl")
            log(f"--no-resume: previous checkpoints moved to {aside}")
            found = None
        if found is None:
            self.metrics_path.unlink(missing_ok=True)
            return
        checkpoint.check_compatible(found, self.model.config)
        state = checkpoint.read_state(found)
        weights, _ = checkpoint.load_safetensors(found / "model.safetensors")
        checkpoint.load_trainable(self.model, weights, found)
        self.optimizer.load_master_weights(weights)
        moments, _ = checkpoint.load_safetensors(found / "optimizer.safetensors")
        self.optimizer.load_state_dict(moments, state["optimizer_t"])
        self.step = state["step"]
        from llamac.engine.tensor import generator
        generator("cpu").bit_generator.state = state["rng_cpu"]
        self._truncate_metrics(self.step)
        log(f"resumed from {found} at step {self.step}")

    def _truncate_metrics(self, step: int):
        """Drop metric lines from steps a resumed run will redo, so the log reads as one run."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if kept != lines:
            self.metrics_path.write_text("".join(ln + "\n" for ln in kept))

    def finished(self, resume: bool = True) -> Path | None:
        """The newest checkpoint when it has already reached train.max_steps (resuming it is a no-op)."""
        found = checkpoint.latest(self.out_dir) if resume else None
        if found is None:
            return None
        checkpoint.check_compatible(found, self.model.config)
        return found if checkpoint.read_state(found)["step"] >= self.cfg.max_steps else None

    def _finished_summary(self, found: Path) -> dict:
        """What the finished run reported, read back from disk; only a missing or stale plot is written."""
        self.step = checkpoint.read_state(found)["step"]
        log(f"already trained to step {self.step} (train.max_steps={self.cfg.max_steps}); nothing to do")
        records = [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()] \
            if self.metrics_path.exists() else []
        evals = [r for r in records if "loss" not in r and r.get("step") == self.step]
        summary = {**(evals[-1] if evals else {}), "step": self.step, "cuda_graph": False, "checkpoint": str(found)}
        png = self.out_dir / "loss.png"
        if records and (not png.exists() or png.stat().st_mtime_ns < self.metrics_path.stat().st_mtime_ns):
            plot_metrics(self.metrics_path, png)    # the run was killed between its last save and its plot
        return summary

    def _stop_on_non_finite(self, what: str):
        good = checkpoint.latest(self.out_dir)
        raise LlamacError(f"{what} at step {self.step}; stopping. Last good checkpoint: {good or 'none'} "
                          "(try a lower train.lr or stronger train.grad_clip)")

    def save(self):
        from llamac.engine.tensor import generator

        # Never let a diverged model replace a good checkpoint (one reduction per save).
        if not all(bool(backend.get_array_module(w).isfinite(w).all())
                   for w in self.optimizer.master_weights().values()):
            self._stop_on_non_finite("weights are NaN or infinite")
        state = {"optimizer_t": self.optimizer.t, "rng_cpu": generator("cpu").bit_generator.state,
                 "data_position": {"step": self.step, "seed": self.recipe.seed},
                 "tokens_seen": self.step * self.tokens_per_step, **self.extra_state}
        path = checkpoint.save(self.out_dir, self.step, self.model, self.optimizer, self.recipe, state,
                               self.tokenizer_path, keep=self.cfg.keep_checkpoints,
                               weights=self.optimizer.master_weights())
        return path

    def _metric(self, record: dict):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------ loop
    def train_step(self):
        lr = lr_at(self.step, self.cfg)
        loss, norm = self.stepper(lambda micro: self.batch_fn(self.step, micro), lr)
        self.step += 1
        return loss, norm, lr

    def run(self, resume: bool = True) -> dict:
        cfg = self.cfg
        manual_seed(self.recipe.seed)
        done = self.finished(resume)
        if done is not None:
            # Evaluating, saving or plotting again would append a duplicate record and rewrite
            # the final checkpoint: a finished run's files stay as they are.
            self.already_finished = True
            return self._finished_summary(done)
        self.resume_or_start(resume)
        self.model.train()
        # Ctrl-C and SIGTERM finish the step in flight, then save: a signal never lands between the
        # updates of two parameters. A second Ctrl-C aborts at once (the last checkpoint stays).
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        bar = _progress(cfg.max_steps, self.step)
        flops = self.model.flops_per_token(self.recipe.data.seq_len)
        summary = {"step": self.step}
        t_last, steps_since = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps and not self.stop_requested:
                loss, norm, lr = self.train_step()
                steps_since += 1
                on_log = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
                if self.device == "cpu" or on_log:   # reading the loss syncs the GPU: only when logged there
                    loss_value = float(loss)
                    if not math.isfinite(loss_value):
                        self._stop_on_non_finite(f"loss is {loss_value}")
                if on_log:
                    backend.synchronize()
                    now = time.perf_counter()
                    tok_s = steps_since * self.tokens_per_step / (now - t_last)
                    record = {"step": self.step, "loss": round(loss_value, 6), "lr": lr,
                              "tokens_per_s": round(tok_s, 1), "grad_norm": round(float(norm), 4)}
                    if self.device == "cuda":
                        record["mfu"] = round(flops * tok_s / PEAK_FLOPS[self.dtype], 4)
                    self._metric(record)
                    bar.update(self.step, record)
                    t_last, steps_since = now, 0
                paused = False
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self.evaluate(bar)
                    paused = True
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.max_steps:
                    self.save()
                    paused = True
                if paused and steps_since == 0:   # keep evaluation and saving out of tokens/s
                    t_last = time.perf_counter()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
        if self.stop_requested:
            path = self.save()
            if self.stop_signal == signal.SIGINT:
                log(f"interrupted at step {self.step}: checkpoint saved to {path}; run the same command to resume")
                raise SystemExit(130)
            log(f"stopped at step {self.step}: checkpoint saved to {path}")
            return summary
        summary.update(self.evaluate(None))
        summary["step"] = self.step
        summary["cuda_graph"] = self.stepper.captured
        summary["checkpoint"] = str(self.save())
        plot_metrics(self.metrics_path, self.out_dir / "loss.png")
        return summary

    def evaluate(self, bar) -> dict:
        self.model.eval()
        with no_grad(), runtime.override(cpu_bf16_products=self.cpu_bf16):
            result = self.eval_fn(self.model)
        self.model.train()
        record = {"step": self.step, **{k: round(float(v), 6) for k, v in result.items()}}
        if "val_loss" in result:
            record["val_ppl"] = round(math.exp(min(float(result["val_loss"]), 50.0)), 4)
        self._metric(record)
        line = " ".join(f"{k} {v}" for k, v in record.items())
        (bar.write if bar else log)(f"eval: {line}")
        return record

    def _request_stop(self, signum, _frame):
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt          # second Ctrl-C: stop now, without saving
        self.stop_requested, self.stop_signal = True, signum
        log("stopping after this step (Ctrl-C again to abort without saving)")


class _progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI, files)."""

    def __init__(self, total: int, initial: int):
        self.interactive = sys.stderr.isatty()
        self.bar = None
        if self.interactive:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.last = initial

    def update(self, step: int, record: dict):
        text = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
        if "mfu" in record:
            text += f" MFU {100 * record['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix_str(text)
        else:
            log(f"step {step}: {text}")
        self.last = step

    def write(self, text: str):
        (self.bar.write if self.bar is not None else log)(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def document_segments(x, bos_id: int):
    """Document ids per position from the <s> tokens, so packed documents never attend to each other."""
    xp = backend.get_array_module(x)
    return xp.cumsum(x == bos_id, axis=1)


def build_model(recipe: Recipe, vocab_size: int, device: str) -> Llama:
    """recipe.model with the tokenizer's vocab_size, as a new config (model.config): the recipe is not changed."""
    manual_seed(recipe.seed)
    cfg = dataclasses.replace(recipe.model, vocab_size=vocab_size)
    return compute_precision(Llama(cfg).to(device), recipe, device)


def pretrain(recipe: Recipe, resume: bool = True) -> dict:
    """`llamac pretrain`: data (tokenizer and shards made if missing), training, checkpoint, a sample."""
    from llamac.data.loader import TokenLoader
    from llamac.data.pipeline import prepare_data
    from llamac.data.tokenizer import Tokenizer

    device = backend.resolve_device(recipe.device)
    info = prepare_data(recipe, verbose=True)
    tokenizer = Tokenizer(info.tokenizer_path)
    t = recipe.train
    prompt_tokens = len(tokenizer.encode(t.sample_prompt, bos=True))
    if t.sample_tokens and prompt_tokens + t.sample_tokens > recipe.model.max_seq_len:
        # said now rather than after training, when the sample is drawn
        raise LlamacError(f"train.sample_prompt ({prompt_tokens} tokens with <s>) + train.sample_tokens "
                          f"({t.sample_tokens}) exceeds model.max_seq_len ({recipe.model.max_seq_len})")
    model = build_model(recipe, info.vocab_size, device)
    recipe = dataclasses.replace(recipe, model=model.config)   # a copy: checkpoints record the model as built
    t = recipe.train
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layers} layers, dim {model.config.dim}; "
        f"device {device}; {info.n_train_tokens:,} training tokens")
    train_loader = TokenLoader(info.train_path, recipe.data.seq_len, t.batch_size, recipe.seed, device=device)
    val_loader = TokenLoader(info.val_path, recipe.data.seq_len, t.batch_size, recipe.seed + 1, device=device)
    val_batches = [val_loader.get_batch(i) for i in range(t.eval_batches)]
    bos = tokenizer.bos_id

    def batch_fn(step, micro):
        x, y = train_loader.get_batch(step, micro)
        return x, y, document_segments(x, bos)

    from llamac.eval.bpb import recipe_validation_texts
    from llamac.eval.runner import training_evaluator
    tasks = training_evaluator(recipe, tokenizer, lambda: recipe_validation_texts(recipe))

    def eval_fn(model):
        losses = [model(x, y, segment_ids=document_segments(x, bos))[1].data for x, y in val_batches]
        return {"val_loss": float(sum(float(v) for v in losses) / len(losses)), **(tasks(model) if tasks else {})}

    trainer = Trainer(recipe, model, device, batch_fn, eval_fn, tokenizer_path=info.tokenizer_path)
    summary = trainer.run(resume=resume)
    if not trainer.stop_requested and not trainer.already_finished and t.sample_tokens > 0:
        from llamac.infer.generate import generate_text
        print(f"\n--- sample (step {trainer.step}) ---", file=sys.stderr)
        text = generate_text(model, tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                             temperature=0.8, top_k=40, seed=recipe.seed, stream=sys.stdout)
        summary["sample"] = text
        print(flush=True)
    return summary
