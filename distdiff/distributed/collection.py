"""Episodes run in parallel by rollout actors outside training: collected with random actions or
a trained planner (``launch/collect.py``), or a checkpoint evaluated (``launch/evaluate.py``),
by the same workers as training."""
from __future__ import annotations

import contextlib
import itertools
import time
from typing import Callable, Dict, Iterator, List, Optional

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from distdiff import config as config_lib
from distdiff.distributed import actors
from distdiff.distributed.cluster import RunFailed
from distdiff.distributed.faults import called_while_restarting, cause, dead_for_good
from distdiff.distributed.messages import Weights
from distdiff.distributed.worker import PlanError
from distdiff.evaluation import EvaluationStopped, check_measurable, summary_of
from distdiff.models import NETS
from distdiff.planner import Planner
from distdiff.provenance import DRIVER_CODE
from distdiff.rollout import EpisodeResult, NonFinitePlan, stream_seed
from distdiff.training import flat_weights, planner_from_checkpoint

COLLECT_TRIES = 5  # a task that fails this often stops the collection or evaluation
COLLECT_RESTART_S = 300.0  # and so does a worker that Ray has not restarted within this time
MAX_BACK_OFF_S = 8.0  # the longest a worker that keeps failing waits between tasks
ACTOR_WAIT_NOTE_S = 60.0  # how often it says that actors have not started (not placed yet)


