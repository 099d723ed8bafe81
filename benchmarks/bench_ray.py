"""What `--engine ray` costs against the local engine on this machine: the same photos, the same model.

    python benchmarks/bench_ray.py [--images 8 32] [--model lseg_tiny]

Each engine runs two folder sizes in a fresh process (a local Ray started by the run itself, as
`segcli predict --engine ray` does without RAY_ADDRESS); the slope between them is the per-photo cost,
start-up excluded. 640x480 JPEGs, all outputs (mask, color, overlay). With a model that costs next to
nothing, the difference per photo is the engine's own overhead (serialising the stages' data between
Ray workers, scheduling); start-up is mostly Ray's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from common import sample_photos, timed_predict  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs=2, default=[8, 32])
    ap.add_argument("--model", default="lseg_tiny")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-ray-"))
    try:
        small, big = args.images
        folders = {n: sample_photos(tmp / f"in{n}", n) for n in (small, big)}
        print(f"model {args.model}, 640x480 JPEGs, mask+color+overlay, {os.cpu_count()} CPU cores")
        print("| engine | s/photo | start-up s |")
        print("| --- | ---: | ---: |")
        for engine in ("local", "ray"):
            t = {n: timed_predict(str(folders[n]), "-m", args.model, "-l", "cat,grass,sky,person", "--engine", engine,
                                  "-o", str(tmp / f"out_{engine}_{n}")) for n in (small, big)}
            per = (t[big] - t[small]) / (big - small)
            print(f"| {engine} | {per:.3f} | {t[small] - small * per:.1f} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
