from __future__ import annotations

import os
from pathlib import PurePosixPath

import pytest

from segcli.errors import SegcliError
from segcli.inputs.sources import collect_sources


def test_named_files_are_placed_under_the_deepest_folder_they_share(tmp_path, monkeypatch):
    (tmp_path / "shots" / "a").mkdir(parents=True)
    (tmp_path / "shots" / "b").mkdir()
    (tmp_path / "work").mkdir()
    for name in ("shots/a/x.jpg", "shots/b/y.jpg", "one.jpg"):
        (tmp_path / name).write_bytes(b"\xff\xd8\xff")
    monkeypatch.chdir(tmp_path / "work")
    # one file, by absolute or relative path: directly in DIR
    for given in (str(tmp_path / "one.jpg"), "../one.jpg"):
        [source] = collect_sources([given]).sources
        assert source.rel == PurePosixPath("one")
    # several files: relative to the folder they share, never "..", never absolute
    found = collect_sources(["../shots/a/x.jpg", str(tmp_path / "shots" / "b" / "y.jpg")])
    assert [str(s.rel) for s in found.sources] == ["a/x", "b/y"]
    found = collect_sources(["../shots/*/*.jpg", "../one.jpg"])
    assert [str(s.rel) for s in found.sources] == ["shots/a/x", "shots/b/y", "one"]
    for s in found.sources:
        assert not s.rel.is_absolute() and ".." not in s.rel.parts


def test_folder_walk_list_stdin_glob_and_dedupe(tmp_path, samples, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (samples / "sub").mkdir()
    (samples / "cat.jpg").rename(samples / "sub" / "cat.jpg")
    (samples / ".hidden").mkdir()
    (samples / ".hidden" / "x.jpg").write_bytes((samples / "coffee.jpg").read_bytes())
    found = collect_sources([str(samples)])
    assert sorted(str(s.rel) for s in found.sources) == ["astronaut", "coffee", "rocket", "sub/cat"]
    assert [os.path.basename(p) for p in found.skipped] == ["CREDITS.md"]

    lst = tmp_path / "list.txt"
    lst.write_text("photos/coffee.jpg\n# comment\n\nphotos/missing.jpg\n")
    found = collect_sources([str(lst), "photos/coffee.jpg"])  # same file twice -> once
    assert [(str(s.rel), s.error) for s in found.sources] == [("coffee", None), ("missing", "file not found")]

    found = collect_sources(["-"], stdin_lines=["photos/rocket.jpg", str(samples / "astronaut.jpg")])
    assert [str(s.rel) for s in found.sources] == ["rocket", "astronaut"]

    found = collect_sources(["photos/*.jpg", "photos/sub/cat.jpg"])
    assert [str(s.rel) for s in found.sources] == ["astronaut", "coffee", "rocket", "sub/cat"]


def test_same_stem_different_extension_keeps_both(tmp_path, samples):
    (samples / "coffee.png").write_bytes((samples / "coffee.jpg").read_bytes())
    found = collect_sources([str(samples)])
    rels = sorted(str(s.rel) for s in found.sources)
    assert "coffee_jpg" in rels and "coffee_png" in rels and all(s.error is None for s in found.sources)


def test_missing_source_is_a_usage_error(tmp_path):
    with pytest.raises(SegcliError, match="no such file"):
        collect_sources([str(tmp_path / "nope")])
    with pytest.raises(SegcliError, match="no files match"):
        collect_sources([str(tmp_path / "*.jpg")])


def test_shards_cover_every_input_exactly_once(tmp_path):
    from segcli.inputs.sources import parse_shard, take_shard

    for i in range(23):
        sub = tmp_path / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"p{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    found = collect_sources([str(tmp_path)])
    everything = sorted(str(s.rel) for s in found.sources)
    assert len(everything) == 23
    for n in (1, 2, 3, 7, 40):
        parts = [[str(s.rel) for s in take_shard(found, i, n).sources] for i in range(n)]
        assert sorted(x for part in parts for x in part) == everything
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
        # the split depends only on the inputs, not on the order they were found in
        shuffled = type(found)(sources=list(reversed(found.sources)), skipped=found.skipped)
        assert [[str(s.rel) for s in take_shard(shuffled, i, n).sources] for i in range(n)] == parts
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "a/b", "3", "1/0"):
        with pytest.raises(SegcliError):
            parse_shard(bad)
