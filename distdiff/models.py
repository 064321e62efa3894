"""Builds the diffusion, denoiser, value net and dynamics model that a config describes."""
from __future__ import annotations

from typing import Dict, NamedTuple

import torch

from distdiff.config import Config
from distdiff.diffusion.gaussian import GaussianDiffusion
from distdiff.diffusion.schedules import make_beta_schedule
from distdiff.layout import TrajectoryLayout
from distdiff.nn.dynamics import DynamicsNet
from distdiff.nn.temporal import TemporalUnet, ValueNet
from distdiff.normalizer import Normalizer


# The networks by the names their weights travel and are checkpointed under (see ``Trainer.weights``).
NETS = ("denoiser", "value", "dynamics")


class Models(NamedTuple):
    diffusion: GaussianDiffusion
    denoiser: TemporalUnet
    value: ValueNet
    dynamics: DynamicsNet

    def nets(self) -> Dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in NETS}


def layout_of(cfg: Config) -> TrajectoryLayout:
    return TrajectoryLayout(obs_dim=cfg.env.obs_dim, act_dim=cfg.env.act_dim)


def build_models(cfg: Config, normalizer: Normalizer) -> Models:
    layout = layout_of(cfg)
    m = cfg.model
    clip = (normalizer.clip_min, normalizer.clip_max) if cfg.diffusion.clip_denoised else (None, None)
    diffusion = GaussianDiffusion(
        betas=make_beta_schedule(cfg.diffusion.schedule, cfg.diffusion.n_steps),
        layout=layout,
        horizon=m.horizon,
        prediction=cfg.diffusion.prediction,
        action_weight=cfg.diffusion.action_weight,
        clip_min=clip[0],
        clip_max=clip[1],
    )
    denoiser = TemporalUnet(horizon=m.horizon, transition_dim=layout.transition_dim, dim=m.dim,
                            dim_mults=m.dim_mults, kernel_size=m.kernel_size, returns_condition=m.returns_condition)
    value = ValueNet(horizon=m.horizon, transition_dim=layout.transition_dim, dim=m.value_dim,
                     dim_mults=m.dim_mults, kernel_size=m.kernel_size)
    # From a forked generator: drawing its initial weights from the global one would shift
    # every later draw (the training noise), so the denoiser and value net train exactly as
    # they did before the dynamics model existed and the benchmark's prior stays reproducible.
    # Only the CPU generator is reseeded: torch.manual_seed would reseed the GPUs' too, for good.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(torch.initial_seed() + 1)
        dynamics = DynamicsNet(obs_dim=layout.obs_dim, act_dim=layout.act_dim, dim=m.dynamics_dim)
    return Models(diffusion, denoiser, value, dynamics)
