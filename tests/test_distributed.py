"""The distributed actor-learner on a real local Ray (2 CPUs, no dashboard)."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List
from unittest import mock

import numpy as np
import pytest
import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from _helpers import assert_same, ray_address_file_kept, script_in_process, snapshot, tiny_online_config
from distdiff import config as config_lib
from distdiff.checkpoint import load_checkpoint
from distdiff.distributed.cluster import RunFailed
from distdiff.distributed.driver import (Counters, OnlineRun, checked_resources, resume_checkpoint,
                                         rollout_share, train)
from distdiff.distributed.learner import Learner
from distdiff.distributed.messages import TensorBytes, pack_tensors, unpack_tensors
from distdiff.evaluation import EvaluationStopped
from distdiff.files import to_json
from distdiff.pretrain import load_windows, pretrain
from distdiff.rollout import make_env
from distdiff.rundir import CHECKPOINT
from distdiff.training import NonFiniteError, flat_weights

ROOT = Path(__file__).resolve().parents[1]
TAGS = [
    "charts/episode_return", "charts/normalized_score", "charts/episode_length", "charts/reward_per_step",
    "rollout/alignment_error", "losses/denoiser", "losses/value",
    "perf/env_steps_per_s", "perf/updates_per_s", "perf/weights_lag", "replay/size", "faults/worker_restarts",
    "eval/terminations", "eval/return_std", "eval/termination_rate", "perf/eval_seconds", "charts/terminated",
    "charts/learning_rate", "perf/learner_busy", "perf/parked_actors",
]


@pytest.fixture(scope="module")
def pretrained(tiny_dataset, tmp_path_factory):
    cfg = tiny_online_config(tiny_dataset)
    path = pretrain(cfg, tmp_path_factory.mktemp("pretrained"), quiet=True)
    return cfg, path


def start_run(cfg, run_dir, checkpoint_path, num_actors=None):
    """An OnlineRun from ``checkpoint_path`` whose loop has not run (``num_actors`` 1 for a test
    that uses none: each takes ~2 s to start here)."""
    if num_actors is not None:
        cfg = config_lib.from_dict({"online": {"num_actors": num_actors}}, cfg)
    state = load_checkpoint(checkpoint_path)
    data, _ = load_windows(cfg, None)
    return OnlineRun(cfg, Path(run_dir), state, data.episodes, Counters(), log=lambda s: None, progress=False)


def wait_until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds or ``timeout`` passes (generous: it returns as soon as
    the condition holds, and the machines run the suite at up to ~2.5x each other's speed); the
    test's assertions then tell which (a scripted evaluation waits for the loop this way, beside
    it, and must not raise there)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def scripted_summary(return_mean: float) -> dict:
    """What an evaluation returns, for tests that script it in place of the real one."""
    return {"episodes": 1, "return_mean": return_mean, "return_std": 0.0, "return_se": None,
            "normalized_score": return_mean / 10, "normalized_score_se": None, "terminations": 0,
            "reference_returns": [0.0, 1000.0], "alignment_error": 0.1, "alignment_error_per_step": [0.1]}


def read_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_two_worker_run_finishes_and_logs(ray_session, pretrained, tmp_path):
    cfg, ckpt = pretrained
    # References of 0 and 100 make every normalized score its return: scored against the config's.
    # Two envs per actor: a rollout of several episodes.
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.figure_every": 10, "eval.reference_returns": "0,100",
                                                     "online.envs_per_actor": 2, "online.env_steps": 400})
    metrics = train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False)
    assert metrics["normalized_score"] == pytest.approx(metrics["return_mean"]) and metrics["reference_returns"] == [0, 100]
    assert metrics["env_steps"] == cfg.online.env_steps
    assert metrics["updates"] > 0 and metrics["weights_version"] > 1
    # Updates owed to the last collected steps are run after collection ends.
    assert metrics["updates"] == int(cfg.online.updates_per_env_step * metrics["env_steps"])
    for key in ("return_mean", "normalized_score", "alignment_error", "env_steps", "updates", "weights_version"):
        assert metrics[key] is not None
    assert 0 <= metrics["terminations"] <= cfg.eval.episodes
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(to_json(metrics))
    acc = read_events(tmp_path)
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert not set(TAGS) - scalars, f"missing tags: {set(TAGS) - scalars}"
    assert "rollout/plan_vs_real" in images

    def values(tag):
        return [e.value for e in acc.Scalars(tag)]

    # Every point at a step of its own, in order: TensorBoard's default loader keeps one point per
    # step (this reader keeps them all), and showed one episode of each rollout.
    for tag in scalars:
        steps = [e.step for e in acc.Scalars(tag)]
        assert all(a < b for a, b in zip(steps, steps[1:])), (tag, steps)
    # The alignment error at every horizon step; at step 0 the plan starts at the real state.
    steps = sorted(t for t in scalars if t.startswith("rollout/alignment_error_step/"))
    assert steps == [f"rollout/alignment_error_step/{j:02d}" for j in range(cfg.model.horizon)]
    assert max(values(steps[0])) < 1e-5 and min(values(steps[-1])) > 0
    # A point per episode of its reward per step; its return, length and whether it fell only for
    # those the env ended (a fall or its time limit), not for those the budget's last share cut.
    assert len(values("charts/reward_per_step")) == metrics["episodes"]
    lengths, fell = values("charts/episode_length"), values("charts/terminated")
    assert 0 < len(lengths) == len(fell) == len(values("charts/episode_return")) <= metrics["episodes"]
    assert all(n == cfg.env.max_episode_steps or f == 1.0 for n, f in zip(lengths, fell))
    assert values("charts/normalized_score") == pytest.approx(values("charts/episode_return"))
    # The phase-2 rate, and the learner's share of the time; no fault in a run without any.
    rates = values("charts/learning_rate")
    assert rates == pytest.approx([cfg.train.lr * cfg.online.lr_scale] * len(rates), rel=1e-6)
    assert all(0 < b <= 1.05 for b in values("perf/learner_busy"))
    assert set(values("faults/worker_restarts")) == {0}
    assert min(values("perf/weights_lag")) >= 0
    # The replay only grows (its capacity holds the whole budget), up to what was collected.
    sizes = values("replay/size")
    assert sizes == sorted(sizes) and 0 < sizes[-1] <= metrics["env_steps"]
    assert all(np.isfinite(values("losses/denoiser"))) and all(np.isfinite(values("losses/value")))
    # The config beside the curves, in TensorBoard's Text tab: what the run was.
    [text] = acc.Tensors("config/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert f"|online.env_steps|{cfg.online.env_steps}|" in table and f'|data.dataset_id|"{cfg.data.dataset_id}"|' in table


def test_a_rollout_actor_is_named_by_its_worker_id():
    # Ray prefixes what an actor's process prints with its repr (seen on a local cluster, Ray
    # 2.60: "(RolloutWorker(worker_id=3) pid=...)"), where 32 workers printed as one class name.
    from distdiff.distributed.actors import RayRolloutWorker

    worker = RayRolloutWorker.__new__(RayRolloutWorker)
    assert repr(worker) == "RolloutWorker(worker_id=?)"  # (before its constructor has run)
    worker.worker_id = 3
    assert repr(worker) == "RolloutWorker(worker_id=3)"


def test_every_worker_plans_with_the_newest_weights(ray_session, pretrained, tmp_path):
    from distdiff.distributed.worker import RolloutWorker
    from distdiff.training import flat_weights

    class Inspectable(RolloutWorker):
        def held_weights(self):
            return {name: flat_weights(net) for name, net in self.acting.nets.items()}

    cfg, ckpt = pretrained
    with rollout_actors_of(Inspectable, range(cfg.online.num_actors)):
        run = start_run(cfg, tmp_path, ckpt)
    try:
        published = []
        for _ in range(3):
            # Updates between versions, so each version's weights differ from the last.
            ray.get(run.learner.train.remote(run.replay.sample.remote(2, cfg.train.batch_size)))
            run.broadcast()
            published.append(ray.get(run.weights_ref).weights)
        results = ray.get([w.rollout.remote() for w in run.workers])
        assert [r.version for r in results] == [run.counters.version] * len(run.workers) == [3, 3]
        assert not np.array_equal(published[0]["denoiser"], published[2]["denoiser"])
        for held in ray.get([w.held_weights.remote() for w in run.workers]):
            # (the dynamics model is only published when the run trains one)
            assert all(np.array_equal(held[k], v) for k, v in published[2].items())
    finally:
        run.close()


def test_a_busy_worker_gets_only_the_newest_version_with_its_next_rollout(ray_session, pretrained, tmp_path):
    # Versions published during a rollout are not queued behind it: each would stay alive in
    # the object store and be loaded in turn, to be replaced at once by the next.
    from distdiff.distributed.worker import RolloutWorker

    class Recording(RolloutWorker):
        def set_weights(self, payload):
            if payload.version > self.acting.version:
                self.loaded = getattr(self, "loaded", []) + [payload.version]
            return super().set_weights(payload)

        def rollout(self, task=None, **kwargs):
            time.sleep(2.0)  # long enough for the broadcasts below to come while it runs
            return super().rollout(task, **kwargs)

        def loaded_versions(self):
            return self.loaded

    cfg, ckpt = pretrained
    with rollout_actors_of(Recording):
        run = start_run(cfg, tmp_path, ckpt)
    try:
        run.broadcast()
        busy = run.start_rollout(0)
        for _ in range(5):
            run.broadcast()
        assert ray.get(run.workers[1].ping.remote()).version == 6, "an idle worker gets each version at once"
        assert ray.get(busy).version == 1
        run.rollouts.pop(busy)
        assert ray.get(run.start_rollout(0)).version == 6
        assert ray.get(run.workers[0].loaded_versions.remote()) == [1, 6]
    finally:
        run.close()


def plasma_usage():
    from ray._private.internal_api import memory_summary

    # This session's own cluster, not whatever Ray's address file last recorded.
    address = ray.get_runtime_context().gcs_address
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", memory_summary(address=address, stats_only=True))
    return int(m.group(1)), int(m.group(2))


def test_object_store_stays_flat_over_100_broadcasts(ray_session, pretrained, tmp_path):
    cfg, ckpt = pretrained
    run = start_run(cfg, tmp_path, ckpt)
    try:
        run.broadcast()
        ray.get([w.ping.remote() for w in run.workers])
        before = plasma_usage()
        # The weights live in the object store (objects under 100 KiB would be inlined and the
        # test would prove nothing).
        payload = ray.get(run.weights_ref)
        assert sum(w.nbytes for w in payload.weights.values()) > 100 * 1024
        del payload  # its arrays map the object: held, they would keep this version alive
        assert before[1] >= 1, before
        for _ in range(100):
            run.broadcast()
        assert ray.get([w.ping.remote() for w in run.workers])[0].version == 101
        # Old versions are freed once every actor has moved on (at most a couple stay alive),
        # asynchronously: on a loaded machine that can take a while.
        deadline = time.monotonic() + 120
        while True:
            after = plasma_usage()
            if (after[0] <= before[0] + 2 and after[1] <= before[1] + 2) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert after[1] <= before[1] + 2, (before, after)
        assert after[0] <= before[0] + 2, (before, after)
    finally:
        run.close()


def test_rollouts_share_the_budget_so_no_run_passes_it():
    # 32 actors x 16 envs x 1,000 steps would be 5x the default budget in their first rollouts.
    free, promised = 100_000, []
    for idle in range(32, 0, -1):
        share = rollout_share(free - sum(promised), idle, 16, 1000, 32)
        promised.append(share.envs * share.max_steps)
    assert sum(promised) <= free and max(promised) - min(promised) <= 1000
    # Whole episodes on as many envs as the share holds, rather than every env cut at ~195 steps.
    assert rollout_share(100_000, 32, 16, 1000, 32) == (3, 1000)
    assert rollout_share(10**6, 1, 16, 1000, 32) == (16, 1000)
    # Less than an episode: one env, cut; less than a horizon each: the next workers take a horizon.
    assert rollout_share(1600, 2, 16, 1000, 32) == (1, 800)
    assert rollout_share(1600, 64, 16, 1000, 32) == (1, 32)
    assert rollout_share(10, 1, 16, 1000, 32) == (1, 10)
    assert rollout_share(0, 1, 16, 1000, 32) == (0, 0)


def test_a_budget_smaller_than_the_actors_episodes_runs_fewer_of_them_whole_and_holds(ray_session, pretrained,
                                                                                      tmp_path):
    cfg, ckpt = pretrained
    # 2 actors x 3 envs x 60-step episodes: 360 steps; a budget of 250 holds 2 whole episodes per actor
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.env_steps": 250, "online.envs_per_actor": 3})
    messages = []
    state = load_checkpoint(ckpt)
    data, _ = load_windows(cfg, None)
    run = OnlineRun(cfg, tmp_path, state, data.episodes, Counters(), log=messages.append, progress=False)
    results, log_rollout = [], run.log_rollout

    def log_recording(result, *args):
        results.append(result)
        log_rollout(result, *args)

    run.log_rollout = log_recording
    try:
        run.run()
        stored = unpack_tensors(ray.get(run.replay.state_dict.remote()))
    finally:
        run.close()
    assert run.counters.env_steps == cfg.online.env_steps
    assert int(stored["lengths"].sum()) == run.counters.env_steps
    assert any("each rollout runs 2 of its envs, for whole episodes" in m for m in messages), messages
    # Each actor's first rollout: 2 episodes, each ended by a fall or the time limit, not cut short.
    for i in range(cfg.online.num_actors):
        first = next(r for r in results if r.worker_id == i)
        assert len(first.episodes) == 2
        assert all(ep.terminated or len(ep) == cfg.env.max_episode_steps for ep in first.episodes), first.lengths


def test_a_run_resumed_while_the_learner_lagged_trains_then_collects(ray_session, pretrained, tmp_path):
    # Counters as a checkpoint taken mid-run leaves them: 1,000 env steps owe 200 updates, far
    # more than the lag at which rollouts wait for the learner.
    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.env_steps": 1100, "online.max_update_lag": 5})
    data, _ = load_windows(cfg, None)
    run = OnlineRun(cfg, tmp_path, load_checkpoint(ckpt), data.episodes, Counters(env_steps=1000, episodes=20),
                    log=lambda s: None, progress=False)
    submitted_at, start_rollout = [], run.start_rollout

    def start_recording(i, **share):
        submitted_at.append(run.counters.updates)
        return start_rollout(i, **share)

    run.start_rollout = start_recording
    try:
        run.run()
        stored = unpack_tensors(ray.get(run.replay.state_dict.remote()))
    finally:
        run.close()
    # Resumed without a replay.pt: the empty replay counts on from the run's 20 episodes, as the
    # checkpoint does (the count a later resume cuts the replay back to).
    assert stored["added_episodes"] == run.counters.episodes > 20
    # No rollout started before the learner was back within the lag of its 200 owed updates.
    assert submitted_at and min(submitted_at) >= 200 - cfg.online.max_update_lag
    assert run.counters.env_steps == 1100
    assert run.counters.updates == int(cfg.online.updates_per_env_step * 1100)


def test_a_checkpoint_counts_the_updates_of_the_learner_call_in_flight(ray_session, pretrained, tmp_path):
    # A second Ctrl-C can stop the run mid-call: the checkpoint then holds the learner's state
    # after that call, and its counters must hold the call's updates, or a resume owes them again.
    cfg, ckpt = pretrained
    step0 = load_checkpoint(ckpt)["step"]
    run = start_run(cfg, tmp_path, ckpt, num_actors=1)
    try:
        run.train_ref = run.learner.train.remote(run.replay.sample.remote(3, cfg.train.batch_size))
        # The first Ctrl-C's wait for that call, cut short by a second one:
        with mock.patch.object(ray, "get", side_effect=KeyboardInterrupt):
            with pytest.raises(KeyboardInterrupt):
                run.settle_training()
        assert run.train_ref is not None, "the call is still to be counted"
        run.checkpoint()
    finally:
        run.close()
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == step0 + 3 and saved["run"]["updates"] == 3 and run.train_ref is None
    # and logged: a resume goes on from update 3, and would leave no point for that call
    assert [e.step for e in read_events(tmp_path).Scalars("losses/denoiser")] == [3]


@ray.remote
class Unbuildable:
    """A rollout actor whose constructor raises, as a restart that cannot build its envs would."""

    def __init__(self):
        raise RuntimeError("no env here")

    def rollout(self, *args, **kwargs):
        raise AssertionError("never runs")

    def set_weights(self, ref):
        raise AssertionError("never runs")


def test_an_actor_that_cannot_be_built_is_dropped_not_retried_forever(ray_session, pretrained, tmp_path):
    # With unlimited restarts (the default) only a constructor that raises makes a death final.
    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.num_actors": 1, "online.actor_max_restarts": -1})
    messages = []
    state = load_checkpoint(ckpt)
    data, _ = load_windows(cfg, None)
    run = OnlineRun(cfg, tmp_path, state, data.episodes, Counters(), log=messages.append, progress=False)
    try:
        ray.kill(run.workers[0])
        run.workers[0] = Unbuildable.remote()
        with pytest.raises(RunFailed, match="no rollout actor is left alive"):
            run.run()
    finally:
        run.close()
    assert any("rollout actor 0 cannot be restarted" in m and "no env here" in m for m in messages), messages
    assert run.counters.worker_restarts == 0
    # The learner and the replay were sound: what they held is kept for a resume.
    assert load_checkpoint(tmp_path / "checkpoint.pt")["run"] == run.counters.to_dict()
    assert (tmp_path / "replay.pt").is_file()


@contextlib.contextmanager
def rollout_actors_of(worker_class, worker_ids=(0,)):
    """Runs started meanwhile make their rollout actors ``worker_ids`` of ``worker_class`` (a
    RolloutWorker subclass local to a test, which Ray ships by value; this module is not
    importable there), with the options the run gives its own: made in their place, where
    replacing started ones would cost a process start each (~1 s here)."""
    from distdiff.distributed import actors

    real, local = actors.RolloutWorkerActor, ray.remote(concurrency_groups=actors.WORKER_GROUPS)(worker_class)

    class Either:
        @staticmethod
        def options(**options):
            def remote(**kwargs):
                return (local if kwargs["worker_id"] in worker_ids else real).options(**options).remote(**kwargs)

            return SimpleNamespace(remote=remote)

    with mock.patch.object(actors, "RolloutWorkerActor", Either):
        yield


def run_with_worker_class(worker_class, pretrained, tmp_path, worker_ids=(0,), before_run=None):
    """A run to its budget whose workers ``worker_ids`` are ``worker_class``; the run, its log
    and the replay's state at the end. ``before_run(run)`` is called once the actors are made."""
    cfg, ckpt = pretrained
    messages = []
    data, _ = load_windows(cfg, None)
    with rollout_actors_of(worker_class, worker_ids):
        run = OnlineRun(cfg, tmp_path, load_checkpoint(ckpt), data.episodes, Counters(), log=messages.append,
                        progress=False)
    try:
        if before_run is not None:
            before_run(run)
        run.run()
        stored = unpack_tensors(ray.get(run.replay.state_dict.remote()))
    finally:
        run.close()
    return run, messages, stored


