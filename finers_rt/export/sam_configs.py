"""SAM model configurations: the official presets and small custom ones, and a builder.

A `SamConfig` describes every size segment-anything's `_build_sam` hard-codes, so small SAMs
(for tests, or the project's default tiny bundle) are built from the SAME classes as
`sam_model_registry` (`ImageEncoderViT`, `PromptEncoder`, `MaskDecoder`, `TwoWayTransformer`).

A config file is JSON with any subset of the `SamConfig` fields, e.g.
```json
{"encoder_embed_dim": 96, "encoder_depth": 2, "encoder_num_heads": 2,
 "encoder_global_attn_indexes": [1], "image_size": 512}
```
Missing fields take the value of the preset named by `--model-type` (vit_b / vit_l / vit_h).
Unknown keys are an InputError with a "did you mean" suggestion.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from finers_rt.errors import ArtifactError, InputError, suggest
from finers_rt.export.torchvision_shim import import_segment_anything


@dataclass(frozen=True)
class SamConfig:
    """Every size of a segment-anything `Sam` (defaults = vit_b with the official decoder)."""

    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    image_size: int = 1024
    vit_patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_global_attn_indexes",
                           tuple(int(i) for i in self.encoder_global_attn_indexes))
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        problems = []
        if self.image_size % self.vit_patch_size:
            problems.append(f"image_size {self.image_size} must be a multiple of "
                            f"vit_patch_size {self.vit_patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append(f"encoder_embed_dim {self.encoder_embed_dim} must be divisible by "
                            f"encoder_num_heads {self.encoder_num_heads}")
        if self.prompt_embed_dim % self.decoder_num_heads or self.prompt_embed_dim % 8:
            problems.append(f"prompt_embed_dim {self.prompt_embed_dim} must be divisible by 8 "
                            f"and by decoder_num_heads {self.decoder_num_heads}")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            problems.append(f"encoder_global_attn_indexes {bad} outside 0..{self.encoder_depth - 1}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            problems.append("pixel_mean / pixel_std must be 3 values (std > 0)")
        if self.num_multimask_outputs < 1:
            problems.append("num_multimask_outputs must be >= 1")
        if problems:
            raise InputError("invalid SAM config: " + "; ".join(problems))

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (S / patch)."""
        return self.image_size // self.vit_patch_size

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "SamConfig | None" = None) -> "SamConfig":
        """Fields of `data` over `base` (default vit_b); unknown keys raise InputError."""
        if not isinstance(data, dict):
            raise InputError(f"a SAM config must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise InputError(f"unknown SAM config key '{key}'{suggest(key, names)}")
        return dataclasses.replace(base or cls(), **data)


SAM_PRESETS: dict[str, SamConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                       encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamConfig(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                       encoder_global_attn_indexes=(7, 15, 23, 31)),
}


def resolve_sam_config(model_type: str, config_path: str | Path | None = None) -> SamConfig:
    """The preset `model_type`, overridden by the JSON file `config_path` if given."""
    if model_type not in SAM_PRESETS:
        raise InputError(f"unknown SAM model type '{model_type}', expected one of "
                         f"{sorted(SAM_PRESETS)}{suggest(model_type, SAM_PRESETS)}")
    base = SAM_PRESETS[model_type]
    if config_path is None:
        return base
    path = Path(config_path)
    if not path.is_file():
        raise InputError(f"SAM config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"SAM config {path} is not valid JSON: {exc}") from exc
    return SamConfig.from_dict(data, base=base)


def build_sam(config: SamConfig):
    """A segment-anything `Sam` (eval mode, default init) with the sizes of `config`."""
    import torch

    sa = import_segment_anything()
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder,
                                           TwoWayTransformer)

    e, s = config.embedding_size, config.image_size
    sam = sa.modeling.Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth, embed_dim=config.encoder_embed_dim, img_size=s,
            mlp_ratio=config.mlp_ratio, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads, patch_size=config.vit_patch_size,
            qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.window_size, out_chans=config.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim, image_embedding_size=(e, e),
            input_image_size=(s, s), mask_in_chans=config.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=config.decoder_depth,
                                          embedding_dim=config.prompt_embed_dim,
                                          mlp_dim=config.decoder_mlp_dim,
                                          num_heads=config.decoder_num_heads),
            transformer_dim=config.prompt_embed_dim, iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim),
        pixel_mean=list(config.pixel_mean), pixel_std=list(config.pixel_std))
    return sam.eval()


def load_sam(checkpoint: str | Path, config: SamConfig):
    """Build `config` and load the state dict at `checkpoint` (strict); ArtifactError if it
    is missing, unreadable or does not fit the config."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise ArtifactError(f"SAM checkpoint not found: {path}")
    sam = build_sam(config)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ArtifactError(f"cannot read SAM checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"SAM checkpoint {path} is not a state dict")
    own_state = sam.state_dict()
    missing = [k for k in own_state if k not in state]
    unexpected = [k for k in state if k not in own_state]
    if missing or unexpected:
        parts = [f"{len(keys)} {what} keys (e.g. {', '.join(keys[:2])})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ArtifactError(f"SAM checkpoint {path} does not fit the config: "
                            f"{'; '.join(parts)}; check --model-type / --config")
    for name, param in state.items():
        if tuple(own_state[name].shape) != tuple(param.shape):
            raise ArtifactError(f"SAM checkpoint {path}: '{name}' has shape "
                                f"{tuple(param.shape)}, the config expects "
                                f"{tuple(own_state[name].shape)}; check --model-type / --config")
    sam.load_state_dict(state)
    return sam.eval()


def make_random_sam_checkpoint(path: str | Path, config: SamConfig, seed: int = 0) -> Path:
    """Write a random-weight `Sam` state dict for `config` to `path` (torch.save) and return it.

    Parameters that segment-anything initialises to zero (absolute / relative position
    embeddings) get small random values too, so every code path carries signal.
    """
    import torch

    torch.manual_seed(seed)
    sam = build_sam(config)
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                param.normal_(0.0, 0.02)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path
