"""The replay: FIFO capacity, the offline/online mix, return-weighted sampling, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distdiff.data.episodes import Episode, completed_return, continuation
from distdiff.data.windows import fit_normalizer
from distdiff.distributed.replay import Replay
from distdiff.layout import TrajectoryLayout

LAYOUT = TrajectoryLayout(obs_dim=3, act_dim=2)


def constant_episode(level: float, length: int, reward: float) -> Episode:
    """Every state equals ``level``: a sampled window's s_0 tells which episode it came from."""
    return Episode(np.full((length + 1, 3), level), np.zeros((length, 2)), np.full(length, reward), False, True)


def make_replay(offline=(), **kw):
    norm = fit_normalizer([constant_episode(-1.0, 10, 0.0), constant_episode(1.0, 10, 0.0)], LAYOUT, "gaussian")
    args = dict(offline_episodes=list(offline), normalizer=norm.state_dict(), layout=LAYOUT, horizon=4, discount=0.99,
                termination_penalty=0.0, capacity=1000, offline_ratio=0.0, seed=0)
    args.update(kw)
    return Replay(**args)


def share_from_good(replay: Replay, n: int = 4000) -> float:
    (batch,) = replay.sample(1, n)
    return float((batch.cond[:, 0] > 0).float().mean())


def test_uniform_sampling_follows_the_window_counts():
    replay = make_replay()
    replay.add([constant_episode(1.0, 50, 1.0), constant_episode(-1.0, 50, 0.0)])
    assert share_from_good(replay) == pytest.approx(0.5, abs=0.04)


def test_episodes_added_after_a_sample_are_drawn_at_once():
    # The learner samples between every two rollouts: the windows of each new episode must be in
    # the very next sample, not only those the replay held when it first sampled.
    replay = make_replay()
    replay.add([constant_episode(-1.0, 50, 0.0)])
    assert share_from_good(replay) == 0.0
    replay.add([constant_episode(1.0, 50, 1.0)])
    assert share_from_good(replay) == pytest.approx(0.5, abs=0.04)


def test_return_weighting_prefers_the_better_episodes():
    replay = make_replay(return_weighting=2.0)
    # Two episodes two standard deviations apart: the worse one is weighted exp(-2·2).
    replay.add([constant_episode(1.0, 50, 1.0), constant_episode(-1.0, 50, 0.0)])
    np.testing.assert_allclose(replay.episode_weights(), [1.0, np.exp(-4.0)])
    assert share_from_good(replay) == pytest.approx(1 / (1 + np.exp(-4.0)), abs=0.02)


def test_return_weighting_survives_a_checkpoint_and_eviction():
    replay = make_replay(return_weighting=2.0, capacity=100)
    replay.add([constant_episode(-1.0, 50, 5.0), constant_episode(1.0, 50, 1.0), constant_episode(-1.0, 50, 0.0)])
    assert len(replay.episodes) == 2 and replay.size() == 100  # the oldest went first
    restored = make_replay(return_weighting=2.0, capacity=100)
    restored.load_state_dict(replay.state_dict())
    np.testing.assert_allclose(restored.episode_weights(), replay.episode_weights())
    assert share_from_good(restored) == pytest.approx(share_from_good(replay), abs=0.03)


def test_offline_ratio_sets_the_mix():
    replay = make_replay(offline=[constant_episode(-1.0, 100, 0.0)], offline_ratio=0.25)
    replay.add([constant_episode(1.0, 100, 1.0)])
    (batch,) = replay.sample(1, 64)
    assert int((batch.cond[:, 0] < 0).sum()) == 16


def test_the_offline_share_holds_on_average_where_a_batch_cannot_split_it_exactly():
    # Rounded once per call, 0.1 of a batch of 4 drew no offline window ever (and 0.9 no online one).
    for ratio, expected in ((0.1, 0.1), (0.9, 0.9)):
        replay = make_replay(offline=[constant_episode(-1.0, 100, 0.0)], offline_ratio=ratio)
        replay.add([constant_episode(1.0, 100, 1.0)])
        counts = [int((b.cond[:, 0] < 0).sum()) for b in replay.sample(2000, 4)]
        assert set(counts) == {int(4 * ratio), int(4 * ratio) + 1}
        assert np.mean(counts) / 4 == pytest.approx(expected, abs=0.02)


