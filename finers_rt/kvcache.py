"""KV cache for the decoder graph and a byte-bounded LRU cache of image prefixes.

Layout follows the decoder graph contract (docs/bundle-format.md). `KVBuffer` preallocates one
key and one value array per K/V pair, once:
- layout "bsnd" (kv_cache "concat"): sequence-major `[batch, max_len, KV, D]`; for batch 1 the
  first `length` positions are one contiguous block, so the `past_*` feeds are zero-copy views and
  new K/V are written in place by index (no growing concatenation per token);
- layout "bnsh" (kv_cache "shared"): head-major `[batch, KV, max_len, D]`, the whole array bound
  as the graph's past AND present tensor; the graph writes positions `[length, length + n)`.

`PrefixCache` keeps, per (stage, image content, stage size), the K/V of the prompt prefix up to and
including `<|vision_end|>` plus the image embeddings, so a second question on the same image (or
the same crop) skips the vision encoder and the image prefill.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from finers_rt.errors import InputError


LAYOUTS = ("bsnd", "bnsh")


class KVBuffer:
    """Preallocated K/V per pair (layer): `keys[i]`, `values[i]` are `[batch, max_len, KV, D]`
    (layout "bsnd") or `[batch, KV, max_len, D]` (layout "bnsh") float32."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: np.dtype = np.float32, layout: str = "bsnd"):
        if min(num_layers, batch, max_len, num_kv_heads, head_dim) < 1:
            raise InputError(f"KVBuffer sizes must be positive, got layers={num_layers} batch={batch} "
                             f"max_len={max_len} kv_heads={num_kv_heads} head_dim={head_dim}")
        if layout not in LAYOUTS:
            raise InputError(f"KVBuffer layout must be one of {list(LAYOUTS)}, got '{layout}'")
        self.layout = layout
        self.seq_axis = 1 if layout == "bsnd" else 2
        shape = ((batch, max_len, num_kv_heads, head_dim) if layout == "bsnd"
                 else (batch, num_kv_heads, max_len, head_dim))
        self.keys = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.length = 0  # number of filled positions (the same for every layer)
        # base addresses of each layer's K and V, for binding graph inputs/outputs by pointer
        self.data_pointers = [(k.ctypes.data, v.ctypes.data) for k, v in zip(self.keys, self.values)]
        self.head_shape = [num_kv_heads, head_dim]
        self.position_nbytes = num_kv_heads * head_dim * np.dtype(dtype).itemsize  # one position, one row

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[self.seq_axis]

    def _span(self, start: int, stop: int) -> tuple:
        """Index of positions [start, stop) on the sequence axis."""
        return (slice(None),) * self.seq_axis + (slice(start, stop),)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def past_views(self, length: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (K, V) views `[batch, length, KV, D]` of the first `length` positions
        (default: the filled length). Contiguous and zero-copy for batch 1."""
        length = self.length if length is None else int(length)
        if not 0 <= length <= self.max_len:
            raise InputError(f"past length {length} outside 0..{self.max_len}")
        span = self._span(0, length)
        return [(k[span], v[span]) for k, v in zip(self.keys, self.values)]

    def slot_views(self, start: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (K, V) views of positions `[start, start+count)`: where the decoder's new K/V
        for those positions belong (used to bind graph outputs straight into the buffer)."""
        self._check_range(start, count)
        span = self._span(start, start + count)
        return [(k[span], v[span]) for k, v in zip(self.keys, self.values)]

    def write(self, layer: int, start: int, new_k: np.ndarray, new_v: np.ndarray) -> None:
        """Copy `new_k`, `new_v` (`[batch, n, KV, D]`, or `[batch, KV, n, D]` for "bnsh") into layer
        `layer` at positions `[start, start+n)` and extend the filled length to at least `start + n`."""
        count = new_k.shape[self.seq_axis]
        self._check_range(start, count)
        span = self._span(start, start + count)
        expected = self.keys[layer][span].shape
        if new_k.shape != expected or new_v.shape != expected:
            raise InputError(f"new K/V must be {list(expected)}, got {list(new_k.shape)} / "
                             f"{list(new_v.shape)}")
        self.keys[layer][span] = new_k
        self.values[layer][span] = new_v
        self.length = max(self.length, start + count)

    def claim(self, start: int, count: int) -> None:
        """Mark positions `[start, start+count)` as filled by a writer that bypasses `write` (a graph
        writing into `slot_views` / `data_pointers`): any batch for "bnsh" (the graph gets the whole
        buffer), batch 1 only for "bsnd", where positions are contiguous."""
        if self.batch != 1 and self.layout == "bsnd":
            raise InputError(f"claim() writes by pointer and needs batch 1, buffer has batch {self.batch}")
        self._check_range(start, count)
        self.length = max(self.length, start + count)

    def load_prefix(self, keys: Sequence[np.ndarray], values: Sequence[np.ndarray]) -> None:
        """Fill positions `[0, P)` of every layer from per-layer `[1 or batch, P, KV, D]` arrays
        (`[1 or batch, KV, P, D]` for "bnsh"; a batch-1 prefix is broadcast to every row) and set
        the length to P."""
        if len(keys) != len(self.keys) or len(values) != len(self.values):
            raise InputError(f"prefix has {len(keys)} layers, buffer has {len(self.keys)}")
        length = keys[0].shape[self.seq_axis]
        self._check_range(0, length)
        span = self._span(0, length)
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.keys[layer][span] = k
            self.values[layer][span] = v
        self.length = length

    def copy_prefix(self, length: int, row: int = 0) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Owned copies `[1, length, KV, D]` (`[1, KV, length, D]` for "bnsh") of the first `length`
        positions of batch row `row`."""
        self._check_range(0, length)
        span = (slice(row, row + 1),) + self._span(0, length)[1:]
        keys = tuple(k[span].copy() for k in self.keys)  # owned, C-contiguous
        values = tuple(v[span].copy() for v in self.values)
        return keys, values

    def reset(self) -> None:
        """Forget the contents (the memory is kept and overwritten by the next writes)."""
        self.length = 0

    def _check_range(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.max_len:
            raise InputError(f"KV positions [{start}, {start + count}) exceed the buffer of "
                             f"{self.max_len} positions; lower max_new_tokens or raise max_len")


def image_digest(image: np.ndarray) -> str:
    """Content hash of an image array (shape, dtype and bytes): blake2b-128 hex."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.shape}|{image.dtype}".encode())
    digest.update(memoryview(np.ascontiguousarray(image)).cast("B"))
    return digest.hexdigest()


