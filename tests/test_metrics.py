"""FineRS metrics: hand-computed cases, and score_files against a direct re-implementation of
the official formulas (pycocotools for RLE)."""

from __future__ import annotations

import difflib
import json
import re

import cv2
import numpy as np
import pytest

from finers_rt.dataset import Annotation, load_annotations, write_annotations
from finers_rt.errors import InputError
from finers_rt.metrics import (MetricAccumulator, is_box_inside_region, is_mcq_correct,
                               is_open_qa_correct, load_predictions, score_files)

mask_api = pytest.importorskip("pycocotools.mask")

SQUARE = [[10, 10], [19, 10], [19, 19], [10, 19]]  # 10x10 = 100 px, x/y 10..19 inclusive


def _ann(index, area=0.03, q_type="referring", answer="", attribute="others", points=SQUARE,
         options=None):
    if q_type == "option" and options is None:
        options = "(A) red (B) blue (C) green"
    return Annotation("img.png", q_type, "q", answer, points, attribute, area, options=options,
                      index=index)


def _square_mask(x0=10, y0=10, size=10, hw=(40, 40)):
    mask = np.zeros(hw, bool)
    mask[y0:y0 + size, x0:x0 + size] = True
    return mask


# ---- QA matching -------------------------------------------------------------------------------


@pytest.mark.parametrize("response,correct", [
    ("a", True), ("A", True), ("(a)", True), ("(A) red", True), ("the answer is a.", True),
    ("[a]", True), ("'a'", True), ('"A"', True), ("option a, because", True), ("{a}", True),
    ("bad", False), ("b", False), ("answer: b", False), ("ab", False), ("", False),
    ("(b) blue", False), ("banana", False),
    ("the answer is b, a cup", True),  # official quirk: the article "a" is a standalone token
])
def test_mcq_matching(response, correct):
    assert is_mcq_correct(response, "A") is correct


def test_mcq_escapes_gt():
    # unescaped, the official pattern would treat "+" as a quantifier; re.escape matches literally
    assert is_mcq_correct("it is c++ here", "C++")
    assert not is_mcq_correct("it is ccc here", "C+")


@pytest.mark.parametrize("response,gt,correct", [
    ("It is white", "white", True), ("whiet", "white", True),  # ratio exactly 0.8
    ("White.", "white", True), ("wite", "White", True), ("black", "white", False),
    ("", "white", False), ("red and blue", "blue", True), ("blu", "blue", True),
    ("light blue", "light blue", False),  # official: single words vs the whole phrase
    ("it is square", "round", False),
])
def test_open_qa_matching(response, gt, correct):
    assert is_open_qa_correct(response, gt) is correct


def test_box_inside_region_borders_count():
    assert is_box_inside_region((10, 10, 19, 19), (10, 10, 19, 19))
    assert not is_box_inside_region((10, 10, 19, 19), (10.5, 10, 19, 19))
    assert not is_box_inside_region((10, 10, 19, 19), (0, 0, 30, 18.9))


# ---- the accumulator on hand-computed cases ------------------------------------------------------


def test_hand_computed_mix_of_exact_shifted_empty_missing():
    acc = MetricAccumulator()
    size = {"size_wh": (40, 40)}
    s0 = acc.add(_ann(0, area=0.06), _square_mask(), **size)                 # S, exact
    s1 = acc.add(_ann(1, area=0.03), _square_mask(x0=15), **size)            # XS, shifted 5 px
    s2 = acc.add(_ann(2, area=0.01), np.zeros((40, 40), bool), **size)       # XXS, empty
    s3 = acc.add(_ann(3, area=0.01), None, **size)                           # XXS, missing
    assert (s0.intersection, s0.union) == (100, 100)
    assert (s1.intersection, s1.union) == (50, 150)
    assert (s2.intersection, s2.union) == (0, 100) == (s3.intersection, s3.union)
    seg = acc.result()["seg"]
    assert seg["S"] == {"giou": 100 / (100 + 1e-5), "ciou": 100 / (100 + 1e-10), "n": 1}
    assert seg["XS"] == {"giou": 50 / (150 + 1e-5), "ciou": 50 / (150 + 1e-10), "n": 1}
    assert seg["XXS"] == {"giou": 0.0, "ciou": 0.0, "n": 2}
    assert seg["all"]["n"] == 4
    assert seg["all"]["giou"] == pytest.approx((100 / (100 + 1e-5) + 50 / (150 + 1e-5)) / 4,
                                               rel=1e-15)
    assert seg["all"]["ciou"] == pytest.approx(150 / (450 + 1e-10), rel=1e-15)


