"""finers-rt: an edge inference runtime for FineRS (tiny-object reasoning and segmentation).

The core (this package minus `finers_rt.export` and `finers_rt.train`) needs only numpy,
onnxruntime, tokenizers, pillow and opencv; it never imports torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "Pipeline", "Result"]


def __getattr__(name: str):
    # The pipeline pulls in onnxruntime; keep `import finers_rt` itself cheap.
    if name in ("Pipeline", "Result"):
        from finers_rt import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'finers_rt' has no attribute '{name}'")
