"""Gaussian diffusion over trajectories: forward process, losses and samplers.

Names follow Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM): ``x_start`` is the clean
trajectory τ⁰, ``t`` a batch of integer timesteps in ``[0, n_steps)``, ``noise`` is ε.
The denoiser (and the value net, inside a guide) is passed to each call, not owned, so one
diffusion serves the trainer's online nets and the planner's EMA copies.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol

import torch
from torch import nn

from distdiff.layout import TrajectoryLayout

PREDICTIONS = ("epsilon", "x0", "v")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Clamp = Callable[[torch.Tensor], torch.Tensor]


class Guide(Protocol):
    """A guidance step: given ``x`` at noise level ``t``, return the guided ``x``.

    ``clamp`` re-applies the inpainting condition; a guide that takes several gradient steps
    calls it after each, so that each step sees the exact ``s_0``. The samplers clamp what a
    guide returns, so no guide can move ``s_0`` for the next denoising step.
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, clamp: Clamp) -> torch.Tensor: ...


class Sample(NamedTuple):
    trajectories: torch.Tensor
    chain: Optional[torch.Tensor]


class ModelPrediction(NamedTuple):
    """The denoiser's estimates at one noise level: the clean trajectory (clipped) and the noise."""

    x_start: torch.Tensor
    noise: torch.Tensor


class Posterior(NamedTuple):
    """q(τᵗ⁻¹ | τᵗ, τ⁰), broadcastable over the batch."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance_clipped: torch.Tensor


def extract(a: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
    """Gather ``a[t]`` and reshape it to broadcast over a batch of shape ``x_shape``."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


