"""Predict throughput and memory: segcli against the model's own ceiling, a naive loop and CLIPSeg.

    python benchmarks/bench_predict.py [--model lseg_vitb16_384] [--labels 1 5 20 150] [--images 64]
                                       [--device cpu] [--no-clipseg] [--memory]

Random weights throughout (speed does not depend on their values), same machine, same resolution:
(a) ceiling: the model's forward pass alone on pre-made tensors (batch, precision as predict uses);
(b) predict's engine as `segcli predict` runs it, on a folder of JPEGs of mixed sizes made from
    sample_images, writing masks, colors and overlays; timed in its process after a warm-up run, so
    start-up (imports, model construction) is left out;
(c) naive: one image at a time, text re-encoded for every image, fp32, decoding in the main thread,
    full-size K-channel upsampling, as LSeg's own scripts run;
(d) Hugging Face transformers' CLIPSeg (default config, 352x352), one pass per label, fp32.
(e) the host ceiling: `segcli predict`'s pipeline with a stand-in model that costs next to nothing
    (a colour probe with LSeg's output stride 2 at 384, so label maps have real boundaries), on JPEGs
    of 0.3, 2 and 12 MP: the machine's CPU time (user + sys, /proc/stat, so worker processes count)
    during the run per photo, the workers' start-up subtracted by two folder sizes, images/s with
    --workers 1 and 2 (or --host-workers), and the codec floor (decode + the encodes alone, the
    fastest of Pillow/OpenCV, one core) measured in the same run; then what a 16- or 32-core host
    can feed.
Every part runs in its own process; peak RSS is that process's. `--memory` adds the memory checks:
1,000 vs 10 images, and a 24-megapixel photo with 150 labels. `--host-only` runs (e) alone.
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
from common import ROOT, sample_photos  # benchmarks/ is on sys.path when run as a script
from PIL import Image


def make_folder(folder: Path, n: int, scales=(0.75, 1.0, 1.5, 2.0)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((ROOT / "sample_images").glob("*.jpg"))
    for i in range(n):
        img = Image.open(photos[i % len(photos)]).convert("RGB")
        scale = scales[i % len(scales)]
        img.resize((int(img.width * scale), int(img.height * scale))).save(folder / f"img{i:04d}.jpg", quality=90)
    return folder


def label_names(k: int) -> list[str]:
    from segcli.vocabulary.labels import named_label_set

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
    from segcli.vocabulary.labels import LabelSet

    seg = Segmenter.from_pretrained(args.model, device=args.device, imgsz=args.imgsz, warn=False)
    text = seg.label_embeddings(LabelSet.from_synonyms([[n] for n in label_names(args.k)]))
    pixels = np.random.randint(0, 255, (args.batch_size, seg.imgsz, seg.imgsz, 3), dtype=np.uint8)
    for _ in range(2):  # warm-up: oneDNN (cuDNN) picks its kernels on the first calls
        seg.runner.segment_canvases(pixels, text)
    iters, t0 = 0, time.perf_counter()
    # at least 5 batches and 2 s: on a GPU 5 batches take ~0.1 s, too short to time
    while iters < 5 or time.perf_counter() - t0 < 2.0:
        seg.runner.segment_canvases(pixels, text)  # returns the logits on the host: the device has finished
        iters += 1
    return {"images_per_s": args.batch_size * iters / (time.perf_counter() - t0)}


def part_predict(args) -> dict:
    """(b): predict's engine as `segcli predict` runs it (Segmenter.from_pretrained, PredictRun with
    the CLI's defaults), in this process: a warm-up run on the folder's first photos (kernel choice,
    the fork server, the workers' compiled loops), then the whole folder, timed. Start-up is left
    out exactly; two folder sizes through the CLI left out too little on a GPU, where model start-up
    varied by more than a run of 1,000 photos takes."""
    from segcli.api import Segmenter
    from segcli.inputs.sources import collect_sources
    from segcli.pipeline.run import PredictRun, RunOptions
    from segcli.vocabulary.labels import LabelSet

    seg = Segmenter.from_pretrained(args.model, device=args.device, imgsz=args.imgsz, warn=False)
    labels = seg.resolve_labels(LabelSet.from_synonyms([[n] for n in label_names(args.k)]))
    files = sorted(Path(args.folder).glob("*.jpg"))

    def run(paths: list[Path], out: Path) -> None:
        opts = RunOptions(labels=labels, output=out, save=tuple(args.save.split(",")), batch_size=args.batch_size,
                              postprocess=args.postprocess)
        result = PredictRun(seg, opts, collect_sources([str(p) for p in paths])).run()
        assert result.failed == 0 and len(result.records) == len(paths)

    run(files[:args.batch_size * 2], Path(args.out) / "warm-up")
    t0 = time.perf_counter()
    run(files, Path(args.out) / "timed")
    return {"images_per_s": len(files) / (time.perf_counter() - t0)}


def part_naive(args) -> dict:
    import torch
    import torch.nn.functional as F

    from segcli.modeling.pixel_text import embed_labels
    from segcli.models.factory import load_model
    from segcli.postprocess.render import palette_array
    from segcli.vocabulary.labels import LabelSet

    device = torch.device(args.device)
    model = load_model(args.model, device).backend
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

    from segcli.postprocess.render import palette_array
    from segcli.vocabulary.labels import LabelSet

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


class ColorProbe:
    """(e)'s stand-in model (a segcli.modeling.backend.DenseBackend): logits = cosine of the mean colour of
    8x8 cells with K fixed colours, brought to LSeg's output stride 2 bilinearly (LSeg's stride-2 map
    is likewise upsampled from coarser ViT tokens). Costs ~2 ms per image on one core; its label
    maps have real boundaries, so restoring them to full size costs what it costs with a real model."""

    architecture, open_vocabulary, baked_labels, fixed_imgsz = "color-probe", True, None, None
    default_imgsz, input_multiple, output_stride, default_prompt = 384, 32, 2, None
    region_generator = None

    @property
    def capabilities(self):
        from segcli.modeling.backend import Capabilities

        return Capabilities(family="color-probe", provides_embeddings=False, exportable=False,
                            limits="a benchmark's stand-in model")

    def __init__(self):
        import torch

        self.prototypes = torch.nn.functional.normalize(torch.randn(256, 3, generator=torch.Generator().manual_seed(0)), dim=1)

    def to(self, device):
        return self

    def eval(self):
        return self

    def label_embeddings(self, labels, prompt=None):
        return self.prototypes[:len(labels)]

    def dense_logits(self, images, label_embeddings, autocast_dtype=None, return_embeddings=False):
        import torch
        import torch.nn.functional as F

        cells = F.normalize(F.avg_pool2d(images, 8) - 0.5, dim=1)
        logits = torch.einsum("bchw,kc->bkhw", cells, label_embeddings) * 20.0
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False), None


def part_host(args) -> dict:
    """One `segcli predict` run (the engine, in this process) with the ColorProbe stand-in."""
    import cv2
    import torch

    from segcli.api import Segmenter
    from segcli.inputs.sources import collect_sources
    from segcli.pipeline.run import PredictRun, RunOptions
    from segcli.vocabulary.labels import LabelSet

    torch.set_num_threads(1)  # the stand-in is tiny: a second thread only adds hand-offs (a GPU host runs it there)
    seg = Segmenter(ColorProbe(), device="cpu", precision="fp32", imgsz=384, name="color-probe")
    labels = LabelSet.from_synonyms([[n] for n in label_names(args.k)])
    save = tuple(args.save.split(","))
    opts = RunOptions(labels=labels, output=Path(args.out), save=save, batch_size=args.batch_size, workers=args.workers)
    sources = collect_sources([args.folder])
    class TimedRun(PredictRun):
        """predict's run, adding up the main process's CPU time in the model stage (the stand-in,
        its input, the candidate selection), which a GPU host's device does instead."""
        model_stage_s = 0.0

        def infer(self, batch, text):
            start = process_cpu_seconds()
            jobs = super().infer(batch, text)
            self.model_stage_s += process_cpu_seconds() - start
            return jobs

    cpu0, t0, main0 = machine_cpu_seconds(), time.perf_counter(), process_cpu_seconds()  # the run alone, not imports
    run = TimedRun(seg, opts, sources)
    result = run.run()
    wall, cpu, main = time.perf_counter() - t0, machine_cpu_seconds() - cpu0, process_cpu_seconds() - main0
    assert result.failed == 0
    return {"images": len(result.records), "wall_s": wall, "cpu_s": cpu, "main_s": main - run.model_stage_s,
            "model_stage_s": run.model_stage_s, "cv2_threads": cv2.getNumThreads()}


