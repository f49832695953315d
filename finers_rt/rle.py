"""COCO run-length encoding of binary masks, compatible with pycocotools, in numpy only.

A COCO RLE is `{"size": [h, w], "counts": ...}`. The mask is flattened in column-major
(Fortran) order and `counts` lists alternating run lengths, starting with a run of 0s (which
may be empty). Compressed `counts` is an ASCII string: each count (for i > 2 minus the count
two places before it) is written as signed 5-bit chunks, least significant first, each chunk
as chr(48 + c) with bit 0x20 set when another chunk follows (pycocotools `rleToString`).
`encode_mask` writes that string byte-for-byte like `pycocotools.mask.encode`; `decode_mask`
reads it, or an uncompressed `counts` list of ints.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from finers_rt.errors import InputError

_MAX_CHUNKS = 13  # 13 * 5 bits covers any int64


def mask_runs(mask: np.ndarray) -> np.ndarray:
    """Run lengths int64 [R] of a [H, W] mask in Fortran order, starting with a 0-run
    (which is 0 when the first pixel is set; an empty mask gives [0])."""
    flat = np.asarray(mask).ravel(order="F").astype(bool)
    if flat.size == 0:
        return np.zeros(1, np.int64)  # pycocotools writes one empty 0-run ("0")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).astype(np.int64)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs


def _counts_to_string(counts: np.ndarray) -> str:
    """Compress run lengths [R] into the pycocotools string (vectorised rleToString)."""
    counts = np.asarray(counts, np.int64)
    x = counts.copy()
    x[3:] -= counts[1:-2]  # delta against the count two places back, for i > 2
    # chunks per value: the fewest 5-bit groups holding x as a signed (two's complement) number
    n_chunks = np.ones(x.size, np.int64)  # [R]
    for k in range(1, _MAX_CHUNKS):
        limit = np.int64(1) << (5 * k - 1)
        n_chunks += (x >= limit) | (x < -limit)
    offsets = np.cumsum(n_chunks) - n_chunks  # first character of each value
    out = np.empty(int(n_chunks.sum()), np.uint8)
    for k in range(int(n_chunks.max(initial=0))):
        rows = np.flatnonzero(n_chunks > k)
        chunk = (x[rows] >> (5 * k)) & 0x1F
        chunk |= np.where(n_chunks[rows] - 1 > k, 0x20, 0)
        out[offsets[rows] + k] = chunk + 48
    return out.tobytes().decode("ascii")


def _string_to_counts(s: str | bytes) -> np.ndarray:
    """Decompress a pycocotools counts string into run lengths int64 [R] (vectorised
    rleFrString). Raises InputError on characters out of range or a truncated last count."""
    try:
        raw = s.encode("ascii") if isinstance(s, str) else bytes(s)
    except UnicodeEncodeError as exc:
        raise InputError(f"corrupt RLE counts string: non-ASCII character at offset "
                         f"{exc.start}") from None
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    bad = np.flatnonzero((c < 0) | (c > 63))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"corrupt RLE counts string: character {raw[i:i + 1]!r} at offset {i} "
                         f"is outside the valid range '0'..'o'")
    ends = (c & 0x20) == 0  # last chunk of a count
    if not ends[-1]:
        raise InputError("corrupt RLE counts string: it ends in the middle of a count")
    end_idx = np.flatnonzero(ends)
    starts = np.concatenate(([0], end_idx[:-1] + 1))
    lengths = end_idx - starts + 1
    if lengths.max() > _MAX_CHUNKS - 1:
        raise InputError(f"corrupt RLE counts string: a count spans {int(lengths.max())} "
                         f"characters (at most {_MAX_CHUNKS - 1} are valid)")
    group = np.repeat(np.arange(len(starts)), lengths)
    k = np.arange(c.size) - starts[group]
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    neg = (c[end_idx] & 0x10) != 0
    x[neg] |= np.left_shift(np.int64(-1), 5 * lengths[neg])
    counts = x.copy()
    counts[1::2] = np.cumsum(x[1::2])  # counts[i] = x[i] + counts[i-2] for i > 2
    if counts.size > 2:
        counts[2::2] = np.cumsum(x[2::2])
    return counts


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a binary mask [H, W] (bool, or numbers with nonzero = True).

    Returns {"size": [h, w], "counts": str}, counts byte-equal to
    `pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()`.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InputError(f"mask must be 2-D [H, W], got shape {arr.shape}")
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"mask must be bool or numeric, got dtype {arr.dtype}")
    h, w = arr.shape
    return {"size": [int(h), int(w)], "counts": _counts_to_string(mask_runs(arr != 0))}


def _check_size(rle: Mapping[str, Any]) -> tuple[int, int]:
    size = rle.get("size")
    ok = (isinstance(size, (list, tuple)) and len(size) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                  for v in size))
    if not ok:
        raise InputError(f"RLE 'size' must be [h, w] with two non-negative ints, got {size!r}")
    return int(size[0]), int(size[1])


def rle_counts(rle: Mapping[str, Any]) -> np.ndarray:
    """Run lengths int64 [R] of a COCO RLE (compressed string/bytes or uncompressed list)."""
    if not isinstance(rle, Mapping):
        raise InputError(f"RLE must be an object with 'size' and 'counts', got "
                         f"{type(rle).__name__}")
    if "counts" not in rle or "size" not in rle:
        raise InputError(f"RLE must be an object with 'size' and 'counts', got keys "
                         f"{sorted(rle)}")
    h, w = _check_size(rle)
    raw = rle["counts"]
    if isinstance(raw, (str, bytes)):
        counts = _string_to_counts(raw)
    elif isinstance(raw, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
            raise InputError("uncompressed RLE 'counts' must be a list of ints")
        counts = np.asarray(raw, np.int64).reshape(-1)
    else:
        raise InputError(f"RLE 'counts' must be a string or a list of ints, got "
                         f"{type(raw).__name__}")
    if counts.size and counts.min() < 0:
        raise InputError(f"corrupt RLE: negative run length {int(counts.min())}")
    total = int(counts.sum())
    if total != h * w:
        raise InputError(f"corrupt RLE: run lengths sum to {total}, expected h*w = {h}*{w} "
                         f"= {h * w}")
    return counts


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE into a bool mask [h, w] (row-major array)."""
    counts = rle_counts(rle)
    h, w = _check_size(rle)
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape((h, w), order="F"))


def rle_area(rle: Mapping[str, Any]) -> int:
    """Number of True pixels of a COCO RLE, without decoding it."""
    return int(rle_counts(rle)[1::2].sum())
