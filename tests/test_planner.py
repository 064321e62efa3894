"""The conditioning state s_0 is exact after sampling, with the real networks and through Planner.plan."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from _helpers import LAYOUT, SMOKE_CONFIG, exact_denoiser, gaussian_diffusion
from distdiff import config
from distdiff.config import GuidanceConfig, PlannerConfig
from distdiff.data.windows import fit_normalizer
from distdiff.diffusion.guidance import ValueGuide
from distdiff.models import build_models, layout_of
from distdiff.normalizer import Normalizer
from distdiff.planner import Planner
from distdiff.rollout import make_env


@pytest.fixture(scope="module")
def smoke_models(tiny_episodes):
    cfg = config.load(SMOKE_CONFIG)
    torch.manual_seed(0)
    normalizer = fit_normalizer(tiny_episodes, layout_of(cfg), cfg.data.normalizer)
    diffusion, denoiser, value, dynamics = build_models(cfg, normalizer)
    return cfg, normalizer, diffusion, denoiser.eval(), value.eval(), dynamics.eval()


@pytest.fixture(scope="module")
def observations(tiny_episodes):
    """Real Walker2d states (float32, as stored), from several episodes and steps."""
    return np.stack([ep.observations[min(3 * i, len(ep))] for i, ep in enumerate(tiny_episodes[:6])])


SAMPLERS = [("ddpm", {}), ("ddim", {"n_steps": 3, "eta": 0.0}), ("ddim", {"n_steps": 3, "eta": 1.0})]


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("sampler,kw", SAMPLERS, ids=["ddpm", "ddim-eta0", "ddim-eta1"])
def test_s0_exact_after_sampling_with_the_real_networks(smoke_models, observations, sampler, kw, guided):
    cfg, normalizer, diffusion, denoiser, value, _ = smoke_models
    layout = diffusion.layout
    cond = normalizer.slice(layout.state_slice).normalize(torch.from_numpy(observations))
    # a large scale: the value gradient on s_0 is far from zero, only the re-clamp keeps it
    guide = ValueGuide(value, scale=5.0, n_steps=2, t_stopgrad=0) if guided else None
    g = torch.Generator().manual_seed(0)
    if sampler == "ddpm":
        out = diffusion.p_sample_loop(denoiser, cond, guide=guide, generator=g, return_chain=True)
    else:
        out = diffusion.ddim_sample_loop(denoiser, cond, guide=guide, generator=g, return_chain=True, **kw)
    assert out.trajectories.shape == (len(observations), cfg.model.horizon, layout.transition_dim)
    assert torch.isfinite(out.trajectories).all()
    assert torch.equal(layout.first_state(out.trajectories), cond)
    for k in range(out.chain.shape[1]):  # every intermediate step, too
        assert torch.equal(layout.first_state(out.chain[:, k]), cond)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("scale,n_candidates", [(0.0, 1), (0.1, 1), (1.0, 3)])
def test_plan_starts_exactly_at_the_observation(smoke_models, observations, sampler, scale, n_candidates):
    cfg, normalizer, diffusion, denoiser, value, _ = smoke_models
    guidance = dataclasses.replace(cfg.guidance, scale=scale, n_candidates=n_candidates)
    planner_cfg = dataclasses.replace(cfg.planner, sampler=sampler)
    planner = Planner(diffusion=diffusion, denoiser=denoiser, value=value, normalizer=normalizer,
                      guidance=guidance, planner=planner_cfg)
    plan = planner.plan(observations, generator=torch.Generator().manual_seed(0))
    b, h = len(observations), cfg.model.horizon
    assert plan.states.shape == (b, h, cfg.env.obs_dim) and plan.actions.shape == (b, h, cfg.env.act_dim)
    assert plan.trajectories.shape == (b, h, cfg.env.obs_dim + cfg.env.act_dim)
    if scale == 0.0 and n_candidates == 1:
        assert plan.values is None  # V is not computed when nothing uses it
    else:
        assert plan.values.shape == (b,)
    assert np.array_equal(plan.states[:, 0], observations)
    state_norm = normalizer.slice(diffusion.layout.state_slice)
    assert torch.equal(diffusion.layout.first_state(plan.trajectories), state_norm.normalize(torch.from_numpy(observations)))
    # the rest of the plan is the sampled trajectory in env units
    raw = normalizer.unnormalize(plan.trajectories).numpy()
    np.testing.assert_array_equal(plan.actions, raw[..., diffusion.layout.action_slice])
    np.testing.assert_array_equal(plan.states[:, 1:], raw[:, 1:, diffusion.layout.state_slice])


def test_plan_starts_exactly_at_a_float64_env_observation(smoke_models, tiny_episodes):
    cfg, normalizer, diffusion, denoiser, value, _ = smoke_models
    env = make_env(cfg.env.id)
    try:
        obs, _ = env.reset(seed=0)
    finally:
        env.close()
    assert obs.dtype == np.float64
    planner = Planner(diffusion=diffusion, denoiser=denoiser, value=value, normalizer=normalizer,
                      guidance=cfg.guidance, planner=cfg.planner)
    plan = planner.plan(obs[None], generator=torch.Generator().manual_seed(0))
    assert np.array_equal(plan.states[:, 0], obs[None])


def test_plan_rejects_badly_shaped_observations(smoke_models, observations):
    cfg, normalizer, diffusion, denoiser, value, _ = smoke_models
    planner = Planner(diffusion=diffusion, denoiser=denoiser, value=value, normalizer=normalizer,
                      guidance=cfg.guidance, planner=cfg.planner)
    with pytest.raises(ValueError, match="observations"):
        planner.plan(observations[:, :5])
    with pytest.raises(ValueError, match="observations"):
        planner.plan(observations[0])


def test_guidance_without_value_net_is_refused(smoke_models):
    cfg, normalizer, diffusion, denoiser, _, _ = smoke_models
    for guidance in (GuidanceConfig(scale=0.1), GuidanceConfig(scale=0.0, n_candidates=2)):
        with pytest.raises(ValueError, match="value network"):
            Planner(diffusion=diffusion, denoiser=denoiser, value=None, normalizer=normalizer,
                    guidance=guidance, planner=cfg.planner)


class ActionSum(torch.nn.Module):
    def forward(self, x, t):
        return LAYOUT.actions(x).sum(dim=(-1, -2))


TOY_NORMALIZER = Normalizer(kind="gaussian", shift=[0.5, -1.0], scale=[2.0, 0.5], clip_min=[-3, -3], clip_max=[3, 3])
TOY_OBS = np.array([[0.0], [1.0], [2.0]], dtype=np.float32)


def toy_planner(guidance: GuidanceConfig, planner: PlannerConfig = PlannerConfig(), *, denoiser=None,
                returns_condition: bool = False) -> Planner:
    """A 20-step x0 chain on the 1 + 1 dim toy layout, the exact Gaussian denoiser, V = Σ actions."""
    d = gaussian_diffusion("cosine", 20, "x0")
    return Planner(diffusion=d, denoiser=denoiser or exact_denoiser(d), value=ActionSum(), normalizer=TOY_NORMALIZER,
                   guidance=guidance, planner=planner, returns_condition=returns_condition)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_plan_executes_the_best_of_its_candidates(sampler):
    n, obs = 4, TOY_OBS
    planner = toy_planner(GuidanceConfig(scale=0.0, n_candidates=n), PlannerConfig(sampler=sampler, ddim_steps=4, ddim_eta=1.0))
    plan = planner.plan(obs, generator=torch.Generator().manual_seed(5))
    # the same draws, by hand: every candidate, then the argmax of V per observation
    cond = TOY_NORMALIZER.slice(LAYOUT.state_slice).normalize(torch.from_numpy(obs)).repeat_interleave(n, dim=0)
    candidates = planner.sample(cond, torch.Generator().manual_seed(5)).trajectories.reshape(3, n, 4, 2)
    values = ActionSum()(candidates.reshape(3 * n, 4, 2), None).reshape(3, n)
    best = values.argmax(dim=1)
    assert (values.max(dim=1).values > values.min(dim=1).values).all()  # the choice matters
    assert torch.equal(plan.trajectories, candidates[torch.arange(3), best])
    np.testing.assert_array_equal(plan.values, values.max(dim=1).values.numpy())
    np.testing.assert_array_equal(plan.states[:, 0], obs)


def test_a_candidate_whose_value_is_nan_is_never_the_one_executed():
    class NanForTheBest(torch.nn.Module):  # V = Σ actions, NaN where it is highest
        def forward(self, x, t):
            v = ActionSum()(x, t)
            return torch.where(v == v.reshape(3, -1).max(dim=1).values.repeat_interleave(v.shape[0] // 3), torch.nan, v)

    d = gaussian_diffusion("cosine", 20, "x0")
    planner = Planner(diffusion=d, denoiser=exact_denoiser(d), value=NanForTheBest(), normalizer=TOY_NORMALIZER,
                      guidance=GuidanceConfig(scale=0.0, n_candidates=4), planner=PlannerConfig(sampler="ddim", ddim_steps=4))
    plan = planner.plan(TOY_OBS, generator=torch.Generator().manual_seed(5))
    assert np.isfinite(plan.values).all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_planner_with_a_guidance_scale_plans_higher_values_from_the_same_noise(sampler):
    # The config's guidance reaches the sampler through the planner: same draws, a higher V.
    obs, values = TOY_OBS, {}
    for scale in (0.0, 0.5):
        planner = toy_planner(GuidanceConfig(scale=scale, n_guide_steps=1, t_stopgrad=0),
                              PlannerConfig(sampler=sampler, ddim_steps=4, ddim_eta=1.0))
        plan = planner.plan(obs, generator=torch.Generator().manual_seed(5))
        np.testing.assert_array_equal(plan.states[:, 0], obs)
        values[scale] = ActionSum()(plan.trajectories, None)
    assert (values[0.5] > values[0.0]).all(), values


def test_a_guide_of_your_own_steers_the_plans_in_place_of_the_value_guide():
    # A goal-reaching guide, the planner with no value net: the last planned state moves toward
    # the goal (in normalized units, as the guide sees plans), s_0 stays the observation.
    goal = 2.0

    def closeness(x, t):
        return -(LAYOUT.states(x)[:, -1, 0] - goal) ** 2

    d = gaussian_diffusion("cosine", 20, "x0")
    plans = {}
    for name, guide in (("unguided", None), ("goal", ValueGuide(closeness, scale=0.5, n_steps=2))):
        planner = Planner(diffusion=d, denoiser=exact_denoiser(d), value=None, normalizer=TOY_NORMALIZER,
                          guidance=GuidanceConfig(scale=0.0), planner=PlannerConfig(sampler="ddim", ddim_steps=4),
                          guide=guide)
        plans[name] = planner.plan(TOY_OBS, generator=torch.Generator().manual_seed(5))
        np.testing.assert_array_equal(plans[name].states[:, 0], TOY_OBS)
        assert plans[name].values is None  # V neither guided nor chose them
    distance = {name: (LAYOUT.states(p.trajectories)[:, -1, 0] - goal).abs() for name, p in plans.items()}
    assert (distance["goal"] < distance["unguided"]).all(), distance
    with pytest.raises(ValueError, match="value guidance and candidate selection need a value network"):
        Planner(diffusion=d, denoiser=exact_denoiser(d), value=None, normalizer=TOY_NORMALIZER,
                guidance=GuidanceConfig(scale=0.0, n_candidates=2), planner=PlannerConfig())


# ----- the config reaches the sampler: each option, through Planner ---------------------------

def test_the_guide_takes_its_steps_scale_and_stopgrad_from_the_config():
    planner = toy_planner(GuidanceConfig(scale=0.1, t_stopgrad=5, n_guide_steps=3, scale_grad_by_std=False))
    x = torch.zeros(2, 4, 2)
    assert torch.equal(planner.guide(x, torch.full((2,), 4), lambda y: y), x)  # below t_stopgrad
    guided = planner.guide(x, torch.full((2,), 5), lambda y: y)
    torch.testing.assert_close(LAYOUT.actions(guided), torch.full((2, 4, 1), 0.3))  # 3 steps of 0.1, ∇V = 1


def test_the_guide_at_t0_is_scaled_by_the_clipped_variance_not_zero():
    planner = toy_planner(GuidanceConfig(scale=0.1, n_guide_steps=1, t_stopgrad=0, scale_grad_by_std=True))
    guided = planner.guide(torch.zeros(2, 4, 2), torch.zeros(2, dtype=torch.long), lambda y: y)
    sigma2 = planner.diffusion.posterior_variance[1].item()  # σ_0² = 0 is clipped to σ_1²
    assert sigma2 > 0
    torch.testing.assert_close(LAYOUT.actions(guided), torch.full((2, 4, 1), 0.1 * sigma2))


@pytest.mark.parametrize("eta", [0.0, 0.5, 0.8, 1.0])
def test_the_sampler_takes_ddim_eta_from_the_config(eta):
    planner = toy_planner(GuidanceConfig(scale=0.0), PlannerConfig(sampler="ddim", ddim_steps=4, ddim_eta=eta))
    cond = TOY_NORMALIZER.slice(LAYOUT.state_slice).normalize(torch.from_numpy(TOY_OBS))
    direct = planner.diffusion.ddim_sample_loop(planner.denoiser, cond, n_steps=4, eta=eta,
                                                generator=torch.Generator().manual_seed(0)).trajectories
    assert torch.equal(planner.plan(TOY_OBS, generator=torch.Generator().manual_seed(0)).trajectories, direct)


@pytest.mark.parametrize("steps", [3, 4])
def test_the_sampler_takes_ddim_steps_from_the_config(steps):
    d = gaussian_diffusion("cosine", 20, "x0")
    exact, levels = exact_denoiser(d), []

    def denoiser(x, t):
        levels.append(int(t[0]))
        return exact(x, t)

    toy_planner(GuidanceConfig(scale=0.0), PlannerConfig(sampler="ddim", ddim_steps=steps), denoiser=denoiser).plan(TOY_OBS)
    assert len(levels) == steps


class ActionSumAtZero(torch.nn.Module):
    """V = Σ actions at noise level 0 and −Σ actions at any other: V is trained on noised plans
    with their level, so ranking clean candidates at another level reverses the choice here."""

    def forward(self, x, t):
        v = ActionSum()(x, t)
        return torch.where(t == 0, v, -v)


def test_candidates_are_ranked_by_v_at_noise_level_0():
    d = gaussian_diffusion("cosine", 20, "x0")
    planner = Planner(diffusion=d, denoiser=exact_denoiser(d), value=ActionSumAtZero(), normalizer=TOY_NORMALIZER,
                      guidance=GuidanceConfig(scale=0.0, n_candidates=4), planner=PlannerConfig(sampler="ddim", ddim_steps=4))
    plan = planner.plan(TOY_OBS, generator=torch.Generator().manual_seed(5))
    cond = TOY_NORMALIZER.slice(LAYOUT.state_slice).normalize(torch.from_numpy(TOY_OBS)).repeat_interleave(4, dim=0)
    candidates = planner.sample(cond, torch.Generator().manual_seed(5)).trajectories.reshape(3, 4, 4, 2)
    best = LAYOUT.actions(candidates).sum(dim=(-1, -2)).argmax(dim=1)
    assert torch.equal(plan.trajectories, candidates[torch.arange(3), best])


class LaterStatesSumAtZero(torch.nn.Module):
    """V = Σ states after the first at noise level 0, −Σ at any other: it reads what a model
    rollout changes (which keeps the plan's actions), so it tells the rollout from the plan."""

    def forward(self, x, t):
        v = LAYOUT.states(x)[:, 1:].sum(dim=(-1, -2))
        return torch.where(t == 0, v, -v)


def test_candidates_ranked_by_the_value_of_their_model_rollout_use_v_at_noise_level_0():
    from distdiff.nn.dynamics import model_rollout

    class StepByAction(torch.nn.Module):
        def forward(self, states, actions):
            return states + actions

    d = gaussian_diffusion("cosine", 20, "x0")
    planner = Planner(diffusion=d, denoiser=exact_denoiser(d), value=LaterStatesSumAtZero(), dynamics=StepByAction(),
                      normalizer=TOY_NORMALIZER, guidance=GuidanceConfig(scale=0.0, n_candidates=1),
                      planner=PlannerConfig(sampler="ddim", ddim_steps=4, dynamics_candidates=4, dynamics_rank="value"))
    plan = planner.plan(TOY_OBS, generator=torch.Generator().manual_seed(5))
    cond = TOY_NORMALIZER.slice(LAYOUT.state_slice).normalize(torch.from_numpy(TOY_OBS)).repeat_interleave(4, dim=0)
    candidates = planner.sample(cond, torch.Generator().manual_seed(5)).trajectories
    reached = LAYOUT.states(model_rollout(StepByAction(), candidates, LAYOUT))[:, 1:].sum(dim=(-1, -2)).reshape(3, 4)
    assert torch.equal(plan.trajectories, candidates.reshape(3, 4, 4, 2)[torch.arange(3), reached.argmax(dim=1)])
    # Ranked by the plans' own states, some row would choose another: the test tells the two apart.
    own = LAYOUT.states(candidates)[:, 1:].sum(dim=(-1, -2)).reshape(3, 4)
    assert (own.argmax(dim=1) != reached.argmax(dim=1)).any()


class ReturnEcho(torch.nn.Module):
    """A return-conditioned denoiser that outputs its condition: the return, or -1 when dropped."""

    def forward(self, x, t, returns=None, returns_mask=None):
        r = returns if returns_mask is None else torch.where(returns_mask > 0, returns, torch.full_like(returns, -1.0))
        return r[:, None, None].expand_as(x)


def test_return_conditioning_takes_its_quantile_and_scale_from_the_config():
    planner = toy_planner(GuidanceConfig(scale=0.0, return_quantile=0.8, return_scale=2.0), denoiser=ReturnEcho(),
                          returns_condition=True)
    out = planner.model(torch.zeros(2, 4, 2), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, torch.full((2, 4, 2), -1.0 + 2.0 * (0.8 - -1.0)))  # out_∅ + w·(out_R − out_∅)


def test_evaluating_in_an_env_without_physics_to_replay_needs_measurement_off():
    from distdiff.evaluation import evaluate
    from _helpers import gaussian_normalizer

    cfg = config.load(SMOKE_CONFIG, {"env.id": "Pendulum-v1", "env.obs_dim": 3, "env.act_dim": 1,
                                     "env.max_episode_steps": 12, "eval.episodes": 1, "eval.num_envs": 1})
    normalizer = gaussian_normalizer(layout_of(cfg).transition_dim)
    diffusion, denoiser, value, dynamics = build_models(cfg, normalizer)
    planner = Planner.from_config(cfg, diffusion=diffusion, denoiser=denoiser, value=value, normalizer=normalizer)
    with pytest.raises(ValueError, match="Pendulum-v1'? is not a MuJoCo env.*eval.measure_alignment false"):
        evaluate(planner, cfg)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, measure_alignment=False))
    summary = evaluate(planner, cfg)
    assert summary["episodes"] == 1 and summary["episode_length_mean"] == 12
