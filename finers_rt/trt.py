"""TensorRT engines for a bundle: each ONNX graph -> `<graph>.engine` + `<graph>.engine.json`,
built ON the GPU that will run them, through the TensorRT Python API (no `trtexec`).

Pure parts (numpy-free, no tensorrt; unit-tested on CPU):
- `profiles_from_manifest`: optimisation profiles derived from a stage manifest's shapes;
- `select_profile`: which profile of an engine holds a set of input shapes (typed error if none);
- `EngineMetadata` / `check_engine_metadata`: the JSON sidecar and the load-time refusal of an
  engine built for another graph, TensorRT version or GPU;
- `plan_engine_builds`: which engines a bundle (or one stage folder) needs; refuses to overwrite.
`build_engines` / `build_one` need tensorrt and a GPU, found through
`finers_rt.backends.trt.require_trt_stack` (lazy imports: importing this module is free).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from finers_rt import __version__
from finers_rt.config import PipelineConfig
from finers_rt.errors import ArtifactError, EngineProfileError, InputError, ManifestError, suggest
from finers_rt.manifest import (BUNDLE_FORMAT, MANIFEST_NAME, SAM_FORMAT, VLM_FORMAT, BundleManifest, GraphSpec,
                                SamManifest, VlmStageManifest, _Serialisable, graph_sha256, read_json)

ENGINE_FORMAT = "finers-rt.trt-engine"
ENGINE_SUFFIX = ".engine"
REBUILD_HINT = "rebuild it on this machine with `finers-rt build-engines BUNDLE --force`"
SAM_DECODER_POINTS_OPT = 4  # the runtime sends 2 points + 2 box corners


# ---- profiles (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shape of one input in one optimisation profile.

    `values` = (min, opt, max) VALUES, used only if TensorRT treats the input as a shape tensor
    (its values decide other tensors' shapes, e.g. SAM's `orig_im_size` (h, w))."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    values: Optional[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = None

    def __post_init__(self):
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min/opt/max ranks differ: {self.min} {self.opt} {self.max}")
        for lo, op, hi in zip(self.min, self.opt, self.max):
            if not 0 <= lo <= op <= hi:
                raise ValueError(f"need 0 <= min <= opt <= max, got {self.min} {self.opt} {self.max}")

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    def describe(self) -> str:
        return f"min {list(self.min)} max {list(self.max)}"


@dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimisation profile: a ShapeRange per graph input."""

    name: str
    shapes: dict[str, ShapeRange]


