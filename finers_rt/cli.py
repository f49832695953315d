"""The `finers-rt` command line: one thin command per job.

Each command parses arguments, calls one library function and prints its result. Torch-side
commands (export, train) import their subpackage lazily so the core CLI runs without torch.
FinersError subclasses become a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from finers_rt import __version__
from finers_rt.errors import FinersError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="finers-rt: FineRS tiny-object reasoning and segmentation at the edge.")
export_app = typer.Typer(no_args_is_help=True, help="Export checkpoints to an engine bundle (needs the 'export' extra).")
app.add_typer(export_app, name="export")
train_app = typer.Typer(no_args_is_help=True, help="Train GSE / LPR / SAM stages (needs the 'train' extra).")
app.add_typer(train_app, name="train")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"finers-rt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback,
                                       is_eager=True, help="Print the version and exit.")) -> None:
    """finers-rt: FineRS tiny-object reasoning and segmentation at the edge."""


# ---- commands: each helper section below is self-contained ----------------------------------


# -- synth (finers_rt.synth) --
@app.command("synth")
def synth_cmd(
    out_dir: str = typer.Argument(..., help="Folder to write annotations.json and images/ into (must be empty unless --force)."),
    n: int = typer.Option(..., "--n", help="Number of scenes (images) to generate."),
    seed: int = typer.Option(..., "--seed", help="Dataset seed; scene i uses SeedSequence([seed, i])."),
    size: str = typer.Option("3840x2160", "--size", help="Image size WIDTHxHEIGHT."),
    workers: int = typer.Option(1, "--workers", help="Worker processes (output does not depend on it)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty OUT_DIR (same-named files are replaced)."),
) -> None:
    """Generate a synthetic FineRS-4k style benchmark of cluttered scenes with tiny objects."""
    from finers_rt.synth import generate_dataset, parse_size_wh

    s = generate_dataset(out_dir, n=n, seed=seed, size_wh=parse_size_wh(size), workers=workers,
                         force=force)
    typer.echo(f"{s.n_scenes} scenes {s.size_wh[0]}x{s.size_wh[1]}, {s.n_annotations} "
               f"annotations -> {s.annotations_path} ({s.seconds:.1f} s, "
               f"{s.scenes_per_s:.2f} scenes/s, {s.workers} worker(s), "
               f"{s.image_bytes / 2**20:.1f} MiB of JPEG)")
    typer.echo(f"Q-type {s.q_types}; attribute {s.attributes}; size bucket {s.buckets}")


# -- bench (finers_rt.bench, finers_rt.bench_run, finers_rt.bench_report) --
@app.command("bench")
def bench_cmd(
    model: str = typer.Option(None, "--model", help="Bundle folder (default: the shipped finers-tiny)."),
    reference: bool = typer.Option(False, "--reference", help="Also run the torch reference (HF generate + SamPredictor) on the bundle's source checkpoints; needs the 'export' extra."),
    queries_per_image: int = typer.Option(3, "--queries-per-image", help="K questions on the same image in the repeat scenario (>= 2)."),
    iters: int = typer.Option(3, "--iters", help="Measured iterations (images) per scenario."),
    warmup: int = typer.Option(1, "--warmup", help="Warm-up queries (own images) before measuring."),
    batch: int = typer.Option(2, "--batch", help="Different images in the batch scenario."),
    image_size: str = typer.Option("3840x2160", "--image-size", help="Generated bench image size WIDTHxHEIGHT."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Token cap per stage (default: the bundle's, 1024)."),
    threads: int = typer.Option(None, "--threads", help="ORT intra-op threads (default: ORT's choice)."),
    attn: str = typer.Option("auto", "--attn", help="Reference attention: auto (fastest of sdpa/eager), sdpa or eager."),
    json_out: str = typer.Option(None, "--json", help="Write the full record (per-stage numbers, environment, speedups) to FILE."),
    plot: str = typer.Option(None, "--plot", help="Write a PNG of per-stage p50 times to FILE."),
    peer: str = typer.Option(None, "--peer", help="'genai': decode loop of onnxruntime-genai (optional install) on the same decoder graph, text prompt, greedy (bench/README.md); only this runs."),
    peer_stage: str = typer.Option(None, "--peer-stage", help="VLM stage folder for --peer (default: the shipped finers-tiny gse)."),
) -> None:
    """Per-stage latency, memory and output agreement of finers-rt against the torch reference."""
    if peer is not None:
        _bench_peer(peer, peer_stage, max_new_tokens, iters, warmup, threads, json_out)
        return
    from rich.console import Console

    from finers_rt.bench import BenchOptions, bench_command_line, save_json
    from finers_rt.bench_report import render_tables, write_plot
    from finers_rt.bench_run import run_bench
    from finers_rt.synth import parse_size_wh

    opts = BenchOptions(model=model, reference=reference, queries_per_image=queries_per_image,
                        iters=iters, warmup=warmup, batch=batch, image_size_wh=parse_size_wh(image_size),
                        max_new_tokens=max_new_tokens, threads=threads, attn=attn)
    if reference:
        try:
            import finers_rt.export.reference  # noqa: F401
        except ImportError as exc:
            from finers_rt.errors import MissingExtraError

            raise MissingExtraError("export", exc.name or "torch", "finers-rt bench --reference") from None
    result = run_bench(opts, log=lambda m: typer.echo(m, err=True))
    result["command"] = bench_command_line(opts, json_out, plot)
    console = Console()
    for table in render_tables(result):
        console.print(table)
    if json_out:
        save_json(result, json_out)
        typer.echo(f"wrote {json_out}", err=True)
    if plot:
        typer.echo(f"wrote {write_plot(result, plot)}", err=True)


def _bench_peer(peer: str, stage: str | None, max_new_tokens: int | None, iters: int, warmup: int,
                threads: int | None, json_out: str | None) -> None:
    from finers_rt.bench import save_json
    from finers_rt.bench_genai import command_line, compare
    from finers_rt.errors import InputError
    from finers_rt.pipeline import default_bundle_path

    if peer != "genai":
        raise InputError(f"--peer must be 'genai', got '{peer}'")
    stage = stage or str(default_bundle_path() / "gse")
    tokens, threads = max_new_tokens or 32, threads or 1
    result = compare(stage, max_new_tokens=tokens, iters=iters, warmup=warmup, threads=threads,
                     log=lambda m: typer.echo(m, err=True))
    result["command"] = command_line(stage, tokens, iters, warmup, threads, json_out)
    for name, side in result["sides"].items():
        typer.echo(f"{name:10s} prefill p50 {side['prefill_ms']['p50']:8.2f} ms   decode p50 "
                   f"{side['decode_ms_per_token']['p50']:8.3f} ms/token")
    typer.echo(f"tokens equal: {result['tokens_equal']}   prefill logits max |diff|: "
               f"{result['prefill_logits_max_abs_diff']:.3g}   load average: {result['environment']['load_average_end']}")
    if json_out:
        save_json(result, json_out)
        typer.echo(f"wrote {json_out}", err=True)


# -- score (finers_rt.metrics) --
@app.command("score")
def score_cmd(
    annotations: str = typer.Argument(..., help="FineRS annotation JSON ({'annotations': [...]})."),
    predictions: str = typer.Argument(..., help="Predictions JSON ({'predictions': [...]})."),
    images: str = typer.Option(..., "--images", help="Folder the annotations' image_path is relative to."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Score predictions with the official FineRS metrics (gIoU/cIoU, QA accuracy, region recall)."""
    import json

    from finers_rt.metrics import render_score_tables, score_files

    result = score_files(annotations, predictions, images)
    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console

    console = Console()
    for table in render_score_tables(result):
        console.print(table)


