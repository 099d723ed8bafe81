"""The search engine: rank stored photos by how much of each a query covers.

A photo's score for a query is the fraction of its stored cells (pixel embeddings, see
`segcli.embeddings.format`) where the query's text embedding scores above every `against` label. One
product per photo scores all queries at once; files are read one at a time, so memory does not
grow with the number of photos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segcli.embeddings.stored import check_models, stored_embeddings
from segcli.errors import SegcliError
from segcli.vocabulary.labels import LabelSet


@dataclass(frozen=True)
class Hit:
    query: str
    score: float  # the fraction of the photo's cells where the query wins
    cells: int  # how many cells that is
    path: str  # the photo (as stored), or the embeddings file when the photo is not known
    embeddings: str


def run_labels(folder: Path) -> LabelSet:
    """The labels a predict run was made with (DIR/labels.json): what a query must beat by default."""
    try:
        return LabelSet.from_json(json.loads((folder / "labels.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as exc:
        raise SegcliError(f"{folder}/labels.json is missing or unreadable ({exc}): give --against") from None


def search(folder: Path, queries: list[str], against: LabelSet | None, segmenter,
           prompt: str | None = None, top: int | None = None) -> dict[str, list[Hit]]:
    """Per query (in the order given), the stored photos best first (at most `top`). `against`: the
    labels a query must beat at a cell (None: the run's own, `run_labels`); `segmenter`: the
    Segmenter of the model that made the embeddings (its text tower runs)."""
    against = against if against is not None else run_labels(folder)
    stored = stored_embeddings(folder)
    check_models(stored, segmenter)
    hits: dict[str, list[Hit]] = {q: [] for q in queries}
    # each query against the `against` labels other than itself (a query that is one of the run's
    # labels would otherwise tie with itself everywhere)
    groups = segmenter.label_groups(against)  # synonyms scored separately: a rival's rows are its synonyms
    label_of_row = groups if groups is not None else np.arange(len(against))
    rivals = [[r for r, i in enumerate(label_of_row) if against.names[i].lower() != q.lower()] for q in queries]
    with torch.inference_mode():
        asked = segmenter.label_embeddings(LabelSet.from_synonyms([[q] for q in queries]), prompt)
        text = torch.cat([asked, segmenter.label_embeddings(against, prompt)]).float()  # [Q+A, C]
        q_count = len(queries)
        for entry in stored:
            emb = entry.load().embeddings
            cells = F.normalize(emb.to(text.device).float().flatten(1), dim=0)  # [C, h*w]
            scores = text @ cells  # [Q+A, h*w]
            theirs = scores[q_count:]
            for i, q in enumerate(queries):
                best_rival = theirs[rivals[i]].amax(0) if rivals[i] else torch.full_like(scores[i], -torch.inf)
                wins = int((scores[i] > best_rival).sum())
                photo = entry.info.photo["path"] if entry.info.photo else str(entry.path)
                hits[q].append(Hit(q, wins / scores.shape[1], wins, photo, str(entry.path)))
    for q in queries:
        hits[q].sort(key=lambda h: (-h.score, h.path))
        if top is not None:
            del hits[q][top:]
    return hits
