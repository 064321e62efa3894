"""Gaussian diffusion: forward process statistics, the loss, and the samplers' output law."""
from __future__ import annotations

import math

import pytest
import torch

from _helpers import (
    LAYOUT,
    MU,
    SIGMA,
    alphas_cumprod64,
    ddim_output_law,
    ddpm_output_law,
    exact_denoiser,
    free_entries,
    gaussian_diffusion,
)
from distdiff.diffusion.gaussian import GaussianDiffusion
from distdiff.diffusion.schedules import make_beta_schedule
from distdiff.layout import TrajectoryLayout

N_SAMPLES = 6000  # trajectories per sampler run; 3-4 free entries each per dim


def _cond(n: int, value: float = 0.3) -> torch.Tensor:
    return torch.full((n, LAYOUT.obs_dim), value)


# ----- forward process ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule,n_steps", [("linear", 10), ("cosine", 10), ("sigmoid", 20), ("cosine", 100)])
@pytest.mark.parametrize("where", ["last", "middle"])
@pytest.mark.parametrize("fresh_noise", [False, True])
def test_q_sample_moments(schedule, n_steps, where, fresh_noise):
    d = gaussian_diffusion(schedule, n_steps)
    t_index = n_steps - 1 if where == "last" else n_steps // 2
    a = float(alphas_cumprod64(d)[t_index])
    x_start = torch.full((50_000, 2, 2), 40.0)  # large, so √ᾱ_T·x0 stands out of the noise at t = T−1
    g = torch.Generator().manual_seed(0)
    t = torch.full((x_start.shape[0],), t_index, dtype=torch.long)
    if fresh_noise:  # (q_sample draws its own)
        torch.manual_seed(0)
        x_t = d.q_sample(x_start, t).double()
    else:
        x_t = d.q_sample(x_start, t, torch.randn(x_start.shape, generator=g)).double()
    n = x_t.numel()
    want_mean, want_std = math.sqrt(a) * 40.0, math.sqrt(1 - a)
    assert abs(x_t.mean().item() - want_mean) < 5 * want_std / math.sqrt(n) + 1e-4 * abs(want_mean)
    assert abs(x_t.std().item() / want_std - 1) < 5 / math.sqrt(2 * n) + 1e-4
    # and not merely the noise: at t = T−1 the signal must be (almost) gone but still present
    if where == "last":
        assert want_mean < 0.5 and want_std > 0.99


def test_q_sample_and_the_two_inversions_agree():
    d = gaussian_diffusion("cosine", 20)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 4, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 4, 2, generator=g, dtype=torch.float64)
    t = torch.arange(64) % 15  # where 1/√ᾱ is moderate, so float32 buffers stay accurate
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_start_from_noise(x_t, t, eps), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.predict_noise_from_start(x_t, t, x0), eps, atol=1e-4, rtol=1e-4)


