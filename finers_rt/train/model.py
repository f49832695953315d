"""The finers-tiny model family: a small Qwen2.5-VL with coordinate tokens, built from a config.

Checkpoints are ordinary Hugging Face Qwen2.5-VL folders (config, safetensors, tokenizer,
chat template, image processor), so `finers-rt export vlm|bundle` takes them like FineRS's.

Coordinate tokens: the tokenizer gets one added (non-special) token per even integer
0, 2, ..., `COORD_MAX` whose text is that number ("0", "2", ..., "1920"). They decode to plain
digits, so the runtime parser reads them like any other number, but a coordinate is then ONE
token (a classification), not three or four digit tokens. Targets are rounded to even values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finers_rt.errors import InputError

COORD_STEP = 2
COORD_MAX = 1920
_COORD_TEXT = re.compile(r"^(0|[1-9][0-9]*)$")


@dataclass(frozen=True)
class TinyVlmConfig:
    """Sizes of a finers-tiny VLM stage (LM 4 x 256 GQA 4/2, vision 4 x 128 by default)."""

    text_hidden: int = 256
    text_intermediate: int = 768
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    vision_depth: int = 4
    vision_hidden: int = 128
    vision_intermediate: int = 384
    vision_heads: int = 4
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    bpe_vocab_size: int = 640


TINY_STAGE = TinyVlmConfig()
# For unit tests: the smallest model that still has every part (GQA, window + full attention).
TEST_STAGE = TinyVlmConfig(text_hidden=64, text_intermediate=128, text_layers=2,
                           mrope_section=(2, 3, 3), vision_depth=2, vision_hidden=32,
                           vision_intermediate=64, vision_heads=2, fullatt_block_indexes=(1,))
MODEL_CONFIGS = {"finers-tiny": TINY_STAGE, "test": TEST_STAGE}


def coordinate_values() -> list[int]:
    """The numbers that have their own token: 0, COORD_STEP, ..., COORD_MAX."""
    return list(range(0, COORD_MAX + 1, COORD_STEP))


def quantize_coordinate(value: float) -> int:
    """Round a coordinate to the nearest value that has a token (clamped to 0..COORD_MAX)."""
    q = int(round(float(value) / COORD_STEP)) * COORD_STEP
    return max(0, min(COORD_MAX, q))


def coordinate_token_map(tokenizer) -> dict[int, int]:
    """{token id: numeric value} of the coordinate tokens of an HF tokenizer (empty if none)."""
    vocab = tokenizer.get_added_vocab()
    return {tid: int(text) for text, tid in vocab.items() if _COORD_TEXT.match(text)}


def make_initial_checkpoint(out_dir: str | Path, config: TinyVlmConfig | str = "finers-tiny",
                            seed: int = 0) -> Path:
    """Write a freshly initialised finers-tiny stage (HF folder) with coordinate tokens.

    Built by `finers_rt.export.checkpoints.make_random_qwen25vl` (BPE tokenizer, Qwen chat
    template, slow image processor), with the vocabulary enlarged for the coordinate tokens,
    which are then added to the saved tokenizer. Embeddings are re-initialised with std 0.02
    so text and image-token inputs start on a similar scale.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from finers_rt.export.checkpoints import RandomVlmSpec, build_tokenizer, make_random_qwen25vl

    if isinstance(config, str):
        if config not in MODEL_CONFIGS:
            raise InputError(f"unknown model config '{config}', expected one of {sorted(MODEL_CONFIGS)}")
        config = MODEL_CONFIGS[config]
    tok, _ = build_tokenizer(config.bpe_vocab_size)
    n_tokens = tok.get_vocab_size(with_added_tokens=True) + len(coordinate_values())
    spec = RandomVlmSpec(
        name="finers-tiny", text_hidden=config.text_hidden,
        text_intermediate=config.text_intermediate, text_layers=config.text_layers,
        text_heads=config.text_heads, text_kv_heads=config.text_kv_heads,
        mrope_section=config.mrope_section, vocab_size=-(-n_tokens // 64) * 64,
        vision_depth=config.vision_depth, vision_hidden=config.vision_hidden,
        vision_intermediate=config.vision_intermediate, vision_heads=config.vision_heads,
        fullatt_block_indexes=config.fullatt_block_indexes, bpe_vocab_size=config.bpe_vocab_size)
    out = make_random_qwen25vl(out_dir, spec, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.add_tokens([str(v) for v in coordinate_values()])
    tokenizer.save_pretrained(str(out))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=gen) * 0.02)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def describe(config: TinyVlmConfig) -> str:
    return (f"LM {config.text_layers}x{config.text_hidden} (GQA {config.text_heads}/"
            f"{config.text_kv_heads}), vision {config.vision_depth}x{config.vision_hidden}")


__all__ = ["TinyVlmConfig", "MODEL_CONFIGS", "coordinate_values", "quantize_coordinate",
           "coordinate_token_map", "make_initial_checkpoint"]
