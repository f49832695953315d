"""Image loading and Qwen2.5-VL preprocessing (numpy + pillow, no torch).

Conventions: images are `np.ndarray [H, W, 3] uint8 RGB` (row-major, origin top-left);
sizes are written `size_wh = (width, height)` or `*_hw = (height, width)` as the name says.

The processor path reproduces the *slow* `Qwen2VLImageProcessor` of transformers exactly:
`smart_resize` to multiples of `patch_size * merge_size`, PIL BICUBIC resize of the uint8
image, `float32(float64(x) * rescale_factor)`, `(x - mean) / std` in float32, then the
Qwen2.5-VL patch order (temporal patch = the image repeated, `merge_size` x `merge_size`
groups of patches kept together). The per-pixel arithmetic is a 256-entry lookup table per
channel applied after the uint8 image is put in patch order, so no float64 copy of the image is
ever made, the float32 output is written once and the result is bit-identical.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finers_rt.errors import InputError, suggest

ImageSource = Union[str, os.PathLike, np.ndarray]

_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


# ---- loading ----------------------------------------------------------------------------------


def load_image(source: ImageSource) -> np.ndarray:
    """Load an image file (or check an array) as `[H, W, 3] uint8 RGB`.

    Files: anything pillow reads (opencv as a fallback for formats or sizes pillow refuses),
    EXIF orientation applied; grayscale, RGBA/LA (alpha dropped, like `convert("RGB")`),
    palette, CMYK and 16-bit images become 8-bit RGB (16-bit values are scaled by 255/65535).
    Arrays: `[H, W]`, `[H, W, 3]` or `[H, W, 4]` uint8 (alpha dropped); a C-contiguous
    `[H, W, 3]` uint8 array is returned as is (no copy).
    Raises InputError for missing, empty, truncated or non-image files and bad arrays.
    """
    if isinstance(source, np.ndarray):
        return _check_array(source)
    path = _check_path(source)
    try:
        return _load_with_pillow(path)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        rgb = _load_with_opencv(path)
        if rgb is None:
            raise InputError(f"not an image file pillow or opencv can read: '{path}' ({exc})") from None
        return rgb


def _check_path(source) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"image must be a file path or an HxWx3 uint8 array, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise InputError(f"image file not found: '{path}'")
    if not path.is_file():
        raise InputError(f"image path is not a file: '{path}'")
    if path.stat().st_size == 0:
        raise InputError(f"image file is empty (0 bytes): '{path}'")
    return path


def _load_with_pillow(path: Path) -> np.ndarray:
    img = _open_with_pillow(path)
    try:
        return _pil_to_rgb(img, str(path))
    finally:
        img.close()


def _open_with_pillow(path: Path) -> Image.Image:
    """Decoded pillow image of `path`, EXIF orientation applied; the file is closed on return."""
    with warnings.catch_warnings(), open(path, "rb") as handle:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(handle)
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"cannot identify image file '{path}'") from None
        except Image.DecompressionBombError:
            raise
        except Exception as exc:  # a plugin parsing a damaged header raises many kinds
            raise InputError(f"image file is truncated or corrupt: '{path}' "
                             f"({type(exc).__name__}: {exc})") from None
        try:
            img.load()
        except Image.DecompressionBombError:
            img.close()
            raise
        except Exception as exc:
            img.close()
            raise InputError(f"image file is truncated or corrupt: '{path}' "
                             f"({type(exc).__name__}: {exc})") from None
        try:
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is no orientation tag
        except Exception:  # a damaged EXIF block: the pixels are fine, keep them as stored
            pass
        return img


def _load_with_opencv(path: Path) -> np.ndarray | None:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # EXIF orientation applied, 8-bit
    if bgr is None or bgr.size == 0:
        return None
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _pil_to_rgb(img: Image.Image, where: str) -> np.ndarray:
    """Convert any pillow mode to `[H, W, 3] uint8 RGB`."""
    if img.width == 0 or img.height == 0:
        raise InputError(f"image has no pixels: {img.width}x{img.height} ({where})")
    if img.mode.startswith("I") or img.mode == "F":
        gray = _high_depth_to_uint8(np.asarray(img), img.mode)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot convert image mode '{img.mode}' to RGB ({where}): {exc}") from None
    return _rgb_image_to_array(img)


def _rgb_image_to_array(img: Image.Image, strip_bytes: int = 1 << 24) -> np.ndarray:
    """RGB pillow image -> owned `[H, W, 3] uint8`: pillow's raw encoder packs the pixels in
    chunks of ~`strip_bytes` straight into the array (what `tobytes` does, without the
    full-size bytes object). Peak memory is pillow's image + the array + one chunk."""
    width, height = img.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    flat = out.reshape(-1)
    try:
        encoder = Image._getencoder("RGB", "raw", "RGB")  # the encoder `Image.tobytes` uses
        encoder.setimage(img.im, (0, 0, width, height))
    except (AttributeError, TypeError, ValueError):  # pillow changed its internals
        return _rgb_image_to_array_by_strips(img, out, strip_bytes)
    try:
        position, bufsize = 0, max(strip_bytes, 4 * width)  # RawEncode needs a whole row
        while True:
            _, status, data = encoder.encode(bufsize)
            flat[position:position + len(data)] = np.frombuffer(data, dtype=np.uint8)
            position += len(data)
            if status:
                break
    finally:
        encoder.cleanup()
    if status < 0 or position != flat.size:
        raise InputError(f"could not read the decoded pixels out of pillow (status {status})")
    return out


