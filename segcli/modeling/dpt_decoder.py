"""DPT decoder faithful to LSeg: reassemble x4, 3x3 convs to F features, fusion x4, 1x1 head."""

from __future__ import annotations

import torch
from torch import nn

from segcli.modeling.configs import LSegConfig
from segcli.modeling.fusion import FeatureFusionBlock
from segcli.modeling.reassemble import Reassemble


class DPTDecoder(nn.Module):
    """Four (tokens [B,D,gh,gw], cls [B,1,D]) -> pixel embeddings [B, C, H/2, W/2].

    Level l (0..3) sits at stride 4, 8, 16, 32 of the input; fusion runs from the coarsest level
    up and every fusion block doubles the resolution, so the head sees stride 2.
    """

    def __init__(self, cfg: LSegConfig):
        super().__init__()
        self.reassemble = nn.ModuleList(
            Reassemble(cfg.vit_dim, ch, scale)
            for ch, scale in zip(cfg.reassemble_channels, cfg.resample_factors)
        )
        self.layer_rn = nn.ModuleList(
            nn.Conv2d(ch, cfg.features, kernel_size=3, padding=1, bias=False)
            for ch in cfg.reassemble_channels
        )
        self.fusion = nn.ModuleList(FeatureFusionBlock(cfg.features, has_skip=level < 3) for level in range(4))
        self.head = nn.Conv2d(cfg.features, cfg.embed_dim, kernel_size=1)

    def forward(self, intermediates: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        levels = [
            rn(reassemble(tokens, cls))
            for (tokens, cls), reassemble, rn in zip(intermediates, self.reassemble, self.layer_rn)
        ]
        x = self.fusion[3](levels[3])
        for level in (2, 1, 0):
            x = self.fusion[level](x, levels[level])
        return self.head(x)
