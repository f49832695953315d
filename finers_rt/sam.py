"""SAM on ONNX Runtime (no torch): `set_image` once, `predict` many.

Follows segment-anything's `SamPredictor` exactly, reading every size from the SAM folder's
`manifest.json` (see docs/bundle-format.md):
- `set_image(image)`: HxWx3 uint8 RGB; the long side is resized to S (`image_size`) like
  `ResizeLongestSide.apply_image` (PIL bilinear to round-half-up of the scaled size), normalised
  with `pixel_mean` / `pixel_std`, zero-padded bottom/right to SxS and encoded ONCE. Embeddings
  are kept in a small LRU keyed by the image content (sha1 of bytes + shape), so the same crop
  is never encoded twice.
- `predict(box_xyxy, points_xy, point_labels)`: coordinates in ORIGINAL image pixels (x, y),
  mapped like `apply_coords`; points first, then the box as two corners labelled 2 and 3; a
  padding point (label -1) only when no box is given; `multimask_output` selects masks `[1:]`
  (else `[0:1]`); `mask = logits > mask_threshold`.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from finers_rt.backends import create_backend
from finers_rt.config import BackendOptions
from finers_rt.errors import InputError, ManifestError
from finers_rt.manifest import SamManifest, check_session_matches, verify_files

DEFAULT_CACHE_SIZE = 4


def resized_hw(orig_hw: Sequence[int], image_size: int) -> tuple[int, int]:
    """(h, w) after scaling the long side of `orig_hw` to `image_size`, rounded half up
    (`ResizeLongestSide.get_preprocess_shape`, same float64 arithmetic)."""
    scale = image_size * 1.0 / max(orig_hw[0], orig_hw[1])
    return int(orig_hw[0] * scale + 0.5), int(orig_hw[1] * scale + 0.5)


def transform_coords(coords_xy: np.ndarray, orig_hw: Sequence[int], image_size: int) -> np.ndarray:
    """Map `[..., 2]` xy pixel coordinates of the original image into the resized frame
    (`ResizeLongestSide.apply_coords`); float64 in, float64 out."""
    new_h, new_w = resized_hw(orig_hw, image_size)
    out = np.array(coords_xy, dtype=np.float64, copy=True)
    out[..., 0] *= new_w / orig_hw[1]
    out[..., 1] *= new_h / orig_hw[0]
    return out


def preprocess_image(image: np.ndarray, image_size: int, pixel_mean: Sequence[float],
                     pixel_std: Sequence[float]) -> np.ndarray:
    """HxWx3 uint8 RGB -> encoder input `[1, 3, S, S]` float32 (resized, normalised, padded).

    `(float32(x) - mean) / std` is a 256-entry float32 table per channel (cv2.LUT on the uint8
    image: the same IEEE float32 operations as `Sam.preprocess`, without float temporaries)."""
    import cv2

    new_h, new_w = resized_hw(image.shape[:2], image_size)
    resized = np.ascontiguousarray(image)
    if resized.shape[:2] != (new_h, new_w):
        resized = np.asarray(Image.fromarray(resized).resize((new_w, new_h), Image.BILINEAR))
    mean = np.asarray(pixel_mean, dtype=np.float32)
    std = np.asarray(pixel_std, dtype=np.float32)
    table = (np.arange(256, dtype=np.float32)[:, None] - mean) / std  # [256, 3]
    padded = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    normalized = cv2.LUT(resized, np.ascontiguousarray(table).reshape(1, 256, 3))  # [h', w', 3]
    padded[0, :, :new_h, :new_w] = normalized.transpose(2, 0, 1)
    return padded


def check_image(image) -> np.ndarray:
    """Raise InputError unless `image` is a non-empty HxWx3 uint8 numpy array."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be an HxWx3 uint8 numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise InputError(f"image must be HxWx3 uint8 (RGB), got {image.shape} {image.dtype}")
    return image


@dataclass
class CacheStats:
    """Embedding-cache counters: `hits`, `misses`, current `size` and `capacity`."""

    hits: int = 0
    misses: int = 0
    size: int = 0
    capacity: int = DEFAULT_CACHE_SIZE


