"""Configuration: runtime options and the FineRS pipeline settings (one place, from the spec).

`PipelineConfig` defaults are the FineRS reference values; a bundle manifest stores the config it
was exported with and the runtime reads it from there, never from scattered constants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from finers_rt.errors import InputError, ManifestError, suggest
from finers_rt.prompts import DEFAULT_TEMPLATES, QUESTION_TYPES, PromptTemplates

BACKEND_DEVICES = ("cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class BackendOptions:
    """How graphs are run. `intra_op_threads=None` lets the backend choose.

    `cpu_mem_arena`: ONNX Runtime's CPU arena keeps freed activation memory for reuse; on a
    ViT encoder it held 3.8-6.9 GB resident after a run against 0.9 GB without it, so it is off
    by default (edge devices care about resident memory more than allocator speed).
    """

    kind: str = "ort"
    device: str = "cpu"
    intra_op_threads: int | None = None
    inter_op_threads: int = 1
    cpu_mem_arena: bool = False

    def __post_init__(self):
        if self.device not in BACKEND_DEVICES:
            raise InputError(f"unknown device '{self.device}'{suggest(self.device, BACKEND_DEVICES)}"
                             f"; expected one of {BACKEND_DEVICES}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise InputError(f"intra_op_threads must be >= 1, got {self.intra_op_threads}")
        if self.inter_op_threads < 1:
            raise InputError(f"inter_op_threads must be >= 1, got {self.inter_op_threads}")


CROP_POLICIES = ("dynamic_box", "region")
ANSWER_SOURCES = ("lpr", "gse")


@dataclass(frozen=True)
class PipelineConfig:
    """FineRS pipeline settings (FINERS_SPEC.md). Sizes are (width, height) in pixels.

    - `gse_size_wh`: the whole image is resized (bilinear, aspect not kept) to this for GSE.
    - `region_size`: the side of the region GSE is asked for, in the GSE frame.
    - `crop_policy`: "dynamic_box" = square of side max(crop_min_side, region side) centred on the
      region, clamped to the image (the official default); "region" = the region itself.
    - `lpr_size_wh`: the crop is resized to this for LPR; LPR coordinates are in this frame.
    - `answer_source`: which stage's `response` is the final answer (GSE is the fallback).
    """

    gse_size_wh: tuple[int, int] = (1920, 1080)
    lpr_size_wh: tuple[int, int] = (512, 512)
    region_size: int = 256
    crop_min_side: int = 512
    crop_policy: str = "dynamic_box"
    answer_source: str = "lpr"
    max_new_tokens: int = 1024
    sam_point_labels: tuple[int, int] = (1, 1)
    sam_multimask_output: bool = True
    templates: PromptTemplates = field(default_factory=lambda: DEFAULT_TEMPLATES)

    def __post_init__(self):
        for name in ("gse_size_wh", "lpr_size_wh"):
            size = getattr(self, name)
            if len(size) != 2 or min(size) < 28:
                raise InputError(f"{name} must be (width, height) >= 28 px, got {size}")
        if self.region_size < 1 or self.crop_min_side < 1:
            raise InputError("region_size and crop_min_side must be positive")
        if self.crop_policy not in CROP_POLICIES:
            raise InputError(f"unknown crop_policy '{self.crop_policy}'"
                             f"{suggest(self.crop_policy, CROP_POLICIES)}")
        if self.answer_source not in ANSWER_SOURCES:
            raise InputError(f"unknown answer_source '{self.answer_source}'"
                             f"{suggest(self.answer_source, ANSWER_SOURCES)}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["templates"] = self.templates.to_dict()
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PipelineConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ManifestError(f"pipeline settings: unknown key '{key}'{suggest(key, names)}")
        kwargs = dict(data)
        for key in ("gse_size_wh", "lpr_size_wh", "sam_point_labels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if "templates" in kwargs:
            kwargs["templates"] = PromptTemplates.from_dict(kwargs["templates"])
        try:
            return cls(**kwargs)
        except (TypeError, InputError) as exc:
            raise ManifestError(f"pipeline settings: {exc}") from None


__all__ = ["BackendOptions", "PipelineConfig", "QUESTION_TYPES"]
