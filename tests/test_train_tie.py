"""The tied joint pointer (finers_rt.train.tie, `train gse --tie-weight`)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from finers_rt.errors import InputError  # noqa: E402
from finers_rt.train import dense, tie  # noqa: E402
from finers_rt.train.data import StageSizes  # noqa: E402

SIZES = StageSizes(gse_size_wh=(112, 84), lpr_size_wh=(56, 56), scene_size_wh=(640, 360),
                   region_side=256, crop_min_side=128)


def test_region_label_reads_the_description_region():
    assert tie.region_label("the red star in the top-left of the image") == 0
    assert tie.region_label("What colour is the dotted star on the right side of the image?") == 5
    assert tie.region_label("the red star left of the blue circle") == -1


def test_cell_regions_split_the_grid_in_thirds_by_cell_centre():
    regions = tie.cell_regions(3, 6).view(3, 6)
    assert regions.tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [6, 6, 7, 7, 8, 8]]
    # 13 x 23 (a 644x364 GSE): the middle third of the columns is 8..14
    row = tie.cell_regions(13, 23).view(13, 23)[0]
    assert row[7] == 0 and row[8] == 1 and row[14] == 1 and row[15] == 2


def test_query_targets_mark_the_named_values_and_region():
    labels = torch.tensor([[2, -1, 1], [-1, -1, -1]])  # colour 2, pattern 1; nothing named
    out = tie.query_targets(labels, torch.tensor([4, -1]))
    shapes = len(dense.FIELD_VALUES["shape"])
    colours = len(dense.FIELD_VALUES["colour"])
    assert out.shape == (2, tie.TIE_DIMS)
    assert out[0].nonzero().flatten().tolist() == [2, colours + shapes + 1, tie.NUM_ATTRIBUTES + 4]
    assert float(out[0].max()) == tie.TIE_SCALE and float(out[1].abs().sum()) == 0.0


def test_a_tied_head_scores_the_conjunction_of_the_named_values():
    """Train only a joint pointer head's key / query by the tie losses on random states that
    encode the cell labels; the dot product of the query of 'colour A + region R' then puts the
    most attention on the one cell that has both, ahead of cells with only one of them."""
    from finers_rt.export.pointer import PointerHead

    torch.manual_seed(0)
    settings = {"coord_token_ids": [1], "coord_values": [0], "cell_px": 28, "num_cells": 9,
                "joint": True, "shift": False, "cell_keys": True}
    head = PointerHead(hidden=48, num_kv_heads=2, head_dim=40, vocab_size=4, settings=settings)
    n_rows, n_cols = 6, 9
    labels = torch.zeros(n_rows * n_cols, tie.NUM_ATTRIBUTES)
    labels[torch.arange(n_rows * n_cols), torch.arange(n_rows * n_cols) % 10] = 1.0  # colours
    states_of = torch.randn(tie.NUM_ATTRIBUTES, 48)  # a state is the sum of its labels' vectors
    states = (labels @ states_of)[None]
    spans = torch.tensor([[0, n_rows * n_cols]])
    grid = torch.tensor([[1, 2 * n_rows, 2 * n_cols]])
    questions = torch.randn(6, 48)  # per question a state; its targets below
    q_labels = torch.tensor([[3, -1, -1], [7, -1, -1], [3, -1, -1], [0, -1, -1],
                             [5, -1, -1], [3, -1, -1]])
    q_regions = torch.tensor([4, 0, -1, 8, 2, 4])
    targets = tie.query_targets(q_labels, q_regions)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        loss = (tie.key_loss(head, states, spans, grid, labels[None], 2)
                + tie.query_loss(head, questions, targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3
    with torch.no_grad():
        keys = tie.image_keys(head, states[0], n_rows, n_cols)
        score = keys @ head.query(questions[0])  # colour 3 in the centre region
    best = int(score.argmax())
    regions = tie.cell_regions(n_rows, n_cols)
    assert labels[best, 3] == 1 and int(regions[best]) == 4


def test_sft_with_the_tie_trains_keys_and_queries_and_adds_cell_keys(tmp_path):
    from finers_rt.export.pointer import has_cell_keys, is_joint
    from finers_rt.train.data import build_cache
    from finers_rt.train.sft import SftConfig, train_sft

    from finers_rt.train.model import make_initial_checkpoint

    cache = build_cache(tmp_path / "cache", seed=5, n_scenes=3, sizes=SIZES, lpr_crops=1)
    # the tie needs a pointer width >= TIE_DIMS: finers-tiny's (64), not the "test" config's (16)
    init = make_initial_checkpoint(tmp_path / "tiny", "finers-tiny", seed=0)
    base = dict(stage="gse", cache_dir=str(cache), init=str(init), batch_size=4, lr=3e-3,
                warmup=1, save_every=2, log_every=1, seed=1, model_class="pointer",
                joint_pointer=True, tie_weight=1.0)
    for name, extra in (("plain", {}), ("shared", {"questions_per_image": 2}),
                        ("blank", {"blank_image": True}),
                        ("all_coords", {"questions_per_image": 2, "tie_coords": 4})):
        out = tmp_path / name
        train_sft(SftConfig(out_dir=str(out), steps=2, **base, **extra), log=lambda m: None)
        assert is_joint(out / "checkpoint") and has_cell_keys(out / "checkpoint")
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert all(r["tie_query"] > 0 for r in log)
        if name == "blank":  # no real image: the question side only
            assert all(r["tie_key"] == 0 for r in log)
        else:
            assert all(r["tie_key"] > 0 for r in log)
    result = train_sft(SftConfig(out_dir=str(tmp_path / "plain"), steps=3, **base),
                       log=lambda m: None)
    assert result["step"] == 3  # resumes
    with pytest.raises(InputError, match="--joint-pointer"):
        SftConfig(**{**base, "joint_pointer": False, "out_dir": str(tmp_path / "x")})
    with pytest.raises(InputError, match="pointer width"):
        train_sft(SftConfig(**{**base, "init": "test", "out_dir": str(tmp_path / "narrow")}),
                  log=lambda m: None)
    with pytest.raises(InputError, match="tie-coords"):
        SftConfig(**{**base, "tie_coords": 5, "out_dir": str(tmp_path / "x")})
    with pytest.raises(InputError, match="tie-coords"):
        SftConfig(**{**base, "stage": "lpr", "tie_coords": 9, "out_dir": str(tmp_path / "x")})
    with pytest.raises(InputError, match="tie weight"):
        SftConfig(**{**base, "tie_weight": -1.0, "out_dir": str(tmp_path / "x")})


def test_lpr_crop_labels_hold_the_objects_inside_the_crop_in_crop_fractions():
    rows = [[0.10, 0.10, 0.20, 0.20, 1, 20, 30],   # inside the crop
            [0.24, 0.24, 0.30, 0.30, 2, 21, 31],   # straddles its top-left corner
            [0.60, 0.60, 0.70, 0.70, 3, 22, 32]]   # outside
    out = dense.crop_rows(rows, (250, 250, 1250, 1250), (5000, 5000))
    assert len(out) == 2
    assert out[0] == pytest.approx([0.25, 0.25, 0.75, 0.75, 1, 20, 30])
    assert out[1] == pytest.approx([0.95, 0.95, 1.0, 1.0, 2, 21, 31])
    with pytest.raises(InputError, match="no pixels"):
        dense.crop_rows(rows, (10, 10, 10, 20), (5000, 5000))


def test_lpr_sft_with_the_tie_labels_the_crop_and_leaves_the_region_untied(tmp_path):
    from finers_rt.export.pointer import has_cell_keys, is_joint
    from finers_rt.train.data import SampleCache, build_cache
    from finers_rt.train.model import make_initial_checkpoint
    from finers_rt.train.sft import SftConfig, stage_object_rows, train_sft

    folder = build_cache(tmp_path / "cache", seed=5, n_scenes=3, sizes=SIZES, lpr_crops=1,
                         negative_crops=1)
    cache = SampleCache(folder)
    # every positive crop's labels hold its target, where the crop's GT box is
    w, h = SIZES.lpr_size_wh
    for i, entry in enumerate(cache.entries):
        box = entry["lpr"][0]["box_stage"]
        rows = stage_object_rows(cache, "lpr", i, 0)
        centre = ((box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h)
        assert any(r[0] <= centre[0] <= r[2] and r[1] <= centre[1] <= r[3] for r in rows)
        assert all(0.0 <= v <= 1.0 for r in rows for v in r[:4])
        if cache.negative_count(i):
            stage_object_rows(cache, "lpr", i, -1)  # a negative crop's rows come from its meta
    init = make_initial_checkpoint(tmp_path / "tiny", "finers-tiny", seed=0)
    out = tmp_path / "lpr"
    train_sft(SftConfig(stage="lpr", cache_dir=str(folder), init=str(init), batch_size=4,
                        lr=3e-3, warmup=1, save_every=2, log_every=1, seed=1,
                        model_class="pointer", joint_pointer=True, tie_weight=1.0, tie_coords=8,
                        negative_fraction=0.5, out_dir=str(out), steps=2), log=lambda m: None)
    assert is_joint(out / "checkpoint") and has_cell_keys(out / "checkpoint")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["tie_key"] > 0 and r["tie_query"] > 0 for r in log)


def test_the_lpr_tie_pushes_the_query_region_dims_to_zero(monkeypatch):
    from types import SimpleNamespace

    from finers_rt.train.sft import _tie_losses

    head = SimpleNamespace(query=torch.nn.Linear(4, tie.TIE_DIMS, bias=False))
    last = torch.randn(1, 6, 4)
    batch = SimpleNamespace(query_labels=torch.tensor([[0, -1, -1]]),
                            region_labels=torch.tensor([3]), answer_pos=torch.tensor([2]),
                            cell_labels=None)
    seen = []
    monkeypatch.setattr(tie, "query_loss",
                        lambda _h, _states, targets: seen.append(targets) or targets.sum())
    for stage in ("gse", "lpr"):
        _tie_losses(head, batch, batch, last, last, torch.tensor([[4]]), None, stage)
    region = slice(tie.NUM_ATTRIBUTES, tie.TIE_DIMS)
    assert float(seen[0][:, region].sum()) == 2 * tie.TIE_SCALE  # GSE: named region, 2 positions
    assert float(seen[1][:, region].abs().sum()) == 0.0          # LPR: untied
    assert float(seen[1][:, 0].sum()) == 2 * tie.TIE_SCALE       # the named colour still is


def _agree_worker(rank: int, port: int, out) -> None:
    import os

    from finers_rt.train.sft import agree_any, agree_min

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out.put((rank, agree_min(100 + rank, 2), agree_any(rank == 1, 2), agree_any(False, 2)))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_the_fitted_step_count_and_on_stopping():
    """Under torchrun each rank fits --time-limit from its own speed and checks its own clock;
    the ranks must take the same decision or one waits forever in the next collective."""
    import socket

    import torch.multiprocessing as mp

    from finers_rt.train.sft import agree_any, agree_min

    assert agree_min(7, 1) == 7 and agree_any(True, 1) and not agree_any(False, 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert results == [(0, 100, True, False), (1, 100, True, False)]


def test_the_token_loss_does_not_train_the_tied_dims():
    """With `tied_dims` set (training), the pointer's own attention reads the tied key / query
    dims detached: a loss on its output moves only the other dims; in eval mode (export, HF
    generate) nothing changes."""
    from finers_rt.export.pointer import PointerHead, pointer_axis_probs, pointer_kv

    settings = {"coord_token_ids": [1], "coord_values": [0], "cell_px": 28, "num_cells": 9,
                "joint": True, "shift": False, "cell_keys": True}
    torch.manual_seed(0)
    head = PointerHead(hidden=48, num_kv_heads=2, head_dim=40, vocab_size=4, settings=settings)
    hidden = torch.randn(1, 6, 48)
    pos = torch.stack([torch.zeros(1, 6), torch.arange(6.0)[None] % 3, torch.arange(6.0)[None] % 2])
    mask = torch.zeros(1, 1, 6, 6)

    def grads(training: bool, tied: int):
        head.zero_grad()
        head.train(training)
        head.tied_dims = tied
        keys, values = pointer_kv(head, hidden, pos.long())
        probs = pointer_axis_probs(head, hidden, keys, values, mask)
        (probs[:, 0, :, 0].sum()).backward()
        return head.key.weight.grad.clone(), head.query.weight.grad.clone(), head.cell_key.grad.clone()

    key, query, cells = grads(True, 32)
    assert float(key[:32].abs().sum()) == 0 and float(key[32:].abs().sum()) > 0
    assert float(query[:32].abs().sum()) == 0 and float(query[32:].abs().sum()) > 0
    assert float(cells[..., :32].abs().sum()) == 0
    key, query, _ = grads(False, 32)  # eval mode: the tie is a training rule only
    assert float(key[:32].abs().sum()) > 0 and float(query[:32].abs().sum()) > 0
