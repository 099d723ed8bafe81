"""One way to name a model: every --model value resolves to a ModelSpec, then loads.

As open_clip's and timm's `create_model`: `resolve_model(spec)` says what a value means (kind,
family, architecture, where the weights come from, whether loading may download) reading at most a
file header, so `segcli info` can show it without loading or downloading anything;
`load_model(spec, device)` builds the backend that predict, eval, export, convert and train use.

Kinds of --model value:
- hub:          clip-dense[:ARCH[@TAG]] - open_clip weights from the Hugging Face hub, cached
- checkpoint:   a segcli .safetensors file (any family, recorded in its metadata)
- weights:      foreign weights a family maps (an official LSeg .ckpt, open_clip CLIP weights)
- onnx:         a `segcli export` .onnx file with its JSON sidecar
- architecture: a registered name, built with random (seeded) weights
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from segcli.errors import SegcliError
from segcli.modeling.configs import ARCHITECTURES, CATSEG_PROTOCOL, CATSEG_VARIANTS, CLIP_DENSE_METHODS, DEFAULT_CLIP_DENSE_METHOD
from segcli.models.families import DEFAULT_MODEL, FAMILIES

if TYPE_CHECKING:
    import torch

    from segcli.modeling.backend import DenseBackend
    from segcli.vocabulary.labels import LabelSet

KIND_TEXT = {
    "hub": "training-free weights from the Hugging Face hub",
    "checkpoint": "a segcli checkpoint",
    "weights": "foreign weights (converted when loaded)",
    "onnx": "an ONNX export",
    "architecture": "an untrained architecture (random weights)",
}
UNTRAINED_WARNING = ("{name} is an untrained architecture with random weights: its masks are meaningless "
                     "(fine for smoke tests and speed measurements; pass a checkpoint for real results)")


@dataclass(frozen=True)
class ModelSpec:
    """What a --model value means, known without loading weights or downloading."""

    spec: str  # as the user gave it
    kind: str  # a key of KIND_TEXT
    family: str | None  # a key of FAMILIES; None until foreign weights or an export are read
    architecture: str | None
    weights: str  # where the weights come from: a path, a hub URL, "random (seeded)"
    downloads: bool  # loading may download (not cached yet)
    path: Path | None = None
    config: object | None = None  # the family config, when a name or header gives it
    labels: "LabelSet | None" = None  # the labels the model carries (checkpoint header, baked export)
    metadata: dict = field(default_factory=dict)

    @property
    def kind_text(self) -> str:
        return KIND_TEXT[self.kind]

    @property
    def untrained(self) -> bool:
        return self.kind == "architecture"


@dataclass
class LoadedModel:
    backend: "DenseBackend"
    spec: ModelSpec
    labels: "LabelSet | None"  # the labels it was trained on / baked in
    fingerprint: str  # identifies the weights in run records


def resolve_model(spec: str | None = None) -> ModelSpec:
    """Classify a --model value (default: the training-free CLIP). Reads headers only; never downloads."""
    from segcli.models.clip_weights import is_clip_dense_spec
    from segcli.models.weights import WEIGHT_SUFFIXES

    spec = spec or DEFAULT_MODEL
    if is_clip_dense_spec(spec):
        return _hub_spec(spec)
    from segcli.models.catseg_weights import is_catseg_spec

    if is_catseg_spec(spec):
        return _catseg_spec(spec)
    from segcli.models.clip_weights import split_method

    method = split_method(spec)
    if method is not None:  # naclip:/path/open_clip_model.safetensors: local weights read with a method
        rest, metadata = method[2], {"method": method[0]}
        if CLIP_DENSE_METHODS[method[0]].regions and rest.count(",") == 2:  # corrclip:CLIP_FILE,DINO_FILE,GENERATOR
            rest, metadata["regions"] = rest.rsplit(",", 1)
        if CLIP_DENSE_METHODS[method[0]].proxy and "," in rest:  # proxyclip:CLIP_FILE,DINO_FILE
            rest, proxy_file = rest.rsplit(",", 1)
            if not Path(proxy_file).expanduser().is_file():
                raise SegcliError(f"{method[1]}: the second model's weights file {proxy_file} was not found")
            metadata["proxy_file"] = str(Path(proxy_file).expanduser())
        found = resolve_model(rest)
        if found.kind != "weights":
            raise SegcliError(f"{method[1]}: takes open_clip weights files (a segcli checkpoint or export carries "
                              f"its own method): {rest}")
        return ModelSpec(spec, "weights", "clip-dense", None, found.weights, False, found.path, metadata=metadata)
    path = Path(spec).expanduser()
    if path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES:
        if not path.exists():
            raise SegcliError(f"model file not found: {spec}")
        if path.is_dir():
            raise SegcliError(f"--model {spec} is a folder, not a checkpoint file")
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            from segcli.models.onnx_backend import read_sidecar

            meta = read_sidecar(path)
            from segcli.vocabulary.labels import LabelSet

            labels = LabelSet.from_json(meta["labels"]) if meta.get("labels") else None
            return ModelSpec(spec, "onnx", meta.get("family"), meta.get("architecture"), str(path), False, path,
                             labels=labels, metadata=meta)
        if suffix == ".safetensors":
            from segcli.models.checkpoint import is_segcli_checkpoint, read_checkpoint_info

            if is_segcli_checkpoint(path):
                info = read_checkpoint_info(path)
                meta = {k: v for k, v in info.metadata.items() if k not in ("config", "labels")}
                return ModelSpec(spec, "checkpoint", info.family, info.config.name, str(path), False, path,
                                 config=info.config, labels=info.labels, metadata=meta)
        return ModelSpec(spec, "weights", None, None, str(path), False, path)
    if spec in ARCHITECTURES:
        cfg = ARCHITECTURES[spec]
        return ModelSpec(spec, "architecture", cfg.family, spec, "random (seeded)", False, config=cfg)
    raise SegcliError(f"--model {spec!r} is neither a file, clip-dense|naclip|clearclip|proxyclip|corrclip[:ARCH[@TAG]], "
                      "catseg[:B|:L] nor an architecture "
                      f"({', '.join(ARCHITECTURES)})")


def _hub_spec(spec: str) -> ModelSpec:
    from segcli.models.clip_weights import CLIP_DENSE, hub_weights_source, parse_clip_dense_spec, split_method
    from segcli.models.hub import cached_hub_file

    arch, tag = parse_clip_dense_spec(spec)
    repo, names = hub_weights_source(arch, tag)
    cached = cached_hub_file(repo, names)
    method = split_method(spec)[0]
    metadata = {"pretrained": tag, "method": method}
    downloads = cached is None
    if CLIP_DENSE_METHODS[method].proxy:  # a second model read beside CLIP: its own file on the hub
        from segcli.models.clip_weights import proxy_weights_source

        proxy_repo, proxy_names = proxy_weights_source(method)
        proxy_cached = cached_hub_file(proxy_repo, proxy_names)
        metadata["proxy weights"] = (f"https://huggingface.co/{proxy_repo} "
                                     + (f"(cached: {proxy_cached})" if proxy_cached else "(downloaded on first use)"))
        downloads = downloads or proxy_cached is None
    if CLIP_DENSE_METHODS[method].regions:  # corrclip: the region-mask generator's files
        from segcli.models.clip_weights import region_weights_source, split_generator

        kind = split_generator(split_method(spec)[2])[1] or CLIP_DENSE_METHODS[method].regions
        gen_repo, gen_names = region_weights_source(kind)
        missing = [name for name in gen_names if cached_hub_file(gen_repo, [name]) is None]
        metadata["region masks"] = (f"{kind}: https://huggingface.co/{gen_repo} "
                                    + (f"({', '.join(missing)} downloaded on first use)" if missing else "(cached)"))
        downloads = downloads or bool(missing)
    return ModelSpec(spec, "hub", CLIP_DENSE, arch, f"https://huggingface.co/{repo}",
                     downloads=downloads, path=cached, metadata=metadata)


def _catseg_spec(spec: str) -> ModelSpec:
    """`catseg[:B|:L]`: the authors' release (what is cached, what would download); `catseg:FILE`: local weights."""
    from segcli.models.catseg_weights import (
        WEIGHTS_FILES,
        cached_release,
        converted_path,
        parse_catseg_spec,
        weights_url,
    )

    variant, path = parse_catseg_spec(spec)
    if variant is None:
        return ModelSpec(spec, "weights", "catseg", None, str(path), False, path)
    converted, original = converted_path(variant), cached_release(variant)
    metadata = {"variant": CATSEG_VARIANTS[variant].name, "release file": f"{WEIGHTS_FILES[variant]} from {weights_url(variant)}",
                "release cached": str(original) if original else "no (downloaded on first use)",
                "converted": str(converted) + ("" if converted.is_file() else " (made on first use)"),
                "scores": "sigmoid per label (not a softmax); protocol as the authors' inference_sliding_window",
                "default": CATSEG_WHY}
    return ModelSpec(spec, "hub", "catseg", CATSEG_VARIANTS[variant].name, weights_url(variant),
                     downloads=not converted.is_file() and original is None,
                     path=converted if converted.is_file() else original, config=CATSEG_VARIANTS[variant],
                     metadata=metadata)


