"""Attention supervision of question reading (finers_rt.train.reading, `--read-attention`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from finers_rt.errors import InputError  # noqa: E402
from finers_rt.train import dense, reading  # noqa: E402
from finers_rt.train.data import StageSizes  # noqa: E402

SIZES = StageSizes(gse_size_wh=(112, 84), lpr_size_wh=(56, 56), scene_size_wh=(640, 360),
                   region_side=256, crop_min_side=128)
QUESTIONS = ["the dotted pink diamond in the top-left of the image", "the red object"]


def _labels(question: str) -> list[int]:
    """QueryHead labels of a question naming values directly (test helper)."""
    out = []
    for _name, part in dense.ATTRIBUTE_GROUPS:
        values = dense.ATTRIBUTES[part]
        named = [i for i, v in enumerate(values) if f" {v} " in f" {question} "]
        out.append(named[0] if named else -1)
    return out


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory):
    from finers_rt.export.checkpoints import load_reference
    from finers_rt.train.batch import Collator
    from finers_rt.train.model import make_initial_checkpoint
    from finers_rt.train.tie import region_label

    folder = make_initial_checkpoint(tmp_path_factory.mktemp("reading") / "m", "test", seed=0)
    model, processor = load_reference(folder)
    collator = Collator(processor)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (84, 112, 3), dtype=np.uint8) for _ in QUESTIONS]
    batch = collator(images, QUESTIONS, ["<think>x</think>", "<think>x</think>"])
    batch.query_labels = torch.tensor([_labels(q) for q in QUESTIONS])
    batch.region_labels = torch.tensor([region_label(q) for q in QUESTIONS])
    return model, collator, batch


def test_named_words_and_their_positions(model_and_batch):
    _model, collator, batch = model_and_batch
    words = reading.named_words(batch.query_labels, batch.region_labels)
    assert words == [["pink", "diamond", "dotted", "top-left"], ["red"]]
    mask = reading.word_positions(batch.input_ids, batch.answer_pos, words, collator.tokenizer)
    tok = collator.tokenizer
    for b, sample_words in enumerate(words):
        marked = tok.decode(batch.input_ids[b][mask[b]].tolist())
        for word in sample_words:
            assert word in marked
        assert "the" not in marked and "image" not in marked
        assert int(mask[b, int(batch.answer_pos[b]) + 1:].sum()) == 0


def test_recomputed_logits_are_the_layers_own_attention(model_and_batch):
    model, _collator, batch = model_and_batch
    configs = [c for c in (model.config, model.config.text_config,
                           getattr(model.config, "vision_config", None)) if c is not None]
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(**batch.model_inputs(), output_hidden_states=True, output_attentions=True)
            ap = batch.answer_pos
            n_layers = len(out.attentions)
            # both samples with two query positions each, and the shorter (padded) one alone
            for rows, pos in ((torch.tensor([0, 1]), torch.stack([ap[[0, 0]], ap[[1, 1]] - 3])),
                              (torch.tensor([1]), ap[[1]][:, None])):
                for layer, head in ((n_layers - 1, 0), (0, 1)):
                    logits = reading.attention_logits(model, out.hidden_states[layer], batch,
                                                      layer, head, rows, pos)
                    want = out.attentions[layer][rows[:, None], head, pos]
                    torch.testing.assert_close(torch.softmax(logits, -1), want, atol=1e-5,
                                               rtol=1e-4)
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl


def test_head_outputs_sum_to_the_layers_attention_output(model_and_batch):
    model, _collator, batch = model_and_batch
    lm = model.model.language_model
    layer = len(lm.layers) - 1
    seen = {}
    hook = lm.layers[layer].self_attn.register_forward_hook(
        lambda _m, _i, out: seen.setdefault("out", out[0]))
    try:
        with torch.no_grad():
            out = model(**batch.model_inputs(), output_hidden_states=True)
    finally:
        hook.remove()
    rows, pos = torch.arange(2), batch.answer_pos
    with torch.no_grad():
        total = sum(reading.attention_logits(model, out.hidden_states[layer], batch, layer, h,
                                             rows, pos[:, None], with_output=True)[1][:, 0]
                    for h in range(lm.config.num_attention_heads))
    torch.testing.assert_close(total, seen["out"][rows, pos], atol=1e-4, rtol=1e-4)


def test_the_loss_moves_the_real_attention_onto_the_words(model_and_batch):
    import copy

    model, collator, batch = model_and_batch
    model = copy.deepcopy(model)
    words = reading.named_words(batch.query_labels, batch.region_labels)
    mask = reading.word_positions(batch.input_ids, batch.answer_pos, words, collator.tokenizer)

    def mass():
        with torch.no_grad():
            out = model(**batch.model_inputs(), output_hidden_states=True)
            rows = torch.arange(2)
            logits = reading.attention_logits(model, out.hidden_states[0], batch, 0, 0, rows,
                                              batch.answer_pos[:, None])[:, 0]
            return (torch.softmax(logits, -1) * mask).sum(-1)

    before = mass()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        out = model(**batch.model_inputs(), output_hidden_states=True)
        loss = reading.reading_losses(model, out.hidden_states, batch, collator,
                                      batch.answer_pos)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mass()
    assert float(before.max()) < 0.5 and float(after.min()) > 0.8, (before, after)


def test_sft_option_logs_the_loss_and_checks_its_settings(tmp_path):
    from finers_rt.train.data import build_cache
    from finers_rt.train.sft import SftConfig, train_sft

    cache = build_cache(tmp_path / "cache", seed=5, n_scenes=2, sizes=SIZES, lpr_crops=1)
    base = dict(stage="gse", cache_dir=str(cache), init="test", batch_size=2, lr=3e-3,
                warmup=1, save_every=2, log_every=1, seed=1, read_attention=1.0)
    for name, extra in (("plain", {}), ("blank", {"blank_image": True}), ("lpr", {"stage": "lpr"})):
        out = tmp_path / name
        train_sft(SftConfig(out_dir=str(out), steps=2, **{**base, **extra}), log=lambda m: None)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert all("read" in r for r in log) and any(r["read"] > 0 for r in log)
        assert any(r["read_value"] > 0 for r in log)  # the routed head must carry the words
    with pytest.raises(InputError, match="questions-per-image"):
        SftConfig(**{**base, "questions_per_image": 2, "out_dir": str(tmp_path / "x")})
    with pytest.raises(InputError, match=">= 0"):
        SftConfig(**{**base, "read_attention": -1.0, "out_dir": str(tmp_path / "x")})
    with pytest.raises(InputError, match="head must be"):
        train_sft(SftConfig(**{**base, "read_attention_head": 99, "out_dir": str(tmp_path / "h")}),
                  log=lambda m: None)
