"""The learner: it overfits a fixed batch, skips non-finite updates untouched, tracks an EMA."""
from __future__ import annotations

import dataclasses
import math
import warnings
from copy import deepcopy

import numpy as np
import pytest
import torch

from _helpers import SMOKE_CONFIG, assert_same, make_trainer, snapshot, tiny_online_config
from distdiff import config as config_lib
from distdiff import pretrain as pretrain_lib
from distdiff.checkpoint import load_checkpoint, save_checkpoint
from distdiff.training import (Trainer, ema_update, flat_weights, load_flat_weights, lr_multiplier, planner_from_checkpoint,
                               prior_of)


def test_overfits_a_fixed_batch(tiny_episodes):
    trainer, windows = make_trainer(tiny_episodes[:4])
    batch = windows.sample(8, np.random.default_rng(0))
    # a fixed evaluation: every timestep, fixed noise, the same windows
    g = torch.Generator().manual_seed(1)
    reps = 32
    t = torch.arange(8 * reps) % trainer.diffusion.n_steps
    x, mask, cond, returns, _ = (v.repeat(reps, *([1] * (v.ndim - 1))) for v in batch)
    noise = torch.randn(x.shape, generator=g)
    x_t = trainer.diffusion.layout.condition(trainer.diffusion.q_sample(x, t, noise), cond)
    target = (returns - trainer.value_mean) / trainer.value_std

    @torch.no_grad()
    def evaluate():
        loss_d = trainer.diffusion.loss(trainer.denoiser, x, cond, mask=mask, t=t, noise=noise).item()
        loss_v = torch.nn.functional.mse_loss(trainer.value(x_t, t), target).item()
        return loss_d, loss_v

    d0, v0 = evaluate()
    for _ in range(250):
        assert trainer.update(batch) is not None
    d1, v1 = evaluate()
    assert trainer.step == 250 and trainer.skipped_updates == 0
    assert d1 < 0.5 * d0, f"denoiser loss {d0:.3f} -> {d1:.3f}"
    assert v1 < 0.5 * v0, f"value loss {v0:.3f} -> {v1:.3f}"


@pytest.mark.parametrize("trained", [("denoiser", "value", "dynamics"), ("denoiser",)])
def test_an_update_steps_the_nets_that_train_and_reports_their_losses_alone(tiny_episodes, trained):
    overrides = {"train.train_dynamics": "dynamics" in trained}
    if "value" not in trained:
        overrides.update({"train.train_value": False, "guidance.scale": 0.0, "guidance.n_candidates": 1})
    trainer, windows = make_trainer(tiny_episodes[:2], **overrides)
    nets = ("denoiser", "value", "dynamics")
    before = {net: [p.clone() for p in getattr(trainer, net).parameters()] for net in nets}
    out = trainer.update(windows.sample(8, np.random.default_rng(0)))
    assert set(out) == {f"losses/{net}{suffix}" for net in trained for suffix in ("", "_grad_norm")}
    assert all(math.isfinite(v) for v in out.values())
    assert trainer.step == 1
    for net in nets:
        moved = any(not torch.equal(a, b) for a, b in zip(before[net], getattr(trainer, net).parameters()))
        assert moved == (net in trained), net


def test_gradients_are_clipped_to_grad_clip_and_their_norm_before_it_is_reported(tiny_episodes):
    trainer, windows = make_trainer(tiny_episodes[:2], **{"train.grad_clip": 1e-3, "train.train_dynamics": True})
    out = trainer.update(windows.sample(8, np.random.default_rng(0)))
    for net in ("denoiser", "value", "dynamics"):
        grads = [p.grad for p in getattr(trainer, net).parameters() if p.grad is not None]
        assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) <= 1.01e-3
        assert out[f"losses/{net}_grad_norm"] > 1e-2, net  # the norm before clipping, which says how far it was cut


def test_condition_dropout_drops_the_return_condition_of_that_share_of_windows(tiny_episodes):
    # Classifier-free guidance (return_scale > 1) mixes the conditioned prediction with the
    # unconditioned one: a denoiser that never saw its condition dropped has no unconditioned one.
    masks = []
    for dropout in (0.25, 0.0):
        trainer, windows = make_trainer(tiny_episodes[:2], **{"model.returns_condition": True,
                                                              "train.condition_dropout": dropout})
        forward = trainer.denoiser.forward

        def spy(*args, returns_mask=None, **kwargs):
            masks.append(returns_mask.detach().clone())
            return forward(*args, returns_mask=returns_mask, **kwargs)

        trainer.denoiser.forward = spy
        trainer.update(windows.sample(4000, np.random.default_rng(0)))
        assert len(masks) == 1
        kept = masks.pop()
        assert set(kept.unique().tolist()) <= {0.0, 1.0}
        assert abs(float((kept == 0).float().mean()) - dropout) < 0.03


