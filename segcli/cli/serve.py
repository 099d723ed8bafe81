"""`segcli serve`: the model over HTTP (the serve extra: FastAPI, uvicorn)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from segcli.cli.common import user_errors, warn
from segcli.errors import SegcliError
from segcli.models.families import DEFAULT_MODEL


@user_errors
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Any --model value (default: clip-dense:ViT-B-16)."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help=("Default labels for requests that send none (default: the model's "
            "own).")),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface: give --api-key then)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Requests per forward pass at most."),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms", min=0.0, help=("How long a request waits for others to share its "
            "batch.")),
    queue_size: int = typer.Option(64, "--queue", min=1, help="Requests that may wait for the model; more get 503 with Retry-After."),
    max_upload_mb: float = typer.Option(25.0, "--max-upload-mb", min=0.001, help="Larger uploads get 413."),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", min=1, help="Larger images get 413 (decompression bombs)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SEGCLI_API_KEY", help=("Require this key (X-API-Key header or Bearer "
            "token) on /v1 routes.")),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Overlay opacity of the colors."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="Model input size (as predict's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16, fp16, int8 (as predict's)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug."),
) -> None:
    """Serve the model over HTTP: POST /v1/segment, GET /v1/info, /healthz, a browser page at /, docs at /docs."""
    try:
        from segcli.serve.app import check_listen
        from segcli.serve.app import serve as run_server
        from segcli.serve.service import ServeOptions
    except ImportError as exc:
        raise SegcliError(f"segcli serve needs the serve extra: pip install 'segcli[serve]' ({exc.name} is missing)") from None
    from segcli.inference.segmenter import Segmenter
    from segcli.models.factory import UNTRAINED_WARNING
    from segcli.vocabulary.labels import parse_labels

    label_set = parse_labels(labels) if labels is not None else None
    seg = Segmenter.from_pretrained(model or DEFAULT_MODEL, device=device, precision=precision, imgsz=imgsz, warn=False)
    if seg.untrained:
        warn(UNTRAINED_WARNING.format(name=model))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        warn(f"listening on {host} without --api-key: anyone who can reach this port can use the model")
    options = ServeOptions(labels=label_set, batch_size=batch_size, batch_window_ms=batch_window_ms,
                           queue_size=queue_size, max_upload_mb=max_upload_mb, max_pixels=max_pixels, alpha=alpha,
                           api_key=api_key)
    check_listen(host, port)
    print(f"segcli serve: {seg.name} on http://{host}:{port}/ (API docs at /docs)", file=sys.stderr)
    run_server(seg, options, host, port, log_level)
