"""The driver's bookkeeping without a cluster: budgets, counters, rates, TensorBoard axes and the
files of a run dir (a real run checks them end to end in test_distributed.py)."""
from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest

from _helpers import tiny_online_config
from distdiff import config, rundir
from distdiff.data.episodes import Episode
from distdiff.distributed.cluster import RunFailed
from distdiff.distributed.driver import (Counters, OnlineRun, PendingEvaluation, _evaluated_update, beats,
                                         describe_evaluation, finished_metrics, lowered_budget, step_axis)
from distdiff.events import RecentRate
from distdiff.rundir import clear_run, resume_checkpoint


def run_stub(counters=None, **overrides) -> OnlineRun:
    """An OnlineRun with only its config and counters: what the budget methods read."""
    run = OnlineRun.__new__(OnlineRun)
    run.cfg, run.counters = tiny_online_config("local/unused-v0", **overrides), Counters(**(counters or {}))
    run.replay_filled = True  # the replay can sample a batch
    return run


def test_recent_rate_reaches_back_to_the_newest_point_a_whole_window_old():
    rate = RecentRate(0.0, 0)
    rate(50.0, 50)
    # t=0 is the newest point >= 60 s old: the rate is over 100 s, not over the last 50 s.
    assert rate(100.0, 200) == pytest.approx(2.0)


def test_counters_refuse_unknown_names_and_default_missing_ones_to_zero():
    with pytest.raises(ValueError, match="unknown run counters"):
        Counters(env_step=3)
    old = Counters(env_steps=5, updates=2)  # a checkpoint of a version without the newer counters
    assert old.to_dict() == {**{f: 0 for f in Counters.FIELDS}, "env_steps": 5, "updates": 2}


def test_phase_2s_time_of_a_run_an_older_distdiff_began_is_unknown_not_zero(tmp_path):
    from distdiff.distributed.driver import resumed_counters

    # Its metrics.json would otherwise count only the time since the upgrade, as if it were all.
    assert resumed_counters(tmp_path, {"run": {"env_steps": 5}}).phase2_ms == -1
    assert resumed_counters(tmp_path, {"run": {"env_steps": 5, "phase2_ms": 7}}).phase2_ms == 7


def test_learner_tags_are_logged_at_updates_the_rest_at_env_steps():
    for tag in ("losses/denoiser", "losses/value", "perf/updates_per_s", "perf/windows_per_s", "replay/size",
                "faults/skipped_updates", "rollout/plan_vs_real", "charts/learning_rate", "perf/learner_busy"):
        assert step_axis(tag) == "updates", tag
    for tag in ("charts/episode_return", "rollout/alignment_error", "rollout/alignment_error_step/03",
                "eval/return_mean", "perf/env_steps_per_s", "perf/weights_lag", "faults/worker_restarts",
                "faults/rollout_timeouts", "faults/dropped_workers", "charts/terminated", "perf/parked_actors",
                "perf/eval_seconds", "eval/termination_rate"):
        assert step_axis(tag) == "env_steps", tag


def test_a_rollout_cut_by_its_share_of_the_budget_logs_only_its_reward_per_step():
    from distdiff.distributed.messages import RolloutResult

    run = run_stub()
    run.ref_min = run.ref_max = None
    run.env_rate, run.dropped, run.last_example = (lambda now, count: 0.0), set(), None
    logged = []
    run.scalar = lambda tag, value, at=None: logged.append((tag, value))
    # A walker that fell on step 3, and one that was still up when the share ended at step 5.
    fell = Episode(np.zeros((4, 17)), np.zeros((3, 6)), np.ones(3), terminated=True, truncated=False)
    up = Episode(np.zeros((6, 17)), np.zeros((5, 6)), np.ones(5), terminated=False, truncated=True)
    result = RolloutResult(worker_id=0, version=0, episodes=[fell, up], returns=[3.0, 5.0], lengths=[3, 5],
                           plan_errors=np.zeros((0, 4)), env_steps=8, env_rebuilds=0, example=None)
    run.log_rollout(result, cut=True)
    charts = [(tag, value) for tag, value in logged if tag.startswith("charts/")]
    # Not the fall alone: keeping the episodes that fell before the cut would log only falls.
    assert charts == [("charts/reward_per_step", 1.0)] * 2
    logged.clear()
    run.log_rollout(result, cut=False)  # (episodes of a rollout with whole ones: each is logged)
    assert [v for tag, v in logged if tag == "charts/terminated"] == [1.0, 0.0]


