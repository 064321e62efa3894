"""Rollout scaling: env steps/s with 1 rollout actor and with N (default: nproc) in one run.

Prints one JSON line with "efficiency" = rate(N) / (N × rate(1)). Target ≥ 0.9.
Actors plan with untrained default-config weights (speed does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (HelpFormatter, add_config_argument, fresh_weights, load_config, positive_float,  # noqa: E402
                     start_local_ray, unit_normalizer)

from distdiff.cli import positive_int  # noqa: E402
from distdiff.distributed.actors import RolloutWorkerActor  # noqa: E402


def rate(cfg, n: int, seconds: float, weights_ref) -> float:
    workers = [RolloutWorkerActor.options(num_cpus=1).remote(
        config=cfg.to_dict(), normalizer=unit_normalizer(cfg).state_dict(), worker_id=i) for i in range(n)]
    ray.get([w.set_weights.remote(weights_ref) for w in workers])
    ray.get([w.rollout.remote() for w in workers])  # warm up
    # Each worker's rate over its own finished rollouts: the rollouts still running at the
    # deadline are neither counted nor timed, so N workers are not charged for N - 1
    # half-done rollouts that one worker would not have.
    steps, finished = [0] * n, [0.0] * n
    t0 = time.perf_counter()
    pending = {w.rollout.remote(): i for i, w in enumerate(workers)}
    while time.perf_counter() - t0 < seconds:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        steps[i] += ray.get(ready[0]).env_steps
        finished[i] = time.perf_counter() - t0
        pending[workers[i].rollout.remote()] = i
    for w in workers:
        ray.kill(w)
    if not all(finished):
        raise SystemExit(f"a worker finished no rollout in {seconds} s: raise --seconds")
    return sum(s / t for s, t in zip(steps, finished))


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_config_argument(p)
    p.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="N, the rollout actors of the second run (default: this machine's cores).")
    p.add_argument("--seconds", type=positive_float, default=30.0, help="Wall time of each of the two runs.")
    args = p.parse_args()
    cfg = load_config(p, args.config)
    start_local_ray(num_cpus=args.workers)
    ref = ray.put(fresh_weights(cfg))
    one = rate(cfg, 1, args.seconds, ref)
    many = rate(cfg, args.workers, args.seconds, ref)
    print(json.dumps({"workers": args.workers, "one_worker_env_steps_per_s": one, "n_workers_env_steps_per_s": many,
                      "efficiency": many / (args.workers * one), "envs_per_actor": cfg.online.envs_per_actor}))
    ray.shutdown()


if __name__ == "__main__":
    main()
