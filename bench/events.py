"""What a resume pays to trim a run's TensorBoard events back to its checkpoint, when it must read
an event file whole: a Tune trial that PBT moves onto another trial's checkpoint (whose recorded
sizes name the other trial's files), or a copy from storage smaller than recorded. A phase-2 run
logs a plan-vs-real figure every ``online.figure_every`` updates (~100 KB each), so a run of days
has gigabytes of events.

    python bench/events.py                   # 200 figures and 2,000 scalars (~23 MB)
    python bench/events.py --figures 2000

Writes the events with TensorBoard's own writer, then times ``events.drop_redone`` reading the
file whole and dropping the last quarter of the steps (a rewrite). ``tensorboard_reader_s`` times
TensorBoard's reader alone over the same file, as the resume read it before (it checksums every
byte in Python). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import HelpFormatter  # noqa: E402

import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from distdiff.cli import positive_int  # noqa: E402
from distdiff.events import EVENTS_GLOB, drop_redone  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--figures", type=positive_int, default=200, help="figures logged, with 10 scalars at each step")
    args = p.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="distdiff-bench-events-"))
    try:
        rng = np.random.default_rng(0)
        with SummaryWriter(str(run_dir)) as w:
            for step in range(args.figures):
                # Noise: a PNG that does not compress, ~110 KB like the plan-vs-real figure.
                w.add_image("rollout/plan_vs_real", rng.integers(0, 256, (3, 150, 250), dtype=np.uint8), step)
                for j in range(10):
                    w.add_scalar(f"losses/tag{j}", float(step), step)
        (path,) = run_dir.glob(EVENTS_GLOB)
        size = path.stat().st_size
        t0 = time.perf_counter()
        n_records = sum(1 for _ in RawEventFileLoader(str(path)).Load())
        tensorboard_s = time.perf_counter() - t0
        keep_to = args.figures * 3 // 4
        t0 = time.perf_counter()
        dropped = drop_redone(run_dir, lambda tag, step: step < keep_to, unchanged={"another trial's file": 1})
        drop_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps({"file_mb": round(size / 1e6, 1), "records": n_records, "dropped": dropped,
                      "drop_redone_s": round(drop_s, 3), "drop_redone_mb_per_s": round(size / 1e6 / drop_s, 1),
                      "tensorboard_reader_s": round(tensorboard_s, 2),
                      "tensorboard_reader_mb_per_s": round(size / 1e6 / tensorboard_s, 1)}))


if __name__ == "__main__":
    main()
