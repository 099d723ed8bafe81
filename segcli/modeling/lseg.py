"""The LSeg model: dense pixel embeddings in CLIP text space, and logits against label embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcli.labels import LabelSet
from segcli.modeling.dpt_decoder import DPTDecoder
from segcli.modeling.image_encoder import ImageEncoder
from segcli.modeling.text_encoder import TextEncoder
from segcli.registry import LSegConfig, get_config


class LSeg(nn.Module):
    """Images in [0,1] -> pixel embeddings at 1/2 resolution; + labels -> logits.

    Shapes: images [B,3,H,W] with H, W multiples of `cfg.input_multiple`; pixel embeddings
    [B,C,H/2,W/2]; label embeddings [K,C]; logits [B,K,H/2,W/2] (`forward` brings them to [B,K,H,W]
    with LSeg's bilinear x2, align_corners=True).
    """

    def __init__(self, cfg: LSegConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.decoder = DPTDecoder(cfg)
        self.text_encoder = TextEncoder(cfg.text)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.logit_scale = cfg.logit_scale
        self._label_cache: dict[tuple, torch.Tensor] = {}

    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> [B,C,H/2,W/2] (not normalised)."""
        m = self.cfg.input_multiple
        if images.shape[-2] % m or images.shape[-1] % m:
            raise ValueError(f"input size {tuple(images.shape[-2:])} must be a multiple of {m}")
        x = (images - self.pixel_mean) / self.pixel_std
        return self.decoder(self.image_encoder(x))

    def logits(self, pixel_embeddings: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        """[B,C,h,w] x [K,C] (normalised) -> scaled cosine similarities [B,K,h,w] in fp32."""
        pixels = F.normalize(pixel_embeddings.float(), dim=1)
        return torch.einsum("bchw,kc->bkhw", pixels, label_embeddings.float()) * self.logit_scale

    def forward(self, images: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1], [K,C] -> logits [B,K,H,W]."""
        logits = self.logits(self.pixel_embeddings(images), label_embeddings)
        return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)

    def label_embeddings(self, labels: LabelSet, prompt: str | None = None) -> torch.Tensor:
        """[K,C] L2-normalised; synonyms are averaged. Computed once per (labels, prompt), then cached."""
        key = (labels.synonyms, prompt)
        cached = self._label_cache.get(key)
        if cached is None:
            texts = [prompt.format(word) if prompt else word for syn in labels.synonyms for word in syn]
            flat = self.text_encoder(texts)
            rows, start = [], 0
            for syn in labels.synonyms:
                rows.append(flat[start:start + len(syn)].mean(0))
                start += len(syn)
            cached = F.normalize(torch.stack(rows), dim=-1)
            self._label_cache[key] = cached
        return cached

    def _load_from_state_dict(self, *args, **kwargs):
        self._label_cache.clear()  # new text weights make cached label embeddings stale
        super()._load_from_state_dict(*args, **kwargs)


def model_from_state_dict(cfg: LSegConfig, state: dict[str, torch.Tensor],
                          device: str | torch.device = "cpu") -> LSeg:
    """Build on the meta device and adopt `state` as the weights (strict; no random init, no copy).

    Raises RuntimeError when keys or shapes do not match `cfg`.
    """
    with torch.device("meta"):
        model = LSeg(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers are not in `state`: rebuild them on the target device
    model.pixel_mean = torch.tensor(cfg.pixel_mean, device=device).view(1, 3, 1, 1)
    model.pixel_std = torch.tensor(cfg.pixel_std, device=device).view(1, 3, 1, 1)
    model.text_encoder.tower.attn_mask = model.text_encoder.tower.build_causal_mask().to(device)
    return model.eval()


def build_model(arch: str | LSegConfig) -> LSeg:
    """An untrained (random-weight) model for a registered name or a config."""
    cfg = get_config(arch) if isinstance(arch, str) else arch
    return LSeg(cfg).eval()
