"""What a phase-2 checkpoint costs the driver to fetch from its actors: the learner's state (nets,
EMA copies, optimizers: ~700 tensors at the default model) and a full replay's (a few large
tensors), each fetched from its actor as torch tensors, which Ray pickles one at a time through
``torch.save``, and packed, as a run fetches them (``messages.pack_tensors``: each tensor's bytes
as a numpy array, which Ray hands over out of band; the driver's ``unpack_tensors`` copies them
out). Also the time to write the learner's state to disk, which follows the fetch.

    python bench/checkpoint.py                          # configs/walker2d.yaml
    python bench/checkpoint.py --config configs/smoke.yaml

The nets are untrained and the replay's episodes synthetic (loaded into the replay actor as a
resume loads them): the cost depends on the tensors' number and size, not their values. Prints
one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (HelpFormatter, add_config_argument, fresh_checkpoint, load_config, replay_kwargs,  # noqa: E402
                     start_local_ray, synthetic_episodes)

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from distdiff.checkpoint import map_leaves, save_checkpoint  # noqa: E402
from distdiff.cli import positive_int  # noqa: E402
from distdiff.distributed.actors import RayLearner, RayReplay  # noqa: E402
from distdiff.distributed.learner import Learner  # noqa: E402
from distdiff.distributed.messages import pack_tensors, unpack_tensors  # noqa: E402
from distdiff.distributed.replay import Replay  # noqa: E402


class TimedLearner(RayLearner):
    """The learner actor, which can also hand over its state unpacked."""

    def torch_state(self):
        return Learner.state_dict(self)


class TimedReplay(RayReplay):
    """The replay actor, which can also hand over its state unpacked."""

    def torch_state(self):
        return Replay.state_dict(self)


def count(state):
    """(tensors, MiB) in a nested state."""
    found = []
    map_leaves(state, torch.is_tensor, found.append)
    return len(found), sum(t.nbytes for t in found) / 2**20


def median_ms(fetch, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first warms both sides
        t0 = time.perf_counter()
        fetch()
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times[1:]), 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_config_argument(p)
    p.add_argument("--repeats", type=positive_int, default=10, help="Fetches timed of each kind (their median is printed).")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(p, args.config)
    start_local_ray(num_cpus=2)
    learner = ray.remote(TimedLearner).options(num_cpus=0).remote(
        config=cfg.to_dict(), checkpoint=pack_tensors(fresh_checkpoint(cfg)), device="cpu")
    state = unpack_tensors(ray.get(learner.state_dict.remote()))
    tensors, mib = count(state)
    out = {"learner": {"tensors": tensors, "mib": round(mib, 1),
                       "fetch_torch_ms": median_ms(lambda: ray.get(learner.torch_state.remote()), args.repeats),
                       "fetch_packed_ms": median_ms(lambda: unpack_tensors(ray.get(learner.state_dict.remote())),
                                                    args.repeats)}}
    with tempfile.TemporaryDirectory() as tmp:
        out["learner"]["save_ms"] = median_ms(lambda: save_checkpoint(os.path.join(tmp, "c.pt"), state), args.repeats)
    rng = np.random.default_rng(0)
    kwargs = replay_kwargs(cfg, synthetic_episodes(cfg, 200, rng))
    full = Replay(**kwargs)
    full.add(synthetic_episodes(cfg, max(cfg.online.replay_capacity // cfg.env.max_episode_steps, 1), rng))
    replay = ray.remote(TimedReplay).options(num_cpus=0).remote(**kwargs)
    ray.get(replay.load_state_dict.remote(pack_tensors(full.state_dict())))
    tensors, mib = count(full.state_dict())
    out["replay"] = {"transitions": full.size(), "tensors": tensors, "mib": round(mib, 1),
                     "fetch_torch_ms": median_ms(lambda: ray.get(replay.torch_state.remote()), args.repeats),
                     "fetch_packed_ms": median_ms(lambda: unpack_tensors(ray.get(replay.state_dict.remote())),
                                                  args.repeats)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
