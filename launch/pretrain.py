"""Offline pretraining of the diffusion planner (denoiser, value net, and the dynamics model with
--train.train_dynamics) on a Minari dataset.

    export MINARI_DATASETS_PATH=$PWD/../shared/data/minari   # where local/ datasets are looked up
    python launch/pretrain.py --config configs/walker2d.yaml --data.dataset_id local/walker2d/sac-medium-v0
    tensorboard --logdir runs/

Ctrl-C saves a checkpoint; --resume RUN_DIR continues it, and --autoresume --run-dir RUN_DIR
continues it or starts it (a requeued job).
"""
from __future__ import annotations

import sys
from pathlib import Path

from distdiff.cli import (AUTORESUME_HELP, autoresume, check_autoresumed, check_resume_dir, check_run_dir,
                          default_run_dir, fail, line_buffered_output, make_parser, note_changes, start_config,
                          take_alias)
from distdiff.process import limit_threads, sigterm_as_interrupt

limit_threads()
line_buffered_output()

from distdiff import config as config_lib  # noqa: E402
from distdiff.checkpoint import CheckpointError, CheckpointWriteError, load_own_checkpoint  # noqa: E402
from distdiff.data.minari_io import DatasetError  # noqa: E402
from distdiff.pretrain import check_continues, is_done, pretrain  # noqa: E402
from distdiff.rundir import CHECKPOINT  # noqa: E402
from distdiff.training import check_made_with  # noqa: E402


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--dataset", default=None, help="Minari dataset id (same as --data.dataset_id).")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="Where checkpoints and TensorBoard logs go (default runs/pretrain-TIME-HEX, HEX random).")
    p.add_argument("--resume", nargs="?", const=True, default=None, type=Path, metavar="RUN_DIR",
                   help="Continue the run in RUN_DIR (or --run-dir) from its checkpoint (same step count).")
    p.add_argument("--init", type=Path, default=None,
                   help="Start from this checkpoint's weights and normalizer (fresh optimizers, step 0): fine-tunes a "
                        "prior, e.g. with --model.returns_condition true to add a return condition to an unconditioned one. "
                        "Its config is the base of --section.field flags unless --config is given.")
    p.add_argument("--autoresume", action="store_true", help=AUTORESUME_HELP)
    p.add_argument("--overwrite", action="store_true", help="Start again in a --run-dir that holds a run, replacing its files.")
    config_lib.add_arguments(p)
    args = p.parse_args(argv)
    take_alias(args, "dataset", "data.dataset_id")
    given = autoresume(args, lambda run_dir: (run_dir / CHECKPOINT).is_file()) if args.autoresume else None
    run_dir = None

    def saved() -> bool:  # (when the run stopped: whether it has a checkpoint to go on from)
        return run_dir is not None and (run_dir / CHECKPOINT).is_file()

    if args.init is not None and "data.normalizer" in config_lib.given_overrides(args):
        fail("--data.normalizer would do nothing: a run from --init keeps its checkpoint's normalizer, which its nets "
             "learned in")
    try:
        if args.resume:
            if isinstance(args.resume, Path):
                if args.run_dir is not None and args.run_dir != args.resume:
                    fail(f"--resume {args.resume} and --run-dir {args.run_dir} name two runs; pass one")
                args.run_dir = args.resume
            if args.run_dir is None:
                fail("--resume needs the run's dir: --resume RUN_DIR")
            if args.init is not None:
                fail("--resume continues the run's own checkpoint; drop --init")
            if args.config is not None:
                fail("--resume continues with the run's own config; drop --config (override fields with --section.field)")
            if args.overwrite:
                fail("--resume continues the run in --run-dir; --overwrite would remove it")
            check_resume_dir(args.run_dir)
            state = load_own_checkpoint(args.run_dir / CHECKPOINT)
            check_continues(state, args.run_dir)
            base = config_lib.from_dict(state["config"])
            cfg = config_lib.from_args(args, base=base)
            if given is not None:
                check_autoresumed(cfg, given, args.run_dir, "pretrain.py")
            # Before the start line: what the run's nets cannot train with is refused first.
            check_made_with(state, cfg)
            note_changes(base, cfg, args.run_dir)
            if is_done(state, cfg):
                print(f"{args.run_dir} has pretrained its {cfg.train.steps} steps: nothing to train, nothing written "
                      f"(--train.steps N with a larger N trains it on)")
                print(f"checkpoint: {args.run_dir / CHECKPOINT}")
                return 0
            run_dir = args.run_dir
        else:
            # From --init without --config: the checkpoint's config, whose model fits its nets.
            cfg = start_config(args)
            run_dir = args.run_dir or default_run_dir("pretrain")
            check_run_dir(run_dir, overwrite=args.overwrite, keep=args.init)
        problems = config_lib.nonfinite_problems(cfg) + config_lib.dataset_problems(cfg)
        if problems:
            fail("invalid config:\n  " + "\n  ".join(problems))
        if cfg.train.steps == 0 and args.init is None:
            print("warning: train.steps is 0: the checkpoint will hold untrained nets", file=sys.stderr)
        print(f"pretraining on {cfg.data.dataset_id} -> {run_dir}", flush=True)
        # SIGTERM as Ctrl-C before the loop too (loading data): Python's default ends at once.
        with sigterm_as_interrupt():
            path = pretrain(cfg, run_dir, resume=bool(args.resume), init=args.init, overwrite=args.overwrite)
    except CheckpointWriteError as e:
        fail(f"{e}\n" + (f"the last checkpoint is intact: python launch/pretrain.py --resume {run_dir}" if saved()
                         else "no checkpoint was written yet"), code=1)
    except (config_lib.ConfigError, DatasetError, CheckpointError) as e:
        fail(str(e))
    except FloatingPointError as e:  # updates that kept going non-finite: a failure after work, not a refusal
        fail(f"{e}\n" + (f"its last checkpoint: {run_dir / CHECKPOINT}" if saved() else "no checkpoint was written yet"),
             code=1)
    except KeyboardInterrupt:
        print("interrupted; " + (f"checkpoint saved; resume with: python launch/pretrain.py --resume {run_dir}" if saved()
                                 else "no checkpoint was written yet"), file=sys.stderr)
        return 130
    print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
