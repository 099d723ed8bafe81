"""`segcli serve`: an HTTP API and a browser page on the model core (FastAPI + uvicorn).

    request thread: read the upload, decode it to the model's input (predict's `host.decode`: a
      canvas, or the photo resized for the model's sliding windows)
      -> the bounded queue -> the model thread: up to --batch-size requests that arrived within
         --batch-window ms, one forward pass per label set (predict's `segment_images`, then
         PAMR where predict refines by default)
      -> request thread: label map, PNG/JPEG (predict's `restore_label_map` and `host.render`)

Every step is predict's own code, so an image output is the bytes `segcli predict` writes for that
photo with the same model, labels and settings (predict batches too: like predict with
--batch-size 1, a lone request gives exactly those bytes; in a batch, bf16 kernels may round the
last bits differently, as in predict). A full queue answers 503 with Retry-After; while the
server drains for SIGTERM, new requests get 503 and the ones in flight finish.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from segcli import __version__, host
from segcli.api import Segmenter
from segcli.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_full_bgr
from segcli.errors import SegcliError, one_line
from segcli.labels import LabelSet, parse_labels, prompt_templates
from segcli.masks import restore_label_map

OUTPUTS = {"json": "application/json", "mask": "image/png", "color": "image/png", "overlay": "image/jpeg"}


@dataclass
class ServeOptions:
    labels: LabelSet | None = None  # the default labels (else the model's own)
    prompt: str | None = None
    batch_size: int = 8
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for company
    queue_size: int = 64  # requests waiting for the model; beyond it: 503
    max_upload_mb: float = 25.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    alpha: float = 0.5
    api_key: str | None = None
    request_timeout_s: float = 120.0


class ServeError(Exception):
    """A request's failure: its HTTP status and one sentence for {"error": ...}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class _Job:
    pixels: np.ndarray  # the model's input: [S,S,3] uint8 canvas, or the resized photo for windows
    resized_hw: tuple[int, int]
    labels: LabelSet
    prompt: str | None
    done: threading.Event = field(default_factory=threading.Event)
    logits: object = None  # torch [K,h',w'] fp32 on the CPU, finished (Segmenter.finish_logits)
    valid_hw: tuple[float, float] = (0.0, 0.0)  # the photo's extent in their cells
    error: BaseException | None = None


class Batcher:
    """The model thread: batches of waiting requests, one forward pass per label set in a batch."""

    def __init__(self, seg: Segmenter, batch_size: int, window_s: float, queue_size: int):
        self.seg, self.batch_size, self.window_s = seg, batch_size, window_s
        self.refiner = seg.refiner_for("auto")  # as predict refines by default (PAMR for naclip)
        self.jobs: queue.Queue[_Job | None] = queue.Queue(queue_size)
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, daemon=True, name="segcli-model")
        self.thread.start()

    def submit(self, job: _Job) -> bool:
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, deadline, closing = [first], time.monotonic() + self.window_s, False
            while len(batch) < self.batch_size:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                batch.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault((job.labels.synonyms, job.prompt), []).append(job)
            for group in groups.values():
                self._run(group)
            self.batches += 1
            if closing:
                return

    def _run(self, group: list[_Job]) -> None:
        try:
            text = self.seg.label_embeddings(group[0].labels, group[0].prompt)
            logits = self.seg.segment_images([job.pixels for job in group], text, self.batch_size)  # predict's protocol
            for job, logits_i in zip(group, logits):
                logits_i, job.valid_hw = self.seg.finish_logits(logits_i, job.pixels, job.resized_hw, self.refiner)
                job.logits = logits_i.cpu()
        except BaseException as exc:  # one bad batch must not end the model thread
            for job in group:
                job.error = exc
        finally:
            for job in group:
                job.done.set()


