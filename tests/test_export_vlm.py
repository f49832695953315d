"""`finers-rt export vlm`: random checkpoints, graph parity vs HF, manifest, quantization, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

from finers_rt.errors import ExportParityError, InputError  # noqa: E402
from finers_rt.export import vlm as vlm_export  # noqa: E402
from finers_rt.export.checkpoints import QWEN_SPECIAL_TOKENS, SPECS, load_reference  # noqa: E402
from finers_rt.export.vlm import VlmExportOptions, export_vlm, source_sha256  # noqa: E402
from finers_rt.manifest import VlmStageManifest, file_sha256  # noqa: E402

FP32_TOL = 1e-3


def _export(hf_dir, out, size_wh=None, role="generic", **kw) -> VlmStageManifest:
    return export_vlm(hf_dir, out, VlmExportOptions(role=role, image_size_wh=size_wh, **kw))


def _assert_fp32_parity(manifest: VlmStageManifest) -> None:
    v = manifest.validation
    assert v["precision"] == "fp32" and manifest.precision == "fp32"
    for key in ("vision_max_abs_err", "prefill_logits_max_abs_err", "prefill_kv_max_abs_err",
                "decode_logits_max_abs_err"):
        assert 0.0 <= v[key] < FP32_TOL, (key, v[key])
    assert v["decode_steps_checked"] >= 8
    assert v["greedy_tokens_equal"] is True and v["top1_agreement_with_torch"] == 1.0
    assert len(set(v["greedy_tokens"])) > 1, "random model decodes one repeated token"


# ---- checkpoints -------------------------------------------------------------------------------


def test_random_checkpoint_tokenizer_config_and_greedy_variety(tiny_vlm_dir):
    model, processor = load_reference(tiny_vlm_dir)
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert max(ids) < model.config.text_config.vocab_size and len(set(ids)) == len(ids)
    text = "Please find 'the red car' with bbox and points."
    assert tok.decode(tok(text)["input_ids"]) == text
    # weights re-initialised (not HF's std 0.02): greedy over 20 tokens is not one token
    input_ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert len(set(out[0, input_ids.shape[1]:].tolist())) > 2


def test_random_checkpoint_is_deterministic(tmp_path, tiny_vlm_dir):
    from finers_rt.export.checkpoints import make_random_qwen25vl

    again = make_random_qwen25vl(tmp_path / "again", "tiny", seed=0)
    assert file_sha256(again / "model.safetensors") == file_sha256(tiny_vlm_dir / "model.safetensors")
    assert file_sha256(again / "tokenizer.json") == file_sha256(tiny_vlm_dir / "tokenizer.json")


def test_unknown_spec_suggests(tmp_path):
    from finers_rt.export.checkpoints import get_spec

    with pytest.raises(InputError, match="did you mean 'tiny'"):
        get_spec("tinny")


# ---- export + parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec,size_wh,kv_cache", [
    ("tiny", (251, 173), "shared"),        # non-square, not a multiple of 28, partial windows
    ("tiny-gqa3", (97, 311), "shared"),    # GQA 3:1, tall image, full attention first
    ("tiny-mrope", (143, 143), "shared"),  # mrope (8,4,4), MQA, 3 vision blocks with fullatt (0, 2)
    ("tiny-gqa3", (97, 311), "concat"),    # the plain-op decoder of format-1 bundles
])
def test_export_parity_across_shapes(tmp_path, make_vlm_checkpoint, spec, size_wh, kv_cache):
    hf_dir = make_vlm_checkpoint(spec)
    manifest = _export(hf_dir, tmp_path / "stage", size_wh, kv_cache=kv_cache)
    _assert_fp32_parity(manifest)
    assert manifest.kv_cache == kv_cache
    ops = {n.op_type for n in onnx.load(str(tmp_path / "stage" / "decoder.onnx")).graph.node}
    assert ("GroupQueryAttention" in ops) == (kv_cache == "shared")
    # "concat" is the portable contract: plain ONNX ops only, in both graphs (TensorRT)
    for graph in ("decoder", "vision"):
        nodes = onnx.load(str(tmp_path / "stage" / f"{graph}.onnx")).graph.node
        domains = {n.domain for n in nodes}
        assert ("com.microsoft" in domains) == (kv_cache == "shared"), (graph, domains)
        values = [onnx.numpy_helper.to_array(n.attribute[0].t) for n in nodes if n.op_type == "Constant"]
        keys = [(v.dtype.str, v.shape, v.tobytes()) for v in values]
        assert len(keys) == len(set(keys)), f"{graph}: repeated constants left in the graph"
    text = manifest.text
    assert (text.num_attention_heads, text.num_key_value_heads) == (SPECS[spec].text_heads,
                                                                    SPECS[spec].text_kv_heads)
    assert tuple(text.mrope_section) == SPECS[spec].mrope_section
    img = manifest.image
    assert img.resized_hw[0] % 28 == 0 and img.resized_hw[1] % 28 == 0
    assert img.num_patches == int(np.prod(img.grid_thw)) == img.num_image_tokens * 4


def test_export_7b_shaped_odd_size(tmp_path, make_vlm_checkpoint):
    manifest = _export(make_vlm_checkpoint("7b-shaped"), tmp_path / "stage", (333, 219))
    _assert_fp32_parity(manifest)
    assert manifest.text.vocab_size == 152064
    assert manifest.text.num_attention_heads // manifest.text.num_key_value_heads == 7
    assert manifest.generation.repetition_penalty == pytest.approx(1.05)


def test_manifest_content_matches_contract(tmp_path, tiny_vlm_dir):
    out = tmp_path / "lpr"
    manifest = _export(tiny_vlm_dir, out, role="lpr")
    loaded = VlmStageManifest.load(out)
    assert loaded.to_dict() == manifest.to_dict()
    assert sorted(p.name for p in out.iterdir()) == [
        "decoder.onnx", "embed_tokens.npy", "manifest.json", "tokenizer.json", "vision.onnx"]
    assert loaded.role == "lpr" and tuple(loaded.image.stage_size_wh) == (512, 512)
    assert tuple(loaded.image.resized_hw) == (504, 504) and tuple(loaded.image.grid_thw) == (1, 36, 36)
    t = loaded.text
    vision, decoder = loaded.graphs["vision"], loaded.graphs["decoder"]
    assert vision.input("pixel_values").shape == (1296, 1176)
    assert vision.output("image_embeds").shape == (324, t.hidden_size)
    assert decoder.input("inputs_embeds").shape == ("batch", "seq", t.hidden_size)
    assert decoder.input("position_ids").shape == (3, "batch", "seq")
    assert decoder.input("position_ids").dtype == "int64"
    assert loaded.kv_cache == "shared"
    assert decoder.input("seqlens_k").shape == ("batch",) and decoder.input("seqlens_k").dtype == "int32"
    assert decoder.input("total_sequence_length").shape == () and decoder.input("total_sequence_length").dtype == "int32"
    assert [s.name for s in decoder.inputs][:4] == ["inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"]
    for i in range(t.num_hidden_layers):  # head-major K/V, read and written in place
        assert decoder.input(f"past_key_{i}").shape == ("batch", t.num_key_value_heads, "past", t.head_dim)
        assert decoder.output(f"present_value_{i}").shape == ("batch", t.num_key_value_heads, "present", t.head_dim)
    assert decoder.output("logits").shape == ("batch", t.vocab_size)
    assert vision.sha256 == file_sha256(out / "vision.onnx")
    emb = np.load(out / "embed_tokens.npy", mmap_mode="r")
    assert emb.dtype == np.float32 and emb.shape == tuple(loaded.embeddings.shape) == (t.vocab_size, t.hidden_size)
    assert loaded.source["sha256"] == source_sha256(tiny_vlm_dir)
    assert loaded.source["config"] == json.loads((tiny_vlm_dir / "config.json").read_text())
    _, processor = load_reference(tiny_vlm_dir)
    tok = processor.tokenizer
    chat = loaded.chat
    assert chat.before_image.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert chat.before_image.endswith("<|im_start|>user\n<|vision_start|>")
    assert (chat.image_token, chat.after_image) == ("<|image_pad|>", "<|vision_end|>")
    assert chat.after_text == "<|im_end|>\n<|im_start|>assistant\n"
    st = loaded.special_tokens
    assert st.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert set(st.eos_token_ids) == {tok.convert_tokens_to_ids("<|im_end|>"),
                                     tok.convert_tokens_to_ids("<|endoftext|>")}
    assert loaded.exporter["opset"] == 18 and loaded.generation.repetition_penalty == 1.0


def test_tampered_decoder_fails_parity_and_leaves_nothing(tmp_path, tiny_vlm_dir, monkeypatch):
    real_write = vlm_export.write_graphs

    def write_then_tamper(model, work, grid, opset, kv_cache):
        real_write(model, work, grid, opset, kv_cache)
        graph = onnx.load(str(work / "decoder.onnx"))
        weights = [t for t in graph.graph.initializer if t.dims and np.prod(t.dims) > 1000]
        arr = onnx.numpy_helper.to_array(weights[0]).copy()
        arr.flat[0] += 0.5  # one weight of one layer
        weights[0].CopyFrom(onnx.numpy_helper.from_array(arr, weights[0].name))
        onnx.save(graph, str(work / "decoder.onnx"))

    monkeypatch.setattr(vlm_export, "write_graphs", write_then_tamper)
    out = tmp_path / "stage"
    with pytest.raises(ExportParityError) as info:
        _export(tiny_vlm_dir, out, (200, 150))
    assert info.value.graph == "decoder"
    assert info.value.output in ("logits",) or info.value.output.startswith(("present_key_", "present_value_"))
    assert info.value.error > info.value.tolerance
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_refuses_non_empty_out_dir_and_force_replaces(tmp_path, tiny_vlm_dir):
    out = tmp_path / "stage"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty.*--force"):
        _export(tiny_vlm_dir, out, (120, 90))
    assert (out / "keep.txt").read_text() == "mine"
    manifest = _export(tiny_vlm_dir, out, (120, 90), force=True)
    assert not (out / "keep.txt").exists()
    assert VlmStageManifest.load(out).to_dict() == manifest.to_dict()


@pytest.mark.parametrize("kwargs,match", [
    (dict(role="generic"), "explicit image size"),
    (dict(role="gsee"), "did you mean 'gse'"),
    (dict(role="lpr", quantize="int3"), "unknown quantization"),
    (dict(role="generic", image_size_wh=(20, 500)), ">= 28"),
    (dict(role="lpr", kv_cache="shard"), "did you mean 'shared'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        VlmExportOptions(**kwargs)


def test_parse_size_and_not_a_checkpoint(tmp_path):
    assert vlm_export.parse_size_wh("1920x1080") == (1920, 1080)
    with pytest.raises(InputError, match="WxH"):
        vlm_export.parse_size_wh("1920by1080")
    with pytest.raises(InputError, match="no config.json"):
        _export(tmp_path, tmp_path / "out", (100, 100))


# ---- quantized decoders ------------------------------------------------------------------------


@pytest.mark.parametrize("precision,op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_quantized_decoder(tmp_path, tiny_vlm_dir, precision, op):
    out = tmp_path / precision
    manifest = _export(tiny_vlm_dir, out, (140, 112), quantize=precision)
    v = manifest.validation
    assert manifest.precision == v["precision"] == precision
    assert 0.0 <= v["greedy_token_agreement_with_fp32"] <= 1.0
    assert 0.0 <= v["top1_agreement_with_torch"] <= 1.0
    assert v["prefill_logits_max_abs_err"] > 0.0  # weights really changed
    assert v["vision_max_abs_err"] < FP32_TOL  # vision stays fp32
    dec_ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node}
    vis_ops = {n.op_type for n in onnx.load(str(out / "vision.onnx")).graph.node}
    assert op in dec_ops and op not in vis_ops and "GroupQueryAttention" in dec_ops
    names = [i.name for i in onnx.load(str(out / "decoder.onnx")).graph.input]
    assert names[:4] == ["inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"]


# ---- pieces ------------------------------------------------------------------------------------


def test_quantized_logits_are_judged_with_a_tail_allowance():
    from finers_rt.export.validate import TOLERANCES, logits_error

    want = np.array([[30.0, 28.0, 0.0, -15.0]], dtype=np.float32)  # top 30
    tail_noise = want + np.array([[0.1, -0.1, 1.0, 3.0]], dtype=np.float32)  # 3 nats, 45 below
    raw, judged = logits_error(tail_noise, want, TOLERANCES["int8"].logit_gap_slope)
    assert raw == pytest.approx(3.0) and judged < TOLERANCES["int8"].logits  # passes int8
    assert logits_error(tail_noise, want) == (pytest.approx(3.0), pytest.approx(3.0))  # plain
    near_top = want + np.array([[0.0, 3.0, 0.0, 0.0]], dtype=np.float32)  # the runner-up moves
    assert logits_error(near_top, want, 0.25)[1] > TOLERANCES["int8"].logits  # still fails
    assert TOLERANCES["fp32"].logit_gap_slope == 0.0  # fp32 stays a plain bound everywhere


def test_vision_attention_chunking_is_exact(monkeypatch):
    from finers_rt.export import vision_graph

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 8, generator=gen) for _ in range(3))
    segments = vision_graph._StaticSegments([0, 16, 32, 36, 40])  # lengths 16, 16, 4, 4
    whole = vision_graph._segmented_attention(q, k, v, segments, 2, 8, 0.35)
    monkeypatch.setattr(vision_graph, "SCORE_BUDGET_BYTES", 4 * 2 * 2 * 16 * 3)  # 3-row chunks
    chunked = vision_graph._segmented_attention(q, k, v, segments, 2, 8, 0.35)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    ref = torch.cat([torch.softmax(q[a:b].transpose(0, 1) @ k[a:b].transpose(0, 1).transpose(1, 2) * 0.35, -1)
                     @ v[a:b].transpose(0, 1) for a, b in ((0, 16), (16, 32), (32, 36), (36, 40))], 1)
    torch.testing.assert_close(whole, ref.transpose(0, 1), rtol=0, atol=1e-5)


def test_cli_export_vlm_bad_role_is_one_line_error(tiny_vlm_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finers_rt.cli", "export", "vlm", str(tiny_vlm_dir),
                           str(tmp_path / "o"), "--role", "lrp"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'lpr'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_external_data_layout(tmp_path, tiny_vlm_dir, monkeypatch, quantize):
    """Graphs over the inline limit (7B) become NAME.onnx + one NAME.onnx.data and still validate."""
    from finers_rt.export import graph_files

    monkeypatch.setattr(graph_files, "INLINE_LIMIT_BYTES", 0)
    out = tmp_path / "stage"
    manifest = _export(tiny_vlm_dir, out, (120, 90), quantize=quantize)
    names = sorted(p.name for p in out.iterdir())
    assert {"decoder.onnx", "decoder.onnx.data", "vision.onnx", "vision.onnx.data"} <= set(names)
    assert not [n for n in names if n.endswith(".onnx") and n not in ("decoder.onnx", "vision.onnx")]
    assert manifest.validation["vision_max_abs_err"] < FP32_TOL
    if quantize == "none":
        _assert_fp32_parity(manifest)


def test_dedupe_constants_is_exact_and_rewires_subgraphs(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from finers_rt.export.graph_files import dedupe_constants

    table = np.arange(12, dtype=np.float32).reshape(3, 4)

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_v"))

    then_branch = helper.make_graph([helper.make_node("Add", ["x", "c2"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3, 4])])
    else_branch = helper.make_graph([helper.make_node("Sub", ["x", "c3"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3, 4])])
    nodes = [const("c1", table), const("c2", table.copy()), const("c3", table + 1),
             const("c4", table.astype(np.float64).astype(np.float32)),
             helper.make_node("Mul", ["x", "c1"], ["a"]), helper.make_node("Add", ["a", "c4"], ["b"]),
             helper.make_node("If", ["flag"], ["branch"], then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Add", ["b", "branch"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    before = [ort.InferenceSession(str(path)).run(None, {"x": x, "flag": np.array(f)})[0] for f in (True, False)]
    assert dedupe_constants(path) == 2 * table.nbytes  # c2 and c4 repeat c1; c3 differs
    model = onnx.load(str(path))
    assert [n.output[0] for n in model.graph.node if n.op_type == "Constant"] == ["c1", "c3"]
    after = [ort.InferenceSession(str(path)).run(None, {"x": x, "flag": np.array(f)})[0] for f in (True, False)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    stamp = path.stat().st_mtime_ns
    assert dedupe_constants(path) == 0 and path.stat().st_mtime_ns == stamp  # nothing to do: untouched


def test_store_exact_fp16_keeps_every_value(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from finers_rt.export.graph_files import store_exact_fp16

    rng = np.random.default_rng(0)
    exact = rng.standard_normal((64, 32)).astype(np.float16).astype(np.float32)
    inexact = rng.standard_normal((32, 16)).astype(np.float32)
    inexact[0, 0] = 1 + 2 ** -20  # one value that float16 cannot hold keeps the tensor float32
    small = rng.standard_normal(16).astype(np.float16).astype(np.float32)
    inits = [numpy_helper.from_array(exact, "w1"), numpy_helper.from_array(inexact, "w2"),
             numpy_helper.from_array(small, "b")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["g"]),
             helper.make_node("Add", ["g", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert store_exact_fp16(path, min_elements=32) == exact.nbytes // 2
    types = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert types == {"w1__fp16": TensorProto.FLOAT16, "w2": TensorProto.FLOAT, "b": TensorProto.FLOAT}
    assert np.array_equal(ort.InferenceSession(str(path)).run(None, {"x": x})[0], before)
    assert store_exact_fp16(path, min_elements=32) == 0


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_float16_checkpoint_exports_half_size_weights_at_parity(tmp_path, tiny_vlm_dir, quantize):
    from onnx import TensorProto

    from finers_rt.train.checkpoint import write_release_copy

    half = write_release_copy(tiny_vlm_dir, tmp_path / "half")  # weights saved as float16
    manifest = export_vlm(half, tmp_path / "stage", VlmExportOptions(
        role="lpr", image_size_wh=(112, 112), quantize=quantize))  # raises if parity fails
    assert manifest.validation["greedy_tokens_equal"] or quantize != "none"
    for graph in ("vision", "decoder"):
        inits = onnx.load(str(tmp_path / "stage" / f"{graph}.onnx")).graph.initializer
        if graph == "vision" or quantize == "none":
            assert any(t.data_type == TensorProto.FLOAT16 for t in inits), graph
