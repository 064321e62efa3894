"""The alignment error: zero for a plan that the dynamics really produce, positive otherwise,
measured from physics states rebuilt from observations alone (velocities inside the
observation's ±10 clip)."""
from __future__ import annotations

from unittest import mock
from types import SimpleNamespace

import mujoco
import numpy as np
import pytest
import torch

from _helpers import gaussian_normalizer, make_trainer
from distdiff import config, evaluation
from distdiff.data.episodes import Episode
from distdiff.data.minari_io import normalized_score, reference_scores
from distdiff.planner import Plan
from distdiff.rollout import (EpisodeResult, StateAlignment, alignment_errors,
                              alignment_on_states, make_env, physics_state, physics_state_from_observation,
                              observed_velocity_clip, per_step_alignment_error, random_episodes, replay_actions,
                              run_episodes, stream_seed, summarize)

H = 8


@pytest.fixture(scope="module")
def walker():
    env = make_env("Walker2d-v5")
    yield env
    env.close()


def walk(env, actions):
    """Observations after each action, or None if the walker falls on the way (these tests plan
    from healthy states)."""
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


def test_only_the_envs_that_clip_observed_velocities_refuse_states_past_the_clip():
    # HalfCheetah observes its velocities whole: half of a running one's states are past 10, and
    # refusing them skewed the benchmark's shared states toward slow ones.
    assert observed_velocity_clip("Walker2d-v5") == observed_velocity_clip("Hopper-v4") == 10.0
    assert observed_velocity_clip("HalfCheetah-v5") == np.inf
    for env_id, refused in (("HalfCheetah-v5", False), ("Hopper-v5", True)):
        env = make_env(env_id)
        try:
            start, _ = env.reset(seed=0)
            fast = start.copy()
            fast[env.unwrapped.model.nq - 1] = 12.0  # the forward velocity
            act_dim = env.action_space.shape[0]

            def still(obs):
                n = len(obs)
                return Plan(states=np.repeat(obs[:, None], H, axis=1), actions=np.zeros((n, H, act_dim)), values=None,
                            trajectories=torch.zeros(0))

            normalizer = gaussian_normalizer(len(start))
            if refused:
                with pytest.raises(ValueError, match=r"observation clip \(±10\)"):
                    alignment_on_states(still, env, fast[None], normalizer)
            else:
                measured = alignment_on_states(still, env, fast[None], normalizer)
                assert np.isfinite(measured.compounded).all() and np.isfinite(measured.one_step).all()
        finally:
            env.close()


def test_a_plan_the_dynamics_produce_has_no_alignment_error(walker):
    starts, states, actions = walker_rollouts(5, seed=0)
    exact = alignment_on_states(replaying(starts, states, actions), walker, starts, gaussian_normalizer(17), batch_size=2)
    assert exact.compounded.shape == (5, H) and exact.one_step.shape == (5, H - 1)
    np.testing.assert_allclose(exact.compounded, 0.0, atol=1e-9)
    n_pos = walker.unwrapped.model.nq - 1
    # unknown velocity: no restart from there
    clipped = np.abs(states[:, :-1, n_pos:]).max(axis=2) >= observed_velocity_clip("Walker2d-v5")
    assert clipped.any() and not clipped.all()  # these random rollouts have both kinds
    assert np.isnan(exact.one_step[clipped]).all()
    np.testing.assert_allclose(exact.one_step[~clipped], 0.0, atol=1e-9)

    def offset(planned):
        planned[:, 1:] += 0.5
        return planned

    off = alignment_on_states(replaying(starts, states, actions, edit=offset), walker, starts, gaussian_normalizer(17)).compounded
    np.testing.assert_allclose(off[:, 0], 0.0, atol=1e-9)  # s_0 is the given state
    np.testing.assert_allclose(off[:, 1:], 0.5, atol=1e-9)  # RMSE of a 0.5 offset on every dim

    # A given state at the clip could not be restarted from: refused, not scored.
    fast = np.concatenate([starts, states[:, :-1][clipped][:1]])
    with pytest.raises(ValueError, match="1 of 6 states .* velocity at the observation clip"):
        alignment_on_states(replaying(starts, states, actions), walker, fast, gaussian_normalizer(17))


