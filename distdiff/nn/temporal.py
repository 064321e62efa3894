"""Temporal 1-D convolutional networks over trajectories (after Janner et al. 2022, Diffuser).

Inputs are trajectories ``[B, H, D]`` (see :mod:`distdiff.layout`) and integer diffusion
timesteps ``[B]``; convolutions run along the horizon with channels = transition dims.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000.0) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def time_mlp(dim: int) -> nn.Module:
    return nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class Conv1dBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(_groups(c_out), c_out),
            nn.Mish(),
        )


class ResidualTemporalBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, embed_dim: int, kernel_size: int = 5):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size)
        self.time = nn.Sequential(nn.Mish(), nn.Linear(embed_dim, c_out))
        self.residual = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.time(emb)[:, :, None]
        return self.block2(h) + self.residual(x)


def check_horizon(horizon: int, dim_mults: Sequence[int]) -> None:
    factor = 2 ** (len(dim_mults) - 1)
    if horizon <= 0 or horizon % factor:
        raise ValueError(
            f"horizon {horizon} must be a positive multiple of {factor} for a U-Net with "
            f"dim_mults={tuple(dim_mults)} (it halves the horizon {len(dim_mults) - 1} times)"
        )


def group_norm_problem(horizon: int, dim: int, dim_mults: Sequence[int], *, unet: bool = True) -> str:
    """Why a :class:`TemporalUnet` (``unet``) or :class:`ValueNet` of these sizes would not learn
    ("" if it would): a GroupNorm over one value per group (one channel per group, one step at
    its level) normalizes it to a constant, which the net cannot learn from and which fails on a
    batch of one. (``horizon`` a multiple of the levels' factor.)"""
    lengths = [horizon // 2 ** level for level in range(len(dim_mults))]
    norms = [(dim * mult, length) for mult, length in zip(dim_mults, lengths)]
    if unet:  # the way up runs each level's blocks with the channels of the level above
        norms += [(dim * mult, length) for mult, length in zip(dim_mults[:-1], lengths[1:])]
    for channels, length in norms:
        if channels // _groups(channels) * length < 2:
            return (f"one of its levels has {channels} channels in {_groups(channels)} norm groups over {length} "
                    f"step, so its GroupNorm would normalize single values to a constant")
    return ""


class TemporalUnet(nn.Module):
    """ε-, x₀- or v-prediction network: ``[B, H, D], [B] → [B, H, D]``.

    With ``returns_condition`` it also takes ``returns`` ``[B]`` (a window return's quantile in
    [0, 1]) and ``returns_mask`` ``[B]`` (1 to use it), embedded and added to the time
    embedding as in Decision Diffuser (Ajay et al. 2023); a masked or absent return is the
    unconditional model that classifier-free guidance subtracts.
    """

    def __init__(self, *, horizon: int, transition_dim: int, dim: int = 32, dim_mults: Sequence[int] = (1, 2, 4), kernel_size: int = 5,
                 returns_condition: bool = False):
        super().__init__()
        check_horizon(horizon, dim_mults)
        dims = [transition_dim] + [dim * m for m in dim_mults]
        pairs = list(zip(dims[:-1], dims[1:]))
        self.time_mlp = time_mlp(dim)
        self.returns_mlp = None
        if returns_condition:
            self.returns_mlp = nn.Sequential(nn.Linear(1, dim), nn.Mish(), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))
            # A zero output layer: the new net starts as the unconditional one, so the return
            # embedding can be learned on top of a trained prior's weights as well as from scratch.
            nn.init.zeros_(self.returns_mlp[-1].weight)
            nn.init.zeros_(self.returns_mlp[-1].bias)
        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.downs.append(nn.ModuleList([
                ResidualTemporalBlock(c_in, c_out, dim, kernel_size),
                ResidualTemporalBlock(c_out, c_out, dim, kernel_size),
                nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if not last else nn.Identity(),
            ]))
        mid = dims[-1]
        self.mid1 = ResidualTemporalBlock(mid, mid, dim, kernel_size)
        self.mid2 = ResidualTemporalBlock(mid, mid, dim, kernel_size)
        self.ups = nn.ModuleList()
        for c_in, c_out in reversed(pairs[1:]):
            self.ups.append(nn.ModuleList([
                ResidualTemporalBlock(c_out * 2, c_in, dim, kernel_size),
                ResidualTemporalBlock(c_in, c_in, dim, kernel_size),
                nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
            ]))
        self.final = nn.Sequential(Conv1dBlock(dim, dim, kernel_size), nn.Conv1d(dim, transition_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, returns: Optional[torch.Tensor] = None,
                returns_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.transpose(1, 2)
        emb = self.time_mlp(t)
        if returns is not None:
            if self.returns_mlp is None:
                raise ValueError("this denoiser was built without returns_condition; it cannot take returns")
            r = self.returns_mlp(returns.to(emb.dtype)[:, None])
            emb = emb + (r if returns_mask is None else returns_mask.to(emb.dtype)[:, None] * r)
        skips = []
        for block1, block2, down in self.downs:
            x = block2(block1(x, emb), emb)
            skips.append(x)
            x = down(x)
        x = self.mid2(self.mid1(x, emb), emb)
        for block1, block2, up in self.ups:
            x = torch.cat([x, skips.pop()], dim=1)
            x = up(block2(block1(x, emb), emb))
        return self.final(x).transpose(1, 2)


class ValueNet(nn.Module):
    """V_φ(τᵗ, t): the (standardized) discounted return of a noised trajectory, ``[B]``."""

    def __init__(self, *, horizon: int, transition_dim: int, dim: int = 32, dim_mults: Sequence[int] = (1, 2, 4), kernel_size: int = 5):
        super().__init__()
        check_horizon(horizon, dim_mults)
        dims = [transition_dim] + [dim * m for m in dim_mults]
        self.time_mlp = time_mlp(dim)
        self.blocks = nn.ModuleList()
        length = horizon
        for c_in, c_out in zip(dims[:-1], dims[1:]):
            self.blocks.append(nn.ModuleList([
                ResidualTemporalBlock(c_in, c_out, dim, kernel_size),
                ResidualTemporalBlock(c_out, c_out, dim, kernel_size),
                nn.Conv1d(c_out, c_out, 3, stride=2, padding=1),
            ]))
            length = (length + 1) // 2
        flat = dims[-1] * length
        self.head = nn.Sequential(nn.Linear(flat + dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        emb = self.time_mlp(t)
        for block1, block2, down in self.blocks:
            x = down(block2(block1(x, emb), emb))
        return self.head(torch.cat([x.flatten(1), emb], dim=-1)).squeeze(-1)
