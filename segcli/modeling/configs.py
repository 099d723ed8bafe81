"""The networks' configs and named architectures, as plain data (this module never imports torch).

A config is JSON-serialisable, so a checkpoint records its family and config and rebuilds the model
without any code of its own. Named architectures (`lseg_vitl16_384`, ...) are configs; each
training-free method is one row of CLIP_DENSE_METHODS (a MethodCfg) (segcli.inputs.geometry's
`Protocol` says how images meet a model). The family table that ties configs to modules and foreign
weights is segcli.models.families.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from segcli.errors import SegcliError
from segcli.inputs.geometry import Protocol


@dataclass(frozen=True)
class MethodCfg:
    """One training-free method a CLIP can be read with (segcli.modeling.clip_dense), as its authors
    run it: one row holds everything segcli needs to know of it (as timm's PretrainedCfg does).

    protocol: their inference protocol (their ADE20K configs): the short side, then windows of
        `window` every `stride` pixels, logits averaged.
    probability_scale: the temperature their code gives cosine similarities before its softmax
        (--bg-threshold's probabilities).
    proxy: the second vision model read beside CLIP ("dino_vitb8"), or None.
    regions: the default generator of each photo's class-agnostic region masks, or None.
    refine: the refinement their published numbers use ("pamr": --refine auto), or "none".
    weights: (architecture, pretrained tag) their published numbers use, when not OpenAI's ViT-B/16.
    benchmark: per benchmark dataset, where their own configs differ from the catalog's (NACLIP's)
        settings: short_side, window, stride, bg_threshold.
    """

    name: str
    description: str
    protocol: Protocol
    probability_scale: float
    proxy: str | None = None
    regions: str | None = None
    refine: str = "none"
    weights: tuple[str, str] | None = None
    benchmark: dict = field(default_factory=dict)


# ProxyCLIP's cfg_*.py (short side 448 on ADE20K and Cityscapes, Cityscapes in 224 windows every 112;
# its prob_thd); CorrCLIPv1/configs/cfg_*.py have the same values
_PROXYCLIP_BENCHMARK = {"ade20k": {"short_side": 448}, "cityscapes": {"short_side": 448, "window": 224, "stride": 112},
                        "voc21": {"bg_threshold": 0.2}, "context60": {"bg_threshold": 0.15},
                        "coco-object": {"bg_threshold": 0.25}}
# the training-free methods; `clip-dense` names the default
CLIP_DENSE_METHODS = {m.name: m for m in (
    MethodCfg("clearclip", "ClearCLIP (Lan et al., ECCV 2024): query-query attention, no residual, no feed-forward",
              Protocol(short_side=448, window=448, stride=224), probability_scale=50.0),
    MethodCfg("naclip", "NACLIP (Hajimiri et al., WACV 2025): key-key attention plus a Gaussian neighbourhood, "
                        "no residual, no feed-forward",
              Protocol(short_side=336, window=224, stride=112), probability_scale=40.0, refine="pamr"),
    MethodCfg("proxyclip", "ProxyCLIP (Lan et al., ECCV 2024): attention from DINO ViT-B/8's patch-feature "
                           "similarity (beta 1.2, gamma 3.0) over CLIP's values, at DINO's stride 8",
              Protocol(short_side=448, window=336, stride=112),  # its configs: Resize (2048, 448), slide 336/112
              probability_scale=40.0, proxy="dino_vitb8", benchmark=_PROXYCLIP_BENCHMARK),
    MethodCfg("corrclip", "CorrCLIP (Zhang et al., ICCV 2025): DINO ViT-B/8 correlations inside merged region masks "
                          "(EoMT), spatial and semantic branches, a per-region vote; at DINO's stride 8",
              Protocol(short_side=448, window=336, stride=112),  # cfg_ade20k.py: Resize (2048, 448); 336/112
              probability_scale=40.0, proxy="dino_vitb8", regions="eomt",
              weights=("ViT-B-16-quickgelu", "metaclip_fullcc"),  # MetaCLIP B/16, as its published numbers
              benchmark=_PROXYCLIP_BENCHMARK),
)}
DEFAULT_CLIP_DENSE_METHOD = "naclip"  # the best published number of those implemented (ADE-150 19.1, with PAMR)


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
    if data.get("proxy") is not None:
        data["proxy"] = DinoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["proxy"].items()})
    return cls(**data)


@dataclass(frozen=True)
class DinoConfig:
    """A DINO ViT (Caron et al., ICCV 2021): the defaults are ViT-B/8 (timm's vit_base_patch8_224.dino)."""

    patch_size: int = 8
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pos_embed_grid: int = 28  # trained at 224
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet's
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)


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
    method: str = "clearclip"  # how the last block reads the patches: a key of CLIP_DENSE_METHODS
    gaussian_std: float = 5.0  # naclip: the neighbourhood's width, in patches (NACLIP's default)
    proxy: DinoConfig | None = None  # proxyclip: the DINO ViT whose patch similarities make the attention
    proxy_beta: float = 1.2  # proxyclip: similarities below beta x their mean get no attention
    proxy_gamma: float = 3.0  # proxyclip: the sharpness of the rest

    family: ClassVar[str] = "clip-dense"

    @property
    def embed_dim(self) -> int:
        return self.text.embed_dim

    @property
    def input_multiple(self) -> int:
        if self.proxy is None:
            return self.patch_size
        return self.patch_size * self.proxy.patch_size // math.gcd(self.patch_size, self.proxy.patch_size)

    @property
    def output_stride(self) -> int:
        return self.proxy.patch_size if self.proxy is not None else self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CLIPDenseConfig":
        return config_from_dict(cls, data)


# CAT-Seg's inference_sliding_window: the photo stretched to 640 x 640, 384-pixel windows every 256
# (overlap 1/3), plus the whole photo at 384 as a global view
CATSEG_PROTOCOL = Protocol(short_side=640, window=384, stride=256, square=True, global_view=True)


@dataclass(frozen=True)
class CATSegConfig:
    """CAT-Seg (segcli.modeling.catseg): fine-tuned CLIP + cost aggregation. The defaults are the
    authors' configs/vitb_384.yaml at evaluation (pooling 1 x 1, one prompt template)."""

    name: str = "catseg:B"
    patch_size: int = 16
    width: int = 768  # CLIP's vision width
    layers: int = 12
    heads: int = 12
    clip_resolution: int = 384  # the image tower's input (the stored position embedding is resized to it)
    pos_embed_grid: int = 14  # the stored position embedding's grid (OpenAI's ViT-B/16 at 224)
    guidance_layers: tuple[int, ...] = (3, 7)  # blocks whose outputs guide the decoder (x2, x4 upsampled)
    text: TextConfig = field(default_factory=TextConfig)  # the fine-tuned CLIP text tower
    guidance_proj_dim: int = 128
    decoder_dims: tuple[int, int] = (64, 32)
    decoder_guidance_dims: tuple[int, int] = (256, 128)
    decoder_guidance_proj_dims: tuple[int, int] = (32, 16)
    num_layers: int = 2
    num_heads: int = 4
    hidden_dim: int = 128
    window_size: int = 12
    pad_len: int = 256  # class aggregation always sees this many classes (learned padding, or the top ones)
    logit_scale: float = 1.0  # unused: scores are the network's sigmoid
    pixel_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    pixel_std: tuple[float, float, float] = OPENAI_CLIP_STD
    default_imgsz: int = 384  # one canvas (--window 0): the window size
    input_multiple: int = 16

    family: ClassVar[str] = "catseg"

    @property
    def embed_dim(self) -> int:
        return self.text.embed_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CATSegConfig":
        return config_from_dict(cls, data)


# the authors' two released models (hamacojr/CAT-Seg-weights): ViT-B/16 at 384, ViT-L/14 at 336
CATSEG_VARIANTS = {
    "B": CATSegConfig(),
    "L": CATSegConfig(name="catseg:L", patch_size=14, width=1024, layers=24, heads=16, clip_resolution=336,
                      pos_embed_grid=24, guidance_layers=(7, 15), text=TextConfig(width=768, heads=12, layers=12, embed_dim=768),
                      decoder_guidance_dims=(256, 128)),
}


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
