"""Shared pieces of the launch scripts."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import secrets
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from tqdm import tqdm

from distdiff.rundir import BEST, BEST_METRICS, CHECKPOINT, CONFIG, METRICS, checkpoint_file, foreign_run_files, holds_run


# The CPUs this process may run on as it starts (a Slurm job's, taskset's), read before torch is
# imported: its OpenMP then pins the main thread to one of them where OMP_PROC_BIND or
# GOMP_CPU_AFFINITY asks (HPC module files set them). None where there is no affinity (macOS).
STARTED_ON = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse that answers a bad argument in two lines: with every config field a flag, the
    usage runs to ~50 lines above the one error that matters. A mistyped option gets the
    closest real one."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            # Only what --help shows: a hidden flag is one this script refuses.
            shown = [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
            hints = [f"{wrong}: did you mean {close[0]}?" for wrong in re.findall(r"--[\w.-]+", message)
                     if (close := difflib.get_close_matches(wrong, shown, n=1, cutoff=0.8))]
            message += "".join(f"\n  {hint}" for hint in hints)
        self.exit(2, f"usage: {self.prog} [options] (see --help)\n{self.prog}: error: {message}\n")


def make_parser(description: Optional[str]) -> ArgumentParser:
    """A launch script's parser: its docstring as the description, no abbreviated flags (a
    prefix such as --diffusion.schedul would set a field unnoticed)."""
    return ArgumentParser(description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)


# What each BLAS and OpenMP runtime reads: numpy's wheels for macOS use Apple's Accelerate (vecLib).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def limit_threads() -> None:
    """One BLAS/OpenMP thread per process unless the user says otherwise: on small machines a
    second thread competing with rollout processes makes small-model steps far slower."""
    for var in THREAD_VARS:
        os.environ.setdefault(var, "1")


def line_buffered_output() -> None:
    """Each line on stdout as it is printed, also where it goes to a file (a batch job's log,
    nohup): Python would hold up to 8 KB of it, so a warning or an evaluation showed late, out of
    order with stderr, and was lost where the job was killed."""
    with contextlib.suppress(AttributeError, ValueError):  # (a stream replaced by one without it)
        sys.stdout.reconfigure(line_buffering=True)


def ray_token_file() -> Path:
    """Ray's own token file, ``~/.ray/auth_token`` (RAY_AUTH_TOKEN_PATH names another)."""
    return Path.home() / ".ray" / "auth_token"


def ray_token_available() -> bool:
    """Whether Ray finds an auth token here: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")) or ray_token_file().is_file()


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


def add_ray_arguments(parser) -> None:
    """Where train.py, tune.py and collect.py find Ray (see ``distdiff.distributed.cluster.connect``)."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, a local `ray start` cluster, or an embedded Ray); "
                             "'local' starts an embedded Ray even where a cluster runs.")
    parser.add_argument("--num-cpus", type=positive_int, default=None,
                        help="CPUs of the embedded Ray (default: those this process may run on, e.g. a Slurm job's).")


def take_alias(args: argparse.Namespace, alias: str, field: str) -> None:
    """``--ALIAS`` is short for ``--FIELD``, a config field's flag: the field takes its value.
    The two given with different values are refused, where argparse would keep one of them
    without a word."""
    from distdiff import config as config_lib

    value = getattr(args, alias.replace("-", "_"))
    if value is None or value == "":  # (an empty --dataset is none, as it always was)
        return
    dest = "cfg__" + field.replace(".", "__")
    given = getattr(args, dest, None)  # (the field's flag is text until the config parses it)
    if given is not None:
        try:
            same = config_lib.field_value(field, given) == config_lib.field_value(field, value)
        except config_lib.ConfigError:
            same = False
        if not same:
            fail(f"--{alias} {value} and --{field} {given} set the same field: pass one of them")
    setattr(args, dest, value)


