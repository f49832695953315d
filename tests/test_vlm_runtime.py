"""VLM stage runtime: KV buffer, prefix cache, and greedy parity with HF `generate`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest

from finers_rt.errors import EngineProfileError, InputError, ManifestError
from finers_rt.kvcache import KVBuffer, PrefixCache, PrefixEntry, image_digest
from finers_rt.vlm import causal_mask

QUESTION = "What color is the small sign?"


def _image(seed: int, shape=(150, 170, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---- KV buffer --------------------------------------------------------------------------------


def test_kv_buffer_views_are_zero_copy_and_writes_land_in_place():
    buffer = KVBuffer(num_layers=2, batch=1, max_len=10, num_kv_heads=2, head_dim=4)
    new = np.arange(3 * 2 * 4, dtype=np.float32).reshape(1, 3, 2, 4)
    buffer.write(1, 0, new, -new)
    buffer.write(0, 0, new, new)
    assert buffer.length == 3
    keys, values = buffer.past_views()[1]
    assert keys.shape == (1, 3, 2, 4) and keys.flags.c_contiguous
    assert np.shares_memory(keys, buffer.keys[1]) and np.array_equal(values, -new)
    step = np.full((1, 1, 2, 4), 7.0, np.float32)
    slot_k, _ = buffer.slot_views(3, 1)[0]
    assert np.shares_memory(slot_k, buffer.keys[0]) and slot_k.flags.c_contiguous
    buffer.write(0, 3, step, step)
    assert buffer.length == 4 and np.array_equal(buffer.past_views()[0][0][:, 3], step[:, 0])
    with pytest.raises(InputError, match=r"exceed the buffer of 10"):
        buffer.write(0, 9, new, new)
    with pytest.raises(InputError, match=r"new K/V must be \[1, 3, 2, 4\]"):
        buffer.write(0, 0, new[:, :, :1], new[:, :, :1])


def test_kv_buffer_prefix_round_trip_and_broadcast():
    source = KVBuffer(2, 1, 8, 1, 2)
    for layer in range(2):
        data = np.full((1, 5, 1, 2), layer + 1.0, np.float32)
        source.write(layer, 0, data, -data)
    keys, values = source.copy_prefix(5)
    assert not np.shares_memory(keys[0], source.keys[0])
    batch = KVBuffer(2, 3, 8, 1, 2)
    batch.load_prefix(keys, values)
    assert batch.length == 5 and np.all(batch.keys[1][:, :5] == 2.0) and np.all(batch.values[0][:, :5] == -1.0)
    with pytest.raises(InputError, match="3 layers"):
        batch.load_prefix(keys + keys[:1], values + values[:1])
    with pytest.raises(InputError, match="must be positive"):
        KVBuffer(0, 1, 8, 1, 2)


def test_kv_buffer_head_major_layout():
    buffer = KVBuffer(num_layers=2, batch=2, max_len=6, num_kv_heads=3, head_dim=4, layout="bnsh")
    assert buffer.keys[0].shape == (2, 3, 6, 4) and buffer.max_len == 6
    new = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    buffer.write(1, 0, new, -new)
    assert buffer.length == 2 and np.array_equal(buffer.past_views()[1][0], new)
    keys, values = buffer.copy_prefix(2, row=1)
    assert keys[1].shape == (1, 3, 2, 4) and np.array_equal(values[1][0], -new[1])
    assert keys[1].flags.c_contiguous and not np.shares_memory(keys[1], buffer.keys[1])
    buffer.reset()
    buffer.load_prefix(keys, values)  # one row broadcast to both
    assert np.array_equal(buffer.keys[1][0, :, :2], new[1]) and np.array_equal(buffer.keys[1][1, :, :2], new[1])
    buffer.claim(2, 3)  # any batch: the graph gets whole rows
    assert buffer.length == 5
    with pytest.raises(InputError, match="exceed"):
        buffer.claim(5, 2)
    with pytest.raises(InputError, match="layout"):
        KVBuffer(1, 1, 4, 1, 2, layout="nhsd")


def test_causal_mask_is_additive_and_offset_by_past():
    mask = causal_mask(batch=2, seq=3, past=2)
    assert mask.shape == (2, 1, 3, 5) and mask.dtype == np.float32
    allowed = mask[0, 0] == 0.0
    assert allowed.tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                [True, True, True, True, True]]
    assert np.all(mask[0, 0][~allowed] == np.finfo(np.float32).min)
    assert np.all(causal_mask(1, 1, 7) == 0.0)


# ---- prefix cache -----------------------------------------------------------------------------


def _entry(num_bytes_per_layer: int) -> PrefixEntry:
    floats = num_bytes_per_layer // 4
    kv = np.zeros((1, floats, 1, 1), np.float32)
    return PrefixEntry((kv,), (kv.copy(),), floats, 0, np.zeros((0, 4), np.float32))


def test_prefix_cache_lru_bytes_and_counters():
    cache = PrefixCache(max_bytes=4000)
    a, b, c = (PrefixCache.make_key("gse", d, (1920, 1080)) for d in ("a", "b", "c"))
    assert cache.put(a, _entry(800)) and cache.put(b, _entry(800))  # 1600 bytes each
    assert cache.nbytes == 3200 and len(cache) == 2
    assert cache.get(a) is not None  # a is now most recent
    assert cache.put(c, _entry(800))  # evicts b (least recently used)
    assert b not in cache and a in cache and c in cache
    assert cache.get(b) is None
    assert cache.stats() == {"entries": 2, "bytes": 3200, "max_bytes": 4000, "hits": 1, "misses": 1,
                             "evictions": 1}
    assert not cache.put(b, _entry(4000))  # larger than the budget: refused, nothing evicted
    assert len(cache) == 2
    assert PrefixCache.make_key("gse", "a", (1920, 1080)) != PrefixCache.make_key("lpr", "a", (1920, 1080))
    assert PrefixCache.make_key("lpr", "a", (512, 512)) != PrefixCache.make_key("lpr", "a", (1920, 1080))
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_prefix_cache_is_consistent_under_threads():
    cache = PrefixCache(max_bytes=10 * 800)

    def work(worker: int) -> None:
        for i in range(200):
            key = ("s", f"{(worker * 7 + i) % 23}", (1, 1))
            if cache.get(key) is None:
                cache.put(key, _entry(400))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == 800
    assert stats["entries"] == 10 and stats["bytes"] == 8000


def test_image_digest_depends_on_content_and_shape():
    image = _image(0, (8, 8, 3))
    assert image_digest(image) == image_digest(image.copy())
    changed = image.copy()
    changed[3, 3, 1] ^= 1
    assert image_digest(changed) != image_digest(image)
    assert image_digest(image.reshape(4, 16, 3)) != image_digest(image)
    assert image_digest(np.asfortranarray(image)) == image_digest(image)


# ---- exported stages (torch side builds them once) --------------------------------------------


def _export(hf_dir, out_dir, size_wh, kv_cache="shared"):
    from finers_rt.export.vlm import VlmExportOptions, export_vlm

    export_vlm(hf_dir, out_dir, VlmExportOptions(role="generic", image_size_wh=size_wh, kv_cache=kv_cache))
    return out_dir


@pytest.fixture(scope="module")
def stages(make_vlm_checkpoint, tmp_path_factory):
    """{name: (hf_dir, stage_dir)}: GQA 3:1 without penalty, and a 2-head / 1-KV-head model with an
    (8, 4, 4) M-RoPE split and repetition_penalty 1.2, at two stage sizes ("shared" K/V decoders);
    "mrope-concat": the second model with the format-1 "concat" decoder."""
    from finers_rt.export.checkpoints import get_spec, make_random_qwen25vl

    root = tmp_path_factory.mktemp("vlm-runtime")
    gqa = make_vlm_checkpoint("tiny-gqa3", 0)
    penalty = make_random_qwen25vl(root / "hf-mrope-penalty",
                                   replace(get_spec("tiny-mrope"), repetition_penalty=1.2), seed=3)
    return {"gqa3": (gqa, _export(gqa, root / "gqa3", (140, 112))),
            "mrope-penalty": (penalty, _export(penalty, root / "mrope", (84, 112))),
            "mrope-concat": (penalty, _export(penalty, root / "mrope-concat", (84, 112), "concat"))}


def _hf_generate(hf_dir, stage_size_wh, image, text, max_new_tokens):
    import torch
    from PIL import Image

    from finers_rt.export.checkpoints import load_reference

    model, processor = load_reference(hf_dir)
    stage_image = Image.fromarray(image).resize(stage_size_wh, Image.Resampling.BILINEAR)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[stage_image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("name,seed,text,expect_eos", [
    ("gqa3", 0, QUESTION, False), ("mrope-penalty", 0, QUESTION, False),
    ("mrope-penalty", 0, "Describe the image.", True), ("mrope-concat", 0, QUESTION, False)])
def test_greedy_tokens_equal_hf_generate(stages, name, seed, text, expect_eos):
    from finers_rt.vlm import VlmStage

    hf_dir, stage_dir = stages[name]
    stage = VlmStage.load(stage_dir)
    image = _image(seed)
    result = stage.generate(image, text, max_new_tokens=24)
    reference, reference_prompt = _hf_generate(hf_dir, stage.manifest.image.stage_size_wh, image, text, 24)
    parts = stage.tokenizer.build_prompt(stage.manifest.image.num_image_tokens, text)
    assert parts.input_ids.tolist() == reference_prompt
    assert result.token_ids == reference
    if expect_eos:
        assert result.stop_reason == "eos" and result.token_ids[-1] in stage.manifest.special_tokens.eos_token_ids
    else:
        assert len(result.token_ids) == 24 and result.stop_reason == "max_new_tokens"
        assert len(set(result.token_ids)) >= 18  # a real sequence, not one token repeated
    assert result.text == stage.tokenizer.decode(result.token_ids)


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_prefill_keeps_hf_tokens_and_kv(stages, monkeypatch, chunk):
    """A long batch-1 prefill of a "shared" stage runs in PREFILL_CHUNK pieces: same greedy tokens
    as HF and the same K/V (to float rounding) as one whole-prompt chunk."""
    from finers_rt import vlm
    from finers_rt.vlm import VlmStage

    hf_dir, stage_dir = stages["gqa3"]
    stage = VlmStage.load(stage_dir)
    rng = np.random.default_rng(1)
    seq = 3 * chunk + 2  # chunks of `chunk`, then a short tail
    embeds = rng.standard_normal((1, seq, stage.manifest.text.hidden_size)).astype(np.float32)
    positions = np.broadcast_to(np.arange(seq)[None, None], (3, 1, seq)).astype(np.int64).copy()

    def prefill(chunk_size):
        monkeypatch.setattr(vlm, "PREFILL_CHUNK", chunk_size)
        buffer = stage._buffer_for(1, seq + 4)
        buffer.length = 0
        logits = stage.forward(embeds, positions, buffer)
        assert buffer.length == seq
        return logits, [np.array(k[:, :, :seq]) for k in buffer.keys], [np.array(v[:, :, :seq]) for v in buffer.values]

    whole, chunked = prefill(10_000), prefill(chunk)
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-4)
    for a, b in zip(chunked[1] + chunked[2], whole[1] + whole[2]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    image = _image(0)
    monkeypatch.setattr(vlm, "PREFILL_CHUNK", chunk)  # the image prefix is longer than `chunk`
    result = VlmStage.load(stage_dir).generate(image, QUESTION, max_new_tokens=12)
    assert result.token_ids == _hf_generate(hf_dir, stage.manifest.image.stage_size_wh, image, QUESTION, 12)[0]


def test_prefix_cache_hit_skips_vision_and_keeps_tokens(stages):
    from finers_rt.vlm import VlmStage

    _, stage_dir = stages["mrope-penalty"]
    cache = PrefixCache()
    cached, plain = VlmStage.load(stage_dir, prefix_cache=cache), VlmStage.load(stage_dir)
    image = _image(1)
    first = cached.generate(image, QUESTION, max_new_tokens=20)
    assert not first.cache_hit and first.timings_ms["vision"] > 0 and first.timings_ms["prefix_prefill"] > 0
    second = cached.generate(image.copy(), "Where is the tiny white boat?", max_new_tokens=20)
    assert second.cache_hit and cache.hits == 1
    assert second.timings_ms["vision"] == 0.0 and second.timings_ms["prefix_prefill"] == 0.0
    assert second.token_ids == plain.generate(image, "Where is the tiny white boat?", max_new_tokens=20).token_ids
    assert first.token_ids == plain.generate(image, QUESTION, max_new_tokens=20).token_ids
    cached.io_binding = plain.io_binding = True  # K/V bound by pointer into the buffer: same tokens
    assert cached.generate(image, QUESTION, max_new_tokens=20).token_ids == first.token_ids
    assert plain.generate(image, QUESTION, max_new_tokens=20).token_ids == first.token_ids
    other = cached.generate(_image(2), QUESTION, max_new_tokens=5)
    assert not other.cache_hit and cache.misses == 2 and len(cache) == 2


@pytest.mark.parametrize("name", ["gqa3", "mrope-concat"])
def test_generate_batch_rows_equal_single_generate(stages, name):
    from finers_rt.vlm import VlmStage

    _, stage_dir = stages[name]
    stage = VlmStage.load(stage_dir, prefix_cache=PrefixCache())
    images = [_image(0), _image(1), _image(2)]
    singles = [stage.generate(image, QUESTION, max_new_tokens=16).token_ids for image in images]
    batch = stage.generate_batch(images, QUESTION, max_new_tokens=16)
    assert [r.token_ids for r in batch] == singles
    assert all(r.cache_hit for r in batch)  # the singles filled the cache
    assert len({tuple(s) for s in singles}) == 3


def test_stop_string_sampling_and_bad_arguments(stages, tmp_path):
    from PIL import Image

    from finers_rt.vlm import VlmStage

    _, stage_dir = stages["gqa3"]
    stage = VlmStage.load(stage_dir)
    image = _image(0)
    full = stage.generate(image, QUESTION, max_new_tokens=12)
    stop = stage.tokenizer.decode(full.token_ids[:6], skip_special_tokens=False)[-3:]
    assert stop and stop not in stage.tokenizer.decode(full.token_ids[:5], skip_special_tokens=False)
    stopped = stage.generate(image, QUESTION, max_new_tokens=12, stop_at=stop)
    assert stopped.stop_reason == "stop_string" and stopped.token_ids == full.token_ids[:6]
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    assert stage.generate(str(path), QUESTION, max_new_tokens=12).token_ids == full.token_ids
    sampled = [stage.generate(image, QUESTION, max_new_tokens=12, temperature=1.5, top_p=0.9, seed=5).token_ids
               for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != full.token_ids
    for kwargs, message in [({"max_new_tokens": 0}, "max_new_tokens"), ({"top_p": 0.0}, "top_p"),
                            ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(InputError, match=message):
            stage.generate(image, QUESTION, **kwargs)
    with pytest.raises(InputError, match="must be a str"):
        stage.generate(image, None)
    with pytest.raises(InputError, match=r"uint8"):
        stage.generate(image.astype(np.float32), QUESTION)


def test_prompt_split_equals_whole_tokenisation(stages):
    from finers_rt.errors import ArtifactError
    from finers_rt.tokenizer import StageTokenizer
    from finers_rt.vlm import VlmStage

    stage = VlmStage.load(stages["gqa3"][1])
    tokenizer, count = stage.tokenizer, stage.manifest.image.num_image_tokens
    for text in (QUESTION, "", " leading space", "<think>x</think>\n<answer>{'bbox': [1,2,3,4]}</answer>",
                 "ünïcödé 1920x1080 <|im_end|> inside"):
        parts = tokenizer.build_prompt(count, text)
        whole = tokenizer.encode(stage.manifest.chat.render(count, text))
        assert parts.input_ids.tolist() == whole.tolist()
        assert parts.prefix_ids[-1] == stage.manifest.special_tokens.vision_end_token_id
        assert int((parts.prefix_ids == stage.manifest.special_tokens.image_token_id).sum()) == count
        tokenizer.check_split_matches_whole(count, text)
    with pytest.raises(InputError, match="image token"):
        tokenizer.build_prompt(count, "two images <|image_pad|>")
    glued = replace(stage.manifest.chat, after_image="<|vision_end|>Q")  # cut inside a word
    with pytest.raises(ArtifactError, match="two parts"):
        StageTokenizer(tokenizer._tokenizer, glued).check_split_matches_whole(count, "uestion")


def test_kv_pairs_come_from_decoder_graph_inputs(stages):
    from finers_rt.vlm import VlmStage, decoder_kv_pairs

    _, stage_dir = stages["gqa3"]
    stage = VlmStage.load(stage_dir)
    manifest, decoder = stage.manifest, stage.manifest.graphs["decoder"]
    layers = manifest.text.num_hidden_layers
    assert stage.num_kv_pairs == layers
    assert len(stage._buffer_for(1, 8).keys) == layers
    extra = tuple(replace(decoder.input("past_key_0"), name=f"past_{kind}_{layers}") for kind in ("key", "value"))
    more = replace(manifest, graphs={**manifest.graphs, "decoder": replace(decoder, inputs=decoder.inputs + extra)})
    assert decoder_kv_pairs(more) == layers + 1  # e.g. a model caching one more tensor pair
    gap = tuple(s for s in decoder.inputs if s.name != "past_value_0")
    with pytest.raises(ManifestError, match="past_key_0"):
        decoder_kv_pairs(replace(manifest, graphs={**manifest.graphs, "decoder": replace(decoder, inputs=gap)}))


def test_shared_kv_stage_needs_a_backend_with_in_place_binding(stages):
    from finers_rt.vlm import VlmStage

    _, stage_dir = stages["gqa3"]
    stage = VlmStage.load(stage_dir)
    assert stage.kv_cache == "shared" and stage._buffer_for(2, 8).keys[0].shape[2] == 8  # [B, KV, max_len, D]

    class RunOnly:  # a backend with only `run` (e.g. TensorRT)
        input_specs = stage.decoder.input_specs

        def run(self, feeds, output_names=None):
            raise AssertionError("not reached")

    with pytest.raises(EngineProfileError, match="kv-cache concat"):
        VlmStage(stage.folder, stage.manifest, stage.vision, RunOnly(), stage.embed_tokens, stage.tokenizer)
    concat = VlmStage.load(stages["mrope-concat"][1])
    assert concat.kv_cache == "concat" and concat._buffer_for(1, 8).keys[0].shape[1] == 8  # [B, max_len, KV, D]


def test_decoder_with_an_extra_kv_pair_exports_and_generates(make_vlm_checkpoint, tmp_path, monkeypatch):
    """A model that caches one more K/V pair (same per-pair shape, written in place by its own
    GroupQueryAttention) exports, validates and decodes like the stock model."""
    from finers_rt.export import decoder_graph
    from finers_rt.export import vlm as vlm_export
    from finers_rt.vlm import VlmStage

    class ExtraPair(decoder_graph.SharedKvDecoderStep):
        def __init__(self, model):
            super().__init__(model)
            self.num_kv_pairs = self.num_layers + 1

        def forward(self, inputs_embeds, position_ids, seqlens_k, total, *past):
            cos, sin = self._rope(position_ids)
            h, present = inputs_embeds, []
            for i in range(self.num_layers):
                h, k, v = self._shared_layer(i, h, cos, sin, seqlens_k, total, past[2 * i], past[2 * i + 1])
                present += [k, v]
            extra = h[..., : self.num_kv_heads * self.head_dim]  # cache the last hidden states' first features
            _, k, v = decoder_graph._GroupQueryAttention.apply(
                h, extra, extra, past[-2], past[-1], seqlens_k, total, self.num_heads, self.num_kv_heads, 1.0)
            return (self._head(h), *present, k, v)

    real = vlm_export.export_decoder
    monkeypatch.setattr(vlm_export, "export_decoder",
                        lambda model, path, opset, kv_cache, step=None: real(model, path, opset,
                                                                             step=ExtraPair(model)))
    hf_dir = make_vlm_checkpoint("tiny-gqa3", 0)
    stage_dir = _export(hf_dir, tmp_path / "extra", (140, 112))
    stage = VlmStage.load(stage_dir)
    layers = stage.manifest.text.num_hidden_layers
    assert stage.num_kv_pairs == layers + 1 and stage.manifest.validation["greedy_tokens_equal"]
    image = _image(0)
    result = stage.generate(image, QUESTION, max_new_tokens=12)
    assert result.token_ids == _hf_generate(hf_dir, stage.manifest.image.stage_size_wh, image, QUESTION, 12)[0]
    filled = stage._buffer.length
    assert np.abs(stage._buffer.keys[layers][0, :, :filled]).max() > 0  # the extra pair was written in place


def test_load_checks_manifest_against_files_and_sessions(stages, tmp_path):
    import shutil

    from finers_rt.vlm import VlmStage

    _, stage_dir = stages["gqa3"]
    with pytest.raises(ManifestError, match="not a folder"):
        VlmStage.load(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(stage_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["graphs"]["vision"]["outputs"][0]["shape"][1] += 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineProfileError, match="image_embeds"):
        VlmStage.load(broken)
    shutil.copy(stage_dir / "manifest.json", broken / "manifest.json")
    (broken / "embed_tokens.npy").unlink()
    with pytest.raises(ManifestError, match="embeddings file 'embed_tokens.npy' is missing"):
        VlmStage.load(broken)


def test_cli_generate_json_matches_library(stages, tmp_path):
    from PIL import Image

    from finers_rt.vlm import VlmStage

    _, stage_dir = stages["mrope-penalty"]
    path = tmp_path / "img.png"
    Image.fromarray(_image(0)).save(path)
    run = subprocess.run([sys.executable, "-m", "finers_rt.cli", "generate", str(stage_dir), str(path), QUESTION,
                          "--max-new-tokens", "10", "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    expected = VlmStage.load(stage_dir).generate(str(path), QUESTION, max_new_tokens=10)
    assert printed["token_ids"] == expected.token_ids and printed["text"] == expected.text
    bad = subprocess.run([sys.executable, "-m", "finers_rt.cli", "generate", str(stage_dir), str(tmp_path / "no.png"),
                          QUESTION], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "InputError" in bad.stderr and "Traceback" not in bad.stderr


def test_runtime_modules_import_without_torch():
    code = ("import sys; import finers_rt.vlm, finers_rt.image, finers_rt.mrope, finers_rt.kvcache, "
            "finers_rt.tokenizer; print(sorted(m for m in ('torch', 'transformers', 'segment_anything') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_cli_generate_equals_hf_on_7b_shaped_odd_size(make_vlm_checkpoint, tmp_path):
    """The runtime issue's acceptance: a checkpoint shaped like Qwen2.5-VL-7B (GQA 7:1, real
    vocabulary, window + full-attention vision blocks, mrope 2:3:3, repetition penalty 1.05),
    exported at a non-square, non-multiple-of-28 size: `finers-rt generate` == HF generate."""
    from typer.testing import CliRunner

    from finers_rt.cli import app

    hf_dir = make_vlm_checkpoint("7b-shaped", 0)
    stage_dir = _export(hf_dir, tmp_path / "stage", (333, 219))
    from PIL import Image

    image_path = tmp_path / "img.png"
    image = _image(4)
    Image.fromarray(image).save(image_path)
    run = CliRunner().invoke(app, ["generate", str(stage_dir), str(image_path), QUESTION,
                                   "--max-new-tokens", "20", "--json"])
    assert run.exit_code == 0, run.output
    ours = json.loads(run.output.strip().splitlines()[-1])["token_ids"]
    reference, _ = _hf_generate(hf_dir, (333, 219), image, QUESTION, 20)
    assert ours == reference and len(ours) == 20
