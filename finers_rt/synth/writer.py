"""Write a synthetic FineRS-4k style dataset to disk, optionally with worker processes.

Layout: `OUT_DIR/annotations.json` (FineRS-4k format, `image_path` relative to
`OUT_DIR/images/`) and `OUT_DIR/images/scene_NNNNNN.jpg` (JPEG quality 95, 4:2:0). Scenes are
generated independently from (seed, index), so the output does not depend on `workers`.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from finers_rt.dataset import Annotation, size_bucket, write_annotations
from finers_rt.errors import ArtifactError, InputError
from finers_rt.synth.scene import check_size_wh, image_name, render_scene_bgr

JPEG_QUALITY = 95
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_dataset` wrote and how fast (seconds are wall clock; render/encode
    seconds are summed over scenes, across workers)."""

    out_dir: str
    annotations_path: str
    n_scenes: int
    n_annotations: int
    size_wh: tuple[int, int]
    seed: int
    workers: int
    seconds: float
    render_seconds: float
    encode_seconds: float
    image_bytes: int
    q_types: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)

    @property
    def scenes_per_s(self) -> float:
        return self.n_scenes / self.seconds if self.seconds > 0 else float("inf")


def parse_size_wh(text: str) -> tuple[int, int]:
    """'3840x2160' -> (3840, 2160); anything else is an InputError."""
    m = _SIZE_RE.match(str(text))
    if m is None:
        raise InputError(f"size must be WIDTHxHEIGHT in pixels, e.g. 3840x2160, got {text!r}")
    return check_size_wh((int(m.group(1)), int(m.group(2))))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _prepare_out_dir(out_dir: Path, force: bool) -> Path:
    """Create OUT_DIR/images; refuse a non-empty OUT_DIR unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and not force:
        entries = sorted(p.name for p in out_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise InputError(f"output folder {out_dir} is not empty ({len(entries)} entries: "
                             f"{shown}); refusing to overwrite, use --force (force=True) to "
                             f"write into it anyway")
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    return images


def encode_jpeg_bgr(image_bgr: Any, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a uint8 [H, W, 3] BGR image (libjpeg via OpenCV, 4:2:0 chroma)."""
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ArtifactError(f"JPEG encoding failed for an image of shape {image_bgr.shape}")
    return buf.tobytes()


def _scene_job(job: tuple[int, int, tuple[int, int], str]
               ) -> tuple[int, list[dict[str, Any]], float, float, int]:
    """Generate, encode and write one scene: (index, records, render_s, encode_s, bytes)."""
    seed, index, size_wh, images_dir = job
    t0 = time.perf_counter()
    image_bgr, records = render_scene_bgr(seed, index, size_wh)
    t1 = time.perf_counter()
    data = encode_jpeg_bgr(image_bgr)
    (Path(images_dir) / image_name(index)).write_bytes(data)
    return index, records, t1 - t0, time.perf_counter() - t1, len(data)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one core per worker process; no oversubscription


def _run_jobs(jobs: list[tuple[int, int, tuple[int, int], str]], workers: int):
    """Yield job results in index order, in-process or from a process pool.

    The pool SPAWNS fresh interpreters: forking a process whose OpenCV / ONNX Runtime thread
    pools already ran deadlocks the child (seen: a worker stuck in cv2.setNumThreads under a
    test run that had used cv2 threads). A spawning caller's script must guard its entry point
    with `if __name__ == "__main__":` (the `finers-rt` console script does).
    """
    if workers == 1:
        yield from map(_scene_job, jobs)
        return
    ctx = multiprocessing.get_context("spawn")
    # an executor, not multiprocessing.Pool: a worker that dies raises BrokenProcessPool
    # instead of hanging the run
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        yield from pool.map(_scene_job, jobs, chunksize=1)


def generate_dataset(out_dir: str | Path, n: int, seed: int,
                     size_wh: tuple[int, int] = (3840, 2160), workers: int = 1,
                     force: bool = False) -> SynthSummary:
    """Write n scenes of dataset `seed` to out_dir (see the module docstring).

    Refuses a non-empty out_dir unless `force` (then files of the same names are replaced,
    other files are left alone). annotations.json is written last, atomically.
    """
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    workers = _check_int("workers", workers, 1)
    size_wh = check_size_wh(size_wh)
    out = Path(out_dir)
    images = _prepare_out_dir(out, force)
    start = time.perf_counter()
    jobs = [(seed, i, size_wh, str(images)) for i in range(n)]
    records: list[dict[str, Any]] = []
    render_s = encode_s = 0.0
    n_bytes = 0
    for _index, recs, r_s, e_s, nb in _run_jobs(jobs, workers):
        records.extend(recs)
        render_s, encode_s, n_bytes = render_s + r_s, encode_s + e_s, n_bytes + nb
    anns = [Annotation(image_path=r["image_path"], q_type=r["Q-type"], question=r["Q"],
                       answer=r["A"], points_xy=r["points"], attribute=r["attribute"],
                       area_percent=r["area_percent"], options=r.get("options"), index=i)
            for i, r in enumerate(records)]
    path = out / "annotations.json"
    tmp = out / ".annotations.json.tmp"
    write_annotations(tmp, anns)
    os.replace(tmp, path)
    return SynthSummary(
        out_dir=str(out), annotations_path=str(path), n_scenes=n, n_annotations=len(anns),
        size_wh=size_wh, seed=seed, workers=workers, seconds=time.perf_counter() - start,
        render_seconds=render_s, encode_seconds=encode_s, image_bytes=n_bytes,
        q_types=dict(Counter(a.q_type for a in anns)),
        attributes=dict(Counter(a.attribute for a in anns)),
        buckets=dict(Counter(size_bucket(a.area_percent) for a in anns)))
