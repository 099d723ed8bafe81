"""Decoding for the model: the host's workers against batched decoding on the device (--decode).

    python benchmarks/bench_decode.py [--device cuda] [--images 256] [--batch 64] [--predict]
                                      [--model lseg_vitb16_384]

(a) per photo size (0.3 and 2 MP JPEGs, q90, cut from sample_images): what one host core spends to
    turn a JPEG into the model's canvas (segcli.pipeline.host.decode: a DCT-reduced decode, then the
    resize), and the device's rate in batches of --batch (segcli.inference.device_decode: one
    decode_jpeg call per batch, nvJPEG on CUDA, then the resize on the device; synchronised).
(b) --predict: predict's engine in this process (after a warm-up run) on the same folders with
    every output, --decode host and --decode device, against the model's own forward pass on
    blank canvases at the same batch size and precision: predict / model is the fraction of the
    model's speed the whole run keeps (issue "at the machine's limit": 0.9 on a GPU).
Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import sample_photos  # benchmarks/ is on sys.path when run as a script

from segcli.inference.device_decode import DeviceDecoder
from segcli.inputs.geometry import Protocol
from segcli.inputs.images import DEFAULT_MAX_PIXELS
from segcli.inputs.jpeg_probe import probe_jpeg
from segcli.pipeline import host

SIZES = {"0.3MP": (640, 480), "2MP": (1728, 1152)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rates(folder: Path, device: torch.device, batch: int, imgsz: int) -> tuple[float, float]:
    """(host core-ms per photo, device photos/s)."""
    files = sorted(folder.glob("*.jpg"))
    plan = host.HostPlan(None, (), 0.5, imgsz, DEFAULT_MAX_PIXELS, folder, folder)
    host.decode(files[0], plan)
    t0 = time.process_time()
    for path in files:
        host.decode(path, plan)
    host_ms = (time.process_time() - t0) / len(files) * 1e3
    blobs = [p.read_bytes() for p in files]
    probes = [probe_jpeg(b, DEFAULT_MAX_PIXELS) for b in blobs]
    decoder = DeviceDecoder(device, imgsz, Protocol())
    decoder.model_pixels(blobs[:batch], probes[:batch])  # warm-up (nvJPEG's handles, allocator)
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(blobs), batch):
        got = decoder.model_pixels(blobs[start:start + batch], probes[start:start + batch])
        assert all(g is not None for g in got)
    sync(device)
    return host_ms, len(blobs) / (time.perf_counter() - t0)


def model_rate(seg, batch: int) -> float:
    """Images/s of the model's forward pass alone on blank canvases (text encoded once)."""
    from segcli.vocabulary.labels import LabelSet

    text = seg.label_embeddings(LabelSet.of_words(["cat", "grass", "sky", "person", "tree", "road", "car", "water"]))
    canvases = np.zeros((batch, seg.imgsz, seg.imgsz, 3), np.uint8)
    for _ in range(3):
        seg.runner.segment_canvases(canvases, text, on_device=True)
    sync(seg.device)
    rounds, t0 = 10, time.perf_counter()
    for _ in range(rounds):
        seg.runner.segment_canvases(canvases, text, on_device=True)
    sync(seg.device)
    return rounds * batch / (time.perf_counter() - t0)


def predict_rate(seg, folder: Path, out: Path, decode: str, batch: int) -> float:
    """Photos/s of predict's engine (every output) on `folder`, after a warm-up run."""
    from segcli.inputs.sources import collect_sources
    from segcli.pipeline.run import PredictRun, RunOptions
    from segcli.vocabulary.labels import parse_labels

    labels = parse_labels("cat,grass,sky,person,tree,road,car,water")
    seconds = []
    for attempt in range(2):
        options = RunOptions(labels=labels, output=out / f"{decode}{attempt}", decode=decode, batch_size=batch)
        run = PredictRun(seg, options, collect_sources([str(folder)]))
        t0 = time.perf_counter()
        result = run.run()
        seconds.append(time.perf_counter() - t0)
        assert result.failed == 0
    return len(result.records) / seconds[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--imgsz", type=int, default=384)
    ap.add_argument("--predict", action="store_true", help="also (b): predict against the model")
    ap.add_argument("--model", default="lseg_vitb16_384")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"{time.strftime('%Y-%m-%d')} {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
          f"{'' if device.type == 'cuda' else 'cores'}), {args.images} JPEGs per size, batches of {args.batch}", flush=True)
    with tempfile.TemporaryDirectory(prefix="segcli-bench-decode-") as tmp:
        folders = {name: sample_photos(Path(tmp) / name, args.images, size) for name, size in SIZES.items()}
        for name, folder in folders.items():
            host_ms, device_rate = decode_rates(folder, device, args.batch, args.imgsz)
            print(f"(a) {name:>6}: host {host_ms:6.1f} core-ms/photo ({1e3 / host_ms:6.0f} photos/s a core); "
                  f"{device}: {device_rate:7.0f} photos/s in batches of {args.batch}", flush=True)
        if args.predict:
            from segcli.inference.segmenter import Segmenter

            seg = Segmenter.from_pretrained(args.model, device=args.device, warn=False)
            batch = seg.find_batch_size()[0] if device.type == "cuda" else 8
            ceiling = model_rate(seg, batch)
            print(f"(b) {args.model} {seg.precision_name} batch {batch}: the model alone {ceiling:.0f} images/s", flush=True)
            for name, folder in folders.items():
                for decode in ("host", "device"):
                    rate = predict_rate(seg, folder, Path(tmp) / "out" / name, decode, batch)
                    print(f"(b) {name:>6} --decode {decode:>6}: {rate:7.1f} photos/s = {rate / ceiling:.2f} x the model",
                          flush=True)


if __name__ == "__main__":
    main()
