"""`finers-rt export sam`: a segment-anything checkpoint -> a validated SAM folder.

The folder (docs/bundle-format.md, "SAM folder") holds `image_encoder.onnx`,
`mask_decoder.onnx` and `manifest.json`. Before anything is written to OUT_DIR, the runtime
(`finers_rt.sam.SamPredictorRT` on the fresh graphs) is compared with segment-anything's
`SamPredictor` on random images of several sizes (non-square included) with FineRS' prompt
(2 foreground points + a box, multimask): embeddings, scores, low-res logits and masks.
A mismatch raises ExportParityError and leaves OUT_DIR untouched (work happens in a temporary
sibling folder that is renamed into place only on success).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch

from finers_rt import __version__
from finers_rt.errors import ExportParityError, InputError
from finers_rt.export.graph_files import dedupe_constants, store_exact_fp16
from finers_rt.export.sam_configs import SamConfig, load_sam, resolve_sam_config
from finers_rt.export.sam_graphs import OPSET, export_decoder, export_encoder
from finers_rt.export.staging import check_out_dir, staged_folder
from finers_rt.export.torchvision_shim import import_segment_anything
from finers_rt.manifest import (FORMAT_VERSION, SAM_FORMAT, GraphSpec, SamManifest, TensorSpec,
                                file_sha256, graph_sha256)

# (h, w): landscape, square and portrait-ish sizes; 300x700 is the "700x300" W x H case.
DEFAULT_VALIDATION_SIZES_HW: tuple[tuple[int, int], ...] = ((300, 700), (512, 512), (900, 1200))


@dataclass(frozen=True)
class SamParityTolerance:
    """Limits of the export check (runtime vs SamPredictor on the same image and prompt).

    embedding_rtol: max |emb_ort - emb_torch| / max(1, max |emb_torch|).
    score_atol: max |iou_ort - iou_torch|. low_res_atol: max abs error of the low-res logits.
    mask_fraction: fraction of mask pixels allowed to differ (threshold ties at logit 0).
    """

    embedding_rtol: float = 1e-3
    score_atol: float = 1e-3
    low_res_atol: float = 1e-2
    mask_fraction: float = 1e-3


def export_sam(checkpoint: str | Path, out_dir: str | Path, model_type: str = "vit_b",
               config_path: str | Path | None = None, force: bool = False,
               validation_sizes_hw: Sequence[tuple[int, int]] = DEFAULT_VALIDATION_SIZES_HW,
               tolerance: SamParityTolerance = SamParityTolerance(), seed: int = 0,
               log: Callable[[str], None] | None = None) -> SamManifest:
    """Export `checkpoint` (a segment-anything state dict) to the SAM folder `out_dir`.

    Raises InputError (bad arguments, non-empty OUT_DIR without `force`), ArtifactError
    (checkpoint missing / not fitting the config) or ExportParityError (validation failed).
    """
    log = log or (lambda msg: None)
    out = check_out_dir(out_dir, force)
    if not validation_sizes_hw:
        raise InputError("at least one validation image size is needed")
    config = resolve_sam_config(model_type, config_path)
    sam = load_sam(checkpoint, config)
    with staged_folder(out, force) as work:
        started = time.perf_counter()
        manifest = _write_graphs(sam, config, model_type, Path(checkpoint), work)
        log(f"exported graphs in {time.perf_counter() - started:.1f}s; validating")
        validation = validate_sam_folder(work, sam, validation_sizes_hw, tolerance, seed)
        manifest = SamManifest.from_dict({**manifest.to_dict(), "validation": validation})
        manifest.save(work)
    log(f"wrote {out} (validated on {len(validation_sizes_hw)} image sizes)")
    return manifest


def _write_graphs(sam, config: SamConfig, model_type: str, checkpoint: Path,
                  folder: Path) -> SamManifest:
    """Export both graphs into `folder`, fix their output shapes, write the manifest."""
    specs = sam_graph_specs(config)
    export_encoder(sam, folder / specs["image_encoder"].file)
    export_decoder(sam, folder / specs["mask_decoder"].file)
    graphs = {}
    for name, spec in specs.items():
        path = folder / spec.file
        _set_output_shapes(path, spec)
        graphs[name] = GraphSpec(spec.file, spec.inputs, spec.outputs, graph_sha256(path))
    e = config.embedding_size
    manifest = SamManifest(
        format=SAM_FORMAT, format_version=FORMAT_VERSION, finers_rt_version=__version__,
        model_type=model_type, config=config.to_dict(), image_size=config.image_size,
        embedding_hw=(e, e), embedding_dim=config.prompt_embed_dim,
        mask_input_hw=(4 * e, 4 * e), num_multimask_outputs=config.num_multimask_outputs,
        pixel_mean=config.pixel_mean, pixel_std=config.pixel_std, graphs=graphs,
        resample="bilinear", mask_threshold=float(sam.mask_threshold), precision="fp32",
        source={"path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint)},
        exporter=_exporter_versions())
    manifest.save(folder)
    return manifest


def sam_graph_specs(config: SamConfig) -> dict[str, GraphSpec]:
    """The interface of both graphs for `config` (sha256 left empty)."""
    s, e, c = config.image_size, config.embedding_size, config.prompt_embed_dim
    m = config.num_multimask_outputs + 1
    f32 = "float32"
    encoder = GraphSpec(
        "image_encoder.onnx", (TensorSpec("image", f32, (1, 3, s, s)),),
        (TensorSpec("image_embeddings", f32, (1, c, e, e)),))
    decoder = GraphSpec(
        "mask_decoder.onnx",
        (TensorSpec("image_embeddings", f32, (1, c, e, e)),
         TensorSpec("point_coords", f32, (1, "num_points", 2)),
         TensorSpec("point_labels", f32, (1, "num_points")),
         TensorSpec("mask_input", f32, (1, 1, 4 * e, 4 * e)),
         TensorSpec("has_mask_input", f32, (1,)),
         TensorSpec("orig_im_size", f32, (2,))),
        (TensorSpec("masks", f32, (1, m, "orig_h", "orig_w")),
         TensorSpec("iou_predictions", f32, (1, m)),
         TensorSpec("low_res_masks", f32, (1, m, 4 * e, 4 * e))))
    return {"image_encoder": encoder, "mask_decoder": decoder}


def _set_output_shapes(path: Path, spec: GraphSpec) -> None:
    """Write the spec's output shapes (fixed ints, named dims) into the ONNX graph outputs,
    replacing the tracer's generated dim names, and check the model."""
    model = onnx.load(str(path))
    outputs = {o.name: o for o in model.graph.output}
    for tensor in spec.outputs:
        dims = outputs[tensor.name].type.tensor_type.shape.dim
        del dims[:]
        for value in tensor.shape:
            dim = dims.add()
            if isinstance(value, int):
                dim.dim_value = value
            else:
                dim.dim_param = value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    dedupe_constants(path)
    store_exact_fp16(path)


