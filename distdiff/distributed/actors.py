"""The one place where the plain classes become Ray actors, with their resource requests."""
from __future__ import annotations

from typing import Dict

import ray

from distdiff.config import Config
from distdiff.distributed.learner import Learner
from distdiff.distributed.replay import Replay
from distdiff.distributed.worker import RolloutWorker

# Each actor process gets one math thread: on small machines a second one competing with the
# rollout processes makes small-model steps many times slower.
_THREADS = {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}}

RolloutWorkerActor = ray.remote(RolloutWorker)


def _random_episodes(env_id: str, max_episode_steps: int, n_episodes: int, seed: int):
    from distdiff.rollout import make_env, random_episodes

    env = make_env(env_id, max_episode_steps)
    try:
        return random_episodes(env, n_episodes, seed)
    finally:
        env.close()


random_episodes_task = ray.remote(runtime_env=_THREADS)(_random_episodes)
ReplayActor = ray.remote(Replay)
LearnerActor = ray.remote(Learner)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def resources(cfg: Config) -> Dict[str, float]:
    """The CPU/GPU each actor kind asks for, resolving the config's automatic choices."""
    o = cfg.online
    gpus = o.learner_num_gpus if o.learner_num_gpus >= 0 else (1.0 if cluster_gpus() >= 1 else 0.0)
    actor_cpus = o.actor_num_cpus
    if actor_cpus == 0:
        free = max(float(ray.cluster_resources().get("CPU", 1.0)) - o.learner_num_cpus, 0.0)
        actor_cpus = min(1.0, free / o.num_actors) if free > 0 else 0.001
    return {"learner_cpus": o.learner_num_cpus, "learner_gpus": gpus, "actor_cpus": actor_cpus}


def make_learner(cfg: Config, res: Dict[str, float], **kwargs):
    return LearnerActor.options(num_cpus=res["learner_cpus"], num_gpus=res["learner_gpus"], runtime_env=_THREADS,
                                name=None).remote(device="cuda" if res["learner_gpus"] > 0 else "cpu", **kwargs)


def make_replay(**kwargs):
    return ReplayActor.options(num_cpus=0, runtime_env=_THREADS).remote(**kwargs)


def make_worker(cfg: Config, res: Dict[str, float], **kwargs):
    # max_task_retries=0: a task lost with its process is resubmitted by the driver, which
    # first hands the restarted worker the newest weights.
    return RolloutWorkerActor.options(num_cpus=res["actor_cpus"], max_restarts=cfg.online.actor_max_restarts,
                                      max_task_retries=0, runtime_env=_THREADS).remote(**kwargs)
