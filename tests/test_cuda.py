"""The GPU learner path: skipped where torch sees no CUDA device (CI has none), and in the rest of
the suite's runs, which hide GPUs (conftest.py).

Needs only torch, numpy, PyYAML, tqdm and pytest, so it also runs on a bare GPU machine without
Ray or MuJoCo: ``DISTDIFF_TEST_CUDA=1 python -m pytest tests/test_cuda.py`` (test_package.py
checks that it does).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import SMOKE_CONFIG, TINY
from distdiff import config
from distdiff.data.windows import Batch
from distdiff.distributed.learner import Learner
from distdiff.normalizer import Normalizer
from distdiff.training import Trainer, planner_from_checkpoint, seed_everything

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device, and DISTDIFF_TEST_CUDA=1 "
                                "(conftest.py hides GPUs otherwise): DISTDIFF_TEST_CUDA=1 python -m pytest tests/test_cuda.py")


def _cfg(**overrides):
    return config.load(SMOKE_CONFIG, overrides={**TINY, **overrides})


def _checkpoint(cfg) -> dict:
    d = cfg.env.obs_dim + cfg.env.act_dim
    normalizer = Normalizer(kind="gaussian", shift=np.zeros(d), scale=np.ones(d), clip_min=-5 * np.ones(d),
                            clip_max=5 * np.ones(d))
    seed_everything(0)
    # (window returns of the batches below are standard normal)
    quantiles = np.quantile(np.random.default_rng(0).standard_normal(10_000), np.linspace(0, 1, 101)) \
        if cfg.model.returns_condition else None
    return Trainer(cfg, normalizer, value_mean=0.0, value_std=1.0, return_quantiles=quantiles).state_dict()


def _batches(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, d = cfg.train.batch_size, cfg.model.horizon, cfg.env.obs_dim + cfg.env.act_dim
    return [Batch(torch.randn(b, h, d, generator=g), torch.ones(b, h, d), torch.randn(b, cfg.env.obs_dim, generator=g),
                  torch.randn(b, generator=g), torch.randn(b, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("overrides", [
    {}, {"train.precision": "bf16"}, {"train.compile": "default"}, {"train.compile": "reduce-overhead"},
    # Every net the learner may train, the return-conditioned denoiser's quantile lookup on the device.
    {"model.returns_condition": True, "train.train_dynamics": True, "train.precision": "bf16"},
], ids=["fp32", "bf16", "compiled", "cuda-graphs", "conditioned+dynamics-bf16"])
def test_cuda_learner_trains_and_publishes_cpu_weights(overrides):
    cfg = _cfg(**{"train.ema_start": 0, "train.ema_every": 1, **overrides})
    learner = Learner(config=cfg.to_dict(), checkpoint=_checkpoint(cfg), device="cuda")
    assert next(learner.trainer.denoiser.parameters()).is_cuda
    batches = _batches(cfg, 20)
    first = learner.train(batches[:1])
    out = learner.train(batches * 5)
    assert out.updates == 100 and out.skipped == 0
    assert np.isfinite(out.losses["losses/denoiser"]) and out.losses["losses/denoiser"] < first.losses["losses/denoiser"]
    payload = learner.publish()
    assert payload.version == 1
    nets = ["denoiser", "value"] + ["dynamics"] * cfg.train.train_dynamics
    assert sorted(payload.weights) == sorted(nets)
    for name in nets:
        flat, module = payload.weights[name], getattr(learner.trainer, f"ema_{name}")
        assert isinstance(flat, np.ndarray) and flat.dtype == np.float32
        expected = torch.cat([t.reshape(-1).float().cpu() for t in module.state_dict().values()]).numpy()
        np.testing.assert_array_equal(flat, expected)


def test_cuda_nan_batch_is_skipped_without_touching_the_weights():
    cfg = _cfg()
    learner = Learner(config=cfg.to_dict(), checkpoint=_checkpoint(cfg), device="cuda")
    learner.train(_batches(cfg, 3))
    before = {k: v.clone() for k, v in learner.trainer.denoiser.state_dict().items()}
    batch = _batches(cfg, 1, seed=1)[0]
    batch.x_start[0, 0, 0] = float("nan")
    out = learner.train([batch])
    assert out.skipped == 1 and out.updates == 0
    for k, v in learner.trainer.denoiser.state_dict().items():
        assert torch.equal(v, before[k]), k


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def test_cuda_checkpoint_resumes_and_plans_on_cpu():
    cfg = _cfg()
    learner = Learner(config=cfg.to_dict(), checkpoint=_checkpoint(cfg), device="cuda")
    learner.train(_batches(cfg, 10))
    state = learner.state_dict()
    # a driver with no GPU saves it and plans from it
    tensors = [state["denoiser"], state["ema_denoiser"], state["prior"], state["opt_denoiser"]["state"]]
    assert all(not t.is_cuda for d in tensors for t in _tensors(d))
    # the optimizer moments come along, and CPU training goes on from them
    cpu = Trainer.from_checkpoint(state, cfg=cfg, device="cpu")
    assert cpu.step == learner.trainer.step == 10
    assert cpu.update(_batches(cfg, 1, seed=2)[0]) is not None
    # a resume on the GPU continues the device's random stream, which a CPU learner ignores
    Learner(config=cfg.to_dict(), checkpoint=state, device="cuda", resumed=True)
    resumed_draw = torch.rand(3, device="cuda")
    torch.cuda.set_rng_state(state["cuda_rng"])
    assert torch.equal(resumed_draw, torch.rand(3, device="cuda"))
    # a CPU rollout worker plans with what the GPU learner trained
    gpu_planner, cpu_planner = learner.trainer.planner(), planner_from_checkpoint(state, cfg=cfg)
    x = torch.randn(4, cfg.model.horizon, cfg.env.obs_dim + cfg.env.act_dim)
    t = torch.full((4,), 3)
    with torch.no_grad():
        a = gpu_planner.denoiser(x.cuda(), t.cuda()).cpu()
        b = cpu_planner.denoiser(x, t)
    # cuDNN convolutions run in TF32 by default: agreement to ~1e-3, not float32 rounding
    torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3)


def test_a_diffusion_and_its_guide_follow_the_device_whatever_they_were_made_on():
    from _helpers import LAYOUT
    from distdiff.diffusion.gaussian import GaussianDiffusion
    from distdiff.diffusion.guidance import ValueGuide
    from distdiff.diffusion.schedules import make_beta_schedule

    d = GaussianDiffusion(betas=make_beta_schedule("cosine", 20).cuda(), layout=LAYOUT, horizon=4)
    d.set_clip_range(-torch.ones(LAYOUT.transition_dim), torch.ones(LAYOUT.transition_dim))
    assert d.betas.device.type == "cpu" and d.clip_min.device.type == "cpu"  # moved with the module, below
    d = d.cuda()
    d.set_clip_range(-torch.ones(LAYOUT.transition_dim), torch.ones(LAYOUT.transition_dim))  # on a moved one
    assert d.clip_min.is_cuda
    # The planner takes the guide's variance before a later move of its diffusion would reach it.
    guide = ValueGuide(lambda x, t: x.sum(dim=(-1, -2)), scale=0.1,
                       posterior_variance=d.posterior_log_variance_clipped.exp().cpu())
    x = torch.zeros(2, 4, LAYOUT.transition_dim, device="cuda")
    out = guide(x, torch.tensor([3, 3], device="cuda"), lambda y: y)
    assert out.is_cuda and torch.all(out > 0)
