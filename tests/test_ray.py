"""`segcli predict --engine ray` on a local Ray (started and stopped here): the same files as a local
run from a folder and from a bucket, re-runs that skip, and a model actor killed mid-run costs only
its batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
from conftest import SAMPLES, TINY_LABELS
from PIL import Image
from test_remote import KINDS, fs, s3, segcli  # noqa: F401 (s3 is a fixture)

ray = pytest.importorskip("ray", reason="--engine ray needs the ray extra")


def many_photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.open(SAMPLES / ("cat.jpg", "rocket.jpg", "coffee.jpg")[i % 3]).resize((160 + 8 * i, 120)).save(folder / f"p{i:02d}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.name.endswith(KINDS))
    assert names and names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.name.endswith(KINDS))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_folder_and_a_bucket_through_ray_give_a_local_runs_files(s3, tmp_path, tiny_checkpoint):  # noqa: F811
    photos = many_photos(tmp_path / "photos", 5)
    common = ("-m", str(tiny_checkpoint), "-l", TINY_LABELS)
    local = segcli(s3, "predict", str(photos), *common, "-o", str(tmp_path / "local"), "-q")
    assert local.returncode == 1  # the broken file fails, alone
    ran = segcli(s3, "predict", str(photos), *common, "-o", str(tmp_path / "ray"), "--engine", "ray")
    assert ran.returncode == 1 and "5 ok, 1 failed, 0 already done" in ran.stderr, ran.stderr
    same_files(tmp_path / "local", tmp_path / "ray")
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in local_summary["images"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in summary["images"]] == strip
    again = segcli(s3, "predict", str(photos), *common, "-o", str(tmp_path / "ray"), "--engine", "ray")
    assert "5 already done" in again.stderr, again.stderr
    store = fs(s3)
    store.mkdir("ray-in")
    store.mkdir("ray-out")
    store.put(str(photos) + "/", "ray-in/p/", recursive=True)
    remote = segcli(s3, "predict", "s3://ray-in/p", *common, "-o", "s3://ray-out/m", "--engine", "ray")
    assert remote.returncode == 1 and "5 ok, 1 failed" in remote.stderr, remote.stderr
    store.get("ray-out/m/", str(tmp_path / "fetched") + "/", recursive=True)
    same_files(tmp_path / "local", tmp_path / "fetched")


def _model_actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"MapBatches(Model" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_a_killed_model_actor_is_restarted_and_the_files_are_the_same(tmp_path, tiny_checkpoint):
    from segcli.inference.segmenter import Segmenter
    from segcli.pipeline.launch import find_inputs, run_predict
    from segcli.pipeline.run import RunOptions
    from segcli.vocabulary.labels import parse_labels

    photos = many_photos(tmp_path / "photos", 10)
    (photos / "broken.jpg").unlink()
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", warn=False)
    found, _ = find_inputs([str(photos)], None, None)

    def options(out: Path) -> RunOptions:
        return RunOptions(labels=parse_labels(TINY_LABELS), output=out, batch_size=1)

    run_predict(seg, options(tmp_path / "local"), found)
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    killed: list[int] = []

    def kill_once(record: dict) -> None:
        if not killed:
            for pid in _model_actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    try:
        timer = threading.Timer(600, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        result = run_predict(seg, options(tmp_path / "ray"), found, on_record=kill_once, engine="ray")
        timer.cancel()
    finally:
        ray.shutdown()
    assert killed, "no model actor was found to kill"
    assert result.failed == 0 and len(result.records) == 10
    same_files(tmp_path / "local", tmp_path / "ray")
    shutil.rmtree(tmp_path / "photos")
