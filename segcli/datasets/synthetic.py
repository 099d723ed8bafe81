"""Procedurally drawn scenes with per-pixel ground truth, for watching training work in minutes.

Each scene is one or two textured backgrounds (split by a wavy horizon) with a few textured shapes
on top. Every class has its own colour range and texture, so a small model can learn them; shapes,
sizes, brightness and noise vary. Scene i of a split is a pure function of (seed, split, i).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

BACKGROUNDS = ("grass", "sky", "sand", "water")
OBJECTS = ("ball", "box", "leaf")
SYNTHETIC_CLASSES = BACKGROUNDS + OBJECTS
SPLIT_IDS = {"train": 0, "val": 1}

# (base RGB, texture): textures differ so that colour alone is not the only cue
_LOOK = {
    "grass": ((60, 150, 50), "noise"),
    "sky": ((120, 170, 235), "gradient"),
    "sand": ((215, 190, 130), "speckle"),
    "water": ((30, 90, 150), "waves"),
    "ball": ((220, 40, 40), "flat"),
    "box": ((140, 90, 40), "stripes"),
    "leaf": ((250, 220, 30), "checker"),
}


def _texture(kind: str, base, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gain = rng.uniform(0.8, 1.15)
    img = np.tile(np.array(base, np.float32) * gain, (h, w, 1))
    if kind == "noise":
        img += rng.normal(0, 18, (h, w, 1))
    elif kind == "gradient":
        img += (yy / max(h, 1) * 40 - 20)[..., None]
    elif kind == "speckle":
        img += (rng.random((h, w, 1)) < 0.15) * rng.uniform(-60, -30)
    elif kind == "waves":
        img += (np.sin(yy / rng.uniform(2.5, 4.0) + np.sin(xx / 9.0)) * 25)[..., None]
    elif kind == "stripes":
        period = rng.uniform(5, 9)
        img += ((np.floor((xx + yy) / period) % 2) * 45 - 22)[..., None]
    elif kind == "checker":
        size = int(rng.integers(4, 8))
        img += (((xx // size + yy // size) % 2) * 50 - 25)[..., None]
    return img


def synthetic_scene(seed: int, split: str, index: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image [H,W,3] uint8 RGB, mask [H,W] uint8 with values 0..len(SYNTHETIC_CLASSES)-1)."""
    rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 2), index])
    h, w = size or (int(rng.integers(128, 224)), int(rng.integers(128, 224)))
    mask = np.zeros((h, w), np.uint8)
    top, bottom = rng.choice(len(BACKGROUNDS), size=2, replace=rng.random() < 0.3)
    horizon = h * rng.uniform(0.3, 0.7) + np.sin(np.arange(w) / rng.uniform(8, 30)) * rng.uniform(0, 10)
    below = np.arange(h)[:, None] > horizon[None, :]
    mask[:] = top
    mask[below] = bottom
    for _ in range(int(rng.integers(1, 5))):
        cls = len(BACKGROUNDS) + int(rng.integers(len(OBJECTS)))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        r = int(rng.integers(min(h, w) // 10, min(h, w) // 4))
        shape = OBJECTS[cls - len(BACKGROUNDS)]
        if shape == "ball":
            cv2.circle(mask, (cx, cy), r, int(cls), -1)
        elif shape == "box":
            angle = rng.uniform(0, 180)
            box = cv2.boxPoints(((cx, cy), (2 * r, r * rng.uniform(0.8, 1.6)), angle)).astype(np.int32)
            cv2.fillPoly(mask, [box], int(cls))
        else:
            cv2.ellipse(mask, (cx, cy), (r, max(2, r // 2)), rng.uniform(0, 180), 0, 360, int(cls), -1)
    image = np.zeros((h, w, 3), np.float32)
    for cls in np.unique(mask):
        base, kind = _LOOK[SYNTHETIC_CLASSES[cls]]
        image[mask == cls] = _texture(kind, base, (h, w), rng)[mask == cls]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_synthetic_dataset(out: str | Path, train: int = 400, val: int = 100, seed: int = 0) -> Path:
    """Write scenes in the `folder:` layout: {train,val}/images/*.png, {train,val}/masks/*.png, classes.txt."""
    from PIL import Image

    from segcli.files.atomic import atomic_path, atomic_write_bytes

    out = Path(out)
    for split, count in (("train", train), ("val", val)):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = synthetic_scene(seed, split, i)
            for arr, sub in ((image, "images"), (mask, "masks")):
                with atomic_path(out / split / sub / f"{i:05d}.png") as tmp:
                    Image.fromarray(arr).save(tmp, format="PNG")
    atomic_write_bytes(out / "classes.txt", ("\n".join(SYNTHETIC_CLASSES) + "\n").encode())
    return out
