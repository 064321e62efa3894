"""Return-conditioned denoising (Decision Diffuser): the quantile table, classifier-free
guidance, a planner that plans better windows when asked for a higher return, and
adding the condition to a trained prior."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from _helpers import make_trainer, tiny_online_config
from distdiff import config
from distdiff.checkpoint import CheckpointError, load_checkpoint
from distdiff.config import ConfigError
from distdiff.data.episodes import Episode
from distdiff.diffusion.guidance import ReturnConditioned
from distdiff.planner import Planner
from distdiff.pretrain import load_windows, pretrain
from distdiff.training import Trainer, planner_from_checkpoint, quantile_of


def test_quantile_of_inverts_the_table_and_clamps():
    table = torch.tensor([0.0, 1.0, 3.0, 7.0, 8.0])  # quantiles 0, .25, .5, .75, 1
    values = torch.tensor([0.0, 1.0, 2.0, 7.0, 7.5, 8.0, -5.0, 20.0])
    expected = torch.tensor([0.0, 0.25, 0.375, 0.75, 0.875, 1.0, 0.0, 1.0])
    torch.testing.assert_close(quantile_of(values, table), expected)
    # A value tied with several entries takes the middle of their quantiles, here .25 to .75.
    tied = torch.tensor([0.0, 2.0, 2.0, 2.0, 5.0])
    torch.testing.assert_close(quantile_of(torch.tensor([2.0, 1.0, 3.5]), tied), torch.tensor([0.5, 0.125, 0.875]))
    # The same at either end of the table, and for a table of one value.
    for table, value, expected in [([0.0, 0.0, 0.0, 1.0, 2.0], 0.0, 0.25), ([0.0, 1.0, 2.0, 3.0, 3.0], 3.0, 0.875),
                                   ([3.0] * 5, 3.0, 0.5), ([3.0] * 5, 2.0, 0.0), ([3.0] * 5, 4.0, 1.0)]:
        got = quantile_of(torch.tensor([value]), torch.tensor(table))
        torch.testing.assert_close(got, torch.tensor([expected]), msg=f"{value} in {table}")


class Recorder(torch.nn.Module):
    """Output = the return condition where it is kept, else -1, per sample."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, returns=None, returns_mask=None):
        self.batches.append(x.shape[0])
        r = torch.full((x.shape[0],), -1.0) if returns is None else returns
        if returns_mask is not None:
            r = torch.where(returns_mask > 0, r, torch.full_like(r, -1.0))
        return r[:, None, None].expand_as(x)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_classifier_free_guidance_mixes_conditional_and_unconditional(scale):
    x, t = torch.zeros(3, 4, 2), torch.zeros(3, dtype=torch.long)
    recorder = Recorder()
    out = ReturnConditioned(recorder, returns=0.8, scale=scale)(x, t)
    # conditional 0.8, unconditional -1: w = 0 is the unconditional model, 1 the conditional
    torch.testing.assert_close(out, torch.full_like(x, -1.0 + scale * 1.8))
    # Both models in one batch only where both count.
    assert recorder.batches == ([3] if scale in (0.0, 1.0) else [6])


def test_conditioning_needs_the_quantile_table(tiny_episodes):
    trainer, _ = make_trainer(tiny_episodes[:2], **{"model.returns_condition": True})
    with pytest.raises(ValueError, match="quantiles"):
        Trainer(trainer.cfg, trainer.normalizer, value_mean=0.0, value_std=1.0)
    state = trainer.state_dict()
    restored = Trainer.from_checkpoint(state)
    torch.testing.assert_close(restored.return_quantiles, trainer.return_quantiles)
    unconditioned, _ = make_trainer(tiny_episodes[:2])
    with pytest.raises(CheckpointError, match="pretrained with it"):
        Trainer.from_checkpoint(unconditioned.state_dict(), cfg=trainer.cfg)