def collect_episodes(n_episodes: int, *, num_actors: int, env_id: str, max_episode_steps: int, seed: int,
                     checkpoint: Optional[Dict[str, object]] = None, envs_per_actor: int = 4,
                     progress: Optional[Callable[[int], None]] = None,
                     log: Callable[[str], None] = print) -> List:
    """``n_episodes`` episodes from ``num_actors`` parallel actors: random actions (in tasks,
    ``num_actors`` at once), or the EMA planner of ``checkpoint`` (the same rollout workers as
    training); ``log``: what it says while its actors wait to start."""
    actors.check_code_on_every_node(DRIVER_CODE)  # (the random policy's tasks check nothing themselves)
    cfg = config_lib.from_dict(checkpoint["config"]) if checkpoint is not None else config_lib.Config()
    # (Planner actors beyond one per task would build their nets and envs to sit idle.)
    cfg = _parallel(cfg, num_actors, n_episodes, envs_per_actor if checkpoint is not None else 1)
    res = actors.resources(cfg)
    # Exactly n_episodes are run, none cut off afterwards: which episodes of a task end first
    # is not chance (falls end first), so keeping those that arrived first would keep the shortest.
    if checkpoint is None:
        per_task = max(1, min(10, n_episodes // max(num_actors, 1)))
        counts = [min(per_task, n_episodes - k) for k in range(0, n_episodes, per_task)]
        queued = iter(enumerate(counts))

        def submit() -> None:
            k, n = next(queued)
            refs[actors.random_episodes_task.options(num_cpus=res.actor_cpus).remote(
                env_id, max_episode_steps, n, seed + k * per_task)] = k

        # At most num_actors at once, as asked: each asks for up to a CPU, and a cluster with
        # more would otherwise run them all at once.
        refs: Dict[ray.ObjectRef, int] = {}
        for _ in range(min(cfg.online.num_actors, len(counts))):
            submit()
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
            if len(by_task) + len(refs) < len(counts):
                submit()
        return [ep for k in sorted(by_task) for ep in by_task[k]]
    cfg = config_lib.from_dict({"env": {"max_episode_steps": max_episode_steps}}, cfg)
    planner = planner_from_checkpoint(checkpoint, cfg)
    weights = ray.put(weights_of(planner))

    def submit(worker, task: int, n: int) -> ray.ObjectRef:
        # The weights before every task: a restarted worker has none, and a worker that holds
        # them loads nothing. Seeded by the task alone, not by the worker that happens to be
        # free for it: the same command collects the same episodes with any number of actors.
        # (Not phase 2's streams, which also key on the worker: a run with the same seed starts
        # from other states.)
        worker.set_weights.remote(weights)
        return worker.rollout.remote(task, n_envs=n, seed=stream_seed(seed, task))

    with own_workers(cfg, planner, measure=False, log=log) as workers:
        # Copies: views would pin every task's object in the store until the caller is done.
        return run_tasks(workers, n_episodes, cfg.online.envs_per_actor, submit,
                         lambda result: [ep.copy() for ep in result.episodes], progress)


def weights_of(planner: Planner) -> Weights:
    """The nets of ``planner`` as weights for workers to load (version 1)."""
    nets = {name: getattr(planner, name) for name in NETS}
    return Weights(version=1, weights={name: flat_weights(net) for name, net in nets.items() if net is not None})


def evaluate_in_parallel(planner: Planner, cfg: config_lib.Config, *, num_actors: int,
                         progress: Optional[Callable[[int], None]] = None,
                         log: Callable[[str], None] = print) -> Dict[str, object]:
    """:func:`distdiff.evaluation.evaluate` of ``planner`` (:func:`planner_from_checkpoint`
    with ``cfg``, which its workers act by), its episodes split between ``num_actors`` parallel
    rollout actors made for it (:func:`evaluate_on`); ``log``: what it says while they wait to start."""
    check_measurable(cfg)
    actors.check_code_on_every_node(DRIVER_CODE)
    # (Their rollout envs sit idle: one each.)
    cfg = config_lib.from_dict({"online": {"envs_per_actor": 1}},
                               _parallel(cfg, num_actors, cfg.eval.episodes, min(cfg.eval.num_envs, cfg.eval.episodes)))
    # (Their rollouts' envs sit idle too: no shadows for them.)
    with own_workers(cfg, planner, measure=False, log=log) as workers:
        return evaluate_on(workers, ray.put(weights_of(planner)), cfg, progress=progress)


def evaluate_on(workers: List, weights: ray.ObjectRef, cfg: config_lib.Config, *,
                stop: Optional[Callable[[], bool]] = None, progress: Optional[Callable[[int], None]] = None,
                width: Optional[int] = None, usable: Callable[[int], bool] = lambda i: True) -> Dict[str, object]:
    """:func:`distdiff.evaluation.evaluate` of the planner that ``weights`` (a ref to the
    :class:`Weights` of :func:`weights_of`) make in ``workers`` (rollout actors of ``cfg``),
    its episodes split between them, ``eval.num_envs`` per task. Episode i starts from the state it
    starts from in ``evaluate`` (seed ``eval.seed`` + i); the sampler's noise is drawn per
    task, so the figures are the same for any number of workers but not those of one process,
    whose envs share one stream. ``stop`` is asked while it waits: when it says so, it raises
    EvaluationStopped (the tasks in flight run out in their workers). ``width`` and ``usable``:
    how many tasks run at once and on which workers (:func:`run_tasks`)."""
    per_task = min(cfg.eval.num_envs, cfg.eval.episodes)

    def own(results: List[EpisodeResult]) -> List[EpisodeResult]:
        # Copies, as in collect_episodes; the plan-vs-real example is not summarized.
        return [r._replace(episode=r.episode.copy(), plan_errors=r.plan_errors.copy(), last_check=None)
                for r in results]

    results = run_tasks(workers, cfg.eval.episodes, per_task,
                        lambda worker, task, n: worker.evaluate.remote(task * per_task, n, seed=cfg.eval.seed,
                                                                       weights=weights),
                        own, progress, stop, width=width, usable=usable)
    return summary_of(results, cfg)


def _parallel(cfg: config_lib.Config, num_actors: int, n_episodes: int, per_task: int) -> config_lib.Config:
    """``cfg`` for ``n_episodes`` in tasks of ``per_task`` (a worker's envs): the cluster's CPUs
    shared as training shares them with its actors (there is no learner), and no more actors
    than there are tasks. (Asking 1/N CPU each, as this once did, held every actor on the node
    that started them.)"""
    return config_lib.from_dict({"online": {"num_actors": max(1, min(num_actors, -(-n_episodes // per_task))),
                                            "envs_per_actor": per_task,
                                            "actor_num_cpus": 0.0, "learner_num_cpus": 0.0, "learner_num_gpus": 0.0,
                                            "actor_resource": "", "learner_resource": ""}}, cfg)


@contextlib.contextmanager
def own_workers(cfg: config_lib.Config, planner: Planner, *, measure: bool,
                log: Callable[[str], None] = print) -> Iterator[List]:
    """``online.num_actors`` rollout workers of ``cfg`` with ``planner``'s normalizer, started,
    killed on the way out; ``measure``: see :class:`RolloutWorker`."""
    res = actors.resources(cfg)
    workers = [actors.make_worker(cfg, res, config=cfg.to_dict(), normalizer=planner.normalizer.state_dict(),
                                  worker_id=i, measure=measure)
               for i in range(cfg.online.num_actors)]
    try:
        # Waited for with a word each minute: on a cluster whose CPUs other jobs hold, the actors
        # wait to be placed, and the tasks queued on them would wait without one. (A constructor
        # that raised is left to the tasks, which give its worker up.)
        started = [w.__ray_ready__.remote() for w in workers]  # (every Ray actor's; Ray Serve waits on it so)
        waited = 0.0
        while True:
            _, started = ray.wait(started, num_returns=len(started), timeout=ACTOR_WAIT_NOTE_S)
            if not started:
                break
            waited += ACTOR_WAIT_NOTE_S
            log(f"{len(started)} of {len(workers)} rollout actors have not started after {waited:g} s (not placed "
                f"yet, or still starting): each asks for {res.actor_cpus:g} CPU"
                + "".join(f" and a node with {name!r}" for name in res.actor_resources or {})
                + "; `ray status` shows what the cluster has free")
        yield workers
    finally:
        for w in workers:
            ray.kill(w)


def run_tasks(workers: List, n_episodes: int, per_task: int, submit: Callable, keep: Callable,
              progress: Optional[Callable[[int], None]] = None, stop: Optional[Callable[[], bool]] = None, *,
              width: Optional[int] = None, usable: Callable[[int], bool] = lambda i: True) -> List:
    """``n_episodes`` episodes of ``workers`` (rollout actors), in tasks of ``per_task``
    episodes: ``submit(worker, task, n)`` starts task ``task`` of ``n`` episodes, ``keep(result)``
    makes its list of what is returned. At most ``width`` tasks run at once (default: one per
    worker), each started on the worker with the fewest in flight (then the lowest index) among
    those ``usable(i)`` allows (a run's loop gives workers up). A task whose worker died or whose
    envs raised is run again, with the same seeds, up to ``COLLECT_TRIES`` times; its worker
    takes no task until a back-off has passed (Ray may be restarting it), which doubles with each
    failure in a row, while others do. A worker that cannot be built or is dead for good takes
    no task again. A planner that fails stops it all. ``stop``: see :func:`evaluate_on`."""
    # a task's ref -> (its worker, the task, its episodes, its failures, since when it has waited
    # for a worker that Ray restarts)
    pending: Dict[ray.ObjectRef, tuple] = {}
    by_task: Dict[int, List] = {}
    in_flight, failing = [0] * len(workers), [0] * len(workers)
    back_at = [0.0] * len(workers)  # when a worker that failed may take a task again
    gone: Dict[int, str] = {}  # workers whose constructor raised (Ray never restarts them): why

    def start(task: int, n: int, failures: int = 0, since: Optional[float] = None) -> None:
        choice = [i for i in range(len(workers)) if i not in gone and usable(i)]
        if not choice:
            why = f": {next(iter(gone.values()))}" if gone else ""
            raise RunFailed(f"no rollout actor is left to run task {task} on{why}")
        now = time.monotonic()
        ready_now = [i for i in choice if back_at[i] <= now]
        if not ready_now:
            # Every one is backing off: wait for the first back (up to MAX_BACK_OFF_S), asking
            # ``stop`` meanwhile as the wait for results does.
            i = min(choice, key=lambda j: back_at[j])
            while time.monotonic() < back_at[i]:
                if stop is not None and stop():
                    raise EvaluationStopped("the evaluation was stopped")
                time.sleep(min(0.25, max(back_at[i] - time.monotonic(), 0.0)))
        else:
            i = min(ready_now, key=lambda j: (in_flight[j], j))
        in_flight[i] += 1
        pending[submit(workers[i], task, n)] = (i, task, n, failures, since)

    def failed(i: int) -> None:
        failing[i] += 1
        back_at[i] = time.monotonic() + min(2.0 ** (failing[i] - 1), MAX_BACK_OFF_S)

    def unasked() -> int:
        return n_episodes - sum(len(got) for got in by_task.values()) - sum(p[2] for p in pending.values())

    tasks = itertools.count()  # numbered, so a retried task replays its seeds, and no other does
    for _ in range(len(workers) if width is None else width):
        if unasked() > 0:
            start(next(tasks), min(per_task, unasked()))
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if stop is None else 0.25)
        if stop is not None and stop():
            raise EvaluationStopped("the evaluation was stopped")
        if not ready:
            continue
        i, task, n, failures, since = pending.pop(ready[0])
        in_flight[i] -= 1
        try:
            got = keep(ray.get(ready[0]))
        except RayError as e:
            if isinstance(e, RayTaskError) and isinstance(e.cause, (NonFinitePlan, PlanError)):
                # Its seeds again would fail the same way.
                raise RunFailed(f"the checkpoint's planner is broken: {cause(e)}") from e
            failed(i)
            if called_while_restarting(e):
                # The task never ran: Ray is restarting the worker, and calls fail until it is back.
                since = time.monotonic() if since is None else since
                if time.monotonic() - since > COLLECT_RESTART_S:
                    raise RunFailed(f"no rollout actor took task {task} within {COLLECT_RESTART_S:g} s: "
                                    f"{cause(e)}") from e
                start(task, n, failures, since)
                continue
            if dead_for_good(e):
                # The worker's failure, and maybe not the task's (a call to a worker dead already):
                # Ray never restarts it, and the task runs elsewhere. A task that kills every
                # worker's last life stops the run once no worker is left.
                gone[i] = cause(e)
            else:
                # A worker that died running the task (Ray restarts it), or a task that raised: it
                # runs again; what was run so far is kept.
                failures += 1
                if failures >= COLLECT_TRIES:
                    died = " (its worker died running it)" if isinstance(e, RayActorError) else ""
                    raise RunFailed(f"task {task} failed {failures} times{died}: {cause(e)}") from e
            start(task, n, failures)
            continue
        failing[i] = 0
        by_task[task] = got
        if progress:
            progress(len(got))
        if unasked() > 0:
            start(next(tasks), min(per_task, unasked()))
    return [item for k in sorted(by_task) for item in by_task[k]]
