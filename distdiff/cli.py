"""Shared pieces of the launch scripts: arguments, run dirs, error exits (what the library uses
too is in :mod:`distdiff.process`)."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from distdiff.process import RAY_JOB_ENV
from distdiff.rundir import BEST, BEST_METRICS, CHECKPOINT, CONFIG, METRICS, checkpoint_file, foreign_run_files, holds_run


class ArgumentParser(argparse.ArgumentParser):
    """argparse that answers a bad argument in two lines: with every config field a flag, the
    usage runs to ~50 lines above the one error that matters. A mistyped option gets the
    closest real one."""

    _given: List[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)  # (for error's hints)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            # Only what --help shows: a hidden flag is one this script refuses.
            shown = [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
            hints = [f"{wrong}: did you mean {close[0]}?" for wrong in re.findall(r"--[\w.-]+", message)
                     if (close := difflib.get_close_matches(wrong, shown, n=1, cutoff=0.8))]
            message += "".join(f"\n  {hint}" for hint in hints)
        elif (m := re.match(r"argument ([^:/ ]+)\S*: expected one argument$", message)):
            # argparse reads a value that starts with - and is no plain number (-5,360) as a flag.
            given = self._given
            at = given.index(m.group(1)) if m.group(1) in given else -1
            if 0 <= at < len(given) - 1 and given[at + 1].startswith("-"):
                message += f" (a value that starts with - goes after an =: {m.group(1)}={given[at + 1]})"
        self.exit(2, f"usage: {self.prog} [options] (see --help)\n{self.prog}: error: {message}\n")


def make_parser(description: Optional[str]) -> ArgumentParser:
    """A launch script's parser: its docstring as the description, no abbreviated flags (a
    prefix such as --diffusion.schedul would set a field unnoticed)."""
    return ArgumentParser(description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)


def line_buffered_output() -> None:
    """Each line on stdout as it is printed, also where it goes to a file (a batch job's log,
    nohup): Python would hold up to 8 KB of it, so a warning or an evaluation showed late, out of
    order with stderr, and was lost where the job was killed."""
    with contextlib.suppress(AttributeError, ValueError):  # (a stream replaced by one without it)
        sys.stdout.reconfigure(line_buffering=True)


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


def connect_job(address: Optional[str], num_cpus: Optional[int], log: Callable[[str], None] = print,
                runtime_env: Optional[Dict[str, object]] = None) -> bool:
    """:func:`distdiff.distributed.cluster.connect` for a launch script, which has made nothing
    yet: a cluster it cannot reach, or a Ctrl-C while Ray starts or answers (which can take
    seconds), ends the script with one line instead of a traceback."""
    from distdiff.distributed.cluster import ClusterUnreachable, connect

    try:
        return connect(address, num_cpus, log=log, runtime_env=runtime_env)
    except ClusterUnreachable as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted while connecting to Ray; nothing was started", code=130)
