"""The VLM stage runner: vision encode, prefill, decode, generate (numpy + a backend, no torch).

One `VlmStage` is one exported Qwen2.5-VL stage folder (docs/bundle-format.md). `generate`:

1. image -> FineRS stage resize -> Qwen2.5-VL patches -> `vision` graph -> `image_embeds`;
2. prefix (system + user turn through `<|vision_end|>`, image rows = `image_embeds`) prefilled
   into a preallocated `KVBuffer`; steps 1-2 are skipped on a `PrefixCache` hit;
3. question (`TEXT + after_text`) prefilled on top, then greedy (or sampled) decoding one token
   per `decoder` call, with HF's repetition penalty over all ids so far, until an eos id, the
   stop string or `max_new_tokens`.

The prefix and the question are always prefilled as two chunks, so results are bit-identical
with the prefix cache on or off.

Decoder contracts (manifest `kv_cache`, docs/bundle-format.md): "shared" stages keep a head-major
buffer that the graph reads and writes in place through persistent ORT IO bindings (one per
(rows, seq) shape; a decode step only writes the token's embedding row, position and lengths into
the binding's arrays); "concat" stages (format-1 bundles) feed buffer views and copy the new K/V.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from finers_rt.backends import create_backend
from finers_rt.config import BackendOptions
from finers_rt.decoding import DecodeLoop
from finers_rt.errors import ArtifactError, EngineProfileError, InputError, ManifestError
from finers_rt.image import ImageSource, VisionPreprocessConfig, load_image, preprocess_image, resize_for_stage
from finers_rt.kvcache import KVBuffer, PrefixCache, PrefixEntry, image_digest
from finers_rt.manifest import VlmStageManifest, check_session_matches, verify_files
from finers_rt.mrope import compute_rope_index, sequential_positions
from finers_rt.tokenizer import StageTokenizer

_MASKED = np.finfo(np.float32).min


# longest prefill chunk the "shared" decoder is run with at batch 1 (see VlmStage._forward_shared)
PREFILL_CHUNK = 256


@dataclass(frozen=True)
class GenerationResult:
    """`token_ids`: generated ids (eos included when it stopped on one); `text`: decoded with
    special tokens skipped; `stop_reason`: "eos" | "stop_string" | "max_new_tokens";
    `timings_ms`: per phase; `cache_hit`: the prefix came from the PrefixCache."""

    token_ids: list[int]
    text: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    stop_reason: str = "max_new_tokens"


@dataclass(frozen=True)
class _Prefix:
    entry: PrefixEntry
    prefix_ids: np.ndarray
    hit: bool
    timings_ms: dict[str, float]


class VlmStage:
    """A loaded VLM stage folder. `generate` is serialised by a lock (one KV buffer per stage)."""

    def __init__(self, folder: Path, manifest: VlmStageManifest, vision, decoder, embed_tokens: np.ndarray,
                 tokenizer: StageTokenizer, prefix_cache: PrefixCache | None = None, name: str | None = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.vision = vision
        self.decoder = decoder
        self.embed_tokens = np.asarray(embed_tokens)  # [V, H] float32, a plain view of the memory map
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.name = name or f"{manifest.role}:{manifest.graphs['decoder'].sha256[:16] or self.folder}"
        self.preprocess = VisionPreprocessConfig.from_spec(manifest.image)
        self.num_kv_pairs = decoder_kv_pairs(manifest)
        self.kv_cache = manifest.kv_cache
        if self.kv_cache == "shared" and not hasattr(decoder, "shared_kv_binding"):
            raise EngineProfileError(f"{folder}: this stage's decoder (kv_cache 'shared') reads and writes its K/V "
                                     "buffer in place through ONNX Runtime IO binding; use the ort backend "
                                     "or re-export the stage with --kv-cache concat")
        self._bindings: dict[tuple, tuple] = {}  # "shared" decoder: (buffer, binding) per (row, rows, seq)
        # decoder session time of "shared" decode steps (seq 1), summed; the loop's Python overhead
        # is decode time minus this (the bench reads it: these steps bypass `decoder.run`)
        self.decode_session_ms = 0.0
        self._lock = threading.Lock()
        self._buffer: KVBuffer | None = None
        # Opt-in ORT IO binding for batch-1 steps: K/V bound by pointer into the buffer. Measured on
        # CPU it is not faster than plain `run` (bench numbers in the runtime report), so it is off.
        self.io_binding = False
        tokenizer.check_split_matches_whole(manifest.image.num_image_tokens, "Is the split stable? <answer>")
        self.prefix_ids = tokenizer.build_prompt(manifest.image.num_image_tokens, "").prefix_ids  # [P] int64
        if tokenizer.image_token_id != manifest.special_tokens.image_token_id:
            raise ManifestError(f"{folder}: tokenizer id of {manifest.chat.image_token} is "
                                f"{tokenizer.image_token_id}, manifest says {manifest.special_tokens.image_token_id}")

    @classmethod
    def load(cls, stage_dir: str | os.PathLike, backend_options: BackendOptions | None = None,
             prefix_cache: PrefixCache | None = None, name: str | None = None) -> "VlmStage":
        """Read `manifest.json`, open both graphs, check them against the manifest, mmap the
        embedding matrix and load the tokenizer. Raises ManifestError / ArtifactError /
        EngineProfileError on any mismatch."""
        folder = Path(stage_dir)
        manifest = VlmStageManifest.load(folder)
        verify_files(folder, {"vision graph": manifest.graphs["vision"], "decoder graph": manifest.graphs["decoder"],
                              "embeddings": manifest.embeddings, "tokenizer": manifest.tokenizer})
        backends = {}
        for graph in ("vision", "decoder"):
            backends[graph] = create_backend(folder / manifest.graphs[graph].file, backend_options)
            check_session_matches(manifest.graphs[graph], backends[graph], where=f"{folder}/{graph}")
        embed_tokens = _load_embeddings(folder, manifest)
        tokenizer = StageTokenizer.load(folder / manifest.tokenizer.file, manifest.chat)
        return cls(folder, manifest, backends["vision"], backends["decoder"], embed_tokens, tokenizer,
                   prefix_cache, name)

    # ---- vision + prefix ------------------------------------------------------------------------

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 RGB (any size) -> `image_embeds [num_image_tokens, hidden]` float32."""
        spec = self.manifest.image
        stage_image = resize_for_stage(image, spec.stage_size_wh)
        pixel_values, grid_thw = preprocess_image(stage_image, self.preprocess)
        if tuple(grid_thw) != tuple(spec.grid_thw):
            raise ArtifactError(f"stage image gives grid {grid_thw}, the vision graph was exported for "
                                f"{tuple(spec.grid_thw)}")
        embeds = self.vision.run({"pixel_values": pixel_values})["image_embeds"]
        expected = (spec.num_image_tokens, self.manifest.text.hidden_size)
        if embeds.shape != expected:
            raise ArtifactError(f"vision graph returned {embeds.shape}, expected {expected}")
        return embeds

    def _prefix(self, image: np.ndarray, buffer: KVBuffer, keep_kv: bool) -> _Prefix:
        """Fill `buffer` (batch 1) with the prefix K/V, from the cache or by running vision + prefill.
        The returned entry owns a copy of the K/V when it is cached or `keep_kv` is set."""
        spec = self.manifest.image
        prefix_ids = self.prefix_ids
        key = None
        if self.prefix_cache is not None:
            key = PrefixCache.make_key(self.name, image_digest(image), spec.stage_size_wh)
            entry = self.prefix_cache.get(key)
            if entry is not None and entry.prefix_length == prefix_ids.size:
                start = time.perf_counter()
                buffer.load_prefix(entry.keys, entry.values)
                return _Prefix(entry, prefix_ids, True, {"prefix_load": _ms(start)})
        start = time.perf_counter()
        image_embeds = self.encode_image(image)
        vision_ms = _ms(start)
        start = time.perf_counter()
        embeds = self.embed(prefix_ids)
        embeds[prefix_ids == self.manifest.special_tokens.image_token_id] = image_embeds
        st = self.manifest.special_tokens
        positions, rope_delta = compute_rope_index(
            prefix_ids, [spec.grid_thw], image_token_id=st.image_token_id,
            vision_start_token_id=st.vision_start_token_id, spatial_merge_size=spec.merge_size)
        buffer.reset()
        self.forward(embeds[None], positions[:, None], buffer)
        keys, values = buffer.copy_prefix(prefix_ids.size) if keep_kv or key is not None else ((), ())
        entry = PrefixEntry(keys, values, int(prefix_ids.size), int(rope_delta), image_embeds)
        if key is not None:
            self.prefix_cache.put(key, entry)
        return _Prefix(entry, prefix_ids, False, {"vision": vision_ms, "prefix_prefill": _ms(start)})

    # ---- decoder ------------------------------------------------------------------------------

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """[n] int -> [n, hidden] float32 (a writable copy of the embedding rows)."""
        return np.array(self.embed_tokens[np.asarray(token_ids, dtype=np.int64)], dtype=np.float32)

    def forward(self, embeds: np.ndarray, positions: np.ndarray, buffer: KVBuffer) -> np.ndarray:
        """Run the decoder on `embeds [B, S, H]` at `positions [3, B, S]` after the `buffer.length`
        cached positions; writes the new K/V into the buffer. Returns `logits [B, V]` (last position)."""
        batch, seq = embeds.shape[:2]
        past = buffer.length
        if self.kv_cache == "shared":
            return self._forward_shared(embeds, positions, buffer)
        feeds = {"inputs_embeds": embeds, "position_ids": positions,
                 "attention_mask": causal_mask(batch, seq, past)}
        if batch == 1 and self.io_binding:
            return self._forward_bound(feeds, buffer, past, seq)
        for layer, (keys, values) in enumerate(buffer.past_views(past)):
            feeds[f"past_key_{layer}"] = keys
            feeds[f"past_value_{layer}"] = values
        outputs = self.decoder.run(feeds)
        for layer in range(len(buffer.keys)):
            buffer.write(layer, past, outputs[f"new_key_{layer}"], outputs[f"new_value_{layer}"])
        return outputs["logits"]

    def _forward_bound(self, feeds: dict[str, np.ndarray], buffer: KVBuffer, past: int, seq: int) -> np.ndarray:
        """`forward` for batch 1 with ORT IO binding: past K/V are bound by pointer to the buffer's
        first `past` positions and new K/V are written by the graph straight into `[past, past+seq)`."""
        binding = self.decoder.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        stride = buffer.position_nbytes
        past_shape, new_shape = [1, past] + buffer.head_shape, [1, seq] + buffer.head_shape
        for layer, (key_ptr, value_ptr) in enumerate(buffer.data_pointers):
            for kind, ptr in (("key", key_ptr), ("value", value_ptr)):
                binding.bind_input(f"past_{kind}_{layer}", "cpu", 0, np.float32, past_shape, ptr)
                binding.bind_output(f"new_{kind}_{layer}", "cpu", 0, np.float32, new_shape, ptr + past * stride)
        binding.bind_output("logits", "cpu")
        buffer.claim(past, seq)
        self.decoder.run_with_binding(binding)
        return np.array(binding.get_outputs()[-1].numpy())  # own the logits beyond the binding's life

    def _forward_shared(self, embeds: np.ndarray, positions: np.ndarray, buffer: KVBuffer) -> np.ndarray:
        """`forward` for the "shared" decoder: the graph reads positions `[0, past)` of the buffer and
        writes the new K/V at `[past, past+seq)` in place (past and present bound to the same memory).
        ORT's GroupQueryAttention runs a chunk with past > 0 and seq > 1 for one row at a time. A
        long batch-1 prefill runs in chunks of `PREFILL_CHUNK` tokens (same results; ORT's CPU
        attention has no causal skipping, so chunks do about half the work in cache-sized pieces:
        a 2,700-token prefix 128 -> 40 ms)."""
        batch, seq = embeds.shape[:2]
        if batch == 1 and seq > PREFILL_CHUNK:
            for start in range(0, seq, PREFILL_CHUNK):
                stop = start + PREFILL_CHUNK
                logits = self._forward_shared(embeds[:, start:stop], positions[:, :, start:stop], buffer)
            return logits
        past = buffer.length
        buffer.claim(past, seq)  # checks the range first
        row_groups = [(row, 1) for row in range(batch)] if seq > 1 and past > 0 and batch > 1 else [(0, batch)]
        logits = []
        for row, rows in row_groups:
            binding = self._binding(buffer, row, rows, seq)
            binding.embeds[...] = embeds[row:row + rows]
            binding.positions[...] = positions[:, row:row + rows]
            binding.seqlens[...] = past + seq - 1
            binding.total[...] = past + seq
            binding.run()
            logits.append(binding.logits if rows == batch else binding.logits.copy())
        return logits[0].copy() if len(logits) == 1 else np.concatenate(logits)

    def decode_stepper(self, buffer: KVBuffer, rope_delta: int):
        """One decode step per call, bound to `buffer`: a function `token_ids [B] int64 -> logits
        [B, V]` that appends the tokens at `buffer.length` (M-RoPE position `length + rope_delta`).
        For a "shared" decoder everything per step is prepared once (the decode loop calls it per
        token), the returned logits are the binding's own array, valid until the next call, and
        the session time is added to `decode_session_ms`."""
        if self.kv_cache != "shared":
            def step_concat(token_ids: np.ndarray) -> np.ndarray:
                position = sequential_positions(buffer.length, 1, rope_delta, buffer.batch)
                return self.forward(self.embed(token_ids)[:, None], position, buffer)
            return step_concat
        binding = self._binding(buffer, 0, buffer.batch, 1)
        table, embeds, run, clock = self.embed_tokens, binding.embeds[:, 0], binding.run, time.perf_counter
        positions, seqlens, total, logits = binding.positions, binding.seqlens, binding.total, binding.logits

        def step_shared(token_ids: np.ndarray) -> np.ndarray:
            past = buffer.length
            buffer.claim(past, 1)  # checks the range
            np.take(table, token_ids, axis=0, out=embeds)
            positions.fill(past + rope_delta)
            seqlens.fill(past)
            total.fill(past + 1)
            start = clock()
            run()
            self.decode_session_ms += (clock() - start) * 1000.0
            return logits
        return step_shared

    def _binding(self, buffer: KVBuffer, row: int, rows: int, seq: int):
        """The backend's persistent binding of rows `[row, row+rows)` of `buffer` for `seq` new tokens."""
        key = (row, rows, seq)
        found = self._bindings.get(key)
        if found is None or found[0] is not buffer:
            if len(self._bindings) > 16:
                self._bindings.clear()
            pairs = [(k[row:row + rows], v[row:row + rows]) for k, v in zip(buffer.keys, buffer.values)]
            binding = self.decoder.shared_kv_binding(pairs, seq, self.manifest.text.hidden_size,
                                                     self.manifest.text.vocab_size)
            found = self._bindings[key] = (buffer, binding)
        return found[1]

    def _buffer_for(self, batch: int, max_len: int) -> KVBuffer:
        text = self.manifest.text
        if self._buffer is None or self._buffer.batch != batch or self._buffer.max_len < max_len:
            self._buffer = None  # free the old one first
            self._bindings.clear()
            self._buffer = KVBuffer(self.num_kv_pairs, batch, max_len, text.num_key_value_heads,
                                    text.head_dim, layout="bnsh" if self.kv_cache == "shared" else "bsnd")
        self._buffer.reset()
        return self._buffer

    # ---- generate -----------------------------------------------------------------------------

    def generate(self, image: ImageSource, text: str, max_new_tokens: int | None = None,
                 stop_at: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> GenerationResult:
        """Answer `text` about `image` (path or [H, W, 3] uint8 RGB). Greedy when temperature is 0."""
        return self.generate_batch([image], text, max_new_tokens, stop_at, temperature, top_p, seed)[0]

    def generate_batch(self, images: Sequence[ImageSource], text: str, max_new_tokens: int | None = None,
                       stop_at: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None) -> list[GenerationResult]:
        """`generate` for several images with the same `text` (same prompt length, no padding):
        prefixes are built one by one (or taken from the cache), then the question prefill and
        the decode steps run batched. Row i equals `generate(images[i], text)` when greedy."""
        if not images:
            raise InputError("generate_batch needs at least one image")
        max_new = _check_decoding(self.manifest.generation.max_new_tokens if max_new_tokens is None
                                  else max_new_tokens, temperature, top_p)
        start_total = time.perf_counter()
        arrays = [load_image(image) for image in images]
        question_ids = self.tokenizer.build_prompt(0, text).question_ids
        with self._lock:
            prefixes, buffer = self._prefill_prefixes(arrays, question_ids.size + max_new)
            entry = prefixes[0].entry
            prompt_ids = np.concatenate([prefixes[0].prefix_ids, question_ids])
            batch = len(arrays)
            start = time.perf_counter()
            embeds = np.broadcast_to(self.embed(question_ids), (batch,) + (question_ids.size, entry.image_embeds.shape[1]))
            positions = sequential_positions(entry.prefix_length, question_ids.size, entry.rope_delta, batch)
            logits = self.forward(np.ascontiguousarray(embeds), positions, buffer)
            prefill_ms = _ms(start)
            start = time.perf_counter()
            decoder = DecodeLoop(self, buffer, prompt_ids, entry.rope_delta, stop_at, temperature, top_p, seed)
            tokens, reasons = decoder.run(logits, max_new)
            decode_ms = _ms(start)
        total_ms = _ms(start_total)
        results = []
        for row, prefix in enumerate(prefixes):
            timings = {"vision": 0.0, "prefix_prefill": 0.0, **prefix.timings_ms, "question_prefill": prefill_ms,
                       "decode": decode_ms, "tokens": float(len(tokens[row])),
                       "tok_per_s": 1000.0 * sum(map(len, tokens)) / decode_ms if decode_ms > 0 else 0.0,
                       "total": total_ms}
            results.append(GenerationResult(tokens[row], self.tokenizer.decode(tokens[row]), timings,
                                            prefix.hit, reasons[row]))
        return results

    def _prefill_prefixes(self, images: list[np.ndarray], extra_len: int) -> tuple[list[_Prefix], KVBuffer]:
        """Build every image's prefix (batch 1), then a batch buffer holding all of them."""
        prefix_len = self.prefix_ids.size
        single = self._buffer_for(1, prefix_len + extra_len)
        if len(images) == 1:
            return [self._prefix(images[0], single, keep_kv=False)], single
        prefixes = [self._prefix(image, single, keep_kv=True) for image in images]
        self._buffer = None
        buffer = self._buffer_for(len(images), prefix_len + extra_len)
        pairs = range(len(buffer.keys))
        buffer.load_prefix([np.concatenate([p.entry.keys[i] for p in prefixes]) for i in pairs],
                           [np.concatenate([p.entry.values[i] for p in prefixes]) for i in pairs])
        return prefixes, buffer


def causal_mask(batch: int, seq: int, past: int) -> np.ndarray:
    """Additive attention mask `[batch, 1, seq, past + seq]` float32: new token j sees positions
    `<= past + j` (0.0), later ones are `finfo(float32).min`."""
    if seq == 1:  # a decode step sees everything
        return np.zeros((batch, 1, 1, past + 1), dtype=np.float32)
    columns = np.arange(past + seq)
    rows = past + np.arange(seq)
    mask = np.where(columns[None, :] <= rows[:, None], np.float32(0.0), _MASKED).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(mask, (batch, 1, seq, past + seq)))


