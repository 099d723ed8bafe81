"""`segcli serve` under load: throughput against `segcli predict`, latency, memory over many requests.

    python benchmarks/bench_serve.py [--requests 48] [--tiny-requests 2000] [--clients 32]

(a) `lseg_vitb16_384` (a random-weights checkpoint), 8 labels, 640x480 JPEGs, mask output:
    32 concurrent clients (threads, one HTTP connection per request) against the server's
    images/s, beside `segcli predict --save mask` on the same photos (start-up excluded by two
    folder sizes); p50/p95 latency;
(b) `lseg_tiny` the same way, for requests/s where the model costs little;
(c) the server's RSS after the warm-up and after every further 500 of (b)'s requests (flat = no leak).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import ROOT, sample_photos  # benchmarks/ is on sys.path when run as a script

LABELS = "road,car,sky,person,tree,building,grass,water"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, photo: bytes) -> tuple[int, float]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="output"\r\n\r\nmask\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n\r\n').encode() \
        + photo + f"\r\n--{boundary}--\r\n".encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/segment", body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "serve", "-m", model, "-l", LABELS, "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    sys.exit("the server did not start")


def load(port: int, photos: list[bytes], requests: int, clients: int) -> tuple[float, list[float]]:
    with ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda i: post(port, photos[i % len(photos)]), range(requests)))
        wall = time.perf_counter() - t0
    bad = [status for status, _ in results if status != 200]
    if bad:
        sys.exit(f"{len(bad)} requests failed: {sorted(set(bad))}")
    return requests / wall, [latency for _, latency in results]


def predict_rate(model: str, folder_small: Path, folder_big: Path, tmp: Path) -> float:
    times = {}
    for folder in (folder_small, folder_big):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "segcli", "predict", str(folder), "-m", model, "-l", LABELS, "--save", "mask",
                        "-o", str(tmp / f"pred_{folder.name}"), "-q"], cwd=ROOT, check=True)
        times[folder] = time.perf_counter() - t0
    n_small, n_big = len(list(folder_small.glob("*.jpg"))), len(list(folder_big.glob("*.jpg")))
    return (n_big - n_small) / (times[folder_big] - times[folder_small])


def run(model: str, name: str, requests: int, clients: int, tmp: Path, memory_steps: int = 0) -> None:
    small, big = tmp / f"{name}_small", tmp / f"{name}_big"
    sample_photos(small, max(4, requests // 4))
    photos = [p.read_bytes() for p in sorted(sample_photos(big, requests).glob("*.jpg"))]
    rate_predict = predict_rate(model, small, big, tmp)
    port = free_port()
    proc = start_server(model, port)
    try:
        load(port, photos, min(len(photos), 2 * clients), clients)  # warm-up: first batches, caches
        rate, latencies = load(port, photos, requests, clients)
        p50, p95 = np.percentile(latencies, [50, 95])
        print(f"| {name} | {clients} | {requests} | {rate:.2f} | {rate_predict:.2f} | {rate / rate_predict:.2f} | "
              f"{p50 * 1000:.0f} | {p95 * 1000:.0f} |", flush=True)
        if memory_steps:
            rss = [rss_mb(proc.pid)]
            for _ in range(memory_steps):
                load(port, photos, 500, clients)
                rss.append(rss_mb(proc.pid))
            print(f"(c) server RSS (MB) after the warm-up and after each further 500 requests ({name}): "
                  + " / ".join(f"{r:.0f}" for r in rss))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="requests for (a)")
    ap.add_argument("--tiny-requests", type=int, default=2000, help="requests for (b) and (c), in steps of 500")
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-serve-"))
    try:
        import torch

        from segcli.modeling import build_model
        from segcli.models.checkpoint import save_checkpoint

        models = {}
        for arch in ("lseg_vitb16_384", "lseg_tiny"):
            torch.manual_seed(0)
            models[arch] = tmp / f"{arch}.safetensors"
            save_checkpoint(build_model(arch), models[arch])
        print(f"segcli serve, 640x480 JPEGs, 8 labels, mask output, {os.cpu_count()} CPU cores")
        print("| model | clients | requests | serve img/s | predict img/s | ratio | p50 ms | p95 ms |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        run(str(models["lseg_vitb16_384"]), "lseg_vitb16_384", args.requests, args.clients, tmp)
        run(str(models["lseg_tiny"]), "lseg_tiny", 500, args.clients, tmp, memory_steps=max(1, args.tiny_requests // 500 - 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
