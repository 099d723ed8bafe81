"""predict's model stage, apart from the run around it: a batch of decoded inputs -> the jobs the
host workers finish (candidate labels' logits, or all of them for device post-processing). A local
run (segcli.pipeline.run) and a Ray actor (segcli.pipeline.ray_engine) run the same code."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from segcli.embeddings.format import EmbeddingInfo, check_embed_stride, encode, pool, resolve_embed_dtype
from segcli.errors import SegcliError
from segcli.inference.runner import host_pixels
from segcli.inference.segmenter import Segmenter
from segcli.inputs.sources import Source
from segcli.pipeline import host
from segcli.pipeline.host import ModelInput
from segcli.postprocess.label_map import batch_candidate_logits, image_region


@dataclass
class Item:
    """One input on its way through the stages."""

    index: int
    source: Source
    model_input: ModelInput | None = None
    error: str | None = None
    native: str | None = None  # what a worker's native code printed on stderr about its failure


class ModelStep:
    """The Segmenter as predict runs it: embeddings stored or not, refinement, synonym groups.
    `all_logits`: hand on every label's logits, on the device (post-processing happens there),
    instead of the candidate labels' on the host."""

    def __init__(self, segmenter: Segmenter, options, all_logits: bool = False):
        self.seg = segmenter
        self.batch_size = options.batch_size
        self.embed = None  # (dtype, stride) when the pixel embeddings are stored
        if "embeddings" in options.save:
            segmenter.check_embeddings()
            if segmenter.protocol.sliding:
                raise SegcliError("--save embeddings stores the cells of one canvas: add --window 0 (this model "
                                  "slides windows by default)")
            self.embed = (resolve_embed_dtype(options.embed_dtype, segmenter.autocast_dtype),
                          check_embed_stride(options.embed_stride, segmenter.model.output_stride))
        self.refiner = segmenter.refiner_for(options.refine)
        self.groups = segmenter.label_groups(options.labels)  # synonyms scored separately, or None
        self.all_logits = all_logits

    def infer(self, batch: list[Item], text: torch.Tensor | None) -> list[host.FinishJob]:
        """A batch of model inputs -> per image, the candidate labels' logits on the host, one cell
        per `seg.runner.logit_stride` pixels of the resized photo (1 once refined); all labels', on the
        device, when post-processing happens there."""
        t0 = time.perf_counter()
        if self.refiner is not None or self.seg.needs_regions:
            for it in batch:  # read on the host too: decoded on the device, they are copied back
                it.model_input.pixels = host_pixels(it.model_input.pixels)
        finished, emb = self.seg.runner.segment_finished([it.model_input.pixels for it in batch],
                                                  [it.model_input.resized_hw for it in batch], text, self.batch_size,
                                                  self.refiner, self.groups, return_embeddings=self.embed is not None)
        per_image, valids = zip(*finished)
        if self.all_logits:
            selected = [(None, logits_i) for logits_i in per_image]
        else:
            selected = batch_candidate_logits(per_image, valids, self.groups)
        share = (time.perf_counter() - t0) / len(batch)
        jobs = []
        for i, item in enumerate(batch):
            got = item.model_input
            candidates, cand = selected[i]
            made = {"embeddings": self._embeddings_file(emb[i], item)} if emb is not None else None
            jobs.append(host.FinishJob(item.source, candidates, cand, valids[i], got.full_hw, got.seconds + share,
                                       got.stamp, made))
            item.model_input = None
        return jobs

    def _embeddings_file(self, emb: torch.Tensor, item: Item) -> bytes:
        """[C,S/s,S/s] of one canvas -> the NAME_embed.safetensors bytes of the photo's cells."""
        dtype, stride = self.embed
        got, model = item.model_input, self.seg.model
        region = pool(image_region(emb, got.resized_hw, model.output_stride), stride // model.output_stride)
        photo = {"path": os.path.abspath(item.source.path), "size": got.stamp[0], "mtime_ns": got.stamp[1]}
        info = EmbeddingInfo.of(self.seg, region, stride, got.full_hw, got.resized_hw, photo)
        return encode(region, info, dtype)

