"""The datasets segcli can fetch, prepare and read, as one table (plain data, no torch).

A `Download` is what `segcli data get NAME` fetches and unpacks under ROOT (its archives, checksums
and where they were looked up). A `Benchmark` is how a prepared download is read: its folder layout,
its classes (a named label set, with the peers' spellings and synonyms), and the rule that turns a
stored mask into class indices (0..K-1, 255 = ignore) as mmsegmentation's converters and the
training-free methods' dataset classes define it; it is applied when a mask is read, so nothing is
converted on disk. A new dataset is one entry in each table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = 255


@dataclass(frozen=True)
class Archive:
    """One file to fetch: `checksum` "sha1:HEX" / "md5:HEX" (None where none is published), `size`
    in bytes where known, `source`: where the URL, checksum and size were looked up."""

    name: str
    url: str | None  # None: behind a login; the user brings the file (--from)
    checksum: str | None
    size: int | None
    source: str
    splits: tuple[str, ...] = ("train", "val")  # which splits need it


@dataclass(frozen=True)
class Download:
    name: str
    title: str
    folder: str  # what ROOT/FOLDER holds once prepared
    archives: tuple[Archive, ...]
    licence: str
    size_text: str  # for `data list`
    login: bool = False
    # (path as unpacked, path inside FOLDER): each archive unpacks into a folder named after it
    # (ADEChallengeData2016.zip -> ADEChallengeData2016/...); without moves, every archive's contents
    # go into FOLDER as they are
    moves: tuple[tuple[str, str], ...] = ()
    manual: str = ""  # what to do when it cannot be fetched or made here
    prepared_elsewhere: bool = False  # segcli cannot make its masks: only --from a converted folder


@dataclass(frozen=True)
class Benchmark:
    """A dataset as models are evaluated on it. `images`/`masks`: per split, (folder, suffix) under
    the download's folder; `listing`: per split, a text file of image stems (else every image)."""

    name: str
    download: str
    labels: str  # a named label set (segcli.vocabulary.labels)
    images: dict[str, tuple[str, str]]
    masks: dict[str, tuple[str, str]]
    lut: tuple[int, ...]  # stored mask value -> class index (256 entries)
    listing: dict[str, str] = field(default_factory=dict)
    background: bool = False  # class 0 is "background": the peers' --bg-threshold 0.1 applies
    short_side: int = 336  # the training-free methods' resize (NACLIP's configs)


def _lut(pairs: dict[int, int], default: int = IGNORE) -> tuple[int, ...]:
    table = [default] * 256
    for stored, index in pairs.items():
        table[stored] = index
    return tuple(table)


IDENTITY = _lut({v: v for v in range(255)})
SHIFT_DOWN = _lut({v: v - 1 for v in range(1, 255)})  # 0 (unlabelled / background) ignored: "reduce_zero_label"
# COCO-Stuff 164k's stuffthingmaps use the 182 COCO ids 0..181, of which these 11 are never used
# (COCO's thing ids have gaps); mmsegmentation's coco_stuff164k.py maps the rest, in order, to 0..170
_COCO_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
_COCO_IDS = [i for i in range(182) if i not in _COCO_UNUSED]
COCO_STUFF_LUT = _lut({cid: k for k, cid in enumerate(_COCO_IDS)})
# COCO-Object as GroupViT's and NACLIP's cvt_coco_object.py make it from the same maps: the 80 things
# (ids <= 90) are 1..80, every stuff id and the unlabelled 255 become background 0
COCO_OBJECT_LUT = _lut({cid: k + 1 for k, cid in enumerate(_COCO_IDS) if cid <= 90}, default=0)
# Cityscapes' labelIds -> the 19 trainIds (cityscapesscripts' labels.py; mmsegmentation's converter
# draws the same ids from the polygons); every other id is ignored
CITYSCAPES_LUT = _lut({7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})

