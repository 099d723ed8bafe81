"""predict from a bucket into a bucket, against a real S3 API on 127.0.0.1 (moto's server, as s3fs's own
tests use it): the same bytes as a local run, re-runs that skip, one-line errors, whole objects only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLES, TINY_LABELS
from PIL import Image

pytest.importorskip("s3fs", reason="object storage needs the s3 extra")
moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server]")

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("_mask.png", "_color.png", "_overlay.jpg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-7f3a",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "XDG_CACHE_HOME": str(Path(os.environ.get("TMPDIR", "/tmp")) / f"segcli-s3-cache-{port}")}
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    yield env
    server.stop()


def fs(env: dict):
    import s3fs

    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


def segcli(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segcli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("cat.jpg", "rocket.jpg"):
        shutil.copy(SAMPLES / name, folder / name)
    (folder / "sub").mkdir()
    Image.open(SAMPLES / "cat.jpg").resize((90, 70)).save(folder / "sub" / "small.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def uploaded_and_run_here(env: dict, local: Path, source: str, out_bucket: str, checkpoint: Path, here: Path):
    """`local` uploaded to the bucket path `source` (its bucket made, and `out_bucket`), and a local
    run of it into `here` to compare with; returns the store."""
    store = fs(env)
    store.mkdir(source.split("/")[0])
    store.mkdir(out_bucket)
    store.put(str(local) + "/", source + "/", recursive=True)
    ran = segcli(env, "predict", str(local), "-m", str(checkpoint), "-l", TINY_LABELS, "-o", str(here), "-q")
    assert ran.returncode == 0, ran.stderr
    return store


def test_bucket_to_bucket_is_a_local_run(s3, tmp_path, tiny_checkpoint):
    local = photos(tmp_path / "photos")
    store = uploaded_and_run_here(s3, local, "in-bucket/photos", "out-bucket", tiny_checkpoint, tmp_path / "here")
    args = ("predict", "s3://in-bucket/photos", "-m", str(tiny_checkpoint), "-l", TINY_LABELS, "-o", "s3://out-bucket/masks")
    ran = segcli(s3, *args)
    assert ran.returncode == 0, ran.stderr
    assert "3 ok, 0 failed, 0 already done, 1 non-image file(s) skipped" in ran.stderr and "s3://out-bucket/masks" in ran.stderr
    for rel in ("cat", "rocket", "sub/small"):
        for kind in KINDS:
            assert store.cat(f"out-bucket/masks/{rel}{kind}") == (tmp_path / "here" / f"{rel}{kind}").read_bytes()
    summary = json.loads(store.cat("out-bucket/masks/summary.json"))
    assert summary["counts"] == {"inputs": 3, "ok": 3, "failed": 0, "reused": 0, "not_done": 0}
    assert summary["skipped_non_images"] == ["s3://in-bucket/photos/notes.txt"]
    assert {r["path"] for r in summary["images"]} == {f"s3://in-bucket/photos/{n}" for n in ("cat.jpg", "rocket.jpg", "sub/small.png")}
    text = json.dumps(summary) + store.cat("out-bucket/masks/.segcli/records.jsonl").decode()
    assert "testing-secret-7f3a" not in text and "testing-secret-7f3a" not in ran.stderr  # credentials stay out
    before = {k: v["LastModified"] for k, v in store.find("out-bucket/masks", detail=True).items() if k.endswith(KINDS)}
    again = segcli(s3, *args)
    assert again.returncode == 0 and "3 already done" in again.stderr, again.stderr
    shutil.rmtree(Path(s3["XDG_CACHE_HOME"]), ignore_errors=True)  # as another machine would: no local mirror
    again = segcli(s3, *args)
    assert again.returncode == 0 and "3 already done" in again.stderr, again.stderr
    store.invalidate_cache()
    after = {k: v["LastModified"] for k, v in store.find("out-bucket/masks", detail=True).items() if k.endswith(KINDS)}
    assert after == before  # nothing uploaded again


def test_one_line_errors(s3, tmp_path, tiny_checkpoint):
    missing = segcli(s3, "predict", "s3://no-such-bucket-here/photos", "-m", str(tiny_checkpoint), "-l", TINY_LABELS)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1 and "no such bucket" in lines[0], missing.stderr
    store = fs(s3)
    store.mkdir("errors-in")
    store.pipe("errors-in/p/cat.jpg", (SAMPLES / "cat.jpg").read_bytes())
    nowhere = segcli(s3, "predict", "s3://errors-in/p", "-m", str(tiny_checkpoint), "-l", TINY_LABELS,
                     "-o", "s3://no-such-output-bucket/m")
    lines = nowhere.stderr.strip().splitlines()
    assert nowhere.returncode == 2 and len(lines) == 1 and "s3://no-such-output-bucket/m: no such bucket" in lines[0]
    env = {k: v for k, v in s3.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    bare = segcli(env, "predict", "s3://in-bucket/photos", "-m", str(tiny_checkpoint), "-l", TINY_LABELS)
    lines = bare.stderr.strip().splitlines()
    assert bare.returncode == 2 and len(lines) == 1 and "no credentials" in lines[0], bare.stderr


def test_a_run_killed_mid_upload_leaves_only_whole_objects(s3, tmp_path, tiny_checkpoint):
    local = tmp_path / "many"
    local.mkdir()
    for i in range(16):  # distinct photos: each its own outputs
        Image.open(SAMPLES / ("cat.jpg", "rocket.jpg")[i % 2]).resize((200 + 8 * i, 150)).save(local / f"p{i:02d}.jpg")
    store = uploaded_and_run_here(s3, local, "kill-in/p", "kill-out", tiny_checkpoint, tmp_path / "here")
    args = ["predict", "s3://kill-in/p", "-m", str(tiny_checkpoint), "-l", TINY_LABELS, "-o", "s3://kill-out/m", "-q",
            "--batch-size", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "segcli", *args], cwd=ROOT, env=s3, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        store.invalidate_cache()
        if len([k for k in store.find("kill-out/m") if k.endswith(KINDS)]) >= 4:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store.invalidate_cache()
    written = [k for k in store.find("kill-out/m") if k.endswith(KINDS)]
    assert written and len(written) < 48  # stopped part-way
    for key in written:  # every object there is the whole file
        assert store.cat(key) == (tmp_path / "here" / key.rsplit("/", 1)[-1]).read_bytes()
    done = segcli(s3, *args)
    assert done.returncode == 0, done.stderr
    store.invalidate_cache()
    assert len([k for k in store.find("kill-out/m") if k.endswith(KINDS)]) == 48
