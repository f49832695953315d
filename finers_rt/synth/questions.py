"""Questions about one target in a synthetic scene, FineRS-4k style.

A question names its target with a description that is unique in the scene: a noun phrase of
some attribute fields ("the striped red star"), optionally tied to a uniquely described anchor
("... left of the blue circle") or to an image region ("... in the top-left of the image").
Reasoning/option questions never use the asked field in the target's own description.

Spatial conventions (x right, y down, object centres): B is "left of" A when B's centre lies
in a 62-degree cone pointing left from A's centre (|dy| <= 0.6 * -dx); a description using a
relation is only emitted when no other object matching the target's phrase lies in the wider
100-degree cone (|dy| <= 1.2 * -dx), so the expression is unambiguous. Region answers are
single tokens ("top-left") so the official open-QA word match can score them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from finers_rt.synth.objects import COLORS, PATTERNS, SHAPES, SceneObject

QTYPE_MIX = {"referring": 0.39, "option": 0.30, "reasoning": 0.31}
ATTRIBUTE_MIX = {"colors": 0.30, "shape": 0.30, "position": 0.25, "others": 0.15}
FIELD_OF_ATTRIBUTE = {"colors": "color", "shape": "shape", "others": "pattern"}
VOCAB = {"color": tuple(COLORS), "shape": SHAPES, "pattern": PATTERNS}
REGIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left",
           "bottom", "bottom-right")
REGION_PHRASE = {"top-left": "in the top-left of the image", "top": "at the top of the image",
                 "top-right": "in the top-right of the image",
                 "left": "on the left side of the image", "center": "in the center of the image",
                 "right": "on the right side of the image",
                 "bottom-left": "in the bottom-left of the image",
                 "bottom": "at the bottom of the image",
                 "bottom-right": "in the bottom-right of the image"}
DIRECTIONS = ("left of", "right of", "above", "below")
REFERRING_ANSWER = "The object is found."
STRICT_SLOPE = 0.6
WIDE_SLOPE = 1.2
REGION_MARGIN = 0.04   # fraction of W / H a target keeps from region borders
_ALL_FIELDS = ("pattern", "color", "shape")
_MAX_ANCHORS = 8


@dataclass(frozen=True)
class Question:
    """One generated question: exactly one target object."""

    q_type: str
    attribute: str
    question: str
    answer: str
    target: int
    options: str | None = None


def noun_phrase(obj: SceneObject, fields: tuple[str, ...]) -> str:
    """'the striped red star' from the chosen fields (order pattern, colour, shape)."""
    words = [obj.value(f) for f in ("pattern", "color") if f in fields]
    words.append(obj.shape if "shape" in fields else "object")
    return "the " + " ".join(words)


def _matches(a: SceneObject, b: SceneObject, fields: tuple[str, ...]) -> bool:
    return all(a.value(f) == b.value(f) for f in fields)


def _field_sets(allowed: tuple[str, ...], required: str | None,
                rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Non-empty subsets of `allowed` containing `required`, smallest first (random ties)."""
    out = []
    for k in range(1, len(allowed) + 1):
        level = [c for c in combinations(allowed, k) if required is None or required in c]
        out.extend(level[i] for i in rng.permutation(len(level)))
    return out


def unique_fields(t: int, objs: list[SceneObject], allowed: tuple[str, ...],
                  required: str | None, rng: np.random.Generator) -> tuple[str, ...] | None:
    """The smallest field set naming objs[t] uniquely, or None."""
    for fields in _field_sets(allowed, required, rng):
        if not any(_matches(o, objs[t], fields) for i, o in enumerate(objs) if i != t):
            return fields
    return None


def direction_of(anchor: SceneObject, obj: SceneObject, slope: float) -> str | None:
    """The direction of `obj` seen from `anchor` if it lies in that direction's cone."""
    dx = obj.center_xy[0] - anchor.center_xy[0]
    dy = obj.center_xy[1] - anchor.center_xy[1]
    for name, along, across in (("left of", -dx, dy), ("right of", dx, dy),
                                ("above", -dy, dx), ("below", dy, dx)):
        if along > 0 and abs(across) <= slope * along:
            return name
    return None


def _distance(a: SceneObject, b: SceneObject) -> float:
    return float(np.hypot(a.center_xy[0] - b.center_xy[0], a.center_xy[1] - b.center_xy[1]))


def _nearest_anchors(t: int, objs: list[SceneObject]) -> list[int]:
    order = sorted((i for i in range(len(objs)) if i != t),
                   key=lambda i: (_distance(objs[t], objs[i]), i))
    return order[:_MAX_ANCHORS]


