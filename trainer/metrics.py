"""The paper's output-embedding geometry and logit statistics (docs/protocol.md "Validation metrics").

Logit statistics use the raw logits l_tj = h_t . e_j, h after the final LayerNorm, over all V
rows of E (padding rows included), in fp32. Standard deviations are population ones (divide
by the count). They are computed chunk by chunk over positions, so the [positions x V] matrix
is never held whole. Metric names: trainer/contract.py.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def embedding_geometry(E: torch.Tensor) -> dict[str, float]:
    """||mu||, row norms, extreme singular values and B_ratio of a V x H matrix."""
    E = E.detach().float()
    mu = E.mean(dim=0)
    norms = E.norm(dim=1)
    singular = torch.linalg.svdvals(E)
    centred_dot = ((E - mu) @ mu).abs().max()
    raw_dot = (E @ mu).abs().max()
    return {
        "mu_norm": mu.norm().item(),
        "emb_norm_max": norms.max().item(),
        "emb_norm_mean": norms.mean().item(),
        "emb_norm_min": norms.min().item(),
        "smin": singular.min().item(),
        "smax": singular.max().item(),
        # max_i |(e_i - mu).mu| / max_i |e_i.mu|; undefined (NaN) when mu = 0
        "b_ratio": (centred_dot / raw_dot).item() if raw_dot > 0 else math.nan,
    }


class LogitStatistics:
    """Accumulates per-position logit summaries chunk by chunk; sums are kept in float64."""

    PER_POSITION = ("mean", "std", "absmean", "absmax", "lse2")

    def __init__(self, device: torch.device, chunk_positions: int = 2048):
        self.chunk = chunk_positions
        # for each per-position quantity q: sum_t q and sum_t q^2
        self.sums = torch.zeros(len(self.PER_POSITION), 2, dtype=torch.float64, device=device)
        self.hidden_sum: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, h: torch.Tensor, E: torch.Tensor) -> None:
        """h: (..., H) hidden states after the final LayerNorm; E: (V, H)."""
        h = h.reshape(-1, h.shape[-1]).float()
        E = E.float()
        hidden = h.sum(dim=0, dtype=torch.float64)
        self.hidden_sum = hidden if self.hidden_sum is None else self.hidden_sum + hidden
        for start in range(0, len(h), self.chunk):
            logits = h[start : start + self.chunk] @ E.T  # (chunk, V) fp32
            std, mean = torch.std_mean(logits, dim=1, correction=0)
            per_position = torch.stack(
                (
                    mean,
                    std,
                    logits.abs().mean(dim=1),
                    logits.abs().amax(dim=1),
                    torch.logsumexp(logits, dim=1).square(),
                )
            ).double()
            self.sums[:, 0] += per_position.sum(dim=1)
            self.sums[:, 1] += per_position.square().sum(dim=1)
        self.count += len(h)

    def all_reduce(self) -> None:
        """Sum the accumulators over ranks (every rank saw a disjoint set of positions)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sums.device)
        for t in (self.sums, self.hidden_sum, count):
            torch.distributed.all_reduce(t)
        self.count = int(count.item())

    def result(self, E: torch.Tensor) -> dict[str, float]:
        n = self.count
        mean_t = self.sums[:, 0] / n
        std_t = (self.sums[:, 1] / n - mean_t.square()).clamp_min(0).sqrt()
        q = dict(zip(self.PER_POSITION, range(len(self.PER_POSITION)), strict=True))
        mu = E.detach().double().mean(dim=0)
        h_mean = self.hidden_sum / n
        dot = (mu @ h_mean).item()
        denominator = (mu.norm() * h_mean.norm()).item()
        return {
            "logit_mean": mean_t[q["mean"]].item(),
            "logit_std": mean_t[q["std"]].item(),
            "logit_mean_std": std_t[q["mean"]].item(),
            "logit_std_std": std_t[q["std"]].item(),
            "logit_absmean": mean_t[q["absmean"]].item(),
            "logit_absmax": mean_t[q["absmax"]].item(),
            "lse2": mean_t[q["lse2"]].item(),
            "mu_h_dot": dot,
            "mu_h_cos": dot / denominator if denominator > 0 else math.nan,
        }
