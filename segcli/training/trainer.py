"""The train engine: LSeg's supervised training, resumable, on one or many processes.

The image encoder and the DPT decoder learn with per-pixel cross-entropy; the frozen CLIP text
tower turns the class names into the classifier once. DIR gets last/best.safetensors (normal segcli
checkpoints), metrics.jsonl, curves.png, config.json and state.safetensors (weights, optimizer and
progress in one atomically written file, no pickling), from which `--resume DIR` continues.
One run at a time holds DIR (DIR/.segcli/lock.json); a disk that stops taking writes ends the run
with one line, the last saved state intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from segcli.datasets.segmentation import EpochBatches, SegmentationData, TrainingSet, open_dataset
from segcli.errors import SegcliError
from segcli.evaluation.evaluate import evaluate
from segcli.files.atomic import AppendLog, atomic_write_bytes, atomic_write_json, read_json_lines
from segcli.files.lock import FolderLock
from segcli.files.runs import STATE_DIR, next_run_dir
from segcli.inference.device import resolve_precision
from segcli.inference.segmenter import Segmenter
from segcli.models.checkpoint import load_training_state, save_checkpoint, save_training_state
from segcli.models.factory import ModelSpec
from segcli.training.distributed import Distributed
from segcli.training.initial_weights import initial_model
from segcli.training.options import DEFAULT_LR, TrainOptions  # noqa: F401  (TrainOptions: part of this API)
from segcli.version import __version__
from segcli.vocabulary.labels import IGNORE_INDEX

STATE_FILE = "state.safetensors"
LOG_EVERY = 10


@dataclass
class TrainResult:
    output: Path
    steps: int
    best: dict | None
    last: dict | None
    stopped_by: str
    history: list[dict] = field(default_factory=list)


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then poly decay (power 0.9) by progress in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - min(progress, 1.0)) ** 0.9


class Trainer:
    def __init__(self, opts: TrainOptions, output: Path, resume: bool = False,
                 on_event: Callable[[dict], None] | None = None, spec: ModelSpec | None = None):
        spec = spec or opts.validate()
        self.opts = opts
        self.dist = Distributed(opts.device)
        self.device = self.dist.device
        self.on_event = on_event or (lambda e: None)
        self.output = output
        self.lock, self._log_file = None, None
        if self.dist.main:  # before anything in DIR is read or written; let go by run(), or when collected
            self.lock = FolderLock(output / STATE_DIR, "lock.json", "train", conflicts=lambda name: True).acquire()
            weakref.finalize(self, self.lock.release)
        try:
            self._setup(opts, resume, spec)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let other runs into DIR (run() does this when it ends)."""
        if self.lock is not None:
            self.lock.release()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _setup(self, opts: TrainOptions, resume: bool, spec: ModelSpec) -> None:
        self.saved_step: int | None = None  # the step of the state on disk
        if opts.batch_size % (self.dist.world * opts.accumulate):
            raise SegcliError(f"--batch-size {opts.batch_size} must divide by processes x --accumulate "
                              f"({self.dist.world} x {opts.accumulate})")
        if opts.download and self.dist.main:
            from segcli.datasets.catalog import BENCHMARKS
            from segcli.datasets.prepare import default_root, get

            if opts.data in BENCHMARKS:
                get(BENCHMARKS[opts.data].download, default_root(opts.data_root))
        self.dist.barrier()
        self.data: SegmentationData = open_dataset(opts.data, opts.data_root, seed=opts.seed)
        if self.dist.main:
            self.data.check()  # every bad file is found before the first step
        self.dist.barrier()
        self.model = initial_model(opts, spec).to(self.device)  # its input size: the crop
        self.classes = self.data.classes
        self.text = self.model.label_embeddings(self.classes).to(self.device)  # [K,C], frozen, once
        self.autocast = resolve_precision(opts.precision, self.device, training=True)
        self.scaler = torch.amp.GradScaler(enabled=self.autocast == torch.float16)
        self.optimizer = self._optimizer()
        self.train_set = TrainingSet(self.data, opts.crop, opts.seed)
        self.micro_batch = opts.batch_size // opts.accumulate  # global, over all processes
        self.micro_per_epoch = len(self.train_set) // self.micro_batch
        self.per_epoch = max(1, self.micro_per_epoch // opts.accumulate)  # optimizer steps
        self.total_steps = opts.steps or (opts.epochs * self.per_epoch if opts.epochs else None)
        self.warmup = opts.warmup if opts.warmup is not None else min(500, max(1, (self.total_steps or 200) // 20))
        # default: every epoch, but at most ~20 validations per run (a tenth of the time when time-limited)
        self.eval_every = opts.eval_every or (max(self.per_epoch, self.total_steps // 20) if self.total_steps else None)
        self.eval_period_s = None if self.eval_every else opts.time_limit * 60 / 10
        self.step, self.elapsed, self.best, self.last_eval, self.last_eval_at = 0, 0.0, None, None, 0.0
        self.history: list[dict] = []
        if resume:
            self._load_state()
        ddp_model = self.model
        if self.dist.world > 1:
            if self.device.type == "cuda":
                ddp_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ddp_model)
            ddp_model = torch.nn.parallel.DistributedDataParallel(
                ddp_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp_model = ddp_model

    def _optimizer(self) -> torch.optim.Optimizer:
        lr = self.opts.lr or DEFAULT_LR[self.opts.optimizer]
        backbone = [p for p in self.model.image_encoder.parameters() if p.requires_grad]
        decoder = [p for p in self.model.decoder.parameters() if p.requires_grad]
        groups = [{"params": backbone, "lr": lr * 0.1, "base_lr": lr * 0.1},  # LSeg: the backbone learns 10x slower
                  {"params": decoder, "lr": lr, "base_lr": lr}]
        if self.opts.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=_default(self.opts.weight_decay, 1e-4))
        return torch.optim.AdamW(groups, lr=lr, weight_decay=_default(self.opts.weight_decay, 0.01))

    # --- progress ------------------------------------------------------------------------
    def progress(self) -> float:
        if self.total_steps:
            return self.step / self.total_steps
        return self.elapsed / (self.opts.time_limit * 60)

    def _time_is_up(self) -> bool:
        if not self.opts.time_limit:
            return False
        reserve = (self.last_eval or {}).get("seconds", 0.0) * 1.2  # leave room for the final evaluation
        return self.elapsed + reserve >= self.opts.time_limit * 60

    def _validation_due(self) -> bool:
        if self.eval_every:
            return self.step % self.eval_every == 0
        return self.elapsed - self.last_eval_at >= self.eval_period_s

    def _done(self) -> str | None:
        if self.total_steps and self.step >= self.total_steps:
            return "steps"
        if self._time_is_up():
            return "time limit"
        return None

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            self.close()

    @contextlib.contextmanager
    def _writing(self):
        """Around every write into DIR: a disk that refuses (full, read-only, failing) ends the run in
        one line; the files written before are whole (atomic), so --resume goes on from the last state."""
        try:
            yield
        except OSError as exc:
            kept = f"the state saved at step {self.saved_step} is intact" if self.saved_step is not None else "no state was saved yet"
            raise SegcliError(f"stopped at step {self.step}: cannot write to {self.output}: {exc.strerror or exc}; {kept}; "
                              f"once the folder can be written again, run segcli train --resume {self.output}") from None

    def _run(self) -> TrainResult:
        sampler = EpochBatches(len(self.train_set), self.micro_batch, self.opts.seed,
                               start=divmod(self.step * self.opts.accumulate, self.micro_per_epoch),
                               rank=self.dist.rank, world=self.dist.world)
        loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.opts.workers,
                                             pin_memory=self.device.type == "cuda",
                                             persistent_workers=self.opts.workers > 0)
        batches = iter(loader)
        stopped_by = self._done()
        if self.dist.any(stopped_by is not None)[0]:
            stopped_by = stopped_by or "another rank"
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        self.model.train()
        with _stop_on_sigterm() as stop_requested:
            while not stopped_by:
                started = time.perf_counter()
                loss = self._train_step(batches)
                self.step += 1
                self.elapsed += time.perf_counter() - started
                window_loss, window_steps = window_loss + loss, window_steps + 1
                if self.step % LOG_EVERY == 0 or self.step == 1:
                    seconds = time.perf_counter() - window_start
                    self._log({"step": self.step, "loss": window_loss / window_steps,
                               "lr": self.optimizer.param_groups[1]["lr"],
                               "images_per_s": window_steps * self.opts.batch_size / seconds if seconds else 0.0})
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                stopped_by = self._done()
                interrupted, stop, evaluate_now = self.dist.any(stop_requested(), stopped_by is not None,
                                                                self._validation_due())
                if interrupted:  # SIGTERM (preemption, kill): save and leave, no evaluation
                    self._save_state()
                    return TrainResult(self.output, self.step, self.best, self.last_eval, "interrupted", self.history)
                if stop:
                    stopped_by = stopped_by or "another rank"
                if stop or evaluate_now:
                    self._evaluate()
                if stop or evaluate_now or self.step % self.opts.save_every == 0:
                    self._save_state()
        self._write_curves()
        return TrainResult(self.output, self.step, self.best, self.last_eval, stopped_by, self.history)

    def _train_step(self, batches) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        factor = lr_factor(self.progress(), self.step, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        total = 0.0
        for micro in range(self.opts.accumulate):
            images, masks = next(batches)
            images = images.to(self.device, non_blocking=True).float().div_(255.0)
            masks = masks.to(self.device, non_blocking=True)
            sync = micro == self.opts.accumulate - 1 or self.dist.world == 1
            context = self.ddp_model.no_sync() if not sync else contextlib.nullcontext()
            with context:
                with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                    logits = self.ddp_model(images, self.text)
                loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX) / self.opts.accumulate
                self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        if self.opts.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def _evaluate(self) -> None:
        if self.dist.main:
            started = time.perf_counter()
            seg = Segmenter(self.model, device=self.device, precision="auto", imgsz=self.opts.crop, labels=self.classes)
            metrics = evaluate(seg, self.data, "val", batch_size=max(1, self.opts.batch_size))
            seconds = time.perf_counter() - started
            record = {"step": self.step, "mIoU": metrics["mIoU"], "pixAcc": metrics["pixAcc"], "seconds": seconds,
                      "elapsed": self.elapsed}
            self.last_eval = record
            with self._writing():
                save_checkpoint(self.model, self.output / "last.safetensors", labels=self.classes,
                                extra={"trained_on": self.data.name, "step": self.step, "val": record})
                if self.best is None or metrics["mIoU"] > self.best["mIoU"]:
                    save_checkpoint(self.model, self.output / "best.safetensors", labels=self.classes,
                                    extra={"trained_on": self.data.name, "step": self.step, "val": record})
                    self.best = record
            self._log({"step": self.step, "eval": record, "per_class": metrics["per_class"]})
        self.last_eval_at = self.elapsed
        self.model.train()  # the Segmenter switched it to eval mode
        self.dist.barrier()

    def _log(self, record: dict) -> None:
        self.history.append(record)
        self.on_event(record)
        if self.dist.main:
            with self._writing():
                if self._log_file is None:
                    self._log_file = AppendLog(self.output / "metrics.jsonl")
                self._log_file.append(record)

    # --- resumable state ---------------------------------------------------------------
    def _save_state(self) -> None:
        if self.dist.main:
            progress = {"step": self.step, "elapsed": self.elapsed, "best": self.best, "last_eval": self.last_eval,
                        "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
            with self._writing():
                save_training_state(self.output / STATE_FILE, self.model, self.optimizer, progress)
            self.saved_step = self.step
        self.dist.barrier()

    def _load_state(self) -> None:
        path = self.output / STATE_FILE
        if not path.is_file():
            raise SegcliError(f"{self.output} has no {STATE_FILE}: nothing to resume (was it saved at least once?)")
        meta = load_training_state(path, self.model, self.optimizer)
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.elapsed = meta["step"], meta["elapsed"]
        self.saved_step = self.step
        self.best, self.last_eval = meta["best"], meta["last_eval"]
        self.last_eval_at = (self.last_eval or {}).get("elapsed", 0.0)
        # drop log lines written after the saved state: the resumed run writes them again
        log = self.output / "metrics.jsonl"
        if log.exists() and self.dist.main:
            self.history = [r for r in read_json_lines(log) if r.get("step", 0) <= self.step]
            atomic_write_bytes(log, "".join(json.dumps(r) + "\n" for r in self.history).encode())

    def _write_curves(self) -> None:
        if self.dist.main:
            from segcli.training.curves import plot_curves

            losses = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
            mious = [(r["step"], r["eval"]["mIoU"]) for r in self.history if "eval" in r]
            with self._writing():
                atomic_write_bytes(self.output / "curves.png", plot_curves(losses, mious))


@contextlib.contextmanager
def _stop_on_sigterm():
    """Yields a function telling whether SIGTERM arrived; the step in progress finishes first."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received.is_set
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    try:
        yield received.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


def _default(value, fallback):
    return fallback if value is None else value


def start_training(opts: TrainOptions, on_event=None) -> Trainer:
    """A new run in `opts.output` (default runs/train/N) with its config written."""
    rank = int(os.environ.get("RANK", "0"))
    spec = opts.validate()  # before any folder is made
    created = None
    if opts.output:
        output = Path(opts.output)
        if (output / STATE_FILE).exists():
            raise SegcliError(f"{output} already holds a training run: use --resume {output} or another --output")
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SegcliError("give --output when training on several processes (they must agree on one folder)")
    else:
        output = created = next_run_dir(Path("runs/train"))  # created now, so parallel runs differ
    try:
        trainer = Trainer(opts, output, resume=False, on_event=on_event, spec=spec)  # checks data and weights first
    except BaseException:
        if created is not None:  # a run that never started leaves no empty runs/train/N behind
            with contextlib.suppress(OSError):
                created.rmdir()
        raise
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output / "config.json", {"options": opts.to_json(), "segcli_version": __version__})
        (output / "metrics.jsonl").unlink(missing_ok=True)
    trainer.dist.barrier()
    return trainer


def resume_training(run_dir: str | Path, on_event=None, time_limit: float | None = None) -> Trainer:
    """Continue the run in `run_dir` with the options it was started with."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not config.is_file():
        raise SegcliError(f"{run_dir} is not a training run (no config.json)")
    try:
        opts = TrainOptions(**json.loads(config.read_text(encoding="utf-8"))["options"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SegcliError(f"{config} is unreadable or not a segcli training config ({exc})") from None
    if time_limit is not None:
        opts.time_limit = time_limit
    return Trainer(opts, run_dir, resume=True, on_event=on_event)
