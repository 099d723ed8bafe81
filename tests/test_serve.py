"""`segcli serve`: the real server (uvicorn on 127.0.0.1, a free port), talked to over the socket."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, TINY_LABELS, bomb_png
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("fastapi", reason="segcli serve needs the serve extra")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "segcli", "serve", "-m", str(model), "--port",
                                      str(self.port), "--log-level", "warning", *args],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def request(self, method: str, path: str, fields: dict | None = None, files: dict | None = None,
                headers: dict | None = None, body: bytes | None = None) -> tuple[int, dict, bytes]:
        headers = dict(headers or {})
        if fields is not None or files is not None:
            boundary = uuid.uuid4().hex
            parts = []
            for name, value in (fields or {}).items():
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                             + value.encode() + b"\r\n")
            for name, (filename, data) in (files or {}).items():
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers, encode_chunked="Transfer-Encoding" in headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def segment(self, photo: bytes, output: str = "json", labels: str | None = TINY_LABELS, **kw):
        fields = {"output": output} | ({"labels": labels} if labels is not None else {})
        return self.request("POST", "/v1/segment", fields=fields, files={"image": ("photo.jpg", photo)}, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv = Server(tiny_checkpoint, "--labels", TINY_LABELS, "--max-upload-mb", "0.2")
    yield srv
    srv.stop()


def test_outputs_are_predicts_bytes(server, tiny_checkpoint, tmp_path):
    out = tmp_path / "predict"
    result = CliRunner().invoke(app, ["predict", str(SAMPLES / "cat.jpg"), "-l", TINY_LABELS, "-m", str(tiny_checkpoint),
                                      "-o", str(out), "--batch-size", "1", "-q"])
    assert result.exit_code == 0, result.output
    photo = (SAMPLES / "cat.jpg").read_bytes()
    for output, suffix, media in (("mask", "_mask.png", "image/png"), ("color", "_color.png", "image/png"),
                                  ("overlay", "_overlay.jpg", "image/jpeg")):
        status, headers, body = server.segment(photo, output)
        assert status == 200 and headers["content-type"] == media
        assert body == (out / f"cat{suffix}").read_bytes(), output
    status, headers, body = server.segment(photo, "json")
    data = json.loads(body)
    assert status == 200 and data["labels"] == TINY_LABELS.split(",") and (data["width"], data["height"]) == (451, 300)
    assert base64.b64decode(data["mask_png"]) == (out / "cat_mask.png").read_bytes()
    record = json.loads((out / "summary.json").read_text())["images"][0]
    assert data["fractions"] == record["labels"]
    # default labels when none are sent; info says what the server runs
    assert json.loads(server.segment(photo, "json", labels=None)[2])["labels"] == TINY_LABELS.split(",")
    info = json.loads(server.request("GET", "/v1/info")[2])
    assert info["architecture"] == "lseg_tiny" and info["default_labels"] == TINY_LABELS.split(",") and info["imgsz"] == 128
    status, _, page = server.request("GET", "/")
    assert status == 200 and b"<title>segcli</title>" in page and b"http" not in page.split(b"<script>")[1]
    assert server.request("GET", "/docs")[0] == 200


def test_concurrent_requests_are_batched_and_all_answered(server):
    photos = [(SAMPLES / f"{n}.jpg").read_bytes() for n in ("cat", "rocket", "coffee")]
    before = json.loads(server.request("GET", "/healthz")[2])
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda i: server.segment(photos[i % 3], "mask"), range(50)))
    assert [status for status, _, _ in results] == [200] * 50
    sizes = {Image.open(__import__("io").BytesIO(body)).size for _, _, body in results}
    assert sizes == {Image.open(SAMPLES / f"{n}.jpg").size for n in ("cat", "rocket", "coffee")}
    after = json.loads(server.request("GET", "/healthz")[2])
    assert after["served"] - before["served"] == 50
    assert after["batches"] - before["batches"] < 50  # requests shared forward passes


@pytest.mark.parametrize("case", ["truncated", "not an image", "empty", "oversized upload", "bomb", "no labels",
                                  "duplicate labels", "label file", "bad output", "bad prompt", "no image",
                                  "chunked"])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(server, case):
    photo = (SAMPLES / "cat.jpg").read_bytes()
    big = Image.open(SAMPLES / "coffee.jpg").resize((2000, 1500))
    import io

    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    request = {
        "truncated": lambda: server.segment(photo[: len(photo) // 3]),
        "not an image": lambda: server.segment(b"this is not a photo\n" * 10),
        "empty": lambda: server.segment(b""),
        "oversized upload": lambda: server.segment(buffer.getvalue()),
        "bomb": lambda: server.segment(bomb_png()),
        "no labels": lambda: server.segment(photo, labels=",,;"),
        "duplicate labels": lambda: server.segment(photo, labels="cat,cat"),
        "label file": lambda: server.segment(photo, labels="@/etc/passwd"),
        "bad output": lambda: server.segment(photo, output="tiff"),
        "bad prompt": lambda: server.request("POST", "/v1/segment", fields={"prompt": "no braces"},
                                             files={"image": ("a.jpg", photo)}),
        "no image": lambda: server.request("POST", "/v1/segment", fields={"labels": "a,b"}),
        "chunked": lambda: server.request("POST", "/v1/segment", headers={"Transfer-Encoding": "chunked"},
                                          body=iter([b"0123"])),
    }[case]
    expected = {"truncated": 400, "not an image": 415, "empty": 400, "oversized upload": 413, "bomb": 413,
                "no labels": 400, "duplicate labels": 400, "label file": 400, "bad output": 400, "bad prompt": 400,
                "no image": 400, "chunked": 411}[case]
    status, headers, body = request()
    assert status == expected, body
    message = json.loads(body)["error"]
    assert message and "\n" not in message and "Traceback" not in message
    assert server.segment(photo, "mask")[0] == 200  # the next request still works


def _documented(schema: dict, method: str, path: str, status: int, body: bytes, content_type: str) -> None:
    """The served OpenAPI schema lists this answer, and the body has the declared shape."""
    answers = schema["paths"][path][method.lower()]["responses"]
    assert str(status) in answers, (path, status, sorted(answers))
    if status == 200:
        return
    declared = answers[str(status)]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    body_schema = schema["components"]["schemas"][declared]
    assert content_type.startswith("application/json") and body_schema["required"] == ["error"]
    assert set(json.loads(body)) == {"error"} and isinstance(json.loads(body)["error"], str)


def test_the_served_schema_documents_every_answer(server):
    """What a contract tester (schemathesis) checks: every status a route really answers, and its
    body, are in /openapi.json; the image is required and may not be empty; no 422 (errors are 400)."""
    status, _, raw = server.request("GET", "/openapi.json")
    schema = json.loads(raw)
    segment = schema["paths"]["/v1/segment"]["post"]
    form = segment["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    image = schema["components"]["schemas"][form]
    assert "image" in image["required"] and image["properties"]["image"]["minLength"] == 1
    assert all("422" not in op["responses"] for path in schema["paths"].values() for op in path.values())
    photo = (SAMPLES / "cat.jpg").read_bytes()
    calls = [("GET", "/healthz", lambda: server.request("GET", "/healthz")),
             ("GET", "/v1/info", lambda: server.request("GET", "/v1/info")),
             ("POST", "/v1/segment", lambda: server.segment(photo)),
             ("POST", "/v1/segment", lambda: server.segment(photo, "mask")),
             ("POST", "/v1/segment", lambda: server.segment(b"")),
             ("POST", "/v1/segment", lambda: server.segment(photo[:300])),
             ("POST", "/v1/segment", lambda: server.segment(b"not a photo\n" * 10)),
             ("POST", "/v1/segment", lambda: server.segment(photo, "tiff")),
             ("POST", "/v1/segment", lambda: server.segment(photo * 200)),
             ("POST", "/v1/segment", lambda: server.request("POST", "/v1/segment", fields={"labels": "a,b"})),
             ("POST", "/v1/segment", lambda: server.request("POST", "/v1/segment", headers={"Transfer-Encoding": "chunked"},
                                                            body=iter([b"0123"])))]
    seen = set()
    for method, path, call in calls:
        status, headers, body = call()
        _documented(schema, method, path, status, body, headers.get("content-type", ""))
        seen.add(status)
    assert seen == {200, 400, 411, 413, 415}


def test_api_key_is_enforced(tiny_checkpoint):
    srv = Server(tiny_checkpoint, "--api-key", "s3cret")
    try:
        photo = (SAMPLES / "cat.jpg").read_bytes()
        assert srv.request("GET", "/healthz")[0] == 200
        status, headers, body = srv.request("GET", "/v1/info")
        assert status == 401 and "API key" in json.loads(body)["error"]
        _documented(json.loads(srv.request("GET", "/openapi.json")[2]), "GET", "/v1/info", status, body,
                    headers.get("content-type", ""))
        assert srv.segment(photo, headers={"X-API-Key": "wrong"})[0] == 401
        assert srv.request("GET", "/v1/info", headers={"X-API-Key": "s3cret"})[0] == 200
        assert srv.segment(photo, "mask", headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        assert srv.stop() == 0


def test_a_taken_port_is_one_line(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "segcli", "serve", "-m", str(tiny_checkpoint), "--port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                                  f"(while attempting to bind on address ('127.0.0.1', {port}))"]


def test_sigterm_lets_requests_in_flight_finish(tiny_checkpoint):
    srv = Server(tiny_checkpoint, "--labels", TINY_LABELS)
    big = Image.open(SAMPLES / "astronaut.jpg").resize((3000, 3000))
    import io

    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(srv.segment, buffer.getvalue(), "overlay") for _ in range(8)]
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        statuses = [f.result()[0] for f in futures]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert srv.proc.wait(timeout=60) == 0


def test_the_browser_page(server, tmp_path):
    """Headless Chromium drives the page: pick a photo, type labels, see the overlay and fractions."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Chromium and chromedriver are not installed (CI installs Debian's chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "lseg_tiny" in b.find_element(By.ID, "model").text)
        assert browser.find_element(By.ID, "labels").get_attribute("value") == TINY_LABELS  # the server's default
        browser.execute_script("document.getElementById('file').hidden = false")
        browser.find_element(By.ID, "file").send_keys(str(SAMPLES / "cat.jpg"))
        labels = browser.find_element(By.ID, "labels")
        labels.clear()
        labels.send_keys("cat,grass,sky")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda b: b.execute_script("const i = document.getElementById('result'); "
                                              "return i.dataset.view === 'overlay' && i.complete && i.naturalWidth > 0"))
        size = browser.execute_script("const i = document.getElementById('result'); return [i.naturalWidth, i.naturalHeight]")
        assert size == [451, 300]
        rows = browser.find_elements(By.CSS_SELECTOR, "#fractions tr")
        assert rows and all(r.text.split()[0] in ("cat", "grass", "sky") and r.text.endswith("%") for r in rows)
        assert browser.find_element(By.ID, "status").text == "done: 451×300"
        browser.find_element(By.CSS_SELECTOR, "input[value=color]").click()
        wait.until(lambda b: b.execute_script("return document.getElementById('result').dataset.view === 'color'"))
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 800 and os.path.getsize(shot) > 10_000
        image = np.array(Image.open(shot).convert("RGB"))
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # the photo and the colors are rendered, not a blank page
    finally:
        browser.quit()


def test_the_default_method_serves_predicts_masks(tmp_path):
    """clip-dense's NACLIP (windows over the short side, PAMR, synonym max) through the server: the
    mask is the one predict writes for the photo with the model's defaults."""
    from safetensors.torch import save_file
    from test_clip_dense import tiny_clip

    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip().state_dict().items()}, str(weights))
    labels = "cat;kitty,grass,sky"
    out = tmp_path / "predict"
    result = CliRunner().invoke(app, ["predict", str(SAMPLES / "cat.jpg"), "-l", labels, "-m", str(weights), "-o", str(out),
                                      "--batch-size", "1", "--save", "mask", "-q"])
    assert result.exit_code == 0, result.output
    srv = Server(weights)
    try:
        status, _, body = srv.segment((SAMPLES / "cat.jpg").read_bytes(), "mask", labels=labels)
        info = json.loads(srv.request("GET", "/v1/info")[2])
    finally:
        srv.stop()
    assert status == 200 and body == (out / "cat_mask.png").read_bytes()
    assert info["refine"] == "pamr" and info["protocol"].startswith("short side 336, 224-pixel windows")
