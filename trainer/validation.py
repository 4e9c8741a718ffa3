"""Mean validation cross-entropy over fixed windows, split over ranks and reduced."""

from __future__ import annotations

import torch

from trainer.distributed import Dist
from trainer.shards import ValidationSet, to_device


def my_micro_batches(n_batches: int, micro_batch: int, d: Dist) -> list[range]:
    """Window indices of the micro-batches this rank evaluates: batches rank, rank + world, ..."""
    return [range(b * micro_batch, (b + 1) * micro_batch) for b in range(d.rank, n_batches, d.world_size)]


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    windows: ValidationSet,
    n_batches: int,
    micro_batch: int,
    d: Dist,
    autocast_dtype: torch.dtype | None,
) -> tuple[float, int]:
    """(mean cross-entropy over n_batches x micro_batch windows, tokens evaluated) over all ranks."""
    windows.require(n_batches * micro_batch, "validation")
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=d.device, dtype=torch.float64)  # sum of losses, tokens
    for rows in my_micro_batches(n_batches, micro_batch, d):
        x, y = to_device(windows.read(rows), d.device)
        with torch.autocast(d.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            ce, _ = model(x, y)
        total[0] += ce.double() * y.numel()
        total[1] += y.numel()
    if d.world_size > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item(), int(total[1].item())