def _two_speed_episodes(n=16, length=24, seed=0):
    """Half the episodes act +0.5 on every action dim, half −0.5, from the same kind of states;
    the reward is the mean action. Only the return tells the two kinds of window apart."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sign = 1.0 if i % 2 else -1.0
        actions = (0.5 * sign + 0.05 * rng.standard_normal((length, 6))).astype(np.float32)
        out.append(Episode(observations=rng.standard_normal((length + 1, 17)).astype(np.float32), actions=actions,
                           rewards=actions.mean(axis=1), terminated=False, truncated=True))
    return out


def test_a_higher_return_condition_plans_a_higher_return():
    episodes = _two_speed_episodes()
    trainer, windows = make_trainer(episodes, **{"model.returns_condition": True, "train.ema_start": 0,
                                                 "train.ema_every": 1, "train.ema_decay": 0.9,
                                                 "guidance.scale": 0.0, "guidance.n_candidates": 1})
    rng = np.random.default_rng(0)
    for _ in range(400):
        assert trainer.update(windows.sample(16, rng)) is not None
    obs = np.stack([ep.observations[3] for ep in episodes[:8]])
    mean_action = {}
    for quantile, scale in ((0.1, 1.0), (0.9, 1.0), (0.9, 2.0)):
        cfg = dataclasses.replace(trainer.cfg, guidance=dataclasses.replace(trainer.cfg.guidance, return_quantile=quantile,
                                                                            return_scale=scale))
        planner = Planner.from_config(cfg, diffusion=trainer.diffusion, denoiser=trainer.ema_denoiser.eval(),
                                      value=trainer.ema_value.eval(), normalizer=trainer.normalizer)
        plan = planner.plan(obs, generator=torch.Generator().manual_seed(0))
        np.testing.assert_array_equal(plan.states[:, 0], obs)
        mean_action[quantile, scale] = float(plan.actions.mean())
    # the data's two behaviours, chosen by the condition alone
    assert mean_action[0.1, 1.0] < -0.25 and mean_action[0.9, 1.0] > 0.25, mean_action
    assert mean_action[0.9, 2.0] > 0.25, mean_action


@pytest.mark.parametrize("overrides,message", [
    ({"guidance.return_quantile": 1.5}, "guidance.return_quantile"),
    ({"guidance.return_scale": -1.0}, "guidance.return_scale"),
    ({"train.condition_dropout": 1.0}, "train.condition_dropout"),
    ({"model.returns_condition": True, "guidance.return_scale": 3.0, "train.condition_dropout": 0.0}, "unconditional model"),
])
def test_bad_return_conditioning_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_a_return_condition_added_to_a_trained_prior_starts_as_that_prior(tiny_dataset, tmp_path):
    prior = pretrain(tiny_online_config(tiny_dataset, **{"train.steps": 20}), tmp_path / "prior", quiet=True)
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 0, "model.returns_condition": True,
                                               "guidance.return_quantile": 0.97})
    added = pretrain(cfg, tmp_path / "conditioned", quiet=True, init=prior)
    obs = np.stack([ep.observations[0] for ep in load_windows(cfg)[0].episodes[:3]])
    plans = [planner_from_checkpoint(load_checkpoint(p)).plan(obs, generator=torch.Generator().manual_seed(0))
             for p in (prior, added)]
    np.testing.assert_array_equal(plans[0].actions, plans[1].actions)
    np.testing.assert_array_equal(plans[0].states, plans[1].states)
    with pytest.raises(CheckpointError, match="does not fit"):
        pretrain(tiny_online_config(tiny_dataset, **{"model.dim": 16}), tmp_path / "other", quiet=True, init=prior)
    # The noise the denoiser learned too, which no shape shows.
    with pytest.raises(CheckpointError, match="does not fit .*diffusion.schedule is 'cosine' there, 'linear' here"):
        pretrain(tiny_online_config(tiny_dataset, **{"diffusion.schedule": "linear"}), tmp_path / "other", quiet=True,
                 init=prior)
