"""Label sets: "road,car,sky", "road;street" synonyms, @file.txt, named sets (ade20k), colors."""

from __future__ import annotations

import colorsys
import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from segcli.errors import SegcliError

# Readable, mutually distinct colors for the first labels of a custom list (RGB).
_BASE_PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]

IGNORE_INDEX = 255  # the value of mask pixels that do not count (unlabelled; padding), in training and metrics
# the benchmarks' class names as the training-free methods' class-name files spell them (NACLIP's
# configs/cls_*.txt: one class per line, its synonyms after commas; background first where there is one)
DATASET_SETS = {"voc21": "voc21.txt", "voc20": "voc20.txt", "context60": "context60.txt", "context59": "context59.txt",
                "coco-stuff": "coco_stuff171.txt", "coco-object": "coco_object.txt", "cityscapes": "cityscapes.txt"}
NAMED_SETS = ("ade20k", *DATASET_SETS)
# named prompt sets: --prompt NAME runs every label through each template and averages them
PROMPT_SETS = {"imagenet80": "imagenet80_templates.txt"}


def prompt_templates(prompt: str | None) -> list[str | None]:
    """A --prompt value -> its templates: [None] (the raw label), [one template with {}], or the
    templates of a named set (CLIP's 80 ImageNet templates for "imagenet80"). SegcliError otherwise."""
    if prompt is None:
        return [None]
    if prompt in PROMPT_SETS:
        text = resources.files("segcli.assets").joinpath(PROMPT_SETS[prompt]).read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if "{}" not in prompt:
        raise SegcliError(f"--prompt {prompt!r} must contain {{}} where the label goes, or name a prompt set "
                          f"({', '.join(PROMPT_SETS)})")
    return [prompt]


@dataclass(frozen=True)
class LabelSet:
    """K labels; label k is channel k of the logits and value k of a mask."""

    names: tuple[str, ...]  # display name: the first synonym
    synonyms: tuple[tuple[str, ...], ...]  # every label has at least one
    colors: tuple[tuple[int, int, int], ...]
    source: str = "custom"  # "custom" or a named set

    def __len__(self) -> int:
        return len(self.names)

    def to_json(self) -> list[dict]:
        return [
            {"index": i, "label": name, "synonyms": list(syn), "color": list(color)}
            for i, (name, syn, color) in enumerate(zip(self.names, self.synonyms, self.colors))
        ]

    @classmethod
    def from_json(cls, entries: list[dict], source: str = "custom") -> "LabelSet":
        """Inverse of to_json() (what segcli wrote: a named set's duplicates and names kept)."""
        entries = sorted(entries, key=lambda e: e["index"])
        if not entries or any(not e["synonyms"] for e in entries):
            raise KeyError("synonyms")
        return cls(tuple(e.get("label") or e["synonyms"][0] for e in entries),
                   tuple(tuple(e["synonyms"]) for e in entries), tuple(tuple(e["color"]) for e in entries), source)

    @classmethod
    def of_words(cls, words: list[str], source: str = "custom") -> "LabelSet":
        """One label per word, as given (repeats kept): a derived set (each synonym of a set scored
        on its own), never user input, which from_synonyms checks."""
        return cls(tuple(words), tuple((w,) for w in words), tuple(default_palette(len(words))), source)

    @classmethod
    def from_synonyms(cls, synonyms: list[list[str]], source: str = "custom", colors=None) -> "LabelSet":
        _check(synonyms)
        return cls(
            names=tuple(s[0] for s in synonyms),
            synonyms=tuple(tuple(s) for s in synonyms),
            colors=tuple(tuple(c) for c in (colors or default_palette(len(synonyms)))),
            source=source,
        )


def default_palette(k: int) -> list[tuple[int, int, int]]:
    """A fixed palette: 20 hand-picked colors, then golden-angle hues. Depends only on k."""
    colors = list(_BASE_PALETTE[:k])
    for i in range(len(colors), k):
        hue = (i * 0.618033988749895) % 1.0
        sat, val = (0.65, 0.95) if i % 2 else (0.9, 0.75)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def _split_label(text: str) -> list[str]:
    return [s.strip() for s in text.split(";") if s.strip()]


def _check(synonyms: list[list[str]]) -> None:
    if not synonyms:
        raise SegcliError("no labels given: pass e.g. --labels \"road,car,sky\"")
    seen: dict[str, str] = {}
    for syn in synonyms:
        for word in syn:
            key = " ".join(word.lower().split())
            if key in seen:
                raise SegcliError(f"duplicate label {word!r} (labels must be distinct)")
            seen[key] = word


def parse_labels(spec: str, allow_files: bool = True) -> LabelSet:
    """Parse a label argument.

    - "road,car,sky": comma-separated labels; "road;street" makes synonyms of one label;
    - "@labels.txt": one label per line (synonyms with ";"), blank lines and "# ..." ignored
      (not with `allow_files=False`: the server never reads files a request names);
    - a named set: "ade20k" (150 classes, standard palette), or a benchmark's classes with the
      training-free methods' synonyms: voc21, voc20, context60, context59, coco-stuff, coco-object, cityscapes.
    """
    spec = spec.strip()
    if spec in NAMED_SETS:
        return named_label_set(spec)
    if spec.startswith("@") and not allow_files:
        raise SegcliError("labels cannot name a file here: send the label words themselves")
    if spec.startswith("@"):
        path = Path(spec[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise SegcliError(f"cannot read label file {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
        entries = [line.split("#", 1)[0] for line in text.splitlines()]
        entries = [e for e in entries if e.strip()]
        where = f"label file {str(path)!r}"
    else:
        entries = spec.split(",")
        where = "--labels"
    synonyms = [_split_label(e) for e in entries]
    if not any(synonyms):
        raise SegcliError(f"{where} holds no labels: give e.g. \"road,car,sky\"")
    synonyms = [s for s in synonyms if s]
    return LabelSet.from_synonyms(synonyms)


def named_label_set(name: str) -> LabelSet:
    if name in DATASET_SETS:
        text = resources.files("segcli.assets").joinpath("datasets", DATASET_SETS[name]).read_text(encoding="utf-8")
        synonyms = [tuple(w.strip() for w in line.split(",") if w.strip()) for line in text.splitlines() if line.strip()]
        # as the peers' files have them, duplicates included (coco-object's background lists "bed", a
        # class of its own): built directly, without the duplicate check user labels get; the
        # background line (its many stuff words) is shown as "background"
        names = tuple("background" if k == 0 and len(s) > 5 else s[0] for k, s in enumerate(synonyms))
        return LabelSet(names, tuple(synonyms), tuple(default_palette(len(synonyms))), source=name)
    if name != "ade20k":
        raise SegcliError(f"unknown label set {name!r}; known: {', '.join(NAMED_SETS)}")
    rows = resources.files("segcli.assets").joinpath("ade20k_classes.tsv").read_text(encoding="utf-8")
    reader = csv.DictReader(rows.splitlines(), delimiter="\t")
    items = sorted(reader, key=lambda r: int(r["label_value"]))
    return LabelSet.from_synonyms(
        [[r["name"]] for r in items],
        source="ade20k",
        colors=[(int(r["r"]), int(r["g"]), int(r["b"])) for r in items],
    )
