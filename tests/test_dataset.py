"""Dataset IO: official polygon rasterisation, annotation files, buckets, and error paths."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from finers_rt.dataset import (Annotation, check_polygons_in_images, gt_mask, image_size_wh,
                               load_annotations, mask_bbox_xyxy, polygon_to_mask,
                               resolve_image_path, size_bucket, write_annotations)
from finers_rt.errors import InputError


def _official_polygon_mask(points, h, w):
    """The official FineRS evaluation's rasterisation, written out as the reference."""
    mask = np.zeros((h, w), np.uint8)
    pts = np.array([points], dtype=np.int32)
    cv2.polylines(mask, pts, True, 1, 1)
    cv2.fillPoly(mask, pts, 1)
    return mask


def _record(**over):
    rec = {"image_path": "img.png", "Q-type": "option", "Q": "What color is the cup?", "A": "B",
           "options": "(A) red (B) blue", "points": [[10, 10], [30.7, 10.2], [30, 25.9]],
           "attribute": "colors", "area_percent": 0.02}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_polygon_to_mask_matches_official_on_random_polygons():
    rng = np.random.default_rng(7)
    for _ in range(50):
        h, w = rng.integers(5, 60, size=2)
        n = int(rng.integers(3, 9))
        pts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=1).tolist()
        ours = polygon_to_mask(pts, int(h), int(w))
        assert ours.dtype == bool and ours.shape == (h, w)
        np.testing.assert_array_equal(ours, _official_polygon_mask(pts, int(h), int(w)) > 0)


def test_polygon_to_mask_truncates_float_coordinates():
    # (1.9, 1.9)-(4.99, 1.2)-(4.5, 3.99) truncates to (1,1)-(4,1)-(4,3)
    ours = polygon_to_mask([[1.9, 1.9], [4.99, 1.2], [4.5, 3.99]], 6, 6)
    expected = np.zeros((6, 6), bool)
    expected[1, 1:5] = True
    expected[2, 2:5] = True
    expected[3, 4] = True
    np.testing.assert_array_equal(ours, expected)


def test_polygon_to_mask_bad_args():
    with pytest.raises(InputError, match=r"points_xy must be \[N, 2\] \(x, y\), got shape \(3,\)"):
        polygon_to_mask([1, 2, 3], 4, 4)
    with pytest.raises(InputError, match="mask size must be positive, got height=0"):
        polygon_to_mask([[0, 0], [1, 0], [1, 1]], 0, 4)


@pytest.mark.parametrize("area,bucket", [
    (0.0, "XXS"), (0.0169999, "XXS"), (0.017, "XS"), (0.03, "XS"), (0.055, "XS"),
    (0.0550001, "S"), (5.0, "S")])
def test_size_bucket_boundaries(area, bucket):
    assert size_bucket(area) == bucket


def test_mask_bbox_is_inclusive_nonzero_extent():
    mask = np.zeros((20, 30), bool)
    mask[3:8, 11:15] = True
    mask[12, 2] = True
    ys, xs = np.nonzero(mask)
    assert mask_bbox_xyxy(mask) == (xs.min(), ys.min(), xs.max(), ys.max()) == (2, 3, 14, 12)
    assert mask_bbox_xyxy(np.zeros((4, 4), bool)) is None
    with pytest.raises(InputError, match="2-D"):
        mask_bbox_xyxy(np.zeros((2, 2, 2)))


def test_load_write_round_trip_keeps_extra_keys(tmp_path):
    records = [_record(source="synthetic", id=17),
               _record(**{"Q-type": "reasoning", "A": "blue", "options": _DROP,
                          "attribute": "shape", "area_percent": 0.06}),
               _record(**{"Q-type": "referring", "A": "", "options": _DROP,
                          "attribute": "position"})]
    path = _write_json(tmp_path / "a.json", {"annotations": records})
    anns = load_annotations(path)
    assert [a.index for a in anns] == [0, 1, 2]
    assert anns[0].q_type == "option" and anns[0].options == "(A) red (B) blue"
    assert anns[0].points_xy == ((10.0, 10.0), (30.7, 10.2), (30.0, 25.9))
    assert anns[0].extra == {"source": "synthetic", "id": 17}
    assert anns[1].options is None and anns[1].size_bucket == "S"
    write_annotations(tmp_path / "b.json", anns)
    again = json.loads((tmp_path / "b.json").read_text())["annotations"]
    assert again == records
    assert load_annotations(tmp_path / "b.json") == anns


def test_gt_mask_uses_image_size(tmp_path):
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((40, 50, 3), np.uint8))
    ann = load_annotations(_write_json(tmp_path / "a.json", {"annotations": [_record()]}),
                           images_dir=tmp_path)[0]
    assert image_size_wh(tmp_path / "img.png") == (50, 40)
    mask = gt_mask(ann, tmp_path)
    np.testing.assert_array_equal(mask, _official_polygon_mask(ann.points_xy, 40, 50) > 0)
    np.testing.assert_array_equal(gt_mask(ann, size_wh=(50, 40)), mask)
    with pytest.raises(InputError, match="needs images_dir or size_wh"):
        gt_mask(ann)
    assert resolve_image_path(tmp_path, str(tmp_path / "img.png")) == tmp_path / "img.png"
    assert resolve_image_path("/data", "sub/x.jpg") == Path("/data/sub/x.jpg")


