"""The relabel engine: predict's outputs for new labels from stored pixel embeddings.

    stored NAME_embed.safetensors (this process: load, one product with the new labels' text
    embeddings) -> restore -> render -> write (predict's worker processes and run folder)

Only the text tower runs; the image encoder does not. At the model's own stride, with embeddings
stored in the dtype the model computed them, the masks are byte for byte those of `segcli predict`
with the same labels on the same kind of device.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import torch

from segcli import host
from segcli.api import Segmenter
from segcli.data.sources import Source, SourceList
from segcli.embeddings import SUFFIX, EmbeddingInfo, PixelEmbeddings, check_same_model, read_info, read_tensor
from segcli.errors import SegcliError
from segcli.masks import candidate_logits
from segcli.predict import Item, PredictOptions, PredictRun
from segcli.runfolder import STATE_DIR


@dataclass(frozen=True)
class StoredEmbeddings:
    """One stored file: where it is, where its outputs go (REL inside DIR), what it says."""

    path: Path
    rel: PurePosixPath
    info: EmbeddingInfo

    def load(self, segmenter=None) -> PixelEmbeddings:
        """The embeddings themselves (the header is read once, by stored_embeddings)."""
        return PixelEmbeddings(read_tensor(self.path), self.info, segmenter)


def stored_embeddings(folder: Path) -> list[StoredEmbeddings]:
    """Every NAME_embed.safetensors under `folder` (a predict run's DIR), sorted by REL."""
    if not folder.is_dir():
        raise SegcliError(f"no such folder: {folder}")
    found = []
    for path in sorted(folder.rglob("*" + SUFFIX)):
        rel = path.relative_to(folder)
        if STATE_DIR in rel.parts or path.name.startswith("."):
            continue
        found.append(StoredEmbeddings(path, PurePosixPath(*rel.parts[:-1], path.name[:-len(SUFFIX)]), read_info(path)))
    if not found:
        raise SegcliError(f"{folder} holds no stored embeddings (*{SUFFIX}): run segcli predict with --save embeddings first")
    return found


def recorded_model(folder: Path) -> str:
    """The --model a stored run was made with (DIR/.segcli/run.json)."""
    run_file = folder / STATE_DIR / "run.json"
    try:
        return json.loads(run_file.read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise SegcliError(f"{folder} has no readable {STATE_DIR}/run.json to say which model made it ({exc}): "
                          "give --model") from None


def check_models(stored: list[StoredEmbeddings], segmenter: Segmenter) -> None:
    """Refuse, before any work, embeddings made by another model than `segmenter`'s."""
    for entry in stored:
        check_same_model(entry.info, segmenter, entry.path)


class RelabelRun(PredictRun):
    """`segcli relabel`: PredictRun whose inputs are stored embeddings instead of photos."""

    def __init__(self, segmenter: Segmenter, options: PredictOptions, stored: list[StoredEmbeddings],
                 source_folder: Path, on_record=None):
        if "embeddings" in options.save:
            raise SegcliError("relabel makes mask, color and overlay outputs; the embeddings are already stored")
        check_models(stored, segmenter)
        # the label maps are restored by the workers; PAMR needs the photo's canvas, which is not stored
        options = dataclasses.replace(options, postprocess="host", refine="none")
        sources = SourceList([Source(path=Path(e.info.photo["path"]) if e.info.photo else e.path,
                                     display=str(e.path), rel=e.rel) for e in stored])
        super().__init__(segmenter, options, sources, on_record)
        self.stored = stored
        self.folder.settings["relabel_of"] = str(source_folder.resolve())

    def _jobs(self, todo: list[Item], pool, text: torch.Tensor | None, window: int
              ) -> Iterator[tuple[Item, host.FinishJob | None]]:
        for item in todo:
            t0 = time.perf_counter()
            entry = self.stored[item.index]
            try:
                emb = entry.load(self.seg)  # its model was checked with the others, before any work
                with torch.inference_mode():
                    logits = emb.scores(text)
            except SegcliError as exc:
                item.error = str(exc)
                yield item, None
                continue
            info = emb.info
            candidates, cand = candidate_logits(logits, info.extent, self.groups)
            stamp = (info.photo["size"], info.photo["mtime_ns"]) if info.photo else None
            yield item, host.FinishJob(item.source, candidates, cand, info.extent, info.full_hw,
                                       time.perf_counter() - t0, stamp, photo_optional=True)
