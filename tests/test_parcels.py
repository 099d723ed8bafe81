"""segcli.pipeline.parcels: values between predict's process and its workers, which a killed worker cannot
leave half-written in the pool's pipe."""

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from segcli.pipeline import parcels


def own_files(owner: str | None = None) -> list[str]:
    return sorted(p.name for p in parcels.FOLDER.glob(f"{parcels.PREFIX}{owner or os.getpid()}-*"))


def big_after_touch(flag: str, n: int) -> bytes:
    """In a worker: n bytes to send back, after telling the test (by creating `flag`) that it is about to."""
    data = os.urandom(n)
    Path(flag).touch()
    return data


def fails() -> None:
    raise ValueError("bad input")


def test_small_values_travel_inline_and_large_ones_through_a_file_that_is_removed_once_read():
    small = parcels.pack({"status": "ok", "labels": {"sky": 0.25}})
    assert small.data is not None and small.name is None and len(small.data) <= parcels.ATOMIC_BYTES
    assert parcels.unpack(small) == {"status": "ok", "labels": {"sky": 0.25}}
    canvas = np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8)
    logits = np.random.default_rng(1).standard_normal((3, 17, 19)).astype(np.float32)
    large = parcels.pack({"canvas": canvas, "logits": logits, "sizes": (300, 384)})
    assert large.data is None and large.name in own_files()
    assert sorted(large.buffer_sizes) == sorted([canvas.nbytes, logits.nbytes])  # the arrays' bytes as they are
    got = parcels.unpack(large)
    assert np.array_equal(got["canvas"], canvas) and np.array_equal(got["logits"], logits)
    assert got["logits"].dtype == np.float32 and got["sizes"] == (300, 384)
    assert own_files() == []  # unpack removes the file
    assert parcels.unpack({"status": "ok"}) == {"status": "ok"}  # no Parcel: passes through


def test_the_largest_inline_answer_still_fits_one_atomic_pipe_write():
    # what the pool's worker writes: its own result item around our Parcel, pickled, behind a 4-byte length
    from concurrent.futures.process import _ResultItem
    from multiprocessing.reduction import ForkingPickler

    largest = parcels.Parcel(data=bytes(parcels.ATOMIC_BYTES))  # pack sends nothing bigger inline
    message = ForkingPickler.dumps(_ResultItem(2**62, result=largest, exit_pid=2**31))
    assert 4 + len(message) <= select.PIPE_BUF


def test_where_no_file_can_be_written_a_large_value_travels_inline(monkeypatch, tmp_path):
    monkeypatch.setattr(parcels, "FOLDER", tmp_path / "missing")  # as a full or absent /dev/shm
    canvas = np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8)
    parcel = parcels.pack(canvas)
    assert parcel.name is None and len(parcel.data) > canvas.nbytes
    assert np.array_equal(parcels.unpack(parcel), canvas)


def test_a_full_memory_folder_sends_the_value_inline_and_leaves_no_partial_file(monkeypatch, small_disk):
    monkeypatch.setattr(parcels, "FOLDER", small_disk)  # a real 64 KiB tmpfs, as a container's full /dev/shm
    canvas = np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8)  # 432 KiB
    parcel = parcels.pack(canvas)
    assert parcel.name is None and np.array_equal(parcels.unpack(parcel), canvas)
    assert list(small_disk.iterdir()) == []
    small = parcels.pack(np.zeros(4000, np.uint8))  # what fits still goes through the folder
    assert small.name is not None and np.array_equal(parcels.unpack(small), np.zeros(4000, np.uint8))


def test_call_unpacks_its_arguments_and_answers_with_a_parcel():
    canvas = np.arange(300_000, dtype=np.uint8).reshape(500, 600)
    answer = parcels.call(np.flipud, parcels.pack(canvas))
    assert isinstance(answer, parcels.Parcel) and own_files() == [answer.name]  # the argument's file was read
    assert np.array_equal(parcels.result(answer), canvas[::-1])
    assert parcels.result(parcels.call(len, [1, 2])) == 2 and own_files() == []


def test_an_error_in_the_worker_is_raised_again_with_its_traceback_as_the_cause():
    with pytest.raises(ValueError, match="bad input") as info:
        parcels.result(parcels.call(fails))
    assert isinstance(info.value.__cause__, parcels.RemoteTraceback)
    assert "in fails" in str(info.value.__cause__)


def test_sweep_removes_the_files_nobody_read_and_those_of_runs_that_are_gone():
    parcels.pack(bytes(100_000))
    parcels.pack(bytes(100_000))
    assert len(own_files()) == 2
    assert parcels.sweep(os.getpid()) == 2 and own_files() == []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = parcels.FOLDER / f"{parcels.PREFIX}{int(gone.stdout)}-1-1"  # a run killed outright left it
    orphan.write_bytes(b"x")
    parcels.pack(bytes(100_000))  # this live run's stays
    parcels.sweep()
    assert not orphan.exists() and len(own_files()) == 1
    parcels.sweep(os.getpid())


def test_each_run_sweeps_only_its_own_files():
    first, second = parcels.new_owner(), parcels.new_owner()  # two runs in one process (the Python API)
    parcels.pack(bytes(100_000), first)
    kept = parcels.pack(bytes(100_000), second)
    assert len(own_files(first)) == len(own_files(second)) == 1
    assert parcels.sweep(first) == 1 and own_files(first) == []
    parcels.sweep()  # the process is alive: its runs' files stay
    assert parcels.unpack(kept) == bytes(100_000)


def test_sweep_leaves_alone_what_it_may_not_remove(monkeypatch):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = parcels.FOLDER / f"{parcels.PREFIX}{int(gone.stdout)}-1-1"
    orphan.write_bytes(b"x")

    def refuse(self, missing_ok=False):  # another user's file in the sticky /dev/shm
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", refuse)
        assert parcels.sweep() == 0
    orphan.unlink()


def test_a_worker_killed_while_answering_breaks_the_pool_instead_of_hanging_it(tmp_path):
    # Without segcli.pipeline.parcels the pool's reader waits for ever for the rest of a result cut short
    # (seen: the worker killed while sending 64 MB: no result and no error, and shutdown hangs too)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    for attempt, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2)):  # kills while pickling, writing, after
        flag = tmp_path / f"sending{attempt}"
        owner = parcels.new_owner()
        pool = ProcessPoolExecutor(1, mp_context=context, initializer=parcels.serve_for, initargs=(owner,))
        try:
            worker = pool.submit(os.getpid).result(timeout=60)
            fut = pool.submit(parcels.call, big_after_touch, str(flag), 64_000_000)
            deadline = time.time() + 60
            while not flag.exists() and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(delay)
            os.kill(worker, signal.SIGKILL)
            try:
                fut.result(timeout=30)  # a TimeoutError here is the hang
            except BrokenProcessPool:
                pass
        finally:
            pool.shutdown(wait=True)
        parcels.sweep(owner)  # a file written before the kill, never read
        assert own_files(owner) == []
