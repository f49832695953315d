"""TensorRT backend: a `<graph>.engine` built by `finers-rt build-engines`, run on the GPU with
device buffers from cuda-python (no torch). Same interface as `OrtBackend`: `input_specs`,
`output_specs`, `run(feeds, output_names=None) -> dict[str, np.ndarray]` (numpy in, numpy out).

Also the device stack both this backend and the engine builder need: `require_trt_stack`
(tensorrt + cuda-python + a GPU, or one error naming what is missing), `cuda_call` (every
cuda-python return code checked), `query_device`. tensorrt / cuda-python are imported lazily.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from finers_rt.config import BackendOptions
from finers_rt.errors import ArtifactError, EngineProfileError, InputError, MissingExtraError, suggest
from finers_rt.manifest import TensorSpec
from finers_rt.trt import (ENGINE_SUFFIX, REBUILD_HINT, DeviceInfo, check_engine_metadata, load_engine_metadata,
                           read_manifest_format, select_profile)

MIN_TRT_MAJOR = 10
TRT_DEVICES = ("cuda", "tensorrt")


# ---- the device stack ---------------------------------------------------------------------------


@dataclass
class TrtStack:
    trt: Any
    cudart: Any
    device: DeviceInfo


def import_cudart() -> Any:
    """cuda-python's runtime module (`cuda.bindings.runtime`, or the older `cuda.cudart`)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


def cuda_error_text(cudart: Any, err: Any) -> str:
    def text(value: Any) -> str:
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    return f"{text(cudart.cudaGetErrorName(err)[1])} ({text(cudart.cudaGetErrorString(err)[1])})"


def cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """Check a cuda-python `(err, *values)` result; return the value(s) or raise EngineProfileError."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineProfileError(f"CUDA call {what} failed: {cuda_error_text(cudart, err)}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def query_device(cudart: Any) -> DeviceInfo:
    """The current CUDA device; EngineProfileError naming the CUDA error if there is none."""
    try:
        count = cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except EngineProfileError as exc:
        raise EngineProfileError(f"no usable NVIDIA GPU: {exc}") from None
    if not count:
        raise EngineProfileError("no usable NVIDIA GPU: cudaGetDeviceCount found 0 devices")
    index = cuda_call(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    props = cuda_call(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.split("\x00")[0].strip(), (int(props.major), int(props.minor)), int(props.totalGlobalMem))


def require_trt_stack(feature: str) -> TrtStack:
    """Import tensorrt + cuda-python and find the GPU, or raise ONE error naming everything missing:
    MissingExtraError (the 'trt' extra) when a package is absent, EngineProfileError for no GPU."""
    missing, trt, cudart, device, gpu_problem = [], None, None, None, ""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        missing.append("tensorrt")
    try:
        cudart = import_cudart()
    except ImportError:
        missing.append("cuda-python")
    if cudart is not None:
        try:
            device = query_device(cudart)
        except EngineProfileError as exc:
            gpu_problem = str(exc)
    else:
        gpu_problem = "a GPU check (it needs cuda-python)"
    if missing:
        exc = MissingExtraError("trt", missing[0], feature)
        also = missing[1:] + ([gpu_problem] if gpu_problem else [])
        if also:  # ImportError prints `msg`, not `args`
            exc.msg = f"{exc}. Also missing: {'; '.join(also)}"
            exc.args = (exc.msg,)
        raise exc
    if device is None:
        raise EngineProfileError(f"{feature} needs an NVIDIA GPU: {gpu_problem}")
    major = str(trt.__version__).split(".")[0]
    if not major.isdigit() or int(major) < MIN_TRT_MAJOR:
        raise MissingExtraError("trt", f"tensorrt>={MIN_TRT_MAJOR} (found {trt.__version__})", feature)
    return TrtStack(trt, cudart, device)


# ---- engine lookup -----------------------------------------------------------------------------


def resolve_engine(path: str | os.PathLike) -> tuple[Path, str, str]:
    """`folder/<file>.onnx` or `folder/<graph>.engine` -> (engine path, graph name, the manifest's
    sha256 of that graph). The stage folder's manifest.json names the graphs."""
    import json

    path = Path(path)
    folder = path.parent
    read_manifest_format(folder)  # ManifestError if there is no readable manifest.json
    graphs = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("graphs", {})
    if not isinstance(graphs, dict):
        raise ArtifactError(f"{folder}/manifest.json: 'graphs' is not an object")
    if path.name.endswith(ENGINE_SUFFIX):
        graph = path.name[: -len(ENGINE_SUFFIX)]
    else:
        graph = next((g for g, spec in graphs.items() if isinstance(spec, dict) and spec.get("file") == path.name), "")
    if graph not in graphs:
        raise ArtifactError(f"{path}: no graph of {folder}/manifest.json matches{suggest(path.stem, graphs)}")
    engine = folder / f"{graph}{ENGINE_SUFFIX}"
    if not engine.is_file():
        raise ArtifactError(f"{engine}: no TensorRT engine for graph '{graph}'; build it on this machine with "
                            "`finers-rt build-engines BUNDLE`")
    return engine, graph, str(graphs[graph].get("sha256", ""))