def test_a_rollouts_episodes_are_logged_each_at_a_step_of_its_own_its_last_at_the_count_now():
    # TensorBoard's default loader keeps one point per step: at one step, a rollout of
    # envs_per_actor episodes showed one.
    from distdiff.distributed.messages import RolloutResult

    run = run_stub({"env_steps": 108})  # (counted: 100 before the rollout, and its 8)
    run.ref_min, run.ref_max = 0.0, 100.0
    run.env_rate, run.dropped, run.last_example = (lambda now, count: 0.0), set(), None
    logged = []
    run.writer = type("Writer", (), {"add_scalar": lambda self, tag, value, step: logged.append((tag, step))})()
    fell = Episode(np.zeros((4, 17)), np.zeros((3, 6)), np.ones(3), terminated=True, truncated=False)
    up = Episode(np.zeros((6, 17)), np.zeros((5, 6)), np.ones(5), terminated=False, truncated=True)
    result = RolloutResult(worker_id=0, version=0, episodes=[fell, up], returns=[3.0, 5.0], lengths=[3, 5],
                           plan_errors=np.zeros((1, 4)), env_steps=8, env_rebuilds=0, example=None)
    run.log_rollout(result)
    for tag in ("charts/reward_per_step", "charts/episode_return", "charts/normalized_score",
                "charts/episode_length", "charts/terminated"):
        assert [step for t, step in logged if t == tag] == [103, 108], tag
    # What the rollout reports as a whole is at the count now.
    assert {step for t, step in logged if not t.startswith("charts/")} == {108}


def test_a_measured_plan_is_drawn_once_and_named_by_the_weights_that_made_it():
    # The figure is logged at the current update; the plan came from the weights its rollout
    # started with. Drawn again at each figure_every, an old plan passed for a new point.
    from _helpers import gaussian_normalizer
    from distdiff.rollout import PlanCheck

    run = run_stub({"version": 7, "updates": 500})
    run.normalizer, drawn = gaussian_normalizer(23), []
    run.writer = type("Writer", (), {"add_figure": lambda self, tag, fig, step: drawn.append((tag, fig, step))})()
    run.last_example = PlanCheck(np.zeros((4, 17)), np.zeros((4, 6)), np.ones((4, 17))), 3
    run.log_figure()
    run.log_figure()
    assert [(tag, step) for tag, _, step in drawn] == [("rollout/plan_vs_real", 500)]
    assert "by weights version 3 of 7" in drawn[0][1]._suptitle.get_text()


def test_an_evaluation_is_one_line_in_the_terminal():
    summary = {"episodes": 100, "return_mean": 2837.46, "return_std": 379.81, "return_se": 38.17,
               "normalized_score": 61.784, "normalized_score_se": 0.831, "terminations": 3, "alignment_error": 0.2704}
    # The spread of the episodes, and the mean's standard error: a ± beside the mean alone would
    # read as the one or the other.
    assert describe_evaluation(summary, {"env_steps": 12000, "updates": 6000}, 94.6) == (
        "evaluation at env step 12000, update 6000: return 2837.5 (sd 379.8, s.e. 38.2), score 61.78 ± 0.83 s.e., "
        "3 of 100 episodes terminated by the env, alignment error 0.270 (95 s)")
    # An env without reference scores, one episode, alignment not measured: those parts are left out.
    summary.update(normalized_score=None, normalized_score_se=None, return_se=None, alignment_error=None, episodes=1,
                   terminations=0)
    assert describe_evaluation(summary, {"env_steps": 5, "updates": 2}, 1.0) == (
        "evaluation at env step 5, update 2: return 2837.5 (sd 379.8), 0 of 1 episode terminated by the env (1 s)")


def test_evaluated_update_is_none_for_any_unreadable_metrics(tmp_path):
    assert _evaluated_update(tmp_path) is None
    for text in ("{", "{}", '{"updates": null}', "[]"):
        (tmp_path / "metrics.json").write_text(text)
        assert _evaluated_update(tmp_path) is None, text
    (tmp_path / "metrics.json").write_text('{"updates": 7}')
    assert _evaluated_update(tmp_path) == 7


