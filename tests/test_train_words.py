"""Whole-word tokens (finers_rt.train.words, `finers-rt train words`)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from finers_rt.errors import InputError  # noqa: E402

QUESTION = "the dotted pink diamond in the top-left of the image"


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def words_dirs(tmp_path_factory):
    """(pointer checkpoint, the same with word tokens, report, source digest before)."""
    from finers_rt.export.pointer import add_pointer
    from finers_rt.train.model import make_initial_checkpoint
    from finers_rt.train.words import add_word_tokens

    root = tmp_path_factory.mktemp("words")
    stock = make_initial_checkpoint(root / "stock", "test", seed=0)
    torch.manual_seed(0)
    src = add_pointer(stock, root / "pointer")
    before = _digest(src)
    report = add_word_tokens(src, root / "words", log=lambda _m: None)
    return src, root / "words", report, before


def test_words_become_single_tokens_and_old_ids_stay(words_dirs):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from finers_rt.train.model import coordinate_token_map
    from finers_rt.train.words import default_words

    src, out, report, before = words_dirs
    assert _digest(src) == before  # the source folder is untouched
    old = json.loads((src / "tokenizer.json").read_text())
    new = json.loads((out / "tokenizer.json").read_text())
    n_bpe, shift = len(old["model"]["vocab"]), len(report["new_tokens"])
    # BPE tokens keep their ids, the new ones follow them, the added tokens move up past them
    for token, tid in old["model"]["vocab"].items():
        assert new["model"]["vocab"][token] == tid
    assert sorted(new["model"]["vocab"][t] for t in report["new_tokens"]) == \
        list(range(n_bpe, n_bpe + shift))
    for a, b in zip(old["added_tokens"], new["added_tokens"]):
        assert a["content"] == b["content"]
        assert b["id"] == (a["id"] if a["id"] < n_bpe else a["id"] + shift)
    cfg_old = json.loads((src / "config.json").read_text())
    cfg_new = json.loads((out / "config.json").read_text())
    assert cfg_new["image_token_id"] == cfg_old["image_token_id"] + shift
    assert cfg_new["text_config"]["eos_token_id"] == cfg_old["text_config"]["eos_token_id"] + shift
    ids_old = cfg_old["finers_pointer"]["coord_token_ids"]
    assert cfg_new["finers_pointer"]["coord_token_ids"] == [i if i < n_bpe else i + shift
                                                            for i in ids_old]
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(out))
    hf_old = AutoTokenizer.from_pretrained(str(src))
    coords_new, coords_old = coordinate_token_map(hf), coordinate_token_map(hf_old)
    assert sorted(coords_new.values()) == sorted(coords_old.values())
    assert sorted(coords_new) == sorted(cfg_new["finers_pointer"]["coord_token_ids"])
    for name in ("<|image_pad|>", "<|im_end|>", "<|vision_start|>"):
        assert hf.convert_tokens_to_ids(name) == hf_old.convert_tokens_to_ids(name) + shift
    for word in default_words():
        pieces = [p for p, _ in fast.pre_tokenizer.pre_tokenize_str(" " + word)]
        assert len(fast.encode(" " + word).ids) == len(pieces) <= 2, word
    assert hf(QUESTION)["input_ids"] == fast.encode(QUESTION).ids
    assert len(hf(QUESTION)["input_ids"]) < len(hf_old(QUESTION)["input_ids"])
    # the decoded text is the same string either way
    assert hf.decode(hf(QUESTION)["input_ids"]) == QUESTION
    # the prompts and answer formats are tokenized exactly as before apart from the words
    assert report["other_pieces_changed"] == []
    assert (out / "merges.txt").read_text().splitlines()[-len(report["merges"]):] == \
        [" ".join(m) for m in report["merges"]]


def test_new_rows_are_fragment_means_and_old_logits_are_unchanged(words_dirs):
    from tokenizers import Tokenizer

    from finers_rt.export.pointer import load_vlm

    src, out, report, _ = words_dirs
    a, b = load_vlm(src, dtype=torch.float32), load_vlm(out, dtype=torch.float32)
    ea, eb = a.get_input_embeddings().weight, b.get_input_embeddings().weight
    old_tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    n_bpe, shift = old_tok.get_vocab_size(with_added_tokens=False), len(report["new_tokens"])
    assert eb.shape[0] % 64 == 0 and eb.shape[0] >= ea.shape[0] + shift
    torch.testing.assert_close(eb[:n_bpe], ea[:n_bpe])
    torch.testing.assert_close(eb[n_bpe + shift: ea.shape[0] + shift], ea[n_bpe:])
    new_vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    token = "Ġdiamond"
    frags = [old_tok.token_to_id(t.value) for t in old_tok.model.tokenize(token)]
    assert len(frags) > 1
    torch.testing.assert_close(eb[new_vocab[token]], ea[frags].mean(0))
    torch.testing.assert_close(b.get_output_embeddings().weight[new_vocab[token]],
                               a.get_output_embeddings().weight[frags].mean(0))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == eb.shape[0]
    # text without the words: the same logits, each at its token's (moved) id
    ids = old_tok.encode("find the pen<|im_end|>").ids
    moved = [i if i < n_bpe else i + shift for i in ids]
    with torch.no_grad():
        la = a(input_ids=torch.tensor([ids])).logits[0]
        lb = b(input_ids=torch.tensor([moved])).logits[0]
    torch.testing.assert_close(lb[:, :n_bpe], la[:, :n_bpe])
    torch.testing.assert_close(lb[:, n_bpe + shift: la.shape[-1] + shift], la[:, n_bpe:])


def test_export_of_a_words_checkpoint_keeps_greedy_parity(words_dirs, tmp_path):
    pytest.importorskip("onnxruntime")
    from finers_rt.export.vlm import VlmExportOptions, export_vlm
    from finers_rt.vlm import VlmStage

    _, out, _, _ = words_dirs
    manifest = export_vlm(out, tmp_path / "stage", VlmExportOptions(
        role="gse", image_size_wh=(112, 84)))
    assert manifest.validation["greedy_tokens_equal"] is True
    stage = VlmStage.load(tmp_path / "stage")
    image = np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
    result = stage.generate(image, QUESTION, max_new_tokens=8)
    assert len(result.token_ids) > 0


def test_bad_requests_are_refused_without_touching_anything(words_dirs, tmp_path):
    from finers_rt.train.words import add_word_tokens

    src, out, _, before = words_dirs
    with pytest.raises(InputError, match="differ"):
        add_word_tokens(src, src, log=lambda _m: None)
    with pytest.raises(InputError, match="--force"):
        add_word_tokens(src, out, log=lambda _m: None)
    with pytest.raises(InputError, match="single words"):
        add_word_tokens(src, tmp_path / "x", ["two words"], log=lambda _m: None)
    with pytest.raises(InputError, match="HF folder"):
        add_word_tokens(tmp_path, tmp_path / "y", log=lambda _m: None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "tokenizer.json").write_text("not json")
    with pytest.raises(InputError, match="cannot read"):
        add_word_tokens(broken, tmp_path / "z", log=lambda _m: None)
    assert _digest(src) == before
    assert not (tmp_path / "x").exists()
