"""Replay sampling on the learner's path: the time of one learner call's batches
(online.updates_per_call × train.batch_size windows) from a full replay, right after an episode
was added (the replay rebuilds its online windows first) and again without an add; then the
time those batches take from Ray's object store into a learner actor's call (`to_learner_ms`:
as numpy arrays, which the replay actor sends; `to_learner_torch_ms`: as torch tensors, which
Ray pickles), less an empty call's.

    python bench/replay.py                        # configs/walker2d.yaml: 200k online transitions
    python bench/replay.py --episodes 50          # a replay of 50 1,000-step episodes

Episodes are synthetic (Gaussian states, uniform actions): the cost depends on their number and
length, not on their values. The driver samples the next call's batches while the learner
trains, so on a fast (GPU) learner this time is hidden as long as it stays below a call's.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (HelpFormatter, add_config_argument, load_config, replay_kwargs, start_local_ray,  # noqa: E402
                     synthetic_episodes)

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from distdiff.cli import positive_int  # noqa: E402
from distdiff.data.windows import Batch  # noqa: E402
from distdiff.distributed.replay import Replay  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_config_argument(p)
    p.add_argument("--episodes", type=positive_int, default=None,
                   help="online episodes in the replay (default: as many as online.replay_capacity holds)")
    p.add_argument("--repeats", type=positive_int, default=5, help="Samples timed of each kind (their median is printed).")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(p, args.config)
    o, n_steps = cfg.online, cfg.env.max_episode_steps
    rng = np.random.default_rng(0)
    replay = Replay(**replay_kwargs(cfg, synthetic_episodes(cfg, 200, rng)))
    replay.add(synthetic_episodes(cfg, o.replay_capacity // n_steps if args.episodes is None else args.episodes, rng))
    after_add, again = [], []
    for _ in range(args.repeats):
        replay.add(synthetic_episodes(cfg, 1, rng))
        t0 = time.perf_counter()
        replay.sample(o.updates_per_call, cfg.train.batch_size)
        t1 = time.perf_counter()
        replay.sample(o.updates_per_call, cfg.train.batch_size)
        t2 = time.perf_counter()
        after_add.append(t1 - t0)
        again.append(t2 - t1)
    batches = replay.sample(o.updates_per_call, cfg.train.batch_size)
    print(json.dumps({"online_transitions": replay.size(), "batches": o.updates_per_call,
                      "batch_size": cfg.train.batch_size,
                      "mib": round(sum(t.nbytes for b in batches for t in b) / 2**20, 1),
                      "sample_after_add_ms": round(1e3 * statistics.median(after_add), 1),
                      "sample_ms": round(1e3 * statistics.median(again), 1),
                      **to_learner_ms(batches, 10 * args.repeats)}))


def to_learner_ms(batches, repeats: int) -> dict:
    """Median time of an actor call whose argument is ``batches`` in the object store, as the
    learner gets them (Batch.from_numpy for arrays), less that of an empty call."""
    @ray.remote(num_cpus=0)
    class Takes:
        def take(self, batches):
            if batches and isinstance(batches[0].x_start, np.ndarray):
                batches = [Batch.from_numpy(b) for b in batches]
            return len(batches)

    start_local_ray(num_cpus=2, logging_level="error")
    try:
        actor = Takes.remote()
        out = {}
        for key, sent in (("empty", []), ("to_learner", [b.numpy() for b in batches]), ("to_learner_torch", batches)):
            ref = ray.put(sent)
            times = []
            for _ in range(repeats + 3):
                t0 = time.perf_counter()
                ray.get(actor.take.remote(ref))
                times.append(time.perf_counter() - t0)
            out[key] = statistics.median(times[3:])
        return {f"{k}_ms": round(1e3 * (out[k] - out["empty"]), 2) for k in ("to_learner", "to_learner_torch")}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