def test_a_whole_offline_share_is_exact_even_where_its_float_product_is_not():
    # 100 × 0.29 is 28.999999999999996 in floats: every batch would have drawn its count at random.
    replay = make_replay(offline=[constant_episode(-1.0, 100, 0.0)], offline_ratio=0.29)
    replay.add([constant_episode(1.0, 100, 1.0)])
    assert {int((b.cond[:, 0] < 0).sum()) for b in replay.sample(20, 100)} == {29}


def test_negative_weighting_is_refused():
    with pytest.raises(ValueError, match="return_weighting"):
        make_replay(return_weighting=-1.0)


def counting_episode(length: int) -> Episode:
    """State t equals t (the test normalizer is the identity): s_0 of a window is its start step."""
    obs = np.repeat(np.arange(length + 1, dtype=np.float64)[:, None], 3, axis=1)
    return Episode(obs, np.zeros((length, 2)), np.ones(length), False, True)


def test_online_start_weight_keeps_episode_starts_out_of_online_batches():
    replay = make_replay(online_start_weight=0.0)
    replay.add([counting_episode(50), counting_episode(30)])
    (batch,) = replay.sample(1, 4000)
    starts = batch.cond[:, 0].numpy()
    assert starts.min() >= 4  # horizon 4: windows starting at steps 0-3 are never drawn
    # the other windows are still drawn uniformly: starts 4..49 of the first, 4..29 of the second
    assert np.mean(starts >= 30) == pytest.approx(20 / (46 + 26), abs=0.03)
    uniform = make_replay()
    uniform.add([counting_episode(50), counting_episode(30)])
    (batch,) = uniform.sample(1, 4000)
    assert np.mean(batch.cond[:, 0].numpy() < 4) == pytest.approx(8 / 80, abs=0.02)


def test_only_short_episodes_with_start_weight_zero_are_still_drawn_by_return():
    # Every window a start (episodes shorter than the horizon) and starts weighted 0: drawn by
    # return alone, not uniformly, which dropped return weighting with the start weight.
    replay = make_replay(online_start_weight=0.0, return_weighting=2.0)
    replay.add([constant_episode(1.0, 3, 1.0), constant_episode(-1.0, 3, 0.0)])
    assert share_from_good(replay) == pytest.approx(1 / (1 + np.exp(-4.0)), abs=0.02)


def test_online_start_weight_zero_with_only_short_episodes_still_samples():
    replay = make_replay(online_start_weight=0.0)
    replay.add([counting_episode(3)])  # shorter than the horizon: every window is a start
    (batch,) = replay.sample(1, 100)
    assert set(batch.cond[:, 0].tolist()) <= {0.0, 1.0, 2.0}
    with pytest.raises(ValueError, match="online_start_weight"):
        make_replay(online_start_weight=-1.0)


def test_offline_start_weight_oversamples_the_offline_episode_starts():
    """Phase 2's offline share has its own start weight: with online starts left out, the
    offline ones are what teaches the planner to start."""
    replay = make_replay(offline=[counting_episode(80)], offline_ratio=1.0, offline_start_weight=10.0)
    (batch,) = replay.sample(1, 4000)
    # 4 start windows of weight 10 against 76 of weight 1
    assert np.mean(batch.cond[:, 0].numpy() < 4) == pytest.approx(40 / 116, abs=0.03)
    (batch,) = make_replay(offline=[counting_episode(80)], offline_ratio=1.0).sample(1, 4000)
    assert np.mean(batch.cond[:, 0].numpy() < 4) == pytest.approx(4 / 80, abs=0.015)