def relation_description(t: int, objs: list[SceneObject], allowed: tuple[str, ...],
                         required: str | None, rng: np.random.Generator) -> str | None:
    """'the red star left of the blue circle' naming objs[t] uniquely, or None.

    The anchor is uniquely named by its own fields; no other object matching the target's
    phrase lies in the wide cone of that direction. Phrases that need the relation (not
    unique on their own) are preferred.
    """
    for a in _nearest_anchors(t, objs):
        direction = direction_of(objs[a], objs[t], STRICT_SLOPE)
        if direction is None:
            continue
        anchor_fields = unique_fields(a, objs, _ALL_FIELDS, None, rng)
        if anchor_fields is None:
            continue
        candidates = _field_sets(allowed, required, rng)
        needing = [f for f in candidates if any(
            _matches(o, objs[t], f) for i, o in enumerate(objs) if i != t)]
        for fields in needing + [f for f in candidates if f not in needing]:
            rivals = [o for i, o in enumerate(objs)
                      if i not in (t, a) and _matches(o, objs[t], fields)]
            if all(direction_of(objs[a], o, WIDE_SLOPE) != direction for o in rivals):
                anchor = noun_phrase(objs[a], anchor_fields)
                return f"{noun_phrase(objs[t], fields)} {direction} {anchor}"
    return None


def region_of(obj: SceneObject, size_wh: tuple[int, int], margin: float) -> str | None:
    """3x3 region name of the object's centre; None if it lies within `margin` (fraction of
    W / H) of an inner region border, where the region would be ambiguous."""
    idx = []
    for c, extent in zip(obj.center_xy, size_wh):
        u = c / extent
        if min(abs(u - 1 / 3), abs(u - 2 / 3)) < margin:
            return None
        idx.append(min(2, int(u * 3)))
    return REGIONS[idx[1] * 3 + idx[0]]


