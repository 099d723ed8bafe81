"""DPT reassemble branch: ViT tokens -> an image-like feature map at one decoder stride."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Reassemble(nn.Module):
    """tokens [B,D,gh,gw] + cls [B,1,D] -> [B, out_channels, gh*scale, gw*scale].

    Readout "project": each patch token is concatenated with the CLS token ([patch, cls]) and
    projected back to D with Linear + exact GELU. Then a 1x1 conv to `out_channels` and a resample:
    transposed conv (scale > 1, kernel = stride = scale), nothing (scale 1) or a 3x3 stride-2 conv
    (scale 1/2).
    """

    def __init__(self, vit_dim: int, out_channels: int, scale: float):
        super().__init__()
        self.readout = nn.Linear(2 * vit_dim, vit_dim)
        self.project = nn.Conv2d(vit_dim, out_channels, kernel_size=1)
        if scale > 1:
            k = int(scale)
            self.resample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=k, stride=k)
        elif scale == 1:
            self.resample = nn.Identity()
        elif scale == 0.5:
            self.resample = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f"unsupported reassemble scale {scale}")

    def forward(self, tokens: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        batch, dim, gh, gw = tokens.shape
        patches = tokens.flatten(2).transpose(1, 2)  # [B, gh*gw, D]
        x = torch.cat([patches, cls.expand(-1, patches.shape[1], -1)], dim=-1)
        x = F.gelu(self.readout(x))
        x = x.transpose(1, 2).reshape(batch, dim, gh, gw)
        return self.resample(self.project(x))
