"""Learner: fine-tunes the nets (denoiser, value, dynamics model) on replay batches (Alg. 2) and
publishes weights."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch

from distdiff.checkpoint import to_cpu
from distdiff.config import from_dict
from distdiff.data.windows import Batch
from distdiff.distributed.messages import TrainStats, Weights
from distdiff.provenance import check_same_code
from distdiff.training import Trainer, prior_of, resolve_device, seed_everything


class Learner:
    """Wraps a :class:`Trainer`; ``version`` counts published weights.

    Updates are the same denoiser loss (ε, x₀ or v), value regression on noised trajectories and
    (with ``train.train_dynamics``) dynamics loss as pretraining, now on diffused real
    trajectories from the replay, so that what the planner samples moves towards what the real
    dynamics produce.
    """

    def __init__(self, *, config: Dict[str, object], checkpoint: Dict[str, object], version: int = 0,
                 device: str = "auto", max_nonfinite: int = 20, resumed: bool = False,
                 driver_code: Optional[Tuple[str, str]] = None):
        check_same_code(driver_code)
        cfg = from_dict(config)
        torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed + 1)
        # Ray gave this actor a GPU because of online.learner_num_gpus, not train.device.
        self.device = resolve_device(device, field="the learner's device (online.learner_num_gpus)",
                                     instead="--online.learner_num_gpus 0")
        self.trainer = Trainer.from_checkpoint(checkpoint, cfg=cfg, device=self.device, lr_scale=cfg.online.lr_scale)
        if not resumed:
            # The checkpoint restored the random streams it was saved with, which a resume
            # continues; a new phase 2 from a prior draws its own, or every train.seed from
            # that prior would share one stream of noise and noise levels.
            seed_everything(cfg.train.seed + 1)
        # What evaluations blend back in (online.prior_weight): kept on CPU, and through resumes
        # and continuations, so it stays the offline prior.
        self.prior = to_cpu(prior_of(checkpoint))
        self.version = version
        self.max_nonfinite = max_nonfinite

    def train(self, batches: List[Batch]) -> TrainStats:
        """One update per batch; non-finite ones are skipped. Raises after ``max_nonfinite``
        skipped in a row, before anything bad reaches the weights."""
        t0 = time.perf_counter()
        sums: Dict[str, float] = {}
        done = skipped = 0
        for batch in batches:
            losses = self.trainer.checked_update(batch, self.max_nonfinite)
            if losses is None:
                skipped += 1
                continue
            done += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
        return TrainStats(losses={k: v / max(done, 1) for k, v in sums.items()}, updates=done, skipped=skipped,
                          seconds=time.perf_counter() - t0,
                          windows=done * (batches[0].x_start.shape[0] if batches else 0),
                          learning_rate=self.trainer.opt_denoiser.param_groups[0]["lr"])

    def publish(self) -> Weights:
        """A new weights version: CPU EMA weights, returned once and shared by reference."""
        self.version += 1
        return Weights(version=self.version, weights=self.trainer.weights())

    def state_dict(self) -> Dict[str, object]:
        """On CPU: the driver that saves it may run where there is no GPU."""
        return to_cpu({**self.trainer.state_dict(), "prior": self.prior, "weights_version": self.version})
