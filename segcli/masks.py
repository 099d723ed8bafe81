"""From model-resolution logits to a full-resolution label map, without K x H x W memory.

Both functions compute the same thing: the argmax over the candidate labels (best or second best
at some model-resolution cell) of the logits bilinearly upsampled (align_corners=False) to the
photo. `restore_label_map` is the host path (NumPy, single-threaded, work proportional to the
pixels near label boundaries); `restore_label_map_torch` is the device path (plain torch ops that
run wherever the logits are: CUDA, MPS or the CPU).
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


def _candidates(logits: "torch.Tensor") -> "torch.Tensor":
    """Sorted indices of the labels that are best or second best at some cell of logits [K,h,w]."""
    import torch

    top2 = logits.topk(2, dim=0).indices.flatten()
    return torch.bincount(top2, minlength=logits.shape[0]).nonzero().flatten()


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


def _along_x(cand: np.ndarray, p: np.ndarray, row: np.ndarray, xl: np.ndarray, xr: np.ndarray,
             fx: np.ndarray) -> np.ndarray:
    """Candidate `p`'s logit on source row `row`, interpolated along x between columns xl and xr."""
    left = cand[p, row, xl]
    return left + fx * (cand[p, row, xr] - left)


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
        seen = torch.stack([torch.bincount(g.topk(2, dim=0).indices.flatten(), minlength=k) for g in grids])
        chosen = [row.nonzero().flatten() for row in (seen > 0).cpu()]  # one wait for the device
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
    fraction of the work: where the four model-resolution cells around an output pixel agree on
    their best label, interpolation cannot change it (a convex combination keeps a label that beats
    every other at all four corners ahead), so those pixels are filled by copying; only pixels
    between cells that disagree are interpolated, and only for the labels that can win there (a
    label whose best corner is below another's worst corner cannot). Memory: the output map plus a
    few floats per pixel between disagreeing cells. `out` (the right shape and dtype) is written
    into instead of a new array: a reused buffer saves the page faults of a fresh one.
    With `candidates` (from `candidate_logits`), `logits` holds only those labels' channels and
    `num_labels` says how many labels there are in all. `histogram` (int64, one per label), when given,
    receives the number of pixels of each label, worked out from the quads rather than by a pass
    over the whole map. `groups` ([K] label of each channel) makes the channels synonyms of fewer
    labels (see `_labels_of`); `candidates` from `candidate_logits` already hold labels.
    """
    if candidates is None:
        num_labels = logits.shape[0] if groups is None else int(groups[-1]) + 1
        candidates, cand = candidate_logits(logits, valid_hw, groups)
    else:
        cand = np.asarray(logits, np.float32)
    out_h, out_w = out_hw
    dtype = mask_dtype(num_labels)
    vh, vw = valid_hw
    lh, lw = cand.shape[1:]
    if out is None:
        out = np.empty(out_hw, dtype=dtype)
    if len(candidates) == 1:
        out.fill(candidates[0])
        if histogram is not None:
            histogram[candidates[0]] += out.size
        return out
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
    y0, _, wy = _source_coords(out_h, vh, lh)
    x0, x1, wx = _source_coords(out_w, vw, lw)
    np.take(quad_label[:, x0], y0, axis=0, out=out)  # [H,W]: every pixel of an agreeing quad is done
    written = []  # the labels of the pixels between disagreeing cells, for `histogram`
    starts = np.searchsorted(y0, np.arange(lh + 1))  # output rows of band i: starts[i]:starts[i+1]
    band_rows = np.diff(starts)
    winners = can_win.sum(0)

    flat = out.reshape(-1)
    band, col = np.nonzero((~uniform)[:, x0] & (band_rows > 0)[:, None])  # (band, column) of disagreeing quads
    if histogram is not None:  # agreeing quads: rows of the band x columns that fall in the quad
        area = np.outer(band_rows, np.bincount(x0, minlength=lw))
        histogram += np.bincount(labels[best][uniform].astype(np.int64), weights=area[uniform],
                                 minlength=len(histogram)).astype(np.int64)[:len(histogram)]
    if band.size == 0:
        return out
    quad_winners = winners[band, x0[col]]
    # groups of equal winner count, each with its longest bands first, so that "the bands that still
    # have a row k" is a prefix of the group and every step works on views (one radix sort for all)
    tallest = band_rows.max()
    key = quad_winners.astype(np.int64) * (tallest + 1) + (tallest - band_rows[band])
    order = np.argsort(key.astype(np.uint16) if key.max() < 1 << 16 else key, kind="stable")
    band, col, quad_winners = band[order], col[order], quad_winners[order]
    bounds = np.flatnonzero(np.diff(quad_winners)) + 1
    for g0, g1 in zip(np.r_[0, bounds], np.r_[bounds, band.size]):
        b, c, n_win = band[g0:g1], col[g0:g1], int(quad_winners[g0])
        rows, first_row = band_rows[b], starts[b]
        target = first_row * out_w + c  # flat index of each (band, column)'s first output pixel
        xl, xr, fx = x0[c], x1[c], wx[c]
        quad = (b, xl)
        if n_win == 2:  # two regions meet: the sign of one bilinear difference decides
            pa = can_win.argmax(0)[quad]  # the lower candidate: it wins ties, as argmax does
            pb = len(candidates) - 1 - can_win[::-1].argmax(0)[quad]
            top = _along_x(cand, pa, b, xl, xr, fx) - _along_x(cand, pb, b, xl, xr, fx)
            step = _along_x(cand, pa, below[b], xl, xr, fx) - _along_x(cand, pb, below[b], xl, xr, fx) - top
            la, lb = labels[pa], labels[pb]
            for k in range(int(rows[0])):
                n = int(np.searchsorted(-rows, -k, side="left"))  # bands with more than k rows
                first = top[:n] + wy[first_row[:n] + k] * step[:n] >= 0
                flat[target[:n] + k * out_w] = chosen = np.where(first, la[:n], lb[:n])
                if histogram is not None:
                    written.append(chosen)
        else:  # three or more regions meet: argmax over the quad's possible winners
            ps = np.argsort(~can_win[:, b, xl].T, axis=1, kind="stable")[:, :n_win].T  # [n_win, n], ascending
            top = _along_x(cand, ps, b, xl, xr, fx)
            step = _along_x(cand, ps, below[b], xl, xr, fx) - top
            for k in range(int(rows[0])):
                n = int(np.searchsorted(-rows, -k, side="left"))
                best_slot = (top[:, :n] + wy[first_row[:n] + k] * step[:, :n]).argmax(0)  # ties: the lower label
                flat[target[:n] + k * out_w] = chosen = labels[np.take_along_axis(ps[:, :n], best_slot[None], 0)[0]]
                if histogram is not None:
                    written.append(chosen)
    if histogram is not None and written:
        histogram += np.bincount(np.concatenate(written), minlength=len(histogram))[:len(histogram)]
    return out
