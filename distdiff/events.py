"""TensorBoard event files of a run, as a resume finds them.

A run that crashed (killed, out of memory, a lost node) logged past its last checkpoint, and the
resume logs those steps again. TensorBoard would draw both, the curves running back on
themselves; its own remedy (``SummaryWriter(purge_step=...)``) hides every tag past one step,
and a phase-2 run logs on two axes (env steps and learner updates). So the resume drops them
from the files itself, tag by tag.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter

from distdiff.files import replacing

EVENTS_GLOB = "events.out.tfevents.*"


def drop_redone(log_dir: Path, keep: Callable[[str, int], bool], since: Optional[float] = None) -> int:
    """Rewrite the event files directly in ``log_dir`` (not its subdirectories, which are other
    runs to TensorBoard) without the summaries of a tag at a step that ``keep(tag, step)``
    refuses; events of other kinds stay. A record that a crash cut short ends its file. Returns
    how many summaries went.

    ``since``: the time the checkpoint resumed from was written (its mtime), by a run of this
    log dir, which flushes its events before each checkpoint: a file last modified before then
    holds nothing logged after it, and is not read (a run of days has gigabytes of events, most
    of them figures, which a resume would otherwise parse in pure Python for minutes)."""
    dropped = 0
    for path in sorted(Path(log_dir).glob(EVENTS_GLOB)):
        if not path.is_file() or since is not None and path.stat().st_mtime < since:
            continue

        def kept(record: bytes) -> bool:
            event = Event.FromString(record)
            return not event.HasField("summary") or all(keep(v.tag, event.step) for v in event.summary.value)

        # Streamed, twice for the one file to rewrite (the crashed run's), never held whole.
        if all(kept(record) for record in RawEventFileLoader(str(path)).Load()):
            continue
        n = 0
        with replacing(path) as tmp, open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for record in RawEventFileLoader(str(path)).Load():
                if kept(record):
                    writer.write(record)
                else:
                    n += 1
        dropped += n
    return dropped
