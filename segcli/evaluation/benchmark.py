"""The open-vocabulary benchmark table in one run: models x the training-free methods' eight datasets.

Each dataset is evaluated as the methods' authors do: the dataset's own class-name file (synonyms
scored separately, a label keeps its best), the photo resized to the dataset's short side (NACLIP's
configs: 336, Cityscapes 560) and slid over with the model's windows, and where class 0 is
background (VOC21, Context60, COCO-Object) pixels whose best probability is under 0.1 taken as
background; a method whose own configs differ (ProxyCLIP's, CorrCLIP's) gets its own (its MethodCfg's `benchmark`).
Other models (LSeg, catseg, exports) keep their own protocol; only the labels and the background
rule apply to them. A dataset that is not under the data root is listed with the
command that fetches it instead of failing the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from segcli.datasets.catalog import BENCHMARKS, TRAINING_FREE
from segcli.datasets.prepare import get_command
from segcli.datasets.segmentation import limited, open_dataset
from segcli.errors import SegcliError
from segcli.evaluation.evaluate import evaluate
from segcli.inference.segmenter import Segmenter
from segcli.inference.settings import InferenceSettings
from segcli.modeling.configs import CLIP_DENSE_METHODS
from segcli.vocabulary.labels import named_label_set

SUITES = {"training-free": TRAINING_FREE}
BACKGROUND_THRESHOLD = 0.1  # NACLIP's prob_thd on the datasets with a background class


def dataset_settings(method: str | None, name: str) -> dict:
    """The protocol and background rule `method` (a clip-dense method, or None) is evaluated with on
    the benchmark `name`: the catalog's (NACLIP's configs), then the method's own where they differ."""
    bench = BENCHMARKS[name]
    settings = {"short_side": bench.short_side, "window": None, "stride": None,
                "bg_threshold": BACKGROUND_THRESHOLD if bench.background else None}
    own = CLIP_DENSE_METHODS[method].benchmark.get(name, {}) if method else {}
    return {**settings, **own}


def run_benchmark(models: list[str], suite: str, root: Path, device: str = "auto", precision: str = "auto",
                  limit: int | None = None, batch_size: int = 8,
                  on_result: Callable[[str, str, dict | None], None] | None = None) -> dict:
    """{"models": {model: {dataset: metrics | None}}, "missing": {dataset: command}, "datasets": [...]}."""
    if suite not in SUITES:
        raise SegcliError(f"unknown --benchmark {suite!r}: use {', '.join(SUITES)}")
    names = SUITES[suite]
    datasets, missing = {}, {}
    for name in names:
        try:
            datasets[name] = limited(open_dataset(name, root), "val", limit)
        except SegcliError:
            missing[name] = get_command(name, root)
    table: dict[str, dict[str, dict | None]] = {}
    for model in models:
        seg = Segmenter.from_pretrained(model, device=device, precision=precision, warn=False)
        method = seg.model.capabilities.method
        # the training-free methods get the benchmark's windows; the others (LSeg, catseg, exports) keep their own
        sliding = seg.protocol.sliding and method is not None
        row = table[model] = {}
        for name in names:
            if name not in datasets:
                row[name] = None
                continue
            bench, settings = BENCHMARKS[name], dataset_settings(method, name)
            windows = {k: settings[k] for k in ("short_side", "window", "stride")} if sliding else {}
            seg.configure(InferenceSettings(**windows, synonyms="max", bg_threshold=settings["bg_threshold"]))
            result = evaluate(seg, datasets[name], "val", named_label_set(bench.labels), batch_size=batch_size)
            row[name] = {k: result[k] for k in ("mIoU", "pixAcc", "images", "protocol", "bg_threshold", "synonyms",
                                                 "refine", "prompt")}
            if on_result:
                on_result(model, name, row[name])
        present = [row[n]["mIoU"] for n in names if row.get(n)]
        row["average"] = {"mIoU": sum(present) / len(present), "datasets": len(present)} if present else None
    return {"suite": suite, "datasets": list(names), "models": table, "missing": missing, "limit": limit}
