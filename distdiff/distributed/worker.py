"""Rollout worker: a CPU copy of the planner and a few envs, executing plans for real.

Kept light on imports (torch, gymnasium, numpy): many of these run on one machine.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import mujoco
import numpy as np
import torch

from distdiff.config import from_dict
from distdiff.distributed.messages import RolloutResult, Weights, WorkerState
from distdiff.models import build_models
from distdiff.normalizer import Normalizer
from distdiff.provenance import check_same_code
from distdiff.planner import Planner
from distdiff.rollout import EpisodeResult, make_env, run_episodes, stream_seed
from distdiff.training import load_weights

log = logging.getLogger(__name__)


class NoWeights(RuntimeError):
    """A rollout asked of a worker that holds no weights yet. The driver hands every worker
    weights before its first rollout, so this is a worker whose process Ray restarted while
    it had no task running: a restart the driver did not see."""


class WeightsNotLoaded(RuntimeError):
    """A rollout asked of a worker whose last ``set_weights`` failed, in its own process (a
    bug, or weights that do not fit its nets): nets loaded half-way plan with no version's
    weights, and a failure in the worker's process is not a restart."""


# What an env that went wrong raises: MuJoCo's fatal errors (a simulation it cannot go on with,
# mujoco.FatalError is not a RuntimeError), and Gymnasium's checks of what it is given.
ENV_ERRORS = (RuntimeError, ValueError, FloatingPointError, mujoco.FatalError)


class PlanError(Exception):
    """The planner raised: a bug or broken weights, which rebuilding the envs cannot fix."""


class Acting:
    """A planner with nets of its own, the envs it plans for and, to measure its plans, their
    shadows (which replay a plan's actions). A worker's rollouts have one; its evaluations get
    another on the first: they run in another thread beside the rollouts (see ``evaluate``), and
    weights loaded or envs rebuilt under a thread's feet would corrupt its episodes."""

    def __init__(self, cfg, normalizer: Normalizer, n_envs: int, *, shadows: bool = True):
        self.cfg, self.n_envs, self.with_shadows = cfg, n_envs, shadows
        models = build_models(cfg, normalizer)
        self.nets = models.nets()
        for net in self.nets.values():
            net.eval().requires_grad_(False)
        self.planner = Planner.from_config(cfg, diffusion=models.diffusion, denoiser=models.denoiser, value=models.value,
                                           dynamics=models.dynamics, normalizer=normalizer)
        self.version = -1  # of the weights it holds; -1 before any
        self.make_envs()

    def load(self, published: Weights) -> None:
        self.version = -1  # until loaded whole: nets loaded half-way hold no version's weights
        load_weights(self.nets, published.weights)
        self.version = int(published.version)

    def make_envs(self) -> None:
        env = self.cfg.env
        self.envs = [make_env(env.id, env.max_episode_steps) for _ in range(self.n_envs)]
        self.shadows = [make_env(env.id) for _ in range(self.n_envs)] if self.with_shadows else None

    def close_envs(self) -> None:
        for env in self.envs + (self.shadows or []):
            env.close()


