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
