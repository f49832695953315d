"""Shared pytest fixtures: tiny random checkpoints built once per session (no network).

Torch-side fixtures skip cleanly when the 'export' extra (torch, transformers) is absent.
Add new fixtures in their own section below; keep each one session-scoped and deterministic.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# ---- random Qwen2.5-VL checkpoints (finers_rt.export.checkpoints) -----------------------------


@pytest.fixture(scope="session")
def make_vlm_checkpoint(tmp_path_factory):
    """Factory: `make_vlm_checkpoint(spec_name, seed=0) -> Path` of an HF checkpoint folder.

    Folders are cached per (spec, seed) for the whole session. Spec names are those of
    `finers_rt.export.checkpoints.SPECS` ("tiny", "tiny-gqa3", "tiny-mrope", "7b-shaped").
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from finers_rt.export.checkpoints import make_random_qwen25vl

    cache: dict[tuple[str, int], Path] = {}

    def make(spec_name: str, seed: int = 0) -> Path:
        key = (spec_name, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf-{spec_name}-{seed}")
            cache[key] = make_random_qwen25vl(out, spec_name, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_vlm_dir(make_vlm_checkpoint) -> Path:
    """The `tiny` random Qwen2.5-VL checkpoint (LM 2x64, GQA 4/2; vision 2x32), seed 0."""
    return make_vlm_checkpoint("tiny", 0)


# ---- a tiny exported bundle (finers_rt.export.bundle) ----------------------------------------

SAM_TINY = {"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2,
            "encoder_global_attn_indexes": [1], "image_size": 256, "prompt_embed_dim": 64,
            "decoder_mlp_dim": 128, "decoder_num_heads": 2, "iou_head_hidden_dim": 64,
            "mask_in_chans": 8}


def _export_tiny_bundle(tmp_path_factory, make_vlm_checkpoint, kv_cache: str) -> Path:
    import json

    from finers_rt.export.bundle import export_bundle
    from finers_rt.export.sam_configs import make_random_sam_checkpoint, resolve_sam_config

    root = tmp_path_factory.mktemp("bundle")
    (root / "sam.json").write_text(json.dumps(SAM_TINY))
    sam_ckpt = make_random_sam_checkpoint(root / "sam.pth",
                                          resolve_sam_config("vit_b", root / "sam.json"), seed=0)
    export_bundle(make_vlm_checkpoint("tiny", 0), make_vlm_checkpoint("tiny", 1), sam_ckpt,
                  root / "bundle", sam_config=root / "sam.json", gse_size_wh=(448, 252),
                  lpr_size_wh=(224, 224), kv_cache=kv_cache)
    return root / "bundle"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, make_vlm_checkpoint) -> Path:
    """A bundle of two `tiny` random VLM stages (GSE 448x252, LPR 224x224) and a tiny SAM
    (image_size 256), exported and validated through `export_bundle` (default contract)."""
    return _export_tiny_bundle(tmp_path_factory, make_vlm_checkpoint, "shared")


@pytest.fixture(scope="session")
def tiny_bundle_portable(tmp_path_factory, make_vlm_checkpoint) -> Path:
    """`tiny_bundle` exported with `kv_cache="concat"` (plain ONNX ops: what TensorRT builds)."""
    return _export_tiny_bundle(tmp_path_factory, make_vlm_checkpoint, "concat")


@pytest.fixture(scope="session")
def scene(tmp_path_factory) -> Path:
    """A 900x600 random-noise PNG."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    cv2.imwrite(str(path), (rng.random((600, 900, 3)) * 255).astype(np.uint8))
    return path
