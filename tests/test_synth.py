"""Tests of the synthetic FineRS-4k style benchmark generator (finers_rt.synth)."""

from __future__ import annotations

import difflib
import itertools
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finers_rt.dataset import load_annotations, polygon_to_mask, size_bucket
from finers_rt.errors import InputError
from finers_rt.synth import (ATTRIBUTE_MIX, COLORS, PATTERNS, QTYPE_MIX, REGIONS, SHAPES,
                             generate_dataset, generate_scene, parse_size_wh)

SMALL = (640, 360)
MIX_SEED = 11
MIX_SCENES = 200


@pytest.fixture(scope="module")
def small_scenes():
    """MIX_SCENES scenes at 640x360: list of (index, image RGB, records, objects)."""
    out = []
    for i in range(MIX_SCENES):
        image, records = generate_scene(MIX_SEED, i, SMALL)
        out.append((i, image, records, _scene_objects(MIX_SEED, i, SMALL)))
    return out


def _scene_objects(seed, index, size_wh):
    """The objects of a scene, re-drawn from the same random stream as generate_scene."""
    from finers_rt.synth import scene_objects

    return scene_objects(seed, index, size_wh)


def _target(record, objs):
    pts = np.asarray(record["points"])
    found = [o for o in objs if o.points_xy.shape == pts.shape and np.array_equal(o.points_xy, pts)]
    assert len(found) == 1, record
    return found[0]


# ---- determinism ---------------------------------------------------------------------------

def test_scene_is_deterministic_and_seed_dependent():
    img_a, rec_a = generate_scene(5, 3, SMALL)
    img_b, rec_b = generate_scene(5, 3, SMALL)
    assert img_a.shape == (360, 640, 3) and img_a.dtype == np.uint8 and img_a.flags.c_contiguous
    assert np.array_equal(img_a, img_b) and rec_a == rec_b
    img_c, rec_c = generate_scene(6, 3, SMALL)
    img_d, _ = generate_scene(5, 4, SMALL)
    assert not np.array_equal(img_a, img_c) and rec_a != rec_c
    assert not np.array_equal(img_a, img_d)


def test_extra_questions_keep_the_scene_and_ask_about_other_targets():
    img, base = generate_scene(5, 3, SMALL)
    img_x, recs = generate_scene(5, 3, SMALL, extra_questions=6)
    assert np.array_equal(img, img_x) and recs[:len(base)] == base
    assert len(recs) > len(base)
    targets = [tuple(map(tuple, r["points"])) for r in recs]
    assert len(set(targets)) == len(targets)  # every question has its own target
    for r in recs:
        assert r["Q-type"] in QTYPE_MIX and r["attribute"] in ATTRIBUTE_MIX and r["Q"]
    assert generate_scene(5, 3, SMALL, extra_questions=6)[1] == recs
    for bad in (-1, 1.5, True):
        with pytest.raises(InputError, match="extra_questions"):
            generate_scene(5, 3, SMALL, extra_questions=bad)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_bytes_identical_across_runs_and_workers(tmp_path):
    one = generate_dataset(tmp_path / "w1", n=4, seed=21, size_wh=SMALL, workers=1)
    two = generate_dataset(tmp_path / "w2", n=4, seed=21, size_wh=SMALL, workers=2)
    again = generate_dataset(tmp_path / "w1b", n=4, seed=21, size_wh=SMALL, workers=1)
    other = generate_dataset(tmp_path / "s22", n=4, seed=22, size_wh=SMALL, workers=1)
    a, b, c = (_tree_bytes(tmp_path / d) for d in ("w1", "w2", "w1b"))
    assert sorted(a) == ["annotations.json"] + [f"images/scene_00000{i}.jpg" for i in range(4)]
    assert a == b == c
    d = _tree_bytes(tmp_path / "s22")
    assert all(a[k] != d[k] for k in a)
    assert one.n_annotations == two.n_annotations == again.n_annotations > 0
    assert one.n_scenes == 4 and other.workers == 1


