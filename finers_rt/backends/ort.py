"""ONNX Runtime backend: one InferenceSession per graph, numpy in, numpy out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from finers_rt.config import BackendOptions
from finers_rt.errors import ArtifactError, EngineProfileError, InputError
from finers_rt.manifest import TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, "float32"), shape)


def session_options(options: BackendOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.intra_op_threads is not None:
        so.intra_op_num_threads = int(options.intra_op_threads)
    so.inter_op_num_threads = int(options.inter_op_threads)
    so.enable_cpu_mem_arena = bool(options.cpu_mem_arena)
    so.log_severity_level = 3
    return so


def provider_list(path: Path, wanted: list[str], available: list[str]) -> list:
    """The wanted providers this build has; the TensorRT EP gets an engine + timing cache beside
    the graph (or in ~/.cache if that folder is read-only) and, for graphs with dynamic inputs,
    explicit profile shapes from the stage manifest (`finers_rt.trt.ort_trt_profile_options`) so
    it does not rebuild its engine each time the KV cache outgrows the shapes it has seen."""
    providers: list = []
    for name in (p for p in wanted if p in available):
        if name == "TensorrtExecutionProvider":
            from finers_rt.trt import ort_trt_profile_options

            cache = path.parent / "ort_trt_cache"
            if not os.access(path.parent, os.W_OK):
                cache = Path.home() / ".cache" / "finers-rt" / "ort_trt_cache" / path.parent.name
            options = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                       **ort_trt_profile_options(path)}
            providers.append((name, options))
        elif name == "CUDAExecutionProvider":
            providers.append((name, {"device_id": 0}))
        else:
            providers.append(name)
    return providers


class OrtBackend:
    """A graph on ONNX Runtime. `run` takes and returns numpy arrays keyed by tensor name."""

    def __init__(self, path: str | os.PathLike, options: BackendOptions | None = None):
        self.options = options or BackendOptions()
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"graph file {self.path} is missing")
        wanted = _PROVIDERS.get(self.options.device)
        if wanted is None:
            raise InputError(f"unknown device '{self.options.device}' for the ort backend "
                             f"(expected one of {sorted(_PROVIDERS)})")
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise EngineProfileError(
                f"device '{self.options.device}' needs ONNX Runtime's {wanted[0]}, which this "
                f"onnxruntime build lacks (available: {available}); install the 'gpu' extra "
                "(onnxruntime-gpu) on a machine with an NVIDIA GPU")
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(self.options),
                                                providers=provider_list(self.path, wanted, available))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load this graph: "
                                f"{str(exc).splitlines()[0][:300]}") from None
        self.input_specs = [_spec(a) for a in self.session.get_inputs()]
        self.output_specs = [_spec(a) for a in self.session.get_outputs()]
        self._output_names = [s.name for s in self.output_specs]

    def run(self, feeds: dict[str, np.ndarray],
            output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = output_names or self._output_names
        outputs = self.session.run(names, feeds)
        return dict(zip(names, outputs))

    def io_binding(self) -> ort.IOBinding:
        """An IOBinding for callers that bind preallocated output buffers (decode loop)."""
        return self.session.io_binding()

    def run_with_binding(self, binding: ort.IOBinding) -> None:
        self.session.run_with_iobinding(binding)

    def shared_kv_binding(self, pairs: list[tuple[np.ndarray, np.ndarray]], seq: int, hidden: int,
                          vocab: int) -> "SharedKvBinding":
        """A persistent IO binding of a kv_cache "shared" decoder graph (docs/bundle-format.md) to
        `pairs` of contiguous K/V arrays `[rows, KV, max_len, D]`, for `seq` new tokens per run."""
        return SharedKvBinding(self.session, pairs, seq, hidden, vocab)


class SharedKvBinding:
    """`past_key_i` and `present_key_i` (and values) bound to the SAME caller-owned array, so the
    graph's GroupQueryAttention reads the cache and writes the new K/V in place; `inputs_embeds`,
    `position_ids`, `seqlens_k`, `total_sequence_length` and `logits` bound to arrays owned here,
    which the caller fills before `run()` and reads after. Nothing is re-bound between runs."""

    def __init__(self, session: ort.InferenceSession, pairs: list[tuple[np.ndarray, np.ndarray]], seq: int,
                 hidden: int, vocab: int):
        rows = pairs[0][0].shape[0]
        self.session = session
        self.pairs = pairs  # keeps the bound memory alive
        self.embeds = np.zeros((rows, seq, hidden), np.float32)
        self.positions = np.zeros((3, rows, seq), np.int64)
        self.seqlens = np.zeros((rows,), np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((rows, vocab), np.float32)
        self.binding = session.io_binding()
        for name, array in (("inputs_embeds", self.embeds), ("position_ids", self.positions),
                            ("seqlens_k", self.seqlens), ("total_sequence_length", self.total)):
            self.binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self.binding.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        for i, (keys, values) in enumerate(pairs):
            for kind, array in (("key", keys), ("value", values)):
                if not array.flags.c_contiguous or array.dtype != np.float32:
                    raise InputError(f"shared K/V {kind} {i} must be a contiguous float32 array")
                shape, ptr = list(array.shape), array.ctypes.data
                self.binding.bind_input(f"past_{kind}_{i}", "cpu", 0, np.float32, shape, ptr)
                self.binding.bind_output(f"present_{kind}_{i}", "cpu", 0, np.float32, shape, ptr)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)
