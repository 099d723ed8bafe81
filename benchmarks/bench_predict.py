"""Predict throughput and memory: segcli against the model's own ceiling, a naive loop and CLIPSeg.

    python benchmarks/bench_predict.py [--model lseg_vitb16_384] [--labels 1 5 20 150] [--images 64]
                                       [--device cpu] [--no-clipseg] [--memory]

Random weights throughout (speed does not depend on their values), same machine, same resolution:
(a) ceiling: the model's forward pass alone on pre-made tensors (batch, precision as predict uses);
(b) `segcli predict` end to end on a folder of JPEGs of mixed sizes made from sample_images, writing
    masks, colors and overlays; start-up excluded by timing two folder sizes;
(c) naive: one image at a time, text re-encoded for every image, fp32, decoding in the main thread,
    full-size K-channel upsampling, as LSeg's own scripts run;
(d) Hugging Face transformers' CLIPSeg (default config, 352x352), one pass per label, fp32.
Every part runs in its own process; peak RSS is that process's. `--memory` adds the memory checks:
1,000 vs 10 images, and a 24-megapixel photo with 150 labels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(folder: Path, n: int, scales=(0.75, 1.0, 1.5, 2.0)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((ROOT / "sample_images").glob("*.jpg"))
    for i in range(n):
        img = Image.open(photos[i % len(photos)]).convert("RGB")
        scale = scales[i % len(scales)]
        img.resize((int(img.width * scale), int(img.height * scale))).save(folder / f"img{i:04d}.jpg", quality=90)
    return folder


def label_names(k: int) -> list[str]:
    from segcli.labels import named_label_set

    ade = list(named_label_set("ade20k").names)
    return ade[:k] if k <= len(ade) else [f"label {i}" for i in range(k)]


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of that process, stdout). os.wait4 gives the child's own rusage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err_file, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err_file.seek(0)
        if proc.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{err_file.read()[-2000:]}")
        return seconds, usage.ru_maxrss / 1024, out.read()


# --- the parts, each run in a child process --------------------------------------------------

def part_ceiling(args) -> dict:
    from segcli.api import Segmenter
    from segcli.labels import LabelSet

    seg = Segmenter.from_pretrained(args.model, device=args.device, imgsz=args.imgsz, warn=False)
    text = seg.label_embeddings(LabelSet.from_synonyms([[n] for n in label_names(args.k)]))
    pixels = np.random.randint(0, 255, (args.batch_size, seg.imgsz, seg.imgsz, 3), dtype=np.uint8)
    for _ in range(2):  # warm-up: oneDNN picks its kernels on the first calls
        seg.segment_canvases(pixels, text)
    iters = 5
    t0 = time.perf_counter()
    for _ in range(iters):
        seg.segment_canvases(pixels, text)
    return {"images_per_s": args.batch_size * iters / (time.perf_counter() - t0)}


def part_naive(args) -> dict:
    import torch
    import torch.nn.functional as F

    from segcli.api import load_model
    from segcli.labels import LabelSet
    from segcli.modeling.pixel_text import embed_labels
    from segcli.render import palette_array

    device = torch.device(args.device)
    model, _, _, _ = load_model(args.model, device)
    labels = LabelSet.from_synonyms([[n] for n in label_names(args.k)])
    palette = palette_array(labels)
    files = sorted(Path(args.folder).glob("*.jpg"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for path in files:
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            text = embed_labels(model.text_encoder, labels)  # every image, as LSeg's demo does
            scale = args.imgsz / max(image.size)
            resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            canvas = np.zeros((args.imgsz, args.imgsz, 3), np.uint8)
            canvas[:resized.height, :resized.width] = np.asarray(resized)
            x = torch.from_numpy(canvas).permute(2, 0, 1)[None].float().div(255).to(device)
            logits = model(x, text)[:, :, :resized.height, :resized.width]  # [1,K,h,w] fp32
            full = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
            mask = full.argmax(1)[0].cpu().numpy().astype(np.uint8)
        Image.fromarray(mask).save(out / f"{path.stem}_mask.png")
        Image.fromarray(palette[mask]).save(out / f"{path.stem}_color.png")
        Image.blend(image, Image.fromarray(palette[mask]), 0.5).save(out / f"{path.stem}_overlay.jpg")
    return {"images_per_s": len(files) / (time.perf_counter() - t0)}


def part_clipseg(args) -> dict:
    import torch
    import torch.nn.functional as F
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    from segcli.labels import LabelSet
    from segcli.render import palette_array

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = CLIPSegForImageSegmentation(CLIPSegConfig()).eval().to(device)
    names = label_names(args.k)
    palette = palette_array(LabelSet.from_synonyms([[n] for n in names]))
    ids = SimpleTokenizer()(names, context_length=77).to(device)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)
    files = sorted(Path(args.folder).glob("*.jpg"))[: max(2, min(args.images, 16 // max(1, args.k // 5)))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for path in files:
        image = Image.open(path).convert("RGB")
        x = torch.from_numpy(np.asarray(image.resize((352, 352), Image.BICUBIC))).permute(2, 0, 1)[None].to(device).float() / 255
        x = (x - mean) / std
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(names), 8):  # one pass per label, 8 at a time
                k = len(names[start:start + 8])
                chunks.append(model(input_ids=ids[start:start + 8], pixel_values=x.expand(k, -1, -1, -1)).logits.reshape(k, 352, 352))
            logits = torch.cat(chunks)[None]
            full = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
            mask = full.argmax(1)[0].cpu().numpy().astype(np.uint8)
        Image.fromarray(mask).save(out / f"{path.stem}_mask.png")
        Image.fromarray(palette[mask]).save(out / f"{path.stem}_color.png")
    return {"images_per_s": len(files) / (time.perf_counter() - t0), "images": len(files)}


PARTS = {"ceiling": part_ceiling, "naive": part_naive, "clipseg": part_clipseg}


def child(part: str, args, k: int, **extra) -> tuple[dict, float]:
    cmd = [sys.executable, __file__, "--part", part, "--k", str(k), "--model", args.model, "--imgsz", str(args.imgsz),
           "--batch-size", str(args.batch_size), "--device", args.device, "--images", str(args.images)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    _, rss, out = run_measured(cmd)
    return json.loads(out.strip().splitlines()[-1]), rss


def predict_run(args, folder: Path, out: Path, labels: list[str], model: str | None = None, imgsz: int | None = None,
                extra: tuple = ()) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "segcli", "predict", str(folder), "-l", ",".join(labels), "-m", model or args.model,
           "-o", str(out), "-b", str(args.batch_size), "--device", args.device, "--imgsz", str(imgsz or args.imgsz),
           "-q", *extra]
    seconds, rss, _ = run_measured(cmd)
    return seconds, rss


def end_to_end(args, k: int, tmp: Path) -> tuple[float, float]:
    times, peak = {}, 0.0
    for count in (args.images // 4, args.images):
        folder = tmp / f"photos{count}"
        if not folder.exists():
            make_folder(folder, count)
        times[count], rss = predict_run(args, folder, tmp / f"out{k}_{count}", label_names(k))
        peak = max(peak, rss)
    return (args.images - args.images // 4) / (times[args.images] - times[args.images // 4]), peak


def memory_checks(args, tmp: Path) -> None:
    print("\nmemory (lseg_tiny at 128, all three outputs, 8 labels):")
    small = tmp / "small"
    make_folder(small / "src", 4, scales=(0.5,))
    for count in (10, 1000):
        folder = tmp / f"many{count}"
        folder.mkdir()
        for i in range(count):
            os.link(small / "src" / f"img{i % 4:04d}.jpg", folder / f"img{i:05d}.jpg")
        seconds, rss = predict_run(args, folder, tmp / f"mem{count}", label_names(8), "lseg_tiny", 128)
        print(f"  {count:>5} images: peak RSS {rss:7.0f} MB  ({count / seconds:.1f} img/s incl. start-up)")
    big = tmp / "big"
    big.mkdir()
    Image.open(ROOT / "sample_images" / "astronaut.jpg").convert("RGB").resize((6000, 4000)).save(big / "big.jpg", quality=90)
    for k in (8, 150):
        seconds, rss = predict_run(args, big, tmp / f"big{k}", label_names(k), "lseg_tiny", 128)
        print(f"  one 24 MP photo, {k:>3} labels: peak RSS {rss:7.0f} MB  ({seconds:.1f} s incl. start-up)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lseg_vitb16_384")
    ap.add_argument("--labels", type=int, nargs="+", default=[1, 5, 20, 150])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--imgsz", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-clipseg", action="store_true", help="skip (d) (needs pip install 'segcli[bench]')")
    ap.add_argument("--no-naive", action="store_true", help="skip (c)")
    ap.add_argument("--memory", action="store_true", help="also run the memory checks")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    import importlib.util

    import torch

    if not args.no_clipseg and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: (d) CLIPSeg skipped (pip install 'segcli[bench]')")
        args.no_clipseg = True
    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-"))
    print(f"model {args.model}, imgsz {args.imgsz}, batch {args.batch_size}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} photos")
    print("| K | (a) ceiling img/s | (b) predict img/s | (c) naive img/s | (d) CLIPSeg img/s | b/a | b/c | b/d "
          "| peak RSS a / b / c / d (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    try:
        naive_folder = make_folder(tmp / "naive", 8)
        for k in args.labels:
            a, rss_a = child("ceiling", args, k)
            b, rss_b = end_to_end(args, k, tmp)
            c, rss_c = ({"images_per_s": float("nan")}, float("nan")) if args.no_naive else child(
                "naive", args, k, folder=naive_folder, out=tmp / f"naive_out{k}")
            d, rss_d = ({"images_per_s": float("nan")}, float("nan")) if args.no_clipseg else child(
                "clipseg", args, k, folder=naive_folder, out=tmp / f"clipseg_out{k}")
            a, c, d = a["images_per_s"], c["images_per_s"], d["images_per_s"]
            print(f"| {k} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} | {b / a:.2f} | {b / c:.2f} | {b / d:.2f} "
                  f"| {rss_a:.0f} / {rss_b:.0f} / {rss_c:.0f} / {rss_d:.0f} |", flush=True)
        if args.memory:
            memory_checks(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
