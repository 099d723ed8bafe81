"""Train lseg_tiny on synthetic scenes on this machine and report what a user would see.

Runs the commands of the README: `segcli data synth`, `segcli train --data folder:... --model lseg_tiny
--crop 128 --time-limit M`, `segcli eval` on best.safetensors and `segcli predict` on the validation
images (scored against the ground truth). Prints validation mIoU (reported by training, by eval and
by predict's masks), wall time and training images/s.

    python benchmarks/bench_train.py [--minutes 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segcli.evaluation.metrics import ConfusionMatrix


def segcli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "segcli", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"segcli {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segcli-bench-train-"))
    data, run, pred = work / "synthetic", work / "run", work / "pred"
    segcli("data", "synth", str(data))
    started = time.perf_counter()
    segcli("train", "--data", f"folder:{data}", "--model", "lseg_tiny", "--crop", "128",
           "--time-limit", str(args.minutes), "-o", str(run), "-q")
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    evals = [r["eval"] for r in log if "eval" in r]
    best = max(evals, key=lambda e: e["mIoU"])
    ips = np.median([r["images_per_s"] for r in steps[1:]]) if len(steps) > 1 else float("nan")
    evaluated = json.loads(segcli("eval", "--model", str(run / "best.safetensors"), "--data", f"folder:{data}", "--json"))
    segcli("predict", str(data / "val/images"), "--model", str(run / "best.safetensors"), "-o", str(pred), "--save", "mask", "-q")
    cm = ConfusionMatrix(len(evaluated["per_class"]))
    for mask in sorted((data / "val/masks").glob("*.png")):
        cm.update(np.array(Image.open(mask)), np.array(Image.open(pred / f"{mask.stem}_mask.png")))
    print("| time limit | steps | train img/s (median) | wall time | val mIoU (train) | (eval) | (predict masks) | pixAcc |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.minutes:g} min | {evals[-1]['step']} | {ips:.1f} | {wall / 60:.1f} min | "
          f"{best['mIoU']:.4f} | {evaluated['mIoU']:.4f} | {cm.summary()['mIoU']:.4f} | {evaluated['pixAcc']:.4f} |")
    print("validation curve (step: mIoU): " + ", ".join(f"{e['step']}: {e['mIoU']:.3f}" for e in evals))
    print(f"run folder: {run}")


if __name__ == "__main__":
    main()
