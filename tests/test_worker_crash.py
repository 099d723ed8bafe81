"""A worker process that dies (a native crash on a hostile file, the OOM killer) costs only the input
it held: its inputs are retried one at a time in a fresh worker, an input that kills its worker again
fails with its own line, and the run goes on. The crash here is real: a Pillow plugin, installed in
every process through sitecustomize, abort()s (SIGABRT, as glibc's "double free") on files that
start with CRASH_MAGIC, after printing what a native decoder would on stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_images"
CRASH_MAGIC = b"SEGCLI-CRASH"  # within the 16 bytes Pillow shows a plugin
PLUGIN = f'''
import os
from PIL import Image, ImageFile

class CrashingImageFile(ImageFile.ImageFile):
    format = "CRASHTEST"

    def _open(self):
        os.write(2, b"TIFFFillStrip: Read error on strip 7; got 0 bytes, expected 8192\\n")
        os.abort()

Image.register_open("CRASHTEST", CrashingImageFile, lambda head: head.startswith({CRASH_MAGIC!r}))
'''


def _predict(tmp_path: Path, folder: Path, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "segcli", "predict", str(folder), "-l", "cat,sky", "-m", str(checkpoint),
                           "-o", str(tmp_path / "out"), "-j", "2", "-b", "2", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def _photos(folder: Path, count: int, poisoned: set[int]) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        if i in poisoned:
            (folder / f"p{i:02d}.jpg").write_bytes(CRASH_MAGIC + os.urandom(64))
        else:
            shutil.copy(SAMPLES / "coffee.jpg", folder / f"p{i:02d}.jpg")
    return folder


def test_a_file_that_crashes_its_worker_fails_alone_and_the_run_goes_on(tmp_path, tiny_checkpoint):
    folder = _photos(tmp_path / "photos", 12, poisoned={5})
    run = _predict(tmp_path, folder, tiny_checkpoint)
    assert run.returncode == 1, run.stderr  # one input failed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    failed = [r for r in summary["images"] if r["status"] != "ok"]
    assert summary["counts"]["ok"] == 11 and [r["output"] for r in failed] == ["p05"]
    assert failed[0]["error"] == "worker crashed while decoding this file (signal 6, SIGABRT)"
    native = failed[0]["native_messages"]  # what the decoder printed, then the worker's Python stack
    assert native[0] == "TIFFFillStrip: Read error on strip 7; got 0 bytes, expected 8192"
    assert "Fatal Python error: Aborted" in native and any("segcli/pipeline/host.py" in line for line in native)
    # its line on stderr, and the native noise nowhere on the terminal; no traceback
    assert "error: " in run.stderr and "worker crashed while decoding this file" in run.stderr
    assert "TIFFFillStrip" not in run.stderr and "Traceback" not in run.stderr
    width, height = Image.open(SAMPLES / "coffee.jpg").size
    for i in set(range(12)) - {5}:
        assert np.array(Image.open(tmp_path / "out" / f"p{i:02d}_mask.png")).shape == (height, width)
    assert not list((tmp_path / "out").rglob(".segcli-tmp-*"))
    # the next run skips the poisoned file as failed, like any other bad input, and finishes too
    again = _predict(tmp_path, folder, tiny_checkpoint)
    assert again.returncode == 1, again.stderr
    again_summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert again_summary["counts"]["ok"] == 11


def test_several_inputs_crashing_in_a_row_stop_the_run_as_before(tmp_path, tiny_checkpoint):
    folder = _photos(tmp_path / "photos", 8, poisoned={0, 1, 2, 3, 4, 5, 6, 7})
    run = _predict(tmp_path, folder, tiny_checkpoint, "-q")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "a worker process died" in lines[0], run.stderr


def test_the_signal_is_read_from_faulthandler_when_the_status_is_lost():
    from segcli.pipeline.workers import _fatal_signal

    assert _fatal_signal("TIFFFillStrip: ...\nFatal Python error: Aborted\n\nCurrent thread 0x1") == "signal 6, SIGABRT"
    assert _fatal_signal("Fatal Python error: Segmentation fault") == "signal 11, SIGSEGV"
    assert _fatal_signal("some other message") is None
