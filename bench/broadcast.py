"""Weight broadcast: time until 1, 8 and 32 rollout actors hold a new version, and object-store
usage over 100 broadcasts. Targets: 32 actors ≤ 2× one actor; flat object-store memory.
Beside each broadcast it times the same fan-out twice more, to say where the time goes:
``resend_s`` hands the actors the version they already hold (the object is fetched and
unpickled, nothing is loaded into the nets), ``empty_call_s`` a call with no argument (Ray's
dispatch alone).

Prints one JSON line. Uses real RolloutWorker actors (default config) with fractional CPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (HelpFormatter, add_config_argument, fresh_checkpoint, load_config, start_local_ray,  # noqa: E402
                     unit_normalizer)

from distdiff.cli import positive_int  # noqa: E402
from distdiff.distributed.actors import LearnerActor, RolloutWorkerActor  # noqa: E402


def plasma():
    from ray._private.internal_api import memory_summary

    # This run's own cluster: with no address Ray asks whichever cluster its address file last
    # recorded, which a `ray start --head` since stopped leaves pointing at a dead one.
    address = ray.get_runtime_context().gcs_address
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", memory_summary(address=address, stats_only=True))
    return {"mib": int(m.group(1)), "objects": int(m.group(2))}


def settled_plasma(timeout_s: float = 60.0, still: int = 4):
    """Object-store use once the frees Ray makes in the background are done: the same reading
    ``still`` times over, half a second apart. (Twice was not enough: Ray frees versions in
    bursts, and one run read 32 versions alive between two of them.)"""
    last, same, deadline = plasma(), 1, time.monotonic() + timeout_s
    while same < still and time.monotonic() < deadline:
        time.sleep(0.5)
        now = plasma()
        same = same + 1 if now == last else 1
        last = now
    return last


def positive_sizes(text: str):
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated actor counts, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"actor counts must be >= 1, got {text!r}")
    return sizes


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_config_argument(p)
    p.add_argument("--sizes", type=positive_sizes, default="1,8,32", help="Comma-separated numbers of rollout actors to broadcast to.")
    p.add_argument("--repeats", type=positive_int, default=10, help="Broadcasts timed per size (their median is printed, the higher middle one for an even count).")
    args = p.parse_args()
    cfg = load_config(p, args.config, {"online.envs_per_actor": 1})
    sizes = args.sizes
    start_local_ray()
    learner = LearnerActor.options(num_cpus=0).remote(config=cfg.to_dict(), checkpoint=fresh_checkpoint(cfg), device="cpu")
    t0 = time.perf_counter()
    workers = [RolloutWorkerActor.options(num_cpus=0.01).remote(
        config=cfg.to_dict(), normalizer=unit_normalizer(cfg).state_dict(), worker_id=i) for i in range(max(sizes))]
    ray.get([w.ping.remote() for w in workers])
    out = {"actor_startup_s": time.perf_counter() - t0}
    kinds = ("broadcast_s", "resend_s", "empty_call_s")
    for n in sizes:
        def fan_out(method, *args):
            t = time.perf_counter()
            ray.get([getattr(w, method).remote(*args) for w in workers[:n]])
            return time.perf_counter() - t

        times = {k: [] for k in kinds}
        for _ in range(args.repeats):
            ref = learner.publish.remote()
            ray.wait([ref])
            times["broadcast_s"].append(fan_out("set_weights", ref))
            # The version every actor now holds: fetched and unpickled, but not loaded.
            times["resend_s"].append(fan_out("set_weights", ref))
            times["empty_call_s"].append(fan_out("ping"))
        for k in kinds:
            out.setdefault(k, {})[str(n)] = statistics.median_high(times[k])
    out[f"ratio_{max(sizes)}_to_{min(sizes)}"] = out["broadcast_s"][str(max(sizes))] / out["broadcast_s"][str(min(sizes))]
    # 100 versions sent back to back to every actor, without waiting (harder on the store than
    # the driver, which hands a version only to idle actors): flat if, once Ray's frees are
    # done, the store holds what it held before, the newest version alone. Read every 10, after
    # the actors took them, to show how many versions were alive meanwhile.
    before = settled_plasma()
    during = []
    for k in range(100):
        ref = learner.publish.remote()
        for w in workers:
            w.set_weights.remote(ref)
        if k % 10 == 9:
            ray.get([w.ping.remote() for w in workers])
            during.append(plasma())
    out["object_store_before"], out["object_store_after_100"] = before, settled_plasma()
    out["object_store_peak_read"] = max(during, key=lambda r: r["mib"])
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
