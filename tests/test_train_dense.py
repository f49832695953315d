"""Dense per-image-token supervision of the GSE stage (finers_rt.train.dense)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from finers_rt.errors import InputError  # noqa: E402
from finers_rt.synth import generate_scene, scene_objects  # noqa: E402
from finers_rt.train import dense  # noqa: E402
from finers_rt.train.data import StageSizes  # noqa: E402

SIZES = StageSizes(gse_size_wh=(112, 84), lpr_size_wh=(56, 56), scene_size_wh=(640, 360),
                   region_side=256, crop_min_side=128)


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory):
    from finers_rt.train.data import build_cache

    return build_cache(tmp_path_factory.mktemp("cache"), seed=5, n_scenes=3, sizes=SIZES)


def test_scene_objects_are_the_generated_scene():
    _image, records = generate_scene(9, 2, (640, 360))
    objs = scene_objects(9, 2, (640, 360))
    for record in records:
        pts = np.asarray(record["points"])
        assert sum(np.array_equal(o.points_xy, pts) for o in objs) == 1


def test_cell_targets_mark_the_cells_an_object_box_overlaps():
    red, star, dotted = (dense.ATTRIBUTES.index(v) for v in ("red", "star", "dotted"))
    rows = [[0.30, 0.10, 0.45, 0.20, red, star, dotted]]  # columns 3..4 of 10, row 0 of 5
    cells = dense.cell_targets(rows, (5, 10)).reshape(5, 10, -1)
    hit = cells.any(-1)
    assert hit.sum() == 2 and hit[0, 3] and hit[0, 4]
    assert set(np.flatnonzero(cells[0, 3])) == {red, star, dotted}
    tiny = dense.cell_targets([[0.51, 0.51, 0.52, 0.52, red, star, dotted]], (5, 10))
    assert tiny.reshape(5, 10, -1).any(-1).sum() == 1  # an object inside one cell marks one
    edge = dense.cell_targets([[0.95, 0.9, 1.0, 1.0, red, star, dotted]], (5, 10))
    assert edge.reshape(5, 10, -1).any(-1).sum() == 1  # touching the right/bottom border: last cell
    fields = [range(len(dense.ATTRIBUTES))[g] for _n, g in dense.ATTRIBUTE_GROUPS]
    assert [v for f in fields for v in f] == list(range(len(dense.ATTRIBUTES)))
    assert dense.ATTRIBUTES[fields[1][0]] == "circle" and dense.ATTRIBUTES[fields[2][0]] == "solid"
    logits = np.zeros((2, len(dense.ATTRIBUTES)), dtype=np.float32)
    labels = np.zeros_like(logits)
    labels[0, red], labels[1, dense.ATTRIBUTES.index("blue")] = 1, 1
    logits[:, red] = 1.0  # red everywhere: right on the red cell, wrong on the blue one
    assert dense.attribute_accuracy(logits, labels)["colour"] == 0.5


def test_scene_objects_file_is_built_once_and_matches_the_records(dense_cache, monkeypatch):
    table = dense.ensure_scene_objects(dense_cache)
    assert (dense_cache / dense.OBJECTS_FILE).is_file()
    info = json.loads((dense_cache / "records.json").read_text())
    for entry in info["entries"]:
        rows = table[dense.scene_index(entry["record"]["image_path"])]
        xs = [p[0] / 640 for p in entry["record"]["points"]]
        assert any(r[0] <= min(xs) + 1e-9 and max(xs) < r[2] + 1e-9 for r in rows)
    def no_rebuild(*args, **kwargs):
        raise AssertionError("scene objects were rebuilt instead of read back")

    monkeypatch.setattr(dense, "scene_objects", no_rebuild)
    assert dense.ensure_scene_objects(dense_cache) == table


def test_dense_head_loss_is_finite_and_learns(dense_cache):
    from finers_rt.export.checkpoints import load_processor
    from finers_rt.train.batch import Collator
    from finers_rt.train.data import SampleCache
    from finers_rt.train.model import make_initial_checkpoint
    from finers_rt.train.sft import stage_example

    src = dense_cache / "model"
    make_initial_checkpoint(src, "test", seed=0)
    collator = Collator(load_processor(src))
    cache = SampleCache(dense_cache)
    examples = [stage_example(cache, "gse", i) for i in range(2)]
    batch = collator(*(list(col) for col in zip(*examples)))
    merge = collator.vision.merge_size
    labels = dense.batch_labels([cache.object_rows(i) for i in range(2)], batch.image_grid_thw, merge)
    assert labels.shape[0] == 2 and labels.sum() > 0
    hidden = torch.randn(2, batch.input_ids.shape[1], 16, requires_grad=False)
    head = dense.DenseHead(16)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = head(hidden, batch.image_spans, batch.image_grid_thw, labels, merge)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]
    bad = batch.image_spans.clone()
    bad[0, 1] += 1
    with pytest.raises(InputError, match="do not form"):
        head(hidden, bad, batch.image_grid_thw, labels, merge)


def test_sft_with_dense_loss_runs_saves_and_resumes(dense_cache, tmp_path):
    from finers_rt.train.sft import SftConfig, train_sft

    cfg = dict(stage="gse", cache_dir=str(dense_cache), out_dir=str(tmp_path / "run"), init="test",
               steps=3, batch_size=2, lr=3e-3, warmup=1, save_every=3, log_every=1, seed=1,
               dense_weight=1.0)
    train_sft(SftConfig(**cfg), log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["dense"] > 0 for r in log)
    state = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=False)
    assert "dense" in state
    result = train_sft(SftConfig(**{**cfg, "steps": 4}), log=lambda m: None)
    assert result["step"] == 4
    with pytest.raises(InputError, match="stage gse only"):
        SftConfig(**{**cfg, "stage": "lpr"})


def test_carry_heads_starts_a_continuation_from_the_runs_training_only_heads(dense_cache,
                                                                             tmp_path):
    from finers_rt.train.batch import PointerHead
    from finers_rt.train.sft import SftConfig, carry_heads, train_sft

    first = tmp_path / "first"
    base = dict(stage="gse", cache_dir=str(dense_cache), batch_size=2, lr=3e-3, warmup=1,
                log_every=1, seed=1, dense_weight=1.0, query_weight=1.0)
    train_sft(SftConfig(out_dir=str(first), init="test", steps=2, save_every=2, **base),
              log=lambda m: None)
    saved = torch.load(first / "trainer_state.pt", weights_only=False)
    ckpt_dir = first / "checkpoint"

    # the heads as train_sft builds them for the test model (hidden 64, 4 heads)
    heads = torch.nn.ModuleDict({"pointer": PointerHead(64, dim=16), "dense": dense.DenseHead(64),
                                 "query": dense.QueryHead(64)})
    messages = []
    assert carry_heads(heads, ckpt_dir, messages.append) == ["pointer", "dense", "query"]
    for name in ("pointer", "dense", "query"):
        for key, value in heads[name].state_dict().items():
            torch.testing.assert_close(value, saved[name][key])
    other = torch.nn.ModuleDict({"pointer": PointerHead(64, dim=8), "dense": dense.DenseHead(64)})
    before = {k: v.clone() for k, v in other["pointer"].state_dict().items()}
    assert carry_heads(other, ckpt_dir, messages.append) == ["dense"]  # other shapes: fresh
    assert all(torch.equal(before[k], v) for k, v in other["pointer"].state_dict().items())
    assert "fresh: ['pointer']" in messages[-1]

    messages = []
    train_sft(SftConfig(out_dir=str(tmp_path / "second"), init=str(ckpt_dir), steps=1,
                        save_every=1, carry_heads=True, **base), log=messages.append)
    assert any("carried training-only heads ['pointer', 'dense', 'query']" in m for m in messages)
    with pytest.raises(InputError, match="--carry-heads"):
        SftConfig(out_dir=str(tmp_path / "x"), init="test", carry_heads=True, **base)
    with pytest.raises(InputError, match="--carry-heads"):  # an HF folder without its run state
        SftConfig(out_dir=str(tmp_path / "x"), init=str(first / "nothing"), carry_heads=True,
                  **base)


def test_vision_pretraining_learns_saves_and_resumes(dense_cache, tmp_path):
    from finers_rt.train.model import make_initial_checkpoint
    from finers_rt.train.vision import VisionConfig, train_vision

    init = tmp_path / "init"
    make_initial_checkpoint(init, "test", seed=0)
    cfg = dict(cache_dir=str(dense_cache), out_dir=str(tmp_path / "run"), init=str(init), steps=4,
               batch_size=2, lr=3e-3, save_every=2, log_every=1, eval_cache=str(dense_cache),
               eval_images=2, seed=0)
    result = train_vision(VisionConfig(**cfg), log=lambda m: None)
    assert result["step"] == 4 and set(result["eval"]) == {"colour", "shape", "pattern"}
    from safetensors.torch import load_file

    before = load_file(str(init / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("visual" in k for k in changed)  # only the vision tower moves
    messages = []
    result = train_vision(VisionConfig(**{**cfg, "steps": 6}), log=messages.append)
    assert result["step"] == 6 and messages[0].startswith("resumed")
    with pytest.raises(InputError, match="--init must be"):
        train_vision(VisionConfig(**{**cfg, "out_dir": str(tmp_path / "o2"), "init": str(tmp_path)}),
                     log=lambda m: None)


def _row(x1, y1, x2, y2, colour, shape, pattern="solid", wh=(3840, 2160)):
    A = dense.ATTRIBUTES
    return [x1 / wh[0], y1 / wh[1], x2 / wh[0], y2 / wh[1],
            A.index(colour), A.index(shape), A.index(pattern)]


def test_expected_region_hit_counts_what_a_field_limited_gse_can_tell_apart():
    sizes = StageSizes()
    rows = [_row(1000, 1000, 1030, 1030, "blue", "circle"),      # the target
            _row(3000, 1500, 3030, 1530, "blue", "square"),      # same colour, far away
            _row(1100, 1050, 1130, 1080, "red", "circle")]       # other colour, in the same crop
    gt = (1000, 1000, 1031, 1031)

    def hit(fields, question):
        return dense.expected_region_hit(rows, 0, fields, question, gt, sizes)

    assert hit(("colour",), "the blue object") == pytest.approx(0.5)
    assert hit((), "the blue object") == pytest.approx(2 / 3)
    assert hit(("colour", "shape"), "the blue circle") == 1.0
    # a field the question does not name about the target does not narrow the choice
    assert hit(("shape",), "the blue object") == pytest.approx(2 / 3)
    assert dense.named_values("the dotted blue object left of the red star", "colour") == {"blue", "red"}
    assert dense.named_values("the bluest thing", "colour") == set()


def test_seen_fields_recall_on_a_cache(tmp_path):
    from finers_rt.train.data import SampleCache, build_cache

    cache = SampleCache(build_cache(tmp_path / "c", seed=5, n_scenes=2, sizes=SIZES, lpr_crops=1))
    for fields in [(), ("colour",), ("colour", "shape", "pattern")]:
        got = dense.seen_fields_recall(cache, fields)
        assert "all" in got and set(got) <= {"all", "S", "XS", "XXS"}
        assert all(0.0 <= v <= 1.0 for v in got.values())
    # a crop larger than the scene holds every object: whatever the GSE picks is a hit
    cache.sizes = dataclasses.replace(cache.sizes, crop_min_side=4000)
    assert dense.seen_fields_recall(cache, ())["all"] == 1.0
    # the blind chooser misses here (objects outside a 128 px crop exist in every scene)
    cache.sizes = dataclasses.replace(cache.sizes, crop_min_side=128)
    assert dense.seen_fields_recall(cache, ())["all"] < 1.0
    with pytest.raises(InputError, match="unknown attribute fields"):
        dense.seen_fields_recall(cache, ("size",))