@pytest.mark.parametrize("content,message", [
    (None, "annotation file not found"),
    ("{not json", "is not valid JSON"),
    ("[]", "must be an object with an 'annotations' list, got list"),
    ('{"annots": []}', "got keys ['annots']"),
    ('{"annotations": {}}', "got keys ['annotations']"),
    ('{"annotations": [3]}', "annotation 0: must be a JSON object, got int"),
])
def test_file_level_errors(tmp_path, content, message):
    path = tmp_path / "a.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as info:
        load_annotations(path)
    assert message in str(info.value)


@pytest.mark.parametrize("over,message", [
    ({"A": _DROP}, "annotation 1: missing field(s) ['A']"),
    ({"points": _DROP, "Q": _DROP}, "missing field(s) ['Q', 'points']"),
    ({"Q-type": "refering"}, "unknown Q-type 'refering', expected one of ['referring', "
                             "'reasoning', 'option'] (did you mean 'referring'?)"),
    ({"attribute": "color"}, "unknown attribute 'color', expected one of ['colors', 'shape', "
                             "'position', 'others'] (did you mean 'colors'?)"),
    ({"options": _DROP}, "Q-type 'option' needs a non-empty 'options' string, got None"),
    ({"options": ""}, "needs a non-empty 'options' string, got ''"),
    ({"options": ["A", "B"]}, "'options' must be a string, got list"),
    ({"points": [[0, 0], [1, 1]]}, "annotation 1: polygon needs at least 3 points, got 2"),
    ({"points": [[0, 0], [1, "x"], [2, 2]]}, "polygon point 1 must be [x, y] with two finite "
                                             "numbers, got [1, 'x']"),
    ({"points": [[0, 0], [1, 1, 1], [2, 2]]}, "polygon point 1 must be [x, y]"),
    ({"points": [[0, 0], [1, 1], [True, 2]]}, "polygon point 2 must be [x, y]"),
    ({"points": "0,0 1,1 2,2"}, "'points' must be a list of [x, y] pairs, got str"),
    ({"area_percent": "small"}, "'area_percent' must be a finite number >= 0, got 'small'"),
    ({"area_percent": -1}, "'area_percent' must be a finite number >= 0, got -1"),
    ({"Q": 5}, "annotation 1: 'Q' must be a string, got int"),
])
def test_record_errors_name_the_annotation(tmp_path, over, message):
    path = _write_json(tmp_path / "a.json", {"annotations": [_record(), _record(**over)]})
    with pytest.raises(InputError) as info:
        load_annotations(path)
    assert message in str(info.value)


def test_nan_polygon_is_rejected(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"annotations": [' + json.dumps(_record())[:-1].replace(
        '"points": [[10, 10]', '"points": [[NaN, 10]') + "}]}")
    with pytest.raises(InputError, match="polygon point 0 must be"):
        load_annotations(path)


def test_image_errors_name_the_annotation(tmp_path):
    good = tmp_path / "img.png"
    cv2.imwrite(str(good), np.zeros((40, 50, 3), np.uint8))
    (tmp_path / "text.png").write_text("this is not an image")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:20])
    recs = [_record(), _record(image_path="missing.png")]
    path = _write_json(tmp_path / "a.json", {"annotations": recs})
    with pytest.raises(InputError, match=r"annotation 1: image not found: .*missing\.png"):
        load_annotations(path, images_dir=tmp_path)
    for name in ("text.png", "cut.png"):
        path = _write_json(tmp_path / "a.json", {"annotations": [_record(image_path=name)]})
        with pytest.raises(InputError, match=rf"annotation 0: cannot read image .*{name} "
                                             r"\(unreadable or truncated\)"):
            load_annotations(path, images_dir=tmp_path)


@pytest.mark.parametrize("point", [[50.5, 3], [-0.1, 3], [3, 40.01]])
def test_polygon_outside_image(tmp_path, point):
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((40, 50, 3), np.uint8))
    rec = _record(points=[[0, 0], [50, 40], point])  # corners on the border are fine
    path = _write_json(tmp_path / "a.json", {"annotations": [_record(), rec]})
    anns = load_annotations(path)  # without images_dir no size check
    with pytest.raises(InputError) as info:
        check_polygons_in_images(anns, tmp_path)
    assert "annotation 1: polygon point 2" in str(info.value)
    assert "is outside the image img.png of size 50x40 (WxH)" in str(info.value)


def test_annotation_dataclass_validates_directly():
    ann = Annotation("a.png", "referring", "the cup", "", [[0, 0], [2, 0], [2, 2]], "others",
                     0.001, index=4)
    assert ann.points_xy == ((0.0, 0.0), (2.0, 0.0), (2.0, 2.0)) and ann.size_bucket == "XXS"
    with pytest.raises(InputError, match="annotation 4: unknown Q-type 'mcq'"):
        Annotation("a.png", "mcq", "q", "A", [[0, 0], [2, 0], [2, 2]], "others", 0.1, index=4)
