"""A hostile corpus through predict, twice: every input ok or failed with its own line, no traceback.

    python benchmarks/check_corpus.py [--count 300] [--model lseg_tiny] [--workdir DIR] [--decode auto]

Makes COUNT files from the sample photos in every format Pillow writes (JPEG with EXIF orientations
1-8, TIFF with orientations 1-8 and its compressions, PNG, WebP, GIF, BMP, 16-bit, CMYK, palette),
then damages a share of them the ways real folders and fuzzers do (truncated, bytes flipped, headers
only, empty, random bytes under an image name, decompression bombs), runs `segcli predict` over the
folder twice and prints what happened: exit codes, ok/failed counts, lines on stderr, tracebacks.
--decode device sends the JPEGs whose headers allow it through the device decoder (on a CPU,
torchvision's libjpeg in the model's process): the same counts are expected as with --decode host.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def variants(photo: Image.Image, rng: random.Random) -> list[tuple[str, bytes]]:
    out = []
    small = photo.resize((rng.randint(40, 400), rng.randint(40, 400)))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        small.save(buf, "JPEG", exif=exif, quality=rng.randint(30, 95), progressive=rng.random() < 0.3)
        out.append((f"jpeg_o{orientation}.jpg", buf.getvalue()))
        buf = io.BytesIO()
        small.save(buf, "TIFF", tiffinfo={274: orientation},
                   compression=rng.choice([None, "tiff_lzw", "tiff_deflate", "jpeg", "packbits"]))
        out.append((f"tiff_o{orientation}.tif", buf.getvalue()))
    for fmt, ext, image in (("PNG", "png", small), ("WEBP", "webp", small), ("GIF", "gif", small.convert("P")),
                            ("BMP", "bmp", small), ("PNG", "png", small.convert("I;16")),
                            ("JPEG", "jpg", small.convert("CMYK")), ("PNG", "png", small.convert("LA")),
                            ("TIFF", "tif", small.convert("1"))):
        buf = io.BytesIO()
        image.save(buf, fmt)
        out.append((f"{fmt.lower()}_{image.mode}.{ext}", buf.getvalue()))
    return out


def damage(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["truncated", "flipped", "header", "empty", "random"])
    if kind == "truncated":
        return kind, data[: rng.randint(1, max(1, len(data) - 1))]
    if kind == "flipped":
        b = bytearray(data)
        for _ in range(rng.randint(1, 50)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "header":
        return kind, data[:64]
    if kind == "empty":
        return kind, b""
    return kind, bytes(rng.randrange(256) for _ in range(rng.randint(10, 5000)))


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")  # 144 MP of zeros in a small file
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--model", default="lseg_tiny")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--decode", default="auto", help="predict's --decode")
    args = parser.parse_args()
    rng = random.Random(0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segcli-corpus-"))
    folder = work / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(p).convert("RGB") for p in sorted((ROOT / "sample_images").glob("*.jpg"))]
    made, kinds = 0, {}
    while made < args.count:
        for name, data in variants(rng.choice(photos), rng):
            if made >= args.count:
                break
            if rng.random() < 0.35:
                kind, data = damage(data, rng)
                kinds[kind] = kinds.get(kind, 0) + 1
                name = f"{kind}_{name}"
            (folder / f"{made:04d}_{name}").write_bytes(data)
            made += 1
    (folder / "bomb.png").write_bytes(bomb())
    print(f"{made + 1} files in {folder}; damaged: {kinds}, plus one 144 MP bomb")
    for attempt in (1, 2):
        run = subprocess.run([sys.executable, "-m", "segcli", "predict", str(folder), "-l", "cat,grass,sky,person",
                              "-m", args.model, "--decode", args.decode, "-o", str(work / "out"), "-q"], capture_output=True, text=True)
        summary = json.loads((work / "out" / "summary.json").read_text())
        lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        print(f"run {attempt}: exit {run.returncode}, {summary['counts']}, {len(lines)} error lines, "
              f"tracebacks: {run.stderr.count('Traceback')}, other stderr lines: "
              f"{sum(1 for line in run.stderr.splitlines() if not line.startswith(('error: ', 'warning: ')))}")


if __name__ == "__main__":
    main()
