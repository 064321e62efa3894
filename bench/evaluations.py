"""Mid-run evaluations in phase 2: how much of their time the run still waits for.

Runs the same phase 2 twice from one short-pretrained prior, with a fixed update budget: once
with only the final evaluation, once with one every ``--eval-every`` updates too. Each
evaluation is timed where the driver calls it. Prints one JSON line: each run's wall time,
evaluations and their total time (played in a thread of the driver, or with ``--eval-actors``
on the rollout actors), and ``hidden_share`` = 1 − extra wall time ÷ (the extra
evaluations × one evaluation's time alone, that of the first run's final one, which nothing
runs beside): 0 when the run waits for every evaluation, 1 when training hides them all.
(Timed beside training, an evaluation takes longer, as it shares the cores.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MINARI_PATH_HELP, HelpFormatter, add_config_argument, load_config, start_local_ray,  # noqa: E402
                     use_minari_store)

from distdiff.cli import non_negative_int, positive_int  # noqa: E402
from distdiff.distributed import driver  # noqa: E402
from distdiff.pretrain import pretrain  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_config_argument(p)
    p.add_argument("--dataset", default="local/walker2d/sac-medium-v0", help="Offline dataset of the prior and of phase 2.")
    p.add_argument("--minari-path", default=None, help=MINARI_PATH_HELP)
    p.add_argument("--pretrain-steps", type=positive_int, default=300, help="the prior's offline steps (its quality does not matter here)")
    p.add_argument("--num-actors", type=positive_int, default=1, help="Phase 2's rollout actors.")
    p.add_argument("--updates", type=positive_int, default=600, help="phase 2's update budget, in both runs")
    p.add_argument("--eval-every", type=positive_int, default=150, help="online.eval_every of the run with mid-run evaluations.")
    p.add_argument("--eval-episodes", type=positive_int, default=100, help="as the README recommends for choosing best.pt")
    p.add_argument("--eval-actors", type=non_negative_int, default=0,
                   help="eval.num_actors: the evaluations' episodes on this many of the rollout actors (0: in a "
                        "thread of the driver)")
    args = p.parse_args()
    use_minari_store(args.minari_path)
    base = {"data.dataset_id": args.dataset, "data.fallback_dataset_id": "", "train.steps": args.pretrain_steps,
            "train.num_threads": 1, "online.num_actors": args.num_actors, "online.env_steps": 0,
            "online.updates": args.updates, "online.finish_updates": False, "eval.episodes": args.eval_episodes,
            "eval.num_envs": args.eval_episodes, "eval.num_actors": args.eval_actors}
    if args.eval_actors:
        # A task per actor: eval.num_envs episodes each.
        base["eval.num_envs"] = -(-args.eval_episodes // min(args.eval_actors, args.num_actors))
    seconds = []

    def timed(evaluate):
        def timed_evaluate(*a, **kw):
            t = time.perf_counter()
            try:
                return evaluate(*a, **kw)
            finally:
                seconds.append(time.perf_counter() - t)
        return timed_evaluate

    driver.evaluate, driver.evaluate_on = timed(driver.evaluate), timed(driver.evaluate_on)
    out = {"num_actors": args.num_actors, "eval_actors": args.eval_actors, "updates": args.updates,
           "eval_every": args.eval_every, "eval_episodes": args.eval_episodes}
    # Both runs' configs before any work: one that does not load is a usage error.
    configs = {name: load_config(p, args.config, {**base, "online.eval_every": every})
               for name, every in (("without", 0), ("with", args.eval_every))}
    start_local_ray()
    with tempfile.TemporaryDirectory() as tmp:
        prior = pretrain(configs["without"], Path(tmp) / "prior", quiet=True)
        for name, cfg in configs.items():
            seconds.clear()
            t = time.perf_counter()
            metrics = driver.train(cfg, Path(tmp) / name, init=prior, log=lambda s: None, progress=False)
            out[name] = {"phase2_s": time.perf_counter() - t, "updates": metrics["updates"],
                         "evaluations": len(seconds), "evaluation_s": sum(seconds)}
    alone = out["without"]["evaluation_s"] / out["without"]["evaluations"]
    extra = (out["with"]["evaluations"] - out["without"]["evaluations"]) * alone
    out["evaluation_alone_s"] = alone
    out["hidden_share"] = 1 - (out["with"]["phase2_s"] - out["without"]["phase2_s"]) / extra if extra > 0 else None
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
