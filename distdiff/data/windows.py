"""Training windows of horizon H over episodes, with padding masks and value targets."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from distdiff.data.episodes import Episode, continuation, cut_short, discounted_returns_to_go
from distdiff.layout import TrajectoryLayout
from distdiff.normalizer import Normalizer


class Batch(NamedTuple):
    x_start: torch.Tensor  # [B, H, D] normalized trajectories
    mask: torch.Tensor  # [B, H, D] 1 on real entries, 0 on padding
    cond: torch.Tensor  # [B, obs_dim] normalized s_0
    returns: torch.Tensor  # [B] the value net's target (raw reward units; see VALUE_TARGETS)
    window_returns: torch.Tensor  # [B] reward per step the window itself earns (see WindowDataset)

    def numpy(self) -> "Batch":
        """The same entries as numpy arrays, which Ray's object store passes out of band (read in
        place); it pickles a torch tensor's bytes into the message, and copies them out again."""
        return Batch(*(t.numpy() for t in self))

    @staticmethod
    def from_numpy(batch: "Batch") -> "Batch":
        """:meth:`numpy` undone, as tensors of their own (arrays from Ray's store are read-only)."""
        return Batch(*(torch.from_numpy(np.array(a)) for a in batch))


def fit_normalizer(episodes: Sequence[Episode], layout: TrajectoryLayout, kind: str) -> Normalizer:
    """Fitted on the transitions (s_t, a_t). An episode's last state is a row of its windows too,
    without an action of its own, and on Walker2d the last state of a fall is the data's only
    fallen one: the clip range holds it, or no sampled plan could show a fall."""
    if not episodes:
        raise ValueError("no episodes to fit a normalizer to")
    rows = torch.cat([layout.join(torch.as_tensor(ep.observations[:-1], dtype=torch.float64),
                                  torch.as_tensor(ep.actions, dtype=torch.float64)) for ep in episodes]).numpy()
    if rows.shape[1] != layout.transition_dim:
        raise ValueError(f"episode rows have {rows.shape[1]} dims, layout expects {layout.transition_dim}")
    fitted = Normalizer.fit(rows, kind=kind)
    s = layout.state_slice
    last = fitted.slice(s).normalize(np.stack([ep.observations[-1] for ep in episodes]))
    clip_min, clip_max = fitted.clip_min.numpy().copy(), fitted.clip_max.numpy().copy()
    clip_min[s] = np.minimum(clip_min[s], last.min(0))
    clip_max[s] = np.maximum(clip_max[s], last.max(0))
    return Normalizer(kind=kind, shift=fitted.shift, scale=fitted.scale, clip_min=clip_min, clip_max=clip_max)


# What the value net learns to predict from a window:
# - return_to_go: Diffuser's target, the discounted return from s_0 to the episode's end. Where
#   episodes end at a time limit it mostly measures the steps left before that limit, which no
#   state shows (on sac-medium-v0 it correlates 0.90 with them and -0.30 with the window's speed).
# - window: the discounted return of the window's own transitions, the termination penalty
#   included when the episode ends inside it: what the plan itself earns, which V can read off it.
# An episode cut short of the time limit (by an env-step budget) did not end there: its
# return_to_go is completed to the limit at its own mean reward, and a window that runs past the
# cut is credited with the mean of its real steps for those it does not show, up to the limit
# (Pardo et al. 2018, "Time Limits in Reinforcement Learning"). Past a fall or the time limit,
# nothing is earned.
VALUE_TARGETS = ("return_to_go", "window")


def _window_sums(ep: Episode, horizon: int, discount: float, termination_penalty: float,
                 time_limit: Optional[int]) -> np.ndarray:
    """``Σ_{j<horizon} γ^j r_{t+j}`` for every start t over the episode's real steps, the penalty
    added to the last reward of a fall; an episode cut short of ``time_limit`` has its windows
    scaled up, at the discounted mean of their real steps, to the steps the episode had left
    before the limit (at most the horizon)."""
    rewards = np.asarray(ep.rewards, dtype=np.float64).copy()
    if ep.terminated:
        rewards[-1] += termination_penalty
    padded = np.concatenate([rewards, np.zeros(horizon - 1)])
    weights = discount ** np.arange(horizon)
    sums = np.lib.stride_tricks.sliding_window_view(padded, horizon) @ weights
    if cut_short(ep, time_limit):
        start = np.arange(len(rewards))
        shown = np.minimum(horizon, len(rewards) - start)
        reach = np.minimum(horizon, time_limit - start)
        cumulative = np.cumsum(weights)
        sums *= cumulative[reach - 1] / cumulative[shown - 1]
    return sums


class EpisodeWindows(NamedTuple):
    """One episode's part of a :class:`WindowDataset`: its normalized rows and the labels of
    the windows that start at each of its steps."""

    observations: np.ndarray  # [T+1, obs_dim] float32, normalized
    actions: np.ndarray  # [T, act_dim] float32, normalized
    returns: np.ndarray  # [T] float32: the value target of the window starting at each step
    window_returns: np.ndarray  # [T] float32: that window's own reward per step


def episode_windows(ep: Episode, *, layout: TrajectoryLayout, horizon: int, normalizer: Normalizer, discount: float,
                    termination_penalty: float = 0.0, value_target: str = "return_to_go",
                    time_limit: Optional[int] = None) -> EpisodeWindows:
    """What the windows of one episode are made of (see :class:`WindowDataset`)."""
    if value_target not in VALUE_TARGETS:
        raise ValueError(f"unknown value target {value_target!r}; choose one of {list(VALUE_TARGETS)}")
    if value_target == "window":
        returns = _window_sums(ep, horizon, discount, termination_penalty, time_limit)
    else:
        returns = discounted_returns_to_go(ep.rewards, discount, termination_penalty if ep.terminated else 0.0,
                                           continuation(ep, discount, time_limit))[:-1]
    return EpisodeWindows(
        normalizer.slice(layout.state_slice).normalize(ep.observations).astype(np.float32),
        normalizer.slice(layout.action_slice).normalize(ep.actions).astype(np.float32),
        returns.astype(np.float32),
        _window_sums(ep, horizon, 1.0, termination_penalty, time_limit).astype(np.float32) / horizon,
    )


