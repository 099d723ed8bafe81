"""segcli.replies: worker replies that a killed worker cannot leave half-written in the pool's pipe."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from segcli import replies


def own_files() -> list[str]:
    return sorted(p.name for p in replies.FOLDER.glob(f"{replies.PREFIX}{os.getpid()}-*"))


def big_after_touch(flag: str, n: int) -> bytes:
    """In a worker: a reply of n bytes, after telling the test (by creating `flag`) that it is about to send it."""
    data = os.urandom(n)
    Path(flag).touch()
    return data


def fails() -> None:
    raise ValueError("bad input")


def test_small_results_travel_inline_and_large_ones_through_a_file_that_is_removed_once_read():
    replies.serve_for(os.getpid())
    small = replies.call(sorted, [3, 1, 2])
    assert small.data is not None and small.name is None and len(small.data) <= replies.ATOMIC_BYTES
    assert replies.opened(small) == [1, 2, 3]
    canvas = np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8)
    large = replies.call(dict, [("canvas", canvas), ("sizes", (300, 384))])
    assert large.data is None and large.name in own_files()
    assert large.buffer_sizes == (canvas.nbytes,)  # the array's bytes as they are, beside the pickle
    got = replies.opened(large)
    assert np.array_equal(got["canvas"], canvas) and got["sizes"] == (300, 384)
    assert own_files() == []  # opened removes it
    assert replies.opened({"status": "ok"}) == {"status": "ok"}  # another executor's result passes through


def test_an_error_in_the_worker_is_raised_again_with_its_traceback_as_the_cause():
    reply = replies.call(fails)
    with pytest.raises(ValueError, match="bad input") as info:
        replies.opened(reply)
    assert isinstance(info.value.__cause__, replies.RemoteTraceback)
    assert "in fails" in str(info.value.__cause__)


def test_sweep_removes_the_replies_nobody_read_and_those_of_runs_that_are_gone():
    replies.serve_for(os.getpid())
    replies.call(bytes, 100_000)
    replies.call(bytes, 100_000)
    assert len(own_files()) == 2
    assert replies.sweep(os.getpid()) == 2 and own_files() == []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = replies.FOLDER / f"{replies.PREFIX}{int(gone.stdout)}-1-1"  # a run killed outright left it
    orphan.write_bytes(b"x")
    replies.call(bytes, 100_000)  # this live run's stays
    replies.sweep()
    assert not orphan.exists() and len(own_files()) == 1
    replies.sweep(os.getpid())


def test_a_worker_killed_while_replying_breaks_the_pool_instead_of_hanging_it(tmp_path):
    # Without segcli.replies the pool's reader waits for ever for the rest of a reply cut short
    # (seen: a 200 MB reply, the worker killed 0.3 s in, no result and no error after 10 s)
    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    for attempt, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2)):  # kills in pickling, writing, sending
        flag = tmp_path / f"sending{attempt}"
        pool = ProcessPoolExecutor(1, mp_context=context, initializer=replies.serve_for, initargs=(os.getpid(),))
        try:
            worker = pool.submit(os.getpid).result(timeout=60)
            fut = pool.submit(replies.call, big_after_touch, str(flag), 64_000_000)
            deadline = time.time() + 60
            while not flag.exists() and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(delay)
            os.kill(worker, signal.SIGKILL)  # while it pickles and sends its 64 MB result
            try:
                fut.result(timeout=30)  # a TimeoutError here is the hang
            except BrokenProcessPool:
                pass
        finally:
            pool.shutdown(wait=True)
        replies.sweep(os.getpid())  # a reply written before the kill, never read
        assert own_files() == []
