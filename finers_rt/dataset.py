"""FineRS-4k style annotation files: load, validate, write, and rasterise ground truth.

File format (one JSON object)::

    {"annotations": [{"image_path": str, "Q-type": "referring"|"reasoning"|"option",
                      "Q": str, "A": str, "options": str (option only),
                      "points": [[x, y], ...], "attribute": "colors"|"shape"|"position"|"others",
                      "area_percent": float}, ...]}

`points` is the target polygon in ORIGINAL image pixels (x right, y down). The ground-truth
mask is that polygon rasterised exactly like the official FineRS evaluation
(`polygon_to_mask`). Only numpy, opencv and pillow are used here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from finers_rt.errors import InputError, suggest

Q_TYPES = ("referring", "reasoning", "option")
ATTRIBUTES = ("colors", "shape", "position", "others")
SIZE_BUCKETS = ("S", "XS", "XXS")
S_MIN_AREA_PERCENT = 0.055    # S if area_percent > this
XXS_MAX_AREA_PERCENT = 0.017  # XXS if area_percent < this, XS in between (both ends inclusive)

_KNOWN_KEYS = ("image_path", "Q-type", "Q", "A", "options", "points", "attribute", "area_percent")
_REQUIRED_KEYS = ("image_path", "Q-type", "Q", "A", "points", "attribute", "area_percent")


@dataclass(frozen=True)
class Annotation:
    """One FineRS question about one image.

    `points_xy` is the target polygon, a tuple of (x, y) floats in original image pixels.
    `index` is the position in the annotation file (predictions refer to it). `extra` keeps
    unknown keys of the source record so that `write_annotations` round-trips them.
    """

    image_path: str
    q_type: str
    question: str
    answer: str
    points_xy: tuple[tuple[float, float], ...]
    attribute: str
    area_percent: float
    options: str | None = None
    index: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        where = f"annotation {self.index}"
        if self.q_type not in Q_TYPES:
            raise InputError(f"{where}: unknown Q-type '{self.q_type}', expected one of "
                             f"{list(Q_TYPES)}{suggest(self.q_type, Q_TYPES)}")
        if self.attribute not in ATTRIBUTES:
            raise InputError(f"{where}: unknown attribute '{self.attribute}', expected one of "
                             f"{list(ATTRIBUTES)}{suggest(self.attribute, ATTRIBUTES)}")
        if self.q_type == "option" and not self.options:
            raise InputError(f"{where}: Q-type 'option' needs a non-empty 'options' string, "
                             f"got {self.options!r}")
        object.__setattr__(self, "points_xy", _check_polygon(self.points_xy, where))
        if (isinstance(self.area_percent, bool) or not isinstance(self.area_percent, (int, float))
                or not math.isfinite(self.area_percent) or self.area_percent < 0):
            raise InputError(f"{where}: 'area_percent' must be a finite number >= 0, "
                             f"got {self.area_percent!r}")

    @property
    def size_bucket(self) -> str:
        """"S" | "XS" | "XXS" from the stored `area_percent` (see `size_bucket`)."""
        return size_bucket(self.area_percent)


def _check_polygon(points: Any, where: str) -> tuple[tuple[float, float], ...]:
    """Validate a polygon [[x, y], ...] (>= 3 finite numeric points) and return it as tuples."""
    if not isinstance(points, (list, tuple)):
        raise InputError(f"{where}: 'points' must be a list of [x, y] pairs, "
                         f"got {type(points).__name__}")
    out = []
    for i, p in enumerate(points):
        ok = (isinstance(p, (list, tuple)) and len(p) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) for v in p))
        if not ok:
            raise InputError(f"{where}: polygon point {i} must be [x, y] with two finite "
                             f"numbers, got {p!r}")
        out.append((float(p[0]), float(p[1])))
    if len(out) < 3:
        raise InputError(f"{where}: polygon needs at least 3 points, got {len(out)}")
    return tuple(out)


def size_bucket(area_percent: float) -> str:
    """Size bucket of a target from its stored area_percent.

    "S" if area_percent > 0.055, "XXS" if area_percent < 0.017, else "XS" (0.017 and 0.055
    themselves are XS), as the official FineRS evaluation buckets.
    """
    if area_percent > S_MIN_AREA_PERCENT:
        return "S"
    if area_percent < XXS_MAX_AREA_PERCENT:
        return "XXS"
    return "XS"


def polygon_to_mask(points_xy: Sequence[Sequence[float]] | np.ndarray, height: int,
                    width: int) -> np.ndarray:
    """Rasterise a polygon exactly like the official FineRS evaluation.

    points_xy: [N, 2] (x, y) in pixels; floats truncate toward zero (int32 cast).
    Returns a bool mask [height, width]: the closed outline (thickness 1) plus the fill.
    """
    if int(height) <= 0 or int(width) <= 0:
        raise InputError(f"mask size must be positive, got height={height}, width={width}")
    pts_f = np.asarray(points_xy, dtype=np.float64)
    if pts_f.ndim != 2 or pts_f.shape[1] != 2 or pts_f.shape[0] < 1:
        raise InputError(f"points_xy must be [N, 2] (x, y), got shape {pts_f.shape}")
    mask = np.zeros((int(height), int(width)), np.uint8)
    pts = np.array([pts_f], dtype=np.int32)  # [1, N, 2]; truncates toward zero
    cv2.polylines(mask, pts, True, 1, 1)
    cv2.fillPoly(mask, pts, 1)
    return mask.astype(bool)


def mask_bbox_xyxy(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive pixel box (x1, y1, x2, y2) of the nonzero pixels of a [H, W] mask.

    Like the official `get_bbox_from_mask` (min/max of np.nonzero); None for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _parse_record(record: Any, index: int) -> Annotation:
    where = f"annotation {index}"
    if not isinstance(record, dict):
        raise InputError(f"{where}: must be a JSON object, got {type(record).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in record]
    if missing:
        raise InputError(f"{where}: missing field(s) {missing}; present: {sorted(record)}")
    for key in ("image_path", "Q-type", "Q", "A", "attribute"):
        if not isinstance(record[key], str):
            raise InputError(f"{where}: '{key}' must be a string, got "
                             f"{type(record[key]).__name__}")
    options = record.get("options")
    if options is not None and not isinstance(options, str):
        raise InputError(f"{where}: 'options' must be a string, got {type(options).__name__}")
    return Annotation(
        image_path=record["image_path"], q_type=record["Q-type"], question=record["Q"],
        answer=record["A"], points_xy=record["points"], attribute=record["attribute"],
        area_percent=record["area_percent"], options=options, index=index,
        extra={k: v for k, v in record.items() if k not in _KNOWN_KEYS})


def read_json_list(path: str | Path, key: str, what: str) -> list[Any]:
    """The list under `key` of the JSON object in `path` (`{"annotations": [...]}`-style files).

    Raises InputError naming `what` and the file when it is missing, not JSON, or not an object
    with a `key` list.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        got = type(data).__name__ if not isinstance(data, dict) else f"keys {sorted(data)}"
        article = "an" if key[:1] in "aeiou" else "a"
        raise InputError(f"{what} {path} must be an object with {article} '{key}' list, got {got}")
    return data[key]


