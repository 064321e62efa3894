"""Typed config: every invalid value and unknown name is reported, all at once, before any work."""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys

import pytest

from _helpers import ROOT, SMOKE_CONFIG, tiny_online_config
from distdiff import config
from distdiff.config import Config, ConfigError


def _error(overrides=None, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides)
    return str(info.value)


@pytest.mark.parametrize("path", [ROOT / "configs/smoke.yaml", ROOT / "configs/walker2d.yaml", None], ids=["smoke", "walker2d", "defaults"])
def test_shipped_configs_are_valid(path):
    cfg = config.load(path)
    assert cfg.env.obs_dim == 17 and cfg.env.act_dim == 6


def test_the_defaults_are_the_walker2d_planner():
    # `launch/train.py --num-actors 32` without --config must train what configs/walker2d.yaml and
    # the README describe. The sampler default once differed (5 DDIM steps instead of 2), and
    # the same prior scored 6 points less with 5 (bench/README.md).
    assert config.load(None).to_dict() == config.load(ROOT / "configs/walker2d.yaml").to_dict()


def test_overrides_are_typed():
    cfg = config.load(ROOT / "configs/smoke.yaml", {"model.horizon": "16", "train.train_value": "false",
                                             "guidance.scale": "0", "guidance.n_candidates": 1,
                                             "model.dim_mults": "1,2,4", "train.lr": "1e-3"})
    assert cfg.model.horizon == 16 and cfg.model.dim_mults == (1, 2, 4)
    assert cfg.train.train_value is False and cfg.train.lr == 1e-3 and cfg.guidance.scale == 0.0


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"model.horizon": -8}, "model.horizon must be positive"),
        ({"diffusion.schedule": "quadratic"}, "diffusion.schedule must be one of ['cosine', 'linear', 'sigmoid']"),
        ({"guidance.scale": 0.1, "train.train_value": False}, "needs the value net"),
        ({"guidance.scale": 0.0, "guidance.n_candidates": 4, "train.train_value": False}, "needs the value net"),
        ({"guidance.scale": 0.1, "guidance.t_stopgrad": 20}, "no noise level would be guided"),
        ({"model.horizon": 6, "model.dim_mults": [1, 2, 4]}, "model.horizon 6 must be a multiple of 4"),
        ({"diffusion.prediction": "score"}, "diffusion.prediction"),
        ({"train.precision": "fp16"}, "train.precision must be fp32 or bf16"),
        ({"train.lr_schedule": "linear"}, "train.lr_schedule must be one of ['constant', 'cosine']"),
        ({"train.lr_min_ratio": 1.5}, "train.lr_min_ratio"),
        ({"train.warmup_steps": -1}, "train.warmup_steps"),
        ({"train.compile": "max-autotune"}, "train.compile must be none, default or reduce-overhead"),
        ({"planner.ddim_steps": 50, "diffusion.n_steps": 10}, "planner.ddim_steps"),
        ({"data.discount": 1.5}, "data.discount"),
        ({"online.start_window_weight": -1.0}, "online.start_window_weight must be >= 0"),
        ({"online.offline_start_window_weight": 0.0}, "online.offline_start_window_weight must be positive"),
        ({"guidance.scale": -1.0}, "guidance.scale"),
        ({"model.dim": 2}, "model.dim must be an even number >= 4"),
        ({"model.value_dim": 5}, "model.value_dim must be an even number >= 4"),
        ({"model.dim_mults": [2, 4]}, "model.dim_mults must start with 1"),
        ({"model.kernel_size": -1}, "model.kernel_size must be a positive odd number"),
        # One channel per norm group over one step: the net's output would not depend on its input.
        ({"model.horizon": 2, "model.dim_mults": [1, 2], "model.dim": 4, "planner.replan_every": 1},
         "model.dim 4 with model.horizon 2: one of its levels has 8 channels in 8 norm groups over 1 step"),
        ({"model.horizon": 1, "model.dim_mults": [1], "model.value_dim": 8, "planner.replan_every": 1},
         "model.value_dim 8 with model.horizon 1: one of its levels has 8 channels in 8 norm groups over 1 step"),
        ({"model.horizon": 1, "model.dim_mults": [1], "model.value_dim": 8, "planner.replan_every": 1,
          "train.train_value": False, "model.dim": 4},
         "model.dim 4 with model.horizon 1"),  # (the value net's sizes, untrained, are not refused)
        ({"diffusion.n_steps": 1}, "diffusion.n_steps must be >= 2"),
        ({"model.horizon": 1, "model.dim_mults": [1], "train.train_dynamics": True},
         "train.train_dynamics needs model.horizon >= 2"),
        ({"online.env_steps": 0, "online.updates": 10, "online.updates_per_env_step": 0.0},
         "no update would ever run"),
        ({"online.prior_weight": 1.0}, "online.prior_weight must be in [0, 1)"),
        ({"online.prior_weight": -0.1}, "online.prior_weight must be in [0, 1)"),
        ({"model.kernel_size": 4}, "kernel_size"),
        ({"data.dataset_id": "local/walker2d/random"}, "data.dataset_id must look like namespace/name-vN"),
        ({"data.dataset_id": "../elsewhere/random-v0"}, "data.dataset_id must look like namespace/name-vN"),
        ({"data.fallback_dataset_id": "random"}, "data.fallback_dataset_id must be empty (no fallback) or look like"),
        # Random-policy episodes collected under a remote's id would later load as its data.
        ({"data.fallback_dataset_id": "mujoco/walker2d/medium-v0"}, "must be empty (no fallback) or look like local/"),
        ({"data.dataset_id": None}, "(Minari needs the -vN version), got ''"),
        # Values that used to pass and fail late: after pretraining, in every Ray actor, or at the
        # final evaluation.
        ({"eval.seed": -1}, "eval.seed must be in [0, 2**63)"),
        ({"train.seed": -3}, "train.seed must be in [0, 2**63)"),
        ({"online.actor_max_restarts": -2}, "online.actor_max_restarts must be >= -1"),
        ({"online.rollout_timeout_s": -1.0}, "online.rollout_timeout_s must be >= 0"),
        ({"online.actor_num_cpus": 1e-5}, "online.actor_num_cpus must be 0 or at least 0.0001"),
        # Each field on its own, with its value (these used to share one message).
        ({"train.steps": -5}, "train.steps must be >= 0, got -5"),
        ({"train.batch_size": 0}, "train.batch_size must be >= 1, got 0"),
        ({"online.num_actors": 0}, "online.num_actors must be >= 1, got 0"),
        ({"eval.episodes": -2}, "eval.episodes must be >= 1, got -2"),
        ({"eval.num_actors": -1}, "eval.num_actors must be >= 0, got -1"),
        ({"train.value_lr": 0.0}, "train.value_lr must be positive, got 0.0"),
        # Each would fail far into a run, or train nothing without a word: a rollout indexing
        # past its plan's horizon, the replay asked for a negative count of online windows, an
        # EMA (what planners use) that never moves.
        ({"model.horizon": 32, "planner.replan_every": 33}, "planner.replan_every must be in [1, model.horizon=32], got 33"),
        ({"online.offline_ratio": 1.5}, "online.offline_ratio must be in [0, 1], got 1.5"),
        ({"online.offline_ratio": -0.1}, "online.offline_ratio must be in [0, 1], got -0.1"),
        ({"train.ema_decay": 1.0}, "train.ema_decay must be in [0, 1), got 1.0"),
        ({"online.max_update_lag": 1, "online.updates_per_call": 5},
         "online.max_update_lag must be >= online.updates_per_call (5), got 1"),
        ({"model.horizon": 32, "online.replay_capacity": 31}, "online.replay_capacity must hold at least one horizon (32), got 31"),
        # A score measured between an expert below random, or one reference, would be garbage.
        ({"eval.reference_returns": "360,-5"}, "eval.reference_returns must be empty or two finite returns, random "
                                               "below expert, got [360.0, -5.0]"),
        ({"eval.reference_returns": [5.0]}, "eval.reference_returns must be empty or two finite returns"),
        ({"eval.reference_returns": "1,inf"}, "eval.reference_returns must be empty or two finite returns"),
    ],
)
def test_invalid_values_are_rejected(overrides, expected):
    assert expected in _error(overrides)