def test_owed_updates_are_floored_and_capped_by_the_update_budget():
    # 0.2 updates per env step: 7 steps owe 1 update (1.4, floored), not 2.
    assert run_stub({"env_steps": 7}, **{"online.updates_per_env_step": 0.2}).owed_updates() == 1
    # 200 steps owe 40; with 4 done and a budget of 10 updates, only 6 more.
    assert run_stub({"env_steps": 200, "updates": 4}, **{"online.updates": 10}).owed_updates() == 6
    assert run_stub({"env_steps": 200, "updates": 4}, **{"online.updates": 0}).owed_updates() == 36


def test_owed_updates_follow_the_ratio_as_written_not_its_float_product():
    # 0.29 × 100,000 is 28,999.99… in floats: the run ended one update short of the ratio.
    assert run_stub({"env_steps": 100_000}, **{"online.updates_per_env_step": 0.29}).owed_updates() == 29_000
    assert run_stub({"env_steps": 90}, **{"online.updates_per_env_step": 0.7}).owed_updates() == 63
    import dataclasses

    run = run_stub({"env_steps": 100_000})  # a config made in code, with a NumPy float
    run.cfg = dataclasses.replace(run.cfg, online=dataclasses.replace(run.cfg.online,
                                                                      updates_per_env_step=np.float64(0.29)))
    assert run.owed_updates() == 29_000


def test_rollouts_wait_for_the_learner_near_the_end_of_an_update_budget_too():
    # 10 updates left in the budget, 9,990 owed by the ratio: the whole debt is past the lag, so
    # the worker waits. Judged on the budget's 10, rollouts ran on unthrottled (a review's run
    # collected 27k env steps for 2,000 updates at 0.5 per step).
    run = run_stub({"env_steps": 20_000, "updates": 10}, **{"online.env_steps": 0, "online.updates": 20,
                                                           "online.updates_per_env_step": 0.5})
    run.interrupted, run.parked, started = None, [], []
    run.start_rollout = lambda i, **share: started.append(i)
    assert run.owed_updates() == 10 < run.cfg.online.max_update_lag
    run.submit(0)
    assert run.parked == [0] and not started
    run.counters.env_steps = 20 + run.cfg.online.max_update_lag * 2  # a debt of the lag: no longer waits
    run.submit(1)
    assert started == [1]


def test_rollouts_do_not_wait_for_a_learner_that_has_nothing_to_train_on():
    # A resume without replay.pt and with no offline data: the checkpoint owed more than the lag,
    # and the learner waits for episodes. Parked, every worker waited for it: the loop ended at
    # once, blaming NaN episodes, and so did every resume after it.
    run = run_stub({"env_steps": 20_000, "updates": 10, "episodes": 100},
                   **{"online.offline_ratio": 0.0, "online.env_steps": 0, "online.updates": 5000})
    run.interrupted, run.parked, started = None, [], []
    run.start_rollout = lambda i, **share: started.append(i)
    run.replay_filled = False
    run.replay = SimpleNamespace(size=SimpleNamespace(remote=lambda: 0))
    import distdiff.distributed.driver as driver

    assert run.owed_updates() > run.cfg.online.max_update_lag
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver.ray, "get", lambda size: size)
        run.submit(0)
        assert started == [0] and not run.parked
        run.replay.size.remote = lambda: 1  # its first episode stored: the learner can pay the debt
        run.submit(1)
    assert run.parked == [1] and started == [0]


def test_an_evaluation_with_a_nan_return_never_becomes_the_best_nor_blocks_later_ones(tmp_path):
    # A simulator's non-finite reward makes an episode's return NaN; best.json keeps it as null.
    from distdiff.checkpoint import load_checkpoint, save_checkpoint
    from distdiff.distributed.driver import BEST_KEYS

    def evaluated(ret, updates):
        save_checkpoint(tmp_path / "checkpoint.pt", {"step": updates})
        return {**{k: 0 for k in BEST_KEYS}, "return_mean": ret, "updates": updates}

    def fresh_run():  # a resumed run reads its best from disk
        run = run_stub()
        run.run_dir, run._best, run.log = tmp_path, None, lambda line: None
        return run

    run = fresh_run()
    assert run.keep_if_best(evaluated(float("nan"), 1)) is None and not (tmp_path / "best.pt").exists()
    assert run.keep_if_best(evaluated(3000.0, 2))["updates"] == 2
    assert run.keep_if_best(evaluated(float("nan"), 3))["updates"] == 2
    (tmp_path / "best.json").write_text(json.dumps({**evaluated(None, 4), "return_mean": None}))
    save_checkpoint(tmp_path / "best.pt", {"step": 4, "best": {**evaluated(None, 4), "return_mean": None}})
    assert fresh_run().keep_if_best(evaluated(100.0, 5))["updates"] == 5  # over a null best on disk
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 5


