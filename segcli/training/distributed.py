"""Distributed training under torchrun: ranks, process groups and agreement between ranks.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; each rank takes its own GPU (cuda:LOCAL_RANK, see
segcli.inference.device). predict's shards are segcli.pipeline.shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from segcli.inference.device import rank_device, torchrun_ranks


class Distributed:
    """Rank, world size and device under torchrun (env://), or a single process."""

    def __init__(self, device_spec: str):
        ranks = torchrun_ranks()
        self.rank, self.world = ranks or (0, 1)
        self.device = rank_device(device_spec)
        if self.device.type == "cuda" and self.world > 1:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag made true on every rank if it is true on any (one all-reduce), so ranks act together."""
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([int(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(x) for x in t.tolist())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
