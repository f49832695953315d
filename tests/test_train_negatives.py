"""Negative LPR crops (no target): cache rows, answers, sampling and a training run on them."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from finers_rt.errors import InputError  # noqa: E402
from finers_rt.parsing import parse_output, says_not_found  # noqa: E402
from finers_rt.train.data import NOT_FOUND_THINK, StageSizes, polygon_box_xyxy  # noqa: E402

SIZES = StageSizes(gse_size_wh=(112, 84), lpr_size_wh=(56, 56), scene_size_wh=(640, 360),
                   crop_min_side=128)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from finers_rt.train.data import SampleCache, build_cache

    root = tmp_path_factory.mktemp("neg")
    plain = build_cache(root / "plain", seed=3, n_scenes=3, sizes=SIZES, lpr_crops=1,
                        extra_questions=3)
    with_neg = build_cache(root / "neg", seed=3, n_scenes=3, sizes=SIZES, lpr_crops=1,
                           extra_questions=3, negative_crops=2)
    return SampleCache(plain), SampleCache(with_neg)


def _touches(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_negative_crops_never_touch_the_target_and_keep_the_positive_rows(caches):
    plain, neg = caches
    assert plain.negative_images is None and plain.negative_count(0) == 0
    assert len(plain) == len(neg) > 3
    # the positives are the same rows with or without negatives (separate random stream)
    np.testing.assert_array_equal(np.asarray(plain.lpr_images), np.asarray(neg.lpr_images))
    total = 0
    for i, entry in enumerate(neg.entries):
        target = polygon_box_xyxy(entry["record"]["points"])
        assert 1 <= neg.negative_count(i) <= 2
        for k in range(neg.negative_count(i)):
            image, meta, _ = neg.negative(i, k)
            total += 1
            assert image.shape == (56, 56, 3) and image.dtype == np.uint8
            assert not _touches(meta["crop_original"], target), (i, k, meta)
            x1, y1, x2, y2 = meta["answer_box_stage"]
            assert 0 <= x1 < x2 <= 56 and 0 <= y1 < y2 <= 56
            if not meta["decoy"]:  # no whole object in the crop: the whole crop
                assert meta["answer_box_stage"] == [0.0, 0.0, 56.0, 56.0]
    assert total == neg.negative_images.shape[0]


def test_decoy_is_the_most_target_like_whole_object():
    from finers_rt.synth.objects import SceneObject
    from finers_rt.train.negatives import decoy_in_crop, shared_fields

    def obj(color, shape, pattern, box, area):
        return SceneObject(color, shape, pattern, np.zeros((3, 2), np.int32), box,
                           ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), area, 0.0)

    objs = [obj("red", "star", "solid", (500, 500, 520, 520), 300),   # the target
            obj("red", "circle", "solid", (10, 10, 30, 30), 200),     # 2 shared fields
            obj("blue", "circle", "solid", (40, 40, 90, 90), 2000),   # 1 shared, larger
            obj("red", "star", "solid", (120, 120, 140, 140), 300)]   # 3 shared, cut by the crop
    assert shared_fields(objs[0], objs[1]) == 2
    assert decoy_in_crop((0, 0, 128, 128), objs, 0) == 1
    assert decoy_in_crop((0, 0, 30, 30), objs, 0) is None  # box is inclusive: 30 + 1 > 30


def test_negative_answers_say_not_found_and_sampling_draws_them(caches):
    from finers_rt.train.sft import SftConfig, draw_crops, negative_example, stage_example

    _, neg = caches
    image, text, target, pointer = negative_example(neg, 0, 0)
    parsed = parse_output(target)
    assert says_not_found(parsed.response) and parsed.bbox_xyxy is not None
    assert target.startswith(NOT_FOUND_THINK)  # decided at the first answer word
    assert text == stage_example(neg, "lpr", 0)[1]  # the same prompt as the positive crop
    assert not says_not_found(parse_output(stage_example(neg, "lpr", 0)[2]).response)
    assert 0 <= pointer[0] <= 56 and 0 <= pointer[1] <= 56
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(neg), size=400)
    plain_cfg = SftConfig(stage="lpr", cache_dir="c", out_dir="o")
    assert min(draw_crops(neg, plain_cfg, picks, rng)) == 0
    cfg = SftConfig(stage="lpr", cache_dir="c", out_dir="o", negative_fraction=0.5)
    crops = draw_crops(neg, cfg, picks, rng)
    share = np.mean([k < 0 for k in crops])
    assert 0.4 < share < 0.6 and min(crops) >= -2


def test_negative_fraction_configs_are_typed_errors(caches, tmp_path):
    from finers_rt.train.sft import SftConfig, train_sft

    plain, _ = caches
    with pytest.raises(InputError, match="--negative-crops"):
        train_sft(SftConfig(stage="lpr", cache_dir=str(plain.folder), out_dir=str(tmp_path / "o"),
                            init="test", negative_fraction=0.5), log=lambda m: None)

    with pytest.raises(InputError, match="stage lpr only"):
        SftConfig(stage="gse", cache_dir="c", out_dir="o", negative_fraction=0.3)
    with pytest.raises(InputError, match=r"in \[0, 1\)"):
        SftConfig(stage="lpr", cache_dir="c", out_dir="o", negative_fraction=1.0)


def test_lpr_run_with_negatives_trains_and_evaluates(caches, tmp_path):
    """Frozen vision: negative crops get memo keys of their own (after the positive rows)."""
    from finers_rt.train.sft import SftConfig, image_key, train_sft

    _, neg = caches
    keys = {image_key(neg, "lpr", i, -k - 1) for i in range(len(neg))
            for k in range(neg.negative_count(i))}
    assert min(keys) >= neg.lpr_images.shape[0] and len(keys) == neg.negative_images.shape[0]
    cfg = SftConfig(stage="lpr", cache_dir=str(neg.folder), out_dir=str(tmp_path / "run"),
                    init="test", steps=3, batch_size=4, lr=3e-3, warmup=1, save_every=3,
                    log_every=1, seed=1, negative_fraction=0.5, freeze_vision=True,
                    eval_every=3, eval_cache=str(neg.folder), eval_samples=2)
    logs = []
    result = train_sft(cfg, log=logs.append)
    assert result["step"] == 3
    evals = [m for m in logs if "eval at step 3" in m]
    assert evals and "not_found_on_negative" in evals[0] and "found_on_target" in evals[0]


def test_one_rendering_gives_the_scene_and_its_objects():
    """`generate_scene_objects` = `generate_scene` + `scene_objects`, and each question's
    target is found among the objects by its polygon box."""
    from finers_rt.synth import generate_scene, generate_scene_objects, scene_objects
    from finers_rt.train.negatives import target_object

    image, records, objs = generate_scene_objects(3, 1, (640, 360), 3)
    image_b, records_b = generate_scene(3, 1, (640, 360), 3)
    np.testing.assert_array_equal(image, image_b)
    assert records == records_b
    assert [o.box_xyxy for o in objs] == [o.box_xyxy for o in scene_objects(3, 1, (640, 360))]
    for record in records:
        target = objs[target_object(record, objs, (640, 360))]
        assert target.points_xy.tolist() == record["points"]
