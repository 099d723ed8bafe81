"""Do `--postprocess device` and `--decode device` give the host path's results on this device?

    python benchmarks/check_device.py [--device cuda] [--model lseg_vitb16_384] [--speed [PART ...]]
                                      [--no-agreement]

Runs `segcli predict` on sample_images (and the same photos at 2x and 4x, so the label maps are
restored to 1-16 megapixels) twice on the same device, once with the full-size work on the host and
once on the device, and compares: the fraction of mask pixels that differ (interpolation ties;
tests/test_predict_cli.py holds them under 0.1%), whether colors are equal where the masks are, and
the overlays' mean absolute difference (on CUDA the photo is decoded and the overlay encoded by
nvJPEG, on the host by libjpeg). Exit 0 when masks and colors agree.
Random weights: the question is whether both paths compute the same thing, not what they find.
A third run decodes the JPEGs on the device (--decode device); its masks' agreement with the host
decode's is printed, not held to a bound (a full-size decode instead of a reduced one).
--speed then runs, on the same device, what issue "at the machine's limit" asks to measure in one go:
the batch size predict picks there (and the rates behind it), bench_limit.py (peak matmul, the model's
FLOP/s and fraction, fp16/bf16 eager and compiled: CUDA graphs), bench_compile.py (eager against
compiled, alternating rounds), bench_decode.py (nvJPEG batches against the host's decode, and predict
with --decode host and device against the model alone) and corrclip's cost a photo (bench_methods.py);
each prints its table. `--speed decode compile` runs only those parts (a device lease is short);
--no-agreement skips the three predict runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LABELS = "cat,grass,sky,person,tree,road,building,water"
SPEED_PARTS = ("limit", "compile", "decode", "methods")  # benchmarks/bench_PART.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="lseg_vitb16_384")
    ap.add_argument("--speed", nargs="*", choices=SPEED_PARTS, metavar="PART",
                    help=f"then the speed checks (see above): all, or some of {', '.join(SPEED_PARTS)}")
    ap.add_argument("--no-agreement", action="store_true", help="skip the agreement runs (only --speed)")
    args = ap.parse_args()
    agree = True
    if not args.no_agreement:
        agree = agreement(args.device, args.model)
    if args.speed is not None:
        speed(args.device, args.model, args.speed or list(SPEED_PARTS))
    sys.exit(0 if agree else 1)


def agreement(device: str, model: str) -> bool:
    """The three predict runs and their comparison (see above); True when masks and colors agree."""
    with tempfile.TemporaryDirectory(prefix="segcli-check-") as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for path in sorted((ROOT / "sample_images").glob("*.jpg")):
            img = Image.open(path).convert("RGB")
            for scale in (1, 2, 4):
                img.resize((img.width * scale, img.height * scale)).save(photos / f"{path.stem}_x{scale}.jpg", quality=90)
        outs = {}
        runs = {"host": ["--postprocess", "host", "--decode", "host"],
                "device": ["--postprocess", "device", "--decode", "host"],
                "decoded": ["--postprocess", "host", "--decode", "device"]}
        for where, flags in runs.items():
            outs[where] = Path(tmp) / where
            cmd = [sys.executable, "-m", "segcli", "predict", str(photos), "-l", LABELS, "-m", model,
                   "--device", device, *flags, "-o", str(outs[where]), "-q"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{' '.join(flags)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        differ = total = 0
        worst_overlay = 0.0
        colors_equal = True
        for mask_file in sorted(outs["host"].glob("*_mask.png")):
            stem = mask_file.name[:-len("_mask.png")]
            on_host, on_device = (np.array(Image.open(outs[w] / mask_file.name)) for w in ("host", "device"))
            same = on_host == on_device
            differ += int((~same).sum())
            total += same.size
            colors = [np.array(Image.open(outs[w] / f"{stem}_color.png").convert("RGB")) for w in ("host", "device")]
            colors_equal &= bool(np.array_equal(colors[0][same], colors[1][same]))
            overlays = [np.array(Image.open(outs[w] / f"{stem}_overlay.jpg")).astype(np.int16) for w in ("host", "device")]
            worst_overlay = max(worst_overlay, float(np.abs(overlays[0] - overlays[1]).mean()))
            print(f"{stem:>14} {on_host.shape[1]}x{on_host.shape[0]}: {100 * (~same).mean():.4f}% of mask pixels differ")
        print(f"{model} on {device}: {differ} of {total} mask pixels differ ({100 * differ / total:.5f}%); "
              f"colors equal where the masks are: {colors_equal}; overlays' mean |difference| at most {worst_overlay:.2f}")
        # overlays are not held to a bound: on CUDA both the decode (nvJPEG) and the encode differ from libjpeg's
        agree = differ <= total * 1e-3 and colors_equal
        # --decode device: the model's input from a full-size decode on the device instead of the host's
        # reduced one; reported, not held to a bound (random weights: ties flip on small input changes)
        same = [(np.array(Image.open(f)) == np.array(Image.open(outs["decoded"] / f.name))).mean()
                for f in sorted(outs["host"].glob("*_mask.png"))]
        print(f"--decode device against --decode host: {100 * float(np.mean(same)):.3f}% of mask pixels equal "
              f"(worst photo {100 * min(same):.3f}%)")
    return agree


def speed(device: str, model: str, parts: list[str]) -> None:
    """The speed checks, each a script of its own printing its table (failures reported, not fatal)."""
    from segcli.api import Segmenter

    seg = Segmenter.from_pretrained(model, device=device, warn=False)
    size, rates = seg.find_batch_size()
    print(f"batch size predict picks on {device}: {size} (images/s by batch size: {rates})", flush=True)
    bench = ROOT / "benchmarks"
    runs = {"bench_limit.py": ["--model", model, "--device", device, "--batch", str(size), "--precisions", "fp16", "bf16",
                               "fp16+compile", "bf16+compile", "--agreement-steps", "0"],
            "bench_compile.py": ["--model", model, "--device", device, "--batch", str(size), "--precision", "fp16"],
            "bench_decode.py": ["--device", device, "--images", "256", "--predict", "--model", model],
            "bench_methods.py": ["--images", "8", "--labels", "5", "--methods", "naclip", "corrclip"]}  # device: auto
    for script, extra in runs.items():
        if script.removeprefix("bench_").removesuffix(".py") not in parts:
            continue
        proc = subprocess.run([sys.executable, str(bench / script), *extra], cwd=bench)
        if proc.returncode:
            print(f"{script} failed (exit {proc.returncode})", flush=True)

if __name__ == "__main__":
    main()
