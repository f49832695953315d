"""Training samples for GSE, LPR and SAM from synthetic FineRS scenes, and an on-disk cache.

Frames (all boxes x1, y1, x2, y2; points x, y):
- ORIGINAL: the scene image (e.g. 3840x2160).
- GSE stage: the whole image resized (bilinear, aspect not kept) to `gse_size_wh`.
- crop: a square of the original picked like the pipeline does (a ~256-in-1920 region that
  contains the target, grown by the official dynamic box), resized to `lpr_size_wh` for LPR.
Targets follow the FineRS answer formats (FINERS_SPEC.md) with coordinates rounded to the
coordinate-token grid of `finers_rt.train.model`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from finers_rt import geometry
from finers_rt.dataset import polygon_to_mask, size_bucket
from finers_rt.errors import InputError
from finers_rt.image import resize_for_stage
from finers_rt.prompts import build_gse_prompt, build_lpr_prompt
from finers_rt.train.model import quantize_coordinate

REFERENCE_GSE_WH = (1920, 1080)  # the frame FineRS's "256*256 region" is measured in
NEGATIVES_FILE = "lpr_negative_images.npy"  # LPR crops without the target (`train.negatives`)


@dataclass(frozen=True)
class StageSizes:
    """Stage sizes (w, h) of a model family; the region is 256 px of the 1920x1080 frame."""

    gse_size_wh: tuple[int, int] = (644, 364)
    lpr_size_wh: tuple[int, int] = (336, 336)
    scene_size_wh: tuple[int, int] = (3840, 2160)
    region_side: int = 256
    crop_min_side: int = 512

    def region_side_stage(self) -> tuple[float, float]:
        """The region's (w, h) in the GSE stage frame."""
        return (self.region_side * self.gse_size_wh[0] / REFERENCE_GSE_WH[0],
                self.region_side * self.gse_size_wh[1] / REFERENCE_GSE_WH[1])

    def region_side_original(self, image_wh: tuple[int, int]) -> tuple[float, float]:
        return (self.region_side * image_wh[0] / REFERENCE_GSE_WH[0],
                self.region_side * image_wh[1] / REFERENCE_GSE_WH[1])


def polygon_box_xyxy(points_xy: Any) -> tuple[float, float, float, float]:
    """Bounding box of a polygon in pixel-edge coordinates: (min x, min y, max x + 1, max y + 1)."""
    pts = np.asarray(points_xy, dtype=np.float64)
    return (float(pts[:, 0].min()), float(pts[:, 1].min()),
            float(pts[:, 0].max()) + 1.0, float(pts[:, 1].max()) + 1.0)


def response_for(record: dict[str, Any]) -> str:
    """The answer text a stage should give: 'The object is found.' for referring, else A."""
    return "The object is found." if record["Q-type"] == "referring" else str(record["A"])


# LPR's response on a crop that does not hold the target, whatever the question type (the
# referring prompt asks "respond with whether the object is found"; `parsing.says_not_found`
# reads it and the pipeline then tries further crops).
NOT_FOUND_RESPONSE = "The object is not found."
# ... and its think text: the decision is the answer's first word, written from the state that
# reads the question (the last prompt position), not 30 tokens later at the response.
NOT_FOUND_THINK = "<think>The query is not in this crop.</think>"


THINK_TEXT = "<think>Search the image for the query.</think>"


_OPTION_RE = re.compile(r"\(([A-Z])\)\s*(.*?)\s*(?=\([A-Z]\)|$)", re.DOTALL)


def option_text(options: Any, letter: Any) -> str | None:
    """The text of option `letter` in an option list like '(A) red (B) blue', or None when
    the list does not have that form or that letter."""
    if not isinstance(options, str) or not isinstance(letter, str):
        return None
    for found, text in _OPTION_RE.findall(options):
        if found == letter.strip().upper() and text:
            return text
    return None