@dataclass(frozen=True)
class PrefixEntry:
    """A cached prompt prefix: per-layer K/V `[1, prefix_length, KV, D]` float32 (`[1, KV,
    prefix_length, D]` for a "bnsh" stage; positions up to
    and including `<|vision_end|>`), the M-RoPE `rope_delta` of the prefix, and
    `image_embeds [num_image_tokens, hidden]` float32."""

    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]
    prefix_length: int
    rope_delta: int
    image_embeds: np.ndarray

    @property
    def nbytes(self) -> int:
        return (sum(k.nbytes for k in self.keys) + sum(v.nbytes for v in self.values)
                + self.image_embeds.nbytes)


class PrefixCache:
    """Thread-safe LRU of `PrefixEntry`, bounded by total bytes.

    Keys are `(stage name, image digest, stage size_wh)` (see `make_key`). An entry larger than
    `max_bytes` is not stored. `hits`, `misses` and `evictions` count lookups and removals.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        if max_bytes < 0:
            raise InputError(f"PrefixCache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def make_key(stage: str, digest: str, stage_size_wh: Sequence[int]) -> tuple:
        return (str(stage), str(digest), (int(stage_size_wh[0]), int(stage_size_wh[1])))

    def get(self, key: Hashable) -> PrefixEntry | None:
        """The entry for `key` (now most recently used) or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: Hashable, entry: PrefixEntry) -> bool:
        """Store `entry`, evicting least recently used entries to stay within `max_bytes`.
        Returns False (and stores nothing) when the entry alone exceeds the budget."""
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            if size > self.max_bytes:
                return False
            while self._entries and self._nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self._nbytes += size
            return True

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._nbytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