def int_at_least(minimum: int, below: Optional[int] = None):
    """An argparse type: an integer of at least ``minimum`` (and less than ``below``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be < {below}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)  # an argparse type: counts, sizes
non_negative_int = int_at_least(0)  # an argparse type: indices
seed_int = int_at_least(0, 2**63)  # an argparse type: seeds, in the range of the config's (torch takes 64 bits)


def check_run_dir(run_dir: Path, *, overwrite: bool, keep: Optional[Path] = None) -> None:
    """Refuse a --run-dir that is a file, or that holds a run unless ``overwrite``: a new run
    there would silently replace its checkpoints and mix its TensorBoard curves with the new ones.
    With ``overwrite`` the run clears the old files itself (:func:`distdiff.rundir.clear_run`) once its own inputs
    have loaded, so a start that fails keeps the old run; never ``keep`` (the --init checkpoint)."""
    check_outside_job_copy(run_dir, "--run-dir")
    check_output(run_dir, "--run-dir", directory=True)
    # Whether or not a run is there: --overwrite clears its files, the --init one among them.
    if overwrite and keep is not None and run_dir.resolve() in (keep.resolve(), *keep.resolve().parents):
        fail(f"--init {keep} is inside {run_dir}, which --overwrite would clear; start the new run elsewhere")
    if not holds_run(run_dir):
        others = foreign_run_files(run_dir)  # (the library refuses them too, later)
        if others:
            fail(f"{run_dir} holds no run, and {', '.join(others)} of something else, which the run would write over "
                 f"(and --overwrite remove): choose a new or empty --run-dir")
        # An earlier run's best checkpoint without its checkpoint.pt (deleted to save space): the
        # new run's first evaluation would write over it.
        if (run_dir / BEST).exists() and not overwrite:
            fail(f"{run_dir} holds {BEST} of an earlier run (without its {CHECKPOINT}), which the new run would write "
                 f"over: pass --overwrite to replace it, or choose another --run-dir")
        return
    if not overwrite:
        fail(f"{run_dir} holds a run already: continue it with --resume, choose another --run-dir, "
             f"or pass --overwrite to replace it")


# Set by Ray in the driver of a job (`ray job submit`): ray._private.runtime_env.constants.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_outside_job_copy(path: Path, flag: str) -> None:
    """A Ray job with a ``--working-dir`` runs in Ray's temporary copy of it (deleted once unused,
    and a new one for new code): a run written under a relative path there would go with it, and
    a resume would not find it. (Without one, or after a ``cd`` elsewhere, a relative path is the
    user's.)"""
    # Where Ray unpacks a job's working dir: .../runtime_resources/working_dir_files/_ray_pkg_*.
    in_copy = "working_dir_files" in Path.cwd().parts
    if os.environ.get(RAY_JOB_ENV) and in_copy and not path.is_absolute():
        fail(f"{path} is a relative path, and this Ray job runs in Ray's temporary copy of its working directory: "
             f"give {flag} as an absolute path on the head (README, Submitting a job)")


def check_output(path: Path, flag: str, *, directory: bool = False) -> None:
    """Fail now, not after the work, when ``path`` cannot be written as a file (or made a
    directory): a file or dangling link in its way, or a read-only place."""
    if path.exists() and path.is_dir() != directory:
        fail(f"{flag} {path} is a {'file' if directory else 'directory'}; give a {'directory' if directory else 'file name'}")
    # (lexists: a link to nothing is in the way too; mkdir fails on it after the work.)
    parent = next((p for p in path.parents if os.path.lexists(p)), None)
    if parent is not None and not parent.exists():
        fail(f"{flag} {path}: {parent} is a link to {os.readlink(parent)}, which is not there")
    if parent is not None and not parent.is_dir():
        fail(f"{flag} {path}: {parent} is a file")
    # Where the writes go: the existing directory itself, else the nearest existing parent.
    place = path if path.is_dir() else parent
    if place is not None and not os.access(place, os.W_OK | os.X_OK):
        fail(f"{flag} {path}: {place} cannot be written here (read-only, or not this user's)")
    if not directory and path.exists() and not os.access(path, os.W_OK):
        fail(f"{flag} {path} cannot be written here (read-only, or not this user's)")


def check_eval_output(out: Path, flag: str = "--out") -> None:
    """:func:`check_output` for an evaluation's summary, which must not land on a checkpoint or
    another file of a run (a slip like ``--out runs/a/best.pt`` wrote JSON over it)."""
    check_output(out, flag)
    if out.suffix == ".pt" or out.name in (BEST_METRICS, METRICS, CONFIG):
        fail(f"{flag} {out} would write the summary over a checkpoint or a file of a run; give a .json name such as "
             f"eval.json")


def check_resume_dir(run_dir: Path) -> None:
    """--resume takes a run dir; given one of its files, or a path that is not there, say so
    (rather than that no checkpoint is at FILE/checkpoint.pt)."""
    check_outside_job_copy(run_dir, "the run dir")
    if run_dir.is_file():
        fail(f"--resume takes the run's dir, not a file in it: --resume {run_dir.parent}")
    if not run_dir.exists():
        fail(f"--resume {run_dir}: no such directory")


AUTORESUME_HELP = ("With --run-dir: continue the run there if it holds one (as --resume does), else start it there: "
                   "one command line for a job that a scheduler requeues or restarts. A run there that this command "
                   "line's config file (--config, or --init's config) would not have started is refused, naming the "
                   "fields that differ; --section.field flags change the run's config as with --resume (a larger "
                   "budget trains it on), and the resume says which fields they change.")


def check_autoresume_flags(args: argparse.Namespace) -> None:
    if args.resume:
        fail("--autoresume resumes the run in --run-dir by itself; drop --resume")
    if args.run_dir is None:
        fail("--autoresume needs --run-dir, the same dir at every start of the job")
    if args.overwrite:
        fail("--autoresume continues the run in --run-dir; --overwrite would remove it")


def autoresume(args: argparse.Namespace, holds: Callable[[Path], bool]):
    """``--autoresume``: where ``--run-dir`` holds a run (``holds``), make the command line
    ``--resume RUN_DIR`` and return the config it would have started a run with, which that run
    must have (:func:`check_autoresumed`); else None, and the command line starts the run."""
    check_autoresume_flags(args)
    if not holds(args.run_dir):
        return None
    given = start_config(args)
    print(f"--autoresume: {args.run_dir} holds a run; resuming it")
    args.resume, args.run_dir, args.init, args.config = args.run_dir, None, None, None
    return given


def start_config(args: argparse.Namespace):
    """The config this command line starts a run with: from ``--config``, else ``--init``'s
    checkpoint's, else the defaults, with the ``--section.field`` flags."""
    from distdiff import config as config_lib
    from distdiff.checkpoint import CheckpointError, load_checkpoint

    try:
        base = config_lib.from_dict(load_checkpoint(args.init)["config"]) if args.init and not args.config else None
        return config_lib.from_args(args, base=base)
    except (config_lib.ConfigError, CheckpointError) as e:
        fail(str(e))


def check_autoresumed(ran, given, run_dir: Path, script: str) -> None:
    """Refuse to go on with a run that ``--autoresume`` found in ``run_dir`` whose config ``ran``
    (with this command line's ``--section.field`` flags) is not ``given``, the one this command
    line starts: the job's config file or flags changed since it started, and going on would
    train neither what the run was nor what the command line asks for."""
    from distdiff import config as config_lib

    changed = config_lib.changed_fields(ran, given)
    if changed:
        fail(f"--autoresume: the run in {run_dir} was started with another config than this command line makes "
             f"({'; '.join(changed)}): continue it as it is with python launch/{script} --resume {run_dir} (changing "
             f"fields with --section.field), or start another --run-dir")


def note_changes(ran, cfg, run_dir: Path) -> None:
    """Say which fields of the config a run ran with (``ran``) a resume's flags change in
    ``cfg``: a requeued job's edited flags change its hyperparameters mid-run, which its log
    then shows."""
    from distdiff import config as config_lib

    changed = [f"{key} {before!r} -> {value!r}" for key, before, value in config_lib.differences(ran, cfg)]
    if changed:
        print(f"note: resuming {run_dir} with this command line's changes to its config: {'; '.join(changed)}")


def default_run_dir(kind: str) -> Path:
    # A random suffix: runs started in the same second (a job array across nodes, a shell loop,
    # containers that are all pid 1) would otherwise share a dir that none of them holds a
    # checkpoint in yet, and write over each other.
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def held_out_for_best(checkpoints, seed: int, flag: str) -> int:
    """The seed to judge ``checkpoints`` on, where ``seed`` is their runs' ``eval.seed``: another
    one (:func:`distdiff.evaluation.held_out_seed`), said on stderr, when one of them is a
    ``best.pt``, which the run's evaluations chose on ``seed``'s episodes (on them it would look
    better than it is: the winner's curse)."""
    from distdiff.evaluation import held_out_seed

    if not any(checkpoint_file(path).name == BEST for path in checkpoints):
        return seed
    held = held_out_seed(seed)
    print(f"note: {BEST} was chosen by the run's evaluations on eval.seed={seed}; it is judged on other episodes, "
          f"{flag.lstrip('-')}={held} ({flag} for others)", file=sys.stderr)
    return held


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Interrupt(threading.Event):
    """Set by a first Ctrl-C; ``again`` by a second one, where a third is what raises."""

    def __init__(self):
        super().__init__()
        self.again = threading.Event()


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
