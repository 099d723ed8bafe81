"""The host's per-pixel loops, compiled (numba): they run in predict's worker processes, where
NumPy's whole-array passes and temporaries cost several times the work itself.

`restore_into`: the full-size label map from the candidate labels' logits at model resolution, in
one pass over the output. Where the four cells around an output pixel share their best label,
bilinear interpolation cannot change it (a convex combination keeps a label that beats every other
at all four corners ahead), so those pixels are copied; between cells that disagree, only the
labels that can win there (best corner >= the best worst corner of any label) are interpolated.
Rows of one band (the output rows between the same two cell rows) share everything but the
vertical weight: each band's first row is built once and copied, and only its disagreeing pixels
are redone, from values interpolated along x once per band.

`blend_into`: the overlay, the photo blended with its label colors, in place, through a table of
every (label, photo value) pair's blend made by cv2.addWeighted itself: the same pixels as coloring
the map and blending, without the colored image.

Compiled code does not check its indices, so each loop is called through a Python function that
checks every array's shape, dtype, layout and index range first and raises KernelInputError (one
line) instead of reading or writing out of bounds; the checks cost a few microseconds plus one pass
over the per-row and per-column taps.

Imported on first use: numba costs a fraction of a second to import, which commands that never
restore a map should not pay.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import njit


def _compiled(fn):
    """njit with an on-disk cache (compiling takes ~1.5 s, loading it ~0.1 s); without a writable
    cache folder (a read-only install and home), compiled once per process instead."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba found nowhere to write its cache
        return njit(nogil=True)(fn)


class KernelInputError(ValueError):
    """Arrays that do not fit a compiled loop: refused before the loop could index out of bounds."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise KernelInputError(f"compiled loop refused its input: {what}")


def _array(a, name: str, dtypes: tuple, ndim: int, writeable: bool = False, rows_contiguous: bool = False) -> None:
    """`a` is an ndarray of one of `dtypes` and `ndim` dimensions, C-contiguous (or, with
    `rows_contiguous`, contiguous along its last axis: a view of PNG rows), writeable if asked."""
    _need(isinstance(a, np.ndarray), f"{name} is {type(a).__name__}, not a NumPy array")
    _need(a.dtype in dtypes, f"{name} is {a.dtype}, not {' or '.join(str(np.dtype(d)) for d in dtypes)}")
    _need(a.ndim == ndim, f"{name} has {a.ndim} dimensions, not {ndim}")
    if rows_contiguous:
        _need(a.shape[-1] <= 1 or a.strides[-1] == a.itemsize, f"{name}'s rows are not contiguous")
    else:
        _need(a.flags.c_contiguous, f"{name} is not C-contiguous")
    _need(not writeable or a.flags.writeable, f"{name} is read-only")


def _taps(lo, hi, weight, name: str, size: int, cells: int) -> None:
    """One axis's bilinear taps: `size` of each, indices within `cells`, lower <= upper, not decreasing."""
    for a, what, dtype in ((lo, "lower", np.int64), (hi, "upper", np.int64), (weight, "weight", np.float32)):
        _array(a, f"{name} {what} taps", (dtype,), 1)
        _need(a.shape[0] == size, f"{name} has {a.shape[0]} {what} taps for {size} output pixels")
    if size:
        _need(min(int(lo.min()), int(hi.min())) >= 0 and max(int(lo.max()), int(hi.max())) < cells,
              f"{name} taps outside the {cells} cells")
        _need(bool(np.all(hi >= lo)) and bool(np.all(np.diff(lo) >= 0)), f"{name} taps out of order")


def restore_into(cand, labels, y0, y1, wy, x0, x1, wx, out, counts) -> None:
    """Checked entry to the compiled `_restore_into` (its docstring says what the arrays are):
    KernelInputError, one line, for anything that does not fit."""
    _array(cand, "candidate logits", (np.float32,), 3)
    n_cand, lh, lw = cand.shape
    _need(n_cand >= 1 and lh >= 1 and lw >= 1, f"candidate logits of shape {cand.shape} are empty")
    _need(bool(np.isfinite(cand).all()), "candidate logits hold NaN or infinity (the model's output is broken)")
    _array(labels, "candidate labels", (np.int64,), 1)
    _array(counts, "label counts", (np.int64,), 1, writeable=True)
    _need(labels.shape[0] == n_cand, f"{labels.shape[0]} candidate labels for {n_cand} candidates")
    _need(int(labels.min()) >= 0 and int(labels.max()) < counts.shape[0],
          f"candidate labels outside the {counts.shape[0]} labels counted")
    _array(out, "label map", (np.uint8, np.uint16), 2, writeable=True, rows_contiguous=True)
    _need(int(labels.max()) <= np.iinfo(out.dtype).max, f"labels up to {int(labels.max())} do not fit a {out.dtype} map")
    _taps(y0, y1, wy, "rows", out.shape[0], lh)
    _taps(x0, x1, wx, "columns", out.shape[1], lw)
    _restore_into(cand, labels, y0, y1, wy, x0, x1, wx, out, counts)


