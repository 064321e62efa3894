"""Checkpoints restore a learner exactly and refuse anything that is not a distdiff checkpoint."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import assert_same, make_trainer, snapshot
from distdiff import config
from distdiff.checkpoint import VERSION, CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from distdiff.training import Trainer, planner_from_checkpoint


@pytest.fixture(scope="module")
def trained(tiny_episodes, tmp_path_factory):
    trainer, windows = make_trainer(tiny_episodes[:3], **{"train.ema_start": 2, "train.ema_every": 1})
    rng = np.random.default_rng(0)
    for _ in range(5):
        trainer.update(windows.sample(8, rng))
    trainer.skipped_updates = 2  # as if two bad batches had been skipped
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run" / "checkpoint.pt", trainer.state_dict())
    return trainer, windows, path


def test_save_is_atomic_and_loadable(trained):
    _, _, path = trained
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it
    state = load_checkpoint(path)
    assert state["format"] == "distdiff.checkpoint" and state["step"] == 5
    assert load_checkpoint(path.parent)["step"] == 5  # a run directory works too


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(trained, monkeypatch, tmp_path):
    import distdiff.checkpoint as checkpoint_module

    _, _, path = trained
    copy = save_checkpoint(tmp_path / "checkpoint.pt", load_checkpoint(path))

    def dies_mid_write(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(copy, {"step": 99})
    assert load_checkpoint(copy)["step"] == 5


def test_from_checkpoint_restores_everything(trained):
    trainer, _, path = trained
    restored = Trainer.from_checkpoint(load_checkpoint(path))
    assert restored.step == trainer.step == 5
    assert restored.skipped_updates == 2
    assert_same(snapshot(restored), snapshot(trainer))
    assert restored.cfg == trainer.cfg
    assert (restored.value_mean, restored.value_std) == (trainer.value_mean, trainer.value_std)
    for name in ("shift", "scale", "clip_min", "clip_max"):
        assert torch.equal(getattr(restored.normalizer, name), getattr(trainer.normalizer, name))


def test_training_continues_identically_after_restore(tiny_episodes, tmp_path):
    """Optimizer moments and the torch RNG come back too: the next update is the same."""
    trainer, windows = make_trainer(tiny_episodes[:3])
    rng = np.random.default_rng(0)
    for _ in range(3):
        trainer.update(windows.sample(8, rng))
    path = save_checkpoint(tmp_path / "checkpoint.pt", trainer.state_dict())
    batch = windows.sample(8, rng)
    losses = trainer.update(batch)
    restored = Trainer.from_checkpoint(load_checkpoint(path))
    assert restored.update(batch) == losses
    assert_same(snapshot(restored), snapshot(trainer))


def test_learning_rates_come_from_the_config_not_the_checkpoint(trained):
    """Fine-tuning from --init with a smaller rate must not keep the rate the prior was saved with."""
    trainer, _, path = trained
    cfg = config.from_dict({"train": {"lr": 1e-5, "value_lr": 3e-5}}, trainer.cfg)
    restored = Trainer.from_checkpoint(load_checkpoint(path), cfg=cfg)
    assert [g["lr"] for g in restored.opt_denoiser.param_groups] == [1e-5]
    assert [g["lr"] for g in restored.opt_value.param_groups] == [3e-5]
    # the moments still come from the checkpoint
    moments = restored.opt_denoiser.state_dict()["state"]
    assert moments and all(int(s["step"]) == 5 for s in moments.values())


def test_planner_from_checkpoint_plans_like_the_trainer(trained, tiny_episodes):
    trainer, _, path = trained
    planner = planner_from_checkpoint(load_checkpoint(path))
    obs = np.stack([ep.observations[0] for ep in tiny_episodes[:3]])
    a = planner.plan(obs, generator=torch.Generator().manual_seed(0))
    b = trainer.planner().plan(obs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.trajectories, b.trajectories)
    np.testing.assert_array_equal(a.actions, b.actions)
    calls = []

    def guide(x, t, clamp):
        calls.append(int(t[0]))
        return x

    # A guide of your own in place of the value guide, here one that leaves plans be: they are
    # those of the same checkpoint with its value guidance off.
    unguided = dataclasses.replace(planner.config, guidance=dataclasses.replace(planner.config.guidance, scale=0.0))
    assert planner.config.guidance.scale > 0
    expected = planner_from_checkpoint(path, unguided).plan(obs, generator=torch.Generator().manual_seed(0))
    planned = planner_from_checkpoint(path, guide=guide).plan(obs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(planned.trajectories, expected.trajectories) and calls


def test_checkpoint_for_another_model_config_is_refused(trained):
    trainer, _, path = trained
    state = load_checkpoint(path)
    other = config.from_dict({"model": {"dim": 16}}, trainer.cfg)
    # One line naming the field, not PyTorch's line for every tensor of another shape.
    expected = f"does not fit this model config: model.dim is {trainer.cfg.model.dim} there, 16 here$"
    with pytest.raises(CheckpointError, match=expected):
        Trainer.from_checkpoint(state, cfg=other)
    with pytest.raises(CheckpointError, match=expected):
        planner_from_checkpoint(state, other)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(np.random.default_rng(0).bytes(4096), id="random-4k"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"a": 1}', id="json"),
        pytest.param(b"PK\x03\x04garbage", id="broken-zip"),
        pytest.param(b"hello world", id="text"),
        pytest.param(b"q", id="pickle-opcode-q"),
        pytest.param(b"M", id="pickle-opcode-M"),
    ],
)
def test_unreadable_files_are_refused(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "Python objects" not in str(info.value)  # that is for files that hold them
    # Why, in words (not "KeyError: 101" or "EOFError: "): empty, not a torch file, or damaged.
    assert re.search(r"\((an empty file|not a torch file, or damaged|damaged, or not a torch file)\)$", str(info.value))


def test_truncated_checkpoint_is_refused(trained, tmp_path):
    _, _, path = trained
    data = path.read_bytes()
    cut = tmp_path / "checkpoint.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(cut)


def test_foreign_torch_file_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match="not a distdiff checkpoint"):
        load_checkpoint(path)
    torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointError, match="not a distdiff checkpoint"):
        load_checkpoint(path)


def test_other_checkpoint_format_version_is_refused(trained, tmp_path):
    _, _, path = trained
    payload = torch.load(path, weights_only=True)
    keys = [k for k, v in payload.items() if "version" in k and v == VERSION]
    assert keys, "the checkpoint must record its format version"
    for k in keys:
        payload[k] = 99
    other = tmp_path / "checkpoint.pt"
    torch.save(payload, other)
    with pytest.raises(CheckpointError, match="99"):
        load_checkpoint(other)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint") as raised:
        load_checkpoint(tmp_path)  # a directory without checkpoint.pt
    assert "phase 1" not in str(raised.value)


def test_a_run_stopped_in_phase_1_points_to_its_pretraining_checkpoint(trained, tmp_path):
    (tmp_path / "pretrain").mkdir()
    shutil.copy(trained[2], tmp_path / "pretrain" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"its run stopped in phase 1: .*pretrain/checkpoint.pt"):
        load_checkpoint(tmp_path)


def test_a_run_stopped_before_its_first_checkpoint_is_said_to_start_again(tmp_path):
    # A SIGTERM while the actors start leaves the run's config.yaml and events: --resume there
    # said only that there was no checkpoint.
    config.save(config.Config(), tmp_path / "config.yaml")
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*checkpoint.pt \(a run stopped there before its "
                                              r"first checkpoint: the command line that started it, or --autoresume, "
                                              r"starts it again\)$"):
        load_checkpoint(tmp_path)


class _Payload:
    """Unpickling this would create a file: loading must never run code from a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemPayload(_Payload):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_a_command_is_called_what_it_is(tmp_path):
    # torch names a global of a blocked module (os.system's posix) otherwise than one it does not allow.
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "distdiff.checkpoint", "format_version": VERSION, "evil": _SystemPayload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="holds Python objects, which distdiff never unpickles"):
        load_checkpoint(path)
    assert not marker.exists()


