"""`finers-rt export vlm`: a Qwen2.5-VL checkpoint -> a validated VLM stage folder.

Steps: load the HF reference; fix the image grid from the stage size (PIL bilinear to the stage
size, then the processor's smart_resize); trace the vision tower at that grid and the decoder
step; write `embed_tokens.npy` and `tokenizer.json`; optionally quantize the decoder; validate
every graph against torch on a real FineRS chat prompt; write `manifest.json`. Everything is
written into a temporary folder beside OUT_DIR that is renamed only after validation passed.
"""

from __future__ import annotations

import json
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from PIL import Image

from finers_rt import __version__
from finers_rt.config import PipelineConfig
from finers_rt.errors import ArtifactError, ExportParityError, InputError, suggest
from finers_rt.export import validate
from finers_rt.export.checkpoints import load_reference
from finers_rt.export.decoder_graph import KV_CACHES, export_decoder
from finers_rt.export.graph_files import (consolidate_external_data, dedupe_constants, graph_spec,
                                          store_exact_fp16)
from finers_rt.export.pointer import decoder_step_for
from finers_rt.export.quantize import QUANTIZATIONS, quantize_decoder
from finers_rt.export.staging import check_out_dir, staged_folder
from finers_rt.export.vision_graph import export_vision
from finers_rt.manifest import (ArraySpec, ChatSpec, FileSpec, GenerationSpec, SpecialTokens,
                                VlmImageSpec, VlmStageManifest, VlmTextSpec, file_sha256)
from finers_rt.prompts import build_gse_prompt, build_lpr_prompt

ROLES = ("gse", "lpr", "generic")
PARITY_QUESTION = "the small red sign"


@dataclass(frozen=True)
class VlmExportOptions:
    """What `export_vlm` produces. `image_size_wh=None` takes the role's FineRS size."""

    role: str = "generic"
    image_size_wh: tuple[int, int] | None = None
    opset: int = 18
    quantize: str = "none"
    decode_steps: int = 8
    force: bool = False
    kv_cache: str = "shared"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InputError(f"unknown role '{self.role}', expected one of {list(ROLES)}"
                             + suggest(self.role, ROLES))
        if self.quantize not in QUANTIZATIONS:
            raise InputError(f"unknown quantization '{self.quantize}', expected one of "
                             f"{list(QUANTIZATIONS)}" + suggest(self.quantize, QUANTIZATIONS))
        if self.image_size_wh is None and self.role == "generic":
            raise InputError("role 'generic' needs an explicit image size (--image-size WxH)")
        if self.image_size_wh is not None and (len(self.image_size_wh) != 2
                                               or min(self.image_size_wh) < 28):
            raise InputError(f"image size must be W x H with both >= 28, got {self.image_size_wh}")
        if not 14 <= self.opset <= 21:
            raise InputError(f"opset must be in 14..21, got {self.opset}")
        if self.kv_cache not in KV_CACHES:
            raise InputError(f"unknown kv_cache '{self.kv_cache}', expected one of {list(KV_CACHES)}"
                             + suggest(self.kv_cache, KV_CACHES))
        if self.decode_steps < 8:
            raise InputError(f"decode_steps must be >= 8, got {self.decode_steps}")

    def stage_size_wh(self) -> tuple[int, int]:
        if self.image_size_wh is not None:
            return (int(self.image_size_wh[0]), int(self.image_size_wh[1]))
        cfg = PipelineConfig()
        return tuple(cfg.gse_size_wh if self.role == "gse" else cfg.lpr_size_wh)


def parse_size_wh(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080); InputError otherwise."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"image size must look like WxH (e.g. 1920x1080), got '{text}'")
    return int(parts[0]), int(parts[1])