def _rgb_image_to_array_by_strips(img: Image.Image, out: np.ndarray, strip_bytes: int) -> np.ndarray:
    """`_rgb_image_to_array` through public pillow calls only (crop + asarray per row strip)."""
    width, height = img.size
    rows = max(1, strip_bytes // (3 * width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = np.asarray(img.crop((0, top, width, bottom)))
    return out


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit / 32-bit integer or float grayscale -> uint8.

    "I;16*" are scaled by 255/65535; "I" is treated as 16-bit when any value exceeds 255;
    "F" in [0, 1] is scaled by 255, otherwise clipped to [0, 255].
    """
    values = values.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
        values = values * (255.0 / 65535.0)
    elif mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _check_array(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise InputError(f"image array must be uint8 [H, W, 3], got {image.shape} {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image array must be HxWx3 uint8 (or HxW / HxWx4), got {image.shape} {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image array has no pixels: {image.shape}")
    return np.ascontiguousarray(image)


def check_min_size(image: np.ndarray, min_wh: Sequence[int]) -> None:
    """Raise InputError if `image [H, W, 3]` is smaller than `min_wh = (W, H)` on either side."""
    height, width = image.shape[:2]
    if width < min_wh[0] or height < min_wh[1]:
        raise InputError(f"image is too small: {width}x{height} (WxH), need at least "
                         f"{min_wh[0]}x{min_wh[1]}")


# ---- FineRS stage resize and the Qwen2.5-VL processor ----------------------------------------


def resize_for_stage(image: np.ndarray, stage_size_wh: Sequence[int]) -> np.ndarray:
    """FineRS stage input: PIL bilinear resize to exactly `stage_size_wh` (aspect NOT kept).

    image: [H, W, 3] uint8 RGB. Returns [stage_h, stage_w, 3] uint8 RGB.
    """
    image = _check_array(image)
    width, height = int(stage_size_wh[0]), int(stage_size_wh[1])
    if width <= 0 or height <= 0:
        raise InputError(f"stage_size_wh must be two positive ints, got {tuple(stage_size_wh)}")
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL `smart_resize`: the (height, width) nearest to the input that is a multiple of
    `factor` on both sides with `min_pixels <= h*w <= max_pixels`, aspect ratio kept."""
    if height <= 0 or width <= 0:
        raise InputError(f"image size must be positive, got {height}x{width} (HxW)")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image aspect ratio must be below 200, got {height}x{width} (HxW)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """The processor settings of one VLM stage (mirrors the manifest's `image` section)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 12845056  # Qwen2.5-VL release preprocessor_config.json
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1.0 / 255.0
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resample not in _PIL_RESAMPLE:
            raise InputError(f"unknown resample '{self.resample}'{suggest(self.resample, _PIL_RESAMPLE)}; "
                             f"expected one of {sorted(_PIL_RESAMPLE)}")
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise InputError("image_mean and image_std must have 3 entries (RGB)")

    @classmethod
    def from_spec(cls, spec) -> "VisionPreprocessConfig":
        """Build from a manifest `VlmImageSpec` (any object with the same attribute names)."""
        return cls(patch_size=int(spec.patch_size), temporal_patch_size=int(spec.temporal_patch_size),
                   merge_size=int(spec.merge_size), min_pixels=int(spec.min_pixels),
                   max_pixels=int(spec.max_pixels), image_mean=tuple(float(v) for v in spec.image_mean),
                   image_std=tuple(float(v) for v in spec.image_std),
                   rescale_factor=float(spec.rescale_factor), resample=str(spec.resample))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def _normalize_lut(config: VisionPreprocessConfig) -> np.ndarray:
    """[3, 256] float32: value of each uint8 level per channel after rescale + normalize,
    computed with exactly the reference's dtype sequence (float64 rescale -> float32)."""
    levels = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return (levels[None, :] - mean[:, None]) / std[:, None]


def preprocess_image(image: np.ndarray, config: VisionPreprocessConfig = VisionPreprocessConfig()
                     ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Qwen2.5-VL processor for ONE image.

    image: [H, W, 3] uint8 RGB. Returns `pixel_values [grid_t*grid_h*grid_w,
    3*temporal_patch_size*patch_size**2]` float32 and `grid_thw = (1, grid_h, grid_w)` (in
    patches, before merging), equal to `Qwen2VLImageProcessor` (slow) output.
    """
    image = _check_array(image)
    height, width = image.shape[:2]
    resized_h, resized_w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    if (resized_h, resized_w) != (height, width):
        pil = Image.fromarray(image).resize((resized_w, resized_h), _PIL_RESAMPLE[config.resample])
        image = np.asarray(pil, dtype=np.uint8)
    return _normalized_patches(image, config), (1, resized_h // config.patch_size, resized_w // config.patch_size)


def _normalized_patches(image: np.ndarray, config: VisionPreprocessConfig) -> np.ndarray:
    """`patchify` of the normalized image, fused: the uint8 image is put in patch order first
    (1 byte per value), then each channel's 256-entry table is applied (cv2.LUT, a pure lookup,
    so bit-identical) straight into every temporal slot of the float32 output."""
    import cv2

    size, merge, temporal = config.patch_size, config.merge_size, config.temporal_patch_size
    height, width, channels = image.shape
    blocks_h, blocks_w = height // (size * merge), width // (size * merge)
    num_patches = blocks_h * blocks_w * merge * merge
    ordered = image.reshape(blocks_h, merge, size, blocks_w, merge, size, channels)
    ordered = np.ascontiguousarray(ordered.transpose(6, 0, 3, 1, 4, 2, 5))  # [C, bh, bw, mh, mw, ph, pw]
    ordered = ordered.reshape(channels, num_patches, size * size)
    lut = _normalize_lut(config)
    out = np.empty((num_patches, channels, temporal, size * size), dtype=np.float32)
    for channel in range(channels):
        table = np.ascontiguousarray(lut[channel]).reshape(1, 256)
        for slot in range(temporal):
            target = out[:, channel, slot]  # [num_patches, P*P], rows strided
            written = cv2.LUT(ordered[channel], table, dst=target)
            if not np.shares_memory(written, target):
                target[...] = written
    return out.reshape(num_patches, channels * temporal * size * size)


def patchify(normalized: np.ndarray, config: VisionPreprocessConfig) -> np.ndarray:
    """[h, w, C] float32 (h, w multiples of patch*merge) -> [num_patches, C*T*P*P] float32 in the
    Qwen2.5-VL order: merge groups row-major, inside a group (mh, mw), per patch (C, T, ph, pw),
    the single image repeated over the temporal patch T."""
    size, merge, temporal = config.patch_size, config.merge_size, config.temporal_patch_size
    height, width, channels = normalized.shape
    blocks_h, blocks_w = height // (size * merge), width // (size * merge)
    grouped = normalized.reshape(blocks_h, merge, size, blocks_w, merge, size, channels)
    grouped = grouped.transpose(0, 3, 1, 4, 6, 2, 5)  # [bh, bw, mh, mw, C, ph, pw]
    repeated = np.broadcast_to(grouped[:, :, :, :, :, None],
                               grouped.shape[:5] + (temporal,) + grouped.shape[5:])
    num_patches = blocks_h * blocks_w * merge * merge
    return np.ascontiguousarray(repeated).reshape(num_patches, channels * temporal * size * size)


def preprocess_for_stage(image: np.ndarray, stage_size_wh: Sequence[int],
                         config: VisionPreprocessConfig = VisionPreprocessConfig()
                         ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """FineRS stage resize (bilinear to `stage_size_wh`) then the processor: returns
    `(pixel_values [num_patches, C*T*P*P] float32, grid_thw)`."""
    return preprocess_image(resize_for_stage(image, stage_size_wh), config)
