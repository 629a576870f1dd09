"""`llamac eval`: run tasks on a checkpoint, print a table, write JSON; the tasks training runs at each eval."""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

from llamac.engine import backend
from llamac.errors import LlamacError
from llamac.eval.tasks import TaskSpec, parse_tasks

HEADLINE = {"bpb": ("bpb",), "mc": ("acc", "acc_norm"), "next_sentence": ("acc", "acc_norm"),
            "skills": ("exact_match",)}


def _bar(total: int, description: str, show: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=description, unit="seq", leave=False, disable=not show, file=sys.stderr)


def run_task(model, tokenizer, task: TaskSpec, validation=None, limit: int | None = None, batch_tokens=None,
             skills_seed: int = 1337, show_progress: bool = False) -> dict:
    """One task's results. `validation()` gives the texts plain `bpb` scores."""
    started = time.perf_counter()
    if task.kind == "bpb":
        from llamac.eval.bpb import bits_per_byte, file_texts
        if task.path is not None:
            texts = file_texts(task.path)
        elif validation is not None:
            texts = validation()
        else:
            raise LlamacError("bpb needs text: this model has no run recipe to take a validation split from; "
                              "give bpb:PATH")
        texts = texts[:limit] if limit else texts
        with _bar(None, task.name, show_progress) as bar:
            result = bits_per_byte(model, tokenizer, texts, batch_tokens, bar.update)
    elif task.kind in ("mc", "next_sentence"):
        from llamac.eval.choice import read_items, score_items
        if task.kind == "mc":
            items = read_items(task.path)
        else:
            from llamac.eval.builtin import next_sentence_items
            items = list(next_sentence_items())
        items = items[:limit] if limit else items
        with _bar(sum(len(i.choices) for i in items), task.name, show_progress) as bar:
            result = score_items(model, tokenizer, items, batch_tokens, bar.update)
        result.pop("loglikelihoods")
    elif task.kind == "skills":
        from llamac.eval.skills import exact_match, heldout_skills
        result = exact_match(model, tokenizer, heldout_skills(skills_seed, limit))
    else:
        raise LlamacError(f"unknown eval task kind {task.kind!r}")
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def run_tasks(model, tokenizer, tasks, **options) -> dict:
    return {task.name: run_task(model, tokenizer, task, **options) for task in tasks}


def flat_metrics(results: dict, tasks) -> dict:
    """The headline numbers as one flat mapping ('bpb', 'next_sentence/acc', ...) for metrics.jsonl."""
    out = {}
    for task in tasks:
        for metric in HEADLINE[task.kind]:
            key = task.name if task.kind == "bpb" else f"{task.name}/{metric}"
            out[key] = results[task.name][metric]
    return out


def print_table(results: dict, title: str = "eval") -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for column in ("task", "metric", "value", "n", "seconds"):
        table.add_column(column)
    for name, result in results.items():
        count = result.get("n", result.get("documents", ""))
        for metric in ("bpb", "acc", "acc_norm", "exact_match", "ended_turn"):
            if metric in result:
                table.add_row(name, metric, f"{result[metric]:.4f}", str(count), f"{result['seconds']:.1f}")
    Console(file=sys.stdout).print(table)


def write_json(path, payload: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def resolve_dtype(dtype: str, device: str):
    """auto: bf16 on the GPU (the fused kernels' dtype), fp32 on the CPU."""
    names = {"fp32": "float32", "bf16": "bfloat16", "auto": "bfloat16" if device == "cuda" else "float32"}
    if dtype not in names:
        raise LlamacError(f"--dtype must be auto, fp32 or bf16, got {dtype!r}")
    if names[dtype] == "bfloat16" and device == "cpu":
        raise LlamacError("--dtype bf16 is a GPU setting; on the CPU the model scores in fp32")
    return names[dtype]


def load_scoring_model(checkpoint, device: str, dtype: str = "auto"):
    """(model, tokenizer, checkpoint path) ready to score: on the GPU with the training step's fused
    forward (q | k | v in one GEMM, residual adds inside the RMSNorms), as evaluations in training run."""
    from llamac.train.checkpoint import load_model
    from llamac.train.fusions import fuse
    model, tokenizer, ckpt = load_model(checkpoint, device=device, dtype=resolve_dtype(dtype, device))
    if tokenizer is None:
        raise LlamacError(f"{ckpt} has no tokenizer.model")
    if device == "cuda":
        fuse(model)
    return model.eval(), tokenizer, ckpt


def eval_command(checkpoint, tasks: str = "bpb,next_sentence", json_out=None, limit: int | None = None,
                 device: str = "auto", dtype: str = "auto", batch_tokens: int | None = None) -> dict:
    """`llamac eval`: load a llamac checkpoint or HF Llama folder, run the tasks, print and save results."""
    specs = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise LlamacError(f"--limit must be >= 1, got {limit}")
    if batch_tokens is not None and batch_tokens < 1:
        raise LlamacError(f"--batch-tokens must be >= 1, got {batch_tokens}")
    for task in specs:        # a missing file is said before the model loads
        if task.path is not None and not Path(task.path).exists():
            raise LlamacError(f"eval task {task.name}: file not found: {task.path}")
    device = backend.resolve_device(device)
    model, tokenizer, ckpt = load_scoring_model(checkpoint, device, dtype)
    seed = _recipe_seed(ckpt)

    def validation():
        from llamac.eval.bpb import validation_texts
        return validation_texts(ckpt)

    results = run_tasks(model, tokenizer, specs, validation=validation, limit=limit, batch_tokens=batch_tokens,
                        skills_seed=seed, show_progress=True)
    print_table(results, title=f"eval {checkpoint}")
    payload = {"checkpoint": str(checkpoint), "device": device, "dtype": resolve_dtype(dtype, device),
               "limit": limit, "tasks": results}
    if json_out is not None:
        write_json(json_out, payload)
    return payload


def _recipe_seed(ckpt) -> int:
    """The seed of the run (which fixes builtin:instruct's held-out split), or the recipes' 1337."""
    state_file = Path(ckpt) / "state.json"
    try:
        return int(json.loads(state_file.read_text())["recipe"]["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1337


def training_evaluator(recipe, tokenizer, validation):
    """model -> the headline numbers of recipe.train.eval_tasks, which Trainer's eval_fn logs beside
    the validation loss; None when the recipe names no task."""
    if not recipe.train.eval_tasks:
        return None
    specs = parse_tasks(recipe.train.eval_tasks)
    validation = functools.lru_cache(maxsize=1)(validation)      # the split is made once per run

    def evaluate(model):
        return flat_metrics(run_tasks(model, tokenizer, specs, validation=validation, limit=recipe.train.eval_limit,
                                      skills_seed=recipe.seed), specs)
    return evaluate

