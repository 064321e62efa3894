"""Shared test helpers: analytic Gaussian diffusion (samplers, guidance) and a tiny learner.

For data x⁰ ~ N(mu, sigma²) independently per entry, everything about the forward process is
Gaussian and the ideal denoiser is known in closed form:

    x_t ~ N(√ᾱ mu, v),  v = ᾱ sigma² + 1 − ᾱ
    E[x⁰ | x_t] = mu + √ᾱ sigma² / v · (x_t − √ᾱ mu)
    ε̂ = (x_t − √ᾱ E[x⁰ | x_t]) / √(1 − ᾱ)

so a sampler driven by it must return N(mu, sigma²) samples up to its own discretization error.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from distdiff import config
from distdiff.data.windows import WindowDataset, fit_normalizer
from distdiff.diffusion.gaussian import GaussianDiffusion
from distdiff.diffusion.schedules import make_beta_schedule
from distdiff.layout import TrajectoryLayout
from distdiff.models import layout_of
from distdiff.normalizer import Normalizer
from distdiff.training import Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def launch_script(name: str):
    """``launch/<name>.py`` as a module, to call its ``main(argv)`` in this process (launch/ is
    not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_in_process(name: str, monkeypatch):
    """:func:`launch_script`, imported without its settings of this process's environment
    (thread limits, Ray auth), which would hold for every test after it."""
    import distdiff.process

    monkeypatch.setattr(distdiff.process, "limit_threads", lambda: None)
    monkeypatch.setattr(distdiff.process, "default_ray_auth", lambda: None)
    return launch_script(name)
SMOKE_CONFIG = ROOT / "configs" / "smoke.yaml"

LAYOUT = TrajectoryLayout(obs_dim=1, act_dim=1)
HORIZON = 4
# One (mean, std) per transition dim: the state and the action differ, so a sampler that mixes
# up dims or ignores mu / sigma is caught.
MU = torch.tensor([1.5, -0.7])
SIGMA = torch.tensor([0.8, 1.6])


def gaussian_diffusion(schedule: str = "cosine", n_steps: int = 100, prediction: str = "epsilon", **kw) -> GaussianDiffusion:
    return GaussianDiffusion(betas=make_beta_schedule(schedule, n_steps), layout=LAYOUT, horizon=HORIZON,
                             prediction=prediction, **kw)


def alphas_cumprod64(diffusion: GaussianDiffusion) -> torch.Tensor:
    """ᾱ in float64, recomputed from β (the module keeps float32 buffers)."""
    return torch.cumprod(1.0 - diffusion.betas.double(), dim=0)


def exact_denoiser(diffusion: GaussianDiffusion, mu=MU, sigma=SIGMA):
    """The ideal ε-, x⁰- or v-prediction network for N(mu, sigma²) data, per entry."""
    a_all = alphas_cumprod64(diffusion)
    mu, var = mu.double(), sigma.double() ** 2

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = a_all[t].reshape(-1, *((1,) * (x.ndim - 1)))
        xd = x.double()
        x0 = mu + a.sqrt() * var / (a * var + 1 - a) * (xd - a.sqrt() * mu)
        if diffusion.prediction == "x0":
            return x0.to(x.dtype)
        eps = (xd - a.sqrt() * x0) / (1 - a).sqrt()
        if diffusion.prediction == "v":
            return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x.dtype)
        return eps.to(x.dtype)

    return denoise


def free_entries(x: torch.Tensor):
    """(states, actions) samples of a [B, H, 2] batch without the clamped s_0 entries."""
    return x[:, 1:, 0].reshape(-1), x[:, :, 1].reshape(-1)


# ----- closed-form output law of the samplers for Gaussian data ------------------------------
# Every update is affine in x plus fresh Gaussian noise, so the law of one entry stays Gaussian
# and its (mean, variance) can be propagated exactly. This is an independent re-derivation of
# Ho et al. (2020) eq. 6-7 and Song et al. (2021) eq. 12, used as the reference for few-step
# samplers, where the samplers' output is *not* N(mu, sigma²).

def _coeffs(a: float, mu: float, s2: float):
    g = math.sqrt(a) * s2 / (a * s2 + 1 - a)  # x0_hat = mu + g (x − √a mu)
    return g, mu - g * math.sqrt(a) * mu  # x0_hat = g x + h


def ddpm_output_law(diffusion: GaussianDiffusion, mu: float, sigma: float):
    betas = diffusion.betas.double().tolist()
    a_all = alphas_cumprod64(diffusion).tolist()
    m, v = 0.0, 1.0
    for t in reversed(range(len(betas))):
        a, a_prev, b = a_all[t], (a_all[t - 1] if t else 1.0), betas[t]
        g, h = _coeffs(a, mu, sigma**2)
        c1 = b * math.sqrt(a_prev) / (1 - a)
        c2 = (1 - a_prev) * math.sqrt(1 - b) / (1 - a)
        post_var = b * (1 - a_prev) / (1 - a) if t else 0.0
        m, v = (c1 * g + c2) * m + c1 * h, (c1 * g + c2) ** 2 * v + post_var
    return m, math.sqrt(v)