class RolloutWorker:
    def __init__(self, *, config: Dict[str, object], normalizer: Dict[str, object], worker_id: int,
                 driver_code: Optional[Tuple[str, str]] = None, measure: bool = True):
        """``measure``: rollouts measure their plans' alignment error (``online.measure_every``),
        in shadow envs of their own; a collection, which keeps only the episodes, makes none."""
        check_same_code(driver_code)
        cfg = from_dict(config)
        torch.set_num_threads(1)
        # load_flat_weights silences this warning inside warnings.catch_warnings, which is not
        # thread-safe: an evaluation loading weights beside set_weights could leave the process's
        # filters without it. Silenced here for the whole process, whatever filters either
        # thread restores hold it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.cfg = cfg
        self.worker_id = worker_id
        self.normalizer = Normalizer.from_state_dict(normalizer)
        self.measure = measure
        self.acting = Acting(cfg, self.normalizer, cfg.online.envs_per_actor, shadows=measure)
        self.judging: Optional[Acting] = None  # the evaluations' own, made by the first
        self.tasks = 0
        self.load_failure: Optional[str] = None  # why the last set_weights failed; None if it did not

    def close(self) -> None:
        """Close the envs (a worker that Ray kills needs none of this)."""
        for acting in (self.acting, self.judging):
            if acting is not None:
                acting.close_envs()

    def set_weights(self, published: Weights) -> int:
        if published.version > self.acting.version:
            try:
                self.acting.load(published)
            except Exception as e:  # (raised again) the driver's broadcast does not wait to see it
                self.load_failure = f"weights version {published.version} failed to load: {type(e).__name__}: {e}"
                raise
            self.load_failure = None
        return self.acting.version

    def _seed(self, task: int, attempt: int = 0, seed: Optional[int] = None) -> int:
        # Independent streams per (run seed, worker, task), or per given seed, and per retry.
        if seed is not None:
            return stream_seed(seed, attempt)
        return stream_seed(self.cfg.train.seed, self.worker_id, task, attempt)

    def rollout(self, task: Optional[int] = None, *, max_steps: Optional[int] = None,
                n_envs: Optional[int] = None, seed: Optional[int] = None) -> RolloutResult:
        """One episode per env with the current weights; the real trajectories and their stats.
        ``task`` numbers the rollout within the run and seeds it (default: this worker's own
        count, which restarts with the process), together with the run's seed and this worker's
        id; ``seed`` seeds it instead, the same on any worker. The driver's share of what is
        left of an env-step budget: only the first ``n_envs`` envs run, and their episodes end
        (truncated) after ``max_steps`` steps."""
        acting = self.acting
        if acting.version < 0:
            if self.load_failure is not None:
                raise WeightsNotLoaded(self.load_failure)
            raise NoWeights("rollout before set_weights: a worker must never plan with random weights")
        task = self.tasks if task is None else task
        self.tasks += 1
        version = acting.version
        results, rebuilds = self._rebuilding(acting, lambda attempt: self._run(
            acting, self._seed(task, attempt, seed), n_envs=n_envs, max_steps=max_steps,
            measure_every=self.cfg.online.measure_every if self.measure else None))
        errors = [r.plan_errors for r in results if len(r.plan_errors)]
        return RolloutResult(
            worker_id=self.worker_id,
            version=version,
            episodes=[r.episode for r in results],
            returns=[r.episode.episode_return for r in results],
            lengths=[len(r.episode) for r in results],
            plan_errors=np.concatenate(errors) if errors else np.zeros((0, self.cfg.model.horizon)),
            env_steps=int(sum(len(r.episode) for r in results)),
            env_rebuilds=rebuilds,
            example=next((r.last_check for r in results if r.last_check is not None), None),
        )

    def evaluate(self, first: int, n_episodes: int, *, seed: int, weights: Weights) -> List[EpisodeResult]:
        """Episodes ``first`` to ``first + n_episodes - 1`` of an evaluation of ``weights`` on
        ``seed``, with the ``eval.*`` settings of this worker's config: episode i resets with
        seed + i, as in :func:`distdiff.evaluation.evaluate`, so the same episodes start from
        the same states however they are split between workers; the sampler draws from the
        stream of ``first``. Run by a planner and ``eval.num_envs`` envs of its own, made on
        the first call, so that it may run beside a rollout (Ray's actor runs it in a thread
        of its own: ``distdiff.distributed.actors``) and leaves the rollouts' weights as they
        were."""
        if self.judging is None:
            self.judging = Acting(self.cfg, self.normalizer, self.cfg.eval.num_envs,
                                  shadows=self.cfg.eval.measure_alignment)
        judging = self.judging
        if n_episodes > len(judging.envs):
            raise ValueError(f"{n_episodes} episodes asked of a worker with {len(judging.envs)} evaluation envs "
                             f"(eval.num_envs)")
        # Every task: a memcpy of ~6 MB beside the episodes, and no version that two different
        # evaluations could share.
        judging.load(weights)
        results, _ = self._rebuilding(judging, lambda attempt: self._run(
            judging, stream_seed(seed, first, attempt), n_envs=n_episodes, first_reset=seed + first,
            measure_every=1 if self.cfg.eval.measure_alignment else None))
        return results

    def _rebuilding(self, acting: Acting, run: Callable[[int], List[EpisodeResult]]) -> Tuple[List[EpisodeResult], int]:
        """``run(0)``, or, when an env of ``acting`` failed, ``run(1)`` on its rebuilt envs (with
        its other draws: on one thread the same ones would fail the same way); its results and
        the rebuilds."""
        try:
            return run(0), 0
        except ENV_ERRORS as e:
            # An env that failed must not kill the worker.
            log.warning("worker %d: env failed (%s); rebuilding envs", self.worker_id, e)
            acting.close_envs()
            acting.make_envs()
            return run(1), 1

    def _run(self, acting: Acting, seed: int, *, n_envs: Optional[int], measure_every: Optional[int],
             max_steps: Optional[int] = None, first_reset: Optional[int] = None) -> List[EpisodeResult]:
        """One episode on each of the first ``n_envs`` envs of ``acting`` (all by default), its
        sampler seeded by ``seed``, the envs reset from ``first_reset`` (default: ``seed``);
        every ``measure_every``-th plan's alignment error measured (None: none)."""
        generator = torch.Generator().manual_seed(seed)

        def plan(obs):
            try:
                return acting.planner.plan(obs, generator=generator)
            except Exception as e:
                # Not one of the env failures rollout() rebuilds the envs for.
                raise PlanError(f"worker {self.worker_id}: the planner failed: {e!r}") from e

        return run_episodes(
            plan,
            acting.envs,
            n_episodes=len(acting.envs) if n_envs is None else min(n_envs, len(acting.envs)),
            execution=self.cfg.planner.execution,
            horizon=self.cfg.model.horizon,
            replan_every=self.cfg.planner.replan_every,
            seed=seed if first_reset is None else first_reset,
            state_normalizer=acting.planner.state_normalizer,
            shadows=None if measure_every is None else acting.shadows,
            measure_every=measure_every or 1,
            max_steps=max_steps,
        )

    def ping(self) -> WorkerState:
        return WorkerState(worker_id=self.worker_id, version=self.acting.version, tasks=self.tasks)