def test_written_jpeg_is_the_generated_scene(tmp_path):
    generate_dataset(tmp_path, n=2, seed=4, size_wh=SMALL)
    records = json.loads((tmp_path / "annotations.json").read_text())["annotations"]
    for i in range(2):
        image, recs = generate_scene(4, i, SMALL)
        decoded = np.asarray(Image.open(tmp_path / "images" / f"scene_00000{i}.jpg").convert("RGB"))
        assert decoded.shape == image.shape
        assert np.abs(decoded.astype(int) - image).mean() < 4.0  # JPEG q95 only
        assert [r for r in records if r["image_path"] == f"scene_00000{i}.jpg"] == recs


# ---- geometry ------------------------------------------------------------------------------

def test_target_pixels_are_exactly_the_polygon_mask():
    """Solid targets: pixels of the target colour around the object == polygon_to_mask.
    Patterned targets: the mask holds only the object's two colours, and its main colour
    only inside the mask."""
    checked = Counter()
    for index in range(12):
        image, records = generate_scene(31, index, SMALL)
        objs = _scene_objects(31, index, SMALL)
        for rec in records:
            obj = _target(rec, objs)
            full = polygon_to_mask(rec["points"], SMALL[1], SMALL[0])
            x1, y1, x2, y2 = obj.box_xyxy
            sl = np.s_[max(0, y1 - 3):y2 + 4, max(0, x1 - 3):x2 + 4]
            win, mask = image[sl], full[sl]
            assert mask.sum() == full.sum()  # the window holds the whole object
            is_main = np.all(win == np.array(COLORS[obj.color], np.uint8), axis=-1)
            if obj.pattern == "solid":
                assert np.array_equal(is_main, mask)
            else:
                assert not np.any(is_main & ~mask)
                assert len({tuple(p) for p in win[mask]}) == 2
                assert is_main.sum() > 0.5 * mask.sum()
            checked[obj.pattern] += 1
    assert checked["solid"] >= 5 and sum(checked.values()) >= 15


def test_area_percent_matches_rasterised_mask(small_scenes):
    w, h = SMALL
    for _i, _img, records, objs in small_scenes[:60]:
        for rec in records:
            mask = polygon_to_mask(rec["points"], h, w)
            assert rec["area_percent"] == pytest.approx(100.0 * mask.sum() / (w * h), rel=1e-12)
            pts = np.asarray(rec["points"])
            assert pts.dtype.kind == "i" and pts.min() >= 0
            assert pts[:, 0].max() < w and pts[:, 1].max() < h


def test_objects_do_not_touch():
    objs = _scene_objects(3, 0, (3840, 2160))
    assert len(objs) >= 30
    for a, b in itertools.combinations(objs, 2):
        ax1, ay1, ax2, ay2 = a.box_xyxy
        bx1, by1, bx2, by2 = b.box_xyxy
        gap = max(bx1 - ax2, ax1 - bx2, by1 - ay2, ay1 - by2)
        assert gap >= 4, (a, b)


# ---- mix -----------------------------------------------------------------------------------

def test_type_attribute_and_size_mix(small_scenes):
    records = [r for _i, _img, recs, _o in small_scenes for r in recs]
    n = len(records)
    assert n >= 1.6 * MIX_SCENES
    for key, mix in (("Q-type", QTYPE_MIX), ("attribute", ATTRIBUTE_MIX)):
        counts = Counter(r[key] for r in records)
        assert set(counts) == set(mix)
        for name, share in mix.items():
            assert abs(counts[name] / n - share) < 0.08, (key, name, counts)
    buckets = Counter(size_bucket(r["area_percent"]) for r in records)
    assert set(buckets) == {"S", "XS", "XXS"} and min(buckets.values()) > 0.15 * n
    for _i, _img, recs, _o in small_scenes:
        assert 1 <= len(recs) <= 3
        assert len({json.dumps(r["points"]) for r in recs}) == len(recs)  # distinct targets


# ---- answers -------------------------------------------------------------------------------

def _asked_field(question: str) -> str:
    for prefix, field in (("What color is", "color"), ("What shape is", "shape"),
                          ("Which pattern does", "pattern"), ("In which part", "region")):
        if question.startswith(prefix):
            return field
    raise AssertionError(f"unknown question form: {question}")


def _region(center_xy, size_wh):
    col, row = (min(2, int(3 * c / e)) for c, e in zip(center_xy, size_wh))
    return REGIONS[3 * row + col]