def ddim_output_law(diffusion: GaussianDiffusion, n_steps: int, eta: float, mu: float, sigma: float):
    a_all = alphas_cumprod64(diffusion).tolist()
    T = len(a_all)
    times = torch.linspace(T - 1, 0, n_steps).round().long().tolist()  # the sampler's evenly spaced steps
    m, v = 0.0, 1.0
    for i, t in enumerate(times):
        a = a_all[t]
        g, h = _coeffs(a, mu, sigma**2)
        if i + 1 == len(times):
            m, v = g * m + h, g * g * v
            break
        a_prev = a_all[times[i + 1]]
        sig2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        c = math.sqrt(max(1 - a_prev - sig2, 0.0)) / math.sqrt(1 - a)  # coefficient of ε̂
        k = math.sqrt(a_prev) - c * math.sqrt(a)  # x' = k x0_hat + c x + σ z
        m, v = (k * g + c) * m + k * h, (k * g + c) ** 2 * v + sig2
    return m, math.sqrt(v)


# ----- a tiny learner (configs/smoke.yaml, smaller still) --------------------------------------

# The Ray the whole test session shares (conftest.py), and that tests which stop it start again.
SESSION_RAY = dict(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="warning")

TINY = {"model.horizon": 8, "model.dim": 8, "model.value_dim": 8, "model.dim_mults": [1, 2],
        "train.batch_size": 8, "train.lr": 5e-3, "train.value_lr": 5e-3}


def make_trainer(episodes, **overrides):
    cfg = config.load(SMOKE_CONFIG, overrides={**TINY, **overrides})
    seed_everything(0)
    layout = layout_of(cfg)
    normalizer = fit_normalizer(episodes, layout, cfg.data.normalizer)
    windows = WindowDataset(episodes, layout=layout, horizon=cfg.model.horizon, normalizer=normalizer,
                            discount=cfg.data.discount, termination_penalty=cfg.data.termination_penalty,
                            value_target=cfg.data.value_target)
    trainer = Trainer(cfg, normalizer, value_mean=float(windows.returns.mean()), value_std=float(windows.returns.std()),
                      return_quantiles=windows.return_quantiles())
    return trainer, windows


def snapshot(trainer: Trainer) -> dict:
    """Every tensor a step could touch: weights, EMA weights, optimizer moments."""
    out = {}
    for name in ("denoiser", "value", "dynamics", "ema_denoiser", "ema_value", "ema_dynamics"):
        for k, v in getattr(trainer, name).state_dict().items():
            out[f"{name}.{k}"] = v.detach().clone()
    for name in ("opt_denoiser", "opt_value", "opt_dynamics"):
        for pid, st in getattr(trainer, name).state_dict()["state"].items():
            for k, v in st.items():
                out[f"{name}.{pid}.{k}"] = v.detach().clone() if torch.is_tensor(v) else v
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def tiny_online_config(dataset_id: str, **overrides):
    """configs/smoke.yaml cut down to seconds of online training with 2 one-env actors."""
    base = {
        "data.dataset_id": dataset_id, "env.max_episode_steps": 60, "train.steps": 30, "eval.episodes": 1,
        "eval.num_envs": 1, "online.num_actors": 2, "online.envs_per_actor": 1, "online.env_steps": 200,
        "online.updates_per_env_step": 0.2, "online.updates_per_call": 5, "online.broadcast_every": 5,
        # No figure (the one test that reads it asks for them): each takes the driver ~0.8 s.
        "online.checkpoint_every": 10, "online.figure_every": 10**6,
    }
    base.update(overrides)
    return config.load(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml", base)


@contextlib.contextmanager
def ray_address_file_kept():
    """Put back the machine-wide record of the last `ray start` cluster after a test starts its
    own: a stale one sends later `address="auto"` look-ups (ray.init, Ray's memory summary, a
    user's `ray status`) to a dead cluster."""
    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    saved = path.read_text() if path.is_file() else None
    try:
        yield
    finally:
        if saved is not None:
            path.write_text(saved)
        else:
            path.unlink(missing_ok=True)


def gaussian_normalizer(dim: int, shift: float = 0.0, scale: float = 1.0) -> Normalizer:
    """``(x - shift) / scale`` on every dim, unclipped in practice."""
    return Normalizer(kind="gaussian", shift=np.full(dim, shift), scale=np.full(dim, scale),
                      clip_min=-1e6 * np.ones(dim), clip_max=1e6 * np.ones(dim))
