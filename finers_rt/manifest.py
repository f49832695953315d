"""Manifests: the contract between the exporter and the runtime (see docs/bundle-format.md).

Every manifest is a frozen dataclass tree with `from_dict` / `to_dict` and `load(folder)` /
`save(folder)`. Loading validates types and unknown keys (with a "did you mean" suggestion) and
raises `ManifestError`; the runtime then checks each graph spec against its session with
`check_session_matches`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from finers_rt.errors import EngineProfileError, ManifestError, suggest

FORMAT_VERSION = 1
VLM_FORMAT = "finers-rt.vlm-stage"
SAM_FORMAT = "finers-rt.sam"
BUNDLE_FORMAT = "finers-rt.bundle"
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

Dim = typing.Union[int, str]


def _sha256_of(paths, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of the files' bytes, one after the other, read in chunks (works for
    multi-GB weight files)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file."""
    return _sha256_of([path])


def graph_sha256(path: str | os.PathLike) -> str:
    """sha256 of an ONNX graph together with its weights: the `.onnx` file, then its
    `.onnx.data` sidecar when there is one. A graph over 2 GB keeps only structure and tensor
    references in the `.onnx`, so re-exporting new weights of the same architecture leaves
    that file byte-identical; the sidecar is what changes. Without a sidecar this equals
    `file_sha256(path)`."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".data")
    return _sha256_of([path, sidecar] if sidecar.is_file() else [path])


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON artifact file; ManifestError naming the file when it is unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable or not JSON ({exc})") from None


# ---- generic (de)serialisation of the dataclass tree -----------------------------------------


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Convert a JSON value to the annotated type `hint`, raising ManifestError on mismatch."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ManifestError(f"{where}: expected an object, got {type(value).__name__}")
        return _from_mapping(hint, value, where)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ManifestError as exc:
                errors.append(str(exc))
        raise ManifestError(errors[0] if errors else f"{where}: unexpected null")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ManifestError(f"{where}: expected an object, got {type(value).__name__}")
        item = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ManifestError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def _from_mapping(cls: Any, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ManifestError(f"{where}: unknown key '{key}'{suggest(key, names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(f"{where}: missing required key '{f.name}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: {exc}") from None


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


class _Serialisable:
    """Mixin: from_dict / to_dict / load / save for a manifest dataclass."""

    FORMAT: typing.ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest"):
        if cls.FORMAT:
            fmt = data.get("format") if isinstance(data, Mapping) else None
            if fmt != cls.FORMAT:
                raise ManifestError(f"{where}: format is {fmt!r}, expected {cls.FORMAT!r} "
                                    "(is this the right kind of folder?)")
            version = data.get("format_version")
            if version != FORMAT_VERSION:
                raise ManifestError(f"{where}: format_version {version!r} is not supported "
                                    f"(this finers-rt reads {FORMAT_VERSION}); re-export the bundle")
        return _from_mapping(cls, data, where)

    def to_dict(self) -> dict:
        return _to_jsonable(self)

    @classmethod
    def load(cls, folder: str | os.PathLike):
        path = Path(folder) / MANIFEST_NAME
        if not Path(folder).is_dir():
            raise ManifestError(f"{folder}: not a folder (expected a folder with {MANIFEST_NAME})")
        if not path.is_file():
            raise ManifestError(f"{path}: missing; {folder} is not an exported finers-rt folder")
        return cls.from_dict(read_json(path), where=str(path))

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


# ---- specs shared by every manifest -----------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, dtype name (numpy spelling) and shape (int or dim name)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor '{self.name}': unknown dtype '{self.dtype}'"
                             f"{suggest(self.dtype, DTYPES)}")


@dataclass(frozen=True)
class GraphSpec:
    """An ONNX graph file of a stage with its interface and content hash."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str = ""

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, f"graph {self.file} input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, f"graph {self.file} output")


def _find(specs: tuple[TensorSpec, ...], name: str, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    names = [s.name for s in specs]
    raise ManifestError(f"{what} '{name}' not in manifest{suggest(name, names)}")


@dataclass(frozen=True)
class ArraySpec:
    file: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str = ""


@dataclass(frozen=True)
class FileSpec:
    file: str
    sha256: str = ""


# ---- VLM stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VlmImageSpec:
    stage_size_wh: tuple[int, int]
    resized_hw: tuple[int, int]
    grid_thw: tuple[int, int, int]
    num_patches: int
    num_image_tokens: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1.0 / 255.0
    resample: str = "bicubic"

    def __post_init__(self):
        t, h, w = self.grid_thw
        if t * h * w != self.num_patches:
            raise ValueError(f"grid_thw {self.grid_thw} has {t * h * w} patches, "
                             f"num_patches says {self.num_patches}")
        if self.num_patches != self.num_image_tokens * self.merge_size ** 2:
            raise ValueError(f"num_image_tokens {self.num_image_tokens} != num_patches "
                             f"{self.num_patches} / merge_size^2")
        rh, rw = self.resized_hw
        if (rh, rw) != (h * self.patch_size, w * self.patch_size):
            raise ValueError(f"resized_hw {self.resized_hw} does not match grid {self.grid_thw} "
                             f"x patch {self.patch_size}")


@dataclass(frozen=True)
class VlmTextSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    mrope_section: tuple[int, ...]

    def __post_init__(self):
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = "
                             f"{self.head_dim // 2}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


@dataclass(frozen=True)
class SpecialTokens:
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: typing.Optional[int] = None


@dataclass(frozen=True)
class ChatSpec:
    """The chat template rendered for one user turn (image, then text), cut around the image."""

    before_image: str
    image_token: str
    after_image: str
    after_text: str

    def render(self, num_image_tokens: int, text: str) -> str:
        return (self.before_image + self.image_token * num_image_tokens + self.after_image
                + text + self.after_text)


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


VLM_GRAPHS = ("vision", "decoder")
KV_CACHES = ("concat", "shared")


@dataclass(frozen=True)
class VlmStageManifest(_Serialisable):
    FORMAT: typing.ClassVar[str] = VLM_FORMAT

    format: str
    format_version: int
    finers_rt_version: str
    role: str
    precision: str
    image: VlmImageSpec
    text: VlmTextSpec
    special_tokens: SpecialTokens
    chat: ChatSpec
    generation: GenerationSpec
    graphs: dict[str, GraphSpec]
    embeddings: ArraySpec
    tokenizer: FileSpec
    source: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    # decoder K/V contract (docs/bundle-format.md): "concat" = sequence-major past in, new K/V out
    # (bundles written before this field existed); "shared" = head-major buffer read and written in
    # place by GroupQueryAttention, bound by pointer (ONNX Runtime only)
    kv_cache: str = "concat"

    def __post_init__(self):
        if self.role not in ("gse", "lpr", "generic"):
            raise ValueError(f"role '{self.role}' is not gse|lpr|generic")
        _check_precision(self.precision)
        _check_graphs(self.graphs, VLM_GRAPHS)
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache '{self.kv_cache}' is not one of {list(KV_CACHES)}"
                             + suggest(self.kv_cache, KV_CACHES))