def test_one_step_error_blames_only_the_transitions_into_and_out_of_a_wrong_state(walker):
    j = H // 2
    positions = slice(1, walker.unwrapped.model.nq)  # joint angles and heights: physics restarts from them

    def wrong_state(planned):
        planned[:, j, positions] += 0.05
        return planned

    starts, states, actions = walker_rollouts(3, seed=1)
    errors = alignment_on_states(replaying(starts, states, actions, edit=wrong_state), walker, starts, gaussian_normalizer(17))
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
                                 seed=0, state_normalizer=gaussian_normalizer(17), shadows=shadows, measure_every=2)
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
    assert mean_alignment_error([0.0, 0.2, float("nan")]) == pytest.approx(0.2)  # no plan measured there


# ----- executing plans: which actions run, how episodes end, in what order -------------------

def constant_plan(action):
    """Plans that hold the given states, with every action = ``action`` (a number or [H] per step)."""
    per_step = np.broadcast_to(np.asarray(action, np.float64).reshape(-1, 1), (H, 6))

    def plan_fn(obs):
        n = len(obs)
        return Plan(states=np.repeat(obs[:, None], H, axis=1), actions=np.repeat(per_step[None], n, axis=0).copy(),
                    values=None, trajectories=torch.zeros(n, H, 23))
    return plan_fn


def run_on(plan_fn, limits, **kw):
    envs = [make_env("Walker2d-v5", max_episode_steps=m) for m in limits]
    shadows = [make_env("Walker2d-v5") for _ in limits] if kw.get("state_normalizer") is not None else None
    try:
        return run_episodes(plan_fn, envs, shadows=shadows, **kw)
    finally:
        for env in envs + (shadows or []):
            env.close()


def test_a_plan_with_nan_actions_is_refused_not_run_as_zero_torque():
    from distdiff.rollout import NonFinitePlan

    with pytest.raises(NonFinitePlan, match="NaN or infinite actions or states for 2 of 2 observations"):
        run_on(constant_plan([0.5] * (H - 1) + [np.nan]), [12, 12], n_episodes=2, execution="receding", horizon=H,
               replan_every=4, seed=0)


def test_a_plan_with_infinite_states_is_refused_not_left_out_of_the_alignment_error():
    from distdiff.rollout import NonFinitePlan

    finite = constant_plan(0.5)

    def plan_fn(obs):
        plan = finite(obs)
        plan.states[-1, -1, 0] = np.inf  # the last plan's last state
        return plan

    with pytest.raises(NonFinitePlan, match="for 1 of 2 observations"):
        run_on(plan_fn, [12, 12], n_episodes=2, execution="receding", horizon=H, replan_every=4, seed=0,
               state_normalizer=gaussian_normalizer(17))


def test_the_mean_per_step_leaves_out_only_what_was_not_measured():
    errors = np.array([[0.0, 1.0, np.nan], [0.0, 3.0, np.nan], [0.0, np.nan, np.nan]])
    per_step = per_step_alignment_error(errors)
    np.testing.assert_array_equal(per_step[:2], [0.0, 2.0])
    assert np.isnan(per_step[2])  # no plan measured there
    np.testing.assert_array_equal(per_step_alignment_error(errors.reshape(3, 1, 3)), per_step)  # (any leading axes)