def test_a_negative_budget_is_not_also_called_a_missing_one():
    message = _error({"online.env_steps": -1})
    assert "online.env_steps must be >= 0, got -1" in message and "needs a budget" not in message


def test_no_budget_at_all_is_not_also_called_an_updates_only_budget():
    none = {"online.env_steps": 0, "online.updates": 0, "online.wall_time_s": 0, "online.updates_per_env_step": 0}
    message = _error(none)
    assert "online needs a budget" in message and "online.updates is the only budget" not in message
    assert "online.updates is the only budget" in _error({**none, "online.updates": 10})


@pytest.mark.parametrize("overrides, expected", [
    ({"online.updates_per_env_step": "inf"}, "online.updates_per_env_step must be a finite number"),
    ({"data.termination_penalty": float("nan")}, "data.termination_penalty must be a finite number"),
    ({"train.grad_clip": float("-inf")}, "train.grad_clip must be a finite number"),
    ({"online.learner_num_gpus": -0.5}, "online.learner_num_gpus must be in [0, 1]"),
    # One GPU is what the learner uses: a second would be reserved and left idle.
    ({"online.learner_num_gpus": 2}, "online.learner_num_gpus must be in [0, 1] (the learner trains on one GPU)"),
])
def test_values_that_would_fail_training_are_refused_before_it(overrides, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config.check_trainable(config.load(None, overrides))


def test_datasets_named_for_another_env_are_refused_before_any_work():
    # A Hopper run with the default (Walker2d) ids: refused only after Ray had started and the
    # download had retried for 25 s, naming the fallback alone; the fallback's fix alone then
    # trained to the end on random Hopper episodes, the named dataset never used.
    hopper = {"env.id": "Hopper-v5", "env.obs_dim": 11, "env.act_dim": 3}
    with pytest.raises(ConfigError) as refused:
        config.check_trainable(config.load(None, hopper))
    message = str(refused.value)
    assert ("data.dataset_id 'mujoco/walker2d/medium-v0' names Walker2d, and env.id is Hopper-v5: pass "
            "--data.dataset_id with a dataset of Hopper-v5 (e.g. local/hopper/random-v0)") in message
    assert "data.fallback_dataset_id 'local/walker2d/random-v0' names Walker2d" in message
    config.check_trainable(config.load(None, {**hopper, "data.dataset_id": "mujoco/hopper/medium-v0",
                                              "data.fallback_dataset_id": "local/hopper/random-v0"}))
    config.check_trainable(config.load(None, {**hopper, "data.dataset_id": "local/mine-v0",
                                              "data.fallback_dataset_id": ""}))  # names no env


def test_configs_that_trained_before_stricter_checks_still_load():
    # Checkpoints carry their config; evaluate.py and --resume read it through validate.
    saved = {"train": {"grad_clip": float("inf")}, "online": {"wall_time_s": float("inf"), "learner_num_gpus": -2.0},
             "data": {"fallback_episodes": 0}}
    cfg = config.from_dict(saved)
    config.validate(cfg)  # (from_dict alone does not)
    assert cfg.train.grad_clip == float("inf") and cfg.data.fallback_episodes == 0
    config.check_trainable(config.from_dict({"train": {"grad_clip": float("inf")},
                                             "online": {"wall_time_s": float("inf")}}))


def test_a_mujoco_gl_that_mujoco_does_not_import_with_is_named(subprocess_env):
    # In a fresh process: MuJoCo reads MUJOCO_GL when it is first imported.
    probe = "from distdiff.config import EnvConfig, env_problem; print(env_problem(EnvConfig()))"
    out = subprocess.run([sys.executable, "-c", probe], env={**subprocess_env, "MUJOCO_GL": "nonesuch"},
                         capture_output=True, text=True, timeout=120)
    assert "MuJoCo does not import with MUJOCO_GL=nonesuch" in out.stdout and "unset MUJOCO_GL" in out.stdout, out


@pytest.mark.parametrize("env_id, expected", [("Walker2d-v9", "VersionNotFound"), ("", "Error: Malformed"),
                                              ("Walker2d-v3", "ImportError")])
def test_an_env_that_cannot_be_made_is_refused_before_training(env_id, expected):
    # Not by validate: a checkpoint's config must still load. Before any work, not in every actor.
    with pytest.raises(ConfigError, match=f"env.id '{env_id}' cannot be made here: {expected}"):
        config.check_trainable(config.load(None, {"env.id": env_id}))


def test_another_env_with_walker2d_sizes_is_refused_before_training():
    # Found otherwise at the dataset after Ray started, or in the actors after pretraining.
    with pytest.raises(ConfigError, match=re.escape(
            "env.id 'Hopper-v5' has observations of shape (11,) and actions of shape (3,), the config's env.obs_dim "
            "and env.act_dim are 17 and 6")):
        config.check_trainable(config.load(None, {"env.id": "Hopper-v5"}))
    config.check_trainable(config.load(None, {"env.id": "Hopper-v5", "env.obs_dim": 11, "env.act_dim": 3,
                                              "data.dataset_id": "mujoco/hopper/medium-v0",
                                              "data.fallback_dataset_id": "local/hopper/random-v0"}))


def test_an_env_whose_plans_cannot_be_replayed_is_refused_before_training():
    # Phase 2 measures the alignment error in a shadow env set to the real physics state: in an
    # env other than MuJoCo every rollout failed on it, after pretraining.
    with pytest.raises(ConfigError, match=re.escape("env.id 'Pendulum-v1' is not a MuJoCo env")):
        config.check_trainable(config.load(None, {"env.id": "Pendulum-v1", "env.obs_dim": 3, "env.act_dim": 1}))
    assert config.alignment_problem("Walker2d-v5") == ""


def test_all_problems_are_reported_at_once():
    message = _error({"model.horizon": -8, "diffusion.schedule": "quadratic", "guidance.scale": 0.5,
                      "train.train_value": False, "planner.sampler": "euler"})
    for part in ("model.horizon", "diffusion.schedule", "needs the value net", "planner.sampler"):
        assert part in message, part


def test_yaml_null_empties_a_text_field():
    # Not the string "None": actors would wait for a custom resource of that name.
    cfg = config.from_dict({"data": {"fallback_dataset_id": None}, "online": {"actor_resource": None}})
    assert cfg.data.fallback_dataset_id == "" and cfg.online.actor_resource == ""


def test_unknown_field_and_section_are_rejected():
    message = _error({"model.width": 3, "model.dims": 4})
    assert "model.width" in message and "model.dims" in message
    assert "horizon" in message  # the valid fields are listed
    assert "unknown section 'modle'" in _error({"modle.dim": 3})


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"model.horizon": "abc"}, "model.horizon: expected an integer"),
        ({"model.horizon": 8.5}, "model.horizon: expected an integer"),
        ({"train.steps": "1.5e0"}, "train.steps: expected an integer, got 1.5"),
        ({"train.steps": "inf"}, "train.steps: expected an integer"),
        ({"train.train_value": "maybe"}, "train.train_value: expected true or false"),
        ({"train.lr": "fast"}, "train.lr: expected a number"),
    ],
)
def test_badly_typed_values_are_rejected(overrides, expected):
    assert expected in _error(overrides)


