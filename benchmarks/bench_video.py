"""Video through predict: frames/s of a 720p video against the same frames as JPEG photos.

    python benchmarks/bench_video.py [--frames 240] [--model lseg_tiny] [--imgsz 128]

A 720p H.264 video (a pan across a sample photo, encoded here) and its frames saved as JPEG (q90)
go through `segcli predict` with the same model, labels and outputs (mask, color, overlay; for the
video: the masks folder and two H.264 videos). Start-up is excluded by timing two lengths. Also:
PyAV's decode alone (frames/s, threaded), so one can see whether decoding is the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, timed_predict  # benchmarks/ is on sys.path when run as a script
from PIL import Image

LABELS = "road,car,sky,person,tree,building,grass,water"


def make_video(path: Path, frames: int, size=(1280, 720), rate=30) -> Path:
    import av

    w, h = size
    base = np.array(Image.open(ROOT / "sample_images" / "astronaut.jpg").convert("RGB").resize((w + 2 * frames, h)))
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for i in range(frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, 2 * i:2 * i + w]), format="rgb24")):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    return path


def decode_rate(path: Path) -> float:
    import av

    t0 = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        n = sum(1 for _ in container.decode(stream))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--model", default="lseg_tiny")
    ap.add_argument("--imgsz", type=int, default=128)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-video-"))
    try:
        import av

        lengths = (args.frames // 4, args.frames)
        rates = {}
        for n in lengths:
            (tmp / f"v{n}").mkdir()
            video = make_video(tmp / f"v{n}" / "clip.mp4", n)
            frames = tmp / f"f{n}"
            frames.mkdir()
            with av.open(str(video)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    frame.to_image().save(frames / f"{i:06d}.jpg", quality=90)
            common = ["-m", args.model, "-l", LABELS, "--imgsz", str(args.imgsz)]
            rates["video", n] = timed_predict(str(video), *common, "-o", str(tmp / f"ov{n}"))
            rates["jpeg", n] = timed_predict(str(frames), *common, "-o", str(tmp / f"oj{n}"))
        per = {k: (lengths[1] - lengths[0]) / (rates[k, lengths[1]] - rates[k, lengths[0]]) for k in ("video", "jpeg")}
        decode = decode_rate(tmp / f"v{lengths[1]}" / "clip.mp4")
        print(f"720p, {args.model} at --imgsz {args.imgsz}, mask + color + overlay, {os.cpu_count()} CPU cores")
        print("| input | frames/s |")
        print("| --- | ---: |")
        print(f"| the video (H.264, {args.frames} frames) | {per['video']:.1f} |")
        print(f"| the same frames as JPEG photos | {per['jpeg']:.1f} |")
        print(f"| PyAV decode alone | {decode:.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
