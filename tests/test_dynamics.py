"""The dynamics model: it learns real transitions, ranks plans by open-loop consistency, and the
planner executes the candidate it ranks best."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import LAYOUT, make_trainer
from distdiff import config
from distdiff.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from distdiff.config import ConfigError
from distdiff.data.windows import fit_normalizer
from distdiff.layout import TrajectoryLayout
from distdiff.models import build_models, layout_of
from distdiff.distributed.messages import Weights
from distdiff.distributed.worker import RolloutWorker
from distdiff.nn.dynamics import DynamicsNet, model_rollout, rollout_error, transition_loss
from distdiff.training import Trainer, planner_from_checkpoint


WITH_DYNAMICS = {"train.train_dynamics": True}


def test_building_the_models_leaves_the_global_generators_as_they_were(tiny_episodes, monkeypatch):
    # The dynamics model draws its initial weights from a generator of its own. Reseeding a
    # global one (the GPUs' are reseeded by torch.manual_seed) would shift the training noise.
    cfg = config.load(None, {"model.dim": 8, "model.value_dim": 8, "model.dynamics_dim": 8, **WITH_DYNAMICS})
    normalizer = fit_normalizer(tiny_episodes, layout_of(cfg), cfg.data.normalizer)
    torch.manual_seed(3)
    _, denoiser, value, dynamics = build_models(cfg, normalizer)
    after = torch.get_rng_state()
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    torch.manual_seed(3)
    _, denoiser2, value2, dynamics2 = build_models(cfg, normalizer)
    assert reseeded == [3], "only the test's own torch.manual_seed may reseed the GPUs"
    assert torch.equal(torch.get_rng_state(), after)
    for a, b in ((denoiser, denoiser2), (value, value2), (dynamics, dynamics2)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@torch.no_grad()
def test_rollout_error_is_zero_for_the_models_own_trajectory_and_grows_with_a_perturbation():
    torch.manual_seed(0)
    model = DynamicsNet(obs_dim=LAYOUT.obs_dim, act_dim=LAYOUT.act_dim, dim=32)
    # the model's own trajectory: model_rollout's recurrence is checked step by step below
    x = model_rollout(model, torch.randn(3, 8, LAYOUT.transition_dim), LAYOUT)
    assert torch.allclose(rollout_error(model, x, LAYOUT), torch.zeros(3), atol=1e-10)
    torch.testing.assert_close(model_rollout(model, x, LAYOUT), x)
    bent = x.clone()
    bent[1, 5, LAYOUT.state_slice] += 0.5
    err = rollout_error(model, bent, LAYOUT)
    assert err[1] > 1e-3 and torch.allclose(err[[0, 2]], torch.zeros(2), atol=1e-10)


def test_transition_loss_ignores_padding():
    torch.manual_seed(0)
    model = DynamicsNet(obs_dim=LAYOUT.obs_dim, act_dim=LAYOUT.act_dim, dim=32)
    x = torch.randn(2, 6, LAYOUT.transition_dim)
    mask = torch.ones_like(x)
    # episode 0 ends at row 3: s_3 is real, a_3 and everything after are padding
    mask[0, 3, LAYOUT.action_slice] = 0
    mask[0, 4:] = 0
    garbage = x.clone()
    garbage[0, 3, LAYOUT.action_slice] = 1e3
    garbage[0, 4:] = -1e3
    assert torch.equal(transition_loss(model, x, mask, LAYOUT), transition_loss(model, garbage, mask, LAYOUT))


def test_trainer_learns_the_transitions_of_the_data(tiny_episodes):
    trainer, windows = make_trainer(tiny_episodes[:4], **WITH_DYNAMICS)
    batch = windows.sample(32, np.random.default_rng(1))
    layout = trainer.diffusion.layout

    def loss():
        with torch.no_grad():
            return transition_loss(trainer.dynamics, batch.x_start, batch.mask, layout).item()

    before = loss()
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert trainer.update(windows.sample(16, rng)) is not None
    assert loss() < 0.5 * before


@pytest.fixture(scope="module")
def trained(tiny_episodes, tmp_path_factory):
    trainer, windows = make_trainer(tiny_episodes[:4], **WITH_DYNAMICS)
    rng = np.random.default_rng(0)
    for _ in range(20):
        trainer.update(windows.sample(8, rng))
    path = tmp_path_factory.mktemp("dyn") / "checkpoint.pt"
    save_checkpoint(path, trainer.state_dict())
    return trainer, path


def test_planner_executes_the_candidate_the_dynamics_model_ranks_best(trained, tiny_episodes):
    trainer, path = trained
    cfg = config.from_dict({"planner": {"dynamics_candidates": 4}, "guidance": {"n_candidates": 1}}, trainer.cfg)
    planner = planner_from_checkpoint(load_checkpoint(path), cfg)
    obs = np.stack([ep.observations[2] for ep in tiny_episodes[:3]])
    plan = planner.plan(obs, generator=torch.Generator().manual_seed(0))
    # the same draws, unranked: the 4 candidates of each state
    cond = planner.state_normalizer.normalize(torch.from_numpy(obs)).repeat_interleave(4, dim=0)
    candidates = planner.sample(cond, torch.Generator().manual_seed(0)).trajectories
    errors = rollout_error(planner.dynamics, candidates, planner.layout).reshape(3, 4)
    assert (errors.std(dim=1) > 0).all()  # distinct candidates: a real choice
    chosen = rollout_error(planner.dynamics, plan.trajectories, planner.layout)
    torch.testing.assert_close(chosen, errors.min(dim=1).values)
    np.testing.assert_array_equal(plan.states[:, 0], obs)


@torch.no_grad()
def test_model_rollout_keeps_s0_and_the_actions_and_replaces_the_later_states():
    torch.manual_seed(0)
    model = DynamicsNet(obs_dim=LAYOUT.obs_dim, act_dim=LAYOUT.act_dim, dim=32)
    x = torch.randn(2, 6, LAYOUT.transition_dim)
    reached = model_rollout(model, x, LAYOUT)
    assert torch.equal(LAYOUT.first_state(reached), LAYOUT.first_state(x))
    assert torch.equal(LAYOUT.actions(reached), LAYOUT.actions(x))
    torch.testing.assert_close(LAYOUT.states(reached)[:, 3], model(LAYOUT.states(reached)[:, 2], LAYOUT.actions(x)[:, 2]))
    assert not torch.allclose(LAYOUT.states(reached)[:, 1:], LAYOUT.states(x)[:, 1:])


def test_ranked_by_value_the_planner_executes_the_plan_whose_reached_trajectory_v_rates_highest(trained, tiny_episodes):
    trainer, path = trained
    cfg = config.from_dict({"planner": {"dynamics_candidates": 4, "dynamics_rank": "value"},
                            "guidance": {"n_candidates": 1}}, trainer.cfg)
    planner = planner_from_checkpoint(load_checkpoint(path), cfg)
    obs = np.stack([ep.observations[2] for ep in tiny_episodes[:3]])
    plan = planner.plan(obs, generator=torch.Generator().manual_seed(0))
    cond = planner.state_normalizer.normalize(torch.from_numpy(obs)).repeat_interleave(4, dim=0)
    candidates = planner.sample(cond, torch.Generator().manual_seed(0)).trajectories
    with torch.no_grad():
        def reached_value(x):
            return planner.value(model_rollout(planner.dynamics, x, planner.layout), torch.zeros(len(x), dtype=torch.long)).reshape(-1)
        values = reached_value(candidates).reshape(3, 4)
        own_values = planner.value(candidates, torch.zeros(12, dtype=torch.long)).reshape(3, 4)
        assert (values.std(dim=1) > 0).all()
        torch.testing.assert_close(reached_value(plan.trajectories), values.max(dim=1).values)
    # V of the reached trajectory is not V of the plan itself: the ranking reads the rollout
    assert not torch.allclose(values, own_values)
    np.testing.assert_array_equal(plan.states[:, 0], obs)


def test_value_and_dynamics_selection_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        config.load(None, {"planner.dynamics_candidates": 4, "guidance.n_candidates": 2})
    with pytest.raises(ConfigError, match="train.train_dynamics"):
        config.load(None, {"planner.dynamics_candidates": 4, "train.train_dynamics": False})
    with pytest.raises(ConfigError, match="dynamics_rank must be"):
        config.load(None, {"planner.dynamics_rank": "speed"})
    with pytest.raises(ConfigError, match="train.train_value"):
        config.load(None, {"planner.dynamics_candidates": 4, "planner.dynamics_rank": "value",
                           "train.train_dynamics": True, "train.train_value": False, "guidance.scale": 0.0})


def test_a_checkpoint_without_a_dynamics_model_loads_unless_plans_are_ranked_by_it(trained, tmp_path):
    trainer, path = trained
    state = load_checkpoint(path)
    for key in ("dynamics", "ema_dynamics", "opt_dynamics"):
        del state[key]
    old = tmp_path / "old.pt"
    save_checkpoint(old, state)
    restored = Trainer.from_checkpoint(load_checkpoint(old))
    for name in ("denoiser", "value"):
        for a, b in zip(getattr(restored, name).state_dict().values(), getattr(trainer, name).state_dict().values()):
            assert torch.equal(a, b)
    cfg = config.from_dict({"planner": {"dynamics_candidates": 4}, "guidance": {"n_candidates": 1}}, trainer.cfg)
    with pytest.raises(CheckpointError, match="dynamics"):
        planner_from_checkpoint(load_checkpoint(old), cfg)
    with pytest.raises(CheckpointError, match="dynamics"):
        Trainer.from_checkpoint(load_checkpoint(old), cfg=cfg)


def test_a_dynamics_model_that_never_trained_does_not_rank_plans(tiny_episodes, tmp_path):
    trainer, windows = make_trainer(tiny_episodes[:2])  # train.train_dynamics is off by default
    trainer.update(windows.sample(8, np.random.default_rng(0)))
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, trainer.state_dict())
    cfg = config.from_dict({"planner": {"dynamics_candidates": 4}, "guidance": {"n_candidates": 1},
                            "train": {"train_dynamics": True}}, trainer.cfg)
    with pytest.raises(CheckpointError, match="train_dynamics"):
        planner_from_checkpoint(load_checkpoint(path), cfg)


def test_the_dynamics_model_does_not_change_how_the_other_nets_train(tiny_episodes):
    """Its initial weights come from a forked generator and it has its own optimizer: the
    denoiser and value net train bit for bit as without it (the benchmark's prior stays
    reproducible)."""
    runs = []
    for train_dynamics in (True, False):
        trainer, windows = make_trainer(tiny_episodes[:2], **{"train.train_dynamics": train_dynamics})
        rng = np.random.default_rng(0)
        for _ in range(5):
            trainer.update(windows.sample(8, rng))
        runs.append(trainer)
    for name in ("denoiser", "value"):
        for a, b in zip(getattr(runs[0], name).state_dict().values(), getattr(runs[1], name).state_dict().values()):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0].dynamics.state_dict().values(), runs[1].dynamics.state_dict().values()))


def test_a_rollout_workers_ranking_planner_holds_the_broadcast_dynamics_model(trained):
    trainer, _ = trained
    cfg = config.from_dict({"planner": {"dynamics_candidates": 4}, "guidance": {"n_candidates": 1},
                            "online": {"envs_per_actor": 1}}, trainer.cfg)
    worker = RolloutWorker(config=cfg.to_dict(), normalizer=trainer.normalizer.state_dict(), worker_id=0)
    try:
        worker.set_weights(Weights(version=1, weights=trainer.weights()))
        for a, b in zip(worker.acting.planner.dynamics.state_dict().values(), trainer.ema_dynamics.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        worker.close()


def test_broadcasts_carry_the_value_net_and_dynamics_model_only_when_they_train(tiny_episodes):
    off, _ = make_trainer(tiny_episodes[:2])
    on, _ = make_trainer(tiny_episodes[:2], **WITH_DYNAMICS)
    assert set(off.weights()) == {"denoiser", "value"}
    assert set(on.weights()) == {"denoiser", "value", "dynamics"}
    no_value, _ = make_trainer(tiny_episodes[:2], **{"train.train_value": False, "guidance.scale": 0.0,
                                                      "guidance.n_candidates": 1})
    assert set(no_value.weights()) == {"denoiser"}
    # What a worker plans with from them: no value net to load.
    cfg = config.from_dict({"online": {"envs_per_actor": 1}}, no_value.cfg)
    worker = RolloutWorker(config=cfg.to_dict(), normalizer=no_value.normalizer.state_dict(), worker_id=0)
    try:
        worker.set_weights(Weights(version=1, weights=no_value.weights()))
        assert worker.acting.planner.value is None
        assert len(worker.rollout(0, max_steps=2).episodes) == 1
    finally:
        worker.close()


def test_transition_loss_is_zero_for_the_models_own_transitions_and_not_for_standing_still():
    layout = TrajectoryLayout(obs_dim=2, act_dim=1)
    torch.manual_seed(0)
    model = DynamicsNet(obs_dim=2, act_dim=1, dim=16)
    with torch.no_grad():
        x = model_rollout(model, torch.randn(3, 6, layout.transition_dim), layout)
        mask = torch.ones_like(x)
        assert transition_loss(model, x, mask, layout).item() < 1e-10
        still = x.clone()
        still[:, :, layout.state_slice] = x[:, :1, layout.state_slice]  # states that never move
        assert transition_loss(model, still, mask, layout).item() > 1e-4


def _identity_model(obs_dim: int, act_dim: int) -> DynamicsNet:
    model = DynamicsNet(obs_dim=obs_dim, act_dim=act_dim, dim=16)
    with torch.no_grad():
        torch.nn.init.zeros_(model.net[-1].weight)
        torch.nn.init.zeros_(model.net[-1].bias)
    return model


@torch.no_grad()
def test_a_dynamics_model_predicts_the_change_so_a_zero_output_layer_stands_still():
    # The residual form: an untrained model starts near the identity, not near 0.
    torch.manual_seed(0)
    model = _identity_model(3, 2)
    states, actions = torch.randn(5, 3), torch.randn(5, 2)
    torch.testing.assert_close(model(states, actions), states)


@torch.no_grad()
def test_transition_loss_is_the_mean_squared_state_error_over_the_real_transitions_only():
    # A mean over state dims (not a sum: the loss scale, and so the rate, would grow with the
    # env's obs_dim) and over the real transitions (not every row: padding would dilute it).
    layout = TrajectoryLayout(obs_dim=2, act_dim=1)
    torch.manual_seed(0)
    model = _identity_model(2, 1)  # predicts s_{j+1} = s_j
    x = torch.randn(2, 5, layout.transition_dim)
    mask = torch.ones_like(x)
    mask[0, 2, layout.action_slice] = 0  # episode 0 ends at row 2: transitions 0 and 1 are real
    mask[0, 3:] = 0
    states = layout.states(x)
    step = ((states[:, 1:] - states[:, :-1]) ** 2).mean(-1)  # [2, 4]
    want = (step[0, :2].sum() + step[1].sum()) / 6
    torch.testing.assert_close(transition_loss(model, x, mask, layout), want)


@torch.no_grad()
def test_rollout_error_is_the_mean_squared_state_distance_after_s0():
    # What ranks candidate plans: squared (a large miss weighs more than many small ones), averaged.
    layout = TrajectoryLayout(obs_dim=2, act_dim=1)
    torch.manual_seed(0)
    model = _identity_model(2, 1)  # the model's rollout stays at s_0
    x = torch.randn(3, 6, layout.transition_dim)
    states = layout.states(x)
    want = ((states[:, 1:] - states[:, :1]) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(rollout_error(model, x, layout), want)
