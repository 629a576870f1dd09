"""`llamac bench --what eval`: multiple-choice scoring (log-likelihoods of every choice) through
llamac's scorer against PyTorch eager computing the same log-likelihoods, in one process.

Both score the same pairs with the same weights (llamac's, copied into the PyTorch reference
model of llamac.bench.torch_reference) in the same padded batches (loglik.plan_batches): the
forward to the final norm, the LM head on the positions that predict continuation tokens, an fp32
log-softmax, the per-pair sums. Random weights and token ids: speed does not depend on them. The
items have the shape of a HellaSwag-like set: a context of 32-160 tokens and 4 choices of 4-40.
Each side runs the whole set twice; the second run is the one compared (the first is reported too).
"""
from __future__ import annotations

import time

import numpy as np

from llamac.engine import backend

EVAL_SHAPES = {   # dim, layers, heads, kv heads, hidden, vocab: the training bench's shapes
    "tiny": (256, 4, 8, 4, None, 4096),
    "110M": (768, 12, 12, 12, 2048, 32000),
}


def _config(name: str, max_seq_len: int):
    from llamac.config import ModelConfig
    dim, layers, heads, kv, hidden, vocab = EVAL_SHAPES[name]
    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, hidden_dim=hidden,
                       vocab_size=vocab, max_seq_len=max_seq_len)


def synthetic_pairs(n_items: int, vocab: int, n_choices: int = 4, context=(32, 160), choice=(4, 40), seed: int = 0):
    """Pairs of random ids with the lengths of a multiple-choice set, item by item."""
    from llamac.eval.loglik import Pair
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_items):
        ctx = (1,) + tuple(rng.integers(3, vocab, rng.integers(*context)).tolist())
        for _ in range(n_choices):
            pairs.append(Pair(ctx, tuple(rng.integers(3, vocab, rng.integers(*choice)).tolist())))
    return pairs


def torch_scorer(model, device: str, dtype: str):
    """A function Batch -> (log-probabilities, greedy flags) in PyTorch eager with model's weights."""
    import torch

    from llamac.bench.torch_reference import build_torch_llama
    cfg = model.config
    ref = build_torch_llama(cfg)
    state = {k: torch.from_numpy(np.asarray(backend.to_numpy(v), np.float32)) for k, v in model.state_dict().items()}
    names = {"emb.weight": "tok_embeddings.weight", "norm.weight": "norm.weight", "out.weight": "output.weight"}
    for i in range(cfg.n_layers):
        for ours, theirs in (("attention.wq", "wq"), ("attention.wk", "wk"), ("attention.wv", "wv"),
                             ("attention.wo", "wo"), ("feed_forward.w1", "w1"), ("feed_forward.w2", "w2"),
                             ("feed_forward.w3", "w3"), ("attention_norm", "n1"), ("ffn_norm", "n2")):
            names[f"blocks.{i}.{theirs}.weight"] = f"layers.{i}.{ours}.weight"
    ref.load_state_dict({k: state[v] for k, v in names.items() if v in state}, strict=False)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    ref = ref.to(device=device, dtype=torch_dtype).eval()
    head = ref.emb.weight if ref.out is None else ref.out.weight

    @torch.no_grad()
    def score(batch):
        idx = torch.from_numpy(batch.ids).to(device)
        T = idx.shape[1]
        x = ref.emb(idx)
        cos, sin = ref.cos[:T].to(torch_dtype), ref.sin[:T].to(torch_dtype)
        for block in ref.blocks:
            x = block(x, cos, sin)
        x = ref.norm(x)
        rows, cols = torch.from_numpy(batch.rows).to(device), torch.from_numpy(batch.cols).to(device)
        targets = torch.from_numpy(batch.targets).to(device)
        logits = (x[rows, cols] @ head.T).float()
        lp = torch.log_softmax(logits, dim=-1)
        picked = lp.gather(1, targets[:, None])[:, 0]
        return picked.double().cpu().numpy(), (logits.argmax(-1) == targets).cpu().numpy()
    return score


def _sync(device: str):
    if device == "cuda":
        backend.synchronize()
        import torch
        torch.cuda.synchronize()


def bench_eval(name: str = "110M", n_items: int = 10000, device: str = "cuda", dtype: str = "bf16",
               compare_torch: bool = True, batch_tokens: int | None = None, max_seq_len: int = 256) -> list[dict]:
    """Seconds to score n_items multiple-choice items (4 choices each) with llamac and with PyTorch eager."""
    import llamac
    from llamac.eval.loglik import BATCH_TOKENS, WIDTH_MULTIPLE, combine, plan_batches, score_pairs
    from llamac.model.llama import Llama
    from llamac.train.fusions import fuse
    cfg = _config(name, max_seq_len)
    llamac.manual_seed(0)
    model = Llama(cfg).to(device, "bfloat16" if dtype == "bf16" else None).eval()
    if device == "cuda":
        fuse(model)                     # as `llamac eval` scores on the GPU (eval.runner.load_scoring_model)
    pairs = synthetic_pairs(n_items, cfg.vocab_size)
    budget = batch_tokens or BATCH_TOKENS.get(device, 4096)
    tokens = sum(len(p.context) + len(p.continuation) - 1 for p in pairs)
    multiple = WIDTH_MULTIPLE.get(device, 1)

    def timed(run):
        """(result, seconds) of the second of two runs over the whole set, and the first's seconds: the
        first compiles kernels and times each new GEMM shape's algorithms once."""
        times = []
        for _ in range(2):
            _sync(device)
            started = time.perf_counter()
            result = run()
            _sync(device)
            times.append(time.perf_counter() - started)
        return result, times[1], times[0]

    ours, seconds, cold = timed(lambda: score_pairs(model, pairs, budget))
    row = {"section": "eval", "shape": name, "impl": f"llamac ({dtype})", "device": device, "items": n_items,
           "pairs": len(pairs), "tokens": tokens, "seconds": round(seconds, 3), "first_run_seconds": round(cold, 3),
           "tokens_per_s": round(tokens / seconds, 1)}
    rows = [row]
    if compare_torch:
        score = torch_scorer(model, device, dtype)

        def torch_run():
            batches = plan_batches(pairs, max_seq_len, budget, multiple)
            return combine(len(pairs), batches, [score(b) for b in batches])[0]
        theirs, torch_seconds, torch_cold = timed(torch_run)
        ours_lp = np.array([s.logprob for s in ours])
        row["vs_torch_eager"] = round(seconds / torch_seconds, 3)
        row["max_rel_diff_vs_torch"] = float(np.max(np.abs(ours_lp - theirs) / np.maximum(np.abs(theirs), 1e-6)))
        rows.append({"section": "eval", "shape": name, "impl": f"torch eager ({dtype})", "device": device,
                     "items": n_items, "pairs": len(pairs), "tokens": tokens, "seconds": round(torch_seconds, 3),
                     "first_run_seconds": round(torch_cold, 3), "tokens_per_s": round(tokens / torch_seconds, 1)})
    return rows
