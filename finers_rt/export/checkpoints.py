"""Tiny random Qwen2.5-VL checkpoints in Hugging Face format, and the HF reference loader.

Nothing can be downloaded here, so tests, benchmarks and the exporter work on checkpoints built
from a small `RandomVlmSpec`: a real `Qwen2_5_VLConfig`, random weights re-initialised so that
greedy decoding is not degenerate, a byte-level BPE tokenizer trained on a fixed FineRS corpus
with the Qwen special tokens, the Qwen2-VL chat template and a slow `Qwen2VLImageProcessor`
config. `load_reference` loads such a folder (or a real one) as the torch reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from finers_rt.errors import ArtifactError, InputError, suggest

# Qwen2 special tokens in Qwen's own order (real ids 151643.. ; here they follow the BPE vocab).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The standard Qwen2-VL / Qwen2.5-VL chat template (default system prompt, image/video slots).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces).
_QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class RandomVlmSpec:
    """Sizes of a random Qwen2.5-VL. `vocab_size=None` means the tokenizer size rounded up to 64.

    head_dim = text_hidden / text_heads; `mrope_section` must sum to head_dim / 2.
    Vision: patch 14, temporal patch 2, merge 2 (the real Qwen2.5-VL values, fixed).
    """

    name: str
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    rope_theta: float = 1000000.0
    vocab_size: int | None = None
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_heads: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (1,)
    min_pixels: int = 3136
    max_pixels: int = 12845056
    repetition_penalty: float = 1.0
    bpe_vocab_size: int = 640

    def __post_init__(self) -> None:
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            raise InputError(f"spec {self.name}: hidden {self.text_hidden} / heads {self.text_heads} "
                             f"/ kv heads {self.text_kv_heads} must divide evenly")
        head_dim = self.text_hidden // self.text_heads
        if sum(self.mrope_section) * 2 != head_dim:
            raise InputError(f"spec {self.name}: mrope_section {list(self.mrope_section)} must sum "
                             f"to head_dim/2 = {head_dim // 2}")
        if self.vision_hidden % self.vision_heads:
            raise InputError(f"spec {self.name}: vision hidden {self.vision_hidden} not divisible "
                             f"by {self.vision_heads} heads")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.vision_depth]
        if bad:
            raise InputError(f"spec {self.name}: fullatt_block_indexes {bad} outside "
                             f"0..{self.vision_depth - 1}")


_TINY = RandomVlmSpec(name="tiny")
SPECS: dict[str, RandomVlmSpec] = {
    "tiny": _TINY,
    # other GQA ratio (3:1), MHA-free, different hidden
    "tiny-gqa3": replace(_TINY, name="tiny-gqa3", text_hidden=96, text_heads=6, text_kv_heads=2,
                         mrope_section=(2, 3, 3), fullatt_block_indexes=(0,)),
    # other mrope split, full attention first, three vision blocks
    "tiny-mrope": replace(_TINY, name="tiny-mrope", text_hidden=64, text_heads=2, text_kv_heads=1,
                          mrope_section=(8, 4, 4), vision_depth=3, fullatt_block_indexes=(0, 2)),
    # a scaled-down Qwen2.5-VL-7B: GQA 7:1, real vocab, 2:3:3 M-RoPE, window + full-attention
    # vision blocks like [7, 15, 23, 31] of 32, generation_config repetition_penalty 1.05.
    "7b-shaped": RandomVlmSpec(
        name="7b-shaped", text_hidden=224, text_intermediate=512, text_layers=4, text_heads=14,
        text_kv_heads=2, mrope_section=(2, 3, 3), vocab_size=152064, vision_depth=4,
        vision_hidden=64, vision_intermediate=128, vision_heads=4, window_size=112,
        fullatt_block_indexes=(1, 3), repetition_penalty=1.05),
    # compute-bound benchmarks (bench/): the Qwen2.5-0.5B text tower (24 x 896, GQA 14:2,
    # MLP 4864, real vocab 151936; head_dim 64 so M-RoPE 2:3:3 = (8, 12, 12); untied lm_head like
    # Qwen2.5-VL) with a small vision tower.
    "0.5b-shaped": RandomVlmSpec(
        name="0.5b-shaped", text_hidden=896, text_intermediate=4864, text_layers=24, text_heads=14,
        text_kv_heads=2, mrope_section=(8, 12, 12), vocab_size=151936, vision_depth=2,
        vision_hidden=64, vision_intermediate=128, vision_heads=4, window_size=112,
        fullatt_block_indexes=(1,)),
}


def get_spec(name: str) -> RandomVlmSpec:
    """Return the named spec or raise InputError with a suggestion."""
    if name not in SPECS:
        raise InputError(f"unknown random VLM spec '{name}', expected one of {sorted(SPECS)}"
                         + suggest(name, SPECS))
    return SPECS[name]


def _tokenizer_corpus() -> list[str]:
    """A fixed, deterministic training corpus: FineRS prompts, digits, JSON answers, words."""
    from finers_rt.export import _corpus

    return _corpus.corpus_lines()


def build_tokenizer(bpe_vocab_size: int):
    """Train a byte-level BPE (Qwen pre-tokenization) and add the Qwen special tokens.

    Returns (tokenizers.Tokenizer, {special token: id}); special ids follow the BPE vocab.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    return tok, ids


