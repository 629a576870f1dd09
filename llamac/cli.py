"""The `llamac` command line: argument parsing only; every command is a library call."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from llamac.errors import LlamacError

# Newer typer prints a type after every option, flags included (`--force <bool>`), as if they took a
# value; a flag shows none.
_TyperOption = getattr(getattr(typer, "core", None), "TyperOption", None)
if _TyperOption is not None and hasattr(_TyperOption, "display_type_rich"):
    _display_type = _TyperOption.display_type_rich
    _TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _display_type(self, ctx)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="llamac: train Llama-family models from raw text, chat-tune them and export them.")

SET_HELP = "Override a recipe value, e.g. --set train.lr=3e-4 (value parsed as YAML). Repeatable."


def _recipe(path: Optional[Path], overrides: List[str], device: Optional[str] = None):
    from llamac.config import load_recipe
    extra = list(overrides or [])
    if device is not None:
        extra.append(f"device={device}")
    return load_recipe(path, extra)


@app.command()
def tokenize(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML: trains the tokenizer and writes token shards."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    text: Optional[str] = typer.Option(None, "--text", help="Show the pieces and ids of TEXT instead."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="SentencePiece model for --text."),
    force: bool = typer.Option(False, "--force", help="Re-encode even when the inputs are unchanged."),
):
    """Train a SentencePiece tokenizer and encode the recipe's sources into token shards."""
    if text is not None:
        from llamac.data.tokenizer import show_pieces
        if tokenizer is None:
            raise LlamacError("--text needs --tokenizer PATH (a SentencePiece .model file)")
        show_pieces(text, tokenizer)
        return
    if recipe is None:
        raise LlamacError("tokenize needs a RECIPE (or --text with --tokenizer)")
    from llamac.data.pipeline import prepare_data
    prepare_data(_recipe(recipe, set_), force=force, verbose=True)


GPUS_HELP = "Data parallel: start N ranks on this host, one per GPU (NCCL), as torchrun would."
PROCS_HELP = "Data parallel on the CPU: start N ranks under Open MPI's mpirun."


def _launch(command: str, recipe, argv: List[str], set_: List[str], device: Optional[str], resume: bool,
            gpus: Optional[int], procs: Optional[int]):
    """--gpus / --procs: the same command as N ranks, watched (llamac.dist.launch)."""
    from llamac.dist.launch import launch
    args = [*argv, *(a for s in set_ for a in ("--set", s)), "--resume" if resume else "--no-resume"]
    device = device or ("cpu" if procs is not None else "cuda")
    code = launch(command, [*args, "--device", device], _recipe(recipe, set_, device), gpus=gpus, procs=procs)
    raise SystemExit(code)


@app.command()
def pretrain(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (default: recipes/pretrain/tiny.yaml)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto (default: the recipe's)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest checkpoint in out_dir."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help=GPUS_HELP),
    procs: Optional[int] = typer.Option(None, "--procs", help=PROCS_HELP),
):
    """Pretrain a Llama model from raw text, then print a sample."""
    from llamac.config import RECIPE_DIR
    recipe = recipe or RECIPE_DIR / "pretrain" / "tiny.yaml"
    if gpus is not None or procs is not None:
        _launch("pretrain", recipe, [str(recipe)], set_, device, resume, gpus, procs)
    from llamac.train.loop import pretrain as run
    run(_recipe(recipe, set_, device), resume=resume)


@app.command()
def sft(
    recipe: Path = typer.Argument(..., help="SFT recipe YAML."),
    from_: Optional[str] = typer.Option(None, "--from", help="Checkpoint (llamac or Hugging Face folder) to start from."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto."),
    resume: bool = typer.Option(True, "--resume/--no-resume"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help=GPUS_HELP),
    procs: Optional[int] = typer.Option(None, "--procs", help=PROCS_HELP),
):
    """Instruction-tune a model on chat / Alpaca data."""
    from llamac.train.sft import finetune
    extra = list(set_) + ([f"sft.from_checkpoint={from_}"] if from_ else [])
    if gpus is not None or procs is not None:
        _launch("sft", recipe, [str(recipe)], extra, device, resume, gpus, procs)
    finetune(_recipe(recipe, extra, device), resume=resume)


@app.command()
def generate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Checkpoint folder (or a run's out_dir)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="One prompt per line, generated as a batch."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="Chat with the model's template (REPL without --prompt)."),
    device: str = typer.Option("auto", "--device"),
):
    """Generate text from a checkpoint, streamed as it is produced."""
    from llamac.infer.commands import generate_command
    generate_command(checkpoint=checkpoint, prompt=prompt, prompt_file=prompt_file, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, chat=chat, device=device)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="llamac checkpoint, run out_dir or Hugging Face Llama folder."),
    tasks: str = typer.Option("bpb,next_sentence", "--tasks", help="Comma list: bpb, bpb:PATH, skills, next_sentence, mc:PATH (JSONL: HellaSwag, ARC, PIQA, MMLU or context/choices/label rows)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results to this JSON file."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N items (documents for bpb) of each task."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Padded tokens per forward (default: 4096 on the CPU, 65536 on the GPU)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on the GPU, fp32 on the CPU), fp32 or bf16."),
    device: str = typer.Option("auto", "--device"),
):
    """Evaluate a model: bits per byte, multiple choice by log-likelihood, the built-in skill tasks."""
    from llamac.eval.runner import eval_command
    eval_command(checkpoint, tasks=tasks, json_out=json_out, limit=limit, device=device, dtype=dtype,
                 batch_tokens=batch_tokens)


