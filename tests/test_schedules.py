"""β schedules: ᾱ_t = Π(1 − β_s) must be a strictly decreasing sequence in (0, 1)."""
from __future__ import annotations

import pytest
import torch

from distdiff.diffusion.schedules import MAX_BETA, SCHEDULES, make_beta_schedule

NAMES = ["linear", "cosine", "sigmoid"]
STEPS = [1, 2, 5, 10, 20, 50, 100, 1000]


def test_the_three_schedules_are_registered():
    assert set(NAMES) == set(SCHEDULES)


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
    [(name, n) for name in NAMES for n in (1, 2, 5)],
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


@pytest.mark.parametrize("n_steps", [0, -3])
def test_non_positive_step_count_is_rejected(n_steps):
    with pytest.raises(ValueError, match="n_steps"):
        make_beta_schedule("cosine", n_steps)
