"""The options of `segcli predict`, as plain data (no torch import).

`PredictOptions` defines every predict option once: the CLI's options are generated from its fields
(flags, help, bounds and choices in each field's metadata, segcli.options), and the Python API
(`segcli.pipeline.launch.predict`) takes the same record, so both get the same checks and the same
batch-size and compile decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

from segcli.errors import SegcliError
from segcli.inference.device import PRECISIONS
from segcli.models.families import DEFAULT_MODEL
from segcli.options import check_fields, option

# predict's, relabel's and eval's shared wording
SYNONYMS_HELP = ('How a label\'s synonyms ("road;street") are scored: max (each on its own, the label keeps its best: '
                 "the training-free methods' rule, clip-dense's default) or mean (one averaged embedding: LSeg's default).")
BG_THRESHOLD_HELP = ("Pixels whose best label has a probability below this (softmax over the labels, as the training-free "
                     "methods' prob_thd, e.g. 0.1) take the first label: put the background class first.")
SHORT_SIDE_HELP = ("With windows: resize photos so the short side is N (long side at most 2048), as the training-free "
                   "methods' authors do. Default: the model's (clip-dense: 448 clearclip, 336 naclip).")
WINDOW_HELP = ("Slide windows of N pixels over the resized photo and average their logits (0: one padded canvas of "
               "--imgsz). Default: the model's (clip-dense: 448 clearclip, 224 naclip; LSeg: 0).")
STRIDE_HELP = "Window step in pixels. Default: the model's, else half the window."
PROMPT_HELP = ('Prompt template, e.g. "a photo of a {}.", or a named set averaged over its templates: imagenet80 '
               "(CLIP's 80, as ClearCLIP/SCLIP/NACLIP). Default: the model's (imagenet80 for clip-dense, the raw "
               "label for LSeg).")
COMPILE_FROM = 500  # photos from which --compile auto compiles: the minutes it saves outweigh the compile


@dataclass
class PredictOptions:
    """Every option of `segcli predict`, defined once: the CLI is generated from these fields.
    None means the model's own default."""

    labels: str | None = option(None, 'Labels: "road,car,sky", synonyms "road;street", @file.txt, or a named set '
                                      "(ade20k). Default: the labels the checkpoint was trained on.", "--labels", "-l")
    model: str = option(DEFAULT_MODEL, "clip-dense (training-free CLIP ViT-B/16, the default; clip-dense:ARCH or "
                                       "clip-dense:ARCH@TAG for others), naclip, clearclip, proxyclip, corrclip, catseg[:B|:L] "
                                       "(CAT-Seg, trained open-vocabulary), "
                                       "a segcli checkpoint (.safetensors), an "
                                       "LSeg .ckpt, an open_clip weights file, or an architecture name (untrained, for "
                                       "smoke tests).", "--model", "-m")
    output: str | None = option(None, "Output folder, or a URL in object storage (s3://bucket/masks: files uploaded "
                                      "whole as they are made). Default: a new runs/predict/N.", "--output", "-o")
    save: str = option("mask,color,overlay", "Which outputs to write: any of mask,color,overlay,embeddings "
                                             "(NAME_embed.safetensors: the pixel embeddings, for segcli relabel and "
                                             "search).", "--save")
    embed_dtype: str = option("auto", "Stored embeddings' dtype: auto (the 16-bit dtype the model computed in, else "
                                      "float16), float16, bfloat16, float32.", "--embed-dtype",
                              choices=("auto", "float16", "bfloat16", "float32"))
    refine: str = option("auto", "Refine the logits with the photo's colours: pamr (PAMR, as NACLIP), none, or auto "
                                 "(pamr for naclip models).", "--refine", choices=("auto", "pamr", "none"))
    vid_stride: int = option(1, "Videos: process every N-th frame (mask PNGs keep the source frame index).",
                             "--vid-stride", min=1)
    smooth: float = option(0.0, "Videos: blend each frame's logits with the running average of the frames before "
                                "(0 = off; 0.5 halves flicker).", "--smooth", min=0.0, max=0.99)
    embed_stride: int | None = option(None, "Store embeddings average-pooled to this stride in input pixels (a "
                                            "multiple of the model's output stride; default: that stride).",
                                      "--embed-stride", min=1)
    alpha: float = option(0.5, "Overlay opacity of the colors.", "--alpha", min=0.0, max=1.0)
    prompt: str | None = option(None, PROMPT_HELP, "--prompt")
    synonyms: str | None = option(None, SYNONYMS_HELP, "--synonyms", choices=("max", "mean"))
    bg_threshold: float | None = option(None, BG_THRESHOLD_HELP, "--bg-threshold", min=0.0, max=1.0)
    imgsz: int | None = option(None, "One canvas's long side (a multiple of 32 for LSeg, of the patch size for "
                                     "clip-dense; clip-dense uses it with --window 0). Default: the model's (LSeg 384, "
                                     "clip-dense 448).", "--imgsz", min=1)
    batch_size: int | None = option(None, "Images (or windows) per forward pass. Default: 8 on a CPU; on a GPU the "
                                          "size at which the model's throughput stops rising, measured before the "
                                          "run (a few seconds).", "--batch-size", "-b", min=1)
    short_side: int | None = option(None, SHORT_SIDE_HELP, "--short-side", min=1)
    window: int | None = option(None, WINDOW_HELP, "--window", min=0)
    stride: int | None = option(None, STRIDE_HELP, "--stride", min=1)
    workers: int | None = option(None, "Worker processes for decoding, label maps, rendering and writing (each uses "
                                       "one core). Default: 2 with the model on the CPU, all cores but one (at most "
                                       "16) on a GPU.", "--workers", "-j", min=1)
    postprocess: str = option("host", "Where the full-size work (label map, colors, overlay) runs: host (the worker "
                                      "processes; auto means the same), device (torch on the model's device).",
                              "--postprocess", choices=("host", "auto", "device"))
    decode: str = option("auto", "Where plain JPEGs are decoded and resized for the model: host (the worker "
                                 "processes), device (in batches on the model's device: nvJPEG on CUDA; other files, "
                                 "progressive and CMYK JPEGs stay on the host), auto: device on a GPU, host "
                                 "elsewhere.", "--decode", choices=("auto", "host", "device"))
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.", "--device")
    precision: str = option("auto", "auto (fp16 on CUDA, bf16 on CPUs with native bf16), fp32, bf16, fp16, or int8 "
                                    "(CPU: the image branch's linear layers in dynamic int8).", "--precision",
                            choices=PRECISIONS)
    overwrite: bool = option(False, "Redo every image, replacing results made with other settings.", "--overwrite")
    max_pixels: int = option(100_000_000, "Refuse larger images (decompression bombs).", "--max-pixels", min=1)
    compile: str = option("auto", "on: compile the image branch first (torch.compile; on a CPU with frozen, "
                                  f"prepacked weights); auto: on from {COMPILE_FROM} photos for PyTorch models, and "
                                  "if compiling fails the run goes on uncompiled; off. See the docs' performance "
                                  "page for what it gains.", "--compile", choices=("auto", "on", "off"))
    engine: str = option("local", "local: this machine's processes; ray: Ray Data over the cluster RAY_ADDRESS names "
                                  "(else a local Ray): decoding and writing in CPU tasks, the model in an actor pool, "
                                  "one GPU per actor where there are GPUs (pip install 'segcli[ray]').", "--engine",
                         choices=("local", "ray"))
    shard: str | None = option(None, "I/N: take a deterministic 1/N of the sorted inputs (shards 0..N-1 into one "
                                     "--output, then --merge-summaries). Under torchrun: the rank.", "--shard")

    def validate(self) -> None:
        """Check every option that needs no model and no inputs (one line naming the option), so a
        typo costs no waiting."""
        check_fields(self)
        if self.engine == "ray" and self.decode == "device":
            raise SegcliError("--engine ray decodes in Ray's CPU tasks: --decode device is for --engine local")
        if self.shard is not None:
            from segcli.inputs.sources import parse_shard

            parse_shard(self.shard)
        from segcli.postprocess.outputs import parse_outputs

        parse_outputs(self.save)
