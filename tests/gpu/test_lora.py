"""LoRA on the GPU: the bf16 model (q | k | v as one GEMM with the adapters' products in their blocks, RoPE and
flash attention, the MLP recomputing gate and up) against the same adapted model in fp32 on the CPU; the
training step as a CUDA graph against the eager one, with the base bit-identical; the memory benchmark."""
import dataclasses
import math

import numpy as np

import llamac
from llamac.config import LoRAConfig, ModelConfig
from llamac.engine import backend
from llamac.model.llama import Llama
from llamac.ops import attention
from llamac.train import lora
from llamac.train.checkpoint import trainable_parameters
from llamac.train.loop import TrainStep
from llamac.train.optim import AdamW

CFG = ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=256, vocab_size=128, max_seq_len=64)
RNG = np.random.default_rng(0)
X, Y = RNG.integers(0, 128, (2, 64)), RNG.integers(0, 128, (2, 64))


def rel_err(got, want) -> float:
    got, want = backend.to_numpy(got).astype(np.float64), backend.to_numpy(want).astype(np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


TOKENS = [3, 5, 6]                          # rows trained apart (sft.lora.chat_tokens); X holds them too
X[0, :3], Y[1, :3] = TOKENS, TOKENS


def adapted(device, dtype=None, targets=None, cfg=CFG) -> Llama:
    llamac.manual_seed(0)
    model = Llama(cfg).to(device, dtype)
    lora.apply_lora(model, LoRAConfig(rank=8, alpha=16.0, **({"targets": targets} if targets else {})), TOKENS)
    for i, (name, p) in enumerate(trainable_parameters(model)):      # B away from zero: the products count
        if name.endswith(("lora_b", "token_rows")):                  # and the rows away from the base's
            values = np.random.default_rng(i).normal(0, 0.05, p.shape).astype(np.float32)
            p.data = (p.data + backend.to_device(values, device).astype(p.dtype)).astype(p.dtype)
    return model


def test_bf16_lora_matches_fp32_on_the_cpu():
    """On the GPU the LM head and its loss run in row chunks (HeadLoss) with the token rows' columns."""
    untied = dataclasses.replace(CFG, tie_embeddings=False)
    for targets, cfg in ((None, CFG), (["q_proj", "v_proj", "down_proj"], CFG), (None, untied)):
        cpu, gpu = adapted("cpu", targets=targets, cfg=cfg), adapted("cuda", "bfloat16", targets=targets, cfg=cfg)
        assert attention.use_packed_attention(gpu.tok_embeddings(backend.to_device(X, "cuda")), CFG.head_size)
        losses = []
        for model, x, y in ((cpu, X, Y), (gpu, backend.to_device(X, "cuda"), backend.to_device(Y, "cuda"))):
            logits, loss = model(x, y)
            assert (logits is None) == (model is gpu)                  # the chunked head on the GPU
            loss.backward()
            losses.append(float(loss.item()))
        assert abs(losses[0] - losses[1]) / losses[0] < 1e-2, losses
        want, got = dict(trainable_parameters(cpu)), dict(trainable_parameters(gpu))
        for name, p in want.items():
            assert rel_err(got[name].grad, p.grad) < 5e-2, (targets, name)


def test_the_lora_step_as_a_cuda_graph_matches_eager_and_keeps_the_base():
    x, y = backend.to_device(X, "cuda"), backend.to_device(Y, "cuda")
    results = []
    for graph in (True, False):
        model = adapted("cuda", "bfloat16")
        frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
        runner = TrainStep(model, AdamW(trainable_parameters(model), lr=1e-3), grad_clip=1.0, cuda_graph=graph)
        losses = [float(runner(lambda micro: (x, y, None), 1e-3)[0]) for _ in range(8)]
        assert runner.captured == graph and runner.graph_error is None
        assert losses[-1] < losses[0]
        for n, p in model.named_parameters():
            if n in frozen:
                assert bool((p.data.view(np.uint16) == frozen[n].view(np.uint16)).all()), n    # bit for bit
        results.append({n: backend.to_numpy(p.data).astype(np.float32) for n, p in trainable_parameters(model)})
        runner.release()
    for name, want in results[1].items():
        assert rel_err(results[0][name], want) < 1e-2, name


def test_the_lora_benchmark_runs_a_small_shape():
    from llamac.bench.lora import bench_lora
    shape = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=1024, seq_len=128,
                 batch_size=4)
    full, adapted_row = bench_lora("small", shape, rank=16, steps=3, warmup=3)
    for row in (full, adapted_row):
        assert "status" not in row and row["graph"] is True, row
        assert math.isfinite(row["step_ms"]) and row["peak_GB"] > 0
    assert math.isfinite(adapted_row["peak_vs_full"]) and math.isfinite(adapted_row["step_vs_full"])
