"""ONNX graph files of a stage: one `.onnx` (+ one `.onnx.data` when weights exceed 2 GB) and
the manifest's `GraphSpec` read back from the file itself."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from finers_rt.manifest import GraphSpec, TensorSpec, graph_sha256

# Keep a graph self-contained below this size; protobuf cannot hold more than 2 GB.
INLINE_LIMIT_BYTES = 1_800_000_000

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
}


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def consolidate_external_data(path: Path) -> None:
    """Make `path` either self-contained (small) or `path` + ONE `path.name + '.data'` file.

    The TorchScript exporter writes one file per tensor for > 2 GB models; those are merged and
    removed here. Weights are loaded once (one extra copy in RAM at most while rewriting).
    """
    path = Path(path)
    header = onnx.load(str(path), load_external_data=False)
    stray = _external_locations(header) - {path.name + ".data"}
    if not stray and path.stat().st_size < INLINE_LIMIT_BYTES:
        return
    del header
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    for name in stray:
        (path.parent / name).unlink(missing_ok=True)


def dedupe_constants(path: Path) -> int:
    """Drop every `Constant` node whose value (dtype, shape, bytes) repeats an earlier one and
    let its consumers, subgraphs included, read the first. Exact: no value changes. The tracer
    folds e.g. the vision tower's rotary tables once per block (2.1 of 3.1 MB of constants in a
    4-block tower at 1,196 patches). Returns the bytes saved; the file is rewritten only then."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep, saved = [], 0
    for node in graph.node:
        attrs = node.attribute
        if (node.op_type == "Constant" and not node.domain and len(attrs) == 1
                and attrs[0].name == "value" and node.output[0] not in outputs
                and attrs[0].t.data_location != onnx.TensorProto.EXTERNAL):
            value = numpy_helper.to_array(attrs[0].t)
            key = (attrs[0].t.data_type, tuple(attrs[0].t.dims),
                   hashlib.sha256(value.tobytes()).hexdigest())
            if key in first:
                rename[node.output[0]] = first[key]
                saved += value.nbytes
                continue
            first[key] = node.output[0]
        keep.append(node)
    if not rename:
        return 0
    del graph.node[:]
    graph.node.extend(keep)
    _rewire(graph, rename)
    onnx.save_model(model, str(path))
    return saved


def store_exact_fp16(path: Path, min_elements: int = 1024) -> int:
    """Store each float32 initializer (of at least `min_elements`) whose every value is exactly
    a float16 as float16, read through a `Cast` to float32: the graph computes the same numbers
    from half the bytes (a checkpoint saved in float16, like finers-tiny's, converts whole;
    others keep the tensors that are not exact). Runtimes fold the casts when they load the graph.
    Graphs with external data are left as they are. Returns the bytes saved."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(uses_external_data(t) for t in graph.initializer):
        return 0
    taken = {t.name for t in graph.initializer} | {n for node in graph.node for n in node.output}
    overridable = {v.name for v in graph.input}  # an initializer that is also an input stays
    kept, casts, saved = [], [], 0
    for tensor in graph.initializer:
        if (tensor.data_type == onnx.TensorProto.FLOAT and math.prod(tensor.dims) >= min_elements
                and tensor.name not in overridable):
            value = numpy_helper.to_array(tensor)
            half = value.astype(np.float16)
            if np.array_equal(half.astype(np.float32), value, equal_nan=True):
                name = tensor.name + "__fp16"
                while name in taken:
                    name += "_"
                taken.add(name)
                kept.append(numpy_helper.from_array(half, name))
                casts.append(onnx.helper.make_node("Cast", [name], [tensor.name], to=onnx.TensorProto.FLOAT,
                                                   name=name + "_to_float"))
                saved += value.nbytes - half.nbytes
                continue
        kept.append(tensor)
    if not casts:
        return 0
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save_model(model, str(path))
    return saved


def _rewire(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rewire(sub, rename)


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                  for d in ttype.shape.dim)
    return TensorSpec(name=value.name, dtype=_ONNX_DTYPES[ttype.elem_type], shape=shape)


def graph_spec(path: Path) -> GraphSpec:
    """The interface (names, dtypes, int/dim-name shapes) and sha256 of the graph file `path`."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}
    inputs = tuple(_tensor_spec(v) for v in model.graph.input if v.name not in init_names)
    outputs = tuple(_tensor_spec(v) for v in model.graph.output)
    return GraphSpec(file=path.name, inputs=inputs, outputs=outputs, sha256=graph_sha256(path))
