"""Predict throughput: the model's own ceiling vs `segcli predict` end to end.

    python benchmarks/bench_predict.py [--model lseg_vitb16_384] [--labels 20] [--images 32] [--device cpu]

Random weights (speed does not depend on their values). (a) ceiling: forward pass alone on
pre-made tensors; (b) end to end on a folder of JPEGs of mixed sizes made from sample_images,
writing masks, colors and overlays; start-up is excluded by timing two folder sizes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    photos = sorted((ROOT / "sample_images").glob("*.jpg"))
    for i in range(n):
        img = Image.open(photos[i % len(photos)])
        scale = (0.75, 1.0, 1.5, 2.0)[i % 4]
        img.resize((int(img.width * scale), int(img.height * scale))).save(folder / f"img{i:04d}.jpg", quality=90)


def ceiling(model: str, labels: int, batch: int, device: str, imgsz: int, iters: int) -> float:
    from segcli.api import Segmenter
    from segcli.labels import LabelSet

    seg = Segmenter.from_pretrained(model, device=device, imgsz=imgsz, warn=False)
    names = [[f"label {i}"] for i in range(labels)]
    text = seg.label_embeddings(LabelSet.from_synonyms(names))
    pixels = np.random.randint(0, 255, (batch, seg.imgsz, seg.imgsz, 3), dtype=np.uint8)
    seg.segment_canvases(pixels, text)  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        seg.segment_canvases(pixels, text)
    return batch * iters / (time.perf_counter() - t0)


def end_to_end(model: str, labels: int, batch: int, device: str, imgsz: int, n: int, tmp: Path) -> float:
    label_arg = ",".join(f"label {i}" for i in range(labels))
    times = {}
    for count in (n // 4, n):
        folder = tmp / f"photos{count}"
        make_folder(folder, count)
        cmd = [sys.executable, "-m", "segcli", "predict", str(folder), "-l", label_arg, "-m", model,
               "-o", str(tmp / f"out{count}"), "-b", str(batch), "--device", device, "--imgsz", str(imgsz), "-q"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        times[count] = time.perf_counter() - t0
    return (n - n // 4) / (times[n] - times[n // 4])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lseg_vitb16_384")
    ap.add_argument("--labels", type=int, nargs="+", default=[1, 5, 20, 150])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--imgsz", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-"))
    print(f"model {args.model}, imgsz {args.imgsz}, batch {args.batch_size}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'K':>4} {'ceiling img/s':>14} {'predict img/s':>14} {'b/a':>6}")
    try:
        for k in args.labels:
            a = ceiling(args.model, k, args.batch_size, args.device, args.imgsz, iters=3)
            b = end_to_end(args.model, k, args.batch_size, args.device, args.imgsz, args.images, tmp / f"k{k}")
            print(f"{k:>4} {a:>14.2f} {b:>14.2f} {b / a:>6.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