def model_fingerprint(path: Path) -> str:
    """Identity of a weights file, cheap for GB-sized files: size + first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return "sha256-partial:" + h.hexdigest()


def load_model(spec: str | ModelSpec | None, device: "torch.device") -> LoadedModel:
    """Build the backend a spec names, on `device`. Never runs code from a file."""
    import torch

    spec = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    if spec.family == "catseg" and spec.kind in ("hub", "weights"):
        from segcli.models.catseg_weights import load_catseg

        model, weights = load_catseg(spec.spec, device)
        return LoadedModel(model, spec, None, f"{model.cfg.name}:{model_fingerprint(weights)}")
    if spec.kind == "hub":
        from segcli.models.clip_weights import load_clip_dense

        model, weights = load_clip_dense(spec.spec, device)
        return LoadedModel(model, spec, None, f"{model.cfg.name}:{model_fingerprint(weights)}")
    if spec.kind == "architecture":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random weights every time, so runs are repeatable
            model = FAMILIES[spec.family].model_class()(spec.config).eval()
        return LoadedModel(model.to(device), spec, None, f"arch:{spec.spec}")
    fingerprint = model_fingerprint(spec.path)
    if spec.kind == "onnx":
        from segcli.models.onnx_backend import OnnxModel

        model = OnnxModel(spec.path, spec.metadata)
        return LoadedModel(model, spec, model.baked_labels, fingerprint)
    if spec.kind == "checkpoint":
        from segcli.models.checkpoint import load_checkpoint

        model, info = load_checkpoint(spec.path, device)
        if model.capabilities.needs_regions:  # a corrclip checkpoint holds CLIP and DINO: masks from the hub
            from segcli.models.clip_weights import load_region_generator

            model.set_region_generator(load_region_generator(CLIP_DENSE_METHODS[model.cfg.method].regions))
        return LoadedModel(model.to(device), spec, info.labels, fingerprint)
    from segcli.models.weights import read_state_dict

    state = read_state_dict(spec.path)  # tensors only: never runs code from the file
    if spec.metadata.get("method"):
        from segcli.models.clip_weights import clip_dense_from_clip_state, is_clip_state_dict

        if not is_clip_state_dict(state):
            raise SegcliError(f"{spec.spec}: {spec.path.name} is not an open_clip CLIP weights file")
        method = spec.metadata["method"]
        proxy = None
        if CLIP_DENSE_METHODS[method].proxy:  # CLIP from the file, the second model from its file or the hub
            from segcli.models.clip_weights import download_proxy_weights

            proxy = read_state_dict(spec.metadata.get("proxy_file") or download_proxy_weights(method))
        model = clip_dense_from_clip_state(state, spec.path.name, method=method, proxy_state=proxy)
        if CLIP_DENSE_METHODS[method].regions:
            from segcli.models.clip_weights import load_region_generator

            model.set_region_generator(load_region_generator(spec.metadata.get("regions") or CLIP_DENSE_METHODS[method].regions))
        return LoadedModel(model.to(device), spec, None, f"{spec.metadata['method']}:{fingerprint}")
    for family in FAMILIES.values():
        found = family.try_foreign(state, spec.path.name)
        if found is not None:
            model, labels = found
            return LoadedModel(model.to(device), spec, labels, fingerprint)
    raise SegcliError(f"{spec.spec} is neither a segcli checkpoint, an LSeg checkpoint nor open_clip CLIP weights")


def describe_model(value: str) -> dict:
    """Everything `segcli info` shows about a --model value; never downloads."""
    import torch

    spec = resolve_model(value)
    data = {"model": value, "kind": spec.kind_text, "family": spec.family, "architecture": spec.architecture,
            "weights": spec.weights}
    if spec.kind == "hub":
        data["downloads"] = "on first use, then cached" if spec.downloads else f"no (cached: {spec.path})"
    config, labels, meta = spec.config, spec.labels, dict(spec.metadata)
    if spec.kind == "onnx":  # the sidecar says it all
        data.update({"kind": f"ONNX export ({meta.get('mode')})", "input size": meta.get("imgsz"), **meta,
                     "labels": list(labels.names) if labels else "any (open vocabulary)"})
        return data
    if spec.kind == "weights":  # what family and architecture they are is known once they are read
        loaded = load_model(spec, torch.device("cpu"))
        config, labels = loaded.backend.cfg, loaded.labels
        data.update({"kind": f"{type(loaded.backend).__name__} weights (converted when loaded)",
                     "family": config.family, "architecture": config.name})
        if config.family == "clip-dense":
            data.update(clip_dense_recipe(config.method))
        params = sum(p.numel() for p in loaded.backend.state_dict().values())
    elif spec.kind == "checkpoint":
        from segcli.models.checkpoint import count_parameters

        params = count_parameters(spec.path)
    elif spec.kind == "architecture":
        with torch.device("meta"):
            params = sum(p.numel() for p in FAMILIES[spec.family].model_class()(config).state_dict().values())
    else:  # hub: the config is read off the weights, which may not be here yet; the input size is the family's
        data["input size"] = FAMILIES[spec.family].config.__dataclass_fields__["default_imgsz"].default
        data["labels"] = "any (open vocabulary)"
        data.update(meta)
        if spec.family == "clip-dense":
            data.update(clip_dense_recipe(meta.get("method", DEFAULT_CLIP_DENSE_METHOD)))
        if spec.family == "catseg":
            data["input size"] = spec.config.default_imgsz
            data["protocol"] = CATSEG_PROTOCOL.describe()
        return data
    data.update({"parameters": params, "input size": config.default_imgsz, "config": config.to_dict(),
                 "labels": list(labels.names) if labels else None, "metadata": meta})
    return data


def clip_dense_recipe(method: str) -> dict[str, str]:
    """How a clip-dense method reads images and labels by default (what `segcli info` shows)."""
    return {
        "method": f"{method}: {CLIP_DENSE_METHODS[method].description}",
        "protocol": CLIP_DENSE_METHODS[method].protocol.describe(),
        "prompt": "imagenet80 (CLIP's 80 ImageNet templates, averaged)",
        "synonyms": "max (each synonym scored, a label keeps its best)",
        "refine": "pamr (PAMR, 10 steps, dilations 8 and 16)" if method == "naclip" else "none",
        "default": DEFAULT_METHOD_WHY,
    }


# why catseg is not the default (docs: performance; benchmarks/bench_methods.py)
CATSEG_WHY = ("not the default: on a 2-core CPU it took 11x NACLIP's time a photo at 5 labels and about 3x at 150 "
              "(bench_methods.py, 2026-12-08; the bar is 3x); its GPU speed is not measured yet")
# what `clip-dense` means, and why (docs: models and weights, performance; benchmarks/bench_methods.py)
DEFAULT_METHOD_WHY = (f"clip-dense = {DEFAULT_CLIP_DENSE_METHOD} on a CPU and on a GPU: corrclip's published masks are "
                      "far better (published ADE-150 mIoU 26.7 against 19.1) but on a CPU it takes an order of magnitude "
                      "longer a photo (see the docs' performance page); "
                      "its GPU speed is not measured yet, so it is not the GPU default")
