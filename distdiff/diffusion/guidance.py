"""Value guidance (Alg. 3): τ ← τ + k·∇_τ V(τ, t) after each denoising step."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from distdiff.diffusion.gaussian import Clamp

ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ValueGuide:
    """A guidance step function for the samplers in :mod:`distdiff.diffusion.gaussian`.

    ``scale`` is k; ``n_steps`` gradient steps are taken per denoising step, each followed by
    re-clamping s_0; steps at noise levels ``t < t_stopgrad`` are left unguided; with
    ``posterior_variance`` given, the gradient is scaled by σ_t² as in Diffuser. The planner
    passes ``diffusion.posterior_log_variance_clipped.exp()``, whose σ_0² is σ_1² (Ho et al.'s
    code): the true σ_0² = 0 would switch guidance off at t = 0, where a 2-step DDIM's only
    guided step after the starting noise lands. (Diffuser clamps σ_0² to 1e-20, which does; its
    default t_stopgrad 2 leaves t = 0 unguided anyway.)
    """

    def __init__(
        self,
        value_fn: ValueFn,
        *,
        scale: float,
        n_steps: int = 1,
        t_stopgrad: int = 0,
        posterior_variance: Optional[torch.Tensor] = None,
    ):
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        self.value_fn = value_fn
        self.scale = float(scale)
        self.n_steps = n_steps
        self.t_stopgrad = t_stopgrad
        self.posterior_variance = posterior_variance

    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇_x of each plan's value (summed over the batch: plans do not share entries)."""
        # Samplers run under no_grad; the guide needs a graph of its own.
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            values = self.value_fn(x, t)
            (grad,) = torch.autograd.grad(values.sum(), x)
        return grad

    def __call__(self, x: torch.Tensor, t: torch.Tensor, clamp: Clamp) -> torch.Tensor:
        active = (t >= self.t_stopgrad).reshape(-1, *((1,) * (x.ndim - 1)))
        if self.scale == 0.0 or not bool(active.any()):
            return x
        for _ in range(self.n_steps):
            grad = self.gradient(x, t)
            if self.posterior_variance is not None:
                # (.to: a no-op where the planner's diffusion was moved before it took the copy)
                grad = self.posterior_variance.to(t.device)[t].reshape(active.shape) * grad
            # where, not a multiplication by 0: a non-finite gradient of an inactive plan
            # must leave it as it is, not turn it into NaN.
            x = clamp(torch.where(active, x + self.scale * grad, x))
        return x


class ReturnConditioned:
    """A return-conditioned denoiser as the samplers' ``model(x, t)``, with classifier-free
    guidance (Ho & Salimans 2022): ``out = out_∅ + w·(out_R − out_∅)``.

    ``returns`` is the condition the denoiser was trained on (a window return's quantile);
    ``scale`` w = 1 runs the conditional model alone, w = 0 the unconditional one alone; any
    other w runs both in one batch and mixes them (w > 1 extrapolates from the second past the
    first). For a fixed ``x`` and ``t`` each parameterization (ε, x₀ or v) is an affine
    function of the others, and affine maps keep affine combinations (weights 1 − w and w), so
    the mix is the same whichever the network predicts.
    """

    def __init__(self, denoiser, *, returns: float, scale: float = 1.0):
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        self.denoiser, self.returns, self.scale = denoiser, float(returns), float(scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r = torch.full((x.shape[0],), self.returns, device=x.device, dtype=x.dtype)
        if self.scale == 1.0:
            return self.denoiser(x, t, returns=r)
        if self.scale == 0.0:
            # The unconditional model alone: no batch of both to mix with weight 0.
            return self.denoiser(x, t, returns=r, returns_mask=torch.zeros_like(r))
        keep = torch.cat([torch.ones_like(r), torch.zeros_like(r)])
        cond, uncond = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), returns=torch.cat([r, r]), returns_mask=keep).chunk(2)
        return uncond + self.scale * (cond - uncond)
