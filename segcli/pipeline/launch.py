"""How `segcli predict` turns SOURCE arguments into a run: inputs found, sharded (--shard, or the rank
under torchrun), run, and under torchrun the shards' summaries folded once every rank is done."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from segcli.errors import SegcliError
from segcli.files.remote import is_url
from segcli.inference.device import torchrun_ranks
from segcli.inference.segmenter import Segmenter
from segcli.inputs.sources import SourceList, collect_sources, parse_shard, take_shard
from segcli.pipeline.options import COMPILE_FROM, PredictOptions
from segcli.pipeline.run import PredictResult, PredictRun, RunOptions
from segcli.pipeline.run_folder import merge_summaries

if TYPE_CHECKING:
    from segcli.pipeline.remote import RemoteInputs


def shard_of_this_process(shard: str | None, output: Path | None) -> tuple[int, int] | None:
    """(I, N) from --shard I/N, else this rank's under torchrun (which needs --output), else None."""
    ranks = torchrun_ranks()
    if ranks and output is None:
        raise SegcliError("under torchrun, give --output: every rank writes its shard into that folder")
    return parse_shard(shard) if shard else ranks


def find_inputs(sources: list[str], output: Path | str | None, shard: tuple[int, int] | None,
                stdin: TextIO | None = None) -> tuple[SourceList, RemoteInputs | None]:
    """The images and videos SOURCE names (`-`: paths on `stdin`; URLs: objects in a store), outside
    `output`, this shard's part; and for URLs the stager that fetches each one as it is needed."""
    urls = [s for s in sources if is_url(s)]
    if urls and len(urls) != len(sources):
        raise SegcliError("give SOURCE as URLs (s3://...) or as local paths, not both in one run")
    stager = None
    if urls:
        from segcli.pipeline.remote import RemoteInputs

        stager = RemoteInputs(urls)
        found = stager.collect()
    else:
        stdin_lines = stdin.read().splitlines() if "-" in sources and stdin is not None else None
        found = collect_sources(sources, stdin_lines=stdin_lines, exclude=output if not is_url(output) else None)
    if not found.sources:
        raise SegcliError(f"no images or videos found in {' '.join(sources)}"
                          + (f" ({len(found.skipped)} non-image files skipped)" if found.skipped else ""))
    if shard:
        found = take_shard(found, *shard)
    return found, stager


@dataclass(frozen=True)
class PreparedPredict:
    """A predict run ready to start: the model loaded and tuned, the inputs found, the run's options."""

    segmenter: Segmenter
    run_options: RunOptions
    inputs: SourceList
    stager: RemoteInputs | None = None  # fetches object-storage inputs as they are needed