DOWNLOADS: dict[str, Download] = {d.name: d for d in [
    Download("ade20k", "ADE20K (SceneParsing, 150 classes)", "ADEChallengeData2016", (
        Archive("ADEChallengeData2016.zip", "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                "sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7", None,
                "URL: MIT's scene-parsing site; SHA1: gluon-cv's ade20k.py"),
    ), "BSD-3-Clause (images: see the ADE20K terms)", "0.9 GB",
        moves=(("ADEChallengeData2016/ADEChallengeData2016", "."),)),
    Download("voc2012", "PASCAL VOC 2012 (segmentation)", "VOCdevkit/VOC2012", (
        Archive("VOCtrainval_11-May-2012.tar", "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                "md5:6cd6e144f989b92b3379bac3b3de84fd", None, "URL and MD5: torchvision's voc.py"),
    ), "Flickr terms of use (see the VOC site)", "2.0 GB", moves=(("VOCtrainval_11-May-2012/VOCdevkit/VOC2012", "."),)),
    Download("coco-stuff164k", "COCO-Stuff 164k (COCO 2017 images + stuff and thing maps)", "coco_stuff164k", (
        Archive("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip", None, 815_585_330,
                "URL: COCO's download page and mmsegmentation's docs; no checksum published; size: the server's "
                "Content-Length", splits=("val",)),
        Archive("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip", None, 19_336_861_798,
                "URL: COCO's download page; no checksum published; size: the server's Content-Length",
                splits=("train",)),
        Archive("stuffthingmaps_trainval2017.zip",
                "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
                None, None, "URL: the cocostuff repository's README and mmsegmentation's docs; no checksum published"),
    ), "COCO: CC BY 4.0 annotations, Flickr terms for images", "21 GB (val only: 1.5 GB)",
        moves=(("val2017/val2017", "images/val2017"), ("train2017/train2017", "images/train2017"),
               ("stuffthingmaps_trainval2017/val2017", "annotations/val2017"),
               ("stuffthingmaps_trainval2017/train2017", "annotations/train2017"))),
    Download("cityscapes", "Cityscapes (fine annotations, 19 classes)", "cityscapes", (
        Archive("gtFine_trainvaltest.zip", None, None, None, "cityscapes-dataset.com (login)"),
        Archive("leftImg8bit_trainvaltest.zip", None, None, None, "cityscapes-dataset.com (login)"),
    ), "Cityscapes licence (non-commercial, login)", "11 GB", login=True,
        manual="log in at https://www.cityscapes-dataset.com/downloads/, download gtFine_trainvaltest.zip and "
               "leftImg8bit_trainvaltest.zip, then: segcli data get cityscapes --from FOLDER_WITH_BOTH"),
    Download("context", "PASCAL-Context (VOC 2010 + context masks, 59/60 classes)", "VOCdevkit/VOC2010", (
        Archive("VOCtrainval_03-May-2010.tar", "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
                "md5:da459979d0c395079b5c75ee67908abb", None, "URL and MD5: torchvision's voc.py"),
    ), "Flickr terms of use", "1.3 GB + masks", moves=(("VOCtrainval_03-May-2010/VOCdevkit/VOC2010", "."),),
        prepared_elsewhere=True,
        manual="the context masks are made by mmsegmentation's tools/dataset_converters/pascal_context.py (it "
               "needs the Detail API and trainval_merged.json); run it, then: segcli data get context --from "
               "VOCdevkit/VOC2010 (a folder with SegmentationClassContext/ and ImageSets/SegmentationContext/)"),
]}

def _voc_layout(kind: str) -> dict:
    """PASCAL's layout (images, masks, split lists); kind "Context": mmsegmentation's context masks."""
    splits = ("train", "val")
    return {"images": {s: ("JPEGImages", ".jpg") for s in splits},
            "masks": {s: (f"SegmentationClass{kind}", ".png") for s in splits},
            "listing": {s: f"ImageSets/Segmentation{kind}/{s}.txt" for s in splits}}


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("ade20k", "ade20k", "ade20k", {"train": ("images/training", ".jpg"), "val": ("images/validation", ".jpg")},
              {"train": ("annotations/training", ".png"), "val": ("annotations/validation", ".png")}, SHIFT_DOWN),
    Benchmark("voc21", "voc2012", "voc21", lut=IDENTITY, background=True, **_voc_layout("")),
    Benchmark("voc20", "voc2012", "voc20", lut=SHIFT_DOWN, **_voc_layout("")),
    Benchmark("context60", "context", "context60", lut=IDENTITY, background=True, **_voc_layout("Context")),
    Benchmark("context59", "context", "context59", lut=SHIFT_DOWN, **_voc_layout("Context")),
    Benchmark("coco-stuff", "coco-stuff164k", "coco-stuff",
              {s: (f"images/{s}2017", ".jpg") for s in ("train", "val")},
              {s: (f"annotations/{s}2017", ".png") for s in ("train", "val")}, COCO_STUFF_LUT),
    Benchmark("coco-object", "coco-stuff164k", "coco-object",
              {s: (f"images/{s}2017", ".jpg") for s in ("train", "val")},
              {s: (f"annotations/{s}2017", ".png") for s in ("train", "val")}, COCO_OBJECT_LUT, background=True),
    Benchmark("cityscapes", "cityscapes", "cityscapes",
              {s: (f"leftImg8bit/{s}", "_leftImg8bit.png") for s in ("train", "val")},
              {s: (f"gtFine/{s}", "_gtFine_labelIds.png") for s in ("train", "val")}, CITYSCAPES_LUT, short_side=560),
]}
# the eight benchmarks the training-free methods report, in their papers' column order
TRAINING_FREE = ("voc21", "context60", "coco-object", "voc20", "context59", "coco-stuff", "cityscapes", "ade20k")


def lut_array(benchmark: Benchmark) -> np.ndarray:
    return np.asarray(benchmark.lut, np.uint8)