def test_killed_worker_is_replaced_and_nothing_delivered_is_lost(ray_session, pretrained, tmp_path):
    # Staged through marker files, so the kill always lands mid-rollout and the restarted
    # worker always samples again: worker 0 blocks in its second rollout until it is killed,
    # and worker 1 holds its rollouts from the kill until worker 0 is back.
    from distdiff.distributed.worker import RolloutWorker

    marks = tmp_path / "marks"
    marks.mkdir()

    def wait_for(path: Path, timeout: float = 120.0) -> None:
        # Local, so Ray ships it with the actor class (this test module is not importable there).
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never appeared")
            time.sleep(0.05)

    class Staged(RolloutWorker):
        def rollout(self, task=None, **share):
            if self.worker_id == 0 and (marks / "killed").exists():
                if self.acting.version < 0:  # asked to sample before it was handed weights
                    (marks / "unarmed").touch()
                (marks / "back").touch()
            elif self.worker_id == 0 and self.tasks == 1:
                (marks / "in_flight").touch()
                time.sleep(300)
            elif self.worker_id == 1 and (marks / "killed").exists():
                wait_for(marks / "back")
            return super().rollout(task, **share)

    results, at_kill = [], {}

    def before_run(run):
        log_rollout = run.log_rollout

        def record(result, *args):
            results.append((result.worker_id, result.version, (marks / "killed").exists()))
            log_rollout(result, *args)

        run.log_rollout = record

        def killer():
            wait_for(marks / "in_flight")
            at_kill["version"] = run.counters.version
            (marks / "killed").touch()
            ray.kill(run.workers[0], no_restart=False)

        threading.Thread(target=killer, daemon=True).start()

    cfg = tiny_online_config(pretrained[0].data.dataset_id, **{"online.env_steps": 600})
    run, messages, stored = run_with_worker_class(Staged, (cfg, pretrained[1]), tmp_path, worker_ids=(0, 1),
                                          before_run=before_run)
    assert run.counters.worker_restarts == 1 and run.counters.failed_rollouts == 0, messages
    assert any("rollout actor 0 died" in m for m in messages), messages
    # Every delivered step is in the replay, and the budget was collected exactly.
    assert int(stored["lengths"].sum()) == run.counters.env_steps == cfg.online.env_steps
    assert stored["added_episodes"] == run.counters.episodes
    after = [version for worker, version, killed in results if worker == 0 and killed]
    assert after, "the restarted worker never delivered a rollout"
    # It was handed the weights published at the kill or later before it sampled, with its
    # first rollout (not a later broadcast's, after rollouts that failed for want of them).
    assert min(after) >= at_kill["version"]
    assert not (marks / "unarmed").exists()


def test_workers_whose_restarts_are_spent_are_dropped_at_once(ray_session, pretrained, tmp_path):
    # With one restart, Ray 2.60 reports a worker's first death inside a call as the actor being
    # unavailable, then its death for ever (tests/test_faults.py has the policy for each error).
    from distdiff.distributed.worker import RolloutWorker

    class DiesInEveryRollout(RolloutWorker):  # (local: Ray's workers cannot import this module)
        def rollout(self, task=None, **share):
            os._exit(1)

    cfg = tiny_online_config(pretrained[0].data.dataset_id, **{"online.actor_max_restarts": 1})
    messages = []
    data, _ = load_windows(cfg, None)
    with rollout_actors_of(DiesInEveryRollout, range(cfg.online.num_actors)):
        run = OnlineRun(cfg, tmp_path, load_checkpoint(pretrained[1]), data.episodes, Counters(), log=messages.append,
                        progress=False)
    try:
        with pytest.raises(RunFailed, match="no rollout actor is left alive"):
            run.run()
    finally:
        run.close()
    assert run.dropped == set(range(len(run.workers)))
    for i in run.dropped:
        assert any(f"rollout actor {i} died with its restarts spent (online.actor_max_restarts 1)" in m
                   for m in messages), messages
    # Not after MAX_STRIKES failed calls and their back-off (~23 s each), and no restart counted
    # that Ray did not make.
    assert not any("keeps failing" in m for m in messages), messages
    # One each: a death is counted once, not with each call that fails while Ray restarts it.
    assert run.counters.worker_restarts == len(run.workers)


def test_a_rollout_past_its_timeout_has_its_actor_restarted_and_the_run_finishes(ray_session, pretrained, tmp_path):
    from distdiff.distributed.worker import RolloutWorker

    hung = tmp_path / "hung"

    class HangsOnce(RolloutWorker):  # its second rollout, once in the whole run
        def rollout(self, task=None, **share):
            if self.tasks == 1 and not hung.exists():
                hung.touch()
                time.sleep(1800)
            return super().rollout(task, **share)

    # The workers are up before the loop times their rollouts (two starting at once on 2 cores
    # took ~2 s each on a fast day). A restarted actor's first rollout, its start included, may
    # still time out on a slow machine: a second failure in a row, which is no second restart
    # (test_faults.py), and the other worker takes over the shares, so the run ends all the same.
    cfg = tiny_online_config(pretrained[0].data.dataset_id, **{"online.rollout_timeout_s": 8.0})
    t0 = time.monotonic()
    run, messages, stored = run_with_worker_class(HangsOnce, (cfg, pretrained[1]), tmp_path, worker_ids=(0, 1),
                                                  before_run=lambda run: ray.get([w.ping.remote() for w in run.workers]))
    # (Far below the hang: the run did not wait for it, however loaded the machine.)
    assert hung.exists() and time.monotonic() - t0 < 600
    assert any("its rollout has run for" in m and "past online.rollout_timeout_s 8" in m for m in messages), messages
    # Killed and restarted as after any death.
    c = run.counters
    assert c.rollout_timeouts >= 1 and 1 <= c.worker_restarts <= c.rollout_timeouts and not run.dropped
    # The hung rollout's share of the budget was collected by the others: the run ended at it.
    assert int(stored["lengths"].sum()) == c.env_steps == cfg.online.env_steps
    assert read_events(tmp_path).Scalars("faults/rollout_timeouts")[-1].value == c.rollout_timeouts


def test_only_rollouts_still_running_past_their_timeout_have_their_actor_killed(ray_session, monkeypatch):
    run = OnlineRun.__new__(OnlineRun)  # what kill_overdue reads
    run.cfg = tiny_online_config("local/unused-v0", **{"online.rollout_timeout_s": 5.0})
    run.counters, run.log, run.workers = Counters(), lambda s: None, ["actor 0", "actor 1", "actor 2"]
    def sleep(seconds):
        time.sleep(seconds)

    sleeper = ray.remote(num_cpus=0)(sleep)
    ended, running, recent = ray.put(None), sleeper.remote(60), sleeper.remote(60)
    # (the one that ended has its result in, not yet taken by the loop)
    run.rollouts = {ended: 0, running: 1, recent: 2}
    run.submitted = {ended: 0.0, running: 1.0, recent: 99.0}
    killed = []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.append((actor, no_restart)))
    try:
        run.kill_overdue(100.0)
        assert killed == [("actor 1", False)] and run.counters.rollout_timeouts == 1
        assert list(run.submitted) == [ended, recent]
        run.kill_overdue(101.0)  # once
        assert len(killed) == 1
    finally:
        monkeypatch.undo()
        for ref in (running, recent):
            ray.cancel(ref, force=True)


def test_an_env_that_fails_is_rebuilt_and_the_task_runs_again_from_other_draws(pretrained):
    import mujoco

    from distdiff.distributed.worker import RolloutWorker

    cfg, ckpt = pretrained
    worker = RolloutWorker(config=cfg.to_dict(), normalizer=load_checkpoint(ckpt)["normalizer"], worker_id=0)
    try:
        worker.acting.version = 0  # (its initial weights do for this)
        envs, seeds, run = list(worker.acting.envs), [], worker._run

        def fails_first(acting, seed, **kwargs):
            seeds.append(seed)
            if len(seeds) == 1:
                raise mujoco.FatalError("mj_stackAlloc: insufficient memory")  # not a RuntimeError
            return run(acting, seed, **kwargs)

        with mock.patch.object(worker, "_run", side_effect=fails_first):
            result = worker.rollout(3, max_steps=5)
        assert result.env_rebuilds == 1 and result.env_steps > 0
        assert not set(map(id, worker.acting.envs)) & set(map(id, envs)), "the envs were not rebuilt"
        # The same draws would fail the same way: the retry has its own.
        assert len(seeds) == 2 and seeds[0] == worker._seed(3) and seeds[1] != seeds[0]
    finally:
        worker.close()


def test_a_worker_plans_only_with_weights_handed_to_it_and_returns_episodes_in_seed_order(pretrained):
    # Falls end first: a caller that keeps part of a rollout must not be keeping the shortest.
    from distdiff.distributed.worker import NoWeights, RolloutWorker

    cfg, ckpt = pretrained
    cfg = config_lib.from_dict({"online": {"envs_per_actor": 4}, "env": {"max_episode_steps": 40}}, cfg)
    worker = RolloutWorker(config=cfg.to_dict(), normalizer=load_checkpoint(ckpt)["normalizer"], worker_id=0)
    try:
        # Never with the random weights it is built with: a restarted process has no others.
        with pytest.raises(NoWeights):
            worker.rollout(5)
        worker.acting.version = 0  # (its initial weights do for this)
        result = worker.rollout(5)
        seed = worker._seed(5)
        env = make_env(cfg.env.id)
        starts = np.stack([env.reset(seed=seed + i)[0] for i in range(4)]).astype(result.episodes[0].observations.dtype)
        assert np.array_equal(np.stack([ep.observations[0] for ep in result.episodes]), starts)
        assert result.lengths == [len(ep) for ep in result.episodes]
    finally:
        worker.close()


def test_a_worker_whose_weights_failed_to_load_half_way_plans_with_none_of_them_and_says_why(pretrained):
    # Not NoWeights: that one reads as a restart Ray made unseen, and this worker was never restarted.
    from distdiff.distributed.collection import weights_of
    from distdiff.distributed.worker import NoWeights, RolloutWorker, WeightsNotLoaded
    from distdiff.training import planner_from_checkpoint

    cfg, ckpt = pretrained
    cfg = config_lib.from_dict({"online": {"envs_per_actor": 1}, "env": {"max_episode_steps": 10}}, cfg)
    state = load_checkpoint(ckpt)
    good = weights_of(planner_from_checkpoint(state, cfg))
    worker = RolloutWorker(config=cfg.to_dict(), normalizer=state["normalizer"], worker_id=0)
    try:
        assert worker.set_weights(good._replace(version=3)) == 3
        # The denoiser's loads, then the value's does not fit: the nets hold neither version.
        assert list(good.weights)[0] == "denoiser"
        broken = good._replace(version=4, weights={name: flat[:-1] if name == "value" else flat + 1
                                                   for name, flat in good.weights.items()})
        with pytest.raises(ValueError, match="flat weights have"):
            worker.set_weights(broken)
        with pytest.raises(WeightsNotLoaded, match=r"^weights version 4 failed to load: ValueError: flat weights have"):
            worker.rollout(0)
        assert not issubclass(WeightsNotLoaded, NoWeights)
        # The next version (a retry's) loads whole, and the worker plans with it.
        assert worker.set_weights(good._replace(version=5)) == 5
        assert worker.rollout(0).version == 5 and worker.load_failure is None
        assert np.array_equal(flat_weights(worker.acting.nets["denoiser"]), good.weights["denoiser"])
    finally:
        worker.close()


