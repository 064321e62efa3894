"""The one place where the plain classes become Ray actors, with their resource requests.

Placement: the learner asks for ``online.learner_num_cpus`` CPUs, a GPU (``learner_num_gpus``)
and, when ``online.learner_resource`` names one, a little of that custom resource; each rollout
actor asks for ``online.actor_num_cpus`` CPUs and, when ``online.actor_resource`` names one, a
little of that. A custom resource thus works as a node label: start the learner's node with
``--resources='{"learner": 1}'`` and only the CPU nodes with ``{"rollout": 1}``, and the actors
stay off the learner's node. The replay (no CPU of its own) stays on the driver's node.

Threads: no actor asks for a runtime env of its own: in an embedded Ray, where the job needs
none, one would cost each actor's start ~0.3 s of CPU. They inherit one BLAS/OpenMP thread from
the job (``cluster.connect``: an embedded Ray's environment, a cluster job's runtime env; a Ray
the caller started gives them its own environment), and each sets its torch threads itself:
the rollout worker and the replay one, the learner ``train.num_threads``.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import ray
import torch
from ray.exceptions import NodeDiedError, RayError, TaskUnschedulableError
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from distdiff.config import Config, ConfigError
from distdiff.data.windows import Batch
from distdiff.distributed.cluster import RunFailed
from distdiff.distributed.faults import cause
from distdiff.distributed.learner import Learner
from distdiff.distributed.messages import TrainStats, pack_tensors, unpack_tensors
from distdiff.distributed.replay import Replay
from distdiff.distributed.worker import RolloutWorker
from distdiff.provenance import DRIVER_CODE, check_same_code
from distdiff.rollout import random_episodes_in

# How much of a custom resource an actor asks for: any amount on a node (e.g. {"learner": 1})
# then admits any number of such actors, so the resource only says where they may run.
LABEL_AMOUNT = 1e-3


class NodeIdMixin:
    """node_id(): the Ray node an actor runs on. Added here, so the plain classes never import Ray."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class RayRolloutWorker(NodeIdMixin, RolloutWorker):
    """A RolloutWorker that can say which node it runs on, and runs evaluations in a thread of
    their own (Ray's concurrency group ``evaluation``): a run's evaluation runs beside the
    rollouts, not queued behind one (whose timeout, counted from its submission, would run out
    while it waits). Everything else keeps the actor's one thread, in submission order."""

    @ray.method(concurrency_group="evaluation")
    def evaluate(self, first, n_episodes, *, seed, weights):
        return super().evaluate(first, n_episodes, seed=seed, weights=weights)

    def __repr__(self) -> str:
        # Ray names the actor by it: in the prefix of what its process prints (a MuJoCo warning,
        # a traceback), and in `ray list actors`; otherwise 32 workers print as one class.
        return f"RolloutWorker(worker_id={getattr(self, 'worker_id', '?')})"


class RayReplay(NodeIdMixin, Replay):
    """A Replay that can say which node it runs on, and hands its batches to the learner as
    numpy arrays: a learner call's 25 batches (9 MB at the defaults) reach its call in 1.2 ms
    so, against 7.9 ms as torch tensors, which Ray pickles (bench/replay.py, 2026-12-06): time on
    the learner's path, since the call starts only once its batches are in. Its state crosses
    Ray with the tensors packed, as the learner's does."""

    def __init__(self, **kwargs):
        # (The plain class leaves its process's threads alone: a test or benchmark runs it in its own.)
        torch.set_num_threads(1)
        super().__init__(**kwargs)

    def sample(self, n_batches: int, batch_size: int) -> List[Batch]:
        return [batch.numpy() for batch in super().sample(n_batches, batch_size)]

    def state_dict(self) -> Dict[str, object]:
        return pack_tensors(super().state_dict())

    def load_state_dict(self, state: Dict[str, object], added_episodes: Optional[int] = None) -> int:
        return super().load_state_dict(unpack_tensors(state), added_episodes)


class RayLearner(NodeIdMixin, Learner):
    """A Learner that can say which node it runs on, trains on RayReplay's batches, and takes
    and gives its state with the tensors packed (messages.pack_tensors): the driver passes the
    checkpoint it starts from so, and fetches the state for each checkpoint it writes."""

    def __init__(self, *, checkpoint, **kwargs):
        super().__init__(checkpoint=unpack_tensors(checkpoint), **kwargs)

    def train(self, batches: List[Batch]) -> TrainStats:
        return super().train([Batch.from_numpy(batch) for batch in batches])

    def state_dict(self) -> Dict[str, object]:
        return pack_tensors(super().state_dict())


# A RayRolloutWorker (or a subclass) as a Ray actor class: its evaluations in a thread of their own.
WORKER_GROUPS = {"evaluation": 1}
RolloutWorkerActor = ray.remote(concurrency_groups=WORKER_GROUPS)(RayRolloutWorker)


random_episodes_task = ray.remote(random_episodes_in)