def test_replay_goes_on_past_a_fall_as_the_physics_does():
    # A plan is judged at every step: left out after a fall, the later (largest) errors of plans
    # that fall counted for nothing, and a planner whose plans fell read as the better aligned.
    env, free = make_env("Walker2d-v5"), make_env("Walker2d-v5")
    try:
        env.reset(seed=0)
        qpos, qvel = physics_state(env)
        qpos[1] = 0.5  # torso below Walker2d's healthy height: the first step terminates
        actions = np.random.default_rng(0).uniform(-1, 1, size=(6, 6))
        reached = replay_actions(env, qpos, qvel, actions)
        free.reset(seed=0)
        free.unwrapped.set_state(qpos, qvel)
        stepped = [free.unwrapped.step(a)[:3] for a in actions[:-1]]
    finally:
        env.close()
        free.close()
    assert stepped[0][2]  # it fell at once
    np.testing.assert_array_equal(reached[1:], np.stack([obs for obs, _, _ in stepped]))
    assert np.isfinite(reached).all() and len(np.unique(reached[1:, 0])) == 5  # it kept moving


@pytest.mark.parametrize("env_id", ["Walker2d-v5", "Ant-v5"])
def test_a_plan_of_what_the_env_will_do_has_no_alignment_error_at_all(env_id):
    # The shadow kept its solver's warm start from its last replay (MuJoCo starts each step's
    # solve from the last step's accelerations): its replays drifted ~1e-13 off the real env, by
    # what it had replayed before. And at step 0 it observed Ant's contact forces as its own last
    # replay left them: set_state does not compute them again.
    env, shadow, oracle = make_env(env_id, max_episode_steps=40), make_env(env_id), make_env(env_id)
    rng = np.random.default_rng(0)
    full = mujoco.mjtState.mjSTATE_INTEGRATION
    act_dim = env.action_space.shape[0]

    def plan_fn(obs):
        # What the env will do: its whole integration state copied into the oracle, then stepped.
        real, sim = env.unwrapped, oracle.unwrapped
        state = np.empty(mujoco.mj_stateSize(real.model, full))
        mujoco.mj_getState(real.model, real.data, state, full)
        mujoco.mj_setState(sim.model, sim.data, state, full)
        actions = rng.uniform(-0.3, 0.3, size=(H, act_dim))
        states = [obs[0]] + [sim.step(a)[0] for a in actions[:-1]]
        return Plan(states=np.stack(states)[None], actions=actions[None], values=None,
                    trajectories=torch.zeros(1, H, len(obs[0]) + act_dim))

    try:
        (result,) = run_episodes(plan_fn, [env], shadows=[shadow], n_episodes=1, execution="open_loop", horizon=H,
                                 replan_every=H, seed=0, state_normalizer=gaussian_normalizer(len(env.reset()[0])))
    finally:
        for e in (env, shadow, oracle):
            e.close()
    assert len(result.plan_errors) == 5  # one shadow, replaying after its own replays
    np.testing.assert_array_equal(result.plan_errors, 0.0)


def test_the_alignment_error_is_an_rmse_in_normalized_units():
    norm = gaussian_normalizer(4, shift=5.0, scale=2.0)
    planned = np.array([[5.0, 5, 5, 5], [6, 6, 6, 6], [7, 5, 5, 5]])
    reached = np.full((3, 4), 5.0)
    # raw differences 0, 1 on every dim, 2 on one dim -> normalized 0, 0.5, 1 on one dim of 4
    np.testing.assert_allclose(alignment_errors(planned, reached, norm), [0.0, 0.5, 0.5])