def test_empty_vs_empty_scores_one_and_empty_buckets_report_none():
    # every vertex sits on x = W: after truncation the polygon is outside the raster -> empty GT
    edge = [[40, 0], [40, 10], [40.5, 5]]
    acc = MetricAccumulator()
    with pytest.raises(InputError, match="outside the image"):
        acc.add(_ann(0, points=edge), None, size_wh=(40, 40))
    edge = [[40, 0], [40, 10], [40, 5]]
    sample = acc.add(_ann(0, area=0.03, points=edge), None, region_xyxy=[0, 0, 40, 40],
                     size_wh=(40, 40))
    assert (sample.intersection, sample.union, sample.iou) == (0, 0, 1.0)
    assert not sample.region_hit  # no GT box -> no hit
    result = acc.result()
    assert result["seg"]["XS"] == {"giou": 1.0, "ciou": 0.0, "n": 1}
    assert result["seg"]["S"] == {"giou": None, "ciou": None, "n": 0}
    assert result["qa"]["option"]["avg"] == {"n": 0, "correct": 0, "acc": None}
    empty = MetricAccumulator().result()
    assert empty["region"]["recall"] is None and empty["region"]["recall_all"] is None
    assert empty["seg"]["all"]["giou"] is None and empty["n_annotations"] == 0


def test_qa_counts_per_type_and_attribute():
    acc = MetricAccumulator()
    mask = _square_mask()
    rows = [(_ann(0, q_type="option", answer="A", attribute="colors"), "(A)"),
            (_ann(1, q_type="option", answer="B", attribute="colors"), "bad"),
            (_ann(2, q_type="option", answer="C", attribute="shape"), None),
            (_ann(3, q_type="reasoning", answer="white", attribute="position"), "it's white"),
            (_ann(4, q_type="reasoning", answer="round", attribute="others"), "square"),
            (_ann(5, q_type="referring", attribute="others"), "The object is found.")]
    scores = [acc.add(a, mask, r, size_wh=(40, 40)) for a, r in rows]
    assert [s.answer_correct for s in scores] == [True, False, False, True, False, None]
    qa = acc.result()["qa"]
    assert qa["option"]["avg"] == {"n": 3, "correct": 1, "acc": 1 / 3}
    assert qa["option"]["colors"] == {"n": 2, "correct": 1, "acc": 0.5}
    assert qa["option"]["shape"] == {"n": 1, "correct": 0, "acc": 0.0}
    assert qa["option"]["position"]["acc"] is None
    assert qa["reasoning"]["avg"] == {"n": 2, "correct": 1, "acc": 0.5}
    assert qa["reasoning"]["position"] == {"n": 1, "correct": 1, "acc": 1.0}
    assert qa["reasoning"]["others"] == {"n": 1, "correct": 0, "acc": 0.0}


def test_region_recall_and_recall_all():
    acc = MetricAccumulator()
    for i, region in enumerate([[10, 10, 19, 19], [0, 0, 18, 40], None, [5, 5, 300, 300]]):
        acc.add(_ann(i), None, region_xyxy=region, size_wh=(40, 40))
    assert [s.region_hit for s in acc.samples] == [True, False, False, True]
    assert acc.result()["region"] == {"n": 4, "n_with_region": 3, "hits": 2,
                                      "recall": 2 / 3, "recall_all": 0.5}


def test_accumulator_errors():
    acc = MetricAccumulator()
    with pytest.raises(InputError, match=r"annotation 0: the image size is unknown"):
        acc.add(_ann(0), None)
    with pytest.raises(InputError, match=r"annotation 2: predicted mask must be \[H, W\] = "
                                         r"\[40, 40\] like the image, got shape \[40, 41\]"):
        acc.add(_ann(2), np.zeros((40, 41), bool), size_wh=(40, 40))
    with pytest.raises(InputError, match="annotation 1: response must be a string, got int"):
        acc.add(_ann(1, q_type="reasoning", answer="x"), None, 5, size_wh=(40, 40))
    with pytest.raises(InputError, match=r"annotation 3: region_xyxy must be \[x1, y1, x2, y2\]"):
        acc.add(_ann(3), None, None, [1, 2, 3], size_wh=(40, 40))
    with pytest.raises(InputError, match="x1 <= x2 and y1 <= y2"):
        acc.add(_ann(3), None, None, [5, 2, 3, 4], size_wh=(40, 40))
    assert acc.result()["n_annotations"] == 0  # failed adds leave no partial sums


# ---- score_files vs a direct re-implementation of the official evaluation --------------------


