"""The paper's decoder: pre-LayerNorm, no biases, QK-LayerNorm, partial RoPE, SwiGLU.

One architecture at five widths (docs/protocol.md "Model"). The output embedding E is
`lm_head.weight` (V x H); with tying it is also the input embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.methods import Method, build_method
from trainer.ops.rope import qkv_norm_rope, rope_tables


def swiglu_hidden(n_embd: int) -> int:
    """256 * ceil(int(8H/3) / 256): the SwiGLU width of the paper."""
    return 256 * math.ceil(int(8 * n_embd / 3) / 256)


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of GPT(cfg), counted from the config (a shared matrix once), without building it."""
    H, V = cfg.n_embd, cfg.vocab_size
    mlp = 3 * H * swiglu_hidden(H) if cfg.mlp == "swiglu" else 2 * H * 4 * H
    qk_norm = 2 * (H // cfg.n_head) if cfg.qk_norm else 0
    block = 2 * H + 4 * H * H + qk_norm + mlp  # two LayerNorms, qkv and proj, QK-norm, MLP
    return cfg.n_layer * block + H + V * H * (1 if cfg.tied else 2)  # + ln_f, wte, lm_head


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        # One weight vector of size head_dim shared by all heads, for q and for k.
        self.q_norm = nn.LayerNorm(self.head_dim, bias=False) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, bias=False) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, heads, head_dim) as qkv comes; SDPA takes (B, heads, T, head_dim) views.
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv_norm_rope(qkv, self.q_norm, self.k_norm, rope))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """W2(silu(W x) * V x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = swiglu_hidden(cfg.n_embd)
        self.w = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.v = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w(x)) * self.v(x))


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.w2 = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)

    def forward(self, x, rope):
        x = x + self.attn(self.ln1(x), rope)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """forward(idx) -> output logits; forward(idx, targets) -> (cross-entropy, loss to minimise)."""

    def __init__(self, cfg: ModelConfig, method: Method | None = None):
        super().__init__()
        self.cfg = cfg
        self.method = method or build_method(None)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        rope = rope_tables(cfg.n_embd // cfg.n_head, cfg.rope_fraction, cfg.seq_len)
        self.register_buffer("rope", rope, persistent=False)
        self._init_weights()
        if cfg.tied:
            # The shared matrix keeps lm_head's (Xavier-normal) initialisation.
            self.wte.weight = self.lm_head.weight

    def _init_weights(self) -> None:
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if cfg.init == "paper":
                    nn.init.xavier_normal_(module.weight)
                else:
                    nn.init.normal_(module.weight, std=0.02)
        nn.init.normal_(self.wte.weight, std=1.0 / math.sqrt(cfg.n_embd))
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=proj_std)

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.lm_head.weight

    def non_embedding_params(self) -> int:
        """All weights except the V x H matrices (LayerNorm weights included)."""
        embedding = {id(self.wte.weight), id(self.lm_head.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in embedding)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """h after the final LayerNorm, (B, T, H)."""
        if idx.shape[1] > self.cfg.seq_len:  # RoPE has no position past seq_len
            raise ValueError(
                f"{idx.shape[1]} tokens per sequence: longer than model.seq_len={self.cfg.seq_len}"
            )
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, self.rope)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        h = self.hidden(idx)
        if targets is None:
            return self.method.transform_logits(self.lm_head(h).float())
        return self.method.loss(h, targets, self.output_embedding)
