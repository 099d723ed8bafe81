"""Inputs in object storage are staged just ahead of decoding, and only those the run will do
(fsspec's in-memory store stands in for a bucket: the same calls as s3://)."""

from __future__ import annotations

import fsspec
from conftest import SAMPLES

from segcli.pipeline.remote import RemoteInputs


def test_only_the_inputs_to_do_are_fetched_and_each_goes_once_done():
    memory = fsspec.filesystem("memory")
    photo = (SAMPLES / "cat.jpg").read_bytes()
    for i in range(6):
        memory.pipe(f"/stage-test/p/{i}.jpg", photo)
    memory.pipe("/stage-test/p/readme.txt", b"notes")
    stager = RemoteInputs(["memory://stage-test/p"], ahead=2)
    try:
        found = stager.collect()
        # fsspec's memory keys start at /
        assert [s.display for s in found.sources] == [f"memory:///stage-test/p/{i}.jpg" for i in range(6)]
        assert found.skipped == ["memory:///stage-test/p/readme.txt"]
        todo = [found.sources[1], found.sources[4], found.sources[5]]  # the others: done by an earlier run
        stager.restrict(todo)
        stager.prepare(todo[0])
        for fut in stager._futures.values():
            fut.result()
        staged = sorted(p.parent.name for p in stager.stage.rglob("*.jpg"))
        assert staged == ["1", "4"]  # the first to do, and one ahead: never 2 or 3
        assert todo[0].path.read_bytes() == photo
        stager.release(todo[0].display)
        assert not todo[0].path.exists()
    finally:
        stager.close()
    assert not stager.stage.exists()
