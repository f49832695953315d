"""`finers-rt export bundle`: GSE + LPR checkpoints and a SAM checkpoint -> one engine bundle.

BUNDLE/{manifest.json, gse/, lpr/, sam/}. Each stage is exported AND validated by its own
exporter; the bundle manifest carries the pipeline settings (FineRS sizes, prompts, crop policy)
so the runtime reads them instead of hard-coding them. The bundle is assembled in a temporary
folder beside OUT and renamed only when every stage has passed validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from finers_rt import __version__
from finers_rt.config import PipelineConfig
from finers_rt.export.staging import check_out_dir, staged_folder
from finers_rt.manifest import BUNDLE_FORMAT, FORMAT_VERSION, BundleManifest


def export_bundle(gse_dir: str | Path, lpr_dir: str | Path, sam_checkpoint: str | Path,
                  out_dir: str | Path, sam_type: str = "vit_b", sam_config: str | Path | None = None,
                  name: str | None = None, gse_size_wh: tuple[int, int] | None = None,
                  lpr_size_wh: tuple[int, int] | None = None, quantize: str = "none",
                  opset: int = 18, force: bool = False,
                  log: Callable[[str], None] | None = None, kv_cache: str = "shared") -> BundleManifest:
    """Export both VLM stages and SAM into `out_dir`; return the bundle manifest.

    gse_size_wh / lpr_size_wh default to FineRS's 1920x1080 / 512x512. Raises InputError for a
    non-empty `out_dir` without `force`, and whatever a stage exporter raises (nothing is left
    behind then). `kv_cache` picks the VLM graphs' contract (docs/bundle-format.md): "shared"
    (ONNX Runtime contrib ops, fastest) or "concat" (plain ONNX ops, for TensorRT).
    """
    from finers_rt.export.sam import export_sam
    from finers_rt.export.vlm import VlmExportOptions, export_vlm

    log = log or (lambda msg: None)
    out = check_out_dir(out_dir, force)
    defaults = PipelineConfig()
    gse_wh = tuple(gse_size_wh or defaults.gse_size_wh)
    lpr_wh = tuple(lpr_size_wh or defaults.lpr_size_wh)
    pipeline = PipelineConfig(gse_size_wh=gse_wh, lpr_size_wh=lpr_wh)
    with staged_folder(out, force) as work:
        for role, hf_dir, size in (("gse", gse_dir, gse_wh), ("lpr", lpr_dir, lpr_wh)):
            log(f"exporting {role} from {hf_dir} at {size[0]}x{size[1]}")
            export_vlm(hf_dir, work / role, VlmExportOptions(role=role, image_size_wh=size,
                                                             opset=opset, quantize=quantize,
                                                             kv_cache=kv_cache))
        log(f"exporting sam ({sam_type}) from {sam_checkpoint}")
        export_sam(sam_checkpoint, work / "sam", model_type=sam_type, config_path=sam_config)
        manifest = BundleManifest.from_dict({
            "format": BUNDLE_FORMAT, "format_version": FORMAT_VERSION,
            "finers_rt_version": __version__, "name": name or out.name,
            "stages": {"gse": "gse", "lpr": "lpr", "sam": "sam"},
            "pipeline": pipeline.to_dict(),
            "source": {"gse": str(Path(gse_dir).resolve()), "lpr": str(Path(lpr_dir).resolve()),
                       "sam": str(Path(sam_checkpoint).resolve()), "sam_type": sam_type,
                       "quantize": quantize, "kv_cache": kv_cache}})
        manifest.save(work)
    log(f"wrote bundle {out}")
    return manifest