def _truth(field, obj, image):
    if field == "color":  # measured from pixels: the commonest colour inside the mask
        mask = polygon_to_mask(obj.points_xy, image.shape[0], image.shape[1])
        values, counts = np.unique(image[mask], axis=0, return_counts=True)
        mode = tuple(int(v) for v in values[np.argmax(counts)])
        return next(name for name, rgb in COLORS.items() if rgb == mode)
    if field == "region":
        return _region(obj.center_xy, (image.shape[1], image.shape[0]))
    return obj.value(field)


def _parse_options(text):
    pairs = re.findall(r"\(([A-D])\) (\S+)", text)
    assert " ".join(f"({k}) {v}" for k, v in pairs) == text
    return dict(pairs)


def test_reasoning_and_option_answers_are_the_targets_attributes(small_scenes):
    seen = Counter()
    vocab = {"color": set(COLORS), "shape": set(SHAPES), "pattern": set(PATTERNS),
             "region": set(REGIONS)}
    for _i, image, records, objs in small_scenes[:120]:
        for rec in records:
            if rec["Q-type"] == "referring":
                assert rec["A"] == "The object is found." and "options" not in rec
                continue
            field = _asked_field(rec["Q"])
            truth = _truth(field, _target(rec, objs), image)
            if rec["Q-type"] == "reasoning":
                assert rec["A"] == truth and " " not in rec["A"] and "options" not in rec
            else:
                options = _parse_options(rec["options"])
                assert list(options) == ["A", "B", "C", "D"]
                assert len(set(options.values())) == 4 and set(options.values()) <= vocab[field]
                assert rec["A"] in options and options[rec["A"]] == truth
            seen[(rec["Q-type"], field)] += 1
    assert len(seen) == 8, seen  # both types ask all four fields


def test_answer_vocabulary_is_separable_by_the_official_word_match():
    words = list(COLORS) + list(SHAPES) + list(PATTERNS) + list(REGIONS)
    assert len(set(words)) == len(words)
    for a, b in itertools.combinations(words, 2):
        assert difflib.SequenceMatcher(None, a, b).ratio() < 0.8, (a, b)


# ---- the wording names exactly one object ----------------------------------------------------

_PHRASE = (r"the (?:(?P<{p}pat>" + "|".join(PATTERNS) + r") )?(?:(?P<{p}col>" + "|".join(COLORS)
           + r") )?(?P<{p}shape>" + "|".join(SHAPES) + r"|object)")
_REL = r"(?P<rel>left of|right of|above|below)"
_REGION_WORDS = {"in the top-left of the image": "top-left", "at the top of the image": "top",
                 "in the top-right of the image": "top-right",
                 "on the left side of the image": "left", "in the center of the image": "center",
                 "on the right side of the image": "right",
                 "in the bottom-left of the image": "bottom-left",
                 "at the bottom of the image": "bottom",
                 "in the bottom-right of the image": "bottom-right"}


def _matching(m, prefix, objs):
    pat, col, shape = m.group(prefix + "pat"), m.group(prefix + "col"), m.group(prefix + "shape")
    return [o for o in objs if (pat is None or o.pattern == pat) and (col is None or o.color == col)
            and (shape == "object" or o.shape == shape)]


def _in_cone(anchor, obj, rel, slope=0.6):
    dx, dy = obj.center_xy[0] - anchor.center_xy[0], obj.center_xy[1] - anchor.center_xy[1]
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx),
                     "below": (dy, dx)}[rel]
    return along > 0 and abs(across) <= slope * along


