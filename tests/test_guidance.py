"""Value guidance: exact gradient steps, s_0 never moves, scale 0 is a no-op, V goes up."""
from __future__ import annotations

import pytest
import torch

from _helpers import LAYOUT, exact_denoiser, gaussian_diffusion
from distdiff.diffusion.guidance import ValueGuide

N = 3000


def v_sum(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An analytic value: the sum of every state and action over the horizon (∇V = 1)."""
    return x.sum(dim=(-1, -2))


def v_actions(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return LAYOUT.actions(x).sum(dim=(-1, -2))


def v_quadratic(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A value with a t-dependent, non-constant gradient, to make "no-op" checks non-trivial."""
    return -((x - 0.5) ** 2).sum(dim=(-1, -2)) * (1 + t.to(x.dtype))


def _cond(n):
    return torch.linspace(-1, 1, n).reshape(n, 1)


def _sample(d, sampler, guide, *, seed=0, n=N, **kw):
    g = torch.Generator().manual_seed(seed)
    den = exact_denoiser(d)
    if sampler == "ddpm":
        return d.p_sample_loop(den, _cond(n), guide=guide, generator=g).trajectories
    return d.ddim_sample_loop(den, _cond(n), guide=guide, generator=g, **kw).trajectories


SAMPLERS = [("ddpm", {}), ("ddim", {"n_steps": 5, "eta": 0.0}), ("ddim", {"n_steps": 5, "eta": 1.0}),
            ("ddim", {"n_steps": 2, "eta": 0.0})]
IDS = ["ddpm", "ddim-eta0", "ddim-eta1", "ddim2"]


# ----- the guide step itself ----------------------------------------------------------------

def _clamp_to(value):
    return lambda y: LAYOUT.condition(y, torch.full((y.shape[0], LAYOUT.obs_dim), value))


@pytest.mark.parametrize("n_steps", [1, 3])
def test_guide_takes_exact_gradient_steps_and_reclamps(n_steps):
    x = torch.zeros(2, 4, 2)
    t = torch.tensor([5, 5])
    out = ValueGuide(v_sum, scale=0.25, n_steps=n_steps)(x, t, _clamp_to(-7.0))
    want = torch.full_like(x, 0.25 * n_steps)
    want[:, 0, 0] = -7.0
    assert torch.equal(out, want)


def test_every_guide_step_sees_the_conditioning_state_exactly():
    # A value whose gradient depends on s_0: a step taken from a moved s_0 goes elsewhere, which
    # the constant gradient of v_sum could not show.
    seen = []

    def v_of_start(x, t):
        seen.append(x[:, 0, 0].detach().clone())
        return x[:, 0, 0] * x.sum(dim=(-1, -2))

    x = torch.zeros(2, 4, 2)
    out = ValueGuide(v_of_start, scale=0.25, n_steps=3)(x, torch.tensor([5, 5]), _clamp_to(-7.0))
    assert len(seen) == 3
    assert torch.equal(seen[0], torch.zeros(2))  # (the input as given; clamped from then on)
    assert all(torch.equal(s, torch.full((2,), -7.0)) for s in seen[1:])
    assert torch.equal(out[:, 0, 0], torch.full((2,), -7.0))


@pytest.mark.parametrize("sampler,kw", SAMPLERS)
def test_a_guide_that_moves_s0_cannot_move_it_for_the_denoiser(sampler, kw):
    # Any step function may be passed as a guide, one that ignores its clamp too: the sampler
    # re-clamps what it returns, so every denoising step sees the exact conditioning state.
    d = gaussian_diffusion()
    den, seen = exact_denoiser(d), []

    def model(x, t):
        seen.append(x[:, 0, 0].clone())
        return den(x, t)

    g = torch.Generator().manual_seed(0)
    careless = lambda x, t, clamp: x + 1.0  # noqa: E731
    if sampler == "ddpm":
        out = d.p_sample_loop(model, _cond(8), guide=careless, generator=g).trajectories
    else:
        out = d.ddim_sample_loop(model, _cond(8), guide=careless, generator=g, **kw).trajectories
    assert len(seen) == (kw["n_steps"] if kw else d.n_steps)
    assert all(torch.equal(s, _cond(8)[:, 0]) for s in seen)
    assert torch.equal(out[:, 0, 0], _cond(8)[:, 0])


def test_guide_scales_by_posterior_variance_per_sample():
    post_var = torch.tensor([0.0, 0.1, 0.2, 0.4])
    x = torch.zeros(2, 4, 2)
    t = torch.tensor([1, 3])
    out = ValueGuide(v_sum, scale=2.0, posterior_variance=post_var)(x, t, lambda y: y)
    assert torch.allclose(out[0], torch.full((4, 2), 0.2))
    assert torch.allclose(out[1], torch.full((4, 2), 0.8))


def test_guide_is_off_below_t_stopgrad():
    x = torch.zeros(3, 4, 2)
    t = torch.tensor([0, 1, 2])
    out = ValueGuide(v_sum, scale=1.0, t_stopgrad=2)(x, t, lambda y: y)
    assert torch.equal(out[:2], x[:2])
    assert torch.equal(out[2], torch.ones(4, 2))


def test_a_non_finite_gradient_leaves_an_inactive_plan_as_it_is():
    def v_infinite_at_t0(x, t):
        return x.sum(dim=(-1, -2)) * torch.where(t == 0, torch.tensor(float("inf")), torch.tensor(1.0))

    x = torch.zeros(2, 4, 2)
    out = ValueGuide(v_infinite_at_t0, scale=1.0, t_stopgrad=1)(x, torch.tensor([0, 3]), lambda y: y)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], torch.ones(4, 2))


