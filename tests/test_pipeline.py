"""The pipeline flow on scripted stages (exact coordinates), and end to end on a tiny bundle."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from finers_rt.config import PipelineConfig
from finers_rt.errors import InputError, ManifestError
from finers_rt.manifest import BundleManifest
from finers_rt.pipeline import Pipeline

GSE_OK = "<think>left</think><answer>{'bbox': [100,50,356,306], 'response': 'The object is found.'}</answer>"
LPR_OK = ("<think>x</think><answer>{'bbox': [10,100,200,210], 'points_1': [30,110], "
          "'points_2': [35,180], 'response': 'red'}</answer>")


@dataclass
class Gen:
    text: str
    timings_ms: dict = field(default_factory=lambda: {"vision_ms": 1.0, "decode_ms": 2.0, "tokens": 3})


class ScriptedStage:
    """A VLM stage that answers from a script: a list of texts consumed in order."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.calls = []

    def generate(self, image, text, max_new_tokens=None, stop_at=None):
        self.calls.append({"shape": image.shape, "text": text, "stop_at": stop_at})
        return Gen(self.texts.pop(0) if len(self.texts) > 1 else self.texts[0])


class BoxSam:
    """A SAM stand-in whose mask is the prompt box, so pasting can be checked exactly."""

    class stats:  # mimics SamPredictorRT.stats
        hits = misses = size = capacity = 0

    def __init__(self):
        self.calls = []

    def set_image(self, image):
        self.image_hw = image.shape[:2]

    def predict_best(self, box_xyxy, points_xy, point_labels):
        self.calls.append((tuple(box_xyxy), points_xy, point_labels))
        mask = np.zeros(self.image_hw, bool)
        x1, y1, x2, y2 = box_xyxy
        mask[y1:y2, x1:x2] = True
        return mask, 0.9


def make_pipe(gse_texts, lpr_texts, max_extra_crops=4):
    cfg = PipelineConfig()
    manifest = BundleManifest.from_dict({
        "format": "finers-rt.bundle", "format_version": 1, "finers_rt_version": "0.1.0",
        "name": "scripted", "stages": {"gse": "gse", "lpr": "lpr", "sam": "sam"},
        "pipeline": cfg.to_dict()})
    return Pipeline(manifest, cfg, ScriptedStage(gse_texts), ScriptedStage(lpr_texts), BoxSam(),
                    max_extra_crops=max_extra_crops)


IMAGE_4K = np.zeros((2160, 3840, 3), np.uint8)


