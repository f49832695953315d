"""One synthetic FineRS scene: background + many small objects + questions, from a seed.

Scene `index` of dataset `seed` draws everything from
`np.random.default_rng(np.random.SeedSequence([seed, index]))`, so a scene is the same on
every machine and whatever the number of worker processes.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from finers_rt.errors import InputError
from finers_rt.synth.background import render_background
from finers_rt.synth.objects import (COLORS, MAX_TILT_DEG, MIN_PATTERN_EXTENT_PX,
                                     PATTERN_WEIGHTS, PATTERNS, SHAPES, SceneObject,
                                     extent_px, main_color_fraction, make_object,
                                     paint_object, radius_for_area)
from finers_rt.synth.questions import ask_questions

# Object area as a percent of the image, drawn log-uniformly: with the rasterised outline this
# gives about 40% XXS (< 0.017), 35% XS and 25% S (> 0.055) targets, like FineRS-4k's tiny
# objects (at 3840x2160: ~18 to ~320 px wide).
AREA_PERCENT_RANGE = (0.004, 0.12)
OBJECTS_PER_SCENE = (35, 70)        # inclusive
QUESTIONS_PER_SCENE = (1, 2, 3)
QUESTIONS_P = (0.3, 0.4, 0.3)
MIN_SIZE_WH = (64, 64)
MIN_MAIN_COLOR_FRACTION = 0.6   # a patterned object too small to show mostly its colour is solid
MAX_SIZE_PX = 8192 * 8192


def image_name(index: int) -> str:
    """File name of scene `index` under OUT_DIR/images/."""
    return f"scene_{index:06d}.jpg"


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of scene `index` in dataset `seed`."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def check_size_wh(size_wh: Any) -> tuple[int, int]:
    """Validate an image size (width, height) and return it as two ints."""
    ok = (isinstance(size_wh, (tuple, list)) and len(size_wh) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size_wh))
    if not ok:
        raise InputError(f"size_wh must be (width, height) as two ints, got {size_wh!r}")
    w, h = int(size_wh[0]), int(size_wh[1])
    if w < MIN_SIZE_WH[0] or h < MIN_SIZE_WH[1] or w * h > MAX_SIZE_PX:
        raise InputError(f"image size must be at least {MIN_SIZE_WH[0]}x{MIN_SIZE_WH[1]} and "
                         f"at most {MAX_SIZE_PX} pixels, got {w}x{h}")
    return w, h


def _boxes_clear(box: np.ndarray, placed: np.ndarray) -> bool:
    """True if box [4] (x1, y1, x2, y2) overlaps none of placed [N, 4]."""
    if placed.size == 0:
        return True
    return not bool(np.any((placed[:, 0] <= box[2]) & (box[0] <= placed[:, 2])
                           & (placed[:, 1] <= box[3]) & (box[1] <= placed[:, 3])))


def layout_objects(rng: np.random.Generator, size_wh: tuple[int, int]
                   ) -> tuple[list[SceneObject], list[float], list[int]]:
    """Place non-overlapping objects (a gap of max(4, r/2) px keeps them apart).

    Each scene uses a random subset of the colours and shapes so that many objects share
    attributes with each other (distractors). A pattern that would leave less than
    MIN_MAIN_COLOR_FRACTION of the object in its main colour becomes 'solid'.
    Returns (objects, radii_px, stripe phases).
    """
    w, h = size_wh
    colors = [list(COLORS)[i] for i in rng.choice(len(COLORS), int(rng.integers(4, 8)), False)]
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), int(rng.integers(4, 8)), False)]
    n = int(rng.integers(OBJECTS_PER_SCENE[0], OBJECTS_PER_SCENE[1] + 1))
    lo, hi = (math.log(v) for v in AREA_PERCENT_RANGE)
    objs: list[SceneObject] = []
    radii: list[float] = []
    phases: list[int] = []
    placed = np.zeros((0, 4), dtype=np.float64)
    for _ in range(n):
        color = colors[int(rng.integers(len(colors)))]
        shape = shapes[int(rng.integers(len(shapes)))]
        area_px = math.exp(lo + (hi - lo) * float(rng.random())) / 100.0 * w * h
        radius = radius_for_area(shape, area_px)
        pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=PATTERN_WEIGHTS))]
        if 2 * radius < MIN_PATTERN_EXTENT_PX:
            pattern = "solid"
        tilt = 0.0 if shape == "circle" else MAX_TILT_DEG * (2 * float(rng.random()) - 1)
        phase = int(rng.integers(4))
        extent = extent_px(shape, radius) + 2
        reach = extent + max(4.0, radius / 2)
        if 2 * extent >= min(w, h):
            continue
        for _try in range(20):
            cx = float(rng.uniform(extent, w - extent))
            cy = float(rng.uniform(extent, h - extent))
            box = np.array([cx - reach, cy - reach, cx + reach, cy + reach])
            if _boxes_clear(box, placed):
                placed = np.vstack([placed, box])
                obj = make_object(color, shape, pattern, (cx, cy), radius, tilt, size_wh)
                if main_color_fraction(obj, radius, phase) < MIN_MAIN_COLOR_FRACTION:
                    obj = make_object(color, shape, "solid", (cx, cy), radius, tilt, size_wh)
                objs.append(obj)
                radii.append(radius)
                phases.append(phase)
                break
    return objs, radii, phases


def annotation_record(obj: SceneObject, q_type: str, attribute: str, question: str,
                      answer: str, options: str | None, image_path: str) -> dict[str, Any]:
    """A FineRS-4k annotation record (the JSON dict) for a question about `obj`."""
    record: dict[str, Any] = {"image_path": image_path, "Q-type": q_type, "Q": question,
                              "A": answer}
    if options is not None:
        record["options"] = options
    record["points"] = obj.points_xy.tolist()
    record["attribute"] = attribute
    record["area_percent"] = obj.area_percent
    return record


EXTRA_QUESTION_STREAM = 11  # SeedSequence([seed, index, 11]) draws a scene's extra questions


def render_scene_bgr(seed: int, index: int, size_wh: tuple[int, int], extra_questions: int = 0
                     ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """`generate_scene` with the image in BGR channel order (what the JPEG encoder takes,
    saving a full-image conversion per scene). Same pixels, channels reversed."""
    image, records, _ = _render(seed, index, size_wh, extra_questions)
    return image, records


def _render(seed: int, index: int, size_wh: tuple[int, int], extra_questions: int
            ) -> tuple[np.ndarray, list[dict[str, Any]], list[SceneObject]]:
    """(BGR image, records, every object) of one scene."""
    size_wh = check_size_wh(size_wh)
    if isinstance(extra_questions, bool) or not isinstance(extra_questions, int) or extra_questions < 0:
        raise InputError(f"extra_questions must be an integer >= 0, got {extra_questions!r}")
    rng = scene_rng(seed, index)
    image = render_background(rng, size_wh)  # muted random colours: channel order is moot
    objs, radii, phases = layout_objects(rng, size_wh)
    for obj, radius, phase in zip(objs, radii, phases):
        paint_object(image, obj, radius, phase, bgr=True)
    n_q = QUESTIONS_PER_SCENE[int(rng.choice(len(QUESTIONS_PER_SCENE), p=QUESTIONS_P))]
    questions = ask_questions(objs, size_wh, n_q, rng)
    if extra_questions:
        # A separate stream: the scene and its own questions stay exactly as without extras.
        extra_rng = np.random.default_rng(np.random.SeedSequence([seed, index, EXTRA_QUESTION_STREAM]))
        questions += ask_questions(objs, size_wh, extra_questions, extra_rng,
                                   exclude={q.target for q in questions})
    records = [annotation_record(objs[q.target], q.q_type, q.attribute, q.question, q.answer,
                                 q.options, image_name(index))
               for q in questions]
    return image, records, objs


def scene_objects(seed: int, index: int, size_wh: tuple[int, int] = (3840, 2160)
                  ) -> list[SceneObject]:
    """Every object of scene `index` of dataset `seed` (targets and distractors), exactly as
    `generate_scene` places them, without painting: for dense per-region supervision."""
    size_wh = check_size_wh(size_wh)
    rng = scene_rng(seed, index)
    render_background(rng, size_wh)  # draws from rng: the layout comes after it
    return layout_objects(rng, size_wh)[0]


def generate_scene(seed: int, index: int, size_wh: tuple[int, int] = (3840, 2160),
                   extra_questions: int = 0) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Generate scene `index` of dataset `seed` in memory.

    Returns (image uint8 [H, W, 3] RGB, C-contiguous; annotation records). Each record is a
    FineRS-4k annotation dict (`image_path` = `image_name(index)`, `points` = the target
    polygon as [[x, y], ...] integer pixels, `area_percent` = 100 * mask pixels / (W * H) of
    that polygon rasterised by `finers_rt.dataset.polygon_to_mask`). 1 to 3 questions about
    distinct targets; the same (seed, index, size_wh) always gives the same scene.
    `extra_questions` > 0 appends up to that many more questions about further distinct
    targets (same type/attribute mix, drawn from a separate random stream, so the image and
    the first records are unchanged): more supervised targets per rendered scene for training.
    """
    image, records, _ = generate_scene_objects(seed, index, size_wh, extra_questions)
    return image, records


def generate_scene_objects(seed: int, index: int, size_wh: tuple[int, int] = (3840, 2160),
                           extra_questions: int = 0
                           ) -> tuple[np.ndarray, list[dict[str, Any]], list[SceneObject]]:
    """`generate_scene` plus every object of the scene (targets and distractors, as
    `scene_objects` gives them), from one rendering."""
    image_bgr, records, objs = _render(seed, index, size_wh, extra_questions)
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB), records, objs