# ---- SAM --------------------------------------------------------------------------------------

SAM_GRAPHS = ("image_encoder", "mask_decoder")


@dataclass(frozen=True)
class SamManifest(_Serialisable):
    FORMAT: typing.ClassVar[str] = SAM_FORMAT

    format: str
    format_version: int
    finers_rt_version: str
    model_type: str
    config: dict[str, Any]
    image_size: int
    embedding_hw: tuple[int, int]
    embedding_dim: int
    mask_input_hw: tuple[int, int]
    num_multimask_outputs: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    graphs: dict[str, GraphSpec]
    resample: str = "bilinear"
    mask_threshold: float = 0.0
    precision: str = "fp32"
    source: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check_precision(self.precision)
        _check_graphs(self.graphs, SAM_GRAPHS)


# ---- bundle -----------------------------------------------------------------------------------

BUNDLE_STAGES = ("gse", "lpr", "sam")


@dataclass(frozen=True)
class BundleManifest(_Serialisable):
    """Top-level manifest: which sub-folder holds each stage + the pipeline settings.

    `pipeline` is a `finers_rt.config.PipelineConfig` as a dict (validated by that class).
    """

    FORMAT: typing.ClassVar[str] = BUNDLE_FORMAT

    format: str
    format_version: int
    finers_rt_version: str
    name: str
    stages: dict[str, str]
    pipeline: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for key in self.stages:
            if key not in BUNDLE_STAGES:
                raise ValueError(f"unknown stage '{key}'{suggest(key, BUNDLE_STAGES)}")
        missing = [s for s in BUNDLE_STAGES if s not in self.stages]
        if missing:
            raise ValueError(f"bundle is missing stage(s) {missing}")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {PRECISIONS}"
                         f"{suggest(precision, PRECISIONS)}")


def _check_graphs(graphs: Mapping[str, GraphSpec], required: tuple[str, ...]) -> None:
    for name in graphs:
        if name not in required:
            raise ValueError(f"unknown graph '{name}'{suggest(name, required)}")
    missing = [g for g in required if g not in graphs]
    if missing:
        raise ValueError(f"missing graph(s) {missing}")


# ---- checks against files and sessions ---------------------------------------------------------


def verify_files(folder: str | os.PathLike, specs: Mapping[str, Any], check_hash: bool = False) -> None:
    """Check that each spec's file exists in `folder` (and its sha256 if `check_hash`)."""
    for what, spec in specs.items():
        path = Path(folder) / spec.file
        if not path.is_file():
            raise ManifestError(f"{folder}: {what} file '{spec.file}' is missing")
        if check_hash and spec.sha256 and file_sha256(path) != spec.sha256:
            raise ManifestError(f"{path}: sha256 differs from the manifest; the file was "
                                "modified or replaced after export")


def _shape_matches(expected: tuple[Dim, ...], actual: tuple[Any, ...]) -> bool:
    if len(expected) != len(actual):
        return False
    for want, got in zip(expected, actual):
        if isinstance(want, int) and isinstance(got, int) and want != got:
            return False
    return True


def check_session_matches(graph: GraphSpec, backend: Any, where: str = "") -> None:
    """Raise EngineProfileError unless the backend's inputs/outputs match the graph spec.

    `backend` has `.input_specs` / `.output_specs` (lists of TensorSpec). Fixed dims must be
    equal; symbolic dims (strings / None) match anything.
    """
    label = where or graph.file
    for kind, want_list, got_list in (("input", graph.inputs, backend.input_specs),
                                      ("output", graph.outputs, backend.output_specs)):
        got = {s.name: s for s in got_list}
        for want in want_list:
            if want.name not in got:
                raise EngineProfileError(f"{label}: {kind} '{want.name}' promised by the manifest "
                                         f"is not in the graph{suggest(want.name, got)}")
            have = got[want.name]
            if have.dtype != want.dtype or not _shape_matches(want.shape, have.shape):
                raise EngineProfileError(
                    f"{label}: {kind} '{want.name}' is {have.dtype}{list(have.shape)} in the graph, "
                    f"manifest says {want.dtype}{list(want.shape)}")
        extra = set(got) - {w.name for w in want_list}
        if kind == "input" and extra:
            raise EngineProfileError(f"{label}: graph has inputs the manifest does not describe: "
                                     f"{sorted(extra)}")
