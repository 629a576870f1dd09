"""The same Llama in plain PyTorch, for `llamac bench --compare torch` only (torch is optional).

Same shapes, initialisation scale and RoPE layout as llamac.model; SDPA attention.
"""
from __future__ import annotations

from llamac.config import ModelConfig


def build_torch_llama(cfg: ModelConfig):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def rope(x, cos, sin):                       # x (B, H, T, hs), interleaved pairs
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_size, bias=False)
            self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=False)
            self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=False)
            self.wo = nn.Linear(cfg.n_heads * cfg.head_size, cfg.dim, bias=False)
            self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
            self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
            self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
            self.n1 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
            self.n2 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            h = self.n1(x)
            q = self.wq(h).view(B, T, cfg.n_heads, cfg.head_size).transpose(1, 2)
            k = self.wk(h).view(B, T, cfg.kv_heads, cfg.head_size).transpose(1, 2)
            v = self.wv(h).view(B, T, cfg.kv_heads, cfg.head_size).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.kv_heads != cfg.n_heads)
            x = x + self.wo(o.transpose(1, 2).reshape(B, T, -1))
            h = self.n2(x)
            return x + self.w2(F.silu(self.w1(h)) * self.w3(h))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.blocks = nn.ModuleList([Block() for _ in range(cfg.n_layers)])
            self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
            self.out = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_size, 2).float() / cfg.head_size)
            ang = torch.outer(torch.arange(cfg.max_seq_len).float(), inv)
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)
            for name, p in self.named_parameters():
                if p.ndim == 2:
                    std = 0.02 / (2 * cfg.n_layers) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else 0.02
                    nn.init.normal_(p, std=std)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.emb(idx)
            cos, sin = self.cos[:T], self.sin[:T]
            for block in self.blocks:
                x = block(x, cos, sin)
            x = self.norm(x)
            logits = x @ (self.emb.weight if self.out is None else self.out.weight).T
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    return Llama()