def test_budgets_end_exactly_at_their_count():
    now = time.perf_counter()
    assert run_stub({"env_steps": 199}).budget_left(now)
    assert not run_stub({"env_steps": 200}).budget_left(now)  # online.env_steps 200
    assert run_stub({"updates": 9}, **{"online.env_steps": 0, "online.updates": 10}).budget_left(now)
    assert not run_stub({"updates": 10}, **{"online.env_steps": 0, "online.updates": 10}).budget_left(now)


def test_no_wall_time_budget_never_runs_out_and_finishing_updates_respects_one():
    long_ago = time.perf_counter() - 1e6
    unlimited = run_stub(**{"online.wall_time_s": 0})
    assert not unlimited.out_of_time(long_ago) and unlimited.may_train(False, long_ago)
    timed = run_stub(**{"online.wall_time_s": 5.0, "online.finish_updates": True})
    assert timed.out_of_time(long_ago)
    assert not timed.may_train(False, long_ago)  # owed updates still stop at the wall-time budget
    assert timed.may_train(False, time.perf_counter())


def test_a_run_is_over_only_with_its_budget_spent_and_its_final_evaluation_on_disk(tmp_path):
    cfg = tiny_online_config("local/unused-v0", **{"online.env_steps": 200, "online.updates_per_env_step": 0.2,
                                                   "online.finish_updates": True})
    done = Counters(env_steps=200, updates=40, version=5)
    evaluated = {"evaluating": True, "weights_version": 5}
    metrics = {"env_steps": 200, "updates": 40, "weights_version": 5, "return_mean": 12.5}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert finished_metrics(cfg, tmp_path, evaluated, done) == metrics
    # A Ctrl-C as the final evaluation ended checkpoints the same weights again, unmarked.
    assert finished_metrics(cfg, tmp_path, {"evaluating": False, "weights_version": 5}, done) == metrics
    # A budget raised on the resume, or updates still owed (finish_updates): it goes on.
    more = tiny_online_config("local/unused-v0", **{"online.env_steps": 400})
    assert finished_metrics(more, tmp_path, evaluated, done) is None
    assert finished_metrics(cfg, tmp_path, evaluated, Counters(env_steps=200, updates=39, version=5)) is None
    # Without finish_updates the owed updates are not made: over all the same.
    skip = tiny_online_config("local/unused-v0", **{"online.env_steps": 200, "online.updates_per_env_step": 0.2,
                                                    "online.finish_updates": False})
    metrics_39 = {**metrics, "updates": 39}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics_39))
    assert finished_metrics(skip, tmp_path, evaluated, Counters(env_steps=200, updates=39, version=5)) == metrics_39
    # metrics.json of another checkpoint (an earlier evaluation, other weights), or none that
    # reads: the final evaluation has not ended.
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert finished_metrics(cfg, tmp_path, {"evaluating": True, "weights_version": 6}, done) is None
    assert finished_metrics(cfg, tmp_path, evaluated, Counters(env_steps=201, updates=40, version=5)) is None
    for text in ("{", "[]"):
        (tmp_path / "metrics.json").write_text(text)
        assert finished_metrics(cfg, tmp_path, evaluated, done) is None
    # An update budget spent is over too; a wall-time budget alone never is (it is per process).
    by_updates = tiny_online_config("local/unused-v0", **{"online.env_steps": 0, "online.updates": 40})
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert finished_metrics(by_updates, tmp_path, evaluated, done) == metrics
    timed = tiny_online_config("local/unused-v0", **{"online.env_steps": 0, "online.wall_time_s": 5.0})
    assert finished_metrics(timed, tmp_path, evaluated, done) is None


def test_resume_prefers_phase_2s_checkpoint_and_clear_run_clears_phase_1(tmp_path):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "checkpoint.pt").write_text("p1")
    assert resume_checkpoint(tmp_path) == tmp_path / "pretrain" / "checkpoint.pt"
    (tmp_path / "checkpoint.pt").write_text("p2")
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"
    (tmp_path / "pretrain" / "events.out.tfevents.1").write_text("e")
    (tmp_path / "viz").mkdir()
    (tmp_path / "viz" / "a.png").write_text("x")
    clear_run(tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "pretrain").exists()
    assert (tmp_path / "viz" / "a.png").exists()


