"""A minimal stand-in for the torchvision functions segment-anything 1.0 imports.

`segment_anything/utils/transforms.py` does
`from torchvision.transforms.functional import resize, to_pil_image` and uses them only in
`ResizeLongestSide.apply_image` on an HxWx3 uint8 numpy image:
`np.array(resize(to_pil_image(image), (new_h, new_w)))`. On a PIL image torchvision resizes
with `PIL.Image.resize((w, h), BILINEAR)` (PIL's filter, antialiased when shrinking), so the
shim below reproduces that path exactly and refuses everything else.
`segment_anything/automatic_mask_generator.py` (imported by the package `__init__`) needs
`torchvision.ops.boxes.batched_nms` and `box_area`: plain-torch versions are given below.

`import_segment_anything()` imports segment-anything with the shim placed in `sys.modules`
ONLY when the real torchvision cannot be found, and removes it again right after the import
(segment-anything binds the two functions at import time), so nothing else in the process
(e.g. transformers' availability checks) ever sees a fake torchvision.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Sequence

import numpy as np
from PIL import Image

from finers_rt.errors import MissingExtraError

_SHIM_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
               "torchvision.ops", "torchvision.ops.boxes")


def to_pil_image(pic: np.ndarray, mode: str | None = None) -> Image.Image:
    """Convert an HxWxC (C in 1, 3, 4) or HxW uint8 numpy image to a PIL image.

    Mirrors torchvision's numpy path for uint8 input: 1 channel -> "L", 3 -> "RGB",
    4 -> "RGBA". Other inputs raise TypeError / ValueError like torchvision does.
    """
    if not isinstance(pic, np.ndarray):
        raise TypeError(f"to_pil_image shim accepts a numpy array, got {type(pic).__name__}")
    if pic.ndim == 2:
        pic = pic[:, :, None]
    if pic.ndim != 3 or pic.shape[-1] not in (1, 3, 4):
        raise ValueError(f"to_pil_image shim expects HxW or HxWx(1|3|4), got shape {pic.shape}")
    if pic.dtype != np.uint8:
        raise TypeError(f"to_pil_image shim expects uint8, got {pic.dtype}")
    default_mode = {1: "L", 3: "RGB", 4: "RGBA"}[pic.shape[-1]]
    if mode is not None and mode != default_mode:
        raise ValueError(f"to_pil_image shim supports mode {default_mode!r} here, got {mode!r}")
    array = np.ascontiguousarray(pic[:, :, 0] if pic.shape[-1] == 1 else pic)
    return Image.fromarray(array)


def resize(img: Image.Image, size: Sequence[int] | int, interpolation=None, max_size=None,
           antialias=True) -> Image.Image:
    """Resize a PIL image to `size` = (h, w) with bilinear filtering (torchvision's PIL path).

    An int `size` resizes the shorter side keeping the aspect ratio, as torchvision does.
    Only bilinear interpolation (the default) is supported.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"resize shim accepts a PIL image, got {type(img).__name__}")
    if interpolation is not None and str(interpolation).lower().split(".")[-1] != "bilinear":
        raise ValueError(f"resize shim supports bilinear interpolation only, got {interpolation!r}")
    if max_size is not None:
        raise ValueError("resize shim does not support max_size")
    w, h = img.size
    if isinstance(size, int) or len(size) == 1:
        short = size if isinstance(size, int) else size[0]
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
    else:
        new_h, new_w = int(size[0]), int(size[1])
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def box_area(boxes):
    """Areas of boxes `[N, 4]` in xyxy format (torch tensor) -> `[N]`."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _box_iou(box, boxes):
    """IoU of one xyxy box `[4]` with `[N, 4]` boxes -> `[N]` (torch)."""
    import torch

    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (box_area(box[None])[0] + box_area(boxes) - inter)


def nms(boxes, scores, iou_threshold: float):
    """Greedy NMS: indices (int64, by decreasing score) of the boxes kept (torch)."""
    import torch

    order = torch.argsort(scores, descending=True, stable=True)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool)
    keep = []
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        suppressed |= _box_iou(boxes[idx], boxes) > iou_threshold
    return torch.as_tensor(keep, dtype=torch.int64)


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    """NMS applied independently per category `idxs` (torchvision's coordinate-offset trick)."""
    import torch

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _make_shim_modules() -> dict[str, types.ModuleType]:
    modules = {}
    for name in _SHIM_NAMES:
        module = types.ModuleType(name, "finers-rt shim of torchvision for segment-anything")
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        module.__path__ = []
        modules[name] = module
    modules["torchvision.transforms.functional"].resize = resize
    modules["torchvision.transforms.functional"].to_pil_image = to_pil_image
    modules["torchvision.ops.boxes"].batched_nms = batched_nms
    modules["torchvision.ops.boxes"].box_area = box_area
    modules["torchvision.ops.boxes"].nms = nms
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision"].ops = modules["torchvision.ops"]
    modules["torchvision.ops"].boxes = modules["torchvision.ops.boxes"]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    return modules


def torchvision_available() -> bool:
    """True when a real torchvision is importable."""
    present = sys.modules.get("torchvision")
    if present is not None:
        return not getattr(present, "__finers_rt_shim__", False)
    return importlib.util.find_spec("torchvision") is not None


def import_segment_anything() -> types.ModuleType:
    """Import and return `segment_anything`, using the shim only if torchvision is missing.

    Raises MissingExtraError (extra 'export') when segment-anything is not installed.
    """
    if "segment_anything.utils.transforms" in sys.modules:
        return importlib.import_module("segment_anything")
    if importlib.util.find_spec("segment_anything") is None:
        raise MissingExtraError("export", "segment-anything", "SAM export")
    if torchvision_available():
        return importlib.import_module("segment_anything")
    shims = _make_shim_modules()
    for module in shims.values():
        module.__finers_rt_shim__ = True
    sys.modules.update(shims)
    try:
        importlib.import_module("segment_anything.utils.transforms")
        return importlib.import_module("segment_anything")
    finally:
        for name in _SHIM_NAMES:
            if sys.modules.get(name) is shims[name]:
                del sys.modules[name]
