"""Generated inputs (hypothesis) against the reliability building blocks.

Each property says what must hold for *every* input of its kind: a file or value is
either read correctly or refused with one ConfigError/DatasetError paragraph; nothing
else escapes, nothing takes unbounded time or memory.
"""

from __future__ import annotations

import argparse
import codecs
import math
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alwa_sweep.commands.argcheck import float_in, int_in
from trainers.checkpoint import find_resumable_checkpoint, save_checkpoint
from trainers.data.coco import MAX_IMAGE_SIDE, _check_coco_structure
from trainers.data.voc import VOC_CLASSES, parse_voc_xml
from trainers.errors import ConfigError, DatasetError
from trainers.yamlio import (MAX_BYTES, MAX_EXPANDED_NODES, MAX_DEPTH, decode_yaml_bytes, load_yaml, loads_yaml,
                             parse_set, parse_set_value)

FAST = settings(max_examples=60, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=15, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow])


def _same(a, b) -> bool:
    """Equality with NaN equal to itself and types compared (1 is not 1.0 is not True)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# Text YAML can hold: no surrogates; and not YAML 1.1's extra line breaks (NEL, LS, PS),
# which PyYAML's *dumper* writes raw inside quotes, where any YAML reader folds them.
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x85\u2028\u2029"),
                max_size=12)
keys = texts.filter(lambda k: k != "<<")  # "<<" unquoted is a merge key (refused by policy)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)),
                      max_leaves=20)
mappings = st.dictionaries(keys, values, max_size=6)


@FAST
@given(data=mappings, style=st.sampled_from([None, False, True]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]))
def test_random_mappings_round_trip(data, style, encoding):
    text = yaml.safe_dump(data, default_flow_style=style, allow_unicode=True, sort_keys=False)
    assert _same(loads_yaml(text, "gen.yaml"), data)
    raw = text.encode(encoding)  # Python's utf-16/utf-32 codecs write a byte-order mark
    assert _same(loads_yaml(decode_yaml_bytes(raw, "gen.yaml"), "gen.yaml"), data)


@FAST
@given(blob=st.binary(max_size=3000))
def test_random_bytes_only_ever_raise_config_error(blob):
    try:
        result = loads_yaml(decode_yaml_bytes(blob, "blob.yaml"), "blob.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("blob.yaml: ") and "\n" not in str(exc)
    else:
        assert isinstance(result, dict)


yaml_alphabet = st.sampled_from(list("ab01 :-,[]{}&*!|>'\"#%@?\n\t.~") + ["\n  ", ": ", "- ", "<<",
                                                                         "&x ", "*x", "!!str ",
                                                                         ".nan", "no", "1e3"])


@FAST
@given(parts=st.lists(yaml_alphabet, max_size=60))
def test_yaml_like_text_only_ever_raises_config_error(parts):
    text = "".join(parts)
    for call in (lambda: loads_yaml(text, "t.yaml"), lambda: parse_set_value(text)):
        try:
            call()
        except ConfigError as exc:
            assert "\n" not in str(exc)


@FEW
@given(levels=st.integers(3, 12), width=st.integers(2, 12), flow=st.booleans())
def test_alias_bombs_are_refused_in_bounded_time_and_memory(levels, width, flow):
    lines = ['l0: &l0 ["lol"]'] if flow else ["l0: &l0\n  - lol"]
    for level in range(1, levels):
        refs = ",".join([f"*l{level - 1}"] * width)
        lines.append(f"l{level}: &l{level} [{refs}]")
    text = "\n".join(lines) + "\n"
    tracemalloc.start()
    started = time.perf_counter()
    expanded = width ** (levels - 1)  # the leaves of the last list, every alias expanded
    # The loader counts every value of the document with its aliases expanded: each level's
    # list (itself, and width copies of the level below), not only the last list's leaves.
    sizes = [2]
    for _ in range(1, levels):
        sizes.append(1 + width * sizes[-1])
    values = sum(sizes) + levels + 1  # + the keys and the top mapping
    try:
        if values > 2 * MAX_EXPANDED_NODES:
            with pytest.raises(ConfigError, match="aliases expanded"):
                loads_yaml(text, "bomb.yaml")
        elif values > MAX_EXPANDED_NODES // 2:  # near the bound: either outcome, never anything else
            try:
                loads_yaml(text, "bomb.yaml")
            except ConfigError as exc:
                assert "aliases expanded" in str(exc)
        else:  # within the bound: read, and the aliases mean what they say
            data = loads_yaml(text, "bomb.yaml")
            node, leaves = [data[f"l{levels - 1}"]], 0
            while node:
                item = node.pop()
                if isinstance(item, list):
                    node.extend(item)
                else:
                    leaves += 1
            assert leaves == expanded
        with pytest.raises(ConfigError, match="anchors|aliases"):
            parse_set_value("{" + text.replace("\n", ", ").rstrip(", ") + "}")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 2 * 2**20  # the old loader took 1.8 GB on 833 bytes of this


def test_a_nine_level_alias_bomb_and_deep_nesting(figures):
    lol = ",".join(['"lol"'] * 9)
    lines = [f"a0: &a0 [{lol}]"] + [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = "\n".join(lines) + "\n"
    assert len(bomb.encode()) < 1000  # expands to 9**9 = 387,420,489 strings with aliases
    with pytest.raises(ConfigError, match=r"aliases expanded the document holds more than"):
        loads_yaml(bomb, "bomb.yaml")
    with pytest.raises(ConfigError, match=r"undefined alias"):
        loads_yaml("x: 1\ny: *a\n", "s.yaml")
    with pytest.raises(ConfigError, match=r"recursive alias"):
        loads_yaml("x: &r [1, *r]\n", "s.yaml")
    deep = "a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(ConfigError, match=f"nested more than {MAX_DEPTH} levels"):
        loads_yaml(deep, "deep.yaml")
    with pytest.raises(ConfigError, match="nested more than"):
        loads_yaml("[" * 200_000, "deep.yaml")  # RecursionError in PyYAML's composer before
    assert loads_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), "ok.yaml")
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConfigError):
        loads_yaml(bomb, "bomb.yaml")
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    figures.add_row("building_blocks", {
        "piece": "trainers.yamlio.loads_yaml",
        "input": f"a {len(bomb.encode())}-byte alias bomb (9 levels of 9 aliases: 9**9 strings expanded)",
        "result": f"refused at its first anchor in {seconds * 1e6:.0f} µs, peak {peak / 1024:.0f} KiB "
                  "allocated; 200,000 nested '[' refused (nesting limit), no RecursionError"})


@FAST
@given(data=st.dictionaries(st.from_regex(r"k[a-z_]{0,7}", fullmatch=True), st.integers(), min_size=1,
                            max_size=8),
       gap=st.integers(0, 3), nested=st.booleans())
def test_duplicate_keys_name_the_key_and_both_lines(data, gap, nested):
    items = list(data.items())
    key = items[0][0]
    indent = "  " if nested else ""
    lines = ["outer:"] if nested else []
    lines += [f"{indent}{k}: {v}" for k, v in items] + [""] * gap + [f"{indent}{key}: 0"]
    text = "\n".join(lines) + "\n"
    first = lines.index(f"{indent}{key}: {data[key]}") + 1
    with pytest.raises(ConfigError) as caught:
        loads_yaml(text, "dup.yaml")
    full = f"outer.{key}" if nested else key
    assert f"duplicate key {full!r} on line {len(lines)} (first on line {first})" in str(caught.value)


@FAST
@given(key=st.sampled_from(["1", "2.5", "yes", "no", "on", "off", "true", "null", "~", "2020-01-01"]))
def test_non_string_keys_are_refused_with_quote_it(key):
    with pytest.raises(ConfigError, match="Quote it"):
        loads_yaml(f"base:\n  {key}: 1\n", "k.yaml")
    assert loads_yaml(f'base:\n  "{key}": 1\n', "k.yaml") == {"base": {key: 1}}


def test_encodings_sizes_and_special_files(tmp_path):
    import os

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"0xE9 at byte offset 9 \(line 1, column 10\).*Save it as UTF-8"):
        load_yaml(latin)
    bom16 = tmp_path / "w.yaml"
    bom16.write_bytes(codecs.BOM_UTF16_LE + "a: 1\n".encode("utf-16-le"))
    assert load_yaml(bom16) == {"a": 1}
    no_bom16 = tmp_path / "n.yaml"
    no_bom16.write_bytes("a: 1\n".encode("utf-16-le"))
    with pytest.raises(ConfigError, match="UTF-16 without a byte-order mark"):
        load_yaml(no_bom16)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: 1\n" + b"#" * MAX_BYTES)
    with pytest.raises(ConfigError, match="the limit for a config is 1,048,576 bytes"):
        load_yaml(big, what="config")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_yaml(fifo)  # would block forever if opened
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path)
    with pytest.raises(ConfigError, match="file not found. Check the path of the spec"):
        load_yaml(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    (tmp_path / "py.yaml").write_text("a: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="remove the tag"):
        load_yaml(tmp_path / "py.yaml")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "nan.yaml").write_text("lr: .nan\nw: -.inf\n")
    got = load_yaml(tmp_path / "nan.yaml")
    assert math.isnan(got["lr"]) and got["w"] == -math.inf
    (tmp_path / "int.yaml").write_text("a: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="a value cannot be read"):
        load_yaml(tmp_path / "int.yaml")


@FAST
@given(value=st.one_of(st.integers(-2**64, 2**64), st.floats(allow_nan=False), st.booleans()))
def test_set_values_round_trip(value):
    text = yaml.safe_dump(value).removesuffix("...\n").strip()
    assert _same(parse_set_value(text), value)
    key, parsed = parse_set(f"optimizer.lr={text}")
    assert key == "optimizer.lr" and _same(parsed, value)


@FAST
@given(text=st.text(max_size=200))
def test_set_values_never_raise_anything_but_config_error(text):
    try:
        parse_set(f"a.b={text}")
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_set_value_policy():
    assert parse_set_value("") == "" and parse_set_value("a: b: c") == "a: b: c"
    assert math.isnan(parse_set_value(".nan"))
    assert parse_set_value("=") == "=" and loads_yaml("a: <<\nb: =\n", "s.yaml") == {"a": "<<", "b": "="}
    for bad, words in [("*x", "aliases"), ("&a 1", "anchors"), ("{a: 1, a: 2}", "duplicate key 'a'"),
                       ("{1: a}", "read as an integer"), ("x" * 70_000, "limit"), ("a\0b", "NUL"),
                       ("!!python/name:os.system", "remove the tag"), ("a\x07", "control")]:
        with pytest.raises(ConfigError, match=words):
            parse_set_value(bad)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_set("optimizer.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_set("a..b=1")


# ------------------------------------------------------------------ command-line numbers
@FAST
@given(text=st.one_of(st.text(max_size=30), st.integers(-2**40, 2**40).map(str),
                      st.floats().map(repr)))
def test_cli_integers_in_range_or_refused(text):
    parse = int_in(4, 1000)
    try:
        value = parse(text)
    except argparse.ArgumentTypeError as exc:
        assert "4..1000" in str(exc)
    else:
        assert isinstance(value, int) and 4 <= value <= 1000 and value == int(text)


@FAST
@given(text=st.one_of(st.text(max_size=30), st.floats().map(repr), st.integers(-5, 5).map(str)))
def test_cli_numbers_finite_and_in_range_or_refused(text):
    parse = float_in(0.0, 1.0, lo_open=True)
    try:
        value = parse(text)
    except argparse.ArgumentTypeError as exc:
        assert "(0, 1]" in str(exc)
    else:
        assert math.isfinite(value) and 0.0 < value <= 1.0


# ----------------------------------------------------------------------------- datasets
json_values = st.one_of(st.none(), st.booleans(), st.integers(-10, 2 * MAX_IMAGE_SIDE),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                        st.integers(1, 500).map(str), st.lists(st.integers(), max_size=2))


def _coco(**image_fields):
    image = {"id": 1, "file_name": "000001.jpg", "width": 96, "height": 80, **image_fields}
    return {"images": [image], "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 40],
                             "area": 1200.0, "iscrowd": 0}]}


@FAST
@given(field=st.sampled_from(["width", "height"]), value=json_values)
def test_coco_image_sizes_are_positive_integers_or_named(field, value):
    valid = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_IMAGE_SIDE
    try:
        _check_coco_structure(_coco(**{field: value}), Path("ann.json"), with_masks=False)
    except DatasetError as exc:
        assert not valid
        assert exc.where == "ann.json" and f"image id 1: '{field}'" in str(exc)
        assert repr(value) in str(exc)
    else:
        assert valid


@FAST
@given(position=st.integers(0, 3), value=json_values, area=json_values)
def test_coco_boxes_and_areas_finite_or_named(position, value, area):
    data = _coco()
    ann = data["annotations"][0]
    ann["bbox"][position] = value
    ann["area"] = area
    box_ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (position < 2 or value >= 0)
    area_ok = isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area) \
        and area >= 0
    try:
        _check_coco_structure(data, Path("ann.json"), with_masks=False)
    except DatasetError as exc:
        assert not (box_ok and area_ok) and "annotation id 1" in str(exc)
    else:
        assert box_ok and area_ok


def test_coco_duplicate_ids_are_refused():
    data = _coco()
    data["images"].append(dict(data["images"][0], file_name="000002.jpg"))
    with pytest.raises(DatasetError, match="image id 1 appears twice"):
        _check_coco_structure(data, Path("a.json"), with_masks=False)
    data = _coco()
    data["annotations"].append(dict(data["annotations"][0]))
    with pytest.raises(DatasetError, match="annotation id 1 appears twice"):
        _check_coco_structure(data, Path("a.json"), with_masks=False)
    data = _coco()
    data["categories"].append({"id": 1, "name": "dog"})
    with pytest.raises(DatasetError, match="category id 1 appears twice"):
        _check_coco_structure(data, Path("a.json"), with_masks=False)


VOC_XML = """<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
<object><name>cat</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>
<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>"""
coordinates = st.one_of(st.integers(-50, 300).map(str), st.floats().map(repr),
                        st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=4)
                        .map(lambda s: s.replace("<", "").replace("&", "")))


@FAST
@given(x1=coordinates, y1=coordinates, x2=coordinates, y2=coordinates,
       w=st.sampled_from(["128", "0", "-3", "abc", "inf"]))
def test_voc_boxes_inside_the_image_or_named(x1, y1, x2, y2, w):
    classes = {name: i for i, name in enumerate(VOC_CLASSES, start=1)}
    with tempfile.TemporaryDirectory() as folder:
        xml = Path(folder) / "000001.xml"
        xml.write_text(VOC_XML.format(w=w, h=96, x1=x1, y1=y1, x2=x2, y2=y2))
        try:
            parsed = parse_voc_xml(xml, classes)
        except DatasetError as exc:
            assert exc.where == str(xml) and "\n" not in str(exc)
            return
    box = parsed["boxes"][0].tolist()
    assert all(math.isfinite(v) for v in box)
    assert 0 <= box[0] < box[2] <= parsed["width"] + 1 and 0 <= box[1] < box[3] <= parsed["height"] + 1
    assert parsed["width"] == 128


# -------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint_blobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    for iteration in (1, 2):
        save_checkpoint({"w": torch.arange(512, dtype=torch.float32) * iteration}, folder, iteration)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@FAST
@given(data=st.data())
def test_any_corruption_of_the_newest_checkpoint_is_never_chosen(checkpoint_blobs, data):
    newest = "ckpt_00000002.pt"
    blob = bytearray(checkpoint_blobs[newest])
    kind = data.draw(st.sampled_from(["truncate", "flip", "zero", "append"]))
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] ^= data.draw(st.integers(1, 255))
    elif kind == "zero":
        start = data.draw(st.integers(0, len(blob) - 1))
        blob[start:start + 64] = bytes(len(blob[start:start + 64]))
        if blob == bytearray(checkpoint_blobs[newest]):
            return  # that range held zeros already
    else:
        blob += data.draw(st.binary(min_size=1, max_size=64))
    with tempfile.TemporaryDirectory() as folder:
        for name, content in checkpoint_blobs.items():
            (Path(folder) / name).write_bytes(content)
        (Path(folder) / newest).write_bytes(bytes(blob))
        found = find_resumable_checkpoint(folder)
        assert found is not None and found.name == "ckpt_00000001.pt"
