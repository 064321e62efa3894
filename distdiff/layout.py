"""The one trajectory layout used everywhere.

A trajectory tensor ``x`` has shape ``[..., horizon, transition_dim]``; row ``j`` holds
``[s_j, a_j]`` (state first, then the action taken in that state), so ``x[..., 0, states]``
is the conditioning state ``s_0`` that inpainting clamps. Every module slices through the
helpers below, never with raw indices, so the layout can change in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)  # (two ints in a row are easy to swap)
class TrajectoryLayout:
    obs_dim: int
    act_dim: int

    def __post_init__(self):
        if self.obs_dim <= 0 or self.act_dim <= 0:
            raise ValueError(f"obs_dim and act_dim must be positive, got {self.obs_dim}, {self.act_dim}")

    @property
    def transition_dim(self) -> int:
        return self.obs_dim + self.act_dim

    @property
    def state_slice(self) -> slice:
        return slice(0, self.obs_dim)

    @property
    def action_slice(self) -> slice:
        return slice(self.obs_dim, self.obs_dim + self.act_dim)

    def states(self, x):
        return x[..., self.state_slice]

    def actions(self, x):
        return x[..., self.action_slice]

    def first_state(self, x):
        return x[..., 0, self.state_slice]

    def join(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """States and actions (or their masks) as the rows of trajectories."""
        return torch.cat([states, actions], dim=-1)

    def condition(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Inpaint ``s_0``: returns ``x`` with its first state replaced by ``state`` exactly."""
        x = x.clone()
        x[..., 0, self.state_slice] = state.to(x.dtype)
        return x

    def condition_mask(self, horizon: int, *, device=None) -> torch.Tensor:
        """``[horizon, transition_dim]`` mask, 1 on the clamped ``s_0`` entries."""
        m = torch.zeros(horizon, self.transition_dim, device=device)
        m[0, self.state_slice] = 1.0
        return m
