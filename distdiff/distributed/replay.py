"""Replay: FIFO over online trajectories, mixed with offline windows at a fixed ratio.

Online windows are drawn uniformly, or, with ``return_weighting`` β > 0, in proportion to
``exp(β · z)`` where ``z`` is the return of the window's episode in standard deviations below
the best stored episode (an episode the step budget cut short counted at its own pace up to the
time limit, see :func:`completed_return`): every real trajectory still teaches the dynamics,
while the behaviour of the better episodes is preferred (the idea of self-imitation learning,
Oh et al. 2018). On Walker2d it did not keep the return from falling (bench/README.md). The
offline windows may oversample episode starts (``offline_start_weight``, see
:class:`WindowDataset`); the online windows that begin an episode can be drawn less often, or
never (``online_start_weight``), so that the planner does not learn how to start from its own,
slow starts.
"""
from __future__ import annotations

import logging
from collections import deque
from fractions import Fraction
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np
import torch

from distdiff.config import as_written
from distdiff.data.episodes import Episode, completed_return
from distdiff.data.windows import Batch, WindowDataset, episode_windows
from distdiff.layout import TrajectoryLayout
from distdiff.normalizer import Normalizer

if TYPE_CHECKING:
    from distdiff.distributed.messages import RolloutResult


log = logging.getLogger(__name__)


def _finite(ep: Episode) -> bool:
    return bool(np.isfinite(ep.observations).all() and np.isfinite(ep.actions).all() and np.isfinite(ep.rewards).all())


