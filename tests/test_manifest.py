"""Manifests: round trips, validation messages, session checks."""

import json

import pytest

from finers_rt.config import PipelineConfig
from finers_rt.errors import EngineProfileError, ManifestError
from finers_rt.manifest import (BundleManifest, GraphSpec, TensorSpec, VlmStageManifest,
                                check_session_matches)


def vlm_dict():
    dec_in = [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "seq", 64]},
              {"name": "position_ids", "dtype": "int64", "shape": [3, "batch", "seq"]}]
    return {
        "format": "finers-rt.vlm-stage", "format_version": 1, "finers_rt_version": "0.1.0",
        "role": "lpr", "precision": "fp32",
        "image": {"stage_size_wh": [512, 512], "resized_hw": [504, 504], "grid_thw": [1, 36, 36],
                  "num_patches": 1296, "num_image_tokens": 324},
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000,
                 "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        "special_tokens": {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3,
                           "vision_end_token_id": 4, "eos_token_ids": [1, 2]},
        "chat": {"before_image": "<s>", "image_token": "<i>", "after_image": "</v>", "after_text": "<a>"},
        "generation": {"max_new_tokens": 1024, "repetition_penalty": 1.05},
        "graphs": {"vision": {"file": "vision.onnx", "inputs": [], "outputs": []},
                   "decoder": {"file": "decoder.onnx", "inputs": dec_in, "outputs": []}},
        "embeddings": {"file": "embed_tokens.npy", "dtype": "float32", "shape": [1000, 64]},
        "tokenizer": {"file": "tokenizer.json"},
    }


def test_vlm_round_trip(tmp_path):
    manifest = VlmStageManifest.from_dict(vlm_dict())
    manifest.save(tmp_path)
    again = VlmStageManifest.load(tmp_path)
    assert again == manifest
    assert again.image.grid_thw == (1, 36, 36)
    assert again.chat.render(2, "Q") == "<s><i><i></v>Q<a>"
    assert again.graphs["decoder"].input("position_ids").shape == (3, "batch", "seq")


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(rol="lpr"), "unknown key 'rol' (did you mean 'role'?)"),
    (lambda d: d.pop("tokenizer"), "missing required key 'tokenizer'"),
    (lambda d: d.update(format="finers-rt.sam"), "expected 'finers-rt.vlm-stage'"),
    (lambda d: d.update(format_version=99), "format_version 99 is not supported"),
    (lambda d: d["image"].update(num_image_tokens=300), "num_image_tokens 300"),
    (lambda d: d["text"].update(mrope_section=[2, 2, 2]), "must sum to head_dim/2"),
    (lambda d: d["text"].update(hidden_size="64"), "expected an integer"),
    (lambda d: d.update(precision="int3"), "precision 'int3'"),
    (lambda d: d["graphs"].pop("vision"), "missing graph(s) ['vision']"),
    (lambda d: d["graphs"].update(visoin=d["graphs"]["vision"]), "did you mean 'vision'"),
    (lambda d: d["graphs"]["decoder"]["inputs"][0].update(dtype="float"), "unknown dtype 'float'"),
])
def test_vlm_validation_messages(mutate, needle):
    data = vlm_dict()
    mutate(data)
    with pytest.raises(ManifestError) as info:
        VlmStageManifest.from_dict(data)
    assert needle in str(info.value)


def test_load_errors(tmp_path):
    with pytest.raises(ManifestError, match="not a folder"):
        VlmStageManifest.load(tmp_path / "nope")
    with pytest.raises(ManifestError, match="missing"):
        VlmStageManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        VlmStageManifest.load(tmp_path)


class FakeBackend:
    def __init__(self, inputs, outputs):
        self.input_specs, self.output_specs = inputs, outputs


def test_session_check():
    graph = GraphSpec("g.onnx", (TensorSpec("x", "float32", ("batch", 8)),),
                      (TensorSpec("y", "float32", ("batch", 4)),))
    ok = FakeBackend([TensorSpec("x", "float32", ("b", 8))], [TensorSpec("y", "float32", ("b", 4))])
    check_session_matches(graph, ok)
    bad_shape = FakeBackend([TensorSpec("x", "float32", ("b", 9))], ok.output_specs)
    with pytest.raises(EngineProfileError, match=r"input 'x' is float32\['b', 9\]"):
        check_session_matches(graph, bad_shape)
    renamed = FakeBackend([TensorSpec("xx", "float32", ("b", 8))], ok.output_specs)
    with pytest.raises(EngineProfileError, match="did you mean 'xx'"):
        check_session_matches(graph, renamed)
    bad_dtype = FakeBackend(ok.input_specs, [TensorSpec("y", "float16", ("b", 4))])
    with pytest.raises(EngineProfileError, match="output 'y' is float16"):
        check_session_matches(graph, bad_dtype)


def test_bundle_manifest_and_pipeline_config(tmp_path):
    cfg = PipelineConfig()
    data = {"format": "finers-rt.bundle", "format_version": 1, "finers_rt_version": "0.1.0",
            "name": "t", "stages": {"gse": "gse", "lpr": "lpr", "sam": "sam"},
            "pipeline": cfg.to_dict()}
    bundle = BundleManifest.from_dict(json.loads(json.dumps(data)))
    assert PipelineConfig.from_dict(bundle.pipeline) == cfg
    data["stages"] = {"gse": "gse", "lpr": "lpr"}
    with pytest.raises(ManifestError, match="missing stage"):
        BundleManifest.from_dict(data)
    with pytest.raises(ManifestError, match="did you mean 'crop_policy'"):
        PipelineConfig.from_dict({"crop_polcy": "region"})
