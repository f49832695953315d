"""onnxruntime-genai as a decode-loop peer (issue #6): the same decoder graph, driven by genai's
loop and by finers-rt's `DecodeLoop`, in one process, on the same text prompt, greedy.

genai (0.18) cannot load a stage's `decoder.onnx` as it is (bench/README.md, "onnxruntime-genai
peer"). `genai_model_dir` writes a genai model folder that keeps the decoder's nodes and weights
(the weights file is hard-linked, not copied) and adds only adapters at its edges:

* inputs: genai feeds `attention_mask [B, T]` int64; GroupQueryAttention's `seqlens_k [B]` int32
  (= mask sum - 1) and `total_sequence_length` int32 (= longest mask sum) are computed from it by
  5 nodes, as genai's own exported graphs do;
* output: the decoder's `logits [B, V]` (last position) become `[B, 1, V]` (one Unsqueeze);
  genai requires a rank-3 logits output;
* `embed.onnx`: `input_ids -> inputs_embeds`, one Gather over `embed_tokens.npy` (genai's
  `qwen2_5_vl` model type runs an embedding graph; its `image_features` input is declared, unused:
  only text prompts are compared);
* `vision.onnx` is linked because genai's `qwen2_5_vl` type requires one; a text prompt never runs it.

The model type `qwen2_5_vl` makes genai build the 3-D M-RoPE `position_ids [3, B, S]` itself.
K/V: `past_present_share_buffer` (genai keeps one `[B, KV, max_length, D]` buffer per pair, as
finers-rt does); `num_hidden_layers` is the decoder's number of K/V pairs (the pointer pair too).

`compare` measures, per side: prefill ms (embedding + decoder over the prompt) and decode ms per
decoder step (`max_new - 1` steps for `max_new` tokens on both sides), eos masked on both sides so
both always run `max_new` tokens; the tokens must be identical. ORT sessions on both sides: the
given intra-op threads, inter-op 1, ORT_ENABLE_ALL, CPU arena off (finers-rt's default).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finers_rt.decoding import DecodeLoop
from finers_rt.errors import InputError, ManifestError

CHAT_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{text}"
             "<|im_end|>\n<|im_start|>assistant\n")


def import_genai():
    """`onnxruntime_genai`, or an InputError saying how to install it (it is optional)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise InputError("the genai peer needs onnxruntime-genai (optional, not a finers-rt "
                         "dependency): pip install onnxruntime-genai --no-deps, or into a venv "
                         "made with --system-site-packages, so that onnxruntime stays as it is") from None
    return og