class Service:
    """What the routes call: one model, its batcher, the request-level work."""

    def __init__(self, seg: Segmenter, options: ServeOptions):
        self.seg, self.opt = seg, options
        self.default_labels = options.labels or seg.default_labels
        self.batcher = Batcher(seg, options.batch_size, options.batch_window_ms / 1000, options.queue_size)
        self.draining = False
        self.served = 0
        # one HostPlan per label set in use: its colors and the overlay's blend table are made once
        self._plan = functools.lru_cache(maxsize=32)(self._make_plan)

    def _make_plan(self, labels: LabelSet) -> host.HostPlan:
        return host.HostPlan(labels, ("mask", "color", "overlay"), self.opt.alpha, self.seg.imgsz, self.opt.max_pixels,
                             Path("."), Path("."), self.seg.protocol)

    def info(self) -> dict:
        labels = self.default_labels
        return {"segcli_version": __version__, "model": self.seg.name, "architecture": self.seg.model.architecture,
                "family": getattr(self.seg.model, "family", None), "imgsz": self.seg.imgsz,
                "protocol": self.seg.protocol.describe(), "refine": "pamr" if self.batcher.refiner is not None else "none",
                "default_labels": list(labels.names) if labels else None,
                "open_vocabulary": self.seg.model.open_vocabulary, "device": str(self.seg.device),
                "batch_size": self.opt.batch_size, "outputs": list(OUTPUTS),
                "max_upload_mb": self.opt.max_upload_mb, "max_pixels": self.opt.max_pixels}

    def labels(self, text: str | None) -> LabelSet:
        if text is None or not text.strip():
            if self.default_labels is None:
                raise ServeError(400, "no labels given and the server has no default labels: send labels=road,car,sky")
            return self.default_labels
        try:
            return self.seg.resolve_labels(parse_labels(text, allow_files=False))
        except SegcliError as exc:
            raise ServeError(400, str(exc)) from None

    def segment(self, data: bytes, labels_text: str | None, prompt: str | None, output: str) -> tuple[bytes, str]:
        """One upload -> (response body, media type)."""
        if output not in OUTPUTS:
            raise ServeError(400, f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        try:
            prompt_templates(prompt or None)
        except SegcliError as exc:
            raise ServeError(400, str(exc)) from None
        labels = self.labels(labels_text)
        plan = self._plan(labels)
        try:
            got = host.decode(data, plan)
        except ImageDecodeError as exc:
            raise _decode_failure(exc) from None
        job = _Job(got.pixels, got.resized_hw, labels, prompt or None)
        if not self.batcher.submit(job):
            raise ServeError(503, "the server is busy (queue full): retry shortly", {"Retry-After": "1"})
        if not job.done.wait(self.opt.request_timeout_s):
            raise ServeError(503, "the model did not answer in time: retry shortly", {"Retry-After": "5"})
        if job.error is not None:
            if isinstance(job.error, SegcliError):
                raise ServeError(400, str(job.error))
            raise ServeError(500, f"the model failed on this request: {type(job.error).__name__}: {one_line(str(job.error))}")
        counts = np.zeros(len(labels), np.int64)
        mask = restore_label_map(job.logits, job.valid_hw, got.full_hw, histogram=counts, groups=self.seg.label_groups(labels))
        kind = "mask" if output == "json" else output
        photo = None
        if kind == "overlay":
            try:
                photo = decode_full_bgr(data, self.opt.max_pixels)
            except ImageDecodeError as exc:
                raise _decode_failure(exc) from None
        blobs, fractions, present = host.render(mask, counts, photo, plan, [kind])
        self.served += 1
        if output != "json":
            return blobs[kind], OUTPUTS[output]
        body = {"labels": list(labels.names), "colors": [list(c) for c in labels.colors],
                "width": int(mask.shape[1]), "height": int(mask.shape[0]),
                "fractions": {labels.names[k]: round(float(fractions[k]), 6) for k in present},
                "mask_png": base64.b64encode(blobs["mask"]).decode("ascii")}
        return json.dumps(body).encode(), OUTPUTS["json"]


def _decode_failure(exc: ImageDecodeError) -> ServeError:
    status = {"too_large": 413, "not_image": 415}.get(exc.reason, 400)
    return ServeError(status, str(exc))


def create_app(service: Service):
    """The FastAPI app: /, /healthz, /v1/info, /v1/segment (and FastAPI's /docs)."""
    app = FastAPI(title="segcli", version=__version__,
                  description="Open-vocabulary semantic segmentation: POST a photo and label words, get a mask.")
    limit = int(service.opt.max_upload_mb * 1024 * 1024)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if service.draining and request.url.path != "/healthz":
            return error(503, "the server is shutting down", {"Retry-After": "5", "Connection": "close"})
        if request.method == "POST":  # the size is checked before any byte of the body is read
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return error(411, "send Content-Length: uploads must say their size (chunked uploads are refused)")
            if int(length) > limit + 64 * 1024:  # the form's own bytes on top of the photo
                return error(413, f"upload of {int(length) / 1e6:.1f} MB is above the {service.opt.max_upload_mb:g} MB limit")
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def serve_error(request, exc: ServeError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in exc.errors())
        return error(400, f"bad request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {one_line(str(exc))}")

    def api_key(request: Request) -> None:
        if service.opt.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not hmac.compare_digest(given.encode(), service.opt.api_key.encode()):
            raise ServeError(401, "missing or wrong API key (send the X-API-Key header)", {"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files("segcli.assets").joinpath("serve.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz():
        if service.draining:
            return error(503, "the server is shutting down")
        return {"status": "ok", "served": service.served, "batches": service.batcher.batches}

    @app.get("/v1/info", dependencies=[Depends(api_key)])
    def info():
        return service.info()

    @app.post("/v1/segment", dependencies=[Depends(api_key)],
              responses={200: {"content": {t: {} for t in OUTPUTS.values()}}})
    def segment(image: UploadFile = File(..., description="The photo (any format predict reads)."),
                labels: str | None = Form(None, description='"road,car,sky"; synonyms "road;street". Default: the server\'s.'),
                prompt: str | None = Form(None, description='Prompt template with {}, e.g. "a photo of a {}."'),
                output: str = Form("json", description="json | mask | color | overlay")):
        data = image.file.read(limit + 1)
        if len(data) > limit:
            raise ServeError(413, f"upload is above the {service.opt.max_upload_mb:g} MB limit")
        if not data:
            raise ServeError(400, "the image field is empty")
        body, media = service.segment(data, labels, prompt, output)
        return Response(body, media_type=media)

    return app


def check_listen(host_name: str, port: int) -> None:
    """A taken port or an address this machine does not have: one line (exit 2), before uvicorn
    would log it and exit 3."""
    import socket

    try:
        with socket.create_server((host_name, port)):
            pass
    except OSError as exc:
        raise SegcliError(f"cannot listen on {host_name}:{port}: {exc.strerror or exc}") from None


def serve(seg: Segmenter, options: ServeOptions, host_name: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; requests in flight finish, new ones get 503."""
    import uvicorn

    from segcli.kernels import warm_up

    check_listen(host_name, port)
    warm_up()  # the label-map loop compiled (or loaded) now, not during the first request
    service = Service(seg, options)
    app = create_app(service)
    config = uvicorn.Config(app, host=host_name, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                            access_log=log_level == "debug")
    server = uvicorn.Server(config)
    handle_exit = server.handle_exit

    def drain(sig, frame):
        service.draining = True
        handle_exit(sig, frame)

    server.handle_exit = drain
    # uvicorn re-raises the signal it stopped for once it is done; with these handlers in place
    # beforehand, that lands here and the drained server exits 0 instead of dying by the signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run()
    finally:
        service.batcher.close()
