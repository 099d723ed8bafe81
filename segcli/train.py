"""The train engine: LSeg's supervised training, resumable, on one or many processes.

The image encoder and the DPT decoder learn with per-pixel cross-entropy; the frozen CLIP text
tower turns the class names into the classifier once. DIR gets last/best.safetensors (normal segcli
checkpoints), metrics.jsonl, curves.png, config.json and state.safetensors (weights, optimizer and
progress in one atomically written file, no pickling), from which `--resume DIR` continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from segcli import __version__
from segcli.api import Segmenter, resolve_device, resolve_precision
from segcli.checkpoint import is_segcli_checkpoint, load_checkpoint, save_checkpoint
from segcli.data.segmentation import EpochBatches, SegmentationData, TrainingSet, open_dataset
from segcli.errors import SegcliError
from segcli.evaluate import evaluate
from segcli.fileio import atomic_path, atomic_write_bytes, atomic_write_json
from segcli.metrics import IGNORE_INDEX
from segcli.modeling.lseg import LSeg, build_model
from segcli.predict import next_run_dir
from segcli.registry import ARCHITECTURES

STATE_FILE = "state.safetensors"
LOG_EVERY = 10


@dataclass
class TrainOptions:
    data: str
    model: str
    output: str | None = None
    data_root: str | None = None
    steps: int | None = None
    epochs: int | None = None
    time_limit: float | None = None  # minutes
    batch_size: int = 8  # global: split over the processes
    accumulate: int = 1
    lr: float | None = None  # default per optimizer
    optimizer: str = "adamw"
    weight_decay: float | None = None  # default: 0.01 for AdamW, 1e-4 for SGD (LSeg's)
    warmup: int | None = None  # steps; default 5% of the schedule (at most 500)
    crop: int = 480
    precision: str = "auto"
    clip_grad: float = 1.0
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    eval_every: int | None = None  # steps; default once per epoch
    save_every: int = 50  # steps between resumable states
    pretrained: bool = True
    backbone_weights: str | None = None
    text_weights: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    output: Path
    steps: int
    best: dict | None
    last: dict | None
    stopped_by: str
    history: list[dict] = field(default_factory=list)


DEFAULT_LR = {"adamw": 3e-4, "sgd": 4e-3}


class Distributed:
    """Rank, world size and device under torchrun (env://), or a single process."""

    def __init__(self, device_spec: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_spec)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

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


def initial_model(opts: TrainOptions) -> LSeg:
    """An architecture with pretrained backbone/text weights (hub or files), or a checkpoint to fine-tune."""
    path = Path(opts.model)
    if path.suffix == ".safetensors" or path.exists():
        if not (path.is_file() and is_segcli_checkpoint(path)):
            raise SegcliError(f"--model {opts.model}: not a segcli checkpoint (or use an architecture name)")
        model, _ = load_checkpoint(path)
        return model
    if opts.model not in ARCHITECTURES:
        raise SegcliError(f"--model {opts.model!r} is neither a segcli checkpoint nor an architecture "
                          f"({', '.join(ARCHITECTURES)})")
    torch.manual_seed(opts.seed)
    model = build_model(opts.model)
    cfg = model.cfg
    backbone = _backbone_state(cfg, opts)
    if backbone is not None:
        _load_backbone(model, backbone)
    text = _text_state(cfg, opts)
    if text is not None:
        try:
            model.text_encoder.tower.load_state_dict(text, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).strip().splitlines()[1:2]).strip()[:160]
            raise SegcliError(f"the text weights do not fit {cfg.name}'s CLIP text tower ({detail})") from None
    return model


def _backbone_state(cfg, opts: TrainOptions) -> dict | None:
    from segcli.weights import read_state_dict

    if opts.backbone_weights:
        return read_state_dict(opts.backbone_weights)
    if not cfg.timm_name or not opts.pretrained:
        return None
    import timm

    try:
        return timm.create_model(cfg.timm_name, pretrained=True, num_classes=0).state_dict()
    except Exception as exc:  # offline, hub errors: one line, with what to do
        raise SegcliError(f"cannot download the pretrained {cfg.timm_name} backbone ({str(exc).splitlines()[0][:120]}); "
                          "pass --backbone-weights FILE (a timm ViT state dict), or --no-pretrained to start "
                          "from random weights") from None


def _load_backbone(model: LSeg, state: dict) -> None:
    from timm.layers import resample_abs_pos_embed

    vit = model.image_encoder.vit
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm.", "fc_norm."))}
    if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(vit.patch_embed.grid_size), num_prefix_tokens=1)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in dict(vit.named_parameters())]
    if missing or unexpected:
        raise SegcliError(f"backbone weights do not fit {model.cfg.name}: "
                          f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")


def _text_state(cfg, opts: TrainOptions) -> dict | None:
    from segcli.clip_weights import clip_text_state, download_clip_weights
    from segcli.weights import read_state_dict

    if opts.text_weights:
        return clip_text_state(read_state_dict(opts.text_weights))
    if cfg.clip_name and opts.pretrained:
        return clip_text_state(read_state_dict(download_clip_weights(cfg.clip_name, "openai")))
    return None


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then poly decay (power 0.9) by progress in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - min(progress, 1.0)) ** 0.9