@pytest.mark.parametrize("execution, per_plan", [("open_loop", H), ("receding", 3)])
def test_each_plan_executes_its_own_actions_from_the_first(execution, per_plan):
    ramp = 0.05 * np.arange(H)  # a_j = 0.05 j: which planned action ran is readable from the record
    (result,) = run_on(constant_plan(ramp), [2 * H], n_episodes=1, execution=execution, horizon=H, replan_every=3, seed=0)
    n = len(result.episode)
    assert n == 2 * H and not result.episode.terminated
    expected = np.tile(ramp[:per_plan], 2 * H // per_plan + 1)[:n]
    np.testing.assert_allclose(result.episode.actions[:, 0], expected, atol=1e-6)
    assert result.n_plans == -(-n // per_plan)


def test_the_check_kept_is_the_last_measured_plan():
    # (The plan-vs-real figure's: mid-episode, not only the plan made at a reset.)
    (result,) = run_on(constant_plan(0.0), [12], n_episodes=1, execution="receding", horizon=H, replan_every=4, seed=0,
                    state_normalizer=gaussian_normalizer(17))
    assert result.n_plans == 3 and len(result.plan_errors) == 3
    # planned from, and executed from, the state it was made at: the third plan, at step 8
    np.testing.assert_allclose(result.last_check.planned_states[0], result.episode.observations[8], atol=1e-6)
    np.testing.assert_allclose(result.last_check.reached_states[0], result.episode.observations[8], atol=1e-6)


def test_a_fall_on_the_last_allowed_step_is_a_termination_not_a_truncation():
    # Full negative torque makes the walker fall on step 6 from seed 0.
    (free,) = run_on(constant_plan(-1.0), [100], n_episodes=1, execution="receding", horizon=H, replan_every=4, seed=0)
    k = len(free.episode)
    assert free.episode.terminated and k < 100
    for limits, max_steps in (([k], None), ([100], k)):  # the env's time limit, or run_episodes' max_steps
        (cut,) = run_on(constant_plan(-1.0), limits, n_episodes=1, execution="receding", horizon=H, replan_every=4,
                     seed=0, max_steps=max_steps)
        assert len(cut.episode) == k
        assert cut.episode.terminated and not cut.episode.truncated


def test_episodes_come_back_in_seed_order_and_no_more_than_asked():
    # env 0 runs seed 7 for 10 steps; env 1 runs seed 8 (3 steps) then seed 9: completion order 8, 9, 7
    results = run_on(constant_plan(0.0), [10, 3], n_episodes=3, execution="receding", horizon=H, replan_every=4, seed=7)
    assert [r.seed for r in results] == [7, 8, 9]
    assert [len(r.episode) for r in results] == [10, 3, 3]
    # more envs than episodes: only the episodes asked for
    assert [r.seed for r in run_on(constant_plan(0.0), [3, 3], n_episodes=1, execution="receding", horizon=H,
                                  replan_every=4, seed=7)] == [7]


def test_random_episodes_are_seeded_per_episode_and_flag_falls_and_time_limits():
    limit = 20
    env = make_env("Walker2d-v5", limit)
    try:
        episodes = random_episodes(env, 8, seed=0)
        split = random_episodes(env, 3, seed=0) + random_episodes(env, 5, seed=3)  # as parallel tasks collect them
        starts = [env.reset(seed=e)[0] for e in range(8)]
        init_qpos = env.unwrapped.init_qpos.copy()
    finally:
        env.close()
    for ep, start in zip(episodes, starts):
        np.testing.assert_array_equal(ep.observations[0], start.astype(np.float32))  # episode e resets with seed + e
    for a, b in zip(episodes, split, strict=True):  # and draws its actions by it: the same however split
        np.testing.assert_array_equal(a.actions, b.actions)
    # From a stream of its own: gymnasium seeds the action space's generator and the reset's
    # alike, and the reset's uniform noise on qpos[1:6] (obs[0:5], ±0.005) would be a_0[1:6] scaled.
    for ep in episodes:
        noise = (ep.observations[0, :5] - init_qpos[1:6]) / 0.005
        assert not np.allclose(ep.actions[0, 1:6], noise, atol=1e-3)
    assert {ep.terminated for ep in episodes} == {True, False}, "the fixture must hold falls and time limits"
    for ep in episodes:
        assert ep.terminated != ep.truncated  # a fall, or the time limit, never both
        assert len(ep) == limit if ep.truncated else len(ep) <= limit


# ----- the summary of an evaluation ------------------------------------------------------------

def result(seed, length, fell, errors=None, cut=False):
    ep = Episode(np.zeros((length + 1, 17)), np.zeros((length, 6)), np.full(length, float(seed)), fell,
                 not fell and not cut)
    return EpisodeResult(ep, np.zeros((0, 3)) if errors is None else np.array(errors, float), 1, None, seed)


def test_the_summary_counts_falls_not_time_limits():
    summary = summarize([result(1, 3, True), result(2, 9, False), result(3, 9, False)])
    assert summary["terminations"] == 1


def test_the_summary_averages_alignment_per_step_over_every_episodes_plans():
    summary = summarize([result(1, 5, False, [[0.0, 1.0, 1.0]]), result(2, 5, True, [[0.0, 3.0, np.nan]])])
    np.testing.assert_allclose(summary["alignment_error_per_step"], [0.0, 2.0, 1.0])
    assert summary["alignment_error"] == pytest.approx(1.5)  # steps 1 and 2; step 0 left out


def test_the_summary_scores_the_mean_return_between_the_references():
    summary = summarize([result(s, n, False) for s, n in ((10, 9), (11, 9), (12, 3), (13, 4))], ref_min=10.0,
                        ref_max=210.0)
    # returns 90, 99, 36, 52
    assert summary["normalized_score"] == pytest.approx(100 * (np.mean([90, 99, 36, 52]) - 10) / 200)
    # Their standard errors: the sample standard deviation over √n, the score's in its own units.
    se = np.std([90, 99, 36, 52], ddof=1) / 2
    assert summary["return_se"] == pytest.approx(se) and summary["normalized_score_se"] == pytest.approx(se / 2)
    alone = summarize([result(10, 9, False)], ref_min=10.0, ref_max=210.0)
    assert alone["return_se"] is None and alone["normalized_score_se"] is None  # one episode: none to give


# ----- distdiff.evaluation: the config and seeds reach the episodes --------------------------

class StubPlanner:
    device = "cpu"
    state_normalizer = None

    def __init__(self):
        self.generators = []

    def plan(self, obs, generator=None):
        self.generators.append(generator)
        return constant_plan(0.0)(obs)


def eval_cfg(**overrides):
    return config.load(None, {"model.horizon": 8, "planner.execution": "receding", "planner.replan_every": 2,
                              "eval.episodes": 2, "eval.num_envs": 2, "eval.seed": 5, "eval.measure_alignment": False,
                              **overrides})


def test_evaluate_runs_the_configured_execution_with_the_given_seed(monkeypatch):
    seen = {}

    def fake_run_episodes(plan, envs, **kw):
        seen.update(kw)
        plan(np.zeros((len(envs), 17)))
        return [result(kw["seed"] + i, 9, False) for i in range(kw["n_episodes"])]

    monkeypatch.setattr(evaluation, "run_episodes", fake_run_episodes)
    planner = StubPlanner()
    summary = evaluation.evaluate(planner, eval_cfg(), seed=11)
    assert (seen["seed"], seen["execution"], seen["replan_every"], seen["horizon"], seen["n_episodes"]) == \
        (11, "receding", 2, 8, 2)
    assert planner.generators[0] is not None and planner.generators[0].initial_seed() == 11
    returns = np.array([11.0 * 9, 12.0 * 9])
    assert summary["normalized_score"] == pytest.approx(normalized_score(returns, *reference_scores("Walker2d-v5")).mean())
    with pytest.raises(ValueError, match="at least one episode"):
        evaluation.evaluate(planner, eval_cfg(), episodes=0)
    # The config's own references, where it gives some, in place of D4RL's.
    assert summary["reference_returns"] == [1.629008, 4592.3]
    summary = evaluation.evaluate(planner, eval_cfg(**{"eval.reference_returns": "10,210"}), seed=11)
    assert summary["normalized_score"] == pytest.approx(100 * (returns.mean() - 10) / 200)
    assert summary["reference_returns"] == [10.0, 210.0]


def test_alignment_on_observations_averages_per_step_and_seeds_its_sampler(monkeypatch):
    def fake_alignment_on_states(plan_fn, shadow, observations, state_normalizer):
        plan_fn(observations)
        return StateAlignment(compounded=np.array([[0.0, 1.0, 2.0], [0.0, 3.0, np.nan]]),
                              one_step=np.array([[1.0, 4.0], [3.0, np.nan]]))

    monkeypatch.setattr(evaluation, "alignment_on_states", fake_alignment_on_states)
    planner = StubPlanner()
    out = evaluation.alignment_on_observations(planner, eval_cfg(), np.zeros((2, 17)), seed=3)
    assert out["alignment_error_per_step"] == [0.0, 2.0, 2.0] and out["alignment_error"] == pytest.approx(2.0)
    assert out["one_step_error_per_step"] == [2.0, 4.0] and out["one_step_error"] == pytest.approx(3.0)
    assert planner.generators[0].initial_seed() == 3


def test_stream_seeds_are_63_bit_and_apart_for_every_key():
    # A long run draws tens of thousands of rollout seeds: 31 bits would repeat some of them.
    seeds = {stream_seed(0, 1, task) for task in range(2000)}
    assert len(seeds) == 2000 and max(seeds) >= 2**40 and max(seeds) < 2**63
    # The run's seed and the key are kept apart, as one list of 32-bit words would not.
    assert stream_seed(0, 1, 2) != stream_seed(2**32 + 0, 2) and stream_seed(0, 1) != stream_seed(1, 0)
    assert stream_seed(7, 3, 4) == stream_seed(7, 3, 4)


def test_best_pt_is_judged_on_other_episodes_within_the_seeds_range():
    from distdiff.evaluation import held_out_seed

    # Episode i resets with seed + i: a million on, no evaluation of a run reaches them.
    assert held_out_seed(10_000) == 1_010_000
    assert 0 <= held_out_seed(2**63 - 1) < 2**63  # (the config's range of eval.seed)


def test_walker2d_reference_scores_are_d4rls():
    # The normalized score every Walker2d result is reported in (Fu et al. 2020's random and expert).
    assert reference_scores("Walker2d-v5") == (1.629008, 4592.3)
    assert normalized_score(4592.3, *reference_scores("Walker2d-v5")) == pytest.approx(100.0)


def test_a_score_with_either_reference_missing_is_none():
    assert normalized_score(100.0, None, 4592.3) is None
    assert normalized_score(100.0, 1.6, None) is None


def test_the_summarys_return_std_is_the_episodes_population_std():
    summary = summarize([result(10, 1, False), result(20, 1, False), result(60, 1, False)])  # returns 10, 20, 60
    assert summary["return_std"] == pytest.approx(np.std([10.0, 20.0, 60.0]))  # ddof 0; return_se has ddof 1


@pytest.fixture(scope="module")
def worker_trainer(tiny_episodes):
    trainer, _ = make_trainer(tiny_episodes[:4])
    return trainer


def _plain_worker(trainer, worker_id=0, measure=True, **overrides):
    from distdiff.distributed.messages import Weights
    from distdiff.distributed.worker import RolloutWorker

    cfg = config.from_dict({"online": {"envs_per_actor": 2}, **overrides}, trainer.cfg)
    worker = RolloutWorker(config=cfg.to_dict(), normalizer=trainer.normalizer.state_dict(), worker_id=worker_id,
                           measure=measure)
    worker.set_weights(Weights(version=1, weights=trainer.weights()))
    return worker


def test_a_rollout_measures_only_every_nth_plan_of_an_episode(worker_trainer):
    # Each measured plan costs H shadow env steps.
    worker = _plain_worker(worker_trainer, online={"envs_per_actor": 2, "measure_every": 10**9})
    try:
        result = worker.rollout(0, max_steps=13)  # plans at steps 0, 4, 8, 12 of each episode
    finally:
        worker.close()
    assert min(result.lengths) > 4, "the test needs episodes of more than one plan"
    assert result.plan_errors.shape[0] == len(result.episodes)  # each episode's first plan only


def test_a_worker_that_only_collects_measures_no_plan_and_makes_no_shadow_envs(worker_trainer):
    # A collection keeps only the episodes: it replayed every episode's first plan, in shadow
    # envs made for it, and threw the errors away.
    worker = _plain_worker(worker_trainer, measure=False)
    try:
        result = worker.rollout(0, max_steps=5)
        assert worker.acting.shadows is None
    finally:
        worker.close()
    assert len(result.episodes) == 2 and result.plan_errors.shape == (0, worker_trainer.cfg.model.horizon)
    assert result.example is None


def test_a_worker_keeps_the_newer_weights_it_holds(worker_trainer):
    # Weights arriving out of order (a restarted worker handed the newest, then an older
    # broadcast still queued for it) must not take it back a version.
    from distdiff.distributed.messages import Weights

    worker = _plain_worker(worker_trainer)
    try:
        newer = {name: flat.copy() for name, flat in worker_trainer.weights().items()}
        assert worker.set_weights(Weights(version=2, weights=newer)) == 2
        older = {name: np.zeros_like(flat) for name, flat in newer.items()}
        assert worker.set_weights(Weights(version=1, weights=older)) == 2
        held = torch.nn.utils.parameters_to_vector(worker.acting.nets["denoiser"].parameters())
        assert bool(held.abs().sum() > 0)
    finally:
        worker.close()


def test_workers_counting_their_own_tasks_roll_out_other_episodes(worker_trainer):
    # rollout() without a task numbers it by the worker's own count, 0 on every worker: their
    # ids must set them apart, or all of them would collect the same episodes.
    def starts(worker_id):
        worker = _plain_worker(worker_trainer, worker_id=worker_id)
        try:
            return np.stack([ep.observations[0] for ep in worker.rollout(max_steps=2).episodes])
        finally:
            worker.close()

    assert not np.array_equal(starts(0), starts(1))


def test_runs_with_other_seeds_roll_out_other_episodes(worker_trainer):
    # Replicates of a sweep (a train.seed each) would otherwise collect the same episodes.
    def starts(seed):
        worker = _plain_worker(worker_trainer, train={"seed": seed})
        try:
            return np.stack([ep.observations[0] for ep in worker.rollout(3, max_steps=2).episodes])
        finally:
            worker.close()

    assert np.array_equal(starts(0), starts(0)) and not np.array_equal(starts(0), starts(1))


@pytest.mark.parametrize("error", [mujoco.FatalError("mj_stackAlloc"), FloatingPointError("overflow"),
                                   ValueError("bad action")])
def test_an_env_failure_of_any_kind_is_retried_from_draws_no_other_rollout_uses(worker_trainer, error):
    # The retry's episodes must be new ones: the next task's draws would be stored twice.
    worker = _plain_worker(worker_trainer)
    seeds, run = [], worker._run

    def fails_first(acting, seed, **kwargs):
        seeds.append(seed)
        if len(seeds) == 1:
            raise error
        return run(acting, seed, **kwargs)

    try:
        with mock.patch.object(worker, "_run", side_effect=fails_first):
            result = worker.rollout(3, max_steps=3)
    finally:
        worker.close()
    assert result.env_rebuilds == 1 and len(seeds) == 2
    assert seeds[1] not in {worker._seed(task) for task in range(64)}


def test_an_evaluation_reports_the_guidance_scale_it_planned_with_unless_the_guide_is_the_callers(monkeypatch):
    # eval.json and metrics.json name the scale; a value-guided run's must not read None.
    from distdiff import evaluation

    monkeypatch.setattr(evaluation, "run_episodes",
                        lambda plan, envs, **kw: [result(kw["seed"] + i, 9, False) for i in range(kw["n_episodes"])])
    cfg = eval_cfg(**{"guidance.scale": 0.3})
    planner = StubPlanner()
    assert evaluation.evaluate(planner, cfg)["guidance_scale"] == 0.3  # unguided planner object
    planner.guide, planner.guided_by_value = object(), True
    assert evaluation.evaluate(planner, cfg)["guidance_scale"] == 0.3
    planner.guided_by_value = False  # a guide of the caller's own
    assert evaluation.evaluate(planner, cfg)["guidance_scale"] is None


def test_an_evaluation_whose_env_fails_rebuilds_its_own_envs_not_the_rollouts(worker_trainer):
    from distdiff.distributed.messages import Weights

    worker = _plain_worker(worker_trainer, eval={"num_envs": 2, "measure_alignment": False})
    weights = Weights(version=1, weights=worker_trainer.weights())
    try:
        worker.evaluate(0, 1, seed=5, weights=weights)  # (builds the evaluation's envs)
        broken, rollout_envs = worker.judging.envs[0], list(worker.acting.envs)
        broken.step = mock.Mock(side_effect=ValueError("bad action"))  # fails for good
        results = worker.evaluate(0, 1, seed=5, weights=weights)
        assert len(results) == 1 and broken not in worker.judging.envs
        assert worker.acting.envs == rollout_envs  # a rollout beside it keeps its envs
        with mock.patch.object(worker.judging, "close_envs", wraps=worker.judging.close_envs) as closed:
            worker.close()
        closed.assert_called_once()  # the evaluation's envs too
    finally:
        worker.close()


def _bare_worker(n_envs=3, measure_alignment=True):
    """A RolloutWorker with only what evaluate() reads, its evaluation envs made, its _run
    recording its arguments."""
    from distdiff.distributed.worker import RolloutWorker

    worker = RolloutWorker.__new__(RolloutWorker)
    worker.worker_id = 0
    worker.cfg = config.from_dict({"eval": {"measure_alignment": measure_alignment}})
    worker.judging = SimpleNamespace(envs=[object()] * n_envs, load=lambda weights: None)
    calls = []
    worker._run = lambda acting, seed, **kw: calls.append((seed, kw)) or ["episode"] * kw["n_envs"]
    return worker, calls


# worker.evaluate: the sampler's stream is the first episode's and each env resets from
# eval.seed + its episode (mutants: stream_seed(seed, 0, ...), first_reset=seed, n_episodes check
# off by one, no measure when measure_alignment).
def test_a_workers_evaluation_seeds_its_stream_and_resets_by_its_first_episode():
    from distdiff.distributed.messages import Weights
    from distdiff.rollout import stream_seed

    held = Weights(version=1, weights={})
    worker, calls = _bare_worker()
    assert worker.evaluate(3, 2, seed=50, weights=held) == ["episode"] * 2
    seed, kw = calls[0]
    assert seed == stream_seed(50, 3, 0) != stream_seed(50, 0, 0)
    assert kw["first_reset"] == 53 and kw["n_envs"] == 2 and kw["measure_every"] == 1
    with pytest.raises(ValueError, match="4 episodes asked of a worker with 3 evaluation envs"):
        worker.evaluate(0, 4, seed=50, weights=held)
    unmeasured, calls = _bare_worker(measure_alignment=False)
    unmeasured.evaluate(0, 1, seed=50, weights=held)
    assert calls[0][1]["measure_every"] is None


# evaluation.evaluate / check_measurable: an env that cannot replay plans is refused before any env
# is built when the alignment error is asked for, and not otherwise (mutants: the call dropped from
# evaluate(); the measure_alignment condition inverted).
def test_evaluate_refuses_an_env_without_physics_before_building_one(monkeypatch):
    from distdiff import evaluation

    monkeypatch.setattr(evaluation, "alignment_problem", lambda env_id: f"env.id {env_id!r} is not a MuJoCo env")
    monkeypatch.setattr(evaluation, "make_env", lambda *a, **k: pytest.fail("an env was built"))
    cfg = config.from_dict({"eval": {"measure_alignment": True}})
    with pytest.raises(ValueError, match="is not a MuJoCo env; set eval.measure_alignment false"):
        evaluation.evaluate(SimpleNamespace(device="cpu", config=cfg), cfg, episodes=1)
    evaluation.check_measurable(config.from_dict({"eval": {"measure_alignment": False}}))
