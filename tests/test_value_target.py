"""What the value net predicts (data.value_target): the return to the episode's end, or the return
the window itself earns, which a time limit cannot leak into."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import assert_same, make_trainer, snapshot, tiny_online_config
from distdiff import config
from distdiff.checkpoint import CheckpointError, load_checkpoint
from distdiff.config import ConfigError
from distdiff.data.episodes import Episode
from distdiff.data.windows import WindowDataset, fit_normalizer
from distdiff.distributed.replay import Replay
from distdiff.layout import TrajectoryLayout
from distdiff.normalizer import Normalizer
from distdiff.pretrain import load_windows, pretrain
from distdiff.training import Trainer

LAYOUT = TrajectoryLayout(obs_dim=2, act_dim=1)


def episode(rewards, *, terminated: bool, level: float = 0.0) -> Episode:
    n = len(rewards)
    obs = np.stack([np.arange(n + 1) + level, np.full(n + 1, level)], axis=1)
    return Episode(obs, np.zeros((n, 1)), np.asarray(rewards, dtype=np.float32), terminated, not terminated)


def windows_of(episodes, target, horizon=2, discount=0.5):
    norm = fit_normalizer(episodes, LAYOUT, "gaussian")
    return WindowDataset(episodes, layout=LAYOUT, horizon=horizon, normalizer=norm, discount=discount,
                         termination_penalty=-100.0, value_target=target)


def test_window_target_by_hand():
    w = windows_of([episode([1, 2, 3, 4], terminated=True), episode([1, 2, 3, 4], terminated=False)], "window")
    # r_t + 0.5 r_{t+1}; the fall's penalty lands on the last reward, padding earns nothing
    fell = [1 + 1.0, 2 + 1.5, 3 + 0.5 * (4 - 100), 4 - 100]
    timed_out = [1 + 1.0, 2 + 1.5, 3 + 2.0, 4]
    np.testing.assert_allclose(w.returns, fell + timed_out)
    np.testing.assert_allclose(w.get(np.arange(8)).returns.numpy(), w.returns)


def test_a_time_limit_leaks_into_the_return_to_go_but_not_into_the_window_target():
    # The same walk cut by a time limit after 5 and after 50 steps: its first window is the same.
    short, long = episode([1.0] * 5, terminated=False), episode([1.0] * 50, terminated=False, level=10.0)
    rtg = windows_of([short, long], "return_to_go", discount=0.9)
    own = windows_of([short, long], "window", discount=0.9)
    first = [0, len(short)]
    assert rtg.returns[first[1]] > 2 * rtg.returns[first[0]]
    assert own.returns[first[0]] == own.returns[first[1]] == pytest.approx(1.9)


def steady_walk(steps, *, terminated=False, level=0.0):
    return episode([1.0] * steps, terminated=terminated, level=level)


@pytest.mark.parametrize("target", ["return_to_go", "window"])
def test_a_walk_cut_by_the_step_budget_is_labelled_as_the_same_walk_run_to_the_time_limit(target):
    # The same steady walk, cut by the budget after 6 steps and run to the limit of 40: every
    # window of the cut walk is labelled like the window at the same step of the whole walk.
    cut, whole = steady_walk(6), steady_walk(40, level=10.0)
    norm = fit_normalizer([cut, whole], LAYOUT, "gaussian")
    labelled = WindowDataset([cut, whole], layout=LAYOUT, horizon=4, normalizer=norm, discount=0.9,
                             value_target=target, time_limit=40)
    np.testing.assert_allclose(labelled.returns[:6], labelled.returns[6:12], rtol=1e-6)
    np.testing.assert_allclose(labelled.window_returns[:12], 1.0, rtol=1e-6)
    # the whole walk's last windows run past the time limit, where nothing is earned
    assert labelled.window_returns[-1] == pytest.approx(1 / 4)


def test_a_walk_cut_just_before_the_time_limit_is_credited_only_up_to_it():
    # Cut at 38 of 40 steps: the window at step 37 shows one step and had three left, not four.
    cut = steady_walk(38)
    norm = fit_normalizer([cut], LAYOUT, "gaussian")
    labelled = WindowDataset([cut], layout=LAYOUT, horizon=4, normalizer=norm, discount=1.0, value_target="window",
                             time_limit=40)
    assert labelled.returns[-1] == pytest.approx(3.0) and labelled.returns[-2] == pytest.approx(4.0)
    assert labelled.window_returns[-1] == pytest.approx(3 / 4)


def test_a_fall_and_the_time_limit_are_not_completed():
    fell, timed_out = steady_walk(6, terminated=True), steady_walk(40, level=10.0)
    norm = fit_normalizer([fell, timed_out], LAYOUT, "gaussian")
    args = dict(layout=LAYOUT, horizon=4, normalizer=norm, discount=0.9, termination_penalty=-100.0)
    with_limit = WindowDataset([fell, timed_out], **args, time_limit=40)
    np.testing.assert_array_equal(with_limit.returns, WindowDataset([fell, timed_out], **args).returns)
    assert with_limit.returns[5] == pytest.approx(1.0 - 100.0) and with_limit.returns[-1] == pytest.approx(1.0)
    # past a fall the window's padding earns nothing: its last window holds one step and the penalty
    assert with_limit.window_returns[5] == pytest.approx((1.0 - 100.0) / 4)


def test_the_replay_weighs_a_walk_cut_by_the_budget_by_its_pace():
    slow_but_whole, fast_but_cut = steady_walk(40), episode([3.0] * 10, terminated=False, level=10.0)
    norm = fit_normalizer([slow_but_whole, fast_but_cut], LAYOUT, "gaussian")
    replay = Replay(offline_episodes=[], normalizer=norm.state_dict(), layout=LAYOUT, horizon=4, discount=0.9,
                    termination_penalty=-100.0, capacity=1000, offline_ratio=0.0, return_weighting=1.0,
                    time_limit=40, seed=0)
    replay.add([slow_but_whole, fast_but_cut])
    weights = replay.episode_weights()
    # completed to the limit, the fast walk earns 120 against 40: it is the best episode
    assert weights[1] == 1.0 and weights[0] < weights[1]


def test_an_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown value target"):
        windows_of([episode([1, 2], terminated=True)], "advantage")
    with pytest.raises(ConfigError, match="data.value_target"):
        config.load(None, {"data.value_target": "advantage"})


def test_the_replay_gives_online_windows_the_configured_target():
    ep = episode([1, 2, 3, 4], terminated=False)
    norm = fit_normalizer([ep], LAYOUT, "gaussian")
    replay = Replay(offline_episodes=[], normalizer=norm.state_dict(), layout=LAYOUT, horizon=2, discount=0.5,
                    termination_penalty=-100.0, capacity=100, offline_ratio=0.0, value_target="window", seed=0)
    replay.add([ep])
    (batch,) = replay.sample(1, 64)
    assert set(batch.returns.tolist()) <= {2.0, 3.5, 5.0, 4.0}


def faster_and_slower_episodes():
    """Fast walks (2 per step) stopped by a time limit after 20 steps, slow ones (1 per step)
    after 120: their return-to-go ranks the slow walk higher, what they earn the fast one."""
    fast = [episode([2.0] * 20, terminated=False, level=1.0) for _ in range(4)]
    slow = [episode([1.0] * 120, terminated=False, level=-1.0) for _ in range(4)]
    for ep in fast + slow:
        ep.observations[:, 0] = np.sin(np.arange(len(ep) + 1))  # the same gait in both
    return fast + slow


@pytest.mark.parametrize("target,faster_is_better", [("return_to_go", False), ("window", True)])
def test_the_value_net_learns_which_walk_earns_more_only_from_the_window_target(target, faster_is_better):
    episodes = faster_and_slower_episodes()
    trainer, windows = make_trainer(episodes, **{"data.value_target": target, "data.discount": 0.97,
                                                "env.obs_dim": 2, "env.act_dim": 1})
    rng = np.random.default_rng(0)
    for _ in range(300):
        trainer.update(windows.sample(32, rng))
    starts = windows.get(np.array([0, 4 * 20]))  # the first window of a fast and of a slow walk
    with torch.no_grad():
        v_fast, v_slow = trainer.ema_value(starts.x_start, torch.zeros(2, dtype=torch.long)).reshape(-1).tolist()
    assert (v_fast > v_slow) == faster_is_better, (v_fast, v_slow)


def test_the_target_does_not_change_how_the_denoiser_trains(tiny_episodes):
    runs = []
    for target in ("return_to_go", "window"):
        trainer, windows = make_trainer(tiny_episodes[:3], **{"data.value_target": target})
        rng = np.random.default_rng(0)
        for _ in range(5):
            trainer.update(windows.sample(8, rng))
        runs.append({k: v for k, v in snapshot(trainer).items() if "denoiser" in k})
    assert_same(*runs)


def test_a_checkpoint_trains_on_only_with_its_own_target_and_init_restandardizes(tiny_dataset, tmp_path):
    prior = pretrain(tiny_online_config(tiny_dataset, **{"train.steps": 5}), tmp_path / "prior", quiet=True)
    state = load_checkpoint(prior)
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 5, "data.value_target": "window"})
    with pytest.raises(CheckpointError, match="value net predicts"):
        Trainer.from_checkpoint(state, cfg=cfg)
    retrained = load_checkpoint(pretrain(cfg, tmp_path / "window", quiet=True, init=prior))
    targets = load_windows(cfg, Normalizer.from_state_dict(state["normalizer"]))[1].returns
    assert retrained["value_stats"] == pytest.approx({"mean": targets.mean(), "std": targets.std()})
    assert retrained["value_stats"] != pytest.approx(state["value_stats"])
    Trainer.from_checkpoint(retrained, cfg=cfg)
