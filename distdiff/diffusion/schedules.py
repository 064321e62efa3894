"""β schedules: pure functions of the number of steps, computed in float64."""
from __future__ import annotations

import math

import torch

MAX_BETA = 0.999


def linear_beta_schedule(n_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """Ho et al. 2020, "Denoising Diffusion Probabilistic Models", §4: β linear in t.

    The endpoints are those of the 1000-step paper scaled by 1000/n so that short chains still
    reach ᾱ_T ≈ 0, as Nichol & Dhariwal 2021 (§3.2, their code) scale it. At 20 steps or fewer the
    end is capped at MAX_BETA, and below ~50 ᾱ is ~0 well before T (at 20 steps < 1e-3 from t = 14):
    the chain spends its last levels on pure noise, which the cosine schedule was made to avoid.
    """
    scale = 1000.0 / n_steps
    return torch.linspace(scale * beta_start, min(scale * beta_end, MAX_BETA), n_steps, dtype=torch.float64)


def cosine_beta_schedule(n_steps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", eq. 17."""
    t = torch.linspace(0, n_steps, n_steps + 1, dtype=torch.float64) / n_steps
    alphas_cumprod = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, MAX_BETA)


def sigmoid_beta_schedule(n_steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Jabri et al. 2022, "Scalable Adaptive Computation for Iterative Generation", sigmoid ᾱ(t)."""
    t = torch.linspace(0, n_steps, n_steps + 1, dtype=torch.float64) / n_steps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alphas_cumprod = (-torch.sigmoid((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, MAX_BETA)


SCHEDULES = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def make_beta_schedule(name: str, n_steps: int) -> torch.Tensor:
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if n_steps < 2:
        # (As the diffusion asks: a chain of one step has no step 1 to borrow step 0's clipped
        # posterior variance from.)
        raise ValueError(f"n_steps must be >= 2, got {n_steps}")
    return SCHEDULES[name](n_steps)
