"""How `segcli predict` turns SOURCE arguments into a run: inputs found, sharded (--shard, or the rank
under torchrun), run, and under torchrun the shards' summaries folded once every rank is done."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, TextIO

from segcli.data.sources import SourceList, collect_sources, parse_shard, take_shard
from segcli.errors import SegcliError
from segcli.files.remote import is_url
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


def find_inputs(sources: list[str], output: Path | str | None, shard: tuple[int, int] | None,
                stdin: TextIO | None = None) -> SourceList:
    """The images and videos SOURCE names (`-`: paths on `stdin`; URLs: objects in a store, staged
    as they are needed), outside `output`, this shard's part."""
    urls = [s for s in sources if is_url(s)]
    if urls and len(urls) != len(sources):
        raise SegcliError("give SOURCE as URLs (s3://...) or as local paths, not both in one run")
    if urls:
        from segcli.pipeline.remote import RemoteInputs

        stager = RemoteInputs(urls)
        found = stager.collect()
        found.stager = stager
    else:
        stdin_lines = stdin.read().splitlines() if "-" in sources and stdin is not None else None
        found = collect_sources(sources, stdin_lines=stdin_lines, exclude=output if not is_url(output) else None)
    if not found.sources:
        raise SegcliError(f"no images or videos found in {' '.join(sources)}"
                          + (f" ({len(found.skipped)} non-image files skipped)" if found.skipped else ""))
    if shard:
        found = replace(take_shard(found, *shard), stager=found.stager)
    return found


ENGINES = ("local", "ray")
COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_FROM = 500  # photos from which --compile auto compiles: its 20-30 s pay off (README, Performance)


def check_engine(engine: str, decode: str = "auto") -> None:
    if engine not in ENGINES:
        raise SegcliError(f"--engine {engine!r}: use local or ray")
    if engine == "ray" and decode == "device":
        raise SegcliError("--engine ray decodes in Ray's CPU tasks: --decode device is for --engine local")


def check_compile(choice: str) -> None:
    if choice not in COMPILE_CHOICES:
        raise SegcliError(f"--compile {choice!r}: use auto, on or off")


def should_compile(choice: str, seg: Segmenter, photos: int) -> bool:
    """--compile on|off|auto: auto compiles PyTorch models (not int8, not corrclip) for 500 photos or more."""
    check_compile(choice)
    if choice == "auto":
        return photos >= COMPILE_FROM and seg.model.exportable and not seg.int8
    return choice == "on"


def run_predict(seg: Segmenter, options: PredictOptions, found: SourceList,
                on_record: Callable[[dict], None] | None = None,
                on_frames: Callable[[int], None] | None = None, engine: str = "local") -> PredictResult:
    """One predict run; under torchrun, rank 0 then merges every rank's summary into DIR/summary.json.
    An output URL (`options.output` a str) is filled through a local mirror (segcli.pipeline.remote).
    `engine` "ray": the photos go through Ray Data (segcli.pipeline.ray_engine)."""
    check_engine(engine, options.decode)
    if engine == "ray" and torchrun_ranks():
        raise SegcliError("--engine ray schedules the whole run itself: start it once, not under torchrun")
    remote = None
    output_url = options.output if isinstance(options.output, str) else None
    if isinstance(options.output, str):
        from segcli.pipeline.remote import RemoteOutput

        remote = RemoteOutput(options.output)
        remote.pull_state()
        options = replace(options, output=remote.local)
    stager = found.stager

    def recorded(record: dict) -> None:
        if remote is not None:
            remote.on_record(record)
        if stager is not None:
            stager.release(record.get("path", ""))
        if on_record is not None:
            on_record(record)

    if engine == "ray":
        from segcli.pipeline.ray_engine import RayPredictRun

        options = replace(options, decode="host")  # decoded by Ray's tasks
        run = RayPredictRun(seg, options, found, on_record=recorded, on_frames=on_frames)
        run.output_url = output_url
    else:
        run = PredictRun(seg, options, found, on_record=recorded, on_frames=on_frames)
    run.prepare = stager.prepare if stager is not None else None
    run.on_todo = stager.restrict if stager is not None else None
    if remote is not None:
        run.folder.exists = remote.exists
    try:
        result = run.run()
    finally:
        if remote is not None:
            remote.push_state()
            remote.close()
        if stager is not None:
            stager.close()
    if remote is not None:
        if remote.failures:
            raise SegcliError(f"{len(remote.failures)} file(s) could not be uploaded ({remote.failures[0]}); "
                              "run the same command again to finish")
        result = replace(result, output=remote.store.url)
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
