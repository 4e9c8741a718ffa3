"""The paper's decoder: pre-LayerNorm, no biases, QK-LayerNorm, partial RoPE, SwiGLU.

One architecture at five widths (docs/protocol.md "Model"). The output embedding E is
`lm_head.weight` (V x H); with tying it is also the input embedding.

Llama-style switches of ModelConfig, whose defaults are the paper's model exactly (the same
modules, parameter names, initialisation and forward): `norm` (the blocks' two norms and the
final one: bias-free LayerNorm or RMSNorm), `qk_norm` / `qk_norm_kind` (none, LayerNorm or
RMSNorm on q and k), `rope_fraction`, `rope_base`, `mlp_multiple` (SwiGLU hidden width) and
`tied`. Every combination runs on the plain path; `fast_path_coverage` lists what the fast GPU
path runs plain instead of in a kernel, and why.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.contract import MLPS, NORMS, check_implements
from trainer.methods import Method, build_method
from trainer.ops.rope import fusion_blocker, qkv_norm_rope, rope_tables

# eps of every norm: LayerNorm's PyTorch default, which the paper's model has always used, and
# for RMSNorm Llama 2's and 3's rms_norm_eps (Llama 1 used 1e-6). One value for both kinds, so
# the two differ in the centring only. (nn.RMSNorm's own default, eps=None, would be the
# input dtype's machine epsilon: another eps in bf16 than in fp32, and no kernel fusion.)
NORM_EPS = 1e-5
# Positions per slice of draw_labels: 8192 x 50304 fp32 logits are 1.6 GB, and a slice this
# long keeps the GPU busy.
DRAW_POSITIONS = 8192

NORM_CLASSES = {
    "layernorm": lambda size: nn.LayerNorm(size, eps=NORM_EPS, bias=False),
    "rmsnorm": lambda size: nn.RMSNorm(size, eps=NORM_EPS),
}
check_implements("norms", NORM_CLASSES, NORMS)


def make_norm(kind: str, size: int) -> nn.Module:
    """A norm over the last `size` dims with a weight (ones) and no bias: model.norm's choices."""
    return NORM_CLASSES[kind](size)


def swiglu_hidden(n_embd: int, multiple: int = 256) -> int:
    """multiple * ceil(int(8H/3) / multiple): the SwiGLU width (the paper's: multiple 256)."""
    return multiple * math.ceil(int(8 * n_embd / 3) / multiple)


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of GPT(cfg), counted from the config (a shared matrix once), without building it.
    LayerNorm (no bias) and RMSNorm have the same weight: one per normalised dim."""
    H, V = cfg.n_embd, cfg.vocab_size
    mlp = 3 * H * swiglu_hidden(H, cfg.mlp_multiple) if cfg.mlp == "swiglu" else 2 * H * 4 * H
    qk_norm = 2 * (H // cfg.n_head) if cfg.qk_norm else 0
    block = 2 * H + 4 * H * H + qk_norm + mlp  # two norms, qkv and proj, QK-norm, MLP
    return cfg.n_layer * block + H + V * H * (1 if cfg.tied else 2)  # + ln_f, wte, lm_head


def _qk_norms(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """q's and k's norm: each one weight vector of size head_dim shared by all heads."""
    if not cfg.qk_norm:
        return nn.Identity(), nn.Identity()
    head_dim = cfg.n_embd // cfg.n_head
    return make_norm(cfg.qk_norm_kind, head_dim), make_norm(cfg.qk_norm_kind, head_dim)


def fast_path_coverage(cfg: ModelConfig) -> list[str]:
    """What GPT(cfg) runs in plain PyTorch on the fast GPU path (CUDA, Triton, not
    plain_pytorch()) instead of in a hand-written kernel, and why; [] where every kernel covers it.

    The kernels are the fused QK-norm + RoPE (trainer.ops.rope: LayerNorm or RMSNorm) and the
    output cross-entropy (trainer.ops.cross_entropy, which no model switch changes). The blocks'
    norms (LayerNorm or RMSNorm), the MLP and RoPE's base and fraction are PyTorch either way, so
    none of those switches falls back. The QK step asks the very rule qkv_norm_rope dispatches on.
    """
    reason = fusion_blocker(*_qk_norms(cfg), cfg.n_embd // cfg.n_head)
    return [] if reason is None else [f"attention q/k norm + RoPE (trainer.ops.rope): {reason}"]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        # One weight vector of size head_dim shared by all heads, for q and for k.
        self.q_norm, self.k_norm = _qk_norms(cfg)

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
        hidden = swiglu_hidden(cfg.n_embd, cfg.mlp_multiple)
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


MLP_CLASSES = {"swiglu": SwiGLU, "gelu": GeluMLP}
check_implements("mlps", MLP_CLASSES, MLPS)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(cfg.norm, cfg.n_embd)  # named ln* whatever cfg.norm: the state_dict keys
        self.attn = Attention(cfg)
        self.ln2 = make_norm(cfg.norm, cfg.n_embd)
        self.mlp = MLP_CLASSES[cfg.mlp](cfg)

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
        self.ln_f = make_norm(cfg.norm, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        rope = rope_tables(cfg.n_embd // cfg.n_head, cfg.rope_fraction, cfg.seq_len, cfg.rope_base)
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
        """All weights except the V x H matrices (norm weights included)."""
        embedding = {id(self.wte.weight), id(self.lm_head.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in embedding)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """h after the final norm, (B, T, H)."""
        if idx.shape[1] > self.cfg.seq_len:  # RoPE has no position past seq_len
            raise ValueError(
                f"{idx.shape[1]} tokens per sequence: longer than model.seq_len={self.cfg.seq_len}"
            )
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, self.rope)
        return self.ln_f(x)

    @torch.no_grad()
    def draw_labels(self, idx: torch.Tensor, draw) -> torch.Tensor:
        """A label per position, draw(logits) of the model's output logits (fp32) for
        DRAW_POSITIONS positions at a time: the batch's full logits never exist at once."""
        h = self.hidden(idx).flatten(0, -2)
        logits_of = (
            self.method.transform_logits(self.lm_head(part).float()) for part in h.split(DRAW_POSITIONS)
        )
        return torch.cat([draw(logits) for logits in logits_of]).view(idx.shape)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        h = self.hidden(idx)
        if targets is None:
            return self.method.transform_logits(self.lm_head(h).float())
        return self.method.loss(h, targets, self.output_embedding)
