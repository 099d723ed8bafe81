"""The LSeg model: dense pixel embeddings in CLIP text space, and logits against label embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segcli.modeling.configs import LSegConfig, get_config
from segcli.modeling.dpt_decoder import DPTDecoder
from segcli.modeling.image_encoder import ImageEncoder
from segcli.modeling.pixel_text import PixelTextModel, build_from_state_dict
from segcli.modeling.text_encoder import TextEncoder


class LSeg(PixelTextModel):
    """Images in [0,1] -> pixel embeddings at 1/2 resolution; + labels -> logits.

    Shapes: images [B,3,H,W] with H, W multiples of `cfg.input_multiple`; pixel embeddings
    [B,C,H/2,W/2]; label embeddings [K,C]; logits [B,K,H/2,W/2] (`forward` brings them to [B,K,H,W]
    with LSeg's bilinear x2, align_corners=True).
    """

    output_stride = 2

    def __init__(self, cfg: LSegConfig):
        super().__init__(cfg)
        self.image_encoder = ImageEncoder(cfg)
        self.decoder = DPTDecoder(cfg)
        self.text_encoder = TextEncoder(cfg.text)

    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> [B,C,H/2,W/2] (not normalised)."""
        m = self.cfg.input_multiple
        if images.shape[-2] % m or images.shape[-1] % m:
            raise ValueError(f"input size {tuple(images.shape[-2:])} must be a multiple of {m}")
        x = (images - self.pixel_mean) / self.pixel_std
        return self.decoder(self.image_encoder(x))

    def forward(self, images: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1], [K,C] -> logits [B,K,H,W]."""
        logits = self.logits(self.pixel_embeddings(images), label_embeddings)
        return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)


def model_from_state_dict(cfg: LSegConfig, state: dict[str, torch.Tensor],
                          device: str | torch.device = "cpu") -> LSeg:
    """An LSeg holding exactly `state` (strict). RuntimeError when keys or shapes do not match `cfg`."""
    return build_from_state_dict(LSeg, cfg, state, device)


def build_model(arch: str | LSegConfig) -> LSeg:
    """An untrained (random-weight) model for a registered name or a config."""
    cfg = get_config(arch) if isinstance(arch, str) else arch
    return LSeg(cfg).eval()