# -- export sam (finers_rt.export.sam) --
@export_app.command("sam")
def export_sam_cmd(
    checkpoint: str = typer.Argument(..., help="segment-anything state dict (.pth)."),
    out_dir: str = typer.Argument(..., help="SAM folder to write (image_encoder.onnx, mask_decoder.onnx, manifest.json)."),
    model_type: str = typer.Option("vit_b", "--model-type", help="Preset: vit_b, vit_l or vit_h."),
    config: str = typer.Option(None, "--config", help="JSON file overriding preset sizes (small SAMs); see finers_rt/export/sam_configs.py."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR."),
) -> None:
    """Export a SAM checkpoint to ONNX, validated against SamPredictor before writing."""
    try:
        from finers_rt.export.sam import export_sam
    except ImportError as exc:
        from finers_rt.errors import MissingExtraError

        raise MissingExtraError("export", exc.name or "torch", "finers-rt export sam") from None
    manifest = export_sam(checkpoint, out_dir, model_type=model_type, config_path=config,
                          force=force, log=typer.echo)
    v = manifest.validation
    typer.echo(f"SAM {manifest.model_type} (S={manifest.image_size}) -> {out_dir}: "
               f"score err {v['score_max_abs_err']:.2g}, mask pixels differing "
               f"{v['mask_diff_pixels']} ({v['mask_max_diff_fraction']:.2g})")


# -- export vlm (finers_rt.export.vlm) --
@export_app.command("vlm")
def export_vlm_cmd(
    hf_dir: str = typer.Argument(..., help="Hugging Face Qwen2.5-VL checkpoint folder."),
    out_dir: str = typer.Argument(..., help="VLM stage folder to write (vision.onnx, decoder.onnx, manifest.json, ...)."),
    image_size: str = typer.Option(None, "--image-size", help="Stage image size WxH (default: gse 1920x1080, lpr 512x512)."),
    role: str = typer.Option("generic", "--role", help="gse, lpr or generic (generic needs --image-size)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset."),
    quantize: str = typer.Option("none", "--quantize", help="Decoder weights: none, int8 or int4."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR."),
    kv_cache: str = typer.Option("shared", "--kv-cache", help="Decoder K/V contract: shared (fused "
                                 "GroupQueryAttention, in-place buffer; fused vision attention; ONNX Runtime) or "
                                 "concat (plain ONNX ops in both graphs, e.g. for TensorRT)."),
) -> None:
    """Export a Qwen2.5-VL stage to ONNX, validated against the HF model before writing."""
    try:
        from finers_rt.export.vlm import VlmExportOptions, export_vlm, parse_size_wh
    except ImportError as exc:
        from finers_rt.errors import MissingExtraError

        raise MissingExtraError("export", exc.name or "torch", "finers-rt export vlm") from None
    size_wh = parse_size_wh(image_size) if image_size else None
    options = VlmExportOptions(role=role, image_size_wh=size_wh, opset=opset, quantize=quantize,
                               force=force, kv_cache=kv_cache)
    manifest = export_vlm(hf_dir, out_dir, options)
    v, img = manifest.validation, manifest.image
    typer.echo(f"VLM {manifest.role} {manifest.precision} stage {img.stage_size_wh[0]}x"
               f"{img.stage_size_wh[1]} grid {list(img.grid_thw)} -> {out_dir}: vision err "
               f"{v['vision_max_abs_err']:.2g}, prefill logits err {v['prefill_logits_max_abs_err']:.2g}, "
               f"{v['decode_steps_checked']} decode steps err {v['decode_logits_max_abs_err']:.2g}, "
               f"greedy tokens equal {v['greedy_tokens_equal']}")


@export_app.command("bundle")
def export_bundle_cmd(
    gse: str = typer.Option(..., "--gse", help="GSE stage: Hugging Face Qwen2.5-VL checkpoint folder."),
    lpr: str = typer.Option(..., "--lpr", help="LPR stage: Hugging Face Qwen2.5-VL checkpoint folder."),
    sam: str = typer.Option(..., "--sam", help="segment-anything checkpoint (state dict)."),
    out: str = typer.Option(..., "--out", help="Bundle folder to write."),
    sam_type: str = typer.Option("vit_b", "--sam-type", help="SAM preset vit_b|vit_l|vit_h (sizes overridable with --sam-config)."),
    sam_config: str = typer.Option(None, "--sam-config", help="JSON file describing a smaller SAM."),
    name: str = typer.Option(None, "--name", help="Bundle name (default: the folder name)."),
    gse_size: str = typer.Option(None, "--gse-size", help="GSE stage size WxH (default 1920x1080)."),
    lpr_size: str = typer.Option(None, "--lpr-size", help="LPR stage size WxH (default 512x512)."),
    quantize: str = typer.Option("none", "--quantize", help="Decoder weights: none, int8 or int4."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
    kv_cache: str = typer.Option("shared", "--kv-cache", help="VLM graphs: shared (ONNX Runtime fused "
                                 "attention, in-place K/V buffer) or concat (plain ONNX ops, e.g. for TensorRT)."),
) -> None:
    """Export GSE, LPR and SAM into one validated bundle (BUNDLE/{manifest.json, gse, lpr, sam})."""
    try:
        from finers_rt.export.bundle import export_bundle
        from finers_rt.export.vlm import parse_size_wh
    except ImportError as exc:
        from finers_rt.errors import MissingExtraError

        raise MissingExtraError("export", exc.name or "torch", "finers-rt export bundle") from None
    manifest = export_bundle(
        gse, lpr, sam, out, sam_type=sam_type, sam_config=sam_config, name=name,
        gse_size_wh=parse_size_wh(gse_size) if gse_size else None,
        lpr_size_wh=parse_size_wh(lpr_size) if lpr_size else None,
        quantize=quantize, opset=opset, force=force, log=lambda m: typer.echo(m, err=True),
        kv_cache=kv_cache)
    typer.echo(f"bundle '{manifest.name}' -> {out}")


# -- generate (finers_rt.vlm) --
@app.command("generate")
def generate_cmd(
    stage_dir: str = typer.Argument(..., help="Exported VLM stage folder (manifest.json, vision.onnx, decoder.onnx, ...)."),
    image: str = typer.Argument(..., help="Image file (any format pillow reads); resized to the stage size."),
    text: str = typer.Argument(..., help="The user text that follows the image in the prompt."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Cap on generated tokens (default: the manifest's)."),
    stop_at: str = typer.Option(None, "--stop-at", help="Also stop once the output contains this string."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads per graph (default: ORT's choice)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"token_ids": [...], "text": "..."} (+ timings).'),
) -> None:
    """Greedy-generate one VLM stage's answer to TEXT about IMAGE (no pipeline around it)."""
    import json as _json

    from finers_rt.config import BackendOptions
    from finers_rt.vlm import VlmStage

    stage = VlmStage.load(stage_dir, BackendOptions(intra_op_threads=threads))
    result = stage.generate(image, text, max_new_tokens=max_new_tokens, stop_at=stop_at)
    if as_json:
        typer.echo(_json.dumps({"token_ids": result.token_ids, "text": result.text,
                                "stop_reason": result.stop_reason, "timings_ms": result.timings_ms}))
        return
    timings = result.timings_ms
    typer.echo(result.text)
    typer.echo(f"[{len(result.token_ids)} tokens, stop: {result.stop_reason}; vision {timings['vision']:.0f} ms, "
               f"prefill {timings['prefix_prefill'] + timings['question_prefill']:.0f} ms, decode "
               f"{timings['decode']:.0f} ms ({timings['tok_per_s']:.1f} tok/s)]", err=True)


# -- build-engines (finers_rt.trt) --
@app.command("build-engines")
def build_engines_cmd(
    bundle: str = typer.Argument(..., help="Bundle folder (or one VLM / SAM stage folder) with exported ONNX graphs."),
    fp16: bool = typer.Option(False, "--fp16", help="Let TensorRT use fp16 kernels (inputs/outputs stay float32)."),
    int8: bool = typer.Option(False, "--int8", help="Let TensorRT use int8 kernels (graphs with Q/DQ nodes; no calibration)."),
    workspace: float = typer.Option(4.0, "--workspace", help="Builder workspace limit in GB."),
    max_batch: int = typer.Option(1, "--max-batch", help="Largest decoder batch the engines accept."),
    max_prompt_tokens: int = typer.Option(256, "--max-prompt-tokens", help="Prompt tokens beyond the image tokens a prefill may hold."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Generated tokens to plan for (default: the manifests' / pipeline's)."),
    force: bool = typer.Option(False, "--force", help="Rebuild engines that already exist."),
) -> None:
    """Build TensorRT engines (<graph>.engine + <graph>.engine.json) for a bundle ON this GPU."""
    from finers_rt.trt import ProfileLimits, build_engines

    limits = ProfileLimits(max_batch=max_batch, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens)
    built = build_engines(bundle, fp16=fp16, int8=int8, workspace_gb=workspace, force=force, limits=limits,
                          log=typer.echo)
    if built:
        meta = built[0]
        typer.echo(f"{len(built)} engine(s) built with TensorRT {meta.tensorrt_version} for {meta.device.name} "
                   f"(sm {'.'.join(map(str, meta.device.compute_capability))}); use them with the 'trt' backend")


# -- train (finers_rt.train) --
def _train_module(name: str, feature: str):
    """Import finers_rt.train.NAME lazily; a missing torch stack names the 'train' extra."""
    import importlib

    try:
        return importlib.import_module(f"finers_rt.train.{name}")
    except ImportError as exc:
        from finers_rt.errors import MissingExtraError

        raise MissingExtraError("train", exc.name or "torch", feature) from None


@train_app.command("cache")
def train_cache_cmd(
    out_dir: str = typer.Argument(..., help="Folder for the sample cache (gse/lpr images, masks, records.json)."),
    n_scenes: int = typer.Option(..., "--n-scenes", help="Synthetic scenes to render (1-3 questions each)."),
    seed: int = typer.Option(1, "--seed", help="Synthetic dataset seed (keep held-out seeds apart)."),
    lpr_crops: int = typer.Option(2, "--lpr-crops", help="Random pipeline-like crops per question."),
    gse_size: str = typer.Option("644x364", "--gse-size", help="GSE stage size WxH."),
    lpr_size: str = typer.Option("336x336", "--lpr-size", help="LPR stage size WxH."),
    extra_questions: int = typer.Option(0, "--extra-questions", min=0,
                                        help="Up to this many more questions per scene about further distinct targets "
                                             "(same type/attribute mix; the scene and its own questions are unchanged)."),
    negative_crops: int = typer.Option(0, "--negative-crops", min=0,
                                       help="Crops per question WITHOUT the target (look-alike decoys and fallback tiles) "
                                            "for LPR's 'not found' answer (train lpr --negative-fraction)."),
) -> None:
    """Render synthetic scenes into a training cache of GSE/LPR/SAM samples."""
    data = _train_module("data", "finers-rt train cache")
    from finers_rt.synth import parse_size_wh

    sizes = data.StageSizes(gse_size_wh=parse_size_wh(gse_size), lpr_size_wh=parse_size_wh(lpr_size))
    out = data.build_cache(out_dir, seed, n_scenes, sizes, lpr_crops=lpr_crops, log=typer.echo,
                           extra_questions=extra_questions, negative_crops=negative_crops)
    typer.echo(f"cache -> {out} ({len(data.SampleCache(out))} samples)")


def _sft_command(stage: str):
    def command(
        cache: str = typer.Option(..., "--cache", help="Training cache folder (finers-rt train cache)."),
        out: str = typer.Option(..., "--out", help="Run folder (checkpoint/, trainer_state.pt, log.jsonl); resumed if it has a state."),
        init: str = typer.Option("finers-tiny", "--init", help="Model config (finers-tiny, test) or an HF folder to start from."),
        steps: int = typer.Option(1000, "--steps", help="Total optimizer steps (a resumed run continues to this)."),
        batch_size: int = typer.Option(8, "--batch-size", help="Samples per step and process."),
        lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (cosine decay)."),
        warmup: int = typer.Option(30, "--warmup", help="Warm-up steps."),
        coord_sigma: float = typer.Option(1.5, "--coord-sigma", help="Soft coordinate target width in coordinate steps (0 = one-hot)."),
        pointer_weight: float = typer.Option(1.0, "--pointer-weight", help="Weight of the training-only pointer loss (0 = off)."),
        curriculum_steps: int = typer.Option(0, "--curriculum-steps", help="Steps over which small targets are phased in."),
        model_class: str = typer.Option("stock", "--model-class", help="stock (HF Qwen2.5-VL) or pointer (in-model pointer logits; added to a stock --init)."),
        axis_weight: float = typer.Option(1.0, "--axis-weight", help="Weight of the dense pointer-axis loss (pointer models only)."),
        joint_pointer: bool = typer.Option(False, "--joint-pointer", help="Make the in-model pointer joint (one attention for x and y; needs --model-class pointer). A per-axis --init is converted; an --init that is a run's checkpoint/ seeds it from that run's training-only pointer head."),
        joint_weight: float = typer.Option(1.0, "--joint-weight", help="Weight of the joint pointer's token loss: at each answer coordinate, -log of its attention on the target's image token (joint pointers only)."),
        dense_weight: float = typer.Option(0.0, "--dense-weight", help="GSE only: weight of the training-only per-image-token attribute + position loss (0 = off)."),
        query_weight: float = typer.Option(0.0, "--query-weight", help="Weight of the training-only loss that predicts, from the last prompt position, the target attributes the question names (0 = off)."),
        carry_heads: bool = typer.Option(False, "--carry-heads", help="Start the training-only heads (pointer, dense, query) from those saved by the run whose checkpoint --init is (<run>/checkpoint next to <run>/trainer_state.pt) instead of fresh weights; a head with other shapes stays fresh."),
        query_at_x1: bool = typer.Option(False, "--query-at-x1", help="Apply the --query-weight loss at the position that writes the first coordinate (x1) as well as at the last prompt position (mean of the two), so the state the in-model pointer reads there carries the question."),
        blank_image: bool = typer.Option(False, "--blank-image", help="Question-reading warm-up: every question is shown with a blank minimal image (4 image tokens) and only the --query-weight loss trains (~260 LM tokens per question, against ~1,470 for a 1288x728 GSE sample)."),
        head_lr: float = typer.Option(0.0, "--head-lr", help="Peak learning rate of the training-only heads (pointer, dense, query; with --tie-weight also the in-model pointer key / query it ties; same schedule shape); 0 = --lr."),
        freeze_vision: bool = typer.Option(False, "--freeze-vision", help="Keep the vision tower as --init has it (no gradient); each image's features are computed once and reused (e.g. after `train vision`)."),
        questions_per_image: int = typer.Option(1, "--questions-per-image", help="GSE only: draw up to N questions per scene and compute each scene's image prefix once per step (same losses, ~3.5x fewer LM tokens per question at 1288x728 with 8)."),
        option_think: bool = typer.Option(False, "--option-think", help="Option questions' think text names the answer in words before the letter (experimental, off in the shipped recipe)."),
        negative_fraction: float = typer.Option(0.0, "--negative-fraction", help="LPR only: this fraction of samples are crops without the target (a cache built with --negative-crops), answered 'The object is not found.' so the pipeline moves on to further crops."),
        tie_weight: float = typer.Option(0.0, "--tie-weight", help="With --joint-pointer: weight of the losses that make the in-model pointer's key the image token's attribute + image-region log-odds and its query (last prompt position and x1) the values the question names, so one dot product scores the conjunction (adds learned per-cell key terms; 0 = off). LPR: the crop's cells are labelled; the question's image region (of the whole scene) is not tied."),
        tie_coords: int = typer.Option(1, "--tie-coords", help="With --tie-weight: how many of the answer's first coordinates (x1, y1, x2, y2; LPR up to 8 with the two points) get the tied query loss, besides the last prompt position (1 = x1 only)."),
        read_attention: float = typer.Option(0.0, "--read-attention", help="GSE or LPR, one question per sequence: weight of the losses that put one LM attention head's mass, at the last prompt position and at x1, on the words naming the target's values and make its output carry them (train.reading; the layer's value / output projections train at --head-lr; 0 = off)."),
        read_attention_layer: int = typer.Option(0, "--read-attention-layer", help="LM layer of the supervised head (negative counts from the end; layer 0 reads the token embeddings themselves and was the one that learned to read, export/finers-tiny.md twelfth round)."),
        read_attention_head: int = typer.Option(0, "--read-attention-head", help="Query head supervised by --read-attention."),
        extent_weight: float = typer.Option(0.0, "--extent-weight", help="LPR with --model-class pointer: give the in-model pointer a learned extent (each token's value also carries its half width / height, which moves the box edges; added zero-initialised to a checkpoint without one) and train it on the target token with this weight; the extent and its scale train at --head-lr (0 = off)."),
        readout_weight: float = typer.Option(0.0, "--readout-weight", help="With --model-class pointer: give the in-model pointer a readout (each token's value also carries --readout-dims learned values that the attended token passes to the logits of the answer's words; added with a zero output to a checkpoint without one) and weight the losses that put the pointer's attention on the target while the response is written and the response's own token CE (undiluted by the rest of the answer); the readout trains at --head-lr (0 = off)."),
        readout_dims: int = typer.Option(16, "--readout-dims", help="Value slots per axis of a new pointer readout (taken from the cells: a pointer value has head_dim slots)."),
        save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps."),
        eval_every: int = typer.Option(0, "--eval-every", help="Greedy held-out eval every N steps (needs --eval-cache)."),
        eval_cache: str = typer.Option(None, "--eval-cache", help="Held-out cache folder."),
        eval_samples: int = typer.Option(24, "--eval-samples", help="Held-out samples per eval."),
        seed: int = typer.Option(0, "--seed", help="Seed of init, sampling and torch."),
        threads: int = typer.Option(1, "--threads", help="torch threads per process."),
        device: str = typer.Option("cpu", "--device", help="torch device (cpu, cuda, cuda:1)."),
        workers: int = typer.Option(0, "--workers", help="DataLoader processes drawing batches (0 = in-process, bit-exact resume)."),
        time_limit: float = typer.Option(0.0, "--time-limit", help="Save and stop after this many seconds (0 = no limit)."),
    ) -> None:
        sft = _train_module("sft", f"finers-rt train {stage}")
        cfg = sft.SftConfig(stage=stage, cache_dir=cache, out_dir=out, init=init, steps=steps,
                            batch_size=batch_size, lr=lr, min_lr=lr / 10, warmup=warmup,
                            coord_sigma=coord_sigma, pointer_weight=pointer_weight,
                            curriculum_steps=curriculum_steps, save_every=save_every,
                            model_class=model_class, axis_weight=axis_weight,
                            joint_pointer=joint_pointer, joint_weight=joint_weight,
                            query_at_x1=query_at_x1, carry_heads=carry_heads,
                            dense_weight=dense_weight, query_weight=query_weight,
                            head_lr=head_lr, blank_image=blank_image, option_think=option_think,
                            freeze_vision=freeze_vision, questions_per_image=questions_per_image,
                            eval_every=eval_every, eval_cache=eval_cache,
                            eval_samples=eval_samples, seed=seed, threads=threads,
                            device=device, workers=workers, time_limit_s=time_limit,
                            negative_fraction=negative_fraction, tie_weight=tie_weight,
                            read_attention=read_attention, read_attention_layer=read_attention_layer,
                            read_attention_head=read_attention_head, tie_coords=tie_coords,
                            extent_weight=extent_weight, readout_weight=readout_weight,
                            readout_dims=readout_dims)
        result = sft.train_sft(cfg, log=typer.echo)
        typer.echo(f"{stage}: step {result['step']}, loss {result['loss']:.3f} -> "
                   f"{result['checkpoint']} ({result['seconds']:.0f} s)")

    command.__doc__ = (f"Supervised fine-tuning of the {stage.upper()} stage (resumable; "
                       "torchrun for DDP).")
    return command


train_app.command("gse")(_sft_command("gse"))
train_app.command("lpr")(_sft_command("lpr"))


@train_app.command("vision")
def train_vision_cmd(
    init: str = typer.Option(..., "--init", help="HF checkpoint folder (a GSE stage) whose vision tower is trained."),
    cache: str = typer.Option(..., "--cache", help="Training cache folder (finers-rt train cache)."),
    out: str = typer.Option(..., "--out", help="Run folder (checkpoint/, trainer_state.pt, log.jsonl); resumed if it has a state."),
    steps: int = typer.Option(1000, "--steps", help="Total optimizer steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="GSE images per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate (constant)."),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint (and held-out eval) every N steps."),
    eval_cache: str = typer.Option(None, "--eval-cache", help="Held-out cache folder: per-cell colour/shape/pattern accuracy at every save."),
    seed: int = typer.Option(0, "--seed", help="Seed of the head init and sampling."),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
    time_limit: float = typer.Option(0.0, "--time-limit", help="Save and stop after this many seconds (0 = no limit)."),
) -> None:
    """Dense pre-training of the vision tower: per image token, which colours / shapes / patterns
    its cell holds (resumable); continue with `train gse --init OUT/checkpoint`."""
    vision = _train_module("vision", "finers-rt train vision")
    cfg = vision.VisionConfig(cache_dir=cache, out_dir=out, init=init, steps=steps, batch_size=batch_size,
                              lr=lr, save_every=save_every, eval_cache=eval_cache, seed=seed,
                              threads=threads, time_limit_s=time_limit)
    result = vision.train_vision(cfg, log=typer.echo)
    typer.echo(f"vision: step {result['step']}, loss {result['loss']:.3f} -> {result['checkpoint']}")


@train_app.command("words")
def train_words_cmd(
    init: str = typer.Option(..., "--init", help="HF checkpoint folder (stock or pointer Qwen2.5-VL) to extend."),
    out: str = typer.Option(..., "--out", help="HF folder to write (the source is never modified)."),
    words: str = typer.Option(None, "--words", help="Comma-separated words to make single tokens (default: the colour, shape, pattern, region and direction words of the synthetic questions)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Whole-word tokens: append BPE merges so each word is one token, grow the embeddings
    (new rows = mean of the word's fragments); continue with `train gse|lpr --init OUT`."""
    mod = _train_module("words", "finers-rt train words")
    chosen = None if words is None else [w for w in (x.strip() for x in words.split(",")) if w]
    report = mod.add_word_tokens(init, out, chosen, force=force, log=typer.echo)
    for item in report["other_pieces_changed"]:
        typer.echo(f"  also changed: {item['piece']!r} {item['before']} -> {item['after']}")


@train_app.command("evaluate")
def train_evaluate_cmd(
    stage: str = typer.Argument(..., help="gse or lpr."),
    init: str = typer.Option(..., "--init", help="HF checkpoint folder of that stage (stock or pointer Qwen2.5-VL)."),
    cache: str = typer.Option(..., "--cache", help="Held-out cache folder (finers-rt train cache)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate the first N questions only (default: all)."),
    json_out: str = typer.Option(None, "--json", help="Also write the report to this JSON file (refused if it exists, unless --force)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
) -> None:
    """Greedy stage metrics of a checkpoint on a held-out cache (GSE: region recall, centre
    hit; LPR: box IoU, points, where the box centre lands), as the learning curves compute them."""
    evaluate = _train_module("evaluate", "finers-rt train evaluate")
    report = evaluate.evaluate_checkpoint(init, cache, stage, limit, threads, json_out, force)
    typer.echo(f"{stage} on {report['samples']} questions ({report['seconds']:.0f} s):")
    for key, value in report["metrics"].items():
        typer.echo(f"  {key}: " + ("-" if value is None else f"{value:.3f}"))


@train_app.command("sam")
def train_sam_cmd(
    cache: str = typer.Option(..., "--cache", help="Training cache folder (finers-rt train cache)."),
    out: str = typer.Option(..., "--out", help="Run folder (sam.pth, sam_config.json, trainer_state.pt, log.jsonl); resumed if it has a state."),
    steps: int = typer.Option(600, "--steps", help="Total optimizer steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Crops per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (cosine decay)."),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of init and sampling."),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
) -> None:
    """Train the small SAM-family mask model on box + two-point prompts (resumable)."""
    sam_train = _train_module("sam_train", "finers-rt train sam")
    cfg = sam_train.SamTrainConfig(cache_dir=cache, out_dir=out, steps=steps, batch_size=batch_size,
                                   lr=lr, save_every=save_every, seed=seed, threads=threads)
    result = sam_train.train_sam(cfg, log=typer.echo)
    typer.echo(f"sam: step {result['step']}, train IoU {result['iou']:.3f} -> {result['checkpoint']} "
               f"({result['seconds']:.0f} s)")


@train_app.command("rl")
def train_rl_cmd(
    stage: str = typer.Option(..., "--stage", help="gse or lpr."),
    init: str = typer.Option(..., "--init", help="HF checkpoint to start from (an SFT run's checkpoint/)."),
    cache: str = typer.Option(..., "--cache", help="Training cache folder (finers-rt train cache)."),
    out: str = typer.Option(..., "--out", help="Run folder; resumed if it has a trainer state."),
    lpr: str = typer.Option(None, "--lpr", help="LPR checkpoint that picks GSE's retrospective target region (gse only)."),
    steps: int = typer.Option(100, "--steps", help="Total update steps."),
    prompts_per_step: int = typer.Option(2, "--prompts", help="Prompts per step."),
    group_size: int = typer.Option(4, "--group", help="Sampled answers per prompt (G)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature."),
    lr: float = typer.Option(1e-5, "--lr", help="Learning rate."),
    save_every: int = typer.Option(20, "--save-every", help="Checkpoint every N steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling."),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
) -> None:
    """GRPO with the FineRS rewards (GSE: locate-informed retrospective target regions)."""
    grpo = _train_module("grpo", "finers-rt train rl")
    cfg = grpo.GrpoConfig(stage=stage, init=init, cache_dir=cache, out_dir=out, lpr=lpr,
                          steps=steps, prompts_per_step=prompts_per_step, group_size=group_size,
                          temperature=temperature, lr=lr, save_every=save_every, seed=seed,
                          threads=threads)
    result = grpo.train_grpo(cfg, log=typer.echo)
    typer.echo(f"rl {stage}: step {result['step']}, reward {result['reward']:.3f} -> "
               f"{result['checkpoint']} ({result['seconds']:.0f} s)")


# ---- infer / eval (pipeline) -------------------------------------------------------------------

_QTYPES = "referring|reasoning|option"


def _backend_options(threads: int | None, device: str, backend: str = "ort"):
    from finers_rt.config import BackendOptions

    return BackendOptions(kind=backend, device=device, intra_op_threads=threads)


@app.command("infer")
def infer_cmd(
    image: str = typer.Argument(..., help="Image file (any format pillow reads)."),
    instruction: str = typer.Argument(..., help="What to find or ask, e.g. 'the red pen'."),
    model: str = typer.Option(None, "--model", help="Bundle folder (default: the shipped finers-tiny)."),
    qtype: str = typer.Option("referring", "--type", help=f"Question type: {_QTYPES}."),
    options: str = typer.Option(None, "--options", help="Options for --type option, e.g. '(A) red (B) blue'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: str = typer.Option(None, "--out", help="Folder for mask.png and overlay.png."),
    force: bool = typer.Option(False, "--force", help="Overwrite mask.png / overlay.png in --out."),
    max_extra_crops: int = typer.Option(4, "--max-extra-crops", help="Extra crops to try when GSE/LPR miss (0 = reference behaviour)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Cap on generated tokens per stage."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads per graph (default: ORT's choice)."),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda|tensorrt (ONNX Runtime execution provider)."),
    backend: str = typer.Option("ort", "--backend", help="ort (ONNX Runtime) or trt (TensorRT engines from build-engines; needs --device cuda)."),
) -> None:
    """Find the target in IMAGE, answer the question, write the mask and an overlay."""
    import json as _json

    from finers_rt.frame import open_frame
    from finers_rt.pipeline import Pipeline

    import time as _time

    started = _time.perf_counter()
    frame = open_frame(image)  # decoded once here (bad files fail fast); the overlay reads it too
    load_ms = (_time.perf_counter() - started) * 1000.0
    pipe = Pipeline.load(model, _backend_options(threads, device, backend), max_extra_crops=max_extra_crops)
    result = pipe.run(frame, instruction, question_type=qtype, options=options,
                      max_new_tokens=max_new_tokens)
    result.timings_ms["load_ms"] += load_ms
    result.timings_ms["total_ms"] += load_ms
    summary = result.to_json()
    if out is not None:
        from finers_rt.overlay import write_outputs

        summary["files"] = write_outputs(out, frame.to_array(), result, overwrite=force)
    if as_json:
        typer.echo(_json.dumps(summary))
        return
    typer.echo(f"answer:  {result.answer or '(none)'}")
    typer.echo(f"found:   {result.found}   (path: {result.path})")
    typer.echo(f"box:     {summary['bbox_xyxy']}")
    typer.echo(f"points:  {summary['points_xy']}")
    typer.echo(f"region:  {summary['region_xyxy']}")
    typer.echo(f"mask:    {result.mask_area} px")
    typer.echo("time:    " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings_ms.items()
                                       if k.endswith("_ms")))
    for name, path in summary.get("files", {}).items():
        typer.echo(f"wrote:   {path}")


@app.command("eval")
def eval_cmd(
    data_dir: str = typer.Argument(..., help="FineRS-4k-format folder: annotations.json + images/."),
    model: str = typer.Option(None, "--model", help="Bundle folder (default: the shipped finers-tiny)."),
    out: str = typer.Option(None, "--out", help="Write predictions (the `score` format) here."),
    limit: int = typer.Option(None, "--limit", help="Only the first N annotations."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    max_extra_crops: int = typer.Option(4, "--max-extra-crops", help="Extra crops to try when GSE/LPR miss (0 = reference behaviour)."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads per graph."),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda|tensorrt."),
    backend: str = typer.Option("ort", "--backend", help="ort or trt (TensorRT engines; needs --device cuda)."),
) -> None:
    """Run the pipeline over a dataset folder, write predictions, print the official metrics."""
    import json as _json

    from rich.console import Console

    from finers_rt.evaluation import evaluate_folder
    from finers_rt.metrics import render_score_tables
    from finers_rt.pipeline import Pipeline

    pipe = Pipeline.load(model, _backend_options(threads, device, backend), max_extra_crops=max_extra_crops)
    result = evaluate_folder(pipe, data_dir, out_path=out, limit=limit, overwrite=force,
                             progress=not as_json)
    if as_json:
        typer.echo(_json.dumps(result))
        return
    console = Console()
    for table in render_score_tables(result):
        console.print(table)
    times = {k: "-" if v is None else f"{v:.0f} ms" for k, v in result["timings_ms"].items()}
    console.print(f"GSE's own crop holds the target on {result['region_gse']['hits']}/"
                  f"{result['n_predictions']}; answers came from: {result['paths']}; time per "
                  f"question p50 {times['total_p50']}, p90 {times['total_p90']}")


def main() -> None:
    """Console-script entry point: run the app, turning FinersError into a clean message."""
    try:
        app(standalone_mode=False)
    except FinersError as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        if isinstance(exc, _click_exception_types()):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _click_exception_types() -> tuple[type, ...]:
    """Usage-error classes: typer >= 0.29 ships its own click copy, older typer uses click."""
    types: list[type] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            continue
    return tuple(types)


if __name__ == "__main__":
    main()
