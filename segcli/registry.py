"""Model families and architectures by name, as plain data (this module never imports torch).

A family (`lseg`, `clip-dense`) is a row of FAMILIES: its config class, its nn.Module (imported on
use) and the function that maps foreign weights (an official LSeg .ckpt, open_clip CLIP weights)
onto it. A config is JSON-serialisable, so a checkpoint records its family and config and rebuilds
the model without any code of its own. Named architectures (`lseg_vitl16_384`, ...) are configs.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, ClassVar

from segcli.errors import SegcliError
from segcli.sliding import Protocol

DEFAULT_MODEL = "clip-dense:ViT-B-16"  # training-free, so predict works with no --model
# the training-free methods a CLIP can be read with (modeling/clip_dense.py); `clip-dense` names the default
CLIP_DENSE_METHODS = {
    "clearclip": "ClearCLIP (Lan et al., ECCV 2024): query-query attention, no residual, no feed-forward",
    "naclip": "NACLIP (Hajimiri et al., WACV 2025): key-key attention plus a Gaussian neighbourhood, "
              "no residual, no feed-forward",
}
DEFAULT_CLIP_DENSE_METHOD = "naclip"  # the best published number of those implemented (ADE-150 19.1, with PAMR)
# each method's inference protocol as its authors evaluate (their ADE20K configs): the short side,
# then windows of `window` every `stride` pixels, logits averaged (segcli.sliding)
CLIP_DENSE_PROTOCOLS = {
    "clearclip": Protocol(short_side=448, window=448, stride=224),
    "naclip": Protocol(short_side=336, window=224, stride=112),
}
# the temperature each method's code gives cosine similarities before its softmax (--bg-threshold's
# probabilities): NACLIP logit_scale=40, ClearCLIP 50 (their segmentors' defaults)
CLIP_DENSE_PROBABILITY_SCALES = {"clearclip": 50.0, "naclip": 40.0}


@dataclass(frozen=True)
class TextConfig:
    """An open_clip text tower. The defaults are OpenAI CLIP ViT-B/32's text transformer."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408  # the CLIP BPE vocabulary; the tokenizer ships inside open_clip
    embed_dim: int = 512  # C: the shared pixel/text embedding size
    quick_gelu: bool = True  # OpenAI CLIP weights were trained with QuickGELU


@dataclass(frozen=True)
class LSegConfig:
    """ViT image encoder + DPT decoder + frozen CLIP text tower."""

    name: str
    patch_size: int
    vit_dim: int
    depth: int
    num_heads: int
    hook_blocks: tuple[int, int, int, int]  # blocks whose outputs feed the four reassemble branches
    reassemble_channels: tuple[int, int, int, int]
    features: int = 256  # decoder width
    pos_embed_grid: int = 24  # pos_embed is stored for this grid (384 / patch)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale: float = 1 / 0.07  # LSeg's fixed temperature
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    default_imgsz: int = 384
    timm_name: str | None = None  # where pretrained backbone weights come from
    clip_name: str | None = "ViT-B-32"  # where pretrained text weights come from

    family: ClassVar[str] = "lseg"

    @property
    def embed_dim(self) -> int:
        return self.text.embed_dim

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this: the coarsest decoder level is at stride 32."""
        return max(32, self.patch_size)

    @property
    def resample_factors(self) -> tuple[float, float, float, float]:
        """Per level, how the patch grid is rescaled to reach strides 4, 8, 16 and 32."""
        return tuple(self.patch_size / stride for stride in (4, 8, 16, 32))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LSegConfig":
        return config_from_dict(cls, data)


def config_from_dict(cls: type, data: dict):
    """Inverse of `asdict` for a family config: nested TextConfig, lists back to tuples."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise SegcliError(f"model config has unknown fields {sorted(unknown)}: written by a newer segcli?")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    if "text" in data:
        data["text"] = TextConfig(**data["text"])
    return cls(**data)


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPDenseConfig:
    """A pretrained CLIP ViT read densely (training-free, see modeling/clip_dense.py) + its text tower.

    The fields are read off the weights' shapes, so any plain open_clip ViT checkpoint fits.
    """

    name: str  # "clip-dense:ViT-B-16@openai", or the weights file's name
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    pos_embed_grid: int  # the stored position embedding covers this grid (224 / patch for OpenAI)
    text: TextConfig
    quick_gelu: bool = True
    logit_scale: float = 100.0  # CLIP's learned temperature after training (exp(4.6052))
    pixel_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    pixel_std: tuple[float, float, float] = OPENAI_CLIP_STD
    default_imgsz: int = 448  # ClearCLIP/SCLIP evaluate at a 448 short side
    method: str = "clearclip"  # how the last block reads the patches: "clearclip" or "naclip" (CLIP_DENSE_METHODS)
    gaussian_std: float = 5.0  # naclip: the neighbourhood's width, in patches (NACLIP's default)

    family: ClassVar[str] = "clip-dense"

    @property
    def embed_dim(self) -> int:
        return self.text.embed_dim

    @property
    def input_multiple(self) -> int:
        return self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CLIPDenseConfig":
        return config_from_dict(cls, data)


