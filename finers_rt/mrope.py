"""Qwen2.5-VL 3-D M-RoPE position index in numpy (no torch).

Every token gets three rotary positions (t, h, w). Text tokens use the same running index on
all three axes; the `<|image_pad|>` tokens of an image get (t, h, w) on the *merged* patch grid
(`grid_h / merge`, `grid_w / merge`) offset by the index reached before the image; text after an
image continues at `max(previous positions) + 1`. A still image has temporal index 0 (the
reference multiplies the frame index by `second_per_grid_t = 0` for images).

`rope_delta = max(position) + 1 - sequence_length`; every token appended after the prompt (the
question part after a cached prefix, then each decoded token) sits at
`index_in_sequence + rope_delta` on all three axes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from finers_rt.errors import InputError


def compute_rope_index(input_ids: np.ndarray, image_grid_thw: Sequence[Sequence[int]], *,
                       image_token_id: int, vision_start_token_id: int,
                       spatial_merge_size: int) -> tuple[np.ndarray, int]:
    """M-RoPE positions of one sequence with zero or more images.

    input_ids: [S] integer token ids (one sequence, no padding); each image is
    `<|vision_start|>` followed by its `<|image_pad|>` tokens (t*h*w / merge**2 of them).
    image_grid_thw: one (t, h, w) patch grid per image, in order (before merging).
    Returns `(position_ids [3, S] int64, rope_delta int)`.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be a 1-D integer array, got {ids.shape} {ids.dtype}")
    starts = np.flatnonzero(ids[:-1] == vision_start_token_id)
    num_images = int(np.count_nonzero(ids[starts + 1] == image_token_id)) if starts.size else 0
    if num_images != len(image_grid_thw):
        raise InputError(f"sequence has {num_images} image(s) after <|vision_start|>, "
                         f"but {len(image_grid_thw)} grid(s) were given")
    pieces: list[np.ndarray] = []
    cursor, next_pos = 0, 0
    image_at = np.flatnonzero(ids == image_token_id)
    for grid in image_grid_thw:
        first = int(image_at[np.searchsorted(image_at, cursor)])
        grid_t, grid_h, grid_w = (int(grid[0]), int(grid[1]) // spatial_merge_size,
                                  int(grid[2]) // spatial_merge_size)
        text_len = first - cursor
        pieces.append(_text_block(next_pos, text_len))
        pieces.append(_image_block(next_pos + text_len, grid_t, grid_h, grid_w))
        next_pos = int(pieces[-1].max()) + 1
        cursor = first + grid_t * grid_h * grid_w
    if cursor < ids.size:
        pieces.append(_text_block(next_pos, ids.size - cursor))
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    if positions.shape[1] != ids.size:
        raise InputError(f"image tokens do not match the grids: positions for {positions.shape[1]} "
                         f"tokens, sequence has {ids.size}")
    rope_delta = int(positions.max()) + 1 - ids.size if ids.size else 0
    return positions, rope_delta


def _text_block(start: int, length: int) -> np.ndarray:
    """[3, length] int64: the same running index on t, h, w."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (3, length)).copy()


def _image_block(offset: int, grid_t: int, grid_h: int, grid_w: int) -> np.ndarray:
    """[3, t*h*w] int64 positions of the merged image grid (t index 0 for a still image)."""
    t_index = np.zeros((grid_t, grid_h, grid_w), dtype=np.int64)
    h_index = np.broadcast_to(np.arange(grid_h, dtype=np.int64)[None, :, None], t_index.shape)
    w_index = np.broadcast_to(np.arange(grid_w, dtype=np.int64)[None, None, :], t_index.shape)
    return np.stack([t_index.ravel(), h_index.ravel(), w_index.ravel()]) + offset


def sequential_positions(start: int, count: int, rope_delta: int, batch: int = 1) -> np.ndarray:
    """Positions of `count` tokens appended at sequence index `start` (after the prompt or a
    cached prefix): `start + i + rope_delta` on all three axes. Returns [3, batch, count] int64."""
    positions = np.empty((3, batch, count), dtype=np.int64)
    positions[...] = np.arange(start + rope_delta, start + rope_delta + count, dtype=np.int64)
    return positions
