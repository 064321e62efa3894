"""Checkpoints: plain dicts of tensors and primitives, written atomically, read with weights_only.

Loading never runs code from the file (``torch.load(weights_only=True)``); a file that is not
a distdiff checkpoint, or is truncated, is a :class:`CheckpointError` with the path in it.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from distdiff.files import replacing
from distdiff.rundir import CHECKPOINT, CONFIG, PRETRAIN, checkpoint_file

FORMAT = "distdiff.checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    pass


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only run dir); the one before it
    is intact."""


def map_leaves(obj, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any]):
    """``obj`` with ``fn`` applied to every leaf (``is_leaf``) in its dicts, lists and tuples
    (named tuples kept as their type); anything else as it is."""
    if is_leaf(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_leaves(v, is_leaf, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_leaves(v, is_leaf, fn) for v in obj]
    if isinstance(obj, tuple):
        items = [map_leaves(v, is_leaf, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def to_cpu(obj):
    """``obj`` with every tensor in its dicts, lists and tuples on CPU: a checkpoint written where
    training ran on a GPU must load with a plain ``torch.load`` where there is none."""
    return map_leaves(obj, torch.is_tensor, lambda t: t.cpu())


def save_checkpoint(path: str | Path, payload: Dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    try:
        with replacing(path) as tmp:
            torch.save({**payload, "format": FORMAT, "format_version": VERSION}, tmp)
    except (OSError, RuntimeError) as e:
        # torch reports a full disk as "[enforce fail at inline_container.cc] unexpected pos".
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free there"
        except OSError:
            free = ""
        why = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointWriteError(f"could not write {path} ({type(e).__name__}: {why}){free}") from e
    return path


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    path = checkpoint_file(path)
    if not path.is_file():
        phase1 = path.parent / PRETRAIN / CHECKPOINT
        hint = "" if path.name != CHECKPOINT \
            else f" (its run stopped in phase 1: {phase1} is its pretraining's)" if phase1.is_file() \
            else (" (a run stopped there before its first checkpoint: the command line that started it, or "
                  "--autoresume, starts it again)") if (path.parent / CONFIG).is_file() else ""
        raise CheckpointError(f"no checkpoint at {path}{hint}")
    if not zipfile.is_zipfile(path):
        # What torch.save writes; torch.load would fail on anything else with a key or EOF error.
        what = "an empty file" if path.stat().st_size == 0 else "not a torch file, or damaged"
        raise CheckpointError(f"{path} is not a readable distdiff checkpoint ({what})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails in many ways (unpickler, zip, struct, key errors); all mean "unreadable"
        # Not torch's advice to load it with weights_only=False: that would run code from the file.
        message = str(e)
        # (torch names a global of a blocked module, os.system's posix among them, otherwise.)
        objects = "Unsupported global" in message or "unsupported GLOBAL" in message
        why = ("it holds Python objects, which distdiff never unpickles" if objects
               else "damaged, or not a torch file" if "Weights only load failed" in message
               else f"{type(e).__name__}: {message.splitlines()[0] if message else ''}")
        raise CheckpointError(f"{path} is not a readable distdiff checkpoint ({why})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distdiff checkpoint")
    if payload.get("format_version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {payload.get('format_version')}, this distdiff reads {VERSION}")
    return payload


def load_own_checkpoint(path: Path, *, otherwise: str = "") -> Dict[str, Any]:
    """The checkpoint a resume continues from, its run's own last one. One that is there and
    cannot be read was damaged from outside (a crash leaves the one before it whole:
    :func:`save_checkpoint`), and every resume of the run would stop on it: the error says how
    to go on, ``otherwise`` adding a way the caller knows of."""
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        if not path.is_file():
            raise
        raise CheckpointError(f"{e}. It is the run's last checkpoint, and distdiff writes checkpoints whole (a crash "
                              f"leaves the one before), so it was damaged from outside the run: a resume cannot go on "
                              f"from it. Start the run again with --overwrite in place of --resume or --autoresume"
                              f"{otherwise}") from e