def think_for(record: dict[str, Any], option_think: bool = False) -> str:
    """The think text: one constant sentence. (Restating the query there was measured worse:
    a tiny model spends its first hundreds of steps learning to copy and loops when greedy.)

    `option_think` (opt-in, off for the shipped recipe): for option questions whose list can
    be read, name the answer in words first ('The answer is blue.') so that the letter after
    it is a lookup in the option list. Measured in `export/finers-tiny.md`, fifth round: in
    2,898 LPR steps the model learned to write a word but not to read its letter (it still
    answered one constant letter)."""
    if option_think and record.get("Q-type") == "option":
        text = option_text(record.get("options"), record.get("A"))
        if text is not None:
            words = text.replace("'", " ")
            return f"<think>The answer is {words}.</think>"
    return THINK_TEXT


def format_gse_answer(record: dict[str, Any], region_xyxy: Any, option_think: bool = False) -> str:
    """`<think>..</think><answer>{'bbox': [..], 'response': '..'}</answer>` (coordinates quantized)."""
    box = ",".join(str(quantize_coordinate(v)) for v in region_xyxy)
    resp = response_for(record).replace("'", " ")
    think = think_for(record, option_think)
    return f"{think}<answer>{{'bbox': [{box}], 'response': '{resp}'}}</answer>"


def format_lpr_answer(record: dict[str, Any], box_xyxy: Any, points_xy: Any,
                      option_think: bool = False, response: str | None = None,
                      think: str | None = None) -> str:
    """The LPR answer: bbox, points_1, points_2, response (coordinates quantized);
    `response` / `think` replace the record's (NOT_FOUND_* on a negative crop)."""
    q = quantize_coordinate
    box = ",".join(str(q(v)) for v in box_xyxy)
    (ax, ay), (bx, by) = points_xy
    resp = (response if response is not None else response_for(record)).replace("'", " ")
    think = think if think is not None else think_for(record, option_think)
    return (f"{think}<answer>{{'bbox': [{box}], "
            f"'points_1': [{q(ax)},{q(ay)}], "
            f"'points_2': [{q(bx)},{q(by)}], 'response': '{resp}'}}</answer>")


def gse_prompt(record: dict[str, Any]) -> str:
    return build_gse_prompt(record["Q"], record["Q-type"], record.get("options"))


def lpr_prompt(record: dict[str, Any]) -> str:
    return build_lpr_prompt(record["Q"], record["Q-type"], record.get("options"))


def centred_region(box_xyxy: Any, side_wh: tuple[float, float], frame_wh: tuple[int, int]
                   ) -> tuple[float, float, float, float]:
    """A region of size side_wh centred on the box, shifted (not shrunk) to stay in the frame."""
    cx, cy = (box_xyxy[0] + box_xyxy[2]) / 2, (box_xyxy[1] + box_xyxy[3]) / 2
    x1 = min(max(cx - side_wh[0] / 2, 0.0), max(frame_wh[0] - side_wh[0], 0.0))
    y1 = min(max(cy - side_wh[1] / 2, 0.0), max(frame_wh[1] - side_wh[1], 0.0))
    return (x1, y1, x1 + side_wh[0], y1 + side_wh[1])


