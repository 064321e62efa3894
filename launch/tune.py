"""Ray Tune sweeps of distdiff training over any config field (β schedule, guidance scale, ...).

    python launch/tune.py --config configs/tune.yaml [--num-samples N] [--max-concurrent M]
    python launch/tune.py --config configs/tune_prior.yaml   # phase 2 over one trained prior (init:)
    tensorboard --logdir runs/tune          # every trial side by side

Each trial runs launch/train.py's training as a function inside its own placement group.
ASHA stops weak trials early (PBT with `scheduler: pbt`). At the end: a table of trials
(printed, and trials.csv) and best_config.yaml, which `launch/train.py --config` accepts as is
(with --init CHECKPOINT for a sweep whose trials start from the sweep file's `init:`), both in
STORAGE/NAME/ (NAME: the sweep file's `name`). A sweep whose trials all failed writes
no best_config.yaml and exits with 1. An interrupted sweep continues with --resume (finished
trials are not run again); --autoresume continues it or starts it (a requeued job).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distdiff.cli import (add_ray_arguments, check_output, check_outside_job_copy, connect_job, fail,
                          line_buffered_output, make_parser, positive_int)
from distdiff.process import default_ray_auth, limit_threads

limit_threads()
line_buffered_output()
default_ray_auth()

from distdiff.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def storage_dir(value: str) -> Path:
    # pathlib would turn s3://bucket into the local directory s3:/bucket.
    if "://" in value:
        raise argparse.ArgumentTypeError(f"{value!r}: a directory is needed (on several nodes, one they all mount); "
                                         "storage URIs are not supported")
    return Path(value)


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tune.yaml",
                   help="Sweep file, the search space in YAML (default: the repo's configs/tune.yaml).")
    p.add_argument("--num-samples", type=positive_int, default=None, help="Trials to sample (overrides the sweep file).")
    p.add_argument("--max-concurrent", type=positive_int, default=None, help="Trials at once (overrides the sweep file).")
    p.add_argument("--storage", type=storage_dir, default=Path("runs/tune"), metavar="STORAGE",
                   help="Where trials, checkpoints and logs go: STORAGE/NAME/ (NAME: the sweep file's `name`), with "
                        "trials.csv and best_config.yaml (default: %(default)s). On more than one node, a directory "
                        "that every node mounts at the same path (NFS).")
    p.add_argument("--resume", action="store_true", help="Continue the interrupted sweep in --storage.")
    p.add_argument("--autoresume", action="store_true",
                   help="Continue the sweep in --storage if it is stored there (as --resume does), else start it: one "
                        "command line for a job that is requeued or restarted (--num-samples and --max-concurrent "
                        "count where it starts).")
    add_ray_arguments(p)
    args = p.parse_args(argv)
    check_outside_job_copy(args.storage, "--storage")
    check_output(args.storage, "--storage", directory=True)

    if args.autoresume and args.resume:
        fail("--autoresume resumes a stored sweep by itself; drop --resume")
    if args.resume and (args.num_samples is not None or args.max_concurrent is not None):
        fail("--resume continues the sweep as it started: Tune keeps its number of trials and how many run at once, "
             "so --num-samples and --max-concurrent would do nothing")

    from distdiff.distributed.tuning import (check_new, check_resumable, idle_options, load_spec, started_counts, stored,
                                            sweep_path)

    try:
        counts = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent}
        if args.resume or args.autoresume:
            # Those the stored sweep started with, which Tune keeps: a PBT sweep started with
            # --max-concurrent 2 from a file that says 1 is judged, and counted, by them.
            counts.update(started_counts(args.config, args.storage))
        spec = load_spec(args.config, allow_idle=True, **counts)  # (refused below, for a new sweep only)
        if args.autoresume and stored(spec, args.storage):
            # (Tune keeps the stored sweep's number of trials and how many run at once.)
            print(f"--autoresume: a sweep is stored at {sweep_path(spec, args.storage)}; resuming it")
            args.resume = True
        # Before Ray starts, which takes a while.
        idle = idle_options(spec)
        if args.resume:
            check_resumable(spec, args.storage)
            for problem in idle:
                # A sweep started before they were refused: its file may not change now.
                print(f"warning: {problem} (this sweep was started before such options were refused, and goes on "
                      "as it started)", file=sys.stderr)
        else:
            if idle:
                fail("invalid sweep:\n  " + "\n  ".join(idle))
            check_new(spec, args.storage)
    except ConfigError as e:
        fail(str(e))

    from distdiff.data.minari_io import DatasetError
    from distdiff.distributed.cluster import shutdown
    from distdiff.distributed.tuning import make_tuner, pbt_changes, shortfall, summarize, sweep_dataset, trial_count

    env_vars = {k: os.environ[k] for k in ("MINARI_DATASETS_PATH",) if k in os.environ}
    started = connect_job(args.address, args.num_cpus, runtime_env={"env_vars": env_vars} if env_vars else None)
    short = shortfall(spec)
    if short:
        what = f"a trial reserves {' and '.join(short)}"
        if started:
            shutdown()
            fail(f"{what}, more than this machine's Ray: it would never start. Lower the sweep's `resources:` or "
                 "online.num_actors, or give --num-cpus")
        print(f"warning: {what}: trials wait for nodes an autoscaler adds", file=sys.stderr)
    try:
        pinned = sweep_dataset(spec, args.storage, resume=args.resume)
        tuner = make_tuner(spec, args.storage, resume=args.resume, pinned=pinned)
        # Before Tune's own line, which names a directory of its ray/tune/* copies alone, in the
        # Ray session's temporary files: no Ray option names another.
        print(f"TensorBoard, every trial's curves (copied every few minutes): tensorboard --logdir "
              f"{sweep_path(spec, args.storage)} (not the driver_artifacts Tune names below)")
        results = tuner.fit()
        unfinished = [r for r in results if r.error is None and not r.metrics.get("done", False)]
        # With those not made yet, which the results leave out (a Ctrl-C taken as the last trial
        # made so far ended leaves none of them unfinished).
        left = len(unfinished) + max(0, trial_count(spec) - len(results))
        if left:
            # Tune turns Ctrl-C into a graceful stop and returns: no table for a sweep cut short.
            print(f"sweep interrupted with {left} of {trial_count(spec)} trial(s) unfinished; continue it with: "
                  f"python launch/tune.py --config {args.config} --storage {args.storage} --resume", file=sys.stderr)
            return 130
        out = summarize(results, spec, args.storage)
    except (ConfigError, DatasetError) as e:
        fail(str(e))
    finally:
        if started:
            shutdown()
    print(out["table_text"])
    if out["best_config"] is None:
        fail(f"no trial ended without an error and with a {spec.metric} to rank it by: no best config (trials: "
             f"{out['table']}; their error.txt under {sweep_path(spec, args.storage)})", code=1)
    if pbt_changes(spec, args.storage):
        print(f"note: PBT changed trials' configs as they trained (the pbt_policy_*.txt files in "
              f"{sweep_path(spec, args.storage)} list when): best_config.yaml is where the best one ended, which a run "
              "from the start with those values does not repeat")
    init = f" --init {spec.init}" if spec.init else ""
    print(f"trials: {out['table']}\nbest config: {out['best_config']}\n"
          f"train it: python launch/train.py --config {out['best_config']}{init}")
    if results.num_errors:
        # The best is of the others: a script (a job requeued until it succeeds) must see that the
        # sweep did not run whole, as Tune's own tune.run raises by default.
        print(f"{results.num_errors} of {len(results)} trial(s) errored, and the best config is of the others: see "
              f"their error.txt under {sweep_path(spec, args.storage)}; --resume runs them again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
