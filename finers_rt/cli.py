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