def blend_into(photo, mask, table) -> None:
    """Checked entry to the compiled `_blend_into`: KernelInputError, one line, for a photo and label
    map of different sizes (a photo decoded at another orientation than its map, say) or anything
    else that does not fit."""
    _array(photo, "photo", (np.uint8,), 3, writeable=True)
    _need(photo.shape[2] == 3, f"photo has {photo.shape[2]} channels, not 3")
    _array(mask, "label map", (np.uint8,), 2, rows_contiguous=True)
    _need(mask.shape == photo.shape[:2], f"label map {mask.shape[1]}x{mask.shape[0]} and photo "
                                         f"{photo.shape[1]}x{photo.shape[0]} differ in size")
    _array(table, "blend table", (np.uint8,), 3)
    _need(table.shape == (256, 256, 3), f"blend table of shape {table.shape}, not (256, 256, 3)")
    _blend_into(photo, mask, table)


@_compiled
def _restore_into(cand, labels, y0, y1, wy, x0, x1, wx, out, counts):  # pragma: no cover  (compiled)
    """Write the label map into `out` [H,W] (uint8 or uint16) and add its pixels per label to
    `counts` [num_labels] int64.

    cand [P,h,w] float32: the candidates' logits over the image's cells; labels [P] int64: the label
    each candidate stands for; y0, y1 [H] int64, wy [H] float32 and x0, x1 [W], wx [W]: each output
    row's (column's) lower and upper source cell and the upper one's weight (label_map._source_coords).
    Ties go to the lower candidate, as argmax does."""
    n_cand, lh, lw = cand.shape
    out_h, out_w = out.shape
    best = np.empty((lh, lw), np.int64)  # the best candidate of each cell
    for i in range(lh):
        for j in range(lw):
            b, v = 0, cand[0, i, j]
            for p in range(1, n_cand):
                if cand[p, i, j] > v:
                    b, v = p, cand[p, i, j]
            best[i, j] = b
    span = np.zeros(lw + 1, np.int64)  # output columns span[j]:span[j+1] lie between cell columns j and j+1
    for x in range(out_w):
        span[x0[x] + 1] += 1
    for j in range(lw):
        span[j + 1] += span[j]
    # per band, each disagreeing pixel's possible winners: their value on the band's top cell row
    # (interpolated along x) and its change to the bottom one; pixel k's are slots start[k]:start[k+1]
    pixel = np.empty(out_w, np.int64)
    start = np.empty(out_w + 1, np.int64)
    who = np.empty(out_w * n_cand, np.int64)
    top = np.empty(out_w * n_cand, np.float32)
    step = np.empty(out_w * n_cand, np.float32)
    winners = np.empty(n_cand, np.int64)
    y = 0
    while y < out_h:
        i, i1 = y0[y], y1[y]
        end = y
        while end < out_h and y0[end] == i:
            end += 1
        first = out[y]
        n_pixels, slot = 0, 0
        for j in range(lw):
            s, e = span[j], span[j + 1]
            if s == e:
                continue
            j1 = min(j + 1, lw - 1)
            b = best[i, j]
            if best[i1, j] == b and best[i, j1] == b and best[i1, j1] == b:
                label = labels[b]
                for x in range(s, e):
                    first[x] = label
                counts[label] += (e - s) * (end - y)
                continue
            worst = -np.inf
            for p in range(n_cand):
                low = min(min(cand[p, i, j], cand[p, i, j1]), min(cand[p, i1, j], cand[p, i1, j1]))
                worst = max(worst, low)
            n = 0
            for p in range(n_cand):
                if max(max(cand[p, i, j], cand[p, i, j1]), max(cand[p, i1, j], cand[p, i1, j1])) >= worst:
                    winners[n] = p
                    n += 1
            for x in range(s, e):
                fx, c1 = wx[x], x1[x]
                pixel[n_pixels] = x
                start[n_pixels] = slot
                for t in range(n):
                    p = winners[t]
                    upper = cand[p, i, j] + fx * (cand[p, i, c1] - cand[p, i, j])
                    lower = cand[p, i1, j] + fx * (cand[p, i1, c1] - cand[p, i1, j])
                    who[slot], top[slot], step[slot] = p, upper, lower - upper
                    slot += 1
                n_pixels += 1
        start[n_pixels] = slot
        for r in range(y, end):
            row = out[r]
            if r > y:
                for x in range(out_w):
                    row[x] = first[x]
            fy = wy[r]
            for k in range(n_pixels):
                s0, s1 = start[k], start[k + 1]
                bp, bv = who[s0], top[s0] + fy * step[s0]
                for s in range(s0 + 1, s1):
                    v = top[s] + fy * step[s]
                    if v > bv:
                        bp, bv = who[s], v
                label = labels[bp]
                row[pixel[k]] = label
                counts[label] += 1
        y = end


@_compiled
def _blend_into(photo, mask, table):  # pragma: no cover  (compiled)
    """photo [H,W,3] uint8 (in place) <- table[mask, photo, channel]; mask [H,W] uint8, table
    [256,256,3] uint8 (render.blend_table)."""
    out_h, out_w = mask.shape
    for y in range(out_h):
        for x in range(out_w):
            label = mask[y, x]
            for c in range(3):
                photo[y, x, c] = table[label, photo[y, x, c], c]


def warm_up() -> None:
    """Compile (or load from the cache) the 8-bit specialisations now, for contiguous maps and for
    maps inside PNG rows (render.png_rows): called where worker processes are forked from, so that
    each worker does not pay it again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coords = np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(2, np.float32)
        for mask in (np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8)[:, 1:]):
            restore_into(np.zeros((2, 2, 2), np.float32), np.arange(2, dtype=np.int64), *coords, *coords,
                         mask, np.zeros(2, np.int64))
            blend_into(np.zeros((2, 2, 3), np.uint8), mask, np.zeros((256, 256, 3), np.uint8))