def test_the_cluster_is_described_in_words_not_as_rays_dict():
    from distdiff.distributed.cluster import describe

    embedded = {"memory": 17470921933.0, "node:192.0.2.2": 1.0, "CPU": 2.0, "node:__internal_head__": 1.0,
                "object_store_memory": 7487537971.0}
    assert describe(embedded) == "1 node, 2 CPU, 0 GPU, object store 7.0 GiB"
    # A custom resource a config can ask for (online.learner_resource) is named; a GPU's type is not.
    cluster = {"CPU": 48.0, "GPU": 1.0, "learner": 1.0, "node:10.0.0.1": 1.0, "node:10.0.0.2": 1.0,
               "accelerator_type:H100": 1.0, "object_store_memory": 3 * 2**30}
    assert describe(cluster) == "2 nodes, 48 CPU, 1 GPU, object store 3.0 GiB, learner 1"


def test_clearing_a_run_takes_the_partial_files_of_writes_cut_short(tmp_path):
    # A node lost mid-write leaves the temporary file that the write's own clean-up would remove.
    (tmp_path / ".checkpoint.partial-8f2e01ac.pt").write_bytes(b"half")
    (tmp_path / ".replay.partial-0c9d4b17.pt").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")
    clear_run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_learner_call_that_runs_long_is_noted_every_ten_minutes():
    run = run_stub()
    notes = []
    run.log, run.train_ref, run.train_since, run.next_train_note = notes.append, object(), 0.0, 0.0
    for now in (10.0, 599.0, 600.0, 900.0, 1199.0, 1200.0):
        run.note_long_learner_call(now)
    assert [n.split(" s;")[0].rsplit(" ", 1)[1] for n in notes] == ["600", "1200"]
    assert "a learner that hangs is not stopped" in notes[0]
    run.train_ref = None  # none in flight: nothing to say
    run.note_long_learner_call(5000.0)
    assert len(notes) == 2


def test_a_learner_call_past_the_learner_timeout_stops_the_run_and_none_before(monkeypatch):
    from distdiff.distributed import driver

    run = run_stub(**{"online.learner_timeout_s": 900.0})
    notes, returned = [], []
    monkeypatch.setattr(driver.ray, "wait", lambda refs, **kwargs: (list(refs) if returned else [], []))
    run.log, run.train_ref, run.train_since, run.next_train_note = notes.append, object(), 100.0, 100.0
    run.run_dir = "runs/x"
    for now in (100.0, 700.0, 999.0):
        run.note_long_learner_call(now)
        run.stop_if_learner_hangs(now)
    assert notes and "the run stops if it reaches online.learner_timeout_s 900" in notes[0]
    # A call that has returned is not hung, however long the driver was busy (a replay checkpoint
    # written while it ran) before it takes the result.
    returned.append(True)
    run.stop_if_learner_hangs(1000.0)
    returned.clear()
    with pytest.raises(RunFailed, match=r"has run 900 s, past online.learner_timeout_s 900: the learner is taken "
                                         r"for hung .*--resume or --autoresume goes on from the last checkpoint in runs/x"):
        run.stop_if_learner_hangs(1000.0)
    run.train_ref = None  # no call in flight: nothing runs long
    run.stop_if_learner_hangs(5000.0)
    off = run_stub()  # 0: no limit
    off.train_ref, off.train_since = object(), 0.0
    off.stop_if_learner_hangs(10**7)


def test_a_run_that_collects_only_does_not_keep_a_reference_per_rollout(monkeypatch):
    # The replay's calls storing rollouts are checked after each learner call, and a run with
    # online.updates_per_env_step 0 makes none: their references piled up, one per rollout.
    from distdiff.distributed import driver

    run = run_stub(**{"online.updates_per_env_step": 0.0})
    run.workers, run.adds, run.rollouts, run.promised, run.submitted, run.parked = [0, 1], [], {}, {}, {}, []
    run.faults = SimpleNamespace(delivered=lambda i: None)
    run.replay = SimpleNamespace(add_rollout=SimpleNamespace(remote=lambda ref: object()))
    run.bar = SimpleNamespace(update=lambda n: None)
    run.log_rollout = run.scalar = lambda *args: None
    run.collecting = False
    monkeypatch.setattr(driver.ray, "get", lambda ref: SimpleNamespace(env_rebuilds=0, env_steps=5, episodes=[]))
    # The newest add is still running when the others are seen done.
    monkeypatch.setattr(driver.ray, "wait", lambda refs, **kw: (refs[:-1], refs[-1:]))
    for k in range(100):
        run.rollouts[k] = k % 2
        assert run.take_rollout(k)
    assert run.counters.env_steps == 500 and len(run.adds) <= 2 * len(run.workers) + 1