def test_reference_path_coordinates():
    pipe = make_pipe([GSE_OK], [LPR_OK])
    result = pipe.run(IMAGE_4K, "the red pen", "reasoning")
    # GSE frame 1920x1080 -> x2: region (200,100,712,612); dynamic box: 512 square, same place.
    assert result.gse_region_xyxy == (200, 100, 712, 612)
    assert result.region_xyxy == (200, 100, 712, 612)
    assert pipe.lpr.calls[0]["shape"] == (512, 512, 3)
    assert pipe.lpr.calls[0]["stop_at"] == "</answer>"
    # LPR frame 512 == crop 512: box (10,100,200,210) in the crop -> +origin.
    assert result.bbox_xyxy == (210, 200, 400, 310)
    assert result.points_xy == ((230, 210), (235, 280))
    assert pipe.sam.calls[0] == ((10, 100, 200, 210), [(30, 110), (35, 180)], (1, 1))
    ys, xs = np.nonzero(result.mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (210, 200, 400, 310)
    assert result.answer == "red" and result.found and result.path == "gse"
    assert result.mask_area == 190 * 110
    assert "Please find 'the red pen' with bbox and points. And give me a final response" in \
        pipe.lpr.calls[0]["text"]
    assert pipe.gse.calls[0]["text"].startswith("Based on the 'the red pen', identify")


def test_lpr_scaling_on_a_clamped_crop():
    pipe = make_pipe(["{'bbox': [1800,1000,1920,1080], 'response': 'x'}"], [LPR_OK])
    result = pipe.run(IMAGE_4K, "pen")
    x1, y1, x2, y2 = result.region_xyxy
    assert (x2, y2) == (3839, 2159)  # clamped to W-1, H-1 like the reference
    crop_w, crop_h = x2 - x1, y2 - y1
    want = (round(10 * crop_w / 512) + x1, round(100 * crop_h / 512) + y1)
    assert result.bbox_xyxy[:2] == want


def test_no_gse_region_reference_behaviour_is_an_empty_mask():
    pipe = make_pipe(["I could not find it"], [LPR_OK], max_extra_crops=0)
    result = pipe.run(IMAGE_4K, "pen")
    assert result.path == "none" and not result.found and result.mask_area == 0
    assert result.region_xyxy is None and result.answer == "" and pipe.lpr.calls == []


def test_no_gse_region_falls_back_to_tiles():
    pipe = make_pipe(["garbage"], [LPR_OK], max_extra_crops=2)
    result = pipe.run(IMAGE_4K, "pen")
    assert result.path == "tiles" and result.found
    x1, y1, x2, y2 = result.region_xyxy
    assert x1 <= 1920 <= x2 and y1 <= 1080 <= y2  # centre-out without a region
    assert result.bbox_xyxy == (x1 + 10, y1 + 100, x1 + 200, y1 + 210)


def test_lpr_not_found_tries_next_crop_and_reports_attempts():
    not_found = "{'bbox': [0,0,10,10], 'points_1': [1,1], 'points_2': [2,2], 'response': 'The object is not found.'}"
    pipe = make_pipe([GSE_OK], [not_found, "{'bbox': [600, 600, 700, 700]}", LPR_OK], max_extra_crops=3)
    result = pipe.run(IMAGE_4K, "pen")
    assert [a["reason"] for a in result.attempts] == [
        "LPR says the object is not there", "bbox outside the crop", "ok"]
    assert result.path == "gse+tiles" and result.found and len(result.raw["lpr"]) == 3


def test_answer_falls_back_to_gse_response():
    pipe = make_pipe(["{'bbox': [100,50,356,306], 'response': 'blue'}"],
                     ["{'bbox': [1,2,3,4], 'points_1': [1,2], 'points_2': [2,3]}"])
    assert pipe.run(IMAGE_4K, "pen").answer == "blue"


NOT_FOUND = ("{'bbox': [0,0,10,10], 'points_1': [1,1], 'points_2': [2,2], "
             "'response': 'The object is not found.'}")


@pytest.mark.parametrize("question_type,want", [("reasoning", "blue"),
                                                ("referring", "The object is not found.")])
def test_not_found_answers_only_a_referring_question(question_type, want):
    """LPR said "not found" on every crop: a question takes GSE's answer instead, a
    referring instruction keeps "not found" (and no mask either way)."""
    pipe = make_pipe(["{'bbox': [100,50,356,306], 'response': 'blue'}"], [NOT_FOUND],
                     max_extra_crops=2)
    result = pipe.run(IMAGE_4K, "pen", question_type)
    assert result.answer == want and not result.found and result.mask_area == 0
    assert result.path == "none" and len(pipe.lpr.calls) == 3
    assert result.region_xyxy == (200, 100, 712, 612)  # the GSE crop stays the reported region


@pytest.mark.parametrize("image,question,kwargs,needle", [
    (np.zeros((10, 10, 3), np.uint8), "pen", {}, "10"),
    (np.zeros((100, 100), np.float32), "pen", {}, "uint8"),
    (IMAGE_4K, "", {}, "empty"),
    (IMAGE_4K, "pen", {"question_type": "option"}, "needs the options"),
    ("/nonexistent/x.jpg", "pen", {}, "not found"),
])
def test_bad_input(image, question, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        make_pipe([GSE_OK], [LPR_OK]).run(image, question, **kwargs)


def test_result_json_fields():
    out = make_pipe([GSE_OK], [LPR_OK]).run(IMAGE_4K, "pen").to_json()
    for key in ("answer", "found", "bbox_xyxy", "points_xy", "region_xyxy", "mask_area",
                "timings_ms", "path", "raw"):
        assert key in out
    json.dumps(out)
    assert all(k.endswith("_ms") for k in out["timings_ms"])


# ---- end to end on a tiny exported bundle ----------------------------------------------------

def test_bundle_refuses_overwrite(tiny_bundle):
    from finers_rt.export.bundle import export_bundle

    with pytest.raises(InputError, match="not empty"):
        export_bundle("x", "y", "z", tiny_bundle)


def test_wrong_folder_is_a_clear_error(tiny_bundle):
    with pytest.raises(ManifestError, match="expected 'finers-rt.bundle'"):
        Pipeline.load(tiny_bundle / "gse")


def test_infer_cli_json_and_outputs(tiny_bundle, scene, tmp_path):
    from typer.testing import CliRunner

    from finers_rt.cli import app

    out = tmp_path / "out"
    args = ["infer", str(scene), "the red pen", "--model", str(tiny_bundle), "--json",
            "--out", str(out), "--max-new-tokens", "16", "--max-extra-crops", "1"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    data = json.loads(run.output.strip().splitlines()[-1])
    for key in ("answer", "found", "bbox_xyxy", "points_xy", "region_xyxy", "mask_area",
                "timings_ms", "files"):
        assert key in data
    assert Path(data["files"]["mask"]).is_file() and Path(data["files"]["overlay"]).is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "refusing to overwrite" in str(again.exception)


def test_second_question_skips_vision_and_image_prefill(tiny_bundle, scene):
    pipe = Pipeline.load(tiny_bundle, max_extra_crops=0)
    first = pipe.run(str(scene), "the red pen", max_new_tokens=8)
    second = pipe.run(str(scene), "the blue cup", max_new_tokens=8)
    assert first.timings_ms["gse_vision_ms"] > 0 and first.timings_ms["gse_prefix_prefill_ms"] > 0
    assert second.timings_ms.get("gse_vision_ms", 0.0) == 0.0
    assert second.timings_ms.get("gse_prefix_prefill_ms", 0.0) == 0.0
    assert pipe.cache_stats()["prefix"]["hits"] >= 1


def test_threads_give_the_same_results(tiny_bundle, scene):
    pipe = Pipeline.load(tiny_bundle, max_extra_crops=1)
    questions = ["the red pen", "the blue cup", "the green star", "the cross"]
    expected = {q: pipe.run(str(scene), q, max_new_tokens=8).raw for q in questions}
    got = {}

    def work(q):
        got[q] = pipe.run(str(scene), q, max_new_tokens=8).raw

    threads = [threading.Thread(target=work, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_same_file_is_decoded_once_and_again_when_it_changes(tmp_path, monkeypatch):
    import os

    from PIL import Image

    import finers_rt.pipeline as pipeline_module

    path = tmp_path / "frame.png"
    Image.fromarray(np.full((1100, 2000, 3), 40, np.uint8)).save(path)
    decoded = []
    real_open = pipeline_module.open_frame

    def counting_open(source):
        decoded.append(source)
        return real_open(source)

    monkeypatch.setattr(pipeline_module, "open_frame", counting_open)
    pipe = make_pipe([GSE_OK], [LPR_OK])
    first = pipe.run(str(path), "the red pen")
    second = pipe.run(path, "the blue cup")
    assert len(decoded) == 1 and np.array_equal(first.mask, second.mask)
    # the scripted stage reports 1 ms; the first call adds the stage resize, kept with the frame
    assert first.timings_ms["gse_vision_ms"] > 1.0 and second.timings_ms["gse_vision_ms"] == 1.0
    Image.fromarray(np.full((1100, 2000, 3), 90, np.uint8)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    pipe.run(str(path), "the red pen")
    assert len(decoded) == 2
    pipe.forget_frame()
    pipe.run(str(path), "the red pen")
    assert len(decoded) == 3
    assert pipe.gse.calls[0]["shape"] == (1080, 1920, 3)  # GSE gets the frame at its stage size


def test_a_wrapped_camera_frame_is_resized_once_and_bad_sources_are_input_errors():
    from finers_rt.frame import open_frame

    camera = np.full((1100, 2000, 3), 40, np.uint8)
    frame = open_frame(camera)
    pipe = make_pipe([GSE_OK], [LPR_OK])
    first = pipe.run(frame, "the red pen")
    second = pipe.run(frame, "the blue cup")
    assert first.timings_ms["gse_vision_ms"] > 1.0 and second.timings_ms["gse_vision_ms"] == 1.0
    assert np.array_equal(first.mask, pipe.run(camera, "the red pen").mask)
    with pytest.raises(InputError, match="file path, an HxWx3 uint8 array or a Frame"):
        pipe.run(12, "the red pen")