def _official_reference(records, preds_by_index, sizes_hw):
    """The official FineRS formulas, written out directly (numpy + pycocotools + re + difflib)."""
    inters, unions, buckets = [], [], []
    qa = {"option": [], "reasoning": []}
    hits, with_region = 0, 0
    for i, rec in enumerate(records):
        h, w = sizes_hw[rec["image_path"]]
        gt = np.zeros((h, w), np.uint8)
        pts = np.array([rec["points"]], dtype=np.int32)
        cv2.polylines(gt, pts, True, 1, 1)
        cv2.fillPoly(gt, pts, 1)
        pred = preds_by_index.get(i)
        pm = (mask_api.decode(pred["mask_rle"]) if pred and pred.get("mask_rle")
              else np.zeros((h, w), np.uint8))
        inters.append(np.logical_and(pm > 0, gt > 0).sum())
        unions.append(np.logical_or(pm > 0, gt > 0).sum())
        a = rec["area_percent"]
        buckets.append("S" if a > 0.055 else ("XXS" if a < 0.017 else "XS"))
        response = (pred or {}).get("response") or ""
        gt_answer = rec["A"].lower()
        if rec["Q-type"] == "option":
            pattern = rf"(?:\b|[\(\[\{{'\" ]){gt_answer}(?:\b|[\)\]\}}'\" ,.!?])"
            qa["option"].append((rec["attribute"], re.search(pattern, response.lower()) is not None))
        elif rec["Q-type"] == "reasoning":
            ok = any(difflib.SequenceMatcher(None, wd, gt_answer).ratio() >= 0.8
                     for wd in response.lower().split())
            qa["reasoning"].append((rec["attribute"], ok))
        region = (pred or {}).get("region_xyxy")
        if region is not None:
            with_region += 1
            ys, xs = np.nonzero(gt)
            gx1, gy1, gx2, gy2 = xs.min(), ys.min(), xs.max(), ys.max()
            rx1, ry1, rx2, ry2 = region
            hits += int(gx1 >= rx1 and gy1 >= ry1 and gx2 <= rx2 and gy2 <= ry2)
    inters, unions, buckets = np.array(inters, float), np.array(unions, float), np.array(buckets)
    iou = inters / (unions + 1e-5)
    iou[unions == 0] += 1.0
    seg = {}
    for b in ("S", "XS", "XXS", "all"):
        sel = np.ones(len(buckets), bool) if b == "all" else buckets == b
        seg[b] = (iou[sel].mean(), inters[sel].sum() / (unions[sel].sum() + 1e-10), int(sel.sum()))
    return seg, qa, hits, with_region


def _make_dataset(tmp_path, rng, n=24):
    sizes_hw = {"a.png": (90, 120), "sub/b.jpg": (64, 48)}
    (tmp_path / "sub").mkdir()
    for name, (h, w) in sizes_hw.items():
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    records = []
    for i in range(n):
        name = list(sizes_hw)[i % 2]
        h, w = sizes_hw[name]
        cx, cy, r = rng.uniform(8, w - 8), rng.uniform(8, h - 8), rng.uniform(2, 7)
        ang = np.sort(rng.uniform(0, 2 * np.pi, 6))
        pts = [[round(cx + r * np.cos(t), 2), round(cy + r * np.sin(t), 2)] for t in ang]
        q_type = ["referring", "option", "reasoning"][i % 3]
        rec = {"image_path": name, "Q-type": q_type, "Q": "q",
               "A": {"option": "ABC"[i % 3 - 1], "reasoning": "white"}.get(q_type, ""),
               "points": pts, "attribute": ["colors", "shape", "position", "others"][i % 4],
               "area_percent": [0.06, 0.055, 0.017, 0.01, 0.03][i % 5]}
        if q_type == "option":
            rec["options"] = "(A) x (B) y (C) z"
        records.append(rec)
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": records}))
    return records, sizes_hw


def _make_predictions(records, sizes_hw, rng):
    preds = {}
    for i, rec in enumerate(records):
        kind = i % 4  # 0 exact, 1 shifted, 2 empty, 3 missing (every 8th) or random blob
        if kind == 3 and i % 8 == 3:
            continue
        h, w = sizes_hw[rec["image_path"]]
        gt = np.zeros((h, w), np.uint8)
        cv2.fillPoly(gt, np.array([rec["points"]], np.int32), 1)
        m = {0: gt, 1: np.roll(gt, (1, 2), axis=(0, 1)), 2: np.zeros_like(gt),
             3: (rng.random((h, w)) < 0.05).astype(np.uint8)}[kind]
        rle = mask_api.encode(np.asfortranarray(m))
        ys, xs = np.nonzero(gt)
        region = None if i % 3 == 0 else [float(xs.min() - rng.integers(0, 3)),
                                          float(ys.min() - rng.integers(0, 3)),
                                          float(xs.max() + rng.integers(-1, 3)), float(h)]
        preds[i] = {"index": i, "mask_rle": {"size": [int(v) for v in rle["size"]],
                                             "counts": rle["counts"].decode()},
                    "response": ["", "the answer is (b).", "It's whiet", "A", "bad"][i % 5],
                    "region_xyxy": region}
    return preds