def test_a_workers_evaluation_plans_with_the_weights_it_is_given_and_starts_each_episode_where_evaluate_does(
        pretrained):
    from distdiff.distributed.collection import weights_of
    from distdiff.distributed.worker import NoWeights, RolloutWorker
    from distdiff.training import planner_from_checkpoint

    cfg, ckpt = pretrained
    # Phase 2's measure_every does not thin an evaluation's measures.
    cfg = config_lib.from_dict({"online": {"envs_per_actor": 1, "measure_every": 10**9}, "eval": {"num_envs": 3},
                                "env": {"max_episode_steps": 40}}, cfg)
    state = load_checkpoint(ckpt)
    weights = weights_of(planner_from_checkpoint(state, cfg))
    worker = RolloutWorker(config=cfg.to_dict(), normalizer=state["normalizer"], worker_id=1)
    try:
        results = worker.evaluate(2, 3, seed=50, weights=weights)
        # Episodes 2, 3, 4 of an evaluation on seed 50, whichever worker runs them.
        assert [r.seed for r in results] == [52, 53, 54]
        env = make_env(cfg.env.id)
        starts = np.stack([env.reset(seed=s)[0] for s in (52, 53, 54)]).astype(results[0].episode.observations.dtype)
        assert np.array_equal(np.stack([r.episode.observations[0] for r in results]), starts)
        assert all(len(r.plan_errors) == r.n_plans >= 1 for r in results)
        # Planned by nets of its own, which hold the weights given; the rollouts' hold none yet
        # (an evaluation beside a rollout must not change the weights it plans with).
        for name, flat in weights.weights.items():
            assert np.array_equal(flat_weights(worker.judging.nets[name]), flat)
            assert not np.array_equal(flat_weights(worker.acting.nets[name]), flat)
        with pytest.raises(NoWeights):
            worker.rollout(0)
        # The sampler's draws are the episodes' own, not the worker's: another worker runs the same.
        other = RolloutWorker(config=cfg.to_dict(), normalizer=state["normalizer"], worker_id=7)
        try:
            again = other.evaluate(2, 3, seed=50, weights=weights)
        finally:
            other.close()
        assert all(np.array_equal(a.episode.actions, b.episode.actions) for a, b in zip(results, again, strict=True))
        # Each task's weights are loaded, whatever version they carry.
        other_weights = weights._replace(weights={k: v + 0.01 for k, v in weights.weights.items()})
        worker.evaluate(0, 1, seed=50, weights=other_weights)
        assert np.array_equal(flat_weights(worker.judging.nets["denoiser"]), other_weights.weights["denoiser"])
    finally:
        worker.close()
    # Without the alignment error: no shadow envs, no measures.
    unmeasured = RolloutWorker(config=config_lib.from_dict({"eval": {"measure_alignment": False}}, cfg).to_dict(),
                               normalizer=state["normalizer"], worker_id=1)
    try:
        assert all(len(r.plan_errors) == 0 for r in unmeasured.evaluate(0, 1, seed=50, weights=weights))
        assert unmeasured.judging.shadows is None
    finally:
        unmeasured.close()


def test_a_planner_that_raises_is_not_taken_for_an_env_failure(pretrained):
    # Rebuilding the envs and running the task again cannot fix a planner.
    from distdiff.distributed.worker import PlanError, RolloutWorker
    from distdiff.rollout import NonFinitePlan

    cfg, ckpt = pretrained
    worker = RolloutWorker(config=cfg.to_dict(), normalizer=load_checkpoint(ckpt)["normalizer"], worker_id=0)
    try:
        worker.acting.version = 0  # (its initial weights do for this)
        with mock.patch.object(worker.acting.planner, "plan", side_effect=RuntimeError("shapes do not match")), \
                mock.patch.object(worker.acting, "make_envs") as make_envs:
            with pytest.raises(PlanError, match="shapes do not match"):
                worker.rollout(0)
        make_envs.assert_not_called()
        # Nor one that returns NaN actions, which MuJoCo would run as zero torque.
        real_plan = worker.acting.planner.plan

        def nan_actions(obs, generator=None):
            plan = real_plan(obs, generator=generator)
            return plan._replace(actions=np.full_like(plan.actions, np.nan))

        with mock.patch.object(worker.acting.planner, "plan", side_effect=nan_actions), \
                mock.patch.object(worker.acting, "make_envs") as make_envs:
            with pytest.raises(NonFinitePlan):
                worker.rollout(0)
        make_envs.assert_not_called()
    finally:
        worker.close()


@pytest.mark.parametrize("first_error, restarts, failed, said", [
    # Its envs failed twice in a row: a failed rollout.
    ("injected env failure", 0, 1, "rollout actor 0 failed a rollout"),
    # As a worker Ray restarted while it had no task running: it has no weights, and its next
    # rollout is the first the driver hears of the restart.
    ("no weights", 1, 0, "rollout actor 0 was restarted by Ray"),
])
def test_a_rollout_that_raises_is_retried_counted_and_the_run_goes_on(first_error, restarts, failed, said, ray_session,
                                                                      pretrained, tmp_path):
    from distdiff.distributed.worker import NoWeights, RolloutWorker

    error = NoWeights if first_error == "no weights" else RuntimeError

    class FailsOnce(RolloutWorker):
        def rollout(self, task=None, **share):
            if self.tasks == 0:
                self.tasks += 1
                raise error(first_error)
            return super().rollout(task, **share)

    run, messages, _ = run_with_worker_class(FailsOnce, pretrained, tmp_path)
    assert run.counters.worker_restarts == restarts and run.counters.failed_rollouts == failed
    assert run.counters.env_steps == pretrained[0].online.env_steps
    assert any(said in m for m in messages), messages


def test_a_worker_parked_for_budget_takes_over_the_share_of_one_that_keeps_failing(ray_session, pretrained, tmp_path):
    from distdiff.distributed.worker import RolloutWorker

    class AlwaysFails(RolloutWorker):
        def rollout(self, task=None, **share):
            time.sleep(1.0)  # holds its share of the budget meanwhile
            raise RuntimeError("injected env failure")

    run, _, _ = run_with_worker_class(AlwaysFails, pretrained, tmp_path)
    # Worker 1 runs out of unpromised budget while worker 0's doomed rollout holds its share;
    # each failure frees that share for it, so the run reaches its budget instead of stopping
    # short once worker 0 is dropped (179 of 200 steps before, when the learner had caught up).
    assert run.counters.env_steps == pretrained[0].online.env_steps
    assert run.counters.failed_rollouts >= 1


def test_with_no_offline_data_the_learner_waits_for_the_first_episode_the_replay_stores(ray_session, pretrained,
                                                                                       tmp_path):
    # The replay refuses non-finite episodes; each worker's first rollout brings only such.
    # Sampling an empty replay used to fail the learner's call, which stopped the run.
    from distdiff.distributed.worker import RolloutWorker

    class FirstRolloutNonFinite(RolloutWorker):
        def rollout(self, task=None, **share):
            result = super().rollout(task, **share)
            if self.tasks == 1:
                for ep in result.episodes:
                    ep.rewards[-1] = float("nan")
            return result

    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.offline_ratio": 0.0})
    run, _, stored = run_with_worker_class(FirstRolloutNonFinite, (cfg, ckpt), tmp_path, worker_ids=(0, 1))
    assert run.counters.env_steps == cfg.online.env_steps
    assert run.counters.updates == int(cfg.online.updates_per_env_step * cfg.online.env_steps)
    # Both first rollouts' episodes were refused, every later one stored.
    assert len(stored["lengths"]) == run.counters.episodes - 2 > 0


def test_workers_that_die_in_every_rollout_are_dropped_and_the_run_stops(ray_session, pretrained, tmp_path,
                                                                            monkeypatch):
    # As a worker that runs out of memory in every rollout: Ray restarts it (no restart limit)
    # each time, reports each death as the actor being unavailable, and it never delivers one.
    from distdiff.distributed import faults
    from distdiff.distributed.worker import RolloutWorker

    class DiesEveryTime(RolloutWorker):
        def rollout(self, task=None, **share):
            os._exit(1)

    monkeypatch.setattr(faults, "MAX_STRIKES", 3)
    monkeypatch.setattr(faults, "MAX_FAILING_S", 0.0)
    cfg, ckpt = pretrained
    messages = []
    data, _ = load_windows(cfg, None)
    with rollout_actors_of(DiesEveryTime, range(cfg.online.num_actors)):
        run = OnlineRun(cfg, tmp_path, load_checkpoint(ckpt), data.episodes, Counters(), log=messages.append,
                        progress=False)
    try:
        with pytest.raises(RunFailed, match="no rollout actor is left alive"):
            run.run()
    finally:
        run.close()
    assert sum("keeps failing (3 rollouts in a row" in m for m in messages) == len(run.workers), messages
    assert run.counters.worker_restarts == len(run.workers)  # once each, not once per failed call
    assert run.counters.env_steps == 0
    # Dropped for good: killed, so their CPUs go back to the cluster and no broadcast reaches them.
    for w in run.workers:
        with pytest.raises(RayActorError) as dead:
            ray.get(w.ping.remote(), timeout=60)
        assert not isinstance(dead.value, ActorUnavailableError)


def test_a_rollout_the_replay_failed_to_store_stops_the_run(ray_session):
    # The replay's calls are not waited for: its failure must not leave a run training on
    # offline windows alone for the rest of its budget.
    @ray.remote(num_cpus=0)
    def stored():
        return 60

    @ray.remote(num_cpus=0)
    def fails():
        raise ValueError("cannot store")

    run = OnlineRun.__new__(OnlineRun)
    run.adds = [stored.remote(), fails.remote()]
    ray.wait(run.adds, num_returns=2, fetch_local=False)
    with pytest.raises(RunFailed, match="the replay failed to store a rollout's episodes: .*cannot store"):
        run.check_adds()
    assert run.adds == []


def test_a_replay_checkpoint_that_does_not_load_stops_the_resume(ray_session, pretrained, tmp_path):
    from distdiff.checkpoint import CheckpointError

    cfg, ckpt = pretrained
    data, _ = load_windows(cfg, None)
    with pytest.raises(CheckpointError, match="replay.pt does not load into the replay: .*To resume without its "
                                              "episodes, move it out of"):
        OnlineRun(cfg, tmp_path, load_checkpoint(ckpt), data.episodes, Counters(env_steps=100),
                  replay_state={"lengths": torch.zeros(0, dtype=torch.long)}, log=lambda s: None, progress=False)


def test_a_damaged_replay_file_stops_the_resume_with_a_way_to_go_on(ray_session, pretrained, tmp_path):
    # It read as a damaged checkpoint, with no word that checkpoint.pt was sound.
    from distdiff.checkpoint import CheckpointError, save_checkpoint

    cfg, ckpt = pretrained
    save_checkpoint(tmp_path / "checkpoint.pt", {**load_checkpoint(ckpt), "run": Counters(env_steps=100).to_dict()})
    (tmp_path / "replay.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match="replay.pt, the replay's episodes, cannot be read .*To resume without "
                                              "its episodes, move it out of"):
        train(cfg, tmp_path, resume=True, log=lambda s: None, progress=False)


@pytest.mark.parametrize("failure", ["ctrl-c", "learner"])
def test_a_start_that_fails_midway_leaves_no_actor_holding_the_cluster(failure, ray_session, pretrained, tmp_path,
                                                                        monkeypatch):
    # As a Ctrl-C while the rollout actors start, or a learner that cannot start (a GPU out of
    # memory): in a notebook or a Tune trial the process goes on, and actors left alive would
    # hold the CPUs the next run waits for.
    from distdiff.distributed import actors
    from distdiff.distributed.actors import RayLearner

    class CannotStart(RayLearner):
        def __init__(self, **kwargs):
            raise RuntimeError("CUDA out of memory")

    made = []

    def recorded(make, worker=False):
        def wrapper(*args, **kwargs):
            if failure == "ctrl-c" and worker and len(made) == 3:
                raise KeyboardInterrupt
            made.append(make(*args, **kwargs))
            return made[-1]
        return wrapper

    def make_learner(cfg, res, **kwargs):
        return ray.remote(CannotStart).options(num_cpus=res.learner_cpus).remote(**kwargs)

    for name in ("make_learner", "make_replay", "make_worker"):
        make = make_learner if failure == "learner" and name == "make_learner" else getattr(actors, name)
        monkeypatch.setattr(actors, name, recorded(make, worker=name == "make_worker"))
    cfg, ckpt = pretrained
    data, _ = load_windows(cfg, None)
    # Said as such, not as each worker failing for want of the weights it never sent.
    with pytest.raises(KeyboardInterrupt) if failure == "ctrl-c" else \
            pytest.raises(RunFailed, match="the learner failed to start: .*CUDA out of memory"):
        OnlineRun(cfg, tmp_path, load_checkpoint(ckpt), data.episodes, Counters(), log=lambda s: None, progress=False)
    # The learner, the replay, and the rollout actors made before the failure.
    assert len(made) == (3 if failure == "ctrl-c" else 2 + cfg.online.num_actors)
    for actor in made:
        with pytest.raises(RayActorError):
            ray.get(actor.node_id.remote(), timeout=60)


def test_resume_continues_counters_and_replay(ray_session, pretrained, tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    from distdiff.distributed import driver

    cfg, ckpt = pretrained
    prior = load_checkpoint(ckpt)["ema_denoiser"]
    # Evaluations plan with a blend of the aligned nets and the prior phase 2 began with.
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.prior_weight": 0.25})
    evaluated = []
    real_evaluate = driver.evaluate

    def recording_evaluate(planner, cfg, **kwargs):
        evaluated.append({k: v.clone() for k, v in planner.denoiser.state_dict().items()})
        return real_evaluate(planner, cfg, **kwargs)

    monkeypatch.setattr(driver, "evaluate", recording_evaluate)
    spoiled = []  # (the learner actor's own copy)

    def one_nan_batch(batches):
        # The first call's first batch holds a NaN, once per learner: each run skips one update.
        if spoiled:
            return batches
        spoiled.append(True)
        return [batches[0]._replace(x_start=batches[0].x_start * float("nan")), *batches[1:]]

    learner_turning_after(0, one_nan_batch, monkeypatch)
    first = train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    # The NaN update was skipped and counted, and the update it was owed made instead.
    assert saved["run"]["skipped_updates"] == saved["skipped_updates"] == first["skipped_updates"] == 1
    assert first["updates"] == int(cfg.online.updates_per_env_step * first["env_steps"])
    assert saved["step"] - load_checkpoint(ckpt)["step"] == first["updates"]
    stored = load_checkpoint(tmp_path / "replay.pt")["replay"]
    replay_before = stored["added_episodes"]
    assert saved["run"]["env_steps"] == first["env_steps"] and saved["step"] > cfg.train.steps
    logged = read_events(tmp_path)
    # What a run killed past its checkpoint had logged, on both axes: the resume logs those
    # steps again, and TensorBoard must not draw both.
    crashed = SummaryWriter(str(tmp_path))
    crashed.add_scalar("losses/denoiser", 1e6, first["updates"] + 1)
    crashed.add_scalar("charts/episode_return", 1e6, first["env_steps"] + 1)
    crashed.close()
    longer = tiny_online_config(cfg.data.dataset_id, **{"online.prior_weight": 0.25,
                                                   "online.env_steps": 2 * cfg.online.env_steps})
    messages = []
    second = train(longer, tmp_path, resume=True, log=messages.append, progress=False)
    # The final evaluation ended (metrics.json holds it): it is not run again.
    assert len(evaluated) == 2 and not any("runs again first" in m for m in messages), messages
    resumed_events = read_events(tmp_path)
    for tag in ("losses/denoiser", "charts/episode_return", "eval/return_mean"):
        before, after = logged.Scalars(tag), resumed_events.Scalars(tag)
        assert [e.value for e in after[:len(before)]] == [e.value for e in before]  # the first run's, all kept
        assert all(e.value != 1e6 for e in after)
    steps = [e.step for e in resumed_events.Scalars("losses/denoiser")]
    assert steps == sorted(set(steps)) and steps[-1] == second["updates"]
    assert second["env_steps"] == 2 * cfg.online.env_steps > first["env_steps"]
    # The resumed replay went on from the saved one: its episodes first, then the new ones.
    resumed = load_checkpoint(tmp_path / "replay.pt")["replay"]
    n, steps = len(stored["lengths"]), int(stored["lengths"].sum())
    assert torch.equal(resumed["lengths"][:n], stored["lengths"])
    assert torch.equal(resumed["observations"][:steps + n], stored["observations"])
    assert int(resumed["lengths"].sum()) == second["env_steps"]
    # Rollouts are numbered on from where the first run stopped, so none repeats a seed: every
    # episode of both runs starts from a state of its own.
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    assert final["run"]["rollouts"] > saved["run"]["rollouts"] > 0
    starts = torch.cumsum(resumed["lengths"] + 1, 0) - (resumed["lengths"] + 1)
    assert len(torch.unique(resumed["observations"][starts], dim=0)) == len(resumed["lengths"])
    # Skipped updates are counted on, on both: each run skipped one.
    assert final["run"]["skipped_updates"] == second["skipped_updates"] == 2
    assert resumed_events.Scalars("faults/skipped_updates")[-1].value == 2
    # Phase 2's time goes on too (its wall-time budget counts each process alone): what a run had.
    assert final["run"]["phase2_ms"] > saved["run"]["phase2_ms"] > 0
    assert second["phase2_s"] == round(final["run"]["phase2_ms"] / 1000, 1) > first["phase2_s"] > 0
    assert second["written_at"].endswith("+00:00") and second["written_at"] >= first["written_at"]
    # The update count goes on from the first run's: what the whole budget owes, once.
    assert second["updates"] == int(longer.online.updates_per_env_step * second["env_steps"]) > first["updates"]
    assert final["step"] - saved["step"] == second["updates"] - first["updates"]
    assert second["weights_version"] > first["weights_version"]
    assert final["weights_version"] == final["run"]["version"] == second["weights_version"]
    replay_after = load_checkpoint(tmp_path / "replay.pt")["replay"]["added_episodes"]
    assert replay_after == replay_before + (second["episodes"] - first["episodes"])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] > saved["step"]
    # Through the resume, the prior is still the checkpoint phase 2 began with, not the resumed
    # weights, and the final evaluation planned with 3/4 of the aligned weights and 1/4 of it.
    assert all(torch.equal(final["prior"]["denoiser"][k], v) for k, v in prior.items())
    assert not all(torch.equal(final["ema_denoiser"][k], v) for k, v in prior.items())
    for k, v in evaluated[-1].items():
        torch.testing.assert_close(v, 0.75 * final["ema_denoiser"][k] + 0.25 * prior[k])


