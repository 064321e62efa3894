"""Episodes as Minari stores them: T+1 observations, T actions, rewards and end flags."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Episode:
    observations: np.ndarray  # [T+1, obs_dim]; the last is the state after the final action
    actions: np.ndarray  # [T, act_dim]
    rewards: np.ndarray  # [T]
    terminated: bool  # a true terminal state (the walker fell), not a time limit
    truncated: bool
    # The env's reset seed, which Minari keeps per episode (its start state is reset(seed=seed)'s);
    # None where it is not known: a dataset that recorded none, an episode restored from a replay.
    seed: Optional[int] = None

    def copy(self) -> "Episode":
        """With arrays of its own. Those that arrive through Ray are read-only views of the object
        store: kept, they would pin the sender's whole object there for as long as they live."""
        return Episode(self.observations.copy(), self.actions.copy(), self.rewards.copy(), self.terminated,
                       self.truncated, self.seed)

    def __post_init__(self):
        self.observations = np.asarray(self.observations, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        t = len(self.actions)
        if self.observations.shape[0] != t + 1 or self.rewards.shape[0] != t:
            raise ValueError(
                f"an episode needs T+1 observations and T actions and rewards; got "
                f"{self.observations.shape[0]}, {t}, {self.rewards.shape[0]}"
            )
        if t < 1:
            raise ValueError("an episode needs at least one step")

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum())


def discounted_returns_to_go(rewards: np.ndarray, discount: float, terminal_bonus: float = 0.0,
                             bootstrap: float = 0.0) -> np.ndarray:
    """``G[t] = Σ_{k≥t} γ^{k−t} r_k + γ^{T−t}·bootstrap`` for t in [0, T], with ``terminal_bonus``
    added to the last reward.

    ``G[T] = bootstrap``: what is earned after the last observation (0 at a fall or a time limit).
    """
    rewards = np.asarray(rewards, dtype=np.float64).copy()
    rewards[-1] += terminal_bonus
    out = np.zeros(len(rewards) + 1)
    out[-1] = bootstrap
    for t in range(len(rewards) - 1, -1, -1):
        out[t] = rewards[t] + discount * out[t + 1]
    return out


def cut_short(ep: Episode, time_limit: Optional[int]) -> int:
    """How many steps before ``time_limit`` an episode that did not fall was cut (by a step
    budget, say): 0 for one that fell or ran to the limit."""
    if time_limit is None or ep.terminated:
        return 0
    return max(time_limit - len(ep), 0)


def continuation(ep: Episode, discount: float, time_limit: Optional[int]) -> float:
    """The discounted return an episode cut short would have earned from its last state to the
    time limit at its own mean reward (0 for one that fell or ran to the limit)."""
    steps = cut_short(ep, time_limit)
    return float(ep.rewards.mean() * np.sum(discount ** np.arange(steps))) if steps else 0.0


def completed_return(ep: Episode, time_limit: Optional[int]) -> float:
    """The episode's return with the steps it was cut short of credited at its own mean reward:
    what it would have earned at the time limit had it kept its pace."""
    return ep.episode_return + continuation(ep, 1.0, time_limit)