def random_region(box_xyxy: Any, side_wh: tuple[float, float], frame_wh: tuple[int, int],
                  rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A region of size side_wh that contains the box at a random place (centred if too big)."""
    out = []
    for axis in (0, 1):
        lo_box, hi_box, side = box_xyxy[axis], box_xyxy[axis + 2], side_wh[axis]
        lo = max(hi_box - side, 0.0)
        hi = min(lo_box, frame_wh[axis] - side)
        start = float(rng.uniform(lo, hi)) if hi > lo else (lo_box + hi_box - side) / 2
        out.append(start)
    return (out[0], out[1], out[0] + side_wh[0], out[1] + side_wh[1])


def inscribed_points(mask: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of two large inscribed circles of a bool mask [H, W] (x, y pixel centres).

    The first is the distance-transform maximum; the second the maximum outside that circle
    (the first again when nothing is left)."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    y1, x1 = np.unravel_index(int(np.argmax(dist)), dist.shape)
    radius = float(dist[y1, x1])
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    rest = np.where((xx - x1) ** 2 + (yy - y1) ** 2 > radius ** 2, dist, 0.0)
    if rest.max() <= 0:
        return (x1 + 0.5, y1 + 0.5), (x1 + 0.5, y1 + 0.5)
    y2, x2 = np.unravel_index(int(np.argmax(rest)), rest.shape)
    return (x1 + 0.5, y1 + 0.5), (x2 + 0.5, y2 + 0.5)


def gse_meta(record: dict[str, Any], image_wh: tuple[int, int], sizes: StageSizes) -> dict[str, Any]:
    """GT box and target region of `record` in the GSE stage frame (+ the GT box in original pixels)."""
    box = geometry.frame_to_stage_box(polygon_box_xyxy(record["points"]), image_wh,
                                      sizes.gse_size_wh)
    region = centred_region(box, sizes.region_side_stage(), sizes.gse_size_wh)
    return {"gt_box_stage": list(box), "region_stage": list(region),
            "gt_box_original": list(polygon_box_xyxy(record["points"]))}


def make_lpr_item(image: np.ndarray, record: dict[str, Any], sizes: StageSizes,
                  rng: np.random.Generator) -> dict[str, Any]:
    """A pipeline-like crop containing the target (a random ~256-in-1920 region that contains
    it, grown by the dynamic box), resized to the LPR stage; see `crop_item`."""
    height, width = image.shape[:2]
    box = polygon_box_xyxy(record["points"])
    region = random_region(box, sizes.region_side_original((width, height)), (width, height), rng)
    return crop_item(image, record, geometry.dynamic_box(region, (width, height),
                                                         sizes.crop_min_side), sizes)


def crop_item(image: np.ndarray, record: dict[str, Any], crop_xyxy: Any,
              sizes: StageSizes) -> dict[str, Any]:
    """The crop `crop_xyxy` (original pixels, half-open) resized to the LPR stage.

    Returns image [h, w, 3] uint8, mask [h, w] bool (the target in the stage frame, empty if
    the target is outside the crop) and meta (crop, GT box and two inscribed points in the LPR
    stage frame; box and points are None when the target is not in the crop)."""
    x1, y1, x2, y2 = (int(v) for v in crop_xyxy)
    crop_wh = (x2 - x1, y2 - y1)
    if crop_wh[0] <= 0 or crop_wh[1] <= 0:
        raise InputError(f"crop {tuple(crop_xyxy)} has no pixels")
    pts = np.asarray(record["points"], dtype=np.float64) - np.array([x1, y1])
    mask = polygon_to_mask(pts, crop_wh[1], crop_wh[0])
    stage_wh = sizes.lpr_size_wh
    stage_mask = cv2.resize(mask.astype(np.uint8), stage_wh, interpolation=cv2.INTER_NEAREST) > 0
    if mask.any() and not stage_mask.any():  # a sliver lost by the resize: keep one pixel
        ys, xs = np.nonzero(mask)
        stage_mask[min(int(ys.mean() * stage_wh[1] / crop_wh[1]), stage_wh[1] - 1),
                   min(int(xs.mean() * stage_wh[0] / crop_wh[0]), stage_wh[0] - 1)] = True
    box_stage = points = None
    if stage_mask.any():
        ys, xs = np.nonzero(stage_mask)
        box_stage = [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]
        points = [list(p) for p in inscribed_points(stage_mask)]
    return {"image": resize_for_stage(image[y1:y2, x1:x2], stage_wh), "mask": stage_mask,
            "meta": {"crop_original": [x1, y1, x2, y2], "box_stage": box_stage,
                     "points_stage": points}}


def iter_scenes(seed: int, n_scenes: int, sizes: StageSizes, lpr_crops: int = 2, start: int = 0,
                extra_questions: int = 0, negative_crops: int = 0
                ) -> Iterator[tuple[np.ndarray, list[tuple[dict, dict, list[dict], list[dict]]]]]:
    """Yield (GSE stage image, [(record, gse meta, [lpr item, ...], [negative item, ...]), ...])
    per scene of start..start+n-1: the scene is resized for GSE once, whatever its number of
    questions. Negative items (`train.negatives`) come from their own random stream, so the
    positive crops are the same with or without them."""
    from finers_rt.synth import generate_scene_objects
    from finers_rt.train import negatives

    for index in range(start, start + n_scenes):
        image, records, objs = generate_scene_objects(seed, index, sizes.scene_size_wh,
                                                      extra_questions)
        rng = np.random.default_rng(np.random.SeedSequence([seed, index, 7]))
        neg_rng = np.random.default_rng(np.random.SeedSequence([seed, index, 13]))
        wh = (image.shape[1], image.shape[0])
        items = []
        for record in records:
            positives = [make_lpr_item(image, record, sizes, rng) for _ in range(lpr_crops)]
            negs = []
            if negative_crops:
                target = negatives.target_object(record, objs, wh)
                crops = negatives.pick_negative_crops(target, objs, wh, sizes, neg_rng,
                                                      negative_crops)
                negs = [negatives.negative_item(image, target, objs, c, sizes) for c in crops]
            items.append((record, gse_meta(record, wh, sizes), positives, negs))
        yield resize_for_stage(image, sizes.gse_size_wh), items


def _save_stacked(path: Path, arrays: list[np.ndarray]) -> None:
    """np.save of np.stack(arrays) written row by row (no second full copy in memory);
    the list is emptied as it goes."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=arrays[0].dtype,
                                    shape=(len(arrays),) + arrays[0].shape)
    for i in range(len(arrays)):
        out[i] = arrays[i]
        arrays[i] = None
    out.flush()
    del out
    arrays.clear()


