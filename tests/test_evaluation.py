"""`finers-rt eval` writes predictions that `finers-rt score` scores to the same numbers."""

import json

import pytest
from typer.testing import CliRunner

from finers_rt.cli import app


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from finers_rt.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(out, n=2, seed=3, size_wh=(640, 360), workers=1)
    return out


def test_eval_then_score_agree(tiny_bundle, dataset, tmp_path):
    preds = tmp_path / "preds.json"
    run = CliRunner().invoke(app, ["eval", str(dataset), "--model", str(tiny_bundle), "--out",
                                   str(preds), "--json", "--limit", "3", "--max-extra-crops", "0"])
    assert run.exit_code == 0, run.output
    metrics = json.loads(run.output.strip().splitlines()[-1])
    assert metrics["n_predictions"] == 3
    records = json.loads(preds.read_text())["predictions"]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(set(r["mask_rle"]) == {"size", "counts"} for r in records)
    scored = CliRunner().invoke(app, ["score", str(dataset / "annotations.json"), str(preds),
                                      "--images", str(dataset / "images"), "--json"])
    assert scored.exit_code == 0, scored.output
    again = json.loads(scored.output.strip().splitlines()[-1])
    # eval scored only the first 3; score counts the rest as missing (empty mask, wrong answer).
    n_all = again["n_annotations"]
    assert again["seg"]["all"]["n"] == n_all >= 3
    assert metrics["seg"]["all"]["n"] == 3


def test_eval_refuses_to_overwrite_and_bad_folder(tiny_bundle, dataset, tmp_path):
    preds = tmp_path / "p.json"
    preds.write_text("keep me")
    run = CliRunner().invoke(app, ["eval", str(dataset), "--model", str(tiny_bundle),
                                   "--out", str(preds)])
    assert run.exit_code != 0 and "refusing to overwrite" in str(run.exception)
    assert preds.read_text() == "keep me"
    run = CliRunner().invoke(app, ["eval", str(tmp_path), "--model", str(tiny_bundle)])
    assert "no annotations.json" in str(run.exception)


def test_eval_reports_paths_and_the_gse_crop_recall_apart(dataset):
    """`region` scores the crop the answer came from, `region_gse` GSE's own crop."""
    from types import SimpleNamespace

    import numpy as np

    from finers_rt.evaluation import evaluate_folder

    class TilePipe:
        def run(self, image, question, question_type="referring", options=None):
            h, w = image.shape[:2]
            return SimpleNamespace(
                mask=np.zeros((h, w), bool), answer="x", bbox_xyxy=None,
                region_xyxy=(0, 0, w - 1, h - 1), gse_region_xyxy=(0, 0, 2, 2),
                attempts=[{"crop_xyxy": [0, 0, 2, 2]}, {"crop_xyxy": [0, 0, w - 1, h - 1]}],
                path="gse+tiles", timings_ms={"total_ms": 5.0})

    metrics = evaluate_folder(TilePipe(), dataset, progress=False)
    n = metrics["n_predictions"]
    assert metrics["paths"] == {"gse+tiles": n}
    assert metrics["region"]["hits"] == n and metrics["region_gse"]["hits"] == 0
    assert metrics["region_gse"]["recall_all"] == 0.0
    assert metrics["timings_ms"] == {"total_p50": 5.0, "total_p90": 5.0}


def test_eval_of_a_folder_without_annotations_prints_its_tables(tiny_bundle, tmp_path):
    """No question, no time: the summary line says so instead of failing on a missing p50."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations.json").write_text('{"annotations": []}')
    run = CliRunner().invoke(app, ["eval", str(tmp_path), "--model", str(tiny_bundle)])
    assert run.exit_code == 0, run.output
    assert "on 0/0" in run.output and "p50 -, p90 -" in run.output
