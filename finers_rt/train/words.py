"""Whole-word tokens for the words a question is made of (`finers-rt train words`).

The finers-tiny tokenizer is a 640-merge byte-level BPE trained on the prompt texts: most of
the words a question names its target with reach the LM as fragments (' diamond' is seven
tokens, ' pink' and ' purple' both start with ' p'), so a 4-layer LM has to compose them
before it can carry the word to the position that writes the first coordinate. Real
Qwen2.5-VL has a 151k vocabulary in which these are single tokens.

`add_word_tokens` appends BPE merges (lowest priority, after all existing ones) that join the
fragments of each given word into one token and gives the new tokens the BPE ids right after
the old ones. The added tokens (Qwen specials, coordinate tokens) move up by the number of new
tokens, as in a tokenizer trained with the larger vocabulary: the `tokenizers` library numbers
added tokens after the BPE vocabulary whatever ids the file gives them. Every id that names
them moves with them: the config's `*_token_id(s)` (including the pointer's coordinate ids),
the generation config, tokenizer_config.json and added_tokens.json. The embedding and LM-head
rows are permuted to match, and each new row starts as the mean of its fragments' rows. The
result is an ordinary HF folder: the tokenizer is still a plain BPE (tokenizer.json,
vocab.json, merges.txt agree), and export and runtime take it as they take any checkpoint.

Appended merges can also join the same fragments inside other words (a chain that builds
' dotted' from ' d' + 'ot' + ... creates ' d' + 'ot' for every word starting that way); the
report lists every other piece of the prompts and answer formats whose tokens changed
(`other_pieces_changed`), so this is measured, not assumed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from finers_rt.errors import InputError


def default_words() -> list[str]:
    """The words synthetic questions name targets and answers with: colours, shapes, patterns,
    image-region and direction words."""
    from finers_rt.synth.objects import COLORS, PATTERNS, SHAPES
    from finers_rt.synth.questions import DIRECTIONS, REGIONS

    words: list[str] = []
    for group in (tuple(COLORS), tuple(SHAPES), tuple(PATTERNS), REGIONS, DIRECTIONS,
                  ("object", "image", "side")):
        for phrase in group:
            for word in phrase.split():
                if word not in words:
                    words.append(word)
    return words


def _pieces(tok, text: str) -> list[str]:
    """The byte-level pre-tokens of `text` (what BPE sees)."""
    return [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def _bpe(tok, piece: str) -> list[str]:
    return [t.value for t in tok.model.tokenize(piece)]


def plan_merges(tokenizer_json: dict[str, Any], words: Iterable[str]) -> tuple[list[list[str]], list[str]]:
    """(new merges, new tokens) that make ' word' one token per pre-token piece for every
    word ('top-left' is two pieces, ' top' and '-left'), added to the BPE model of
    `tokenizer_json` in place with ids len(vocab), len(vocab) + 1, ... (the caller moves the
    added tokens up). Words that are one token already add nothing."""
    from tokenizers import Tokenizer

    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    merges: list = tokenizer_json["model"]["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    probe = {k: v for k, v in tokenizer_json.items() if k != "added_tokens"}
    probe["added_tokens"] = []
    new_merges: list[list[str]] = []
    new_tokens: list[str] = []
    for word in words:
        word = word.strip()
        if not word or any(c.isspace() for c in word):
            raise InputError(f"word tokens must be single words without spaces, got {word!r}")
        for _ in range(64):  # each pass adds one merge; a word has fewer than 64 bytes here
            tok = Tokenizer.from_str(json.dumps(probe))
            pieces = _pieces(tok, " " + word)
            multi = [p for p in pieces if len(_bpe(tok, p)) > 1]
            if not multi:
                break
            parts = _bpe(tok, multi[0])
            pair = [parts[0], parts[1]]
            joined = parts[0] + parts[1]
            new_merges.append(pair)
            merges.append(pair if as_pairs else f"{pair[0]} {pair[1]}")
            if joined not in vocab:
                vocab[joined] = len(vocab)
                new_tokens.append(joined)
        else:
            raise InputError(f"could not make {word!r} a single token")
    return new_merges, new_tokens


def _remap_ids(obj: Any, remap: Callable[[int], int]) -> Any:
    """Every `*_token_id` / `*_token_ids` value (int or list of ints) in a config dict, remapped."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key.endswith(("_token_id", "_token_ids")) and value is not None:
                out[key] = [remap(v) for v in value] if isinstance(value, list) else remap(value)
            else:
                out[key] = _remap_ids(value, remap)
        return out
    if isinstance(obj, list):
        return [_remap_ids(v, remap) for v in obj]
    return obj


def reference_texts(words: Iterable[str]) -> list[str]:
    """Texts whose tokenization the report compares: the GSE / LPR prompts of every question
    type around a sample question, the answer formats, and each word in a sentence."""
    from finers_rt.prompts import DEFAULT_TEMPLATES
    from finers_rt.train.data import THINK_TEXT

    texts = []
    for kind in ("referring", "reasoning", "option"):
        texts.append(DEFAULT_TEMPLATES.gse[kind].format("the striped red star", "A. red B. blue"))
        texts.append(DEFAULT_TEMPLATES.lpr[kind].format("the striped red star", "A. red B. blue"))
    texts.append(THINK_TEXT + "<answer>{'bbox': [10,100,200,210], 'response': 'The object is found.'}</answer>")
    texts.extend(f"the {w} object" for w in words)
    return texts