def test_a_whole_number_flag_reads_as_a_config_file_reads_it():
    # YAML reads train: {steps: 1e5} as 100000; the flag --train.steps 1e5 was refused.
    assert config.load(None, {"train.steps": "1e5", "model.horizon": "16.0"}).train.steps == 100_000


def test_unknown_field_in_yaml_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {horizon: 8, hieght: 3}\n")
    message = _error(path=path)
    assert "model.hieght" in message
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")


def test_save_load_and_dict_round_trips(tmp_path):
    cfg = config.load(ROOT / "configs/smoke.yaml", {"model.dim_mults": [1, 2, 2, 2], "model.horizon": 16})
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg
    assert config.from_dict(cfg.to_dict()) == cfg  # what checkpoints store


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--config", str(ROOT / "configs/smoke.yaml"), "--model.dim", "16", "--train.steps", "7"])
    cfg = config.from_args(args)
    assert cfg.model.dim == 16 and cfg.train.steps == 7 and cfg.model.horizon == 8
    # on top of a base (a checkpoint's config), flags are validated too
    bad = parser.parse_args(["--model.horizon", "-1"])
    with pytest.raises(ConfigError, match="model.horizon"):
        config.from_args(bad, base=Config())


def test_reference_returns_come_from_the_config_before_d4rls_and_a_negative_one_parses_as_a_flag():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    cfg = config.from_args(parser.parse_args(["--env.id", "Swimmer-v5", "--eval.reference_returns=-5,360"]))
    assert config.reference_returns(cfg) == (-5.0, 360.0)
    assert config.reference_returns(Config()) == (1.629008, 4592.3)  # Walker2d's, D4RL's
    swimmer = config.load(None, {"env.id": "Swimmer-v5", "env.obs_dim": 8, "env.act_dim": 2})
    assert config.reference_returns(swimmer) == (None, None)


