"""A predict run's stored embeddings: find its NAME_embed.safetensors files, and the model that made them.

Shared by relabel (segcli.pipeline.relabel) and search (segcli.embeddings.search).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from segcli.embeddings.format import SUFFIX, EmbeddingInfo, PixelEmbeddings, check_same_model, read_info, read_tensor
from segcli.errors import SegcliError
from segcli.files.runs import STATE_DIR


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


def check_models(stored: list[StoredEmbeddings], segmenter) -> None:
    """Refuse, before any work, embeddings made by another model than `segmenter`'s (a Segmenter)."""
    for entry in stored:
        check_same_model(entry.info, segmenter, entry.path)
