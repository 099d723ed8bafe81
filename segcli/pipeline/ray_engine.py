"""`segcli predict --engine ray`: the same stages as a local run, scheduled by Ray Data.

    inputs -> decode (CPU tasks) -> the model (an actor pool: `map_batches` with a callable class,
    one GPU per actor where there are GPUs) -> restore, render, write (CPU tasks) -> records (here)

The cluster is the one `RAY_ADDRESS` names (as Ray's own tools read it), else a local Ray. What a
task computes is what the local engine's stages compute (segcli.pipeline.host, ModelStep), so the
outputs, records and summary are the same; the run folder's bookkeeping (settings check, reuse of
finished inputs, records, summary) stays in this process. Ray retries the tasks of a worker or node
that is lost, and restarts a lost model actor; its batches run again. Videos run here after the
photos, as in a local run. Objects cross between stages pickled: they are this run's own values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from segcli.errors import SegcliError, one_line
from segcli.pipeline import host
from segcli.pipeline.model_step import Item, ModelStep
from segcli.pipeline.run import PredictResult, PredictRun
from segcli.pipeline.run_folder import error_record


def _ray():
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # segcli reports progress and failures per input
    try:
        import ray
        import ray.data
    except ImportError:
        raise SegcliError("--engine ray needs Ray Data: pip install 'segcli[ray]'") from None
    return ray


def start_ray() -> None:
    """Join the cluster RAY_ADDRESS names, or start a local Ray (quietly), once per process."""
    ray = _ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        # a local Ray listens on the loopback only: nothing outside this machine can reach it
        where = {"address": address} if address else {"_node_ip_address": "127.0.0.1"}
        try:
            ray.init(**where, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
        except Exception as exc:  # a cluster that does not answer: one line
            raise SegcliError(f"cannot start or reach Ray ({type(exc).__name__}: {one_line(str(exc), 160)})") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


STAGE = Path(tempfile.gettempdir()) / "segcli-ray-inputs"  # a node's copies of object-store inputs


def _copy_folder(origin: str) -> Path:
    return STAGE / hashlib.sha256(origin.encode()).hexdigest()[:20]


def local_copy(source):
    """`source` readable on this node: an object store's input is downloaded here once."""
    if not source.origin:
        return source
    from segcli.files.remote import download, open_store

    local = _copy_folder(source.origin) / source.path.name
    if not local.exists():
        store = open_store(source.origin)
        download(store, store.root, local)
    return replace(source, path=local)


def decode_row(row: dict, plan: host.HostPlan) -> dict:
    """A CPU task: an input's file -> the model's pixels (a pickled ModelInput) or its error."""
    source = pickle.loads(row["source"])
    try:
        model_input = host.decode(local_copy(source).path, plan)
        return {**row, "input": pickle.dumps(model_input), "error": ""}
    except (SegcliError, host.ImageDecodeError) as exc:  # not fetched, or not decoded
        return {**row, "input": b"", "error": str(exc)}


class Model:
    """The model actor: a Segmenter built once per actor, then batches of decoded inputs -> jobs.
    This is predict's own model stage (ModelStep), on whatever device the actor was given."""

    recipe: dict  # set on a subclass per run (see RayEngine._photos)

    def __init__(self):
        import torch

        from segcli.inference.segmenter import Segmenter

        recipe = self.recipe
        device = "cuda" if torch.cuda.is_available() and recipe["device"] != "cpu" else "cpu"
        seg = Segmenter.from_pretrained(recipe["model"], device=device, precision=recipe["precision"],
                                        imgsz=recipe["imgsz"], settings=recipe["settings"], warn=False)
        options = recipe["options"]
        self.step = ModelStep(seg, options)
        self.text = seg.label_embeddings(options.labels, options.prompt)

    def __call__(self, batch: dict) -> dict:
        items = []
        for index, source, data, error in zip(batch["index"], batch["source"], batch["input"], batch["error"]):
            item = Item(int(index), pickle.loads(source), error=error or None)
            if not item.error:
                item.model_input = pickle.loads(data)
            items.append(item)
        ready = [it for it in items if not it.error]
        jobs = dict(zip((it.index for it in ready), self.step.infer(ready, self.text))) if ready else {}
        return {"index": [it.index for it in items], "source": list(batch["source"]),
                "job": [pickle.dumps(jobs[it.index]) if it.index in jobs else b"" for it in items],
                "error": [it.error or "" for it in items]}


