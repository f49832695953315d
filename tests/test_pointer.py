"""The pointer model class (finers_rt.export.pointer): HF side, training option, export, runtime."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from finers_rt.train.data import StageSizes  # noqa: E402

SIZES = StageSizes(gse_size_wh=(112, 84), lpr_size_wh=(84, 84), scene_size_wh=(640, 360),
                   region_side=256, crop_min_side=128)
QUESTION = "find the red pen"


@pytest.fixture(scope="module")
def pointer_dirs(tmp_path_factory):
    """(stock TEST-sized finers-tiny folder, the same with a pointer whose weights are scaled up
    so the pointer term moves greedy choices)."""
    from finers_rt.export.pointer import add_pointer, load_vlm
    from finers_rt.train.model import make_initial_checkpoint

    root = tmp_path_factory.mktemp("pointer")
    stock = make_initial_checkpoint(root / "stock", "test", seed=0)
    torch.manual_seed(0)
    ptr = add_pointer(stock, root / "pointer")
    model = load_vlm(ptr, dtype=torch.float32)
    with torch.no_grad():
        for p in model.pointer.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    model.save_pretrained(str(ptr), safe_serialization=True)
    return stock, ptr


def _prompt_inputs(hf_dir, image):
    from finers_rt.export.checkpoints import load_processor
    from finers_rt.train.batch import Collator
    from finers_rt.train.evaluate import prompt_inputs

    return prompt_inputs(Collator(load_processor(hf_dir)), image, QUESTION)


def _image(seed=0, size=(84, 84)):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def test_cell_weights_and_cells_from_position_ids():
    from finers_rt.export.pointer import cell_weights, pointer_cells, pointer_settings

    settings = pointer_settings({10: 0, 11: 14, 12: 28, 13: 42, 14: 160}, cell_px=28, max_value=160)
    assert settings["num_cells"] == 6
    w = cell_weights(settings, vocab_size=16)  # [C, V]
    assert w.shape == (6, 16) and torch.all(w[:, :10] == 0) and torch.all(w[:, 15] == 0)
    assert w[0, 10] == 1 and w[0, 11] == 1 and w[1, 13] == 1  # 0 and 14 -> cell 0, 42 -> cell 1
    assert torch.allclose(w[:2, 12], torch.tensor([0.5, 0.5]))  # 28: between cells 0 and 1
    assert w[5, 14] == 1  # 160, past the last centre (154): clamped to the last cell
    torch.testing.assert_close(w.sum(0)[10:15], torch.ones(5))
    pos = torch.tensor([[[5, 7, 7]], [[5, 7, 9]], [[5, 8, 7]]])  # rows t, h, w of 3 tokens
    cells = pointer_cells(pos)[0]  # (col = w - t, row = h - t): text token -> (0, 0)
    assert cells.tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]


def test_checkpoint_class_is_chosen_from_the_config(pointer_dirs):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from finers_rt.export.checkpoints import load_reference
    from finers_rt.export.pointer import FinersPointerQwen2_5_VL, has_pointer

    stock, ptr = pointer_dirs
    assert not has_pointer(stock) and has_pointer(ptr)
    model, _ = load_reference(stock)
    assert type(model) is Qwen2_5_VLForConditionalGeneration
    model, _ = load_reference(ptr)
    assert isinstance(model, FinersPointerQwen2_5_VL)
    assert model.config.finers_pointer["cell_px"] == 28


def test_cached_decoding_equals_full_forward_and_only_coordinates_move(pointer_dirs):
    from finers_rt.export.checkpoints import load_reference

    _, ptr = pointer_dirs
    model, _ = load_reference(ptr)
    inputs = _prompt_inputs(ptr, _image())
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        seqs = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        full = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), use_cache=False,
                     pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        hidden = model.model(input_ids=seqs, attention_mask=torch.ones_like(seqs),
                             pixel_values=inputs["pixel_values"],
                             image_grid_thw=inputs["image_grid_thw"]).last_hidden_state
    # greedy decoding through the cache (pointer K/V at layer index num_hidden_layers) agrees
    # with a cache-free forward over the whole sequence
    assert full.logits[0, n - 1:-1].argmax(-1).tolist() == seqs[0, n:].tolist()
    bonus = full.logits - model.lm_head(hidden)
    coord = torch.tensor(model.config.finers_pointer["coord_token_ids"])
    other = torch.ones(bonus.shape[-1], dtype=torch.bool)
    other[coord] = False
    assert bonus[..., other].abs().max() == 0
    assert bonus[..., coord].abs().max() > 1.0


def test_pointer_training_option_adds_the_pointer_and_its_loss(tmp_path):
    from finers_rt.export.pointer import has_pointer
    from finers_rt.train.data import build_cache
    from finers_rt.train.sft import SftConfig, train_sft

    cache = build_cache(tmp_path / "cache", seed=3, n_scenes=2, sizes=SIZES, lpr_crops=1)
    out = tmp_path / "run"
    messages = []
    cfg = SftConfig(stage="lpr", cache_dir=str(cache), out_dir=str(out), init="test", steps=3,
                    batch_size=2, lr=3e-3, warmup=1, save_every=3, log_every=1, seed=1,
                    model_class="pointer")
    train_sft(cfg, log=messages.append)
    assert has_pointer(out / "checkpoint") and not has_pointer(out / "init")
    import json

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["axis"] > 0 for r in log)  # the dense axis loss is on for pointer models
    from finers_rt.errors import InputError

    with pytest.raises(InputError, match="model class"):
        SftConfig(stage="lpr", cache_dir=str(cache), out_dir=str(out), model_class="bogus")


@pytest.mark.parametrize("kv_cache", ["shared", "concat"])
def test_export_parity_and_runtime_greedy_equal_hf_generate(pointer_dirs, tmp_path, kv_cache):
    pytest.importorskip("onnxruntime")
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.export.vlm import VlmExportOptions, export_vlm
    from finers_rt.vlm import VlmStage

    _, ptr = pointer_dirs
    manifest = export_vlm(ptr, tmp_path / "stage", VlmExportOptions(
        role="lpr", image_size_wh=(84, 84), kv_cache=kv_cache))
    assert manifest.validation["greedy_tokens_equal"] is True
    layers = manifest.text.num_hidden_layers
    stage = VlmStage.load(tmp_path / "stage")
    assert stage.num_kv_pairs == layers + 1  # the pointer's K/V pair rides in the same cache
    image = _image(1)
    result = stage.generate(image, QUESTION, max_new_tokens=16)
    model, processor = load_reference(ptr)
    from PIL import Image

    stage_image = Image.fromarray(image).resize((84, 84), Image.Resampling.BILINEAR)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[stage_image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=16)
    assert result.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()
    # logits parity covers the pointer term (it moves coordinate logits by > 1, see above)
    assert manifest.validation["prefill_logits_max_abs_err"] < 1e-3
    outputs = {spec.name for spec in manifest.graphs["decoder"].outputs}
    prefix = "present" if kv_cache == "shared" else "new"
    assert {f"{prefix}_key_{layers}", f"{prefix}_value_{layers}"} <= outputs


def test_shift_moves_axis_mass_by_fractional_cells():
    from finers_rt.export.pointer import shift_cells

    cells = torch.arange(6, dtype=torch.float32)
    p = torch.zeros(1, 2, 1, 6)
    p[0, 0, 0, 3] = 1.0  # x: cell 3
    p[0, 1, 0, 1] = 1.0  # y: cell 1
    out = shift_cells(p, torch.tensor([[[1.0, -0.5]]]), cells)  # x down 1 cell, y up half a cell
    assert out[0, 0, 0].tolist() == [0, 0, 1, 0, 0, 0]
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([0, 0.5, 0.5, 0, 0, 0]))


def test_add_pointer_upgrades_a_pointer_checkpoint_without_shift(pointer_dirs, tmp_path):
    import json
    import shutil

    from finers_rt.export.pointer import add_pointer, load_vlm

    _, ptr = pointer_dirs
    old = tmp_path / "old"
    shutil.copytree(ptr, old)
    config = json.loads((old / "config.json").read_text())
    config["finers_pointer"].pop("shift")
    (old / "config.json").write_text(json.dumps(config))
    before = load_vlm(old, dtype=torch.float32)
    assert before.pointer.shift is None
    after = load_vlm(add_pointer(old, tmp_path / "new"), dtype=torch.float32)
    assert after.pointer.shift is not None
    torch.testing.assert_close(after.pointer.key.weight, before.pointer.key.weight)
    torch.testing.assert_close(after.lm_head.weight, before.lm_head.weight)
