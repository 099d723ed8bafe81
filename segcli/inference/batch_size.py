"""The batch size a GPU runs best at, found by measuring instead of a constant.

Throughput on a GPU rises with the batch until the device is full, then flattens, and memory runs
out further on. `pick_batch_size` doubles the batch while throughput still rises by `gain` and the
batch fits; the last batch that did both is the answer. On a CPU the answer is the default: its
throughput barely depends on the batch, and memory does.
"""

from __future__ import annotations

import time
from typing import Callable

DEFAULT_BATCH = 8
MAX_BATCH = 256
GAIN = 1.05  # a doubling must bring at least 5% more images a second to be worth its memory


def pick_batch_size(rate: Callable[[int], float | None], start: int = DEFAULT_BATCH, limit: int = MAX_BATCH,
                    gain: float = GAIN) -> tuple[int, dict[int, float | None]]:
    """(the batch size, every rate measured): `rate(b)` is images/s at batch b, or None when b does
    not fit (out of memory). Doubles from `start` up to `limit`."""
    rates: dict[int, float | None] = {}
    best, best_rate = start, rate(start)
    rates[start] = best_rate
    if best_rate is None:  # even the default does not fit: halve until one does
        while best > 1 and rates[best] is None:
            best //= 2
            rates[best] = rate(best)
        return best, rates
    size = start * 2
    while size <= limit:
        measured = rates[size] = rate(size)
        if measured is None or measured < best_rate * gain:
            break
        best, best_rate = size, measured
        size *= 2
    return best, rates


def measured_rate(run: Callable[[int], None], sync: Callable[[], None], seconds: float = 1.0
                  ) -> Callable[[int], float | None]:
    """A `rate` for pick_batch_size from `run(b)` (one forward pass at batch b): images/s over
    about `seconds` after a warm-up pass, None on out-of-memory."""
    import torch

    def rate(batch: int) -> float | None:
        try:
            run(batch)
            sync()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or n < 2:
                run(batch)
                n += 1
            sync()
            return batch * n / (time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None

    return rate
