"""Weights for the training-free `clip-dense` models: from open_clip's hub (cached) or a local file.

Model specs: `clip-dense` (= `clip-dense:ViT-B-16@openai`), `clip-dense:ARCH`, `clip-dense:ARCH@TAG`
with any plain ViT architecture and pretrained tag open_clip knows, or a path to an open_clip
weights file (`open_clip_model.safetensors` / `open_clip_pytorch_model.bin`). `clip-dense` reads
them with the default method; a method's own name picks it: `naclip:ViT-B-16`,
`clearclip:ViT-B-16@openai`, `naclip:/path/open_clip_model.safetensors`. corrclip reads DINO ViT-B/8
and a region-mask generator beside CLIP (`corrclip:ARCH[@TAG][+eomt|+mask2former|+sam2]`, or
`corrclip:CLIP_FILE,DINO_FILE,GENERATOR_FOLDER` for local files).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from segcli.errors import SegcliError, mismatch_detail
from segcli.modeling.clip_dense import CLIPDense, clip_dense_from_state_dict
from segcli.modeling.configs import CLIP_DENSE_METHODS, DEFAULT_CLIP_DENSE_METHOD, CLIPDenseConfig, DinoConfig, TextConfig
from segcli.models.weights import WEIGHT_SUFFIXES, read_state_dict

CLIP_DENSE = "clip-dense"
DEFAULT_ARCH, DEFAULT_TAG = "ViT-B-16", "openai"
# Bookkeeping values some OpenAI-derived state dicts carry; they are not weights.
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "logit_scale")


def split_method(spec: str) -> tuple[str, str, str] | None:
    """'naclip:REST' -> ('naclip', 'naclip', 'REST'): (method, the prefix as written, the rest);
    `clip-dense` means the default method. None when `spec` names no training-free method."""
    for prefix in (CLIP_DENSE, *CLIP_DENSE_METHODS):
        if spec == prefix or spec.startswith(prefix + ":"):
            return (DEFAULT_CLIP_DENSE_METHOD if prefix == CLIP_DENSE else prefix), prefix, spec[len(prefix) + 1:]
        # corrclip+sam2: the default weights with another region-mask generator
        if prefix in CLIP_DENSE_METHODS and CLIP_DENSE_METHODS[prefix].regions and spec.startswith(prefix + "+"):
            return prefix, prefix, spec[len(prefix):]
    return None


def names_local_file(rest: str) -> bool:
    """The part after `naclip:` is a weights file, not an open_clip ARCH@TAG."""
    path = Path(rest).expanduser()
    return bool(rest) and (path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES or "/" in rest)


def is_clip_dense_spec(spec: str) -> bool:
    """A hub spec (`clip-dense`, `naclip:ViT-B-16@openai`, ...), not a method on a local file."""
    split = split_method(spec)
    return split is not None and not names_local_file(split[2])


def parse_clip_dense_spec(spec: str) -> tuple[str, str]:
    """'clip-dense[:ARCH[@TAG]]' (or a method's name in place of clip-dense) -> (ARCH, TAG) with the
    defaults filled in."""
    split = split_method(spec)
    rest, _ = split_generator(split[2] if split else "")
    arch, _, tag = rest.partition("@")
    # a method whose published numbers use other CLIP weights defaults to those (CorrCLIP: MetaCLIP B/16)
    default_arch, default_tag = (CLIP_DENSE_METHODS[split[0]].weights if split else None) or (DEFAULT_ARCH, DEFAULT_TAG)
    if arch and arch != default_arch:
        default_tag = DEFAULT_TAG
    return arch or default_arch, tag or default_tag


def split_generator(rest: str) -> tuple[str, str | None]:
    """'ViT-B-16@openai+mask2former' -> ('ViT-B-16@openai', 'mask2former'): corrclip's region-mask
    generator (segcli.modeling.regions.GENERATORS), None when not named."""
    head, plus, kind = rest.rpartition("+")
    return (head, kind) if plus and "/" not in kind else (rest, None)


def is_clip_state_dict(state: dict[str, torch.Tensor]) -> bool:
    state = _clean(state)
    return "visual.conv1.weight" in state and "token_embedding.weight" in state


def _clean(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without DistributedDataParallel's "module." prefix and without the non-weight entries."""
    strip = bool(state) and all(k.startswith("module.") for k in state)
    return {(k[len("module."):] if strip else k): v for k, v in state.items()
            if (k[len("module."):] if strip else k) not in _NON_WEIGHTS}


def clip_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower of an open_clip CLIP state dict, in TextEncoder.tower's names, fp32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in _clean(state).items() if not k.startswith("visual.")}


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))


