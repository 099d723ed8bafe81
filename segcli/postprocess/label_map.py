"""From model-resolution logits to a full-resolution label map, without K x H x W memory.

Both functions compute the same thing: the argmax over the candidate labels (best or second best
at some model-resolution cell) of the logits bilinearly upsampled (align_corners=False) to the
photo. `restore_label_map` is the host path (a compiled single-threaded loop, `segcli.postprocess.kernels`:
work proportional to the pixels near label boundaries, plus a copy of the rest);
`restore_label_map_torch` is the device path (plain torch ops that run wherever the logits are:
CUDA, MPS or the CPU).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where the logits are (the model's process), never by host workers
    import torch


def _source_coords(out_size: int, valid: float, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps (align_corners=False) mapping `out_size` pixels onto `valid` source pixels:
    (lower tap, upper tap, float32 weight of the upper one) per output pixel."""
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * np.float32(valid / out_size)
                     - np.float32(0.5), np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), limit - 1)
    hi = np.minimum(lo + 1, limit - 1)
    return lo, hi, np.clip(src - lo, 0.0, 1.0).astype(np.float32)


def image_extent(resized_hw: tuple[int, int], stride: int) -> tuple[float, float]:
    """Exact extent, in model-resolution cells, of an image covering `resized_hw` input pixels."""
    return resized_hw[0] / stride, resized_hw[1] / stride


