"""Writing files so that a crash never leaves half of one: checkpoints, metrics, figures, videos."""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterator


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(path: Path) -> Path:
    """The temporary file that :func:`replacing` writes ``path`` to (left behind only by a
    process killed mid-write)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write, which then replaces it: a crash leaves the old
    file or the new one, never half of one, and a writer that raises leaves no temporary file.
    It is hidden and keeps ``path``'s suffix, from which some writers (video) take the format.

    The new file reaches the disk before the rename, and the rename before this returns: after
    a power loss some filesystems (XFS, ext4 without auto_da_alloc) would otherwise show the
    renamed file empty, with the old one already gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    # A link left at this predictable name (in a dir others can write to) would have the write
    # go through it, to the file it points at.
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        _fsync(tmp, os.O_RDWR)  # (Windows syncs only what is open for writing)
        os.replace(tmp, path)
        # The new file is in place: a system that cannot sync a directory (Windows, one this
        # user may not read) must not fail the write.
        with contextlib.suppress(OSError):
            _fsync(path.parent, os.O_RDONLY)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def finite(obj):
    """``obj`` with NaN and infinities as None, in its dicts, lists and tuples: JSON has no token
    for them (Python writes ``NaN``, which other readers refuse). An alignment error is NaN
    where no plan was measured at a step."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(data, **kwargs) -> str:
    """Strict JSON of ``data``, non-finite numbers as null (:func:`finite`)."""
    return json.dumps(finite(data), allow_nan=False, **kwargs)


def write_json(path: Path, data: dict) -> None:
    write_text(path, to_json(data, indent=2) + "\n")
