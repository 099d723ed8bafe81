"""CAT-Seg's released weights (`catseg[:B|:L]`, or `catseg:FILE` for a local checkpoint): downloaded
from the authors' Hugging Face Space, read without unpickling objects, every key and shape checked
against the architecture, and converted once to a segcli checkpoint in segcli's cache, which later
runs load directly.

The authors' detectron2 checkpoint holds the whole `CATSeg` module's state dict under "model":
`sem_seg_head.predictor.clip_model.*` (OpenAI's CLIP layout, each attention's q/k/v kept apart by
their fine-tuning), `sem_seg_head.predictor.transformer.*` (the aggregator), `upsample1/2.*`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from segcli.errors import SegcliError, mismatch_detail
from segcli.files.cache import cache_root
from segcli.modeling.configs import CATSEG_VARIANTS, CATSegConfig, TextConfig

CATSEG = "catseg"
WEIGHTS_REPO = "hamacojr/CAT-Seg-weights"  # a Space (repo type "space"), as the authors' README links it
WEIGHTS_FILES = {"B": "model_base.pth", "L": "model_large.pth"}
_CLIP = "sem_seg_head.predictor.clip_model."
_AGGREGATOR = "sem_seg_head.predictor.transformer."
_DROPPED = ("logit_scale", "pixel_mean", "pixel_std", "clip_pixel_mean", "clip_pixel_std")


def is_catseg_spec(spec: str) -> bool:
    return spec == CATSEG or spec.startswith(CATSEG + ":")


def parse_catseg_spec(spec: str) -> tuple[str | None, Path | None]:
    """`catseg[:B|:L]` -> ("B"|"L", None); `catseg:FILE` -> (None, the file)."""
    rest = spec[len(CATSEG) + 1:] if spec.startswith(CATSEG + ":") else "B"
    if rest.upper() in CATSEG_VARIANTS:
        return rest.upper(), None
    path = Path(rest).expanduser()
    if not path.is_file():
        raise SegcliError(f"--model {spec}: use catseg, catseg:B, catseg:L or catseg:FILE (an existing checkpoint); "
                          f"{rest} is none of them")
    return None, path


def converted_path(variant: str) -> Path:
    """Where the converted checkpoint of a released variant is cached."""
    return cache_root() / "catseg" / f"catseg_{variant}.safetensors"


def weights_url(variant: str) -> str:
    return f"https://huggingface.co/spaces/{WEIGHTS_REPO}/resolve/main/{WEIGHTS_FILES[variant]}"


def cached_release(variant: str) -> Path | None:
    """The authors' file for `variant` in the hub cache, without network access."""
    from segcli.models.hub import cached_hub_file

    return cached_hub_file(WEIGHTS_REPO, [WEIGHTS_FILES[variant]], repo_type="space")


def download_release(variant: str) -> Path:
    from segcli.models.hub import hub_file

    name = WEIGHTS_FILES[variant]
    return hub_file(WEIGHTS_REPO, [name], f"CAT-Seg ({variant}) weights", f"connect once so they are cached, or "
                    f"download {weights_url(variant)} and pass --model catseg:/path/to/{name}", repo_type="space")


def catseg_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The authors' state dict -> segcli's CATSeg names (q/k/v joined into open_clip's in_proj)."""
    if not any(k.startswith(_CLIP) for k in state) or not any(k.startswith(_AGGREGATOR) for k in state):
        raise SegcliError(f"{name} is not a CAT-Seg checkpoint (no {_CLIP}* and {_AGGREGATOR}* weights)")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_AGGREGATOR):
            if not key.endswith("attn_mask"):  # rebuilt from the grid (and compared by shape below)
                out["aggregator." + key[len(_AGGREGATOR):]] = value
        elif key.startswith(_CLIP):
            rest = key[len(_CLIP):]
            if rest in _DROPPED or rest.endswith(("k_proj_weight", "v_proj_weight")):
                continue
            if rest.endswith("q_proj_weight"):
                base = key[:-len("q_proj_weight")]
                value = torch.cat([state[base + f"{p}_proj_weight"] for p in "qkv"])
                rest = rest[:-len("q_proj_weight")] + "in_proj_weight"
            out[rest if rest.startswith("visual.") else "text_encoder.tower." + rest] = value
        elif key.startswith(("upsample1.", "upsample2.")):
            out[key] = value
        elif key.split(".")[-1] not in _DROPPED:
            raise SegcliError(f"{name} holds {key}, which no CAT-Seg model has: not the CVPR release?")
    return out