class Trainer:
    def __init__(self, opts: TrainOptions, output: Path, resume: bool = False,
                 on_event: Callable[[dict], None] | None = None):
        self.opts = opts
        self.dist = Distributed(opts.device)
        self.device = self.dist.device
        self.on_event = on_event or (lambda e: None)
        self.output = output
        if opts.batch_size % (self.dist.world * opts.accumulate):
            raise SegcliError(f"--batch-size {opts.batch_size} must divide by processes x --accumulate "
                              f"({self.dist.world} x {opts.accumulate})")
        if opts.optimizer not in DEFAULT_LR:
            raise SegcliError(f"unknown optimizer {opts.optimizer!r}: use adamw or sgd")
        self.data: SegmentationData = open_dataset(opts.data, opts.data_root, seed=opts.seed)
        if self.dist.main:
            self.data.check()  # every bad file is found before the first step
        self.dist.barrier()
        self.model = initial_model(opts).to(self.device)
        m = self.model.cfg.input_multiple
        if opts.crop < m or opts.crop % m:
            raise SegcliError(f"--crop {opts.crop} must be a multiple of {m}")
        # the checkpoint remembers the evaluation size, so predict/eval reproduce validation
        self.model.cfg = dataclasses.replace(self.model.cfg, default_imgsz=opts.crop)
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
        if self.total_steps is None and not opts.time_limit:
            raise SegcliError("give --steps, --epochs or --time-limit")
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
            save_checkpoint(self.model, self.output / "last.safetensors", labels=self.classes,
                            extra={"trained_on": self.data.name, "step": self.step, "val": record})
            if self.best is None or metrics["mIoU"] > self.best["mIoU"]:
                self.best = record
                save_checkpoint(self.model, self.output / "best.safetensors", labels=self.classes,
                                extra={"trained_on": self.data.name, "step": self.step, "val": record})
            self._log({"step": self.step, "eval": record, "per_class": metrics["per_class"]})
        self.last_eval_at = self.elapsed
        self.model.train()  # the Segmenter switched it to eval mode
        self.dist.barrier()

    def _log(self, record: dict) -> None:
        self.history.append(record)
        self.on_event(record)
        if self.dist.main:
            with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # --- resumable state ---------------------------------------------------------------
    def _save_state(self) -> None:
        if not self.dist.main:
            self.dist.barrier()
            return
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        for index, slots in opt["state"].items():
            for name, value in slots.items():
                tensors[f"optim.{index}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).cpu().contiguous()
        groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
        meta = {"step": self.step, "elapsed": self.elapsed, "best": self.best, "last_eval": self.last_eval,
                "param_groups": groups, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "segcli_version": __version__}
        with atomic_path(self.output / STATE_FILE) as tmp:
            save_file(tensors, tmp, metadata={"trainer": json.dumps(meta)})
        self.dist.barrier()

    def _load_state(self) -> None:
        path = self.output / STATE_FILE
        if not path.is_file():
            raise SegcliError(f"{self.output} has no {STATE_FILE}: nothing to resume (was it saved at least once?)")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["trainer"])
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            raise SegcliError(f"{path} is corrupt ({exc}); nothing to resume from") from None
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.model.to(self.device)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.elapsed = meta["step"], meta["elapsed"]
        self.best, self.last_eval = meta["best"], meta["last_eval"]
        self.last_eval_at = (self.last_eval or {}).get("elapsed", 0.0)
        # drop log lines written after the saved state: the resumed run writes them again
        log = self.output / "metrics.jsonl"
        if log.exists() and self.dist.main:
            kept = [line for line in log.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            atomic_write_bytes(log, ("\n".join(kept) + "\n" if kept else "").encode())
            self.history = [json.loads(line) for line in kept]

    def _write_curves(self) -> None:
        if self.dist.main:
            from segcli.render import plot_curves

            losses = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
            mious = [(r["step"], r["eval"]["mIoU"]) for r in self.history if "eval" in r]
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
    if opts.output:
        output = Path(opts.output)
        if (output / STATE_FILE).exists():
            raise SegcliError(f"{output} already holds a training run: use --resume {output} or another --output")
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SegcliError("give --output when training on several processes (they must agree on one folder)")
    else:
        output = next_run_dir(Path("runs/train"))  # created now, so parallel runs differ
    trainer = Trainer(opts, output, resume=False, on_event=on_event)  # checks data and weights first
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
