"""How `segcli predict` turns SOURCE arguments into a run: inputs found, sharded (--shard, or the rank
under torchrun), run, and under torchrun the shards' summaries folded once every rank is done."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TextIO

from segcli.data.sources import SourceList, collect_sources, parse_shard, take_shard
from segcli.errors import SegcliError
from segcli.inference.device import torchrun_ranks
from segcli.inference.segmenter import Segmenter
from segcli.pipeline.run import PredictOptions, PredictResult, PredictRun
from segcli.pipeline.run_folder import merge_summaries


def shard_of_this_process(shard: str | None, output: Path | None) -> tuple[int, int] | None:
    """(I, N) from --shard I/N, else this rank's under torchrun (which needs --output), else None."""
    ranks = torchrun_ranks()
    if ranks and output is None:
        raise SegcliError("under torchrun, give --output: every rank writes its shard into that folder")
    return parse_shard(shard) if shard else ranks


def find_inputs(sources: list[str], output: Path | None, shard: tuple[int, int] | None,
                stdin: TextIO | None = None) -> SourceList:
    """The images and videos SOURCE names (`-`: paths on `stdin`), outside `output`, this shard's part."""
    stdin_lines = stdin.read().splitlines() if "-" in sources and stdin is not None else None
    found = collect_sources(sources, stdin_lines=stdin_lines, exclude=output)
    if not found.sources:
        raise SegcliError(f"no images or videos found in {' '.join(sources)}"
                          + (f" ({len(found.skipped)} non-image files skipped)" if found.skipped else ""))
    return take_shard(found, *shard) if shard else found


def run_predict(seg: Segmenter, options: PredictOptions, found: SourceList,
                on_record: Callable[[dict], None] | None = None,
                on_frames: Callable[[int], None] | None = None) -> PredictResult:
    """One predict run; under torchrun, rank 0 then merges every rank's summary into DIR/summary.json."""
    result = PredictRun(seg, options, found, on_record=on_record, on_frames=on_frames).run()
    if torchrun_ranks():
        merge_torchrun_shards(result.output)
    return result


def merge_torchrun_shards(output: Path) -> None:
    """Every rank has written its predict shard; rank 0 folds the summaries once all are done."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        merge_summaries(output)
    dist.destroy_process_group()