@dataclass(frozen=True)
class ProfileLimits:
    """What the engines must accept. `max_new_tokens=None` takes the manifest's value."""

    max_batch: int = 1
    max_prompt_tokens: int = 256
    max_new_tokens: Optional[int] = None
    max_points: int = 8
    max_image_side: int = 8192

    def __post_init__(self):
        for name in ("max_batch", "max_prompt_tokens", "max_points", "max_image_side"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_points < SAM_DECODER_POINTS_OPT:
            raise InputError(f"max_points must be >= {SAM_DECODER_POINTS_OPT} (2 points + 2 box corners), "
                             f"got {self.max_points}")


DimRanges = Mapping[str, tuple[int, int, int]]


def _decoder_dims(manifest: VlmStageManifest, limits: ProfileLimits) -> list[tuple[str, DimRanges]]:
    """decode (seq = 1, the hot loop) and prefill (chunks of the prompt) profiles. A prefill
    (prefix, then question after the prefix) never holds more than S_max = image tokens + prompt
    budget in total; the longest context is S_max + max_new_tokens, so a decode step sees
    past <= context - 1 cached tokens."""
    s_max = manifest.image.num_image_tokens + limits.max_prompt_tokens
    context = s_max + (limits.max_new_tokens or manifest.generation.max_new_tokens)
    batch = (1, 1, limits.max_batch)
    decode = {"batch": batch, "seq": (1, 1, 1), "past": (0, s_max, context - 1), "total": (1, s_max + 1, context)}
    prefill = {"batch": batch, "seq": (1, s_max, s_max), "past": (0, 0, s_max - 1), "total": (1, s_max, s_max)}
    return [("decode", decode), ("prefill", prefill)]


def _resolve_profile(graph: str, spec: GraphSpec, name: str, dims: DimRanges,
                     values: Mapping[str, tuple] | None = None) -> EngineProfile:
    shapes = {}
    for tensor in spec.inputs:
        ranges = []
        for dim in tensor.shape:
            if isinstance(dim, int):
                ranges.append((dim, dim, dim))
            elif dim in dims:
                ranges.append(dims[dim])
            else:
                raise ManifestError(f"graph '{graph}' input '{tensor.name}' has dim '{dim}' with no known "
                                    f"range (known for this graph: {sorted(dims) or 'none'}){suggest(dim, dims)}")
        lo, op, hi = (tuple(r[i] for r in ranges) for i in range(3))
        shapes[tensor.name] = ShapeRange(lo, op, hi, (values or {}).get(tensor.name))
    return EngineProfile(name, shapes)


def profiles_from_manifest(manifest: VlmStageManifest | SamManifest, max_batch: int = 1,
                           max_prompt_tokens: int = 256, max_new_tokens: int | None = None,
                           max_points: int = 8, max_image_side: int = 8192) -> dict[str, tuple[EngineProfile, ...]]:
    """Optimisation profiles per graph of a stage, every range derived from the manifest.

    VLM: `vision` fixed (the exported grid); `decoder` two profiles over dims batch / seq / past /
    total: "decode" (seq 1; opt past = prefill length) and "prefill" (seq 1..num_image_tokens +
    max_prompt_tokens). SAM: `image_encoder` fixed; `mask_decoder` num_points 1..max_points
    (opt 4) and `orig_im_size` values (h, w) in 1..max_image_side (opt crop side) should
    TensorRT treat it as a shape tensor. Unknown dim names raise ManifestError.
    """
    limits = ProfileLimits(max_batch, max_prompt_tokens, max_new_tokens, max_points, max_image_side)
    if isinstance(manifest, VlmStageManifest):
        decoder = manifest.graphs["decoder"]
        return {"vision": (_resolve_profile("vision", manifest.graphs["vision"], "static", {}),),
                "decoder": tuple(_resolve_profile("decoder", decoder, name, dims)
                                 for name, dims in _decoder_dims(manifest, limits))}
    if isinstance(manifest, SamManifest):
        side = PipelineConfig().crop_min_side
        values = {"orig_im_size": ((1, 1), (side, side), (limits.max_image_side,) * 2)}
        points = {"num_points": (1, SAM_DECODER_POINTS_OPT, limits.max_points)}
        return {"image_encoder": (_resolve_profile("image_encoder", manifest.graphs["image_encoder"], "static", {}),),
                "mask_decoder": (_resolve_profile("mask_decoder", manifest.graphs["mask_decoder"], "prompts",
                                                  points, values),)}
    raise InputError(f"expected a VlmStageManifest or SamManifest, got {type(manifest).__name__}")


def select_profile(profiles: tuple[EngineProfile, ...], shapes: Mapping[str, tuple[int, ...]],
                   where: str = "engine") -> int:
    """Index of the first profile whose ranges hold every input shape; EngineProfileError naming
    the tensor, its shape and each profile's range otherwise."""
    misses = []
    for index, profile in enumerate(profiles):
        bad = next((n for n, s in shapes.items() if n in profile.shapes and not profile.shapes[n].contains(tuple(s))),
                   None)
        if bad is None:
            return index
        misses.append((bad, profile))
    if not misses:
        raise EngineProfileError(f"{where}: the engine metadata lists no optimisation profile; {REBUILD_HINT}")
    name = misses[0][0]
    ranges = "; ".join(f"profile '{p.name}': {n} {p.shapes[n].describe()}" for n, p in misses)
    raise EngineProfileError(f"{where}: input '{name}' shape {list(shapes[name])} is outside every optimisation "
                             f"profile ({ranges}); rebuild with larger --max-batch / --max-prompt-tokens / "
                             "--max-new-tokens")



def merge_profiles(profiles: tuple[EngineProfile, ...]) -> EngineProfile:
    """One profile spanning several (elementwise min of mins, max of maxes; opt of the first),
    for consumers that take a single profile, e.g. ONNX Runtime's TensorRT execution provider."""
    shapes = {}
    for name, first in profiles[0].shapes.items():
        ranges = [p.shapes[name] for p in profiles]
        lo = tuple(min(dims) for dims in zip(*(r.min for r in ranges)))
        hi = tuple(max(dims) for dims in zip(*(r.max for r in ranges)))
        shapes[name] = ShapeRange(lo, first.opt, hi, first.values)
    return EngineProfile("+".join(p.name for p in profiles), shapes)


def ort_trt_profile_options(graph_path: str | os.PathLike) -> dict[str, str]:
    """`trt_profile_{min,opt,max}_shapes` for ONNX Runtime's TensorRT EP, from the manifest beside
    `graph_path` (default ProfileLimits), so the EP builds one engine for every shape the runtime
    sends instead of rebuilding as the KV cache grows. {} for a graph without a stage manifest or
    without dynamic inputs."""
    path = Path(graph_path)
    try:
        manifest = _load_stage(path.parent)
    except ManifestError:
        return {}
    graph = next((g for g, spec in manifest.graphs.items() if spec.file == path.name), None)
    if graph is None:
        return {}
    limits = ProfileLimits()
    profile = merge_profiles(profiles_from_manifest(manifest, limits.max_batch, limits.max_prompt_tokens)[graph])
    if all(r.min == r.max for r in profile.shapes.values()):
        return {}
    return {f"trt_profile_{which}_shapes": ",".join(f"{name}:{'x'.join(map(str, getattr(r, which)))}"
                                                    for name, r in profile.shapes.items())
            for which in ("min", "opt", "max")}

# ---- metadata sidecar (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int = 0


@dataclass(frozen=True)
class EngineMetadata(_Serialisable):
    """`<graph>.engine.json`: what an engine was built from, with what and for which GPU."""

    FORMAT = ENGINE_FORMAT

    format: str
    format_version: int
    finers_rt_version: str
    graph: str
    engine_file: str
    engine_bytes: int
    source_file: str
    source_sha256: str
    tensorrt_version: str
    device: DeviceInfo
    precision: dict[str, bool]
    workspace_bytes: int
    profiles: tuple[EngineProfile, ...]
    limits: dict[str, Any] = field(default_factory=dict)
    built_at: str = ""


def metadata_path(engine_path: str | os.PathLike) -> Path:
    """`<graph>.engine` -> `<graph>.engine.json`."""
    return Path(f"{engine_path}.json")


def load_engine_metadata(engine_path: str | os.PathLike) -> EngineMetadata:
    path = metadata_path(engine_path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; an engine without its metadata cannot be checked, {REBUILD_HINT}")
    return EngineMetadata.from_dict(read_json(path), where=str(path))


def check_engine_metadata(meta: EngineMetadata, *, source_sha256: str, tensorrt_version: str,
                          device: DeviceInfo, engine_bytes: int | None = None, where: str = "engine") -> None:
    """Refuse (EngineProfileError) an engine built from another graph, by another TensorRT or for
    another GPU / compute capability, or whose file size differs from the one recorded."""
    problems = []
    if source_sha256 and meta.source_sha256 != source_sha256:
        problems.append(f"it was built from graph sha256 {meta.source_sha256[:12]}, the manifest's "
                        f"'{meta.graph}' graph is {source_sha256[:12]}")
    if meta.tensorrt_version != tensorrt_version:
        problems.append(f"it was built with TensorRT {meta.tensorrt_version}, this is TensorRT {tensorrt_version}")
    if meta.device.name != device.name:
        problems.append(f"it was built on GPU '{meta.device.name}', this GPU is '{device.name}'")
    if tuple(meta.device.compute_capability) != tuple(device.compute_capability):
        cc = ".".join(map(str, meta.device.compute_capability))
        problems.append(f"it was built for compute capability {cc}, this GPU has "
                        f"{'.'.join(map(str, device.compute_capability))}")
    if engine_bytes is not None and engine_bytes != meta.engine_bytes:
        problems.append(f"the engine file has {engine_bytes} bytes, its metadata says {meta.engine_bytes}")
    if problems:
        raise EngineProfileError(f"{where}: refusing this engine: {'; '.join(problems)}; {REBUILD_HINT}")


# ---- planning (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class EnginePlan:
    stage: str
    graph: str
    onnx_path: Path
    engine_path: Path
    source_sha256: str
    profiles: tuple[EngineProfile, ...]
    limits: ProfileLimits


def read_manifest_format(folder: Path) -> str:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST_NAME}; expected a finers-rt bundle or stage folder")
    data = read_json(path)
    return data.get("format", "") if isinstance(data, dict) else ""


def _load_stage(folder: Path) -> VlmStageManifest | SamManifest:
    fmt = read_manifest_format(folder)
    if fmt == VLM_FORMAT:
        return VlmStageManifest.load(folder)
    if fmt == SAM_FORMAT:
        return SamManifest.load(folder)
    raise ManifestError(f"{folder}/{MANIFEST_NAME}: format {fmt!r} is not a stage "
                        f"({VLM_FORMAT!r} or {SAM_FORMAT!r})")


def _stage_folders(path: Path) -> list[tuple[str, Path, Any, int]]:
    """(label, folder, stage manifest, pipeline max_new_tokens or 0) for a bundle or one stage."""
    if not path.is_dir():
        raise ManifestError(f"{path}: not a folder (expected a finers-rt bundle or stage folder)")
    if read_manifest_format(path) != BUNDLE_FORMAT:
        return [(path.name, path, _load_stage(path), 0)]
    bundle = BundleManifest.load(path)
    new_tokens = int(bundle.pipeline.get("max_new_tokens", 0) or 0)
    return [(stage, path / sub, _load_stage(path / sub), new_tokens) for stage, sub in bundle.stages.items()]


def plan_engine_builds(path: str | os.PathLike, limits: ProfileLimits | None = None,
                       force: bool = False) -> list[EnginePlan]:
    """The engines a bundle (or a single stage folder) needs, with their profiles. Raises
    ArtifactError if a graph file is missing or an engine exists and `force` is False."""
    limits = limits or ProfileLimits()
    plans, existing = [], []
    for label, folder, manifest, pipeline_new in _stage_folders(Path(path)):
        if isinstance(manifest, VlmStageManifest) and manifest.kv_cache != "concat":
            raise ManifestError(
                f"{folder}: stage '{label}' was exported with kv_cache '{manifest.kv_cache}' (ONNX Runtime "
                "contrib ops: GroupQueryAttention, MultiHeadAttention), which TensorRT cannot build; "
                "re-export the bundle for TensorRT with `finers-rt export bundle ... --kv-cache concat` "
                "(plain ONNX ops)")
        stage_limits = limits
        if limits.max_new_tokens is None and isinstance(manifest, VlmStageManifest):
            stage_limits = replace(limits, max_new_tokens=max(manifest.generation.max_new_tokens, pipeline_new))
        profiles = profiles_from_manifest(manifest, **{k: getattr(stage_limits, k) for k in (
            "max_batch", "max_prompt_tokens", "max_new_tokens", "max_points", "max_image_side")})
        for graph, spec in manifest.graphs.items():
            onnx_path = folder / spec.file
            if not onnx_path.is_file():
                raise ArtifactError(f"{folder}: graph file '{spec.file}' ({graph}) is missing")
            engine_path = folder / f"{graph}{ENGINE_SUFFIX}"
            if engine_path.exists() and not force:
                existing.append(str(engine_path))
            plans.append(EnginePlan(label, graph, onnx_path, engine_path, spec.sha256, profiles[graph], stage_limits))
    if existing:
        raise ArtifactError(f"engine(s) already exist: {', '.join(existing)}; pass --force to rebuild them")
    return plans


# ---- building (needs tensorrt + a GPU) ----------------------------------------------------------


def build_engines(path: str | os.PathLike, *, fp16: bool = False, int8: bool = False, workspace_gb: float = 4.0,
                  force: bool = False, limits: ProfileLimits | None = None,
                  log: Callable[[str], None] = print) -> list[EngineMetadata]:
    """Build every engine of a bundle / stage folder on this GPU; returns their metadata.

    The plan (manifests, profiles, overwrite check) is made before TensorRT is touched, so a bad
    bundle is reported the same way on any machine."""
    if workspace_gb <= 0:
        raise InputError(f"workspace must be > 0 GB, got {workspace_gb}")
    plans = plan_engine_builds(path, limits, force)
    from finers_rt.backends.trt import require_trt_stack

    stack = require_trt_stack("finers-rt build-engines")
    results = []
    for plan in plans:
        log(f"[{plan.stage}/{plan.graph}] building {plan.engine_path.name} on {stack.device.name} "
            f"({', '.join(p.name for p in plan.profiles)} profile(s))")
        meta = build_one(stack, plan, fp16=fp16, int8=int8, workspace_bytes=int(workspace_gb * 2**30))
        log(f"[{plan.stage}/{plan.graph}] wrote {plan.engine_path} ({meta.engine_bytes / 2**20:.1f} MiB)")
        results.append(meta)
    return results


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def verify_source(plan: EnginePlan) -> str:
    """sha256 of the ONNX graph about to be built, checked against the manifest's."""
    digest = graph_sha256(plan.onnx_path)
    if plan.source_sha256 and digest != plan.source_sha256:
        raise ManifestError(f"{plan.onnx_path}: sha256 differs from the manifest; the graph was modified "
                            "or replaced after export")
    return digest



def _make_logger(trt: Any) -> Any:
    class _Logger(trt.ILogger):
        """Keeps TensorRT's errors so a failed parse/build can say why in one line."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg).strip())

    return _Logger()


def _add_profiles(trt: Any, builder: Any, network: Any, config: Any, plan: EnginePlan) -> None:
    """One TensorRT optimisation profile per EngineProfile; shape tensors get value ranges."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names, expected = sorted(t.name for t in inputs), sorted(plan.profiles[0].shapes)
    if names != expected:
        raise EngineProfileError(f"{plan.onnx_path}: TensorRT sees inputs {names}, the manifest promises {expected}")
    for profile in plan.profiles:
        trt_profile = builder.create_optimization_profile()
        for tensor in inputs:
            shape_range = profile.shapes[tensor.name]
            if getattr(tensor, "is_shape_tensor", False):
                if shape_range.values is None:
                    raise EngineProfileError(f"{plan.onnx_path}: TensorRT treats input '{tensor.name}' as a shape "
                                             "tensor, and finers-rt knows no value range for it")
                trt_profile.set_shape_input(tensor.name, *shape_range.values)
            else:
                trt_profile.set_shape(tensor.name, shape_range.min, shape_range.opt, shape_range.max)
        if config.add_optimization_profile(trt_profile) < 0:
            raise EngineProfileError(f"{plan.onnx_path}: TensorRT rejected optimisation profile '{profile.name}'")


def build_one(stack: Any, plan: EnginePlan, *, fp16: bool, int8: bool, workspace_bytes: int) -> EngineMetadata:
    """Parse `plan.onnx_path`, build with the plan's profiles, write engine + sidecar atomically.

    int8 without Q/DQ nodes in the graph gets no calibration: TensorRT then keeps those layers in
    fp16/fp32 (explicit quantization is the supported int8 path in TensorRT 10)."""
    trt = stack.trt
    digest = verify_source(plan)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise ArtifactError(f"{plan.onnx_path}: TensorRT's ONNX parser rejected the graph: "
                            f"{'; '.join(errors) or 'no error reported'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    _add_profiles(trt, builder, network, config, plan)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"{plan.onnx_path}: TensorRT could not build an engine: "
                            f"{'; '.join(logger.errors[-3:]) or 'no error reported'}")
    return _write_engine(stack, plan, serialized, digest, {"fp16": fp16, "int8": int8}, workspace_bytes)


def _write_engine(stack: Any, plan: EnginePlan, serialized: Any, digest: str, precision: dict[str, bool],
                  workspace_bytes: int) -> EngineMetadata:
    """Engine and sidecar go to temporary names first, then are renamed (engine, then sidecar)."""
    engine_tmp = plan.engine_path.with_name(f"{plan.engine_path.name}.tmp-{os.getpid()}")
    meta_final = metadata_path(plan.engine_path)
    meta_tmp = meta_final.with_name(f"{meta_final.name}.tmp-{os.getpid()}")
    try:
        with open(engine_tmp, "wb") as handle:
            handle.write(serialized)
        meta = EngineMetadata(
            ENGINE_FORMAT, 1, __version__, plan.graph, plan.engine_path.name, engine_tmp.stat().st_size,
            plan.onnx_path.name, digest, str(stack.trt.__version__), stack.device, precision, workspace_bytes,
            plan.profiles, {k: getattr(plan.limits, k) for k in ProfileLimits.__dataclass_fields__}, now_iso())
        meta_tmp.write_text(json.dumps(meta.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(engine_tmp, plan.engine_path)
        os.replace(meta_tmp, meta_final)
    finally:
        for tmp in (engine_tmp, meta_tmp):
            if tmp.exists():
                tmp.unlink()
    return meta

__all__ = ["ShapeRange", "EngineProfile", "ProfileLimits", "profiles_from_manifest", "select_profile",
           "DeviceInfo", "EngineMetadata", "load_engine_metadata", "check_engine_metadata", "EnginePlan",
           "plan_engine_builds", "build_engines", "build_one", "merge_profiles", "ort_trt_profile_options"]
