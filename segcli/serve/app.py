"""`segcli serve`'s HTTP face: the routes, the browser page and uvicorn (FastAPI + uvicorn).

The work behind each route is segcli.serve.service (queue, batcher, predict's own stages). While the
server drains for SIGTERM, new requests get 503 and the ones in flight finish.
"""

from __future__ import annotations

import hmac
import signal
from importlib import resources

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from segcli.errors import SegcliError, one_line
from segcli.inference.segmenter import Segmenter
from segcli.serve.service import OUTPUTS, ServeError, ServeOptions, Service
from segcli.version import __version__


class ErrorBody(BaseModel):
    """Every error response: one sentence, no traceback."""

    error: str


# what each route can answer besides 200, each as {"error": ...}; the middleware's apply to every request
_ERROR_TEXT = {
    400: "Bad request: a missing or empty image, an undecodable image, bad labels, prompt or output.",
    401: "Missing or wrong API key (only when the server has one).",
    411: "No Content-Length (chunked uploads are refused).",
    413: "Upload above --max-upload-mb, or an image above --max-pixels (decompression bombs).",
    415: "The upload is not an image.",
    500: "The model failed on this request.",
    503: "Busy (the queue is full), the model did not answer in time, or shutting down; see Retry-After.",
}
_ROUTE_ERRORS = {("get", "/healthz"): (503,), ("get", "/v1/info"): (401, 503),
                 ("post", "/v1/segment"): (400, 401, 411, 413, 415, 500, 503)}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorBody, "description": _ERROR_TEXT[code]} for code in codes}


def _without_422(app: FastAPI) -> dict:
    """FastAPI's schema, less the 422 it documents for every route with parameters: this server
    answers malformed requests with 400 and ErrorBody."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


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

    @app.get("/healthz", responses=_errors(*_ROUTE_ERRORS["get", "/healthz"]))
    def healthz():
        if service.draining:
            return error(503, "the server is shutting down")
        return {"status": "ok", "served": service.served, "batches": service.batcher.batches}

    @app.get("/v1/info", dependencies=[Depends(api_key)], responses=_errors(*_ROUTE_ERRORS["get", "/v1/info"]))
    def info():
        return service.info()

    @app.post("/v1/segment", dependencies=[Depends(api_key)],
              responses={200: {"content": {t: {} for t in OUTPUTS.values()}}, **_errors(*_ROUTE_ERRORS["post", "/v1/segment"])})
    def segment(image: UploadFile = File(..., description="The photo (any format predict reads); not empty.",
                                         json_schema_extra={"minLength": 1}),
                labels: str | None = Form(None, description='"road,car,sky"; synonyms "road;street". Default: the server\'s.'),
                prompt: str | None = Form(None, description='Prompt template with {}, e.g. "a photo of a {}."'),
                output: str = Form("json", description="json | mask | color | overlay",
                                   json_schema_extra={"enum": list(OUTPUTS)})):
        data = image.file.read(limit + 1)
        if len(data) > limit:
            raise ServeError(413, f"upload is above the {service.opt.max_upload_mb:g} MB limit")
        if not data:
            raise ServeError(400, "the image field is empty")
        body, media = service.segment(data, labels, prompt, output)
        return Response(body, media_type=media)

    app.openapi = lambda: _without_422(app)
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

    from segcli.postprocess.kernels import warm_up

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
