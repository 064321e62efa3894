"""The driver's policy for failed rollouts, on the errors Ray raises, without a cluster (the
cluster tests in test_distributed.py kill and fail real workers, and check that runs go on)."""
from __future__ import annotations

import traceback

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, OutOfMemoryError, RayActorError, RayTaskError

from distdiff.distributed.faults import MAX_FAILING_S, MAX_STRIKES, WorkerFaults
from distdiff.distributed.worker import NoWeights, WeightsNotLoaded


# The errors as Ray 2.60 raises them (seen on a local cluster, max_task_retries 0): a worker that
# dies in a call, with restarts left, is unavailable, and so is a call made while Ray restarts
# it, for another reason; Ray says "died" only once it restarts the worker no more.
def died() -> ActorUnavailableError:
    return ActorUnavailableError("The actor is temporarily unavailable: RpcError: RPC error: Socket closed "
                                 "rpc_code: 14", None)


def unavailable() -> ActorUnavailableError:
    return ActorUnavailableError("The actor is temporarily unavailable: IOError: The actor is restarting.", None)


def dead() -> ActorDiedError:
    return ActorDiedError()


def raised(error: Exception) -> RayTaskError:
    # (Ray's traceback ends with the line the actor's exception prints: module.Class: message.)
    last = traceback.format_exception_only(error)[-1]
    return RayTaskError("rollout", f"Traceback (most recent call last): ...\n{last}", error)


def test_a_death_is_one_restart_however_many_calls_fail_while_ray_restarts_the_worker():
    faults = WorkerFaults(2, max_restarts=-1)
    first = faults.failed(0, died(), now=0.0)
    assert first.restart and not first.lost and first.drop is None and "died" in first.what
    for n in range(1, 30):  # calls made while it restarts: no restart more, no strike
        again = faults.failed(0, unavailable(), now=float(n))
        assert not again.restart and not again.lost and again.drop is None
    faults.delivered(0)
    assert faults.failed(0, died(), now=100.0).restart  # a new death after a delivery counts again


def test_a_death_after_another_failure_in_a_row_is_counted_as_a_restart():
    # A rollout that raised (its envs), then its retry killed by the rollout timeout or out of
    # memory: the restart was counted nowhere, as only a run's first failure could count one.
    faults = WorkerFaults(1, max_restarts=-1)
    assert not faults.failed(0, raised(RuntimeError("injected env failure")), now=0.0).restart
    assert faults.failed(0, died(), now=1.0).restart
    assert not faults.failed(0, unavailable(), now=2.0).restart  # (calls while it restarts)


def test_a_worker_whose_restarts_are_spent_is_dropped_at_its_last_death_without_counting_it():
    # Ray's last death of a worker is the first it says "died" of: those before it were
    # "unavailable", however many restarts the worker had, and delivered rollouts between them.
    faults = WorkerFaults(1, max_restarts=3)
    for n in range(3):
        assert faults.failed(0, died(), now=float(n)).restart
        faults.delivered(0)
    verdict = faults.failed(0, dead(), now=10.0)
    assert verdict.drop == "died with its restarts spent (online.actor_max_restarts 3)"
    assert not verdict.restart and not verdict.lost
    # With no restart at all, the first death drops it; with restarts for ever, one killed for good.
    assert WorkerFaults(1, max_restarts=0).failed(0, dead(), now=0.0).drop.startswith("died with its restarts spent")
    assert WorkerFaults(1, max_restarts=-1).failed(0, dead(), now=0.0).drop.startswith("died and Ray does not "
                                                                                        "restart it")


def test_a_preemption_and_calls_during_a_restart_spend_no_restart():
    faults = WorkerFaults(1, max_restarts=0)
    preempted = RayActorError(preempted=True)
    assert faults.failed(0, preempted, now=0.0).drop is None
    assert faults.failed(0, unavailable(), now=1.0).drop is None


def test_an_actor_whose_constructor_raises_is_dropped_at_once_and_not_counted():
    verdict = WorkerFaults(1, max_restarts=-1).failed(
        0, RayActorError(error_msg="ValueError: no such env", actor_init_failed=True), now=0.0)
    assert verdict.drop == "cannot be restarted: ValueError: no such env"
    assert not verdict.restart and not verdict.lost


def test_missing_weights_are_a_restart_unless_a_death_was_just_counted():
    faults = WorkerFaults(1, max_restarts=-1)
    verdict = faults.failed(0, raised(NoWeights("rollout before set_weights")), now=0.0)
    assert verdict.restart and verdict.what == "was restarted by Ray"
    faults.delivered(0)
    # After a death, the retry's weights may have reached the restarting actor and failed unseen:
    # its rollout then finds the same restart.
    assert faults.failed(0, died(), now=1.0).restart
    again = faults.failed(0, raised(NoWeights("rollout before set_weights")), now=2.0)
    assert not again.restart


