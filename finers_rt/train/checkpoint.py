"""Checkpoints of a training run: an HF folder (what export takes) + the trainer state.

RUN_DIR/checkpoint/          HF Qwen2.5-VL folder: weights + tokenizer + processor + template
RUN_DIR/trainer_state.pt     step, optimizer, auxiliary heads, RNG states, config, history
RUN_DIR/log.jsonl            one JSON line per logged step / eval (the learning curve)
Both are written to a temporary name and renamed, so a killed run leaves the last good one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from finers_rt.errors import ArtifactError

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def copy_processor_files(src: Path, dst: Path) -> None:
    """Copy every non-weight file of an HF folder (tokenizer, processor, templates, configs)."""
    for path in Path(src).iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != "config.json":
            shutil.copy2(path, dst / path.name)


def save_hf(model, processor_src: Path, out: Path) -> Path:
    """Write `model` as an HF folder at `out` (atomically), with the processor files of
    `processor_src`. Returns `out`."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    module = model.module if hasattr(model, "module") else model
    module.save_pretrained(str(tmp), safe_serialization=True)
    copy_processor_files(processor_src, tmp)
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out


def save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ArtifactError(f"cannot read trainer state {path}: {exc}") from None


def rng_state(rng) -> dict[str, Any]:
    """Everything random in a run: the numpy sampler and torch's CPU generator."""
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def restore_rng(rng, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_release_copy(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy an HF checkpoint with its weights stored as float16 (half the bytes; loaders that
    ask for float32, like the exporter, upcast exactly). Processor files are copied as-is."""
    from finers_rt.export.pointer import load_vlm

    src, out = Path(hf_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ArtifactError(f"{src} is not a Hugging Face checkpoint folder (no config.json)")
    model = load_vlm(src, dtype=torch.float16)
    return save_hf(model, src, out)
