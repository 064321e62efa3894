"""Writing files so that a crash never leaves half of one: checkpoints, metrics, figures, videos."""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Iterator


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_glob(path: Path) -> str:
    """The names (a glob in ``path``'s dir) of the temporary files that :func:`replacing` writes
    ``path`` to, which only a process killed mid-write leaves behind."""
    return f".{path.stem}.partial-*{path.suffix}"


def _new_partial(path: Path) -> Path:
    # A name of this write's own, made here (O_EXCL): two processes writing one file at once
    # (two evaluations of one checkpoint) would otherwise write and rename each other's, and a
    # link planted at a predictable name (in a dir others can write to) is never written through.
    while True:
        tmp = path.with_name(f".{path.stem}.partial-{secrets.token_hex(4)}{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write, which then replaces it: a crash leaves the old
    file or the new one, never half of one, and a writer that raises leaves no temporary file.
    It is hidden and keeps ``path``'s suffix, from which some writers (video) take the format.

    The new file reaches the disk before the rename, and the rename before this returns: after
    a power loss some filesystems (XFS, ext4 without auto_da_alloc) would otherwise show the
    renamed file empty, with the old one already gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_partial(path)
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