@app.command()
def serve(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="llamac checkpoint (or a run's out_dir) or Hugging Face Llama folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 serves other machines too)."),
    port: int = typer.Option(8000, "--port"),
    device: str = typer.Option("auto", "--device"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require Authorization: Bearer KEY on every request."),
    max_batch: int = typer.Option(16, "--max-batch", help="Sequences decoded together (slots)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens one completion may ask for (default: the context)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a slot; beyond them: 429."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients name (default: the folder's name)."),
):
    """Serve a model over the OpenAI HTTP API (chat, completions, streaming), continuously batched."""
    from llamac.serve.server import serve_command
    serve_command(checkpoint, host=host, port=port, device=device, api_key=api_key, max_batch=max_batch,
                  max_tokens=max_tokens, max_queue=max_queue, model_name=model_name)


@app.command()
def bench(
    what: str = typer.Option("engine", "--what", help="Comma list: engine, tokenizer, train_cpu (CPU vs PyTorch), train (GPU shapes), kernels, decode (GPU decode tok/s vs PyTorch/HF), serve (the HTTP server under concurrent streaming clients on the GPU; on any device, its host cost per token over a synthetic step), eval (multiple-choice log-likelihoods vs PyTorch), lora (full SFT vs LoRA: GPU memory and step time), dp (data parallel: step time on 1 vs N ranks, scaling efficiency, ZeRO-1's optimizer state per rank)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="'torch' to run the same shapes in PyTorch; 'torch-compile' for torch.compile alone (train); 'none'."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all numbers to this JSON file."),
    device: str = typer.Option("auto", "--device"),
):
    """Measure llamac: engine overhead, tokenizer speed, kernels, training and decoding."""
    from llamac.bench.run import run_bench
    run_bench(what=what, compare=compare, json_out=json_out, device=device)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="llamac checkpoint (or Hugging Face Llama folder)."),
    format: str = typer.Option(..., "--format", "-f", help="hf, gguf, llamac (a LoRA run: merged) or peft (its adapters)."),
    out: Path = typer.Option(..., "--out", "-o"),
    dtype: str = typer.Option("f32", "--dtype", help="hf: f32, bf16 or f16; gguf: f32, f16 or q8_0."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
):
    """Export a model to Hugging Face, GGUF (llama.cpp) or native llamac files, or a LoRA run's adapters for PEFT."""
    from llamac.formats.export import export as run
    run(checkpoint, format=format, out=out, dtype=dtype, force=force)


def main(argv: Optional[list] = None) -> None:
    """Entry point: LlamacError (and a missing file) become one line on stderr and exit 1."""
    try:
        app(args=argv, standalone_mode=False)
    except LlamacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Usage errors (unknown option or command, bad value) from click, which typer may vendor:
        # recognised by click's exception interface rather than by import.
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code or 2)
        if type(exc).__name__ == "Abort":
            print("aborted", file=sys.stderr)
            sys.exit(1)
        raise