def test_a_replay_saved_after_its_checkpoint_loads_back_to_what_the_checkpoint_counted():
    # replay.pt is written first; a crash before checkpoint.pt leaves it with episodes the
    # checkpoint's counters do not have, which the resumed run would collect again.
    saved = make_replay(capacity=100)
    saved.add([constant_episode(float(k), 30, 1.0) for k in range(5)])  # the oldest two are evicted
    state = saved.state_dict()
    resumed = make_replay(capacity=100)
    assert resumed.load_state_dict(state, added_episodes=4) == 1
    assert resumed.added_episodes == 4 and resumed.size() == 60
    assert [float(ep.observations[0, 0]) for ep in resumed.episodes] == [2.0, 3.0]
    assert make_replay().load_state_dict(state, added_episodes=5) == 0
    # Resumed with a smaller capacity: the oldest episodes go, as they would on the next add.
    smaller = make_replay(capacity=60)
    smaller.load_state_dict(state)
    assert smaller.size() == 60 and [float(ep.observations[0, 0]) for ep in smaller.episodes] == [3.0, 4.0]


def test_a_refused_episode_after_the_checkpoint_drops_only_what_the_checkpoint_did_not_count():
    saved = make_replay()
    saved.add([constant_episode(float(k), 30, 1.0) for k in range(3)])  # counted by the checkpoint
    bad = constant_episode(9.0, 30, 1.0)
    bad.rewards[0] = np.nan
    saved.add([constant_episode(3.0, 30, 1.0), bad])  # then a crash before checkpoint.pt
    resumed = make_replay()
    assert resumed.load_state_dict(saved.state_dict(), added_episodes=3) == 1
    assert resumed.added_episodes == 3
    assert [float(ep.observations[0, 0]) for ep in resumed.episodes] == [0.0, 1.0, 2.0]
    # A replay.pt saved before arrivals were recorded: its episodes were all stored, in order.
    old = saved.state_dict()
    del old["arrivals"]
    old["added_episodes"] = 4
    assert make_replay().load_state_dict(old, added_episodes=3) == 1


def test_a_replay_started_empty_on_a_resume_counts_on_from_the_checkpoint():
    # A resume whose replay.pt was lost: the run has counted 10 episodes. Two more are stored,
    # then a crash between replay.pt and checkpoint.pt (still at 10): the next resume drops both,
    # which its rollouts collect again. Counted from 0 instead, it kept them, and they were
    # collected twice.
    started = make_replay(added_episodes=10)
    started.add([constant_episode(float(k), 30, 1.0) for k in range(2)])
    state = started.state_dict()
    assert state["added_episodes"] == 12 and state["arrivals"].tolist() == [11, 12]
    resumed = make_replay()
    assert resumed.load_state_dict(state, added_episodes=10) == 2
    assert resumed.size() == 0 and resumed.added_episodes == 10


def test_offline_episodes_are_never_completed_to_the_time_limit():
    # A dataset collected with a shorter time limit than the env's: its episodes were not cut.
    short = constant_episode(1.0, 10, 1.0)
    replay = make_replay(offline=[short], offline_ratio=1.0, time_limit=1000)
    replay.add([constant_episode(-1.0, 10, 1.0)])
    assert replay.offline.returns[0] == pytest.approx(sum(0.99 ** k for k in range(10)))
    online = replay._online_windows()
    assert online.returns[0] == pytest.approx(sum(0.99 ** k for k in range(1000)), rel=1e-5)


def test_an_episode_with_nan_is_counted_but_never_sampled():
    replay = make_replay()
    bad = constant_episode(1.0, 50, 1.0)
    bad.rewards[7] = np.nan
    replay.add([constant_episode(-1.0, 50, 0.0), bad])
    assert replay.added_episodes == 2 and replay.size() == 50
    (batch,) = replay.sample(1, 256)
    assert all(bool(torch.isfinite(field).all()) for field in batch)


