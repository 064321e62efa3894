"""Evaluate a checkpoint in the real env: returns, normalized score and the alignment error
(RMSE between planned states and the states reached by executing the planned actions).

    python launch/evaluate.py --checkpoint runs/pretrain-X/checkpoint.pt --episodes 10 --guidance 0.1

A phase-2 checkpoint can be judged blended with the prior it started from (see README):

    python launch/evaluate.py --checkpoint runs/train-X/checkpoint.pt --online.prior_weight 0.4

Many episodes run faster on Ray's rollout actors, eval.num_envs episodes per actor's task:

    python launch/evaluate.py --checkpoint runs/train-X/checkpoint.pt --episodes 100 --num-actors 16
"""
from __future__ import annotations

import argparse
import operator
import sys
from pathlib import Path

from distdiff.cli import (add_ray_arguments, check_eval_output, connect_job, fail, held_out_for_best,
                          line_buffered_output, make_parser, positive_int, take_alias)
from distdiff.process import default_ray_auth, limit_threads, progress_bar

limit_threads()
line_buffered_output()
default_ray_auth()

import torch  # noqa: E402

from distdiff import config as config_lib  # noqa: E402
from distdiff.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from distdiff.evaluation import evaluate  # noqa: E402
from distdiff.files import to_json, write_json  # noqa: E402
from distdiff.rollout import NonFinitePlan  # noqa: E402
from distdiff.rundir import checkpoint_file, eval_file  # noqa: E402
from distdiff.training import planner_from_checkpoint  # noqa: E402


def judge(args, cfg, planner, bar) -> dict:
    """The evaluation's summary, from parallel Ray actors or from this process."""
    if args.num_actors == 1:
        return evaluate(planner, cfg, progress=lambda r: bar.update(1))
    from distdiff.distributed.cluster import RunFailed, shutdown
    from distdiff.distributed.collection import evaluate_in_parallel

    started = connect_job(args.address, args.num_cpus, log=bar.write)
    try:
        return evaluate_in_parallel(planner, cfg, num_actors=args.num_actors, progress=bar.update, log=bar.write)
    except RunFailed as e:
        bar.close()
        fail(f"{e}\nnothing was written", code=1)
    finally:
        if started:
            shutdown()


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt (or its run dir).")
    p.add_argument("--episodes", type=positive_int, default=None, help="Episodes to run (default eval.episodes).")
    p.add_argument("--guidance", type=float, default=None, help="Guidance scale k (same as --guidance.scale).")
    p.add_argument("--out", type=Path, default=None,
                   help="Summary JSON (default beside the checkpoint: eval.json, or NAME.eval.json for NAME.pt).")
    p.add_argument("--num-actors", type=positive_int, default=1,
                   help="Run the episodes on this many parallel Ray actors, on the Ray that --address finds (1: in "
                        "this process, without Ray). Each episode starts where it would with 1; the sampler's noise "
                        "is drawn per eval.num_envs episodes, so the figures are the same for every --num-actors "
                        "above 1, and others with 1, whose envs share one stream (default: %(default)s).")
    add_ray_arguments(p)
    config_lib.add_arguments(p, from_checkpoint=True)
    p.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)  # refused below, with the reason
    args = p.parse_args(argv)
    if args.config is not None:
        fail("evaluate plans with the checkpoint's own config; drop --config (override fields with --section.field)")
    given = config_lib.given_overrides(args)
    for key, instead in config_lib.TRAINING_ONLY.items():
        if key in given:
            fail(f"--{key} sets what a training run does; {instead}")
    refused = config_lib.refused_overrides(args)
    if refused:
        fail(f"{', '.join(refused)}: {'these' if len(refused) > 1 else 'this'} made or trained the checkpoint's nets, "
             f"which evaluate judges as they are; it overrides only how they act (--help lists those flags)")
    if args.num_actors > 1 and "train.num_threads" in given:
        fail("--train.num_threads sets the threads of an evaluation in this process (--num-actors 1); rollout "
             "actors plan with one thread each")
    take_alias(args, "guidance", "guidance.scale")
    take_alias(args, "episodes", "eval.episodes")
    # Before the work: beside the checkpoint by default, which may be someone else's or read-only.
    check_eval_output(args.out or eval_file(checkpoint_file(args.checkpoint)),
                      "--out" if args.out is not None else "the summary (--out for another place)")
    try:
        state = load_checkpoint(args.checkpoint)
        base = config_lib.from_dict(state["config"])
        if args.cfg__eval__seed is None:
            seed = held_out_for_best([args.checkpoint], base.eval.seed, "--eval.seed")
            if seed != base.eval.seed:  # (an override, recorded in the summary as one)
                args.cfg__eval__seed = seed
        cfg = config_lib.from_args(args, base=base)
        if cfg.online.prior_weight > 0 and args.cfg__online__prior_weight is not None and "prior" not in state:
            fail(f"--online.prior_weight blends a phase-2 checkpoint with the prior it started from, and "
                 f"{args.checkpoint} is not one (it is its own prior): the blend would judge it unchanged")
        # (Here, not as a traceback from the first env made: a MUJOCO_GL whose backend is missing.)
        problem = config_lib.env_problem(cfg.env)
        if problem:
            fail(problem)
        problem = config_lib.alignment_problem(cfg.env.id) if cfg.eval.measure_alignment else ""
        if problem:
            fail(f"{problem}: pass --eval.measure_alignment false to judge it without the alignment error")
        torch.set_num_threads(cfg.train.num_threads)
        planner = planner_from_checkpoint(state, cfg)
    except (config_lib.ConfigError, CheckpointError, ValueError) as e:
        fail(str(e))
    bar = progress_bar(total=cfg.eval.episodes, desc="evaluate")
    try:
        summary = judge(args, cfg, planner, bar)
    except NonFinitePlan as e:
        bar.close()
        fail(f"{e}: this checkpoint's planner is broken; nothing was written")
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted after {bar.n} of {cfg.eval.episodes} episodes; nothing was written", file=sys.stderr)
        return 130
    bar.close()
    summary["num_actors"] = args.num_actors
    summary["checkpoint"] = str(args.checkpoint)
    summary["step"] = int(state["step"])
    # What was judged besides the checkpoint's own config: two eval.json of one checkpoint differ
    # in these (a blend with the prior, another sampler, more episodes).
    summary["overrides"] = {key: operator.attrgetter(key)(cfg) for key in config_lib.given_overrides(args)}
    out = args.out or eval_file(checkpoint_file(args.checkpoint))
    per_item = ("alignment_error_per_step", "episode_returns", "episode_lengths")
    # Printed first: a write that fails still leaves the result in the terminal.
    print(to_json({k: v for k, v in summary.items() if k not in per_item}))
    try:
        write_json(out, summary)
    except OSError as e:
        fail(f"the summary (above) could not be written to {out}: {e}")
    print(f"summary: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
