"""Dense per-region supervision of a stage image (training only, never exported).

GSE must pick one tiny object among 35-70 in a scene; a single pointer target per question is
a thin signal for a vision tower trained from scratch. Every scene also says, for each merged
image token (one 28 px cell of the stage image), which colours, shapes and patterns are
painted there, and where the cell is. `DenseHead` reads the LM's final image-token states and
predicts both (multi-label attributes + the cell's column and row), so the states the
in-model pointer's keys are computed from learn "what is here" and "where am I" from ~300
labels per image instead of one.

Scene objects are rebuilt from the cache's seed with `finers_rt.synth.scene_objects` (the
generator is deterministic) and stored once per cache as `scene_objects.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finers_rt.errors import InputError
from finers_rt.metrics import is_box_inside_region
from finers_rt.synth import COLORS, PATTERNS, SHAPES, scene_objects

ATTRIBUTES = tuple(COLORS) + SHAPES + PATTERNS
# (name, slice of ATTRIBUTES) of each attribute field
ATTRIBUTE_GROUPS = (("colour", slice(0, len(COLORS))),
                    ("shape", slice(len(COLORS), len(COLORS) + len(SHAPES))),
                    ("pattern", slice(len(COLORS) + len(SHAPES), len(ATTRIBUTES))))
MAX_CELLS_PER_AXIS = 64
OBJECTS_FILE = "scene_objects.json"
_SCENE_INDEX = re.compile(r"(\d+)")


def scene_index(image_path: str) -> int:
    """Scene index from a synthetic record's image path ('scene_000123.jpg' -> 123)."""
    found = _SCENE_INDEX.findall(Path(image_path).stem)
    if not found:
        raise InputError(f"cannot tell the scene index of '{image_path}'")
    return int(found[-1])


def object_rows(objs, scene_wh: tuple[int, int]) -> list[list[float]]:
    """[x1, y1, x2, y2 (fractions of the image, half-open), attribute ids...] per object."""
    w, h = scene_wh
    rows = []
    for o in objs:
        x1, y1, x2, y2 = o.box_xyxy
        rows.append([x1 / w, y1 / h, (x2 + 1) / w, (y2 + 1) / h,
                     ATTRIBUTES.index(o.color), ATTRIBUTES.index(o.shape),
                     ATTRIBUTES.index(o.pattern)])
    return rows