def build_cache(out_dir: str | Path, seed: int, n_scenes: int, sizes: StageSizes,
                lpr_crops: int = 2, log=None, extra_questions: int = 0,
                negative_crops: int = 0) -> Path:
    """Write a training cache: gse_images.npy [scenes, h, w, 3] (one row per scene; entry
    `gse_row` points at it), lpr_images.npy [N*K, h, w, 3], lpr_masks.npy [N*K, h, w] (bool),
    records.json (records + meta, sizes). `extra_questions`: see `synth.generate_scene`.
    `negative_crops` > 0: up to that many crops per question without the target
    (`train.negatives`) in lpr_negative_images.npy; entry "negatives" lists their meta and
    "negative_rows" their rows."""
    if n_scenes < 1:
        raise InputError(f"n_scenes must be >= 1, got {n_scenes}")
    if lpr_crops < 1:
        raise InputError(f"lpr_crops must be >= 1, got {lpr_crops}")
    if negative_crops < 0:
        raise InputError(f"negative_crops must be >= 0, got {negative_crops}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gse_imgs, lpr_imgs, lpr_masks, neg_imgs, entries = [], [], [], [], []
    for scene, (gse_image, items) in enumerate(iter_scenes(seed, n_scenes, sizes, lpr_crops,
                                                             extra_questions=extra_questions,
                                                             negative_crops=negative_crops)):
        for record, meta, lprs, negs in items:
            entries.append({"record": {k: v for k, v in record.items()}, "gse": meta,
                            "gse_row": len(gse_imgs), "lpr": [item["meta"] for item in lprs],
                            "bucket": size_bucket(record["area_percent"])})
            if negative_crops:
                entries[-1]["negatives"] = [item["meta"] for item in negs]
                entries[-1]["negative_rows"] = list(range(len(neg_imgs), len(neg_imgs) + len(negs)))
                neg_imgs.extend(item["image"] for item in negs)
            for item in lprs:
                lpr_imgs.append(item["image"])
                lpr_masks.append(item["mask"])
        if items:  # a scene without questions leaves no unreferenced image row
            gse_imgs.append(gse_image)
        if log and (scene + 1) % 50 == 0:
            log(f"cache {out}: {scene + 1} scenes, {len(entries)} samples")
    if not entries:
        raise InputError(f"scenes of seed {seed} gave no questions; nothing to cache")
    _save_stacked(out / "gse_images.npy", gse_imgs)
    _save_stacked(out / "lpr_images.npy", lpr_imgs)
    _save_stacked(out / "lpr_masks.npy", lpr_masks)
    if neg_imgs:
        _save_stacked(out / NEGATIVES_FILE, neg_imgs)
    (out / "records.json").write_text(json.dumps(
        {"seed": seed, "n_scenes": n_scenes, "lpr_crops": lpr_crops,
         "extra_questions": extra_questions, "negative_crops": negative_crops,
         "sizes": asdict(sizes), "entries": entries}))
    return out


class SampleCache:
    """A cache written by `build_cache`, memory-mapped. `entries[i]` has record/gse/lpr meta;
    LPR item k of entry i is row i*lpr_crops + k of the LPR arrays."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "records.json").is_file():
            raise InputError(f"{folder} is not a training cache (no records.json); "
                             "build one with `finers-rt train cache`")
        info = json.loads((folder / "records.json").read_text())
        self.entries: list[dict[str, Any]] = info["entries"]
        self.lpr_crops = int(info["lpr_crops"])
        self.seed = int(info["seed"])
        sizes = info["sizes"]
        self.sizes = StageSizes(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in sizes.items()})
        self.gse_images = np.load(folder / "gse_images.npy", mmap_mode="r")
        self.lpr_images = np.load(folder / "lpr_images.npy", mmap_mode="r")
        self.lpr_masks = np.load(folder / "lpr_masks.npy", mmap_mode="r")
        self.negative_images = (np.load(folder / NEGATIVES_FILE, mmap_mode="r")
                                if (folder / NEGATIVES_FILE).is_file() else None)
        self.folder = folder
        self._objects: dict[int, list[list[float]]] | None = None
        self._scenes: dict[int, list[int]] | None = None

    def scene_objects(self, log=None) -> dict[int, list[list[float]]]:
        """{scene index: object rows} of this cache (`train.dense.ensure_scene_objects`: built
        and saved on first use, then read once)."""
        from finers_rt.train import dense

        if self._objects is None:
            self._objects = dense.ensure_scene_objects(self.folder, log)
        return self._objects

    def object_rows(self, index: int) -> list[list[float]]:
        """Every object of entry `index`'s scene (`train.dense.object_rows`)."""
        from finers_rt.train import dense

        return self.scene_objects()[dense.scene_index(self.entries[index]["record"]["image_path"])]

    def gse_row(self, index: int) -> int:
        """Row of entry `index`'s GSE image in gse_images.npy (entries of one scene share it;
        caches of older builds hold one row per entry and have no `gse_row`)."""
        return int(self.entries[index].get("gse_row", index))

    def scene_entries(self) -> dict[int, list[int]]:
        """{GSE image row: the entries (questions) that share it}, built once."""
        if self._scenes is None:
            self._scenes = {}
            for i in range(len(self.entries)):
                self._scenes.setdefault(self.gse_row(i), []).append(i)
        return self._scenes

    def lpr_row(self, index: int, crop: int = 0) -> int:
        """Row of LPR item `crop` of entry `index` in the LPR arrays."""
        return index * self.lpr_crops + crop

    def negative_count(self, index: int) -> int:
        """How many negative crops (no target) entry `index` has (0 for caches without)."""
        return len(self.entries[index].get("negative_rows", ())) if self.negative_images is not None else 0

    def negative(self, index: int, k: int) -> tuple[np.ndarray, dict[str, Any], int]:
        """(image [h, w, 3] uint8, meta, row) of negative crop `k` of entry `index`."""
        row = int(self.entries[index]["negative_rows"][k])
        return np.asarray(self.negative_images[row]), self.entries[index]["negatives"][k], row

    def gse_image(self, index: int) -> np.ndarray:
        """The GSE stage image of entry `index` [h, w, 3] uint8."""
        return np.asarray(self.gse_images[self.gse_row(index)])

    def __len__(self) -> int:
        return len(self.entries)

    def area_weights(self, min_area_percent: float) -> np.ndarray:
        """Sampling weights [N] float64: 1 for targets of at least `min_area_percent`, else 0
        (uniform when nothing qualifies). A curriculum starts high and lowers it to 0."""
        areas = np.array([e["record"]["area_percent"] for e in self.entries])
        weights = (areas >= min_area_percent).astype(np.float64)
        if weights.sum() == 0:
            weights[:] = 1.0
        return weights / weights.sum()