def source_sha256(hf_dir: Path) -> str:
    """sha256 over the sorted (relative path, file sha256) list of weight files of `hf_dir`."""
    import hashlib

    files = sorted(p for p in hf_dir.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ArtifactError(f"{hf_dir}: no *.safetensors or *.bin weight files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(hf_dir).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def parity_image(stage_size_wh: tuple[int, int]) -> Image.Image:
    """A deterministic synthetic photo-like image, resized PIL-bilinear to the stage size."""
    rng = np.random.default_rng(1234)
    w, h = stage_size_wh
    src_h, src_w = max(32, h * 3 // 2), max(32, w * 3 // 2)
    yy, xx = np.mgrid[0:src_h, 0:src_w]
    base = np.stack([(xx * 255 // src_w), (yy * 255 // src_h), ((xx + yy) * 127 // (src_w + src_h))], -1)
    noise = rng.integers(0, 64, size=(src_h, src_w, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    return img.resize((w, h), Image.Resampling.BILINEAR)


def _parity_prompt(role: str) -> str:
    if role == "gse":
        return build_gse_prompt(PARITY_QUESTION)
    return build_lpr_prompt(PARITY_QUESTION)


def chat_pieces(processor, prompt: str, num_image_tokens: int) -> ChatSpec:
    """Render the chat template for one user turn (image, then `prompt`) and cut it around the
    image; check the pieces rebuild the processor's expanded text exactly."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pad = processor.image_token
    if text.count(pad) != 1 or text.count(prompt) != 1:
        raise ArtifactError(f"chat template renders {text.count(pad)} image tokens and "
                            f"{text.count(prompt)} prompts for one image + text turn; expected 1 and 1")
    before, rest = text.split(pad)
    start = "<|vision_start|>"
    if not before.endswith(start):
        raise ArtifactError(f"chat template: image token is not preceded by {start}")
    after_image, after_text = rest.split(prompt)
    chat = ChatSpec(before_image=before, image_token=pad, after_image=after_image, after_text=after_text)
    expanded = text.replace(pad, pad * num_image_tokens)
    if chat.render(num_image_tokens, prompt) != expanded:
        raise ArtifactError("chat pieces do not rebuild the processor's expanded text")
    return chat


def _image_spec(processor, stage_wh, grid) -> VlmImageSpec:
    ip = processor.image_processor
    t, gh, gw = (int(v) for v in grid)
    patch = int(ip.patch_size)
    merge = int(ip.merge_size)
    size = getattr(ip, "size", None) or {}
    return VlmImageSpec(
        stage_size_wh=tuple(stage_wh), resized_hw=(gh * patch, gw * patch), grid_thw=(t, gh, gw),
        num_patches=t * gh * gw, num_image_tokens=t * gh * gw // merge ** 2, patch_size=patch,
        temporal_patch_size=int(ip.temporal_patch_size), merge_size=merge,
        min_pixels=int(size.get("shortest_edge", ip.min_pixels)),
        max_pixels=int(size.get("longest_edge", ip.max_pixels)),
        image_mean=tuple(float(v) for v in ip.image_mean),
        image_std=tuple(float(v) for v in ip.image_std), rescale_factor=float(ip.rescale_factor),
        resample=Image.Resampling(int(ip.resample)).name.lower())


def _text_spec(model) -> VlmTextSpec:
    cfg = model.config.text_config
    return VlmTextSpec(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads, vocab_size=cfg.vocab_size,
        rope_theta=float(cfg.rope_theta), mrope_section=tuple(cfg.rope_scaling["mrope_section"]))


def _special_tokens(model) -> SpecialTokens:
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.text_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    cfg = model.config
    return SpecialTokens(
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        eos_token_ids=tuple(int(e) for e in eos),
        pad_token_id=None if gen.pad_token_id is None else int(gen.pad_token_id))


def write_graphs(model, work: Path, grid: tuple[int, int, int], opset: int, kv_cache: str = "shared") -> None:
    """Export `vision.onnx` and `decoder.onnx` (+ `.data` when large) into `work`. With
    `kv_cache="shared"` both graphs use ONNX Runtime's fused contrib ops (GroupQueryAttention,
    MultiHeadAttention); with `"concat"` both are plain ONNX ops (portable, e.g. TensorRT)."""
    export_vision(model.model.visual, grid, str(work / "vision.onnx"), opset,
                  fused_attention=kv_cache == "shared")
    consolidate_external_data(work / "vision.onnx")
    export_decoder(model, str(work / "decoder.onnx"), opset, kv_cache=kv_cache,
                   step=decoder_step_for(model, kv_cache))
    consolidate_external_data(work / "decoder.onnx")
    for name in ("vision.onnx", "decoder.onnx"):
        dedupe_constants(work / name)


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_vlm(hf_dir: str | Path, out_dir: str | Path, options: VlmExportOptions) -> VlmStageManifest:
    """Export + validate one VLM stage; return its manifest (also saved in `out_dir`).

    Raises InputError (bad arguments / non-empty out_dir without force), ArtifactError (bad
    checkpoint) or ExportParityError (a graph disagrees with torch; nothing is written).
    """
    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir).resolve()
    if not (hf_dir / "config.json").is_file():
        raise InputError(f"{hf_dir} is not a Hugging Face checkpoint folder (no config.json)")
    check_out_dir(out_dir, options.force)
    torch.manual_seed(0)
    model, processor = load_reference(hf_dir)
    stage_wh = options.stage_size_wh()
    prompt = _parity_prompt(options.role)
    image = parity_image(stage_wh)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(images=[image], text=[text], return_tensors="pt")
    inputs = validate.ParityInputs(enc["input_ids"], enc["attention_mask"], enc["pixel_values"],
                                   enc["image_grid_thw"].long())
    grid = tuple(int(v) for v in inputs.image_grid_thw[0])
    image_spec = _image_spec(processor, stage_wh, grid)
    chat = chat_pieces(processor, prompt, image_spec.num_image_tokens)
    if processor.tokenizer(chat.render(image_spec.num_image_tokens, prompt))["input_ids"] != \
            inputs.input_ids[0].tolist():
        raise ArtifactError("tokenizing the chat pieces does not give the processor's input_ids")
    with staged_folder(out_dir, options.force) as work:
        manifest = _build_stage(model, processor, hf_dir, work, options, inputs, image_spec, chat)
    return manifest


def _compact(work: Path) -> None:
    """Exact: float32 weights that are float16 values are stored as float16 (see graph_files)."""
    for name in ("vision.onnx", "decoder.onnx"):
        store_exact_fp16(work / name)


def _build_stage(model, processor, hf_dir, work, options, inputs, image_spec, chat) -> VlmStageManifest:
    write_graphs(model, work, image_spec.grid_thw, options.opset, options.kv_cache)
    if options.quantize == "none":
        _compact(work)  # before validation: the files validated are the files shipped
    embed = np.asarray(model.get_input_embeddings().weight.detach().numpy(), np.float32)  # [V, H]
    np.save(work / "embed_tokens.npy", embed)
    shutil.copyfile(hf_dir / "tokenizer.json", work / "tokenizer.json")
    penalty = float(model.generation_config.repetition_penalty or 1.0)
    embed = np.load(work / "embed_tokens.npy", mmap_mode="r")
    report = _validate(model, work, inputs, embed, options.decode_steps, penalty, "fp32")
    reference = validate.reference_greedy_tokens(model, inputs, len(report["tokens"]))
    if not reference or report["tokens"][:len(reference)] != reference:  # HF may stop at eos
        raise ExportParityError("decoder", "logits", 1.0, 0.0,
                                f"greedy tokens {report['tokens']} differ from HF generate {reference}")
    report["greedy_tokens_equal"] = True
    if options.quantize != "none":
        fp32_tokens = report["tokens"]
        quantize_decoder(work / "decoder.onnx", options.quantize)  # reads plain fp32 weights
        _compact(work)
        report = _validate(model, work, inputs, embed, options.decode_steps, penalty, options.quantize)
        agree = sum(a == b for a, b in zip(report["tokens"], fp32_tokens)) / len(fp32_tokens)
        report["greedy_token_agreement_with_fp32"] = agree
        report["greedy_tokens_equal"] = report["tokens"] == fp32_tokens
    report["greedy_tokens"] = report.pop("tokens")
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    manifest = _manifest(model, hf_dir, work, options, image_spec, chat, embed, report)
    manifest.save(work)
    return manifest


def _validate(model, work, inputs, embed, steps, penalty, precision) -> dict:
    tol = validate.TOLERANCES[precision]
    vision = _session(work / "vision.onnx")
    image_embeds, vision_err = validate.check_vision(vision, model, inputs, tol)
    del vision
    decoder = _session(work / "decoder.onnx")
    report = validate.check_decoder(decoder, model, inputs, image_embeds, embed, steps, penalty, tol)
    report["vision_max_abs_err"] = vision_err
    report["precision"] = precision
    report["tolerance"] = {"image_embeds": tol.image_embeds, "logits": tol.logits, "kv": tol.kv,
                           "logit_gap_slope": tol.logit_gap_slope}
    return report


def _manifest(model, hf_dir, work, options, image_spec, chat, embed, report) -> VlmStageManifest:
    graphs = {name: graph_spec(work / f"{name}.onnx") for name in ("vision", "decoder")}
    config = json.loads((hf_dir / "config.json").read_text())
    return VlmStageManifest(
        format=VlmStageManifest.FORMAT, format_version=1, finers_rt_version=__version__,
        role=options.role, precision="fp32" if options.quantize == "none" else options.quantize,
        image=image_spec, text=_text_spec(model), special_tokens=_special_tokens(model), chat=chat,
        generation=GenerationSpec(max_new_tokens=PipelineConfig().max_new_tokens,
                                  repetition_penalty=float(model.generation_config.repetition_penalty or 1.0)),
        graphs=graphs,
        embeddings=ArraySpec(file="embed_tokens.npy", dtype="float32", shape=tuple(embed.shape),
                             sha256=file_sha256(work / "embed_tokens.npy")),
        tokenizer=FileSpec(file="tokenizer.json", sha256=file_sha256(work / "tokenizer.json")),
        source={"path": str(hf_dir), "sha256": source_sha256(hf_dir), "config": config},
        exporter={"finers_rt": __version__, "torch": torch.__version__.split("+")[0],
                  "transformers": transformers.__version__, "onnx": onnx.__version__,
                  "onnxruntime": ort.__version__, "opset": options.opset},
        validation=report, kv_cache=options.kv_cache)