# ---- device memory --------------------------------------------------------------------------------


class DeviceBuffer:
    """One cudaMalloc'd block that grows on demand (never shrinks) until `free()`."""

    def __init__(self, cudart: Any, name: str):
        self.cudart, self.name, self.ptr, self.capacity = cudart, name, 0, 0

    def ensure(self, nbytes: int) -> int:
        if self.ptr and nbytes <= self.capacity:
            return self.ptr
        self.free()
        size = max(int(nbytes), 256)
        self.ptr = int(cuda_call(self.cudart, self.cudart.cudaMalloc(size), f"cudaMalloc({size}) for '{self.name}'"))
        self.capacity = size
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr, self.capacity = self.ptr, 0, 0
            cuda_call(self.cudart, self.cudart.cudaFree(ptr), f"cudaFree for '{self.name}'")


def _make_output_allocator(trt: Any, cudart: Any) -> Any:
    """A trt.IOutputAllocator for outputs whose shape depends on input VALUES (e.g. SAM masks
    sized by `orig_im_size`): TensorRT asks for memory during execution and reports the shape."""

    class _OutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, DeviceBuffer] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.errors: list[str] = []

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return self.reallocate_output_async(tensor_name, memory, size, alignment, None)

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            buffer = self.buffers.setdefault(tensor_name, DeviceBuffer(cudart, tensor_name))
            try:
                return buffer.ensure(size)
            except EngineProfileError as exc:
                self.errors.append(str(exc))
                return None  # TensorRT then fails the execution

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

    return _OutputAllocator()


def _dtype_table(trt: Any) -> dict[Any, str]:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
             "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
    return {getattr(trt.DataType, k): v for k, v in names.items() if hasattr(trt.DataType, k)}


# ---- the backend -------------------------------------------------------------------------------


