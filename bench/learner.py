"""Learner throughput: updates/s and trajectory windows/s for the default model.

    python bench/learner.py                 # CPU (one thread)
    python bench/learner.py --device cuda   # on a CUDA machine
    python bench/learner.py --device cuda --precision bf16 --compile reduce-overhead
Prints one JSON line. Target on an H100: ≥ 10× the 2-core CPU figure at the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import HelpFormatter, add_config_argument, fresh_checkpoint, load_config  # noqa: E402

import torch  # noqa: E402

from distdiff.cli import non_negative_int, positive_int  # noqa: E402
from distdiff.data.windows import Batch  # noqa: E402
from distdiff.distributed.learner import Learner  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_config_argument(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument("--batch-size", type=positive_int, default=None, help="train.batch_size (default: the config's).")
    p.add_argument("--updates", type=positive_int, default=100, help="Updates timed, after the warm-up.")
    p.add_argument("--precision", default="fp32", help="train.precision: fp32 or bf16")
    p.add_argument("--compile", default="none", help="train.compile: none, default or reduce-overhead")
    p.add_argument("--warmup", type=non_negative_int, default=20, help="untimed updates first (compilation, CUDA graph capture)")
    args = p.parse_args()
    overrides = {"train.precision": args.precision, "train.compile": args.compile}
    if args.batch_size is not None:
        overrides["train.batch_size"] = args.batch_size
    cfg = load_config(p, args.config, overrides)
    learner = Learner(config=cfg.to_dict(), checkpoint=fresh_checkpoint(cfg), device=args.device)
    b, h, d = cfg.train.batch_size, cfg.model.horizon, cfg.env.obs_dim + cfg.env.act_dim
    batches = [Batch(torch.randn(b, h, d), torch.ones(b, h, d), torch.randn(b, cfg.env.obs_dim), torch.randn(b),
                     torch.randn(b))
               for _ in range(10)]
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    learner.train((batches * (args.warmup // len(batches) + 1))[:args.warmup])
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    while n < args.updates:
        learner.train(batches)
        n += len(batches)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                      "batch_size": b, "precision": args.precision, "compile": args.compile,
                      "updates_per_s": round(n / elapsed, 2), "windows_per_s": round(n * b / elapsed, 1),
                      "warmup_s": round(warmup_s, 1), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