def _adapted_decoder(src: Path, dst: Path) -> None:
    """Write `dst`: the decoder graph of `src` with the genai input/output adapters (module doc).
    External weights stay where they are: `dst`'s folder gets links to `src`'s data files."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    names = {i.name for i in graph.input}
    if not {"seqlens_k", "total_sequence_length", "inputs_embeds"} <= names:
        raise ManifestError(f"{src}: the genai peer needs a kv_cache 'shared' decoder (GroupQueryAttention "
                            f"inputs seqlens_k / total_sequence_length), got inputs {sorted(names)}")
    logits = next(o for o in graph.output if o.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "logits_last"
    for name in ("seqlens_k", "total_sequence_length"):
        graph.input.remove(next(i for i in graph.input if i.name == name))
    graph.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]))
    graph.initializer.extend([helper.make_tensor("genai_axis_1", TensorProto.INT64, [1], [1]),
                              helper.make_tensor("genai_one", TensorProto.INT64, [], [1])])
    front = [
        helper.make_node("ReduceSum", ["attention_mask", "genai_axis_1"], ["genai_mask_len"], keepdims=0),
        helper.make_node("Sub", ["genai_mask_len", "genai_one"], ["genai_seqlens"]),
        helper.make_node("Cast", ["genai_seqlens"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("ReduceMax", ["genai_mask_len"], ["genai_total"], keepdims=0),
        helper.make_node("Cast", ["genai_total"], ["total_sequence_length"], to=TensorProto.INT32),
    ]
    for index, node in enumerate(front):
        graph.node.insert(index, node)
    graph.node.append(helper.make_node("Unsqueeze", ["logits_last", "genai_axis_1"], ["logits"]))
    graph.output.remove(logits)
    graph.output.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, vocab]))
    onnx.save(model, str(dst))
    for tensor in graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                _link_data(src.parent / entry.value, dst.parent / entry.value)


def _embedding_graph(table: np.ndarray, dst: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = table.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens", "input_ids"], ["inputs_embeds"], axis=0)], "embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["num_image_tokens", hidden])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [numpy_helper.from_array(np.ascontiguousarray(table, dtype=np.float32), "embed_tokens")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def _link_data(src: Path, dst: Path) -> None:
    """External data: a hard link (ORT refuses data files that resolve outside the model folder,
    so no symlink), a copy across file systems."""
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.link(src.resolve(), dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def _session_options(threads: int) -> dict[str, Any]:
    return {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1, "enable_cpu_mem_arena": False,
            "graph_optimization_level": "ORT_ENABLE_ALL", "log_id": "finers-rt-genai-peer", "provider_options": []}


def genai_model_dir(stage, out_dir: str | os.PathLike, threads: int = 1, max_length: int = 4096) -> Path:
    """Write a genai model folder for `stage` (a loaded `VlmStage`, kv_cache "shared") into
    `out_dir`: adapted decoder, embedding graph, linked vision graph, `genai_config.json`."""
    if stage.kv_cache != "shared":
        raise InputError(f"{stage.folder}: the genai peer needs a kv_cache 'shared' stage (export with "
                         f"--kv-cache shared), got '{stage.kv_cache}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphs = stage.manifest.graphs
    _adapted_decoder(stage.folder / graphs["decoder"].file, out / "decoder_genai.onnx")
    _embedding_graph(stage.embed_tokens, out / "embed.onnx")
    _link(stage.folder / graphs["vision"].file, out / "vision.onnx")
    text, special = stage.manifest.text, stage.manifest.special_tokens
    eos = [int(t) for t in special.eos_token_ids]
    pad = int(special.pad_token_id if special.pad_token_id is not None else eos[0])
    options = _session_options(threads)
    config = {
        "model": {
            "type": "qwen2_5_vl", "context_length": int(max_length), "vocab_size": int(text.vocab_size),
            "bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad,
            "image_token_id": int(special.image_token_id), "vision_start_token_id": int(special.vision_start_token_id),
            "decoder": {
                "filename": "decoder_genai.onnx", "head_size": int(text.head_dim), "hidden_size": int(text.hidden_size),
                "num_attention_heads": int(text.num_attention_heads),
                "num_key_value_heads": int(text.num_key_value_heads), "num_hidden_layers": int(stage.num_kv_pairs),
                "session_options": options,
                "inputs": {"inputs_embeds": "inputs_embeds", "position_ids": "position_ids",
                           "attention_mask": "attention_mask",
                           "past_key_names": "past_key_%d", "past_value_names": "past_value_%d"},
                "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                            "present_value_names": "present_value_%d"},
            },
            "embedding": {"filename": "embed.onnx", "session_options": options,
                          "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                          "outputs": {"inputs_embeds": "inputs_embeds"}},
            "vision": {"filename": "vision.onnx", "session_options": options,
                       "inputs": {"pixel_values": "pixel_values"}, "outputs": {"image_features": "image_embeds"}},
        },
        "search": {"do_sample": False, "max_length": int(max_length), "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    (out / "genai_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def text_prompt_ids(stage, text: str) -> np.ndarray:
    """The stage's chat template around `text` with no image: [n] int64."""
    return np.asarray(stage.tokenizer.encode(CHAT_TEXT.format(text=text)), dtype=np.int64)


