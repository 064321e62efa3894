"""Files a run writes: TensorBoard events as a resume finds them (what a crashed run logged past
its checkpoint), and strict JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from distdiff.distributed.driver import Counters, step_axis
from distdiff.events import CONFIG_TEXT, EVENTS_GLOB, drop_redone, event_tags, kept_before
from distdiff.files import to_json


def scalars(log_dir, tag):
    return [(e.step, e.value) for e in EventAccumulator(str(log_dir)).Reload().Scalars(tag)]


def test_each_tag_keeps_its_steps_up_to_the_checkpoint_on_its_own_axis(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        for k in range(1, 11):
            w.add_scalar("losses/denoiser", float(k), k)  # logged at updates
            w.add_scalar("charts/episode_return", float(-k), 100 * k)  # logged at env steps
        w.add_text("notes", "not a scalar", 10)
    with SummaryWriter(str(tmp_path / "pretrain")) as w:  # another run to TensorBoard: left as it is
        w.add_scalar("losses/denoiser", 9.0, 9)
    at = {"losses/denoiser": 5, "charts/episode_return": 300}

    dropped = drop_redone(tmp_path, lambda tag, step: step <= at.get(tag, 0))

    assert dropped == 5 + 7 + 1
    assert scalars(tmp_path, "losses/denoiser") == [(k, float(k)) for k in range(1, 6)]
    assert scalars(tmp_path, "charts/episode_return") == [(100 * k, float(-k)) for k in range(1, 4)]
    assert scalars(tmp_path / "pretrain", "losses/denoiser") == [(9, 9.0)]
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside them


def test_a_start_that_failed_before_its_checkpoint_leaves_no_config_beside_the_next(tmp_path):
    # Each start logs its config at the step it starts from: a resume from step 5 that failed
    # before its first checkpoint left its config at 5, beside the next resume's.
    with SummaryWriter(str(tmp_path)) as w:
        w.add_text(CONFIG_TEXT, "config A", 0)
        for k in range(1, 9):
            w.add_scalar("losses/value", float(k), k)
    with SummaryWriter(str(tmp_path)) as w:  # the resume that failed
        w.add_text(CONFIG_TEXT, "config B", 5)
    drop_redone(tmp_path, kept_before(lambda tag: 5))
    texts = EventAccumulator(str(tmp_path)).Reload().Tensors(f"{CONFIG_TEXT}/text_summary")
    assert [(t.step, t.tensor_proto.string_val[0].decode()) for t in texts] == [(0, "config A")]
    assert scalars(tmp_path, "losses/value") == [(k, float(k)) for k in range(1, 6)]  # step 5 kept


def test_overwrite_takes_the_rewrite_of_an_events_file_a_kill_left_behind(tmp_path):
    from distdiff.rundir import clear_run

    with SummaryWriter(str(tmp_path)) as w:
        w.add_scalar("losses/value", 1.0, 1)
    (path,) = tmp_path.glob(EVENTS_GLOB)
    # The rewrite a resume's clean-up was killed in (files.replacing's name): TensorBoard reads
    # this hidden file too.
    path.with_name(f".{path.stem}.partial-8f2e01ac{path.suffix}").write_bytes(path.read_bytes())
    assert len(scalars(tmp_path, "losses/value")) == 2
    clear_run(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_file_cut_short_by_a_crash_keeps_its_whole_records(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        for k in range(1, 6):
            w.add_scalar("losses/value", float(k), k)
    (path,) = tmp_path.glob(EVENTS_GLOB)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the last record, half written

    assert drop_redone(tmp_path, lambda tag, step: step <= 3) == 1  # step 4; step 5 was lost already
    assert scalars(tmp_path, "losses/value") == [(k, float(k)) for k in range(1, 4)]


def test_files_with_nothing_to_drop_are_not_rewritten(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        w.add_scalar("losses/value", 1.0, 1)
    (path,) = tmp_path.glob(EVENTS_GLOB)
    before = path.stat().st_mtime_ns, path.read_bytes()

    assert drop_redone(tmp_path, lambda tag, step: True) == 0
    assert drop_redone(tmp_path / "missing", lambda tag, step: False) == 0
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_files_unchanged_since_the_checkpoint_are_not_read(tmp_path, monkeypatch):
    from distdiff import events

    def write(name, *steps):
        with open(tmp_path / name, "ab") as f:
            for step in steps:
                event = Event(step=step, summary=Summary(value=[Summary.Value(tag="a", simple_value=float(step))]))
                RecordWriter(f).write(event.SerializeToString())

    write("events.out.tfevents.1", 1, 2)  # an earlier process's
    write("events.out.tfevents.2", 3)  # the crashed one's, up to its checkpoint at step 3
    at_checkpoint = events.event_sizes(tmp_path)
    assert set(at_checkpoint) == {"events.out.tfevents.1", "events.out.tfevents.2"}
    write("events.out.tfevents.2", 4, 5)  # past the checkpoint, then the crash
    read = []
    real = events.records

    def records(f):  # the steps of the summaries it reads, by file name
        for record, data in real(f):
            read.append((Path(f.name).name, Event.FromString(data).step))
            yield record, data

    monkeypatch.setattr(events, "records", records)

    assert drop_redone(tmp_path, lambda tag, step: step <= 3, unchanged=at_checkpoint) == 2
    # Of the changed file, only what came after the checkpoint (twice: checked, then rewritten).
    assert {step for name, step in read if name == "events.out.tfevents.2" and step} == {4, 5}
    assert not [name for name, _ in read if name == "events.out.tfevents.1"]
    assert scalars(tmp_path, "a") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert not list(tmp_path.glob(".*"))
    # Names another run dir's checkpoint recorded (a Tune trial's, a copy) match no file here; a
    # file smaller than recorded is not the one the checkpoint saw: each is read whole.
    read.clear()
    drop_redone(tmp_path, lambda tag, step: True, unchanged={"events.out.tfevents.9": 10,
                                                             "events.out.tfevents.1": 10 ** 6})
    assert {step for _, step in read if step} == {1, 2, 3}


def test_a_file_read_whole_is_read_and_rewritten_without_tensorboards_python_checksum(tmp_path, monkeypatch):
    # TensorBoard's reader and writer checksum each byte in Python (~10 MB/s): a Tune trial that
    # PBT moved onto another trial's checkpoint read its days of events whole for minutes.
    import tensorboard.compat.tensorflow_stub.pywrap_tensorflow as stub
    from distdiff import events

    with SummaryWriter(str(tmp_path)) as w:
        w.add_text("notes", "x" * 100_000, 0)
        for k in range(1, 11):
            w.add_scalar("losses/value", float(k), k)
    (path,) = tmp_path.glob(EVENTS_GLOB)
    with open(path, "rb") as f:
        ours = [data for _, data in events.records(f)]
    assert ours == list(RawEventFileLoader(str(path)).Load())  # TensorBoard's reader, the same records
    monkeypatch.setattr(stub, "crc32c", lambda data: pytest.fail("checksummed in Python"))

    assert drop_redone(tmp_path, lambda tag, step: step <= 4, unchanged={"events.out.tfevents.other": 10}) == 6
    monkeypatch.undo()
    assert scalars(tmp_path, "losses/value") == [(k, float(k)) for k in range(1, 5)]
    assert len(EventAccumulator(str(tmp_path)).Reload().Tensors("notes/text_summary")) == 1


def test_a_record_that_fails_its_checksum_ends_the_file_as_tensorboard_reads_it(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        for k in range(1, 6):
            w.add_scalar("losses/value", float(k), k)
    (path,) = tmp_path.glob(EVENTS_GLOB)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # in the data of the last record (step 5)
    path.write_bytes(bytes(data))
    assert len(list(RawEventFileLoader(str(path)).Load())) == 5  # the file's version event, steps 1-4

    assert drop_redone(tmp_path, lambda tag, step: step <= 3) == 1  # step 4; step 5 is not read
    assert scalars(tmp_path, "losses/value") == [(k, float(k)) for k in range(1, 4)]


def test_json_has_null_for_every_non_finite_number_wherever_it_is():
    data = {"a": float("inf"), "b": (1.0, float("nan")), "c": {"d": [float("-inf")]}}
    assert json.loads(to_json(data)) == {"a": None, "b": [1.0, None], "c": {"d": [None]}}


def test_an_event_with_a_refused_value_is_dropped(tmp_path):
    event = Event(step=5, summary=Summary(value=[Summary.Value(tag="a", simple_value=1.0),
                                                 Summary.Value(tag="b", simple_value=2.0)]))
    with open(tmp_path / "events.out.tfevents.1", "wb") as f:
        RecordWriter(f).write(event.SerializeToString())
    assert drop_redone(tmp_path, lambda tag, step: tag == "a") == 1


def test_kept_before_judges_each_tag_on_its_own_axis():
    # As the driver calls it: learner tags at updates, the rest at env steps.
    counters = Counters(env_steps=300, updates=5)
    keep = kept_before(lambda tag: getattr(counters, step_axis(tag)))
    assert keep("losses/denoiser", 5) and not keep("losses/denoiser", 6)
    assert keep("charts/episode_return", 300) and not keep("charts/episode_return", 301)
    assert keep(f"{CONFIG_TEXT}/text_summary", 299) and not keep(f"{CONFIG_TEXT}/text_summary", 300)


def test_the_tags_of_an_event_file_and_of_bytes_that_are_none():
    # What visualize.py reads before it removes an --out's events: only its own, never a file it
    # cannot read as events.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with SummaryWriter(d) as writer:
            writer.add_scalar("diagnostics/return_mean/run", 1.0, 3)
            writer.add_text("diagnostics/report", "# r", 3)
        [path] = Path(d).glob(EVENTS_GLOB)
        assert event_tags(path) == {"diagnostics/return_mean/run", "diagnostics/report/text_summary"}
        whole = path.read_bytes()
        path.write_bytes(whole[:-3])  # the last record cut short (a killed writer): the others read
        assert event_tags(path) == {"diagnostics/return_mean/run"}
        path.write_bytes(b"")  # made, and nothing written yet
        assert event_tags(path) == set()
        path.write_bytes(b"a user's notes, named as an event file" * 2)
        assert event_tags(path) is None
