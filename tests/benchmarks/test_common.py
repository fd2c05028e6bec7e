"""benchmarks/common.py: table cells, Markdown tables and JSON written whole."""

import json

import common


def test_cells_keep_three_significant_digits_without_exponents():
    assert common.fmt(None) == "n/a" and common.fmt("x") == "x" and common.fmt(7) == "7"
    assert common.fmt(3158.4) == "3158" and common.fmt(31.58) == "31.6"
    assert common.fmt(0.012345) == "0.0123" and common.fmt(-2.5) == "-2.50"
    assert common.fmt(0.0) == "0.0" and common.fmt(1.0, ".3f") == "1.000"


def test_table_is_markdown(capsys):
    common.print_table(["a", "b"], [["x", 1.5], [None, 2]], "title")
    assert capsys.readouterr().out.splitlines() == [
        "title",
        "| a | b |",
        "|---|---|",
        "| x | 1.50 |",
        "| n/a | 2 |",
    ]


def test_json_is_replaced_whole(tmp_path):
    path = tmp_path / "sub" / "out.json"
    common.write_json(str(path), {"a": 1})
    common.write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]
    assert common.read_json(str(tmp_path / "missing.json")) is None
