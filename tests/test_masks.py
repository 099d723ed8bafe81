from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segcli.postprocess.label_map import batch_candidate_logits, candidate_logits, mask_dtype, restore_label_map


def test_restore_equals_full_bilinear_upsampling_then_argmax():
    torch.manual_seed(0)
    logits = torch.randn(12, 24, 32) * 3
    full = F.interpolate(logits[None], size=(300, 400), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    ours = restore_label_map(logits, (24, 32), (300, 400))
    assert (ours == full).mean() > 0.999
    from segcli.postprocess.label_map import restore_label_map_torch

    chunked = restore_label_map_torch(logits, (24, 32), (300, 400), max_elements=5000)
    assert np.array_equal(chunked, restore_label_map_torch(logits, (24, 32), (300, 400)))
    assert (chunked == full).mean() > 0.999


def test_restore_ignores_padding_beyond_the_valid_region():
    logits = torch.zeros(2, 16, 16)
    logits[1, :, 8:] = 5.0  # label 1 only in the padded right half
    mask = restore_label_map(logits, (16, 8), (50, 40))
    assert mask.shape == (50, 40) and (mask == 0).all()


def test_boundaries_are_sharp_and_smooth():
    logits = torch.zeros(2, 8, 8)
    logits[0] = 0.5
    logits[1, :, 4:] = 1.0  # crossover half-way between source columns 3 and 4: output x = 40
    mask = restore_label_map(logits, (8, 8), (80, 80))
    assert set(np.unique(mask)) == {0, 1}
    assert (mask[:, :38] == 0).all() and (mask[:, 42:] == 1).all()


def test_mask_dtype_and_label_counts():
    assert mask_dtype(255) == np.uint8 and mask_dtype(256) == np.uint16
    logits = torch.randn(300, 4, 4)
    counts = np.zeros(300, np.int64)
    mask = restore_label_map(logits, (4, 4), (10, 10), histogram=counts)
    assert mask.dtype == np.uint16 and counts.sum() == 100
    assert np.array_equal(counts, np.bincount(mask.ravel(), minlength=300))
    from segcli.pipeline.host import present_labels

    fractions, present = present_labels(np.array([1, 3, 0]))
    assert fractions.tolist() == [0.25, 0.75, 0.0] and present == [1, 0]


def test_host_and_device_restoration_agree_on_hard_maps():
    """The boundary-only NumPy path against the all-pixels torch path, where many labels meet."""
    from segcli.postprocess.label_map import restore_label_map_torch

    gen = torch.Generator().manual_seed(1)
    for k, grid, out, valid in [(8, (32, 24), (301, 397), (31.5, 23.25)), (40, (48, 48), (500, 260), (48, 25.0)),
                                (300, (12, 16), (97, 131), (12, 16))]:
        coarse = torch.randn(k, grid[0] // 4 + 1, grid[1] // 4 + 1, generator=gen) * 3
        logits = F.interpolate(coarse[None], size=grid, mode="bicubic", align_corners=False)[0]
        host = restore_label_map(logits, valid, out)
        device = restore_label_map_torch(logits, valid, out)
        assert host.dtype == device.dtype and host.shape == device.shape == out
        assert (host != device).mean() < 1e-4  # interpolation ties only
    # the candidate set: a label that is never best or second best never appears
    logits = torch.zeros(3, 4, 4)
    logits[0, :, :2], logits[1, :, 2:], logits[2] = 2.0, 2.0, -5.0
    assert set(np.unique(restore_label_map(logits, (4, 4), (40, 40)))) == {0, 1}


def test_host_restoration_equals_the_device_path_on_random_small_cases():
    """Edge cases: one-cell grids, fractional extents, outputs smaller than the grid, many labels."""
    from segcli.postprocess.label_map import restore_label_map_torch

    gen = torch.Generator().manual_seed(5)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    for _ in range(300):
        k, h, w = draw(2, 12), draw(1, 9), draw(1, 9)
        logits = torch.randn(k, h, w, generator=gen)
        valid = (h - float(torch.rand(1, generator=gen)) * 0.9, w - float(torch.rand(1, generator=gen)) * 0.9)
        out_hw = (draw(1, 60), draw(1, 60))
        counts = np.zeros(k, np.int64)
        host = restore_label_map(logits, valid, out_hw, histogram=counts)
        assert np.array_equal(host, restore_label_map_torch(logits, valid, out_hw))
        assert np.array_equal(counts, np.bincount(host.ravel(), minlength=k))  # counted without a pass over the map


def test_exact_ties_go_to_the_lower_label_as_argmax_does():
    """Labels tied for best (or second) are all candidates, so the lower one wins as in a full argmax."""
    logits = torch.zeros(4, 6, 6)
    logits[2, :, :3] = 1.0
    logits[3, :, :3] = 1.0  # tied with label 2 on the left half
    logits[1, :, 3:] = 2.0  # best on the right half; labels 0, 2 and 3 tie for second there
    full = F.interpolate(logits[None], size=(30, 41), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    counts = np.zeros(4, np.int64)
    assert np.array_equal(restore_label_map(logits, (6, 6), (30, 41), histogram=counts), full)
    assert candidate_logits(logits, (6, 6))[0].tolist() == [0, 1, 2, 3]
    assert counts[3] == 0 and counts[2] > 0


def test_batch_candidate_selection_equals_the_per_image_one():
    """One ranking and one copy per batch pick what candidate_logits picks image by image, over each
    image's own cells only (the padding beyond them never counts)."""
    gen = torch.Generator().manual_seed(3)
    valids = [(12.0, 16.0), (7.5, 16.0), (16.0, 3.25), (1.0, 1.0)]
    for k in (1, 2, 5, 40):
        logits = F.interpolate(torch.randn(4, k, 4, 4, generator=gen), size=(16, 16), mode="bilinear")
        logits[:, -1, :14] -= 100  # the last label ranks last in rows 0-13 and first below them
        logits[:, :, 14:, :] += torch.arange(k).view(1, k, 1, 1) * 100
        got = batch_candidate_logits(logits, valids)
        for i, valid in enumerate(valids):
            want_idx, want = candidate_logits(logits[i], valid)
            assert np.array_equal(got[i][0], want_idx)
            assert got[i][1].dtype == np.float32 and np.array_equal(got[i][1], want)
        if k > 2:  # the images that do not reach row 14 do not have it as a candidate; the one that does has
            assert k - 1 not in got[1][0] and k - 1 in got[2][0]
