"""Tolerant parsing of FineRS model output. Never raises; linear time in the text length.

The reference takes the first `{...}` without a closing brace inside (regex `{[^}]+}`), replaces
`]"` by `]`, tries JSON then a Python literal, and reads the first key containing "bbox" (4
numbers), the first two keys containing "points" (2 numbers each), "response", and the think text
`<think>([^<]+)</think>`. Numbers are truncated with `int()` exactly like the reference.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any

_THINK = re.compile(r"<think>([^<]+)</think>")
_NOT_FOUND = re.compile(r"\b(not\s+(be\s+)?found|no\s+such|not\s+(present|visible|there)|cannot\s+find|"
                        r"can't\s+find|does\s+not\s+exist|doesn't\s+exist|absent)\b")
_BARE_KEY = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)(\s*:)")
MAX_OBJECT_CHARS = 100_000  # a FineRS answer object is ~100 chars; longer is not an answer


@dataclass(frozen=True)
class ParsedOutput:
    """What a stage said. Coordinates are in the stage's input frame (e.g. 1920x1080 for GSE).

    bbox_xyxy: (x1, y1, x2, y2) ints or None; points_xy: ((x, y), (x, y)) or None;
    response: str or None (None = no "response" key); think: str or None.
    """

    bbox_xyxy: tuple[int, int, int, int] | None = None
    points_xy: tuple[tuple[int, int], tuple[int, int]] | None = None
    response: str | None = None
    think: str | None = None
    parsed: bool = False  # a JSON/Python object was found and read

    @property
    def has_answer(self) -> bool:
        return self.bbox_xyxy is not None


def first_flat_object(text: str) -> str | None:
    """The reference's `re.search(r'{[^}]+}', text)`, in guaranteed linear time."""
    start = text.find("{")
    while start != -1:
        end = text.find("}", start + 1)
        if end == -1:
            return None
        if end > start + 1:
            return text[start:end + 1]
        start = text.find("{", start + 1)
    return None


def _load_object(snippet: str) -> dict | None:
    if len(snippet) > MAX_OBJECT_CHARS:
        return None
    snippet = snippet.replace(']"', "]")
    # JSON, then a Python literal (the reference), then a Python literal with bare keys quoted:
    # the FineRS LPR example itself writes `response: '...'` unquoted, and models copy it.
    attempts = ((json.loads, snippet), (ast.literal_eval, snippet),
                (ast.literal_eval, _BARE_KEY.sub(r"\1'\2'\3", snippet)))
    for loader, candidate in attempts:
        try:
            data = loader(candidate)
        except Exception:  # JSONDecodeError, SyntaxError, ValueError, RecursionError, MemoryError...
            continue
        return data if isinstance(data, dict) else None
    return None


def _as_int(value: Any) -> int | None:
    """int() like the reference (truncation), but None instead of an exception."""
    try:
        number = float(value)
        if not math.isfinite(number):
            return None
        return int(number) if not isinstance(value, int) else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _numbers(value: Any, count: int) -> tuple[int, ...] | None:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return None
    out = tuple(_as_int(v) for v in value)
    return None if any(v is None for v in out) else out


def parse_output(text: Any) -> ParsedOutput:
    """Parse a stage's generated text. Anything unparsable yields fields set to None."""
    if not isinstance(text, str):
        return ParsedOutput()
    think_match = _THINK.search(text)
    think = think_match.group(1) if think_match else None
    snippet = first_flat_object(text)
    data = _load_object(snippet) if snippet else None
    if data is None:
        return ParsedOutput(think=think)
    keys = [k for k in data.keys() if isinstance(k, str)]
    bbox_key = next((k for k in keys if "bbox" in k.lower()), None)
    bbox = _numbers(data[bbox_key], 4) if bbox_key is not None else None
    point_keys = [k for k in keys if "points" in k.lower()][:2]
    points = None
    if len(point_keys) == 2:
        p1, p2 = _numbers(data[point_keys[0]], 2), _numbers(data[point_keys[1]], 2)
        if p1 is not None and p2 is not None:
            points = (p1, p2)
    response = data.get("response")
    if response is not None and not isinstance(response, str):
        response = json.dumps(response) if isinstance(response, (list, dict)) else str(response)
    return ParsedOutput(bbox_xyxy=bbox, points_xy=points, response=response, think=think, parsed=True)


def says_not_found(response: str | None) -> bool:
    """True when a response states the object is absent ("not found", "no such ..." ...)."""
    return bool(response) and _NOT_FOUND.search(response.lower()) is not None
