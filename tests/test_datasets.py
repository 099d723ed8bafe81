"""`segcli data get/list` against a local HTTP server (Range, dropped connections, no Range), small
archives in each dataset's real layout, and the masks read as the peers' converters define them."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app
from segcli.datasets import catalog, prepare
from segcli.datasets.segmentation import open_dataset
from segcli.errors import SegcliError
from segcli.inference.settings import InferenceSettings

RNG = np.random.default_rng(0)


def _png(array: np.ndarray, palette: bool = False) -> bytes:
    image = Image.fromarray(array.astype(np.uint8), "P" if palette else "L")
    if palette:
        image.putpalette([c for i in range(256) for c in (i, 255 - i, i // 2)])
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _jpg(h: int = 24, w: int = 32) -> bytes:
    out = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


ADE_MASK = np.array([[0, 1, 2], [150, 3, 0]] * 12, np.uint8)[:24, :3].repeat(11, 1)[:, :32]


def ade_archive() -> bytes:
    root = "ADEChallengeData2016"
    return _zip({f"{root}/images/training/ADE_train_00000001.jpg": _jpg(), f"{root}/images/validation/ADE_val_00000001.jpg": _jpg(),
                 f"{root}/annotations/training/ADE_train_00000001.png": _png(ADE_MASK),
                 f"{root}/annotations/validation/ADE_val_00000001.png": _png(ADE_MASK)})


class Server:
    """Serves FILES on 127.0.0.1; `drop_after`: the first GET of a file closes after that many bytes;
    `ranges`: whether Range requests are honoured."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True, drop_after: int | None = None):
        self.files, self.ranges, self.drop_after, self.requests = files, ranges, drop_after, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                rng = self.headers.get("Range")
                if rng and server.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drop_after is not None and sum(1 for n, _ in server.requests if n == name) == 1:
                    self.wfile.write(body[: server.drop_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # a dropped connection, halfway
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ade_served(monkeypatch):
    """ADE20K's entry pointed at a local server holding a small archive in the real layout."""
    data = ade_archive()
    server = Server({"ADEChallengeData2016.zip": data})
    archive = dataclasses.replace(catalog.DOWNLOADS["ade20k"].archives[0], url=f"{server.url}/ADEChallengeData2016.zip",
                                  checksum="sha1:" + hashlib.sha1(data).hexdigest(), size=len(data))
    monkeypatch.setitem(catalog.DOWNLOADS, "ade20k", dataclasses.replace(catalog.DOWNLOADS["ade20k"], archives=(archive,)))
    monkeypatch.setattr("segcli.datasets.download.time.sleep", lambda s: None)  # no backoff waits in tests
    yield server, data
    server.close()


def test_get_fetches_verifies_unpacks_and_train_finds_it(ade_served, tmp_path):
    server, data = ade_served
    root = tmp_path / "data"
    before = {r["name"]: r["present"] for r in prepare.listing(root)}
    assert before["ade20k"] is False
    result = CliRunner().invoke(app, ["data", "get", "ade20k", "--root", str(root), "-q"])
    assert result.exit_code == 0, result.output
    assert "ade20k: prepared (train, val)" in result.stderr
    folder = root / "ADEChallengeData2016"
    marker = json.loads((folder / prepare.MARKER).read_text())
    assert marker["archives"][0]["bytes"] == len(data) and marker["splits"] == ["train", "val"]
    assert {r["name"]: r["present"] for r in prepare.listing(root)}["ade20k"] is True
    assert not list(root.glob(".segcli-get-*")) and not (root / prepare.DOWNLOADS_DIR / "ADEChallengeData2016.zip").exists()
    # train and eval read it: ADE's class k is stored as k+1 and 0 ("other") is ignored
    dataset = open_dataset("ade20k", root)
    image, mask = dataset.load("val", dataset.samples("val")[0])
    expected = np.where(ADE_MASK == 0, 255, ADE_MASK.astype(int) - 1)
    assert image.shape == (24, 32, 3) and np.array_equal(mask, expected)
    # a second get: the marker answers at once, no request
    requests = len(server.requests)
    again = CliRunner().invoke(app, ["data", "get", "ade20k", "--root", str(root), "-q"])
    assert again.exit_code == 0 and "already present, verified" in again.stderr and len(server.requests) == requests


def test_a_dropped_connection_resumes_with_a_range_request(ade_served, tmp_path):
    server, data = ade_served
    server.drop_after = len(data) // 2
    path, what = prepare.get("ade20k", tmp_path / "data")
    assert what.startswith("prepared")
    ranges = [r for name, r in server.requests if r]
    assert ranges == [f"bytes={len(data) // 2}-"]  # the second request asked for the rest only


def test_a_server_without_ranges_starts_over_and_still_verifies(ade_served, tmp_path):
    server, data = ade_served
    server.drop_after, server.ranges = len(data) // 3, False
    prepare.get("ade20k", tmp_path / "data")
    assert len(server.requests) == 3  # dropped, Range ignored (restart), whole
    assert (tmp_path / "data" / "ADEChallengeData2016" / prepare.MARKER).exists()


def test_a_wrong_checksum_is_refused_and_nothing_is_left(ade_served, tmp_path, monkeypatch):
    entry = catalog.DOWNLOADS["ade20k"]
    bad = dataclasses.replace(entry.archives[0], checksum="sha1:" + "0" * 40)
    monkeypatch.setitem(catalog.DOWNLOADS, "ade20k", dataclasses.replace(entry, archives=(bad,)))
    root = tmp_path / "data"
    result = CliRunner().invoke(app, ["data", "get", "ade20k", "--root", str(root), "-q"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "is not the published" in line and "was removed" in line
    assert [p.name for p in root.rglob("*") if p.is_file()] == []


def test_offline_says_which_url_to_fetch_by_hand(tmp_path, monkeypatch):
    entry = catalog.DOWNLOADS["ade20k"]
    closed = dataclasses.replace(entry.archives[0], url="http://127.0.0.1:9/ADEChallengeData2016.zip")
    monkeypatch.setitem(catalog.DOWNLOADS, "ade20k", dataclasses.replace(entry, archives=(closed,)))
    result = CliRunner().invoke(app, ["data", "get", "ade20k", "--root", str(tmp_path), "-q"])
    assert result.exit_code == 2 and "cannot reach http://127.0.0.1:9/ADEChallengeData2016.zip" in result.stderr
    assert "--from FILE" in result.stderr


def test_a_full_disk_is_one_line_before_any_byte(ade_served, small_disk, monkeypatch):
    server, data = ade_served
    entry = catalog.DOWNLOADS["ade20k"]
    big = dataclasses.replace(entry.archives[0], size=10 * len(data) + (1 << 20))  # more than the 64 KiB tmpfs
    monkeypatch.setitem(catalog.DOWNLOADS, "ade20k", dataclasses.replace(entry, archives=(big,)))
    result = CliRunner().invoke(app, ["data", "get", "ade20k", "--root", str(small_disk), "-q"])
    assert result.exit_code == 2 and "GB free" in result.stderr and server.requests == []


def test_a_killed_unpacking_leaves_nothing_and_the_next_run_finishes(ade_served, tmp_path, monkeypatch):
    root = tmp_path / "data"
    stale = root / ".segcli-get-ade20k-999999999"  # what a killed run leaves (its pid is gone)
    (stale / "unpacked").mkdir(parents=True)
    (stale / "unpacked" / "half.jpg").write_bytes(b"half")

    def killed(*args):
        raise KeyboardInterrupt

    real = prepare._arrange
    monkeypatch.setattr(prepare, "_arrange", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.get("ade20k", root, keep_archives=True)
    assert not (root / "ADEChallengeData2016").exists() and not list(root.glob(".segcli-get-*"))
    monkeypatch.setattr(prepare, "_arrange", real)
    folder, what = prepare.get("ade20k", root)
    assert what.startswith("prepared") and len(open_dataset("ade20k", root).samples("train")) == 1


def test_from_a_file_the_user_has(tmp_path):
    data = ade_archive()
    mine = tmp_path / "ADEChallengeData2016.zip"
    mine.write_bytes(data)  # not the published archive: its SHA1 differs
    with pytest.raises(SegcliError, match="SHA1 [0-9a-f]+ is not the published 219e1696"):
        prepare.get("ade20k", tmp_path / "data", source=str(mine))
    assert mine.exists()  # the user's own file is never deleted


@pytest.fixture
def three_datasets(tmp_path, monkeypatch):
    """VOC 2012, COCO-Stuff (val) and Cityscapes (val), each archive in its real layout, brought with --from."""
    voc_mask = np.array([[0, 1, 20, 255], [15, 0, 3, 255]], np.uint8).repeat(12, 0).repeat(8, 1)
    stems = ["2007_000032", "2007_000033"]
    voc = _tar({**{f"VOCdevkit/VOC2012/JPEGImages/{s}.jpg": _jpg() for s in stems},
                **{f"VOCdevkit/VOC2012/SegmentationClass/{s}.png": _png(voc_mask, palette=True) for s in stems},
                "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt": b"2007_000032\n",
                "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"2007_000033\n"})
    coco_ids = np.array([[0, 1, 12, 90, 91, 181], [255, 40, 92, 2, 13, 100]], np.uint8).repeat(12, 0).repeat(6, 1)[:, :32]
    coco = {"val2017.zip": _zip({"val2017/000000000139.jpg": _jpg()}),
            "stuffthingmaps_trainval2017.zip": _zip({"val2017/000000000139.png": _png(coco_ids)})}
    city_ids = np.array([[7, 8, 26, 33], [0, 255, 4, 24]], np.uint8).repeat(12, 0).repeat(8, 1)
    city = {"gtFine_trainvaltest.zip": _zip({"gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png": _png(city_ids),
                                             "license.txt": b"x"}),
            "leftImg8bit_trainvaltest.zip": _zip({"leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png": _png(
                RNG.integers(0, 255, (24, 32), dtype=np.uint8)), "license.txt": b"x"})}
    source = tmp_path / "mine"
    source.mkdir()
    (source / "VOCtrainval_11-May-2012.tar").write_bytes(voc)
    for name, data in {**coco, **city}.items():
        (source / name).write_bytes(data)
    for name in ("voc2012", "coco-stuff164k", "cityscapes"):  # no published checksum for these small stand-ins
        entry = catalog.DOWNLOADS[name]
        archives = tuple(dataclasses.replace(a, checksum=None, size=None) for a in entry.archives)
        monkeypatch.setitem(catalog.DOWNLOADS, name, dataclasses.replace(entry, archives=archives))
    root = tmp_path / "data"
    for name, split in (("voc2012", "all"), ("coco-stuff164k", "val"), ("cityscapes", "val")):
        result = CliRunner().invoke(app, ["data", "get", name, "--root", str(root), "--from", str(source), "--split", split, "-q"])
        assert result.exit_code == 0, result.output
    assert (source / "val2017.zip").exists()  # the user's archives stay
    return root, voc_mask, coco_ids, city_ids


def test_voc_coco_and_cityscapes_masks_as_the_converters_define_them(three_datasets):
    """The masks read through the catalog's rules, against index masks made here by hand."""
    root, voc_mask, coco_ids, city_ids = three_datasets

    def val_mask(name):
        data = open_dataset(name, root)
        samples = data.samples("val")
        assert len(samples) == 1
        image, mask = data.load("val", samples[0])
        assert image.shape[:2] == mask.shape
        data.check(("val",))
        return mask

    assert np.array_equal(val_mask("voc21"), voc_mask)  # palette indices as they are, 255 ignored
    assert np.array_equal(val_mask("voc20"), np.where(voc_mask == 0, 255, np.where(voc_mask == 255, 255, voc_mask.astype(int) - 1)))
    assert len(open_dataset("voc21", root).samples("train")) == 1  # the split lists decide
    expected_stuff = {0: 0, 1: 1, 12: 11, 90: 255, 91: 80, 181: 170, 255: 255, 40: 36, 92: 81, 2: 2, 13: 12, 100: 89}
    assert np.array_equal(val_mask("coco-stuff"), np.vectorize(expected_stuff.get)(coco_ids))
    expected_object = {0: 1, 1: 2, 12: 12, 90: 0, 91: 0, 181: 0, 255: 0, 40: 37, 92: 0, 2: 3, 13: 13, 100: 0}
    assert np.array_equal(val_mask("coco-object"), np.vectorize(expected_object.get)(coco_ids))
    expected_city = {7: 0, 8: 1, 26: 13, 33: 18, 0: 255, 255: 255, 4: 255, 24: 11}
    assert np.array_equal(val_mask("cityscapes"), np.vectorize(expected_city.get)(city_ids))
    listed = {r["name"]: r["splits"] for r in prepare.listing(root)}
    assert listed["coco-stuff164k"] == ["val"] and listed["cityscapes"] == ["val"] and listed["ade20k"] is None


def test_missing_datasets_name_the_command(tmp_path):
    for argv in (["eval", "-m", "lseg_tiny", "--data", "coco-object", "--data-root", str(tmp_path)],
                 ["train", "--data", "ade20k", "--data-root", str(tmp_path), "-m", "lseg_tiny", "--steps", "1",
                  "-o", str(tmp_path / "run"), "--crop", "64", "--no-pretrained"]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, result.output
        assert f"segcli data get {'coco-stuff164k' if 'eval' in argv else 'ade20k'} --root {tmp_path}" in result.stderr


def test_dataset_label_sets_are_the_peers_class_files():
    from segcli.vocabulary.labels import parse_labels

    voc = parse_labels("voc21")
    assert len(voc) == 21 and voc.names[0] == "background" and "sky" in voc.synonyms[0] and voc.names[20] == "television monitor"
    assert len(parse_labels("coco-stuff")) == 171 and len(parse_labels("coco-object")) == 81
    assert len(parse_labels("context60")) == 60 and len(parse_labels("context59")) == 59
    assert parse_labels("cityscapes").names[6] == "trafficlight" and len(parse_labels("voc20")) == 20


def test_the_benchmark_table_is_each_datasets_own_evaluation(three_datasets, tiny_checkpoint, tmp_path):
    """eval --benchmark training-free on the tiny datasets: present ones get the numbers a direct
    confusion-matrix computation gives with the same settings; missing ones name their command."""
    from segcli.api import Segmenter
    from segcli.vocabulary.labels import named_label_set

    root = three_datasets[0]
    out = tmp_path / "table.json"
    result = CliRunner().invoke(app, ["eval", "-m", str(tiny_checkpoint), "--benchmark", "training-free", "--data-root",
                                      str(root), "-o", str(out), "--device", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    table = json.loads(out.read_text())
    row = table["models"][str(tiny_checkpoint)]
    assert set(table["missing"]) == {"context60", "context59", "ade20k"}
    assert f"missing: ade20k (fetch it: segcli data get ade20k --root {root})" in result.stderr
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32", warn=False)
    for name in ("voc21", "voc20", "coco-stuff", "coco-object", "cityscapes"):
        data = open_dataset(name, root)
        labels = named_label_set(catalog.BENCHMARKS[name].labels)
        seg.configure(InferenceSettings(synonyms="max", bg_threshold=0.1 if catalog.BENCHMARKS[name].background else None))
        k = len(labels)
        counts = np.zeros((k, k), np.int64)
        for sample in data.samples("val"):
            image, truth = data.load("val", sample)
            pred = seg.predict([image], labels=labels, refine="none")[0].label_map
            keep = truth != 255
            np.add.at(counts, (truth[keep].astype(int), pred[keep].astype(int)), 1)
        inter, union = np.diag(counts), counts.sum(0) + counts.sum(1) - np.diag(counts)
        present = counts.sum(1) > 0  # mmsegmentation's mIoU: the classes that occur in the ground truth
        miou = float(np.mean(inter[present] / union[present]))
        assert row[name]["mIoU"] == pytest.approx(miou, abs=1e-9), name
    assert row["average"]["datasets"] == 5
    assert row["average"]["mIoU"] == pytest.approx(np.mean([row[n]["mIoU"] for n in ("voc21", "voc20", "coco-stuff",
                                                                                     "coco-object", "cityscapes")]))


def test_context_is_adopted_from_a_converted_folder(tmp_path):
    """PASCAL-Context's masks come from mmsegmentation's converter: --from that folder links it in;
    without one, one line says how to make it."""
    converted = tmp_path / "VOC2010"
    mask = np.array([[0, 1, 59, 255]], np.uint8).repeat(24, 0).repeat(8, 1)
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (converted / sub).mkdir(parents=True)
    (converted / "JPEGImages" / "2008_000002.jpg").write_bytes(_jpg())
    (converted / "SegmentationClassContext" / "2008_000002.png").write_bytes(_png(mask))
    for split in ("train", "val"):
        (converted / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("2008_000002\n")
    root = tmp_path / "data"
    with pytest.raises(SegcliError, match="pascal_context.py"):
        prepare.get("context", root)
    folder, what = prepare.get("context", root, source=str(converted))
    assert what.startswith("linked") and folder.is_symlink()
    data = open_dataset("context59", root)
    expected = np.where(mask == 0, 255, np.where(mask == 255, 255, mask.astype(int) - 1))
    assert np.array_equal(data.load("val", data.samples("val")[0])[1], expected)
    assert np.array_equal(open_dataset("context60", root).load("val", data.samples("val")[0])[1], mask)


def test_each_method_gets_its_own_per_dataset_settings():
    from segcli.evaluation.benchmark import dataset_settings

    assert dataset_settings("naclip", "cityscapes") == {"short_side": 560, "window": None, "stride": None, "bg_threshold": None}
    assert dataset_settings("naclip", "voc21")["bg_threshold"] == 0.1 and dataset_settings(None, "ade20k")["short_side"] == 336
    assert dataset_settings("proxyclip", "cityscapes") == {"short_side": 448, "window": 224, "stride": 112, "bg_threshold": None}
    assert dataset_settings("proxyclip", "coco-object")["bg_threshold"] == 0.25


def test_a_second_split_keeps_the_first(three_datasets):
    """coco-stuff164k fetched for val, then for train: the dataset is made again whole, val kept."""
    root = three_datasets[0]
    source = root.parent / "mine"
    (source / "train2017.zip").write_bytes(_zip({"train2017/000000000009.jpg": _jpg()}))
    result = CliRunner().invoke(app, ["data", "get", "coco-stuff164k", "--root", str(root), "--from", str(source),
                                      "--split", "train", "-q"])
    assert result.exit_code == 0, result.output
    folder = root / "coco_stuff164k"
    assert json.loads((folder / prepare.MARKER).read_text())["splits"] == ["train", "val"]
    assert (folder / "images" / "val2017" / "000000000139.jpg").is_file()
    assert (folder / "images" / "train2017" / "000000000009.jpg").is_file()
    assert len(open_dataset("coco-stuff", root).samples("val")) == 1
