"""The training-free methods' window averaging (torch): each window's logits upsampled to its pixels,
each pixel the mean over the windows that cover it. Where the windows are is segcli.inputs.geometry."""

from __future__ import annotations


def average_windows(window_logits, corners: list[tuple[int, int]], hw: tuple[int, int], window: int):
    """Per-window logits [N,K,window/s,window/s] -> [K,h,w] at the image's pixels: each window
    upsampled (bilinear, align_corners=False) to its pixels, each pixel the mean over the windows
    that cover it (on the logits' device)."""
    import torch.nn.functional as F

    h, w = hw
    total = window_logits.new_zeros((window_logits.shape[1], h, w))
    count = window_logits.new_zeros((1, h, w))
    for logits, (y, x) in zip(window_logits, corners):
        up = F.interpolate(logits[None], size=(window, window), mode="bilinear", align_corners=False)[0]
        total[:, y:y + window, x:x + window] += up[:, :h - y, :w - x]
        count[:, y:y + window, x:x + window] += 1
    return total.div_(count)
