"""The model against the machine's limit: peak matmul FLOP/s, the model's achieved FLOP/s, the fraction.

    python benchmarks/bench_limit.py [--model lseg_vitb16_384] [--batch 8] [--imgsz 384] [--device cpu]
                                     [--precisions fp32 bf16 int8 bf16+compile] [--agreement-steps 400]

Peak: a 4096^3 matmul in each dtype (int8: torch._int_mm, int8 x int8 -> int32), best of 5. Model:
the image branch (`pixel_embeddings`, what predict runs per batch) of the random-weights MODEL at
IMGSZ, its FLOPs counted by torch.utils.flop_counter (multiply-adds x 2), timed over at least 2 s
after a warm-up; achieved = FLOPs / time, shown as a fraction of the peak of the dtype its matmuls
run in. int8 is predict's `--precision int8`: the image branch's linear layers quantised dynamically;
"+compile" adds predict's `--compile` (torch.compile, frozen weights on a CPU), its compile time shown.
Agreement: `lseg_tiny` trained on synthetic scenes for N steps (a trained model, not random
weights), its masks on 50 validation scenes under each precision against fp32's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT  # benchmarks/ is on sys.path when run as a script


def peak(dtype: str, device: torch.device, n: int = 4096) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (best of 5)."""
    if dtype == "int8":
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-100, 100, (n, n), dtype=torch.int8, device=device)
        op = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        t = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        a, b = torch.randn(n, n, device=device, dtype=t), torch.randn(n, n, device=device, dtype=t)
        op = lambda: a @ b  # noqa: E731
    op()
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        op()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _image_branch(model_name: str, precision: str, batch: int, imgsz: int, device: torch.device):
    """A callable running the image branch (`pixel_embeddings`, what predict runs per batch) under `precision`."""
    from segcli.api import Segmenter
    from segcli.inference.settings import InferenceSettings

    precision, _, compiled = precision.partition("+")
    seg = Segmenter.from_pretrained(model_name, device=str(device), precision=precision, imgsz=imgsz, warn=False)
    if compiled:
        seg.configure(InferenceSettings(window=0))
        print(f"({precision}: compiled in {seg.compile(batch):.1f} s)", flush=True)
    images = torch.rand(batch, 3, imgsz, imgsz, device=device)
    dtype = seg.autocast_dtype

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return seg.model.pixel_embeddings(images)

    return run


def network_flops(model_name: str, batch: int, imgsz: int, device: torch.device) -> int:
    """FLOPs of one batch through the image branch, counted in fp32 (the counter does not see int8's
    quantised kernels; the network's arithmetic is the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    run = _image_branch(model_name, "fp32", batch, imgsz, device)
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def seconds_per_batch(model_name: str, precision: str, batch: int, imgsz: int, device: torch.device) -> float:
    """Over at least 2 s, after a warm-up batch."""
    run = _image_branch(model_name, precision, batch, imgsz, device)
    run()
    _sync(device)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 2.0 or n < 2:
        run()
        _sync(device)
        n += 1
    return (time.perf_counter() - t0) / n


def agreement(precisions: list[str], steps: int, work: Path) -> dict[str, float]:
    """Share of mask pixels equal to fp32's, per precision, for lseg_tiny trained `steps` steps."""
    from segcli.api import Segmenter
    from segcli.datasets.segmentation import open_dataset

    run = work / "train"
    subprocess.run([sys.executable, "-m", "segcli", "train", "--data", "synthetic", "--model", "lseg_tiny", "--crop", "128",
                    "--steps", str(steps), "-o", str(run), "-q"], cwd=ROOT, check=True)
    data = open_dataset("synthetic")
    images = [data.load("val", s)[0] for s in data.samples("val")[:50]]
    maps = {}
    for precision in ["fp32", *precisions]:
        name, _, compiled = precision.partition("+")
        seg = Segmenter.from_pretrained(str(run / "best.safetensors"), device="cpu", precision=name, warn=False)
        if compiled:
            seg.compile(8)
        maps[precision] = [p.label_map for p in seg.predict(images, batch_size=8)]
    total = sum(m.size for m in maps["fp32"])
    return {p: sum(int((a == b).sum()) for a, b in zip(maps[p], maps["fp32"])) / total for p in precisions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lseg_vitb16_384")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--imgsz", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8", "bf16+compile", "fp32+compile"])
    ap.add_argument("--agreement-steps", type=int, default=400, help="0: skip the agreement check")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"{args.model}, batch {args.batch} at {args.imgsz}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| precision | peak of its dtype TFLOP/s | model GFLOP per image | img/s | achieved TFLOP/s | fraction of peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    flops = network_flops(args.model, args.batch, args.imgsz, device)
    for precision in args.precisions:
        top = peak(precision.partition("+")[0], device)
        seconds = seconds_per_batch(args.model, precision, args.batch, args.imgsz, device)
        achieved = flops / seconds
        print(f"| {precision} | {top / 1e12:.2f} | {flops / args.batch / 1e9:.1f} | {args.batch / seconds:.2f} | "
              f"{achieved / 1e12:.3f} | {achieved / top:.2f} |", flush=True)
    if args.agreement_steps:
        others = [p for p in args.precisions if p != "fp32"]
        with tempfile.TemporaryDirectory(prefix="segcli-bench-limit-") as tmp:
            shares = agreement(others, args.agreement_steps, Path(tmp))
        for p, share in shares.items():
            print(f"masks under {p} equal to fp32's: {share:.4%} of pixels (lseg_tiny, {args.agreement_steps} steps "
                  "on synthetic scenes, 50 validation scenes)")


if __name__ == "__main__":
    main()