def add_word_tokens(src: str | Path, out: str | Path, words: Iterable[str] | None = None,
                    force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write `src` (an HF Qwen2.5-VL folder, stock or pointer) to `out` with one token per
    word (see the module doc). Returns a report: new tokens, merges, vocabulary sizes and the
    reference-text pieces whose tokenization changed."""
    import torch
    from tokenizers import Tokenizer

    from finers_rt.export.pointer import load_vlm
    from finers_rt.train.checkpoint import copy_processor_files

    src, out = Path(src), Path(out)
    tok_path = src / "tokenizer.json"
    if not (src / "config.json").is_file() or not tok_path.is_file():
        raise InputError(f"--init must be an HF folder with config.json and tokenizer.json, got '{src}'")
    if out.resolve() == src.resolve():
        raise InputError("--out must differ from --init (the source folder is never overwritten)")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it")
    words = list(default_words() if words is None else words)
    if not words:
        raise InputError("no words given")
    try:
        data = json.loads(tok_path.read_text())
        old_tok = Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # corrupt or foreign tokenizer file
        raise InputError(f"cannot read {tok_path}: {exc}") from None
    if data.get("model", {}).get("type") != "BPE":
        raise InputError(f"{tok_path} is not a BPE tokenizer; word tokens need BPE merges")

    bpe_size = len(data["model"]["vocab"])
    if sorted(data["model"]["vocab"].values()) != list(range(bpe_size)):
        raise InputError(f"{tok_path}: BPE ids are not 0..{bpe_size - 1}; cannot extend it")
    if (data.get("post_processor") or {}).get("type") == "TemplateProcessing":
        raise InputError(f"{tok_path}: a template post-processor holds token ids; not supported")
    merges, new_tokens = plan_merges(data, words)
    shift = len(new_tokens)

    def remap(tid: int) -> int:  # old id -> new id: the added tokens move up past the new ones
        return int(tid) if int(tid) < bpe_size else int(tid) + shift

    for added in data.get("added_tokens", []):
        added["id"] = remap(added["id"])
    vocab = data["model"]["vocab"]
    new_tok = Tokenizer.from_str(json.dumps(data))
    for added in data.get("added_tokens", []):
        if new_tok.token_to_id(added["content"]) != added["id"]:
            raise InputError(f"{tok_path}: added token {added['content']!r} did not keep its place")

    seen = {p for w in words for p in _pieces(new_tok, " " + w)}  # the words' own pieces
    changed = []
    for text in reference_texts(words):
        for piece in _pieces(old_tok, text):
            before, after = _bpe(old_tok, piece), _bpe(new_tok, piece)
            if before != after and piece not in seen:
                seen.add(piece)
                changed.append({"piece": piece, "before": before, "after": after})

    model = load_vlm(src, dtype=torch.float32)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    old_rows = old_in.shape[0]
    rows = -(-(old_rows + shift) // 64) * 64
    new_in = torch.zeros(rows, old_in.shape[1])
    new_out = torch.zeros(rows, old_out.shape[1])
    index = torch.tensor([remap(i) for i in range(old_rows)])
    new_in[index], new_out[index] = old_in, old_out
    for token in new_tokens:
        frags = [old_tok.token_to_id(t) for t in _bpe(old_tok, token)]
        if any(f is None or f >= bpe_size for f in frags):
            raise InputError(f"fragment of {token!r} not in the source BPE vocabulary")
        new_in[vocab[token]] = old_in[frags].mean(0)
        new_out[vocab[token]] = old_out[frags].mean(0)
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_in)
        model.get_output_embeddings().weight.copy_(new_out)

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    copy_processor_files(src, tmp)  # then every file that names token ids is rewritten below
    # token ids in the configs move with the added tokens
    config = _remap_ids(json.loads((src / "config.json").read_text()), remap)
    config["vocab_size"] = rows
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["vocab_size"] = rows
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        gen = _remap_ids(json.loads((src / "generation_config.json").read_text()), remap)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok_cfg_path = tmp / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        tok_cfg = json.loads(tok_cfg_path.read_text())
        if isinstance(tok_cfg.get("added_tokens_decoder"), dict):
            tok_cfg["added_tokens_decoder"] = {str(remap(int(k))): v for k, v
                                               in tok_cfg["added_tokens_decoder"].items()}
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    added_path = tmp / "added_tokens.json"
    if added_path.is_file():
        added = {k: remap(v) for k, v in json.loads(added_path.read_text()).items()}
        added_path.write_text(json.dumps(added, indent=2, ensure_ascii=False) + "\n")
    (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    if (src / "vocab.json").is_file():
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    if (src / "merges.txt").is_file():
        lines = ["#version: 0.2"] + [m if isinstance(m, str) else f"{m[0]} {m[1]}"
                                     for m in data["model"]["merges"]]
        (tmp / "merges.txt").write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    report = {"words": words, "new_tokens": new_tokens, "merges": merges,
              "vocab_rows": [old_rows, rows], "other_pieces_changed": changed}
    log(f"words: {len(words)} words, {len(new_tokens)} new tokens, {len(merges)} merges, "
        f"embedding rows {old_rows} -> {rows}; {len(changed)} other pieces of the prompts and "
        f"answers tokenized differently -> {out}")
    return report
