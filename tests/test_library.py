"""distdiff used from Python, as README's "Using distdiff from Python" shows it: its snippets run
as written, and the library guards a run dir and a config as the command line does."""
from __future__ import annotations

import dataclasses
import inspect
import re

import numpy as np
import pytest
import ray
import torch
from ray.exceptions import AuthenticationError

import distdiff.process
from _helpers import ROOT, make_trainer, tiny_online_config
from distdiff import config as config_lib
from distdiff import pretrain as pretrain_lib
from distdiff.checkpoint import save_checkpoint
from distdiff.distributed import cluster, driver
from distdiff.evaluation import evaluate
from distdiff.rundir import CHECKPOINT


def readme_snippets() -> list:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using distdiff from Python\n", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) == 2, "README's Python section: a planner snippet and a training snippet"
    return snippets


def test_readme_planner_snippet_plans_and_evaluates_a_checkpoint(tiny_episodes, tmp_path):
    trainer, _ = make_trainer(tiny_episodes[:2], **{"eval.num_envs": 5})
    save_checkpoint(tmp_path / "run" / CHECKPOINT, trainer.state_dict())
    code = readme_snippets()[0]
    assert '"runs/quickstart"' in code
    scope: dict = {}
    exec(compile(code.replace('"runs/quickstart"', repr(str(tmp_path / "run"))), "README.md", "exec"), scope)
    planner, plan = scope["planner"], scope["plan"]
    assert planner.config == trainer.cfg  # the config it was trained with, whole
    assert plan.states.shape == (1, trainer.cfg.model.horizon, trainer.cfg.env.obs_dim)
    start, _ = scope["env"].reset(seed=0)  # (the snippet stepped on from it)
    np.testing.assert_allclose(plan.states[0, 0], start, rtol=1e-5, atol=1e-5)  # s_0 is the observation, in env units
    assert np.all(np.abs(scope["action"]) <= 1.0)
    assert scope["summary"]["episodes"] == 5 and np.isfinite(scope["summary"]["return_mean"])


def test_evaluate_without_a_config_needs_a_planner_made_from_one(tiny_episodes):
    trainer, _ = make_trainer(tiny_episodes[:2])
    from distdiff.training import planner_from_checkpoint

    planner = planner_from_checkpoint(trainer.state_dict())
    planner.config = None
    with pytest.raises(ValueError, match="pass the config to judge it with"):
        evaluate(planner, episodes=1)


def test_readme_training_snippet_calls_the_api_as_it_is(monkeypatch):
    """The training snippet, with connect and train replaced by stand-ins that bind their
    arguments to the real signatures (the real ones are run by the launch scripts' tests)."""
    calls = {}

    def stand_in(real):
        def call(*args, **kwargs):
            calls[real.__name__] = inspect.signature(real).bind(*args, **kwargs).arguments
            return {} if real is driver.train else False
        return call

    monkeypatch.setattr(distdiff.process, "default_ray_auth", lambda: calls.setdefault("default_ray_auth", {}))
    monkeypatch.setattr(cluster, "connect", stand_in(cluster.connect))
    monkeypatch.setattr(driver, "train", stand_in(driver.train))
    monkeypatch.chdir(ROOT)
    exec(compile(readme_snippets()[1], "README.md", "exec"), {})
    assert list(calls) == ["default_ray_auth", "connect", "train"]
    cfg = calls["train"]["cfg"]
    assert isinstance(cfg, config_lib.Config) and cfg.online.env_steps == 3000 and cfg.train.steps == \
        config_lib.load(ROOT / "configs" / "smoke.yaml").train.steps


def test_a_run_dir_that_holds_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    save_checkpoint(tmp_path / CHECKPOINT, {"step": 24, "config": config_lib.Config().to_dict()})
    before = (tmp_path / CHECKPOINT).read_bytes()
    starts = {"pretrain": lambda: pretrain_lib.pretrain(config_lib.Config(), tmp_path, quiet=True),
              "train": lambda: driver.train(config_lib.Config(), tmp_path, progress=False, log=lambda s: None)}
    for name, start in starts.items():
        with pytest.raises(FileExistsError, match=f"{tmp_path} holds a run already: resume=True continues it, "
                                                  "overwrite=True replaces it"):
            start()
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_a_config_changed_in_code_is_checked_before_any_work(tmp_path):
    cfg = config_lib.Config()
    bad = dataclasses.replace(cfg, guidance=dataclasses.replace(cfg.guidance, n_candidates=0))
    for start in (lambda: pretrain_lib.pretrain(bad, tmp_path / "p", quiet=True),
                  lambda: driver.train(bad, tmp_path / "t", progress=False, log=lambda s: None)):
        with pytest.raises(config_lib.ConfigError, match="guidance.n_candidates must be >= 1"):
            start()
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


def test_the_address_auto_is_the_recorded_cluster_and_a_stale_record_fails_at_once(monkeypatch):
    # Ray's own "auto" retried a record of a killed cluster for minutes.
    import ray._private.services as ray_services

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    inits = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: inits.append(kwargs["address"]))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(cluster, "keep_ray_token_private", lambda log: None)
    def recorded(address):
        def lookup(addr, temp_dir):
            if address is None:
                raise ConnectionError("Could not find any running Ray instance.")  # as Ray says it
            return address
        return lookup

    for found, listens, said in ((None, None, "Could not find any running Ray instance."),
                                 ("10.0.0.9:6379", False, "recorded at 10.0.0.9:6379 does not answer")):
        monkeypatch.setattr(ray_services, "get_ray_address_from_environment", recorded(found))
        monkeypatch.setattr(cluster, "_listens", lambda address: listens)
        with pytest.raises(cluster.ClusterUnreachable, match=f"address 'auto': .*{re.escape(said)}"):
            cluster.connect("auto", log=lambda s: None)
    monkeypatch.setattr(ray_services, "get_ray_address_from_environment", recorded("10.0.0.9:6379"))
    monkeypatch.setattr(cluster, "_listens", lambda address: True)
    assert cluster.connect("auto", log=lambda s: None) is False and inits == ["10.0.0.9:6379"]


def test_joining_a_token_cluster_after_ray_was_imported_without_token_mode_says_what_to_do(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "_listens", lambda address: True)

    def refused(**kwargs):
        raise AuthenticationError("the cluster needs a token")

    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(cluster.ClusterUnreachable, match=r"Ray was imported before RAY_AUTH_MODE=token was set: call "
                                                         r"distdiff.process.default_ray_auth\(\) before anything imports ray"):
        cluster.connect("127.0.0.1:6379", log=lambda s: None)
    # With no token here, the hint says where one goes.
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with pytest.raises(cluster.ClusterUnreachable, match="needs its token here: ~/.ray/auth_token"):
        cluster.connect("127.0.0.1:6379", log=lambda s: None)


def test_pretraining_gives_the_caller_its_torch_threads_back(tiny_dataset, tmp_path):
    cfg = tiny_online_config(tiny_dataset, **{"train.steps": 2, "train.num_threads": 1})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pretrain_lib.pretrain(cfg, tmp_path / "run", quiet=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
