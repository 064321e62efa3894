"""TensorBoard event files of a run, as a resume finds them, and the rates logged to them.

A run that crashed (killed, out of memory, a lost node) logged past its last checkpoint, and the
resume logs those steps again. TensorBoard would draw both, the curves running back on
themselves; its own remedy (``SummaryWriter(purge_step=...)``) hides every tag past one step,
and a phase-2 run logs on two axes (env steps and learner updates). So the resume drops them
from the files itself, tag by tag.
"""
from __future__ import annotations

import struct
from collections import deque
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, Optional, Set, Tuple

import google_crc32c
from tensorboard.compat.proto.event_pb2 import Event

from distdiff.files import replacing

EVENTS_GLOB = "events.out.tfevents.*"


def event_sizes(log_dir: Path) -> Dict[str, int]:
    """The size of each event file directly in ``log_dir``, by name: what a checkpoint records,
    once the events are flushed, so that a resume knows which files it need not read."""
    return {path.name: path.stat().st_size for path in sorted(Path(log_dir).glob(EVENTS_GLOB)) if path.is_file()}


def flushed_sizes(writer) -> Dict[str, int]:
    """Flush ``writer`` (a SummaryWriter) and return :func:`event_sizes` of its dir: what the
    checkpoint written next records, with every event it counts on disk."""
    writer.flush()
    return event_sizes(writer.log_dir)


CONFIG_TEXT = "config"  # the tag each start logs its config under (TensorBoard's: config/text_summary)


def kept_before(counter_of: Callable[[str], int]) -> Callable[[str, int], bool]:
    """:func:`drop_redone`'s ``keep`` for a start from a checkpoint at the counters
    ``counter_of(tag)``: what was logged up to them, but the config text only before them.
    Every start logs it at the counter it starts from, so one of a start that failed before its
    first checkpoint stood beside the next start's, at the same step, unsaid which was trained with."""
    def keep(tag: str, step: int) -> bool:
        at = counter_of(tag)
        return step < at if tag == f"{CONFIG_TEXT}/text_summary" else step <= at

    return keep


def drop_redone(log_dir: Path, keep: Callable[[str, int], bool], unchanged: Optional[Dict[str, int]] = None) -> int:
    """Rewrite the event files directly in ``log_dir`` (not its subdirectories, which are other
    runs to TensorBoard) without the summaries of a tag at a step that ``keep(tag, step)``
    refuses; events of other kinds stay. A record that a crash cut short ends its file. Returns
    how many summaries went.

    ``unchanged``: :func:`event_sizes` when the checkpoint resumed from was written. A file's
    first that many bytes were on disk then, logged at or before the checkpoint's counters, and
    are not read: only what came after them (a run of days has gigabytes of events, most of them
    figures; the final evaluation logs after its checkpoint, so a resume that raises the budget
    finds every file changed). A file smaller than that is not the one the checkpoint saw, and
    is read whole, as are files the checkpoint does not name (a Tune trial that PBT moves onto
    another trial's checkpoint). Sizes, not times: a run dir copied without its files' times
    keeps them."""
    def kept(data: bytes) -> bool:
        event = Event.FromString(data)
        return not event.HasField("summary") or all(keep(v.tag, event.step) for v in event.summary.value)

    dropped = 0
    for path in sorted(Path(log_dir).glob(EVENTS_GLOB)):
        if not path.is_file():
            continue
        size = path.stat().st_size
        start = (unchanged or {}).get(path.name, 0)
        start = start if start <= size else 0
        if start == size:
            continue
        # Streamed, twice for the one file to rewrite (the crashed run's), never held whole.
        with open(path, "rb") as src:
            src.seek(start)
            if all(kept(data) for _, data in records(src)):
                continue
        n = 0
        with replacing(path) as tmp, open(tmp, "wb") as f, open(path, "rb") as src:
            _copy(src, f, start)
            for record, data in records(src):
                if kept(data):
                    f.write(record)  # as it was stored, checksums and all
                else:
                    n += 1
        dropped += n
    return dropped


def event_tags(path: Path) -> Optional[Set[str]]:
    """The tags of the summaries an event file holds (up to a record cut short); None for a file
    that is not one: bytes that are no record from the first, or a record that is no Event."""
    from google.protobuf.message import DecodeError

    tags: Set[str] = set()
    with open(path, "rb") as f:
        read = False
        try:
            for _, data in records(f):
                read = True
                tags.update(v.tag for v in Event.FromString(data).summary.value)
        except DecodeError:
            return None
        return tags if read or f.tell() == 0 else None


def _masked_crc(data: bytes) -> int:
    """The checksum a TFRecord stores: CRC-32C, masked (TensorFlow's ``masked_crc32c``)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(f: BinaryIO) -> Iterator[Tuple[bytes, bytes]]:
    """The records of an event file from ``f``'s position (a record's first byte) on: each as
    stored (its length, data and their checksums) and its data, a serialized ``Event``. Ends at
    the first record cut short or failing a checksum (a crash's, the file's last), as
    TensorBoard's reader does. Not that reader: it checksums in pure Python at ~10 MB/s, and a
    resume that reads a file whole (one Tune's PBT moved onto another trial's checkpoint) waited
    minutes for days of figures, holding its trial's GPU."""
    while True:
        header = f.read(12)
        if len(header) < 12:
            return
        length, length_crc = struct.unpack("<QI", header)
        if _masked_crc(header[:8]) != length_crc:
            return
        data = f.read(length)
        footer = f.read(4)
        if len(data) < length or len(footer) < 4 or _masked_crc(data) != struct.unpack("<I", footer)[0]:
            return
        yield header + data + footer, data


def _copy(src: BinaryIO, dst: BinaryIO, n_bytes: int) -> None:
    while n_bytes:
        chunk = src.read(min(n_bytes, 1 << 20))
        if not chunk:
            raise OSError(f"{src.name} was cut short while a resume rewrote it")
        dst.write(chunk)
        n_bytes -= len(chunk)


class RecentRate:
    """Counts per second over the last ``window_s`` seconds (since the start, before that): a
    run of days shows a slowdown within a minute, where the mean since its start would hide it,
    and the actors' start-up stops weighing on the rate once it has passed."""

    def __init__(self, t0: float, count0: float, window_s: float = 60.0):
        self.window_s = window_s
        self.points: deque = deque([(t0, count0)])

    def __call__(self, now: float, count: float) -> float:
        self.points.append((now, count))
        # The oldest point kept is the newest one at least window_s old.
        while len(self.points) > 2 and now - self.points[1][0] >= self.window_s:
            self.points.popleft()
        t, c = self.points[0]
        return (count - c) / max(now - t, 1e-9)