class GaussianDiffusion(nn.Module):
    def __init__(
        self,
        *,
        betas: torch.Tensor,
        layout: TrajectoryLayout,
        horizon: int,
        prediction: str = "x0",
        action_weight: float = 1.0,
        clip_min: Optional[torch.Tensor] = None,
        clip_max: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {list(PREDICTIONS)}")
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        if betas.shape[0] < 2:
            # The clipped log variance of step 0 borrows step 1's, which T = 1 does not have.
            raise ValueError(f"a diffusion needs at least 2 steps, got {betas.shape[0]}")
        self.layout = layout
        self.horizon = horizon
        self.prediction = prediction
        self.n_steps = int(betas.shape[0])

        # On the CPU: the buffers are made here and moved with the module (.to) afterwards.
        betas = betas.detach().to("cpu", torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)

        def register(name, value):
            self.register_buffer(name, value.to(torch.float32), persistent=False)

        register("betas", betas)
        register("alphas_cumprod", alphas_cumprod)
        register("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        register("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt())
        register("sqrt_recip_alphas_cumprod", (1.0 / alphas_cumprod).sqrt())
        register("sqrt_recipm1_alphas_cumprod", (1.0 / alphas_cumprod - 1.0).sqrt())
        register("posterior_variance", posterior_variance)
        # σ²_0 is 0; log of the clipped value keeps the log finite (Ho et al. 2020, code).
        register("posterior_log_variance_clipped", torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])))
        register("posterior_mean_coef1", betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod))
        register("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod))

        weights = torch.ones(horizon, layout.transition_dim)
        weights[0, layout.action_slice] = action_weight
        # The clamped s_0 entries carry no learning signal: in ε-mode the network would be
        # asked to predict noise that was overwritten by the condition.
        weights = weights * (1.0 - layout.condition_mask(horizon))
        self.register_buffer("loss_weights", weights, persistent=False)
        self.set_clip_range(clip_min, clip_max)

    def set_clip_range(self, clip_min: Optional[torch.Tensor], clip_max: Optional[torch.Tensor]) -> None:
        """Clip predicted ``x_start`` to ``[clip_min, clip_max]`` per dimension (None: no clipping).

        With short chains the last β is near 1, so the ε-form estimate of ``x_start``
        multiplies the network's error by 1/√ᾱ_T; clipping to the data range keeps it bounded.
        """
        if (clip_min is None) != (clip_max is None):
            raise ValueError("give both clip_min and clip_max, or neither")
        if clip_min is not None:
            # On the module's device: set on a diffusion already moved, the clip must follow it.
            clip_min = torch.as_tensor(clip_min, dtype=torch.float32, device=self.betas.device).reshape(
                self.layout.transition_dim)
            clip_max = torch.as_tensor(clip_max, dtype=torch.float32, device=self.betas.device).reshape(
                self.layout.transition_dim)
        self.register_buffer("clip_min", clip_min, persistent=False)
        self.register_buffer("clip_max", clip_max, persistent=False)

    # ----- forward process -------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): ``x_start`` noised to level ``t`` (fresh noise unless given)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def predict_start_from_noise(self, x_t, t, noise):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def predict_noise_from_start(self, x_t, t, x_start):
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_start) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def predict_v(self, x_start, t, noise):
        """v = √ᾱ·ε − √(1−ᾱ)·τ⁰ (Salimans & Ho 2022, "Progressive Distillation", §4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start
        )

    def predict_start_from_v(self, x_t, t, v):
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def q_posterior(self, x_start, x_t, t) -> Posterior:
        mean = extract(self.posterior_mean_coef1, t, x_t.shape) * x_start + extract(
            self.posterior_mean_coef2, t, x_t.shape
        ) * x_t
        return Posterior(mean, extract(self.posterior_variance, t, x_t.shape),
                         extract(self.posterior_log_variance_clipped, t, x_t.shape))

    # ----- training ----------------------------------------------------------------------
    def loss(
        self,
        model: Denoiser,
        x_start: torch.Tensor,
        cond: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Weighted DDPM loss (Alg. 1.1): ‖ε − ε_θ(τᵗ, t)‖², ‖τ⁰ − τ̂⁰_θ(τᵗ, t)‖² or ‖v − v_θ(τᵗ, t)‖².

        ``mask`` ([B, H, D], 1 on real entries) removes episode padding from the loss.
        """
        b = x_start.shape[0]
        if t is None:
            t = torch.randint(0, self.n_steps, (b,), device=x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_noisy = self.layout.condition(self.q_sample(x_start, t, noise), cond)
        out = model(x_noisy, t)
        if self.prediction == "epsilon":
            target = noise
        elif self.prediction == "v":
            target = self.predict_v(x_start, t, noise)
        else:
            target = x_start
        weights = self.loss_weights.expand_as(x_start)
        if mask is not None:
            weights = weights * mask
        denom = (weights > 0).sum().clamp(min=1)
        return (weights * (out - target) ** 2).sum() / denom

    # ----- reverse process -----------------------------------------------------------------
    def _start_from_output(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return self.predict_start_from_noise(x, t, out)
        if self.prediction == "v":
            return self.predict_start_from_v(x, t, out)
        return out

    def model_predictions(self, model: Denoiser, x: torch.Tensor, t: torch.Tensor) -> ModelPrediction:
        x_start = self._start_from_output(x, t, model(x, t))
        if self.clip_min is not None:
            x_start = torch.maximum(torch.minimum(x_start, self.clip_max), self.clip_min)
        return ModelPrediction(x_start, self.predict_noise_from_start(x, t, x_start))

    def p_sample(self, model: Denoiser, x: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        """One ancestral step x_t → x_{t−1}, σ_t² = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t (Alg. 1.2)."""
        posterior = self.q_posterior(self.model_predictions(model, x, t).x_start, x, t)
        mean, log_var = posterior.mean, posterior.log_variance_clipped
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *((1,) * (x.ndim - 1)))
        return mean + nonzero * (0.5 * log_var).exp() * noise

    def _start(self, cond: torch.Tensor, generator, guide: Optional[Guide], clamp: Clamp) -> torch.Tensor:
        shape = (cond.shape[0], self.horizon, self.layout.transition_dim)
        x = self.layout.condition(torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype), cond)
        if guide is None:
            return x
        # The starting noise x_T is guided too, at level T-1, as in Diffuser. After-step guidance
        # alone acts only at the levels a step lands on: a 2-step DDIM lands on t = 0 only, where
        # the default t_stopgrad switches it off, so its plans would be silently unguided.
        t = torch.full((x.shape[0],), self.n_steps - 1, device=x.device, dtype=torch.long)
        return clamp(guide(x, t, clamp))

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: Denoiser,
        cond: torch.Tensor,
        *,
        guide: Optional[Guide] = None,
        generator: Optional[torch.Generator] = None,
        return_chain: bool = False,
    ) -> Sample:
        clamp = lambda y: self.layout.condition(y, cond)  # noqa: E731
        x = self._start(cond, generator, guide, clamp)
        chain = [x] if return_chain else None
        for i in reversed(range(self.n_steps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = clamp(self.p_sample(model, x, t, generator))
            if guide is not None and i > 0:
                # At the level it landed on: Diffuser's guidance before the next step. Never the
                # clean output, which Diffuser returns as the last step leaves it.
                x = clamp(guide(x, t - 1, clamp))
            if return_chain:
                chain.append(x)
        return Sample(x, torch.stack(chain, dim=1) if return_chain else None)

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model: Denoiser,
        cond: torch.Tensor,
        *,
        n_steps: int,
        eta: float = 0.0,
        guide: Optional[Guide] = None,
        generator: Optional[torch.Generator] = None,
        return_chain: bool = False,
    ) -> Sample:
        """DDIM (Song et al. 2021, eq. 12) on ``n_steps`` evenly spaced timesteps from T-1 down to
        0 (the last model call is at t = 0: 2 steps of 20 are t = 19, 0); η=1 is DDPM-like.

        Guidance after a step moves x as after a DDPM step, by the one-step posterior variance
        at the level it landed on. Diffuser has no DDIM sampler; this keeps its guidance rule
        rather than Dhariwal & Nichol's shift of the predicted noise."""
        if not 1 <= n_steps <= self.n_steps:
            raise ValueError(f"DDIM needs 1 <= n_steps <= {self.n_steps}, got {n_steps}")
        clamp = lambda y: self.layout.condition(y, cond)  # noqa: E731
        times = torch.linspace(self.n_steps - 1, 0, n_steps).round().long().tolist()
        x = self._start(cond, generator, guide, clamp)
        chain = [x] if return_chain else None
        for i, time in enumerate(times):
            t = torch.full((x.shape[0],), time, device=x.device, dtype=torch.long)
            x_start, noise = self.model_predictions(model, x, t)
            if i + 1 < len(times):
                t_prev = torch.full_like(t, times[i + 1])
                a = extract(self.alphas_cumprod, t, x.shape)
                a_prev = extract(self.alphas_cumprod, t_prev, x.shape)
                sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = clamp(a_prev.sqrt() * x_start + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * noise + sigma * z)
                if guide is not None:
                    x = clamp(guide(x, t_prev, clamp))  # (not the clean output, as in p_sample_loop)
            else:
                x = clamp(x_start)
            if return_chain:
                chain.append(x)
        return Sample(x, torch.stack(chain, dim=1) if return_chain else None)