def _poison(batch, where):
    x, mask, cond, returns, window_returns = (v.clone() for v in batch)
    if where == "x_start":
        x[2, 3, -1] = float("nan")
    elif where == "cond":
        cond[1, 0] = float("inf")
    elif where == "returns":
        returns[0] = float("nan")
    elif where == "window_returns":
        window_returns[3] = float("nan")
    return type(batch)(x, mask, cond, returns, window_returns)


@pytest.mark.parametrize("where", ["x_start", "cond", "returns", "window_returns"])
def test_non_finite_batch_is_skipped_and_changes_nothing(tiny_episodes, where):
    # window returns only reach the loss of a return-conditioned denoiser
    conditioned = {"model.returns_condition": where == "window_returns"}
    trainer, windows = make_trainer(tiny_episodes[:2], **{"train.ema_start": 0, "train.ema_every": 1, **conditioned})
    rng = np.random.default_rng(0)
    for _ in range(3):  # past the first step, so Adam has moments that a bad step could corrupt
        trainer.update(windows.sample(8, rng))
    before = snapshot(trainer)
    assert trainer.update(_poison(windows.sample(8, rng), where)) is None
    assert trainer.skipped_updates == 1
    # Named in the error repeated skips raise: a bad return reaches the value net's loss alone.
    assert ("value loss" in trainer.nonfinite) == (where != "window_returns")
    assert ("denoiser loss" in trainer.nonfinite) == (where != "returns")
    assert trainer.step == 3
    assert_same(snapshot(trainer), before)
    assert all(p.grad is None for p in trainer.denoiser.parameters())
    # and training goes on normally afterwards
    out = trainer.update(windows.sample(8, rng))
    assert out is not None and all(math.isfinite(v) for v in out.values())
    assert trainer.step == 4
    assert all(torch.isfinite(v).all() for v in snapshot(trainer).values() if torch.is_tensor(v))


def test_an_infinite_gradient_with_a_finite_loss_is_skipped_and_changes_nothing(tiny_episodes):
    # (as a half-precision overflow in the backward pass would make it)
    trainer, windows = make_trainer(tiny_episodes[:2])
    rng = np.random.default_rng(0)
    trainer.update(windows.sample(8, rng))
    before = snapshot(trainer)
    hook = next(trainer.denoiser.parameters()).register_hook(lambda g: g * float("inf"))
    assert trainer.update(windows.sample(8, rng)) is None
    hook.remove()
    assert trainer.skipped_updates == 1 and trainer.step == 1
    assert_same(snapshot(trainer), before)


def test_value_net_trains_on_noised_windows_with_s0_clamped(tiny_episodes):
    # As guidance asks it: V(τ^t, t) of the sampler's noisy plans, whose s_0 is the real state.
    trainer, windows = make_trainer(tiny_episodes[:2])
    batch, inputs = windows.sample(64, np.random.default_rng(0)), []
    trainer.value.register_forward_hook(lambda net, args, out: inputs.append((args[0].detach().clone(), args[1])))
    trainer.update(batch)
    ((x_t, t),) = inputs
    assert torch.equal(trainer.diffusion.layout.states(x_t)[:, 0], batch.cond)
    assert len(set(t.tolist())) > 1 and not torch.allclose(x_t, batch.x_start)


def test_ema_follows_only_every_kth_step(tiny_episodes):
    trainer, windows = make_trainer(tiny_episodes[:2], **{"train.ema_start": 0, "train.ema_every": 2,
                                                          "train.ema_decay": 0.5})
    rng = np.random.default_rng(0)
    before = [p.clone() for p in trainer.ema_denoiser.parameters()]
    trainer.update(windows.sample(8, rng))  # step 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.ema_denoiser.parameters()))
    trainer.update(windows.sample(8, rng))  # step 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.ema_denoiser.parameters()))