def clip_dense_config(state: dict[str, torch.Tensor], name: str, quick_gelu: bool = True,
                      mean: tuple | None = None, std: tuple | None = None,
                      method: str = DEFAULT_CLIP_DENSE_METHOD) -> CLIPDenseConfig:
    """The architecture of an open_clip CLIP ViT state dict, read off its shapes (head size 64)."""
    try:
        conv = state["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        text_width = state["ln_final.weight"].shape[0]
        text = TextConfig(
            width=text_width, heads=max(1, text_width // 64),
            layers=_count_blocks(state, "transformer.resblocks."),
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            embed_dim=state["text_projection"].shape[1], quick_gelu=quick_gelu,
        )
        cfg = CLIPDenseConfig(
            name=name, patch_size=patch, width=width, layers=_count_blocks(state, "visual.transformer.resblocks."),
            heads=max(1, width // 64), mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            pos_embed_grid=round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5), text=text,
            quick_gelu=quick_gelu, method=method,
            **({"pixel_mean": tuple(mean), "pixel_std": tuple(std)} if mean and std else {}),
        )
        if state["visual.proj"].shape[1] != text.embed_dim:
            raise SegcliError(f"{name}: image and text embeddings differ in size")
    except (KeyError, ValueError) as exc:
        raise SegcliError(f"{name}: not an open_clip CLIP ViT state dict (missing {exc})") from None
    return cfg


def dino_config(state: dict[str, torch.Tensor], name: str) -> DinoConfig:
    """A DINO ViT's architecture read off its state dict (DINO's and timm's key names; head size 64)."""
    try:
        patch = state["patch_embed.proj.weight"]
        width = patch.shape[0]
        return DinoConfig(patch_size=patch.shape[-1], width=width, layers=_count_blocks(state, "blocks."),
                          heads=max(1, width // 64), mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
                          pos_embed_grid=round((state["pos_embed"].shape[1] - 1) ** 0.5))
    except (KeyError, ValueError) as exc:
        raise SegcliError(f"{name}: not a DINO ViT state dict (missing {exc})") from None


def clip_dense_from_clip_state(state: dict[str, torch.Tensor], name: str, quick_gelu: bool = True,
                               mean: tuple | None = None, std: tuple | None = None,
                               device: str | torch.device = "cpu",
                               method: str = DEFAULT_CLIP_DENSE_METHOD,
                               proxy_state: dict[str, torch.Tensor] | None = None) -> CLIPDense:
    """open_clip CLIP weights -> CLIPDense read with `method` (every weight used, every shape checked);
    `proxy_state`: the DINO ViT weights a method such as proxyclip reads beside CLIP."""
    state = _clean(state)
    cfg = clip_dense_config(state, name, quick_gelu, mean, std, method)
    mapped = {"text_encoder.tower." + k: v for k, v in clip_text_state(state).items()}
    mapped.update({k: v.float() for k, v in state.items() if k.startswith("visual.")})
    if CLIP_DENSE_METHODS[method].proxy:
        if proxy_state is None:
            raise SegcliError(f"{name}: {method} needs the DINO ViT weights beside CLIP's")
        proxy_state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in proxy_state.items()
                       if not k.startswith(("head.", "module.head."))}
        cfg = dataclasses.replace(cfg, proxy=dino_config(proxy_state, name))
        mapped.update({"proxy.vit." + k: v.float() for k, v in proxy_state.items()})
    try:
        return clip_dense_from_state_dict(cfg, mapped, device)
    except RuntimeError as exc:
        raise SegcliError(f"{name}: weights do not fit a plain CLIP ViT ({mismatch_detail(exc)})") from None


def clip_dense_from_foreign(state: dict[str, torch.Tensor], name: str) -> tuple[CLIPDense, None] | None:
    """The family table's foreign-weights hook: open_clip CLIP weights -> (CLIPDense, no labels)."""
    if not is_clip_state_dict(state):
        return None
    return clip_dense_from_clip_state(state, name), None


def hub_weights_source(arch: str, tag: str) -> tuple[str, list[str]]:
    """(hub repo, file names to try) of open_clip's ARCH@TAG weights; no network access."""
    import open_clip

    if open_clip.get_model_config(arch) is None:
        raise SegcliError(f"unknown CLIP architecture {arch!r} for clip-dense (e.g. ViT-B-16, ViT-B-32, ViT-L-14)")
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pcfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise SegcliError(f"open_clip has no {tag!r} weights for {arch} (known: {tags})")
    if not pcfg.get("hf_hub"):
        raise SegcliError(f"{arch}@{tag} is not on the Hugging Face hub; download it yourself and pass --model FILE")
    repo, filename = pcfg["hf_hub"].rstrip("/"), "open_clip_pytorch_model.bin"
    if pcfg["hf_hub"].count("/") > 1 and not pcfg["hf_hub"].endswith("/"):
        repo, filename = pcfg["hf_hub"].rsplit("/", 1)
    names = ["open_clip_model.safetensors"] if filename == "open_clip_pytorch_model.bin" else []
    return repo, names + [filename]


def download_clip_weights(arch: str, tag: str) -> Path:
    """The cached (downloading on first use, with a progress bar) open_clip weights for ARCH@TAG."""
    from segcli.models.hub import hub_file

    repo, names = hub_weights_source(arch, tag)
    return hub_file(repo, names, f"the CLIP {arch} weights ({tag})",
                    f"connect once so they are cached, or download {names[0]} from https://huggingface.co/{repo} "
                    f"and pass --model /path/to/{names[0]}")


def load_clip_dense(spec: str, device: str | torch.device = "cpu") -> tuple[CLIPDense, Path]:
    """A `clip-dense[:ARCH[@TAG]]` spec -> (model on `device`, the weights file it came from)."""
    import open_clip

    method, prefix, rest = split_method(spec)
    arch, tag = parse_clip_dense_spec(spec)
    path = download_clip_weights(arch, tag)
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    quick_gelu = bool(pcfg.get("quick_gelu") or (open_clip.get_model_config(arch) or {}).get("quick_gelu"))
    proxy = read_state_dict(download_proxy_weights(method)) if CLIP_DENSE_METHODS[method].proxy else None
    generator = split_generator(rest)[1]
    name = f"{prefix}:{arch}@{tag}" + (f"+{generator}" if generator else "")
    model = clip_dense_from_clip_state(read_state_dict(path), name, quick_gelu,
                                       pcfg.get("mean"), pcfg.get("std"), method=method, proxy_state=proxy)
    if CLIP_DENSE_METHODS[method].regions:
        model.set_region_generator(load_region_generator(generator or CLIP_DENSE_METHODS[method].regions))
    return model.to(device), path


def region_weights_source(kind: str) -> tuple[str, list[str]]:
    """(hub repo, its files) of a region-mask generator named in segcli.modeling.regions.GENERATORS."""
    from segcli.modeling.regions import FILES, GENERATORS

    if kind not in GENERATORS:
        raise SegcliError(f"unknown region-mask generator {kind!r}: use {' or '.join(GENERATORS)}, or a folder")
    return GENERATORS[kind].repo, list(FILES)


def load_region_generator(kind_or_folder: str) -> torch.nn.Module:
    """A region-mask generator: a known one from the hub (each file downloaded once and cached), or
    a transformers model folder."""
    from segcli.modeling.regions import RegionGenerator
    from segcli.models.hub import hub_file

    if Path(kind_or_folder).expanduser().is_dir():
        return RegionGenerator.from_folder(Path(kind_or_folder).expanduser())
    repo, names = region_weights_source(kind_or_folder)
    paths = [hub_file(repo, [name], f"the {kind_or_folder} region-mask model's {name}",
                      f"connect once so it is cached, or download {repo} from https://huggingface.co/{repo} "
                      f"and pass --model corrclip:CLIP_FILE,DINO_FILE,FOLDER") for name in names]
    return RegionGenerator.from_folder(paths[0].parent, kind_or_folder)


# the second models the methods read, on the hub: DINO's released ViT-B/8 under timm's name (DINO's keys)
PROXY_WEIGHTS = {"dino_vitb8": ("timm/vit_base_patch8_224.dino", ["model.safetensors", "pytorch_model.bin"])}


def proxy_weights_source(method: str) -> tuple[str, list[str]]:
    return PROXY_WEIGHTS[CLIP_DENSE_METHODS[method].proxy]


def download_proxy_weights(method: str) -> Path:
    """The cached DINO weights a method reads beside CLIP (downloaded on first use)."""
    from segcli.models.hub import hub_file

    repo, names = proxy_weights_source(method)
    return hub_file(repo, names, f"the DINO ViT-B/8 weights {method} needs",
                    f"connect once so they are cached, or download {names[0]} from https://huggingface.co/{repo} "
                    f"and pass --model {method}:/path/to/open_clip_model.safetensors,/path/to/{names[0]}")