@ray.remote(num_cpus=0)
def code_check_task(driver_code) -> str:
    check_same_code(driver_code)
    return ray.get_runtime_context().get_node_id()


def check_code_on_every_node(driver_code) -> List[str]:
    """Before any long work: that a worker process on each node alive now imports the driver's
    distdiff (:class:`RunFailed` if not); the ids of the nodes checked. One check would run on
    the driver's own node, and another install on the GPU node would show only after phase 1,
    as a learner that fails to start."""
    checks = [code_check_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
              .remote(driver_code) for node in ray.nodes() if node["Alive"]]
    checked = []
    while checks:  # in completion order: each result taken is in already
        (done,), checks = ray.wait(checks, num_returns=1)
        try:
            checked.append(ray.get(done))
        except (TaskUnschedulableError, NodeDiedError):
            pass  # a node that is draining (an autoscaler's idle one) or left: the run will not use it
        except RayError as e:  # a mismatch, or a worker that could not start at all
            raise RunFailed(cause(e)) from e
    return checked


ReplayActor = ray.remote(RayReplay)
LearnerActor = ray.remote(RayLearner)


def _label(name: str) -> Optional[Dict[str, float]]:
    return {name: LABEL_AMOUNT} if name else None


# Ray counts resources in fixed point, in units of 1e-4 (a request is rounded down to them), so
# whether k actors of c CPUs fit on a node is integer arithmetic in those units.
_UNITS = 10_000


def _units(amount: float) -> int:
    return int(amount * _UNITS + 1e-6)


def _carries(node: Dict[str, float], resource: str) -> bool:
    """Whether a node (its resources) may run an actor that asks for ``resource`` (empty: any node)."""
    return not resource or node.get(resource, 0) > 0


def _may_host_learner(cfg: Config, node: Dict[str, float], learner_gpus: float) -> bool:
    """Whether Ray may place the learner on ``node``: its label, and the GPUs it asks for."""
    return _carries(node, cfg.online.learner_resource) and node.get("GPU", 0.0) >= learner_gpus


def _learner_gpus(cfg: Config, nodes: List[Dict[str, float]]) -> float:
    """``online.learner_num_gpus``, with -1 resolved: one GPU when a node the learner may run on
    (one with ``online.learner_resource``, when that is set) has one."""
    if cfg.online.learner_num_gpus >= 0:
        return cfg.online.learner_num_gpus
    return 1.0 if any(_may_host_learner(cfg, r, 1.0) for r in nodes) else 0.0


def _actor_room(cfg: Config, nodes: List[Dict[str, float]], learner_gpus: float) -> List[List[int]]:
    """The CPU units the rollout actors may use on each of their nodes (those with
    ``online.actor_resource``, or all), once per node the learner may land on among them, with
    the learner's CPUs taken from that one: Ray picks the learner's node, and the actors must
    fit wherever it does. A single list when the learner cannot take from their nodes."""
    o = cfg.online
    actor_nodes = [r for r in nodes if _carries(r, o.actor_resource)]
    room = [_units(r.get("CPU", 0.0)) for r in actor_nodes]
    hosts = [i for i, r in enumerate(actor_nodes) if _may_host_learner(cfg, r, learner_gpus)]
    if not hosts:
        return [room]
    return [[c - _units(o.learner_num_cpus) if i == j else c for i, c in enumerate(room)] for j in hosts]