def test_best_evaluation_keeps_its_checkpoint_across_resumes(ray_session, pretrained, tmp_path, monkeypatch):
    from distdiff.checkpoint import save_checkpoint
    from distdiff.distributed import driver

    cfg, ckpt = pretrained
    # Broadcasts every 20 updates, evaluations every 10: half of the evaluations publish a
    # version of their own first.
    overrides = {"online.eval_every": 10, "online.broadcast_every": 20}
    cfg = tiny_online_config(cfg.data.dataset_id, **overrides)
    scores = iter([100.0, 200.0, 300.0, 150.0, 120.0, 110.0, 105.0, 250.0, 101.0, 102.0, 103.0, 104.0]
                  + [200.0 - k for k in range(20)])
    evaluated = []  # (score, the evaluated planner's denoiser weights)

    def scripted_evaluate(planner, cfg, **_):
        score = next(scores)
        evaluated.append((score, {k: v.clone() for k, v in planner.denoiser.state_dict().items()}))
        return scripted_summary(score)

    def resume(factor):
        messages = []
        longer = tiny_online_config(cfg.data.dataset_id, **overrides, **{"online.env_steps": factor * cfg.online.env_steps})
        return train(longer, tmp_path, resume=True, log=messages.append, progress=False), messages

    monkeypatch.setattr(driver, "evaluate", scripted_evaluate)
    reports = []
    first = train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False, on_evaluation=reports.append)
    assert len(evaluated) >= 3 and first["best"]["return_mean"] == 300.0 == max(s for s, _ in evaluated)
    # The last weights (40 updates, a multiple of eval_every) are judged once, by the final
    # evaluation: a mid-run one there, reported as not final, made ASHA stop a trial at its
    # max_t before its final one ran.
    assert [r["final"] for r in reports if r["updates"] == first["updates"]] == [True]
    assert len(evaluated) == len(reports) and reports[-1] == first
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best"] == first["best"]
    # best.pt holds the very weights that earned the best score, not the last broadcast's.
    weights = dict(evaluated)[300.0]
    assert all(torch.equal(best["ema_denoiser"][k], v) for k, v in weights.items())
    assert best["run"]["updates"] == first["best"]["updates"] < first["updates"]

    # A resumed run only replaces it with a better evaluation than every earlier one: by the
    # metrics best.pt carries, even where best.json (killed between writing the two) still
    # tells of an older, lower best.
    (tmp_path / "best.json").write_text(json.dumps({**first["best"], "return_mean": 100.0}))
    n_first = len(evaluated)
    second, _ = resume(2)
    later = [s for s, _ in evaluated[n_first:]]
    assert later and max(later) < 300.0
    assert second["best"] == first["best"]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == best["step"]

    # A best.pt of an older distdiff (metrics only in best.json), and a damaged best.json: the
    # next evaluations start the best again, with a warning.
    old = load_checkpoint(tmp_path / "best.pt")
    del old["best"]
    save_checkpoint(tmp_path / "best.pt", old)
    (tmp_path / "best.json").write_text('{"return_mean": 3')
    n_second = len(evaluated)
    third, messages = resume(3)
    assert any("best evaluation so far cannot be read" in m for m in messages), messages
    third_scores = [s for s, _ in evaluated[n_second:]]
    assert third["best"]["return_mean"] == max(third_scores) < 300.0
    assert load_checkpoint(tmp_path / "best.pt")["best"] == third["best"]


def test_the_loop_goes_on_while_an_evaluation_runs_and_best_pt_is_what_it_evaluated(ray_session, pretrained, tmp_path,
                                                                                    monkeypatch):
    from distdiff.distributed import driver

    cfg, ckpt = pretrained
    # Rollouts wait for the learner (it owes at most 10 updates), so they are still being
    # collected at the evaluation after 10 updates; checkpoints every 5 come due while it runs.
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.eval_every": 10, "online.checkpoint_every": 5,
                                                     "online.max_update_lag": 10, "online.env_steps": 400})
    log_rollout = OnlineRun.log_rollout
    evaluating = threading.Event()
    during = []  # env steps of the rollouts delivered while the first evaluation ran
    evaluated = []  # (return, the evaluated planner's denoiser weights)
    messages = []

    def log_and_count(self, *args):
        log_rollout(self, *args)
        if evaluating.is_set():
            during.append(self.counters.env_steps)

    def said_slow() -> bool:
        return any("evaluations come due faster than they end" in m for m in messages)

    def scripted_evaluate(planner, cfg, **_):
        if not evaluated:
            # The first one lasts until the loop has delivered two rollouts, and trained until
            # the next evaluation came due: a loop that waited for it would do neither, and
            # this would time out.
            evaluating.set()
            wait_until(lambda: len(during) >= 2 and said_slow())
            evaluating.clear()
        score = 300.0 if not evaluated else 100.0
        evaluated.append((score, {k: v.clone() for k, v in planner.denoiser.state_dict().items()}))
        return scripted_summary(score)

    begin_evaluation, training_meanwhile = OnlineRun.begin_evaluation, []

    def noting_the_learner(self, pending, final=False):
        if not final:
            training_meanwhile.append(self.train_ref is not None)
        begin_evaluation(self, pending, final)

    monkeypatch.setattr(OnlineRun, "log_rollout", log_and_count)
    monkeypatch.setattr(OnlineRun, "begin_evaluation", noting_the_learner)
    monkeypatch.setattr(driver, "evaluate", scripted_evaluate)
    metrics = train(cfg, tmp_path, init=ckpt, log=messages.append, progress=False)
    assert len(during) >= 2 and said_slow()
    # A mid-run evaluation's checkpoint is written while the learner's next call runs, not
    # before the call starts (the learner, a GPU, waited for the write).
    assert any(training_meanwhile), training_meanwhile
    best = metrics["best"]
    assert best["return_mean"] == 300.0 and best["env_steps"] < during[0] <= metrics["env_steps"]
    assert 10 <= best["updates"] < metrics["updates"]
    # The checkpoints that came due while it ran waited for it: best.pt is the checkpoint it
    # evaluated, with the counters it was reported at, not a later one.
    saved = load_checkpoint(tmp_path / "best.pt")
    assert all(torch.equal(saved["ema_denoiser"][k], v) for k, v in evaluated[0][1].items())
    assert saved["run"]["updates"] == best["updates"] and saved["run"]["env_steps"] == best["env_steps"]
    # Its learner state is the one those counters count: asked for before the next call, not after.
    assert saved["step"] - load_checkpoint(ckpt)["step"] == saved["run"]["updates"]


def test_an_evaluation_of_weights_already_evaluated_keeps_their_result(ray_session, pretrained, tmp_path, monkeypatch):
    from distdiff.distributed import driver

    cfg, ckpt = pretrained
    played = []

    def scripted_evaluate(planner, cfg, **_):
        played.append(True)
        return scripted_summary(5.0)

    monkeypatch.setattr(driver, "evaluate", scripted_evaluate)
    run = start_run(cfg, tmp_path, ckpt, num_actors=1)
    messages = []
    run.log = messages.append
    try:
        first = run.evaluate()
        run.counters.env_steps += 7  # collected since, but no update: the same weights
        second = run.evaluate()
    finally:
        run.close()
    assert len(played) == 1 and any("its result stands" in m for m in messages)
    assert second["return_mean"] == first["return_mean"] and second["env_steps"] == first["env_steps"] + 7
    assert json.loads((tmp_path / "metrics.json").read_text())["env_steps"] == second["env_steps"]


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGINT] * 2], ids=["ctrl-c", "ctrl-c twice"])
def test_ctrl_c_stops_between_results_with_a_resumable_checkpoint(signals, ray_session, pretrained, tmp_path,
                                                                   monkeypatch):
    # One Ctrl-C lets the rollouts in flight finish and keeps them; a second stops waiting. (So
    # does one SIGTERM, which sets both flags at once: test_training.py.)
    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.env_steps": 100_000})
    log_rollout = OnlineRun.log_rollout
    rollouts_logged, bookkeeping_finished = [], []

    def log_and_interrupt(self, *args):
        log_rollout(self, *args)
        rollouts_logged.append(self.counters.env_steps)
        if len(rollouts_logged) == 1:
            # Ctrl-C in the middle of the loop's bookkeeping (e.g. a TensorBoard write): it
            # must not raise here, only stop the loop between results.
            for sig in signals:
                signal.raise_signal(sig)
            bookkeeping_finished.append(True)

    monkeypatch.setattr(OnlineRun, "log_rollout", log_and_interrupt)
    messages = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, init=ckpt, log=messages.append, progress=False)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    presses = len(signals)
    assert bookkeeping_finished
    assert any("interrupted" in m for m in messages), messages
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    # No rollout started after the Ctrl-C; the other worker's, in flight then, was kept after
    # one press and left after two.
    assert saved["run"]["rollouts"] == 2
    assert len(rollouts_logged) == 3 - presses
    assert saved["run"]["env_steps"] == rollouts_logged[-1] > 0
    # Nor did a learner call start: none was in flight at the first result (a call in flight is
    # settled and counted: test_a_checkpoint_counts_the_updates_of_the_learner_call_in_flight).
    assert saved["step"] == load_checkpoint(ckpt)["step"] and saved["run"]["updates"] == 0


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_an_evaluation_waits_for_it_once_and_stops_it_twice(presses, ray_session, pretrained, tmp_path,
                                                                          monkeypatch):
    from distdiff.distributed import driver

    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.eval_every": 10, "online.max_update_lag": 10,
                                                     "online.env_steps": 100_000})
    messages, evaluations = [], []

    def interrupted_evaluate(planner, cfg, *, stop, **_):
        evaluations.append(threading.current_thread().name)
        # Played on until the loop has said what it waits for: it must not stop without this
        # result. (Each press waits for the one before: signals sent from a thread in a row
        # would merge into one.)
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: any("evaluation in flight" in m for m in messages))
        if presses == 2:
            # ...and after a second press, until the run stops it: it must not leave it playing.
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(stop)
            evaluations.append("stopped" if stop() else "not stopped")
            raise EvaluationStopped("stopped")
        return scripted_summary(300.0)

    monkeypatch.setattr(driver, "evaluate", interrupted_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, init=ckpt, log=messages.append, progress=False)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    if presses == 1:
        assert evaluations == ["evaluation"]
        assert any("waiting for" in m and "the evaluation in flight" in m for m in messages), messages
        # Its result was taken: the run's metrics, and best.pt with the weights it evaluated.
        reported = json.loads((tmp_path / "metrics.json").read_text())
        assert reported["return_mean"] == 300.0 and reported["updates"] >= 10
        assert load_checkpoint(tmp_path / "best.pt")["run"]["updates"] == reported["updates"]
        assert saved["run"]["updates"] >= reported["updates"]
    else:
        # Stopped when the run ended, without a result: its checkpoint stays the run's, marked,
        # so that a resume judges those weights first.
        assert evaluations == ["evaluation", "stopped"]
        assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "best.pt").exists()
        assert saved["run"]["updates"] >= 10 and saved["evaluating"]
        assert any("the evaluation runs first on --resume" in m for m in messages), messages


def test_an_evaluation_asks_its_stop_before_every_plan(pretrained):
    from distdiff.evaluation import evaluate
    from distdiff.training import planner_from_checkpoint

    cfg, ckpt = pretrained
    asked = []

    def stop_at_the_third_plan() -> bool:
        asked.append(True)
        return len(asked) == 3

    with pytest.raises(EvaluationStopped):
        evaluate(planner_from_checkpoint(load_checkpoint(ckpt), cfg), cfg, stop=stop_at_the_third_plan)
    assert len(asked) == 3


def test_a_failed_evaluation_stops_the_run_with_what_was_trained_meanwhile(ray_session, pretrained, tmp_path,
                                                                           monkeypatch):
    from distdiff.distributed import driver

    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.eval_every": 10, "online.max_update_lag": 10,
                                                     "online.env_steps": 100_000})
    log_train = OnlineRun.log_train
    calls_after = []  # learner calls taken while the evaluation ran
    failing = threading.Event()

    def count_calls(self, *args):
        log_train(self, *args)
        if failing.is_set():
            calls_after.append(self.counters.updates)

    def failing_evaluate(planner, cfg, **_):
        failing.set()
        wait_until(lambda: len(calls_after) >= 2)
        raise RuntimeError("an env blew up")

    monkeypatch.setattr(OnlineRun, "log_train", count_calls)
    monkeypatch.setattr(driver, "evaluate", failing_evaluate)
    with pytest.raises(RunFailed, match="evaluation at update .* failed: RuntimeError: an env blew up"):
        train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False)
    # The checkpoints that waited for the evaluation are written: nothing trained while it ran is lost.
    assert len(calls_after) >= 2
    assert load_checkpoint(tmp_path / "checkpoint.pt")["run"]["updates"] >= calls_after[-1]


