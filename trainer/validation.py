"""Mean validation cross-entropy over fixed windows, split over ranks and reduced."""

from __future__ import annotations

import torch

from trainer.distributed import Dist
from trainer.shards import to_device


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    windows: torch.Tensor,
    micro_batch: int,
    d: Dist,
    autocast_dtype: torch.dtype | None,
) -> float:
    """Every rank takes a disjoint share of the windows; the result is the mean over all of them."""
    was_training = model.training
    model.eval()
    mine = windows[d.rank :: d.world_size]
    total = torch.zeros((), device=d.device, dtype=torch.float64)
    for start in range(0, len(mine), micro_batch):
        x, y = to_device(mine[start : start + micro_batch], d.device)
        with torch.autocast(d.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            ce, _ = model(x, y)
        total += ce.double() * len(x)
    counts = torch.tensor([float(len(mine))], device=d.device, dtype=torch.float64)
    if d.world_size > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(counts)
    model.train(was_training)
    return (total / counts).item()