def process_cpu_seconds() -> float:
    """CPU time of this process (all its threads): predict's main process, which runs the model and
    hands every photo on; on a GPU host its time per photo caps the photos/s, whatever the cores."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


PARTS = {"ceiling": part_ceiling, "predict": part_predict, "naive": part_naive, "clipseg": part_clipseg, "host": part_host}

HOST_SIZES = {"0.3 MP": ((640, 480), 32, 160), "2 MP": ((1920, 1080), 16, 64), "12 MP": ((4000, 3000), 4, 20)}


def machine_cpu_seconds() -> float:
    """CPU time (user + nice + sys + irq) spent by the whole machine so far, from /proc/stat: it counts
    predict's worker processes too, which are the forkserver's children, not the measured process's."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_host_part(cmd: list[str]) -> tuple[float, float, float, float]:
    """(wall seconds, machine CPU seconds, main-process CPU seconds besides the model stage, the model
    stage's CPU seconds) of one predict run, as the child measured them around the run."""
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}  # as segcli's CLI sets it
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["wall_s"], got["cpu_s"], got["main_s"], got["model_stage_s"]


def codec_floor(folder: Path, masks: Path, mask_only: bool) -> float:
    """ms on one core: the fastest decode, mask PNG, palette PNG, JPEG q90 and blend of Pillow/OpenCV."""
    import io

    import cv2

    cv2.setNumThreads(1)

    def best(*fns, n=3):
        times = []
        for fn in fns:
            fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t0) / n * 1000)
        return min(times)

    data = sorted(folder.glob("*.jpg"))[0].read_bytes()
    mask = np.array(Image.open(next(masks.glob("p000_mask.png"))))
    palette = np.random.default_rng(0).integers(0, 255, (256, 3), dtype=np.uint8)

    def pil_png(img, level=1):
        Image.fromarray(img).save(io.BytesIO(), "PNG", compress_level=level) if not isinstance(img, Image.Image) else \
            img.save(io.BytesIO(), "PNG", compress_level=level)

    def pil_draft():
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (img.width // 8, img.height // 8))
        img.load()

    fast_png = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):
        fast_png += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    mask_png = best(lambda: pil_png(mask), lambda: cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1]),
                    lambda: cv2.imencode(".png", mask, fast_png))
    if mask_only:
        return best(pil_draft) + mask_png
    photo = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    decode = best(lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                  lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    indexed = Image.fromarray(mask)
    indexed.putpalette(palette.tobytes())
    color_png = best(lambda: pil_png(indexed))
    color = photo.copy()
    jpeg = best(lambda: cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90]),
                lambda: Image.fromarray(photo).save(io.BytesIO(), "JPEG", quality=90))
    blend = best(lambda: cv2.addWeighted(photo, 0.5, color, 0.5, 0.0))
    return decode + mask_png + color_png + jpeg + blend