@pytest.mark.parametrize("error, what", [
    (raised(RuntimeError("injected env failure")), "failed a rollout; retrying it: "),
    # Its own process failed to load them: no restart, and a bug that repeats drops the worker.
    (raised(WeightsNotLoaded("weights version 4 failed to load: ValueError: flat weights have (9,) entries")),
     "failed a rollout; retrying it: distdiff.distributed.worker.WeightsNotLoaded: weights version 4 failed to load"),
    (OutOfMemoryError("Task was killed due to the node running low on memory."),
     "lost a rollout (OutOfMemoryError); retrying it: Task was killed"),
])
def test_a_rollout_lost_by_a_live_worker_is_counted_each_time_said_once_and_drops_it_at_the_strike_limit(error, what):
    faults = WorkerFaults(1, max_restarts=-1)
    verdicts = [faults.failed(0, error, now=float(n)) for n in range(MAX_STRIKES)]
    assert all(v.lost and not v.restart for v in verdicts)
    assert [v.first for v in verdicts] == [True] + [False] * (MAX_STRIKES - 1)
    assert verdicts[0].what.startswith(what)
    assert all(v.drop is None for v in verdicts[:-1])
    assert verdicts[-1].drop == f"keeps failing ({MAX_STRIKES} rollouts in a row, {MAX_STRIKES - 1} s)"
    assert faults.due(1e9) == [] and not faults.waiting  # a dropped worker is not retried


def test_a_worker_that_dies_in_every_rollout_is_dropped_once_its_failures_have_gone_on_long_enough():
    # As a worker that runs out of memory in every rollout: each death comes as the actor being
    # unavailable, the same error as a call made while it restarts, which waits for a node.
    faults = WorkerFaults(1, max_restarts=-1)
    for n in range(MAX_STRIKES - 1):
        assert faults.failed(0, unavailable(), now=float(n)).drop is None
    notice = faults.failed(0, unavailable(), now=MAX_STRIKES - 1.0)
    assert notice.drop is None and notice.notice.startswith(f"has failed {MAX_STRIKES} rollouts in a row")
    later = faults.failed(0, unavailable(), now=MAX_FAILING_S - 1.0)
    assert later.drop is None and later.notice is None  # said once
    assert faults.failed(0, unavailable(), now=MAX_FAILING_S).drop.startswith(f"keeps failing ({MAX_STRIKES + 2} ")


def test_a_worker_that_delivers_starts_its_count_of_failures_and_their_time_again():
    faults = WorkerFaults(1, max_restarts=-1)
    for n in range(MAX_STRIKES + 1):
        faults.failed(0, unavailable(), now=float(n))
    faults.delivered(0)
    for n in range(MAX_STRIKES + 1):  # long after the first failures: a new run of them
        assert faults.failed(0, unavailable(), now=MAX_FAILING_S + n).drop is None
    assert faults.failed(0, raised(RuntimeError("env")), now=2 * MAX_FAILING_S).first is False


def test_a_failed_worker_is_retried_once_after_a_growing_back_off_and_not_while_the_run_stops():
    faults = WorkerFaults(3, max_restarts=-1)
    faults.failed(0, died(), now=10.0)
    faults.failed(1, unavailable(), now=10.0)
    faults.failed(1, unavailable(), now=10.0)
    assert faults.waiting and faults.due(10.4) == []
    assert faults.due(10.5) == [0] and faults.due(10.5) == []  # 0.5 s after one failure, once
    assert faults.due(11.0) == [1]  # 1 s after two in a row
    for _ in range(20):
        faults.failed(2, unavailable(), now=20.0)
    assert faults.due(24.9) == [] and faults.due(25.0) == [2]  # at most 5 s
    assert not faults.waiting
    faults.failed(0, died(), now=30.0, retry=False)
    assert not faults.waiting
    faults.failed(1, died(), now=30.0)
    faults.cancel_retries()
    assert not faults.waiting and faults.due(100.0) == []


def test_failures_between_deliveries_never_add_up_to_a_drop():
    # delivered() must reset the strikes, not only the failures: otherwise a worker whose env
    # fails now and then is given up after MAX_STRIKES failures over its whole life.
    faults = WorkerFaults(1, max_restarts=-1)
    for round_ in range(3):
        for n in range(MAX_STRIKES - 1):
            assert faults.failed(0, raised(RuntimeError("env")), now=100.0 * round_ + n).drop is None
        faults.delivered(0)
    assert faults.strikes == [0]


def test_calls_made_while_ray_restarts_a_worker_with_restarts_left_are_no_strikes():
    # online.actor_max_restarts >= 0: a restart waits for a node, and the calls made meanwhile fail
    # (ActorUnavailableError); they may drop it only after MAX_FAILING_S, not in seconds.
    faults = WorkerFaults(1, max_restarts=5)
    assert faults.failed(0, died(), now=0.0).drop is None
    for n in range(1, 3 * MAX_STRIKES):
        assert faults.failed(0, unavailable(), now=float(n)).drop is None
    assert faults.strikes == [0]


def test_restarts_found_by_missing_weights_are_no_strikes_when_ray_restarts_for_ever():
    # As a death with actor_max_restarts -1: Ray restarts the worker whatever happens, so only
    # MAX_FAILING_S of failures may drop it, not MAX_STRIKES restarts in a row.
    faults = WorkerFaults(1, max_restarts=-1)
    for n in range(2 * MAX_STRIKES):
        assert faults.failed(0, raised(NoWeights("rollout before set_weights")), now=float(n)).drop is None
    assert faults.strikes == [0]
