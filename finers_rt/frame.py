"""Decoded camera frames for the pipeline: decode a file once, then crop and resize it many times.

`open_frame` gives `load_image`'s checks and pixels, but an RGB file stays in pillow (no full-size
numpy copy); `file_key` identifies a file's current contents for the pipeline's kept-frame cache.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from finers_rt.errors import InputError
from finers_rt.image import (ImageSource, _check_array, _check_path, _load_with_opencv,
                             _open_with_pillow, _pil_to_rgb, _rgb_image_to_array, resize_for_stage)


def open_frame(source: ImageSource) -> Frame:
    """Decode an image file (or wrap an array) for reading: `load_image`'s checks and pixels,
    but an RGB file stays in pillow (no full-size copy into numpy; see `Frame`)."""
    if isinstance(source, np.ndarray):
        return Frame(_check_array(source))
    path = _check_path(source)
    try:
        img = _open_with_pillow(path)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        rgb = _load_with_opencv(path)
        if rgb is None:
            raise InputError(f"not an image file pillow or opencv can read: '{path}' ({exc})") from None
        return Frame(rgb)
    if img.mode == "RGB" and img.width > 0 and img.height > 0:
        return Frame(img)
    try:
        return Frame(_pil_to_rgb(img, str(path)))
    finally:
        img.close()


def file_key(source: str | os.PathLike) -> tuple:
    """Identity of a file's current contents for a decoded-frame cache: (absolute path, device,
    inode, size, mtime_ns, ctime_ns). Raises InputError when the file cannot be stat'ed."""
    path = os.path.abspath(os.fspath(source))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"image file not found: '{source}' ({exc.strerror})") from None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Frame:
    """A decoded `[H, W, 3] uint8 RGB` frame as the pipeline reads it: full-resolution crops and
    whole-frame resizes. Holds pillow's decoded image when the file decoded straight to RGB, so
    loading costs the decode only (the reference's `convert("RGB")` and `load_image` copy the
    whole image once more); else holds the array. Pixels equal `load_image`'s. Read-only: the
    methods return new arrays and a wrapped array must not change while the Frame is used."""

    def __init__(self, image: Image.Image | np.ndarray):
        self._pil = image if isinstance(image, Image.Image) else None
        self._array = None if self._pil is not None else image
        self._resized: dict[tuple[int, int], np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, 3), like the array's."""
        if self._pil is not None:
            return (self._pil.height, self._pil.width, 3)
        return tuple(self._array.shape)

    def crop(self, box_xyxy: Sequence[int]) -> np.ndarray:
        """`[y1:y2, x1:x2]` of the frame (numpy slice semantics: the box is clipped to the frame)
        as an owned C-contiguous `[h, w, 3] uint8` array."""
        height, width = self.shape[:2]
        x1, y1, x2, y2 = (int(v) for v in box_xyxy)
        x1, y1 = min(max(x1, 0), width), min(max(y1, 0), height)
        x2, y2 = max(x1, min(x2, width)), max(y1, min(y2, height))
        if self._pil is None:
            return np.array(self._array[y1:y2, x1:x2])
        if x2 == x1 or y2 == y1:
            return np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
        return np.array(self._pil.crop((x1, y1, x2, y2)), dtype=np.uint8)

    def has_resized(self, size_wh: Sequence[int]) -> bool:
        """True when `resized(size_wh)` is already computed (calling it costs nothing)."""
        return (int(size_wh[0]), int(size_wh[1])) in self._resized

    def resized(self, size_wh: Sequence[int]) -> np.ndarray:
        """`resize_for_stage(frame, size_wh)` (PIL bilinear, aspect not kept), computed once per
        size and kept with the frame; do not write into the returned array."""
        key = (int(size_wh[0]), int(size_wh[1]))
        cached = self._resized.get(key)
        if cached is not None:
            return cached
        if self._pil is None:
            out = resize_for_stage(self._array, key)
        elif key == (self._pil.width, self._pil.height):
            out = self.to_array()
        else:
            if key[0] <= 0 or key[1] <= 0:
                raise InputError(f"stage_size_wh must be two positive ints, got {key}")
            out = np.asarray(self._pil.resize(key, Image.Resampling.BILINEAR), dtype=np.uint8)
        self._resized[key] = out
        return out

    def to_array(self) -> np.ndarray:
        """The whole frame as `[H, W, 3] uint8` (pillow-backed frames: a new copy per call)."""
        if self._pil is None:
            return self._array
        return _rgb_image_to_array(self._pil)