def finish_row(row: dict, plan: host.HostPlan, output_url: str | None) -> dict:
    """A CPU task: a job -> the input's outputs written (and uploaded whole, for an output URL) -> its record."""
    source = pickle.loads(row["source"])
    if row["error"]:
        return {"index": row["index"], "record": json.dumps(error_record(source, row["error"]))}
    try:
        record = host.finish(replace(pickle.loads(row["job"]), source=local_copy(source)), plan)
        record["path"] = source.recorded_path
        if output_url:
            from segcli.files.remote import open_store, upload

            store = open_store(output_url)
            for rel in record["files"]:
                upload(store, plan.output / rel, store.key(rel))
                (plan.output / rel).unlink(missing_ok=True)
    except (host.InputFailure, SegcliError, MemoryError, ValueError, RuntimeError) as exc:
        record = error_record(source, str(exc), getattr(exc, "native", None))
    except OSError as exc:
        record = error_record(source, f"cannot write outputs: {exc.strerror or exc}")
    if source.origin:  # this node's copy of the input is no longer needed
        shutil.rmtree(_copy_folder(source.origin), ignore_errors=True)
    return {"index": row["index"], "record": json.dumps(record)}


class RayEngine:
    """A PredictRun's engine that sends its photos through Ray Data instead of this machine's
    worker processes (`PredictRun(engine=RayEngine(...))`). `output_url`: the run's outputs go to
    that object store, uploaded by the task that writes them."""

    def __init__(self, output_url: str | None = None):
        self.output_url = output_url

    @staticmethod
    def recipe(run: PredictRun) -> dict:
        """What a model actor needs to build the same Segmenter and ModelStep as `run`'s."""
        seg = run.seg
        # the precision as --precision spells it
        precision = {"int8": "int8", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[seg.precision_name]
        return {"model": seg.name, "device": seg.device.type, "precision": precision, "imgsz": seg.imgsz,
                "settings": seg.settings, "options": replace(run.opt, output=None)}

    def run(self, run: PredictRun, done: dict[str, dict]) -> PredictResult:
        ray = _ray()
        start_ray()
        todo, reused = run.todo(done)
        videos = [item for item in todo if item.source.video and not item.error]
        photos = [item for item in todo if not (item.source.video and not item.error)]
        interrupted = False
        try:
            if photos:
                self._photos(ray, run, photos)
            if videos and run.stop is None:
                text = run.seg.label_embeddings(run.opt.labels, run.opt.prompt)
                run._videos(videos, text)
        except KeyboardInterrupt:
            interrupted = True
        return run.finish_run(reused, interrupted)

    def _photos(self, ray, run: PredictRun, photos: list[Item]) -> None:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if run.seg.device.type == "cuda" else 0
        actors = max(1, gpus)  # one model actor per GPU; one on CPUs
        rows = [{"index": it.index, "source": pickle.dumps(it.source), "input": b"", "error": it.error or ""}
                for it in photos]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))
        # decoding in tasks of their own (half a CPU each: they also wait on storage), not fused into the
        # model's actors, so the model never waits for a decode; Ray retries the tasks of a lost worker
        ds = ds.map(decode_row, fn_kwargs={"plan": run.plan}, num_cpus=0.5)
        # the recipe travels inside the class (not as constructor arguments in the object store), so a
        # restarted actor can always be rebuilt
        model = type("Model", (Model,), {"recipe": self.recipe(run)})
        ds = ds.map_batches(model, batch_size=run.opt.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                            num_gpus=1 if gpus else 0, num_cpus=1)
        ds = ds.map(finish_row, fn_kwargs={"plan": run.plan, "output_url": self.output_url}, num_cpus=1)
        for row in ds.iter_rows():
            run._done(int(row["index"]), json.loads(row["record"]))
