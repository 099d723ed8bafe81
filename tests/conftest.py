"""Shared fixtures. No test may reach the network: any connection attempt fails the test."""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_images"
TINY_LABELS = "cat,grass,sky,person"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class NetworkAccess(AssertionError):
    pass


_LOCAL = ("127.", "localhost", "::1")
_real_getaddrinfo = socket.getaddrinfo


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Make every outgoing connection and name lookup (except loopback) fail the test."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family == socket.AF_UNIX or (isinstance(host, str) and host.startswith(_LOCAL)):
            return real_connect(self, address)
        raise NetworkAccess(f"test tried to reach the network: {address!r}")

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host.startswith(_LOCAL):
            return _real_getaddrinfo(host, *args, **kwargs)
        raise NetworkAccess(f"test tried to resolve {host!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A lseg_tiny checkpoint with random (seeded) weights and randomised BN statistics."""
    from segcli.modeling import build_model
    from segcli.models.checkpoint import save_checkpoint
    from segcli.vocabulary.labels import parse_labels

    torch.manual_seed(1)
    model = build_model("lseg_tiny")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path, labels=parse_labels(TINY_LABELS))
    return path


@pytest.fixture
def samples(tmp_path) -> Path:
    dest = tmp_path / "photos"
    shutil.copytree(SAMPLES, dest)
    return dest


def small_photos(folder: Path, layout: dict[str, str], side: int) -> Path:
    """JPEGs (q90) in `folder`: sample photo name -> where it goes (e.g. "sub/rocket"), fitted into side x side."""
    for name, dest in layout.items():
        (folder / dest).parent.mkdir(parents=True, exist_ok=True)
        img = Image.open(SAMPLES / f"{name}.jpg").convert("RGB")
        img.thumbnail((side, side))
        img.save(folder / f"{dest}.jpg", quality=90)
    return folder


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 60000x60000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def make_nasty_folder(folder: Path) -> dict[str, str]:
    """Good and bad inputs. Returns {relative name: "good" | "bad"}."""
    folder.mkdir(parents=True, exist_ok=True)
    cat = Image.open(SAMPLES / "cat.jpg")
    cat_bytes = (SAMPLES / "cat.jpg").read_bytes()
    kinds = {}
    (folder / "truncated.jpg").write_bytes(cat_bytes[: len(cat_bytes) // 3])
    kinds["truncated.jpg"] = "bad"
    (folder / "empty.jpg").write_bytes(b"")
    kinds["empty.jpg"] = "bad"
    (folder / "notes.jpg").write_text("this is not a photo\n")
    kinds["notes.jpg"] = "bad"
    (folder / "bomb.png").write_bytes(bomb_png())
    kinds["bomb.png"] = "bad"
    Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)).save(folder / "deep16.png")
    kinds["deep16.png"] = "good"
    cat.convert("CMYK").save(folder / "cmyk.jpg")
    kinds["cmyk.jpg"] = "good"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    cat.save(folder / "rotated.jpg", exif=exif.tobytes())
    kinds["rotated.jpg"] = "good"
    rgba = cat.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    kinds["alpha.png"] = "good"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "dot.png")
    kinds["dot.png"] = "good"
    cat.convert("P").save(folder / "palette.gif")
    kinds["palette.gif"] = "good"
    cat.convert("L").save(folder / "gray.png")
    kinds["gray.png"] = "good"
    cat.save(folder / "café_猫.jpg")
    kinds["café_猫.jpg"] = "good"
    buf = io.BytesIO()
    cat.save(buf, "PNG")
    (folder / "no_extension").write_bytes(buf.getvalue())  # an image recognised by content
    kinds["no_extension"] = "good"
    return kinds


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 64 KiB tmpfs (remount it to resize); skips where it cannot be mounted (not root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)