def prepare_predict(options: PredictOptions, sources: list[str], stdin: TextIO | None = None,
                    notify: Callable[[str], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> PreparedPredict:
    """Everything `segcli predict` decides before its first photo, in order of cost: the options
    checked, the inputs found, the model loaded and configured, its batch size (measured on a GPU)
    and whether to compile it. `notify` hears those decisions, `warn` what the user should know
    (an untrained model, a compile that failed under --compile auto)."""
    from segcli.inference.device import rank_device
    from segcli.inference.settings import InferenceSettings
    from segcli.models.factory import UNTRAINED_WARNING
    from segcli.postprocess.outputs import parse_outputs
    from segcli.vocabulary.labels import parse_labels

    options.validate()
    if options.engine == "ray" and torchrun_ranks():
        raise SegcliError("--engine ray schedules the whole run itself: start it once, not under torchrun")
    notify = notify or (lambda message: None)
    warn = warn or notify
    output = options.output if options.output is None or is_url(options.output) else Path(options.output)
    shard = shard_of_this_process(options.shard, output)
    label_set = parse_labels(options.labels) if options.labels is not None else None
    found, stager = find_inputs(sources, output, shard, stdin)
    settings = InferenceSettings(options.short_side, options.window, options.stride, options.synonyms,
                                 options.bg_threshold)
    seg = Segmenter.from_pretrained(options.model, device=str(rank_device(options.device)), precision=options.precision,
                                    imgsz=options.imgsz, settings=settings, warn=False)
    if seg.untrained:
        warn(UNTRAINED_WARNING.format(name=options.model))
    label_set = seg.resolve_labels(label_set)
    batch_size = options.batch_size
    if batch_size is None:
        batch_size, rates = seg.find_batch_size()
        if rates:
            shown = ", ".join(f"{b}: {r:.0f}" if r else f"{b}: out of memory" for b, r in rates.items())
            notify(f"batch size {batch_size} (images/s by batch size: {shown})")
    if should_compile(options.compile, seg, sum(not s.video for s in found.sources)):
        try:
            seconds = seg.compile(batch_size)
            notify(f"compiled the model for batches of {batch_size} in {seconds:.1f} s")
        except SegcliError as exc:
            if options.compile == "on":
                raise
            warn(f"{exc}; running it uncompiled")
    run_options = RunOptions(labels=label_set, prompt=options.prompt, output=output, save=parse_outputs(options.save),
                             alpha=options.alpha, batch_size=batch_size, workers=options.workers,
                             overwrite=options.overwrite, max_pixels=options.max_pixels, shard=shard,
                             postprocess=options.postprocess, embed_dtype=options.embed_dtype,
                             embed_stride=options.embed_stride, vid_stride=options.vid_stride, smooth=options.smooth,
                             refine=options.refine, decode=options.decode)
    return PreparedPredict(seg, run_options, found, stager)


def predict(sources: list[str], options: PredictOptions | None = None,
            on_record: Callable[[dict], None] | None = None) -> PredictResult:
    """A whole `segcli predict` run from Python, with the command's defaults and decisions:

    >>> result = predict(["photos/"], PredictOptions(labels="road,car,sky", output="masks"))
    >>> result.failed, result.summary["counts"]
    """
    options = options or PredictOptions()
    prepared = prepare_predict(options, sources)
    return run_predict(prepared.segmenter, prepared.run_options, prepared.inputs, stager=prepared.stager,
                       on_record=on_record, engine=options.engine)


def should_compile(choice: str, seg: Segmenter, photos: int) -> bool:
    """--compile on|off|auto: auto compiles PyTorch models (not int8, not corrclip) for COMPILE_FROM photos or more."""
    if choice == "auto":
        return photos >= COMPILE_FROM and seg.model.capabilities.exportable and not seg.int8
    return choice == "on"


def run_predict(seg: Segmenter, options: RunOptions, found: SourceList, stager: RemoteInputs | None = None,
                on_record: Callable[[dict], None] | None = None,
                on_frames: Callable[[int], None] | None = None, engine: str = "local") -> PredictResult:
    """One predict run; under torchrun, rank 0 then merges every rank's summary into DIR/summary.json.
    An output URL (`options.output` a str) is filled through a local mirror (segcli.pipeline.remote).
    `engine` "ray": the photos go through Ray Data (segcli.pipeline.ray_engine)."""
    if engine not in ("local", "ray"):
        raise SegcliError(f"--engine {engine!r}: use local or ray")
    if engine == "ray" and torchrun_ranks():
        raise SegcliError("--engine ray schedules the whole run itself: start it once, not under torchrun")
    remote = None
    output_url = options.output if isinstance(options.output, str) else None
    if isinstance(options.output, str):
        from segcli.pipeline.remote import RemoteOutput

        remote = RemoteOutput(options.output)
        remote.pull_state()
        options = replace(options, output=remote.local)
    def recorded(record: dict) -> None:
        if remote is not None:
            remote.on_record(record)
        if stager is not None:
            stager.release(record.get("path", ""))
        if on_record is not None:
            on_record(record)

    ray = None
    if engine == "ray":
        from segcli.pipeline.ray_engine import RayEngine

        options = replace(options, decode="host")  # decoded by Ray's tasks
        ray = RayEngine(output_url)
    run = PredictRun(seg, options, found, on_record=recorded, on_frames=on_frames, engine=ray, stager=stager,
                     exists=remote.exists if remote is not None else None)
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
