"""The GPU batch size is found by measuring: doubled while throughput rises by 5% and memory holds."""

from __future__ import annotations

from segcli.inference.batch_size import pick_batch_size


def curve(points: dict[int, float | None]):
    asked = []

    def rate(batch: int):
        asked.append(batch)
        return points.get(batch)

    return rate, asked


def test_doubles_while_throughput_rises():
    rate, asked = curve({8: 400.0, 16: 700.0, 32: 1000.0, 64: 1040.0, 128: 1100.0})
    assert pick_batch_size(rate) == (32, {8: 400.0, 16: 700.0, 32: 1000.0, 64: 1040.0})  # 64 adds only 4%
    assert asked == [8, 16, 32, 64]


def test_stops_where_memory_runs_out_and_at_the_limit():
    rate, _ = curve({8: 400.0, 16: 800.0, 32: None})
    assert pick_batch_size(rate)[0] == 16
    rate, _ = curve({8: 1.0, 16: 2.0, 32: 4.0, 64: 8.0})
    assert pick_batch_size(rate, limit=64)[0] == 64


def test_halves_when_even_the_default_does_not_fit():
    rate, asked = curve({8: None, 4: None, 2: 50.0})
    assert pick_batch_size(rate)[0] == 2 and asked == [8, 4, 2]


def test_a_cpu_keeps_the_default(tiny_checkpoint):
    from segcli.inference.segmenter import Segmenter

    assert Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu").find_batch_size() == (8, {})