def test_a_failed_final_evaluation_stops_the_run_and_a_resume_runs_it_again(ray_session, pretrained, tmp_path,
                                                                           monkeypatch, capsys):
    # As a run killed during an evaluation leaves its dir: a resume goes on from the checkpoint
    # of the weights it was judging, which without that evaluation could never become best.pt.
    from distdiff.distributed import driver

    cfg, ckpt = pretrained
    evaluated = []

    def failing_evaluate(planner, cfg, **_):
        raise RuntimeError("an env blew up")

    monkeypatch.setattr(driver, "evaluate", failing_evaluate)
    with pytest.raises(RunFailed, match="evaluation at update .* failed: RuntimeError: an env blew up"):
        train(cfg, tmp_path / "run", init=ckpt, log=lambda s: None, progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["evaluating"] and state["run"]["env_steps"] == cfg.online.env_steps
    assert not (tmp_path / "run" / "metrics.json").exists()
    shutil.copytree(tmp_path / "run", tmp_path / "longer")

    monkeypatch.setattr(driver, "evaluate", lambda planner, cfg, **_: evaluated.append(1) or scripted_summary(42.0))
    metrics = train(cfg, tmp_path / "run", resume=True, log=lambda s: None, progress=False)
    assert evaluated == [1] and metrics["return_mean"] == 42.0
    assert metrics["updates"] == state["run"]["updates"]  # the same weights, judged once

    def resume(factor):
        messages, reported = [], []
        longer = tiny_online_config(cfg.data.dataset_id, **{"online.env_steps": factor * cfg.online.env_steps})
        summary = train(longer, tmp_path / "longer", resume=True, log=messages.append, progress=False,
                        on_evaluation=lambda m: reported.append((m["updates"], m["final"])))
        return summary, messages, reported

    # With budget left, the evaluation runs first, then the run goes on; only the last one is
    # the run's final evaluation (which a sweep's ASHA ranks by).
    second, messages, reported = resume(2)
    assert reported[0] == (state["run"]["updates"], False) and reported[-1] == (second["updates"], True)
    assert state["run"]["updates"] < second["updates"] and second["final"] is True
    assert any("runs again first" in m for m in messages), messages
    # Nor is the final one of a run that is over run again: a resume with the same budget starts
    # no actor and logs nothing, and says how to go on.
    events = sorted(p.stat().st_size for p in (tmp_path / "longer").glob("events.out.tfevents.*"))
    again, messages, reported = resume(2)
    assert again == second == json.loads((tmp_path / "longer" / "metrics.json").read_text()) and reported == []
    assert any("is over" in m and "--online.env_steps" in m for m in messages), messages
    assert sorted(p.stat().st_size for p in (tmp_path / "longer").glob("events.out.tfevents.*")) == events

    # launch/train.py finds it over before it looks for Ray: no cluster starts to say so.
    from distdiff.distributed import cluster

    script = script_in_process("train", monkeypatch)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was looked for")

    monkeypatch.setattr(cluster, "connect", no_ray)
    assert script.main(["--resume", str(tmp_path / "longer"), "--online.env_steps", str(2 * cfg.online.env_steps)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'longer'} is over" in out
    assert json.loads(out.splitlines()[-2])["updates"] == second["updates"]


def test_an_actor_lost_while_saving_on_interrupt_fails_the_run_with_the_resume_advice(ray_session, pretrained, tmp_path,
                                                                                      monkeypatch):
    def run_then_interrupted_with_the_learner_gone(self, interrupted=None):
        ray.kill(self.learner)
        raise KeyboardInterrupt

    monkeypatch.setattr(OnlineRun, "run", run_then_interrupted_with_the_learner_gone)
    cfg, ckpt = pretrained
    # RunFailed, which train.py turns into the advice to resume from the last checkpoint, not a traceback.
    with pytest.raises(RunFailed, match="^the learner failed"):
        train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this driver's machine has a GPU: phase 1 trains there")
def test_phase_1_on_the_drivers_cpu_says_so_where_the_cluster_has_gpus(ray_session, tiny_dataset, tmp_path,
                                                                        monkeypatch):
    from distdiff.distributed import driver

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # after the lines that phase 1 starts with

    monkeypatch.setattr(driver, "pretrain", stop)
    for gpus in (0, 2):
        monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": float(gpus)})
        for device in ("auto", "cpu"):
            messages = []
            with pytest.raises(Stop):
                driver.pretrain_phase(tiny_online_config(tiny_dataset, **{"train.device": device}), tmp_path,
                                      resume=False, overwrite=False, log=messages.append, progress=False)
            assert any("phase 1: offline pretraining on" in m and "cpu of this driver's machine" in m
                       for m in messages), messages
            # Only where the GPUs are elsewhere and the user did not choose the CPU.
            warned = [m for m in messages if "the cluster has 2 GPU(s), and torch in this driver's process sees none" in m]
            assert len(warned) == (gpus == 2 and device == "auto"), messages
            assert all("launch/pretrain.py where torch sees one, then launch/train.py --init" in m for m in warned)


def learner_turning_after(updates: int, turn: Callable[[list], list], monkeypatch) -> None:
    """Make the runs' learner one that trains as its own for ``updates`` updates, then passes
    each call's batches through ``turn`` first (which may spoil them, or never return)."""
    from distdiff.distributed import actors
    from distdiff.distributed.actors import RayLearner

    class Turns(RayLearner):
        def train(self, batches):
            if self.trainer.step >= self.start + updates:
                batches = turn(batches)
            return super().train(batches)

        def ready(self):
            self.start = self.trainer.step

    def make_learner(cfg, res, **kwargs):
        learner = ray.remote(Turns).options(num_cpus=res.learner_cpus).remote(device="cpu", **kwargs)
        ray.get(learner.ready.remote())
        return learner

    monkeypatch.setattr(actors, "make_learner", make_learner)


def test_a_learner_that_hangs_stops_the_run_at_the_learner_timeout_with_its_last_checkpoint_intact(
        ray_session, pretrained, tmp_path, monkeypatch):
    # A stuck GPU: the call never returns and the actor never dies. Without the timeout the
    # run, and the job's allocation, would wait for ever.
    learner_turning_after(12, lambda batches: time.sleep(3600), monkeypatch)
    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.learner_timeout_s": 4.0})
    started = time.monotonic()
    with pytest.raises(RunFailed, match="past online.learner_timeout_s 4: the learner is taken for hung"):
        train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False)
    assert time.monotonic() - started < 600  # (far below the hang, however loaded the machine)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")  # the one at 10 updates, before it hung
    assert saved["run"]["updates"] == 10 and saved["step"] == load_checkpoint(ckpt)["step"] + 10


def test_a_learner_not_started_is_reported_while_the_run_waits_for_it(ray_session, pretrained, tmp_path, monkeypatch):
    from distdiff.distributed import driver

    class Stop(Exception):
        pass

    def stop(self, *args, **kwargs):
        raise Stop  # once the actors have started

    real_wait, unplaced = ray.wait, [2]

    def wait(refs, *args, timeout=None, **kwargs):
        if timeout == 1234.0 and unplaced[0]:  # the learner's wait: as if no node had room for it yet
            unplaced[0] -= 1
            return [], list(refs)
        return real_wait(refs, *args, timeout=timeout, **kwargs)

    monkeypatch.setattr(driver, "LEARNER_WAIT_NOTE_S", 1234.0)
    monkeypatch.setattr(driver.ray, "wait", wait)
    monkeypatch.setattr(OnlineRun, "run", stop)
    cfg, ckpt = pretrained
    messages = []
    with pytest.raises(Stop):
        train(cfg, tmp_path, init=ckpt, log=messages.append, progress=False)
    notes = [m for m in messages if "the learner has not started after" in m]
    assert len(notes) == 2 and "after 1234 s" in notes[0] and "after 2468 s" in notes[1], messages
    assert f"(not placed yet, or still starting): it asks for {cfg.online.learner_num_cpus:g} CPU;" in notes[0]


def test_a_run_whose_learner_trained_on_a_gpu_says_so_when_it_resumes_on_cpu(ray_session, pretrained, tmp_path,
                                                                            monkeypatch):
    class Stop(Exception):
        pass

    def stop(self, *args, **kwargs):
        raise Stop  # before any actor starts

    monkeypatch.setattr(OnlineRun, "start_actors", stop)
    cfg, ckpt = pretrained
    state = {**load_checkpoint(ckpt), "cuda_rng": torch.zeros(16, dtype=torch.uint8)}
    on_cpu = dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, learner_num_gpus=0.0))
    resumed = Counters(env_steps=100, updates=20)
    # A resume; --init; a resume told to stay on CPU.
    for run_cfg, counters, warned in ((cfg, resumed, True), (cfg, Counters(), False), (on_cpu, resumed, False)):
        messages = []
        with pytest.raises(Stop):
            OnlineRun(run_cfg, tmp_path, state, None, counters, log=messages.append, progress=False)
        assert any("learner trained on a GPU, and resumes on CPU" in m for m in messages) == warned, messages


def test_a_replay_that_died_is_named_not_the_learner_whose_call_it_failed(ray_session, pretrained, tmp_path,
                                                                         monkeypatch):
    real_run = OnlineRun.run

    def run_without_its_replay(self, interrupted=None):
        ray.kill(self.replay)  # as Ray's memory monitor or an OOM kill would
        return real_run(self, interrupted)

    monkeypatch.setattr(OnlineRun, "run", run_without_its_replay)
    cfg, ckpt = pretrained
    with pytest.raises(RunFailed, match="^the replay failed: "):
        train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False)


def test_a_full_object_store_is_said_so_not_an_actor_dying(ray_session, pretrained, tmp_path, monkeypatch):
    from ray.exceptions import ObjectStoreFullError

    def full(self, *args, **kwargs):
        raise ObjectStoreFullError("the replay's offline episodes do not fit")  # as ray.put raises it

    monkeypatch.setattr(OnlineRun, "start_actors", full)
    cfg, ckpt = pretrained
    with pytest.raises(RunFailed, match="^Ray's object store is full, or the disk it spills to: "):
        train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False)


def test_nan_batch_is_skipped_and_repeated_failure_stops(pretrained):
    cfg, ckpt = pretrained
    state = load_checkpoint(ckpt)
    learner = Learner(config=cfg.to_dict(), checkpoint=state, device="cpu", max_nonfinite=3)
    _, windows = load_windows(cfg, learner.trainer.normalizer)
    rng = np.random.default_rng(0)
    good = windows.sample(8, rng)
    bad = good._replace(x_start=good.x_start.clone())
    bad.x_start[0, 1, 0] = float("nan")
    before = snapshot(learner.trainer)
    stats = learner.train([bad])
    assert stats.skipped == 1 and stats.updates == 0
    # Nothing moved: nets, EMA copies, optimizer moments.
    assert_same(before, snapshot(learner.trainer))
    stats = learner.train([bad, good])
    assert stats.skipped == 1 and stats.updates == 1
    assert all(torch.isfinite(p).all() for p in learner.trainer.denoiser.parameters())
    with pytest.raises(NonFiniteError, match=r"3 non-finite updates in a row \(in the last: denoiser loss, value loss"):
        learner.train([bad, bad, bad])


def test_a_learner_whose_updates_turn_non_finite_stops_the_run_with_its_last_checkpoint_intact(
        ray_session, pretrained, tmp_path, monkeypatch):
    # Every batch of every call past 12 updates holds a NaN (a loss gone to inf).
    learner_turning_after(12, lambda batches: [b._replace(x_start=b.x_start * float("nan")) for b in batches],
                          monkeypatch)
    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.max_nonfinite": 5})
    messages = []
    with pytest.raises(RunFailed, match="the learner failed: .*5 non-finite updates in a row"):
        train(cfg, tmp_path, init=ckpt, log=messages.append, progress=False)
    # The message has the error's last line; the log, the traceback in the learner.
    assert any(m.startswith("the learner's error, in the learner:\n") and "in checked_update" in m for m in messages)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")  # the one at 10 updates, before it went bad
    assert saved["run"]["updates"] == 10
    # Written while the learner's next call ran: the state is still the one its counters count.
    assert saved["step"] == load_checkpoint(ckpt)["step"] + 10
    assert all(torch.isfinite(v).all() for net in ("denoiser", "ema_denoiser", "value") for v in saved[net].values())


def test_learner_fine_tunes_at_the_scaled_rate_and_checkpoints_the_unscaled_config(pretrained):
    cfg, ckpt = pretrained
    cfg = config_lib.from_dict({"online": {"lr_scale": 0.5}}, cfg)
    learner = Learner(config=cfg.to_dict(), checkpoint=load_checkpoint(ckpt), device="cpu")
    assert [g["lr"] for g in learner.trainer.opt_denoiser.param_groups] == [0.5 * cfg.train.lr]
    assert [g["lr"] for g in learner.trainer.opt_value.param_groups] == [0.5 * cfg.train.value_lr]
    # resuming from the learner's own checkpoint applies the scale once, not twice
    assert learner.trainer.state_dict()["config"]["train"]["lr"] == cfg.train.lr
    again = Learner(config=cfg.to_dict(), checkpoint=learner.trainer.state_dict(), device="cpu")
    assert [g["lr"] for g in again.trainer.opt_denoiser.param_groups] == [0.5 * cfg.train.lr]


def test_a_new_phase_2_draws_noise_from_its_seed_and_a_resume_continues_the_checkpoints(pretrained):
    cfg, ckpt = pretrained
    state = load_checkpoint(ckpt)

    def first_draw(seed, **kwargs):
        Learner(config=config_lib.from_dict({"train": {"seed": seed}}, cfg).to_dict(), checkpoint=state, device="cpu",
                **kwargs)
        return torch.rand(4)

    assert not torch.equal(first_draw(0), first_draw(1))
    assert torch.equal(first_draw(0), first_draw(0))
    torch.set_rng_state(state["torch_rng"])
    saved_stream = torch.rand(4)
    assert torch.equal(first_draw(0, resumed=True), saved_stream) and torch.equal(first_draw(1, resumed=True), saved_stream)


def test_a_rollout_is_seeded_by_its_number_in_the_run_not_by_the_worker_process(pretrained):
    from distdiff.distributed.worker import RolloutWorker

    cfg, ckpt = pretrained
    state = load_checkpoint(ckpt)
    trainer_weights = Learner(config=cfg.to_dict(), checkpoint=state, device="cpu").publish()

    def episodes(worker, **kwargs):
        return [ep.observations for ep in worker.rollout(max_steps=5, **kwargs).episodes]

    workers = [RolloutWorker(config=cfg.to_dict(), normalizer=state["normalizer"], worker_id=0) for _ in range(2)]
    try:
        for w in workers:
            w.set_weights(trainer_weights)
        first = episodes(workers[0], task=7)
        # A restarted worker (a fresh process) handed rollout 7 again repeats it; rollout 8 differs.
        assert all(np.array_equal(a, b) for a, b in zip(first, episodes(workers[1], task=7)))
        assert not all(np.array_equal(a, b) for a, b in zip(first, episodes(workers[1], task=8)))
    finally:
        for w in workers:
            w.close()


