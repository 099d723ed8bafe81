"""The CLI's shell: lazy imports, one-line messages, options defined once."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.errors import one_line
from segcli.training.options import TrainOptions

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "timm", "cv2", "safetensors")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["predict", "--help"], ["train", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    code = ("import sys\nfrom segcli.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n    code = e.code\n"
            "print('LOADED', sorted(m for m in %r if m in sys.modules), code)" % (argv, HEAVY))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    last = result.stdout.strip().splitlines()[-1]
    assert last == "LOADED [] 0", result.stdout[-500:] + result.stderr[-500:]


def test_one_line_never_cuts_a_word():
    text = "Please check your connection and try again or make sure the file is in the cache\nsecond line"
    short = one_line(text, 50)
    assert len(short) <= 50 and short.endswith("...") and "\n" not in short
    assert text.replace("\n", " ").startswith(short[:-3]) and short[:-3].split()[-1] in text.split()
    assert one_line("short  text\n") == "short text"


def test_every_train_option_is_a_cli_option_and_reaches_the_run(tmp_path):
    from segcli.cli.training import train

    names = set(train.__signature__.parameters)
    assert {f.name for f in dataclasses.fields(TrainOptions)} <= names
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", "synthetic", "--model", "lseg_tiny", "--crop", "64",
                                      "--steps", "2", "--weight-decay", "0.05", "--workers", "0", "-b", "2",
                                      "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["weight_decay"] == 0.05 and options["crop"] == 64 and options["steps"] == 2


@pytest.mark.parametrize("args,message", [
    (["--model", "lseg_vitb16_384", "--crop", "100"], "--crop 100 must be a multiple of 32"),
    (["--model", "lseg_vitb16_384", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--model", "clip-dense"], "train takes an architecture"),
    (["--model", "lseg_tiny", "--steps", "3", "--accumulate", "2", "-b", "3"], "must divide by --accumulate 2"),
])
def test_train_options_are_checked_before_anything_is_read_or_downloaded(args, message, tmp_path):
    # the network is blocked in tests and there is no ADE20K here: only the option check can answer
    argv = ["train", "--data", "ade20k", "--data-root", str(tmp_path / "none"), "-o", str(tmp_path / "r"), *args]
    if "--steps" not in args:
        argv += ["--steps", "1"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "r").exists()


def test_a_refused_train_run_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no -o: the run folder would be runs/train/N here
    result = CliRunner().invoke(app, ["train", "--data", "synthetic", "--model", "lseg_tiny", "--crop", "100", "--steps", "1"])
    assert result.exit_code == 2 and "--crop 100 must be a multiple of 32" in result.stderr
    assert not (tmp_path / "runs").exists()