class SamPredictorRT:
    """segment-anything's `SamPredictor` on two ONNX graphs (`image_encoder`, `mask_decoder`)."""

    def __init__(self, manifest: SamManifest, encoder, decoder,
                 cache_size: int = DEFAULT_CACHE_SIZE):
        if cache_size < 1:
            raise InputError(f"cache_size must be >= 1, got {cache_size}")
        self.manifest = manifest
        self.encoder = encoder
        self.decoder = decoder
        self.image_size = int(manifest.image_size)
        self.mask_input_hw = tuple(manifest.mask_input_hw)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.stats = CacheStats(capacity=cache_size)
        self._embedding: np.ndarray | None = None  # [1, C, E, E] of the current image
        self._orig_hw: tuple[int, int] | None = None

    @classmethod
    def load(cls, sam_dir: str | os.PathLike, backend_options: BackendOptions | None = None,
             cache_size: int = DEFAULT_CACHE_SIZE, check_hash: bool = False) -> "SamPredictorRT":
        """Open a SAM folder: read and check its manifest, open both graphs and check their
        inputs/outputs against it (EngineProfileError on mismatch)."""
        folder = Path(sam_dir)
        try:
            manifest = SamManifest.load(folder)
        except (ValueError, TypeError) as exc:
            raise ManifestError(f"{folder / 'manifest.json'}: {exc}") from None
        verify_files(folder, manifest.graphs, check_hash=check_hash)
        options = backend_options or BackendOptions()
        backends = {}
        for name in ("image_encoder", "mask_decoder"):
            spec = manifest.graphs[name]
            backends[name] = create_backend(folder / spec.file, options)
            check_session_matches(spec, backends[name], where=f"{folder}/{spec.file}")
        return cls(manifest, backends["image_encoder"], backends["mask_decoder"], cache_size)

    # ---- image --------------------------------------------------------------------------------

    @staticmethod
    def image_key(image: np.ndarray) -> str:
        """Content key of an image: sha1 over its shape and bytes."""
        digest = hashlib.sha1(repr(image.shape).encode())
        digest.update(np.ascontiguousarray(image).data)
        return digest.hexdigest()

    def set_image(self, image: np.ndarray) -> None:
        """Encode `image` (HxWx3 uint8 RGB), or reuse its cached embedding."""
        check_image(image)
        key = self.image_key(image)
        embedding = self._cache.get(key)
        if embedding is not None:
            self._cache.move_to_end(key)
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            embedding = self.encode(image)
            self._cache[key] = embedding
            while len(self._cache) > self.stats.capacity:
                self._cache.popitem(last=False)
        self.stats.size = len(self._cache)
        self._embedding = embedding
        self._orig_hw = (int(image.shape[0]), int(image.shape[1]))

    def encode(self, image: np.ndarray) -> np.ndarray:
        """Run the encoder on `image` -> image_embeddings `[1, C, E, E]` float32 (no cache)."""
        m = self.manifest
        pixels = preprocess_image(image, self.image_size, m.pixel_mean, m.pixel_std)
        return self.encoder.run({"image": pixels}, ["image_embeddings"])["image_embeddings"]

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def image_embedding(self) -> np.ndarray:
        """image_embeddings `[1, C, E, E]` float32 of the current image."""
        if self._embedding is None:
            raise InputError("no image set: call set_image(image) first")
        return self._embedding

    # ---- prompts ------------------------------------------------------------------------------

    def predict(self, box_xyxy: Sequence[float] | None = None,
                points_xy: Sequence[Sequence[float]] | None = None,
                point_labels: Sequence[int] | None = None, multimask_output: bool = True,
                mask_input: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for the prompts on the current image (coordinates in original pixels).

        box_xyxy: 4 numbers inside the image, or None. points_xy: `[N, 2]` xy inside the image,
        or None; point_labels: N values in {0, 1} (default all 1). mask_input: optional
        `[1, 4E, 4E]` low-res logits of a previous call.
        Returns masks bool `[M, h, w]`, scores float32 `[M]`, low_res_logits float32
        `[M, 4E, 4E]` with M = num_multimask_outputs if `multimask_output` else 1.
        """
        if self._embedding is None:
            raise InputError("no image set: call set_image(image) before predict()")
        coords, labels = self._prompt_arrays(box_xyxy, points_xy, point_labels)
        feeds = {"image_embeddings": self._embedding,
                 "point_coords": transform_coords(coords, self._orig_hw, self.image_size)
                 .astype(np.float32)[None],
                 "point_labels": labels[None],
                 "orig_im_size": np.array(self._orig_hw, dtype=np.float32)}
        feeds.update(self._mask_feeds(mask_input))
        out = self.decoder.run(feeds, ["masks", "iou_predictions", "low_res_masks"])
        keep = slice(1, None) if multimask_output else slice(0, 1)
        masks = out["masks"][0, keep] > self.manifest.mask_threshold
        return masks, out["iou_predictions"][0, keep], out["low_res_masks"][0, keep]

    def predict_best(self, box_xyxy: Sequence[float] | None = None,
                     points_xy: Sequence[Sequence[float]] | None = None,
                     point_labels: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
        """FineRS' choice: the highest-scoring multimask output -> (mask bool `[h, w]`, score)."""
        masks, scores, _ = self.predict(box_xyxy, points_xy, point_labels, multimask_output=True)
        best = int(np.argmax(scores))
        return masks[best], float(scores[best])

    def _prompt_arrays(self, box_xyxy, points_xy, point_labels) -> tuple[np.ndarray, np.ndarray]:
        """Validated prompts -> coords `[N', 2]` float64, labels `[N']` float32 (SamPredictor
        order: points, then box corners 2/3, or a padding point -1 when there is no box)."""
        h, w = self._orig_hw
        if box_xyxy is None and points_xy is None:
            raise InputError("predict needs a box_xyxy, points_xy, or both; got neither")
        coords, labels = np.zeros((0, 2)), np.zeros((0,), dtype=np.float32)
        if points_xy is not None:
            coords = _as_float_array(points_xy, "points_xy")
            if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
                raise InputError(f"points_xy must be [N, 2] xy with N >= 1, got shape {coords.shape}")
            _check_inside(coords, w, h, "points_xy")
            labels = _check_labels(point_labels, len(coords))
        elif point_labels is not None:
            raise InputError("point_labels given without points_xy")
        if box_xyxy is not None:
            box = _as_float_array(box_xyxy, "box_xyxy")
            if box.shape != (4,):
                raise InputError(f"box_xyxy must be 4 numbers [x1, y1, x2, y2], got shape {box.shape}")
            if box[0] > box[2] or box[1] > box[3]:
                raise InputError(f"box_xyxy must have x1 <= x2 and y1 <= y2, got {box.tolist()}")
            _check_inside(box.reshape(2, 2), w, h, "box_xyxy")
            coords = np.concatenate([coords, box.reshape(2, 2)])
            labels = np.concatenate([labels, np.array([2, 3], dtype=np.float32)])
        else:
            coords = np.concatenate([coords, np.zeros((1, 2))])
            labels = np.concatenate([labels, np.array([-1], dtype=np.float32)])
        return coords, labels

    def _mask_feeds(self, mask_input: np.ndarray | None) -> dict[str, np.ndarray]:
        shape = (1, 1) + self.mask_input_hw
        if mask_input is None:
            return {"mask_input": np.zeros(shape, np.float32),
                    "has_mask_input": np.zeros(1, np.float32)}
        mask = np.asarray(mask_input, dtype=np.float32)
        if mask.shape != shape[1:] or not np.isfinite(mask).all():
            raise InputError(f"mask_input must be finite low-res logits {list(shape[1:])}, "
                             f"got {list(mask.shape)}")
        return {"mask_input": mask[None], "has_mask_input": np.ones(1, np.float32)}


def _as_float_array(value, name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be numbers, got {value!r}") from None
    if not np.isfinite(array).all():
        raise InputError(f"{name} must be finite, got {array.tolist()}")
    return array


def _check_inside(coords_xy: np.ndarray, w: int, h: int, name: str) -> None:
    inside = ((coords_xy[:, 0] >= 0) & (coords_xy[:, 0] <= w)
              & (coords_xy[:, 1] >= 0) & (coords_xy[:, 1] <= h))
    if not inside.all():
        raise InputError(f"{name} must lie inside the image (0..{w} x 0..{h} px), "
                         f"got {coords_xy.tolist()}")


def _check_labels(point_labels, n: int) -> np.ndarray:
    if point_labels is None:
        return np.ones(n, dtype=np.float32)
    labels = np.asarray(point_labels)
    if labels.shape != (n,) or not np.isin(labels, (0, 1)).all():
        raise InputError(f"point_labels must be {n} values in {{0 (background), 1 (foreground)}}, "
                         f"got {np.asarray(point_labels).tolist()}")
    return labels.astype(np.float32)
