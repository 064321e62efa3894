"""β schedules: ᾱ_t = Π(1 − β_s) must be a strictly decreasing sequence in (0, 1)."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from distdiff.config import DiffusionConfig
from distdiff.diffusion.schedules import MAX_BETA, SCHEDULES, make_beta_schedule

NAMES = sorted(SCHEDULES)  # a schedule added there is held to every test below
STEPS = [2, 5, 10, 20, 50, 100, 1000]


def test_every_schedule_cites_its_paper_and_is_named_by_the_configs_help():
    assert {"linear", "cosine", "sigmoid"} <= set(NAMES)
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(DiffusionConfig)}["schedule"]
    for name, schedule in SCHEDULES.items():
        assert re.search(r"et al\. \d{4}|& \w+ \d{4}", schedule.__doc__), name
        assert name in help_text, name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_steps", STEPS)
def test_alphas_cumprod_strictly_decreasing_in_open_unit_interval(name, n_steps):
    betas = make_beta_schedule(name, n_steps)
    assert betas.dtype == torch.float64
    assert betas.shape == (n_steps,)
    assert torch.isfinite(betas).all()
    assert (betas > 0).all() and (betas <= MAX_BETA).all()
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    assert (alphas_cumprod > 0).all() and (alphas_cumprod < 1).all()
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all(), "ᾱ must strictly decrease"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_steps", [10, 20, 50, 100, 1000])
def test_chain_starts_near_data_and_ends_near_noise(name, n_steps):
    alphas_cumprod = torch.cumprod(1.0 - make_beta_schedule(name, n_steps), dim=0)
    assert alphas_cumprod[0] > 0.95, "the first step must add little noise"
    assert alphas_cumprod[-1] < 1e-3, "x_T must be (almost) pure noise, the sampler starts from N(0, I)"


@pytest.mark.parametrize(
    "name,n_steps",
    [(name, n) for name in NAMES for n in (2, 5)],
)
def test_short_chains_still_reach_noise(name, n_steps):
    alphas_cumprod = torch.cumprod(1.0 - make_beta_schedule(name, n_steps), dim=0)
    assert alphas_cumprod[-1] < 1e-2


def test_schedules_are_pure_functions_of_n_steps():
    for name in NAMES:
        assert torch.equal(make_beta_schedule(name, 37), make_beta_schedule(name, 37))


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ValueError) as info:
        make_beta_schedule("quadratic", 10)
    message = str(info.value)
    assert "quadratic" in message
    for name in NAMES:
        assert name in message


@pytest.mark.parametrize("n_steps", [1, 0, -3])
def test_a_chain_of_fewer_than_two_steps_is_rejected(n_steps):
    with pytest.raises(ValueError, match="n_steps"):
        make_beta_schedule("cosine", n_steps)


def test_cosine_schedule_is_nichol_and_dhariwal_eq_17():
    # ᾱ_t = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2): ᾱ after t + 1 steps of the chain.
    T, s = 100, 0.008
    alphas_cumprod = torch.cumprod(1 - make_beta_schedule("cosine", T), 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 24, 49, 74):
        assert alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_sigmoid_schedule_is_jabri_et_al_alpha_bar():
    T, start, end = 50, -3.0, 3.0
    alphas_cumprod = torch.cumprod(1 - make_beta_schedule("sigmoid", T), 0)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    f = lambda t: (sig(end) - sig(t / T * (end - start) + start)) / (sig(end) - sig(start))  # noqa: E731
    for t in (0, 10, 25, 40):
        assert alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_linear_schedule_is_the_1000_step_papers_scaled_by_1000_over_n():
    betas = make_beta_schedule("linear", 100)
    assert betas[0].item() == pytest.approx(1e-4 * 10) and betas[-1].item() == pytest.approx(2e-2 * 10)
    assert make_beta_schedule("linear", 1000)[0].item() == pytest.approx(1e-4)