def _free_ports(n: int) -> List[int]:
    """``n`` distinct ports free now; held together while chosen, so no two are the same."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def test_an_address_is_judged_listening_only_where_it_names_a_port():
    from distdiff.distributed.cluster import _listens

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert _listens(f"127.0.0.1:{server.getsockname()[1]}") is True
    try:  # Ray writes IPv6 addresses as [host]:port; some containers have no IPv6 loopback
        with socket.socket(socket.AF_INET6) as server:
            server.bind(("::1", 0))
            server.listen()
            assert _listens(f"[::1]:{server.getsockname()[1]}") is True
    except OSError:
        pass
    free = _free_ports(1)[0]
    assert _listens(f"127.0.0.1:{free}") is False and _listens(f"localhost:{free}") is False
    # Left to Ray: what it resolves itself.
    assert _listens("auto") is None and _listens("local") is None


def test_ray_address_local_starts_an_embedded_ray(subprocess_env):
    # As Ray itself takes it; not an address where nothing listens. (In a fresh process: this one
    # has Ray initialized, and connect() would use it.)
    probe = ("import ray; from distdiff.distributed import cluster; "
             "ray.init = lambda **kw: print('init', kw['address']); ray.cluster_resources = lambda: {}; "
             "print('started', cluster.connect(log=lambda s: None))")
    out = subprocess.run([sys.executable, "-c", probe], env={**subprocess_env, "RAY_ADDRESS": "local"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["init", "local", "started", "True"], out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("auth", ["token", "fresh machine"])
def test_train_script_connects_to_a_ray_start_cluster(auth, pretrained, tmp_path, subprocess_env):
    cfg, ckpt = pretrained
    config_lib.save(cfg, tmp_path / "tiny.yaml")
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("RAY_AUTH_")}
    if auth == "token":
        # A token of its own, so the test needs no ~/.ray/auth_token (which an earlier in-process
        # ray.init would otherwise have written).
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    else:
        # No token anywhere: `ray start --head` runs without auth, and the driver must not ask
        # for a token it does not have.
        (tmp_path / "home").mkdir()
        env["HOME"] = str(tmp_path / "home")
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = None
    with ray_address_file_kept():  # which `ray start` overwrites
        try:
            # A port chosen free can be taken before `ray start` binds it: then it exits at once,
            # and is started again on other ports.
            for _ in range(3):
                gcs_port, client_port, agent_port = _free_ports(3)
                address = env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
                # `ray start --block` in its own process group, which holds exactly this cluster's
                # processes. `ray stop` would also kill the test session's own Ray, and pytest.
                head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs_port}",
                                         f"--ray-client-server-port={client_port}",
                                         f"--dashboard-agent-listen-port={agent_port}", "--num-cpus=2",
                                         "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                                         "--disable-usage-stats"],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
                deadline = time.monotonic() + 120
                while head.poll() is None and subprocess.run([ray_bin, "status", "--address", address], env=env,
                                                             capture_output=True).returncode:
                    assert time.monotonic() < deadline, "ray start --head did not come up"
                    time.sleep(1)
                if head.poll() is None:
                    break
            assert head.poll() is None, "ray start --head exited three times"
            # Without --config (one case), the --init checkpoint's config is the base.
            config_args = ["--config", str(tmp_path / "tiny.yaml")] if auth == "token" else []
            out = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *config_args,
                                  "--init", str(ckpt), "--run-dir", str(tmp_path / "run"), "--num-actors", "2"],
                                 env=env, capture_output=True, text=True, timeout=400)
            assert out.returncode == 0, out.stderr[-3000:]
            assert f"connected to the cluster at {address}" in out.stdout, out.stdout[-3000:]
            # Joined without a token, the run says what that leaves open.
            assert ("warning: this cluster runs without token auth" in out.stdout) == (auth == "fresh machine")
            assert (tmp_path / "run" / "metrics.json").is_file()
        finally:
            if head is not None:
                # SIGTERM to `ray start` alone: it stops its processes in order and exits in
                # seconds. Sent to the whole group at once, the raylet outlives its GCS for ~10 s
                # and `ray start` then waits out its GCS client's 60 s reconnect timeout.
                if head.poll() is None:
                    head.terminate()
                    try:
                        head.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        pass
                with contextlib.suppress(ProcessLookupError):  # (nothing of the group is left)
                    os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=60)


@pytest.mark.parametrize("from_init, overrides, error", [
    # The learner takes both CPUs of the session's Ray: no actor could ever be placed.
    (True, {"online.learner_num_cpus": 2, "online.actor_num_cpus": 0}, "leaves none for the rollout actors"),
    pytest.param(False, {"train.device": "cuda"}, "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")),
], ids=["cluster too small, from --init", "no such device, with phase 1"])
def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(from_init, overrides, error, ray_session, pretrained,
                                                                   tmp_path):
    cfg, ckpt = pretrained
    old = tmp_path / "run"
    old.mkdir()
    shutil.copy(ckpt, old / CHECKPOINT)
    with pytest.raises(config_lib.ConfigError, match=error):
        train(tiny_online_config(cfg.data.dataset_id, **overrides), old, init=ckpt if from_init else None,
              overwrite=True, log=lambda s: None, progress=False)
    assert (old / CHECKPOINT).is_file()


def test_parallel_collection_with_random_and_planner_policies(ray_session, pretrained):
    from distdiff.distributed.collection import collect_episodes

    cfg, ckpt = pretrained
    random_eps = collect_episodes(7, num_actors=2, env_id="Walker2d-v5", max_episode_steps=30, seed=3)
    assert len(random_eps) == 7
    assert all(1 <= len(ep) <= 30 and ep.observations.shape == (len(ep) + 1, 17) for ep in random_eps)
    # Seeds 3..9 in their order, whichever task ended first: no episode chosen by how soon it fell.
    env = make_env("Walker2d-v5")
    starts = np.stack([env.reset(seed=3 + k)[0] for k in range(7)]).astype(random_eps[0].observations.dtype)
    assert np.array_equal(np.stack([ep.observations[0] for ep in random_eps]), starts)
    assert [ep.seed for ep in random_eps] == list(range(3, 10))  # (what a dataset of them records)
    # A checkpoint trained with its actors on labelled nodes (online.actor_resource) collects
    # on any node: this cluster has no such label, where its workers would never start.
    state = load_checkpoint(ckpt)
    state["config"]["online"]["actor_resource"] = "rollout"
    planned = collect_episodes(3, num_actors=2, env_id="Walker2d-v5", max_episode_steps=30, seed=3,
                               checkpoint=state, envs_per_actor=2)
    assert len(planned) == 3 and all(ep.actions.shape[1] == 6 for ep in planned)
    # Each planned episode knows the seed its env was reset with: the start it planned from.
    assert len({ep.seed for ep in planned}) == 3
    assert all(np.array_equal(env.reset(seed=ep.seed)[0].astype(ep.observations.dtype), ep.observations[0])
               for ep in planned)
    # The same command collects the same episodes, whichever actor ran which task, and with
    # one actor: a task is seeded by its number, not by the worker that was free for it.
    alone = collect_episodes(3, num_actors=1, env_id="Walker2d-v5", max_episode_steps=30, seed=3,
                             checkpoint=state, envs_per_actor=2)
    assert all(np.array_equal(a.observations, b.observations) and np.array_equal(a.actions, b.actions)
               for a, b in zip(planned, alone, strict=True))


@pytest.mark.parametrize("failure", ["raises", "dies"])
def test_parallel_collection_retries_a_failed_task_and_keeps_what_it_has(failure, ray_session, pretrained, tmp_path,
                                                                         monkeypatch):
    from distdiff.distributed import actors
    from distdiff.distributed.collection import collect_episodes
    from distdiff.distributed.worker import RolloutWorker

    failed = tmp_path / "failed"

    class FailsOnce(RolloutWorker):
        def rollout(self, task=None, **kwargs):
            if self.worker_id == 0 and not failed.exists():
                failed.touch()
                if failure == "dies":
                    os._exit(1)  # Ray restarts the worker, without the weights it had
                raise RuntimeError("injected failure")
            return super().rollout(task, **kwargs)

    def make_worker(cfg, res, **kwargs):
        return ray.remote(FailsOnce).options(num_cpus=0.01, max_restarts=-1, max_task_retries=0).remote(**kwargs)

    monkeypatch.setattr(actors, "make_worker", make_worker)
    cfg, ckpt = pretrained
    planned = collect_episodes(4, num_actors=2, env_id="Walker2d-v5", max_episode_steps=20, seed=3,
                               checkpoint=load_checkpoint(ckpt), envs_per_actor=1)
    assert failed.exists() and len(planned) == 4
    # No two tasks shared seeds: every episode starts from its own state.
    assert len({ep.observations[0].tobytes() for ep in planned}) == 4


def test_parallel_collection_runs_the_episodes_asked_for_and_keeps_them_all(ray_session, pretrained, tmp_path,
                                                                             monkeypatch):
    # 3 episodes asked of actors of 4 envs: cutting 4 down to the 3 that ended first kept the
    # episodes that fell soonest. (One actor runs them: more would sit idle.)
    from distdiff.distributed import actors
    from distdiff.distributed.collection import collect_episodes
    from distdiff.distributed.worker import RolloutWorker

    ran = tmp_path / "ran"
    ran.mkdir()

    class Counts(RolloutWorker):
        def rollout(self, task=None, **kwargs):
            result = super().rollout(task, **kwargs)
            (ran / f"{task}").write_text(str(len(result.episodes)))
            return result

    def make_worker(cfg, res, **kwargs):
        return ray.remote(Counts).options(num_cpus=0.01, max_restarts=0).remote(**kwargs)

    monkeypatch.setattr(actors, "make_worker", make_worker)
    cfg, ckpt = pretrained
    planned = collect_episodes(3, num_actors=2, env_id="Walker2d-v5", max_episode_steps=20, seed=3,
                               checkpoint=load_checkpoint(ckpt), envs_per_actor=4)
    assert len(planned) == 3 and sum(int(f.read_text()) for f in ran.iterdir()) == 3


def test_collection_says_while_its_actors_wait_to_start_and_runs_random_tasks_num_actors_at_once(
        ray_session, pretrained, monkeypatch):
    from distdiff.data.episodes import Episode
    from distdiff.distributed import actors, collection
    from distdiff.distributed.worker import RolloutWorker

    class SlowToStart(RolloutWorker):
        def __init__(self, **kwargs):
            time.sleep(1.5)  # (an actor waiting for a node with free CPUs, as far as the driver sees)
            super().__init__(**kwargs)

    monkeypatch.setattr(actors, "make_worker", lambda cfg, res, **kwargs: ray.remote(SlowToStart).options(
        num_cpus=0.01, max_restarts=0).remote(**kwargs))
    monkeypatch.setattr(collection, "ACTOR_WAIT_NOTE_S", 0.5)
    said = []
    cfg, ckpt = pretrained
    planned = collection.collect_episodes(2, num_actors=1, env_id="Walker2d-v5", max_episode_steps=10, seed=3,
                                          checkpoint=load_checkpoint(ckpt), envs_per_actor=2, log=said.append)
    assert len(planned) == 2
    assert said and said[0].startswith("1 of 1 rollout actors have not started after 0.5 s") and "ray status" in said[0]

    # Random-policy tasks: no more at once than the actors asked for, however many CPUs there are.
    in_flight, done = [], []

    class Task:
        def options(self, **kwargs):
            return self

        def remote(self, env_id, max_episode_steps, n, seed):
            in_flight.append(len(in_flight) - len(done) + 1)
            return ray.put([Episode(np.zeros((2, 17)), np.zeros((1, 6)), np.zeros(1), False, True)] * n)

    monkeypatch.setattr(actors, "random_episodes_task", Task())
    got = collection.collect_episodes(40, num_actors=2, env_id="Walker2d-v5", max_episode_steps=10, seed=0,
                                      progress=done.append)
    assert len(got) == 40 and len(in_flight) == 4 and max(in_flight) == 2  # (tasks of 10 at most)


def test_evaluate_on_parallel_actors_gives_the_same_figures_with_any_number_of_them(ray_session, pretrained, tmp_path,
                                                                                    monkeypatch, capsys):
    from distdiff.distributed.collection import evaluate_in_parallel
    from distdiff.training import planner_from_checkpoint

    cfg, ckpt = pretrained
    script = script_in_process("evaluate", monkeypatch)
    out = tmp_path / "eval.json"
    assert script.main(["--checkpoint", str(ckpt), "--episodes", "3", "--eval.num_envs", "2", "--num-actors", "2",
                        "--out", str(out)]) == 0
    two = json.loads(out.read_text())
    assert two["num_actors"] == 2 and two["episodes"] == 3 and len(two["episode_returns"]) == 3
    assert two["overrides"] == {"eval.episodes": 3, "eval.num_envs": 2}
    # Every plan measured, as in one process: a plan starts at the real state.
    assert two["alignment_error_per_step"][0] < 1e-5
    cfg = config_lib.from_dict({"eval": {"episodes": 3, "num_envs": 2}}, cfg)
    one = evaluate_in_parallel(planner_from_checkpoint(load_checkpoint(ckpt), cfg), cfg, num_actors=1)
    for key in ("episode_returns", "episode_lengths", "alignment_error_per_step", "terminations"):
        assert one[key] == two[key], key


def test_parallel_evaluation_stops_at_once_on_a_broken_planner(ray_session, pretrained, tmp_path, monkeypatch):
    # The same seeds again would fail the same way: no retries, as a worker's death gets.
    from distdiff.distributed import actors
    from distdiff.distributed.collection import evaluate_in_parallel
    from distdiff.distributed.worker import RolloutWorker
    from distdiff.rollout import NonFinitePlan
    from distdiff.training import planner_from_checkpoint

    class NaNPlans(RolloutWorker):
        def evaluate(self, first, n_episodes, *, seed, weights):
            (tmp_path / f"{first}-{time.monotonic_ns()}").touch()
            raise NonFinitePlan("the planner returned NaN or infinite actions for 1 of 1 observations")

    def make_worker(cfg, res, **kwargs):
        return ray.remote(NaNPlans).options(num_cpus=0.01, max_restarts=0).remote(**kwargs)

    monkeypatch.setattr(actors, "make_worker", make_worker)
    cfg, ckpt = pretrained
    with pytest.raises(RunFailed, match="the checkpoint's planner is broken: .*NaN or infinite actions"):
        evaluate_in_parallel(planner_from_checkpoint(load_checkpoint(ckpt), cfg), cfg, num_actors=1)
    assert len(list(tmp_path.iterdir())) == 1


def test_an_evaluation_runs_beside_a_rollout_of_the_same_worker(ray_session, pretrained, tmp_path):
    # Queued behind the rollout, it would wait for it (and the rollout's timeout, counted from its
    # submission, would run out while it waited behind the evaluation).
    from distdiff.distributed import actors
    from distdiff.distributed.collection import weights_of
    from distdiff.training import planner_from_checkpoint

    class Blocked(actors.RayRolloutWorker):
        def rollout(self, task=None, **kwargs):
            deadline = time.monotonic() + 180
            while not (tmp_path / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return super().rollout(task, **kwargs)

    cfg, ckpt = pretrained
    cfg = config_lib.from_dict({"online": {"envs_per_actor": 1}, "eval": {"num_envs": 1},
                                "env": {"max_episode_steps": 20}}, cfg)
    state = load_checkpoint(ckpt)
    weights = ray.put(weights_of(planner_from_checkpoint(state, cfg)))
    worker = ray.remote(concurrency_groups=actors.WORKER_GROUPS)(Blocked).options(num_cpus=0.01).remote(
        config=cfg.to_dict(), normalizer=state["normalizer"], worker_id=0)
    try:
        ray.get(worker.set_weights.remote(weights))
        rollout = worker.rollout.remote(0)
        results = ray.get(worker.evaluate.remote(0, 1, seed=50, weights=weights), timeout=90)
        assert len(results) == 1 and not ray.wait([rollout], timeout=0)[0]
        (tmp_path / "go").touch()
        assert ray.get(rollout, timeout=90).env_steps > 0
    finally:
        ray.kill(worker)


def test_a_runs_evaluation_on_its_workers_judges_its_checkpoint_as_evaluate_on_parallel_actors_does(
        ray_session, pretrained, tmp_path, monkeypatch):
    from distdiff.distributed import driver
    from distdiff.distributed.collection import evaluate_in_parallel
    from distdiff.training import planner_from_checkpoint

    def not_here(*args, **kwargs):
        raise AssertionError("evaluated in the driver's process")

    monkeypatch.setattr(driver, "evaluate", not_here)
    cfg, ckpt = pretrained
    # More actors asked for than the run has: it has two.
    cfg = config_lib.from_dict({"eval": {"episodes": 3, "num_envs": 2, "num_actors": 3}}, cfg)
    run = start_run(cfg, tmp_path, ckpt, num_actors=2)
    try:
        ray.get(run.learner.train.remote(run.replay.sample.remote(2, cfg.train.batch_size)))
        metrics = run.evaluate()
        # Its rollouts still plan with the weights they had; the evaluation's are its own.
        assert ray.get([w.ping.remote() for w in run.workers])[0].version == run.counters.version
    finally:
        run.close()
    assert metrics["final"] and metrics["eval_episodes"] == 3
    saved = json.loads((tmp_path / "metrics.json").read_text())
    other = evaluate_in_parallel(planner_from_checkpoint(load_checkpoint(tmp_path / CHECKPOINT), cfg), cfg,
                                 num_actors=1)
    assert saved["return_mean"] == other["return_mean"] and saved["alignment_error"] == other["alignment_error"]


def tasks_on(workers, n_episodes, per_task, **kwargs):
    """``run_tasks`` over ``workers`` (actors with ``run(task, n)``), then kills them; what it
    returned and the index of the worker each submission went to, in order."""
    from distdiff.distributed.collection import run_tasks

    ran_on = []

    def submit(worker, task, n):
        ran_on.append(workers.index(worker))
        return worker.run.remote(task, n)

    try:
        return run_tasks(workers, n_episodes, per_task, submit, list, **kwargs), ran_on
    finally:
        for w in workers:
            ray.kill(w)


def test_parallel_tasks_go_on_without_a_worker_that_died_for_good_or_was_given_up(ray_session):
    @ray.remote(num_cpus=0.01, max_restarts=0)
    class Echo:
        def run(self, task, n):
            time.sleep(0.4)  # (the live worker's tasks outlast the dead one's back-off)
            return [task] * n

    workers = [Echo.remote() for _ in range(3)]
    ray.kill(workers[0], no_restart=True)
    # Two at a time, never on worker 2 (a run's loop gave it up).
    got, ran_on = tasks_on(workers, 7, 2, width=2, usable=lambda i: i != 2)
    assert got == [0, 0, 1, 1, 2, 2, 3]
    # The dead worker took its first task, which ran again on the other one, and no task again
    # (each would fail the same way, and spend one of the task's tries).
    assert ran_on.count(0) == 1 and 2 not in ran_on and ran_on.count(1) == 4


def test_a_task_whose_worker_dies_running_it_each_time_fails_after_its_tries(ray_session, monkeypatch):
    # Ray says "unavailable" for a worker that died in a call and that it restarts, as for a call
    # made while it restarts: the first is a failure of the task, the second not.
    from distdiff.distributed import collection

    @ray.remote(num_cpus=0.01, max_restarts=-1)
    class DiesInTaskOne:
        def run(self, task, n):
            time.sleep(0.5)
            if task == 1:
                os._exit(1)
            return [task] * n

    monkeypatch.setattr(collection, "COLLECT_TRIES", 2)
    monkeypatch.setattr(collection, "COLLECT_RESTART_S", 45.0)  # (where a death counted for nothing)
    raised = []

    def run():
        try:
            tasks_on([DiesInTaskOne.remote()], 3, 1)
        except RunFailed as e:
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=90)
    assert raised and "task 1 failed 2 times (its worker died running it)" in str(raised[0]), raised


def test_a_lone_worker_that_restarts_slowly_is_waited_for_and_the_calls_made_meanwhile_spend_no_try(
        ray_session, tmp_path, monkeypatch):
    # Ray 2.60 fails a call made while it restarts an actor 1-2 s after it is made, not at once,
    # "unavailable" as the call the actor died in: each such call was taken for a death in the
    # task, and the task failed after its tries while the worker was still starting again.
    from distdiff.distributed import collection

    @ray.remote(num_cpus=0.01, max_restarts=-1)
    class DiesOnceRestartsSlowly:
        def __init__(self, died):
            self.died = died
            if died.exists():
                time.sleep(6.0)  # its restart: a node to wait for, a slow start

        def run(self, task, n):
            if not self.died.exists():
                self.died.touch()
                os._exit(1)
            return [task] * n

    monkeypatch.setattr(collection, "COLLECT_TRIES", 2)
    got, ran_on = tasks_on([DiesOnceRestartsSlowly.remote(tmp_path / "died")], 3, 1)
    assert got == [0, 1, 2] and len(ran_on) >= 5  # the death, calls while it restarted, then 3 tasks


def test_parallel_tasks_spread_over_the_workers_again_after_a_failure(ray_session, tmp_path):
    # A task run again elsewhere must not leave its first worker idle for good.
    @ray.remote(num_cpus=0.01, max_restarts=0)
    class FailsOnce:
        def __init__(self, marker):
            self.marker = marker

        def run(self, task, n):
            if not self.marker.exists():
                self.marker.touch()
                raise ValueError("an env that failed once")
            time.sleep(0.5)
            return [task] * n

    got, ran_on = tasks_on([FailsOnce.remote(tmp_path / "failed"), FailsOnce.remote(tmp_path / "failed")], 8, 1)
    assert got == list(range(8)) and len(ran_on) == 9
    # Back from its second's back-off while the other still has ~3 s of tasks.
    assert min(ran_on.count(0), ran_on.count(1)) >= 2


def test_parallel_tasks_go_to_the_worker_that_is_free(ray_session):
    # Not queued behind a slow worker's task while a fast one waits.
    @ray.remote(num_cpus=0.01)
    class Paced:
        def __init__(self, seconds):
            self.seconds = seconds

        def run(self, task, n):
            time.sleep(self.seconds)
            return [task] * n

    got, ran_on = tasks_on([Paced.remote(2.0), Paced.remote(0.05)], 8, 1)
    assert got == list(range(8)) and ran_on.count(0) <= 2


def test_parallel_tasks_leave_out_workers_whose_constructor_raised(ray_session):
    from distdiff.distributed.collection import run_tasks

    @ray.remote(num_cpus=0.01, max_restarts=0)
    class Broken:
        def __init__(self):
            raise RuntimeError("no env here")

        def run(self, task, n):
            raise AssertionError("never runs")

    @ray.remote(num_cpus=0.01, max_restarts=0)
    class Slow:
        def run(self, task, n):
            time.sleep(0.4)
            return [task] * n

    # Every worker unbuildable: said with the constructor's error, not retried for ever (in a
    # thread with a time limit, so that the test cannot hang).
    broken, raised = [Broken.remote() for _ in range(2)], []

    def run():
        try:
            run_tasks(broken, 2, 1, lambda w, t, n: w.run.remote(t, n), list)
        except RunFailed as e:
            raised.append(e)

    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=60)
    finally:
        for w in broken:
            ray.kill(w)
    assert raised, "still retrying the unbuildable workers after 60 s"
    assert re.search("no rollout actor is left to run task .* no env here", str(raised[0]))
    # One unbuildable among good ones: one task, never another after its back-off.
    got, ran_on = tasks_on([Broken.remote(), Slow.remote()], 8, 1)
    assert got == list(range(8)) and ran_on.count(0) == 1


def test_a_lone_worker_that_fails_waits_out_its_back_off_before_its_next_task(ray_session):
    from distdiff.distributed.collection import run_tasks

    @ray.remote(num_cpus=0.01, max_restarts=0)
    class FailsTwice:
        def __init__(self):
            self.calls = []

        def run(self, task, n):
            self.calls.append(time.monotonic())
            if len(self.calls) <= 2:
                raise ValueError("an env that failed")
            return [task] * n

        def times(self):
            return self.calls

    worker = FailsTwice.remote()
    try:
        assert run_tasks([worker], 1, 1, lambda w, t, n: w.run.remote(t, n), list) == [0]
        calls = ray.get(worker.times.remote())
    finally:
        ray.kill(worker)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    # 1 s, then 2 s: not retried at once, as fast as Ray fails it.
    assert len(calls) == 3 and gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps


def test_a_learner_that_hangs_while_its_state_is_taken_stops_the_run_at_its_timeout(ray_session):
    # A checkpoint's state_dict was waited for without the limit that the learner's calls have.
    from types import SimpleNamespace

    from distdiff.distributed.driver import OnlineRun

    @ray.remote(num_cpus=0.01)
    def hangs():
        time.sleep(60)

    cfg = config_lib.from_dict({"online": {"learner_timeout_s": 0.5}}, config_lib.Config())
    ref = hangs.remote()
    try:
        with pytest.raises(RunFailed, match=r"has not given its state for a checkpoint within .*\(0.5 s\): it hangs"):
            OnlineRun.state_of(SimpleNamespace(cfg=cfg), "learner", ref)
    finally:
        ray.cancel(ref, force=True)


def test_a_stop_asked_while_every_worker_backs_off_is_taken_at_once(ray_session):
    from distdiff.distributed.collection import run_tasks
    from distdiff.evaluation import EvaluationStopped

    @ray.remote(num_cpus=0.01, max_restarts=0)
    class AlwaysFails:
        def run(self, task, n):
            raise ValueError("an env that fails")

    worker = AlwaysFails.remote()
    t0 = time.monotonic()
    try:
        # Failures at ~0 s and ~1 s, then a back-off of 2 s, through which the stop comes at 1.6 s.
        with pytest.raises(EvaluationStopped):
            run_tasks([worker], 1, 1, lambda w, t, n: w.run.remote(t, n), list,
                      stop=lambda: time.monotonic() - t0 > 1.6)
        elapsed = time.monotonic() - t0
    finally:
        ray.kill(worker)
    assert elapsed < 2.6, f"stopped {elapsed - 1.6:.1f} s after it was asked"


def test_a_parallel_evaluation_plays_episodes_from_its_seed_each_once(ray_session, pretrained, monkeypatch):
    # As distdiff.evaluation.evaluate does: an offset would shift every parallel count alike.
    from distdiff.distributed import collection
    from distdiff.training import planner_from_checkpoint

    cfg, ckpt = pretrained
    cfg = config_lib.from_dict({"eval": {"episodes": 3, "num_envs": 2}, "env": {"max_episode_steps": 20}}, cfg)
    seen, real = [], collection.summary_of
    monkeypatch.setattr(collection, "summary_of",
                        lambda results, c: seen.extend(r.seed for r in results) or real(results, c))
    collection.evaluate_in_parallel(planner_from_checkpoint(load_checkpoint(ckpt), cfg), cfg, num_actors=2)
    assert seen == [cfg.eval.seed + i for i in range(3)]


def test_a_runs_evaluation_runs_no_more_tasks_at_once_than_eval_num_actors(ray_session, pretrained, tmp_path,
                                                                            monkeypatch):
    from distdiff.distributed import actors, driver

    marks = tmp_path / "marks"
    marks.mkdir()

    class Logs(actors.RayRolloutWorker):
        def evaluate(self, first, n_episodes, *, seed, weights):
            (marks / f"start-{first}").write_text(repr(time.time()))
            time.sleep(1.0)
            out = super().evaluate(first, n_episodes, seed=seed, weights=weights)
            (marks / f"end-{first}").write_text(repr(time.time()))
            return out

    def not_here(*args, **kwargs):
        raise AssertionError("evaluated in the driver's process")

    monkeypatch.setattr(driver, "evaluate", not_here)
    cfg, ckpt = pretrained
    # One actor at a time, of two: on the workers still (1 is not 0), one task after the other.
    cfg = config_lib.from_dict({"eval": {"episodes": 2, "num_envs": 1, "num_actors": 1},
                                "env": {"max_episode_steps": 20}}, cfg)
    with rollout_actors_of(Logs, (0, 1)):
        run = start_run(cfg, tmp_path / "run", ckpt, num_actors=2)
    try:
        assert run.evaluate()["eval_episodes"] == 2
    finally:
        run.close()
    at = {p.name: float(p.read_text()) for p in marks.iterdir()}
    assert set(at) == {"start-0", "end-0", "start-1", "end-1"}
    assert at["start-1"] >= at["end-0"]


def test_a_runs_evaluation_leaves_out_the_workers_its_loop_gave_up(ray_session, pretrained, tmp_path, monkeypatch):
    from distdiff.distributed import actors, driver

    class Marks(actors.RayRolloutWorker):
        def evaluate(self, first, n_episodes, *, seed, weights):
            (tmp_path / "played on 0").touch()
            return super().evaluate(first, n_episodes, seed=seed, weights=weights)

    cfg, ckpt = pretrained
    cfg = config_lib.from_dict({"eval": {"episodes": 2, "num_envs": 1, "num_actors": 2},
                                "env": {"max_episode_steps": 20}}, cfg)
    with rollout_actors_of(Marks):
        run = start_run(cfg, tmp_path / "run", ckpt, num_actors=2)
    played_here = []
    try:
        run.dropped.add(0)
        assert run.evaluate()["eval_episodes"] == 2
        assert not (tmp_path / "played on 0").exists()
        # With every worker given up (the loop then stops), the driver plays it.
        monkeypatch.setattr(driver, "evaluate", lambda planner, cfg, **_: played_here.append(1) or scripted_summary(1.0))
        run.dropped.add(1)
        ray.get(run.learner.train.remote(run.replay.sample.remote(2, cfg.train.batch_size)))  # (new weights)
        run.evaluate()
    finally:
        run.close()
    assert played_here == [1]


def test_a_run_stops_waiting_for_an_evaluation_on_its_workers_when_it_ends(ray_session, pretrained, tmp_path):
    from distdiff.distributed import actors

    class Slow(actors.RayRolloutWorker):
        def evaluate(self, first, n_episodes, *, seed, weights):
            time.sleep(300)

    cfg, ckpt = pretrained
    cfg = config_lib.from_dict({"eval": {"num_actors": 1}}, cfg)
    with rollout_actors_of(Slow):
        run = start_run(cfg, tmp_path, ckpt, num_actors=1)
    try:
        run.start_evaluation()
        evaluation = run.evaluation
        run.stop_evaluating()
        assert not evaluation.thread.is_alive()
        assert isinstance(evaluation.result.exception(), EvaluationStopped)
    finally:
        run.close()


def test_init_checkpoint_that_does_not_fit_the_config_fails_before_any_actor(pretrained, tmp_path):
    from distdiff.checkpoint import CheckpointError

    cfg, ckpt = pretrained
    other = tiny_online_config(cfg.data.dataset_id, **{"model.dim": 16})
    with pytest.raises(CheckpointError, match="does not fit"):
        train(other, tmp_path / "run", init=ckpt, log=lambda s: None, progress=False)
    assert not (tmp_path / "run").exists(), "a start that fails leaves no run dir"


def test_a_replay_smaller_than_an_episode_is_refused_before_any_work(pretrained, tmp_path):
    cfg, ckpt = pretrained
    small = tiny_online_config(cfg.data.dataset_id, **{"online.replay_capacity": cfg.env.max_episode_steps - 1})
    with pytest.raises(config_lib.ConfigError, match="online.replay_capacity .* must hold a whole episode"):
        train(small, tmp_path / "run", init=ckpt, log=lambda s: None, progress=False)
    assert not (tmp_path / "run").exists()


def test_resuming_a_pretraining_run_points_to_init(pretrained):
    from distdiff.checkpoint import CheckpointError

    cfg, ckpt = pretrained
    before = ckpt.stat().st_mtime_ns
    with pytest.raises(CheckpointError, match=f"holds an offline pretraining run .* --init {ckpt.parent}$"):
        train(cfg, ckpt.parent, resume=True, log=lambda s: None, progress=False)
    assert ckpt.stat().st_mtime_ns == before


def test_a_cluster_too_small_for_the_actors_fails_before_pretraining(ray_session, pretrained, tmp_path):
    cfg, _ = pretrained
    greedy = tiny_online_config(cfg.data.dataset_id, **{"online.learner_num_cpus": 2.0})
    with pytest.raises(config_lib.ConfigError, match="leaves none for the rollout actors"):
        train(greedy, tmp_path, log=lambda s: None, progress=False)
    assert not (tmp_path / "pretrain").exists()


def test_actors_the_cluster_cannot_hold_yet_are_announced(ray_session, pretrained):
    # Each actor holds a share of the budget: one never placed keeps the run from ending.
    cfg, _ = pretrained

    def announced(actor_cpus):
        logs = []
        checked_resources(tiny_online_config(cfg.data.dataset_id, **{
            "online.num_actors": 3, "online.actor_num_cpus": actor_cpus, "online.learner_num_cpus": 0.5}), logs.append)
        return logs

    [line] = announced(1.0)
    assert "hold 1 of the 3 rollout actors" in line and "lower --num-actors" in line
    assert announced(0.5) == []  # 3 x 0.5 fit in the 1.5 CPUs the learner leaves


def test_a_learner_the_cluster_cannot_place_yet_is_announced(ray_session, pretrained):
    # Nothing else would say why a run sits still after pretraining.
    cfg, _ = pretrained
    gpus = ray.cluster_resources().get("GPU", 0.0) + 1  # one more than there are, on any host
    for overrides, what in (({"online.learner_num_gpus": gpus}, f"{gpus:g} GPU and 1 CPU on one node"),
                            ({"online.learner_resource": "learnr"}, "1 CPU on a node with 'learnr'")):
        logs = []
        checked_resources(tiny_online_config(cfg.data.dataset_id, **overrides), logs.append)
        assert any(f"the learner asks for {what}, which the cluster does not have" in line for line in logs), logs
    logs = []
    checked_resources(cfg, logs.append)
    assert logs == []


def test_a_run_stopped_in_phase_1_resumes_pretraining_then_runs_phase_2(ray_session, pretrained, tmp_path):
    cfg, _ = pretrained
    pretrain(tiny_online_config(cfg.data.dataset_id, **{"train.steps": 10}), tmp_path / "pretrain", quiet=True)
    assert resume_checkpoint(tmp_path) == tmp_path / "pretrain" / "checkpoint.pt"
    logs = []
    metrics = train(cfg, tmp_path, resume=True, log=logs.append, progress=False)
    assert any(line.startswith("resuming phase 1") for line in logs)
    assert load_checkpoint(tmp_path / "pretrain" / "checkpoint.pt")["step"] == cfg.train.steps
    assert metrics["env_steps"] == cfg.online.env_steps
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"


def test_a_replay_written_just_before_a_crash_is_cut_back_to_its_checkpoint(ray_session, pretrained, tmp_path):
    from distdiff.distributed.replay import Replay
    from distdiff.models import layout_of

    cfg, ckpt = pretrained
    cfg = tiny_online_config(cfg.data.dataset_id, **{"online.num_actors": 1})  # (it uses none)
    state = load_checkpoint(ckpt)
    data, _ = load_windows(cfg, None)
    newer = Replay(offline_episodes=[], normalizer=state["normalizer"], layout=layout_of(cfg), horizon=cfg.model.horizon,
                   discount=cfg.data.discount, termination_penalty=0.0, capacity=10_000, offline_ratio=0.0)
    newer.add(data.episodes[:3])
    logs = []
    run = OnlineRun(cfg, tmp_path, state, data.episodes, Counters(episodes=1), replay_state=newer.state_dict(),
                    log=logs.append, progress=False)
    try:
        assert ray.get(run.replay.size.remote()) == len(data.episodes[0])
        assert any("2 episodes newer than" in line for line in logs), logs
    finally:
        run.close()


def test_a_drivers_runtime_env_leaves_out_the_variables_its_ray_job_sets(monkeypatch):
    # `ray job submit --runtime-env-json '{"env_vars": {"MINARI_DATASETS_PATH": …}}' -- python
    # launch/tune.py`: Ray refuses a driver whose runtime env names the job's variable again.
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from distdiff.distributed.cluster import beside_the_job

    ours = {"env_vars": {"MINARI_DATASETS_PATH": "/data/minari"}}
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert beside_the_job(ours) == ours  # no job
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert beside_the_job(ours) == ours
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(
        {"runtime_env": {"env_vars": {"MINARI_DATASETS_PATH": "/data/minari"}}}))
    assert beside_the_job(ours) is None
    assert beside_the_job({"env_vars": {"MINARI_DATASETS_PATH": "/d", "OTHER": "1"}}) == {"env_vars": {"OTHER": "1"}}


def test_a_jobs_processes_get_one_thread_unless_its_driver_says_otherwise(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from distdiff.distributed import cluster
    from distdiff.process import THREAD_VARS

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    for var in THREAD_VARS:
        # (set first, so that the teardown also removes what connect() adds)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    ours = {"env_vars": {"MINARI_DATASETS_PATH": "/data/minari", "MKL_NUM_THREADS": "2"}, "working_dir": "."}
    # A cluster's processes get them in the job's runtime env: the driver's own value where it
    # has one, else 1; a value the caller's runtime env gives wins.
    assert cluster.job_runtime_env(ours, embedded=False) == {"working_dir": ".", "env_vars": {
        "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1",
        "MINARI_DATASETS_PATH": "/data/minari"}}
    # An embedded Ray's processes inherit the driver's environment: only what it lacks is set up.
    assert cluster.job_runtime_env(ours, embedded=True) == {"working_dir": ".", "env_vars": {
        "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1",
        "MINARI_DATASETS_PATH": "/data/minari"}}
    # connect() puts the missing ones in the environment while Ray starts: an embedded Ray then
    # needs none, and the caller's environment is as it was after (a notebook's subprocesses
    # kept one thread each).
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(
        {**kwargs, "environ": {var: os.environ[var] for var in THREAD_VARS}}))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(cluster, "make_ray_token_if_none", lambda: None)
    monkeypatch.setattr(cluster, "keep_ray_token_private", lambda log: None)
    assert cluster.connect(address="local", log=lambda s: None) is True
    assert started[-1]["runtime_env"] is None
    assert started[-1]["environ"] == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                      "VECLIB_MAXIMUM_THREADS": "1"}
    assert {var: os.environ.get(var) for var in THREAD_VARS} == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": None,
                                                                 "OPENBLAS_NUM_THREADS": None,
                                                                 "VECLIB_MAXIMUM_THREADS": None}


def test_a_runs_actors_run_their_threads_without_a_runtime_env_of_their_own(ray_session, pretrained, tmp_path):
    # A runtime env of its own costs each actor's start ~0.3 s of CPU (cluster.job_runtime_env):
    # the actors inherit the job's environment, and set their torch threads themselves.
    cfg, ckpt = pretrained
    cfg = config_lib.from_dict({"train": {"num_threads": 2}}, cfg)
    run = start_run(cfg, tmp_path, ckpt, num_actors=1)

    def threads(self):
        from distdiff.process import THREAD_VARS

        return (torch.get_num_threads(), {var: os.environ.get(var) for var in THREAD_VARS},
                ray.get_runtime_context().runtime_env)

    try:
        got = ray.get([a.__ray_call__.remote(threads) for a in (run.learner, run.replay, *run.workers)])
    finally:
        run.close()
    assert [n for n, _, _ in got] == [2, 1, 1]
    # (conftest.py limits them in this process before the session's Ray starts)
    assert all(set(env_vars.values()) == {"1"} and not env.get("env_vars") for _, env_vars, env in got), got


def test_the_code_check_passes_over_a_node_that_left(ray_session, monkeypatch):
    # ray.nodes() still lists a node that an autoscaler is draining, or that died a moment ago.
    from distdiff.distributed import actors
    from distdiff.provenance import DRIVER_CODE

    real_nodes = ray.nodes
    gone = {"NodeID": "ab" * 28, "Alive": True}
    monkeypatch.setattr(actors.ray, "nodes", lambda: [*real_nodes(), gone])
    assert actors.check_code_on_every_node(DRIVER_CODE) == [n["NodeID"] for n in real_nodes() if n["Alive"]]


def test_an_actor_that_imports_another_distdiff_than_the_driver_refuses_to_start(ray_session):
    # As on a node with an older install: nothing else would say why its results do not fit.
    from distdiff.distributed import actors

    elsewhere = ("0" * 16, "/opt/distdiff on another-node")
    w = actors.RolloutWorkerActor.options(num_cpus=0.01).remote(driver_code=elsewhere, config={}, normalizer=None,
                                                                worker_id=0)
    with pytest.raises(RayActorError, match="is not the driver's at /opt/distdiff on another-node .* install the same "
                                            "version on every node") as failed:
        ray.get(w.ping.remote(), timeout=120)
    assert failed.value.actor_init_failed  # (the same code passes: every run's actors are checked)
    # The check does not hide the constructor's signature: a wrong keyword still fails at the call.
    with pytest.raises(TypeError, match="worker_id"):
        actors.RolloutWorkerActor.remote(driver_code=elsewhere, config={}, normalizer=None, worker_idx=0)


def test_another_distdiff_on_the_driver_machine_is_named_before_pretraining(ray_session, tiny_dataset, tmp_path,
                                                                             monkeypatch):
    # A non-editable install run from its source tree: the driver imports the install, Ray's
    # workers the tree. Found before phase 1, which can take hours, not when the actors start.
    import socket

    from distdiff.distributed import driver

    monkeypatch.setattr(driver, "DRIVER_CODE", ("0" * 16, f"/venv/site-packages/distdiff on {socket.gethostname()}"))
    with pytest.raises(RunFailed, match="not the driver's at /venv/site-packages/distdiff .*pip install -e"):
        train(tiny_online_config(tiny_dataset), tmp_path / "run", log=lambda s: None, progress=False)
    assert not (tmp_path / "run").exists()


def test_rates_in_tensorboard_are_over_the_last_minute():
    # After an hour at 100 steps/s, a minute at half the pace shows as 50, not as 99.
    from distdiff.events import RecentRate

    rate, steps = RecentRate(0.0, 0), 0
    for t in range(1, 3601):
        steps += 100
        rate(float(t), steps)
    assert rate(3600.0, steps) == pytest.approx(100.0)
    for t in range(3601, 3661):
        steps += 50
        last = rate(float(t), steps)
    assert last == pytest.approx(50.0)
    assert len(rate.points) <= 62  # what the window holds, not the whole run
    fresh = RecentRate(10.0, 500)  # a resumed run: from its own start and counters
    assert fresh(12.0, 700) == pytest.approx(100.0)


def test_a_bare_digest_from_an_older_driver_gets_the_mismatch_message():
    # Not "too many values to unpack": the mixed-version case is the one this check is for.
    from distdiff.provenance import CODE_DIGEST, check_same_code

    check_same_code(CODE_DIGEST)
    with pytest.raises(RuntimeError, match="is not the driver's at an older distdiff .* same version on every node"):
        check_same_code("0" * 16)


def test_the_replay_actor_sends_numpy_batches_that_train_the_learner_as_its_own_do(pretrained):
    # Ray pickles a torch tensor's bytes into the message; numpy arrays it reads in place.
    from distdiff.distributed.actors import RayLearner, RayReplay
    from distdiff.distributed.replay import Replay
    from distdiff.models import layout_of

    cfg, ckpt = pretrained
    data, windows = load_windows(cfg, None)
    kwargs = dict(offline_episodes=data.episodes, normalizer=windows.normalizer.state_dict(), layout=layout_of(cfg),
                  horizon=cfg.model.horizon, discount=cfg.data.discount,
                  termination_penalty=cfg.data.termination_penalty, capacity=1000, offline_ratio=1.0, seed=0)
    sent, own = RayReplay(**kwargs).sample(3, 8), Replay(**kwargs).sample(3, 8)
    assert all(isinstance(a, np.ndarray) and np.array_equal(a, t.numpy()) for x, y in zip(sent, own) for a, t in zip(x, y))
    runs = []
    for cls, batches in ((RayLearner, sent), (Learner, own)):  # (each seeds the noise it draws as it starts)
        learner = cls(config=cfg.to_dict(), checkpoint=load_checkpoint(ckpt), device="cpu")
        runs.append((learner.train(batches), snapshot(learner.trainer)))
    assert runs[0][0].losses == runs[1][0].losses and runs[0][0].updates == 3
    assert_same(runs[0][1], runs[1][1])


def assert_same_tree(a, b, where="state"):
    """``a`` and ``b`` alike all the way down: the same containers, tensors of one dtype, shape and
    values."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} against {type(b).__name__}"
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


