"""The files of a run dir, named in one place: the code that writes runs and the scripts that
resume, refuse and clear them all go by these names."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List

from distdiff.files import partial_glob

CHECKPOINT = "checkpoint.pt"
REPLAY = "replay.pt"
PRETRAIN = "pretrain"  # train.py's phase 1: a pretraining run dir inside the run's
CONFIG = "config.yaml"
METRICS = "metrics.json"
# The checkpoint of the best evaluation so far and its metrics: phase 2 can lose what it gained
# (on Walker2d a run whose episodes had reached 64 points fell to 55 within 12k more env steps,
# bench/README.md, 2026-12-04 later), and the last checkpoint alone would keep only the fall.
BEST, BEST_METRICS = "best.pt", "best.json"
EVAL = "eval.json"  # launch/evaluate.py's summary of checkpoint.pt, beside it
BEST_EVAL = "best.eval.json"  # and of best.pt
# What a run writes, besides its TensorBoard events: --overwrite removes these and nothing else.
RUN_FILES = (CHECKPOINT, REPLAY, BEST, BEST_METRICS, METRICS, EVAL, BEST_EVAL, CONFIG)


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint given as itself or as its run dir."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def eval_file(checkpoint: Path) -> Path:
    """Where launch/evaluate.py writes its summary of ``checkpoint``: beside it, one per checkpoint
    (``eval.json`` for ``checkpoint.pt``, ``NAME.eval.json`` for ``NAME.pt``)."""
    name = EVAL if checkpoint.name == CHECKPOINT else f"{checkpoint.stem}.{EVAL}"
    return checkpoint.parent / name


def resume_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint ``--resume RUN_DIR`` continues from: phase 2's, or phase 1's when the run
    stopped before phase 2 began."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file() and (run_dir / PRETRAIN / CHECKPOINT).is_file():
        return run_dir / PRETRAIN / CHECKPOINT
    return run_dir / CHECKPOINT


def holds_run(run_dir: str | Path) -> bool:
    return resume_checkpoint(run_dir).is_file()


def foreign_run_files(run_dir: str | Path) -> List[str]:
    """The files of a run's names in ``run_dir`` and in its phase 1's dir that no run wrote, which
    a new run there would write over and ``clear_run`` would remove (a --run-dir of ~, or of a
    project's root, which may have a ``pretrain/`` of its own): where it holds no run, those beside
    a ``config.yaml`` that is not a distdiff config (a run writes its config before anything else)."""
    from distdiff.config import is_config_file

    run_dir = Path(run_dir)
    if holds_run(run_dir):
        return []
    found = []
    for d in (run_dir, run_dir / PRETRAIN):
        present = sorted(name for name in RUN_FILES if (d / name).is_file())
        if not (CONFIG in present and is_config_file(d / CONFIG)):
            found += [(d / name).relative_to(run_dir).as_posix() for name in present]
    return found


def check_new_run(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run in ``run_dir`` where one is already, unless it is to be resumed or
    overwritten: its checkpoints would be replaced and its TensorBoard curves mixed with the new."""
    if not resume and not overwrite and holds_run(run_dir):
        raise FileExistsError(f"{run_dir} holds a run already: resume=True continues it, overwrite=True replaces it "
                              f"(--resume, --overwrite on the command line)")
    others = [] if resume else foreign_run_files(run_dir)
    if others:
        raise FileExistsError(f"{run_dir} holds no run, and {', '.join(others)} of something else, which a run there "
                              f"would write over: choose a new or empty run dir")


def clear_run(run_dir: str | Path) -> None:
    """Remove what a run wrote in ``run_dir`` and in its phase 1's dir, and nothing else
    (diagnostics such as viz/ stay)."""
    run_dir = Path(run_dir)
    for d in (run_dir, run_dir / PRETRAIN):
        for name in RUN_FILES:
            (d / name).unlink(missing_ok=True)
            # A write cut short where no clean-up could run (the process killed with its node).
            for partial in d.glob(partial_glob(d / name)):
                partial.unlink(missing_ok=True)
        # With the rewrite of one that a resume's clean-up left cut short (killed mid-way):
        # TensorBoard reads a hidden events file too.
        for events in [*d.glob("events.out.tfevents.*"), *d.glob(".events.out.tfevents.*.partial*")]:
            events.unlink()
    with contextlib.suppress(OSError):
        (run_dir / PRETRAIN).rmdir()  # only once nothing else is left in it
