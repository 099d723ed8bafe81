"""DPT fusion block (RefineNet style) with BatchNorm residual conv units, as LSeg uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualConvUnit(nn.Module):
    """x [B,F,h,w] -> x + BN(conv(ReLU(BN(conv(ReLU(x)))))), same shape."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(features)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
        return x + out


class FeatureFusionBlock(nn.Module):
    """Path [B,F,h,w] (+ skip [B,F,h,w]) -> [B,F,2h,2w].

    The skip feature goes through its own residual unit before being added (LSeg's resConfUnit1
    acts on the skip, not on the incoming path); the deepest block has no skip.
    """

    def __init__(self, features: int, has_skip: bool = True):
        super().__init__()
        self.skip_unit = ResidualConvUnit(features) if has_skip else None
        self.residual_unit = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = self.residual_unit(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)