def test_the_weights_lag_logged_is_how_many_versions_a_rollouts_weights_trail_the_learners():
    from distdiff.distributed.messages import RolloutResult

    run = run_stub({"version": 7})
    run.ref_min = run.ref_max = None
    run.env_rate, run.dropped, run.last_example = (lambda now, count: 0.0), set(), None
    logged = {}
    run.scalar = lambda tag, value, at=None: logged.setdefault(tag, value)
    ep = Episode(np.zeros((4, 17)), np.zeros((3, 6)), np.ones(3), terminated=True, truncated=False)
    run.log_rollout(RolloutResult(worker_id=0, version=3, episodes=[ep], returns=[3.0], lengths=[3],
                                  plan_errors=np.zeros((0, 4)), env_steps=3, env_rebuilds=0, example=None))
    assert logged["perf/weights_lag"] == 4


def test_updates_for_floors_a_fraction_over_one_half():
    from distdiff.config import updates_for

    cfg = tiny_online_config("local/unused-v0", **{"online.updates_per_env_step": 0.2})
    assert updates_for(cfg, 8) == 1  # 1.6 updates called for: the second is owed at step 10, not 8
    assert updates_for(cfg, 10) == 2


def test_a_tie_or_an_infinite_return_never_becomes_the_best():
    assert not beats(100.0, 100.0)  # the earlier best.pt stays
    assert not beats(math.inf, 100.0)  # a non-finite reward's return, as NaN
    assert beats(100.0, math.inf) and beats(100.0, None) and beats(100.5, 100.0)


def test_a_run_owing_exactly_one_update_it_will_make_is_not_over(tmp_path):
    cfg = tiny_online_config("local/unused-v0", **{"online.env_steps": 200, "online.updates_per_env_step": 0.2,
                                                   "online.finish_updates": True})
    counters = Counters(env_steps=200, updates=39, version=5)  # 40 called for
    (tmp_path / "metrics.json").write_text(json.dumps({"env_steps": 200, "updates": 39, "weights_version": 5}))
    assert finished_metrics(cfg, tmp_path, {"weights_version": 5}, counters) is None
    counters.updates = 40
    (tmp_path / "metrics.json").write_text(json.dumps({"env_steps": 200, "updates": 40, "weights_version": 5}))
    assert finished_metrics(cfg, tmp_path, {"weights_version": 5}, counters) is not None



def test_each_checkpoint_gets_its_own_evaluation_summary_beside_it(tmp_path):
    # launch/evaluate.py of checkpoint.pt and of best.pt must not write over each other's summary.
    assert rundir.eval_file(tmp_path / "checkpoint.pt") == tmp_path / "eval.json"
    assert rundir.eval_file(tmp_path / "best.pt") == tmp_path / "best.eval.json"
    assert rundir.eval_file(tmp_path / "sub" / "mine.pt") == tmp_path / "sub" / "mine.eval.json"


def test_a_checkpoint_is_given_as_itself_or_as_its_run_dir(tmp_path):
    assert rundir.checkpoint_file(tmp_path) == tmp_path / "checkpoint.pt"
    assert rundir.checkpoint_file(str(tmp_path / "best.pt")) == tmp_path / "best.pt"  # (need not exist yet)


def test_clearing_a_run_removes_every_file_a_run_writes_in_both_phases(tmp_path):
    for d in (tmp_path, tmp_path / "pretrain"):
        d.mkdir(exist_ok=True)
        for name in rundir.RUN_FILES:
            (d / name).write_text("x")
    (tmp_path / "pretrain" / ".checkpoint.partial-8f2e01ac.pt").write_text("half")
    (tmp_path / "notes.txt").write_text("mine")
    rundir.clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert {"best.eval.json", "eval.json", "best.json"} <= set(rundir.RUN_FILES)


