"""Training module: rewards, retrospective regions, SFT / SAM / GRPO loops, resume, export.

Models are the `test` config (LM 2x64, vision 2x32) on a tiny cache of 640x360 scenes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from finers_rt.errors import InputError  # noqa: E402
from finers_rt.parsing import parse_output  # noqa: E402
from finers_rt.train import rewards  # noqa: E402
from finers_rt.train.data import StageSizes  # noqa: E402

SIZES = StageSizes(gse_size_wh=(112, 84), lpr_size_wh=(56, 56), scene_size_wh=(640, 360),
                   crop_min_side=128)
REF = {"Q-type": "referring", "Q": "the red star", "A": "The object is found."}
GOOD_LPR = ("<think>x</think><answer>{'bbox': [10,10,20,20], 'points_1': [12,12], "
            "'points_2': [15,15], 'response': 'The object is found.'}</answer>")


# ---- rewards -----------------------------------------------------------------------------------

def test_format_and_json_rewards():
    assert rewards.format_reward(GOOD_LPR) == 1.0
    assert rewards.format_reward("<answer>{}</answer>") == 0.0
    assert rewards.format_reward("<think>a</think><answer>b</answer> trailing") == 0.0
    assert rewards.json_reward(parse_output(GOOD_LPR), needs_points=True) == 1.0
    no_points = "<answer>{'bbox': [1,2,3,4]}</answer>"
    assert rewards.json_reward(parse_output(no_points), needs_points=True) == 0.0
    assert rewards.json_reward(parse_output(no_points), needs_points=False) == 1.0
    assert rewards.json_reward(parse_output("{'bbox': [1,2]}"), needs_points=False) == 0.0


def test_answer_reward_per_question_type():
    assert rewards.answer_reward("The object is found.", REF) == 1.0
    assert rewards.answer_reward("The object is not found.", REF) == 0.0
    option = {"Q-type": "option", "A": "B"}
    assert rewards.answer_reward("(B)", option) == 1.0
    assert rewards.answer_reward("A", option) == 0.0
    reasoning = {"Q-type": "reasoning", "A": "purple"}
    assert rewards.answer_reward("it is purpel", reasoning) == 1.0
    assert rewards.answer_reward("green", reasoning) == 0.0
    assert rewards.answer_reward(None, reasoning) == 0.0


def test_gse_reward_components():
    target, gt, side = (100, 100, 186, 186), (140, 140, 150, 150), (86, 86)
    text = "<think>t</think><answer>{'bbox': [100,100,186,186], 'response': 'The object is found.'}</answer>"
    r = rewards.gse_reward(text, REF, target, gt, side)
    assert r == pytest.approx({"format": 1, "json": 1, "answer": 1, "region_l1": 1, "region_iou": 1,
                               "inside": 1, "size": 1, "total": 7})
    off = "<answer>{'bbox': [0,0,43,43], 'response': 'no such object'}</answer>"
    r = rewards.gse_reward(off, REF, target, gt, side)
    assert r["format"] == 0 and r["answer"] == 0 and r["inside"] == 0 and r["region_iou"] == 0
    assert r["size"] == pytest.approx(0.5)
    assert r["region_l1"] == pytest.approx(0.0)
    assert rewards.gse_reward("nothing", REF, target, gt, side)["total"] == 0.0


def test_lpr_reward_components():
    mask = np.zeros((56, 56), bool)
    mask[10:20, 10:20] = True
    r = rewards.lpr_reward(GOOD_LPR, REF, (10, 10, 20, 20), mask)
    assert r["box_iou"] == pytest.approx(1.0) and r["box_l1"] == pytest.approx(1.0)
    assert r["points"] == 1.0 and r["total"] == pytest.approx(6.0)
    shifted = GOOD_LPR.replace("[10,10,20,20]", "[15,10,25,20]").replace("[15,15]", "[30,30]")
    r = rewards.lpr_reward(shifted, REF, (10, 10, 20, 20), mask, l1_scale=10)
    assert r["box_iou"] == pytest.approx(50 / 150) and r["box_l1"] == pytest.approx(0.75)
    assert r["points"] == 0.5


# ---- coordinate tokens ------------------------------------------------------------------------

def test_coordinate_values_round_trip_through_the_parser():
    from finers_rt.train.data import format_lpr_answer
    from finers_rt.train.model import quantize_coordinate

    assert quantize_coordinate(13.2) == 14 and quantize_coordinate(-5) == 0
    assert quantize_coordinate(5000) == 1920
    text = format_lpr_answer(REF, (10.4, 11.0, 20.9, 21.2), ((12.0, 13.0), (15.5, 16.5)))
    parsed = parse_output(text)
    assert parsed.bbox_xyxy == (10, 12, 20, 22)
    assert parsed.points_xy == ((12, 12), (16, 16))  # round half to even: 13 -> 12
    assert parsed.response == "The object is found."


def test_option_think_names_the_answer_before_the_letter_when_asked():
    from finers_rt.train.data import THINK_TEXT, format_lpr_answer, option_text

    opts = "(A) red (B) top-left (C) green (D) light blue"
    assert option_text(opts, "B") == "top-left" and option_text(opts, "d") == "light blue"
    assert option_text(opts, "E") is None and option_text("A. red B. blue", "A") is None
    assert option_text(None, "A") is None and option_text(opts, None) is None
    record = dict(REF, **{"Q-type": "option", "A": "D", "options": opts})
    assert format_lpr_answer(record, (10, 10, 20, 20), ((12, 12), (16, 16))).startswith(THINK_TEXT)
    text = format_lpr_answer(record, (10, 10, 20, 20), ((12, 12), (16, 16)), option_think=True)
    assert text.startswith("<think>The answer is light blue.</think><answer>")
    parsed = parse_output(text)
    assert parsed.response == "D" and parsed.think == "The answer is light blue."
    # a list the parser cannot read keeps the constant think text, and so do other types
    odd = dict(record, options="A. red B. blue")
    assert format_lpr_answer(odd, (10, 10, 20, 20), ((12, 12), (16, 16)), True).startswith(THINK_TEXT)
    assert format_lpr_answer(REF, (10, 10, 20, 20), ((12, 12), (16, 16)), True).startswith(THINK_TEXT)


# ---- retrospective target region ---------------------------------------------------------------

def _blank_scene():
    image = np.zeros((360, 640, 3), np.uint8)
    record = dict(REF, points=[[300, 160], [310, 160], [310, 170], [300, 170]], area_percent=0.05)
    return image, record


def test_retrospective_region_is_where_lpr_localises_best():
    from finers_rt.train.data import polygon_box_xyxy
    from finers_rt.train.retrospective import candidate_regions, choose_target_region, pipeline_crop

    image, record = _blank_scene()
    seen = []

    def fake_lpr(crop, rec, gt_box, gt_mask):  # localises well only near the crop's left edge
        assert crop.shape == (56, 56, 3) and gt_mask[int(gt_box[1]), int(gt_box[0])]
        seen.append(gt_box)
        return 1.0 - gt_box[0] / 56

    region, scores = choose_target_region(image, record, SIZES, fake_lpr)
    assert len(scores) == len(seen) > 3
    best = int(np.argmax(scores))
    gt = polygon_box_xyxy(record["points"])
    crop = pipeline_crop(region, (640, 360), SIZES)
    assert seen[best][0] == min(b[0] for b in seen)  # the chosen crop has the target leftmost
    assert crop[0] <= gt[0] and gt[2] <= crop[2]
    centred = candidate_regions((52.5, 37.3, 54.2, 39.7), SIZES.region_side_stage(), (112, 84))[0]
    flat_region, _ = choose_target_region(image, record, SIZES, lambda *a: 0.5)
    assert flat_region == pytest.approx(centred, abs=1.0)  # ties keep the centred region


def test_candidate_regions_contain_the_box_and_stay_in_frame():
    from finers_rt.geometry import box_inside
    from finers_rt.train.retrospective import candidate_regions

    box = (2.0, 30.0, 6.0, 34.0)
    regions = candidate_regions(box, (14.9, 15.0), (112, 84), per_axis=3)
    assert len(regions) >= 4
    for r in regions:
        assert box_inside(box, r) and r[0] >= 0 and r[2] <= 112 + 1e-6


# ---- training loops --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from finers_rt.train.data import build_cache

    return build_cache(tmp_path_factory.mktemp("cache"), seed=3, n_scenes=3, sizes=SIZES)


def test_cache_shares_one_gse_image_per_scene(tmp_path):
    from finers_rt.train.data import SampleCache, build_cache
    from finers_rt.train.sft import stage_example

    folder = build_cache(tmp_path / "c", seed=3, n_scenes=2, sizes=SIZES, lpr_crops=1,
                         extra_questions=4)
    cache = SampleCache(folder)
    rows = [e["gse_row"] for e in cache.entries]
    assert cache.gse_images.shape[0] == 2 and sorted(set(rows)) == [0, 1]
    assert len(cache) > 2 and cache.lpr_images.shape[0] == len(cache)
    scene_of = {e["record"]["image_path"]: e["gse_row"] for e in cache.entries}
    assert len(scene_of) == 2  # one row per scene, shared by all of its questions
    image, _, target, _ = stage_example(cache, "gse", len(cache) - 1)
    assert image.shape == (SIZES.gse_size_wh[1], SIZES.gse_size_wh[0], 3) and "bbox" in target
    # a cache of the older layout (one GSE row per entry, no gse_row) still reads
    expected = [cache.gse_image(i).copy() for i in range(len(cache))]
    info = json.loads((folder / "records.json").read_text())
    for e in info["entries"]:
        del e["gse_row"]
    (folder / "records.json").write_text(json.dumps(info))
    np.save(folder / "gse_images.npy", np.stack(expected))
    old = SampleCache(folder)
    assert all(np.array_equal(old.gse_image(i), expected[i]) for i in range(len(old)))
    with pytest.raises(InputError, match="n_scenes"):
        build_cache(tmp_path / "d", seed=3, n_scenes=0, sizes=SIZES)


def _sft_config(cache, out, **kw):
    from finers_rt.train.sft import SftConfig

    base = dict(stage="lpr", cache_dir=str(cache), out_dir=str(out), init="test", steps=6,
                batch_size=2, lr=3e-3, warmup=2, save_every=2, log_every=1, seed=1)
    base.update(kw)
    return SftConfig(**base)


def _fixed_batch_loss(hf_dir, cache, stage="lpr"):
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.train.batch import Collator, token_losses
    from finers_rt.train.data import SampleCache
    from finers_rt.train.sft import stage_example

    model, processor = load_reference(hf_dir)
    collator = Collator(processor)
    c = SampleCache(cache)
    examples = [stage_example(c, stage, i) for i in range(3)]
    batch = collator(*(list(col) for col in zip(*examples)))
    with torch.no_grad():
        text, coord = token_losses(model(**batch.model_inputs()).logits, batch.labels, collator, 0.0)
    return float(text + coord)


def test_sft_steps_reduce_the_loss(tiny_cache, tmp_path):
    from finers_rt.train.sft import train_sft

    out = tmp_path / "run"
    result = train_sft(_sft_config(tiny_cache, out, steps=10, save_every=10), log=lambda m: None)
    assert result["step"] == 10
    before = _fixed_batch_loss(out / "init", tiny_cache)
    after = _fixed_batch_loss(out / "checkpoint", tiny_cache)
    assert after < 0.85 * before, (before, after)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))


def test_resume_continues_steps_and_rng(tiny_cache, tmp_path):
    from finers_rt.train.sft import train_sft

    straight = tmp_path / "straight"
    train_sft(_sft_config(tiny_cache, straight), log=lambda m: None)

    class Stop(Exception):
        pass

    def stop_after_step_4(msg):
        if "step 5/" in msg:
            raise Stop

    resumed = tmp_path / "resumed"
    with pytest.raises(Stop):
        train_sft(_sft_config(tiny_cache, resumed), log=stop_after_step_4)
    messages = []
    result = train_sft(_sft_config(tiny_cache, resumed), log=messages.append)
    assert result["step"] == 6 and messages[0].startswith(f"resumed {resumed} at step 4")
    from safetensors.torch import load_file

    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_checkpoint_loads_generates_and_exports(tiny_cache, tmp_path):
    pytest.importorskip("onnxruntime")
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.export.vlm import VlmExportOptions, export_vlm
    from finers_rt.train.batch import Collator
    from finers_rt.train.evaluate import evaluate_stage, generate_texts
    from finers_rt.train.data import SampleCache
    from finers_rt.train.sft import train_sft

    out = tmp_path / "gse"
    train_sft(_sft_config(tiny_cache, out, stage="gse", steps=2), log=lambda m: None)
    model, processor = load_reference(out / "checkpoint")
    cache = SampleCache(tiny_cache)
    texts, seqs, n_prompt = generate_texts(model, Collator(processor), cache.gse_image(0),
                                           "find it", max_new_tokens=4, num_samples=3, temperature=1.0)
    assert len(texts) == 3 and seqs.shape[1] <= n_prompt + 4
    metrics = evaluate_stage(model, Collator(processor), cache, "gse", limit=1)
    assert set(metrics) >= {"region_recall", "recall_sized", "size_ok", "valid", "reward"}
    assert metrics["recall_sized"] <= metrics["region_recall"]
    manifest = export_vlm(out / "checkpoint", tmp_path / "stage",
                          VlmExportOptions(role="gse", image_size_wh=SIZES.gse_size_wh))
    assert manifest.validation["greedy_tokens_equal"] is True


def test_sam_training_resumes_and_saves_a_segment_anything_state_dict(tiny_cache, tmp_path):
    from finers_rt.export.sam_configs import load_sam
    from finers_rt.train.sam_train import SamTrainConfig, sam_config, train_sam

    cfg = SamTrainConfig(cache_dir=str(tiny_cache), out_dir=str(tmp_path), steps=2, batch_size=2,
                         save_every=1)
    assert train_sam(cfg, log=lambda m: None)["step"] == 2
    messages = []
    cfg = SamTrainConfig(cache_dir=str(tiny_cache), out_dir=str(tmp_path), steps=3, batch_size=2)
    assert train_sam(cfg, log=messages.append)["step"] == 3
    assert messages[0].startswith("resumed")
    load_sam(tmp_path / "sam.pth", sam_config())  # strict: every key and shape fits
    from finers_rt.train.sam_train import evaluate_sam

    metrics = evaluate_sam(tmp_path / "sam.pth", tiny_cache, limit=2)
    assert metrics["samples"] == 2 and 0.0 <= metrics["mean_iou"] <= 1.0


def test_grpo_log_probs_match_a_plain_forward(tiny_cache, tmp_path):
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.train.batch import Collator
    from finers_rt.train.grpo import group_advantages, sequence_logprobs
    from finers_rt.train.evaluate import generate_texts
    from finers_rt.train.data import SampleCache
    from finers_rt.train.model import make_initial_checkpoint

    assert not group_advantages(np.array([1.0, 1.0, 1.0])).any()
    adv = group_advantages(np.array([0.0, 1.0]))
    assert adv[0] < 0 < adv[1] and abs(adv.sum()) < 1e-6
    model, processor = load_reference(make_initial_checkpoint(tmp_path / "m", "test"))
    collator = Collator(processor)
    image = np.asarray(SampleCache(tiny_cache).lpr_images[0])
    torch.manual_seed(0)
    _, seqs, n_prompt = generate_texts(model, collator, image, "find it", 5, 2, 1.0)
    batch = collator([image], ["find it"], [""])
    with torch.no_grad():
        got = sequence_logprobs(model, seqs, n_prompt, batch.pixel_values, batch.image_grid_thw,
                                [collator.end_id, collator.pad_id])
        row = seqs[:1]
        out = model(input_ids=row, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
        logp = torch.log_softmax(out.logits[0, n_prompt - 1:-1], -1)
        answer = row[0, n_prompt:]
        ends = [i for i, t in enumerate(answer.tolist()) if t in (collator.end_id, collator.pad_id)]
        n = ends[0] + 1 if ends else len(answer)
        want = logp[torch.arange(n), answer[:n]].mean()
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)


def test_bad_configs_are_typed_errors(tiny_cache, tmp_path):
    from finers_rt.train.grpo import GrpoConfig
    from finers_rt.train.sft import SftConfig, train_sft

    with pytest.raises(InputError, match="stage must be one of"):
        SftConfig(stage="lrp", cache_dir="c", out_dir="o")
    with pytest.raises(InputError, match="needs --lpr"):
        GrpoConfig(stage="gse", init="x", cache_dir="c", out_dir="o")
    with pytest.raises(InputError, match="not a training cache"):
        train_sft(_sft_config(tmp_path, tmp_path / "o"), log=lambda m: None)
    with pytest.raises(InputError, match="--init must be"):
        train_sft(_sft_config(tiny_cache, tmp_path / "o2", init=str(tmp_path / "nope")),
                  log=lambda m: None)
    with pytest.raises(InputError, match="stage gse only"):
        SftConfig(stage="lpr", cache_dir="c", out_dir="o", questions_per_image=4)
    with pytest.raises(InputError, match="questions_per_image must be >= 1"):
        SftConfig(stage="gse", cache_dir="c", out_dir="o", questions_per_image=0)
    with pytest.raises(InputError, match="head lr must be >= 0"):
        SftConfig(stage="gse", cache_dir="c", out_dir="o", head_lr=-1.0)


def test_cli_train_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finers_rt.cli", "train", "lpr", "--cache",
                           str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "InputError" in proc.stderr and "not a training cache" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_finers_tiny_runs_out_of_the_box(monkeypatch):
    from pathlib import Path

    from finers_rt.pipeline import Pipeline, default_bundle_path
    from finers_rt.synth import generate_scene

    bundle = Path(__file__).resolve().parents[1] / "engines" / "finers-tiny"
    if not (bundle / "manifest.json").is_file():
        pytest.skip("engines/finers-tiny is not in this checkout")
    monkeypatch.delenv("FINERS_RT_MODEL", raising=False)
    assert default_bundle_path() == bundle
    image, records = generate_scene(99, 0, (1280, 720))
    result = Pipeline.load(None, max_extra_crops=0).run(image, records[0]["Q"], max_new_tokens=80)
    assert result.raw["gse"].startswith("<think>") and "</answer>" in result.raw["gse"]
    assert result.gse_region_xyxy is not None  # the trained GSE answers in the FineRS format
    assert result.mask.shape == (720, 1280)
    for source in ("gse", "lpr"):  # the committed sources are what the bundle was exported from
        assert (bundle / "source" / source / "config.json").is_file()


@pytest.mark.parametrize("model_class", ["stock", "pointer"])
def test_frozen_vision_inputs_give_the_pixel_forward(tiny_cache, tmp_path, model_class):
    from finers_rt.train.data import SampleCache
    from finers_rt.train.frozen_vision import VisionMemo, freeze
    from finers_rt.train.sft import build_model, sample_batch
    from finers_rt.train.batch import Collator

    cfg = _sft_config(tiny_cache, tmp_path / "run", stage="gse", model_class=model_class,
                      freeze_vision=True, batch_size=3)
    model, processor, _, _ = build_model(cfg, tmp_path / "run")
    freeze(model)
    collator, cache = Collator(processor), SampleCache(tiny_cache)
    batch = sample_batch(cache, cfg, collator, np.random.default_rng(0), 0)
    assert batch.image_keys is not None and batch.image_keys.shape == (3,)
    memo = VisionMemo(model.model.visual)
    with torch.no_grad():
        want = model(**batch.model_inputs()).logits
        got = model(**memo.model_inputs(model, batch)).logits
        again = model(**memo.model_inputs(model, batch)).logits  # from the memo
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    assert memo.computed == len(set(batch.image_keys.tolist()))


def test_frozen_vision_run_trains_the_lm_only_and_resumes_the_same_way(tiny_cache, tmp_path):
    from safetensors.torch import load_file

    from finers_rt.train.sft import train_sft

    out = tmp_path / "run"
    train_sft(_sft_config(tiny_cache, out, stage="gse", freeze_vision=True, steps=4),
              log=lambda m: None)
    a = load_file(str(out / "init" / "model.safetensors"))
    b = load_file(str(out / "checkpoint" / "model.safetensors"))
    vision = [k for k in a if ".visual." in k or k.startswith("visual.")]
    assert vision and all(torch.equal(a[k], b[k]) for k in vision)
    assert any(not torch.equal(a[k], b[k]) for k in a if k not in vision)
    with pytest.raises(InputError, match="freeze-vision"):
        train_sft(_sft_config(tiny_cache, out, stage="gse", steps=6), log=lambda m: None)
    with pytest.raises(InputError, match="--query-weight off"):
        train_sft(_sft_config(tiny_cache, out, stage="gse", freeze_vision=True, steps=6,
                              query_weight=1.0), log=lambda m: None)


def test_blank_image_runs_train_question_reading_only(tiny_cache, tmp_path):
    import json

    from finers_rt.export.checkpoints import load_processor
    from finers_rt.train.batch import Collator
    from finers_rt.train.sft import SftConfig, blank_image, train_sft

    with pytest.raises(InputError, match="--blank-image trains only"):
        SftConfig(stage="gse", cache_dir="c", out_dir="o", blank_image=True)
    with pytest.raises(InputError, match="--blank-image trains only"):
        SftConfig(stage="gse", cache_dir="c", out_dir="o", blank_image=True, query_weight=1.0,
                  questions_per_image=2)
    out = tmp_path / "run"
    train_sft(_sft_config(tiny_cache, out, stage="gse", steps=3, query_weight=1.0,
                          blank_image=True, freeze_vision=True), log=lambda m: None)
    collator = Collator(load_processor(out / "checkpoint"))
    image = blank_image(collator)
    assert image.shape[0] * image.shape[1] >= collator.vision.min_pixels
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r and "query" in r]
    assert steps and all(r["text"] == 0 and r["coord"] == 0 and r["pointer"] == 0 for r in steps)
    assert any(r["query"] > 0 for r in steps)


def test_head_lr_puts_the_training_only_heads_in_their_own_group(tiny_cache, tmp_path):
    from finers_rt.train.sft import SftConfig, lr_at, param_groups, train_sft

    model_p, head_p = [torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(3))]
    cfg = SftConfig(stage="gse", cache_dir="c", out_dir="o", lr=1e-3)
    assert [len(g["params"]) for g in param_groups(cfg, model_p, head_p)] == [2]
    groups = param_groups(SftConfig(stage="gse", cache_dir="c", out_dir="o", lr=1e-3, head_lr=1e-2),
                          model_p, head_p)
    assert [g["params"] for g in groups] == [model_p, head_p]
    assert [g["lr_scale"] for g in groups] == [1.0, pytest.approx(10.0)]
    # a run with --head-lr saves both groups (heads at head_lr / lr times the model's lr) and
    # resumes only so, with this run's --head-lr
    out = tmp_path / "run"
    cfg = _sft_config(tiny_cache, out, stage="gse", steps=2, query_weight=1.0, head_lr=0.01)
    train_sft(cfg, log=lambda m: None)
    saved = torch.load(out / "trainer_state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert len(saved) == 2
    assert saved[1]["lr"] == pytest.approx(0.01 / cfg.lr * saved[0]["lr"])
    assert saved[0]["lr"] == pytest.approx(lr_at(cfg, 1))
    with pytest.raises(InputError, match="--head-lr on"):
        train_sft(_sft_config(tiny_cache, out, stage="gse", steps=3, query_weight=1.0),
                  log=lambda m: None)
    train_sft(_sft_config(tiny_cache, out, stage="gse", steps=3, query_weight=1.0, head_lr=0.02),
              log=lambda m: None)
    saved = torch.load(out / "trainer_state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert saved[1]["lr"] == pytest.approx(0.02 / cfg.lr * saved[0]["lr"])


# ---- shared image prefix (--questions-per-image) -----------------------------------------------

@pytest.fixture(scope="module")
def multi_question_cache(tmp_path_factory):
    from finers_rt.train.data import build_cache

    return build_cache(tmp_path_factory.mktemp("mq"), seed=3, n_scenes=2, sizes=SIZES,
                       lpr_crops=1, extra_questions=4)


def _plain_and_shared(cache, collator, rows, per_scene):
    """The same questions (first `per_scene` of each scene `rows`) as a plain and a shared batch."""
    from finers_rt.train import dense, shared_prefix
    from finers_rt.train.sft import question_labels, stage_example

    picks = [cache.scene_entries()[r][:per_scene] for r in rows]
    examples = [stage_example(cache, "gse", i) for group in picks for i in group]
    plain = collator(*(list(col) for col in zip(*examples)))
    merge = collator.vision.merge_size
    plain.image_keys = torch.tensor([r for r, g in zip(rows, picks) for _ in g])
    plain.cell_labels = dense.batch_labels([cache.object_rows(i) for g in picks for i in g],
                                           plain.image_grid_thw, merge)
    shared = shared_prefix.collate_shared(
        collator, [cache.gse_image(g[0]) for g in picks],
        [[stage_example(cache, "gse", i)[1:] for i in g] for g in picks], keys=rows)
    shared.prefix.cell_labels = dense.batch_labels([cache.object_rows(g[0]) for g in picks],
                                                   shared.prefix.image_grid_thw, merge)
    plain.query_labels = shared.query_labels = question_labels(cache, [i for g in picks for i in g])
    return plain, shared


@pytest.mark.parametrize("model_class,frozen", [("stock", False), ("pointer", False),
                                                ("pointer", True)])
def test_shared_prefix_step_has_the_plain_batch_losses_and_gradients(
        multi_question_cache, tmp_path, model_class, frozen):
    import copy

    from finers_rt.train import dense, frozen_vision, shared_prefix
    from finers_rt.train.batch import Collator, PointerHead, to_device
    from finers_rt.train.data import SampleCache
    from finers_rt.train.sft import _train_step, build_model

    cfg = _sft_config(multi_question_cache, tmp_path / "run", stage="gse", dense_weight=1.0,
                      query_weight=1.0, model_class=model_class, freeze_vision=frozen)
    model, processor, _, _ = build_model(cfg, tmp_path / "run")
    collator, cache = Collator(processor), SampleCache(multi_question_cache)
    rows = sorted(cache.scene_entries())
    plain, shared = _plain_and_shared(cache, collator, rows, 3)
    assert shared.prefix.input_ids.shape[0] == 2 and shared.num_questions == 6
    assert torch.equal(shared.owner, torch.tensor([0, 0, 0, 1, 1, 1]))
    # fewer tokens through the LM than the plain batch
    assert shared.prefix.input_ids.numel() + shared.suffix_ids.numel() < plain.input_ids.numel()
    hidden = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({"pointer": PointerHead(hidden), "dense": dense.DenseHead(hidden),
                                 "query": dense.QueryHead(hidden)})
    memo = None
    if frozen:
        frozen_vision.freeze(model)
        memo = frozen_vision.VisionMemo(model.model.visual)

    def step(batch, wrap):
        m, h = copy.deepcopy(model), copy.deepcopy(heads)
        params = [p for p in m.parameters() if p.requires_grad] + list(h.parameters())
        m.train()
        losses = _train_step(shared_prefix.SharedPrefixForward(m) if wrap else m, h,
                             torch.optim.SGD(params, lr=0.0), params, batch, collator, cfg, 1, memo)
        named = list(m.named_parameters()) + list(h.named_parameters(prefix="heads"))
        return losses, {n: p.grad for n, p in named if p.grad is not None}

    moved = to_device(shared, "meta")  # the non-cpu path, nested prefix batch included
    assert moved.suffix_ids.device.type == moved.prefix.pixel_values.device.type == "meta"
    assert moved.prefix.pointer_index.device.type == "meta" and moved.prefix.cell_labels is not None
    assert to_device(plain, "meta").query_labels.device.type == "meta"
    assert to_device(shared, "cpu") is shared
    want, want_grads = step(plain, False)
    got, got_grads = step(shared, True)
    for term in ("text", "coord", "pointer", "axis", "dense", "query", "loss"):
        assert got[term] == pytest.approx(want[term], rel=1e-5, abs=1e-6), term
    assert want["dense"] > 0 and want["pointer"] > 0 and want["query"] > 0
    assert (model_class == "pointer") == (want["axis"] > 0)
    assert set(got_grads) == set(want_grads)
    scale = max(g.abs().max().item() for g in want_grads.values())
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max().item() <= 1e-5 * scale, name
    assert not frozen or not any(".visual." in n or n.startswith("visual.") for n in want_grads)


def test_shared_batches_draw_questions_of_one_scene_per_image_and_train(multi_question_cache,
                                                                       tmp_path):
    from dataclasses import replace

    from finers_rt.train.batch import Collator
    from finers_rt.train.data import SampleCache
    from finers_rt.train.sft import build_model, sample_shared_batch, train_sft

    cfg = _sft_config(multi_question_cache, tmp_path / "run", stage="gse", batch_size=5,
                      questions_per_image=3, model_class="pointer", freeze_vision=True,
                      dense_weight=1.0, query_weight=0.5, steps=4)
    _, processor, _, _ = build_model(cfg, tmp_path / "run")
    collator, cache = Collator(processor), SampleCache(multi_question_cache)
    rng = np.random.default_rng(0)
    for _ in range(5):
        batch = sample_shared_batch(cache, cfg, collator, rng, 0)
        keys = batch.prefix.image_keys.tolist()
        assert len(set(keys)) == len(keys) == 2  # ceil(5 / 3) distinct scenes
        assert batch.num_questions == 5 and batch.prefix.cell_labels.shape[0] == 2
        assert batch.query_labels.shape == (5, 3) and (batch.query_labels >= 0).any()
        counts = torch.bincount(batch.owner).tolist()
        assert counts[0] == 3 and counts[1] == 2
        for q in range(batch.num_questions):  # the right target for its own image
            assert 0 <= int(batch.pointer_index[q]) < int(batch.prefix.image_spans[0, 1])
    out = tmp_path / "train"
    result = train_sft(replace(cfg, out_dir=str(out)), log=lambda m: None)
    assert result["step"] == 4 and (out / "checkpoint" / "config.json").is_file()
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["axis"] > 0 and r["dense"] > 0 for r in logged)
    assert any(r["query"] > 0 for r in logged)
    resumed = train_sft(replace(cfg, out_dir=str(out), steps=6), log=lambda m: None)
    assert resumed["step"] == 6


def test_query_labels_name_the_target_values_the_question_says():
    from finers_rt.train import dense

    def row(lo, colour, shape, pattern):
        return [lo, lo, lo + 0.1, lo + 0.1, dense.ATTRIBUTES.index(colour),
                dense.ATTRIBUTES.index(shape), dense.ATTRIBUTES.index(pattern)]

    rows = [row(0.1, "red", "star", "dotted"), row(0.5, "blue", "circle", "striped")]
    colours = [n for n, _ in dense.ATTRIBUTE_GROUPS].index("colour")
    labels = dense.named_target_labels(rows, 1, "the striped circle below the red star")
    part = dict(dense.ATTRIBUTE_GROUPS)
    assert labels[colours] == -1  # 'red' is the reference object's colour, not the target's
    assert labels[1] == dense.ATTRIBUTES.index("circle") - part["shape"].start
    assert labels[2] == dense.ATTRIBUTES.index("striped") - part["pattern"].start
    head = dense.QueryHead(8)
    hidden = torch.randn(2, 5, 8)
    loss = head(hidden, torch.tensor([4, 2]), torch.tensor([labels, [-1, -1, -1]]))
    assert loss.item() > 0 and loss.requires_grad
    assert head(hidden, torch.tensor([4, 2]), torch.full((2, 3), -1)).item() == 0.0
    assert dense.target_row(rows, (0.5 * 640, 0.5 * 360, 0.6 * 640 - 1, 0.6 * 360 - 1),
                            (640, 360)) == 1
    assert dense.target_row(rows, (64, 36, 127, 71), (640, 360)) == 0


def test_lpr_eval_says_whether_the_box_centre_is_on_the_target_or_another_object(tiny_cache):
    from finers_rt.train import dense
    from finers_rt.train.data import SampleCache
    from finers_rt.train.evaluate import _centre_objects

    cache = SampleCache(tiny_cache)
    i = next(k for k in range(len(cache)) if cache.entries[k]["lpr"][0]["box_stage"] is not None)
    entry = cache.entries[i]
    assert _centre_objects(cache, i, entry["lpr"][0]["box_stage"]) == {
        "centre_on_target": 1.0, "centre_on_other": 0.0}
    assert _centre_objects(cache, i, None) == {"centre_on_target": 0.0, "centre_on_other": 0.0}
    (sw, sh), (lw, lh) = cache.sizes.scene_size_wh, cache.sizes.lpr_size_wh
    c1, r1, c2, r2 = entry["lpr"][0]["crop_original"]
    rows = cache.object_rows(i)
    target = dense.target_row(rows, entry["gse"]["gt_box_original"], (sw, sh))
    other = next(j for j in range(len(rows)) if j != target)
    x = ((rows[other][0] + rows[other][2]) / 2 * sw - c1) * lw / (c2 - c1)  # its centre, stage frame
    y = ((rows[other][1] + rows[other][3]) / 2 * sh - r1) * lh / (r2 - r1)
    assert _centre_objects(cache, i, [x - 1, y - 1, x + 1, y + 1]) == {
        "centre_on_target": 0.0, "centre_on_other": 1.0}


def test_train_evaluate_reports_stage_metrics_and_keeps_an_existing_report(tiny_cache, tmp_path):
    from typer.testing import CliRunner

    from finers_rt.cli import app
    from finers_rt.train.evaluate import evaluate_checkpoint
    from finers_rt.train.sft import train_sft

    train_sft(_sft_config(tiny_cache, tmp_path / "lpr", steps=1), log=lambda m: None)
    ckpt, out = tmp_path / "lpr" / "checkpoint", tmp_path / "eval.json"
    report = evaluate_checkpoint(ckpt, tiny_cache, "lpr", limit=2, json_out=out)
    assert report["samples"] == 2 and json.loads(out.read_text()) == report
    metrics = report["metrics"]
    assert {"iou_gt_0.5", "centre_on_target", "centre_on_other", "log2_width_ratio"} <= set(metrics)
    buckets = [b for b in ("S", "XS", "XXS") if f"{b}/samples" in metrics]
    assert sum(metrics[f"{b}/samples"] for b in buckets) == 2
    assert all(f"{b}/iou_gt_0.5" in metrics for b in buckets)
    out.write_text("mine")
    with pytest.raises(InputError, match="exists"):
        evaluate_checkpoint(ckpt, tiny_cache, "lpr", limit=1, json_out=out)
    assert out.read_text() == "mine"
    run = CliRunner().invoke(app, ["train", "evaluate", "gse", "--init", str(ckpt), "--cache",
                                   str(tiny_cache), "--limit", "1", "--json", str(out), "--force"])
    assert run.exit_code == 0, run.output
    assert "region_recall" in run.output and json.loads(out.read_text())["stage"] == "gse"
    bad = CliRunner().invoke(app, ["train", "evaluate", "sam", "--init", str(ckpt), "--cache",
                                   str(tiny_cache)])
    assert isinstance(bad.exception, InputError) and "stage must be" in str(bad.exception)
    missing = CliRunner().invoke(app, ["train", "evaluate", "lpr", "--init", str(tmp_path / "no"),
                                       "--cache", str(tiny_cache)])
    assert missing.exit_code != 0 and "config.json" in str(missing.exception)


def test_lpr_eval_width_ratio_is_zero_for_the_right_size_and_one_for_twice():
    import math

    from finers_rt.train.evaluate import _log2_width_ratio

    assert _log2_width_ratio([10, 10, 30, 20], [0, 0, 20, 10]) == 0.0
    assert _log2_width_ratio([0, 0, 40, 20], [5, 5, 25, 15]) == 1.0
    assert math.isnan(_log2_width_ratio(None, [0, 0, 20, 10]))
    assert math.isnan(_log2_width_ratio([0, 0, 4, 4], None))
    assert _log2_width_ratio([5, 5, 5, 5], [0, 0, 0, 0]) == 0.0  # degenerate boxes count as 1 px


def test_eval_answer_per_question_type_averages_over_its_own_type_only():
    from finers_rt.train.evaluate import _answer_by_type, _means

    rows = [_answer_by_type({"Q-type": "option", "attribute": "colors"}, 1.0),
            _answer_by_type({"Q-type": "option", "attribute": "position"}, 0.0),
            _answer_by_type({"Q-type": "reasoning", "attribute": "colors"}, 0.0),
            _answer_by_type({"Q-type": "referring", "attribute": "position"}, 1.0)]
    means = _means(rows)
    assert means["answer_option"] == 0.5 and means["answer_reasoning"] == 0.0
    assert means["answer_referring"] == 1.0
    # per attribute over the MCQ + open QA samples only (the referring one is not a QA answer)
    assert means["qa_colors"] == 0.5 and means["qa_position"] == 0.0
    assert np.isnan(means["qa_shape"])  # no sample asks about shape: undefined, not 0
