"""What the training-free methods and options cost: images/s of `segcli predict` on this machine.

    python benchmarks/bench_methods.py [--images 8] [--labels 5 150] [--methods clearclip naclip proxyclip corrclip]

A random-weights CLIP ViT-B/16 (open_clip's architecture, no download) saved as an open_clip weights
file, read as `clearclip:FILE` and `naclip:FILE` (proxyclip: with a random-weights DINO ViT-B/8, timm's
architecture, as a segcli checkpoint; corrclip: the same DINO as a file and a random-weights EoMT-L at
640, transformers' COCO-panoptic architecture, as its region-mask generator; catseg: CAT-Seg (B) at its
published sizes, saved as the authors' release), 640x480 JPEGs, mask only; each row: one 448
canvas (--window 0) or the method's own sliding windows (clearclip: 448 windows every 224 over a
448 short side; naclip: 224 every 112 over 336), with and without PAMR (--refine) and the
80-template prompt ensemble (--prompt imagenet80, whose cost is the text tower's, once per run:
shown as start-up seconds). The last row of each method is its default. Start-up is excluded from
images/s by timing two folder sizes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, sample_photos  # benchmarks/ is on sys.path when run as a script


def timed_predict(*args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one `segcli predict ARGS -q` in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "predict", *args, "-q"], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"predict failed: {args}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def corrclip_files(clip, tmp: Path) -> str:
    """`corrclip:CLIP_FILE,DINO_FILE,EOMT_FOLDER` of random weights at the published sizes."""
    import timm
    import torch
    from safetensors.torch import save_file
    from transformers import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor

    dino = timm.create_model("vit_base_patch8_224.dino", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(tmp / "dino.safetensors"))
    torch.manual_seed(0)
    # EoMT-L on COCO panoptic at 640 (tue-mps/coco_panoptic_eomt_large_640's sizes)
    eomt = EomtForUniversalSegmentation(EomtConfig(num_labels=133, num_queries=200, image_size=640)).eval()
    eomt.save_pretrained(tmp / "eomt", safe_serialization=True)
    EomtImageProcessor(size={"shortest_edge": 640, "longest_edge": 640}, do_pad=True).save_pretrained(tmp / "eomt")
    return f"corrclip:{tmp / 'open_clip_model.safetensors'},{tmp / 'dino.safetensors'},{tmp / 'eomt'}"


def catseg_file(tmp: Path) -> str:
    """`catseg:FILE`: CAT-Seg (B) at its published sizes (CLIP ViT-B/16 at 384, its aggregator), random
    weights, saved as the authors' release is (detectron2's {"model": state dict})."""
    import torch

    from segcli.modeling.catseg import CATSeg
    from segcli.modeling.configs import CATSEG_VARIANTS
    from segcli.models.catseg_weights import authors_layout

    torch.manual_seed(0)
    model = CATSeg(CATSEG_VARIANTS["B"]).eval()
    torch.save({"model": authors_layout(model)}, tmp / "model_base.pth")
    return f"catseg:{tmp / 'model_base.pth'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--labels", type=int, nargs="+", default=[5, 150])
    ap.add_argument("--methods", nargs="+", default=["clearclip", "naclip", "proxyclip", "corrclip", "catseg"])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--defaults-only", action="store_true", help="only each method's default row (its last)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-methods-"))
    try:
        import open_clip
        import torch
        from safetensors.torch import save_file

        from segcli.vocabulary.labels import named_label_set

        torch.manual_seed(0)
        clip = open_clip.create_model("ViT-B-16", pretrained=None)
        weights = tmp / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
        models = {"clearclip": f"clearclip:{weights}", "naclip": f"naclip:{weights}"}
        if "proxyclip" in args.methods:
            import timm

            from segcli.models.checkpoint import save_checkpoint
            from segcli.models.clip_weights import clip_dense_from_clip_state

            dino = timm.create_model("vit_base_patch8_224.dino", pretrained=False, num_classes=0)
            proxy = clip_dense_from_clip_state(clip.state_dict(), "proxyclip:random", method="proxyclip",
                                               proxy_state=dino.state_dict())
            models["proxyclip"] = str(save_checkpoint(proxy, tmp / "proxyclip.safetensors"))
        if "corrclip" in args.methods:
            models["corrclip"] = corrclip_files(clip, tmp)
        if "catseg" in args.methods:
            models["catseg"] = catseg_file(tmp)
        small, big = sample_photos(tmp / "small", max(1, args.images // 4)), sample_photos(tmp / "big", args.images)
        names = list(named_label_set("ade20k").names)
        print(f"random-weights CLIP ViT-B/16, 640x480 JPEGs, mask only, {os.cpu_count()} CPU cores")
        print("| method | input | refine | prompt | K | img/s | start-up s | peak RSS MB |")
        print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
        photo = "a photo of a {}."
        rows = (("clearclip", "canvas", "none", photo), ("clearclip", "windows", "none", photo),
                ("clearclip", "windows", "none", "imagenet80"),
                ("naclip", "canvas", "none", photo), ("naclip", "windows", "none", photo),
                ("naclip", "windows", "pamr", photo), ("naclip", "windows", "pamr", "imagenet80"),
                ("proxyclip", "windows", "none", photo), ("proxyclip", "windows", "none", "imagenet80"),
                ("corrclip", "windows", "none", photo), ("corrclip", "windows", "none", "imagenet80"),
                ("catseg", "windows", "none", "A photo of a {} in the scene"))
        rows = tuple(r for r in rows if r[0] in args.methods)
        if args.defaults_only:
            rows = tuple(r for i, r in enumerate(rows) if i + 1 == len(rows) or rows[i + 1][0] != r[0])
        for k in args.labels:
            labels = ",".join(names[:k])
            for method, where, refine, prompt in rows:
                common = ["-m", models[method], "-l", labels, "--save", "mask", "--refine", refine, "--prompt", prompt,
                          "--device", args.device]
                common += ["--window", "0", "--imgsz", "448"] if where == "canvas" else []
                t = {n: timed_predict(str(folder), *common, "-o", str(tmp / f"out_{method}_{where}_{refine}_{prompt}_{k}_{n}"))
                     for n, folder in ((args.images // 4 or 1, small), (args.images, big))}
                (n0, (t0, _)), (n1, (t1, rss)) = sorted(t.items())
                rate = (n1 - n0) / (t1 - t0)
                shown = "448 canvas" if where == "canvas" else "its windows"
                print(f"| {method} | {shown} | {refine} | {prompt} | {k} | {rate:.2f} | {t0 - n0 / rate:.1f} | {rss:.0f} |",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
