"""`llamac bench --what decode`: tokens/s of batch-1 and batch-16 decoding, prefill, time to first token,
for llamac's FastDecoder and, in the same process, PyTorch eager, PyTorch with the decode step in a
CUDA graph (gpt-fast style) and Hugging Face transformers' generate.

The PyTorch references follow /work/shared/anchors/torch_anchor.py: a bf16 Llama with a static
KV cache of 1024 positions, a 16-token prompt, 256 greedy steps, time of the step loop / 256.
Random weights (speed does not depend on them).
"""
from __future__ import annotations

import time

import numpy as np

from llamac.engine import backend
from llamac.errors import LlamacError

DECODE_SHAPES = {   # dim, layers, heads, kv heads, vocab, hidden
    "15M": (288, 6, 6, 6, 32000, 768),
    "110M": (768, 12, 12, 12, 32000, 2048),
    "350M": (1024, 24, 16, 4, 32000, 2816),
    "1B-hs64": (2048, 16, 32, 8, 128256, 8192),     # the training issue's 1B shapes
    "1B-hs128": (2048, 16, 16, 4, 32000, 5632),
}
CACHE_LEN = 1024
VERBOSE = False


def _say(*what):
    if VERBOSE:
        import sys
        print(f"[{time.strftime('%H:%M:%S')}]", *what, file=sys.stderr, flush=True)


def shape_config(name: str):
    from llamac.config import ModelConfig
    dim, L, H, KV, V, hid = DECODE_SHAPES[name]
    return ModelConfig(dim=dim, n_layers=L, n_heads=H, n_kv_heads=KV, vocab_size=V, hidden_dim=hid,
                       max_seq_len=CACHE_LEN, tie_embeddings=False)


def _median(xs):
    return float(np.median(xs))


def bench_llamac(name: str, n_new: int = 256, prompt_len: int = 16, batches=(1, 16), prefill_len: int = 512,
                 reps: int = 3) -> list[dict]:
    from llamac.bench.timing import device_copy_bandwidth
    from llamac.infer.decode import FastDecoder
    from llamac.infer.packed import kv_cache_bytes, random_state, weight_bytes
    cp = backend.cupy_module()
    bandwidth = device_copy_bandwidth()
    cfg = shape_config(name)
    state = random_state(cfg, cp)
    rng = np.random.default_rng(0)
    rows = []
    _say(name, "random weights made")
    for B in batches:
        dec = FastDecoder(cfg, state, batch=B, max_len=CACHE_LEN)
        _say(name, f"batch {B}: decoder built")
        prompts = [rng.integers(0, cfg.vocab_size, prompt_len).tolist() for _ in range(B)]
        ttft = []
        decode_s = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            dec.start(prompts)
            dec.stream.synchronize()
            ttft.append(time.perf_counter() - t0)
            decode_s.append(dec.decode_seconds(n_new))
        ttft, decode_s = ttft[1:], decode_s[1:]          # the first includes capture and warm-up
        _say(name, f"batch {B}: ttft {ttft}, decode {decode_s}")
        t = _median(decode_s)
        # what a step must read: the weights once, and every row's cache at its mean length over the run
        step_bytes = weight_bytes(cfg) + kv_cache_bytes(cfg, B * (prompt_len + n_new / 2))
        row = {"section": "decode", "shape": name, "impl": "llamac FastDecoder", "batch": B,
               "decode_tok_s": round(B * n_new / t, 1), "step_ms": round(t / n_new * 1e3, 4),
               "step_MB": round(step_bytes / 1e6, 1), "copy_TB_s": round(bandwidth / 1e12, 3),
               "bandwidth_util": round(step_bytes / (t / n_new) / bandwidth, 3),
               "ttft_ms": round(_median(ttft) * 1e3, 2), "prefill_attention": dec.prefill_mode}
        if B == 1:
            long_prompt = [rng.integers(0, cfg.vocab_size, prefill_len).tolist()]
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                dec.start(long_prompt)
                dec.stream.synchronize()
                times.append(time.perf_counter() - t0)
            row["prefill_tok_s"] = round(prefill_len / _median(times[1:]), 1)
            row["prefill_len"] = prefill_len
        rows.append(row)
        del dec
    b1 = next((r for r in rows if r["batch"] == 1), None)
    for r in rows:
        if b1 is not None and r["batch"] != 1:
            r["vs_batch1"] = round(r["decode_tok_s"] / b1["decode_tok_s"], 2)
    del state
    backend.release_gpu_memory()
    return rows


# ---------------------------------------------------------------- PyTorch references