def test_states_cross_ray_packed_and_come_back_as_they_were(ray_session, pretrained):
    # Ray pickles a tensor through torch.save, one at a time: hundreds of them in a learner's state.
    from distdiff.distributed.actors import RayLearner, RayReplay
    from distdiff.distributed.replay import Replay
    from distdiff.models import layout_of

    Point = collections.namedtuple("Point", "x y")
    odd = {"bf16": torch.randn(3, 2).bfloat16(), "bool": torch.tensor([True, False]), "scalar": torch.tensor(7.5),
           "empty": torch.zeros(0, 4), "strided": torch.arange(12.0).reshape(3, 4).t(), "int": torch.arange(5),
           "nested": [(torch.ones(2), 3, "a"), Point(torch.zeros(1, dtype=torch.float64), None)],
           "array": np.arange(3.0), "betas": (0.9, 0.999)}
    packed = pack_tensors(odd)
    assert isinstance(packed["nested"][1], Point) and isinstance(packed["nested"][1].x, TensorBytes)
    back = unpack_tensors(ray.get(ray.put(packed)))
    assert_same_tree(odd, back)
    back["int"] += 1  # its own memory, not the object store's read-only map

    cfg, ckpt = pretrained
    plain = Learner(config=cfg.to_dict(), checkpoint=load_checkpoint(ckpt), device="cpu").state_dict()
    shipped = RayLearner(config=cfg.to_dict(), checkpoint=ray.get(ray.put(pack_tensors(load_checkpoint(ckpt)))),
                         device="cpu").state_dict()
    assert not any(torch.is_tensor(v) for v in shipped["denoiser"].values())
    assert_same_tree(plain, unpack_tensors(ray.get(ray.put(shipped))))

    data, windows = load_windows(cfg, None)
    kwargs = dict(offline_episodes=data.episodes, normalizer=windows.normalizer.state_dict(), layout=layout_of(cfg),
                  horizon=cfg.model.horizon, discount=cfg.data.discount,
                  termination_penalty=cfg.data.termination_penalty, capacity=1000, offline_ratio=0.5, seed=0)
    replay = Replay(**kwargs)
    replay.add(data.episodes[:3])
    shipped = ray.get(ray.put(pack_tensors(replay.state_dict())))
    assert isinstance(shipped["observations"], TensorBytes)
    loaded = RayReplay(**kwargs)
    loaded.load_state_dict(shipped, added_episodes=3)
    assert_same_tree(replay.state_dict(), unpack_tensors(ray.get(ray.put(loaded.state_dict()))))
