"""Encode once, ask anything: relabel and search against predict, and what storing costs.

    python benchmarks/bench_embeddings.py [--model lseg_vitb16_384] [--images 8] [--search 1000]

Speed with random weights (a checkpoint of the seeded architecture; speed does not depend on the
values), photos made from sample_images, 8 labels, mask only, on this machine's CPU:
(a) seconds per photo: `segcli predict` vs `segcli relabel` over the stored embeddings, start-up
    excluded by timing two folder sizes; the peak RSS of each for both sizes (flat in photos);
(b) pixel agreement of relabel's masks with predict's where storage rounds (an fp32 run stored as
    float16) or pools (--embed-stride 8 and 16), with a model whose masks mean something: lseg_tiny
    trained here for a minute on synthetic scenes (random weights give one label everywhere);
(c) `segcli search` over 1,000 stored photos at stride 16 (files in the real format, made from one
    stored photo with its cells shuffled), wall time with and without start-up, and its peak RSS
    over 100 vs 1,000 photos;
(d) bytes per photo for each model and stride (a 4:3 photo at the default input size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, sample_photos  # benchmarks/ is on sys.path when run as a script
from PIL import Image

LABELS = "road,car,sky,person,tree,building,grass,water"
OTHER = "cat,dog,table,chair,window,door,floor,wall"


def segcli(*args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one segcli command in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "segcli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: segcli {' '.join(args)}\n{proc.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*_mask.png"))}


def agreement(a: dict, b: dict) -> float:
    return float(np.mean([(a[k] == b[k]).mean() for k in a]))


def bytes_per_photo(channels: int, imgsz: int, stride: int, bits: int, aspect: float = 4 / 3) -> int:
    """Stored bytes for a photo of `aspect` (long/short side), from the file format: (d)'s table."""
    long_cells = math.ceil(imgsz / stride)
    short_cells = math.ceil(imgsz / aspect / stride)
    return channels * long_cells * short_cells * bits // 8