def _torch_llama(dims, batch: int = 1, device: str = "cuda"):
    """The anchor's bf16 Llama: static per-layer caches (batch, Hkv, 1024, hs), index_copy_ writes, masked SDPA.
    dims = (dim, layers, heads, kv heads, vocab, hidden) as in DECODE_SHAPES."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    dim, L, H, KV, V, hid = dims
    hs = dim // H

    def rope(x, cos, sin):
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk = nn.Linear(dim, H * hs, bias=False), nn.Linear(dim, KV * hs, bias=False)
            self.wv, self.wo = nn.Linear(dim, KV * hs, bias=False), nn.Linear(H * hs, dim, bias=False)
            self.w1, self.w3 = nn.Linear(dim, hid, bias=False), nn.Linear(dim, hid, bias=False)
            self.w2 = nn.Linear(hid, dim, bias=False)
            self.n1, self.n2 = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)

        def forward(self, x, cos, sin, cache, pos):
            B, T, _ = x.shape
            h = self.n1(x)
            q = rope(self.wq(h).view(B, T, H, hs), cos, sin).transpose(1, 2)
            k = rope(self.wk(h).view(B, T, KV, hs), cos, sin).transpose(1, 2)
            v = self.wv(h).view(B, T, KV, hs).transpose(1, 2)
            kc, vc = cache
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            mask = (torch.arange(kc.shape[2], device=x.device)[None, :] <= pos[:, None]).view(1, 1, T, -1)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=KV != H)
            x = x + self.wo(o.transpose(1, 2).reshape(B, T, -1))
            h = self.n2(x)
            return x + self.w2(F.silu(self.w1(h)) * self.w3(h))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, dim)
            self.blocks = nn.ModuleList([Block() for _ in range(L)])
            self.norm, self.out = nn.RMSNorm(dim, eps=1e-5), nn.Linear(dim, V, bias=False)
            f = 1.0 / (10000 ** (torch.arange(0, hs, 2).float() / hs))
            ang = torch.outer(torch.arange(CACHE_LEN).float(), f)
            self.register_buffer("cos", ang.cos()[:, None, :], persistent=False)
            self.register_buffer("sin", ang.sin()[:, None, :], persistent=False)

        def forward(self, idx, caches, pos):
            x = self.emb(idx)
            cos, sin = self.cos[pos], self.sin[pos]
            for block, cache in zip(self.blocks, caches):
                x = block(x, cos, sin, cache, pos)
            return self.out(self.norm(x))

    m = Llama().to(device).to(torch.bfloat16).eval()
    caches = [(torch.zeros(batch, KV, CACHE_LEN, hs, device=device, dtype=torch.bfloat16),
               torch.zeros(batch, KV, CACHE_LEN, hs, device=device, dtype=torch.bfloat16)) for _ in range(L)]
    return m, caches


def bench_torch(name: str, n_new: int = 256, prompt_len: int = 16, reps: int = 3, batches=(1, 16),
                prefill_len: int = 512, device: str = "cuda", dims=None) -> list[dict]:
    """PyTorch's figures beside llamac's, per batch size: greedy decode tokens/s eager and with the
    decode step in a CUDA graph (CUDA only), time to first token (prompt forward + first argmax;
    the prompt runs eagerly in both), and prefill tokens/s of one prefill_len-token prompt (batch 1)."""
    import torch
    dims = dims or DECODE_SHAPES[name]
    V = dims[4]
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        backend.release_gpu_memory()
    rows = []

    def timed(fn, n=reps, before=None):
        """Median seconds of fn(), each interval measured on its own; `before` runs untimed first."""
        ts = []
        for rep in range(n + 1):                     # the first is warm-up
            if before is not None:
                before()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return _median(ts[1:])

    for B in batches:
        m, caches = _torch_llama(dims, B, device)
        _say(name, f"torch batch {B}: model built")
        prompt = torch.randint(0, V, (B, prompt_len), device=device)
        impl = f"torch {torch.__version__}"
        with torch.no_grad():
            def first_token():
                return m(prompt, caches, torch.arange(prompt_len, device=device))[:, -1:].argmax(-1)

            first = {}

            def prompt_forward():
                first["tok"] = first_token()

            def eager_steps():
                tok = first["tok"]
                for i in range(prompt_len, prompt_len + n_new):
                    tok = m(tok, caches, torch.tensor([i], device=device))[:, -1:].argmax(-1)

            ttft = timed(first_token)
            t = timed(eager_steps, before=prompt_forward)   # the step loop alone, as for llamac
            row = {"section": "decode", "shape": name, "impl": f"{impl} eager", "batch": B,
                   "decode_tok_s": round(B * n_new / t, 1), "step_ms": round(t / n_new * 1e3, 4),
                   "ttft_ms": round(ttft * 1e3, 2)}
            if B == 1:
                long_prompt = torch.randint(0, V, (1, prefill_len), device=device)
                positions = torch.arange(prefill_len, device=device)
                t_pre = timed(lambda: m(long_prompt, caches, positions)[:, -1:].argmax(-1))
                row.update(prefill_tok_s=round(prefill_len / t_pre, 1), prefill_len=prefill_len)
            rows.append(row)

            if cuda:
                tok = torch.zeros(B, 1, dtype=torch.long, device=device)
                pos = torch.zeros(1, dtype=torch.long, device=device)
                out = torch.zeros(B, 1, dtype=torch.long, device=device)

                def step():
                    out.copy_(m(tok, caches, pos)[:, -1:].argmax(-1))

                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()

                def replay():
                    for i in range(prompt_len, prompt_len + n_new):
                        pos.fill_(i)
                        graph.replay()
                        tok.copy_(out)
                t = timed(replay)
                rows.append({"section": "decode", "shape": name, "impl": f"{impl} CUDA graph", "batch": B,
                             "decode_tok_s": round(B * n_new / t, 1), "step_ms": round(t / n_new * 1e3, 4),
                             "ttft_ms": round(ttft * 1e3, 2)})
                del graph
        del m, caches
        if cuda:
            torch.cuda.empty_cache()
    for r in rows:
        b1 = next((x for x in rows if x["impl"] == r["impl"] and x["batch"] == 1), None)
        if b1 is not None and r["batch"] != 1:
            r["vs_batch1"] = round(r["decode_tok_s"] / b1["decode_tok_s"], 2)
    return rows


def bench_hf(name: str, n_new: int = 256, prompt_len: int = 16, reps: int = 2) -> list[dict]:
    row = {"section": "decode", "shape": name, "impl": "HF transformers generate", "batch": 1}
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as exc:  # transformers is broken on some machines
        return [{**row, "decode_tok_s": f"unavailable ({type(exc).__name__})"}]
    dim, L, H, KV, V, hid = DECODE_SHAPES[name]
    try:
        cfg = LlamaConfig(hidden_size=dim, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV,
                          vocab_size=V, intermediate_size=hid, max_position_embeddings=CACHE_LEN)
        m = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
        prompt = torch.randint(0, V, (1, prompt_len), device="cuda")
        gen = lambda: m.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)  # noqa: E731
        gen()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            gen()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        del m
        torch.cuda.empty_cache()
        return [{**row, "decode_tok_s": round(n_new / _median(ts), 1)}]
    except Exception as exc:
        return [{**row, "decode_tok_s": f"unavailable ({type(exc).__name__}: {str(exc)[:80]})"}]


def _log(rows):
    import json
    import sys
    for r in rows:
        print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def bench_decode(shapes=None, compare: bool = True, n_new: int = 256, parts=("llamac", "torch", "hf"),
                 verbose: bool = False) -> list[dict]:
    """Every figure of `llamac bench --what decode`, llamac first, then the references when they import."""
    if not backend.cuda_available():
        raise LlamacError("bench --what decode needs a CUDA GPU (--device cuda)")
    log = _log if verbose else (lambda rows: rows)
    rows = []
    for name in shapes or DECODE_SHAPES:
        mine = log(bench_llamac(name, n_new=n_new)) if "llamac" in parts else [{}]
        rows += mine
        if not compare:
            continue
        try:
            import torch  # noqa: F401
        except ImportError:
            rows.append({"section": "decode", "shape": name, "impl": "torch", "decode_tok_s": "unavailable (no torch)"})
            continue
        if "torch" in parts:
            theirs = log(bench_torch(name, n_new=n_new))
            rows += theirs
            for row in mine:            # against PyTorch's CUDA-graph step at the same batch size
                graph = next((r for r in theirs if "graph" in r["impl"] and r["batch"] == row.get("batch")), None)
                if graph is not None and "decode_tok_s" in row:
                    row["vs_torch_graph"] = round(row["decode_tok_s"] / graph["decode_tok_s"], 2)
        if "hf" in parts:
            hf = log(bench_hf(name, n_new=n_new))
            rows += hf
            if isinstance(hf[0]["decode_tok_s"], float) and "decode_tok_s" in mine[0]:
                mine[0]["vs_hf"] = round(mine[0]["decode_tok_s"] / hf[0]["decode_tok_s"], 1)
    return rows


if __name__ == "__main__":   # python -m llamac.bench.decode [llamac,torch,hf] [shapes]: rows as they come, on stderr
    import sys
    parts = sys.argv[1].split(",") if len(sys.argv) > 1 else ("llamac", "torch", "hf")
    shapes = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    VERBOSE = True
    bench_decode(shapes, parts=parts, verbose=True)
