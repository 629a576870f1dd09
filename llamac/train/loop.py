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
from llamac.dist import watchdog, world
from llamac.engine import backend
from llamac.engine.tensor import manual_seed, no_grad
from llamac.errors import LlamacError
from llamac.model.llama import Llama
from llamac.train import checkpoint, fusions
from llamac.train.precision import compute_precision, resolve_dtype
from llamac.train.optim import AdamW, lr_at
from llamac.train.plot import plot_metrics
from llamac.train.step import TrainStep, log  # noqa: F401 - llamac.train.loop.TrainStep, as before

PEAK_FLOPS = {"bf16": 989e12, "fp32": 67e12}   # H100 SXM dense, for MFU on the GPU




class Trainer:
    """Runs `recipe.train` over batches from `batch_fn(step, micro_step) -> (x, y, segments)`.

    `eval_fn(model) -> {"val_loss": ...}` is called every eval_every steps and at the end.
    Everything a resumed run needs is in the checkpoint: weights, AdamW moments, the step
    (which fixes the data position and learning rate) and the RNG state.
    """

    def __init__(self, recipe: Recipe, model: Llama, device: str, batch_fn: Callable, eval_fn: Callable,
                 tokenizer_path=None, tokens_per_step: int | None = None,
                 extra_state: dict | None = None, group=None):
        self.recipe, self.cfg, self.model, self.device = recipe, recipe.train, model, device
        # data parallel: batch_fn gives this rank's slice of every batch, eval_fn reduces over ranks
        self.group = group or world.current()
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
        trainable = checkpoint.trainable_parameters(model)
        hyper = dict(lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps,
                     weight_decay=self.cfg.weight_decay)
        reducer = None
        if self.group.distributed:
            world.check_recipe(recipe, self.group.world_size)
            self.group.broadcast_arrays([p.data for _, p in trainable])     # every rank starts from rank 0's
        if self.group.distributed and self.cfg.zero:
            from llamac.dist.zero import ShardedAdamW
            self.optimizer = ShardedAdamW(trainable, self.group, **hyper)
            reducer = self.optimizer.reducer
        else:
            self.optimizer = AdamW(trainable, **hyper)
            if self.group.distributed:
                from llamac.dist.reducer import GradReducer
                reducer = GradReducer([p for _, p in trainable], self.group)
        self.stepper = TrainStep(model, self.optimizer, self.cfg.grad_accum, self.cfg.grad_clip,
                                 cuda_graph=self.cfg.cuda_graph, cpu_bf16=self.cpu_bf16, reducer=reducer)
        self.step = 0
        self.already_finished = False   # run() found the run complete and did nothing
        self.stop_requested = False     # a signal reached this process
        self.stopping = False           # ... and every rank agreed to stop after this step
        self.stop_signal = None
        self.metrics_path = self.out_dir / "metrics.jsonl"

    # ------------------------------------------------------------ state
    def resume_or_start(self, resume: bool):
        main = self.group.is_main
        self.out_dir.mkdir(parents=True, exist_ok=True)
        found = checkpoint.latest(self.out_dir)
        if found is not None and not resume:
            # --no-resume never deletes a previous run: it is moved aside (by rank 0).
            if main:
                aside = checkpoint.checkpoint_root(self.out_dir).with_name(f"checkpoints.old-{int(time.time())}")
                os.replace(checkpoint.checkpoint_root(self.out_dir), aside)
                if self.metrics_path.exists():
                    os.replace(self.metrics_path, aside / "metrics.jsonl")
                log(f"--no-resume: previous checkpoints moved to {aside}")
            found = None
        if found is None:
            if main:
                self.metrics_path.unlink(missing_ok=True)
            self.group.barrier(timeout=math.inf)
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
        if main:
            self._truncate_metrics(self.step)
        self.group.barrier(timeout=math.inf)
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
        if records and self.group.is_main and (not png.exists() or png.stat().st_mtime_ns < self.metrics_path.stat().st_mtime_ns):
            plot_metrics(self.metrics_path, png)    # the run was killed between its last save and its plot
        return summary

    def _stop_on_non_finite(self, what: str):
        good = checkpoint.latest(self.out_dir)
        raise LlamacError(f"{what} at step {self.step}; stopping. Last good checkpoint: {good or 'none'} "
                          "(try a lower train.lr or stronger train.grad_clip)")

    def save(self):
        from llamac.engine.tensor import generator

        # Never let a diverged model replace a good checkpoint (one reduction per save). With
        # ZeRO-1 the weights and moments are gathered from the ranks (every rank takes part);
        # rank 0 writes the one checkpoint.
        weights = self.optimizer.master_weights()
        if not all(bool(backend.get_array_module(w).isfinite(w).all()) for w in weights.values()):
            self._stop_on_non_finite("weights are NaN or infinite")
        main = self.group.is_main
        moments = self.optimizer.state_dict() if main or not isinstance(self.optimizer, AdamW) else None
        if not main:
            return checkpoint.checkpoint_root(self.out_dir) / f"step_{self.step:08d}"
        state = {"optimizer_t": self.optimizer.t, "rng_cpu": generator("cpu").bit_generator.state,
                 "data_position": {"step": self.step, "seed": self.recipe.seed},
                 "tokens_seen": self.step * self.tokens_per_step, **self.extra_state}
        if self.group.distributed:
            state["data_parallel"] = {"world_size": self.group.world_size, "zero": self.cfg.zero}
        return checkpoint.save(self.out_dir, self.step, self.model, None, self.recipe, state,
                               self.tokenizer_path, keep=self.cfg.keep_checkpoints, weights=weights,
                               optimizer_state=moments)

    def _metric(self, record: dict):
        if not self.group.is_main:
            return
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
        group, dog = self.group, world.watchdog()
        if dog is not None:
            dog.arm()
        t_last, steps_since = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps and not self.stopping:
                loss, norm, lr = self.train_step()
                steps_since += 1
                on_log = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
                if self.device == "cpu" or on_log:   # reading the loss syncs the GPU: only when logged there
                    loss_value = float(loss)
                    if not math.isfinite(loss_value):
                        self._stop_on_non_finite(f"loss is {loss_value}")
                if dog is not None:
                    dog.progress(self.step)
                if not group.distributed:
                    self.stopping = self.stop_requested
                elif on_log:
                    # The logged loss is the mean over the ranks (each had its slice of the batch);
                    # a stop is agreed here, so that every rank stops after the same step.
                    total, stops = group.sum_host([loss_value, float(self.stop_requested)])
                    loss_value, self.stopping = total / group.world_size, stops > 0
                if on_log:
                    backend.synchronize()
                    now = time.perf_counter()
                    tok_s = steps_since * self.tokens_per_step / (now - t_last)
                    record = {"step": self.step, "loss": round(loss_value, 6), "lr": lr,
                              "tokens_per_s": round(tok_s, 1), "grad_norm": round(float(norm), 4)}
                    if self.device == "cuda":
                        peak = PEAK_FLOPS[self.dtype] * group.world_size
                        record["mfu"] = round(flops * tok_s / peak, 4)
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
                if paused and dog is not None:
                    dog.progress(self.step)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
            if dog is not None:
                dog.disarm()
        if self.stopping:
            path = self.save()
            group.barrier(timeout=math.inf)   # no rank leaves (ending an MPI job) before rank 0 has written it
            if self.stop_signal == signal.SIGINT:
                log(f"interrupted at step {self.step}: checkpoint saved to {path}; run the same command to resume")
                raise SystemExit(130)
            log(f"stopped at step {self.step}: checkpoint saved to {path}")
            return summary
        summary.update(self.evaluate(None))
        summary["step"] = self.step
        summary["cuda_graph"] = self.stepper.captured
        summary["checkpoint"] = str(self.save())
        if group.is_main:
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
        if self.group.distributed and watchdog.is_teardown():
            os._exit(128 + signum)          # mpirun ending the job after another rank failed: no word
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt          # second Ctrl-C: stop now, without saving
        self.stop_requested, self.stop_signal = True, signum
        log("stopping after this step (Ctrl-C again to abort without saving)")


