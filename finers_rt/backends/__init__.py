"""Inference backends behind one tiny interface.

A backend wraps one graph: `.input_specs` / `.output_specs` (lists of TensorSpec read from the
engine) and `.run(feeds, output_names=None) -> dict[str, np.ndarray]`. The runtime never touches
onnxruntime or TensorRT objects directly.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from finers_rt.config import BackendOptions
from finers_rt.errors import InputError, suggest
from finers_rt.manifest import TensorSpec

BACKEND_KINDS = ("ort", "trt")


class Backend(Protocol):
    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray],
            output_names: list[str] | None = None) -> dict[str, np.ndarray]: ...


def create_backend(path: str | os.PathLike, options: BackendOptions | None = None) -> Backend:
    """Open the graph at `path` with the backend `options.kind` names."""
    options = options or BackendOptions()
    if options.kind == "ort":
        from finers_rt.backends.ort import OrtBackend

        return OrtBackend(path, options)
    if options.kind == "trt":  # `path`: a graph's .onnx (its built .engine beside it is used) or the .engine
        from finers_rt.backends.trt import TrtBackend

        return TrtBackend(path, options)
    raise InputError(f"unknown backend '{options.kind}'{suggest(options.kind, BACKEND_KINDS)}; "
                     f"available: {', '.join(BACKEND_KINDS)}")