def image_region(per_pixel, resized_hw: tuple[int, int], stride: int):
    """[X,h',w'] model-resolution map -> [X,h,w] (a copy), the cells that cover an image of
    `resized_hw` input pixels at its top-left (a partly covered edge cell counts)."""
    h, w = (-(-side // stride) for side in resized_hw)
    return per_pixel[:, :h, :w].clone() if hasattr(per_pixel, "clone") else per_pixel[:, :h, :w].copy()


def _can_win(logits: "torch.Tensor") -> "torch.Tensor":
    """[K] bool: the labels that are best or second best (ties included) at some cell of logits
    [K,h,w]. Two maxima and a comparison: topk over the label axis costs twice as much on a CPU."""
    import torch

    best = logits.amax(0)
    second = torch.where(logits == best, float("-inf"), logits).amax(0)
    return (logits >= second).flatten(1).any(1)


def _candidates(logits: "torch.Tensor") -> "torch.Tensor":
    """Sorted indices of the labels that are best or second best at some cell of logits [K,h,w]."""
    return _can_win(logits).nonzero().flatten()


def mask_dtype(num_labels: int) -> np.dtype:
    return np.dtype(np.uint8) if num_labels <= 255 else np.dtype(np.uint16)


def restore_label_map_torch(logits: "torch.Tensor", valid_hw: tuple[float, float], out_hw: tuple[int, int],
                            max_elements: int = 1 << 23, as_tensor: bool = False,
                            groups: np.ndarray | None = None) -> "np.ndarray | torch.Tensor":
    """Label map [H,W] from logits [K,h,w] whose top-left `valid_hw` (in logit pixels) is the image.

    Equivalent to bilinearly upsampling the logits to [K,H,W] and taking the argmax, but only the
    candidate labels (best or second best at some model-resolution pixel) are interpolated, in row
    chunks of at most `max_elements` values: a 24-megapixel photo with 150 labels needs tens of MB,
    not 14 GB, and boundaries stay smooth rather than blocky. With `groups` ([K] label of each
    channel: the channels are synonyms), the map holds the label of the winning synonym.
    """
    import torch

    num_labels = logits.shape[0] if groups is None else int(groups[-1]) + 1
    out_h, out_w = out_hw
    dtype = mask_dtype(num_labels)
    vh, vw = valid_hw
    lh, lw = min(logits.shape[1], math.ceil(vh)), min(logits.shape[2], math.ceil(vw))
    logits = logits[:, :lh, :lw].float()
    device = logits.device
    if num_labels == 1:
        zeros = torch.zeros(out_hw, dtype=torch.int64, device=device)
        return zeros if as_tensor else zeros.cpu().numpy().astype(dtype)
    candidates = _candidates(logits)
    sub = logits[candidates]  # [P, lh, lw]
    if groups is not None:
        candidates = torch.from_numpy(groups).to(device)[candidates]
    y0, y1, wy = (torch.from_numpy(t).to(device) for t in _source_coords(out_h, vh, lh))
    x0, x1, wx = (torch.from_numpy(t).to(device) for t in _source_coords(out_w, vw, lw))
    out = torch.empty((out_h, out_w), dtype=torch.int64, device=device)
    rows = max(1, max_elements // max(1, 4 * out_w))
    for r0 in range(0, out_h, rows):
        r1 = min(out_h, r0 + rows)
        band = torch.lerp(sub[:, y0[r0:r1]], sub[:, y1[r0:r1]], wy[r0:r1].view(1, -1, 1))  # [P, r, lw]
        # a running argmax over candidates: reducing over the outer dim of a [P, r, W] stack is ~2x slower
        best = torch.lerp(band[0][:, x0], band[0][:, x1], wx)
        best_index = torch.zeros(best.shape, dtype=torch.int64, device=device)
        for p in range(1, band.shape[0]):
            value = torch.lerp(band[p][:, x0], band[p][:, x1], wx)
            best_index.masked_fill_(value > best, p)  # strict: ties keep the lower label, as argmax does
            torch.maximum(best, value, out=best)
        out[r0:r1] = candidates[best_index]
    return out if as_tensor else out.cpu().numpy().astype(dtype)


def candidate_logits(logits: "torch.Tensor", valid_hw: tuple[float, float],
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(candidate label indices [P], their logits [P,h,w] float32 over the image's cells): the labels
    that are best or second best at some cell, the only ones the restored map can hold. Small, so
    this is what travels to a host worker instead of all K channels."""
    lh, lw = min(logits.shape[1], math.ceil(valid_hw[0])), min(logits.shape[2], math.ceil(valid_hw[1]))
    grid = logits[:, :lh, :lw].float()
    if grid.shape[0] == 1:
        return np.zeros(1, np.int64), np.ascontiguousarray(grid.cpu().numpy())
    candidates = _candidates(grid)
    return _labels_of(candidates.cpu().numpy(), groups), np.ascontiguousarray(grid[candidates].cpu().numpy())


def _labels_of(channels: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Candidate channels -> the labels they stand for: themselves, or with `groups` (channels are
    synonyms) each one's label. Restoring then takes the argmax over the synonyms' upsampled logits
    and writes its label: the label of its best synonym, as the training-free methods score."""
    return channels if groups is None else groups[channels]


def batch_candidate_logits(logits: "torch.Tensor | list[torch.Tensor]", valid_hws: list[tuple[float, float]],
                           groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`candidate_logits` for a batch: per image logits [K,h',w'] (a [B,K,h',w'] tensor or a list)
    wherever the model left them (its GPU) -> per image (candidate indices [P], their logits [P,h,w]
    float32 on the host). The selection runs on the logits' device, and one copy per batch brings
    the host only the candidates' cells: on a GPU host, copying all K channels and ranking them on
    the CPU would cost the one process that feeds the GPU milliseconds per photo."""
    import torch

    grids = [logits[i][:, :min(logits[i].shape[1], math.ceil(vh)), :min(logits[i].shape[2], math.ceil(vw))]
             for i, (vh, vw) in enumerate(valid_hws)]
    k = grids[0].shape[0]
    if k == 1:
        chosen = [torch.zeros(1, dtype=torch.int64) for _ in grids]
    else:
        chosen = [row.nonzero().flatten() for row in torch.stack([_can_win(g) for g in grids]).cpu()]  # one wait
    picked = [g[c.to(g.device)].float() for g, c in zip(grids, chosen)]
    if grids[0].device.type == "cpu":  # already on the host: no gathering copy
        return [(_labels_of(c.numpy(), groups), p.numpy()) for c, p in zip(chosen, picked)]
    flat = torch.cat([p.flatten() for p in picked]).cpu().numpy()  # one copy for the batch
    out, start = [], 0
    for c, p in zip(chosen, picked):
        out.append((_labels_of(c.numpy(), groups), flat[start:start + p.numel()].reshape(p.shape)))
        start += p.numel()
    return out


def restore_label_map(logits: "torch.Tensor", valid_hw: tuple[float, float], out_hw: tuple[int, int],
                      out: np.ndarray | None = None, num_labels: int | None = None,
                      candidates: np.ndarray | None = None, histogram: np.ndarray | None = None,
                      groups: np.ndarray | None = None) -> np.ndarray:
    """Label map [H,W] from logits [K,h,w] whose top-left `valid_hw` (in logit pixels) is the image.

    The same map as bilinearly upsampling the candidate labels' logits and taking the argmax, for a
    fraction of the work (`segcli.postprocess.kernels`: pixels between cells that agree are copied, only
    those between disagreeing cells are interpolated). Memory: the output map plus a few rows.
    `out` (the right shape and dtype) is written into instead of a new array: a reused buffer saves
    the page faults of a fresh one. With `candidates` (from `candidate_logits`), `logits` holds only
    those labels' channels and `num_labels` says how many labels there are in all. `histogram`
    (int64, one per label), when given, receives the number of pixels of each label, counted while
    writing them. `groups` ([K] label of each channel) makes the channels synonyms of fewer labels
    (see `_labels_of`); `candidates` from `candidate_logits` already hold labels.
    """
    from segcli.postprocess.kernels import restore_into

    if candidates is None:
        num_labels = logits.shape[0] if groups is None else int(groups[-1]) + 1
        candidates, cand = candidate_logits(logits, valid_hw, groups)
    else:
        cand = np.ascontiguousarray(logits, np.float32)
    out_h, out_w = out_hw
    if out is None:
        out = np.empty(out_hw, dtype=mask_dtype(num_labels))
    counts = histogram if histogram is not None else np.zeros(num_labels, np.int64)
    if len(candidates) == 1:
        out.fill(candidates[0])
        counts[candidates[0]] += out.size
        return out
    (vh, vw), (lh, lw) = valid_hw, cand.shape[1:]
    y0, y1, wy = _source_coords(out_h, vh, lh)
    x0, x1, wx = _source_coords(out_w, vw, lw)
    restore_into(cand, np.asarray(candidates, np.int64), y0, y1, wy, x0, x1, wx, out, counts)
    return out
