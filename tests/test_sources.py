from __future__ import annotations

import os
from pathlib import PurePosixPath

import pytest

from segcli.data.sources import collect_sources, safe_relpath
from segcli.errors import SegcliError


@pytest.mark.parametrize("given,expected", [
    ("a/b/c.jpg", "a/b/c.jpg"),
    ("./x.jpg", "x.jpg"),
    ("../x.jpg", "_up/x.jpg"),
    ("../../a/../x.jpg", "_up/_up/x.jpg"),
    ("/abs/dir/x.jpg", "_root/abs/dir/x.jpg"),
])
def test_safe_relpath_never_escapes(given, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = safe_relpath(given)
    assert rel == PurePosixPath(expected)
    assert not rel.is_absolute() and ".." not in rel.parts


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
    assert [(str(s.rel), s.error) for s in found.sources] == [("photos/coffee", None), ("photos/missing", "file not found")]

    found = collect_sources(["-"], stdin_lines=["photos/rocket.jpg", str(samples / "astronaut.jpg")])
    assert [str(s.rel) for s in found.sources] == ["photos/rocket", "photos/astronaut"]

    found = collect_sources(["photos/*.jpg"])
    assert [str(s.rel) for s in found.sources] == ["photos/astronaut", "photos/coffee", "photos/rocket"]


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
    from segcli.data.sources import parse_shard, take_shard

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
