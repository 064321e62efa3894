"""The alignment error: zero for a plan that the dynamics really produce, positive otherwise,
measured from physics states rebuilt from observations alone (velocities inside the
observation's ±10 clip)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distdiff.normalizer import Normalizer
from distdiff.planner import Plan
from distdiff.rollout import OBSERVED_VELOCITY_CLIP, alignment_on_states, make_env, physics_state_from_observation

H = 8


@pytest.fixture(scope="module")
def walker():
    env = make_env("Walker2d-v5")
    yield env
    env.close()


def unit_normalizer(dim):
    return Normalizer(kind="gaussian", shift=np.zeros(dim), scale=np.ones(dim), clip_min=-1e6 * np.ones(dim),
                      clip_max=1e6 * np.ones(dim))


def walk(env, actions):
    """Observations after each action, or None if the walker falls on the way: the replay leaves
    NaN after a termination, so such a sequence cannot be a plan the dynamics produce."""
    seen = []
    for a in actions:
        obs, _, fell, _, _ = env.step(a)
        if fell:
            return None
        seen.append(obs)
    return seen


def real_rollouts(env, n, seed):
    """n start observations, each with H random actions and the states they really reach.

    Every action comes from ``rng``: an unseeded action space made CI fail now and then."""
    rng = np.random.default_rng(seed)
    n_act = env.action_space.shape[0]
    starts, states, actions = [], [], []
    attempt = seed
    while len(starts) < n:
        env.reset(seed=attempt)
        attempt += 1
        # start mid-episode, with a nonzero velocity
        warmup = walk(env, rng.uniform(-0.3, 0.3, size=(int(rng.integers(1, 30)), n_act)))
        if warmup is None or np.abs(warmup[-1][8:]).max() >= 10.0:  # Walker2d clips observed velocities at ±10
            continue
        acts = rng.uniform(-0.3, 0.3, size=(H, n_act))
        reached = walk(env, acts[:-1])
        if reached is None:
            continue
        starts.append(warmup[-1])
        states.append(np.array([warmup[-1], *reached]))
        actions.append(acts)
    return np.array(starts), np.array(states), np.array(actions)


def test_physics_state_from_an_observation_reproduces_it(walker):
    obs, _ = walker.reset(seed=3)
    walker.action_space.seed(3)
    for _ in range(10):
        obs, *_ = walker.step(walker.action_space.sample())
    qpos, qvel = physics_state_from_observation(walker, obs)
    walker.unwrapped.set_state(qpos, qvel)
    np.testing.assert_allclose(walker.unwrapped._get_obs(), obs, atol=1e-12)
    with pytest.raises(ValueError, match="qpos"):
        physics_state_from_observation(walker, obs[:-1])


def walker_rollouts(n, seed):
    env = make_env("Walker2d-v5")
    try:
        return real_rollouts(env, n, seed=seed)
    finally:
        env.close()


def replaying(starts, states, actions, edit=lambda planned: planned):
    """A plan function that returns each start's real rollout as its plan, its states first
    passed through ``edit``."""
    lookup = {tuple(s): k for k, s in enumerate(starts)}

    def plan_fn(obs):
        idx = [lookup[tuple(o)] for o in obs]
        return Plan(states=edit(states[idx].copy()), actions=actions[idx], values=None, trajectories=torch.zeros(0))

    return plan_fn


def test_a_plan_the_dynamics_produce_has_no_alignment_error(walker):
    starts, states, actions = walker_rollouts(5, seed=0)
    exact = alignment_on_states(replaying(starts, states, actions), walker, starts, unit_normalizer(17), batch_size=2)
    assert exact.compounded.shape == (5, H) and exact.one_step.shape == (5, H - 1)
    np.testing.assert_allclose(exact.compounded, 0.0, atol=1e-9)
    n_pos = walker.unwrapped.model.nq - 1
    # unknown velocity: no restart from there
    clipped = np.abs(states[:, :-1, n_pos:]).max(axis=2) >= OBSERVED_VELOCITY_CLIP
    assert clipped.any() and not clipped.all()  # these random rollouts have both kinds
    assert np.isnan(exact.one_step[clipped]).all()
    np.testing.assert_allclose(exact.one_step[~clipped], 0.0, atol=1e-9)

    def offset(planned):
        planned[:, 1:] += 0.5
        return planned

    off = alignment_on_states(replaying(starts, states, actions, edit=offset), walker, starts, unit_normalizer(17)).compounded
    np.testing.assert_allclose(off[:, 0], 0.0, atol=1e-9)  # s_0 is the given state
    np.testing.assert_allclose(off[:, 1:], 0.5, atol=1e-9)  # RMSE of a 0.5 offset on every dim

    # A given state at the clip could not be restarted from: refused, not scored.
    fast = np.concatenate([starts, states[:, :-1][clipped][:1]])
    with pytest.raises(ValueError, match="1 of 6 states .* velocity at the observation clip"):
        alignment_on_states(replaying(starts, states, actions), walker, fast, unit_normalizer(17))


def test_one_step_error_blames_only_the_transitions_into_and_out_of_a_wrong_state(walker):
    j = H // 2
    positions = slice(1, walker.unwrapped.model.nq)  # joint angles and heights: physics restarts from them

    def wrong_state(planned):
        planned[:, j, positions] += 0.05
        return planned

    starts, states, actions = walker_rollouts(3, seed=1)
    errors = alignment_on_states(replaying(starts, states, actions, edit=wrong_state), walker, starts, unit_normalizer(17))
    wrong = np.sqrt(0.05**2 * 8 / 17)  # RMSE of the offset on 8 of 17 dims
    np.testing.assert_allclose(errors.one_step[:, j - 1], wrong, atol=1e-9)  # the step into s_j reaches the true s_j
    assert (errors.one_step[:, j] > 1e-3).all()  # the step out of it starts from the wrong physics
    others = np.delete(errors.one_step, [j - 1, j], axis=1)
    np.testing.assert_allclose(others, 0.0, atol=1e-9)
    # executed from s_0, the actions still reach the true states: only s_j itself is off
    np.testing.assert_allclose(np.delete(errors.compounded, j, axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(errors.compounded[:, j], wrong, atol=1e-9)


def still(obs):
    """A plan that holds every joint still from the given states."""
    n = len(obs)
    return Plan(states=np.repeat(obs[:, None], H, axis=1), actions=np.zeros((n, H, 6)), values=None,
                trajectories=torch.zeros(n, H, 23))


def test_a_summary_lists_episodes_in_seed_order_and_counts_the_falls(walker):
    from distdiff.data.episodes import Episode
    from distdiff.rollout import EpisodeResult, run_episodes, summarize

    envs = [make_env("Walker2d-v5", max_episode_steps=5) for _ in range(2)]
    try:
        results = run_episodes(still, envs, n_episodes=3, execution="receding", horizon=H, replan_every=4, seed=7)
    finally:
        for env in envs:
            env.close()
    assert sorted(r.seed for r in results) == [7, 8, 9]

    def result(seed, length, fell):
        ep = Episode(np.zeros((length + 1, 17)), np.zeros((length, 6)), np.full(length, float(seed)), fell, not fell)
        return EpisodeResult(ep, np.zeros((0, H)), 1, None, seed)

    # completion order: a fall ends an episode early, so it comes back before its elders
    summary = summarize([result(12, 3, True), result(10, 9, False), result(13, 4, True), result(11, 9, False)])
    assert summary["terminations"] == 2
    assert summary["episode_lengths"] == [9, 9, 3, 4]
    assert summary["episode_returns"] == [90.0, 99.0, 36.0, 52.0]
    assert summary["episode_length_mean"] == 6.25


def test_max_steps_cuts_episodes_as_a_shorter_time_limit_would(walker):
    from distdiff.rollout import run_episodes

    envs = [make_env("Walker2d-v5", max_episode_steps=50) for _ in range(2)]
    try:
        cut = run_episodes(still, envs, n_episodes=2, execution="receding", horizon=H, replan_every=4, seed=3,
                           max_steps=7)
        whole = run_episodes(still, envs, n_episodes=2, execution="receding", horizon=H, replan_every=4, seed=3)
        with pytest.raises(ValueError, match="max_steps"):
            run_episodes(still, envs, n_episodes=1, execution="receding", horizon=H, replan_every=4, seed=3, max_steps=0)
    finally:
        for env in envs:
            env.close()
    assert [len(r.episode) for r in cut] == [7, 7]
    assert all(r.episode.truncated and not r.episode.terminated for r in cut)
    # The cut episodes are the first steps of the uncut ones: the same seeds, the same states.
    by_seed = {r.seed: r.episode for r in whole}
    for r in cut:
        np.testing.assert_array_equal(r.episode.observations, by_seed[r.seed].observations[:8])


@pytest.mark.parametrize("execution, plans", [("open_loop", 3), ("receding", 5)])
def test_each_plan_runs_its_steps_clipped_and_every_nth_plan_is_measured(execution, plans):
    from distdiff.rollout import run_episodes

    def pushing(obs):  # actions outside the action space ([-1, 1]), states where the walker starts
        plan = still(obs)
        return plan._replace(actions=np.full_like(plan.actions, 5.0))

    envs, shadows = ([make_env("Walker2d-v5", max_episode_steps=20)] for _ in range(2))
    try:
        (result,) = run_episodes(pushing, envs, n_episodes=1, execution=execution, horizon=H, replan_every=4,
                                 seed=0, state_normalizer=unit_normalizer(17), shadows=shadows, measure_every=2)
    finally:
        for env in envs + shadows:
            env.close()
    assert len(result.episode) == 20 and not result.episode.terminated  # H = 8 or 4 steps a plan, 20 in all
    assert result.n_plans == plans
    np.testing.assert_array_equal(result.episode.actions, 1.0)  # what the env executed, and was recorded
    errors = result.plan_errors
    assert errors.shape == ((plans + 1) // 2, H)  # plans 0, 2, 4, ...
    np.testing.assert_allclose(errors[:, 0], 0.0, atol=1e-6)  # the plan starts at the real state
    assert (errors[:, 1:] > 0).all()  # full torque moves the walker, the plans hold it still


def test_the_alignment_error_of_plans_leaves_out_their_exact_start():
    from distdiff.rollout import mean_alignment_error

    # Step 0 is the conditioning state, 0 in every plan: it must not dilute the mean.
    assert mean_alignment_error([0.0, 0.2, 0.4]) == pytest.approx(0.3)
    assert mean_alignment_error([0.0, 0.2, float("nan")]) == pytest.approx(0.2)  # every plan fell by then
