"""The relabel engine: predict's outputs for new labels from stored pixel embeddings.

    stored NAME_embed.safetensors (this process: load, one product with the new labels' text
    embeddings) -> restore -> render -> write (predict's worker processes and run folder)

Only the text tower runs; the image encoder does not. At the model's own stride, with embeddings
stored in the dtype the model computed them, the masks are byte for byte those of `segcli predict`
with the same labels on the same kind of device.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator

import torch

from segcli.embeddings.stored import StoredEmbeddings, check_models, recorded_model, stored_embeddings
from segcli.errors import SegcliError
from segcli.files.runs import next_run_dir
from segcli.inference.segmenter import Segmenter
from segcli.inference.settings import InferenceSettings
from segcli.inputs.sources import Source, SourceList
from segcli.pipeline import host
from segcli.pipeline.run import Item, PredictRun, RunOptions
from segcli.postprocess.label_map import candidate_logits


def relabel_run(segmenter: Segmenter, options: RunOptions, stored: list[StoredEmbeddings], source_folder: Path,
                on_record=None) -> PredictRun:
    """`segcli relabel`: a PredictRun whose inputs are stored embeddings instead of photos."""
    if "embeddings" in options.save:
        raise SegcliError("relabel makes mask, color and overlay outputs; the embeddings are already stored")
    check_models(stored, segmenter)
    # the label maps are restored by the workers; PAMR needs the photo's canvas, which is not stored
    options = dataclasses.replace(options, postprocess="host", refine="none",
                                  output=options.output or next_run_dir(Path("runs/relabel")))
    sources = SourceList([Source(path=Path(e.info.photo["path"]) if e.info.photo else e.path,
                                 display=str(e.path), rel=e.rel) for e in stored])
    return PredictRun(segmenter, options, sources, on_record=on_record, inputs=StoredJobs(stored),
                      settings={"relabel_of": str(source_folder.resolve())})


class StoredJobs:
    """Stored pixel embeddings, one product with the new labels' text embeddings each, in this process."""

    def __init__(self, stored: list[StoredEmbeddings]):
        self.stored = stored  # in the run's source order

    def jobs(self, run: PredictRun, todo: list[Item], pool, text: torch.Tensor | None, window: int
             ) -> Iterator[tuple[Item, host.FinishJob | None]]:
        for item in todo:
            t0 = time.perf_counter()
            entry = self.stored[item.index]
            try:
                emb = entry.load(run.seg)  # its model was checked with the others, before any work
                with torch.inference_mode():
                    logits = emb.scores(text)
            except SegcliError as exc:
                item.error = str(exc)
                yield item, None
                continue
            info = emb.info
            candidates, cand = candidate_logits(logits, info.extent, run.groups)
            stamp = (info.photo["size"], info.photo["mtime_ns"]) if info.photo else None
            yield item, host.FinishJob(item.source, candidates, cand, info.extent, info.full_hw,
                                       time.perf_counter() - t0, stamp, photo_optional=True)


def relabel_segmenter(folder: Path, model: str | None = None, device: str = "auto",
                      synonyms: str | None = None) -> tuple[Segmenter, list[StoredEmbeddings]]:
    """The model that made FOLDER's stored embeddings (the one its run.json records, or `model` when
    it moved), set to read them as they were made (one canvas, their --imgsz), and the files."""
    stored = stored_embeddings(folder)
    sizes = {e.info.imgsz for e in stored}
    if len(sizes) > 1:
        raise SegcliError(f"{folder} mixes embeddings made at several --imgsz ({sorted(sizes)}): relabel one at a time")
    # the stored cells are one canvas's
    seg = Segmenter.from_pretrained(model or recorded_model(folder), device=device, imgsz=sizes.pop(), warn=False,
                                    settings=InferenceSettings(window=0, synonyms=synonyms))
    return seg, stored
