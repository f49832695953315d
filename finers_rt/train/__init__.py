"""Training (torch, the 'train' extra): synthetic data -> SFT + GRPO -> HF / segment-anything checkpoints.

Modules: `model` (finers-tiny config, coordinate tokens, initial checkpoint), `data` (samples
and the on-disk cache), `batch` (collation and losses), `sft` (the SFT loop), `sam_train` (the
mask model), `rewards` (FineRS rewards), `retrospective` (locate-informed GSE target regions),
`grpo` (RL), `evaluate` (held-out metrics), `checkpoint` (run folders). Import them directly;
this package imports nothing heavy on its own.
"""
