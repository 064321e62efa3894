"""TensorBoard event files of a run, as a resume finds them.

A run that crashed (killed, out of memory, a lost node) logged past its last checkpoint, and the
resume logs those steps again. TensorBoard would draw both, the curves running back on
themselves; its own remedy (``SummaryWriter(purge_step=...)``) hides every tag past one step,
and a phase-2 run logs on two axes (env steps and learner updates). So the resume drops them
from the files itself, tag by tag.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter

from distdiff.files import replacing

EVENTS_GLOB = "events.out.tfevents.*"


def drop_redone(log_dir: Path, keep: Callable[[str, int], bool]) -> int:
    """Rewrite the event files directly in ``log_dir`` (not its subdirectories, which are other
    runs to TensorBoard) without the summaries of a tag at a step that ``keep(tag, step)``
    refuses; events of other kinds stay. A record that a crash cut short ends its file. Returns
    how many summaries went."""
    dropped = 0
    for path in sorted(Path(log_dir).glob(EVENTS_GLOB)):
        if not path.is_file():
            continue
        kept, n = [], 0
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            if event.HasField("summary") and not all(keep(v.tag, event.step) for v in event.summary.value):
                n += 1
            else:
                kept.append(record)
        if n:
            with replacing(path) as tmp, open(tmp, "wb") as f:
                writer = RecordWriter(f)
                for record in kept:
                    writer.write(record)
            dropped += n
    return dropped
