"""TensorRT engines: profiles from manifests, metadata checks, build planning, the CLI's refusal
without tensorrt / a GPU, the 'trt' backend kind. GPU tests (marked `gpu`) build real engines and
compare them with ONNX Runtime; they skip cleanly without tensorrt, cuda-python or a GPU."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from finers_rt.config import BackendOptions, PipelineConfig
from finers_rt.errors import ArtifactError, EngineProfileError, InputError, ManifestError, MissingExtraError
from finers_rt.manifest import SamManifest, VlmStageManifest
from finers_rt.trt import (DeviceInfo, EngineMetadata, ProfileLimits, check_engine_metadata, load_engine_metadata,
                           plan_engine_builds, profiles_from_manifest, select_profile)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
try:
    from finers_rt.backends.trt import import_cudart, query_device

    CUDART = import_cudart()
except ImportError:
    CUDART = None


def _gpu_device():
    if CUDART is None:
        return None
    try:
        return query_device(CUDART)
    except EngineProfileError:
        return None


GPU = _gpu_device()
needs_gpu = pytest.mark.skipif(not (HAS_TRT and GPU), reason="needs tensorrt, cuda-python and an NVIDIA GPU")

# ---- made-up manifests ---------------------------------------------------------------------------

H, LAYERS, KV, D = 64, 2, 2, 16


def vlm_dict(role="lpr", grid=(1, 36, 36), max_new_tokens=1024, seq_dim="seq"):
    t, gh, gw = grid
    tokens = t * gh * gw // 4
    dec_in = [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", seq_dim, H]},
              {"name": "position_ids", "dtype": "int64", "shape": [3, "batch", seq_dim]},
              {"name": "attention_mask", "dtype": "float32", "shape": ["batch", 1, seq_dim, "total"]}]
    dec_out = [{"name": "logits", "dtype": "float32", "shape": ["batch", 1000]}]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            dec_in.append({"name": f"past_{kind}_{i}", "dtype": "float32", "shape": ["batch", "past", KV, D]})
            dec_out.append({"name": f"new_{kind}_{i}", "dtype": "float32", "shape": ["batch", seq_dim, KV, D]})
    return {
        "format": "finers-rt.vlm-stage", "format_version": 1, "finers_rt_version": "0.1.0",
        "role": role, "precision": "fp32",
        "image": {"stage_size_wh": [gw * 14, gh * 14], "resized_hw": [gh * 14, gw * 14], "grid_thw": list(grid),
                  "num_patches": t * gh * gw, "num_image_tokens": tokens},
        "text": {"hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
                 "num_key_value_heads": KV, "head_dim": D, "vocab_size": 1000, "rope_theta": 1e6,
                 "mrope_section": [2, 3, 3]},
        "special_tokens": {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3,
                           "vision_end_token_id": 4, "eos_token_ids": [1, 2]},
        "chat": {"before_image": "<s>", "image_token": "<i>", "after_image": "</v>", "after_text": "<a>"},
        "generation": {"max_new_tokens": max_new_tokens},
        "graphs": {
            "vision": {"file": "vision.onnx", "sha256": "a" * 64,
                       "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": [t * gh * gw, 1176]}],
                       "outputs": [{"name": "image_embeds", "dtype": "float32", "shape": [tokens, H]}]},
            "decoder": {"file": "decoder.onnx", "sha256": "b" * 64, "inputs": dec_in, "outputs": dec_out}},
        "embeddings": {"file": "embed_tokens.npy", "dtype": "float32", "shape": [1000, H]},
        "tokenizer": {"file": "tokenizer.json"},
    }


def sam_dict(size=256, max_points_dim="num_points"):
    e, c, m = size // 16, 32, 4
    f32 = "float32"
    return {
        "format": "finers-rt.sam", "format_version": 1, "finers_rt_version": "0.1.0", "model_type": "vit_b",
        "config": {}, "image_size": size, "embedding_hw": [e, e], "embedding_dim": c,
        "mask_input_hw": [4 * e, 4 * e], "num_multimask_outputs": 3,
        "pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375],
        "graphs": {
            "image_encoder": {"file": "image_encoder.onnx", "sha256": "c" * 64,
                              "inputs": [{"name": "image", "dtype": f32, "shape": [1, 3, size, size]}],
                              "outputs": [{"name": "image_embeddings", "dtype": f32, "shape": [1, c, e, e]}]},
            "mask_decoder": {"file": "mask_decoder.onnx", "sha256": "d" * 64, "inputs": [
                {"name": "image_embeddings", "dtype": f32, "shape": [1, c, e, e]},
                {"name": "point_coords", "dtype": f32, "shape": [1, max_points_dim, 2]},
                {"name": "point_labels", "dtype": f32, "shape": [1, max_points_dim]},
                {"name": "mask_input", "dtype": f32, "shape": [1, 1, 4 * e, 4 * e]},
                {"name": "has_mask_input", "dtype": f32, "shape": [1]},
                {"name": "orig_im_size", "dtype": f32, "shape": [2]}],
                "outputs": [{"name": "masks", "dtype": f32, "shape": [1, m, "orig_h", "orig_w"]},
                            {"name": "iou_predictions", "dtype": f32, "shape": [1, m]},
                            {"name": "low_res_masks", "dtype": f32, "shape": [1, m, 4 * e, 4 * e]}]}},
    }


def write_stage(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(data))
    for graph in data["graphs"].values():
        (folder / graph["file"]).write_bytes(b"placeholder graph: planning only checks that it exists")
    return folder


def write_bundle(root: Path, pipeline_new_tokens=1024) -> Path:
    root.mkdir(parents=True)
    write_stage(root / "gse", vlm_dict("gse", grid=(1, 18, 32)))
    write_stage(root / "lpr", vlm_dict("lpr", max_new_tokens=64))
    write_stage(root / "sam", sam_dict())
    pipeline = replace(PipelineConfig(), max_new_tokens=pipeline_new_tokens).to_dict()
    (root / "manifest.json").write_text(json.dumps({
        "format": "finers-rt.bundle", "format_version": 1, "finers_rt_version": "0.1.0", "name": "t",
        "stages": {"gse": "gse", "lpr": "lpr", "sam": "sam"}, "pipeline": pipeline}))
    return root


# ---- profiles ------------------------------------------------------------------------------------


def test_decoder_profiles_cover_prefill_and_decode():
    manifest = VlmStageManifest.from_dict(vlm_dict(grid=(1, 36, 36)))  # 324 image tokens
    profiles = profiles_from_manifest(manifest, max_batch=2, max_prompt_tokens=100)
    s_max, context = 324 + 100, 324 + 100 + 1024
    vision = profiles["vision"]
    assert [p.name for p in vision] == ["static"]
    assert vision[0].shapes["pixel_values"].min == vision[0].shapes["pixel_values"].max == (1296, 1176)
    decode, prefill = profiles["decoder"]
    assert (decode.name, prefill.name) == ("decode", "prefill")
    assert set(decode.shapes) == set(prefill.shapes) == {
        "inputs_embeds", "position_ids", "attention_mask", "past_key_0", "past_value_0", "past_key_1",
        "past_value_1"}
    assert decode.shapes["inputs_embeds"].max == (2, 1, H)
    assert prefill.shapes["inputs_embeds"].min == (1, 1, H)
    assert prefill.shapes["inputs_embeds"].opt == (1, s_max, H)
    assert prefill.shapes["inputs_embeds"].max == (2, s_max, H)
    assert prefill.shapes["position_ids"].max == (3, 2, s_max)
    assert decode.shapes["past_key_1"].min == (1, 0, KV, D)
    assert decode.shapes["past_key_1"].opt == (1, s_max, KV, D)
    assert decode.shapes["past_key_1"].max == (2, context - 1, KV, D)
    assert decode.shapes["attention_mask"].max == (2, 1, 1, context)
    assert prefill.shapes["attention_mask"].max == (2, 1, s_max, s_max)  # a prompt never exceeds S_max
    assert prefill.shapes["past_value_0"].max == (2, s_max - 1, KV, D)
    assert all(r.values is None for p in profiles["decoder"] for r in p.shapes.values())


def _decoder_shapes(batch, seq, past):
    shapes = {"inputs_embeds": (batch, seq, H), "position_ids": (3, batch, seq),
              "attention_mask": (batch, 1, seq, past + seq)}
    for i in range(LAYERS):
        shapes[f"past_key_{i}"] = shapes[f"past_value_{i}"] = (batch, past, KV, D)
    return shapes


def test_every_step_of_a_generation_finds_a_profile():
    """The runtime's calls: prefix prefill (past 0), question prefill, then one token per step
    up to max_new_tokens. Each must fall in a profile; decode steps in the decode profile."""
    manifest = VlmStageManifest.from_dict(vlm_dict(max_new_tokens=40))
    profiles = profiles_from_manifest(manifest, max_prompt_tokens=30)["decoder"]
    prefix, question = 324 + 4, 26
    assert profiles[select_profile(profiles, _decoder_shapes(1, prefix, 0))].name == "prefill"
    assert profiles[select_profile(profiles, _decoder_shapes(1, question, prefix))].name == "prefill"
    for past in range(prefix + question, prefix + question + 40):
        assert profiles[select_profile(profiles, _decoder_shapes(1, 1, past))].name == "decode"
    with pytest.raises(EngineProfileError) as info:  # one token beyond the planned context
        select_profile(profiles, _decoder_shapes(1, 1, 324 + 30 + 40), where="decoder.engine")
    message = str(info.value)
    assert "decoder.engine: input 'attention_mask' shape [1, 1, 1, 395]" in message
    assert "profile 'decode': attention_mask min [1, 1, 1, 1] max [1, 1, 1, 394]" in message
    assert "--max-new-tokens" in message
    with pytest.raises(EngineProfileError, match="input 'inputs_embeds' shape \\[1, 2, 64\\].*'prefill'"):
        select_profile(profiles, _decoder_shapes(1, 2, prefix + question))  # a chunk past the prompt budget
    with pytest.raises(EngineProfileError, match="input 'inputs_embeds' shape \\[2, 1, 64\\]"):
        select_profile(profiles, _decoder_shapes(2, 1, 10))  # built for batch 1 only


def test_explicit_max_new_tokens_overrides_the_manifest():
    manifest = VlmStageManifest.from_dict(vlm_dict(max_new_tokens=1024))
    decode = profiles_from_manifest(manifest, max_prompt_tokens=10, max_new_tokens=5)["decoder"][0]
    assert decode.shapes["attention_mask"].max == (1, 1, 1, 324 + 10 + 5)


def test_sam_profiles():
    profiles = profiles_from_manifest(SamManifest.from_dict(sam_dict(256)), max_points=8, max_image_side=4096)
    encoder, = profiles["image_encoder"]
    assert encoder.shapes["image"].min == encoder.shapes["image"].max == (1, 3, 256, 256)
    decoder, = profiles["mask_decoder"]
    assert decoder.shapes["point_coords"].min == (1, 1, 2)
    assert decoder.shapes["point_coords"].opt == (1, 4, 2)  # 2 points + 2 box corners
    assert decoder.shapes["point_coords"].max == (1, 8, 2)
    assert decoder.shapes["point_labels"].max == (1, 8)
    size = decoder.shapes["orig_im_size"]
    assert size.min == size.max == (2,)
    assert size.values == ((1, 1), (512, 512), (4096, 4096))
    assert decoder.shapes["mask_input"].max == (1, 1, 64, 64)


def test_unknown_dim_and_bad_limits_are_errors():
    manifest = VlmStageManifest.from_dict(vlm_dict(seq_dim="sequence"))
    with pytest.raises(ManifestError, match="input 'inputs_embeds' has dim 'sequence'.*did you mean 'seq'"):
        profiles_from_manifest(manifest)
    with pytest.raises(ManifestError, match="dim 'points'"):
        profiles_from_manifest(SamManifest.from_dict(sam_dict(max_points_dim="points")))
    ok = VlmStageManifest.from_dict(vlm_dict())
    with pytest.raises(InputError, match="max_batch must be >= 1, got 0"):
        profiles_from_manifest(ok, max_batch=0)
    with pytest.raises(InputError, match="max_points must be >= 4"):
        profiles_from_manifest(ok, max_points=3)
    with pytest.raises(InputError, match="expected a VlmStageManifest or SamManifest"):
        profiles_from_manifest({"graphs": {}})


# ---- metadata ------------------------------------------------------------------------------------

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 85 * 2**30)


def make_metadata(**changes) -> EngineMetadata:
    profiles = profiles_from_manifest(VlmStageManifest.from_dict(vlm_dict()), max_prompt_tokens=8)["decoder"]
    meta = EngineMetadata("finers-rt.trt-engine", 1, "0.1.0", "decoder", "decoder.engine", 1234, "decoder.onnx",
                          "b" * 64, "10.3.0", H100, {"fp16": True, "int8": False}, 4 * 2**30, profiles,
                          {"max_batch": 1}, "2025-01-01T00:00:00+00:00")
    return replace(meta, **changes)


def test_metadata_round_trip(tmp_path):
    meta = make_metadata()
    (tmp_path / "decoder.engine.json").write_text(json.dumps(meta.to_dict()))
    assert load_engine_metadata(tmp_path / "decoder.engine") == meta
    data = meta.to_dict()
    data["tensorrt_verison"] = data.pop("tensorrt_version")
    (tmp_path / "decoder.engine.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="unknown key 'tensorrt_verison'.*did you mean 'tensorrt_version'"):
        load_engine_metadata(tmp_path / "decoder.engine")
    (tmp_path / "decoder.engine.json").write_text(json.dumps({**meta.to_dict(), "format": "finers-rt.sam"}))
    with pytest.raises(ManifestError, match="expected 'finers-rt.trt-engine'"):
        load_engine_metadata(tmp_path / "decoder.engine")
    with pytest.raises(ArtifactError, match="vision.engine.json: missing.*finers-rt build-engines"):
        load_engine_metadata(tmp_path / "vision.engine")


@pytest.mark.parametrize("kwargs, needle", [
    ({"source_sha256": "e" * 64}, "built from graph sha256 bbbbbbbbbbbb, the manifest's 'decoder' graph is eeeeeeeeeeee"),
    ({"tensorrt_version": "10.4.0"}, "built with TensorRT 10.3.0, this is TensorRT 10.4.0"),
    ({"device": DeviceInfo("NVIDIA H100 PCIe", (9, 0))}, "built on GPU 'NVIDIA H100 80GB HBM3', this GPU is 'NVIDIA H100 PCIe'"),
    ({"device": DeviceInfo("NVIDIA H100 80GB HBM3", (8, 9))}, "built for compute capability 9.0, this GPU has 8.9"),
    ({"engine_bytes": 99}, "the engine file has 99 bytes, its metadata says 1234"),
])
def test_metadata_mismatch_is_refused(kwargs, needle):
    expected = {"source_sha256": "b" * 64, "tensorrt_version": "10.3.0", "device": H100, "engine_bytes": 1234}
    check_engine_metadata(make_metadata(), **expected)  # everything matches: accepted
    with pytest.raises(EngineProfileError) as info:
        check_engine_metadata(make_metadata(), **{**expected, **kwargs}, where="lpr/decoder.engine")
    message = str(info.value)
    assert message.startswith("lpr/decoder.engine: refusing this engine: ")
    assert needle in message
    assert "finers-rt build-engines BUNDLE --force" in message


def test_several_mismatches_are_reported_together():
    with pytest.raises(EngineProfileError) as info:
        check_engine_metadata(make_metadata(), source_sha256="b" * 64, tensorrt_version="10.0.1",
                              device=DeviceInfo("NVIDIA GeForce RTX 4090", (8, 9)))
    assert str(info.value).count("; ") >= 3  # TRT version, GPU name, compute capability, hint


# ---- planning and the CLI ---------------------------------------------------------------------------


def test_plan_for_a_bundle(tmp_path):
    bundle = write_bundle(tmp_path / "b", pipeline_new_tokens=100)
    plans = plan_engine_builds(bundle, ProfileLimits(max_prompt_tokens=20))
    assert [(p.stage, p.graph, p.engine_path.relative_to(bundle).as_posix()) for p in plans] == [
        ("gse", "vision", "gse/vision.engine"), ("gse", "decoder", "gse/decoder.engine"),
        ("lpr", "vision", "lpr/vision.engine"), ("lpr", "decoder", "lpr/decoder.engine"),
        ("sam", "image_encoder", "sam/image_encoder.engine"), ("sam", "mask_decoder", "sam/mask_decoder.engine")]
    by_name = {(p.stage, p.graph): p for p in plans}
    # gse: manifest 1024 > pipeline 100; lpr: pipeline 100 > manifest 64 -> the larger one is planned
    assert by_name["gse", "decoder"].limits.max_new_tokens == 1024
    assert by_name["lpr", "decoder"].limits.max_new_tokens == 100
    assert by_name["lpr", "decoder"].profiles[0].shapes["attention_mask"].max == (1, 1, 1, 324 + 20 + 100)
    assert by_name["sam", "mask_decoder"].source_sha256 == "d" * 64
    assert len(plan_engine_builds(bundle / "sam")) == 2  # a single stage folder works too


def test_plan_refuses_a_stage_with_onnx_runtime_contrib_ops(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    data = json.loads((bundle / "lpr" / "manifest.json").read_text())
    (bundle / "lpr" / "manifest.json").write_text(json.dumps({**data, "kv_cache": "shared"}))
    with pytest.raises(ManifestError, match=r"stage 'lpr'.*--kv-cache concat"):
        plan_engine_builds(bundle)


def test_plan_refuses_to_overwrite_and_needs_graphs(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    (bundle / "lpr" / "decoder.engine").write_bytes(b"an older engine")
    with pytest.raises(ArtifactError, match="lpr/decoder.engine; pass --force"):
        plan_engine_builds(bundle)
    assert len(plan_engine_builds(bundle, force=True)) == 6
    (bundle / "sam" / "mask_decoder.onnx").unlink()
    with pytest.raises(ArtifactError, match="graph file 'mask_decoder.onnx' \\(mask_decoder\\) is missing"):
        plan_engine_builds(bundle, force=True)
    with pytest.raises(ManifestError, match="not a folder"):
        plan_engine_builds(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ManifestError, match="format 'something-else' is not a stage"):
        plan_engine_builds(tmp_path / "x")


def run_cli(*args):
    code = "from finers_rt.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(HAS_TRT and GPU is not None, reason="this machine can build engines")
def test_cli_refuses_without_tensorrt_or_gpu(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    result = run_cli("build-engines", str(bundle), "--fp16")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    message = lines[0]
    if not HAS_TRT:
        assert message.startswith("error: MissingExtraError: finers-rt build-engines needs the 'tensorrt' package")
        assert "pip install 'finers-rt[trt]'" in message
        assert "GPU" in message  # the GPU state is named too (no GPU, or not checked without cuda-python)
        if CUDART is not None:
            assert "no usable NVIDIA GPU: CUDA call cudaGetDeviceCount failed: cudaError" in message
    else:
        assert message.startswith("error: EngineProfileError: finers-rt build-engines needs an NVIDIA GPU")
    assert not list(bundle.rglob("*.engine*"))  # nothing written


def test_cli_reports_bundle_problems_before_the_device(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    (bundle / "gse" / "vision.engine").write_bytes(b"x")
    result = run_cli("build-engines", str(bundle))
    assert result.returncode == 2
    assert "ArtifactError: engine(s) already exist" in result.stderr and "--force" in result.stderr
    result = run_cli("build-engines", str(bundle), "--force", "--max-batch", "0")
    assert result.returncode == 2 and "InputError: max_batch must be >= 1, got 0" in result.stderr
    result = run_cli("build-engines", str(bundle), "--force", "--workspace", "0")
    assert result.returncode == 2 and "InputError: workspace must be > 0 GB, got 0.0" in result.stderr


# ---- the backend kind ------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_create_backend_trt_without_tensorrt(tmp_path):
    from finers_rt.backends import BACKEND_KINDS, create_backend

    assert "trt" in BACKEND_KINDS
    stage = write_stage(tmp_path / "lpr", vlm_dict())
    with pytest.raises(MissingExtraError, match="TensorRT backend \\(kind 'trt'\\) needs the 'tensorrt' package"):
        create_backend(stage / "decoder.onnx", BackendOptions(kind="trt", device="cuda"))
    with pytest.raises(InputError, match="trt backend runs on the GPU; device must be one of"):
        create_backend(stage / "decoder.onnx", BackendOptions(kind="trt", device="cpu"))
    with pytest.raises(InputError, match="unknown backend 'trtx' \\(did you mean 'trt'\\?\\)"):
        create_backend(stage / "decoder.onnx", BackendOptions(kind="trtx"))


def test_engine_lookup_next_to_the_graph(tmp_path):
    from finers_rt.backends.trt import resolve_engine

    stage = write_stage(tmp_path / "lpr", vlm_dict())
    with pytest.raises(ArtifactError, match="no TensorRT engine for graph 'decoder'.*finers-rt build-engines"):
        resolve_engine(stage / "decoder.onnx")
    (stage / "decoder.engine").write_bytes(b"engine bytes")
    assert resolve_engine(stage / "decoder.onnx") == (stage / "decoder.engine", "decoder", "b" * 64)
    assert resolve_engine(stage / "decoder.engine")[1:] == ("decoder", "b" * 64)
    with pytest.raises(ArtifactError, match="no graph of .* matches \\(did you mean 'decoder'\\?\\)"):
        resolve_engine(stage / "decodr.onnx")


@pytest.mark.skipif(CUDART is None, reason="cuda-python is not installed")
def test_cuda_return_codes_are_checked():
    from finers_rt.backends.trt import cuda_call

    assert cuda_call(CUDART, (CUDART.cudaError_t.cudaSuccess, 7), "x") == 7
    assert cuda_call(CUDART, (CUDART.cudaError_t.cudaSuccess,), "x") is None
    with pytest.raises(EngineProfileError, match="CUDA call cudaMalloc failed: cudaErrorMemoryAllocation \\("):
        cuda_call(CUDART, (CUDART.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    if GPU is None:  # the real runtime on a machine without a usable GPU
        with pytest.raises(EngineProfileError, match="no usable NVIDIA GPU: CUDA call cudaGetDeviceCount failed"):
            query_device(CUDART)


def test_trt_modules_import_nothing_heavy():
    code = ("import sys, finers_rt.trt, finers_rt.backends, finers_rt.backends.trt\n"
            "print(sorted(m for m in ('tensorrt', 'cuda', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# ---- on a GPU: real engines against ONNX Runtime -------------------------------------------------------


def _decoder_feeds(spec_inputs, batch, seq, past, rng):
    feeds = {}
    for spec in spec_inputs:
        dims = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        shape = tuple(dims.get(d, d) for d in spec.shape)
        feeds[spec.name] = (rng.integers(0, 5, shape).astype(np.int64) if spec.dtype == "int64"
                            else rng.standard_normal(shape).astype(np.float32))
    feeds["attention_mask"] = np.zeros(feeds["attention_mask"].shape, np.float32)
    return feeds


@pytest.mark.gpu
@needs_gpu
def test_gpu_engines_match_onnxruntime(tiny_bundle_portable, tmp_path):
    from finers_rt.backends import create_backend
    from finers_rt.trt import build_engines

    bundle = Path(shutil.copytree(tiny_bundle_portable, tmp_path / "bundle"))
    built = build_engines(bundle, limits=ProfileLimits(max_prompt_tokens=64, max_new_tokens=16), log=lambda m: None)
    assert len(built) == 6 and all(m.device == GPU for m in built)
    with pytest.raises(ArtifactError, match="already exist"):
        build_engines(bundle)
    rng = np.random.default_rng(0)
    stage = bundle / "lpr"
    manifest = VlmStageManifest.load(stage)
    ort = create_backend(stage / "decoder.onnx")
    trt = create_backend(stage / "decoder.onnx", BackendOptions(kind="trt", device="cuda"))
    for seq, past in ((20, 0), (1, 20), (3, 7)):  # prefill, decode, a chunk after a prefix
        feeds = _decoder_feeds(manifest.graphs["decoder"].inputs, 1, seq, past, rng)
        want, got = ort.run(feeds), trt.run(feeds)
        for name, value in want.items():  # TensorRT may use TF32 for fp32 matmuls
            np.testing.assert_allclose(got[name], value, rtol=2e-2, atol=2e-2, err_msg=name)
    with pytest.raises(EngineProfileError, match="outside every optimisation profile"):
        trt.run(_decoder_feeds(manifest.graphs["decoder"].inputs, 1, 1, 10_000, rng))
    sam = SamManifest.load(bundle / "sam")
    e, c = sam.embedding_hw[0], sam.embedding_dim
    feeds = {"image_embeddings": rng.standard_normal((1, c, e, e)).astype(np.float32),
             "point_coords": rng.uniform(0, sam.image_size, (1, 4, 2)).astype(np.float32),
             "point_labels": np.array([[1, 1, 2, 3]], np.float32),
             "mask_input": np.zeros((1, 1, 4 * e, 4 * e), np.float32),
             "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([300, 420], np.float32)}
    want = create_backend(bundle / "sam" / "mask_decoder.onnx").run(feeds)
    got = create_backend(bundle / "sam" / "mask_decoder.onnx", BackendOptions(kind="trt", device="cuda")).run(feeds)
    assert got["masks"].shape == want["masks"].shape == (1, 4, 300, 420)
    np.testing.assert_allclose(got["iou_predictions"], want["iou_predictions"], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_engine_from_another_graph_is_refused(tiny_bundle_portable, tmp_path):
    from finers_rt.backends import create_backend
    from finers_rt.trt import build_engines

    bundle = Path(shutil.copytree(tiny_bundle_portable, tmp_path / "bundle"))
    build_engines(bundle / "sam", log=lambda m: None)
    manifest_path = bundle / "sam" / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["graphs"]["image_encoder"]["sha256"] = "f" * 64
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(EngineProfileError, match="built from graph sha256 .* rebuild it"):
        create_backend(bundle / "sam" / "image_encoder.onnx", BackendOptions(kind="trt", device="cuda"))


# ---- ONNX Runtime's TensorRT execution provider gets the same profiles -----------------------------


def test_ort_tensorrt_provider_gets_manifest_profiles(tmp_path):
    from finers_rt.backends.ort import provider_list
    from finers_rt.trt import merge_profiles, ort_trt_profile_options

    stage = write_stage(tmp_path / "lpr", vlm_dict(max_new_tokens=64))
    merged = merge_profiles(profiles_from_manifest(VlmStageManifest.from_dict(vlm_dict(max_new_tokens=64)))["decoder"])
    s_max, context = 324 + 256, 324 + 256 + 64
    assert merged.shapes["inputs_embeds"].min == (1, 1, H)
    assert merged.shapes["inputs_embeds"].opt == (1, 1, H)  # decode is the hot loop
    assert merged.shapes["inputs_embeds"].max == (1, s_max, H)
    assert merged.shapes["attention_mask"].max == (1, 1, s_max, context)
    options = ort_trt_profile_options(stage / "decoder.onnx")
    assert options["trt_profile_min_shapes"].startswith("inputs_embeds:1x1x64,position_ids:3x1x1,")
    assert f"attention_mask:1x1x{s_max}x{context}" in options["trt_profile_max_shapes"]
    assert f"past_key_1:1x{context - 1}x{KV}x{D}" in options["trt_profile_max_shapes"]
    assert ort_trt_profile_options(stage / "vision.onnx") == {}  # static graph: nothing to say
    assert ort_trt_profile_options(tmp_path / "loose.onnx") == {}  # no manifest beside it
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = provider_list(stage / "decoder.onnx", wanted, ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    (name, trt_options), cpu = providers
    assert (name, cpu) == ("TensorrtExecutionProvider", "CPUExecutionProvider")
    assert trt_options["trt_engine_cache_enable"] and trt_options["trt_engine_cache_path"] == str(stage / "ort_trt_cache")
    assert trt_options["trt_profile_max_shapes"] == options["trt_profile_max_shapes"]
    assert provider_list(stage / "decoder.onnx", ["CPUExecutionProvider"], ["CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]


def test_graph_digest_covers_external_weights(tmp_path):
    """A >2 GB graph keeps its weights in `.onnx.data`: a re-export with new weights of the same
    architecture leaves the `.onnx` byte-identical, so the manifest digest (and the check before
    an engine build) must read the sidecar too."""
    from types import SimpleNamespace

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from finers_rt.manifest import file_sha256, graph_sha256
    from finers_rt.trt import verify_source

    def model(value):
        w = numpy_helper.from_array(np.full((64, 64), value, np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
        return helper.make_model(graph)

    inline = tmp_path / "inline.onnx"
    onnx.save_model(model(1.0), str(inline))
    assert graph_sha256(inline) == file_sha256(inline)  # self-contained graphs: unchanged digests
    ext = tmp_path / "decoder.onnx"
    onnx.save_model(model(1.0), str(ext), save_as_external_data=True, location="decoder.onnx.data",
                    size_threshold=0)
    old_graph, old_file = graph_sha256(ext), file_sha256(ext)
    assert verify_source(SimpleNamespace(onnx_path=ext, source_sha256=old_graph)) == old_graph
    (tmp_path / "decoder.onnx.data").unlink()  # a fresh export writes a fresh sidecar
    onnx.save_model(model(2.0), str(ext), save_as_external_data=True, location="decoder.onnx.data",
                    size_threshold=0)
    assert file_sha256(ext) == old_file and graph_sha256(ext) != old_graph
    with pytest.raises(ManifestError, match="sha256 differs"):
        verify_source(SimpleNamespace(onnx_path=ext, source_sha256=old_graph))