def ensure_scene_objects(cache_dir: str | Path, log=None) -> dict[int, list[list[float]]]:
    """{scene index: object rows} of a training cache, built on first use and saved."""
    folder = Path(cache_dir)
    path = folder / OBJECTS_FILE
    if path.is_file():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    info = json.loads((folder / "records.json").read_text())
    scene_wh = tuple(info["sizes"]["scene_size_wh"])
    indices = sorted({scene_index(e["record"]["image_path"]) for e in info["entries"]})
    table = {}
    for n, index in enumerate(indices):
        table[index] = object_rows(scene_objects(int(info["seed"]), index, scene_wh), scene_wh)
        if log and (n + 1) % 100 == 0:
            log(f"scene objects: {n + 1}/{len(indices)}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(k): v for k, v in table.items()}))
    tmp.replace(path)
    return table


def crop_rows(rows: list[list[float]], crop_xyxy, scene_wh: tuple[int, int]) -> list[list[float]]:
    """`object_rows` of a scene (fractions of the scene) -> the objects that overlap the crop
    `crop_xyxy` (original pixels, half-open), in fractions of the crop, clipped to [0, 1]:
    the rows `cell_targets` takes for an LPR crop."""
    w, h = scene_wh
    x1, y1, x2, y2 = (float(v) for v in crop_xyxy)
    cw, ch = x2 - x1, y2 - y1
    if cw <= 0 or ch <= 0:
        raise InputError(f"crop {tuple(crop_xyxy)} has no pixels")
    out = []
    for fx1, fy1, fx2, fy2, *attrs in rows:
        bx1, bx2 = (fx1 * w - x1) / cw, (fx2 * w - x1) / cw
        by1, by2 = (fy1 * h - y1) / ch, (fy2 * h - y1) / ch
        if bx2 <= 0 or by2 <= 0 or bx1 >= 1 or by1 >= 1:
            continue
        out.append([max(0.0, bx1), max(0.0, by1), min(1.0, bx2), min(1.0, by2), *attrs])
    return out


def cell_targets(rows: list[list[float]], grid_rc: tuple[int, int]) -> np.ndarray:
    """[rows * cols, len(ATTRIBUTES)] float32 multi-hot: the attributes of every object whose
    box overlaps each cell (raster order, the processor's merged-token order)."""
    n_rows, n_cols = grid_rc
    out = np.zeros((n_rows, n_cols, len(ATTRIBUTES)), dtype=np.float32)
    for x1, y1, x2, y2, *attrs in rows:
        c1, c2 = _cell_span(x1, x2, n_cols)
        r1, r2 = _cell_span(y1, y2, n_rows)
        out[r1:r2 + 1, c1:c2 + 1, [int(a) for a in attrs]] = 1.0
    return out.reshape(n_rows * n_cols, len(ATTRIBUTES))


def _cell_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """First and last of `n` cells that the half-open fraction interval [lo, hi) overlaps."""
    first = min(n - 1, int(lo * n))
    return first, max(first, min(n - 1, int(np.ceil(hi * n)) - 1))


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE over the attributes, scaled to a sum over attributes / 3 (the three
    fields), so it reads like one CE per field."""
    return (F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            * len(ATTRIBUTES) / len(ATTRIBUTE_GROUPS))


def attribute_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per field: argmax accuracy over the cells holding exactly one value of that field."""
    out = {}
    for name, group in ATTRIBUTE_GROUPS:
        one = labels[:, group].sum(1) == 1
        out[name] = (float((logits[one, group].argmax(1) == labels[one, group].argmax(1)).mean())
                     if one.any() else 0.0)
    return out


class DenseHead(torch.nn.Module):
    """Per image token: attribute logits (multi-label) and the cell's column / row."""

    def __init__(self, hidden: int):
        super().__init__()
        self.attributes = torch.nn.Linear(hidden, len(ATTRIBUTES))
        self.position = torch.nn.Linear(hidden, 2 * MAX_CELLS_PER_AXIS)

    def forward(self, hidden: torch.Tensor, image_spans: torch.Tensor,
                image_grid_thw: torch.Tensor, labels: torch.Tensor, merge: int) -> torch.Tensor:
        """hidden [B, S, H] (last layer); image_spans [B, 2] (start, count); labels [B, N, A]
        (`cell_targets` rows, padded) -> `attribute_loss` + 0.5 x
        the column and row CE, mean over the images."""
        losses = []
        for b, start, count, n_rows, n_cols in image_grids(image_spans, image_grid_thw, merge):
            if max(n_rows, n_cols) > MAX_CELLS_PER_AXIS:
                raise InputError(f"a {n_rows}x{n_cols} image-token grid has more than "
                                 f"{MAX_CELLS_PER_AXIS} cells on a side (the position head's limit)")
            states = hidden[b, start:start + count]
            attr = attribute_loss(self.attributes(states), labels[b, :count])
            pos = self.position(states).view(count, 2, MAX_CELLS_PER_AXIS)
            cells = torch.arange(count, device=states.device)
            where = (F.cross_entropy(pos[:, 0], cells % n_cols)
                     + F.cross_entropy(pos[:, 1], cells // n_cols))
            losses.append(attr + 0.5 * where)
        return torch.stack(losses).mean() if losses else hidden.sum() * 0


def batch_labels(object_rows_per_sample: list[list[list[float]]],
                 image_grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[B, max cells, A] float32 `cell_targets` of each sample's grid, zero-padded."""
    grids = batch_grids(image_grid_thw, merge)
    width = max(r * c for r, c in grids)
    out = torch.zeros((len(grids), width, len(ATTRIBUTES)), dtype=torch.float32)
    for b, (rows, grid) in enumerate(zip(object_rows_per_sample, grids)):
        out[b, :grid[0] * grid[1]] = torch.from_numpy(cell_targets(rows, grid))
    return out


def image_grids(image_spans: torch.Tensor, image_grid_thw: torch.Tensor, merge: int):
    """Per image b: (b, first image-token position, count, rows, cols) of its merged tokens;
    InputError when the span's count is not the grid's rows x cols."""
    for b, (n_rows, n_cols) in enumerate(batch_grids(image_grid_thw, merge)):
        start, count = (int(v) for v in image_spans[b])
        if n_rows * n_cols != count:
            raise InputError(f"image tokens {count} do not form a {n_rows}x{n_cols} grid "
                             f"(expected {n_rows * n_cols} tokens)")
        yield b, start, count, n_rows, n_cols


def batch_grids(image_grid_thw: torch.Tensor, merge: int) -> list[tuple[int, int]]:
    """(rows, cols) of merged tokens per image."""
    return [(int(h) // merge, int(w) // merge) for _t, h, w in image_grid_thw.tolist()]


# ---- how far can a GSE get on what it sees? ----------------------------------------------------

FIELD_VALUES = {name: ATTRIBUTES[part] for name, part in ATTRIBUTE_GROUPS}
# column of each field's attribute id in an `object_rows` row (after the 4 box fractions)
_ROW_COLUMN = {name: 4 + k for k, (name, _part) in enumerate(ATTRIBUTE_GROUPS)}


def named_values(question: str, field: str) -> set[str]:
    """The values of `field` the question names as whole words ('the dotted blue object' ->
    {'blue'} for colour)."""
    text = question.lower()
    return {v for v in FIELD_VALUES[field] if re.search(rf"\b{re.escape(v)}\b", text)}


def expected_region_hit(rows: list[list[float]], target: int, fields: tuple[str, ...],
                        question: str, gt_box_original, sizes) -> float:
    """Expected region hit of a GSE that sees only `fields` of every object: among the
    scene's objects that agree with the target on each seen field whose target value the
    question names, it picks one uniformly, centres the region on it and the pipeline crops
    there (dynamic box); the hit is the metric's 'GT box inside the crop'.

    rows: `object_rows` of the scene; gt_box_original: the target's polygon box in original
    pixels (as the region-recall metric takes it).
    An upper bound for such a GSE when the wording names the target's own values; position
    words and relations to other objects are ignored (a GSE can beat it with those)."""
    from finers_rt.train.data import centred_region  # data imports this module
    from finers_rt.train.retrospective import pipeline_crop

    stage_w, stage_h = sizes.gse_size_wh
    scene_wh = sizes.scene_size_wh
    keys = [_ROW_COLUMN[f] for f in fields
            if ATTRIBUTES[int(rows[target][_ROW_COLUMN[f]])] in named_values(question, f)]
    candidates = [r for r in rows if all(r[k] == rows[target][k] for k in keys)]
    hits = 0
    for r in candidates:
        box = (r[0] * stage_w, r[1] * stage_h, r[2] * stage_w, r[3] * stage_h)
        region = centred_region(box, sizes.region_side_stage(), sizes.gse_size_wh)
        hits += is_box_inside_region(gt_box_original, pipeline_crop(region, scene_wh, sizes))
    return hits / len(candidates)


def seen_fields_recall(cache, fields: tuple[str, ...], limit: int | None = None) -> dict[str, float]:
    """Mean `expected_region_hit` over a training cache's questions, overall and per size
    bucket: the region recall a GSE reaches when it sees only `fields` (e.g. ('colour',) for a
    tower that resolves colour but not shapes or patterns at its input size)."""
    unknown = set(fields) - set(FIELD_VALUES)
    if unknown:
        raise InputError(f"unknown attribute fields {sorted(unknown)}; expected some of "
                         f"{sorted(FIELD_VALUES)}")
    objects = cache.scene_objects()
    w, h = cache.sizes.scene_size_wh
    per: dict[str, list[float]] = {}
    for i in range(len(cache) if limit is None else min(limit, len(cache))):
        entry = cache.entries[i]
        record, gt = entry["record"], entry["gse"]["gt_box_original"]
        rows = objects[scene_index(record["image_path"])]
        target = target_row(rows, gt, (w, h))
        hit = expected_region_hit(rows, target, fields, record["Q"], gt, cache.sizes)
        for key in {"all", entry.get("bucket") or "all"}:
            per.setdefault(key, []).append(hit)
    return {k: float(np.mean(v)) for k, v in per.items()}


def target_row(rows: list[list[float]], gt_box_original, scene_wh: tuple[int, int]) -> int:
    """Index in `rows` of the question's target: the object whose pixel box is the question's
    polygon box (`gt_box_original`, inclusive pixel bounds)."""
    w, h = scene_wh
    gt = gt_box_original
    return min(range(len(rows)), key=lambda j: abs(rows[j][0] * w - gt[0])
               + abs(rows[j][1] * h - gt[1]) + abs(rows[j][2] * w - gt[2] - 1)
               + abs(rows[j][3] * h - gt[3] - 1))


def named_target_labels(rows: list[list[float]], target: int, question: str) -> list[int]:
    """Per attribute field (`ATTRIBUTE_GROUPS` order): the index, within the field, of the
    target's value when the question names it, else -1 ('the dotted circle' -> colour -1,
    shape circle, pattern dotted). The labels of `QueryHead`."""
    out = []
    for name, part in ATTRIBUTE_GROUPS:
        value = int(rows[target][_ROW_COLUMN[name]])
        out.append(value - part.start if ATTRIBUTES[value] in named_values(question, name) else -1)
    return out


class QueryHead(torch.nn.Module):
    """Training-only: from the last prompt position's state (where the answer, and the pointer's
    query, start) predict the target attributes the question names, one CE per field. It makes
    the LM carry the question's words across the fixed template text that follows them."""

    def __init__(self, hidden: int):
        super().__init__()
        self.attributes = torch.nn.Linear(hidden, len(ATTRIBUTES))

    def forward(self, hidden: torch.Tensor, answer_pos: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, H] (last layer), answer_pos [B], labels [B, fields] (-1 = not named)
        -> mean CE over the named (question, field) pairs (0 when none)."""
        return self.states_loss(
            hidden[torch.arange(hidden.shape[0], device=hidden.device), answer_pos], labels)

    def states_loss(self, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """states [B, H] (one per question), labels [B, fields] -> the same mean CE."""
        logits = self.attributes(states)  # [B, A]
        losses = []
        for k, (_name, part) in enumerate(ATTRIBUTE_GROUPS):
            named = labels[:, k] >= 0
            if named.any():
                losses.append(F.cross_entropy(logits[named, part], labels[named, k],
                                              reduction="sum"))
        count = int((labels >= 0).sum())
        return torch.stack(losses).sum() / count if losses else logits.sum() * 0
