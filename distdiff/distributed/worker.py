"""Rollout worker: a CPU copy of the planner and a few envs, executing plans for real.

Kept light on imports (torch, gymnasium, numpy): many of these run on one machine.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import mujoco
import numpy as np
import torch

from distdiff.config import from_dict
from distdiff.distributed.messages import RolloutResult, Weights, WorkerState
from distdiff.models import build_models
from distdiff.normalizer import Normalizer
from distdiff.provenance import check_same_code
from distdiff.planner import Planner
from distdiff.rollout import make_env, run_episodes, stream_seed
from distdiff.training import load_weights

log = logging.getLogger(__name__)


class NoWeights(RuntimeError):
    """A rollout asked of a worker that holds no weights yet. The driver hands every worker
    weights before its first rollout, so this is a worker whose process Ray restarted while
    it had no task running: a restart the driver did not see."""


# What an env that went wrong raises: MuJoCo's fatal errors (a simulation it cannot go on with,
# mujoco.FatalError is not a RuntimeError), and Gymnasium's checks of what it is given.
ENV_ERRORS = (RuntimeError, ValueError, FloatingPointError, mujoco.FatalError)


class PlanError(Exception):
    """The planner raised: a bug or broken weights, which rebuilding the envs cannot fix."""


class RolloutWorker:
    def __init__(self, *, config: Dict[str, object], normalizer: Dict[str, object], worker_id: int,
                 driver_code: Optional[Tuple[str, str]] = None):
        check_same_code(driver_code)
        cfg = from_dict(config)
        torch.set_num_threads(1)
        self.cfg = cfg
        self.worker_id = worker_id
        self.normalizer = Normalizer.from_state_dict(normalizer)
        models = build_models(cfg, self.normalizer)
        self.nets = models.nets()
        for net in self.nets.values():
            net.eval().requires_grad_(False)
        self.planner = Planner.from_config(cfg, diffusion=models.diffusion, denoiser=models.denoiser, value=models.value,
                                           dynamics=models.dynamics,
                                           normalizer=self.normalizer)
        self.version = -1
        self.tasks = 0
        self._make_envs()

    def _make_envs(self) -> None:
        n = self.cfg.online.envs_per_actor
        self.envs = [make_env(self.cfg.env.id, self.cfg.env.max_episode_steps) for _ in range(n)]
        self.shadows = [make_env(self.cfg.env.id) for _ in range(n)]

    def _close_envs(self) -> None:
        for env in self.envs + self.shadows:
            env.close()

    def set_weights(self, published: Weights) -> int:
        if published.version > self.version:
            load_weights(self.nets, published.weights)
            self.version = int(published.version)
        return self.version

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
        if self.version < 0:
            raise NoWeights("rollout before set_weights: a worker must never plan with random weights")
        task = self.tasks if task is None else task
        self.tasks += 1
        version = self.version
        rebuilds = 0
        try:
            results = self._run(self._seed(task, seed=seed), max_steps, n_envs)
        except ENV_ERRORS as e:
            # An env that failed must not kill the worker: rebuild the envs and run the task once
            # more, from other draws (on one thread the same ones would fail the same way).
            log.warning("worker %d: env failed (%s); rebuilding envs", self.worker_id, e)
            rebuilds = 1
            self._close_envs()
            self._make_envs()
            results = self._run(self._seed(task, attempt=1, seed=seed), max_steps, n_envs)
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

    def _run(self, seed: int, max_steps: Optional[int], n_envs: Optional[int]):
        generator = torch.Generator().manual_seed(seed)

        def plan(obs):
            try:
                return self.planner.plan(obs, generator=generator)
            except Exception as e:
                # Not one of the env failures rollout() rebuilds the envs for.
                raise PlanError(f"worker {self.worker_id}: the planner failed: {e!r}") from e

        return run_episodes(
            plan,
            self.envs,
            n_episodes=len(self.envs) if n_envs is None else min(n_envs, len(self.envs)),
            execution=self.cfg.planner.execution,
            horizon=self.cfg.model.horizon,
            replan_every=self.cfg.planner.replan_every,
            seed=seed,
            state_normalizer=self.planner.state_normalizer,
            shadows=self.shadows,
            measure_every=self.cfg.online.measure_every,
            max_steps=max_steps,
        )

    def ping(self) -> WorkerState:
        return WorkerState(worker_id=self.worker_id, version=self.version, tasks=self.tasks)