class WindowDataset:
    """All windows ``(episode, start)`` with ``start`` in ``[0, T)``.

    Row ``j`` of a window is ``[s_{start+j}, a_{start+j}]``. Past the episode's end, states
    repeat the last observation and actions the last action; those entries are masked.
    The last observation s_T is a real state (its row's action is padding).

    A window's own return is the reward its real transitions earn, the termination penalty
    included when the episode ends inside it, divided by the horizon: the reward per step of
    what the window shows, which a return-conditioned denoiser learns to produce. Padding earns
    nothing, so a fall reads as a low return.

    ``time_limit`` is the env's step limit: an episode shorter than it that did not fall was cut
    early, and its labels are completed (see VALUE_TARGETS; None: no episode counts as cut).
    """

    def __init__(
        self,
        episodes: Sequence[Episode],
        *,
        layout: TrajectoryLayout,
        horizon: int,
        normalizer: Normalizer,
        discount: float,
        termination_penalty: float = 0.0,
        value_target: str = "return_to_go",
        start_weight: float = 1.0,
        time_limit: Optional[int] = None,
    ):
        if not episodes:
            raise ValueError("no episodes to make windows from")
        pieces = [episode_windows(ep, layout=layout, horizon=horizon, normalizer=normalizer, discount=discount,
                                  termination_penalty=termination_penalty, value_target=value_target,
                                  time_limit=time_limit) for ep in episodes]
        self._assemble(pieces, layout=layout, horizon=horizon, normalizer=normalizer, start_weight=start_weight)

    @classmethod
    def from_episode_windows(cls, pieces: Sequence["EpisodeWindows"], *, layout: TrajectoryLayout, horizon: int,
                             normalizer: Normalizer, start_weight: float = 1.0) -> "WindowDataset":
        """The dataset of episodes whose :func:`episode_windows` were computed before: the
        replay computes each episode's once, not at every rebuild."""
        if not pieces:
            raise ValueError("no episodes to make windows from")
        dataset = cls.__new__(cls)
        dataset._assemble(pieces, layout=layout, horizon=horizon, normalizer=normalizer, start_weight=start_weight)
        return dataset

    def _assemble(self, pieces: Sequence["EpisodeWindows"], *, layout: TrajectoryLayout, horizon: int,
                  normalizer: Normalizer, start_weight: float) -> None:
        self.layout, self.horizon, self.normalizer = layout, horizon, normalizer
        self.observations = np.concatenate([p.observations for p in pieces])
        self.actions = np.concatenate([p.actions for p in pieces])
        lengths = np.array([len(p.actions) for p in pieces])
        self.obs_offset = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        self.act_offset = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.lengths = lengths
        self.window_episode = np.repeat(np.arange(len(pieces)), lengths)
        self.window_start = np.concatenate([np.arange(n) for n in lengths])
        self.returns = np.concatenate([p.returns for p in pieces])
        self.window_returns = np.concatenate([p.window_returns for p in pieces])
        self._cdf: Optional[np.ndarray] = None
        if start_weight != 1.0:
            # Episode starts are rare in long episodes: ``start_weight`` draws the windows that
            # begin within an episode's first ``horizon`` steps that many times as often.
            self.weight_windows(np.where(self.window_start < horizon, float(start_weight), 1.0))

    def weight_windows(self, weights: Optional[np.ndarray]) -> None:
        """Draw window ``i`` in proportion to ``weights[i]`` from now on (None: uniformly)."""
        if weights is None:
            self._cdf = None
            return
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(self),) or not np.all(weights >= 0) or not weights.sum() > 0:
            raise ValueError(f"need {len(self)} non-negative window weights with a positive sum")
        self._cdf = np.cumsum(weights / weights.sum())

    def __len__(self) -> int:
        return len(self.window_start)

    def get(self, index: np.ndarray) -> Batch:
        ep = self.window_episode[index]
        steps = self.window_start[index][:, None] + np.arange(self.horizon)[None, :]
        length = self.lengths[ep][:, None]
        obs = torch.from_numpy(self.observations[self.obs_offset[ep][:, None] + np.minimum(steps, length)])
        act = torch.from_numpy(self.actions[self.act_offset[ep][:, None] + np.minimum(steps, length - 1)])
        # s_T is real (steps <= length), its action is padding (steps < length).
        mask = self.layout.join(torch.from_numpy(steps <= length)[..., None].expand(obs.shape),
                                torch.from_numpy(steps < length)[..., None].expand(act.shape)).float()
        x = self.layout.join(obs, act)
        return Batch(x, mask, self.layout.first_state(x).clone(), torch.from_numpy(self.returns[index]),
                     torch.from_numpy(self.window_returns[index]))

    def return_quantiles(self, n: int = 101) -> np.ndarray:
        """``n`` evenly spaced quantiles (0 to 1) of the windows' own returns: the table that
        turns a window return into the quantile a return-conditioned denoiser is given."""
        return np.quantile(self.window_returns.astype(np.float64), np.linspace(0.0, 1.0, n))

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        if self._cdf is None:
            return self.get(rng.integers(0, len(self), size=batch_size))
        index = np.searchsorted(self._cdf, rng.random(batch_size) * self._cdf[-1], side="right")
        return self.get(np.minimum(index, len(self) - 1))