def test_v_prediction_inverts_to_the_clean_trajectory():
    """v mixes x⁰ and ε so that near t = 0 τ̂⁰ ≈ x_t − √(1−ᾱ)·v̂: the network corrects its input
    instead of rebuilding it (the x⁰ network's floor measured in bench/README.md)."""
    d = gaussian_diffusion("cosine", 20, "v")
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, 4, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 4, 2, generator=g, dtype=torch.float64)
    t = torch.arange(64) % 20
    x_t = d.q_sample(x0, t, eps)
    a = alphas_cumprod64(d)[t].reshape(64, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(d.predict_v(x0, t, eps), v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.predict_start_from_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)


def test_constructor_validation():
    with pytest.raises(ValueError, match="prediction"):
        gaussian_diffusion(prediction="score")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(betas=torch.tensor([0.1, 1.0]), layout=LAYOUT, horizon=4)
    with pytest.raises(ValueError, match="both"):
        gaussian_diffusion(clip_min=torch.zeros(2))
    for obs_dim, act_dim in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            TrajectoryLayout(obs_dim=obs_dim, act_dim=act_dim)


# ----- loss -----------------------------------------------------------------------------------

def _oracle(target, *, garbage_mask=None):
    """A model that returns ``target`` exactly, except (garbage) where ``garbage_mask`` is 1."""
    def model(x, t):
        out = target.clone()
        if garbage_mask is not None:
            out = torch.where(garbage_mask.bool(), torch.full_like(out, 1e3), out)
        return out
    return model


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_loss_ignores_the_clamped_state_and_padding(prediction):
    layout = TrajectoryLayout(obs_dim=3, act_dim=2)
    d = GaussianDiffusion(betas=make_beta_schedule("cosine", 10), layout=layout, horizon=6,
                          prediction=prediction, action_weight=10.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 6, 5, generator=g)
    noise = torch.randn(5, 6, 5, generator=g)
    t = torch.randint(0, 10, (5,), generator=g)
    a = torch.cumprod(1.0 - make_beta_schedule("cosine", 10), 0)[t].reshape(5, 1, 1).float()
    target = {"epsilon": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    s0 = layout.condition_mask(6).expand(5, 6, 5)
    assert d.loss(_oracle(target), x0, x0[:, 0, :3], t=t, noise=noise).item() < 1e-9
    # Garbage on s_0 costs nothing: it is clamped while sampling and carries no signal.
    assert d.loss(_oracle(target, garbage_mask=s0), x0, x0[:, 0, :3], t=t, noise=noise).item() < 1e-9
    # Garbage on padded entries costs nothing once they are masked.
    pad = torch.zeros(5, 6, 5)
    pad[:, 4:] = 1.0
    loss = d.loss(_oracle(target, garbage_mask=pad), x0, x0[:, 0, :3], t=t, noise=noise, mask=1 - pad)
    assert loss.item() < 1e-9
    assert d.loss(_oracle(target, garbage_mask=pad), x0, x0[:, 0, :3], t=t, noise=noise).item() > 1.0


def test_loss_weights_the_first_action():
    layout = TrajectoryLayout(obs_dim=2, act_dim=2)
    d = GaussianDiffusion(betas=make_beta_schedule("cosine", 10), layout=layout, horizon=4,
                          prediction="x0", action_weight=10.0)
    x0 = torch.zeros(1, 4, 4)
    t = torch.zeros(1, dtype=torch.long)

    def off_by_one(row, col):
        def model(x, t):
            out = torch.zeros_like(x)
            out[:, row, col] = 1.0
            return out
        return model

    first_action = d.loss(off_by_one(0, 2), x0, x0[:, 0, :2], t=t).item()
    later_action = d.loss(off_by_one(2, 2), x0, x0[:, 0, :2], t=t).item()
    state = d.loss(off_by_one(1, 0), x0, x0[:, 0, :2], t=t).item()
    assert later_action > 0
    assert first_action == pytest.approx(10.0 * later_action)
    assert state == pytest.approx(later_action)


# ----- samplers: output law with the ideal denoiser --------------------------------------------

def _run(d, sampler, *, n=N_SAMPLES, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    den = exact_denoiser(d)
    if sampler == "ddpm":
        return d.p_sample_loop(den, _cond(n), generator=g).trajectories
    return d.ddim_sample_loop(den, _cond(n), generator=g, **kw).trajectories


# (schedule, sampler, kwargs) over T = 100 steps: schemes whose discretization error for this data
# is below 5% of sigma (their exact output law is checked, with any step count, further down).
NEAR_EXACT = [
    ("cosine", "ddpm", {}),
    ("linear", "ddpm", {}),
    ("cosine", "ddim", {"n_steps": 100, "eta": 0.0}),
    ("linear", "ddim", {"n_steps": 100, "eta": 0.0}),
    ("cosine", "ddim", {"n_steps": 100, "eta": 1.0}),
    ("linear", "ddim", {"n_steps": 100, "eta": 1.0}),
    ("cosine", "ddim", {"n_steps": 50, "eta": 0.0}),
    ("linear", "ddim", {"n_steps": 50, "eta": 0.0}),
    ("cosine", "ddim", {"n_steps": 50, "eta": 1.0}),
]


def _ids(v):
    return "-".join(map(str, v.values())) if isinstance(v, dict) else str(v)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("schedule,sampler,kw", NEAR_EXACT, ids=_ids)
def test_sampler_recovers_the_data_gaussian(prediction, schedule, sampler, kw):
    """With the ideal denoiser the samples are N(mu, sigma²) per free entry."""
    d = gaussian_diffusion(schedule, 100, prediction)
    x = _run(d, sampler, **kw)
    assert torch.isfinite(x).all()
    for dim, values in enumerate(free_entries(x)):
        mu, sigma = MU[dim].item(), SIGMA[dim].item()
        assert abs(values.mean().item() - mu) < 0.05 * sigma, f"dim {dim}: mean {values.mean():.3f} != {mu}"
        assert abs(values.std().item() / sigma - 1) < 0.07, f"dim {dim}: std {values.std():.3f} != {sigma}"


def test_a_sampler_that_ignores_the_data_fails_the_check():
    """Guard against a vacuous check: a denoiser for the wrong Gaussian must be caught."""
    d = gaussian_diffusion("cosine", 100, "x0")
    wrong = exact_denoiser(d, mu=MU, sigma=SIGMA * 1.25)
    x = d.p_sample_loop(wrong, _cond(N_SAMPLES), generator=torch.Generator().manual_seed(0)).trajectories
    states, _ = free_entries(x)
    assert abs(states.std().item() / SIGMA[0].item() - 1) > 0.15


LAW_CASES = [
    ("ddpm", "cosine", 10, {}),
    ("ddpm", "linear", 20, {}),
    ("ddim", "cosine", 50, {"n_steps": 1, "eta": 0.0}),
    ("ddim", "cosine", 50, {"n_steps": 3, "eta": 0.0}),
    ("ddim", "cosine", 50, {"n_steps": 5, "eta": 1.0}),
    ("ddim", "linear", 50, {"n_steps": 10, "eta": 0.5}),
    ("ddim", "sigmoid", 20, {"n_steps": 20, "eta": 0.0}),
]


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("sampler,schedule,T,kw", LAW_CASES, ids=_ids)
def test_sampler_matches_closed_form_law(prediction, sampler, schedule, T, kw):
    """Few-step samplers do not return N(mu, sigma²), but exactly the Gaussian law of their update
    rule, computed independently in closed form: checks every coefficient of the samplers."""
    d = gaussian_diffusion(schedule, T, prediction)
    x = _run(d, sampler, **kw)
    for dim, values in enumerate(free_entries(x)):
        mu, sigma = MU[dim].item(), SIGMA[dim].item()
        if sampler == "ddpm":
            m, s = ddpm_output_law(d, mu, sigma)
        else:
            m, s = ddim_output_law(d, kw["n_steps"], kw["eta"], mu, sigma)
        n = values.numel()
        assert abs(values.mean().item() - m) < 5 * s / math.sqrt(n) + 1e-3, (dim, values.mean().item(), m)
        assert abs(values.std().item() / s - 1) < 5 / math.sqrt(2 * n) + 1e-3, (dim, values.std().item(), s)


@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", {"n_steps": 7, "eta": 0.0}), ("ddim", {"n_steps": 7, "eta": 1.0})])
def test_epsilon_and_x0_parametrizations_sample_the_same(sampler, kw):
    """Same ideal denoiser in both parametrizations and the same seed: the same samples."""
    a = _run(gaussian_diffusion("cosine", 30, "epsilon"), sampler, n=256, **kw)
    b = _run(gaussian_diffusion("cosine", 30, "x0"), sampler, n=256, **kw)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", {"n_steps": 5, "eta": 0.0}), ("ddim", {"n_steps": 5, "eta": 1.0})])
def test_same_generator_seed_same_samples(sampler, kw):
    d = gaussian_diffusion("cosine", 20, "x0")
    assert torch.equal(_run(d, sampler, n=64, seed=3, **kw), _run(d, sampler, n=64, seed=3, **kw))
    assert not torch.equal(_run(d, sampler, n=64, seed=3, **kw), _run(d, sampler, n=64, seed=4, **kw))


# Every parametrization: the shipped Walker2d config predicts x0 with clip_denoised on.
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", {"n_steps": 5, "eta": 0.0}), ("ddim", {"n_steps": 5, "eta": 1.0})])
def test_clip_range_bounds_the_samples(sampler, kw, prediction):
    lo, hi = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.25])
    d = gaussian_diffusion("cosine", 20, prediction, clip_min=lo, clip_max=hi)
    x = _run(d, sampler, n=2000, **kw)
    states, actions = free_entries(x)
    for values, a, b in ((states, lo[0], hi[0]), (actions, lo[1], hi[1])):
        assert values.min() >= a - 1e-5 and values.max() <= b + 1e-5
    # the data's mean 1.5 lies above the state's clip range: the clip is active, not vacuous
    assert (states > hi[0] - 1e-3).float().mean() > 0.2


def test_ddim_adds_noise_of_the_scale_its_eta_asks_between_0_and_1():
    # x_t' = √ᾱ' x̂⁰ + √(1 − ᾱ' − σ²) ε̂ + σ z with σ = η √((1 − ᾱ')/(1 − ᾱ) · (1 − ᾱ/ᾱ')) (Song et
    # al. 2021, eq. 16). From the same start noise, the first step at η = 0.5 differs from η = 0's
    # by (√(1 − ᾱ' − σ²) − √(1 − ᾱ')) ε̂ + σ z, whose spread checks σ where η² = η cannot (0 and 1).
    d = gaussian_diffusion("cosine", 20, "x0")
    a = alphas_cumprod64(d)
    first = {eta: d.ddim_sample_loop(exact_denoiser(d), _cond(4000), n_steps=3, eta=eta, return_chain=True,
                                     generator=torch.Generator().manual_seed(0)).chain[:, 1].double() for eta in (0.0, 0.5)}
    t, t_next = 19, 10  # the levels of 3 steps: 19, 9.5 rounded half to even, 0
    sigma = 0.5 * math.sqrt((1 - a[t_next]) / (1 - a[t]) * (1 - a[t] / a[t_next]))
    eps_change = math.sqrt(1 - a[t_next] - sigma ** 2) - math.sqrt(1 - a[t_next])
    spread = (first[0.5] - first[0.0])[:, 1:, :].std().item()  # (s_0 is clamped in both)
    assert spread == pytest.approx(math.sqrt(sigma ** 2 + eps_change ** 2), rel=0.1)


def test_the_loss_is_a_mean_over_the_entries_it_weighs_with_the_action_weight():
    # An x0 model off by 1 everywhere, horizon 4 on the 1 + 1 dim layout: s_0 is clamped (weight 0),
    # a_0 weighs action_weight, the other 6 entries 1: (6 + 10) / 7 entries.
    d = gaussian_diffusion("cosine", 5, "x0", action_weight=10.0)
    x0 = torch.zeros(3, 4, 2)
    assert d.loss(lambda x, t: torch.ones_like(x), x0, x0[:, 0, :1]).item() == pytest.approx(16 / 7)


def test_ddim_step_count_is_validated():
    d = gaussian_diffusion("cosine", 10)
    for bad in (0, 11):
        with pytest.raises(ValueError, match="n_steps"):
            d.ddim_sample_loop(exact_denoiser(d), _cond(2), n_steps=bad)


def test_return_chain_has_one_entry_per_step():
    d = gaussian_diffusion("cosine", 12, "x0")
    den = exact_denoiser(d)
    ddpm = d.p_sample_loop(den, _cond(3), return_chain=True)
    assert ddpm.chain.shape == (3, 13, 4, 2)
    assert torch.equal(ddpm.chain[:, -1], ddpm.trajectories)
    ddim = d.ddim_sample_loop(den, _cond(3), n_steps=4, return_chain=True)
    assert ddim.chain.shape == (3, 5, 4, 2)
    assert torch.equal(ddim.chain[:, -1], ddim.trajectories)


def test_training_inputs_are_inpainted_at_every_level():
    # The denoiser is trained on what the samplers give it: s_0 clamped to the condition, at
    # every level t = 0..T-1 (t = 0 is the samplers' last step).
    d = gaussian_diffusion("cosine", 5, "x0")
    x0, cond = torch.randn(2000, 4, 2), torch.full((2000, 1), 7.0)
    seen = {}

    def model(x, t):
        seen["x"], seen["t"] = x.clone(), t.clone()
        return torch.zeros_like(x)

    d.loss(model, x0, cond)
    assert torch.equal(LAYOUT.states(seen["x"])[:, 0], cond)
    assert set(seen["t"].tolist()) == set(range(5))


def test_loss_is_a_mean_over_the_real_entries():
    # Off by 1 everywhere: the loss is 1 however much of the batch is padding.
    d = gaussian_diffusion("cosine", 5, "x0")
    x0 = torch.zeros(3, 4, 2)
    for padded in (0, 2):
        mask = torch.ones_like(x0)
        mask[:, 4 - padded:] = 0
        assert d.loss(lambda x, t: torch.ones_like(x), x0, x0[:, 0, :1], mask=mask).item() == pytest.approx(1.0)


def guided_levels(sample) -> list:
    """The noise levels ``sample(guide)`` hands its guide, in order."""
    levels = []

    def guide(x, t, clamp):
        levels.append(int(t[0]))
        return x

    sample(guide)
    return levels


def test_ddpm_guides_the_start_at_t_minus_1_then_each_level_a_step_lands_on():
    d = gaussian_diffusion("cosine", 6)
    levels = guided_levels(lambda guide: d.p_sample_loop(exact_denoiser(d), torch.zeros(2, 1), guide=guide,
                                                         generator=torch.Generator().manual_seed(0)))
    # Once before each step, as Diffuser guides: never the clean output after the last one,
    # which would leave the plan moved by the value gradient and not denoised again.
    assert levels == [5, 4, 3, 2, 1, 0]


def test_ddim_guides_the_start_then_each_level_a_step_lands_on_but_not_its_output():
    d = gaussian_diffusion("cosine", 20)
    levels = guided_levels(lambda guide: d.ddim_sample_loop(exact_denoiser(d), torch.zeros(2, 1), n_steps=4, guide=guide,
                                                            generator=torch.Generator().manual_seed(0)))
    assert levels == [19, 13, 6, 0]


def test_ddim_visits_evenly_spaced_rounded_levels():
    d = gaussian_diffusion("cosine", 20)
    denoiser, levels = exact_denoiser(d), []

    def model(x, t):
        levels.append(int(t[0]))
        return denoiser(x, t)

    d.ddim_sample_loop(model, torch.zeros(2, 1), n_steps=4, generator=torch.Generator().manual_seed(0))
    assert levels == [19, 13, 6, 0]


def test_conditioning_leaves_its_input_as_it_was():
    x = torch.zeros(2, 3, 2)
    conditioned = LAYOUT.condition(x, torch.ones(2, 1))
    assert torch.equal(x, torch.zeros(2, 3, 2)) and torch.equal(LAYOUT.states(conditioned)[:, 0], torch.ones(2, 1))