def test_score_files_matches_official_reimplementation(tmp_path):
    rng = np.random.default_rng(3)
    records, sizes_hw = _make_dataset(tmp_path, rng)
    preds = _make_predictions(records, sizes_hw, rng)
    (tmp_path / "pred.json").write_text(json.dumps({"predictions": list(preds.values())}))
    result = score_files(tmp_path / "ann.json", tmp_path / "pred.json", tmp_path)
    seg, qa, hits, with_region = _official_reference(records, preds, sizes_hw)
    for b, (giou, ciou, n) in seg.items():
        assert result["seg"][b]["n"] == n > 0
        assert result["seg"][b]["giou"] == pytest.approx(giou, rel=1e-12, abs=1e-15)
        assert result["seg"][b]["ciou"] == pytest.approx(ciou, rel=1e-12, abs=1e-15)
    for q_type, rows in qa.items():
        assert result["qa"][q_type]["avg"]["correct"] == sum(ok for _, ok in rows)
        assert result["qa"][q_type]["avg"]["n"] == len(rows) > 0
        for attr in ("colors", "shape", "position", "others"):
            sub = [ok for a, ok in rows if a == attr]
            assert result["qa"][q_type][attr]["n"] == len(sub)
            assert result["qa"][q_type][attr]["correct"] == sum(sub)
    assert 0 < hits < with_region
    assert result["region"] == {"n": len(records), "n_with_region": with_region, "hits": hits,
                                "recall": hits / with_region, "recall_all": hits / len(records)}
    assert result["n_annotations"] == len(records) and result["n_predictions"] == len(preds)
    # round trip through our writer does not change the score
    write_annotations(tmp_path / "ann2.json", load_annotations(tmp_path / "ann.json"))
    assert score_files(tmp_path / "ann2.json", tmp_path / "pred.json", tmp_path) == result


@pytest.mark.parametrize("content,message", [
    (None, "predictions file not found"),
    ("{", "is not valid JSON"),
    ('{"preds": []}', "must be an object with a 'predictions' list, got keys ['preds']"),
    ('{"predictions": [1]}', "prediction 0: must be a JSON object, got int"),
    ('{"predictions": [{"mask_rle": null}]}', "prediction 0: 'index' must be an int"),
    ('{"predictions": [{"index": true}]}', "'index' must be an int (the annotation position)"),
    ('{"predictions": [{"index": 3}]}', "index 3 is out of range: the annotation file has 3 "
                                        "annotations (valid 0..2)"),
    ('{"predictions": [{"index": -1}]}', "index -1 is out of range"),
    ('{"predictions": [{"index": 1}, {"index": 0}, {"index": 1}]}',
     "prediction 2: duplicate index 1"),
    ('{"predictions": [{"index": 1, "mask_rle": [0, 4]}]}',
     "prediction 0 (index 1): 'mask_rle' must be a COCO RLE object"),
    ('{"predictions": [{"index": 1, "response": 3}]}', "'response' must be a string, got int"),
    ('{"predictions": [{"index": 1, "region_xyxy": [1, 2]}]}',
     "prediction 0 (index 1): 'region_xyxy' must be [x1, y1, x2, y2] with 4 finite numbers"),
    ('{"predictions": [{"index": 1, "bbox_xyxy": [4, 4, 1, 1]}]}',
     "'bbox_xyxy' must have x1 <= x2 and y1 <= y2"),
])
def test_prediction_file_errors(tmp_path, content, message):
    path = tmp_path / "pred.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as info:
        load_predictions(path, n_annotations=3)
    assert message in str(info.value)


def test_rle_size_and_corruption_errors_name_the_annotation(tmp_path):
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((40, 40, 3), np.uint8))
    write_annotations(tmp_path / "ann.json", [_ann(0), _ann(1)])
    cases = [({"size": [40, 41], "counts": "0"}, "prediction for annotation 1: mask_rle size "
              "[40, 41] does not match the image img.png: expected [h, w] = [40, 40]"),
             ({"size": [40, 40], "counts": "0?"}, "prediction for annotation 1: corrupt RLE: "
              "run lengths sum to 15")]
    for rle, message in cases:
        (tmp_path / "pred.json").write_text(json.dumps(
            {"predictions": [{"index": 1, "mask_rle": rle}]}))
        with pytest.raises(InputError) as info:
            score_files(tmp_path / "ann.json", tmp_path / "pred.json", tmp_path)
        assert message in str(info.value)
