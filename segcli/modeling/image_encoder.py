"""ViT image encoder: four intermediate token maps plus the CLS token, at any input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from segcli.modeling.configs import LSegConfig


class _LSegVisionTransformer(VisionTransformer):
    """timm's ViT with LSeg's position-embedding resize.

    timm resizes with antialiased bicubic; LSeg resizes the stored grid with plain bilinear
    (align_corners=False, no antialias) on every call. Matching it keeps official weights exact,
    and plain bilinear also exports cleanly to ONNX.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, gh, gw, C] patch embeddings (dynamic_img_size gives NHWC)
        batch, gh, gw, dim = x.shape
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g0h, g0w = self.patch_embed.grid_size
        grid_pos = grid_pos.reshape(1, g0h, g0w, dim).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bilinear", align_corners=False)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, gh * gw, dim)], dim=1)
        return self.pos_drop(tokens + torch.cat([cls_pos, grid_pos], dim=1))


class ImageEncoder(nn.Module):
    """Images [B,3,H,W] (normalised) -> four (tokens [B,D,H/p,W/p], cls [B,1,D]) pairs."""

    def __init__(self, cfg: LSegConfig):
        super().__init__()
        self.hook_blocks = list(cfg.hook_blocks)
        self.vit = _LSegVisionTransformer(
            img_size=cfg.pos_embed_grid * cfg.patch_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.vit_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            num_classes=0,
            dynamic_img_size=True,
        )
        # The final norm and the classifier never feed the decoder.
        self.vit.prune_intermediate_layers(self.hook_blocks, prune_norm=True, prune_head=True)

    def forward(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.vit.forward_intermediates(
            images, indices=self.hook_blocks, return_prefix_tokens=True, intermediates_only=True
        )