def test_a_value_argparse_reads_as_a_flag_is_answered_with_the_form_it_takes(capsys):
    from distdiff.cli import make_parser

    parser = make_parser(None)
    config.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--eval.reference_returns", "-5,360"])
    assert "(a value that starts with - goes after an =: --eval.reference_returns=-5,360)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a value left out is not given that hint
        parser.parse_args(["--eval.reference_returns"])
    assert "goes after an =" not in capsys.readouterr().err


def test_numbers_in_exponent_form_are_read_as_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 and 1.5e3 as text; a sweep's bounds or options would then be no number.
    path = tmp_path / "c.yaml"
    path.write_text("a: [1e-4, 1.5e3, -2E+3, 12, '1e-3', local/walker2d/x-v0]\n")
    assert config.read(path) == {"a": [1e-4, 1500.0, -2000.0, 12, "1e-3", "local/walker2d/x-v0"]}


def test_an_empty_config_file_is_the_defaults_and_says_so(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    cfg = config.from_args(parser.parse_args(["--config", str(tmp_path / "empty.yaml"), "--train.steps", "7"]))
    assert cfg == config.load(None, {"train.steps": 7})
    assert capsys.readouterr().err == f"warning: config file {tmp_path / 'empty.yaml'} sets nothing: the defaults are used\n"
    config.from_args(parser.parse_args(["--config", str(ROOT / "configs/smoke.yaml")]))
    assert capsys.readouterr().err == ""


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_a_sweep_file_given_as_a_config_says_where_it_belongs():
    with pytest.raises(config.ConfigError, match=r"sweep file .* python launch/tune.py --config") as raised:
        config.load(ROOT / "configs" / "tune.yaml")
    assert "unknown section" not in str(raised.value)  # not each of its options again


@pytest.mark.parametrize("text, says", [
    ("train: {steps: 3\nmodel:\n  dim: 4\n", "is not valid YAML: line 2, column 6: expected ',' or '}', but got ':' "
                                              "(while parsing a flow mapping at line 1, column 8)"),
    ("hello\n", "must be a mapping of sections (e.g. `train: {steps: 100}`), got str"),
])
def test_a_file_that_is_not_a_config_says_why_on_one_line_naming_it(text, says, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    assert str(raised.value) == f"config file {path} {says}"


def test_a_directory_given_as_a_config_is_named_so(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        config.load(tmp_path)


def test_a_boolean_is_not_an_integer():
    with pytest.raises(ConfigError, match="model.horizon: expected an integer, got True"):
        config.from_dict({"model": {"horizon": True}})


def test_a_boolean_is_not_a_number(tmp_path):
    # YAML 1.1 reads `on`/`yes` as true: `guidance: {scale: on}` was a guidance scale of 1.0.
    path = tmp_path / "c.yaml"
    path.write_text("guidance: {scale: on}\n")
    with pytest.raises(ConfigError, match="guidance.scale: expected a number, got True"):
        config.load(path)


def test_text_that_reads_as_a_number_is_saved_quoted(tmp_path):
    cfg = config.load(None, {"online.actor_resource": "1e3"})
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("overrides", [
    {"data.discount": 0.0},
])
def test_invalid_edge_values_are_refused(overrides):
    with pytest.raises(ConfigError):
        config.load(None, overrides)


@pytest.mark.parametrize("overrides", [
    {"planner.replan_every": 32, "model.horizon": 32},  # replan once per plan
    {"online.actor_num_cpus": 1e-4},  # Ray's finest share
    {"online.max_update_lag": 10, "online.updates_per_call": 10},
    {"online.replay_capacity": 32, "model.horizon": 32},
    {"online.updates_per_env_step": 0.0, "online.env_steps": 1000},  # collect only
])
def test_valid_edge_values_are_accepted(overrides):
    config.load(None, overrides)


def test_a_replay_of_exactly_one_episode_is_trainable():
    # (check_trainable also makes the env: the tiny config's local env id is fine for that)
    c = tiny_online_config("local/unused-v0", **{"online.replay_capacity": 60})  # env.max_episode_steps 60
    config.check_trainable(c)


def test_overrides_of_a_checkpoints_config_are_typed_too():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, from_checkpoint=True)
    args = parser.parse_args(["--planner.replan_every", "often"])
    with pytest.raises(ConfigError, match="planner.replan_every: expected an integer"):
        config.from_args(args, base=Config())


def test_overrides_by_section_and_onto_a_base_config_as_code_writes_them():
    base = config.load(ROOT / "configs/smoke.yaml")
    cfg = config.load(None, {"guidance": {"scale": "0.37", "n_candidates": 2}, "planner.replan_every": 3}, base=base)
    assert cfg.guidance.scale == 0.37 and cfg.guidance.n_candidates == 2 and cfg.planner.replan_every == 3
    assert cfg.model == base.model and cfg.train == base.train  # the rest is the base's, not the defaults
    cfg.model.dim, cfg.planner.execution = 3, "open_loop"  # a caller's edit in place ...
    assert base == config.load(ROOT / "configs/smoke.yaml")  # ... leaves the base as it was
    with pytest.raises(ConfigError, match="guidance.n_candidates must be >= 1"):
        config.load(None, {"guidance": {"n_candidates": 0}}, base=base)


def test_the_markdown_table_has_one_row_per_field_with_its_value():
    cfg = config.load(None, {"online.num_actors": 7, "model.dim_mults": [1, 2]})
    rows = config.to_markdown(cfg).splitlines()
    assert rows[:2] == ["|field|value|", "|-|-|"]
    assert len(rows) - 2 == sum(len(section) for section in cfg.to_dict().values())
    assert "|online.num_actors|7|" in rows and "|model.dim_mults|[1, 2]|" in rows
    assert '|diffusion.schedule|"cosine"|' in rows


def test_a_saved_config_with_fields_distdiff_dropped_loads_where_it_did_not_use_them():
    # A checkpoint written while online.relabel_* existed stores them, off.
    old = {**config.Config().to_dict()}
    old["online"] = {**old["online"], "relabel_weight": 0.0, "relabel_fraction": 0.5, "relabel_capacity": 4096}
    old["data"] = {**old["data"], "return_lookahead": 0}
    assert config.from_dict(old) == config.Config()
    used = {**old, "data": {**old["data"], "return_lookahead": 100}}
    with pytest.raises(config.ConfigError, match=r"data.return_lookahead is 100: distdiff dropped it \(fall-aware "
                                                 r"return labels\) in 770256c"):
        config.from_dict(used)


def test_a_run_saved_before_a_field_resumes_as_it_trained():
    said = []
    now = config.Config().to_dict()
    assert config.from_saved(now, log=said.append) == config.Config() and said == []
    before = {**now, "online": {k: v for k, v in now["online"].items()
                                if k not in ("lr_scale", "finish_updates", "offline_start_window_weight")},
              "data": {**now["data"], "start_window_weight": 3.0}}
    cfg = config.from_saved(before, log=said.append)
    # Phase 2 at the full rate, without finishing owed updates, offline starts weighted as pretraining's.
    assert (cfg.online.lr_scale, cfg.online.finish_updates, cfg.online.offline_start_window_weight) == (1.0, False, 3.0)
    assert len(said) == 1 and "online.lr_scale 1.0 (added in 1354450)" in said[0]


def test_changed_fields_names_each_difference_but_a_dataset_the_run_fell_back_to():
    given = config.load(None, {"data.dataset_id": "mujoco/walker2d/medium-v0"})
    fell_back = config.load(None, {"data.dataset_id": given.data.fallback_dataset_id})
    assert config.changed_fields(fell_back, given) == []
    other = config.load(None, {"data.dataset_id": "local/walker2d/other-v0", "train.lr": 1e-3})
    assert config.changed_fields(other, given) == [
        "data.dataset_id 'local/walker2d/other-v0' there, 'mujoco/walker2d/medium-v0' here",
        "train.lr 0.001 there, 0.0002 here"]


@pytest.mark.parametrize("overrides", [
    {"data.discount": 1.0},  # undiscounted returns, as the help's (0, 1] says
    {"planner.ddim_steps": 20, "diffusion.n_steps": 20},  # DDIM over every step of the schedule
    {"online.offline_ratio": 0.0},  # online batches only
    {"online.offline_ratio": 1.0},  # offline batches only
])
def test_the_closed_ends_of_documented_ranges_are_accepted(overrides):
    # A bound written one-off would refuse a config the help promises, with no way around it.
    config.load(None, overrides)


@pytest.mark.parametrize("text, expected", [("1", True), ("0", False), ("yes", True), ("no", False), ("TRUE", True)])
def test_a_boolean_flag_reads_1_and_0_as_true_and_false(text, expected):
    # `--train.train_value 1` read as false would train no value net, and say nothing.
    assert config.load(None, {"train.train_value": text, "guidance.scale": 0.0, "guidance.n_candidates": 1}
                       ).train.train_value is expected


def test_overrides_onto_a_base_config_leave_the_base_as_it_was():
    # from_dict/from_args onto a planner's or a checkpoint's config must not edit it in place: a
    # planner would plan with the overridden value, a shared test fixture would leak it onward.
    base = config.load(SMOKE_CONFIG)
    before = config.load(SMOKE_CONFIG)
    config.from_dict({"guidance": {"scale": 0.5}, "online": {"envs_per_actor": 7}}, base)
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    config.from_args(parser.parse_args(["--planner.replan_every", "2"]), base=base)
    assert base == before


def test_a_measure_interval_of_zero_is_refused_before_any_rollout():
    # Accepted, every rollout actor fails after pretraining on `plans_made % 0`.
    with pytest.raises(ConfigError, match="online.measure_every must be >= 1, got 0"):
        config.load(None, {"online.measure_every": 0})


def test_a_seed_of_2_to_the_63_is_refused_by_the_config_and_by_the_flags():
    # Config and flags share one range (the 63-bit streams, held_out_seed's wrap).
    from distdiff import cli

    for key in ("train.seed", "eval.seed"):
        with pytest.raises(ConfigError, match=rf"{key} must be in \[0, 2\*\*63\)"):
            config.load(None, {key: 2**63})
        config.load(None, {key: 2**63 - 1})
    with pytest.raises(argparse.ArgumentTypeError, match="must be < "):
        cli.seed_int(str(2**63))
    assert cli.seed_int(str(2**63 - 1)) == 2**63 - 1


# config.validate: a negative learner timeout is refused (mutant: the check dropped; the run
# would stop at its first learner call that has not returned at once).
def test_a_negative_learner_timeout_is_refused():
    cfg = config.from_dict({"online": {"learner_timeout_s": -1.0}})
    with pytest.raises(config.ConfigError, match="online.learner_timeout_s must be >= 0"):
        config.validate(cfg)
    config.validate(config.from_dict({"online": {"learner_timeout_s": 0.0}}))


def test_text_fields_refuse_lists_mappings_and_yes_or_no():
    # ray start --resources='{"learner": 1}' copied into YAML: a resource no node has, as text.
    for value in ({"learner": 1}, ["Walker2d-v5"], True):
        with pytest.raises(ConfigError, match="online.learner_resource: expected text, got"):
            config.load(None, {"online.learner_resource": value})
    assert config.load(None, {"online.learner_resource": None}).online.learner_resource == ""
    with pytest.raises(ConfigError, match="data.fallback_episodes must be >= 0"):
        config.load(None, {"data.fallback_episodes": -1})


def test_flags_that_would_do_nothing_under_the_config_they_make_are_refused():
    # A return quantile on an unconditioned model was taken, and recorded as an override,
    # without a word; so were DDIM settings for the DDPM sampler, and guidance steps at scale 0.
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)

    def flags(*argv, base=None):
        return config.from_args(parser.parse_args(list(argv)), base=base)

    unconditioned = config.load(SMOKE_CONFIG, {"model.returns_condition": False, "guidance.scale": 0.0,
                                               "planner.sampler": "ddpm"})
    with pytest.raises(ConfigError) as e:
        flags("--guidance.return_quantile", "0.99", "--guidance.return_scale", "3", "--planner.ddim_eta", "0.5",
              "--guidance.t_stopgrad", "1", base=unconditioned)
    assert str(e.value).splitlines()[1:] == [
        "  --guidance.return_quantile, --guidance.return_scale would do nothing: they act only with "
        "model.returns_condition true",
        "  --guidance.t_stopgrad would do nothing: it acts only with guidance.scale > 0",
        "  --planner.ddim_eta would do nothing: it acts only with planner.sampler ddim"]
    # Under the config the flags themselves make, not the base's: they act there.
    cfg = flags("--model.returns_condition", "true", "--guidance.return_quantile", "0.99", "--planner.sampler", "ddim",
                "--planner.ddim_eta", "0.5", "--guidance.scale", "0.1", "--guidance.t_stopgrad", "1", base=unconditioned)
    assert (cfg.guidance.return_quantile, cfg.planner.ddim_eta, cfg.guidance.t_stopgrad) == (0.99, 0.5, 1)
    for argv, says in [(["--planner.execution", "open_loop", "--planner.replan_every", "2"], "planner.execution receding"),
                       (["--planner.dynamics_rank", "value"], "planner.dynamics_candidates > 1"),
                       (["--train.condition_dropout", "0.5"], "model.returns_condition true"),
                       (["--guidance.n_guide_steps", "3"], "guidance.scale > 0"),
                       (["--train.lr_schedule", "constant", "--train.warmup_steps", "100"], "train.lr_schedule cosine"),
                       (["--train.train_dynamics", "false", "--train.dynamics_lr", "0.01"], "train.train_dynamics true")]:
        with pytest.raises(ConfigError, match=f"would do nothing: it acts only with {re.escape(says)}"):
            flags("--config", str(SMOKE_CONFIG), "--guidance.scale", "0", *argv)
    # NaN or infinite flags, refused before any work; a checkpoint's own config is not judged.
    with pytest.raises(ConfigError, match=r"guidance.scale must be a finite number, got inf\n"
                                          r"  train.grad_clip must be a finite number, got nan"):
        flags("--guidance.scale", "inf", "--train.grad_clip", "nan", base=unconditioned)
    assert flags("--online.wall_time_s", "inf", base=config.from_dict({"data": {"termination_penalty": math.nan}},
                                                                     unconditioned)).online.wall_time_s == math.inf
    # A config file may set them all alike (so may a sweep's space): only flags are refused.
    assert config.load(SMOKE_CONFIG, {"planner.execution": "open_loop", "planner.replan_every": 2}).planner.replan_every == 2
