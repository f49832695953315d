"""Writing an artifact folder so that no half-written or unvalidated folder can ever be loaded.

Every exporter builds into a temporary sibling folder and publishes it with one rename after
validation passed; an existing non-empty destination is refused unless `force`, and even then
the old content is removed only once the new folder is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from finers_rt.errors import InputError


def check_out_dir(out_dir: str | os.PathLike, force: bool) -> Path:
    """Refuse a destination that is a file, or a non-empty folder without `force`."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"output folder {out} exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir`; on normal exit publish it as
    `out_dir`, on an exception delete it (the destination is untouched)."""
    out = check_out_dir(out_dir, force)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a published artifact gets normal permissions
    try:
        yield work
        _publish(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _publish(work: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(out.name + ".old-" + work.name)
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out)
