"""Torch side: Hugging Face checkpoints -> validated ONNX graphs + manifest (needs the 'export' extra).

The core runtime never imports this package. Importing it without torch raises
`MissingExtraError` naming the extra to install.
"""

from __future__ import annotations

from finers_rt.errors import MissingExtraError

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where torch is absent
    raise MissingExtraError("export", exc.name or "torch", "exporting checkpoints to ONNX") from exc
