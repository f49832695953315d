"""SAM: export to ONNX with parity, and the torch-free runtime predictor.

Fixtures are tiny random segment-anything models (same classes as `sam_model_registry`)
exported once per module; the reference is segment-anything's own `SamPredictor`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("segment_anything") is None:  # needs the shim: no importorskip
    pytest.skip("segment-anything (export extra) is not installed", allow_module_level=True)

from finers_rt.errors import ArtifactError, ExportParityError, InputError  # noqa: E402
from finers_rt.export import sam as sam_export  # noqa: E402
from finers_rt.export.sam_configs import (SAM_PRESETS, SamConfig, load_sam,  # noqa: E402
                                          make_random_sam_checkpoint, resolve_sam_config)
from finers_rt.export.torchvision_shim import (batched_nms, import_segment_anything,  # noqa: E402
                                               resize, to_pil_image)
from finers_rt.manifest import SamManifest, file_sha256  # noqa: E402
from finers_rt.sam import SamPredictorRT, resized_hw  # noqa: E402

TINY = {"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2,
        "encoder_global_attn_indexes": [1], "prompt_embed_dim": 64, "decoder_num_heads": 2,
        "decoder_mlp_dim": 128, "iou_head_hidden_dim": 64, "mask_in_chans": 8}
VALIDATION_SIZES_HW = ((300, 700), (512, 512), (900, 1200))


def _export_tiny(tmp_path_factory, image_size: int, name: str):
    root = tmp_path_factory.mktemp(name)
    config_path = root / "sam_tiny.json"
    config_path.write_text(json.dumps({**TINY, "image_size": image_size}))
    config = resolve_sam_config("vit_b", config_path)
    checkpoint = make_random_sam_checkpoint(root / "sam_tiny.pth", config, seed=image_size)
    manifest = sam_export.export_sam(checkpoint, root / "sam", "vit_b", config_path)
    return {"root": root, "dir": root / "sam", "config": config, "config_path": config_path,
            "checkpoint": checkpoint, "manifest": manifest, "torch": load_sam(checkpoint, config)}


@pytest.fixture(scope="module")
def tiny512(tmp_path_factory):
    return _export_tiny(tmp_path_factory, 512, "sam512")


@pytest.fixture(scope="module")
def runtime512(tiny512):
    return SamPredictorRT.load(tiny512["dir"])


@pytest.fixture(scope="module")
def reference512(tiny512):
    return import_segment_anything().SamPredictor(tiny512["torch"])


def _reference(predictor, image, box_xyxy, points_xy, labels=None, multimask=True):
    with torch.no_grad():
        predictor.set_image(image)
        return predictor.predict(
            point_coords=None if points_xy is None else np.asarray(points_xy),
            point_labels=None if points_xy is None else np.asarray(labels or [1] * len(points_xy)),
            box=None if box_xyxy is None else np.asarray(box_xyxy), multimask_output=multimask)


def _assert_same(ours, ref, mask_fraction=1e-3):
    masks, scores, low_res = ours
    ref_masks, ref_scores, ref_low_res = ref
    assert masks.dtype == bool and masks.shape == ref_masks.shape
    assert scores.shape == ref_scores.shape and low_res.shape == ref_low_res.shape
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    np.testing.assert_allclose(low_res, ref_low_res, atol=1e-3)
    assert (masks != ref_masks).mean() <= mask_fraction
    assert 0 < ref_masks.mean() < 1  # a mask with both classes: the comparison means something


# ---- export -------------------------------------------------------------------------------------


def test_export_writes_validated_folder(tiny512):
    folder, manifest = tiny512["dir"], tiny512["manifest"]
    assert sorted(p.name for p in folder.iterdir()) == ["image_encoder.onnx", "manifest.json",
                                                         "mask_decoder.onnx"]
    loaded = SamManifest.load(folder)
    assert loaded == manifest
    assert loaded.image_size == 512 and tuple(loaded.embedding_hw) == (32, 32)
    assert tuple(loaded.mask_input_hw) == (128, 128) and loaded.embedding_dim == 64
    assert loaded.num_multimask_outputs == 3 and loaded.config["encoder_embed_dim"] == 64
    for spec in loaded.graphs.values():
        assert spec.sha256 == file_sha256(folder / spec.file)
    assert loaded.graphs["mask_decoder"].output("masks").shape == (1, 4, "orig_h", "orig_w")
    assert loaded.source["sha256"] == file_sha256(tiny512["checkpoint"])
    v = loaded.validation
    assert v["passed"] and v["image_sizes_hw"] == [list(s) for s in VALIDATION_SIZES_HW]
    assert v["score_max_abs_err"] < 1e-3 and v["mask_max_diff_fraction"] < 1e-3


def test_export_refuses_non_empty_out_dir_unless_forced(tiny512):
    with pytest.raises(InputError, match="not empty; pass --force"):
        sam_export.export_sam(tiny512["checkpoint"], tiny512["dir"], "vit_b",
                              tiny512["config_path"])
    out = tiny512["root"] / "forced"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    sam_export.export_sam(tiny512["checkpoint"], out, "vit_b", tiny512["config_path"],
                          force=True, validation_sizes_hw=((64, 96),))
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()


def test_frozen_crop_decoder_is_caught_and_nothing_written(tiny512, monkeypatch):
    """The library's SamOnnxModel crops with int() at trace time; validation must refuse it."""
    import_segment_anything()
    from segment_anything.utils.onnx import SamOnnxModel

    def export_library_decoder(sam, path, opset=sam_export.OPSET):
        model = SamOnnxModel(sam, return_single_mask=False)
        from finers_rt.export import sam_graphs

        args = sam_graphs.example_decoder_inputs(sam, orig_hw=(480, 640))
        sam_graphs._onnx_export(model, args, path, sam_graphs.DECODER_INPUTS,
                                sam_graphs.DECODER_OUTPUTS,
                                {"point_coords": {1: "n"}, "point_labels": {1: "n"},
                                 "masks": {2: "h", 3: "w"}}, opset)

    monkeypatch.setattr(sam_export, "export_decoder", export_library_decoder)
    out = tiny512["root"] / "frozen"
    with pytest.raises(ExportParityError) as info:
        sam_export.export_sam(tiny512["checkpoint"], out, "vit_b", tiny512["config_path"])
    assert info.value.graph == "mask_decoder" and info.value.output == "masks"
    assert info.value.error > info.value.tolerance
    assert not out.exists()
    assert not [p for p in tiny512["root"].iterdir() if ".export-" in p.name]


