"""A one-step dynamics model s_{j+1} = f(s_j, a_j), in the trajectory's normalized units.

The planner does not plan through it: it only ranks sampled plans, by how well their actions,
rolled out through it from s_0, reproduce their states (:func:`rollout_error`), or by the value
of the trajectory that rollout reaches (:func:`model_rollout`). Ranking samples
from the diffusion prior cannot push a plan off the data the way gradient steps on the model's
residual do (those lowered the one-step error and raised the compounded one: bench/README.md).
"""
from __future__ import annotations

import torch
from torch import nn

from distdiff.layout import TrajectoryLayout


class DynamicsNet(nn.Module):
    """MLP predicting the normalized state change; ``forward`` returns the next state."""

    def __init__(self, *, obs_dim: int, act_dim: int, dim: int = 256, depth: int = 3):
        super().__init__()
        if dim <= 0 or depth <= 0:
            raise ValueError(f"dim and depth must be positive, got {dim}, {depth}")
        layers, width = [], obs_dim + act_dim
        for _ in range(depth):
            layers += [nn.Linear(width, dim), nn.SiLU()]
            width = dim
        self.net = nn.Sequential(*layers, nn.Linear(width, obs_dim))

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        # The change, not the state: a real step moves ~0.3 normalized units, so a residual
        # model starts at the identity instead of learning to copy 17 inputs.
        return states + self.net(torch.cat([states, actions], dim=-1))


def transition_loss(model: DynamicsNet, x: torch.Tensor, mask: torch.Tensor, layout: TrajectoryLayout) -> torch.Tensor:
    """Mean squared one-step error on the transitions of windows ``x`` whose rows are real
    (``mask`` as in :class:`distdiff.data.windows.Batch`: padding past an episode's end is 0)."""
    states, actions = layout.states(x), layout.actions(x)
    # A transition is real when its action and its next state are.
    valid = layout.actions(mask)[:, :-1, 0] * layout.states(mask)[:, 1:, 0]
    err = ((model(states[:, :-1], actions[:, :-1]) - states[:, 1:]) ** 2).mean(-1)
    return (err * valid).sum() / valid.sum().clamp(min=1.0)


def model_rollout(model: DynamicsNet, x: torch.Tensor, layout: TrajectoryLayout) -> torch.Tensor:
    """The trajectory plans ``x`` would make if the world were the model: their actions executed
    open loop from their s_0, joined with the states the model reaches."""
    states, actions = layout.states(x), layout.actions(x)
    reached = [states[:, 0]]
    for j in range(x.shape[1] - 1):
        reached.append(model(reached[-1], actions[:, j]))
    return layout.join(torch.stack(reached, dim=1), actions)


def rollout_error(model: DynamicsNet, x: torch.Tensor, layout: TrajectoryLayout) -> torch.Tensor:
    """``[B]``: mean squared distance between the states of plans ``x`` and those the model
    reaches executing their actions open loop from their s_0, as the real env will."""
    reached = layout.states(model_rollout(model, x, layout))
    return ((reached[:, 1:] - layout.states(x)[:, 1:]) ** 2).mean(dim=(1, 2))
