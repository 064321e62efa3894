"""The one place where the plain classes become Ray actors, with their resource requests.

Placement: the learner asks for ``online.learner_num_cpus`` CPUs, a GPU (``learner_num_gpus``)
and, when ``online.learner_resource`` names one, a little of that custom resource; each rollout
actor asks for ``online.actor_num_cpus`` CPUs and, when ``online.actor_resource`` names one, a
little of that. A custom resource thus works as a node label: start the learner's node with
``--resources='{"learner": 1}'`` and only the CPU nodes with ``{"rollout": 1}``, and the actors
stay off the learner's node. The replay (no CPU of its own) stays on the driver's node.
"""
from __future__ import annotations

from typing import Dict, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distdiff.config import Config, ConfigError
from distdiff.distributed.learner import Learner
from distdiff.distributed.replay import Replay
from distdiff.distributed.worker import RolloutWorker

# Each actor process gets one math thread: on small machines a second one competing with the
# rollout processes makes small-model steps many times slower.
_THREADS = {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}}

# How much of a custom resource an actor asks for: any amount on a node (e.g. {"learner": 1})
# then admits any number of such actors, so the resource only says where they may run.
LABEL_AMOUNT = 1e-3


class NodeIdMixin:
    """node_id(): the Ray node an actor runs on. Added here, so the plain classes never import Ray."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class RayRolloutWorker(NodeIdMixin, RolloutWorker):
    """A RolloutWorker that can say which node it runs on."""


class RayReplay(NodeIdMixin, Replay):
    """A Replay that can say which node it runs on."""


class RayLearner(NodeIdMixin, Learner):
    """A Learner that can say which node it runs on."""


RolloutWorkerActor = ray.remote(RayRolloutWorker)


def _random_episodes(env_id: str, max_episode_steps: int, n_episodes: int, seed: int):
    from distdiff.rollout import make_env, random_episodes

    env = make_env(env_id, max_episode_steps)
    try:
        return random_episodes(env, n_episodes, seed)
    finally:
        env.close()


random_episodes_task = ray.remote(runtime_env=_THREADS)(_random_episodes)
ReplayActor = ray.remote(RayReplay)
LearnerActor = ray.remote(RayLearner)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def _label(name: str) -> Optional[Dict[str, float]]:
    return {name: LABEL_AMOUNT} if name else None


def _actor_cpus_available(cfg: Config) -> float:
    """CPUs the rollout actors may share: the cluster's, or only those of the nodes that carry
    ``online.actor_resource``; less the learner's when it can run on the same nodes."""
    o = cfg.online
    if not o.actor_resource:
        return float(ray.cluster_resources().get("CPU", 1.0)) - o.learner_num_cpus
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get(o.actor_resource, 0) > 0]
    cpus = sum(float(r.get("CPU", 0.0)) for r in nodes)
    if not o.learner_resource or any(r.get(o.learner_resource, 0) > 0 for r in nodes):
        cpus -= o.learner_num_cpus
    return cpus


def resources(cfg: Config) -> Dict[str, object]:
    """What each actor kind asks for, resolving the config's automatic choices: CPUs, the
    learner's GPUs, and the custom resources (``{name: LABEL_AMOUNT}`` or None) of both; and
    how many rollout actors the cluster's nodes can hold at once (``actors_that_fit``)."""
    o = cfg.online
    gpus = o.learner_num_gpus if o.learner_num_gpus >= 0 else (1.0 if cluster_gpus() >= 1 else 0.0)
    actor_cpus = o.actor_num_cpus
    free = _actor_cpus_available(cfg)
    # Nodes an autoscaler has yet to add are not counted: none at all means unknown, not none.
    fit = o.num_actors if free <= 0 or actor_cpus == 0 else min(o.num_actors, int(free / actor_cpus + 1e-9))
    if actor_cpus == 0:
        total = float(ray.cluster_resources().get("CPU", 0.0))
        if free <= 0 and total > 0 and not o.actor_resource:
            # Ray would wait forever to place the actors.
            raise ConfigError(
                f"the learner asks for online.learner_num_cpus={o.learner_num_cpus:g} of this cluster's {total:g} CPUs, "
                "which leaves none for the rollout actors: give the learner less (--online.learner_num_cpus 0.5) "
                "or start Ray with more (--num-cpus)")
        # Up to an autoscaler: an empty cluster, or no node with actor_resource yet.
        actor_cpus = min(1.0, free / o.num_actors) if free > 0 else 0.001
    return {"learner_cpus": o.learner_num_cpus, "learner_gpus": gpus, "actor_cpus": actor_cpus,
            "learner_resources": _label(o.learner_resource), "actor_resources": _label(o.actor_resource),
            "actors_that_fit": fit}


def make_learner(cfg: Config, res: Dict[str, float], **kwargs):
    return LearnerActor.options(num_cpus=res["learner_cpus"], num_gpus=res["learner_gpus"],
                                resources=res.get("learner_resources"),
                                runtime_env=_THREADS).remote(device="cuda" if res["learner_gpus"] > 0 else "cpu", **kwargs)


def make_replay(**kwargs):
    # On the driver's node (the head under `ray job submit`): the run cannot outlive that node
    # anyway, and losing a worker node must never lose the replay. (Left to Ray, an actor with
    # no CPU lands on any node; a soft affinity was measured not to hold either.)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ReplayActor.options(num_cpus=0, scheduling_strategy=here, runtime_env=_THREADS).remote(**kwargs)


def make_worker(cfg: Config, res: Dict[str, float], **kwargs):
    # max_task_retries=0: a task lost with its process is resubmitted by the driver, which
    # first hands the restarted worker the newest weights.
    return RolloutWorkerActor.options(num_cpus=res["actor_cpus"], resources=res.get("actor_resources"),
                                      max_restarts=cfg.online.actor_max_restarts,
                                      max_task_retries=0, runtime_env=_THREADS).remote(**kwargs)