def test_checkpoint_and_config_errors(tiny512, tmp_path):
    with pytest.raises(ArtifactError, match="does not fit the config"):
        sam_export.export_sam(tiny512["checkpoint"], tmp_path / "o", "vit_b")
    with pytest.raises(ArtifactError, match="not found"):
        sam_export.export_sam(tmp_path / "missing.pth", tmp_path / "o", "vit_b")
    with pytest.raises(InputError, match="did you mean 'vit_b'"):
        resolve_sam_config("vit_bb")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"encoder_embd_dim": 64}))
    with pytest.raises(InputError, match="did you mean 'encoder_embed_dim'"):
        resolve_sam_config("vit_b", bad)
    with pytest.raises(InputError, match="outside 0..1"):
        SamConfig(encoder_depth=2, encoder_global_attn_indexes=(5,))
    assert SAM_PRESETS["vit_h"].encoder_embed_dim == 1280


def test_cli_export_sam(tiny512, tmp_path, monkeypatch, capsys):
    from finers_rt import cli

    out = tmp_path / "cli_sam"
    monkeypatch.setattr(sys, "argv", ["finers-rt", "export", "sam", str(tiny512["checkpoint"]),
                                      str(out), "--config", str(tiny512["config_path"])])
    cli.main()
    assert "mask pixels differing" in capsys.readouterr().out
    assert SamManifest.load(out).image_size == 512
    monkeypatch.setattr(sys, "argv", ["finers-rt", "export", "sam", str(tiny512["checkpoint"]),
                                      str(tmp_path / "other"), "--model-type", "vit_x"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    assert "InputError: unknown SAM model type 'vit_x'" in capsys.readouterr().err


# ---- runtime vs SamPredictor ----------------------------------------------------------------------


@pytest.mark.parametrize("size_hw", [(300, 700), (512, 512), (900, 1200), (1000, 37), (511, 513)])
def test_runtime_matches_sam_predictor(runtime512, reference512, size_hw):
    h, w = size_hw
    rng = np.random.default_rng(h * 7 + w)
    image = sam_export.random_test_image(rng, h, w)
    box_xyxy, points_xy = sam_export.random_prompt(rng, h, w)
    runtime512.set_image(image)
    ours = runtime512.predict(box_xyxy, points_xy, (1, 1), multimask_output=True)
    ref = _reference(reference512, image, box_xyxy, points_xy)
    _assert_same(ours, ref)
    assert ours[0].shape == (3, h, w)
    mask, score = runtime512.predict_best(box_xyxy, points_xy)
    best = int(np.argmax(ref[1]))
    assert score == pytest.approx(float(ref[1][best]), abs=1e-4)
    assert (mask != ref[0][best]).mean() <= 1e-3


@pytest.mark.parametrize("prompt", ["box_only", "points_only", "bg_point", "single_mask"])
def test_runtime_prompt_variants(runtime512, reference512, prompt):
    h, w = 240, 320
    image = sam_export.random_test_image(np.random.default_rng(5), h, w)
    box, points, labels, multi = [40, 30, 200, 180], [[100, 90], [150, 120]], [1, 1], True
    if prompt == "box_only":
        points = labels = None
    elif prompt == "points_only":
        box = None
    elif prompt == "bg_point":
        labels = [1, 0]
    else:
        multi = False
    runtime512.set_image(image)
    ours = runtime512.predict(box, points, labels, multimask_output=multi)
    _assert_same(ours, _reference(reference512, image, box, points, labels, multi))
    assert ours[1].shape == ((3,) if multi else (1,))


def test_runtime_mask_input_refinement_matches(runtime512, reference512):
    image = sam_export.random_test_image(np.random.default_rng(8), 200, 260)
    box, points = [30, 20, 180, 150], [[90, 70], [120, 100]]
    runtime512.set_image(image)
    _, scores, low_res = runtime512.predict(box, points)
    previous = low_res[int(np.argmax(scores))][None]  # [1, 4E, 4E]
    ours = runtime512.predict(box, points, mask_input=previous)
    with torch.no_grad():
        reference512.set_image(image)
        ref = reference512.predict(point_coords=np.asarray(points), point_labels=np.array([1, 1]),
                                   box=np.asarray(box), mask_input=previous)
    _assert_same(ours, ref)


def test_tiny_sam_at_1024_exports_and_matches(tmp_path_factory):
    tiny = _export_tiny(tmp_path_factory, 1024, "sam1024")
    runtime = SamPredictorRT.load(tiny["dir"])
    reference = import_segment_anything().SamPredictor(tiny["torch"])
    rng = np.random.default_rng(3)
    image = sam_export.random_test_image(rng, 450, 800)
    box_xyxy, points_xy = sam_export.random_prompt(rng, 450, 800)
    runtime.set_image(image)
    _assert_same(runtime.predict(box_xyxy, points_xy), _reference(reference, image, box_xyxy,
                                                                  points_xy))
    assert tuple(tiny["manifest"].embedding_hw) == (64, 64)


def test_embedding_cache_is_keyed_by_content_and_bounded(tiny512):
    runtime = SamPredictorRT.load(tiny512["dir"], cache_size=2)
    rng = np.random.default_rng(0)
    a, b, c = (sam_export.random_test_image(rng, 64, 80) for _ in range(3))
    runtime.set_image(a)
    first = runtime.predict([10, 10, 50, 40])
    runtime.set_image(a.copy())  # same content, another array
    assert (runtime.stats.hits, runtime.stats.misses) == (1, 1)
    np.testing.assert_array_equal(runtime.predict([10, 10, 50, 40])[2], first[2])
    runtime.set_image(a[:32])  # a different crop of the same image is another key
    runtime.set_image(b)
    runtime.set_image(c)  # evicts the least recently used
    assert runtime.stats.misses == 4 and runtime.stats.size == 2
    runtime.set_image(a)
    assert runtime.stats.misses == 5
    runtime.set_image(c)
    assert runtime.stats.hits == 2


@pytest.mark.parametrize("image, message", [
    (np.zeros((20, 30), np.uint8), r"HxWx3 uint8 \(RGB\), got \(20, 30\) uint8"),
    (np.zeros((20, 30, 3), np.float32), r"got \(20, 30, 3\) float32"),
    (np.zeros((20, 30, 4), np.uint8), r"got \(20, 30, 4\) uint8"),
    (np.zeros((0, 30, 3), np.uint8), r"got \(0, 30, 3\)"),
    ([[1, 2, 3]], "numpy array, got list"),
])
def test_bad_images_are_input_errors(runtime512, image, message):
    with pytest.raises(InputError, match=message):
        runtime512.set_image(image)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs a box_xyxy, points_xy, or both"),
    ({"box_xyxy": [0, 0, 10]}, r"4 numbers \[x1, y1, x2, y2\], got shape \(3,\)"),
    ({"box_xyxy": [0, 0, float("nan"), 5]}, "box_xyxy must be finite"),
    ({"box_xyxy": [30, 0, 10, 5]}, "x1 <= x2 and y1 <= y2"),
    ({"box_xyxy": [0, 0, 10, 41]}, r"inside the image \(0..60 x 0..40 px\)"),
    ({"box_xyxy": [-1, 0, 10, 5]}, "inside the image"),
    ({"box_xyxy": ["a", 0, 1, 1]}, "box_xyxy must be numbers"),
    ({"points_xy": [1, 2]}, r"\[N, 2\] xy with N >= 1, got shape \(2,\)"),
    ({"points_xy": [[1, 2], [61, 3]]}, "points_xy must lie inside the image"),
    ({"points_xy": [[1, 2]], "point_labels": [2]}, r"values in \{0 \(background\)"),
    ({"points_xy": [[1, 2]], "point_labels": [1, 1]}, "must be 1 values"),
    ({"box_xyxy": [0, 0, 10, 5], "point_labels": [1]}, "point_labels given without points_xy"),
    ({"box_xyxy": [0, 0, 10, 5], "mask_input": np.zeros((1, 64, 64))}, r"\[1, 128, 128\]"),
])
def test_bad_prompts_are_input_errors(runtime512, kwargs, message):
    runtime512.set_image(np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(InputError, match=message):
        runtime512.predict(**kwargs)


def test_predict_before_set_image(tiny512):
    runtime = SamPredictorRT.load(tiny512["dir"])
    with pytest.raises(InputError, match="call set_image"):
        runtime.predict([0, 0, 5, 5])


def test_load_checks_graphs_against_manifest(tiny512, tmp_path):
    import shutil

    from finers_rt.errors import EngineProfileError, ManifestError

    folder = tmp_path / "swapped"
    shutil.copytree(tiny512["dir"], folder)
    shutil.copy(folder / "mask_decoder.onnx", folder / "image_encoder.onnx")
    with pytest.raises(EngineProfileError, match="image_encoder.onnx"):
        SamPredictorRT.load(folder)
    with pytest.raises(ManifestError):
        SamPredictorRT.load(tmp_path / "nowhere")


def test_runtime_does_not_import_torch(tiny512):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from finers_rt.sam import SamPredictorRT
        rt = SamPredictorRT.load({str(tiny512['dir'])!r})
        rt.set_image(np.full((50, 70, 3), 128, np.uint8))
        mask, score = rt.predict_best([5, 5, 40, 30], [[10, 10], [20, 20]])
        assert mask.shape == (50, 70)
        bad = [m for m in ("torch", "segment_anything", "transformers", "torchvision")
               if m in sys.modules]
        assert not bad, bad
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---- torchvision shim ---------------------------------------------------------------------------


def test_shim_resize_is_pil_bilinear_and_leaves_no_trace():
    from PIL import Image

    image = np.random.default_rng(1).integers(0, 256, (37, 91, 3), dtype=np.uint8)
    out = np.array(resize(to_pil_image(image), (100, 246)))
    expected = np.array(Image.fromarray(image).resize((246, 100), Image.BILINEAR))
    np.testing.assert_array_equal(out, expected)
    assert resize(to_pil_image(image), 20).size == (49, 20)  # int: shorter side, torchvision rule
    with pytest.raises(TypeError):
        to_pil_image(image.astype(np.float32))
    import_segment_anything()
    assert "torchvision" not in sys.modules
    sa_transforms = sys.modules["segment_anything.utils.transforms"]
    np.testing.assert_array_equal(sa_transforms.ResizeLongestSide(91).apply_image(image),
                                  np.array(Image.fromarray(image).resize((91, 37))))
    assert resized_hw((37, 91), 512) == sa_transforms.ResizeLongestSide.get_preprocess_shape(37, 91, 512)


def test_shim_batched_nms_keeps_best_per_class():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]],
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep = batched_nms(boxes, scores, torch.tensor([0, 0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 2, 3]


# ---- the official vit_b size ----------------------------------------------------------------------


@pytest.mark.slow
def test_random_vit_b_exports_and_validates(tmp_path):
    checkpoint = make_random_sam_checkpoint(tmp_path / "vit_b.pth", SAM_PRESETS["vit_b"], seed=0)
    manifest = sam_export.export_sam(checkpoint, tmp_path / "sam_vit_b", "vit_b")
    assert manifest.validation["passed"] and manifest.image_size == 1024
    assert tuple(manifest.embedding_hw) == (64, 64) and manifest.embedding_dim == 256


@pytest.mark.parametrize("size_hw", [(300, 700), (512, 512), (1000, 37)])
def test_encoder_input_is_bit_identical_to_sam_preprocess(tiny512, size_hw):
    """The runtime's resize + normalise + pad equals SamPredictor.set_image's encoder input."""
    from finers_rt.sam import preprocess_image

    segment_anything = import_segment_anything()
    sam = tiny512["torch"]
    image = sam_export.random_test_image(np.random.default_rng(size_hw[0]), *size_hw)
    transform = segment_anything.utils.transforms.ResizeLongestSide(sam.image_encoder.img_size)
    resized = torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1)[None]
    with torch.no_grad():
        reference = sam.preprocess(resized).numpy()
    ours = preprocess_image(image, sam.image_encoder.img_size, sam.pixel_mean.flatten().tolist(),
                            sam.pixel_std.flatten().tolist())
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert np.array_equal(ours, reference)
