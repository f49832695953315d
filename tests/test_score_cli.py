"""`finers-rt score` end to end on a tiny generated dataset, through the real entry point."""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from finers_rt import cli
from finers_rt.dataset import Annotation, gt_mask, write_annotations
from finers_rt.rle import encode_mask


def _run(monkeypatch, capsys, *args):
    """Run `finers-rt ARGS` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["finers-rt", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def dataset(tmp_path):
    """Two images, three annotations, predictions for two of them; returns tmp_path."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((60, 80, 3), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.full((30, 20, 3), 200, np.uint8))
    anns = [Annotation("a.png", "option", "Which?", "B", [[10, 10], [29, 10], [29, 19], [10, 19]],
                       "colors", 0.06, options="(A) red (B) blue", index=0),
            Annotation("b.png", "reasoning", "Color?", "white", [[2, 2], [11, 2], [11, 11], [2, 11]],
                       "shape", 0.03, index=1),
            Annotation("a.png", "referring", "the dot", "", [[50, 50], [53, 50], [53, 53]],
                       "others", 0.001, index=2)]
    write_annotations(tmp_path / "ann.json", anns)
    exact = gt_mask(anns[0], tmp_path)  # 20x10 = 200 px
    shifted = np.roll(gt_mask(anns[1], tmp_path), 5, axis=1)  # 10x10, 5 columns overlap
    preds = [{"index": 1, "mask_rle": encode_mask(shifted), "response": "It is whit",
              "region_xyxy": [0, 0, 12, 12]},
             {"index": 0, "mask_rle": encode_mask(exact), "response": "the answer is (b).",
              "bbox_xyxy": [10, 10, 29, 19], "region_xyxy": [0, 0, 25, 30]}]
    (tmp_path / "pred.json").write_text(json.dumps({"predictions": preds}))
    return tmp_path


def test_score_json_end_to_end(dataset, monkeypatch, capsys):
    code, out, err = _run(monkeypatch, capsys, "score", dataset / "ann.json",
                          dataset / "pred.json", "--images", dataset, "--json")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert set(result) == {"seg", "qa", "region", "n_annotations", "n_predictions"}
    assert result["n_annotations"] == 3 and result["n_predictions"] == 2
    # sample 0: I = U = 200 (S); sample 1: I = 50, U = 150 (XS); sample 2: missing, U = 7 px (XXS)
    seg = result["seg"]
    assert seg["S"] == {"giou": 200 / (200 + 1e-5), "ciou": 200 / (200 + 1e-10), "n": 1}
    assert seg["XS"] == {"giou": 50 / (150 + 1e-5), "ciou": 50 / (150 + 1e-10), "n": 1}
    assert seg["XXS"] == {"giou": 0.0, "ciou": 0.0, "n": 1}
    gt_dot = int(gt_mask(Annotation("a.png", "referring", "", "", [[50, 50], [53, 50], [53, 53]],
                                    "others", 0.001), size_wh=(80, 60)).sum())
    assert seg["all"]["ciou"] == pytest.approx(250 / (350 + gt_dot + 1e-10), rel=1e-14)
    assert seg["all"]["giou"] == pytest.approx((200 / (200 + 1e-5) + 50 / (150 + 1e-5)) / 3,
                                               rel=1e-14)
    assert result["qa"]["option"]["avg"] == {"n": 1, "correct": 1, "acc": 1.0}
    assert result["qa"]["option"]["colors"] == {"n": 1, "correct": 1, "acc": 1.0}
    assert result["qa"]["reasoning"]["shape"] == {"n": 1, "correct": 1, "acc": 1.0}  # whit~white
    assert result["qa"]["reasoning"]["colors"] == {"n": 0, "correct": 0, "acc": None}
    # sample 1: GT box (2,2)-(11,11) inside (0,0,12,12) -> hit; sample 0: x2 = 29 > 25 -> miss
    assert result["region"] == {"n": 3, "n_with_region": 2, "hits": 1, "recall": 0.5,
                                "recall_all": 1 / 3}


def test_score_table_output(dataset, monkeypatch, capsys):
    code, out, err = _run(monkeypatch, capsys, "score", dataset / "ann.json",
                          dataset / "pred.json", "--images", dataset)
    assert code == 0, err
    for text in ("Segmentation", "gIoU", "XXS", "QA accuracy", "reasoning", "Region recall",
                 "2 predictions for 3 annotations"):
        assert text in out


@pytest.mark.parametrize("edit,message", [
    ("missing-ann", "InputError: annotation file not found"),
    ("dup", "InputError: prediction 2: duplicate index 0"),
    ("range", "InputError: prediction 0: index 7 is out of range"),
    ("rle-size", "InputError: prediction for annotation 1: mask_rle size [60, 80] does not match "
                 "the image b.png: expected [h, w] = [30, 20]"),
    ("bad-json", "InputError: predictions file"),
    ("missing-image", "InputError: annotation 1: image not found"),
])
def test_score_errors_are_one_line(dataset, monkeypatch, capsys, edit, message):
    pred_path = dataset / "pred.json"
    preds = json.loads(pred_path.read_text())["predictions"]
    ann_path = dataset / "ann.json"
    if edit == "missing-ann":
        ann_path = dataset / "nope.json"
    elif edit == "dup":
        preds.append({"index": 0})
    elif edit == "range":
        preds[0]["index"] = 7
    elif edit == "rle-size":
        preds[0]["mask_rle"] = encode_mask(np.zeros((60, 80), bool))
    elif edit == "missing-image":
        (dataset / "b.png").unlink()
    pred_path.write_text("{oops" if edit == "bad-json" else json.dumps({"predictions": preds}))
    code, out, err = _run(monkeypatch, capsys, "score", ann_path, pred_path, "--images", dataset,
                          "--json")
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_score_requires_images_option(dataset, monkeypatch, capsys):
    code, _, err = _run(monkeypatch, capsys, "score", dataset / "ann.json", dataset / "pred.json")
    assert code == 2 and "--images" in err
