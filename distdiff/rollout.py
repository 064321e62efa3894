"""Executing plans in real MuJoCo envs, and measuring how well plans match reality.

The alignment error of a plan is the per-step RMSE, in normalized state units, between its
states and the states reached by executing its actions from the same start. It is measured
in a shadow copy of the env set to the real env's physics state, so the real episode is not
disturbed and receding-horizon plans are judged over their whole horizon.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional

import gymnasium as gym
import numpy as np

from distdiff.data.episodes import Episode
from distdiff.data.minari_io import env_family
from distdiff.normalizer import Normalizer
from distdiff.planner import EXECUTIONS, Plan

PlanFn = Callable[[np.ndarray], Plan]


class NonFinitePlan(Exception):
    """A planner returned NaN or infinite actions. MuJoCo runs them as zero torque with a
    warning, in the episode and in the shadow replay alike, so they would pass for a plan with a
    finite alignment error. Not an env failure: a worker does not rebuild its envs for it."""


class PlanCheck(NamedTuple):
    """One plan beside what its actions really did: for plan-vs-real figures."""

    planned_states: np.ndarray  # [H, obs_dim]
    planned_actions: np.ndarray  # [H, act_dim]
    reached_states: np.ndarray  # [H, obs_dim], past a fall too (replay_actions)


class EpisodeResult(NamedTuple):
    episode: Episode
    plan_errors: np.ndarray  # [n_measured_plans, H] RMSE per horizon step
    n_plans: int
    last_check: Optional[PlanCheck]  # the episode's latest measured plan (one in measure_every)
    seed: int  # the env's reset seed


def make_env(env_id: str, max_episode_steps: Optional[int] = None) -> gym.Env:
    return gym.make(env_id, max_episode_steps=max_episode_steps)


def can_replay(env: gym.Env) -> bool:
    """Whether plans can be replayed in a shadow copy of ``env`` (:func:`replay_actions`): only
    MuJoCo envs expose their physics state and let it be set."""
    unwrapped = env.unwrapped
    return all(hasattr(unwrapped, name) for name in ("data", "set_state", "_get_obs"))


def physics_state(env: gym.Env):
    data = env.unwrapped.data
    return data.qpos.copy(), data.qvel.copy()


def solver_warmstart(env: gym.Env) -> np.ndarray:
    """The accelerations MuJoCo's constraint solver starts ``env``'s next step from (its last
    step's): part of the state a replay must copy to step as the env would."""
    return env.unwrapped.data.qacc_warmstart.copy()


def replay_actions(shadow: gym.Env, qpos, qvel, actions: np.ndarray, *, warmstart: Optional[np.ndarray] = None,
                   observation: Optional[np.ndarray] = None) -> np.ndarray:
    """States reached by executing ``actions`` from (qpos, qvel), one per action.

    ``warmstart``: the env's :func:`solver_warmstart` at that state (None: none, as after a
    reset); the shadow's own, left by its last replay, moved its replays ~1e-13 off the env's
    steps, by what it had replayed before. ``observation``: the env's observation there, the
    first state reached; an env that observes forces (Ant's contacts) computes them only as it
    steps, and the shadow's were those of its last replay.

    Past a termination too: the physics goes on where the env's episode would end (on Walker2d,
    the walker lies on the floor), so a plan whose actions make it fall is judged at every step.
    Left out after a fall, a plan's later steps, its largest errors, counted for nothing: of two
    planners, the one whose plans fell read as the better aligned."""
    env = shadow.unwrapped
    env.set_state(qpos, qvel)
    env.data.qacc_warmstart[:] = 0.0 if warmstart is None else warmstart
    reached = np.empty((len(actions), env.observation_space.shape[0]))
    reached[0] = env._get_obs() if observation is None else observation
    low, high = env.action_space.low, env.action_space.high
    for j in range(1, len(actions)):
        reached[j] = env.step(np.clip(actions[j - 1], low, high))[0]
    return reached


# Gymnasium's Walker2d and Hopper (v4, v5) observe qvel clipped to ±10: a state at the clip has
# an unknown velocity, so the physics cannot restart from it. HalfCheetah and the other MuJoCo
# envs observe it whole (a running HalfCheetah's is past 10 in half its states).
OBSERVED_VELOCITY_CLIPS = {"Walker2d": 10.0, "Hopper": 10.0}


def observed_velocity_clip(env_id: str) -> float:
    """The bound of the velocities ``env_id``'s observations show (inf: not clipped)."""
    return OBSERVED_VELOCITY_CLIPS.get(env_family(env_id), math.inf)


def observed_positions(env: gym.Env) -> Optional[int]:
    """How many positions a Gymnasium MuJoCo locomotion env observes (``nq - 1``), where its
    observation is qpos without the forward position, then qvel (Walker2d, Hopper, HalfCheetah):
    those :func:`physics_state_from_observation` reads; None for other envs."""
    model = getattr(env.unwrapped, "model", None)
    if model is None or env.observation_space.shape != (model.nq - 1 + model.nv,):
        return None
    return model.nq - 1


def physics_state_from_observation(env: gym.Env, observation: np.ndarray):
    """(qpos, qvel) of a Gymnasium MuJoCo locomotion env whose observation is qpos without the
    forward position, then qvel (Walker2d, Hopper, HalfCheetah). The forward position changes
    neither dynamics nor observation, so 0 stands in for it. Walker2d and Hopper clip observed
    velocities at ±10: from an observation at the clip the velocity is not known."""
    model = env.unwrapped.model
    observation = np.asarray(observation, np.float64)
    if observation.shape != (model.nq - 1 + model.nv,):
        raise ValueError(f"{env.spec.id if env.spec else env}: observations of shape {observation.shape} are not "
                         f"qpos[1:] + qvel ({model.nq - 1} + {model.nv}); cannot set the physics from them")
    return np.concatenate([[0.0], observation[:model.nq - 1]]), observation[model.nq - 1:].copy()


class StateAlignment(NamedTuple):
    """Alignment errors of one plan per given state."""

    compounded: np.ndarray  # [N, H]: executing the plan's actions from s_0, as everywhere else
    one_step: np.ndarray  # [N, H-1]: s_{j+1} against one step of a_j from the planned s_j


def alignment_on_states(plan_fn: PlanFn, shadow: gym.Env, observations: np.ndarray, state_normalizer: Normalizer,
                        batch_size: int = 64) -> StateAlignment:
    """Alignment errors of one plan from each given state: the same states for every planner
    compared, unlike an evaluation's, which depend on where each planner walks.

    The one-step error restarts the physics from every planned state, so it separates plans
    whose transitions the dynamics cannot make from small errors that chaos compounds; it is
    NaN for a planned state whose velocity is at the observation clip. Given states at the clip
    are refused: the plans' actions could not be executed from the state they were planned from.
    """
    clip = observed_velocity_clip(shadow.spec.id)
    at_clip = [i for i, o in enumerate(observations)
               if np.abs(physics_state_from_observation(shadow, o)[1]).max() >= clip]
    if at_clip:
        raise ValueError(f"{len(at_clip)} of {len(observations)} states (the first: index {at_clip[0]}) have a "
                         f"velocity at the observation clip (±{clip:g}), from which the physics cannot restart; "
                         f"leave them out")
    compounded, one_step = [], []
    for i in range(0, len(observations), batch_size):
        obs = observations[i:i + batch_size]
        plan = plan_fn(obs)
        for k, o in enumerate(obs):
            reached = replay_actions(shadow, *physics_state_from_observation(shadow, o), plan.actions[k], observation=o)
            compounded.append(alignment_errors(plan.states[k], reached, state_normalizer))
            stepped = np.full_like(plan.states[k][1:], np.nan, dtype=np.float64)
            for j, s in enumerate(plan.states[k][:-1]):
                qpos, qvel = physics_state_from_observation(shadow, s)
                if np.abs(qvel).max() < clip:
                    stepped[j] = replay_actions(shadow, qpos, qvel, plan.actions[k][j:j + 2])[1]
            one_step.append(alignment_errors(plan.states[k][1:], stepped, state_normalizer))
    return StateAlignment(np.array(compounded), np.array(one_step))


def alignment_errors(planned: np.ndarray, reached: np.ndarray, state_normalizer: Normalizer) -> np.ndarray:
    """RMSE per horizon step between planned and reached states, in normalized units."""
    diff = state_normalizer.normalize(np.asarray(planned, np.float64)) - state_normalizer.normalize(np.asarray(reached, np.float64))
    return np.sqrt(np.mean(diff**2, axis=-1))


def per_step_alignment_error(errors) -> np.ndarray:
    """The mean per horizon step (last axis) of plans' alignment errors over every plan. A NaN
    (a one-step error from a state at the velocity clip) is left out of its step, and a step with
    none but NaN stays NaN."""
    e = np.asarray(errors, dtype=np.float64)
    e = e.reshape(-1, e.shape[-1])
    # Counted by hand, not np.nanmean, whose all-NaN warning only warnings.catch_warnings could
    # silence: not thread-safe, and a run's evaluation thread summarizes beside its loop.
    measured = np.isfinite(e)
    count = measured.sum(axis=0)
    return np.where(count > 0, np.where(measured, e, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)


def mean_alignment_error(per_step) -> float:
    """The alignment error of plans, from its mean per horizon step: averaged over steps 1 to H-1,
    leaving out steps that are NaN (no plan measured there); NaN when all are. Step 0 is the
    conditioning state, which every plan starts at exactly; averaged in, its 0 would only scale the
    figure by (H-1)/H."""
    per_step = np.asarray(per_step, np.float64)
    informative = per_step[1:] if len(per_step) > 1 else per_step
    finite = informative[np.isfinite(informative)]
    return float(finite.mean()) if finite.size else float("nan")


def run_episodes(
    plan_fn: PlanFn,
    envs: List[gym.Env],
    *,
    n_episodes: int,
    execution: str,
    horizon: int,
    replan_every: int,
    seed: int,
    state_normalizer: Optional[Normalizer] = None,
    shadows: Optional[List[gym.Env]] = None,
    measure_every: int = 1,
    max_steps: Optional[int] = None,
    progress: Optional[Callable[[EpisodeResult], None]] = None,
) -> List[EpisodeResult]:
    """Run ``n_episodes`` over the given envs, all active envs planned in one batch.

    ``execution``: ``open_loop`` executes each plan's ``horizon`` actions (the seed's Alg. 2),
    ``receding`` replans every ``replan_every`` steps. Episode ``i`` resets with seed
    ``seed + i``. With ``shadows`` (one per env) every ``measure_every``-th plan's alignment
    error is measured. With ``max_steps`` an episode still running after that many steps ends
    there, truncated, as if the env's time limit were that short. Returned in seed order.
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"unknown execution mode {execution!r}; choose one of {list(EXECUTIONS)}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps_per_plan = horizon if execution == "open_loop" else replan_every
    n = len(envs)
    obs = [None] * n
    traj = [None] * n
    plans = [None] * n
    cursor = np.zeros(n, dtype=int)
    plans_made = np.zeros(n, dtype=int)
    errors: List[list] = [[] for _ in range(n)]
    checks: List[Optional[PlanCheck]] = [None] * n
    seeds = [0] * n
    started = 0
    results: List[EpisodeResult] = []

    def start(i):
        nonlocal started
        seeds[i] = seed + started
        o, _ = envs[i].reset(seed=seeds[i])
        started += 1
        obs[i] = o
        traj[i] = {"obs": [o], "act": [], "rew": []}
        plans[i], cursor[i], plans_made[i], errors[i], checks[i] = None, 0, 0, [], None

    active = []
    for i in range(min(n, n_episodes)):
        start(i)
        active.append(i)
    while active:
        need = [i for i in active if plans[i] is None or cursor[i] >= steps_per_plan]
        if need:
            plan = plan_fn(np.stack([obs[i] for i in need]))
            # States too: a plan whose states are not finite would drop out of the alignment
            # error (its mean leaves out what is not finite) and flatter the planner.
            bad = ~(np.isfinite(plan.actions).reshape(len(need), -1).all(axis=1)
                    & np.isfinite(plan.states).reshape(len(need), -1).all(axis=1))
            if bad.any():
                raise NonFinitePlan(f"the planner returned NaN or infinite actions or states for {int(bad.sum())} "
                                    f"of {len(need)} observations")
            for k, i in enumerate(need):
                plans[i] = (plan.states[k], plan.actions[k])
                cursor[i] = 0
                if shadows is not None and state_normalizer is not None and plans_made[i] % measure_every == 0:
                    reached = replay_actions(shadows[i], *physics_state(envs[i]), plan.actions[k],
                                             warmstart=solver_warmstart(envs[i]), observation=obs[i])
                    errors[i].append(alignment_errors(plan.states[k], reached, state_normalizer))
                    checks[i] = PlanCheck(plan.states[k], plan.actions[k], reached)
                plans_made[i] += 1
        still = []
        for i in active:
            env = envs[i]
            action = np.clip(plans[i][1][cursor[i]], env.action_space.low, env.action_space.high)
            o, r, terminated, truncated, _ = env.step(action)
            cursor[i] += 1
            obs[i] = o
            traj[i]["obs"].append(o)
            traj[i]["act"].append(action)
            traj[i]["rew"].append(r)
            truncated = truncated or (max_steps is not None and len(traj[i]["rew"]) >= max_steps)
            if terminated or truncated:
                ep = Episode(np.array(traj[i]["obs"]), np.array(traj[i]["act"]), np.array(traj[i]["rew"]),
                             bool(terminated), bool(truncated and not terminated), seed=int(seeds[i]))
                err = np.array(errors[i]) if errors[i] else np.zeros((0, horizon))
                result = EpisodeResult(ep, err, int(plans_made[i]), checks[i], seeds[i])
                results.append(result)
                if progress is not None:
                    progress(result)
                if started < n_episodes:
                    start(i)
                    still.append(i)
            else:
                still.append(i)
        active = still
    # In seed order, not in the order they ended (falls first): what a caller keeps of them
    # must not depend on how soon each fell.
    return sorted(results, key=lambda r: r.seed)


def stream_seed(seed: int, *key: int) -> int:
    """A 63-bit seed of its own for each ``key`` under ``seed`` (a worker, a task, a retry):
    rollouts of a long run draw thousands, which 31 bits would repeat, and keys kept apart from
    the seed (``[0, 1, 2]`` and ``[2**32, 2]`` are one list of 32-bit words)."""
    # (int first: NumPy 1.x has no type for a uint64 shifted by a Python int)
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]) >> 1


def random_episodes(env: gym.Env, n_episodes: int, seed: int, progress=None) -> List[Episode]:
    """Uniform random actions; episode ``e`` resets with seed ``seed + e`` and draws its actions
    from a stream of that seed's own, so that episodes collected in parallel tasks are those of
    one call."""
    out = []
    for e in range(n_episodes):
        # Not seed + e itself: gymnasium makes both generators alike from a seed, so the first
        # actions would be the reset's noise scaled, and a model could read a_0..a_2 off s_0.
        env.action_space.seed(stream_seed(seed + e, 1))
        o, _ = env.reset(seed=seed + e)
        obs, act, rew = [o], [], []
        while True:
            a = env.action_space.sample()
            o, r, terminated, truncated, _ = env.step(a)
            obs.append(o)
            act.append(a)
            rew.append(r)
            if terminated or truncated:
                break
        out.append(Episode(np.array(obs), np.array(act), np.array(rew), bool(terminated), bool(truncated and not terminated),
                           seed=seed + e))
        if progress is not None:
            progress(out[-1])
    return out


def random_episodes_in(env_id: str, max_episode_steps: Optional[int], n_episodes: int, seed: int,
                       progress=None) -> List[Episode]:
    """:func:`random_episodes` in an env of their own, closed after."""
    env = make_env(env_id, max_episode_steps)
    try:
        return random_episodes(env, n_episodes, seed, progress)
    finally:
        env.close()


def standard_error(values: np.ndarray) -> Optional[float]:
    """The standard error of the mean of ``values``: their sample standard deviation (n − 1,
    where ``return_std`` is the population's) over √n; None for fewer than two."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def summarize(results: List[EpisodeResult], ref_min=None, ref_max=None) -> dict:
    from distdiff.data.minari_io import normalized_score

    # Seed order, not completion order: per-episode figures of two planners judged on the same
    # seeds then line up.
    results = sorted(results, key=lambda r: r.seed)
    returns = np.array([r.episode.episode_return for r in results])
    lengths = [len(r.episode) for r in results]
    errs = [r.plan_errors for r in results if len(r.plan_errors)]
    per_step = per_step_alignment_error(np.concatenate(errs)) if errs else None
    score = normalized_score(returns, ref_min, ref_max)
    return {
        "episodes": len(results),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        # How far the mean may be from the planner's own (episode noise only, not a training
        # seed's): two evaluations some standard errors apart may differ by that noise alone.
        "return_se": standard_error(returns),
        "normalized_score": None if score is None else float(score.mean()),
        "normalized_score_se": None if score is None else standard_error(score),
        "episode_length_mean": float(np.mean(lengths)),
        # Episodes cut short by the env's termination (on Walker2d: a fall), not by its time limit.
        "terminations": int(sum(bool(r.episode.terminated) for r in results)),
        "episode_returns": [float(v) for v in returns],
        "episode_lengths": lengths,
        "alignment_error": None if per_step is None else mean_alignment_error(per_step),
        "alignment_error_per_step": None if per_step is None else [float(v) for v in per_step],
    }
