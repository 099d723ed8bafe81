"""Region ids beside the pixels, for methods that read them (corrclip): made once per photo, cut
into the same windows as the pixels, and used at the end for CorrCLIP's "map correction": every
region's pixels take the label most of them have (the smallest label on a tie)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segcli.modeling.corrclip import PAD_REGION


def image_regions(generator: torch.nn.Module, pixels: np.ndarray, resized_hw: tuple[int, int],
                  device: torch.device) -> torch.Tensor:
    """The model's pixels [H,W,3] (the photo at the top-left, `resized_hw` of it) -> ids [H,W] int64 on
    `device`: the generator's on the photo, PAD_REGION on the padding around it."""
    h, w = resized_hw
    photo = torch.from_numpy(np.ascontiguousarray(pixels[:h, :w])).to(device)
    ids = torch.full(pixels.shape[:2], PAD_REGION, dtype=torch.int64, device=device)
    ids[:h, :w] = generator(photo)
    return ids


def region_tiles(regions: torch.Tensor, corners: list[tuple[int, int]], window: int) -> torch.Tensor:
    """Ids [h,w] -> [N,window,window] cut as segcli.inference.windows.window_tiles cuts the pixels
    (PAD_REGION where a window reaches past the image)."""
    tiles = regions.new_full((len(corners), window, window), PAD_REGION)
    for i, (y, x) in enumerate(corners):
        crop = regions[y:y + window, x:x + window]
        tiles[i, :crop.shape[0], :crop.shape[1]] = crop
    return tiles


def vote_in_regions(logits: torch.Tensor, regions: torch.Tensor, resized_hw: tuple[int, int],
                    groups: np.ndarray | None = None) -> torch.Tensor:
    """Logits [S,h',w'] (cells over the model's pixels from the top-left; S channels, label
    `groups[s]` each, or one label per channel) and the pixels' region ids [H,W] -> the logits with
    every region's cells made to pick the label most of its cells pick. The photo's smallest id (its
    unsegmented part) does not vote."""
    h, w = resized_hw
    cells = logits.shape[-2:]
    photo = regions[:h, :w]
    if tuple(regions.shape) != tuple(cells):  # a canvas at stride s: each cell's id (nearest, top-left)
        regions = F.interpolate(regions[None, None].float(), size=cells, mode="nearest")[0, 0].long()
    channel = logits.argmax(0)
    group_of = torch.as_tensor(groups, device=logits.device) if groups is not None else None
    labels = group_of[channel] if group_of is not None else channel
    outside = photo.min()
    values, inverse = torch.unique(regions, return_inverse=True)
    count = int(labels.max()) + 1
    votes = torch.bincount((inverse * count + labels).flatten(), minlength=len(values) * count).view(len(values), count)
    winner = votes.argmax(1)[inverse]  # [h',w']: argmax takes the first (smallest) label on a tie
    voting = (regions != outside) & (regions != PAD_REGION)
    if groups is not None:  # the label's first channel stands for it (groups ascend: np.repeat)
        winner = torch.as_tensor(np.searchsorted(groups, np.arange(count)), device=logits.device)[winner]
    out = logits.clone()
    top = logits.amax(0) + 1.0
    out.scatter_(0, winner[None], torch.where(voting, top, out.gather(0, winner[None])[0])[None])
    return out