def agreement_table(tmp: Path) -> None:
    """(b): a tiny model trained on synthetic scenes; relabel vs predict on its validation photos."""
    data, run = tmp / "syn", tmp / "syn_run"
    segcli("data", "synth", str(data), "--train", "256", "--val", "32")
    segcli("train", "--data", f"folder:{data}", "--model", "lseg_tiny", "--crop", "96", "--lr", "1e-3", "--workers", "0",
           "--batch-size", "8", "--steps", "200", "--eval-every", "200", "-o", str(run), "-q")
    model, photos, labels = str(run / "best.safetensors"), str(data / "val" / "images"), "ball,box,leaf,grass,sky,sand,water"
    other = "sky,water,ball,leaf"  # a different question: fewer labels, another order
    rows = []
    for name, precision, dtype, stride in (("compute dtype, own stride", "auto", "auto", 2),
                                           ("fp32 run stored as float16", "fp32", "float16", 2),
                                           ("--embed-stride 8", "auto", "auto", 8),
                                           ("--embed-stride 16", "auto", "auto", 16)):
        ref, stored, rel = (tmp / f"agree_{tag}_{stride}_{dtype}_{precision}" for tag in ("pred", "stored", "rel"))
        segcli("predict", photos, "-l", other, "-m", model, "-o", str(ref), "--save", "mask", "--precision", precision, "-q")
        segcli("predict", photos, "-l", labels, "-m", model, "-o", str(stored), "--save", "embeddings", "--precision",
               precision, "--embed-dtype", dtype, "--embed-stride", str(stride), "-q")
        segcli("relabel", str(stored), "-l", other, "-o", str(rel), "--save", "mask", "-q")
        rows.append((name, agreement(masks(rel), masks(ref))))
    print("\n(b) relabel vs predict, pixel agreement (lseg_tiny trained on synthetic scenes, 32 photos, 4 new labels)")
    print("| stored | agreement |")
    print("| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value:.6f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lseg_vitb16_384")
    ap.add_argument("--images", type=int, default=8, help="the larger folder (the smaller has a quarter)")
    ap.add_argument("--search", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-emb-"))
    try:
        import torch

        from segcli.modeling import build_model
        from segcli.models.checkpoint import save_checkpoint

        torch.manual_seed(0)
        checkpoint = tmp / f"{args.model}.safetensors"  # a file, as users have: loads without random init
        save_checkpoint(build_model(args.model), checkpoint)
        model = str(checkpoint)
        sizes = (max(1, args.images // 4), args.images)
        common = ["-m", model, "--save", "mask", "-q"]
        print(f"(a) {args.model}, 640x480 JPEGs, 8 labels, mask only, {os.cpu_count()} CPU cores")
        t, rss = {}, {}
        for n in sizes:
            photos = sample_photos(tmp / f"photos{n}", n)
            t["predict", n], rss["predict", n] = segcli("predict", str(photos), "-l", OTHER, "-o", str(tmp / f"pred{n}"), *common)
            stored = tmp / f"stored{n}"
            segcli("predict", str(photos), "-l", LABELS, "-m", model, "-o", str(stored), "--save", "embeddings", "-q")
            t["relabel", n], rss["relabel", n] = segcli("relabel", str(stored), "-l", OTHER, "-o", str(tmp / f"rel{n}"),
                                                        "--save", "mask", "-q")
        per = {k: (t[k, sizes[1]] - t[k, sizes[0]]) / (sizes[1] - sizes[0]) for k in ("predict", "relabel")}
        print("| command | s per photo | peak RSS MB (%d / %d photos) |" % sizes)
        print("| --- | ---: | ---: |")
        for k in ("predict", "relabel"):
            print(f"| {k} | {per[k]:.3f} | {rss[k, sizes[0]]:.0f} / {rss[k, sizes[1]]:.0f} |")
        print(f"relabel is {per['predict'] / per['relabel']:.1f}x faster per photo")
        big = sizes[1]
        same = agreement(masks(tmp / f"rel{big}"), masks(tmp / f"pred{big}"))
        print(f"relabel's masks equal predict's on {same:.6f} of the pixels (own stride, compute dtype)")
        agreement_table(tmp)

        from safetensors.torch import load_file, save_file

        stored16 = tmp / "s16"
        segcli("predict", str(tmp / f"photos{big}"), "-l", LABELS, "-m", model, "-o", str(stored16), "--save",
               "embeddings", "--embed-stride", "16", "-q")
        source = next(stored16.glob("*_embed.safetensors"))
        from safetensors import safe_open

        with safe_open(str(source), "pt") as f:
            meta = f.metadata()
        emb = load_file(str(source))["embeddings"]
        gen = torch.Generator().manual_seed(0)
        timings = {}
        for n in (100, args.search):
            folder = tmp / f"search{n}"
            folder.mkdir()
            shutil.copytree(stored16 / ".segcli", folder / ".segcli")
            shutil.copy(stored16 / "labels.json", folder / "labels.json")
            for i in range(n):
                cells = emb.flatten(1)[:, torch.randperm(emb.shape[1] * emb.shape[2], generator=gen)].view_as(emb)
                save_file({"embeddings": cells.contiguous()}, str(folder / f"p{i:05d}_embed.safetensors"), metadata=meta)
            timings[n] = segcli("search", str(folder), "--query", "red car", "--query", "a dog", "--top", "10")
        startup, _ = segcli("search", str(tmp / "search100"), "--query", "red car", "--top", "1")  # ~ start-up + 100 files
        n = args.search
        per_file = (timings[n][0] - timings[100][0]) / (n - 100)
        print(f"\n(c) search, 2 queries, {n} stored photos at stride 16 ({emb.shape[0]}x{emb.shape[1]}x{emb.shape[2]} "
              f"{str(emb.dtype).replace('torch.', '')}): {timings[n][0]:.2f} s wall with start-up "
              f"(model load: ~{startup - 100 * per_file:.2f} s), {per_file * n:.2f} s for the files alone; "
              f"peak RSS {timings[100][1]:.0f} MB (100 photos) / {timings[n][1]:.0f} MB ({n})")

        print("\n(d) bytes per photo (4:3 photo, default input size)")
        print("| model | C | input | stride | float16/bfloat16 | float32 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for model, channels, imgsz, strides in (("lseg_vitb16_384 / lseg_vitl16_384", 512, 384, (2, 8, 16, 32)),
                                                ("clip-dense:ViT-B-16", 512, 448, (16, 32)),
                                                ("clip-dense:ViT-L-14", 768, 448, (14, 28))):
            for stride in strides:
                half, full = (bytes_per_photo(channels, imgsz, stride, bits) for bits in (16, 32))
                print(f"| {model} | {channels} | {imgsz} | {stride} | {half / 1e6:.2f} MB | {full / 1e6:.2f} MB |")
        print(json.dumps({"per_photo_s": per, "search_s": timings[n][0]}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