ARCHITECTURES: dict[str, LSegConfig] = {
    cfg.name: cfg
    for cfg in [
        # LSeg's released model (demo_e200.ckpt): ViT-L/16 + CLIP ViT-B/32 text.
        LSegConfig(
            name="lseg_vitl16_384", patch_size=16, vit_dim=1024, depth=24, num_heads=16,
            hook_blocks=(5, 11, 17, 23), reassemble_channels=(256, 512, 1024, 1024),
            pos_embed_grid=24, timm_name="vit_large_patch16_384",
        ),
        LSegConfig(
            name="lseg_vitb16_384", patch_size=16, vit_dim=768, depth=12, num_heads=12,
            hook_blocks=(2, 5, 8, 11), reassemble_channels=(96, 192, 384, 768),
            pos_embed_grid=24, timm_name="vit_base_patch16_384",
        ),
        LSegConfig(
            name="lseg_vitb32_384", patch_size=32, vit_dim=768, depth=12, num_heads=12,
            hook_blocks=(2, 5, 8, 11), reassemble_channels=(96, 192, 384, 768),
            pos_embed_grid=12, timm_name="vit_base_patch32_384",
        ),
        # A few-layer model for tests and smoke runs on a CPU in seconds.
        LSegConfig(
            name="lseg_tiny", patch_size=16, vit_dim=64, depth=4, num_heads=2,
            hook_blocks=(0, 1, 2, 3), reassemble_channels=(16, 32, 64, 64), features=32,
            pos_embed_grid=8, default_imgsz=128, timm_name=None, clip_name=None,
            text=TextConfig(width=64, heads=2, layers=2, embed_dim=64),
        ),
    ]
}


def get_config(name: str) -> LSegConfig:
    """The registered config for an architecture name."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise SegcliError(
            f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}"
        ) from None


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    """One model family: how its config, module and foreign weights fit together.

    `model` and `from_foreign` are "module:name" strings, imported on use (they need torch).
    `from_foreign(state_dict, name)` returns (model, the labels it was trained on or None), or None
    when the weights are not this family's.
    """

    name: str
    config: type
    model: str
    summary: str
    from_foreign: str | None = None
    trainable: bool = False

    def model_class(self) -> type:
        return _resolve(self.model)

    def try_foreign(self, state: dict, name: str):
        return _resolve(self.from_foreign)(state, name) if self.from_foreign else None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("lseg", LSegConfig, "segcli.modeling.lseg:LSeg",
               "LSeg: ViT image encoder + DPT decoder, trained, with a frozen CLIP text tower",
               from_foreign="segcli.convert:lseg_from_foreign", trainable=True),
        Family("clip-dense", CLIPDenseConfig, "segcli.modeling.clip_dense:CLIPDense",
               "training-free dense CLIP (ClearCLIP-style last block) with CLIP's text tower",
               from_foreign="segcli.clip_weights:clip_dense_from_foreign"),
    ]
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise SegcliError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)}): "
                          "written by a newer segcli?") from None
