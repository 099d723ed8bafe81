"""From model-resolution logits to a full-resolution label map, without K x H x W memory.

Both functions compute the same thing: the argmax over the candidate labels (best or second best
at some model-resolution cell) of the logits bilinearly upsampled (align_corners=False) to the
photo. `restore_label_map` is the host path (NumPy, single-threaded, work proportional to the
pixels near label boundaries); `restore_label_map_torch` is the device path (plain torch ops that
run wherever the logits are: CUDA, MPS or the CPU).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch


def _source_coords(out_size: int, valid: float, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps (align_corners=False) mapping `out_size` pixels onto `valid` source pixels."""
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * (valid / out_size) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=limit - 1)
    hi = (lo + 1).clamp(max=limit - 1)
    return lo, hi, (src - lo).clamp(0, 1)


def image_extent(resized_hw: tuple[int, int], stride: int) -> tuple[float, float]:
    """Exact extent, in model-resolution cells, of an image covering `resized_hw` input pixels."""
    return resized_hw[0] / stride, resized_hw[1] / stride


def mask_dtype(num_labels: int) -> np.dtype:
    return np.dtype(np.uint8) if num_labels <= 255 else np.dtype(np.uint16)


def restore_label_map_torch(logits: torch.Tensor, valid_hw: tuple[float, float], out_hw: tuple[int, int],
                            max_elements: int = 1 << 23, as_tensor: bool = False) -> np.ndarray | torch.Tensor:
    """Label map [H,W] from logits [K,h,w] whose top-left `valid_hw` (in logit pixels) is the image.

    Equivalent to bilinearly upsampling the logits to [K,H,W] and taking the argmax, but only the
    candidate labels (best or second best at some model-resolution pixel) are interpolated, in row
    chunks of at most `max_elements` values: a 24-megapixel photo with 150 labels needs tens of MB,
    not 14 GB, and boundaries stay smooth rather than blocky.
    """
    num_labels = logits.shape[0]
    out_h, out_w = out_hw
    dtype = mask_dtype(num_labels)
    vh, vw = valid_hw
    lh, lw = min(logits.shape[1], math.ceil(vh)), min(logits.shape[2], math.ceil(vw))
    logits = logits[:, :lh, :lw].float()
    device = logits.device
    if num_labels == 1:
        zeros = torch.zeros(out_hw, dtype=torch.int64, device=device)
        return zeros if as_tensor else zeros.cpu().numpy().astype(dtype)
    top2 = logits.topk(2, dim=0).indices
    candidates = torch.unique(top2)
    sub = logits[candidates]  # [P, lh, lw]
    y0, y1, wy = (t.to(device) for t in _source_coords(out_h, vh, lh))
    x0, x1, wx = (t.to(device) for t in _source_coords(out_w, vw, lw))
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


def _along_x(cand: np.ndarray, p: np.ndarray, row: np.ndarray, xl: np.ndarray, xr: np.ndarray,
             fx: np.ndarray) -> np.ndarray:
    """Candidate `p`'s logit on source row `row`, interpolated along x between columns xl and xr."""
    left = cand[p, row, xl]
    return left + fx * (cand[p, row, xr] - left)