def catseg_config(state: dict[str, torch.Tensor], name: str, num_heads: int = 4, window_size: int = 12,
                  grid: int = 24) -> CATSegConfig:
    """The architecture, read off the (segcli-named) weights' shapes; the head's attention heads,
    window and patch grid are the authors' (configs/vitb_384.yaml, vitl_336.yaml)."""
    try:
        conv = state["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("visual.transformer.resblocks."))
        text_width = state["text_encoder.tower.ln_final.weight"].shape[0]
        text_layers = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("text_encoder.tower.transformer.resblocks."))
        text = TextConfig(width=text_width, heads=text_width // 64, layers=text_layers,
                          context_length=state["text_encoder.tower.positional_embedding"].shape[0],
                          vocab_size=state["text_encoder.tower.token_embedding.weight"].shape[0],
                          embed_dim=state["text_encoder.tower.text_projection"].shape[1])
        agg_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("aggregator.layers."))
        hidden = state["aggregator.conv1.weight"].shape[0]
        guidance = [state[f"aggregator.decoder_guidance_projection.{i}.0.weight"].shape for i in (0, 1)]
        decoder = [state[f"aggregator.decoder{i}.conv.double_conv.0.weight"].shape[0] for i in (1, 2)]
    except (KeyError, ValueError) as exc:
        raise SegcliError(f"{name} is not a CAT-Seg checkpoint this segcli reads (missing {exc})") from None
    third = layers // 3
    stored_grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return CATSegConfig(name=name, patch_size=patch, width=width, layers=layers, heads=width // 64,
                        clip_resolution=patch * grid, pos_embed_grid=stored_grid, guidance_layers=(third - 1, 2 * third - 1), text=text,
                        guidance_proj_dim=state["aggregator.guidance_projection.0.weight"].shape[0],
                        decoder_dims=tuple(decoder), decoder_guidance_dims=(guidance[0][1], guidance[1][1]),
                        decoder_guidance_proj_dims=(guidance[0][0], guidance[1][0]), num_layers=agg_layers,
                        num_heads=num_heads, hidden_dim=hidden, window_size=window_size,
                        pad_len=256 if "aggregator.layers.0.attention.padding_tokens" in state else 0)


def catseg_from_state(state: dict[str, torch.Tensor], name: str, config: CATSegConfig | None = None):
    """The authors' state dict -> a CATSeg model (strict: every key and shape must fit)."""
    from segcli.modeling.catseg import CATSeg
    from segcli.modeling.pixel_text import build_from_state_dict

    ours = catseg_state(state, name)
    cfg = config or catseg_config(ours, name)
    try:
        model = build_from_state_dict(CATSeg, cfg, ours)
    except RuntimeError as exc:
        raise SegcliError(f"{name} does not fit CAT-Seg {cfg.name}'s architecture ({mismatch_detail(exc)})") from None
    _check_masks(model, state)
    return model


def _check_masks(model, state: dict[str, torch.Tensor]) -> None:
    """The shifted windows' masks the checkpoint stores have the shapes segcli rebuilds."""
    for key, value in state.items():
        if key.startswith(_AGGREGATOR) and key.endswith("attn_mask"):
            try:
                own = model.get_buffer("aggregator." + key[len(_AGGREGATOR):])
            except AttributeError:
                own = None
            if own is None or tuple(own.shape) != tuple(value.shape):
                raise SegcliError(f"the checkpoint's {key} {tuple(value.shape)} does not fit this architecture's windows")


def load_catseg(spec: str, device: str | torch.device = "cpu"):
    """`catseg[:B|:L|:FILE]` -> (model on `device`, the file its weights came from). A released
    variant is converted once into segcli's cache; later runs read the converted file."""
    from segcli.models.checkpoint import load_checkpoint, save_checkpoint
    from segcli.models.weights import read_state_dict

    variant, path = parse_catseg_spec(spec)
    if variant is None:
        return catseg_from_state(read_state_dict(path), f"catseg:{path.name}").to(device), path
    converted = converted_path(variant)
    if converted.is_file():
        model, _ = load_checkpoint(converted, device)
        return model, converted
    source = download_release(variant)
    model = catseg_from_state(read_state_dict(source), CATSEG_VARIANTS[variant].name, CATSEG_VARIANTS[variant])
    converted.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, converted, extra={"converted_from": weights_url(variant)})
    return model.to(device), converted


def authors_layout(model) -> dict[str, torch.Tensor]:
    """A CATSeg's weights under the authors' names (the inverse of `catseg_state`, the shifted windows'
    masks included): what their checkpoints hold, for comparisons with their code and for tests."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("aggregator."):
            out[_AGGREGATOR + key[len("aggregator."):]] = value
        elif key.startswith(("upsample1.", "upsample2.")):
            out[key] = value
        else:
            base = _CLIP + (key[len("text_encoder.tower."):] if key.startswith("text_encoder.tower.") else key)
            if base.endswith("in_proj_weight"):
                for name, part in zip("qkv", value.chunk(3)):
                    out[base.replace("in_proj_weight", f"{name}_proj_weight")] = part
            else:
                out[base] = value
    for name, buffer in model.named_buffers():
        if name.startswith("aggregator.") and name.endswith("attn_mask"):
            out[_AGGREGATOR + name[len("aggregator."):]] = buffer
    out[_CLIP + "logit_scale"] = torch.tensor(4.6052)
    return out
