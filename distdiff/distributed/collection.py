"""Episodes collected in parallel by rollout actors: random actions, or a trained planner run by
the same workers as training (``launch/collect.py``)."""
from __future__ import annotations

import itertools
import time
from typing import Callable, Dict, List, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from distdiff import config as config_lib
from distdiff.distributed import actors
from distdiff.distributed.cluster import RunFailed
from distdiff.distributed.faults import cause
from distdiff.distributed.messages import Weights
from distdiff.models import NETS
from distdiff.provenance import DRIVER_CODE
from distdiff.rollout import stream_seed
from distdiff.training import planner_from_checkpoint

COLLECT_TRIES = 5  # a collection task that fails this often stops the collection
COLLECT_RESTART_S = 300.0  # and so does a worker that Ray has not restarted within this time


def collect_episodes(n_episodes: int, *, num_actors: int, env_id: str, max_episode_steps: int, seed: int,
                     checkpoint: Optional[Dict[str, object]] = None, envs_per_actor: int = 4,
                     progress: Optional[Callable[[int], None]] = None) -> List:
    """``n_episodes`` episodes from ``num_actors`` parallel actors: random actions, or the EMA
    planner of ``checkpoint`` (the same rollout workers as training)."""
    from distdiff.training import flat_weights

    actors.check_code_on_every_node(DRIVER_CODE)  # (the random policy's tasks check nothing themselves)
    cfg = config_lib.from_dict(checkpoint["config"]) if checkpoint is not None else config_lib.Config()
    if checkpoint is not None:
        # Planner actors beyond one per task would build their nets and envs to sit idle.
        num_actors = max(1, min(num_actors, -(-n_episodes // envs_per_actor)))
    # The cluster's CPUs shared as training shares them with its actors (there is no learner):
    # asking 1/N CPU each, as this once did, held every actor on the node that started them.
    cfg = config_lib.from_dict({"online": {"num_actors": num_actors, "actor_num_cpus": 0.0, "learner_num_cpus": 0.0,
                                           "learner_num_gpus": 0.0, "actor_resource": "", "learner_resource": ""}}, cfg)
    res = actors.resources(cfg)
    # Exactly n_episodes are run, none cut off afterwards: which episodes of a task end first
    # is not chance (falls end first), so keeping those that arrived first would keep the shortest.
    if checkpoint is None:
        per_task = max(1, min(10, n_episodes // max(num_actors, 1)))
        counts = [min(per_task, n_episodes - k) for k in range(0, n_episodes, per_task)]
        refs = {actors.random_episodes_task.options(num_cpus=res.actor_cpus).remote(
            env_id, max_episode_steps, n, seed + k * per_task): k for k, n in enumerate(counts)}
        by_task: Dict[int, List] = {}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            try:
                # (Ray retries a task whose process died; one that raised would raise again)
                got = [ep.copy() for ep in ray.get(ready[0])]
            except RayError as e:
                raise RunFailed(f"a random-policy collection task failed: {cause(e)}") from e
            by_task[refs.pop(ready[0])] = got
            if progress:
                progress(len(got))
        return [ep for k in sorted(by_task) for ep in by_task[k]]
    cfg = config_lib.from_dict({"online": {"envs_per_actor": envs_per_actor, "measure_every": 10**9},
                                "env": {"max_episode_steps": max_episode_steps}, "train": {"seed": seed}}, cfg)
    planner = planner_from_checkpoint(checkpoint, cfg)
    nets = {name: getattr(planner, name) for name in NETS}
    weights = ray.put(Weights(version=1, weights={name: flat_weights(net) for name, net in nets.items() if net is not None}))
    workers = [actors.make_worker(cfg, res, config=cfg.to_dict(), normalizer=planner.normalizer.state_dict(), worker_id=i)
               for i in range(num_actors)]
    # rollout -> (worker, task, its episodes, its failures, restart wait since)
    pending: Dict[ray.ObjectRef, tuple] = {}
    by_task: Dict[int, List] = {}

    def start(i: int, task: int, n: int, failures: int = 0, since: Optional[float] = None) -> None:
        # The weights before every rollout: a restarted worker has none, and a worker that
        # holds them loads nothing.
        workers[i].set_weights.remote(weights)
        # Seeded by the task alone, not by the worker that happens to be free for it: the same
        # command collects the same episodes with any number of actors. (Not phase 2's streams,
        # which also key on the worker: a run with the same seed starts from other states.)
        task_seed = stream_seed(seed, task)
        pending[workers[i].rollout.remote(task, n_envs=n, seed=task_seed)] = (i, task, n, failures, since)

    def unasked() -> int:
        return n_episodes - sum(len(got) for got in by_task.values()) - sum(p[2] for p in pending.values())

    try:
        tasks = itertools.count()  # numbered, so a retried task replays its seeds, and no other does
        for i in range(num_actors):
            if unasked() > 0:
                start(i, next(tasks), min(envs_per_actor, unasked()))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, task, n, failures, since = pending.pop(ready[0])
            try:
                # Copies: views would pin every task's object in the store until the caller is done.
                got = [ep.copy() for ep in ray.get(ready[0]).episodes]
            except ActorUnavailableError as e:
                # Ray is restarting the worker, and calls fail at once until it is back.
                since = time.monotonic() if since is None else since
                if time.monotonic() - since > COLLECT_RESTART_S:
                    raise RunFailed(f"rollout actor {i} was not restarted within {COLLECT_RESTART_S:g} s: "
                                    f"{cause(e)}") from e
                time.sleep(1.0)
                start(i, task, n, failures, since)
                continue
            except RayError as e:
                # A worker that died with the task, or whose task raised: try again after a
                # pause, as training does; what was collected so far is kept.
                failures += 1
                if failures >= COLLECT_TRIES or (isinstance(e, RayActorError) and e.actor_init_failed):
                    raise RunFailed(f"collection task {task} failed {failures} times: {cause(e)}") from e
                time.sleep(min(0.5 * failures, 5.0))
                start(i, task, n, failures)
                continue
            by_task[task] = got
            if progress:
                progress(len(got))
            if unasked() > 0:
                start(i, next(tasks), min(envs_per_actor, unasked()))
    finally:
        for w in workers:
            ray.kill(w)
    return [ep for k in sorted(by_task) for ep in by_task[k]]
