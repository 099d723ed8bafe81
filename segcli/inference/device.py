"""Which device and precision a process runs the model with (predict, eval, train, serve, torchrun).

torch is imported inside the functions: the option tables (PRECISIONS) stay importable by the
CLI's --help, which loads no torch. Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) each rank
takes its own GPU (cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from segcli.errors import SegcliError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> a usable torch.device, or SegcliError."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise SegcliError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SegcliError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SegcliError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SegcliError("device 'mps' requested but MPS is not available here")
    elif device.type != "cpu":
        raise SegcliError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def _cpu_has_bf16() -> bool:
    """Native bf16 (AVX512-BF16 or AMX). SEGCLI_CPU_BF16=0 (or 1) overrides what /proc/cpuinfo says:
    the test suite's fp32 pass on a bf16 machine, as on a CPU without it."""
    forced = os.environ.get("SEGCLI_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(spec: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """Autocast dtype, or None for fp32 (and for int8, whose quantised layers are the Segmenter's). auto:
    inference uses fp16 on CUDA and bf16 on CPUs with native bf16; training uses bf16 on CUDA when
    supported (else fp16, with loss scaling) and fp32 on CPUs."""
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if training and torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and _cpu_has_bf16() and not training:
            return torch.bfloat16
        return None
    if spec == "int8":  # the image branch's linear layers quantised (Segmenter), the rest in fp32
        if training:
            raise SegcliError("int8 is for inference: train in fp32, bf16 or fp16")
        if device.type != "cpu":
            raise SegcliError("int8 runs on the CPU (dynamic int8 linear layers): use fp16 or bf16 on a GPU")
        return None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if spec not in table:
        raise SegcliError(f"unknown precision {spec!r}: use {', '.join(PRECISIONS)}")
    if spec == "fp16" and device.type == "cpu":
        raise SegcliError("fp16 is not supported on the CPU: use bf16 or fp32")
    return table[spec]


def torchrun_ranks() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when launched by torchrun with several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def rank_device(spec: str) -> torch.device:
    """The device of this process: under torchrun, 'auto' and 'cuda' mean this rank's own GPU."""
    import torch

    device = resolve_device(spec)
    if device.type == "cuda" and torchrun_ranks() and spec.strip().lower() in ("auto", "cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
