"""The options of `segcli train`, as plain data (no torch import).

`TrainOptions` defines every `segcli train` option once: the CLI's options are generated from its
fields (flags, help and lower bounds live in each field's metadata).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from segcli.errors import SegcliError, check_input_size
from segcli.inference.device import PRECISIONS
from segcli.modeling.configs import ARCHITECTURES
from segcli.models.families import FAMILIES
from segcli.options import option

if TYPE_CHECKING:
    from segcli.models.factory import ModelSpec

DEFAULT_LR = {"adamw": 3e-4, "sgd": 4e-3}


@dataclass
class TrainOptions:
    """Every option of `segcli train`, defined once: the CLI is generated from these fields."""

    data: str | None = option(None, "ade20k, folder:PATH or synthetic.", "--data", "-d")
    model: str | None = option(None, "An architecture (lseg_vitl16_384, lseg_vitb16_384, lseg_vitb32_384, lseg_tiny) "
                                      "or a segcli LSeg checkpoint to fine-tune.", "--model", "-m")
    output: str | None = option(None, "Run folder. Default: a new runs/train/N.", "--output", "-o")
    data_root: str | None = option(None, "Where the datasets live (segcli data get --root). Default: $SEGCLI_DATA, "
                                          "else ./data.", "--data-root")
    download: bool = option(False, "Fetch a missing catalog dataset first (segcli data get).", "--download")
    steps: int | None = option(None, "Optimizer steps to train.", "--steps", min=1)
    epochs: int | None = option(None, "Epochs to train (instead of --steps).", "--epochs", min=1)
    time_limit: float | None = option(None, "Minutes: stop cleanly, evaluate and save when time is up. Alone, the "
                                             "LR schedule runs on time.", "--time-limit", min=0.1)
    batch_size: int = option(8, "Global batch size (split over processes).", "--batch-size", "-b", min=1)
    accumulate: int = option(1, "Split each batch into this many gradient-accumulation steps.", "--accumulate", min=1)
    lr: float | None = option(None, "Decoder learning rate (the backbone gets a tenth). Default: 3e-4 AdamW, 4e-3 SGD.",
                               "--lr", min=0.0)
    optimizer: str = option("adamw", "adamw or sgd.", "--optimizer")
    weight_decay: float | None = option(None, "Weight decay. Default: 0.01 AdamW, 1e-4 SGD (LSeg's).",
                                         "--weight-decay", min=0.0)
    warmup: int | None = option(None, "Linear warmup steps. Default: 5% of the steps (at most 500).", "--warmup", min=0)
    crop: int = option(480, "Training crop size; also the evaluation input size.", "--crop", min=16)
    precision: str = option("auto", "auto (bf16/fp16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16.", "--precision")
    clip_grad: float = option(1.0, "Max gradient norm (0: off).", "--clip-grad", min=0.0)
    seed: int = option(0, "Seeds weights, data order and augmentation.", "--seed")
    workers: int = option(2, "Data-loading processes.", "--workers", "-j", min=0)
    device: str = option("auto", "auto, cpu, cuda, cuda:N (under torchrun: one GPU per rank).", "--device")
    eval_every: int | None = option(None, "Steps between validations. Default: every epoch.", "--eval-every", min=1)
    save_every: int = option(50, "Steps between resumable saves.", "--save-every", min=1)
    pretrained: bool = option(True, "Start from hub weights (ViT from timm, CLIP text from open_clip).",
                               "--pretrained/--no-pretrained")
    backbone_weights: str | None = option(None, "A local timm ViT state dict instead of the hub.", "--backbone-weights")
    text_weights: str | None = option(None, "A local open_clip CLIP weights file instead of the hub.", "--text-weights")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "ModelSpec":
        """Check every option that needs no data and no weights; returns what --model names.
        Runs before anything is read or downloaded, so a typo costs no waiting."""
        if not self.data or not self.model:
            raise SegcliError("give --data and --model (or --resume DIR)")
        if self.optimizer not in DEFAULT_LR:
            raise SegcliError(f"unknown optimizer {self.optimizer!r}: use adamw or sgd")
        if not (self.steps or self.epochs or self.time_limit):
            raise SegcliError("give --steps, --epochs or --time-limit")
        if self.batch_size % self.accumulate:
            raise SegcliError(f"--batch-size {self.batch_size} must divide by --accumulate {self.accumulate}")
        if self.precision not in PRECISIONS:
            raise SegcliError(f"unknown precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        from segcli.models.factory import resolve_model

        spec = resolve_model(self.model)
        if spec.kind not in ("architecture", "checkpoint") or not FAMILIES[spec.family].trainable:
            trainable = ", ".join(n for n, cfg in ARCHITECTURES.items() if FAMILIES[cfg.family].trainable)
            raise SegcliError(f"--model {self.model} is {spec.kind_text}: train takes an architecture ({trainable}) "
                              "or a segcli checkpoint of a trainable family")
        check_input_size(self.crop, spec.config.input_multiple, "--crop")
        return spec
