"""What the benchmarks share: the repository root, photos cut from sample_images, a timed predict."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def sample_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> Path:
    """`folder` with n JPEGs (q90, p000.jpg ...) of `size`, cut from the sample photos (cover crop),
    each round through the samples zoomed 10% further, so no two photos are the same."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "sample_images").glob("*.jpg"))
    w, h = size
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("RGB")
        scale = max(w / img.width, h / img.height) * (1 + 0.1 * (i // len(sources)))
        # the source region that becomes the photo, resized alone: resizing the whole zoomed
        # source first made the 60th round of a large folder cost 50x the first
        cw, ch = min(w / scale, img.width), min(h / scale, img.height)  # min: float rounding at zoom 1
        box = ((img.width - cw) / 2, (img.height - ch) / 2, (img.width + cw) / 2, (img.height + ch) / 2)
        img.resize((w, h), Image.BICUBIC, box=box).save(folder / f"p{i:03d}.jpg", quality=90)
    return folder


def timed_predict(*args: str) -> float:
    """Wall seconds of one `segcli predict ARGS -q` in its own process (start-up included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segcli", "predict", *args, "-q"], cwd=ROOT, check=True)
    return time.perf_counter() - t0