class TrtBackend:
    """A TensorRT engine on the current CUDA device. `run` takes and returns numpy arrays keyed by
    tensor name (the names of the ONNX graph and the manifest); inputs are copied to device
    buffers, input shapes set per call (picking the optimisation profile that holds them), the
    engine enqueued with `execute_async_v3` on a private stream and the outputs copied back."""

    def __init__(self, engine_path: str | os.PathLike, options: BackendOptions | None = None):
        self.options = options or BackendOptions(kind="trt", device="cuda")
        if self.options.device not in TRT_DEVICES:
            raise InputError(f"the trt backend runs on the GPU; device must be one of {TRT_DEVICES}, "
                             f"got '{self.options.device}'")
        stack = require_trt_stack("the TensorRT backend (kind 'trt')")
        self.trt, self.cudart = stack.trt, stack.cudart
        self.path, self.graph, source_sha256 = resolve_engine(engine_path)
        self.metadata = load_engine_metadata(self.path)
        check_engine_metadata(self.metadata, source_sha256=source_sha256, tensorrt_version=str(self.trt.__version__),
                              device=stack.device, engine_bytes=self.path.stat().st_size, where=str(self.path))
        self._buffers: dict[str, DeviceBuffer] = {}
        self._host_keepalive: dict[str, np.ndarray] = {}  # shape-tensor values TensorRT reads at enqueue
        self._allocator = None
        self._profile: int | None = None
        self._lock = threading.Lock()  # one execution context and one set of buffers per backend
        self.stream = None
        self._load_engine()
        self.stream = cuda_call(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = int(self.stream)

    def _load_engine(self) -> None:
        trt = self.trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{self.path}: TensorRT could not deserialize this engine; {REBUILD_HINT}")
        if self.engine.num_optimization_profiles != len(self.metadata.profiles):
            raise EngineProfileError(f"{self.path}: engine has {self.engine.num_optimization_profiles} optimisation "
                                     f"profile(s), its metadata lists {len(self.metadata.profiles)}; {REBUILD_HINT}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineProfileError(f"{self.path}: TensorRT could not create an execution context (GPU memory?)")
        dtypes = _dtype_table(trt)
        self.input_specs, self.output_specs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(int(d) if d >= 0 else "?" for d in self.engine.get_tensor_shape(name))
            spec = TensorSpec(name, dtypes.get(self.engine.get_tensor_dtype(name), "float32"), shape)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.input_specs if is_input else self.output_specs).append(spec)
        self._dtypes = {s.name: s.dtype for s in self.input_specs + self.output_specs}
        self._shape_inputs = {s.name for s in self.input_specs if self.engine.is_shape_inference_io(s.name)}
        self._output_names = [s.name for s in self.output_specs]

    # -- one call ---------------------------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray],
            output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """`feeds`: every engine input by name, numpy with the engine's dtype. Returns the requested
        outputs (all by default) as new numpy arrays. Shapes outside every optimisation profile
        raise EngineProfileError naming the tensor, its shape and the profile ranges. Thread-safe
        (calls are serialised)."""
        with self._lock:
            return self._run(feeds, output_names)

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None) -> dict[str, np.ndarray]:
        arrays = self._check_feeds(feeds)
        names = list(output_names or self._output_names)
        for name in names:
            if name not in self._dtypes or name in arrays:
                raise InputError(f"'{name}' is not an output of {self.path.name}"
                                 f"{suggest(name, self._output_names)}")
        self._select_profile({n: a.shape for n, a in arrays.items()})
        for name, array in arrays.items():
            self._bind_input(name, array)
        dynamic = self._bind_outputs()
        if not self.context.execute_async_v3(self._stream_handle):
            raise EngineProfileError(f"{self.path}: TensorRT execution failed"
                                     + (f" ({'; '.join(self._allocator.errors)})" if dynamic and self._allocator.errors
                                        else ""))
        results = {}
        for name in names:
            if name in dynamic:
                shape, ptr = self._allocator.shapes[name], self._allocator.buffers[name].ptr
            else:
                shape, ptr = tuple(self.context.get_tensor_shape(name)), self._buffers[name].ptr
            results[name] = self._download(name, shape, ptr)
        cuda_call(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return results

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [s.name for s in self.input_specs]
        for name in feeds:
            if name not in inputs:
                raise InputError(f"'{name}' is not an input of {self.path.name}{suggest(name, inputs)}")
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise InputError(f"{self.path.name}: missing input(s) {missing}")
        arrays = {}
        for name in inputs:
            array = np.asarray(feeds[name])
            if array.dtype.name != self._dtypes[name]:
                raise InputError(f"input '{name}' must be {self._dtypes[name]}, got {array.dtype.name}{list(array.shape)}")
            arrays[name] = np.ascontiguousarray(array)
        return arrays

    def _select_profile(self, shapes: dict[str, tuple[int, ...]]) -> None:
        index = select_profile(self.metadata.profiles, shapes, where=str(self.path))
        if index != self._profile:
            if not self.context.set_optimization_profile_async(index, self._stream_handle):
                raise EngineProfileError(f"{self.path}: TensorRT refused optimisation profile {index}")
            self._profile = index

    def _bind_input(self, name: str, array: np.ndarray) -> None:
        if not self.context.set_input_shape(name, array.shape):
            shape_range = self.metadata.profiles[self._profile].shapes.get(name)
            raise EngineProfileError(f"{self.path}: TensorRT refused shape {list(array.shape)} for input '{name}'"
                                     + (f" (profile range {shape_range.describe()})" if shape_range else ""))
        if name in self._shape_inputs:  # TensorRT reads shape-tensor VALUES from host memory
            self._host_keepalive[name] = array
            ok = self.context.set_tensor_address(name, array.ctypes.data)
        else:
            ptr = self._buffer(name).ensure(max(array.nbytes, self._max_input_bytes(name)))
            if array.nbytes:
                cuda_call(self.cudart, self.cudart.cudaMemcpyAsync(
                    ptr, array.ctypes.data, array.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    self.stream), f"cudaMemcpyAsync host->device for '{name}'")
            ok = self.context.set_tensor_address(name, ptr)
        if not ok:
            raise EngineProfileError(f"{self.path}: TensorRT refused the address of input '{name}'")

    def _bind_outputs(self) -> set[str]:
        """Device memory for every output (TensorRT needs all bound); returns the outputs whose
        shape is only known during execution (served by the output allocator)."""
        dynamic = set()
        for name in self._output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                if self._allocator is None:
                    self._allocator = _make_output_allocator(self.trt, self.cudart)
                self._allocator.errors.clear()
                ok = self.context.set_output_allocator(name, self._allocator)
                dynamic.add(name)
            else:
                ptr = self._buffer(name).ensure(prod(shape) * _itemsize(self._dtypes[name]))
                ok = self.context.set_tensor_address(name, ptr)
            if not ok:
                raise EngineProfileError(f"{self.path}: TensorRT refused to bind output '{name}'")
        return dynamic

    def _download(self, name: str, shape: tuple[int, ...], ptr: int) -> np.ndarray:
        dtype = self._dtypes[name]
        if dtype == "bfloat16":
            raise EngineProfileError(f"{self.path}: output '{name}' is bfloat16, which numpy cannot hold")
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            cuda_call(self.cudart, self.cudart.cudaMemcpyAsync(
                out.ctypes.data, ptr, out.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                f"cudaMemcpyAsync device->host for '{name}'")
        return out

    def _max_input_bytes(self, name: str) -> int:
        """Bytes of the largest shape any profile allows (one allocation, not one per decode step)."""
        sizes = [prod(p.shapes[name].max) for p in self.metadata.profiles if name in p.shapes]
        return max(sizes, default=0) * _itemsize(self._dtypes[name])

    def _buffer(self, name: str) -> DeviceBuffer:
        if name not in self._buffers:
            self._buffers[name] = DeviceBuffer(self.cudart, name)
        return self._buffers[name]

    def close(self) -> None:
        """Free device buffers and the stream (also done on garbage collection)."""
        buffers = list(self._buffers.values()) + (list(self._allocator.buffers.values()) if self._allocator else [])
        self._buffers = {}
        for buffer in buffers:
            buffer.free()
        if self.stream is not None:
            stream, self.stream = self.stream, None
            cuda_call(self.cudart, self.cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA context may already be gone
            pass


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
