"""The pointer model class (finers_rt.export.pointer): HF side, training option, export, runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from finers_rt.errors import InputError  # noqa: E402
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


@pytest.mark.parametrize("kv_cache,joint", [("shared", False), ("concat", False),
                                           ("shared", True), ("shared", "cells"),
                                           ("concat", "cells"), ("shared", "extent"),
                                           ("concat", "extent"), ("shared", "readout"),
                                           ("concat", "readout")])
def test_export_parity_and_runtime_greedy_equal_hf_generate(pointer_dirs, tmp_path, kv_cache,
                                                            joint, request):
    pytest.importorskip("onnxruntime")
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.export.vlm import VlmExportOptions, export_vlm
    from finers_rt.vlm import VlmStage

    # the joint pointer (one attention for both axes) goes through the same graph contract, and
    # so does one whose keys carry learned per-cell terms
    if joint is True:
        ptr = request.getfixturevalue("joint_dir")[0]
    elif joint:
        ptr = request.getfixturevalue({"cells": "cell_keys_dir", "extent": "extent_dir",
                                       "readout": "readout_dir"}[joint])
    else:
        ptr = pointer_dirs[1]
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


@pytest.fixture(scope="module")
def joint_dir(pointer_dirs, tmp_path_factory):
    """The per-axis pointer checkpoint made joint, its key / query seeded with large weights so
    the pointer term moves greedy choices."""
    from finers_rt.export.pointer import add_pointer, load_vlm

    _, ptr = pointer_dirs
    model = load_vlm(ptr, dtype=torch.float32)
    hidden, dim = model.config.text_config.hidden_size, model.pointer.head_dim
    gen = torch.Generator().manual_seed(7)
    seed = {"key.weight": torch.randn(dim, hidden, generator=gen) * 0.5,
            "key.bias": torch.randn(dim, generator=gen) * 0.5,
            "query.weight": torch.randn(dim, hidden, generator=gen) * 0.5,
            "query.bias": torch.randn(dim, generator=gen) * 0.5}
    return add_pointer(ptr, tmp_path_factory.mktemp("joint") / "joint", joint=True, seed=seed), seed


@pytest.fixture(scope="module")
def cell_keys_dir(joint_dir, tmp_path_factory):
    """The joint checkpoint with per-cell key terms (zero when added, then set to large random
    values so they move greedy choices)."""
    from finers_rt.export.pointer import add_pointer, has_cell_keys, load_vlm

    joint, _seed = joint_dir
    out = add_pointer(joint, tmp_path_factory.mktemp("cells") / "cells", cell_keys=True)
    assert has_cell_keys(out) and not has_cell_keys(joint)
    model = load_vlm(out, dtype=torch.float32)
    assert model.pointer.joint and float(model.pointer.cell_key.abs().max()) == 0.0
    torch.testing.assert_close(model.pointer.key.weight, load_vlm(joint).pointer.key.weight)
    with torch.no_grad():
        model.pointer.cell_key.copy_(torch.randn(model.pointer.cell_key.shape,
                                                 generator=torch.Generator().manual_seed(3)) * 2)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_cell_keys_add_a_column_and_a_row_term_to_every_key(cell_keys_dir):
    from finers_rt.export.pointer import load_vlm, pointer_kv

    head = load_vlm(cell_keys_dir, dtype=torch.float32).pointer
    hidden = torch.randn(1, 3, head.key.in_features)
    # (t, h, w): a text token (cell 0, 0), an image token at column 2 / row 1, one past the table
    pos = torch.tensor([[[5, 5, 5]], [[5, 6, 7]], [[5, 7, 105]]])  # [3 (t, h, w), 1, 3]
    keys, values = pointer_kv(head, hidden, pos)
    base = head.key(hidden)
    want = [head.cell_key[0, 0] + head.cell_key[1, 0], head.cell_key[0, 2] + head.cell_key[1, 1],
            head.cell_key[0, head.num_cells - 1] + head.cell_key[1, 2]]
    with torch.no_grad():
        for s, term in enumerate(want):
            torch.testing.assert_close(keys[0, s, 0], base[0, s] + term)
            torch.testing.assert_close(keys[0, s, 1], base[0, s] + term)  # joint: both heads
    assert values[0, 1, 0, 2] == 1 and values[0, 1, 1, 1] == 1  # values still the cell one-hots


def test_joint_pointer_axes_are_the_marginals_of_one_attention(pointer_dirs, joint_dir):
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.export.pointer import (causal_additive_mask, is_joint, pointer_axis_probs,
                                          pointer_cells, pointer_kv)

    _, ptr = pointer_dirs
    joint, seed = joint_dir
    assert is_joint(joint) and not is_joint(ptr)
    model, _ = load_reference(joint)
    before, _ = load_reference(ptr)
    head = model.pointer
    torch.testing.assert_close(head.key.weight, seed["key.weight"])
    torch.testing.assert_close(head.query.bias, seed["query.bias"])
    torch.testing.assert_close(model.lm_head.weight, before.lm_head.weight)  # the rest is kept
    torch.testing.assert_close(head.shift.weight, before.pointer.shift.weight)
    inputs = _prompt_inputs(joint, _image(2))
    with torch.no_grad():
        out = model.model(**inputs)
        pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], None,
                                            attention_mask=inputs["attention_mask"])
        hidden = out.last_hidden_state
        keys, values = pointer_kv(head, hidden, pos)
        seq = hidden.shape[1]
        mask = causal_additive_mask(None, 1, seq, seq, hidden.dtype, hidden.device)
        p_axis = pointer_axis_probs(head, hidden, keys, values, mask)  # [1, 2, S, C]
        # one attention over the tokens: its column and row marginals are the two axes
        q = head.query(hidden[0])
        k = head.key(hidden[0])
        probs = torch.softmax(q @ k.T * head.head_dim ** -0.5 + mask[0, 0], dim=-1)  # [S, S]
    cells = pointer_cells(pos)[0].long()  # [S, 2]
    col = torch.zeros(seq, head.num_cells).index_add_(1, cells[:, 0], probs)
    row = torch.zeros(seq, head.num_cells).index_add_(1, cells[:, 1], probs)
    torch.testing.assert_close(p_axis[0, 0], col)
    torch.testing.assert_close(p_axis[0, 1], row)
    assert not torch.allclose(p_axis[0, 0, -1], p_axis[0, 1, -1])


def test_joint_pointer_training_seeds_from_the_runs_pointer_head(tmp_path):
    import json

    from finers_rt.errors import InputError
    from finers_rt.export.pointer import is_joint, load_vlm
    from finers_rt.train.data import build_cache
    from finers_rt.train.sft import SftConfig, train_sft

    cache = build_cache(tmp_path / "cache", seed=4, n_scenes=2, sizes=SIZES, lpr_crops=1)
    first = tmp_path / "first"
    base = dict(stage="gse", cache_dir=str(cache), batch_size=2, lr=3e-3, warmup=1,
                log_every=1, seed=1, model_class="pointer")
    train_sft(SftConfig(out_dir=str(first), init="test", steps=2, save_every=2, **base),
              log=lambda m: None)
    assert not is_joint(first / "checkpoint")
    aux = torch.load(first / "trainer_state.pt", weights_only=False)["pointer"]
    second = tmp_path / "second"
    messages = []
    train_sft(SftConfig(out_dir=str(second), init=str(first / "checkpoint"), steps=2,
                        save_every=2, joint_pointer=True, query_weight=1.0, query_at_x1=True,
                        **base), log=messages.append)
    assert any("seeded from the training-only pointer head" in m for m in messages)
    init = load_vlm(second / "init_pointer", dtype=torch.float32)
    assert init.pointer.joint
    torch.testing.assert_close(init.pointer.key.weight, aux["key.weight"])
    torch.testing.assert_close(init.pointer.query.bias, aux["query.bias"])
    assert is_joint(second / "checkpoint")
    log = [json.loads(line) for line in (second / "log.jsonl").read_text().splitlines()]
    assert all(r["joint"] > 0 for r in log) and all(r["axis"] > 0 for r in log)
    assert all(r["query"] > 0 for r in log)
    first_log = [json.loads(line) for line in (first / "log.jsonl").read_text().splitlines()]
    assert all(r["joint"] == 0 for r in first_log)  # per-axis pointers have no token loss
    with pytest.raises(InputError, match="--model-class pointer"):
        SftConfig(stage="gse", cache_dir=str(cache), out_dir=str(tmp_path / "x"),
                  joint_pointer=True)
    with pytest.raises(InputError, match="per-axis pointer"):  # no silent kind switch on resume
        train_sft(SftConfig(out_dir=str(first), init="test", steps=3, joint_pointer=True, **base),
                  log=lambda m: None)
    with pytest.raises(InputError, match="--query-weight > 0"):
        SftConfig(stage="gse", cache_dir=str(cache), out_dir=str(tmp_path / "x"), query_at_x1=True)


def test_coordinate_slots_are_the_positions_that_write_x1_y1_x2_y2(pointer_dirs):
    from finers_rt.export.checkpoints import load_processor
    from finers_rt.train.batch import Collator
    from finers_rt.train.sft import _coordinate_slots

    _, ptr = pointer_dirs
    col = Collator(load_processor(ptr))
    image = _image(4)
    batch = col([image, image], [QUESTION, QUESTION],
                ["<think>x</think><answer>{'bbox': [14,28,42,56]}</answer>", "no numbers here"])
    slots = _coordinate_slots(batch.labels, col, "gse", batch.answer_pos, 4)
    assert slots.shape == (2, 4)
    x1 = int(slots[0, 0])
    first = batch.labels[0, x1 + 1]
    assert int(col.coord_lookup[first]) >= 0 and col.tokenizer.decode([int(first)]).strip() == "14"
    assert int(col.coord_lookup[batch.labels[0, x1]]) < 0  # nothing before it is one
    written = [col.tokenizer.decode([int(batch.labels[0, int(p) + 1])]).strip() for p in slots[0]]
    assert written == ["14", "28", "42", "56"]
    assert slots[1].tolist() == [int(batch.answer_pos[1])] * 4  # no coordinate: the fallback
    # x1 alone is the first column
    assert _coordinate_slots(batch.labels, col, "gse", batch.answer_pos, 1)[:, 0].tolist() == \
        slots[:, 0].tolist()


@pytest.fixture(scope="module")
def extent_dir(pointer_dirs, tmp_path_factory):
    """The pointer checkpoint with a learned extent: zero when added (outputs unchanged), then
    set to large random values that move the coordinate logits."""
    from finers_rt.export.pointer import add_pointer, has_extent, load_vlm

    _, ptr = pointer_dirs
    out = add_pointer(ptr, tmp_path_factory.mktemp("extent") / "extent", extent=True)
    assert has_extent(out) and not has_extent(ptr)
    inputs = _prompt_inputs(ptr, _image())
    source, model = load_vlm(ptr, dtype=torch.float32).eval(), load_vlm(out, dtype=torch.float32).eval()
    assert model.pointer.num_cells == model.pointer.head_dim - 1  # the last value slot is the extent
    with torch.no_grad():
        before = source(**inputs).logits
        torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-4, atol=1e-4)
        for layer in (model.pointer.extent, model.pointer.extent_scale):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 2)
        moved = model(**inputs).logits
    coord = torch.tensor(model.config.finers_pointer["coord_token_ids"])
    assert (moved - before)[..., coord].abs().max() > 0.1
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_adding_the_extent_to_a_checkpoint_with_cell_keys_carries_the_cell_key_table(
        pointer_dirs, tmp_path):
    """The extent takes a value slot, so the per-cell key table covers one cell fewer: the
    learned terms of the cells both tables cover are carried over, and on an image inside
    them the outputs are unchanged."""
    from finers_rt.export.pointer import add_pointer, has_cell_keys, has_extent, load_vlm

    _, ptr = pointer_dirs
    cells = add_pointer(ptr, tmp_path / "cells", joint=True, cell_keys=True)
    model = load_vlm(cells, dtype=torch.float32).eval()
    with torch.no_grad():
        model.pointer.cell_key.copy_(torch.randn(model.pointer.cell_key.shape,
                                                 generator=torch.Generator().manual_seed(3)))
    model.save_pretrained(str(cells), safe_serialization=True)
    out = add_pointer(cells, tmp_path / "extent", extent=True)
    assert has_extent(out) and has_cell_keys(out)
    grown = load_vlm(out, dtype=torch.float32).eval()
    n = grown.pointer.num_cells
    assert n == model.pointer.num_cells - 1
    torch.testing.assert_close(grown.pointer.cell_key, model.pointer.cell_key[:, :n])
    inputs = _prompt_inputs(ptr, _image())
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs).logits, model(**inputs).logits,
                                   rtol=1e-4, atol=1e-4)


def test_extent_loss_reads_half_the_answer_box_in_cells(tmp_path):
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.export.pointer import has_extent
    from finers_rt.train.batch import Collator
    from finers_rt.train.data import SampleCache, build_cache
    from finers_rt.train.sft import SftConfig, _extent_loss, stage_example, train_sft

    cache = build_cache(tmp_path / "cache", seed=3, n_scenes=2, sizes=SIZES, lpr_crops=1)
    base = dict(stage="lpr", cache_dir=str(cache), init="test", steps=2, batch_size=2, lr=3e-3,
                warmup=1, save_every=2, log_every=1, seed=1, model_class="pointer",
                extent_weight=1.0)
    out = tmp_path / "run"
    train_sft(SftConfig(out_dir=str(out), **base), log=lambda m: None)
    assert has_extent(out / "checkpoint")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["extent"] > 0 for r in log)
    model, processor = load_reference(out / "checkpoint")
    collator, data = Collator(processor), SampleCache(cache)
    i = next(k for k in range(len(data)) if data.entries[k]["lpr"][0]["box_stage"] is not None)
    image, text, target, xy = stage_example(data, "lpr", i)
    batch = collator([image], [text], [target], [xy])
    x1, y1, x2, y2 = data.entries[i]["lpr"][0]["box_stage"]
    cell = model.config.finers_pointer["cell_px"]
    with torch.no_grad():
        last = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           pixel_values=batch.pixel_values,
                           image_grid_thw=batch.image_grid_thw).last_hidden_state
        model.pointer.extent.weight.zero_()
        model.pointer.extent.bias.copy_(torch.tensor([(x2 - x1) / 2 / cell, (y2 - y1) / 2 / cell]))
        loss = _extent_loss(model, last, batch, collator, "lpr")
        assert float(loss) < 0.5 * (2 / cell) ** 2  # answer coordinates are rounded to even values
        model.pointer.extent.bias.add_(1.0)
        assert float(_extent_loss(model, last, batch, collator, "lpr")) > 0.4
    for bad in ({"stage": "gse"}, {"model_class": "stock"}):
        with pytest.raises(InputError, match="extent-weight"):
            SftConfig(out_dir=str(tmp_path / "x"), **{**base, **bad})


@pytest.fixture(scope="module")
def readout_dir(pointer_dirs, tmp_path_factory):
    """The pointer checkpoint with a readout: outputs unchanged when added, then set to large
    random values that move the logits of the words (not only the coordinates)."""
    from finers_rt.export.pointer import add_pointer, load_vlm, readout_dims

    _, ptr = pointer_dirs
    out = add_pointer(ptr, tmp_path_factory.mktemp("readout") / "readout", readout=4)
    assert readout_dims(out) == 4 and readout_dims(ptr) == 0
    inputs = _prompt_inputs(ptr, _image())
    source, model = load_vlm(ptr, dtype=torch.float32).eval(), load_vlm(out, dtype=torch.float32).eval()
    head = model.pointer
    assert head.num_cells == head.head_dim - 4 and head.readout_start == head.head_dim - 4
    words = torch.ones(model.config.text_config.vocab_size, dtype=torch.bool)
    words[torch.tensor(model.config.finers_pointer["coord_token_ids"])] = False
    with torch.no_grad():
        before = source(**inputs).logits
        added = model(**inputs).logits
        torch.testing.assert_close(added[..., words], before[..., words], rtol=1e-5, atol=1e-5)
        # coordinates: the same up to this test model's random shifts (tens of cells), which
        # push mass past the grid's edge where 4 fewer cells cut it off differently
        torch.testing.assert_close(added, before, rtol=1e-3, atol=1e-3)
        for layer in (head.readout, head.readout_scale, head.readout_out):
            for p in layer.parameters():  # moderate: the export's parity tolerance is absolute
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        moved = model(**inputs).logits
    assert (moved - before)[..., words].abs().max() > 0.1
    model.save_pretrained(str(out), safe_serialization=True)
    # dropping it again gives the source's cells back (and its outputs)
    back = add_pointer(out, tmp_path_factory.mktemp("readout") / "dropped", readout=0)
    assert readout_dims(back) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_vlm(back, dtype=torch.float32).eval()(**inputs).logits,
                                   before, rtol=1e-4, atol=1e-4)
    return out


def test_readout_attends_the_target_while_the_response_is_written(tmp_path):
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.export.pointer import readout_dims
    from finers_rt.train.batch import Collator
    from finers_rt.train.data import SampleCache, build_cache
    from finers_rt.train.sft import (SftConfig, _readout_loss, response_positions, stage_example,
                                     train_sft)

    cache = build_cache(tmp_path / "cache", seed=3, n_scenes=2, sizes=SIZES, lpr_crops=1)
    base = dict(stage="lpr", cache_dir=str(cache), init="test", steps=2, batch_size=2, lr=3e-3,
                warmup=1, save_every=2, log_every=1, seed=1, model_class="pointer",
                readout_weight=1.0, readout_dims=4)
    out = tmp_path / "run"
    train_sft(SftConfig(out_dir=str(out), **base), log=lambda m: None)
    assert readout_dims(out / "checkpoint") == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["readout"] > 0 and r["response"] > 0 for r in log)
    model, processor = load_reference(out / "checkpoint")
    collator, data = Collator(processor), SampleCache(cache)
    rows = [stage_example(data, "lpr", i) for i in range(2)]
    batch = collator(*[list(col) for col in zip(*rows)])
    # the positions that write the response value, and nothing else
    mask = response_positions(batch.labels, collator)
    for b in range(2):
        written = collator.tokenizer.decode(batch.labels[b, 1:][mask[b]].tolist())
        response = data.entries[b]["record"]["A"] if data.entries[b]["record"]["Q-type"] != \
            "referring" else "The object is found"
        assert written.strip().rstrip(".") == str(response).rstrip(".")
    # -log attention on the target: small when the pointer looks at it, large when it does not
    model.train()
    with torch.no_grad():
        model(**batch.model_inputs())
        probs = model.pointer.last_probs
        starts = batch.image_spans[:, 0] + batch.pointer_index
        on = torch.full_like(probs, 1e-9)
        for b in range(2):
            on[b, :, :, starts[b]] = 1.0
        model.pointer.last_probs = on
        assert float(_readout_loss(model, batch, mask)) < 1e-3
        model.pointer.last_probs = torch.full_like(probs, 1e-9)
        assert float(_readout_loss(model, batch, mask)) > 10
    for bad, message in (({"model_class": "stock"}, "--readout-weight trains"),
                         ({"readout_dims": 0}, r"--readout-dims must be in \[1, 32\], got 0"),
                         ({"readout_weight": -1.0}, "readout weight must be >= 0, got -1.0")):
        with pytest.raises(InputError, match=message):
            SftConfig(out_dir=str(tmp_path / "x"), **{**base, **bad})

    class NoKeyEnd:  # a tokenizer without the answer format's "':" token
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    class Stub:
        tokenizer = NoKeyEnd()

    with pytest.raises(InputError, match="\"':\" as one token"):
        response_positions(torch.zeros(1, 4, dtype=torch.long), Stub())