def _taps(out_size: int, valid: float, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_source_coords` in NumPy: (lower tap, upper tap, float32 weight) per output pixel."""
    lo, hi, w = _source_coords(out_size, valid, limit)
    return lo.numpy(), hi.numpy(), w.numpy()


def restore_label_map(logits: torch.Tensor | np.ndarray, valid_hw: tuple[float, float], out_hw: tuple[int, int],
                      out: np.ndarray | None = None) -> np.ndarray:
    """Label map [H,W] from logits [K,h,w] whose top-left `valid_hw` (in logit pixels) is the image.

    The same map as bilinearly upsampling the candidate labels' logits and taking the argmax, for a
    fraction of the work: where the four model-resolution cells around an output pixel agree on
    their best label, interpolation cannot change it (a convex combination keeps a label that beats
    every other at all four corners ahead), so those pixels are filled by copying; only pixels
    between cells that disagree are interpolated, and only for the labels that can win there (a
    label whose best corner is below another's worst corner cannot). Memory: the output map plus a
    few floats per pixel between disagreeing cells. `out` (the right shape and dtype) is written
    into instead of a new array: a reused buffer saves the page faults of a fresh one.
    """
    num_labels = logits.shape[0]
    out_h, out_w = out_hw
    dtype = mask_dtype(num_labels)
    vh, vw = valid_hw
    lh, lw = min(logits.shape[1], math.ceil(vh)), min(logits.shape[2], math.ceil(vw))
    grid = logits.float().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, np.float32)
    grid = np.ascontiguousarray(grid[:, :lh, :lw])
    if out is None:
        out = np.empty(out_hw, dtype=dtype)
    if num_labels == 1:
        out.fill(0)
        return out
    first = grid.argmax(0)
    runner_up = np.where(np.arange(num_labels)[:, None, None] == first, -np.inf, grid).argmax(0)
    candidates = np.flatnonzero(np.bincount(np.concatenate([first.ravel(), runner_up.ravel()]), minlength=num_labels))
    cand = grid[candidates]  # [P, lh, lw]
    best = cand.argmax(0)  # [lh, lw], index into candidates
    below, right = np.minimum(np.arange(lh) + 1, lh - 1), np.minimum(np.arange(lw) + 1, lw - 1)
    c01, c10 = cand[:, :, right], cand[:, below]
    c11 = c10[:, :, right]
    uniform = (best == best[below]) & (best == best[:, right]) & (best == best[below][:, right])
    # a label can win somewhere in a quad only if its best corner reaches the best worst corner of any label
    worst = np.minimum(np.minimum(cand, c01), np.minimum(c10, c11)).max(0)
    can_win = np.maximum(np.maximum(cand, c01), np.maximum(c10, c11)) >= worst  # [P, lh, lw]
    sentinel = np.iinfo(dtype).max  # never a label: K <= 255 for uint8, <= 65535 for uint16
    labels = candidates.astype(dtype)
    quad_label = np.where(uniform, labels[best], sentinel).astype(dtype)
    y0, _, wy = _taps(out_h, vh, lh)
    x0, x1, wx = _taps(out_w, vw, lw)
    np.take(quad_label[:, x0], y0, axis=0, out=out)  # [H,W]: every pixel of an agreeing quad is done
    starts = np.searchsorted(y0, np.arange(lh + 1))  # output rows of band i: starts[i]:starts[i+1]
    counts = np.diff(starts)
    winners = can_win.sum(0)

    flat = out.reshape(-1)
    mixed = (~uniform)[:, x0] & (counts > 0)[:, None]  # [lh, W]: (band, column) of disagreeing quads
    many = winners[~uniform].max(initial=0) > 2
    ranked = np.argsort(~can_win, axis=0, kind="stable") if many else None  # possible winners first, ascending
    for n_win in np.unique(winners[~uniform]):
        # every (band, column) whose quad has n_win possible winners, longest bands first, so that
        # "the bands that still have a row k" is a prefix and each step works on views
        band, col = np.nonzero(mixed & (winners == n_win)[:, x0])
        order = np.argsort(-counts[band].astype(np.int16), kind="stable")  # radix sort: band heights are small
        band, col = band[order], col[order]
        rows = counts[band]
        quad = (band, x0[col])
        xl, xr, fx = x0[col], x1[col], wx[col]
        if n_win == 2:  # two regions meet: the sign of one bilinear difference decides
            pa = can_win.argmax(0)[quad]  # the lower candidate: it wins ties, as argmax does
            pb = len(candidates) - 1 - can_win[::-1].argmax(0)[quad]
            top = _along_x(cand, pa, band, xl, xr, fx) - _along_x(cand, pb, band, xl, xr, fx)
            bottom = _along_x(cand, pa, below[band], xl, xr, fx) - _along_x(cand, pb, below[band], xl, xr, fx)
            step, la, lb = bottom - top, labels[pa], labels[pb]
            for k in range(int(rows[0])):
                n = int(np.searchsorted(-rows, -k, side="left"))  # bands with more than k rows
                r = starts[band[:n]] + k
                flat[r * out_w + col[:n]] = np.where(top[:n] + wy[r] * step[:n] >= 0, la[:n], lb[:n])
        else:  # three or more regions meet: argmax over the quad's possible winners
            ps = ranked[(slice(0, n_win),) + quad]  # [n_win, n]
            top = _along_x(cand, ps, band, xl, xr, fx)
            step = _along_x(cand, ps, below[band], xl, xr, fx) - top
            for k in range(int(rows[0])):
                n = int(np.searchsorted(-rows, -k, side="left"))
                r = starts[band[:n]] + k
                best_slot = (top[:, :n] + wy[r] * step[:, :n]).argmax(0)  # ties: the lower label, as argmax
                flat[r * out_w + col[:n]] = labels[np.take_along_axis(ps[:, :n], best_slot[None], 0)[0]]
    return out


def label_fractions(mask: np.ndarray, num_labels: int) -> np.ndarray:
    """Fraction of pixels per label, [K] float64."""
    if mask.dtype == np.uint8 and num_labels <= 256:  # a histogram, without bincount's int64 copy of the map
        counts = cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel()[:num_labels].astype(np.int64)
    else:
        counts = np.bincount(mask.ravel(), minlength=num_labels)
    return counts / max(1, mask.size)
