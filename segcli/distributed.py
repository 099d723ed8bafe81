"""torchrun in one place: ranks, per-rank devices, process groups (for train and predict).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; each rank takes its own GPU (cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from segcli.api import resolve_device


def torchrun_ranks() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when launched by torchrun with several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def rank_device(spec: str) -> torch.device:
    """The device of this process: under torchrun, 'auto' and 'cuda' mean this rank's own GPU."""
    device = resolve_device(spec)
    if device.type == "cuda" and torchrun_ranks() and spec.strip().lower() in ("auto", "cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


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


def merge_predict_shards(output: Path) -> None:
    """Every rank has written its predict shard; rank 0 folds the summaries once all are done."""
    from segcli.runfolder import merge_summaries

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        merge_summaries(output)
    dist.destroy_process_group()