def host_ceiling(args, tmp: Path, model_images_per_s: float | None) -> None:
    counts = args.host_workers
    first, last = counts[0], counts[-1]
    more = max(1, last // 2)  # more photos with more workers, so that each still gets several
    print(f"\n(e) host ceiling: predict with a stand-in model that costs ~nothing (stride 2 at 384, "
          f"K={args.host_k}), JPEG q90, {os.cpu_count()} cores, median of {args.host_repeat} runs")
    print("| photo | outputs | core-ms/photo | without the model stage | codec floor core-ms | ratio | "
          + " | ".join(f"img/s -j {w}" for w in counts) + f" | -j{last}/-j{first} | main process ms/photo besides the model stage |")
    print("| --- | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in counts) + " | ---: | ---: |")
    per_photo = {}
    for label, (size, small, large) in HOST_SIZES.items():
        small, large = small * more, large * more
        photos = {n: sample_photos(tmp / f"host_{size[0]}_{n}", n, size) for n in (small, large)}
        for save in ("mask,color,overlay", "mask"):
            trials = []  # per repetition: core-ms, main-process ms, model-stage ms (-j last), then img/s per -j
            for _ in range(args.host_repeat):
                wall, cpu, main, model = {}, {}, {}, {}
                for workers in counts:
                    for n, folder in photos.items():
                        out = tmp / f"host_out_{size[0]}_{n}_{workers}_{save.count(',')}"
                        shutil.rmtree(out, ignore_errors=True)
                        cmd = [sys.executable, __file__, "--part", "host", "--k", str(args.host_k), "--folder",
                               str(folder), "--out", str(out), "--save", save, "--workers", str(workers)]
                        wall[workers, n], cpu[workers, n], main[workers, n], model[workers, n] = run_host_part(cmd)
                costs = [(d[last, large] - d[last, small]) / (large - small) * 1000 for d in (cpu, main, model)]
                trials.append(costs + [(large - small) / (wall[w, large] - wall[w, small]) for w in counts])
            # the median of each number over the repetitions: one pair of runs on a shared VM varies by ±15%
            core_ms, main_ms, model_ms, *rates = (float(np.median(column)) for column in zip(*trials))
            # model_ms: the stand-in model, its input and the candidate ranking: on a GPU host the device's work
            floor = codec_floor(photos[small], tmp / f"host_out_{size[0]}_{small}_{last}_{save.count(',')}", save == "mask")
            name = "all three" if "," in save else "mask only"
            per_photo[label, name] = core_ms, main_ms
            print(f"| {label} | {name} | {core_ms:.1f} | {core_ms - model_ms:.1f} | {floor:.1f} | {core_ms / floor:.2f} | "
                  + " | ".join(f"{r:.1f}" for r in rates) + f" | {rates[-1] / rates[0]:.2f} | {main_ms:.2f} |", flush=True)
    model = f"{model_images_per_s:.1f} img/s for {args.model} here ({args.device})" if model_images_per_s else ""
    for n in (16, 32):  # the workers' cores, or the main process's one, whichever runs out first
        feeds = ", ".join(f"{label} {min(n * 1000 / per_photo[label, 'all three'][0], 1000 / per_photo[label, 'all three'][1]):.0f}"
                          for label in HOST_SIZES)
        print(f"a host with {n} cores feeds (all three outputs) photos/s: {feeds}" + (f"; the model itself: {model}" if model else ""))


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
           "--postprocess", args.postprocess, "-q", *extra]
    seconds, rss, _ = run_measured(cmd)
    return seconds, rss


def end_to_end(args, k: int, tmp: Path) -> tuple[float, float]:
    folder = tmp / "photos"
    if not folder.exists():
        make_folder(folder, args.images)
    got, rss = child("predict", args, k, folder=folder, out=tmp / f"out{k}", postprocess=args.postprocess)
    return got["images_per_s"], rss


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
    ap.add_argument("--host-only", action="store_true", help="run only (e), the host ceiling")
    ap.add_argument("--no-host", action="store_true", help="skip (e)")
    ap.add_argument("--host-k", type=int, default=8, help="labels for (e)")
    ap.add_argument("--host-repeat", type=int, default=3, help="(e): runs of each case; the median is printed")
    ap.add_argument("--host-workers", type=int, nargs="+", default=[1, 2],
                    help="(e): the --workers values to time (e.g. 1 4 15 on a 16-core GPU host; the folders grow with the last)")
    ap.add_argument("--postprocess", default="auto", help="predict's --postprocess for (b): auto, host or device")
    ap.add_argument("--save", default="mask,color,overlay", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
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
    if args.host_only:
        try:
            host_ceiling(args, tmp, None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    print(f"model {args.model}, imgsz {args.imgsz}, batch {args.batch_size}, device {args.device} "
          f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), postprocess {args.postprocess}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} photos")
    print("| K | (a) ceiling img/s | (b) predict img/s | (c) naive img/s | (d) CLIPSeg img/s | b/a | b/c | b/d "
          "| peak RSS a / b / c / d (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    model_rate = None
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
            model_rate = model_rate or a
            print(f"| {k} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} | {b / a:.2f} | {b / c:.2f} | {b / d:.2f} "
                  f"| {rss_a:.0f} / {rss_b:.0f} / {rss_c:.0f} / {rss_d:.0f} |", flush=True)
        if not args.no_host:
            host_ceiling(args, tmp, model_rate)
        if args.memory:
            memory_checks(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
