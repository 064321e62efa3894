"""What a failed rollout means for its worker: a restart by Ray or a lost rollout, a retry after
a back-off, or the worker given up. Kept out of the driver loop so that the policy can be tested
on the errors Ray raises without a cluster that makes them."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

from distdiff.distributed.worker import NoWeights

# A rollout actor is dropped after this many failed rollouts in a row that may drop it (a death
# that used up its restarts, a task that raised), or after this many failures of any kind that
# have gone on for MAX_FAILING_S: Ray reports a worker that dies inside a call (one that runs out
# of memory in every rollout) as unavailable, the same error as a call made while it restarts,
# and a restart may wait minutes for an autoscaler's node.
MAX_STRIKES = 10
MAX_FAILING_S = 600.0


# What Ray (2.60) says of a call made while it restarts the actor: its core worker fails the
# calls it holds with this reason. The call the actor died in is "unavailable" too, with another
# reason (its connection closed); both come a second or two after the call, as Ray waits that
# long for news of a death, so only the reason tells a restart from a death in the call.
RESTARTING = "The actor is restarting"


def called_while_restarting(error: Exception) -> bool:
    """Whether a call failed because Ray was restarting its actor: it never ran."""
    return isinstance(error, ActorUnavailableError) and RESTARTING in str(error)


def dead_for_good(error: Exception) -> bool:
    """Whether the actor is gone for good: its constructor raised, or Ray says it died, which it
    says only of an actor it does not restart (restarts spent, killed for good); one it restarts
    is "unavailable" (in the call it died in, and in those made meanwhile). A preemption spends
    no restart."""
    return isinstance(error, RayActorError) and (error.actor_init_failed or not isinstance(
        error, ActorUnavailableError) and not error.preempted)


def cause(error: Exception) -> str:
    """The last line of a remote error: the exception the actor raised, without Ray's traceback."""
    return str(error).strip().splitlines()[-1]


class Verdict(NamedTuple):
    """What the driver does about one failed rollout."""

    what: str  # what happened to the worker, for the log
    restart: bool  # count one more worker restart (once per run of failures, not per call; logged)
    lost: bool  # count one more rollout lost by a worker that lives on
    first: bool  # the first failure in a row: the one that is logged
    drop: Optional[str]  # why the worker is given up, or None: it is retried at retry_at
    notice: Optional[str]  # said once, when a worker retried anyway has failed MAX_STRIKES times


def _dropped(why: str, first: bool) -> Verdict:
    """A worker given up at once, with no restart or lost rollout to count."""
    return Verdict(what=why, restart=False, lost=False, first=first, drop=why, notice=None)


class WorkerFaults:
    """Failures in a row of each rollout worker, and when each failed one is tried again.

    ``max_restarts`` is ``online.actor_max_restarts`` (-1: Ray restarts a worker for ever).
    """

    def __init__(self, n_workers: int, max_restarts: int):
        self.max_restarts = max_restarts
        self.failures = [0] * n_workers  # in a row, for the pause before a retry
        self.strikes = [0] * n_workers  # in a row, of those that may drop the worker
        # Whether a restart was counted in the failures in a row: once per run of them, however
        # many calls fail while Ray restarts it, and also when the run began with another failure.
        self.restart_counted = [False] * n_workers
        self.failing_since: Dict[int, float] = {}  # when the failures in a row began
        self.retry_at: Dict[int, float] = {}  # failed workers, retried after a back-off while Ray restarts them

    def delivered(self, i: int) -> None:
        """Worker ``i`` delivered a rollout: its failures in a row are over."""
        self.failures[i] = self.strikes[i] = 0
        self.restart_counted[i] = False
        self.failing_since.pop(i, None)

    def failed(self, i: int, e: RayError, now: float, retry: bool = True) -> Verdict:
        """Worker ``i``'s rollout raised ``e`` at ``now``; unless the verdict drops the worker,
        it is retried after a back-off (:meth:`due`), or not at all with ``retry`` False (the
        run is stopping)."""
        first = self.failures[i] == 0
        self.retry_at.pop(i, None)  # (a retry is what failed; a dropped worker has none)
        if isinstance(e, RayActorError) and e.actor_init_failed:
            # Its constructor raised: Ray never restarts such an actor.
            return _dropped(f"cannot be restarted: {cause(e)}", first)
        limit = self.max_restarts
        if dead_for_good(e):
            # Dropped now rather than after MAX_STRIKES calls.
            why = (f"with its restarts spent (online.actor_max_restarts {limit})" if limit >= 0
                   else f"and Ray does not restart it: {cause(e)}")
            return _dropped(f"died {why}", first)
        no_weights = isinstance(e, RayTaskError) and isinstance(e.cause, NoWeights)
        if isinstance(e, RayActorError):
            # The actor died with this task, or a call was made while Ray restarts it: neither a
            # sign that it keeps failing.
            restarted, what = True, "died; Ray restarts it"
            may_drop = limit >= 0 and not isinstance(e, ActorUnavailableError)
        elif no_weights:
            # Ray restarted it while it had no task running (killed while parked, or while the
            # broadcast was its only call): a restart all the same. (After a death, the retry's
            # set_weights may reach the restarting actor and fail unseen, and its rollout find the
            # same restart: counted once per run of failures, below.)
            restarted, what, may_drop = True, "was restarted by Ray", limit >= 0
        elif isinstance(e, RayTaskError):
            # The actor lives but its task raised: its envs failed twice in a row, or its planner
            # failed or returned NaN actions.
            restarted, what, may_drop = False, f"failed a rollout; retrying it: {cause(e)}", True
        else:
            # Ray itself lost the rollout: its memory monitor killed the worker
            # (OutOfMemoryError), or the result went with its node.
            restarted, what = False, f"lost a rollout ({type(e).__name__}); retrying it: {cause(e)}"
            may_drop = True
        self.failures[i] += 1
        self.failing_since.setdefault(i, now)
        # Failures that may drop count towards it at once; the calls that fail while Ray restarts
        # a worker only once they have gone on for longer than a restart takes.
        self.strikes[i] += may_drop
        n, failing_s = self.failures[i], now - self.failing_since[i]
        drop = notice = None
        if self.strikes[i] >= MAX_STRIKES or n >= MAX_STRIKES and failing_s >= MAX_FAILING_S:
            drop = f"keeps failing ({n} rollouts in a row, {failing_s:.0f} s)"
        elif retry:
            if n == MAX_STRIKES:
                notice = (f"has failed {n} rollouts in a row ({failing_s:.0f} s); retrying it until "
                          f"{MAX_FAILING_S:.0f} s have passed (a restart can wait for a node)")
            self.retry_at[i] = now + min(0.5 * n, 5.0)
        # (A rollout that raised, then a retry whose worker died: the death is counted too.)
        restart = restarted and not self.restart_counted[i]
        self.restart_counted[i] |= restart
        return Verdict(what=what, restart=restart, lost=not restarted, first=first, drop=drop, notice=notice)

    def due(self, now: float) -> List[int]:
        """The workers whose back-off has ended, each returned once."""
        ready = [i for i, t in self.retry_at.items() if t <= now]
        for i in ready:
            del self.retry_at[i]
        return ready

    @property
    def waiting(self) -> bool:
        """Whether a failed worker waits for its retry."""
        return bool(self.retry_at)

    def cancel_retries(self) -> None:
        self.retry_at.clear()