def decoder_kv_pairs(manifest: VlmStageManifest) -> int:
    """Number of K/V pairs the decoder graph takes (its `past_key_i` inputs): `num_hidden_layers`
    for a stock model, more when the exported model caches extra tensors of the same shape."""
    names = {spec.name for spec in manifest.graphs["decoder"].inputs}
    pairs = 0
    while f"past_key_{pairs}" in names and f"past_value_{pairs}" in names:
        pairs += 1
    if pairs == 0 or any(n.startswith(("past_key_", "past_value_")) for n in names
                         if n not in {f"past_{kind}_{i}" for kind in ("key", "value") for i in range(pairs)}):
        raise ManifestError(f"decoder graph inputs must be past_key_0..N-1 / past_value_0..N-1, got {sorted(names)}")
    return pairs


def _load_embeddings(folder: Path, manifest: VlmStageManifest) -> np.ndarray:
    spec = manifest.embeddings
    try:
        table = np.load(folder / spec.file, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder / spec.file}: not a readable .npy file ({exc})") from None
    expected = (manifest.text.vocab_size, manifest.text.hidden_size)
    if table.shape != expected or tuple(table.shape) != tuple(spec.shape) or table.dtype != np.dtype(spec.dtype):
        raise ManifestError(f"{folder / spec.file}: embeddings are {table.dtype}{list(table.shape)}, manifest "
                            f"says {spec.dtype}{list(spec.shape)} and text config {list(expected)}")
    return table


def _check_decoding(max_new_tokens: int, temperature: float, top_p: float) -> int:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    return int(max_new_tokens)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
