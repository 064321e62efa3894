"""The learner as a plain class (no Ray): weights versions, what a call reports, its checkpoint,
and the batches it is sent."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from _helpers import make_trainer
from distdiff.data.windows import Batch
from distdiff.distributed.learner import Learner

@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_episodes):
    trainer, windows = make_trainer(tiny_episodes, **{"train.value_lr": 1e-3})
    return trainer.cfg, trainer.state_dict(), windows


def _learner(tiny_checkpoint, **kwargs):
    cfg, state, _ = tiny_checkpoint
    return Learner(config=cfg.to_dict(), checkpoint=state, device="cpu", **kwargs)


def test_each_publish_is_a_new_version_counted_on_from_the_one_resumed(tiny_checkpoint):
    # Workers and the driver tell new weights from old by the version: one that does not move
    # would leave workers planning with stale weights; a resume that restarts at 0 would reuse
    # numbers already in the run's metrics.
    learner = _learner(tiny_checkpoint)
    assert [learner.publish().version for _ in range(2)] == [1, 2]
    assert learner.state_dict()["weights_version"] == 2
    resumed = _learner(tiny_checkpoint, version=5, resumed=True)
    assert resumed.publish().version == 6 and resumed.state_dict()["weights_version"] == 6


def test_a_learner_call_averages_losses_over_the_updates_done_not_the_batches_skipped(tiny_checkpoint):
    # A skipped (non-finite) batch counts as skipped, not as an update of loss 0 that halves the
    # logged losses, nor as windows trained on.
    _, _, windows = tiny_checkpoint
    learner = _learner(tiny_checkpoint)
    good = windows.sample(8, np.random.default_rng(0))
    bad = good._replace(x_start=good.x_start.clone())
    losses = iter([None, {"losses/denoiser": 2.0}, {"losses/denoiser": 4.0}])
    learner.trainer.checked_update = lambda batch, max_nonfinite: next(losses)
    stats = learner.train([bad, good, good])
    assert stats.losses == {"losses/denoiser": 3.0}
    assert (stats.updates, stats.skipped, stats.windows) == (2, 1, 16)


def test_a_learner_call_reports_the_denoisers_learning_rate(tiny_checkpoint):
    cfg, _, windows = tiny_checkpoint
    learner = _learner(tiny_checkpoint)
    stats = learner.train([windows.sample(8, np.random.default_rng(0))])
    # (pretraining logs the denoiser's; here the value net's differs: train.value_lr)
    lrs = [opt.param_groups[0]["lr"] for opt in (learner.trainer.opt_denoiser, learner.trainer.opt_value)]
    assert stats.learning_rate == lrs[0] != lrs[1]


def test_a_learner_refuses_a_driver_that_runs_other_code(tiny_checkpoint):
    with pytest.raises(RuntimeError, match="is not the driver's"):
        _learner(tiny_checkpoint, driver_code=("0" * 16, "/elsewhere on another-host"))


def test_a_learner_checkpoint_keeps_the_offline_prior(tiny_checkpoint):
    # What evaluations blend back in (online.prior_weight): the pretrained EMA nets.
    _, state, _ = tiny_checkpoint
    prior = _learner(tiny_checkpoint).state_dict()["prior"]
    assert set(prior) >= {"denoiser", "value"}
    for k, v in state["ema_denoiser"].items():
        assert torch.equal(prior["denoiser"][k], v.cpu())


def test_batches_from_ray_become_writable_tensors_of_their_own():
    # Arrays read out of Ray's object store are read-only views of shared memory: the learner's
    # tensors must be copies (torch warns on, and must never write through, such a view).
    arrays = Batch(*(np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(len(Batch._fields))))
    for a in arrays:
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = Batch.from_numpy(arrays)
    for t, a in zip(batch, arrays):
        assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), a)
        t.add_(1.0)
    assert np.array_equal(arrays[0], np.arange(6, dtype=np.float32).reshape(2, 3))
