"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP applies it.

Each refinement step replaces every pixel's logits by a weighted average of its neighbours' logits
(8 neighbours at each dilation, the image edge replicated). The weights come from the image alone:
a neighbour whose colour is close (relative to the local colour spread) weighs more:

    w[p, n] = softmax_n( mean_c( -|I_c(p) - I_c(n)| / (1e-8 + 0.1 * std_c(p)) ) )

where std_c(p) is the (unbiased) standard deviation of channel c over the 3x3 neighbourhoods of p at
all dilations, centres included. NACLIP uses 10 steps at dilations (8, 16) on the normalised image.
The weights do not depend on the label, so labels are refined in chunks: memory is
(8 * dilations) x chunk x pixels, whatever the number of labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# the 8 neighbours of a 3x3 neighbourhood at dilation d, as (row, column) offsets in units of d
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbours(x: torch.Tensor, dilations: tuple[int, ...], centre: bool = False) -> torch.Tensor:
    """[B,C,H,W] -> [B,C,P,H,W]: each pixel's neighbours at each dilation (P = 8 per dilation, 9
    with the centre), the image edge replicated."""
    h, w = x.shape[-2:]
    offsets = _NEIGHBOURS[:4] + ((0, 0),) + _NEIGHBOURS[4:] if centre else _NEIGHBOURS
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        out.extend(padded[..., d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w] for dy, dx in offsets)
    return torch.stack(out, dim=2)


class PAMR(nn.Module):
    """logits [B,K,H,W] refined by the affinities of image [B,3,H,W] (same H, W)."""

    def __init__(self, iterations: int = 10, dilations: tuple[int, ...] = (8, 16), label_chunk: int = 16):
        super().__init__()
        self.iterations, self.dilations, self.label_chunk = iterations, tuple(dilations), label_chunk

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,1,P,H,W] weights over each pixel's P neighbours (they sum to 1)."""
        spread = neighbours(image, self.dilations, centre=True).std(dim=2, keepdim=True)  # [B,3,1,H,W]
        distance = (image.unsqueeze(2) - neighbours(image, self.dilations)).abs()
        return F.softmax((-distance / (1e-8 + 0.1 * spread)).mean(dim=1, keepdim=True), dim=2)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights = self.affinity(image.float())
        chunks = []
        for chunk in logits.float().split(self.label_chunk, dim=1):
            for _ in range(self.iterations):
                chunk = (neighbours(chunk, self.dilations) * weights).sum(dim=2)
            chunks.append(chunk)
        return torch.cat(chunks, dim=1)