class _progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI, files)."""

    def __init__(self, total: int, initial: int):
        self.interactive = sys.stderr.isatty() and world.current().is_main
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
    """`llamac pretrain`: data (tokenizer and shards made if missing), training, checkpoint, a sample.
    A data-parallel rank (started by `--gpus N`, `--procs N`, torchrun, srun or mpirun) trains its
    slice of every batch; rank 0 prepares the data, writes checkpoints and metrics and samples."""
    device = backend.resolve_device(recipe.device)
    group = world.init(device)
    with world.failures_end_the_job(group):
        world.check_recipe(recipe, group.world_size)
        return _pretrain(recipe, resume, device, group)


def _pretrain(recipe: Recipe, resume: bool, device: str, group) -> dict:
    from llamac.data.loader import TokenLoader
    from llamac.data.pipeline import prepare_data
    from llamac.data.tokenizer import Tokenizer

    if group.is_main:       # (the launcher prepared it already and said so)
        info = prepare_data(recipe, verbose=watchdog.run_dir() is None)
    group.barrier(timeout=math.inf)        # the others find it made
    if not group.is_main:
        info = prepare_data(recipe, verbose=False)
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
    ranks = f"; {group.world_size} rank{'s' * (group.world_size > 1)} ({group.backend})" if group.distributed else ""
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layers} layers, dim {model.config.dim}; "
        f"device {device}; {info.n_train_tokens:,} training tokens{ranks}")
    rows = world.rows(t.batch_size, group)         # this rank's rows of every batch
    train_loader = TokenLoader(info.train_path, recipe.data.seq_len, t.batch_size, recipe.seed, device=device, rows=rows)
    val_loader = TokenLoader(info.val_path, recipe.data.seq_len, t.batch_size, recipe.seed + 1, device=device, rows=rows)
    val_batches = [val_loader.get_batch(i) for i in range(t.eval_batches)]
    bos = tokenizer.bos_id

    def batch_fn(step, micro):
        x, y = train_loader.get_batch(step, micro)
        return x, y, document_segments(x, bos)

    from llamac.eval.bpb import recipe_validation_texts
    from llamac.eval.runner import training_evaluator
    tasks = training_evaluator(recipe, tokenizer, lambda: recipe_validation_texts(recipe)) if group.is_main else None

    def eval_fn(model):
        losses = [model(x, y, segment_ids=document_segments(x, bos))[1].data for x, y in val_batches]
        total = sum(float(v) for v in losses)
        if group.distributed:      # every rank's slice of every batch: the mean of equal-sized slices
            total = float(group.sum_host([total])[0]) / group.world_size
        return {"val_loss": float(total / len(losses)), **(tasks(model) if tasks else {})}

    trainer = Trainer(recipe, model, device, batch_fn, eval_fn, tokenizer_path=info.tokenizer_path, group=group)
    summary = trainer.run(resume=resume)
    if not trainer.stopping and not trainer.already_finished and t.sample_tokens > 0 and group.is_main:
        from llamac.infer.generate import generate_text
        print(f"\n--- sample (step {trainer.step}) ---", file=sys.stderr)
        text = generate_text(model, tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                             temperature=0.8, top_k=40, seed=recipe.seed, stream=sys.stdout)
        summary["sample"] = text
        print(flush=True)
    return summary
