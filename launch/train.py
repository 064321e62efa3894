"""The main job: pretrain a diffusion planner offline, then align it online with many Ray
rollout actors, a shared replay and a learner (Algorithm 2), and evaluate it.

    ray start --head                       # optional: otherwise an embedded local Ray is started
    python launch/train.py --num-actors 32
    tensorboard --logdir runs/

Connects to RAY_ADDRESS or a local `ray start` cluster if there is one. Ends with metrics.json
(return_mean, normalized_score, terminations of eval_episodes, alignment_error, env_steps,
updates, weights_version, and the episodes collected online) in the run dir, and best.pt, the
checkpoint of the evaluation with the highest mean return (evaluations come at most every
online.eval_every updates, and at the end). Ctrl-C saves a checkpoint; --resume RUN_DIR
continues it, and --autoresume --run-dir RUN_DIR continues it or starts it (a requeued job).
"""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from distdiff.cli import (AUTORESUME_HELP, add_ray_arguments, autoresume, check_autoresumed, check_resume_dir,
                          check_run_dir, connect_job, default_run_dir, fail, line_buffered_output, make_parser,
                          note_changes, positive_int, take_alias)
from distdiff.process import default_ray_auth, limit_threads, sigterm_as_interrupt

limit_threads()
line_buffered_output()
default_ray_auth()

from distdiff import config as config_lib  # noqa: E402
from distdiff.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint  # noqa: E402
from distdiff.data.minari_io import DatasetError  # noqa: E402
from distdiff.files import to_json  # noqa: E402
from distdiff.rundir import holds_run  # noqa: E402
from distdiff.training import check_dynamics, check_made_with  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--num-actors", type=positive_int, default=None, help="Rollout actors (same as --online.num_actors).")
    p.add_argument("--dataset", default=None, help="Minari dataset id (same as --data.dataset_id).")
    p.add_argument("--init", type=Path, default=None,
                   help="Start phase 2 from this checkpoint (skips pretraining). Its config is the base of "
                        "--section.field flags unless --config is given; the fields that made its nets (model, "
                        "diffusion n_steps, schedule and prediction) must stay its own.")
    p.add_argument("--run-dir", type=Path, default=None, help="Output dir (default runs/train-TIME-HEX, HEX random).")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="Continue a run from its checkpoint and replay.")
    p.add_argument("--autoresume", action="store_true", help=AUTORESUME_HELP)
    p.add_argument("--overwrite", action="store_true", help="Start again in a --run-dir that holds a run, replacing its files.")
    add_ray_arguments(p)
    config_lib.add_arguments(p)
    return p


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    take_alias(args, "num-actors", "online.num_actors")
    take_alias(args, "dataset", "data.dataset_id")
    given = autoresume(args, holds_run) if args.autoresume else None
    if args.resume and args.init:
        fail("--resume and --init exclude each other")
    if args.resume and (args.overwrite or args.run_dir):
        fail("--resume continues the run in RUN_DIR; drop --run-dir and --overwrite")
    if args.resume and args.config is not None:
        fail("--resume continues with the run's own config; drop --config (override fields with --section.field)")
    if args.resume:
        check_resume_dir(args.resume)
    if args.init:
        idle = [f"--{key}" for key in config_lib.PHASE_1_ONLY if key in config_lib.given_overrides(args)]
        if idle:
            fail(f"{', '.join(idle)} would do nothing: --init skips phase 1 (pretraining), the only one that reads "
                 f"{'them' if len(idle) > 1 else 'it'}")
    from distdiff.distributed.cluster import RunFailed, shutdown
    from distdiff.distributed.driver import resume_state, run_over, train

    # Before Ray starts: a config that cannot train, or that the checkpoint's nets do not fit.
    try:
        state = resume_state(args.resume) if args.resume else load_checkpoint(args.init) if args.init else None
        # From --init without --config: the checkpoint's config, whose model fits its nets. A
        # resume goes on with the config the run trained with.
        base = None
        if args.resume:
            base = config_lib.from_saved(state["config"])
        elif state is not None and not args.config:
            base = config_lib.from_dict(state["config"])
        cfg = config_lib.from_args(args, base=base)
        if given is not None:
            check_autoresumed(cfg, given, args.resume, "train.py")
        if args.resume:
            note_changes(base, cfg, args.resume)
        config_lib.check_trainable(cfg)
        if state is not None:
            check_made_with(state, cfg)
            check_dynamics(state, cfg)
        over = run_over(cfg, args.resume, state) if args.resume else None
    except (config_lib.ConfigError, CheckpointError) as e:
        fail(str(e))
    if over is not None:
        print(over.message)  # (as train() logs it)
        return report(over.metrics, args.resume)

    run_dir = args.resume or args.run_dir or default_run_dir("train")
    if not args.resume:
        check_run_dir(run_dir, overwrite=args.overwrite, keep=args.init)
    started = connect_job(args.address, args.num_cpus)
    try:
        # SIGTERM (a scheduler's stop, `docker stop`) as Ctrl-C also where the run takes no
        # Ctrl-C of its own (loading data, starting actors): Ray's handler exited with status 15.
        # (init_state: the --init checkpoint read above, not read again.)
        with sigterm_as_interrupt():
            metrics = train(cfg, run_dir, init=args.init, init_state=state if args.init else None,
                            resume=args.resume is not None, overwrite=args.overwrite)
    except (config_lib.ConfigError, DatasetError, CheckpointError) as e:
        fail(str(e))
    except (RunFailed, OSError, FloatingPointError) as e:
        # A full or read-only disk (a checkpoint, TensorBoard's writer, metrics.json) ends the run
        # after its last whole checkpoint; any other OSError keeps its traceback. (FloatingPointError:
        # phase 1's updates kept going non-finite; phase 2's learner says so as a RunFailed.)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError) and e.errno not in DISK_FULL:
            raise
        if holds_run(run_dir):
            fail(f"{e}\nthe last checkpoint in {run_dir} is intact: python launch/train.py --resume {run_dir}", code=1)
        fail(f"{e}\n{run_dir} holds no checkpoint yet: the run must start again", code=1)
    except KeyboardInterrupt:
        # (Before phase 1's first checkpoint, e.g. during the dataset's download, there is none.)
        print("interrupted; " + (f"resume with: python launch/train.py --resume {run_dir}" if holds_run(run_dir)
                                 else "no checkpoint was written yet"), file=sys.stderr)
        return 130
    finally:
        if started:
            shutdown()
    return report(metrics, run_dir)


def report(metrics: dict, run_dir: Path) -> int:
    """The final metrics on stdout, less the per-step errors (metrics.json has them all)."""
    print(to_json({k: v for k, v in metrics.items() if k != "alignment_error_per_step"}))
    print(f"metrics: {Path(run_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
