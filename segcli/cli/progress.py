"""Progress on stderr: a rich bar on a terminal, plain lines otherwise (predict and relabel; train)."""

from __future__ import annotations

import json
import sys
import time

from segcli.cli.common import err


class PredictProgress:
    """Progress on stderr (a rich bar on a terminal, plain lines otherwise); JSON lines on stdout."""

    def __init__(self, total: int, quiet: bool, json_lines: bool):
        self.total, self.quiet, self.json_lines = total, quiet, json_lines
        self.count = 0
        self.progress = None
        if not quiet and err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, transient=False)
            self.task = self.progress.add_task("predict", total=total, rate="")
        self._start = None
        self.frames_done, self._frames_task, self._frames_start = 0, None, None

    def frames(self, count: int) -> None:
        """Video frames processed (a second bar, in frames/s, once a video starts)."""
        now = time.perf_counter()
        if self._frames_start is None:
            self._frames_start = now
            if self.progress:
                self._frames_task = self.progress.add_task("frames", total=None, rate="")
        self.frames_done += count
        rate = self.frames_done / max(1e-9, now - self._frames_start)
        if self._frames_task is not None:
            self.progress.update(self._frames_task, advance=count, rate=f"{rate:.1f} frames/s")
        elif not self.quiet and self.frames_done % 100 < count:
            print(f"  {self.frames_done} video frames ({rate:.1f} frames/s)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._start = time.perf_counter()
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def record(self, rec: dict) -> None:
        self.count += 1
        if self.json_lines:
            print(json.dumps(rec, ensure_ascii=False), flush=True)
        notes = [f"error: {rec['input']}: {rec['error']}"] if rec["status"] != "ok" else []
        if rec.get("warning"):
            notes.append(f"warning: {rec['input']}: {rec['warning']}")
        for line in notes:
            if self.progress:
                self.progress.console.print(line, markup=False)
            else:
                print(line, file=sys.stderr, flush=True)
        if self.progress:
            elapsed = max(1e-9, time.perf_counter() - self._start)
            self.progress.update(self.task, advance=1, rate=f"{self.count / elapsed:.1f} img/s")
        elif not self.quiet and rec["status"] == "ok":
            frames = f", {rec['frames_processed']} frames" if rec.get("kind") == "video" else ""
            print(f"[{self.count}/{self.total}] {rec['input']} ({rec.get('seconds', 0):.2f}s{frames})", file=sys.stderr, flush=True)


class TrainProgress:
    """A rich bar on a terminal, plain lines otherwise; only on rank 0 (the one `start` is called on)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        self.task = None
        self.main = False

    def start(self, trainer) -> None:
        self.main = True
        if self.quiet or not err.is_terminal:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err)
        self.task = self.progress.add_task("train", total=trainer.total_steps, completed=trainer.step, info="")

    def event(self, record: dict) -> None:
        if self.quiet or not self.main:
            return
        if "eval" in record:
            e = record["eval"]
            line = f"step {record['step']}: val mIoU {e['mIoU']:.4f}  pixAcc {e['pixAcc']:.4f}"
        else:
            line = (f"step {record['step']}: loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                    f"{record['images_per_s']:.1f} img/s")
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], info=line)
            if "eval" in record:
                self.progress.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False