def test_run_files_beside_a_distdiff_config_are_a_runs_and_a_run_is_never_foreign(tmp_path):
    # A run stopped before its first checkpoint wrote its config and metrics: --overwrite may
    # clear it. The same names beside another tool's config.yaml are someone else's.
    config.save(config.Config(), tmp_path / "config.yaml")
    (tmp_path / "metrics.json").write_text("{}")
    assert rundir.foreign_run_files(tmp_path) == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("optimizer: adam\n")  # another tool's
    (other / "metrics.json").write_text("{}")
    assert rundir.foreign_run_files(other) == ["config.yaml", "metrics.json"]
    (other / "checkpoint.pt").write_text("a run's")
    assert rundir.foreign_run_files(other) == []
    rundir.check_new_run(other, resume=True, overwrite=False)  # resuming a run: nothing of it is foreign


def _evaluated_run(tmp_path):
    """An OnlineRun whose evaluation in flight has returned, with only what finish_evaluation and
    keep_on_interrupt read; ``run.said`` and ``run.checkpoints`` record its log and checkpoints."""
    run = run_stub()
    summary = defaultdict(float, episodes=2, terminations=0)
    at = defaultdict(int, phase2_ms=-1)

    def start_evaluation(final=False):
        done = Future()
        done.set_result(summary)
        run.evaluation = PendingEvaluation(done, at, None, 0.0, final)

    run.start_evaluation, run.run_dir, run.on_evaluation = start_evaluation, tmp_path, None
    run.scalar = lambda *a: None
    run.said, run.checkpoints = [], []
    run.log = run.said.append
    run.checkpoint = lambda: run.checkpoints.append(run.counters.to_dict())
    run.keep_if_best = lambda metrics: None
    run.stop_evaluation = threading.Event()
    run.interrupted, run.train_ref = None, None  # (no Ctrl-C seen by the loop, no learner call in flight)
    return run


# driver.keep_on_interrupt: a stopped evaluation says what a resume does again, and nothing where
# nothing was done since (the final one: "the 0 updates and 0 env steps since are done again").
def test_a_stopped_evaluation_says_what_is_done_again_only_where_something_is(tmp_path):
    for final, updates, says in ((True, 0, f"runs first on --resume {tmp_path}"),
                                 (False, 5, "(the 5 updates and 0 env steps since are done again)")):
        run = _evaluated_run(tmp_path)
        run.evaluation = PendingEvaluation(Future(), defaultdict(int, phase2_ms=-1), None, 0.0, final)  # not ended
        run.counters.updates = updates
        assert run.keep_on_interrupt() is None and run.checkpoints == []
        assert run.said[-1].endswith(says), run.said


# driver.keep_on_interrupt: after the loop's two Ctrl-Cs (README: "a third stops at once"), the
# next one stops the save at once; it took two more, while the wait for the learner said nothing.
def test_after_the_loops_two_ctrl_cs_the_next_stops_the_save_at_once(tmp_path):
    import os
    import signal
    import time

    from distdiff.process import Interrupt

    run = _evaluated_run(tmp_path)
    run.interrupted = Interrupt()
    run.interrupted.set()
    run.interrupted.again.set()
    run.evaluation, run.train_ref, run.train_since = None, "a learner call in flight", time.perf_counter()

    def checkpoint():
        os.kill(os.getpid(), signal.SIGINT)  # while it waits for the learner's call
        run.checkpoints.append("written")

    run.checkpoint = checkpoint
    with pytest.raises(KeyboardInterrupt):
        run.keep_on_interrupt()
    assert run.checkpoints == []
    assert any(line.startswith("waiting for the learner's call in flight") for line in run.said)


# driver: the run's last evaluation is marked final, an earlier one is not (mutants: evaluate()
# without final=True; "final": True always). ASHA's ranking (ran_to_the_end) reads it.
def test_only_the_runs_last_evaluation_is_final(tmp_path):
    import json

    run = _evaluated_run(tmp_path)
    run.start_evaluation()
    assert run.finish_evaluation()["final"] is False
    assert json.loads((tmp_path / "metrics.json").read_text())["final"] is False
    assert run.evaluate()["final"] is True
    assert json.loads((tmp_path / "metrics.json").read_text())["final"] is True