def _actors_that_fit(rooms: List[List[int]], actor_units: int) -> int:
    """How many actors of ``actor_units`` the nodes hold at once, wherever the learner lands."""
    return min(sum(max(c, 0) // actor_units for c in room) for room in rooms)


class Resources(NamedTuple):
    """What each actor kind asks Ray for, and what the cluster can give (:func:`plan_resources`)."""

    learner_cpus: float
    learner_gpus: float
    actor_cpus: float
    learner_resources: Optional[Dict[str, float]]  # {label: LABEL_AMOUNT}, or None
    actor_resources: Optional[Dict[str, float]]
    actors_that_fit: int  # rollout actors the nodes hold at once
    learner_fits: bool  # a node can hold the learner now
    gpus_elsewhere: bool  # GPUs are up on nodes the learner may not use (when -1 resolved to none)


def plan_resources(cfg: Config, nodes: List[Dict[str, float]]) -> Resources:
    """What each actor kind asks for on a cluster of ``nodes`` (each alive node's total
    resources), resolving the config's automatic choices: CPUs, the learner's GPUs, and the
    custom resources (``{name: LABEL_AMOUNT}`` or None) of both; how many rollout actors the
    nodes can hold at once (``actors_that_fit``); whether a node can hold the learner now
    (``learner_fits``); and whether GPUs are up on nodes the learner may not use
    (``gpus_elsewhere``, when -1 resolved to none). An actor runs on one node, so the
    automatic share is the largest (up to one CPU) that places every actor node by node, not
    the cluster's CPUs divided evenly: 48 actors on three 16-CPU nodes with a 1-CPU learner
    get 0.9411 CPU each (16/17 in Ray's units), not 47/48, which fits only 47."""
    o = cfg.online
    gpus = _learner_gpus(cfg, nodes)
    rooms = _actor_room(cfg, nodes, gpus)
    actor_cpus = o.actor_num_cpus
    # Nodes an autoscaler has yet to add are not counted: none at all means unknown, not none.
    unknown = not any(c > 0 for room in rooms for c in room)
    if actor_cpus > 0:
        # Nodes that are up count even when the learner leaves them no room: fit 0, so the run
        # says that the actors wait (on a 1-CPU cluster, for good) instead of saying nothing.
        no_nodes = not any(room for room in rooms)
        fit = o.num_actors if no_nodes else min(o.num_actors, _actors_that_fit(rooms, max(_units(actor_cpus), 1)))
    else:
        total = sum(r.get("CPU", 0.0) for r in nodes)
        if unknown and total > 0 and not o.actor_resource:
            # Ray would wait forever to place the actors.
            raise ConfigError(
                f"the learner asks for online.learner_num_cpus={o.learner_num_cpus:g} of this cluster's {total:g} CPUs, "
                "which leaves none for the rollout actors: give the learner less (--online.learner_num_cpus 0.5) "
                "or start Ray with more (--num-cpus)")
        if unknown:
            # Up to an autoscaler: an empty cluster, or no node with actor_resource yet.
            actor_cpus, fit = 0.001, o.num_actors
        else:
            # The largest share that holds them all (fit falls as the share grows).
            lo, hi = 1, _UNITS
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if _actors_that_fit(rooms, mid) >= o.num_actors else (lo, mid - 1)
            actor_cpus, fit = lo / _UNITS, min(o.num_actors, _actors_that_fit(rooms, lo))
    learner_fits = any(_may_host_learner(cfg, r, gpus) and r.get("CPU", 0.0) >= o.learner_num_cpus for r in nodes)
    return Resources(learner_cpus=o.learner_num_cpus, learner_gpus=gpus, actor_cpus=actor_cpus,
                     learner_resources=_label(o.learner_resource), actor_resources=_label(o.actor_resource),
                     actors_that_fit=fit, learner_fits=learner_fits,
                     gpus_elsewhere=o.learner_num_gpus < 0 and not gpus and any(r.get("GPU", 0.0) >= 1 for r in nodes))


def resources(cfg: Config) -> Resources:
    """:func:`plan_resources` on the alive nodes of the cluster Ray is connected to."""
    return plan_resources(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])


def bundle_of(num_bundles: int, num_actors: int, worker_id: Optional[int] = None) -> Optional[int]:
    """The index of the learner's bundle (``worker_id`` None) or of rollout actor ``worker_id``'s,
    in a Ray Tune trial's placement group: its driver's bundle (which Ray leaves out when it asks
    for nothing), the learner's, then one per rollout actor (tuning.trial_resources). None in a
    group of another layout."""
    learner = num_bundles - 1 - num_actors
    if learner not in (0, 1):
        return None
    return learner if worker_id is None else learner + 1 + worker_id


def _own_bundle(cfg: Config, worker_id: Optional[int] = None) -> Dict[str, object]:
    """Inside a Tune trial's placement group, the actor's own bundle. Left to Ray (bundle -1), an
    actor takes its CPUs from any bundle on its node: in a group spread over nodes, rollout
    actors could take the learner's CPUs on the one node with its GPU, and it would never start.
    Outside a group, nothing: Ray places it on the cluster."""
    pg = get_current_placement_group()
    index = None if pg is None else bundle_of(len(pg.bundle_specs), cfg.online.num_actors, worker_id)
    if index is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


def make_learner(cfg: Config, res: Resources, **kwargs):
    return LearnerActor.options(num_cpus=res.learner_cpus, num_gpus=res.learner_gpus, resources=res.learner_resources,
                                **_own_bundle(cfg)).remote(
        device="cuda" if res.learner_gpus > 0 else "cpu", driver_code=DRIVER_CODE, **kwargs)


def make_replay(**kwargs):
    # On the driver's node (the head under `ray job submit`): the run cannot outlive that node
    # anyway, and losing a worker node must never lose the replay. (Left to Ray, an actor with
    # no CPU lands on any node; a soft affinity was measured not to hold either.)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ReplayActor.options(num_cpus=0, scheduling_strategy=here).remote(**kwargs)


def make_worker(cfg: Config, res: Resources, **kwargs):
    # max_task_retries=0: a task lost with its process is resubmitted by the driver, which
    # first hands the restarted worker the newest weights.
    return RolloutWorkerActor.options(num_cpus=res.actor_cpus, resources=res.actor_resources,
                                      max_restarts=cfg.online.actor_max_restarts, max_task_retries=0,
                                      **_own_bundle(cfg, kwargs["worker_id"])).remote(
        driver_code=DRIVER_CODE, **kwargs)
