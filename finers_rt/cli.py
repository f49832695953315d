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


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"finers-rt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback,
                                       is_eager=True, help="Print the version and exit.")) -> None:
    """finers-rt: FineRS tiny-object reasoning and segmentation at the edge."""


# ---- commands: each helper section below is self-contained ----------------------------------


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
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
