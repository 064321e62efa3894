"""The planner: observations → sampled trajectories → actions.

A trained one comes from a checkpoint or run dir: :func:`distdiff.training.planner_from_checkpoint`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from distdiff.config import Config, GuidanceConfig, PlannerConfig
from distdiff.diffusion.gaussian import GaussianDiffusion, Guide
from distdiff.diffusion.guidance import ReturnConditioned, ValueGuide
from distdiff.nn.dynamics import model_rollout, rollout_error
from distdiff.normalizer import Normalizer


# How plans are executed (distdiff.rollout.run_episodes): each plan's whole horizon (the seed's
# Alg. 2), or its first planner.replan_every actions. Here, not in rollout: the config checks
# them, and loading a config must not import gymnasium (bench/cuda_check.sh runs without it).
EXECUTIONS = ("open_loop", "receding")


def _best(scores: torch.Tensor) -> torch.Tensor:
    """``[b]``: each row's best candidate of ``scores`` ``[b, n]``, a NaN score never: argmax
    takes NaN for the largest, and a rollout or V that overflowed would have chosen its plan."""
    return torch.nan_to_num(scores, nan=-torch.inf).argmax(dim=1)


class Plan(NamedTuple):
    states: np.ndarray  # [B, H, obs_dim], env units; states[:, 0] is the given observation
    actions: np.ndarray  # [B, H, act_dim], env units
    values: Optional[np.ndarray]  # [B] V of the executed plan (standardized) when guided by V or best of guidance.n_candidates by V, else None
    trajectories: torch.Tensor  # [B, H, D] normalized, as sampled


class Planner:
    def __init__(
        self,
        *,
        diffusion: GaussianDiffusion,
        denoiser: torch.nn.Module,
        value: Optional[torch.nn.Module],
        normalizer: Normalizer,
        dynamics: Optional[torch.nn.Module] = None,
        guidance: GuidanceConfig,
        planner: PlannerConfig,
        returns_condition: bool = False,
        device: str | torch.device = "cpu",
        config: Optional[Config] = None,
        guide: Optional[Guide] = None,
    ):
        """``config``: the whole config the planner was made from, which :func:`distdiff.evaluation.evaluate`
        judges it with unless given another (:meth:`from_config` sets it).

        ``guide``: a guidance step of your own (:class:`distdiff.diffusion.gaussian.Guide`, e.g. a
        :class:`ValueGuide` over a goal's cost), in place of the value guide that ``guidance``
        describes, whose scale is then not used. It sees plans in normalized units
        (``normalizer``). Plans are still picked by V among ``guidance.n_candidates``."""
        if ((guidance.scale > 0 and guide is None) or guidance.n_candidates > 1) and value is None:
            raise ValueError("value guidance and candidate selection need a value network")
        if planner.dynamics_candidates > 1 and dynamics is None:
            raise ValueError("planner.dynamics_candidates > 1 needs a dynamics model")
        if planner.dynamics_candidates > 1 and planner.dynamics_rank == "value" and value is None:
            raise ValueError("planner.dynamics_rank value needs a value network")
        if planner.dynamics_candidates > 1 and guidance.n_candidates > 1:
            raise ValueError("choose plans by value (guidance.n_candidates) or by dynamics (planner.dynamics_candidates), not both")
        self.diffusion, self.denoiser, self.value, self.dynamics = diffusion, denoiser, value, dynamics
        self.normalizer = normalizer
        self.layout = diffusion.layout
        self.state_normalizer = normalizer.slice(self.layout.state_slice)
        self.guidance, self.cfg, self.config = guidance, planner, config
        self.device = torch.device(device)
        self.model = denoiser
        if returns_condition:
            self.model = ReturnConditioned(denoiser, returns=guidance.return_quantile, scale=guidance.return_scale)
        self.guide = guide
        if guide is None and value is not None and guidance.scale > 0:
            self.guide = ValueGuide(
                value,
                scale=guidance.scale,
                n_steps=guidance.n_guide_steps,
                t_stopgrad=guidance.t_stopgrad,
                # σ_t² with σ_0² clipped to σ_1², as in Ho et al.'s code: the true 0 would switch guidance
                # off at t = 0. (Diffuser clamps it to 1e-20, which does.)
                posterior_variance=diffusion.posterior_log_variance_clipped.exp() if guidance.scale_grad_by_std else None,
            )
        self.guided_by_value = guide is None and self.guide is not None

    @classmethod
    def from_config(cls, cfg: Config, *, diffusion, denoiser, value, normalizer, dynamics=None, device="cpu",
                    guide: Optional[Guide] = None) -> "Planner":
        return cls(diffusion=diffusion, denoiser=denoiser, value=value if cfg.train.train_value else None,
                   dynamics=dynamics if cfg.train.train_dynamics else None,
                   normalizer=normalizer, guidance=cfg.guidance, planner=cfg.planner,
                   returns_condition=cfg.model.returns_condition, device=device, config=cfg, guide=guide)

    def sample(self, cond: torch.Tensor, generator: Optional[torch.Generator] = None):
        if self.cfg.sampler == "ddim":
            return self.diffusion.ddim_sample_loop(self.model, cond, n_steps=self.cfg.ddim_steps, eta=self.cfg.ddim_eta,
                                                   guide=self.guide, generator=generator)
        return self.diffusion.p_sample_loop(self.model, cond, guide=self.guide, generator=generator)

    def _dynamics_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]``, higher is better: how the dynamics model ranks candidate plans ``x``."""
        if self.cfg.dynamics_rank == "value":
            t0 = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self.value(model_rollout(self.dynamics, x, self.layout), t0).reshape(-1)
        return -rollout_error(self.dynamics, x, self.layout)

    @torch.no_grad()
    def plan(self, observations: np.ndarray, generator: Optional[torch.Generator] = None) -> Plan:
        obs = np.asarray(observations, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != self.layout.obs_dim:
            raise ValueError(f"observations must be [batch, {self.layout.obs_dim}], got {obs.shape}")
        b, n = obs.shape[0], max(self.guidance.n_candidates, self.cfg.dynamics_candidates)
        cond = self.state_normalizer.normalize(torch.from_numpy(obs).to(self.device))
        cond = cond.repeat_interleave(n, dim=0)
        x = self.sample(cond, generator).trajectories
        if self.cfg.dynamics_candidates > 1:
            best = _best(self._dynamics_scores(x).reshape(b, n))
            x = x.reshape(b, n, *x.shape[1:])[torch.arange(b), best]
            n = 1
        values = None
        # A single plan not guided by V skips V: its forward pass is a fifth of a 2-step plan.
        if self.guidance.n_candidates > 1 or self.guided_by_value:
            t0 = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            values = self.value(x, t0).reshape(b, n)
            best = _best(values)
            x = x.reshape(b, n, *x.shape[1:])[torch.arange(b), best]
            values = values[torch.arange(b), best].cpu().numpy()
        # Exactness of s_0: write the given observation back rather than trusting the round trip
        # through the normalizer's float arithmetic.
        raw = self.normalizer.unnormalize(x).cpu().numpy()
        given = np.asarray(observations)
        states = self.layout.states(raw).astype(np.result_type(raw.dtype, given.dtype))
        states[:, 0] = given
        return Plan(states=states, actions=self.layout.actions(raw), values=values, trajectories=x)
