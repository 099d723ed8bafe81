"""The compiled loops' boundary: every array is checked before the loop runs (numba does not check
indices), so a mismatch is a one-line KernelInputError, never a write out of bounds."""

from __future__ import annotations

import numpy as np
import pytest

from segcli.postprocess.kernels import KernelInputError, blend_into, restore_into
from segcli.postprocess.label_map import _source_coords


def _restore_args(h=5, w=7, lh=3, lw=4, p=2, labels=3):
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((p, lh, lw)).astype(np.float32)
    return dict(cand=cand, labels=np.arange(p, dtype=np.int64), y0=None, y1=None, wy=None, x0=None, x1=None, wx=None,
                out=np.zeros((h, w), np.uint8), counts=np.zeros(labels, np.int64), rows=_source_coords(h, lh, lh),
                cols=_source_coords(w, lw, lw))


def _call(args):
    y0, y1, wy = args.pop("rows")
    x0, x1, wx = args.pop("cols")
    args.update(y0=args["y0"] if args["y0"] is not None else y0, y1=args["y1"] if args["y1"] is not None else y1,
                wy=args["wy"] if args["wy"] is not None else wy, x0=args["x0"] if args["x0"] is not None else x0,
                x1=args["x1"] if args["x1"] is not None else x1, wx=args["wx"] if args["wx"] is not None else wx)
    restore_into(**args)
    return args


def test_fitting_arrays_restore_a_map_and_count_its_pixels():
    args = _call(_restore_args())
    assert args["counts"].sum() == args["out"].size and set(np.unique(args["out"])) <= {0, 1}


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(out=np.zeros((6, 7), np.uint8)), "rows has 5 lower taps for 6 output pixels"),
    (lambda a: a.update(out=np.zeros((5, 9), np.uint8)), "columns has 7 lower taps for 9 output pixels"),
    (lambda a: a.update(out=np.zeros((5, 7), np.int32)), "label map is int32"),
    (lambda a: a.update(out=np.zeros((5, 7), np.uint8).T.copy().T), "label map's rows are not contiguous"),
    (lambda a: a.update(cand=a["cand"].astype(np.float64)), "candidate logits is float64"),
    (lambda a: a.update(cand=a["cand"][:, :, ::-1]), "candidate logits is not C-contiguous"),
    (lambda a: a.update(cand=np.zeros((2, 0, 4), np.float32)), "are empty"),
    (lambda a: a.update(labels=np.array([0, 7], np.int64)), "candidate labels outside the 3 labels counted"),
    (lambda a: a.update(labels=np.array([0], np.int64)), "1 candidate labels for 2 candidates"),
    (lambda a: a.update(counts=np.zeros(3, np.int32)), "label counts is int32"),
    (lambda a: a.update(y0=np.full(5, 9, np.int64)), "rows taps outside the 3 cells"),
    (lambda a: a.update(x1=np.zeros(7, np.int64)), "columns taps out of order"),
    (lambda a: a.update(wx=np.zeros(7, np.float64)), "columns weight taps is float64"),
    (lambda a: a.update(counts=np.zeros(300, np.int64), labels=np.array([0, 299], np.int64)), "do not fit a uint8 map"),
])
def test_restore_refuses_what_does_not_fit(change, message):
    args = _restore_args()
    change(args)
    before = args["out"].copy()
    with pytest.raises(KernelInputError, match=message.replace("(", r"\(")) as err:
        _call(args)
    assert "\n" not in str(err.value)
    assert np.array_equal(args["out"], before)  # nothing written


@pytest.mark.parametrize("photo,mask,table,message", [
    (np.zeros((590, 88, 3), np.uint8), np.zeros((88, 590), np.uint8), None, "label map 590x88 and photo 88x590 differ"),
    (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.uint8), None, "photo has 4 channels"),
    (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), None, "photo is float32"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint16), None, "label map is uint16"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((255, 256, 3), np.uint8), "blend table of shape"),
])
def test_blend_refuses_what_does_not_fit(photo, mask, table, message):
    table = table if table is not None else np.zeros((256, 256, 3), np.uint8)
    with pytest.raises(KernelInputError, match=message):
        blend_into(photo, mask, table)
    read_only = np.zeros((8, 8, 3), np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(KernelInputError, match="photo is read-only"):
        blend_into(read_only, np.zeros((8, 8), np.uint8), np.zeros((256, 256, 3), np.uint8))


def test_nan_logits_are_refused_not_indexed():
    args = _restore_args()
    args["cand"][1, 1, 1] = np.nan  # what a broken model gives: comparisons fail, no winner would be found
    with pytest.raises(KernelInputError, match="NaN or infinity"):
        _call(args)


def test_maps_smaller_than_their_cells_restore_like_the_reference():
    """Windows give logits at the resized photo's pixels, which for a photo under the short side are
    more than the photo has: the map is then restored from a finer grid (every 4th cell here)."""
    import torch

    from segcli.postprocess.label_map import restore_label_map, restore_label_map_torch

    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.standard_normal((4, 44, 60)).astype(np.float32))
    fast = restore_label_map(logits, (44.0, 60.0), (11, 15))
    reference = restore_label_map_torch(logits, (44.0, 60.0), (11, 15))
    assert np.array_equal(fast, reference)
