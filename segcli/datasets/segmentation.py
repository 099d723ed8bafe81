"""Segmentation datasets (the catalog's benchmarks, folder:PATH, synthetic), their checks and LSeg's augmentation.

Every dataset yields (image [H,W,3] uint8 RGB, mask [H,W] uint8) with class values 0..K-1 and
IGNORE_INDEX (255) for pixels that do not count.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from segcli.datasets.catalog import BENCHMARKS, DOWNLOADS, Benchmark, lut_array
from segcli.datasets.prepare import default_root, get_command
from segcli.datasets.synthetic import SYNTHETIC_CLASSES, synthetic_scene
from segcli.errors import SegcliError
from segcli.inputs.images import IMAGE_SUFFIXES, load_image
from segcli.vocabulary.labels import IGNORE_INDEX, LabelSet, named_label_set

SPLITS = ("train", "val")
SYNTHETIC_SIZES = {"train": 400, "val": 100}
LSEG_BASE_OVER_CROP = 520 / 480  # LSeg's base size relative to its crop size


@dataclass(frozen=True)
class Sample:
    name: str  # shown in errors and reports
    image: Path | None = None
    mask: Path | None = None
    index: int = 0  # synthetic scenes


class SegmentationData:
    """One dataset: its classes and, per split, the samples."""

    def __init__(self, name: str, classes: LabelSet, splits: dict[str, list[Sample]],
                 mask_lut: np.ndarray | None = None, seed: int = 0):
        self.name = name
        self.classes = classes
        self.splits = splits
        self.mask_lut = mask_lut  # [256] stored value -> class (ADE20K stores class k as k+1; see catalog)
        self.seed = seed

    def samples(self, split: str) -> list[Sample]:
        if split not in self.splits:
            raise SegcliError(f"{self.name} has no split {split!r} (has {', '.join(self.splits)})")
        return self.splits[split]

    def load(self, split: str, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(image [H,W,3] uint8, mask [H,W] uint8 with 0..K-1 and 255 = ignore)."""
        if sample.image is None:
            return synthetic_scene(self.seed, split, sample.index)
        image = np.asarray(load_image(sample.image))
        return image, self._read_mask(sample.mask)

    def _read_mask(self, path: Path) -> np.ndarray:
        mask = np.asarray(Image.open(path))
        if mask.ndim != 2:
            raise SegcliError(f"{path}: a mask must be a single-channel PNG (got {mask.ndim} channels)")
        if self.mask_lut is not None:
            if mask.dtype != np.uint8:
                raise SegcliError(f"{path}: an 8-bit mask was expected (got {mask.dtype})")
            return self.mask_lut[mask]
        return mask.astype(np.uint8)

    def check(self, splits: tuple[str, ...] = SPLITS, workers: int = 4) -> None:
        """Raise one SegcliError naming the first bad file (and how many more) before any training step."""
        problems: list[str] = []
        for split in splits:
            samples = self.samples(split)
            if not samples:
                problems.append(f"split {split!r} of {self.name} is empty")
                continue
            if samples[0].image is None:
                continue
            with ThreadPoolExecutor(workers) as pool:
                problems += [p for p in pool.map(self._check_sample, samples) if p]
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise SegcliError(f"dataset problem: {problems[0]}{more}")

    def _check_sample(self, sample: Sample) -> str | None:
        if sample.mask is None or not sample.mask.exists():
            return f"{sample.image}: image without mask (expected {sample.mask})"
        try:
            with Image.open(sample.image) as im:
                image_size = im.size
        except (OSError, ValueError) as exc:
            return f"{sample.image}: unreadable image ({exc})"
        try:
            mask = self._read_mask(sample.mask)
        except (OSError, ValueError) as exc:
            return f"{sample.mask}: unreadable mask ({exc})"
        except SegcliError as exc:
            return str(exc)
        if (mask.shape[1], mask.shape[0]) != image_size:
            return (f"{sample.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                    f"{image_size[0]}x{image_size[1]}")
        values = np.unique(mask)
        bad = values[(values >= len(self.classes)) & (values != IGNORE_INDEX)]
        if bad.size:
            return (f"{sample.mask}: mask values {bad[:5].tolist()} are beyond the {len(self.classes)} classes "
                    f"(0..{len(self.classes) - 1}, 255 = ignore)")
        return None


def _paired(images: Path, masks: Path, split_label: str) -> list[Sample]:
    if not images.is_dir():
        raise SegcliError(f"{images} not found: expected the {split_label} images there")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    return [Sample(name=str(p), image=p, mask=masks / (p.stem + ".png")) for p in files]


def open_dataset(spec: str, data_root: str | Path | None = None, seed: int = 0) -> SegmentationData:
    """`ade20k`, `folder:PATH` or `synthetic` -> SegmentationData (files are listed, not read)."""
    if spec == "synthetic":
        classes = LabelSet.from_synonyms([[c] for c in SYNTHETIC_CLASSES], source="synthetic")
        return SegmentationData("synthetic", classes, {
            split: [Sample(name=f"synthetic:{split}/{i}", index=i) for i in range(n)]
            for split, n in SYNTHETIC_SIZES.items()}, seed=seed)
    if spec in BENCHMARKS:
        return _benchmark(BENCHMARKS[spec], default_root(data_root))
    if spec.startswith("folder:"):
        root = Path(spec[len("folder:"):]).expanduser()
        classes_file = root / "classes.txt"
        if not classes_file.is_file():
            raise SegcliError(f"{classes_file} not found: a folder dataset needs one class name per line")
        lines = [line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        if not lines:
            raise SegcliError(f"{classes_file} lists no classes")
        if "" in lines:
            raise SegcliError(f"{classes_file}: line {lines.index('') + 1} is blank (line i names mask value i-1)")
        classes = LabelSet.from_synonyms([[w.strip() for w in line.split(";") if w.strip()] for line in lines],
                                         source="dataset")
        splits = {split: _paired(root / split / "images", root / split / "masks", split)
                  for split in SPLITS if (root / split).is_dir()}
        if not splits:
            raise SegcliError(f"{root} has neither train/ nor val/ (expected PATH/{{train,val}}/images and masks)")
        return SegmentationData(f"folder:{root}", classes, splits)
    raise SegcliError(f"unknown dataset {spec!r}: use {', '.join(BENCHMARKS)}, folder:PATH or synthetic")


def limited(data: SegmentationData, split: str, limit: int | None) -> SegmentationData:
    """`data` with only the first `limit` samples of `split` (a smoke run)."""
    if not limit:
        return data
    return SegmentationData(data.name, data.classes, {split: data.samples(split)[:limit]}, data.mask_lut, data.seed)


def _benchmark(bench: Benchmark, root: Path) -> SegmentationData:
    """A catalog benchmark under `root` as `segcli data get` lays it out; a missing one names the command."""
    folder = root / DOWNLOADS[bench.download].folder
    if not folder.is_dir():
        raise SegcliError(f"{bench.name} not found at {folder}: run {get_command(bench.name, root)} "
                          "(or pass --data-root where it is)")
    splits = {}
    for split, (images, image_suffix) in bench.images.items():
        masks, mask_suffix = bench.masks[split]
        if not (folder / images).is_dir():
            continue  # a split that was not fetched (data get --split val)
        if split in bench.listing:
            try:
                stems = (folder / bench.listing[split]).read_text(encoding="utf-8").split()
            except OSError as exc:
                raise SegcliError(f"{folder / bench.listing[split]}: cannot read the {split} list ({exc.strerror})") from None
            pairs = [(Path(stem + image_suffix), stem) for stem in stems]
        else:
            found = sorted(p.relative_to(folder / images) for p in (folder / images).rglob("*" + image_suffix))
            pairs = [(rel, str(rel)[: -len(image_suffix)]) for rel in found]
        splits[split] = [Sample(name=str(folder / images / rel), image=folder / images / rel,
                                mask=folder / masks / (base + mask_suffix)) for rel, base in pairs]
    if not splits:
        raise SegcliError(f"{folder} holds no {bench.name} images: run {get_command(bench.name, root)}")
    return SegmentationData(bench.name, named_label_set(bench.labels), splits, mask_lut=lut_array(bench))


def augment(image: np.ndarray, mask: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """LSeg's training augmentation: random scale (long side 0.5-2x the base size), pad with the
    ignore value, random crop `crop`x`crop`, horizontal flip. Returns ([crop,crop,3], [crop,crop])."""
    h, w = mask.shape
    long_side = int(rng.uniform(0.5, 2.0) * crop * LSEG_BASE_OVER_CROP)
    scale = long_side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        mask = cv2.copyMakeBorder(mask, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
    y = int(rng.integers(0, mask.shape[0] - crop + 1))
    x = int(rng.integers(0, mask.shape[1] - crop + 1))
    image, mask = image[y:y + crop, x:x + crop], mask[y:y + crop, x:x + crop]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


class TrainingSet(torch.utils.data.Dataset):
    """Indexed by (epoch, sample index): the augmentation depends only on (seed, epoch, index), so
    results do not depend on worker count or on where a resumed run picks up."""

    def __init__(self, data: SegmentationData, crop: int, seed: int):
        self.data, self.crop, self.seed = data, crop, seed
        self.samples = data.samples("train")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image, mask = self.data.load("train", self.samples[index])
        image, mask = augment(image, mask, self.crop, np.random.default_rng([self.seed, epoch, index]))
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask).long()


class EpochBatches(torch.utils.data.Sampler):
    """Global batches of (epoch, index) keys, reshuffled per epoch by (seed, epoch), from a given
    position on, forever; each rank takes its slice of every global batch. The last partial batch
    of an epoch is dropped."""

    def __init__(self, n: int, global_batch: int, seed: int, start: tuple[int, int] = (0, 0),
                 rank: int = 0, world: int = 1):
        if n < global_batch:
            raise SegcliError(f"the training split has {n} samples, fewer than one batch of {global_batch}")
        self.n, self.batch, self.seed, self.start, self.rank, self.world = n, global_batch, seed, start, rank, world
        self.per_epoch = n // global_batch
        self.per_rank = global_batch // world

    def __iter__(self):
        epoch, position = self.start
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for b in range(position, self.per_epoch):
                batch = order[b * self.batch:(b + 1) * self.batch]
                mine = batch[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
                yield [(epoch, int(i)) for i in mine]
            epoch, position = epoch + 1, 0