class _EosMaskedLoop(DecodeLoop):
    """`DecodeLoop` with the eos logits at -inf (genai's `min_length` does the same), so both
    sides run exactly `max_new` tokens. Masks in place: the logits are the step's own array."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._eos_ids = np.array(sorted(self.eos), dtype=np.int64)
        self.eos = set()  # never stops on eos: it cannot be picked

    def pick(self, logits: np.ndarray) -> np.ndarray:
        logits[:, self._eos_ids] = -np.inf
        return super().pick(logits)


def run_ours(stage, ids: np.ndarray, max_new: int, mask_eos: bool, keep_logits: bool = False) -> dict[str, Any]:
    """finers-rt: prefill (`VlmStage.forward`, chunked like `generate`) then `DecodeLoop`, greedy."""
    from finers_rt.mrope import sequential_positions

    buffer = stage._buffer_for(1, ids.size + max_new)
    start = time.perf_counter()
    logits = stage.forward(stage.embed(ids)[None], sequential_positions(0, ids.size, 0, 1), buffer)
    prefill_ms = (time.perf_counter() - start) * 1000.0
    first_logits = np.array(logits[0]) if keep_logits else None
    loop_cls = _EosMaskedLoop if mask_eos else DecodeLoop
    loop = loop_cls(stage, buffer, ids, 0, None, 0.0, 1.0, None)
    session_before = stage.decode_session_ms
    start = time.perf_counter()
    tokens, _ = loop.run(logits, max_new)
    decode_ms = (time.perf_counter() - start) * 1000.0
    side = _side(tokens[0], prefill_ms, decode_ms, first_logits)
    # decoder session time alone (ORT run through the IO binding), the rest is the Python loop
    side["session_ms_per_token"] = (stage.decode_session_ms - session_before) / max(len(tokens[0]) - 1, 1)
    return side


def run_genai(og, model, ids: np.ndarray, max_new: int, mask_eos: bool, keep_logits: bool = False) -> dict[str, Any]:
    """genai: `append_tokens(prompt)` (prefill) then `generate_next_token` per token, greedy."""
    params = og.GeneratorParams(model)
    total = int(ids.size + max_new)
    params.set_search_options(max_length=total, min_length=total if mask_eos else 0, do_sample=False,
                              top_k=1, num_beams=1, repetition_penalty=1.0)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids.astype(np.int32)[None])
    prefill_ms = (time.perf_counter() - start) * 1000.0
    first_logits = np.array(generator.get_logits()).reshape(-1) if keep_logits else None
    tokens: list[int] = []
    start = time.perf_counter()
    while len(tokens) < max_new and not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    decode_ms = (time.perf_counter() - start) * 1000.0
    del generator
    return _side(tokens, prefill_ms, decode_ms, first_logits)


def _side(tokens: list[int], prefill_ms: float, decode_ms: float, first_logits=None) -> dict[str, Any]:
    steps = max(len(tokens) - 1, 1)  # the first token comes from the prefill logits
    return {"tokens": [int(t) for t in tokens], "prefill_ms": prefill_ms, "decode_ms": decode_ms,
            "decode_ms_per_token": decode_ms / steps, "first_logits": first_logits}


def compare(stage_dir: str | os.PathLike, text: str = "Where is the small red square? Answer briefly.",
            max_new_tokens: int = 32, iters: int = 5, warmup: int = 1, threads: int = 1,
            work_dir: str | os.PathLike | None = None, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """genai against finers-rt on the decoder of the VLM stage folder `stage_dir` (module doc).
    Runs are interleaved (ours, genai, ours, ...). Returns a JSON-able record: per-side timings
    (p50 / all), both token lists of a natural run (eos on) and of the timed runs, `tokens_equal`."""
    from finers_rt.bench import environment, summarize
    from finers_rt.config import BackendOptions
    from finers_rt.vlm import VlmStage

    og = import_genai()
    env = environment(threads)
    env["onnxruntime_genai"] = getattr(og, "__version__", "?")
    stage = VlmStage.load(stage_dir, BackendOptions(intra_op_threads=threads, inter_op_threads=1))
    ids = text_prompt_ids(stage, text)
    temp = None
    if work_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="finers-genai-")
        work_dir = temp.name
    try:
        folder = genai_model_dir(stage, work_dir, threads=threads, max_length=int(ids.size + max_new_tokens))
        model = og.Model(str(folder))
        first = {"finers_rt": run_ours(stage, ids, max_new_tokens, mask_eos=False, keep_logits=True),
                 "genai": run_genai(og, model, ids, max_new_tokens, mask_eos=False, keep_logits=True)}
        natural = {name: side["tokens"] for name, side in first.items()}
        logits_diff = float(np.abs(first["finers_rt"]["first_logits"] - first["genai"]["first_logits"]).max())
        runs: dict[str, list] = {"finers_rt": [], "genai": []}
        for i in range(warmup + iters):
            for name, run in (("finers_rt", lambda: run_ours(stage, ids, max_new_tokens, True)),
                              ("genai", lambda: run_genai(og, model, ids, max_new_tokens, True))):
                side = run()
                if i >= warmup:
                    runs[name].append(side)
            log(f"iter {i + 1}/{warmup + iters}: " + ", ".join(
                f"{n} {runs[n][-1]['decode_ms_per_token']:.3f} ms/token" for n in runs if runs[n] and i >= warmup))
    finally:
        if temp is not None:
            temp.cleanup()
    timed_tokens = {name: runs[name][0]["tokens"] for name in runs}
    sides = {}
    for name, items in runs.items():
        keys = [k for k in ("prefill_ms", "decode_ms_per_token", "session_ms_per_token") if k in items[0]]
        sides[name] = {key: summarize([r[key] for r in items]) for key in keys}
        sides[name]["tokens_per_run"] = len(items[0]["tokens"])
        sides[name]["all_runs_same_tokens"] = all(r["tokens"] == items[0]["tokens"] for r in items)
    ours, theirs = sides["finers_rt"], sides["genai"]
    env["load_average_end"] = list(os.getloadavg())
    return {
        "kind": "genai-peer", "stage": str(Path(stage_dir)), "role": stage.manifest.role,
        "text": text, "prompt_tokens": int(ids.size), "max_new_tokens": int(max_new_tokens),
        "iters": int(iters), "warmup": int(warmup), "threads": int(threads),
        "decoder_kv_pairs": int(stage.num_kv_pairs), "hidden_size": int(stage.manifest.text.hidden_size),
        "num_layers": int(stage.manifest.text.num_hidden_layers), "vocab_size": int(stage.manifest.text.vocab_size),
        "sides": sides,
        "prefill_logits_max_abs_diff": logits_diff,
        "tokens_equal": natural["finers_rt"] == natural["genai"] and timed_tokens["finers_rt"] == timed_tokens["genai"],
        "natural_tokens": natural, "timed_tokens": timed_tokens,
        "decode_speedup_vs_genai": theirs["decode_ms_per_token"]["p50"] / ours["decode_ms_per_token"]["p50"],
        "prefill_speedup_vs_genai": theirs["prefill_ms"]["p50"] / ours["prefill_ms"]["p50"],
        "environment": env,
    }


def command_line(stage_dir: str, max_new_tokens: int, iters: int, warmup: int, threads: int,
                 json_out: str | None) -> str:
    parts = ["finers-rt", "bench", "--peer", "genai", "--peer-stage", str(stage_dir), "--max-new-tokens",
             str(max_new_tokens), "--iters", str(iters), "--warmup", str(warmup), "--threads", str(threads)]
    if json_out:
        parts += ["--json", json_out]
    return " ".join(parts)
