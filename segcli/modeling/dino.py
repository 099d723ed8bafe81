"""A DINO ViT (Caron et al., ICCV 2021) as the training-free methods read it: its last layer's patch features.

ProxyCLIP takes `get_intermediate_layers(x)[0]` of DINO's own code, the last block's tokens after the
final LayerNorm, without the class token, at 1/8 resolution for ViT-B/8. CorrCLIP takes the last
block's query plus key instead (its qkv projection's output, all heads), also without the class token. The network is timm's
VisionTransformer (timm's `vit_base_patch8_224.dino` holds the released weights under DINO's own key
names); the position embedding is resized as DINO's code does it (bicubic by a scale factor of
(n + 0.1) / 28), so features match the authors' at every window size.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from segcli.modeling.configs import DinoConfig


class DinoViT(nn.Module):
    """Images in [0,1] [B,3,H,W] (H, W multiples of the patch) -> patch features [B,width,H/p,W/p]."""

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.cfg = cfg
        self.vit = VisionTransformer(img_size=cfg.pos_embed_grid * cfg.patch_size, patch_size=cfg.patch_size,
                                     embed_dim=cfg.width, depth=cfg.layers, num_heads=cfg.heads,
                                     mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0,
                                     norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.vit.requires_grad_(False)

    def position_embedding(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """[1, 1+h*w, width], as DINO's `interpolate_pos_encoding` makes it."""
        stored = self.vit.pos_embed
        n = stored.shape[1] - 1
        side = int(math.sqrt(n))
        h, w = grid_hw
        if (h, w) == (side, side):
            return stored
        patches = stored[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # the authors' +0.1 (to avoid floating point error in the interpolation, their comment) and a
        # scale factor, not a size: the sampling positions follow the factor
        patches = F.interpolate(patches, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
        if patches.shape[-2:] != (h, w):
            raise ValueError(f"position embedding resized to {tuple(patches.shape[-2:])}, not {(h, w)}")
        return torch.cat([stored[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, images: torch.Tensor, query_key: bool = False) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> [B,width,H/p,W/p]: the last layer's normalised tokens, or with
        `query_key` the last block's q + k (before its attention)."""
        vit = self.vit
        # ImageNet's normalisation, made here (not a buffer: models are built on the meta device)
        mean = torch.tensor(self.cfg.pixel_mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.pixel_std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        x = vit.patch_embed.proj((images - mean) / std)  # [B,width,h,w]
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embedding((h, w)).to(x.dtype)
        for block in vit.blocks[:-1] if query_key else vit.blocks:
            x = block(x)
        if query_key:
            q, k, _ = vit.blocks[-1].attn.qkv(vit.blocks[-1].norm1(x)).chunk(3, dim=-1)
            x = (q + k)[:, 1:]
        else:
            x = vit.norm(x)[:, 1:]  # get_intermediate_layers(x, n=1)[0], class token dropped
        return x.transpose(1, 2).reshape(b, -1, h, w)
