"""Evaluation of a planner in the real env: returns, normalized score, alignment error."""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np

import torch

from distdiff.config import Config, alignment_problem, reference_returns
from distdiff.planner import Planner
from distdiff.rollout import (EpisodeResult, alignment_on_states, make_env, mean_alignment_error,
                              per_step_alignment_error, run_episodes, summarize)


class EvaluationStopped(Exception):
    """An evaluation's ``stop`` said so before a plan."""


def held_out_seed(seed: int) -> int:
    """Where to judge a checkpoint that evaluations on ``seed`` chose (a run's ``best.pt``):
    episode i of an evaluation resets with seed + i, so a million seeds on are other episodes.
    On the ones that chose it, it tends to read high (the winner's curse)."""
    return (seed + 1_000_000) % 2**63


def evaluate(planner: Planner, cfg: Optional[Config] = None, *, episodes: Optional[int] = None,
             seed: Optional[int] = None, progress: Optional[Callable[[EpisodeResult], None]] = None,
             stop: Optional[Callable[[], bool]] = None) -> dict:
    """Returns, normalized score, falls and alignment error of ``episodes`` episodes, in the
    env and with the ``eval.*`` settings of ``cfg`` (by default the config the planner was made
    from). ``stop`` is asked before every plan: when it says so, the evaluation raises
    EvaluationStopped (a run that ends while one runs beside it must not leave it playing).

    Episodes are chaotic, and torch's thread count changes their arithmetic: the same planner
    scores as ``launch/evaluate.py`` and the runs' evaluations only under
    ``torch.set_num_threads(cfg.train.num_threads)``."""
    cfg = planner.config if cfg is None else cfg
    if cfg is None:
        raise ValueError("this planner was not made from a config (Planner.from_config): pass the config to judge it with")
    episodes = cfg.eval.episodes if episodes is None else episodes
    if episodes < 1:
        raise ValueError(f"an evaluation needs at least one episode, not {episodes}")
    seed = cfg.eval.seed if seed is None else seed
    n_envs = min(cfg.eval.num_envs, episodes)
    generator = torch.Generator(device=planner.device).manual_seed(seed)

    def plan(obs):
        if stop is not None and stop():
            raise EvaluationStopped("the evaluation was stopped")
        return planner.plan(obs, generator=generator)

    check_measurable(cfg)
    envs, shadows = [], [] if cfg.eval.measure_alignment else None
    try:
        # In the try: an env that fails to build must not leave the ones before it open.
        for _ in range(n_envs):
            envs.append(make_env(cfg.env.id, cfg.env.max_episode_steps))
            if shadows is not None:
                shadows.append(make_env(cfg.env.id))
        results = run_episodes(
            plan,
            envs,
            n_episodes=episodes,
            execution=cfg.planner.execution,
            horizon=cfg.model.horizon,
            replan_every=cfg.planner.replan_every,
            seed=seed,
            state_normalizer=planner.state_normalizer,
            shadows=shadows,
            progress=progress,
        )
    finally:
        for env in envs + (shadows or []):
            env.close()
    own_guide = getattr(planner, "guide", None) is not None and not getattr(planner, "guided_by_value", True)
    return summary_of(results, cfg, own_guide=own_guide)


def check_measurable(cfg: Config) -> None:
    """Refuses an evaluation asked to measure the alignment error in an env that cannot replay plans."""
    problem = alignment_problem(cfg.env.id) if cfg.eval.measure_alignment else ""
    if problem:
        raise ValueError(f"{problem}; set eval.measure_alignment false to judge without it")


def summary_of(results: List[EpisodeResult], cfg: Config, *, own_guide: bool = False) -> dict:
    """An evaluation's summary of its episodes (:func:`distdiff.rollout.summarize`), scored
    against the config's reference returns (:func:`distdiff.config.reference_returns`), which it
    names, with the guidance scale it planned with (None under a guide of your own, which the
    config's scale does not describe)."""
    references = reference_returns(cfg)
    summary = summarize(results, *references)
    # The scale the score is on: runs of other envs, or given eval.reference_returns, differ.
    summary["reference_returns"] = None if references[0] is None else list(references)
    summary["guidance_scale"] = None if own_guide else cfg.guidance.scale
    return summary


def alignment_on_observations(planner: Planner, cfg: Config, observations: np.ndarray, *, seed: Optional[int] = None) -> dict:
    """Alignment error of one plan from each of the given observations (e.g. states drawn from
    the offline data): planners compared on the same states, whatever states their own
    episodes would reach."""
    seed = cfg.eval.seed if seed is None else seed
    generator = torch.Generator(device=planner.device).manual_seed(seed)
    shadow = make_env(cfg.env.id)
    try:
        errors = alignment_on_states(lambda obs: planner.plan(obs, generator=generator), shadow,
                                     np.asarray(observations), planner.state_normalizer)
    finally:
        shadow.close()
    # Per horizon step first, as an evaluation averages (a one-step error from a state at the
    # velocity clip is NaN, and left out of its step).
    compounded, one_step = per_step_alignment_error(errors.compounded), per_step_alignment_error(errors.one_step)
    return {"alignment_error": mean_alignment_error(compounded), "alignment_error_per_step": compounded.tolist(),
            "one_step_error": float(np.nanmean(one_step)),  # (transitions 0→1 to H-2→H-1: no step 0 here)
            "one_step_error_per_step": one_step.tolist(), "states": int(len(observations))}