def _exporter_versions() -> dict:
    import onnxruntime

    return {"finers_rt": __version__, "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "segment_anything": "1.0", "opset": OPSET}


def validate_sam_folder(folder: Path, sam, sizes_hw: Sequence[tuple[int, int]],
                        tolerance: SamParityTolerance = SamParityTolerance(),
                        seed: int = 0) -> dict:
    """Compare `SamPredictorRT(folder)` with `SamPredictor(sam)` on random images of each
    size with 2 foreground points + a box (multimask). Returns the measured errors; raises
    ExportParityError on the first quantity beyond tolerance."""
    from finers_rt.sam import SamPredictorRT

    runtime = SamPredictorRT.load(folder)
    reference = import_segment_anything().SamPredictor(sam)
    worst = {"embedding_max_rel_err": 0.0, "score_max_abs_err": 0.0,
             "low_res_max_abs_err": 0.0, "mask_max_diff_fraction": 0.0, "mask_diff_pixels": 0}
    rng = np.random.default_rng(seed)
    for h, w in sizes_hw:
        image = random_test_image(rng, h, w)
        box_xyxy, points_xy = random_prompt(rng, h, w)
        errors = _compare_one(runtime, reference, image, box_xyxy, points_xy)
        _check(errors, tolerance, f"{w}x{h}")
        for key, value in errors.items():
            worst[key] = max(worst[key], value) if key != "mask_diff_pixels" else worst[key] + value
    return {**worst, "image_sizes_hw": [list(s) for s in sizes_hw],
            "prompt": "2 points (labels 1, 1) + box, multimask", "passed": True}


def _compare_one(runtime, reference, image, box_xyxy, points_xy) -> dict:
    runtime.set_image(image)
    masks, scores, low_res = runtime.predict(box_xyxy, points_xy, (1, 1), multimask_output=True)
    with torch.no_grad():
        reference.set_image(image)
        ref_masks, ref_scores, ref_low_res = reference.predict(
            point_coords=np.asarray(points_xy), point_labels=np.array([1, 1]),
            box=np.asarray(box_xyxy), multimask_output=True)
        ref_emb = reference.features.numpy()
    emb = runtime.image_embedding
    differing = int((masks != ref_masks).sum())
    return {"embedding_max_rel_err": float(np.abs(emb - ref_emb).max()
                                           / max(1.0, float(np.abs(ref_emb).max()))),
            "score_max_abs_err": float(np.abs(scores - ref_scores).max()),
            "low_res_max_abs_err": float(np.abs(low_res - ref_low_res).max()),
            "mask_max_diff_fraction": differing / ref_masks.size,
            "mask_diff_pixels": differing}


def _check(errors: dict, tol: SamParityTolerance, where: str) -> None:
    checks = (("image_encoder", "image_embeddings", "embedding_max_rel_err", tol.embedding_rtol),
              ("mask_decoder", "iou_predictions", "score_max_abs_err", tol.score_atol),
              ("mask_decoder", "low_res_masks", "low_res_max_abs_err", tol.low_res_atol),
              ("mask_decoder", "masks", "mask_max_diff_fraction", tol.mask_fraction))
    for graph, output, key, limit in checks:
        if not errors[key] <= limit:
            raise ExportParityError(graph, output, errors[key], limit,
                                    f"{key} on a {where} image vs SamPredictor")


def random_test_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random HxWx3 uint8 image (blobs of colour, not white noise)."""
    coarse = rng.integers(0, 256, size=(max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    from PIL import Image

    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def random_prompt(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """FineRS-style prompt: a box inside the image and 2 points inside the box (xy pixels)."""
    x1, x2 = np.sort(rng.uniform(0, w, 2))
    y1, y2 = np.sort(rng.uniform(0, h, 2))
    box_xyxy = np.array([x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0)]).clip(0, [w, h, w, h])
    points_xy = np.stack([rng.uniform(box_xyxy[0], box_xyxy[2], 2),
                          rng.uniform(box_xyxy[1], box_xyxy[3], 2)], axis=1)
    return box_xyxy, points_xy