def _near_region(obj: SceneObject, region: str, size_wh: tuple[int, int],
                 margin: float) -> bool:
    """True if the object's centre lies in `region` grown by `margin` on every side."""
    k = REGIONS.index(region)
    for c, extent, cell in zip(obj.center_xy, size_wh, (k % 3, k // 3)):
        u = c / extent
        if not (cell / 3 - margin <= u <= (cell + 1) / 3 + margin):
            return False
    return True


def region_description(t: int, objs: list[SceneObject], size_wh: tuple[int, int],
                       allowed: tuple[str, ...], required: str | None,
                       rng: np.random.Generator) -> str | None:
    """'the red star in the top-left of the image' naming objs[t] uniquely, or None.

    No other object matching the phrase may lie in the region or within REGION_MARGIN of it.
    """
    region = region_of(objs[t], size_wh, REGION_MARGIN)
    if region is None:
        return None
    for fields in _field_sets(allowed, required, rng):
        rivals = [o for i, o in enumerate(objs) if i != t and _matches(o, objs[t], fields)]
        if not any(_near_region(o, region, size_wh, REGION_MARGIN) for o in rivals):
            return f"{noun_phrase(objs[t], fields)} {REGION_PHRASE[region]}"
    return None


def describe(t: int, objs: list[SceneObject], size_wh: tuple[int, int],
             allowed: tuple[str, ...], required: str | None, spatial: bool,
             rng: np.random.Generator) -> str | None:
    """A unique description of objs[t]; `spatial` demands a relation or a region in it.

    Without `spatial`, a plain phrase is used when unique (80% of the time tried first) and a
    relation/region otherwise.
    """
    plain_first = not spatial and rng.random() < 0.8
    if plain_first:
        fields = unique_fields(t, objs, allowed, required, rng)
        if fields is not None:
            return noun_phrase(objs[t], fields)
    makers = (relation_description, region_description)
    for k in rng.permutation(2):
        if makers[k] is relation_description:
            text = relation_description(t, objs, allowed, required, rng)
        else:
            text = region_description(t, objs, size_wh, allowed, required, rng)
        if text is not None:
            return text
    if not spatial and not plain_first:
        fields = unique_fields(t, objs, allowed, required, rng)
        if fields is not None:
            return noun_phrase(objs[t], fields)
    return None


def _neighbour_question(t: int, objs: list[SceneObject],
                        rng: np.random.Generator) -> tuple[str, str] | None:
    """('the object directly left of the blue circle', field) where objs[t] is, beyond
    doubt, the nearest object in that direction from a uniquely named anchor."""
    field = ("color", "shape", "pattern")[int(rng.choice(3, p=[0.45, 0.45, 0.10]))]
    for a in _nearest_anchors(t, objs):
        direction = direction_of(objs[a], objs[t], STRICT_SLOPE)
        if direction is None:
            continue
        reach = 1.5 * _distance(objs[a], objs[t])
        crowded = any(direction_of(objs[a], o, WIDE_SLOPE) == direction
                      and _distance(objs[a], o) < reach
                      for i, o in enumerate(objs) if i not in (t, a))
        anchor_fields = None if crowded else unique_fields(a, objs, _ALL_FIELDS, None, rng)
        if anchor_fields is not None:
            return f"the object directly {direction} {noun_phrase(objs[a], anchor_fields)}", field
    return None


def _ask(field: str, desc: str) -> str:
    if field == "color":
        return f"What color is {desc}?"
    if field == "shape":
        return f"What shape is {desc}?"
    if field == "pattern":
        return f"Which pattern does {desc} have?"
    return f"In which part of the image is {desc}?"


def _options(correct: str, vocab: tuple[str, ...], seen: list[str],
             rng: np.random.Generator) -> tuple[str, str]:
    """('(A) red (B) blue (C) green (D) yellow', letter of `correct`); distractors prefer
    values present in the scene so that the options are plausible."""
    present = sorted({v for v in seen if v != correct}, key=vocab.index)
    absent = [v for v in vocab if v != correct and v not in present]
    pool = [present[i] for i in rng.permutation(len(present))]
    pool += [absent[i] for i in rng.permutation(len(absent))]
    choices = [correct] + pool[:3]
    choices = [choices[i] for i in rng.permutation(len(choices))]
    letters = "ABCD"
    text = " ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))
    return text, letters[choices.index(correct)]


def make_question(q_type: str, attribute: str, t: int, objs: list[SceneObject],
                  size_wh: tuple[int, int], rng: np.random.Generator) -> Question | None:
    """A question of this type and attribute whose target is objs[t], or None if the scene
    offers no unambiguous wording for that target."""
    if q_type == "referring":
        required = FIELD_OF_ATTRIBUTE.get(attribute)
        desc = describe(t, objs, size_wh, _ALL_FIELDS, required, attribute == "position", rng)
        return None if desc is None else Question(q_type, attribute, desc, REFERRING_ANSWER, t)
    if attribute == "position":
        if rng.random() < 0.5:
            found = _neighbour_question(t, objs, rng)
            if found is None:
                return None
            desc, field = found
            answer, vocab = objs[t].value(field), VOCAB[field]
            seen = [o.value(field) for o in objs]
        else:
            field, answer, vocab = "region", region_of(objs[t], size_wh, REGION_MARGIN), REGIONS
            fields = unique_fields(t, objs, _ALL_FIELDS, None, rng)
            if answer is None or fields is None:
                return None
            desc = noun_phrase(objs[t], fields)
            seen = [r for r in (region_of(o, size_wh, 0.0) for o in objs) if r]
    else:
        field = FIELD_OF_ATTRIBUTE[attribute]
        allowed = tuple(f for f in _ALL_FIELDS if f != field)
        desc = describe(t, objs, size_wh, allowed, None, False, rng)
        if desc is None:
            return None
        answer, vocab = objs[t].value(field), VOCAB[field]
        seen = [o.value(field) for o in objs]
    text = _ask(field, desc)
    if q_type == "reasoning":
        return Question(q_type, attribute, text, answer, t)
    options, letter = _options(answer, vocab, seen, rng)
    return Question(q_type, attribute, text, letter, t, options)


def ask_questions(objs: list[SceneObject], size_wh: tuple[int, int], n: int,
                  rng: np.random.Generator, exclude: set[int] | frozenset[int] = frozenset()
                  ) -> list[Question]:
    """Up to n questions about distinct targets; type and attribute drawn from QTYPE_MIX and
    ATTRIBUTE_MIX. Every free object is tried as the target before the type and attribute
    are redrawn, so hard-to-word kinds (position) keep their share. Objects whose index is in
    `exclude` are never targets (questions already asked about them elsewhere)."""
    q_types, q_p = list(QTYPE_MIX), list(QTYPE_MIX.values())
    attrs, a_p = list(ATTRIBUTE_MIX), list(ATTRIBUTE_MIX.values())
    used: set[int] = set(exclude)
    out: list[Question] = []
    for _ in range(n):
        for _attempt in range(4):
            q_type = q_types[int(rng.choice(len(q_types), p=q_p))]
            attribute = attrs[int(rng.choice(len(attrs), p=a_p))]
            free = [int(i) for i in rng.permutation(len(objs)) if int(i) not in used]
            q = next((q for q in (make_question(q_type, attribute, t, objs, size_wh, rng)
                                  for t in free) if q is not None), None)
            if q is not None:
                out.append(q)
                used.add(q.target)
                break
    return out