def test_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "distdiff.checkpoint", "version": VERSION, "format_version": VERSION,
                "evil": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="holds Python objects, which distdiff never unpickles"):
        load_checkpoint(path)
    assert not marker.exists()
    os.remove(path)


def test_a_write_that_fails_leaves_the_old_file_and_nothing_else(tmp_path):
    from distdiff.files import replacing

    path = tmp_path / "plan.mp4"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            assert tmp.suffix == ".mp4"  # writers that read the format from the name still can
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plan.mp4"]


def test_a_link_at_the_temporary_name_is_not_written_through(tmp_path, monkeypatch):
    from distdiff import files

    # Someone else's file, and a link to it where the next write's temporary file would go.
    target = tmp_path / "theirs.txt"
    target.write_text("theirs")
    names = iter(["0bad", "600d"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".metrics.partial-0bad.json").symlink_to(target)
    files.write_json(tmp_path / "metrics.json", {"return_mean": 1.0})
    assert target.read_text() == "theirs"
    assert not (tmp_path / "metrics.json").is_symlink() and "return_mean" in (tmp_path / "metrics.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metrics.partial-0bad.json", "metrics.json", "theirs.txt"]


def test_two_writes_of_one_file_at_once_each_write_their_own(tmp_path):
    from distdiff.files import replacing

    # Two evaluations of one checkpoint, writing its summary at the same time.
    path = tmp_path / "eval.json"
    with replacing(path) as first:
        first.write_text("first")
        with replacing(path) as second:
            second.write_text("second")
        assert path.read_text() == "second"
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_replaced_file_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    from distdiff import files

    synced, fsync = [], files._fsync

    def record(path, flags):  # (by path: macOS has no /proc to name an fd's file)
        synced.append((str(path), (tmp_path / "metrics.json").exists()))
        fsync(path, flags)

    monkeypatch.setattr(files, "_fsync", record)
    files.write_json(tmp_path / "metrics.json", {"return_mean": 1.0})
    # The new file's data before the rename (the name is not there yet), the directory after.
    (partial, partial_missing), (synced_dir, renamed) = synced
    assert re.fullmatch(r".metrics.partial-[0-9a-f]{8}.json", Path(partial).name) and not partial_missing
    assert (synced_dir, renamed) == (str(tmp_path), True)


def test_a_checkpoint_that_cannot_be_written_says_where_and_keeps_the_one_before(tmp_path, monkeypatch):
    # On a full disk torch only says "[enforce fail at inline_container.cc] unexpected pos".
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    def full_disk(obj, f):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1199360 vs 1199248")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=rf"could not write {path} \(RuntimeError: .*GiB free there"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no partial file left


def test_a_checkpoint_without_a_format_version_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "distdiff.checkpoint", "step": 1}, path)
    with pytest.raises(CheckpointError, match="format version None"):
        load_checkpoint(path)


