"""The error hierarchy of finers-rt.

Public entry points raise one of these, with a message that says what was expected and
what came. Model output that does not parse is a *result* ("no answer"), never an error.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class FinersError(Exception):
    """Base class of every error finers-rt raises on purpose."""


class InputError(FinersError, ValueError):
    """Bad user input: an image, an instruction, an annotation file, a CLI argument."""


class ArtifactError(FinersError):
    """A bundle, stage folder, graph or checkpoint is missing, corrupt or inconsistent."""


class ManifestError(ArtifactError):
    """A manifest.json is missing, malformed, or disagrees with the files beside it."""


class EngineProfileError(ArtifactError):
    """An engine (ONNX session / TensorRT engine) does not match the shapes the manifest
    promises, or was built for another device / library version."""


class ExportParityError(FinersError):
    """An exported graph disagrees with the torch reference beyond tolerance.

    Attributes name the graph, the output and the measured error so a caller can report it.
    """

    def __init__(self, graph: str, output: str, error: float, tolerance: float, detail: str = ""):
        self.graph = graph
        self.output = output
        self.error = float(error)
        self.tolerance = float(tolerance)
        msg = (f"export parity failed for graph '{graph}', output '{output}': "
               f"error {self.error:.3g} > tolerance {self.tolerance:.3g}")
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class MissingExtraError(FinersError, ImportError):
    """A feature needs an optional dependency group (`pip install finers-rt[EXTRA]`)."""

    def __init__(self, extra: str, module: str, feature: str):
        self.extra = extra
        super().__init__(
            f"{feature} needs the '{module}' package, which is not installed. "
            f"Install the '{extra}' extra: pip install 'finers-rt[{extra}]'")


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest of `choices`, or '' if none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