@pytest.mark.parametrize("net", ["denoiser", "value", "dynamics"])
def test_ema_copies_until_start_then_lags(tiny_episodes, net):
    # Every net a planner uses is its EMA copy: the value net guides and ranks, the dynamics
    # model ranks; an EMA left at its first copy would plan with nets that never learned.
    trainer, windows = make_trainer(tiny_episodes[:2], **{"train.ema_start": 2, "train.ema_every": 1,
                                                          "train.ema_decay": 0.75, "train.train_dynamics": True})
    ema_net, online_net = getattr(trainer, f"ema_{net}"), getattr(trainer, net)
    rng = np.random.default_rng(0)
    trainer.update(windows.sample(8, rng))
    for a, b in zip(ema_net.parameters(), online_net.parameters()):
        assert torch.equal(a, b)
    previous = [p.clone() for p in ema_net.parameters()]
    trainer.update(windows.sample(8, rng))
    for old, ema, online in zip(previous, ema_net.parameters(), online_net.parameters()):
        torch.testing.assert_close(ema, 0.75 * old + 0.25 * online)
    assert any(not torch.equal(e, o) for e, o in zip(ema_net.parameters(), online_net.parameters()))


def test_planners_and_workers_get_the_ema_weights(tiny_episodes):
    trainer, windows = make_trainer(tiny_episodes[:2], **{"train.ema_start": 0, "train.ema_decay": 0.75})
    rng = np.random.default_rng(0)
    for _ in range(2):
        trainer.update(windows.sample(8, rng))
    assert any(not torch.equal(e, o) for e, o in zip(trainer.ema_denoiser.parameters(), trainer.denoiser.parameters()))
    weights = trainer.weights()
    copy = deepcopy(trainer.denoiser)
    for p in copy.parameters():
        torch.nn.init.zeros_(p)
    # Workers get the weights as read-only views of Ray's object store: loading one must work
    # on it as it is, without a warning, and leave it untouched.
    readonly = weights["denoiser"].copy()
    readonly.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_flat_weights(copy, readonly)
    for (k, v), w in zip(trainer.ema_denoiser.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(w, v), k
    assert np.array_equal(readonly, weights["denoiser"])
    with pytest.raises(ValueError, match="entries"):
        load_flat_weights(copy, readonly[:-1])
    assert trainer.planner().denoiser is trainer.ema_denoiser


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    m = lambda step: lr_multiplier(step, schedule="cosine", total=110, warmup=10, min_ratio=0.1)  # noqa: E731
    assert [m(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert m(10) == 1.0 and m(60) == pytest.approx(0.55) and m(110) == pytest.approx(0.1)
    rates = [m(s) for s in range(10, 111)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert m(500) == pytest.approx(0.1)  # held at the floor past the budget
    assert lr_multiplier(7, schedule="constant", total=10) == 1.0
    with pytest.raises(ValueError, match="lr schedule"):
        lr_multiplier(0, schedule="step", total=10)


def test_pretraining_rates_follow_the_schedule_and_phase_2_keeps_its_own(tiny_episodes):
    trainer, windows = make_trainer(tiny_episodes[:2], **{"train.lr_schedule": "cosine", "train.steps": 4,
                                                          "train.lr": 1e-3, "train.value_lr": 2e-3})
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(4):
        trainer.follow_lr_schedule()
        seen += [trainer.opt_denoiser.param_groups[0]["lr"], trainer.opt_value.param_groups[0]["lr"]]
        trainer.update(windows.sample(8, rng))
    expected = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert seen == pytest.approx([lr * e for e in expected for lr in (1e-3, 2e-3)])
    # A phase-2 learner built from this checkpoint starts at its own constant rate, not at
    # the schedule's end (where the cosine would have left it at zero).
    learner = Trainer.from_checkpoint(trainer.state_dict(), cfg=trainer.cfg, lr_scale=0.25)
    assert learner.opt_denoiser.param_groups[0]["lr"] == pytest.approx(0.25e-3)


def test_ema_update_is_a_lerp():
    target, source = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    want = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(target.parameters(), source.parameters())]
    ema_update(target, source, 0.9)
    for t, w in zip(target.parameters(), want):
        torch.testing.assert_close(t.detach(), w)


def test_no_value_training_without_guidance(tiny_episodes):
    trainer, windows = make_trainer(tiny_episodes[:2], **{"train.train_value": False, "guidance.scale": 0.0,
                                                          "guidance.n_candidates": 1})
    before = {k: v.clone() for k, v in trainer.value.state_dict().items()}
    out = trainer.update(windows.sample(8, np.random.default_rng(0)))
    assert "losses/value" not in out and "losses/value_grad_norm" not in out  # not logged as a perfect 0
    assert "losses/dynamics" not in out and out["losses/denoiser"] > 0
    for k, v in trainer.value.state_dict().items():
        assert torch.equal(v, before[k])
    assert trainer.planner().value is None


def test_bf16_autocast_trains_float32_weights(tiny_episodes):
    fp32, windows = make_trainer(tiny_episodes[:2])
    bf16, _ = make_trainer(tiny_episodes[:2], **{"train.precision": "bf16"})
    batch = windows.sample(8, np.random.default_rng(0))
    torch.manual_seed(1)
    a = fp32.update(batch)
    torch.manual_seed(1)
    b = bf16.update(batch)
    # same weights, same t and noise: only the forward's rounding differs
    assert b["losses/denoiser"] == pytest.approx(a["losses/denoiser"], rel=0.05)
    assert b["losses/value"] == pytest.approx(a["losses/value"], rel=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.denoiser.parameters())
    assert all(v.dtype == torch.float32 for st in bf16.opt_denoiser.state.values() for k, v in st.items() if k != "step")
    first = b["losses/denoiser"]
    for _ in range(60):
        out = bf16.update(batch)
    assert out["losses/denoiser"] < 0.7 * first


def test_compiled_nets_share_checkpoints_with_eager_ones(tiny_episodes):
    eager, _ = make_trainer(tiny_episodes[:2])
    compiled, _ = make_trainer(tiny_episodes[:2], **{"train.compile": "reduce-overhead"})
    for key in ("denoiser", "value", "ema_denoiser", "ema_value"):
        assert compiled.state_dict()[key].keys() == eager.state_dict()[key].keys()
    compiled.load_state_dict(eager.state_dict())
    for key in ("denoiser", "value", "ema_denoiser", "ema_value"):
        mine, theirs = compiled.state_dict()[key], eager.state_dict()[key]
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), key
    eager.load_state_dict(compiled.state_dict())


def test_ctrl_c_during_pretraining_is_deferred_to_a_step_boundary():
    """The first Ctrl-C only asks the loop to stop between steps (a KeyboardInterrupt inside
    TensorBoard's writer can hang its close); a second one raises at once."""
    import signal

    from distdiff.process import deferred_interrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # SIGTERM (ray job stop, a preemption): stop at the next step and save, as after a Ctrl-C.
    for sig in (signal.SIGINT, signal.SIGTERM):
        with deferred_interrupt() as interrupted:
            signal.raise_signal(sig)
            assert interrupted.is_set()
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)
        assert signal.getsignal(sig) == (signal.SIG_DFL if before[sig] is None else before[sig])
    # Phase 2's loop waits for rollouts after the first: the second only asks it to stop waiting.
    # One SIGTERM asks both at once (`ray job stop`, a preemption: seconds before SIGKILL).
    for presses in ([signal.SIGINT] * 2, [signal.SIGTERM]):
        with deferred_interrupt(raise_at=3) as interrupted:
            for sig in presses:
                signal.raise_signal(sig)
            assert interrupted.is_set() and interrupted.again.is_set()
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(presses[0])
    assert {sig: signal.getsignal(sig) for sig in before} == before
    # Inside a step held whole, the Ctrl-C that would raise raises as it ends; one more at once.
    with deferred_interrupt() as interrupted:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            with interrupted.hold():
                signal.raise_signal(signal.SIGINT)
                finished = True
        assert finished
        with pytest.raises(KeyboardInterrupt, match="at once"):
            with interrupted.hold():
                signal.raise_signal(signal.SIGINT)
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    raise KeyboardInterrupt("at once") from None


def test_a_sigterm_that_comes_while_the_ctrl_c_handler_sets_its_flag_is_taken_too():
    # The flags were threading.Events, whose set() takes a lock that is not reentrant: a SIGTERM
    # handled inside the Ctrl-C handler's set() waited for that lock for ever, and the process
    # took no signal but SIGKILL. In a subprocess, killed if it hangs so.
    import subprocess
    import sys

    code = """
import os, signal, sys
from distdiff.process import deferred_interrupt

events = []

def tracer(frame, event, arg):
    if frame.f_code.co_name != "set" or events:
        return None

    def local(frame, event, arg):
        events.append(event)
        # The SIGTERM at the handler's set()'s second line (inside the lock it took), or as it returns.
        if events.count("line") == 2 or (event == "return" and events.count("line") < 2):
            os.kill(os.getpid(), signal.SIGTERM)
        return local
    return local

with deferred_interrupt() as requested:
    sys.settrace(tracer)
    os.kill(os.getpid(), signal.SIGINT)
    sys.settrace(None)
    print(requested.is_set(), requested.again.is_set(), "return" in events)
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung in its signal handlers")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "True"]  # both flags, as SIGTERM sets them


def test_a_second_ctrl_c_inside_a_pretraining_update_saves_it_whole(tiny_dataset, tmp_path, monkeypatch):
    import os
    import signal

    update_ema, done = Trainer._update_ema, []

    def interrupted_twice_before_the_ema(self):
        if self.step == 4 and "interrupted" not in done:
            # The nets stepped and the step counted, not yet their EMA: two impatient Ctrl-Cs.
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("interrupted")
        update_ema(self)
        done.append(self.step)

    monkeypatch.setattr(Trainer, "_update_ema", interrupted_twice_before_the_ema)
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 50, "train.checkpoint_every": 50})
    with pytest.raises(KeyboardInterrupt):
        pretrain_lib.pretrain(cfg, tmp_path, quiet=True)
    assert done[-2:] == ["interrupted", 4] and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


def test_a_stop_that_comes_with_pretrainings_last_save_is_not_taken_as_done(tiny_dataset, tmp_path, monkeypatch):
    # SIGTERM (a preemption) as the last checkpoint is written: train.py's phase 2 must not start.
    import os
    import signal

    saves, save = [], pretrain_lib.save_checkpoint

    def save_as_sigterm_comes(path, payload):
        saves.append(payload["step"])
        os.kill(os.getpid(), signal.SIGTERM)
        save(path, payload)

    monkeypatch.setattr(pretrain_lib, "save_checkpoint", save_as_sigterm_comes)
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 5, "train.checkpoint_every": 100})
    with pytest.raises(KeyboardInterrupt):
        pretrain_lib.pretrain(cfg, tmp_path, quiet=True)
    assert saves == [5] and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5


def test_a_planner_blends_a_phase_2_checkpoint_with_its_prior(tiny_episodes):
    trainer, _ = make_trainer(tiny_episodes[:2])
    pretrained = trainer.state_dict()
    aligned = deepcopy(pretrained)
    aligned["ema_denoiser"] = {k: v + 1.0 for k, v in aligned["ema_denoiser"].items()}
    aligned["prior"] = prior_of(pretrained)

    def denoiser_of(state, w):
        cfg = config_lib.from_dict({"online": {"prior_weight": w}}, trainer.cfg)
        return planner_from_checkpoint(state, cfg).denoiser.state_dict()

    for k, v in denoiser_of(aligned, 0.25).items():
        torch.testing.assert_close(v, 0.75 * aligned["ema_denoiser"][k] + 0.25 * pretrained["ema_denoiser"][k])
    assert all(torch.equal(v, aligned["ema_denoiser"][k]) for k, v in denoiser_of(aligned, 0.0).items())
    # a checkpoint that is not from phase 2 is its own prior
    assert all(torch.equal(v, pretrained["ema_denoiser"][k]) for k, v in denoiser_of(pretrained, 0.25).items())


def test_a_prior_that_trained_no_dynamics_model_blends_none_in(tiny_episodes):
    # Every checkpoint holds a dynamics model; pretrained without train.train_dynamics it is its
    # initial weights, which phase 2 (training one) must not blend into the one ranking plans.
    untrained, _ = make_trainer(tiny_episodes[:2], **{"train.train_dynamics": False})
    trained, _ = make_trainer(tiny_episodes[:2], **{"train.train_dynamics": True})
    assert "ema_dynamics" in untrained.state_dict()
    assert set(prior_of(untrained.state_dict())) == {"denoiser", "value"}
    assert set(prior_of(trained.state_dict())) == {"denoiser", "value", "dynamics"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_asked_for_where_there_is_none_is_a_config_error():
    from distdiff.training import resolve_device

    with pytest.raises(config_lib.ConfigError, match="--train.device cpu"):
        resolve_device("cuda")
    # A GPU learner is asked for by online.learner_num_gpus, which is what to change.
    from distdiff.distributed.learner import Learner

    with pytest.raises(config_lib.ConfigError, match=r"online.learner_num_gpus\) is cuda .* pass --online.learner_num_gpus 0"):
        Learner(config=config_lib.Config().to_dict(), checkpoint={}, device="cuda")


def test_a_second_ctrl_c_while_interrupted_pretraining_saves_does_not_lose_the_save(tiny_dataset, tmp_path, monkeypatch):
    import os
    import signal

    update, saving = Trainer.update, []

    def interrupted_at_the_third(self, batch):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the loop stops at its next check
        return update(self, batch)

    def second_ctrl_c_then_save(path, payload):
        saving.append(payload["step"])
        os.kill(os.getpid(), signal.SIGINT)  # an impatient second one, as the save starts
        save_checkpoint(path, payload)

    monkeypatch.setattr(Trainer, "update", interrupted_at_the_third)
    monkeypatch.setattr(pretrain_lib, "save_checkpoint", second_ctrl_c_then_save)
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 50, "train.checkpoint_every": 50})
    with pytest.raises(KeyboardInterrupt):
        pretrain_lib.pretrain(cfg, tmp_path, quiet=True)
    assert saving == [4] and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


def test_pretraining_skips_scattered_bad_batches_and_stops_at_a_run_of_them(tiny_dataset, tmp_path, monkeypatch):
    """Non-finite updates stop pretraining only when MAX_SKIPPED_IN_A_ROW come in a row: a long run
    with a rare bad batch (bf16) trains on, and stops with its last good checkpoint otherwise."""
    monkeypatch.setattr(pretrain_lib, "MAX_SKIPPED_IN_A_ROW", 3)
    update, calls = Trainer.update, []

    def every_other_bad(self, batch):
        calls.append(None)
        if len(calls) % 2:
            self.skipped_updates += 1
            return None
        return update(self, batch)

    monkeypatch.setattr(Trainer, "update", every_other_bad)
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 20, "train.checkpoint_every": 10})
    ckpt = pretrain_lib.pretrain(cfg, tmp_path / "scattered", quiet=True)
    state = load_checkpoint(ckpt)
    assert state["step"] == 20 and state["skipped_updates"] == 20  # more skips than the limit, none in a row

    def bad_after_ten(self, batch):
        calls.append(None)
        if self.step >= 10:
            self.skipped_updates += 1
            return None
        return update(self, batch)

    monkeypatch.setattr(Trainer, "update", bad_after_ten)
    with pytest.raises(FloatingPointError, match="3 non-finite updates in a row"):
        pretrain_lib.pretrain(cfg, tmp_path / "broken", quiet=True)
    assert load_checkpoint(tmp_path / "broken" / "checkpoint.pt")["step"] == 10


def test_pretraining_logs_each_loss_as_the_mean_since_the_last_point(tiny_dataset, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checked_update = Trainer.checked_update

    def numbered(self, batch, limit):  # a real update, whose denoiser loss reads as its step
        return {**checked_update(self, batch, limit), "losses/denoiser": float(self.step)}

    monkeypatch.setattr(Trainer, "checked_update", numbered)
    saved, save = [], pretrain_lib.save_checkpoint
    monkeypatch.setattr(pretrain_lib, "save_checkpoint", lambda path, payload: (saved.append(payload["step"]),
                                                                                save(path, payload)))
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 25, "train.log_every": 10, "train.checkpoint_every": 10})
    pretrain_lib.pretrain(cfg, tmp_path, quiet=True)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    # The last point holds the updates after the last multiple of log_every.
    assert [(e.step, e.value) for e in events.Scalars("losses/denoiser")] == [(10, 5.5), (20, 15.5), (25, 23.0)]
    assert saved == [10, 20, 25]
    # At the end on a multiple of checkpoint_every: saved once.
    saved.clear()
    pretrain_lib.pretrain(config_lib.from_dict({"train": {"steps": 30}}, cfg), tmp_path, resume=True, quiet=True)
    assert saved == [30]


def test_pretraining_does_not_resume_over_a_train_run(tmp_path):
    # Its pretraining would replace phase 2's checkpoint (learner, counters, prior) with its own.
    from distdiff.checkpoint import CheckpointError, save_checkpoint
    from distdiff.rundir import CHECKPOINT

    save_checkpoint(tmp_path / CHECKPOINT, {"run": {"env_steps": 40}, "step": 24, "config": config_lib.Config().to_dict()})
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds a launch/train.py run, .* launch/train.py --resume {tmp_path}"):
        pretrain_lib.pretrain(config_lib.Config(), tmp_path, resume=True, quiet=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_pretraining_refuses_a_config_made_in_code_with_a_non_finite_value(tmp_path):
    cfg = dataclasses.replace(config_lib.Config(), data=dataclasses.replace(config_lib.Config().data,
                                                                            termination_penalty=float("-inf")))
    with pytest.raises(config_lib.ConfigError, match="data.termination_penalty must be a finite number, got -inf"):
        pretrain_lib.pretrain(cfg, tmp_path / "never", quiet=True)
    assert not (tmp_path / "never").exists()


def test_a_finished_pretraining_resumed_writes_nothing_whatever_its_flags(tiny_dataset, tmp_path):
    # Its config would become the run's without a step trained under it, and a later
    # --autoresume with the run's own command line would be refused for the difference.
    from distdiff.rundir import CHECKPOINT, CONFIG

    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 4})
    pretrain_lib.pretrain(cfg, tmp_path, quiet=True)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert CHECKPOINT in files and CONFIG in files
    changed = config_lib.from_dict({"train": {"lr": 0.005}}, cfg)
    assert pretrain_lib.pretrain(changed, tmp_path, resume=True, quiet=True) == tmp_path / CHECKPOINT
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files


def test_a_start_from_a_checkpoint_of_another_env_is_refused(tmp_path):
    # HalfCheetah and Walker2d both have 17 and 6 dims: the nets would load, with the wrong
    # normalizer and dynamics behind them.
    from distdiff.checkpoint import CheckpointError, save_checkpoint

    cheetah = config_lib.from_dict({"env": {"id": "HalfCheetah-v5"}})
    save_checkpoint(tmp_path / "cheetah.pt", {"config": cheetah.to_dict(), "step": 10})
    with pytest.raises(CheckpointError, match="trained in HalfCheetah-v5, the config's env is Walker2d-v5"):
        pretrain_lib.pretrain(config_lib.Config(), tmp_path / "run", init=tmp_path / "cheetah.pt", quiet=True)
    assert not (tmp_path / "run").exists()
    # Another version of the same env will do, as for datasets.
    from distdiff.training import check_env

    check_env({"config": config_lib.from_dict({"env": {"id": "Walker2d-v4"}}).to_dict()}, config_lib.Config())


@pytest.mark.parametrize("horizon, dim_mults, dim", [(1, (1,), 8), (2, (1, 2), 4), (2, (1, 2), 8), (2, (1,), 4),
                                                     (4, (1, 2), 8), (1, (1,), 32)])
def test_the_nets_the_config_refuses_for_their_norm_groups_are_those_that_fail_on_one_plan(horizon, dim_mults, dim):
    # A GroupNorm over a single value makes it a constant, and fails on a batch of one, which
    # an evaluation's last env plans (validate applies group_norm_problem).
    from distdiff.nn.temporal import TemporalUnet, ValueNet, group_norm_problem

    for net_type, unet in ((TemporalUnet, True), (ValueNet, False)):
        net = net_type(horizon=horizon, transition_dim=3, dim=dim, dim_mults=dim_mults).eval()
        try:
            net(torch.randn(1, horizon, 3), torch.tensor([0]))
            failed = False
        except ValueError:
            failed = True
        assert failed == bool(group_norm_problem(horizon, dim, dim_mults, unet=unet)), (net_type, failed)


def test_every_net_a_rollout_worker_plans_with_is_the_ema_copy(tiny_episodes):
    # weights() shipping the online value net: guidance on the workers used the noisy net, not
    # the EMA one the planner and the checkpoint's planner use.
    trainer, windows = make_trainer(tiny_episodes[:2], **{"train.train_dynamics": True, "train.ema_start": 0,
                                                          "train.ema_every": 1, "train.ema_decay": 0.5})
    rng = np.random.default_rng(0)
    for _ in range(2):
        trainer.update(windows.sample(8, rng))
    weights = trainer.weights()
    assert set(weights) == {"denoiser", "value", "dynamics"}
    for name, flat in weights.items():
        ema, online = flat_weights(getattr(trainer, f"ema_{name}")), flat_weights(getattr(trainer, name))
        assert np.array_equal(flat, ema), name
        assert not np.array_equal(flat, online), name  # (a decay of 0.5 keeps them apart)


def test_a_run_records_the_dataset_it_loaded_even_where_the_config_names_another_and_a_fallback():
    # A resume on its own downloaded dataset must not record the fallback's id in config.yaml:
    # the next resume would train on random-policy episodes.
    from distdiff.data.minari_io import LoadedDataset
    from distdiff.pretrain import trained_on

    cfg = config_lib.load(None, {"data.dataset_id": "mujoco/walker2d/medium-v0"})
    own = LoadedDataset("farama/walker2d/mirror-v0", "Walker2d-v5", [], None, None)
    assert trained_on(cfg, own).data.dataset_id == "farama/walker2d/mirror-v0"
    assert trained_on(cfg, LoadedDataset(cfg.data.dataset_id, None, [], None, None)) is cfg


def test_a_dataset_that_records_reference_returns_the_config_lacks_is_named_with_the_flag_that_takes_them(monkeypatch):
    # Minari's own datasets of envs D4RL never scored (Swimmer, Humanoid, ...) record references
    # of their own: the run reports no score, and says how to have one.
    from distdiff.data.minari_io import LoadedDataset

    swimmer = config_lib.load(None, {"env.id": "Swimmer-v5", "env.obs_dim": 8, "env.act_dim": 2,
                                     "data.dataset_id": "mujoco/swimmer/expert-v0"})
    recorded = LoadedDataset("mujoco/swimmer/expert-v0", "Swimmer-v5", [], -3.5, 360.25)
    note = pretrain_lib.references_note(swimmer, recorded)
    assert "no normalized score is reported" in note and "--eval.reference_returns=-3.5,360.25" in note
    monkeypatch.setattr(pretrain_lib, "load_or_collect", lambda **kw: recorded)
    said = []
    assert pretrain_lib.load_data(swimmer, log=said.append) is recorded and said == [note]
    # Not to a resume, whose scores so far had none: a pair given now would start a second scale.
    said.clear()
    pretrain_lib.load_data(swimmer, own=recorded.dataset_id, log=said.append)
    assert said == []
    # Nor references the config would refuse.
    assert pretrain_lib.references_note(swimmer, recorded._replace(ref_min_score=400.0)) == ""
    assert pretrain_lib.references_note(swimmer, recorded._replace(ref_max_score=float("nan"))) == ""
    # Not where the config scores already (its own references, or D4RL's), nor without any recorded.
    given = config_lib.from_dict({"eval": {"reference_returns": [-5.0, 350.0]}}, swimmer)
    assert pretrain_lib.references_note(given, recorded) == ""
    assert pretrain_lib.references_note(config_lib.load(None), recorded) == ""
    assert pretrain_lib.references_note(swimmer, recorded._replace(ref_max_score=None)) == ""


def test_windows_keep_a_given_normalizer_and_draw_episode_starts_by_their_weight(tiny_episodes):
    # A resume or an --init keeps the normalizer its nets learned in; data.start_window_weight is
    # what pretraining samples by.
    from distdiff.data.minari_io import LoadedDataset
    from distdiff.pretrain import load_windows

    data = LoadedDataset("local/walker2d/tiny-v0", "Walker2d-v5", tiny_episodes, None, None)
    cfg = config_lib.load(SMOKE_CONFIG, {"data.start_window_weight": 10.0})
    given = make_trainer(tiny_episodes[:2])[0].normalizer
    _, windows = load_windows(cfg, given, data)
    assert windows.normalizer is given
    windows.get = lambda index: index  # (the drawn window indices)
    drawn = windows.sample(20_000, np.random.default_rng(0))
    starts = np.mean(windows.window_start < cfg.model.horizon)  # their share of the windows
    expected = 10 * starts / (10 * starts + 1 - starts)
    assert np.mean(windows.window_start[drawn] < cfg.model.horizon) == pytest.approx(expected, abs=0.02)


def test_an_init_whose_value_net_predicted_another_target_lends_no_value_statistics(tiny_dataset, tmp_path):
    # Its statistics would standardize the new targets wrongly (pretrain's own comment).
    from distdiff.checkpoint import load_checkpoint
    from distdiff.pretrain import load_windows, pretrain

    prior_cfg = tiny_online_config(tiny_dataset, **{"train.steps": 2, "data.value_target": "return_to_go"})
    prior = pretrain(prior_cfg, tmp_path / "prior", quiet=True)
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 2, "data.value_target": "window"})
    stats = load_checkpoint(pretrain(cfg, tmp_path / "window", init=prior, quiet=True))["value_stats"]
    _, windows = load_windows(cfg, None)
    assert stats["mean"] == pytest.approx(float(windows.returns.mean()))
    assert stats["mean"] != pytest.approx(load_checkpoint(prior)["value_stats"]["mean"])