def _make_config(spec: RandomVlmSpec, vocab_size: int, ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=vocab_size, hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
        rope_theta=spec.rope_theta, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": list(spec.mrope_section)},
        tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], use_cache=True, torch_dtype="float32")
    vision = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate, num_heads=spec.vision_heads,
        out_hidden_size=spec.text_hidden, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=spec.window_size, tokens_per_second=2,
        fullatt_block_indexes=list(spec.fullatt_block_indexes), in_channels=3)
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], pad_token_id=ids["<|endoftext|>"], **text)


def reinit_weights(model, seed: int) -> None:
    """Linears ~ N(0, 1/fan_in), embeddings ~ N(0, 1), biases small, norms 1 (in place).

    HF's default std 0.02 gives near-uniform logits on which greedy decoding repeats one token,
    so parity checks would compare nothing.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                std = 1.0 / math.sqrt(module.in_features)
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.02)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            elif isinstance(module, torch.nn.Conv3d):
                std = 1.0 / math.sqrt(module.weight[0].numel())
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)


def _save_tokenizer(out_dir: Path, tok, ids: dict[str, int]) -> None:
    from transformers import Qwen2TokenizerFast

    fast = Qwen2TokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        errors="replace", model_max_length=32768, clean_up_tokenization_spaces=False,
        split_special_tokens=False)
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    (out_dir / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2) + "\n")


def make_random_qwen25vl(out_dir: str | Path, spec: RandomVlmSpec | str, seed: int = 0) -> Path:
    """Write a random Qwen2.5-VL checkpoint folder in HF format and return its path.

    Files: config.json, model.safetensors, generation_config.json, preprocessor_config.json,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.json.
    Deterministic for a given (spec, seed).
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    spec = get_spec(spec) if isinstance(spec, str) else spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok, ids = build_tokenizer(spec.bpe_vocab_size)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = spec.vocab_size if spec.vocab_size is not None else -(-n_tok // 64) * 64
    if vocab_size < n_tok:
        raise InputError(f"spec {spec.name}: vocab_size {vocab_size} < tokenizer size {n_tok}")
    config = _make_config(spec, vocab_size, ids)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    reinit_weights(model, seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    del model
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        repetition_penalty=spec.repetition_penalty, do_sample=False,
    ).save_pretrained(str(out_dir))
    Qwen2VLImageProcessor(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=14,
        temporal_patch_size=2, merge_size=2, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
    ).save_pretrained(str(out_dir))
    _save_tokenizer(out_dir, tok, ids)
    return out_dir


def load_processor(hf_dir: str | Path):
    """Build the Qwen2.5-VL processor (tokenizer + SLOW image processor, no video processor).

    `AutoProcessor` insists on a video processor that needs torchvision; images never use it.
    """
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from finers_rt.export._processor import ImageTextProcessor

    hf_dir = Path(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    image_processor = Qwen2VLImageProcessor.from_pretrained(str(hf_dir))
    template = tokenizer.chat_template
    path = hf_dir / "chat_template.json"
    if path.is_file():
        template = json.loads(path.read_text())["chat_template"]
    if template is None:
        raise ArtifactError(f"{hf_dir}: no chat template in tokenizer_config.json or chat_template.json")
    return ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=template)


def load_reference(hf_dir: str | Path):
    """Load (model, processor) as the float32 eager-attention torch reference, in eval mode."""
    import torch

    from finers_rt.export.pointer import load_vlm  # pointer checkpoints get their subclass

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ArtifactError(f"{hf_dir} is not a Hugging Face checkpoint folder (no config.json)")
    model = load_vlm(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return model, load_processor(hf_dir)
