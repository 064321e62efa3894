"""What a distdiff process lives by, the library's and the launch scripts' alike: the CPUs it
started on and one BLAS/OpenMP thread, Ray's token auth, Ctrl-C and SIGTERM handled between
steps, progress bars. (``distdiff.cli`` holds what only the launch scripts use: arguments, run
dirs, error exits.)"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

# The CPUs this process may run on as it starts (a Slurm job's, taskset's), read before torch is
# imported: its OpenMP then pins the main thread to one of them where OMP_PROC_BIND or
# GOMP_CPU_AFFINITY asks (HPC module files set them). None where there is no affinity (macOS).
STARTED_ON = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


# What each BLAS and OpenMP runtime reads: numpy's wheels for macOS use Apple's Accelerate (vecLib).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def limit_threads() -> None:
    """One BLAS/OpenMP thread per process unless the user says otherwise: on small machines a
    second thread competing with rollout processes makes small-model steps far slower."""
    for var in THREAD_VARS:
        os.environ.setdefault(var, "1")


@contextlib.contextmanager
def thread_limits() -> Iterator[None]:
    """:func:`limit_threads` within, for the processes started there to inherit; this process's
    environment as it was after (a library caller's later subprocesses keep their own threads)."""
    before = {var: os.environ.get(var) for var in THREAD_VARS}
    limit_threads()
    try:
        yield
    finally:
        for var, value in before.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def ray_token_file() -> Path:
    """Ray's own token file, ``~/.ray/auth_token`` (RAY_AUTH_TOKEN_PATH names another)."""
    return Path.home() / ".ray" / "auth_token"


def ray_token_available() -> bool:
    """Whether Ray finds an auth token here: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")) or ray_token_file().is_file()


def token_path_problem() -> str:
    """Why the token file RAY_AUTH_TOKEN_PATH names cannot serve, if it cannot: Ray fails in
    token mode with an error that no caller expects (and with the variable set, no token is
    made in its place)."""
    name = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not name or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return ""
    try:
        empty = not Path(name).expanduser().read_text().strip()
    except OSError as e:
        why = f"which cannot be read ({e.strerror})"
    else:
        if not empty:
            return ""
        why = "which is empty"
    return f"RAY_AUTH_TOKEN_PATH names {name}, {why}: point it at the cluster's token file, or unset it"


def make_ray_token_if_none() -> None:
    """Write a token to ``~/.ray/auth_token``, this user's alone, where Ray finds none, before an
    embedded Ray starts (which would write one itself). Runs that start at once on nodes sharing
    a home (a job array's first) then keep the one token that was written first: Ray's own would
    each write theirs over it, and processes started later read another run's."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or ray_token_available():
        return
    path = ray_token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Whole before it has the name (a link fails where the name exists): another run must never
    # read it empty, which Ray takes for no token and writes its own over.
    tmp = path.with_name(f".auth_token.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # (Ray's own: 256 random bits)
        with contextlib.suppress(OSError):  # one is there already; or no hard links here: Ray writes its own
            os.link(tmp, path)
    finally:
        tmp.unlink()


def keep_ray_token_private(log: Callable[[str], None] = print) -> None:
    """Make Ray's own token file (``~/.ray/auth_token``) readable by this user alone. Ray writes
    it with the umask's mode (0644 as a rule), and the token lets whoever holds it run code on
    every cluster it guards: on a shared server, any other user could read it. A file named by
    RAY_AUTH_TOKEN_PATH, or a link, is left as it is (a team's token may be shared on purpose)."""
    path = ray_token_file()
    getuid = getattr(os, "getuid", None)  # (not on Windows)
    with contextlib.suppress(OSError):  # none there, or not ours to change
        st = path.lstat()
        if getuid is not None and stat.S_ISREG(st.st_mode) and st.st_uid == getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
            log(f"ray: {path} was readable by other users of this machine; it is now this user's alone (0600)")


def ray_token_mode() -> bool:
    """Whether this process presents a token to Ray clusters (RAY_AUTH_MODE=token)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def default_ray_auth() -> None:
    """Present Ray's auth token to clusters when there is one; Ray reads RAY_AUTH_MODE when it is
    imported, so call this first. An explicit RAY_AUTH_MODE is left as it is.

    A driver sends its token only in token mode, and Ray turns that mode on by itself only for
    clusters it finds without an address (not RAY_ADDRESS or --address). With no token anywhere
    the mode stays Ray's: token mode would then refuse every cluster, including the one a plain
    `ray start --head` runs on a fresh machine (without auth, since it found no token), while an
    embedded cluster makes its own token either way.
    """
    if "RAY_AUTH_MODE" not in os.environ and ray_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


# Set by Ray in the driver of a job (`ray job submit`): ray._private.runtime_env.constants.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class Flag:
    """An event that a signal handler sets, and loops check between steps (nothing waits on one).
    Not a threading.Event: its set() takes a lock that is not reentrant, and a SIGTERM that came
    while the Ctrl-C handler was inside it ran a handler that waited for that lock for ever: the
    process then took no signal but SIGKILL, and saved nothing."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class Interrupt(Flag):
    """Set by a first Ctrl-C; ``again`` by a second one, where a third is what raises."""

    def __init__(self):
        super().__init__()
        self.again = Flag()
        self._holding = False
        self._held = False

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Around a step that must not stop half-way (an update of several nets, then their EMA
        and its logging): a Ctrl-C that would raise inside it raises as it ends instead, and one
        more raises at once (a step that hangs)."""
        self._holding, self._held = True, False
        try:
            yield
        finally:
            self._holding = False
        if self._held:
            self._held = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupt(raise_at: int = 2) -> Iterator[Interrupt]:
    """Ctrl-C sets the yielded event instead of raising wherever the main thread is: a
    KeyboardInterrupt inside TensorBoard's writer (a ``with lock:`` is not signal-safe,
    bpo-29988) can leave its close waiting forever, as the interrupted-pretraining test once
    did. Loops check the event between steps or results. Ctrl-C number ``raise_at`` (2 or 3)
    raises at once; with 3, the second sets ``again``, for a loop that waits for running work
    after the first to stop waiting at its next check. SIGTERM (`ray job stop`, `docker stop`, a
    scheduler's preemption: a grace period of seconds before SIGKILL) counts as all but the last
    Ctrl-C at once: stop at the next check, without waiting for running work, and save. Off the
    main thread (e.g. a Tune trial) Python cannot handle signals, and the event is never set."""
    if raise_at not in (2, 3):
        raise ValueError(f"raise_at must be 2 or 3, got {raise_at}")
    requested = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if signum == signal.SIGTERM and not requested.again.is_set():
            requested.set()
            requested.again.set()
        elif not requested.is_set():
            requested.set()
        elif raise_at == 3 and not requested.again.is_set():
            requested.again.set()
        elif requested._holding and not requested._held:
            requested._held = True
        else:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, before in previous.items():
            # None: a handler installed outside Python, which Python cannot reinstall.
            signal.signal(sig, signal.SIG_DFL if before is None else before)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, around work that takes no Ctrl-C of its
    own (loading data, starting actors, a run's final evaluation; :func:`deferred_interrupt`
    inside it takes both its own way): Ray's handler in a driver, and Python's default, exit at
    once, skipping the job's clean-up and its advice to resume. Off the main thread, nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def progress_bar(**kwargs) -> tqdm:
    """A tqdm progress bar. Where it writes to no terminal (a job's log, nohup) it is redrawn
    every 30 s instead of up to 10 times a second: the log of a run that lasts days stays small."""
    out = kwargs.get("file") or sys.stderr
    if not out.isatty():
        # maxinterval too: tqdm's monitor thread otherwise forces a redraw every 10 s.
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("maxinterval", 30.0)
    return tqdm(dynamic_ncols=True, **kwargs)
