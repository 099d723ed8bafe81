"""predict's worker processes: how they start, how many there are, and how a dead one is survived.

The workers do the host's work (decode, full-size label maps, rendering, writing; segcli.pipeline.host)
and never import torch. They start from a fork server that has preloaded
segcli.pipeline.worker_preload, never by forking the model's process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from segcli.pipeline import parcels

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


class WorkerCrashed(Exception):
    """The worker that held this input died, and died again when the input was retried alone: the
    input's own failure (a native decoder crash on a hostile file, say). `native`: what the worker
    printed on stderr before it died."""

    def __init__(self, message: str, native: str = ""):
        super().__init__(message)
        self.native = native


class Task:
    """One call on the worker pool, kept whole so that it can run again alone if its worker dies."""

    def __init__(self, fn, args: tuple, stage: str, packed: bool):
        self.fn, self.args, self.stage, self.packed = fn, args, stage, packed
        self.future: Future | None = None  # set by WorkerPool.submit, with the pool generation it went to
        self.generation = 0
        self.outcome: tuple[bool, object] | None = None  # set when it was retried alone

    def done(self) -> bool:
        return self.outcome is not None or self.future.done()

    def cancel(self) -> bool:
        return self.future.cancel()

    def cancelled(self) -> bool:
        return self.outcome is None and self.future.cancelled()


class WorkerPool:
    """predict's worker processes, which outlive a dead worker (as Spark's and Ray's task retries do).

    A worker that dies (a native crash, the OOM killer) breaks the whole ProcessPoolExecutor, and
    every input in flight with it. Each of those is then run again alone in a fresh one-worker pool,
    in the order they were given: the ones that pass were not to blame; one whose worker dies again
    fails as its own input (WorkerCrashed, with what the worker printed on stderr). Then a fresh pool
    takes the rest. CRASHES_IN_A_ROW different inputs crashing one after the other are no single
    input's fault: BrokenProcessPool then stops the run, as a dead pool always did.
    """

    CRASHES_IN_A_ROW = 3

    def __init__(self, workers: int, context, initializer, initargs: tuple, owner: str,
                 stderr_file: Callable[[str, int], Path]):
        self.workers, self.context, self.initializer, self.initargs = workers, context, initializer, initargs
        self.owner, self.stderr_file = owner, stderr_file
        self.generation, self.crashes_in_a_row = 0, 0
        self.live: dict[int, Task] = {}  # submitted, result not taken yet
        self.pool = self._executor(workers)

    def _executor(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=self.context, initializer=self.initializer,
                                   initargs=self.initargs)

    def _call_args(self, task: Task) -> tuple:
        # a packed argument's file is read (and removed) by the worker: each run of the task packs anew
        return tuple(parcels.pack(a, self.owner) for a in task.args) if task.packed else task.args

    def submit(self, stage: str, fn, *args, packed: bool = False) -> Task:
        """fn(*args) in a worker (through parcels.call); `stage` names it in a crash's message
        ("decoding"); `packed`: the arguments travel as parcels (large arrays)."""
        task = Task(fn, args, stage, packed)
        try:
            task.future = self.pool.submit(parcels.call, fn, *self._call_args(task))
        except BrokenProcessPool:  # broke since the last result was taken: its inputs first
            self._recover()
            task.future = self.pool.submit(parcels.call, fn, *self._call_args(task))
        task.generation = self.generation
        self.live[id(task)] = task
        return task

    def result(self, task: Task | Future):
        """The task's value, or its exception (WorkerCrashed when it took its worker down twice)."""
        if not isinstance(task, Task):  # another executor's future (the device path's writers)
            return parcels.result(task.result())
        try:
            if task.outcome is None:
                try:
                    value = parcels.result(task.future.result())
                    self.crashes_in_a_row = 0
                    return value
                except BrokenProcessPool:
                    self._recover()
            ok, value = task.outcome
            if not ok:
                raise value
            return value
        finally:
            self.live.pop(id(task), None)

    def _recover(self) -> None:
        """The pool broke: every input it held runs again alone, then a fresh pool takes over."""
        self.pool.shutdown(wait=True)  # after it, every future it held says how it ended
        broken = self.generation
        victims = [t for t in self.live.values() if t.generation == broken and t.outcome is None
                   and not t.future.cancelled() and t.future.done()
                   and isinstance(t.future.exception(), BrokenProcessPool)]
        solo = None
        try:
            for task in victims:
                solo = solo or self._executor(1)
                task.outcome, solo = self._alone(task, solo)
        finally:
            if solo is not None:
                solo.shutdown(wait=True)
        self.generation += 1
        self.pool = self._executor(self.workers)

    def _alone(self, task: Task, solo: ProcessPoolExecutor) -> tuple[tuple[bool, object], ProcessPoolExecutor | None]:
        """Run `task` as the one job of `solo`: (its outcome, the pool to use next: None if it broke)."""
        future = solo.submit(parcels.call, task.fn, *self._call_args(task))
        try:
            value = parcels.result(future.result())
        except BrokenProcessPool:
            code, native = self._death(solo)
            solo.shutdown(wait=True)
            self.crashes_in_a_row += 1
            if self.crashes_in_a_row >= self.CRASHES_IN_A_ROW:
                raise BrokenProcessPool(f"{self.crashes_in_a_row} different inputs in a row crashed their worker") from None
            return (False, WorkerCrashed(f"worker crashed while {task.stage} this file ({code})", native)), None
        except Exception as exc:  # the task's own failure: as it would have been
            return (False, exc), solo
        self.crashes_in_a_row = 0
        return (True, value), solo

    def _death(self, solo: ProcessPoolExecutor) -> tuple[str, str]:
        """How the lone worker of `solo` died ("signal 6, SIGABRT") and what it printed on stderr."""
        # concurrent.futures has no public handle on an executor's processes; CPython keeps them by pid
        # in `_processes` (read-only here, and only to name how the lone worker died)
        processes = list(solo._processes or {})
        how, native = "it died", ""
        for pid in processes:
            process = solo._processes[pid]
            if process.exitcode is not None and process.exitcode < 0:
                number = -process.exitcode
                try:
                    how = f"signal {number}, {signal.Signals(number).name}"
                except ValueError:
                    how = f"signal {number}"
            elif process.exitcode:
                how = f"exit status {process.exitcode}"
            try:
                native = self.stderr_file(self.owner, pid).read_text(errors="replace").strip()
            except OSError:
                pass
            # 255: the fork server could not pass the status on (a race at its pipe); the worker's
            # faulthandler names the signal in its stderr
            if how in ("it died", "exit status 255"):
                how = _fatal_signal(native) or how
        return how, native

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# faulthandler's first line for each fatal signal (the worker enables it: segcli.pipeline.host)
_FAULTHANDLER_SIGNALS = {"Aborted": signal.SIGABRT, "Segmentation fault": signal.SIGSEGV, "Bus error": signal.SIGBUS,
                         "Floating point exception": signal.SIGFPE, "Illegal instruction": signal.SIGILL}


def _fatal_signal(native: str) -> str | None:
    """"signal 6, SIGABRT" from faulthandler's "Fatal Python error: Aborted" in a worker's stderr."""
    for name, sig in _FAULTHANDLER_SIGNALS.items():
        if f"Fatal Python error: {name}" in native:
            return f"signal {int(sig)}, {sig.name}"
    return None