def test_online_windows_are_those_of_the_stored_episodes_through_adds_evictions_and_a_resume():
    # Each episode's windows are made once, when it arrives; what the learner samples must stay
    # exactly the windows of what the replay holds.
    from distdiff.data.windows import WindowDataset

    rng = np.random.default_rng(0)

    def episode(length, fell):
        return Episode(rng.normal(size=(length + 1, 3)), rng.normal(size=(length, 2)), rng.normal(size=length), fell,
                       not fell)

    def same_as_rebuilt(replay):
        online = replay._online_windows()
        rebuilt = WindowDataset(list(replay.episodes), **replay._window_args, time_limit=replay.time_limit)
        for name in ("observations", "actions", "returns", "window_returns", "window_episode", "window_start",
                     "lengths", "obs_offset", "act_offset"):
            assert np.array_equal(getattr(online, name), getattr(rebuilt, name)), name

    for value_target in ("return_to_go", "window"):
        replay = make_replay(capacity=200, termination_penalty=-10.0, value_target=value_target, time_limit=90)
        replay.add([episode(60, False), episode(30, True)])
        same_as_rebuilt(replay)
        replay.add([episode(90, False), episode(50, True)])  # the first is evicted
        assert len(replay.episodes) == 3
        same_as_rebuilt(replay)
        resumed = make_replay(capacity=140, termination_penalty=-10.0, value_target=value_target, time_limit=90)
        resumed.load_state_dict(replay.state_dict())  # a smaller capacity: only the last two stay
        assert len(resumed.episodes) == 2
        same_as_rebuilt(resumed)
        crashed = make_replay(capacity=200, termination_penalty=-10.0, value_target=value_target, time_limit=90)
        assert crashed.load_state_dict(replay.state_dict(), added_episodes=3) == 1  # the newest was not counted
        same_as_rebuilt(crashed)


def test_an_episode_longer_than_the_capacity_is_kept_alone():
    replay = make_replay(capacity=5)
    replay.add([constant_episode(-1.0, 3, 0.0), constant_episode(1.0, 10, 1.0)])
    assert replay.size() == 10 and share_from_good(replay, 100) == 1.0


def test_a_loaded_replay_draws_the_batches_the_saved_one_would_have_drawn():
    replay = make_replay()
    replay.add([constant_episode(1.0, 20, 1.0), constant_episode(-1.0, 20, 0.0)])
    replay.sample(3, 8)
    loaded = make_replay(seed=123)
    loaded.load_state_dict(replay.state_dict())
    assert torch.equal(replay.sample(1, 8)[0].x_start, loaded.sample(1, 8)[0].x_start)


@pytest.mark.parametrize("batch_size, ratio, n_offline", [(4, 0.25, {1}), (10, 0.27, {2, 3}), (10, 0.0, {0}),
                                                        (10, 1.0, {10})])
def test_each_batch_is_full_with_the_offline_share_rounded(batch_size, ratio, n_offline):
    replay = make_replay(offline=[constant_episode(-1.0, 50, 0.0)], offline_ratio=ratio)
    replay.add([constant_episode(1.0, 50, 1.0)])
    for batch in replay.sample(20, batch_size):
        assert len(batch.cond) == batch_size and int((batch.cond[:, 0] < 0).sum()) in n_offline


def test_a_cut_walk_is_completed_at_its_mean_pace_undiscounted():
    ep = Episode(np.zeros((5, 1)), np.zeros((4, 1)), np.array([1.0, 1.0, 1.0, 3.0]), False, False)
    assert continuation(ep, 1.0, 6) == pytest.approx(2 * 1.5)  # 2 missing steps at the mean reward 1.5
    assert completed_return(ep, 6) == pytest.approx(6.0 + 3.0)


def _read_only(ep: Episode) -> Episode:
    for a in (ep.observations, ep.actions, ep.rewards):
        a.setflags(write=False)
    return ep


def test_an_episode_copy_owns_its_arrays():
    ep = _read_only(constant_episode(1.0, 5, 1.0))
    copy = ep.copy()
    for mine, theirs in zip((copy.observations, copy.actions, copy.rewards), (ep.observations, ep.actions, ep.rewards)):
        assert not np.shares_memory(mine, theirs) and mine.flags.writeable
        np.testing.assert_array_equal(mine, theirs)


def test_the_replay_stores_its_own_copy_of_each_episode_not_the_senders_arrays():
    # Episodes arrive through Ray as read-only views of the object store: kept as they are, they
    # pin each sender's whole rollout object there for as long as the replay holds them.
    replay = make_replay()
    sent = _read_only(constant_episode(1.0, 20, 1.0))
    replay.add([sent])
    (stored,) = replay.episodes
    for mine, theirs in zip((stored.observations, stored.actions, stored.rewards),
                            (sent.observations, sent.actions, sent.rewards)):
        assert not np.shares_memory(mine, theirs)
