"""Process group setup: torchrun, srun without torchrun (through submitit), or one process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control: object = None  # a gloo group for host-side agreement (stop / checkpoint flags)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_agree(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over ranks, through the CPU group (no device synchronisation)."""
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in t.tolist()]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.control)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average of a device tensor over ranks."""
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
            if not value.is_cuda:  # gloo has no AVG
                value /= self.world_size
        return value


def _slurm_world_size() -> int:
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))


def setup() -> Dist:
    """Join the process group if this is one of several processes; pick the device."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and _slurm_world_size() > 1:
        # srun started the tasks itself: submitit reads rank and world size from SLURM.
        import submitit  # imported only here: the trainer runs without it elsewhere

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return Dist(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return Dist(rank, local_rank, world_size, device, control)


def teardown(d: Dist) -> None:
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group() -> Iterator[Dist]:
    """setup() ... teardown(); on a normal exit the ranks first wait for each other, since a rank
    that tears down early can abort its peers."""
    d = setup()
    try:
        yield d
        d.barrier()
    finally:
        teardown(d)
