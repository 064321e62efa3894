"""Episodes and training windows: value targets, padding masks, conditioning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distdiff.data.episodes import Episode, discounted_returns_to_go
from distdiff.data.windows import WindowDataset, fit_normalizer
from distdiff.layout import TrajectoryLayout
from distdiff.normalizer import Normalizer

LAYOUT = TrajectoryLayout(obs_dim=2, act_dim=1)


def _episode(length, *, terminated, truncated=False, rewards=None, offset=0.0):
    """Distinct, recognizable values: observation k is [offset + k, -(offset + k)], action k is offset + 10 k."""
    k = np.arange(length + 1, dtype=np.float32) + offset
    return Episode(
        observations=np.stack([k, -k], axis=1),
        actions=(offset + 10 * np.arange(length, dtype=np.float32))[:, None],
        rewards=np.arange(1, length + 1, dtype=np.float32) if rewards is None else np.asarray(rewards, np.float32),
        terminated=terminated,
        truncated=truncated,
    )


# ----- value targets ----------------------------------------------------------------------

def test_discounted_returns_to_go_by_hand():
    # G2 = 3, G1 = 2 + 0.5·3 = 3.5, G0 = 1 + 0.5·3.5 = 2.75, G3 = 0
    np.testing.assert_allclose(discounted_returns_to_go([1, 2, 3], 0.5), [2.75, 3.5, 3.0, 0.0])
    # the bonus lands on the last reward: G2 = 3 − 100 = −97, G1 = 2 − 48.5, G0 = 1 − 23.25
    np.testing.assert_allclose(discounted_returns_to_go([1, 2, 3], 0.5, -100.0), [-22.25, -46.5, -97.0, 0.0])


def test_discounted_returns_to_go_does_not_modify_its_input():
    rewards = np.array([1.0, 2.0, 3.0])
    discounted_returns_to_go(rewards, 0.5, -100.0)
    np.testing.assert_array_equal(rewards, [1.0, 2.0, 3.0])


def test_window_returns_penalize_termination_only():
    episodes = [
        _episode(3, terminated=True, rewards=[1, 2, 3]),
        _episode(3, terminated=False, truncated=True, rewards=[1, 2, 3], offset=100.0),
        _episode(3, terminated=False, truncated=False, rewards=[1, 2, 3], offset=200.0),
    ]
    norm = fit_normalizer(episodes, LAYOUT, "gaussian")
    windows = WindowDataset(episodes, layout=LAYOUT, horizon=4, normalizer=norm, discount=0.5, termination_penalty=-100.0)
    assert len(windows) == 9
    np.testing.assert_allclose(windows.returns, [-22.25, -46.5, -97.0, 2.75, 3.5, 3.0, 2.75, 3.5, 3.0])
    batch = windows.get(np.arange(9))
    np.testing.assert_allclose(batch.returns.numpy(), windows.returns)


def test_a_windows_own_return_is_its_reward_per_step_with_padding_earning_nothing():
    episodes = [
        _episode(5, terminated=True, rewards=[1, 2, 3, 4, 5]),
        _episode(5, terminated=False, truncated=True, rewards=[1, 2, 3, 4, 5], offset=100.0),
    ]
    norm = fit_normalizer(episodes, LAYOUT, "gaussian")
    windows = WindowDataset(episodes, layout=LAYOUT, horizon=2, normalizer=norm, discount=0.5, termination_penalty=-100.0)
    # windows (1,2) (2,3) (3,4) (4,5) and (5, padding); the fall's penalty lands in the window holding the last step
    np.testing.assert_allclose(windows.window_returns, np.array([3, 5, 7, 9 - 100, 5 - 100, 3, 5, 7, 9, 5]) / 2)
    np.testing.assert_allclose(windows.get(np.arange(10)).window_returns.numpy(), windows.window_returns)
    q = windows.return_quantiles(5)
    assert q[0] == windows.window_returns.min() and q[-1] == windows.window_returns.max() and np.all(np.diff(q) >= 0)


# ----- windows -----------------------------------------------------------------------------------

@pytest.fixture
def windows():
    episodes = [_episode(3, terminated=True), _episode(6, terminated=False, truncated=True, offset=50.0)]
    norm = fit_normalizer(episodes, LAYOUT, "gaussian")
    return episodes, norm, WindowDataset(episodes, layout=LAYOUT, horizon=5, normalizer=norm, discount=0.9)


def test_one_window_per_transition(windows):
    episodes, _, ds = windows
    assert len(ds) == int(ds.lengths.sum()) == 9


@pytest.mark.parametrize("index", range(9))
def test_window_content_mask_and_cond(windows, index):
    episodes, norm, ds = windows
    ep_i, start = (0, index) if index < 3 else (1, index - 3)
    ep = episodes[ep_i]
    T, H = len(ep), 5
    batch = ds.get(np.array([index]))
    x, mask, cond = batch.x_start[0], batch.mask[0], batch.cond[0]
    assert x.shape == mask.shape == (H, 3)
    state_norm, action_norm = norm.slice(LAYOUT.state_slice), norm.slice(LAYOUT.action_slice)
    for j in range(H):
        step = start + j
        # states: real for rows up to s_T (the last observation is a real state), then s_T repeated
        want_state = state_norm.normalize(ep.observations[min(step, T)])
        np.testing.assert_allclose(x[j, :2].numpy(), want_state, rtol=1e-6, atol=1e-6)
        assert mask[j, :2].tolist() == [float(step <= T)] * 2
        # actions: real for rows before T, then the last action repeated
        want_action = action_norm.normalize(ep.actions[min(step, T - 1)])
        np.testing.assert_allclose(x[j, 2:].numpy(), want_action, rtol=1e-6, atol=1e-6)
        assert mask[j, 2].item() == float(step < T)
    # the condition is the normalized first observation, identical to the window's s_0
    np.testing.assert_allclose(cond.numpy(), state_norm.normalize(ep.observations[start]), rtol=1e-6, atol=1e-6)
    assert torch.equal(cond, x[0, :2])


def test_short_episode_mask_zeros_exactly_on_padding(windows):
    """An episode of T = 3 < H = 5 from its start: states valid on rows 0..3, actions on rows 0..2."""
    _, _, ds = windows
    mask = ds.get(np.array([0])).mask[0]
    expected = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    assert torch.equal(mask, expected)


def test_batches_are_float32_and_sampling_is_seeded(windows):
    _, _, ds = windows
    a = ds.sample(16, np.random.default_rng(0))
    b = ds.sample(16, np.random.default_rng(0))
    for u, v in zip(a, b):
        assert u.dtype == torch.float32
        assert torch.equal(u, v)


@pytest.mark.parametrize("kind", ["gaussian", "minmax"])
def test_the_clip_range_holds_the_last_state_of_every_episode(kind):
    # The last state (a fall's fallen one on Walker2d) has no action, so no transition row, but
    # it is a row of the windows the model learns: the sampler must not clip it away.
    episodes = [_episode(4, terminated=True), _episode(3, terminated=False, truncated=True, offset=-50.0)]
    norm = fit_normalizer(episodes, LAYOUT, kind)
    states = norm.slice(LAYOUT.state_slice)
    rows = states.normalize(np.concatenate([ep.observations for ep in episodes]))
    assert np.all(rows >= states.clip_min.numpy() - 1e-6) and np.all(rows <= states.clip_max.numpy() + 1e-6)
    # The mean and scale are still the transitions' alone.
    assert norm.shift.tolist() == Normalizer.fit(np.concatenate(
        [np.concatenate([ep.observations[:-1], ep.actions], axis=-1) for ep in episodes]), kind=kind).shift.tolist()


def test_fit_normalizer_checks_the_layout():
    with pytest.raises(ValueError, match="dims"):
        fit_normalizer([_episode(3, terminated=True)], TrajectoryLayout(obs_dim=3, act_dim=1), "gaussian")


def test_episode_validates_shapes():
    with pytest.raises(ValueError, match="T\\+1"):
        Episode(np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(3), True, False)
    with pytest.raises(ValueError, match="at least one step"):
        Episode(np.zeros((1, 2)), np.zeros((0, 1)), np.zeros(0), True, False)
    assert _episode(3, terminated=True, rewards=[1, 2, 3]).episode_return == 6.0


def test_empty_dataset_is_refused():
    norm = Normalizer(kind="gaussian", shift=np.zeros(3), scale=np.ones(3), clip_min=-np.ones(3), clip_max=np.ones(3))
    with pytest.raises(ValueError):
        WindowDataset([], layout=LAYOUT, horizon=4, normalizer=norm, discount=0.9)


def test_start_windows_are_drawn_as_often_as_weighted():
    episodes = [_episode(40, terminated=False, truncated=True, offset=100.0 * k) for k in range(3)]
    norm = fit_normalizer(episodes, LAYOUT, "gaussian")
    ds = WindowDataset(episodes, layout=LAYOUT, horizon=4, normalizer=norm, discount=0.9, start_weight=9.0)
    batch = ds.sample(20000, np.random.default_rng(0))
    step = np.round(norm.slice(LAYOUT.state_slice).unnormalize(batch.cond.numpy())[:, 0]) % 100
    # 12 start windows of weight 9 against 108 others of weight 1: half the draws.
    assert np.mean(step < 4) == pytest.approx(0.5, abs=0.02)
    ds.weight_windows(None)
    batch = ds.sample(20000, np.random.default_rng(0))
    step = np.round(norm.slice(LAYOUT.state_slice).unnormalize(batch.cond.numpy())[:, 0]) % 100
    assert np.mean(step < 4) == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="non-negative"):
        ds.weight_windows(np.ones(3))
