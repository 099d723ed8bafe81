from __future__ import annotations

import pytest

from segcli.errors import SegcliError
from segcli.vocabulary.labels import default_palette, parse_labels


def test_comma_list_with_spaces_and_synonyms():
    labels = parse_labels(" road ; street , car,sky ")
    assert labels.names == ("road", "car", "sky")
    assert labels.synonyms == (("road", "street"), ("car",), ("sky",))
    assert len(labels) == 3
    assert type(labels).from_json(labels.to_json()) == labels


def test_label_file(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("# my classes\nroad;street\n\n  car  \nsky # the sky\n", encoding="utf-8")
    labels = parse_labels(f"@{f}")
    assert labels.synonyms == (("road", "street"), ("car",), ("sky",))


def test_named_set_ade20k():
    labels = parse_labels("ade20k")
    assert len(labels) == 150
    assert labels.names[0] == "wall" and labels.names[-1] == "flag"
    assert labels.colors[0] == (120, 120, 120) and labels.colors[2] == (6, 230, 230)
    assert labels.names[44] == "chest of drawers"


@pytest.mark.parametrize("spec,message", [
    ("", "no labels"),
    (",,, ,", "no labels"),
    (" ; ", "no labels"),
    ("cat,dog,Cat", "duplicate label 'Cat'"),
    ("road;street,street", "duplicate label 'street'"),
    ("@/nonexistent/labels.txt", "cannot read label file"),
])
def test_bad_labels_are_one_line_errors(spec, message):
    with pytest.raises(SegcliError, match=message) as info:
        parse_labels(spec)
    assert "\n" not in str(info.value)


def test_palette_is_fixed_distinct_and_stable():
    a, b = parse_labels("road,car,sky"), parse_labels("road,car,sky")
    assert a.colors == b.colors
    assert parse_labels("x,y,z").colors == a.colors  # depends on position only
    big = default_palette(300)
    assert len(set(big[:20])) == 20 and len(big) == 300
    assert all(0 <= c <= 255 for rgb in big for c in rgb)