def test_training_on_from_a_checkpoint_keeps_the_noise_its_denoiser_learned(trained):
    from distdiff.training import check_made_with

    trainer, _, path = trained
    state = load_checkpoint(path)
    # What phase 2 and acting may change: the loss weights, guidance, planning, budgets.
    check_made_with(state, config.from_dict({"diffusion": {"action_weight": 1.0, "clip_denoised": False},
                                             "guidance": {"scale": 0.3}, "planner": {"ddim_steps": 2},
                                             "online": {"env_steps": 10}}, trainer.cfg))
    # Nets of the same shapes would load, and read their noise levels wrong.
    d = trainer.cfg.diffusion
    others = {"schedule": "linear" if d.schedule != "linear" else "cosine", "n_steps": d.n_steps + 5,
              "prediction": "v" if d.prediction != "v" else "epsilon"}
    for name, value in others.items():
        with pytest.raises(CheckpointError, match=re.escape(f"diffusion.{name} is {getattr(d, name)!r} there, "
                                                            f"{value!r} here")):
            check_made_with(state, config.from_dict({"diffusion": {name: value}}, trainer.cfg))
    # Every way a checkpoint is trained on or planned with checks them.
    other = config.from_dict({"diffusion": {"schedule": others["schedule"]}}, trainer.cfg)
    for load in (lambda: Trainer.from_checkpoint(state, cfg=other), lambda: planner_from_checkpoint(state, other)):
        with pytest.raises(CheckpointError, match="diffusion.schedule is"):
            load()


class _OnDevice(torch.Tensor):
    """A tensor that says when it is moved to CPU: a GPU's tensors, on a machine without one."""

    def cpu(self, *args, **kwargs):
        return "moved"


def test_every_tensor_of_a_checkpoint_is_moved_to_cpu_however_deeply_nested():
    # Optimizer moments sit in dicts of dicts, prior weights in lists and tuples: one left on a
    # GPU makes the checkpoint fail to load with a plain torch.load where there is none.
    from distdiff.checkpoint import to_cpu

    t = torch.zeros(2).as_subclass(_OnDevice)
    payload = {"opt": {"state": {0: {"exp_avg": t}}, "param_groups": [{"betas": (0.9, 0.99)}]},
               "listed": [t, (t, 3)], "step": 7}
    assert to_cpu(payload) == {"opt": {"state": {0: {"exp_avg": "moved"}}, "param_groups": [{"betas": (0.9, 0.99)}]},
                               "listed": ["moved", ("moved", 3)], "step": 7}


def test_an_empty_checkpoint_file_is_called_empty(tmp_path):
    # What a crash or a full disk leaves; "not a torch file" sends the user hunting elsewhere.
    from distdiff.checkpoint import CheckpointError, load_checkpoint

    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match=r"\(an empty file\)$"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"\(not a torch file, or damaged\)$"):
        load_checkpoint(tmp_path / "text.pt")
