"""The main job: offline pretraining, then Algorithm 2 online alignment on Ray.

Rollout actors each keep one rollout task in flight; results are collected in completion
order with ``ray.wait``, forwarded to the replay actor, and the learner trains on replay
samples at a fixed ratio of updates per collected env step. Every ``broadcast_every``
updates the learner publishes a new weights version: one object, passed by reference to
every actor (fire-and-forget), so the weights are stored once per version, never per actor.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import threading
import time
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import numpy as np
import ray
from ray.exceptions import ObjectStoreFullError, OutOfDiskError, RayActorError, RayError, RayTaskError
from tqdm import tqdm

from distdiff import config as config_lib
from distdiff.checkpoint import CheckpointError, load_checkpoint, load_own_checkpoint, save_checkpoint
from distdiff.process import Interrupt, deferred_interrupt, progress_bar, sigterm_as_interrupt
from distdiff.files import write_json
from distdiff.config import Config
from distdiff.data.minari_io import LoadedDataset, normalized_score
from distdiff.distributed import actors
from distdiff.distributed.cluster import RunFailed
from distdiff.distributed.collection import evaluate_on, weights_of
from distdiff.distributed.faults import WorkerFaults, cause
from distdiff.distributed.messages import RolloutResult, TrainStats, pack_tensors, unpack_tensors
from distdiff.evaluation import EvaluationStopped, evaluate
from distdiff.events import CONFIG_TEXT, RecentRate, drop_redone, flushed_sizes, kept_before
from distdiff.models import layout_of
from distdiff.normalizer import Normalizer
from distdiff.pretrain import load_data, pretrain, trained_on
from distdiff.provenance import DRIVER_CODE
from distdiff.rollout import alignment_errors, mean_alignment_error, per_step_alignment_error
from distdiff.rundir import (BEST, BEST_METRICS, CHECKPOINT, CONFIG, METRICS, PRETRAIN, REPLAY, check_new_run,
                             clear_run, resume_checkpoint)
from distdiff.training import planner_from_checkpoint, resolve_device, torch_threads

# How long the run waits for its learner to start between two notes that it still waits.
LEARNER_WAIT_NOTE_S = 60.0
# How long a learner's call runs (a call is seconds, a minute with torch.compile's warm-up)
# between two notes that it still runs.
LEARNER_CALL_NOTE_S = 600.0
# An evaluation's figures that go to TensorBoard (eval/…), metrics.json and best.json alike.
EVAL_SCALARS = ("return_mean", "normalized_score", "terminations", "alignment_error")
BEST_KEYS = (*EVAL_SCALARS, "return_se", "normalized_score_se", "env_steps", "updates", "weights_version")
# TensorBoard's x axis: learner updates for what the learner's calls report (and the figure,
# made every `online.figure_every` updates), env steps for the rest.
UPDATE_AXIS_TAGS = ("losses/", "charts/learning_rate", "perf/updates_per_s", "perf/windows_per_s", "perf/learner_busy",
                    "replay/size", "faults/skipped_updates", "rollout/plan_vs_real")


def step_axis(tag: str) -> str:
    """The counter a TensorBoard tag of phase 2 is logged at: ``updates`` or ``env_steps``."""
    return "updates" if tag.startswith(UPDATE_AXIS_TAGS) else "env_steps"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def checked_resources(cfg: Config, log: Callable[[str], None]) -> actors.Resources:
    """:func:`actors.resources`, saying when some rollout actors cannot be placed yet: the run
    cannot end until they start, since each of them holds a share of the budget."""
    res = actors.resources(cfg)
    n, fit = cfg.online.num_actors, res.actors_that_fit
    o = cfg.online
    gpus = res.learner_gpus
    # Per node: Ray places the learner on one node, which must have its GPU, its CPUs and
    # learner_resource at once: a CPU node with learner_resource and a GPU node without it do
    # not hold a GPU learner.
    if not res.learner_fits:
        asks = learner_asks(res) or "a place"
        where = f"a node with {o.learner_resource!r}" if o.learner_resource else "one node"
        on_cpu = (" It will train on CPU: online.learner_num_gpus -1 takes a GPU only where one is up now; pass "
                  "--online.learner_num_gpus 1 for a GPU node still to come." if o.learner_num_gpus < 0 and not gpus else "")
        log(f"warning: the learner asks for {asks} on {where}, which the cluster does not have yet: the run "
            f"waits for it (an autoscaler) after pretraining; check --online.learner_num_gpus, "
            f"--online.learner_num_cpus and --online.learner_resource.{on_cpu}")
    elif res.gpus_elsewhere:
        log(f"warning: the learner trains on CPU: the cluster's GPUs are on nodes without {o.learner_resource!r}")
    if fit < n:
        where = f"with {cfg.online.actor_resource!r}" if cfg.online.actor_resource else "of the cluster"
        log(f"warning: the nodes {where} hold {fit} of the {n} rollout actors at online.actor_num_cpus="
            f"{cfg.online.actor_num_cpus:g}; the other {n - fit} wait for more nodes (an autoscaler), and the run "
            f"cannot end before they start: lower --num-actors or --online.actor_num_cpus, or add nodes")
    return res


def without_replay(run_dir: Path) -> str:
    """How to resume a run whose replay.pt cannot be used: its weights and counters are in
    checkpoint.pt, and a resume without replay.pt starts with an empty replay."""
    return (f"To resume without its episodes, move it out of {run_dir}: the replay then starts empty and the "
            f"learner goes on from {CHECKPOINT}; or start the run again with --overwrite")


def learner_asks(res: actors.Resources) -> str:
    """The GPUs and CPUs the learner asks for, in words ("" for none)."""
    return " and ".join([f"{res.learner_gpus:g} GPU"] * (res.learner_gpus > 0)
                        + [f"{res.learner_cpus:g} CPU"] * (res.learner_cpus > 0))


def _above_progress_bars(log: Callable[[str], None]) -> Callable[[str], None]:
    def write(message: str) -> None:
        with tqdm.external_write_mode():
            log(message)

    return write


class RolloutShare(NamedTuple):
    envs: int  # how many of a worker's envs the rollout runs (its first ones)
    max_steps: int  # steps each of them may take; env.max_episode_steps: whole episodes


def rollout_share(free: int, idle: int, envs: int, max_episode_steps: int, min_steps: int) -> RolloutShare:
    """What the next rollout may collect under an env-step budget. ``free`` steps are neither
    collected nor promised to a running rollout, and ``idle`` workers (this one included) have
    none running: each gets an even share, so a run never passes its budget by whole episodes of
    every actor (32 actors x 16 envs would be 5x the default budget in their first rollouts).

    A share is spent on whole episodes, on as many of the worker's envs as it holds whole
    episodes for, rather than on every env cut short: a cut episode is mostly its start, and
    seldom shows the later states and falls a planner meets. Below one episode one env takes
    the share, cut; below ``min_steps`` (a plan's horizon) the next workers take ``min_steps``
    each until the budget is spent, rather than every worker a sliver. (0, 0): nothing left."""
    share = free // max(idle, 1)
    if share < min_steps:
        share = min(min_steps, free)
    if share <= 0:
        return RolloutShare(0, 0)
    whole = min(envs, share // max_episode_steps)
    return RolloutShare(whole, max_episode_steps) if whole else RolloutShare(1, share)


class PendingCheckpoint(NamedTuple):
    states: List[ray.ObjectRef]  # the learner's and the replay's state_dict calls
    run: Dict[str, int]  # the counters when they were asked
    evaluating: bool
    events: Dict[str, int]  # the event files' sizes, flushed first


class PendingEvaluation(NamedTuple):
    result: Future  # the evaluation's summary
    at: Dict[str, int]  # the counters of the checkpoint it evaluates, and its learner step
    thread: Optional[threading.Thread]  # None when the result is an earlier one's
    started: float  # time.perf_counter() when it started
    final: bool  # the run's last evaluation, at the end of its budget


class Counters:
    """Run progress that a checkpoint must carry to resume where it stopped."""

    FIELDS = ("env_steps", "updates", "episodes", "version", "worker_restarts", "skipped_updates", "rollouts",
              "failed_rollouts", "env_rebuilds", "rollout_timeouts", "phase2_ms")

    def __init__(self, **values):
        unknown = set(values) - set(self.FIELDS)
        if unknown:
            raise ValueError(f"unknown run counters {sorted(unknown)}; known: {list(self.FIELDS)}")
        for f in self.FIELDS:
            # 0 for a counter that a checkpoint of an older version did not have.
            setattr(self, f, int(values.get(f, 0)))

    def to_dict(self) -> Dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}


def budget_spent(cfg: Config, c: Counters) -> bool:
    """Whether phase 2's env-step or update budget is spent (they count the whole phase, across
    resumes; the wall-time budget counts each process from its start)."""
    o = cfg.online
    return bool(o.env_steps and c.env_steps >= o.env_steps or o.updates and c.updates >= o.updates)


def update_debt(cfg: Config, c: Counters) -> int:
    """Updates the env steps collected so far call for and the learner has yet to make."""
    return config_lib.updates_for(cfg, c.env_steps) - c.updates


def owed_updates(cfg: Config, c: Counters) -> int:
    """The :func:`update_debt` the learner will still make: within the update budget."""
    owed = update_debt(cfg, c)
    if cfg.online.updates:
        owed = min(owed, cfg.online.updates - c.updates)
    return owed


def finished_metrics(cfg: Config, run_dir: Path, state: Dict[str, object], c: Counters) -> Optional[Dict[str, object]]:
    """The metrics of the run in ``run_dir`` if it is over: its env-step or update budget spent
    (under ``cfg``, which a resume may have raised), no update owed that it would still make,
    and ``metrics.json`` an evaluation of its checkpoint's weights (the same counters and
    weights version), the final one."""
    if not budget_spent(cfg, c) or cfg.online.finish_updates and owed_updates(cfg, c) >= 1:
        return None
    # (Not by the checkpoint's evaluating mark: a Ctrl-C as the final evaluation ends writes the
    # same weights again, unmarked.)
    metrics = _metrics_on_disk(run_dir)
    same = (metrics is not None and all(metrics.get(k) == getattr(c, k) for k in ("env_steps", "updates"))
            and metrics.get("weights_version") == state.get("weights_version"))
    return metrics if same else None


def lowered_budget(cfg: Config, ran: Config, c: Counters) -> Optional[str]:
    """A warning where ``cfg``, a resume's config, has a budget spent that ``ran``, the run's own,
    had not: the resume's flags lowered it to what the run has done already, or below (a
    budget counts the whole phase 2, not from the resume). None otherwise."""
    if not budget_spent(cfg, c) or budget_spent(ran, c):
        return None
    o = cfg.online
    spent = ([f"online.env_steps {o.env_steps} (the run has collected {c.env_steps})"]
             * bool(o.env_steps and c.env_steps >= o.env_steps)
             + [f"online.updates {o.updates} (it has made {c.updates})"] * bool(o.updates and c.updates >= o.updates))
    owed = owed_updates(cfg, c) if o.finish_updates else 0
    then = (f"it makes the {_count(owed, 'update')} it owes, then its final evaluation" if owed >= 1
            else "its final evaluation comes next")
    return (f"warning: {' and '.join(spent)} {'are' if len(spent) > 1 else 'is'} spent already: a budget counts the whole phase 2, not from a "
            f"resume. The run collects nothing more; {then}. To train on, raise the budget above what the run has done")


def beats(new: Optional[float], old: Optional[float]) -> bool:
    """Whether mean return ``new`` makes a better best than ``old``. Not a NaN or missing one (a
    simulator's non-finite reward makes an episode's return NaN, and best.json keeps it as
    null): by ``>`` alone, one such best.pt stood for good, and every later evaluation lost to it."""
    def finite(x):
        return x is not None and math.isfinite(x)

    return finite(new) and (not finite(old) or new > old)


def describe_evaluation(summary: Dict[str, object], at: Dict[str, int], seconds: float) -> str:
    """One line of an evaluation for the terminal: a run's job log shows a run that gets worse
    without TensorBoard."""
    se = summary["return_se"]
    parts = [f"return {summary['return_mean']:.1f} (sd {summary['return_std']:.1f}"
             + (f", s.e. {se:.1f})" if se is not None else ")")]
    if summary["normalized_score"] is not None:
        score_se = summary["normalized_score_se"]
        parts.append(f"score {summary['normalized_score']:.2f}"
                     + (f" ± {score_se:.2f} s.e." if score_se is not None else ""))
    parts.append(f"{summary['terminations']} of {_count(summary['episodes'], 'episode')} terminated by the env")
    if summary["alignment_error"] is not None:
        parts.append(f"alignment error {summary['alignment_error']:.3f}")
    return (f"evaluation at env step {at['env_steps']}, update {at['updates']}: {', '.join(parts)} "
            f"({seconds:.0f} s)")


def _metrics_on_disk(run_dir: Path) -> Optional[Dict[str, object]]:
    """``metrics.json``, the last evaluation that ended, if it can be read."""
    try:
        metrics = json.loads((run_dir / METRICS).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _evaluated_update(run_dir: Path) -> Optional[int]:
    """The update of the last evaluation that ended (``metrics.json``), if any can be read."""
    try:
        return int(_metrics_on_disk(run_dir)["updates"])
    except (KeyError, TypeError, ValueError):
        return None


class OnlineRun:
    """Owns the actors of one run and the driver loop."""

    def __init__(self, cfg: Config, run_dir: Path, state: Dict[str, object], offline_episodes, counters: Counters, *,
                 replay_state: Optional[Dict[str, object]] = None, log: Callable[[str], None] = print,
                 progress: bool = True, on_evaluation: Optional[Callable[[Dict[str, object]], None]] = None,
                 rerun_unfinished_evaluation: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        # With a progress bar, a message goes above it rather than onto the end of its line.
        self.log = _above_progress_bars(log) if progress else log
        self.on_evaluation = on_evaluation
        self.counters = counters
        self.start_episodes = counters.episodes
        self.normalizer = Normalizer.from_state_dict(state["normalizer"])
        res = checked_resources(cfg, log)
        log(f"actors: {_count(cfg.online.num_actors, 'rollout actor')} x {_count(cfg.online.envs_per_actor, 'env')} "
            f"({res.actor_cpus:.3g} CPU each), learner on {'GPU' if res.learner_gpus else 'CPU'}")
        # What a crashed run logged past its checkpoint is logged again from it. (Before the
        # actors start, so that a failure here leaves none running.)
        resumed = counters.updates > 0 or counters.env_steps > 0
        # (cuda_rng: what a GPU learner's state carries; learner_num_gpus 0 asks for the CPU.)
        if resumed and "cuda_rng" in state and not res.learner_gpus and cfg.online.learner_num_gpus < 0:
            log("warning: this run's learner trained on a GPU, and resumes on CPU: no GPU it may use is up now "
                "(online.learner_num_gpus -1). It trains several times slower; --online.learner_num_gpus 1 waits "
                "for a GPU instead")
        dropped = drop_redone(run_dir, kept_before(lambda tag: getattr(counters, step_axis(tag))),
                              unchanged=state.get("events") if resumed else None)
        if dropped:
            log(f"TensorBoard: dropped {_count(dropped, 'point')} logged past the checkpoint, to be logged again")
        self.writer = SummaryWriter(str(run_dir))
        self.learner = self.replay = None
        self.workers: List = []
        # Evaluations run in this process: with the threads launch/evaluate.py gives them, so that
        # it judges a checkpoint as the run did (episodes are chaotic; a thread count changes them).
        # Until release(), which gives a library caller's own torch code its count back (here, right
        # before the try whose failure calls it).
        self.threads = contextlib.ExitStack()
        self.threads.enter_context(torch_threads(cfg.train.num_threads))
        try:
            # At the env step it starts (or resumes) from: a resume may override fields.
            self.writer.add_text(CONFIG_TEXT, config_lib.to_markdown(cfg), counters.env_steps)
            self.start_actors(cfg, res, state, offline_episodes, counters, replay_state, resumed)
        except BaseException:
            # A failure (a replay.pt that does not load, a full object store, a Ctrl-C) leaves
            # no actor holding the cluster's CPUs: a notebook or a Tune trial goes on after it.
            self.release()
            raise
        # Resumed from the checkpoint of an evaluation that never ended (the run was stopped or
        # killed during it): those weights are judged first, or they could never be best.pt.
        self.evaluate_first = (rerun_unfinished_evaluation and resumed and bool(state.get("evaluating"))
                               and _evaluated_update(run_dir) != counters.updates)
        self.weights_ref = None
        self.published_at = -1  # counters.updates when weights_ref was published
        self.rollouts: Dict[ray.ObjectRef, int] = {}  # running rollouts, by the worker running each
        self.submitted: Dict[ray.ObjectRef, float] = {}  # when each running rollout was submitted, oldest first
        self.adds: List[ray.ObjectRef] = []  # the replay's calls storing rollouts, until seen to succeed
        self.handed = [-1] * len(self.workers)  # the newest version handed to each worker
        self.dropped: Set[int] = set()  # workers that kept failing: no share of the budget, no weights
        self.ref_min, self.ref_max = config_lib.reference_returns(cfg)
        self.last_example = None
        self.train_ref = None  # the learner's call in flight
        self.train_since = self.next_train_note = 0.0  # when it started; when a long one is noted next
        # Offline windows are always there to train on; without them, the replay's episodes.
        self.replay_filled = cfg.online.offline_ratio > 0
        self.evaluation: Optional[PendingEvaluation] = None  # the one in flight
        self.stop_evaluation = threading.Event()  # asked before each of its plans
        self.evaluated: Optional[Tuple[int, int, Dict[str, object]]] = None  # the last one's learner step, update, result
        self._best: Optional[Dict[str, object]] = None  # best_so_far(), once read
        # The loop's state (run() sets the rest as it starts):
        self.interrupted: Optional[Interrupt] = None
        self.collecting = False  # rollouts start: budget is left and no Ctrl-C came
        self.draining = False  # after a Ctrl-C: the rollouts in flight are collected, nothing new starts
        self.promised: Dict[ray.ObjectRef, RolloutShare] = {}  # the budget's share of each running rollout
        self.parked: List[int] = []  # workers waiting for the learner to catch up, or for budget
        self.faults = WorkerFaults(len(self.workers), cfg.online.actor_max_restarts)
        self.said_slow = False  # that evaluations come due faster than they end
        self.figure_due = False  # a plan-vs-real figure, drawn once the next learner call is in flight
        self.due_checkpoint: Optional[PendingCheckpoint] = None  # written once the next learner call is in flight
        self.due_evaluation: Optional[PendingCheckpoint] = None  # begun then too (its checkpoint asked for)
        self.size_ref: Optional[ray.ObjectRef] = None  # the replay's size, asked with the learner's call in flight
        self.ahead: Optional[ray.ObjectRef] = None  # a full call's batches, sampled ahead for the next call
        self.next_ckpt = self.next_fig = 0  # the update at which each comes due
        self.next_eval: Optional[int] = None
        self.t0 = 0.0  # when the loop started: the wall-time budget counts from it
        # Phase 2's time across resumes (phase2_ms), counted on from this run's start: what a
        # run had is recorded, where its wall-time budget counts each process alone.
        self.started, self.ms_before = time.perf_counter(), counters.phase2_ms
        self.env_rate: Optional[RecentRate] = None
        self.update_rate: Optional[RecentRate] = None
        self.learner_seconds = 0.0  # in the learner's calls, this process
        self.busy_rate: Optional[RecentRate] = None  # of learner_seconds: the share of the time it computes
        self.bar: Optional[tqdm] = None

    def start_actors(self, cfg: Config, res: actors.Resources, state: Dict[str, object], offline_episodes,
                     counters: Counters, replay_state: Optional[Dict[str, object]], resumed: bool) -> None:
        """The learner (from ``state``), the replay (with ``replay_state`` when resuming) and the
        rollout actors, each kept as soon as it is made: a failure kills those made so far."""
        cfg_dict = cfg.to_dict()
        self.learner = actors.make_learner(cfg, res, config=cfg_dict, checkpoint=ray.put(pack_tensors(state)),
                                           version=counters.version, max_nonfinite=cfg.online.max_nonfinite,
                                           resumed=resumed)
        self.replay = actors.make_replay(
            offline_episodes=ray.put(offline_episodes) if cfg.online.offline_ratio > 0 else [],
            normalizer=self.normalizer.state_dict(), layout=layout_of(cfg), horizon=cfg.model.horizon,
            discount=cfg.data.discount, termination_penalty=cfg.data.termination_penalty,
            capacity=cfg.online.replay_capacity, offline_ratio=cfg.online.offline_ratio,
            value_target=cfg.data.value_target,
            return_weighting=cfg.online.return_weighting, offline_start_weight=cfg.online.offline_start_window_weight,
            online_start_weight=cfg.online.start_window_weight, time_limit=cfg.env.max_episode_steps,
            seed=cfg.train.seed, added_episodes=counters.episodes)
        if replay_state is not None:
            # Waited for: a replay.pt that does not load must stop the resume, not leave the
            # run to go on from an empty replay.
            try:
                dropped = ray.get(self.replay.load_state_dict.remote(pack_tensors(replay_state), counters.episodes))
            except RayTaskError as e:
                raise CheckpointError(f"{self.run_dir / REPLAY} does not load into the replay: {cause(e)}. "
                                      f"{without_replay(self.run_dir)}") from e
            except RayError as e:  # the actor itself: its process died, or its node
                raise RunFailed(f"the replay failed while loading {self.run_dir / REPLAY}: {cause(e)}") from e
            if dropped:
                self.log(f"{self.run_dir / REPLAY} holds {_count(dropped, 'episode')} newer than "
                         f"{self.run_dir / CHECKPOINT} (the run stopped between writing the two): dropped, to be "
                         "collected again")
        for i in range(cfg.online.num_actors):
            self.workers.append(actors.make_worker(cfg, res, config=cfg_dict, normalizer=self.normalizer.state_dict(),
                                                   worker_id=i))
        # Waited for while the workers start: a learner that cannot start (a GPU out of memory)
        # stops the run here, where each worker would otherwise fail for want of weights and be
        # counted as restarted. Nothing could plan before its first weights anyway.
        started = self.learner.node_id.remote()
        waited = 0
        # A GPU that exists but is held (another job, `ray job submit --entrypoint-num-gpus`)
        # would leave the run waiting without a word.
        while not ray.wait([started], timeout=LEARNER_WAIT_NOTE_S)[0]:
            waited += LEARNER_WAIT_NOTE_S
            asks = " and ".join(filter(None, [learner_asks(res), *(f"a node with {name!r}"
                                                                for name in res.learner_resources or {})]))
            self.log(f"the learner has not started after {waited:.0f} s (not placed yet, or still starting): it asks "
                     f"for {asks or 'no resources'}; `ray status` shows what the cluster has free")
        try:
            ray.get(started)
        except RayError as e:
            raise RunFailed(f"the learner failed to start: {cause(e)}") from e

    def kill_actors(self) -> None:
        for a in [*self.workers, self.replay, self.learner]:
            if a is not None:
                ray.kill(a)

    # ----- weights ---------------------------------------------------------------------------
    def broadcast(self) -> None:
        """Publish a new version and hand the one object, without waiting, to every worker with
        no rollout running. A busy worker gets it with its next rollout instead: a set_weights
        queued behind a long rollout would keep its version alive in the object store, and have
        the worker fetch and load every version published meanwhile, to use only the last."""
        self.weights_ref = self.learner.publish.remote()
        self.published_at = self.counters.updates
        self.counters.version += 1
        busy = set(self.rollouts.values())
        for i, w in enumerate(self.workers):
            if i not in busy and i not in self.dropped:
                w.set_weights.remote(self.weights_ref)
                # A worker in an unknown state (its last rollout failed: it may be restarting,
                # and then this call fails unseen) stays so until its next rollout.
                if self.handed[i] >= 0:
                    self.handed[i] = self.counters.version

    def drop(self, i: int, why: str) -> None:
        """Give up on worker ``i`` for the rest of this run: it is killed, so that its CPUs go
        back to the cluster and no broadcast is sent to it."""
        self.log(f"rollout actor {i} {why}; dropping it")
        self.dropped.add(i)
        ray.kill(self.workers[i], no_restart=True)

    def start_rollout(self, i: int, **share) -> ray.ObjectRef:
        """Worker ``i``'s next rollout, numbered within the run (a restarted actor or a resumed
        run never repeats the seeds of rollouts already delivered), preceded by the newest
        weights when the worker has not been handed them. Calls from one caller run in order;
        a separate call, not an argument of the rollout, so the version is not pinned in the
        object store for as long as the rollout runs."""
        if self.handed[i] != self.counters.version:
            self.workers[i].set_weights.remote(self.weights_ref)
        ref = self.workers[i].rollout.remote(self.counters.rollouts, **share)
        self.handed[i] = self.counters.version
        self.counters.rollouts += 1
        self.rollouts[ref] = i
        self.submitted[ref] = time.perf_counter()
        return ref

    def check_adds(self) -> None:
        """Raise if the replay failed to store a rollout's episodes (its calls are not waited for):
        they are counted, and a run that went on would train on what it had without a word."""
        if not self.adds:
            return
        done, self.adds = ray.wait(self.adds, num_returns=len(self.adds), timeout=0, fetch_local=False)
        try:
            ray.get(done)
        except RayError as e:
            raise RunFailed(f"the replay failed to store a rollout's episodes: {cause(e)}") from e

    def kill_overdue(self, now: float) -> None:
        """Kill the actor of each rollout submitted more than ``online.rollout_timeout_s`` ago
        that has not ended (once): its rollout then fails as any death does, and Ray restarts
        the actor unless its restarts are spent."""
        timeout = self.cfg.online.rollout_timeout_s
        if not timeout:
            return
        overdue = list(itertools.takewhile(lambda ref: now - self.submitted[ref] >= timeout, self.submitted))
        if not overdue:
            return
        # Not one whose result is in but not yet taken (the loop takes one a turn).
        _, running = ray.wait(overdue, num_returns=len(overdue), timeout=0, fetch_local=False)
        for ref in running:
            i, t = self.rollouts[ref], self.submitted.pop(ref)
            self.counters.rollout_timeouts += 1
            self.log(f"rollout actor {i}: its rollout has run for {now - t:.0f} s, past online.rollout_timeout_s "
                     f"{timeout:g}; killing the actor (Ray restarts it unless online.actor_max_restarts are spent)")
            ray.kill(self.workers[i], no_restart=False)

    # ----- checkpoints -----------------------------------------------------------------------
    def checkpoint(self, evaluating: bool = False) -> Dict[str, object]:
        """Write the learner's and the replay's state; returns the learner's. ``evaluating``:
        written for an evaluation of these weights, which a resume runs first unless
        ``metrics.json`` shows that it ended."""
        return self.write_checkpoint(self.request_checkpoint(evaluating))

    def request_checkpoint(self, evaluating: bool = False) -> PendingCheckpoint:
        """Ask the learner and the replay for their state, for :meth:`write_checkpoint`. Calls of
        one caller run in order, so calls made after these (the learner's next one) do not change
        what they return: the loop writes the checkpoint while the learner trains on."""
        # The learner's state is read after its call in flight (a Ctrl-C can come mid-call): the
        # counters must hold that call's updates too, or a resume would owe them again, and its
        # losses are logged (the loop, which logs the rest of a call's figures, has stopped).
        stats = self.settle_training()
        if stats is not None:
            self.log_losses(stats)
        if self.ms_before >= 0:  # (unknown for good where an older distdiff began the run)
            self.counters.phase2_ms = self.ms_before + int(1000 * (time.perf_counter() - self.started))
        # The events first: a checkpoint on disk has all it counts logged there too.
        events = flushed_sizes(self.writer)
        return PendingCheckpoint([self.learner.state_dict.remote(), self.replay.state_dict.remote()],
                                 self.counters.to_dict(), evaluating, events)

    def write_checkpoint(self, pending: PendingCheckpoint) -> Dict[str, object]:
        learner_state, replay_state = (self.state_of(who, ref) for who, ref in zip(("learner", "replay"), pending.states))
        self.check_adds()  # (those asked before ran before the replay's state_dict)
        save_checkpoint(self.run_dir / REPLAY, {"replay": replay_state})
        save_checkpoint(self.run_dir / CHECKPOINT, {**learner_state, "run": pending.run,
                                                    "evaluating": pending.evaluating, "events": pending.events})
        return learner_state

    def state_of(self, who: str, ref: ray.ObjectRef) -> Dict[str, object]:
        """An actor's state for a checkpoint, its tensors unpacked; one that died meanwhile stops
        the run, by name (nothing is written: the last checkpoint stays), and so does a learner
        that hangs past ``online.learner_timeout_s``, as it does in a call."""
        timeout = self.cfg.online.learner_timeout_s if who == "learner" else 0.0
        if timeout and not ray.wait([ref], timeout=timeout, fetch_local=False)[0]:
            raise RunFailed(f"the learner has not given its state for a checkpoint within online.learner_timeout_s "
                            f"({timeout:g} s): it hangs (a stuck GPU?); the last checkpoint stays")
        try:
            return unpack_tensors(ray.get(ref))
        except RayError as e:
            raise RunFailed(f"the {who} failed while its state was taken for a checkpoint: {cause(e)}") from e

    def start_evaluation(self, final: bool = False) -> None:
        """Checkpoint, then evaluate the newest weights, from a thread of this
        process beside the loop: rollouts and learner calls go on meanwhile (an evaluation of 100
        Walker2d episodes takes minutes of one core, which would leave every actor and the
        learner idle). The episodes run in that thread, or split between ``eval.num_actors``
        rollout workers, each beside its rollouts. :meth:`finish_evaluation` takes its result.
        ``final``: the run's last one, at the end of its budget (``"final"`` in its metrics; a
        sweep's scheduler may stop a trial at an earlier one)."""
        self.begin_evaluation(self.request_evaluation(), final)

    def request_evaluation(self) -> PendingCheckpoint:
        """The first half of :meth:`start_evaluation`: the checkpoint of the newest weights, asked
        for; the loop asks before the learner's next call and begins the evaluation (writing the
        checkpoint) while that call runs."""
        if self.published_at != self.counters.updates:
            # The version the checkpoint's weights go by is the one the actors get next.
            self.broadcast()
        return self.request_checkpoint(evaluating=True)

    def begin_evaluation(self, pending: PendingCheckpoint, final: bool = False) -> None:
        """The second half of :meth:`start_evaluation`: write ``pending`` and evaluate its weights."""
        state = self.write_checkpoint(pending)
        # The counters the checkpoint holds: its evaluation is reported at them, whenever it ends.
        at = {**pending.run, "weights_version": int(state["weights_version"]), "step": int(state["step"])}
        result: Future = Future()
        if self.evaluated is not None and self.evaluated[0] == at["step"]:
            # No update since the last evaluation (one came due with the last learner call): the
            # same weights, whose episodes would be the same too.
            self.log(f"evaluation: no update since the one at update {self.evaluated[1]}; its result stands")
            result.set_result(self.evaluated[2])
            self.evaluation = PendingEvaluation(result, at, None, time.perf_counter(), final)
            return

        # On eval.num_actors of the rollout workers at once, if any are asked for and the loop has
        # not given them all up (then it stops anyway); a task goes on without one it gives up.
        on_workers = self.cfg.eval.num_actors > 0 and len(self.dropped) < len(self.workers)

        def work() -> None:
            try:
                # The planner the checkpoint makes, so launch/evaluate.py on it judges the same
                # one (blended with the prior by online.prior_weight).
                planner = planner_from_checkpoint(state, self.cfg)
                if on_workers:
                    result.set_result(evaluate_on(self.workers, ray.put(weights_of(planner)), self.cfg,
                                                  stop=self.stop_evaluation.is_set, width=self.cfg.eval.num_actors,
                                                  usable=lambda i: i not in self.dropped))
                else:
                    result.set_result(evaluate(planner, self.cfg, stop=self.stop_evaluation.is_set))
            except BaseException as e:  # re-raised in the loop's thread, which takes the result
                result.set_exception(e)

        # A daemon, and stopped by close(): a run that ends with an evaluation in flight (a
        # second Ctrl-C, a failure) must not wait for it, nor leave it playing.
        thread = threading.Thread(target=work, name="evaluation", daemon=True)
        thread.start()
        self.evaluation = PendingEvaluation(result, at, thread, time.perf_counter(), final)

    def finish_evaluation(self) -> Dict[str, object]:
        """Wait for the evaluation in flight; the run's metrics summary, also written to
        ``metrics.json`` (so it holds the latest evaluation).

        ``on_evaluation`` (e.g. a Ray Tune report, which reports a copy of ``checkpoint.pt`` and
        ``replay.pt`` with the metrics) sees the metrics with the checkpoint of the same weights
        and ``metrics.json`` already on disk in the run dir. No checkpoint is written while an
        evaluation is in flight, so ``checkpoint.pt`` is still the one evaluated.
        """
        result, at, thread, started, final = self.evaluation
        # Kept in flight until it returns: a Ctrl-C during the wait leaves it for close() to stop.
        error = result.exception()
        if error is not None:
            # Its checkpoint stays marked (no metrics.json of it): a resume runs it again. Unless,
            # mid-run, take_evaluation checkpoints the training done since over it: a resume goes
            # on from those newer weights, and the failed evaluation's are not judged again.
            self.evaluation = None
            raise RunFailed(f"the evaluation at update {at['updates']} failed: {type(error).__name__}: {error}") from error
        summary = result.result()
        self.evaluated = (at["step"], at["updates"], summary)
        metrics = {
            **{k: summary[k] for k in (*EVAL_SCALARS, "return_std", "return_se", "normalized_score_se",
                                       "reference_returns", "alignment_error_per_step")},
            # (terminations are of these; "episodes", below, counts those collected online)
            "eval_episodes": summary["episodes"],
            **{k: at[k] for k in ("env_steps", "updates", "episodes", "weights_version", "worker_restarts",
                                  "skipped_updates", "failed_rollouts", "env_rebuilds", "rollout_timeouts")},
            # Phase 2's seconds up to the checkpoint evaluated, across resumes; and when this was
            # written, in UTC.
            "phase2_s": round(at["phase2_ms"] / 1000, 1) if at["phase2_ms"] >= 0 else None,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "final": final,
        }
        for key in EVAL_SCALARS:
            if metrics[key] is not None:
                self.scalar(f"eval/{key}", metrics[key], at)
        # The spread beside the mean (two evaluations a few points apart may differ by noise
        # alone), and a rate of falls that does not depend on eval.episodes.
        self.scalar("eval/return_std", summary["return_std"], at)
        self.scalar("eval/termination_rate", summary["terminations"] / summary["episodes"], at)
        if thread is not None:  # (not an earlier result that stands)
            seconds = time.perf_counter() - started
            self.scalar("perf/eval_seconds", seconds, at)
            self.log(describe_evaluation(summary, at, seconds))
        metrics["best"] = self.keep_if_best(metrics)
        write_json(self.run_dir / METRICS, metrics)
        # Only now: a run stopped before its result is written keeps the evaluation's checkpoint.
        self.evaluation = None
        if self.on_evaluation is not None:
            self.on_evaluation(metrics)
        return metrics

    def evaluate(self) -> Dict[str, object]:
        """Checkpoint and evaluate the newest weights, waiting for the result (the final
        evaluation); the metrics summary of :meth:`finish_evaluation`. A Ctrl-C raises during
        the wait only: one that came as the result is taken would leave it half taken (its
        TensorBoard points logged, metrics.json not written) for keep_on_interrupt to take again."""
        self.start_evaluation(final=True)
        self.evaluation.result.exception()
        with deferred_interrupt():  # (the result is in: a Ctrl-C now lets the run end as it would)
            return self.finish_evaluation()

    def best_so_far(self) -> Optional[Dict[str, object]]:
        """The metrics of the evaluation ``best.pt`` holds; None when there is none, or it cannot
        be read (then the next evaluation replaces it, with a warning). They are kept in
        ``best.pt`` itself, so that weights and metrics are written at once; ``best.json``,
        written after it, is their copy to read (and where a best.pt of an older distdiff
        keeps them)."""
        if self._best is None and (self.run_dir / BEST).is_file():
            try:
                self._best = load_checkpoint(self.run_dir / BEST).get("best") \
                    or json.loads((self.run_dir / BEST_METRICS).read_text())
            except (CheckpointError, OSError, ValueError) as e:
                self.log(f"warning: the best evaluation so far cannot be read ({e}); the next evaluation replaces "
                         f"{self.run_dir / BEST}")
        return self._best

    def keep_if_best(self, metrics: Dict[str, object]) -> Optional[Dict[str, object]]:
        """Write the checkpoint just evaluated, with its metrics, to ``best.pt`` if its mean return
        beats every earlier evaluation of this run dir (resumed runs included); the best one's
        metrics (None, or a best.json's null return, while no evaluation had a finite return)."""
        best = self.best_so_far()
        if beats(metrics["return_mean"], None if best is None else best["return_mean"]):
            best = {k: metrics[k] for k in BEST_KEYS}
            save_checkpoint(self.run_dir / BEST, {**load_checkpoint(self.run_dir / CHECKPOINT), "best": best})
            self._best = best
            write_json(self.run_dir / BEST_METRICS, best)
            self.log(f"best evaluation so far: return {best['return_mean']:.1f} at env step {best['env_steps']} "
                     f"-> {self.run_dir / BEST}")
        return best

    # ----- logging ---------------------------------------------------------------------------
    def step_of(self, tag: str, at: Optional[Dict[str, int]] = None) -> int:
        """The counter of the tag's axis (:func:`step_axis`): now, or ``at`` those counters."""
        return at[step_axis(tag)] if at is not None else getattr(self.counters, step_axis(tag))

    def scalar(self, tag: str, value: float, at: Optional[Dict[str, int]] = None) -> None:
        self.writer.add_scalar(tag, value, self.step_of(tag, at))

    def log_rollout(self, result: RolloutResult, cut: bool = False) -> None:
        """``cut``: the rollout ran on a share of the budget shorter than an episode. (Called with
        the rollout's env steps already counted.)"""
        log = self.scalar
        # Each episode at a step of its own, the env-step count once its steps are counted (the
        # rollout's episodes one after another, its last at the count now): TensorBoard keeps one
        # point per step, and showed one episode of each rollout's envs_per_actor.
        ended = self.counters.env_steps - sum(result.lengths)
        for episode, ret, n in zip(result.episodes, result.returns, result.lengths):
            ended += n
            at = {"env_steps": ended}
            # Comparable between whole episodes and those the env-step budget cut short.
            log("charts/reward_per_step", ret / n, at)
            if cut:
                # None of its episodes: those cut are not an episode's return (they would dip
                # every curve where a run ends), and keeping only those that fell before the
                # cut would leave the falls.
                continue
            log("charts/episode_return", ret, at)
            score = normalized_score(ret, self.ref_min, self.ref_max)
            if score is not None:
                log("charts/normalized_score", float(score), at)
            log("charts/episode_length", n, at)
            # 1 for an episode the env ended (on Walker2d, a fall): smoothed, the rate of falls.
            log("charts/terminated", float(episode.terminated), at)
        errors = result.plan_errors
        if len(errors):
            per_step = per_step_alignment_error(errors)
            log("rollout/alignment_error", mean_alignment_error(per_step))
            for j, v in enumerate(per_step):
                if np.isfinite(v):
                    log(f"rollout/alignment_error_step/{j:02d}", float(v))
        log("perf/weights_lag", self.counters.version - result.version)
        log("perf/env_steps_per_s", self.env_rate(time.perf_counter(), self.counters.env_steps))
        log("faults/worker_restarts", self.counters.worker_restarts)
        log("faults/failed_rollouts", self.counters.failed_rollouts)
        log("faults/env_rebuilds", self.counters.env_rebuilds)
        log("faults/rollout_timeouts", self.counters.rollout_timeouts)
        log("faults/dropped_workers", len(self.dropped))
        if result.example is not None:
            # A copy: its arrays are views of the rollout's object, which they would keep in the
            # object store, every episode of it, until the next example.
            example = type(result.example)(*(np.array(a, copy=True) for a in result.example))
            self.last_example = example, result.version

    def log_losses(self, stats: TrainStats) -> None:
        for k, v in stats.losses.items():
            self.scalar(k, v)
        self.scalar("faults/skipped_updates", self.counters.skipped_updates)

    def log_train(self, stats: TrainStats, replay_size: int) -> None:
        self.log_losses(stats)
        log = self.scalar
        log("perf/updates_per_s", self.update_rate(time.perf_counter(), self.counters.updates))
        log("perf/windows_per_s", stats.windows / max(stats.seconds, 1e-9))
        # Near 1: the learner is the bottleneck (actors wait, parked); well below: env steps are.
        log("perf/learner_busy", self.busy_rate(time.perf_counter(), self.learner_seconds))
        log("charts/learning_rate", stats.learning_rate)
        log("replay/size", replay_size)
        self.bar.set_postfix(updates=self.counters.updates, refresh=False)

    def log_figure(self) -> None:
        """Draw the latest rollout's example plan (:attr:`RolloutResult.example`), once: the figure
        is logged at the current update, and the plan was made with the weights its rollout
        started with, which its title names."""
        if self.last_example is None:
            return
        from distdiff.plots import plan_vs_real_dims, plan_vs_real_figure

        (example, version), env = self.last_example, self.cfg.env
        self.last_example = None
        states = self.normalizer.slice(layout_of(self.cfg).state_slice)
        error = mean_alignment_error(per_step_alignment_error(
            [alignment_errors(example.planned_states, example.reached_states, states)]))
        dims, actions = plan_vs_real_dims(env.id, env.obs_dim, env.act_dim)
        title = (f"the latest rollout's example: one episode's last measured plan (one in online.measure_every "
                 f"{self.cfg.online.measure_every}), "
                 f"by weights version {version} of {self.counters.version}: alignment error {error:.3f}")
        tag = "rollout/plan_vs_real"
        self.writer.add_figure(tag, plan_vs_real_figure(example, dims, actions, title), self.step_of(tag))

    # ----- the loop --------------------------------------------------------------------------
    def budget_left(self, t_start: float) -> bool:
        """Env-step and update budgets count the whole phase 2, across resumes; wall time this
        process."""
        return not budget_spent(self.cfg, self.counters) and not self.out_of_time(t_start)

    def rollout_share(self, free: int, idle: int) -> RolloutShare:
        return rollout_share(free, idle, self.cfg.online.envs_per_actor, self.cfg.env.max_episode_steps,
                             self.cfg.model.horizon)

    def log_budget_share(self) -> None:
        """Says so when the env-step budget is too small for whole episodes on every env."""
        o = self.cfg.online
        if not o.env_steps:
            return
        left = o.env_steps - self.counters.env_steps
        share = self.rollout_share(left, len(self.workers))
        head = f"budget: {left} env steps left for {_count(len(self.workers), 'actor')} x {_count(o.envs_per_actor, 'env')}"
        if share.max_steps < self.cfg.env.max_episode_steps:
            self.log(f"{head}: each rollout runs one env, its episode cut at {share.max_steps} steps; raise "
                     "online.env_steps or lower online.num_actors for whole episodes")
        elif share.envs < o.envs_per_actor:
            self.log(f"{head}: each rollout runs {share.envs} of its envs, for whole episodes; raise "
                     "online.env_steps or lower online.envs_per_actor to use them all")

    def out_of_time(self, t_start: float) -> bool:
        o = self.cfg.online
        return bool(o.wall_time_s) and time.perf_counter() - t_start >= o.wall_time_s

    def may_train(self, collecting: bool, t_start: float) -> bool:
        """Updates run while collecting and, with ``online.finish_updates``, after the env-step
        budget is spent until the owed ones are done (the wall-time budget still holds)."""
        return collecting or (self.cfg.online.finish_updates and not self.out_of_time(t_start))

    def owed_updates(self) -> int:
        return owed_updates(self.cfg, self.counters)

    def trains_on(self) -> bool:
        """Whether the learner has updates to make from here: budget is left to collect, or
        updates are owed that it may still make. If not, the final evaluation comes next."""
        return self.budget_left(self.t0) or self.may_train(False, self.t0) and self.owed_updates() >= 1

    def has_training_data(self) -> bool:
        """Whether the replay can sample a batch. With no offline data, only once it has stored
        an episode: it refuses non-finite ones, so the first rollouts may store nothing, and it
        never empties again. Asked, and waited for, only until then."""
        if not self.replay_filled:
            self.replay_filled = ray.get(self.replay.size.remote()) > 0
        return self.replay_filled

    def settle_training(self) -> Optional[TrainStats]:
        """Wait for the learner's call in flight, if any, and count its updates; its stats."""
        if self.train_ref is None:
            return None
        timeout = self.cfg.online.learner_timeout_s
        if timeout:
            # Not for ever on a learner that hangs: the loop checks the timeout at each turn, but
            # a checkpoint after a failed evaluation, or a Ctrl-C's, settles the call outside it.
            ray.wait([self.train_ref], timeout=max(0.0, self.train_since + timeout - time.perf_counter()),
                     fetch_local=False)
            self.stop_if_learner_hangs(time.perf_counter())
        try:
            # Kept until it returns: a Ctrl-C during the wait leaves it for the checkpoint to settle.
            stats = ray.get(self.train_ref)
        except RayError as e:  # its own error, its death, or Ray's memory monitor killing it
            self.train_ref = None
            if isinstance(e, RayTaskError) and isinstance(e.cause, RayActorError):
                # Its argument failed it: the replay's sample, the replay having died.
                raise RunFailed(f"the replay failed: {cause(e)}") from e
            if isinstance(e, RayTaskError):
                # Its own exception: the message keeps only the last line, the traceback is here.
                self.log(f"the learner's error, in the learner:\n{e}")
            raise RunFailed(f"the learner failed: {cause(e)}") from e
        self.train_ref = None
        self.counters.updates += stats.updates
        self.counters.skipped_updates += stats.skipped
        self.learner_seconds += stats.seconds  # (a call a checkpoint settles computed too)
        return stats

    def run(self, interrupted: Optional[Interrupt] = None) -> None:
        """Algorithm 2 until the budget is spent. Once ``interrupted`` is set (see
        :func:`deferred_interrupt`) it starts nothing new and raises KeyboardInterrupt when the
        rollouts and the evaluation in flight are in, or at its next turn once
        ``interrupted.again`` is set. Once per OnlineRun: the loop's state starts in __init__."""
        o, c = self.cfg.online, self.counters
        self.interrupted = interrupted
        self.broadcast()
        self.t0 = time.perf_counter()
        self.collecting = self.budget_left(self.t0)
        # (With nothing left to train, the final evaluation that follows judges the same weights.)
        if self.evaluate_first and self.trains_on():
            self.log(f"evaluation: the run stopped during the one at update {c.updates}, which runs again first")
            self.start_evaluation()
        self.evaluate_first = False
        if self.collecting:
            self.log_budget_share()
        # From here: the evaluation resumed above first writes its checkpoint, a wait that the
        # first minute's rates would count as training's.
        t_rates = time.perf_counter()
        self.env_rate, self.update_rate = RecentRate(t_rates, c.env_steps), RecentRate(t_rates, c.updates)
        self.busy_rate = RecentRate(t_rates, self.learner_seconds)
        self.next_ckpt, self.next_fig = self.after(o.checkpoint_every), self.after(o.figure_every)
        self.next_eval = self.after(o.eval_every) if o.eval_every else None
        self.bar = progress_bar(total=o.env_steps or None, initial=c.env_steps, desc="online", unit="step",
                                disable=not self.progress)
        if self.collecting:
            for i in range(len(self.workers)):
                self.submit(i)
        # Before the loop: a run resumed from a checkpoint taken while the learner lagged has
        # every worker parked, and only the learner's owed updates can start it.
        self.train_more()
        while self.rollouts or self.train_ref is not None or self.faults.waiting or self.evaluation is not None:
            self.turn()
        self.bar.close()
        # Not kept through the final evaluation: a full call's batches held in the object store.
        self.ahead = self.size_ref = None
        if self.stopping():  # (set while the last rollout ran, the loop may end before it drains)
            raise KeyboardInterrupt
        if self.collecting:
            # Nothing runs any more, and the budget is not spent. The learner and the replay
            # are sound: a resume (with working rollout actors) goes on from what they hold.
            self.checkpoint()
            if self.parked and not self.has_training_data():
                raise RunFailed(f"the replay refused every episode collected "
                                f"({c.episodes - self.start_episodes} since the run started: NaN or infinite values) "
                                f"and there is no offline data (online.offline_ratio 0): the learner has nothing "
                                f"to train on")
            if self.parked:
                raise RunFailed("rollouts are parked but neither the learner nor any rollout is running")
            raise RunFailed("no rollout actor is left alive")
        self.broadcast()

    def turn(self) -> None:
        """One turn of the loop: take one result (the learner's call first when it is done),
        start what it lets start, and write what came due while the learner trains on."""
        self.take_evaluation()
        if self.stopping() and self.interrupted.again.is_set():
            raise KeyboardInterrupt  # here, between results: the checkpoint follows
        if self.stopping() and not self.draining:
            self.start_draining()
        waiting = list(self.rollouts) + ([self.train_ref] if self.train_ref is not None else [])
        # The learner's call first when it is done: a driver with results queued up must not
        # keep the learner (a GPU) waiting, and which of several ready refs ray.wait picks
        # is not their order in the list.
        ready = ray.wait([self.train_ref], timeout=0)[0] if self.train_ref is not None else []
        if not ready and waiting:
            # A bounded wait: a Ctrl-C only sets a flag, which a wait for one long rollout
            # would leave unread.
            short = self.faults.waiting or self.evaluation is not None
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.25 if short else 1.0)
        now = time.perf_counter()
        self.kill_overdue(now)
        self.note_long_learner_call(now)
        self.stop_if_learner_hangs(now)
        for i in self.faults.due(now):
            if self.collecting:
                self.submit(i)
        if not ready:
            if not waiting:
                time.sleep(0.25)
            return
        if ready[0] is self.train_ref:
            self.take_training()
        elif not self.take_rollout(ready[0]):
            return
        self.train_more()
        if self.due_evaluation is not None:
            pending, self.due_evaluation = self.due_evaluation, None
            self.begin_evaluation(pending)
        if self.due_checkpoint is not None:
            # Written (up to ~45 MB, seconds on a slow disk) while the learner trains on.
            self.write_checkpoint(self.due_checkpoint)
            self.due_checkpoint = None
        if self.figure_due:
            # Drawn (about half a second of the driver) while the learner's next call runs,
            # not before it starts.
            self.figure_due = False
            self.log_figure()

    def after(self, every: int) -> int:
        """The first multiple of ``every`` past the updates so far: a resumed run keeps its
        schedule, and what came due late (during an evaluation) comes once."""
        return (self.counters.updates // every + 1) * every

    def stopping(self) -> bool:
        return self.interrupted is not None and self.interrupted.is_set()

    def start_draining(self) -> None:
        """After a Ctrl-C: collect the rollouts in flight, start nothing new. Their steps are
        mostly collected already: kept rather than run again after the resume. A second Ctrl-C
        stops the wait (the checkpoint still follows)."""
        self.draining, self.collecting = True, False
        self.faults.cancel_retries()
        what = [f"the {_count(len(self.rollouts), 'rollout')} in flight (to keep their steps)"] * bool(self.rollouts) \
            + ["the evaluation in flight (to keep its result)"] * (self.evaluation is not None)
        if what:
            self.log(f"interrupted: waiting for {' and '.join(what)} (Ctrl-C again to stop without them)")

    def submit(self, i: int) -> None:
        """Worker ``i``'s next rollout, with its share of the env-step budget; parked instead
        while the learner lags or no budget is free."""
        o, c = self.cfg.online, self.counters
        if self.stopping():
            return  # (the loop drains what runs at its next turn)
        # The whole debt, not its part within the update budget: near the budget's end (or all
        # along, with a budget below the lag) the ratio would hold no longer. Only while the
        # learner can pay it: a resume whose replay starts empty, with no offline data, owes
        # what the checkpoint owed, and the learner waits for the episodes parking would hold back.
        if update_debt(self.cfg, c) > o.max_update_lag and self.has_training_data():
            self.parked.append(i)
            return
        share = None
        if o.env_steps:
            free = o.env_steps - c.env_steps - sum(s.envs * s.max_steps for s in self.promised.values())
            share = self.rollout_share(free, len(self.workers) - len(self.dropped) - len(self.rollouts))
            if share.envs == 0:
                self.parked.append(i)
                return
        cut = {} if share is None else {"max_steps": share.max_steps, "n_envs": share.envs}
        ref = self.start_rollout(i, **cut)
        if share is not None:
            self.promised[ref] = share

    def submit_parked(self) -> None:
        waiting_workers, self.parked = self.parked, []
        for i in waiting_workers:
            self.submit(i)

    def note_long_learner_call(self, now: float) -> None:
        """Say, every LEARNER_CALL_NOTE_S, that the learner's call in flight has run that long
        (a call is seconds): a learner that hangs without dying (a stuck GPU) is stopped only by
        ``online.learner_timeout_s``, and the run would otherwise only stop moving."""
        if self.train_ref is None or now - self.next_train_note < LEARNER_CALL_NOTE_S:
            return
        self.next_train_note = now
        timeout = self.cfg.online.learner_timeout_s
        then = (f"the run stops if it reaches online.learner_timeout_s {timeout:g}" if timeout else
                "a learner that hangs is not stopped (online.learner_timeout_s 0): stop the run (Ctrl-C, again until "
                "it stops waiting for the learner), and --resume goes on from its last checkpoint")
        self.log(f"the learner's call of up to {self.cfg.online.updates_per_call} updates has run "
                 f"{now - self.train_since:.0f} s; {then}")

    def stop_if_learner_hangs(self, now: float) -> None:
        """Stop the run once the learner's call has run ``online.learner_timeout_s``: a learner
        that hangs without dying would hold the run, and the job's allocation, for ever. Nothing
        is checkpointed (the learner's state is out of reach); the last checkpoint stays."""
        timeout = self.cfg.online.learner_timeout_s
        if not timeout or self.train_ref is None or now - self.train_since < timeout:
            return
        # A call that has returned is not hung, however long the driver took to take its
        # result (a replay checkpoint written meanwhile, a Tune report's copy).
        if not ray.wait([self.train_ref], timeout=0, fetch_local=False)[0]:
            raise RunFailed(f"the learner's call of up to {self.cfg.online.updates_per_call} updates has run "
                            f"{now - self.train_since:.0f} s, past online.learner_timeout_s {timeout:g}: the learner "
                            f"is taken for hung (a stuck GPU, a node that stopped answering); --resume or --autoresume "
                            f"goes on from the last checkpoint in {self.run_dir}")

    def train_more(self) -> None:
        """Start the learner's next call if none runs and updates are owed."""
        o = self.cfg.online
        owed = self.owed_updates()
        if self.train_ref is None and owed >= 1 and not self.stopping() and self.may_train(self.collecting, self.t0) \
                and self.has_training_data():
            n = min(o.updates_per_call, owed)
            # Batches sampled ahead are a full call's; a shorter call (the last owed
            # updates) samples its own.
            batches = self.ahead if self.ahead is not None and n == o.updates_per_call \
                else self.replay.sample.remote(n, self.cfg.train.batch_size)
            self.train_ref = self.learner.train.remote(batches)
            self.train_since = self.next_train_note = time.perf_counter()
            self.size_ref = self.replay.size.remote()
            # The next call's batches, sampled while this one trains: after new episodes the
            # replay joins its windows first (~14 ms at 200k transitions, 64 ms at 1M, on
            # top of 7-9 ms for the sample), which a GPU learner would otherwise wait for.
            self.ahead = self.replay.sample.remote(o.updates_per_call, self.cfg.train.batch_size)

    def take_training(self) -> None:
        """The learner's call is done: count and log it, broadcast and evaluate as they come
        due, ask for the checkpoint and mark the figure that :meth:`turn` writes and draws once
        the next call is in flight, and restart the parked workers."""
        o, c = self.cfg.online, self.counters
        stats = self.settle_training()
        self.check_adds()
        try:
            size = ray.get(self.size_ref)
        except RayError as e:  # (by name: the run's error would say only "an actor of the run died")
            raise RunFailed(f"the replay failed: {cause(e)}") from e
        self.log_train(stats, size)
        # Counted from the last broadcast, an evaluation's included.
        if c.updates - self.published_at >= o.broadcast_every:
            self.broadcast()
        if c.updates >= self.next_fig:
            self.figure_due = True
            self.next_fig = self.after(o.figure_every)
        # While an evaluation runs, checkpoint.pt must stay the weights it evaluates (its
        # result may copy it to best.pt, or report it to Tune): what comes due meanwhile
        # waits for the first learner call after it ends, once however many came due.
        self.take_evaluation()
        idle = self.evaluation is None
        # Not of the run's last weights: the final evaluation, which follows, judges them. (Reported
        # as not final, a mid-run one there made a sweep's ASHA stop the trial at its max_t before
        # the final one ran.)
        eval_due = self.next_eval is not None and c.updates >= self.next_eval and not self.stopping() \
            and self.trains_on()
        if eval_due and not idle and not self.said_slow:
            self.said_slow = True
            self.log(f"evaluations come due faster than they end (the one at update "
                     f"{self.evaluation.at['updates']} still runs at update {c.updates}): each starts with the "
                     f"first learner call after the one before it ended; raise online.eval_every (now "
                     f"{o.eval_every}) for evenly spaced ones")
        eval_due = eval_due and idle
        if idle and c.updates >= self.next_ckpt:
            if not eval_due:  # an evaluation writes its own checkpoint first
                self.due_checkpoint = self.request_checkpoint()
            self.next_ckpt = self.after(o.checkpoint_every)
        if eval_due:
            # Begun (its checkpoint written, up to ~45 MB) once the learner's next call is in flight.
            self.due_evaluation = self.request_evaluation()
            self.next_eval = self.after(o.eval_every)
        self.collecting = self.collecting and self.budget_left(self.t0)
        if self.collecting:
            self.submit_parked()

    def take_rollout(self, ref: ray.ObjectRef) -> bool:
        """A rollout ended: store and log its episodes and start the worker's next one; False
        when it failed."""
        c = self.counters
        i = self.rollouts.pop(ref)
        share = self.promised.pop(ref, None)
        self.submitted.pop(ref, None)
        cut = share is not None and share.max_steps < self.cfg.env.max_episode_steps
        try:
            result = ray.get(ref)
        except RayError as e:
            self.rollout_failed(i, e)
            return False
        self.faults.delivered(i)
        c.env_rebuilds += result.env_rebuilds
        self.adds.append(self.replay.add_rollout.remote(ref))
        if len(self.adds) > 2 * len(self.workers):
            # Seen after each learner call, which a run that collects only never makes.
            self.check_adds()
        c.env_steps += result.env_steps
        c.episodes += len(result.episodes)
        self.bar.update(result.env_steps)
        self.log_rollout(result, cut)
        self.collecting = self.collecting and self.budget_left(self.t0)
        if self.collecting:
            # An episode that ended early (a fall) leaves its share of the budget to others.
            self.submit(i)
            self.submit_parked()
        # Actors waiting for the learner to catch up (online.max_update_lag), or, at the end, for budget.
        self.scalar("perf/parked_actors", len(self.parked))
        return True

    def rollout_failed(self, i: int, e: RayError) -> None:
        """Count a failed rollout (a death once, not each call that fails while Ray restarts
        the worker) and retry its worker after a pause, or drop it."""
        c = self.counters
        self.handed[i] = -1  # whatever it holds now, its next rollout brings the newest weights
        verdict = self.faults.failed(i, e, time.perf_counter(), retry=not self.stopping())
        if verdict.restart:
            c.worker_restarts += 1
            self.log(f"rollout actor {i} {verdict.what} (restart #{c.worker_restarts})")
        elif verdict.lost:
            c.failed_rollouts += 1
            if verdict.first:
                self.log(f"rollout actor {i} {verdict.what}")
        if verdict.drop is not None:
            self.drop(i, verdict.drop)
        elif verdict.notice is not None:
            self.log(f"rollout actor {i} {verdict.notice}")
        if self.collecting:
            # The failed rollout's promise is free again: a worker parked for want of budget
            # takes it (else a dropped worker's share would leave the run stopped short).
            self.submit_parked()

    def take_evaluation(self) -> None:
        """Take the evaluation in flight if it has ended. One that failed stops the run,
        after a checkpoint of the training done while it ran (no checkpoint waits for it
        any more)."""
        if self.evaluation is None or not self.evaluation.result.done():
            return
        try:
            self.finish_evaluation()
        except RunFailed:
            self.checkpoint()
            raise

    def keep_on_interrupt(self) -> Optional[Dict[str, object]]:
        """After a Ctrl-C: keep what the run did for ``--resume``. An evaluation in flight is
        stopped; it keeps its result if it ended meanwhile, else its checkpoint stays the run's.
        Otherwise the learner's and the replay's state are checkpointed. Returns the run's
        final metrics when its final evaluation had ended: the run is over, not interrupted."""
        # Saved with Ctrl-C deferred again: one pressed meanwhile must not raise inside a write.
        with deferred_interrupt() as again:
            if self.interrupted is not None and self.interrupted.again.is_set():
                # The loop took two already: the next stops at once (README: "a third").
                again.set()
            evaluation = self.evaluation
            if evaluation is not None:
                self.stop_evaluating()  # (returns at once if it has ended)
                error = evaluation.result.exception() if evaluation.result.done() else EvaluationStopped("playing")
                if error is None:
                    metrics = self.finish_evaluation()  # it ended meanwhile: its result is kept
                    if evaluation.final:
                        self.log("interrupted as the final evaluation ended: its result is kept, and the run is over")
                        return metrics
                    evaluation = None
                elif not isinstance(error, EvaluationStopped):
                    self.log(f"the evaluation at update {evaluation.at['updates']} failed: "
                             f"{type(error).__name__}: {error}")
                    evaluation = None
            if evaluation is not None:
                # Stopped without its result: checkpoint.pt is still the one it was judging,
                # marked so, and stays the run's, or those weights could never be judged again.
                updates = self.counters.updates - evaluation.at["updates"]
                steps = self.counters.env_steps - evaluation.at["env_steps"]
                # (Nothing since, for the final evaluation: said only where something is redone.)
                again = (f" (the {_count(updates, 'update')} and {_count(steps, 'env step')} since are done again)"
                         if updates or steps else "")
                self.log(f"interrupted during the evaluation at update {evaluation.at['updates']}: its checkpoint "
                         f"stays the run's, and the evaluation runs first on --resume {self.run_dir}{again}")
            else:
                self.log(f"interrupted: saving a checkpoint; resume with --resume {self.run_dir}")
                if self.train_ref is not None:
                    self.log(f"waiting for the learner's call in flight ({time.perf_counter() - self.train_since:.0f} "
                             "s so far) to count its updates: Ctrl-C again stops without this checkpoint (the last "
                             "one stays)")
                # (The learner or the replay dead meanwhile: RunFailed, naming it; the last checkpoint stays.)
                self.checkpoint()
        return None

    def stop_evaluating(self) -> None:
        """Stop the evaluation in flight, if any, before its next plan: its result is not wanted
        any more (the run ends), and it would compete for the CPUs with what remains."""
        self.stop_evaluation.set()
        if self.evaluation is not None and self.evaluation.thread is not None:
            self.evaluation.thread.join(timeout=60)

    def close(self) -> None:
        try:
            self.stop_evaluating()
        finally:
            # (A Ctrl-C while the evaluation stops must not leave the actors holding the cluster.)
            self.release()

    def release(self) -> None:
        """Give back what the run holds: the caller's torch threads, the actors and their CPUs,
        the event files."""
        self.threads.close()
        try:
            self.kill_actors()
        finally:
            # A writer whose directory went (read-only, full) raises its error again here: the
            # one that stopped the run was already raised.
            with contextlib.suppress(OSError):
                self.writer.close()


def resumed_counters(run_dir: Path, state: Dict[str, object]) -> Counters:
    """The counters of phase 2's checkpoint ``state``, read from ``run_dir``."""
    try:
        counters = Counters(**state["run"])
    except ValueError as e:
        raise CheckpointError(f"{run_dir / CHECKPOINT}: {e}") from e
    if "phase2_ms" not in state["run"]:
        counters.phase2_ms = -1  # an older distdiff's run, which did not count it: unknown, not 0
    return counters


class RunOver(NamedTuple):
    """A run that a resume finds over: its final metrics, and a line that says so."""
    metrics: Dict[str, object]
    message: str


def run_over(cfg: Config, run_dir: Path, state: Dict[str, object]) -> Optional[RunOver]:
    """Whether the run in ``run_dir``, resumed from ``state`` (:func:`resume_state`) under ``cfg``,
    is over (:func:`finished_metrics`). Asked before Ray starts, too: a resume of a run that is
    over needs no cluster."""
    if "run" not in state:  # stopped in phase 1
        return None
    counters = resumed_counters(run_dir, state)
    done = finished_metrics(cfg, run_dir, state, counters)
    if done is None:
        return None
    o = cfg.online
    budget = " and ".join([f"online.env_steps {o.env_steps}"] * bool(o.env_steps)
                          + [f"online.updates {o.updates}"] * bool(o.updates))
    return RunOver(done, f"{run_dir} is over: its budget ({budget}) is spent and {run_dir / METRICS} holds its final "
                         f"evaluation, at env step {counters.env_steps}, update {counters.updates}; raise the budget "
                         f"(--online.env_steps, --online.updates) to train on")


def resume_state(run_dir: Path) -> Dict[str, object]:
    """The checkpoint a resume of the run in ``run_dir`` continues from (:func:`resume_checkpoint`),
    loaded; refuses the run dir of an offline pretraining (launch/pretrain.py)."""
    path = resume_checkpoint(run_dir)
    best = run_dir / BEST
    state = load_own_checkpoint(path, otherwise=f", or start phase 2 from its best evaluation's weights: --init {best} "
                                                f"--run-dir NEW_DIR" if best.is_file() else "")
    if path == run_dir / CHECKPOINT and "run" not in state:
        raise CheckpointError(f"{run_dir} holds an offline pretraining run (launch/pretrain.py), which phase 2 "
                              f"does not continue: start phase 2 from it with --init {run_dir}")
    return state


def pretrain_phase(cfg: Config, run_dir: Path, *, resume: bool, overwrite: bool, log: Callable[[str], None],
                   progress: bool) -> Tuple[Config, Dict[str, object], LoadedDataset]:
    """Phase 1 of :func:`train`, into ``run_dir/pretrain`` (continued there on ``resume``): the
    config naming the dataset it trained on (the fallback, where one stood in), the prior's
    checkpoint, and the data."""
    # A cluster too small for the actors fails now, not after pretraining.
    checked_resources(cfg, log)
    # (A device that is not there fails here, before the old run goes.)
    device = resolve_device(cfg.train.device)
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.train.device == "auto" and device.type == "cpu" and gpus and cfg.train.steps:
        log(f"warning: the cluster has {gpus:g} GPU(s), and torch in this driver's process sees none: phase 1 trains "
            f"on CPU, several times slower. To pretrain on a GPU, run launch/pretrain.py where torch sees one, then "
            f"launch/train.py --init its checkpoint (README, Running on a cluster)")
    phase1 = run_dir / PRETRAIN / CHECKPOINT
    own = load_checkpoint(phase1)["config"]["data"]["dataset_id"] if resume and phase1.is_file() else None
    data = load_data(cfg, own=own, log=log)
    cfg = trained_on(cfg, data)
    # Once the data is had: the dataset named is the one trained on, the fallback where it stood in.
    # A resume of a run stopped in phase 1 continues pretraining from its own checkpoint.
    log(f"{'resuming ' if resume else ''}phase 1: offline pretraining on {cfg.data.dataset_id} ({cfg.train.steps} steps, "
        f"{device.type} of this driver's machine)")
    if overwrite:
        clear_run(run_dir)
    state = load_checkpoint(pretrain(cfg, run_dir / PRETRAIN, resume=resume, quiet=not progress, data=data))
    import torch

    if torch.cuda.is_initialized():
        # Phase 1 trained on a GPU in this process: its cached blocks go back before the
        # learner, which Ray may give the same GPU without counting them, starts.
        torch.cuda.empty_cache()
    return cfg, state, data


def train(cfg: Config, run_dir: str | Path, *, init: Optional[str | Path] = None,
          init_state: Optional[Dict[str, object]] = None, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print, progress: bool = True,
          on_evaluation: Optional[Callable[[Dict[str, object]], None]] = None,
          own_run_dir: bool = True) -> Dict[str, object]:
    """Phase 1 (pretraining, unless ``init``) then phase 2 (online alignment), then a final
    evaluation; ``resume`` continues the phase the run in ``run_dir`` stopped in, ``overwrite``
    clears the run there once the inputs have loaded (a ``run_dir`` that holds a run needs one of
    the two). Needs Ray initialized (see
    :func:`distdiff.distributed.cluster.connect`). Returns the final metrics, also written to ``metrics.json``;
    ``on_evaluation`` is called with each evaluation's metrics (every ``online.eval_every``
    updates and at the end), after the checkpoint is written.

    ``init_state``: ``init``'s contents, read already (a Tune trial gets them from the object
    store; ``init`` then only names them, and its node may not have the file).

    ``own_run_dir``: the checkpoint in ``run_dir`` was written by this run, beside its
    ``metrics.json`` (not so for a Tune trial, which may resume from another trial's
    checkpoint). A resume then runs first the evaluation of a checkpoint that never ended, and
    returns at once, starting nothing, when the run is over (its budget spent and its final
    evaluation in ``metrics.json``)."""
    run_dir = Path(run_dir)
    if init_state is not None and init is None:
        raise ValueError("init_state is the contents of init: give both")
    config_lib.validate(cfg)  # (a config made in code, e.g. by dataclasses.replace, was never checked)
    config_lib.check_trainable(cfg)
    check_new_run(run_dir, resume=resume, overwrite=overwrite)
    # Here, not when the first actor starts: that comes after pretraining.
    actors.check_code_on_every_node(DRIVER_CODE)
    replay_state = data = None
    if init is None and (not resume or resume_checkpoint(run_dir) != run_dir / CHECKPOINT):
        cfg, state, data = pretrain_phase(cfg, run_dir, resume=resume, overwrite=overwrite, log=log, progress=progress)
        counters = Counters()
    elif resume:
        state = resume_state(run_dir)
        counters = resumed_counters(run_dir, state)
        # Before the replay, which it does not need (a full one takes seconds to load).
        over = run_over(cfg, run_dir, state) if own_run_dir else None
        if over is not None:
            log(over.message)
            return over.metrics
        lowered = lowered_budget(cfg, config_lib.from_dict(state["config"]), counters)
        if lowered:
            log(lowered)
        if (run_dir / REPLAY).is_file():
            try:
                replay_state = load_checkpoint(run_dir / REPLAY)["replay"]
            except (CheckpointError, KeyError) as e:
                # The run's weights and counters are in checkpoint.pt, which loaded: say how to
                # go on without the episodes, as a resume does where replay.pt is missing.
                raise CheckpointError(f"{run_dir / REPLAY}, the replay's episodes, cannot be read ({e}). "
                                      f"{without_replay(run_dir)}") from e
        elif counters.episodes:
            log(f"warning: {run_dir / REPLAY} is missing: the replay starts empty, without the "
                f"{_count(counters.episodes, 'episode')} collected so far")
        log(f"resuming {run_dir} at env step {counters.env_steps}, update {counters.updates}")
    else:
        state = load_checkpoint(init) if init_state is None else init_state
        counters = Counters()
        log(f"phase 1 skipped: starting from {init}")
    # Fail here rather than inside an actor: nets that do not fit, another env, value target,
    # or noise schedule (check_made_with).
    planner_from_checkpoint(state, cfg)
    if data is None:
        data = load_data(cfg, own=state["config"]["data"]["dataset_id"] if resume else None, log=log)
        cfg = trained_on(cfg, data)
    prior_data = state["config"]["data"]["dataset_id"]
    if init is not None and prior_data != cfg.data.dataset_id:
        # Its normalizer and value statistics are that data's: say so, it may be a fallback.
        log(f"warning: {init} was pretrained on {prior_data!r}; phase 2 mixes in windows of {cfg.data.dataset_id!r} "
            f"(--dataset {prior_data} for the same data)")
    # Only now: a start that fails (no dataset, a checkpoint that does not fit) leaves no run dir,
    # or the run it was to overwrite.
    if overwrite and init is not None:  # (phase 1 cleared it before it began)
        actors.resources(cfg)  # a cluster too small for the actors fails first (OnlineRun says more)
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, run_dir / CONFIG)
    log(f"phase 2: online alignment with {_count(cfg.online.num_actors, 'actor')} -> {run_dir} (tensorboard --logdir {run_dir})")
    run = None
    try:
        run = OnlineRun(cfg, run_dir, state, data.episodes, counters, replay_state=replay_state, log=log,
                        progress=progress, on_evaluation=on_evaluation, rerun_unfinished_evaluation=own_run_dir)
        # The actors hold their own copies now: not kept in this process for the whole run (a
        # 1M-step dataset's episodes are ~100 MB, a full replay's state as much again).
        del data, replay_state, state
        # Ctrl-C during the loop is taken between results, never inside a TensorBoard write
        # (see deferred_interrupt): the first lets the rollouts in flight finish, a second
        # stops waiting for them; a third, or one in the final evaluation, raises at once.
        with deferred_interrupt(raise_at=3) as interrupted:
            run.run(interrupted)
        log("final evaluation")
        with sigterm_as_interrupt():
            metrics = run.evaluate()
    except (ObjectStoreFullError, OutOfDiskError) as e:
        raise RunFailed(f"Ray's object store is full, or the disk it spills to: {cause(e)}") from e
    except RayError as e:
        # The learner or the replay died or was killed (a rollout actor's death is handled in
        # the loop).
        raise RunFailed(f"an actor of the run died: {cause(e)}") from e
    except KeyboardInterrupt:
        if run is None:
            raise
        metrics = run.keep_on_interrupt()
        if metrics is None:
            raise
    finally:
        if run is not None:
            run.close()
    return metrics
