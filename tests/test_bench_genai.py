"""The onnxruntime-genai peer (finers_rt.bench_genai): genai runs the shipped decoder graph (with its
edge adapters) to the same greedy tokens and prefill logits as finers-rt. Skipped without genai."""

from __future__ import annotations

import json

import pytest

og = pytest.importorskip("onnxruntime_genai")

from finers_rt.bench_genai import compare, genai_model_dir
from finers_rt.config import BackendOptions
from finers_rt.pipeline import default_bundle_path
from finers_rt.vlm import VlmStage


@pytest.fixture(scope="module")
def stage_dir():
    return default_bundle_path() / "gse"


def test_model_dir_keeps_decoder_nodes(stage_dir, tmp_path):
    import onnx

    stage = VlmStage.load(stage_dir, BackendOptions(intra_op_threads=1))
    folder = genai_model_dir(stage, tmp_path, threads=1, max_length=128)
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["type"] == "qwen2_5_vl"
    assert config["model"]["decoder"]["num_hidden_layers"] == stage.num_kv_pairs
    assert config["search"]["past_present_share_buffer"] is True
    original = onnx.load(str(stage_dir / "decoder.onnx"), load_external_data=False).graph
    adapted = onnx.load(str(folder / "decoder_genai.onnx"), load_external_data=False).graph
    assert len(adapted.node) == len(original.node) + 6  # 5 input adapter nodes + 1 Unsqueeze
    assert {i.name for i in adapted.input} == ({i.name for i in original.input}
                                              - {"seqlens_k", "total_sequence_length"}) | {"attention_mask"}


def test_same_tokens_and_logits_as_finers_rt(stage_dir):
    result = compare(stage_dir, text="Describe a red circle left of a blue square.", max_new_tokens=12,
                     iters=1, warmup=0, threads=1)
    assert result["tokens_equal"]
    assert result["natural_tokens"]["genai"] == result["natural_tokens"]["finers_rt"]
    assert len(result["timed_tokens"]["genai"]) == 12
    assert result["prefill_logits_max_abs_diff"] < 1e-4
    for side in result["sides"].values():
        assert side["decode_ms_per_token"]["p50"] > 0 and side["prefill_ms"]["p50"] > 0