def _resolve(desc, objs, size_wh):
    """Objects an independent reader of `desc` would pick (strict cones, plain 3x3 regions)."""
    t, a = _PHRASE.format(p="t"), _PHRASE.format(p="a")
    m = re.fullmatch(rf"the object directly {_REL} {a}", desc)
    if m:
        anchors = _matching(m, "a", objs)
        assert len(anchors) == 1, desc
        cone = [o for o in objs if o is not anchors[0] and _in_cone(anchors[0], o, m["rel"])]
        dist = [np.hypot(o.center_xy[0] - anchors[0].center_xy[0],
                         o.center_xy[1] - anchors[0].center_xy[1]) for o in cone]
        return [cone[int(np.argmin(dist))]] if cone else []
    m = re.fullmatch(rf"{t} {_REL} {a}", desc)
    if m:
        anchors = _matching(m, "a", objs)
        assert len(anchors) == 1, desc
        return [o for o in _matching(m, "t", objs) if _in_cone(anchors[0], o, m["rel"])]
    m = re.fullmatch(rf"{t} (?P<region>.+ of the image)", desc)
    if m:
        region = _REGION_WORDS[m["region"]]
        return [o for o in _matching(m, "t", objs) if _region(o.center_xy, size_wh) == region]
    m = re.fullmatch(t, desc)
    assert m, f"unparsed description: {desc}"
    return _matching(m, "t", objs)


def _description(question):
    for pattern in (r"What color is (.+)\?", r"What shape is (.+)\?",
                    r"Which pattern does (.+) have\?", r"In which part of the image is (.+)\?"):
        m = re.fullmatch(pattern, question)
        if m:
            return m.group(1)
    return question  # referring: the question is the description


def test_every_description_names_exactly_its_target(small_scenes):
    kinds = Counter()
    for _i, _img, records, objs in small_scenes:
        for rec in records:
            desc = _description(rec["Q"])
            found = _resolve(desc, objs, SMALL)
            assert found == [_target(rec, objs)], (rec["Q"], len(found))
            relation = any(r in desc for r in (" left of ", " right of ", " above ", " below "))
            kinds["relation" if relation else "region" if desc.endswith("of the image")
                  else "plain"] += 1
            if rec["attribute"] == "position" and rec["Q-type"] == "referring":
                assert not re.fullmatch(_PHRASE.format(p="t"), desc)  # spatial wording
    assert min(kinds.values()) >= 20, kinds


# ---- CLI and bad input -----------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "finers_rt.cli", "synth", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_refuses_non_empty_and_force(tmp_path):
    out = tmp_path / "bench"
    r = _cli(str(out), "--n", "3", "--seed", "9", "--size", "640x360")
    assert r.returncode == 0, r.stderr
    assert "3 scenes 640x360" in r.stdout
    anns = load_annotations(out / "annotations.json", out / "images")  # validates polygons
    assert len(anns) >= 3
    assert {a.image_path for a in anns} <= {f"scene_00000{i}.jpg" for i in range(3)}
    assert Image.open(out / "images" / "scene_000002.jpg").size == (640, 360)
    before = _tree_bytes(out)
    r = _cli(str(out), "--n", "3", "--seed", "10", "--size", "640x360")
    assert r.returncode == 2 and "not empty" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr and _tree_bytes(out) == before
    r = _cli(str(out), "--n", "3", "--seed", "10", "--size", "640x360", "--force")
    assert r.returncode == 0, r.stderr
    assert _tree_bytes(out)["annotations.json"] != before["annotations.json"]


@pytest.mark.parametrize("size", ["640by360", "640x", "x360", "-640x360", "10x10", "640x360x2"])
def test_cli_bad_size(tmp_path, size):
    out = tmp_path / "never"
    r = _cli(str(out), "--n", "1", "--seed", "0", "--size", size)
    assert r.returncode == 2 and "InputError" in r.stderr and "Traceback" not in r.stderr
    assert size in r.stderr
    assert not out.exists()


def test_library_bad_input(tmp_path):
    assert parse_size_wh(" 3840X2160 ") == (3840, 2160)
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        parse_size_wh("4k")
    with pytest.raises(InputError, match="n must be an integer >= 1, got 0"):
        generate_dataset(tmp_path / "a", n=0, seed=0, size_wh=SMALL)
    with pytest.raises(InputError, match="workers must be"):
        generate_dataset(tmp_path / "a", n=1, seed=0, size_wh=SMALL, workers=0)
    with pytest.raises(InputError, match="size_wh must be"):
        generate_scene(0, 0, (640.0, 360))
    (tmp_path / "f").write_text("mine")
    with pytest.raises(InputError, match="not a folder"):
        generate_dataset(tmp_path / "f", n=1, seed=0, size_wh=SMALL)
    assert (tmp_path / "f").read_text() == "mine"