class Replay:
    def __init__(
        self,
        *,
        offline_episodes: Sequence[Episode],
        normalizer: Dict[str, object],
        layout: TrajectoryLayout,
        horizon: int,
        discount: float,
        termination_penalty: float,
        capacity: int,
        offline_ratio: float,
        value_target: str = "return_to_go",
        return_weighting: float = 0.0,
        offline_start_weight: float = 1.0,
        online_start_weight: float = 1.0,
        time_limit: Optional[int] = None,
        seed: int = 0,
        added_episodes: int = 0,
    ):
        if return_weighting < 0:
            raise ValueError(f"return_weighting must be >= 0, got {return_weighting}")
        if online_start_weight < 0:
            raise ValueError(f"online_start_weight must be >= 0, got {online_start_weight}")
        self.normalizer = Normalizer.from_state_dict(normalizer)
        self._window_args = dict(layout=layout, horizon=horizon, normalizer=self.normalizer, discount=discount,
                                 termination_penalty=termination_penalty, value_target=value_target)
        # Only the online episodes are known to run under ``time_limit`` (the env's): an offline
        # dataset may have been collected with a shorter one, and none of its episodes is cut.
        self.offline = (WindowDataset(offline_episodes, **self._window_args, start_weight=offline_start_weight)
                        if len(offline_episodes) else None)
        self.capacity = capacity
        self.offline_ratio = offline_ratio
        self.return_weighting = return_weighting
        self.online_start_weight = online_start_weight
        self.horizon = horizon
        self.time_limit = time_limit
        self.episodes: deque = deque()
        # Each stored episode's part of the online windows, made once, by the first sample
        # that draws from it (None before: with many actors most episodes of a small replay are
        # evicted unsampled); a rebuild after an add only joins them (14 ms at 200k
        # transitions, against 67 ms to remake every episode's; 64 against 319 ms at 1M).
        self.windows: deque = deque()
        self.arrivals: deque = deque()  # each stored episode's number among all added (refused ones count)
        self.transitions = 0
        # Counted on from the episodes its run counted before (a resume whose replay.pt was lost
        # starts an empty replay): a later resume cuts the replay back to its checkpoint's count.
        self.added_episodes = added_episodes
        self._online: Optional[WindowDataset] = None
        self.rng = np.random.default_rng(seed)

    def add(self, episodes: List[Episode]) -> int:
        """Store episodes (evicting the oldest beyond capacity); returns the online size. An
        episode with a NaN or an infinity (a simulator that gave up)
        is counted but not stored: every window of it would turn a whole batch non-finite."""
        for ep in episodes:
            self.added_episodes += 1  # (what a checkpoint's episode count is matched against)
            if not _finite(ep):
                log.warning("replay: an episode of %d steps holds NaN or infinite values; not stored", len(ep))
                continue
            self._store(ep.copy())
            self.arrivals.append(self.added_episodes)
        self._evict()
        self._online = None
        return self.transitions

    def add_rollout(self, result: "RolloutResult") -> int:
        """:meth:`add` of a rollout's episodes. The driver passes the rollout's object itself, by
        reference: it reaches this actor (on the driver's node) from the object store, without
        the driver serializing its episodes again."""
        return self.add(result.episodes)

    def _store(self, ep: Episode) -> None:
        self.episodes.append(ep)
        self.windows.append(None)
        self.transitions += len(ep)

    def _evict(self) -> None:
        # The newest episode stays whatever its length: a replay is never left empty.
        while self.transitions > self.capacity and len(self.episodes) > 1:
            self.transitions -= len(self.episodes.popleft())
            self.windows.popleft()
            self.arrivals.popleft()

    def size(self) -> int:
        return self.transitions

    def _online_windows(self) -> Optional[WindowDataset]:
        if self._online is None and self.episodes:
            self.windows = deque(episode_windows(ep, **self._window_args, time_limit=self.time_limit) if w is None else w
                                 for ep, w in zip(self.episodes, self.windows))
            online = WindowDataset.from_episode_windows(list(self.windows), layout=self._window_args["layout"],
                                                        horizon=self.horizon, normalizer=self.normalizer)
            by_return = self.episode_weights()[online.window_episode]
            weights = by_return.copy()
            weights[online.window_start < self.horizon] *= self.online_start_weight
            if weights.sum() == 0:
                # Only start windows stored so far (short episodes) and a start weight of 0: draw
                # them by return alone rather than have nothing to draw.
                weights = by_return
            if not np.all(weights == weights[0]):
                online.weight_windows(weights)
            self._online = online
        return self._online

    def episode_weights(self) -> np.ndarray:
        """Relative sampling weight of each stored episode's windows (1 for the best episode)."""
        returns = np.array([completed_return(ep, self.time_limit) for ep in self.episodes], dtype=np.float64)
        if self.return_weighting == 0 or len(returns) < 2:
            return np.ones(len(returns))
        z = (returns - returns.max()) / max(returns.std(), 1e-8)
        return np.exp(self.return_weighting * z)

    def sample(self, n_batches: int, batch_size: int) -> List[Batch]:
        online = self._online_windows()
        # (As written: in floats, 100 × 0.29 is not 29, and would draw at random.)
        share = Fraction(batch_size) if online is None else as_written(self.offline_ratio) * batch_size
        if self.offline is None:
            if online is None:
                raise RuntimeError("the replay is empty: no offline data and no online episodes yet")
            share = Fraction(0)
        whole, fraction = int(share), float(share - int(share))
        out = []
        for _ in range(n_batches):
            # Where batch_size × offline_ratio is no whole number, rounded up or down at random
            # so that the share holds on average: rounded once, 0.1 of a batch of 4 drew no
            # offline window ever, and 0.9 no online one.
            n_off = whole + int(fraction > 0 and self.rng.random() < fraction)
            parts = []
            if n_off:
                parts.append(self.offline.sample(n_off, self.rng))
            if batch_size - n_off:
                parts.append(online.sample(batch_size - n_off, self.rng))
            out.append(Batch(*(torch.cat(field) for field in zip(*parts))) if len(parts) > 1 else parts[0])
        return out

    # ----- checkpoints: tensors only, so that torch.load(weights_only=True) reads them -----
    def state_dict(self) -> Dict[str, object]:
        eps = list(self.episodes)
        return {
            "lengths": torch.tensor([len(e) for e in eps], dtype=torch.long),
            "observations": torch.from_numpy(np.concatenate([e.observations for e in eps])) if eps else torch.zeros(0),
            "actions": torch.from_numpy(np.concatenate([e.actions for e in eps])) if eps else torch.zeros(0),
            "rewards": torch.from_numpy(np.concatenate([e.rewards for e in eps])) if eps else torch.zeros(0),
            "terminated": torch.tensor([e.terminated for e in eps], dtype=torch.bool),
            "truncated": torch.tensor([e.truncated for e in eps], dtype=torch.bool),
            "added_episodes": self.added_episodes,
            "arrivals": torch.tensor(list(self.arrivals), dtype=torch.long),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: Dict[str, object], added_episodes: Optional[int] = None) -> int:
        """Restore a saved replay; returns how many episodes it dropped. ``added_episodes``: drop
        the newest episodes beyond that count, the ones a checkpoint taken earlier did not count
        (a crash between writing ``replay.pt`` and the checkpoint); a resumed run collects them
        again. Older episodes that they pushed out of a full replay are not restored."""
        self.episodes.clear()
        self.windows.clear()
        self.arrivals.clear()
        self.transitions = 0
        o = a = 0
        obs, act, rew = state["observations"].numpy(), state["actions"].numpy(), state["rewards"].numpy()
        for i, n in enumerate(state["lengths"].tolist()):
            self._store(Episode(obs[o:o + n + 1], act[a:a + n], rew[a:a + n], bool(state["terminated"][i]),
                                bool(state["truncated"][i])))
            o, a = o + n + 1, a + n
        self.added_episodes = int(state["added_episodes"])
        # Saved before arrivals were (no episode was refused then): the newest were added last.
        n = len(self.episodes)
        arrivals = state["arrivals"].tolist() if "arrivals" in state else range(self.added_episodes - n + 1, self.added_episodes + 1)
        self.arrivals.extend(arrivals)
        dropped = 0
        if added_episodes is not None:
            while self.arrivals and self.arrivals[-1] > added_episodes:
                self.transitions -= len(self.episodes.pop())
                self.windows.pop()
                self.arrivals.pop()
                dropped += 1
            self.added_episodes = min(self.added_episodes, added_episodes)
        # A run resumed with a smaller online.replay_capacity keeps only what it holds.
        self._evict()
        self.rng.bit_generator.state = state["rng"]
        self._online = None
        return dropped
