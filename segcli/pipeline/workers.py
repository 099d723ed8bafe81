"""predict's worker processes: how they start and how many there are.

The workers do the host's work (decode, full-size label maps, rendering, writing; segcli.pipeline.host)
and never import torch. They start from a fork server that has preloaded
segcli.pipeline.worker_preload, never by forking the model's process.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def default_workers(device: torch.device) -> int:
    """Host worker processes when --workers is not given: with the model on a GPU the host's work
    is what limits throughput, so all cores but one (at most 16); on the CPU the model needs them."""
    if device.type == "cpu":
        return 2
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def worker_context():
    """forkserver where there is one, else spawn: workers start from a clean single-threaded process.
    Not fork: a child forked from a process whose OpenCV (or OpenMP) thread pool is running inherits
    the pool's locks without its threads, and its first parallel call can hang for ever (seen here).
    The server preloads only the torch-free host module and the compiled restore loop
    (`segcli.pipeline.worker_preload`), so workers start in milliseconds, ready to work; it is started here,
    so that it loads them while the caller goes on (the text tower, for predict)."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["segcli.pipeline.worker_preload"])
        from multiprocessing import forkserver

        forkserver.ensure_running()  # starts it now without waiting for it (a no-op once it runs)
    return ctx
