"""Tokenizer of a VLM stage (HF `tokenizer.json` through `tokenizers`) and prompt assembly.

The prompt of a stage is `before_image + image_token * N + after_image + TEXT + after_text`
(manifest `chat`). It is tokenised in two parts: the *prefix* (through `<|vision_end|>`, the same
for every question on one image, hence cacheable) and the *question* (`TEXT + after_text`).
Special tokens sit at the cut, so the two parts concatenated equal tokenising the whole string
(`check_split_matches_whole` verifies it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from finers_rt.errors import ArtifactError, InputError


@dataclass(frozen=True)
class PromptParts:
    """Token ids of one prompt: `prefix_ids [P]` and `question_ids [Q]`, int64."""

    prefix_ids: np.ndarray
    question_ids: np.ndarray

    @property
    def input_ids(self) -> np.ndarray:
        return np.concatenate([self.prefix_ids, self.question_ids])


class StageTokenizer:
    """`tokenizers.Tokenizer` plus the stage's chat pieces. Encoding adds no special tokens of
    its own (Qwen adds none either); decoding can skip special tokens like HF."""

    def __init__(self, tokenizer, chat):
        self._tokenizer = tokenizer
        self.chat = chat
        self.image_token_id = self.token_id(chat.image_token)

    @classmethod
    def load(cls, path: str | os.PathLike, chat) -> "StageTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"tokenizer file {path} is missing")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ArtifactError(f"{path}: not a readable tokenizers file ({exc})") from None
        return cls(tokenizer, chat)

    def token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ArtifactError(f"tokenizer has no token '{token}' (the manifest's chat section "
                                "does not match this tokenizer)")
        return int(token_id)

    def encode(self, text: str) -> np.ndarray:
        """Token ids `[n]` int64 of `text`, special tokens recognised, none added."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def build_prompt(self, num_image_tokens: int, text: str) -> PromptParts:
        """Prefix ids (system + user turn up to and including `<|vision_end|>`, with
        `num_image_tokens` image pads) and question ids (`text + after_text`)."""
        if not isinstance(text, str):
            raise InputError(f"instruction text must be a str, got {type(text).__name__}")
        if self.chat.image_token in text:
            raise InputError(f"instruction text must not contain the image token {self.chat.image_token}")
        before = self.encode(self.chat.before_image)
        after = self.encode(self.chat.after_image)
        pads = np.full(num_image_tokens, self.image_token_id, dtype=np.int64)
        prefix = np.concatenate([before, pads, after])
        return PromptParts(prefix_ids=prefix, question_ids=self.encode(text + self.chat.after_text))

    def check_split_matches_whole(self, num_image_tokens: int, text: str) -> None:
        """Raise ArtifactError unless prefix + question ids equal tokenising the whole prompt."""
        parts = self.build_prompt(num_image_tokens, text)
        whole = self.encode(self.chat.render(num_image_tokens, text))
        if not np.array_equal(parts.input_ids, whole):
            raise ArtifactError("tokenising the prompt in two parts differs from tokenising it whole; "
                                "the chat pieces do not end/start at special tokens")