def test_guide_validates_step_count():
    with pytest.raises(ValueError, match="n_steps"):
        ValueGuide(v_sum, scale=1.0, n_steps=0)


# ----- guidance inside the samplers ------------------------------------------------------------

@pytest.mark.parametrize("sampler,kw", SAMPLERS, ids=IDS)
def test_scale_zero_is_bit_for_bit_unguided(sampler, kw):
    d = gaussian_diffusion("cosine", 20, "epsilon")
    unguided = _sample(d, sampler, None, n=256, **kw)
    zero = _sample(d, sampler, ValueGuide(v_quadratic, scale=0.0, n_steps=2,
                                          posterior_variance=d.posterior_variance), n=256, **kw)
    assert torch.equal(zero, unguided)
    # and a non-zero scale does change them, so the comparison above is not vacuous
    assert not torch.equal(_sample(d, sampler, ValueGuide(v_quadratic, scale=0.05), n=256, **kw), unguided)


@pytest.mark.parametrize("sampler,kw", SAMPLERS, ids=IDS)
def test_guide_inactive_at_every_step_is_bit_for_bit_unguided(sampler, kw):
    d = gaussian_diffusion("cosine", 20, "x0")
    unguided = _sample(d, sampler, None, n=256, **kw)
    off = _sample(d, sampler, ValueGuide(v_quadratic, scale=1.0, t_stopgrad=d.n_steps + 1), n=256, **kw)
    assert torch.equal(off, unguided)


@pytest.mark.parametrize("value", [v_sum, v_actions], ids=["states+actions", "actions"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "posterior-var"])
@pytest.mark.parametrize("sampler,kw", SAMPLERS, ids=IDS)
def test_guidance_raises_the_value_and_keeps_s0(sampler, kw, scaled, value):
    d = gaussian_diffusion("cosine", 20, "epsilon")
    cond = _cond(N)
    guide = ValueGuide(value, scale=0.5 if not scaled else 2.0, n_steps=2, t_stopgrad=0,
                       posterior_variance=d.posterior_variance if scaled else None)
    unguided = _sample(d, sampler, None, **kw)
    guided = _sample(d, sampler, guide, **kw)
    v0, v1 = value(unguided, None), value(guided, None)
    # same seed: guidance moves the same samples; the gain must stand far out of the noise
    gain = (v1 - v0).mean()
    n_free = 7 if value is v_sum else 4  # entries V depends on, s_0 excluded
    assert gain > 0.05 * n_free  # at least 0.05 per guided entry on average
    assert gain > 10 * (v1 - v0).std() / N**0.5
    assert (v1 > v0).float().mean() > 0.9
    assert torch.equal(guided[:, 0, LAYOUT.state_slice], cond)
    assert torch.equal(unguided[:, 0, LAYOUT.state_slice], cond)


@pytest.mark.parametrize("prediction", ["epsilon", "x0"])
def test_two_step_ddim_is_guided_with_the_default_stopgrad(prediction):
    # Its one step lands on t = 0, below t_stopgrad = 2: only the guided starting noise makes
    # the shipped planner (2 DDIM steps) respond to guidance at all.
    d = gaussian_diffusion("cosine", 20, prediction)
    post_var = d.posterior_log_variance_clipped.exp()
    guide = ValueGuide(v_actions, scale=2.0, n_steps=2, t_stopgrad=2, posterior_variance=post_var)
    kw = {"n_steps": 2, "eta": 0.0}
    unguided, guided = _sample(d, "ddim", None, **kw), _sample(d, "ddim", guide, **kw)
    v0, v1 = v_actions(unguided, None), v_actions(guided, None)
    assert (v1 > v0).float().mean() > 0.9
    assert (v1 - v0).mean() > 10 * (v1 - v0).std() / N**0.5
    assert torch.equal(guided[:, 0, LAYOUT.state_slice], _cond(N))