# driver.keep_on_interrupt: a Ctrl-C as the final evaluation ends keeps it as the final one and
# ends the run (it was saved as not final, with a checkpoint and "resume with --resume", which
# then found the run over and reported the evaluation as not final for good).
def test_a_ctrl_c_as_the_final_evaluation_ends_keeps_it_final_and_ends_the_run(tmp_path):
    run = _evaluated_run(tmp_path)
    run.start_evaluation(final=True)
    metrics = run.keep_on_interrupt()
    assert metrics["final"] is True and json.loads((tmp_path / "metrics.json").read_text())["final"] is True
    assert run.checkpoints == [] and run.evaluation is None
    assert run.said == ["interrupted as the final evaluation ended: its result is kept, and the run is over"]
    # A mid-run one that ended is kept too, and the run is checkpointed for a resume.
    run.start_evaluation()
    assert run.keep_on_interrupt() is None
    assert json.loads((tmp_path / "metrics.json").read_text())["final"] is False and len(run.checkpoints) == 1
    assert run.said[-1].startswith("interrupted: saving a checkpoint; resume with --resume")


# driver.turn: each turn of the loop checks the learner timeout (mutant: the call dropped, so
# online.learner_timeout_s never stops a hung learner).
def test_each_turn_checks_the_learner_timeout(monkeypatch):
    from distdiff.distributed import driver

    run = run_stub(**{"online.learner_timeout_s": 5.0})
    checked = []
    run.take_evaluation = lambda: None
    run.stopping = lambda: False
    run.rollouts, run.train_ref, run.evaluation = {}, object(), None
    run.faults = SimpleNamespace(waiting=False, due=lambda now: [])
    run.kill_overdue = run.note_long_learner_call = lambda now: None
    run.stop_if_learner_hangs = checked.append
    monkeypatch.setattr(driver.ray, "wait", lambda refs, **kw: ([], list(refs)))
    run.turn()
    assert len(checked) == 1


# driver.settle_training: a learner call settled outside the loop (the checkpoint after a failed
# evaluation, or a Ctrl-C's) waits no longer than online.learner_timeout_s (mutant: ray.get with
# no limit, which held the run for ever on a hung learner).
def test_settling_a_learner_call_waits_no_longer_than_the_learner_timeout(monkeypatch):
    from distdiff.distributed import driver

    run = run_stub(**{"online.learner_timeout_s": 30.0})
    run.train_ref, run.train_since, run.run_dir = object(), time.perf_counter() - 10.0, "RUN"
    waited = []

    def wait(refs, timeout, fetch_local):
        waited.append(timeout)
        run.train_since -= timeout  # as if that time had passed; the call never returns
        return [], list(refs)

    def get(ref):
        raise AssertionError("waited on the hung call without a limit")

    monkeypatch.setattr(driver.ray, "wait", wait)
    monkeypatch.setattr(driver.ray, "get", get)
    with pytest.raises(RunFailed, match="past online.learner_timeout_s 30: the learner is taken for hung"):
        run.settle_training()
    assert 19.0 < waited[0] <= 20.0 and waited[1:] == [0]


def test_a_resume_that_lowers_a_budget_to_what_the_run_has_done_says_so():
    # A resume's --online.env_steps 1000 read as "1000 more" ran only the owed updates and the
    # final evaluation of a run at env step 4929, with a note of the change alone.
    ran = tiny_online_config("local/walker2d/tiny-v0", **{"online.env_steps": 20_000, "online.updates": 0})
    at = Counters(env_steps=4929, updates=260)
    lowered = tiny_online_config("local/walker2d/tiny-v0", **{"online.env_steps": 1000, "online.updates": 0})
    said = lowered_budget(lowered, ran, at)
    assert said.startswith("warning: online.env_steps 1000 (the run has collected 4929) is spent already")
    assert "raise the budget above what the run has done" in said
    # 4929 env steps at 0.2 updates each call for 985: what it still makes, or that it makes none.
    assert "it makes the 725 updates it owes, then its final evaluation" in said
    no_finish = tiny_online_config("local/walker2d/tiny-v0", **{"online.env_steps": 1000, "online.updates": 0,
                                                                "online.finish_updates": False})
    assert "The run collects nothing more; its final evaluation comes next." in lowered_budget(no_finish, ran, at)
    both = tiny_online_config("local/walker2d/tiny-v0", **{"online.env_steps": 4929, "online.updates": 100})
    said = lowered_budget(both, ran, at)
    assert "online.env_steps 4929 (the run has collected 4929) and online.updates 100 (it has made 260) are spent" in said
    assert "its final evaluation comes next" in said
    # Not for a budget left, nor for one the run had spent itself (a resume of its final evaluation).
    assert lowered_budget(tiny_online_config("local/walker2d/tiny-v0", **{"online.env_steps": 5000}), ran, at) is None
    assert lowered_budget(lowered, lowered, at) is None