def load_annotations(path: str | Path, images_dir: str | Path | None = None) -> list[Annotation]:
    """Load and validate a FineRS annotation file.

    With `images_dir`, also read each image's size (header only) and check that every polygon
    lies inside its image. Raises InputError naming the annotation index and the problem.
    """
    records = read_json_list(path, "annotations", "annotation file")
    annotations = [_parse_record(r, i) for i, r in enumerate(records)]
    if images_dir is not None:
        check_polygons_in_images(annotations, images_dir)
    return annotations


def annotation_to_record(ann: Annotation) -> dict[str, Any]:
    """The JSON record of an annotation (official key names, extra keys kept)."""
    record: dict[str, Any] = {"image_path": ann.image_path, "Q-type": ann.q_type,
                              "Q": ann.question, "A": ann.answer}
    if ann.options is not None:
        record["options"] = ann.options
    record["points"] = [[_plain_number(x), _plain_number(y)] for x, y in ann.points_xy]
    record["attribute"] = ann.attribute
    record["area_percent"] = ann.area_percent
    record.update(ann.extra)
    return record


def _plain_number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def write_annotations(path: str | Path, annotations: Sequence[Annotation]) -> None:
    """Write annotations as a FineRS annotation file (in the given order)."""
    records = [annotation_to_record(a) for a in annotations]
    Path(path).write_text(json.dumps({"annotations": records}, indent=1), encoding="utf-8")


def resolve_image_path(images_dir: str | Path, image_path: str) -> Path:
    """Path of an annotation's image: `image_path` itself if absolute, else under images_dir."""
    p = Path(image_path)
    return p if p.is_absolute() else Path(images_dir) / p


def image_size_wh(path: str | Path, where: str = "") -> tuple[int, int]:
    """(width, height) of an image, reading only its header with PIL.

    A file truncated inside its header is an error; one truncated later in the pixel data is
    only found when decoded. `where` (e.g. "annotation 3") prefixes error messages.
    """
    prefix = f"{where}: " if where else ""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{prefix}image not found: {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{prefix}cannot read image {path} (unreadable or truncated): "
                         f"{type(exc).__name__}: {exc}") from None
    if width <= 0 or height <= 0:
        raise InputError(f"{prefix}image {path} has an empty size {width}x{height}")
    return int(width), int(height)


def check_polygon_in_image(ann: Annotation, size_wh: tuple[int, int]) -> None:
    """Raise InputError if any polygon vertex lies outside [0, W] x [0, H]."""
    width, height = size_wh
    for i, (x, y) in enumerate(ann.points_xy):
        if not (0 <= x <= width and 0 <= y <= height):
            raise InputError(f"annotation {ann.index}: polygon point {i} ({x:g}, {y:g}) is "
                             f"outside the image {ann.image_path} of size {width}x{height} (WxH)")


def check_polygons_in_images(annotations: Sequence[Annotation], images_dir: str | Path) -> None:
    """Check every annotation's image is readable and its polygon lies inside it."""
    sizes: dict[Path, tuple[int, int]] = {}
    for ann in annotations:
        p = resolve_image_path(images_dir, ann.image_path)
        if p not in sizes:
            sizes[p] = image_size_wh(p, where=f"annotation {ann.index}")
        check_polygon_in_image(ann, sizes[p])


def annotation_image_size_wh(ann: Annotation, images_dir: str | Path) -> tuple[int, int]:
    """(width, height) of an annotation's image (header only), errors name the annotation."""
    return image_size_wh(resolve_image_path(images_dir, ann.image_path),
                         where=f"annotation {ann.index}")


def gt_mask(ann: Annotation, images_dir: str | Path | None = None,
            size_wh: tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask bool [H, W] of an annotation (its polygon, rasterised officially).

    The size comes from `size_wh` if given, else from the image header under `images_dir`.
    """
    if size_wh is None:
        if images_dir is None:
            raise InputError("gt_mask needs images_dir or size_wh to know the image size")
        size_wh = annotation_image_size_wh(ann, images_dir)
    check_polygon_in_image(ann, size_wh)
    return polygon_to_mask(ann.points_xy, height=size_wh[1], width=size_wh[0])
