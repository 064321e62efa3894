"""Ray Tune sweeps: a real 2-trial sweep, interrupted and resumed, and invalid spaces refused."""
from __future__ import annotations

import copy
import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from _helpers import SESSION_RAY, script_in_process, tiny_online_config
from distdiff import config as config_lib
from distdiff.config import ConfigError
from distdiff.distributed.tuning import (load_spec, make_scheduler, make_tuner, on_trial_driver, param_space,
                                         pbt_changes, scheduler_options, search_alg, summarize, trial_resources, update_budget)

ROOT = Path(__file__).resolve().parents[1]


FIXED = {"train.steps": 20, "env.max_episode_steps": 40, "online.num_actors": 2, "online.envs_per_actor": 1,
         "online.env_steps": 80, "online.updates_per_env_step": 0.1, "online.updates_per_call": 4, "eval.episodes": 1,
         "eval.num_envs": 1}


def write_sweep(path: Path, dataset_id: str, **extra) -> Path:
    sweep = {
        "base": str(ROOT / "configs" / "smoke.yaml"),
        "name": "sweep",
        "num_samples": 1,
        "max_concurrent": 1,
        "scheduler": "fifo",
        "resources": {"driver_cpus": 0.25, "learner_cpus": 0.5, "learner_gpus": 0, "actor_cpus": 0.25},
        "fixed": {"data.dataset_id": dataset_id, **FIXED},
        "space": {"diffusion.schedule": {"grid": ["linear", "sigmoid"]},
                  "guidance.scale": {"loguniform": [0.001, 1.0], "zero": 0.5}},
        **extra,
    }
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_invalid_spaces_are_refused_before_any_trial(tiny_dataset, tmp_path, subprocess_env):
    bad = write_sweep(tmp_path / "bad.yaml", tiny_dataset, space={
        "diffusion.schedul": {"choice": ["linear"]},
        "guidance.scale": {"loguniform": [0.0, 1.0]},
    })
    with pytest.raises(ConfigError) as err:
        load_spec(bad)
    assert "loguniform needs low > 0" in str(err.value)
    only_unknown = write_sweep(tmp_path / "unknown.yaml", tiny_dataset, space={"diffusion.schedul": {"choice": ["linear"]}})
    with pytest.raises(ConfigError, match="space: unknown field diffusion.schedul"):
        load_spec(only_unknown)
    bad_value = write_sweep(tmp_path / "value.yaml", tiny_dataset, space={"diffusion.schedule": {"choice": ["linear", "zigzag"]}})
    with pytest.raises(ConfigError, match="zigzag"):
        load_spec(bad_value)
    for text, expected in (("hello", "must be a mapping of sweep options, got str"), ("a: [b", "is not valid YAML"),
                           ("space: [guidance.scale]", "space must be a mapping"),
                           ("num_samples: abc", "num_samples must be an integer")):
        odd = tmp_path / "odd.yaml"
        odd.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_spec(odd)
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "tune.py"), "--config", str(bad), "--storage",
                          str(tmp_path / "storage")], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "diffusion.schedul" in out.stderr
    assert not (tmp_path / "storage").exists()
    good = write_sweep(tmp_path / "good.yaml", tiny_dataset)
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "tune.py"), "--config", str(good), "--storage",
                          str(tmp_path / "storage"), "--max-concurrent", "0"], env=subprocess_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "argument --max-concurrent: must be >= 1, got 0" in out.stderr
    assert not (tmp_path / "storage").exists()
    # A file given as the storage directory: before, Ray started and make_tuner raised NotADirectoryError.
    (tmp_path / "storage.txt").write_text("")
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "tune.py"), "--config", str(good), "--storage",
                          str(tmp_path / "storage.txt")], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"--storage {tmp_path / 'storage.txt'} is a file; give a directory" in out.stderr
    assert "ray:" not in out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize("scheduler, metric, mode, kept", [
    ("asha", "normalized_score", "max", [0, 1, 3]),  # the two best, and the latest
    ("fifo", "alignment_error", "min", [1, 2, 3]),
    ("pbt", "normalized_score", "max", [0, 1, 2, 3]),  # every one: PBT restores old ones
])
def test_a_sweep_keeps_each_trials_best_checkpoints_by_its_metric_and_its_latest(scheduler, metric, mode, kept,
                                                                                 tiny_dataset, tmp_path):
    # As Tune's own checkpoint manager keeps a trial's reports: the two newest dropped the best
    # weights, which ResultGrid's get_best_checkpoint and best_checkpoints then missed.
    from ray.train import Checkpoint
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from distdiff.distributed.tuning import run_config

    extra = {"pbt": {"mutations": ["guidance.scale"]}, "max_concurrent": 2} if scheduler == "pbt" else {}
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler=scheduler, metric=metric, mode=mode,
                                 fixed={"data.dataset_id": tiny_dataset, **FIXED, "online.eval_every": 4}, **extra))
    manager = _CheckpointManager(run_config(spec, tmp_path / "storage").checkpoint_config)
    scores = {"normalized_score": [0.15, 0.14, 0.12, 0.10], "alignment_error": [0.9, 0.5, 0.6, 0.8]}[metric]
    for i, score in enumerate(scores):
        (tmp_path / f"c{i}").mkdir()
        manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(tmp_path / f"c{i}")),
                                                    {metric: score}))
    assert [i for i in range(4) if (tmp_path / f"c{i}").exists()] == kept
    assert manager.latest_checkpoint_result.checkpoint.path == str(tmp_path / "c3")  # (what a resume goes on from)


def test_a_trial_reserves_a_bundle_for_each_of_its_own_actors(tiny_dataset, tmp_path):
    unfixed = {k: v for k, v in {**FIXED, "data.dataset_id": tiny_dataset}.items() if k != "online.num_actors"}
    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset, fixed=unfixed, space={"online.num_actors": {"choice": [1, 3]}})
    spec = load_spec(sweep)
    for n in (1, 3):
        bundles = trial_resources(spec, {"online.num_actors": n}).bundles
        assert bundles == [{"CPU": 0.25}, {"CPU": 0.5}] + [{"CPU": 0.25}] * n
    fixed_size = write_sweep(tmp_path / "f.yaml", tiny_dataset, space={"online.actor_num_cpus": {"choice": [0.5, 1.0]}})
    with pytest.raises(ConfigError, match="online.actor_num_cpus is set by the sweep's `resources`"):
        load_spec(fixed_size)
    # PBT copies a better trial's whole config into another, its number of actors too, whether
    # or not that field is mutated: a 1-actor trial would start 3 actors in 1 bundle, and wait.
    for mutations in (["online.num_actors"], ["guidance.scale"]):
        copied = write_sweep(tmp_path / "m.yaml", tiny_dataset, scheduler="pbt", pbt={"mutations": mutations}, fixed=unfixed,
                             space={"online.num_actors": {"choice": [1, 3]}, "guidance.scale": {"uniform": [0.0, 1.0]}})
        with pytest.raises(ConfigError, match="sizes a trial's placement group when it starts"):
            load_spec(copied)


def test_scheduler_options_are_checked_and_passed_on(tiny_dataset, tmp_path):
    typo = write_sweep(tmp_path / "a.yaml", tiny_dataset, scheduler="asha", asha={"grace": 1, "max_t": 10})
    with pytest.raises(ConfigError, match=r"asha: unknown options \['grace'\]"):
        load_spec(typo)
    evaluated = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    bad_value = write_sweep(tmp_path / "b.yaml", tiny_dataset, scheduler="asha", asha={"reduction_factor": 1},
                            fixed=evaluated)
    with pytest.raises(ConfigError, match="asha.reduction_factor must be a number > 1, got 1"):
        load_spec(bad_value)
    no_mutation = write_sweep(tmp_path / "c.yaml", tiny_dataset, scheduler="pbt", pbt={"mutations": []}, fixed=evaluated,
                              max_concurrent=2)
    with pytest.raises(ConfigError, match="invalid sweep pbt"):
        load_spec(no_mutation)
    spec = load_spec(write_sweep(tmp_path / "d.yaml", tiny_dataset, scheduler="pbt", fixed=evaluated, max_concurrent=2,
                                 pbt={"mutations": ["guidance.scale"], "quantile_fraction": 0.5, "burn_in_period": 3}))
    pbt = make_scheduler(spec, param_space(spec))
    # Trials are compared at their learner updates, not at their number of reports; left out,
    # the perturbation interval is two evaluations.
    assert (pbt._quantile_fraction, pbt._burn_in_period, pbt._perturbation_interval) == (0.5, 3, 4)
    assert pbt._time_attr == "updates"
    asha = load_spec(write_sweep(tmp_path / "e.yaml", tiny_dataset, scheduler="asha", asha={"reduction_factor": 3},
                                 fixed={**evaluated, "online.env_steps": 200}))
    asha = make_scheduler(asha, param_space(asha))
    # Left out, the first rung is at the first evaluation, and max_t at the trials' 20 updates.
    assert (asha._time_attr, asha._reduction_factor, asha._max_t) == ("updates", 3, 20)
    assert sorted(milestone for milestone, _ in asha._brackets[0]._rungs) == [2, 6, 18]
    # The `zero:` domain of guidance.scale is resampled with its exact zeros.
    values = [pbt._hyperparam_mutations["guidance.scale"].sample() for _ in range(100)]
    assert 0.0 in values and all(v == 0.0 or 0.001 <= v <= 1.0 for v in values)


def test_a_scheduler_that_could_not_act_on_the_evaluations_is_refused(tiny_dataset, tmp_path):
    # Times are learner updates; a trial reports at each evaluation. FIXED trials train 8 updates.
    fixed = {**FIXED, "data.dataset_id": tiny_dataset}
    for scheduler, options, key in (("asha", {"grace_period": 4}, "grace_period"),
                                    ("pbt", {"mutations": ["guidance.scale"], "perturbation_interval": 4},
                                     "perturbation_interval")):
        def sweep(name, scheduler=scheduler, **kw):
            return write_sweep(tmp_path / name, tiny_dataset, scheduler=scheduler, max_concurrent=2, **kw)

        with pytest.raises(ConfigError, match="online.eval_every is 0"):
            load_spec(sweep("none.yaml", **{scheduler: options}))
        swept = {"online.eval_every": {"choice": [0, 2]}, "guidance.scale": {"uniform": [0.0, 1.0]}}
        with pytest.raises(ConfigError, match="online.eval_every can be 0"):
            load_spec(sweep("swept.yaml", **{scheduler: options}, space=swept))
        with pytest.raises(ConfigError, match=rf"{scheduler}.{key} \(4\) counts learner updates"):
            load_spec(sweep("units.yaml", **{scheduler: options}, fixed={**fixed, "online.eval_every": 6}))
        with pytest.raises(ConfigError, match=rf"{scheduler}.{key} \(10\) is beyond a trial's budget of 8"):
            load_spec(sweep("late.yaml", **{scheduler: {**options, key: 10}}, fixed={**fixed, "online.eval_every": 2}))
        assert load_spec(sweep("ok.yaml", **{scheduler: options}, fixed={**fixed, "online.eval_every": 4})).scheduler \
            == scheduler
    with pytest.raises(ConfigError, match="asha needs max_t"):
        load_spec(write_sweep(tmp_path / "wall.yaml", tiny_dataset, scheduler="asha",
                              fixed={**fixed, "online.eval_every": 2, "online.env_steps": 0, "online.wall_time_s": 60}))


def test_the_shipped_sweep_loads():
    spec = load_spec(ROOT / "configs" / "tune.yaml")
    scheduler = make_scheduler(spec, param_space(spec))
    first_rung = min(milestone for milestone, _ in scheduler._brackets[0]._rungs)
    assert scheduler._time_attr == "updates" and first_rung >= spec.trial_config({}).online.eval_every > 0


def test_the_shipped_sweep_over_a_prior_loads_where_the_quickstart_left_its_run(prior, tmp_path):
    (tmp_path / "configs").mkdir()
    shutil.copy2(ROOT / "configs" / "tune_prior.yaml", tmp_path / "configs")
    # The prior phase 1 made, not the run's aligned checkpoint beside pretrain/.
    (tmp_path / "runs" / "quickstart" / "pretrain").mkdir(parents=True)
    shutil.copy2(prior, tmp_path / "runs" / "quickstart" / "pretrain")
    spec = load_spec(tmp_path / "configs" / "tune_prior.yaml")
    assert spec.init == str(tmp_path / "runs" / "quickstart" / "pretrain") and spec.trial_config({}).model.dim == 16
    scheduler = make_scheduler(spec, param_space(spec))
    assert scheduler._time_attr == "updates"


def test_resume_takes_a_relative_storage_path(tiny_dataset, tmp_path, monkeypatch):
    # The default --storage (runs/tune) is relative, and Tune's storage layer refuses relative paths.
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"no sweep to resume at {tmp_path}/runs/tune/sweep"):
        make_tuner(spec, Path("runs/tune"), resume=True)


def test_zero_or_loguniform_domain_samples_both(tiny_dataset, tmp_path):
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset))
    domain = param_space(spec)["guidance.scale"]
    values = [domain.sample() for _ in range(200)]
    zeros = sum(v == 0.0 for v in values)
    assert 60 < zeros < 140 and all(v == 0.0 or 0.001 <= v <= 1.0 for v in values)


def test_a_resumed_sweep_makes_its_remaining_trials_from_the_zero_domain_as_a_new_one_does(tiny_dataset, tmp_path):
    # Tune stores a function of the space (tune.sample_from) as a placeholder, which a sweep
    # resumed before its trials were all made resolved to nothing: they failed on a
    # guidance.scale of ('__fn_ph', ...). The space must hold no function, and its draws must
    # come from the sweep's seeded generator, which a resume restores.
    from collections import defaultdict

    from ray.tune.impl.placeholder import inject_placeholders

    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset))
    stored = inject_placeholders(copy.deepcopy(param_space(spec)), defaultdict(list))
    assert stored["guidance.scale"] is not None and not isinstance(stored["guidance.scale"], tuple)
    assert [c["guidance.scale"] for c in drawn_configs(spec)] == [c["guidance.scale"] for c in drawn_configs(spec)]


def drawn_configs(spec, n_live: int = 0):
    """The trial configs the sweep's search hands out, as make_tuner sets it up; ``n_live``: how
    many are handed out before the concurrency limit holds the rest back (0: take them all)."""
    from ray.tune.experiment import Experiment

    search = search_alg(spec)
    search.add_configurations([Experiment("draws", lambda c: None, config=param_space(spec), num_samples=spec.num_samples)])
    configs = []
    while (trial := search.next_trial()) is not None:
        configs.append(trial.config)
        if not n_live:
            search.on_trial_complete(trial.trial_id)
    return configs


def test_each_trial_draws_a_training_seed_of_its_own_unless_the_sweep_sets_one(tmp_path):
    # The num_samples repeats of a grid point were one run again: the same config, the same seed.
    sweep = tmp_path / "sweep.yaml"
    head = f"base: {ROOT / 'configs' / 'smoke.yaml'}\nscheduler: fifo\nnum_samples: 3\n"
    grid = "space:\n  guidance.scale: {grid: [0.0, 0.1]}\n"
    sweep.write_text(head + grid)
    seeds = [c["train.seed"] for c in drawn_configs(load_spec(sweep))]
    assert len(seeds) == 6 and len(set(seeds)) == 6 and all(0 <= s < 2**31 for s in seeds)
    assert [c["train.seed"] for c in drawn_configs(load_spec(sweep))] == seeds  # the sweep's seed draws them
    sweep.write_text(head + "fixed:\n  train.seed: 7\n" + grid)
    assert all("train.seed" not in c for c in drawn_configs(load_spec(sweep)))


def test_a_training_config_given_as_a_sweep_says_where_it_belongs():
    with pytest.raises(ConfigError, match=r"walker2d.yaml looks like a training config \(it has `env:`, `data:`, .*launch/train.py"):
        load_spec(ROOT / "configs" / "walker2d.yaml")


def test_the_sweep_seed_draws_the_same_trials_again(tiny_dataset, tmp_path):
    space = {"guidance.scale": {"loguniform": [0.001, 1.0], "zero": 0.3}, "diffusion.n_steps": {"choice": [10, 20, 30]},
             "online.lr_scale": {"uniform": [0.1, 1.0]}}
    specs = [load_spec(write_sweep(tmp_path / f"{seed}.yaml", tiny_dataset, space=space, num_samples=8, seed=seed))
             for seed in (0, 0, 1)]
    first, again, other = (drawn_configs(spec) for spec in specs)
    assert len(first) == 8 and len({c["online.lr_scale"] for c in first}) == 8
    assert first == again and first != other


def test_the_sweep_runs_at_most_max_concurrent_trials(tiny_dataset, tmp_path):
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, num_samples=4, max_concurrent=2))
    assert len(drawn_configs(spec, n_live=2)) == 2


def test_custom_resources_are_refused(tiny_dataset, tmp_path):
    # A trial's actors are placed in its placement group, whose bundles hold only CPUs and GPUs.
    for key in ("online.actor_resource", "online.learner_resource"):
        swept = write_sweep(tmp_path / "s.yaml", tiny_dataset, space={key: {"choice": ["rollout"]}})
        with pytest.raises(ConfigError, match=f"space: {key} .*placement group"):
            load_spec(swept)
        fixed = write_sweep(tmp_path / "f.yaml", tiny_dataset, fixed={**FIXED, "data.dataset_id": tiny_dataset, key: "rollout"})
        with pytest.raises(ConfigError, match=f"{key} is 'rollout'.*placement group"):
            load_spec(fixed)
    base = tmp_path / "base.yaml"
    config_lib.save(config_lib.load(ROOT / "configs" / "smoke.yaml", {"online.actor_resource": "rollout"}), base)
    with pytest.raises(ConfigError, match="online.actor_resource is 'rollout'"):
        load_spec(write_sweep(tmp_path / "b.yaml", tiny_dataset, base=str(base)))
    # The way out for a base config that names one: clear it for the sweep.
    cleared = {**FIXED, "data.dataset_id": tiny_dataset, "online.actor_resource": ""}
    assert load_spec(write_sweep(tmp_path / "c.yaml", tiny_dataset, base=str(base), fixed=cleared)).base == str(base)


def test_continuous_domains_on_integer_fields_are_refused(tiny_dataset, tmp_path):
    for key, dom in (("model.horizon", {"uniform": [8, 16]}), ("diffusion.n_steps", {"loguniform": [10, 20]})):
        sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset, space={key: dom})
        with pytest.raises(ConfigError, match=rf"space.{key}: .*integer.*randint"):
            load_spec(sweep)
    assert load_spec(write_sweep(tmp_path / "ok.yaml", tiny_dataset, space={"diffusion.n_steps": {"randint": [10, 20]}}))


def test_a_metric_the_trials_would_not_report_is_refused(tiny_dataset, tmp_path):
    fixed = {**FIXED, "data.dataset_id": tiny_dataset}
    # Only D4RL's envs have reference scores: others report no normalized_score.
    swimmer = {**fixed, "env.id": "Swimmer-v5", "env.obs_dim": 8, "env.act_dim": 2,
               "data.dataset_id": "local/swimmer/tiny-v0", "data.fallback_dataset_id": "local/swimmer/random-v0"}
    with pytest.raises(ConfigError, match="metric normalized_score: env.id Swimmer-v5 has no reference returns "
                                          "(.|\n)*eval.reference_returns: \\[RANDOM, EXPERT\\]"):
        load_spec(write_sweep(tmp_path / "fixed.yaml", tiny_dataset, fixed=swimmer))
    # Its own references, given: its trials report a score.
    scored = {**swimmer, "eval.reference_returns": [-5.0, 360.0]}
    assert load_spec(write_sweep(tmp_path / "scored.yaml", tiny_dataset, fixed=scored)).metric == "normalized_score"
    # Nor ranked by scores measured on scales that differ from trial to trial.
    with pytest.raises(ConfigError, match="space: eval.reference_returns cannot be swept"):
        load_spec(write_sweep(tmp_path / "swept.yaml", tiny_dataset, fixed=swimmer,
                              space={"eval.reference_returns": {"choice": [[-5.0, 360.0], [0.0, 500.0]]}}))
    assert load_spec(write_sweep(tmp_path / "r.yaml", tiny_dataset, metric="return_mean",
                                 fixed=swimmer)).metric == "return_mean"
    for name, kw in (("fixed", {"fixed": {**fixed, "eval.measure_alignment": False}}),
                     ("swept", {"space": {"eval.measure_alignment": {"choice": [True, False]}}})):
        with pytest.raises(ConfigError, match="metric alignment_error .*eval.measure_alignment"):
            load_spec(write_sweep(tmp_path / f"a{name}.yaml", tiny_dataset, metric="alignment_error", mode="min", **kw))


def test_invalid_resources_are_refused(tiny_dataset, tmp_path):
    good = {"driver_cpus": 0.25, "learner_cpus": 0.5, "learner_gpus": 0, "actor_cpus": 0.25}
    for bad, expected in (({"learner_gpus": -1}, "resources.learner_gpus must be a number >= 0, got -1"),
                          ({"driver_cpus": "a"}, "resources.driver_cpus must be a number >= 0, got 'a'"),
                          ({"actor_cpus": 0}, "resources.actor_cpus must be > 0"),
                          ({"learner_cpus": 0}, "learner_cpus > 0 or learner_gpus > 0")):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, resources={**good, **bad}))
    # The trial function may run without a reservation, and a GPU learner without CPUs.
    spec = load_spec(write_sweep(tmp_path / "ok.yaml", tiny_dataset,
                                 resources={**good, "driver_cpus": 0, "learner_cpus": 0, "learner_gpus": 1}))
    assert trial_resources(spec, {}).bundles[:1] == [{"GPU": 1.0}]


def test_a_sweep_name_that_is_not_one_directory_is_refused(tiny_dataset, tmp_path):
    # Tune would write STORAGE/a/a/b while --resume and the summary look in STORAGE/a/b.
    for bad in ("a/b", "..", ""):
        with pytest.raises(ConfigError, match="name must name one directory"):
            load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, name=bad))


class FakeResults:
    """What summarize and launch/tune.py read of Tune's ResultGrid. Its get_best_result is Ray
    2.60's: the only trial, even a failed one; else the best of those that reported the metric,
    failed or not, and a RuntimeError when none did."""

    def __init__(self, *results):
        self.results = [SimpleNamespace(config=config, metrics={**metrics, "done": error is None}, error=error)
                        for config, metrics, error in results]
        self.num_errors = sum(r.error is not None for r in self.results)

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def get_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"trial_id": f"t{i}", **{f"config/{k}": v for k, v in r.config.items()}, **r.metrics}
                             for i, r in enumerate(self.results)])

    def get_best_result(self, metric, mode):
        if len(self.results) == 1:
            return self.results[0]
        scored = [r for r in self.results if metric in r.metrics]
        if not scored:
            raise RuntimeError(f"No best trial found for the given metric: {metric}")
        return (max if mode == "max" else min)(scored, key=lambda r: r.metrics[metric])


def test_the_best_config_is_a_finished_trial_sized_as_the_base_config(tiny_dataset, tmp_path):
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset))
    (tmp_path / "storage" / "sweep").mkdir(parents=True)
    results = FakeResults(({"diffusion.schedule": "linear", "guidance.scale": 0.0}, {"normalized_score": 3.0}, None),
                          ({"diffusion.schedule": "sigmoid", "guidance.scale": 0.5}, {"normalized_score": 5.0}, None),
                          ({"diffusion.schedule": "linear", "guidance.scale": 0.1}, {"normalized_score": 9.0}, "failed"))
    out = summarize(results, spec, tmp_path / "storage")
    best = config_lib.load(out["best_config"])
    assert (best.diffusion.schedule, best.guidance.scale) == ("sigmoid", 0.5)
    # The base config's sizes (smoke.yaml leaves the defaults), not the trial's share of its
    # placement group: on a GPU cluster train.py then puts the learner on a GPU.
    assert spec.trial_config({}).online.learner_num_gpus == 0
    online, base = best.online, config_lib.load(ROOT / "configs" / "smoke.yaml").online
    assert (online.learner_num_gpus, online.learner_num_cpus, online.actor_num_cpus) == \
        (base.learner_num_gpus, base.learner_num_cpus, base.actor_num_cpus)
    assert best.data.dataset_id == tiny_dataset and best.train.steps == FIXED["train.steps"]


@pytest.mark.parametrize("driver_cpus", [0.25, 0.0])
def test_each_actor_of_a_trial_runs_in_its_own_bundle(driver_cpus, tiny_dataset, tmp_path):
    # Left to Ray, an actor takes CPUs from any bundle of its node, in a group spread over nodes
    # the learner's too. Ray leaves a driver bundle that asks for nothing out of the group.
    from distdiff.distributed.actors import bundle_of

    resources = {"driver_cpus": driver_cpus, "learner_cpus": 0.5, "learner_gpus": 1, "actor_cpus": 0.25}
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, resources=resources,
                                 fixed={**FIXED, "data.dataset_id": tiny_dataset, "online.num_actors": 3}))
    bundles = trial_resources(spec, {}).bundles  # as Ray makes the group
    assert bundles[bundle_of(len(bundles), 3)] == {"CPU": 0.5, "GPU": 1.0}
    assert [bundles[bundle_of(len(bundles), 3, i)] for i in range(3)] == [{"CPU": 0.25}] * 3
    assert bundle_of(len(bundles), 5) is None  # a group of another layout: left to Ray


def test_the_best_config_under_asha_is_one_of_the_trials_it_let_finish(tiny_dataset, tmp_path):
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}  # 8 updates a trial
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="asha", fixed=fixed, num_samples=3))
    (tmp_path / "storage" / "sweep").mkdir(parents=True)
    results = FakeResults(  # a lucky first evaluation of a trial ASHA stopped at its first rung
        ({"diffusion.schedule": "linear", "guidance.scale": 0.0}, {"normalized_score": 30.0, "updates": 2}, None),
        ({"diffusion.schedule": "sigmoid", "guidance.scale": 0.5}, {"normalized_score": 25.0, "updates": 8}, None),
        ({"diffusion.schedule": "linear", "guidance.scale": 0.1}, {"normalized_score": 20.0, "updates": 8}, None))
    best = config_lib.load(summarize(results, spec, tmp_path / "storage")["best_config"])
    assert (best.diffusion.schedule, best.guidance.scale) == ("sigmoid", 0.5)
    # A trial whose budget ended after fewer updates (its wall time, or its env steps with
    # online.finish_updates false) ran to its end all the same: its last report is final.
    results = FakeResults(
        ({"diffusion.schedule": "linear", "guidance.scale": 0.0}, {"normalized_score": 30.0, "updates": 2}, None),
        ({"diffusion.schedule": "sigmoid", "guidance.scale": 0.5},
         {"normalized_score": 25.0, "updates": 8, "final": True}, None),
        ({"diffusion.schedule": "cosine", "guidance.scale": 0.1},
         {"normalized_score": 27.0, "updates": 6, "final": True}, None))
    best = config_lib.load(summarize(results, spec, tmp_path / "storage")["best_config"])
    assert (best.diffusion.schedule, best.guidance.scale) == ("cosine", 0.1)


@pytest.fixture
def tune_script(monkeypatch):
    """launch/tune.py, imported without its settings of this process's environment (threads, Ray auth)."""
    return script_in_process("tune", monkeypatch)


def test_a_sweep_whose_trials_all_failed_has_no_best_config(tiny_dataset, tmp_path, monkeypatch, tune_script, capsys):
    import ray

    from distdiff.distributed import cluster, tuning

    storage = tmp_path / "storage"
    (storage / "sweep").mkdir(parents=True)
    # An earlier sweep of this name found one; this one's table must not sit beside it.
    (storage / "sweep" / "best_config.yaml").write_text("train: {steps: 1}\n")
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    failed = ({"diffusion.schedule": "linear", "guidance.scale": 0.0}, {}, "failed")
    # (One trial: Tune's get_best_result gives the only one, even a failed one.)
    one = write_sweep(tmp_path / "one.yaml", tiny_dataset, space={"guidance.scale": {"uniform": [0.0, 1.0]}})
    for sweep, results in ((one, FakeResults(failed)),
                           (write_sweep(tmp_path / "s.yaml", tiny_dataset), FakeResults(failed, failed))):
        monkeypatch.setattr(tuning, "make_tuner", lambda *args, **kwargs: SimpleNamespace(
            fit=lambda: print("Tune: To visualize your results with TensorBoard, ...") or results))
        with pytest.raises(SystemExit) as stop:
            tune_script.main(["--config", str(sweep), "--storage", str(storage)])
        assert stop.value.code == 1
        out, err = capsys.readouterr()
        assert "no trial ended without an error" in err
        assert (storage / "sweep" / "trials.csv").is_file() and not (storage / "sweep" / "best_config.yaml").exists()
        # Where the trials' curves are, before Tune names its own copies of a few.
        said = f"TensorBoard, every trial's curves (copied every few minutes): tensorboard --logdir {storage / 'sweep'} "
        assert said in out and out.index(said) < out.index("Tune: To visualize")


def test_resume_refuses_what_tune_would_ignore(tiny_dataset, tmp_path, tune_script, capsys):
    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset)
    with pytest.raises(SystemExit) as stop:
        tune_script.main(["--config", str(sweep), "--storage", str(tmp_path), "--resume", "--num-samples", "3"])
    assert stop.value.code == 2 and "--num-samples and --max-concurrent would do nothing" in capsys.readouterr().err


def test_a_trial_larger_than_the_embedded_ray_fails_before_any_trial(tiny_dataset, tmp_path, monkeypatch, tune_script,
                                                                      capsys):
    import ray

    from distdiff.distributed import cluster

    shutdowns = []
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: True)  # an embedded Ray
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 1.0}}])
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset)  # 0.25 + 0.5 + 2 x 0.25 CPUs a trial
    with pytest.raises(SystemExit) as stop:
        tune_script.main(["--config", str(sweep), "--storage", str(tmp_path / "storage")])
    assert stop.value.code == 2 and shutdowns == [1]
    assert "a trial reserves 1.25 CPU for its driver, learner and rollout actors (the cluster has 1)" in \
        capsys.readouterr().err


def test_a_bundle_no_node_holds_is_a_shortfall_though_the_cluster_has_enough(tiny_dataset, tmp_path, monkeypatch):
    # A placement group's bundle is placed whole on one node: a 6-CPU learner never starts on
    # 4-CPU nodes, however many of them there are.
    import ray

    from distdiff.distributed.tuning import shortfall

    nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}] * 3 + [{"Alive": False, "Resources": {"CPU": 64.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 12.0, "GPU": 3.0})
    resources = {"driver_cpus": 0.25, "learner_cpus": 6, "learner_gpus": 1, "actor_cpus": 0.25}
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, resources=resources))
    assert shortfall(spec) == ["6 CPU and 1 GPU for its learner on one node (the nodes have at most 4 CPU and 1 GPU each)"]
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, resources={**resources, "learner_cpus": 4}))
    assert shortfall(spec) == []


def test_resume_without_a_sweep_fails_before_ray_starts(tiny_dataset, tmp_path, monkeypatch, tune_script, capsys):
    from distdiff.distributed import cluster

    def connect(*args, **kwargs):
        raise AssertionError("connected to Ray")

    monkeypatch.setattr(cluster, "connect", connect)
    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset)
    with pytest.raises(SystemExit) as stop:
        tune_script.main(["--config", str(sweep), "--storage", str(tmp_path / "storage"), "--resume"])
    assert stop.value.code == 2
    assert f"no sweep to resume at {tmp_path}/storage/sweep" in capsys.readouterr().err


def test_a_storage_uri_is_refused_not_made_a_local_directory(tune_script, capsys, tmp_path, monkeypatch):
    # pathlib reads s3://bucket/sweeps as the relative directory s3:/bucket/sweeps.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        tune_script.main(["--storage", "s3://bucket/sweeps"])
    assert stop.value.code == 2
    assert "storage URIs are not supported" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


def test_trials_read_the_base_config_where_the_sweep_starts(tiny_dataset, tmp_path):
    # A trial on another node may have no such file, or another version of it.
    base = tmp_path / "base.yaml"
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["eval"]["seed"] = 4321
    base.write_text(yaml.safe_dump(data))
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, base=str(base)))
    base.unlink()
    assert spec.trial_config({"diffusion.schedule": "linear"}).eval.seed == 4321
    # (what was read is no option of a sweep file)
    with pytest.raises(ConfigError, match="unknown sweep option 'base_yaml'"):
        load_spec(write_sweep(tmp_path / "t.yaml", tiny_dataset, base_yaml={"train": {"steps": 1}}))


def test_a_trial_driver_given_no_gpu_pretrains_on_cpu(tiny_dataset, tmp_path):
    cfg = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset)).trial_config({})
    assert cfg.train.device == "auto"
    assert on_trial_driver(cfg, []).train.device == "cpu"
    assert on_trial_driver(cfg, [0]).train.device == "auto"
    explicit = config_lib.from_dict({"train": {"device": "cuda"}}, cfg)
    assert on_trial_driver(explicit, []).train.device == "cuda"


def test_help_shows_the_defaults_and_where_the_results_go(tune_script, capsys):
    with pytest.raises(SystemExit):
        tune_script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the repo's configs/tune.yaml)" in text and "(default: runs/tune)" in text
    assert "trials.csv and best_config.yaml" in text and "STORAGE/NAME/" in text


def trial_dirs(storage: Path):
    return sorted(p for p in (storage / "sweep").glob("trial_*") if p.is_dir())


def test_sweep_is_interrupted_resumed_and_summarized(ray_session, tiny_dataset, tmp_path, subprocess_env):
    import ray

    # Three trials, one at a time: the third is not made yet when the second is interrupted, and
    # the resumed sweep makes it (a `zero:` domain's draw once came back as a placeholder then).
    sweep = write_sweep(tmp_path / "sweep.yaml", tiny_dataset,
                        space={"diffusion.schedule": {"grid": ["linear", "sigmoid", "cosine"]},
                               "guidance.scale": {"loguniform": [0.001, 1.0], "zero": 0.5}})
    storage = tmp_path / "storage"
    cmd = [sys.executable, str(ROOT / "launch" / "tune.py"), "--config", str(sweep), "--storage", str(storage),
           "--num-cpus", "2", "--address", "local"]
    # The sweep runs in its own embedded Ray, never a cluster the machine may have running:
    # hand the cores to it while it runs.
    ray.shutdown()
    proc = None
    try:
        proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: "queue.Queue[str]" = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
        reader.start()
        # Interrupt while the second trial is surely mid-run: its actors have just started phase 2
        # (max_concurrent 1, so the first trial has finished). Trial dirs on storage are no such
        # signal: Tune makes the next one as the previous trial ends, seconds before it runs.
        seen, phase2 = [], 0
        deadline = time.monotonic() + 400
        while phase2 < 2:
            assert time.monotonic() < deadline, "the second trial did not start in time"
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)[-3000:]
                continue
            seen.append(line)
            phase2 += "phase 2: online alignment" in line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, "".join(seen + list(lines.queue))[-3000:]
        reader.join(timeout=10)
        assert "sweep interrupted with 2 of 3 trial(s) unfinished" in "".join(seen + list(lines.queue))
        assert not (storage / "sweep" / "trials.csv").exists()
        # Read only now: Tune copies trial files to storage in the background, a whole file at a
        # time but not atomically, and waits only for its last copy, at exit.
        first = trial_dirs(storage)[0]
        first_results = (first / "result.json").read_text()
        first_metrics = (first / "metrics.json").read_text()
        assert len(first_results.splitlines()) == 1 and "normalized_score" in json.loads(first_metrics)
        # Its reported checkpoint carries the evaluation of it (trial_start's best_of_restored).
        (reported,) = first.glob("checkpoint_*")
        assert json.loads((reported / "evaluation.json").read_text())["updates"] == json.loads(first_results)["updates"]

        # A new sweep of the same name would add its trials to this one's.
        again = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "a sweep is already stored at" in again.stderr, again.stderr[-3000:]
        out = subprocess.run(cmd + ["--resume"], env=subprocess_env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            # A sweep left running after a failed assertion would hold both cores for the
            # rest of the session.
            proc.kill()
            proc.wait(timeout=60)
        ray.init(**SESSION_RAY)
    # The finished trial was not run again (its results carry wall-clock timestamps).
    assert (first / "result.json").read_text() == first_results
    assert (first / "metrics.json").read_text() == first_metrics
    dirs = trial_dirs(storage)
    assert len(dirs) == 3 and all((d / "metrics.json").is_file() for d in dirs)
    assert "errored" not in out.stderr

    table = (storage / "sweep" / "trials.csv").read_text().splitlines()
    # With the training seed each trial drew (the sweep sets none).
    assert table[0].startswith("trial_id,diffusion.schedule,guidance.scale,train.seed,normalized_score")
    assert len(table) == 4
    assert all(float(row.split(",")[2]) == 0.0 or 0.001 <= float(row.split(",")[2]) <= 1.0 for row in table[1:])
    # Every trial's TensorBoard events (training scalars) sit under the storage dir.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for d in dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        assert "losses/denoiser" in acc.Tags()["scalars"]
        assert "charts/episode_return" in acc.Tags()["scalars"]

    best = config_lib.load(storage / "sweep" / "best_config.yaml")
    scores = {json.loads((d / "metrics.json").read_text())["normalized_score"]: d for d in dirs}
    best_dir = scores[max(scores)]
    # README's notebook lines, as written, from where the sweep's default --storage would be.
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                 if "tune.ExperimentAnalysis" in block]
    notebook = tmp_path / "notebook"
    (notebook / "runs" / "tune").mkdir(parents=True)
    (notebook / "runs" / "tune" / "distdiff-tune").symlink_to(storage / "sweep")
    (notebook / "read.py").write_text(snippet + "print(len(analysis.trials), Path(best.path).name)\n")
    read = subprocess.run([sys.executable, "read.py"], cwd=notebook, env=subprocess_env, capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    assert read.stdout.split()[-2:] == ["3", best_dir.name]
    params = yaml.safe_load((best_dir / "params.json").read_text())
    assert best.diffusion.schedule == params["diffusion.schedule"]
    assert best.train.seed == params["train.seed"]  # the best trial as it ran

    # launch/train.py takes the best config as it is: what train() checks before any work, and
    # the data it names. (A training from it would add ~15 s of actors to the suite.)
    from distdiff.distributed import actors
    from distdiff.pretrain import load_data

    config_lib.check_trainable(best)
    assert actors.resources(best).actors_that_fit == best.online.num_actors
    assert len(load_data(best).episodes) > 0


def test_values_valid_alone_but_not_together_are_refused(tiny_dataset, tmp_path):
    # 4 diffusion steps with 8 DDIM steps: each fine with the base config, the pair never.
    space = {"diffusion.n_steps": {"choice": [4, 20]}, "planner.ddim_steps": {"choice": [3, 8]}}
    with pytest.raises(ConfigError, match="with diffusion.n_steps=4, planner.ddim_steps=8"):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, space=space))


def test_values_a_trial_could_draw_between_the_checked_ones_are_refused_before_any_trial(tiny_dataset, tmp_path):
    # A drawn config that validate refuses stopped the whole sweep, in Tune's controller, after
    # the trials before it had trained. Between a randint's bounds: an odd horizon.
    with pytest.raises(ConfigError, match="with model.horizon=9: (.|\n)*model.horizon 9 must be a multiple of 2"):
        load_spec(write_sweep(tmp_path / "r.yaml", tiny_dataset, space={"model.horizon": {"randint": [8, 16]}}))
    # A rule over three fields, which every pair of their values passes.
    space = {"model.returns_condition": {"choice": [False, True]}, "guidance.return_scale": {"choice": [1.0, 2.0]},
             "train.condition_dropout": {"choice": [0.0, 0.25]}}
    with pytest.raises(ConfigError, match="with guidance.return_scale=2.0, model.returns_condition=True, "
                                          "train.condition_dropout=0.0: (.|\n)*needs an unconditional model"):
        load_spec(write_sweep(tmp_path / "t.yaml", tiny_dataset, space=space))


def test_a_trial_config_refused_anyway_fails_its_trial_not_the_sweeps_controller(tiny_dataset, tmp_path):
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset))
    with pytest.raises(ConfigError):
        spec.trial_config({"model.horizon": 9})
    assert len(trial_resources(spec, {"model.horizon": 9}).bundles) == 2 + spec.trial_config({}).online.num_actors


@pytest.mark.parametrize("options, says", [
    # ASHA stops every trial at one max_t, taken from the base config.
    ({"scheduler": "asha", "space": {"online.env_steps": {"choice": [80, 160]}}},
     "space: online.env_steps sets a trial's budget, and asha stops every trial at one max_t"),
    ({"fixed": {**FIXED, "guidance.scale": 0.5}, "space": {"guidance.scale": {"choice": [0.0, 0.1]}}},
     "guidance.scale is both swept \\(space\\) and fixed"),
    ({"scheduler": "pbt", "max_concurrent": 2, "pbt": {"mutations": ["guidance.scale"], "perturbation_factors": 1.2}},
     "pbt.perturbation_factors must be two positive numbers"),
    ({"scheduler": "pbt", "max_concurrent": 2, "fixed": {**FIXED, "online.eval_every": 2},
      "pbt": {"mutations": ["guidance.scale"], "burn_in_period": 1000}},
     "pbt.burn_in_period \\(1000\\) is not below a trial's budget of 8"),
])
def test_scheduler_settings_that_would_stop_or_mislead_a_sweep_are_refused(options, says, tiny_dataset, tmp_path):
    if "fixed" in options:
        options = {**options, "fixed": {**options["fixed"], "data.dataset_id": tiny_dataset}}
    with pytest.raises(ConfigError, match=says):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, **options))


@pytest.mark.parametrize("dom, says", [
    ({"uniform": [0.5, 0.5]}, "low < high"),
    ({"loguniform": [0.0, 1.0]}, "loguniform needs low > 0"),
    ({"loguniform": [0.001, 1.0], "zero": 1.0}, "`zero`"),
    ({"loguniform": [0.001, 1.0], "zero": 0.0}, "`zero`"),
    ({"loguniform": [0.001, 1.0], "zero": "abc"}, r"must be a number in \(0, 1\), got 'abc'"),
    ({"loguniform": [0.001, 1.0], "zero": None}, r"must be a number in \(0, 1\), got None"),
    # Tune's randint would truncate them and draw 0, outside what was written.
    ({"randint": [0.5, 2.5]}, r"randint draws integers and needs whole-number bounds, got \[0.5, 2.5\]"),
    ({"uniform": [0.0, float("inf")]}, "low < high"),
])
def test_degenerate_domains_are_refused(dom, says, tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match=says):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, space={"guidance.scale": dom}))


@pytest.mark.parametrize("bounds", [[10, 12], [10.0, 12.0]])
def test_randint_includes_its_upper_bound(bounds, tiny_dataset, tmp_path):
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, space={"diffusion.n_steps": {"randint": bounds}}))
    assert set(param_space(spec)["diffusion.n_steps"].sample(size=300)) == {10, 11, 12}


def test_numbers_in_exponent_form_are_numbers(tiny_dataset, tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as text.
    path = tmp_path / "s.yaml"
    write_sweep(path, tiny_dataset, space={"guidance.scale": {"loguniform": [0.001, 1.0], "zero": 0.5}})
    path.write_text(path.read_text().replace("- 0.001", "- 1e-3").replace("zero: 0.5", "zero: 5e-1"))
    assert "1e-3" in path.read_text()
    spec = load_spec(path)
    assert spec.space["guidance.scale"] == {"loguniform": [1e-3, 1.0], "zero": 0.5}


def test_loguniform_draws_log_uniformly_with_and_without_zero(tiny_dataset, tmp_path):
    plain = load_spec(write_sweep(tmp_path / "a.yaml", tiny_dataset, space={"guidance.scale": {"loguniform": [0.001, 1.0]}}))
    values = param_space(plain)["guidance.scale"].sample(size=600)
    assert 0.55 < sum(v < 0.1 for v in values) / 600 < 0.8  # 2/3 below 0.1 log-uniformly, 1/10 uniformly
    zeros = load_spec(write_sweep(tmp_path / "b.yaml", tiny_dataset, space={"guidance.scale": {"loguniform": [0.001, 1.0], "zero": 0.1}}))
    values = param_space(zeros)["guidance.scale"].sample(size=600)
    nonzero = [v for v in values if v != 0.0]
    assert 0.05 < 1 - len(nonzero) / 600 < 0.16
    assert 0.55 < sum(v < 0.1 for v in nonzero) / len(nonzero) < 0.8


def test_a_swept_eval_interval_sets_the_first_rung_at_its_largest_value(tiny_dataset, tmp_path):
    space = {"online.eval_every": {"choice": [2, 4]}, "guidance.scale": {"uniform": [0.0, 1.0]}}
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.env_steps": 200}
    spec = load_spec(write_sweep(tmp_path / "a.yaml", tiny_dataset, scheduler="asha", space=space, fixed=fixed))
    assert scheduler_options(spec)["grace_period"] == 4
    with pytest.raises(ConfigError, match=r"asha.grace_period \(2\) counts learner updates"):
        load_spec(write_sweep(tmp_path / "b.yaml", tiny_dataset, scheduler="asha", asha={"grace_period": 2}, space=space,
                        fixed=fixed))


def test_the_update_budget_is_the_smaller_of_the_two():
    assert update_budget(tiny_online_config("local/unused-v0", **{"online.updates": 5, "online.env_steps": 200, "online.updates_per_env_step": 0.2})) == 5
    assert update_budget(tiny_online_config("local/unused-v0", **{"online.updates": 50, "online.env_steps": 200, "online.updates_per_env_step": 0.2})) == 40


def test_a_first_decision_at_the_last_update_is_accepted(tiny_dataset, tmp_path):
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 4}  # FIXED trials train 8 updates
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, max_concurrent=2,
                                 pbt={"mutations": ["guidance.scale"], "perturbation_interval": 8}))
    assert scheduler_options(spec)["perturbation_interval"] == 8


def test_an_empty_option_takes_its_default(tiny_dataset, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", tiny_dataset)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "seed": None, "asha": None}))
    spec = load_spec(path)
    assert spec.seed == 0 and spec.asha == {}


def test_zero_samples_are_refused(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="num_samples must be >= 1, got 0"):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, num_samples=0))


@pytest.mark.parametrize("options, says", [
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"asha": {"grace_period": "abc"}}, "asha.grace_period must be a number >= 1, got 'abc'"),
    ({"asha": {"reduction_factor": 0}}, "asha.reduction_factor must be a number > 1, got 0"),
    ({"scheduler": "pbt", "max_concurrent": 2, "pbt": {"perturbation_interval": 0}},
     "pbt.perturbation_interval must be a number > 0, got 0"),
    # A string, not a list: before, one error per character.
    ({"scheduler": "pbt", "max_concurrent": 2, "pbt": {"mutations": "guidance.scale"}},
     "pbt.mutations must be a list of the space's fields, got 'guidance.scale'$"),
])
def test_option_values_ray_would_fail_on_are_refused_with_their_name(options, says, tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match=says):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, **options))


def test_resource_fields_under_fixed_are_refused(tiny_dataset, tmp_path):
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.learner_num_gpus": 1}
    with pytest.raises(ConfigError, match="fixed: online.learner_num_gpus is set by the sweep's `resources`"):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, fixed=fixed))


def test_the_zero_of_a_zero_domain_is_checked_like_any_value(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="online.lr_scale=0.0"):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, space={"online.lr_scale": {"loguniform": [0.1, 1.0], "zero": 0.5}}))


def test_pbt_mutations_must_be_space_fields(tiny_dataset, tmp_path):
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    with pytest.raises(ConfigError, match="pbt.mutations: 'online.lr_scale' is not in the space"):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, max_concurrent=2,
                              pbt={"mutations": ["online.lr_scale"]}))


def test_pbt_explores_every_kind_of_domain_within_the_values_the_sweep_checked(tiny_dataset, tmp_path):
    # Ray's PBT multiplies a value it perturbs by 0.8 or 1.2: a choice of strings given as a
    # domain stopped the sweep ("ddim" * 1.2), and numbers went past their bounds.
    from ray.tune.schedulers.pbt import _explore

    space = {"planner.sampler": {"choice": ["ddpm", "ddim"]}, "planner.replan_every": {"grid": [2, 4]},
             "guidance.scale": {"loguniform": [0.001, 1.0], "zero": 0.3}, "online.lr_scale": {"uniform": [0.5, 1.0]},
             "planner.ddim_steps": {"randint": [2, 4]}}
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, space=space,
                                 max_concurrent=2, pbt={"mutations": list(space), "resample_probability": 0.25}))
    pbt = make_scheduler(spec, param_space(spec))
    config = {"planner.sampler": "ddim", "planner.replan_every": 4, "guidance.scale": 1.0, "online.lr_scale": 0.5,
              "planner.ddim_steps": 4}
    seen = {k: set() for k in space}
    for _ in range(300):
        config, _ = _explore(config, pbt._hyperparam_mutations, pbt._resample_probability,
                             pbt._perturbation_factors, pbt._custom_explore_fn)
        for k, v in config.items():
            seen[k].add(v)
    assert seen["planner.sampler"] == {"ddpm", "ddim"}
    assert seen["planner.replan_every"] == {2, 4}
    assert seen["planner.ddim_steps"] == {2, 3, 4}
    assert 0.0 in seen["guidance.scale"] and all(v == 0 or 0.001 <= v <= 1.0 for v in seen["guidance.scale"])
    assert min(seen["online.lr_scale"]) == 0.5 and max(seen["online.lr_scale"]) == 1.0
    assert all(0.5 <= v <= 1.0 for v in seen["online.lr_scale"])


@pytest.mark.parametrize("samples, concurrent", [(1, 2), (2, 1)])
def test_pbt_with_fewer_than_two_trials_at_once_is_refused(samples, concurrent, tiny_dataset, tmp_path, tune_script,
                                                          capsys):
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    space = {"guidance.scale": {"uniform": [0.0, 1.0]}}
    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, space=space,
                        num_samples=samples, max_concurrent=concurrent, pbt={"mutations": ["guidance.scale"]})
    with pytest.raises(ConfigError, match="pbt compares the trials that run at once, and needs at least two"):
        load_spec(sweep)
    # Nor after the command line lowers what the file asks; the command line may raise it.
    ok = write_sweep(tmp_path / "ok.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, space=space, num_samples=2,
                     max_concurrent=2, pbt={"mutations": ["guidance.scale"]})
    flag = "--num-samples" if samples == 1 else "--max-concurrent"
    with pytest.raises(SystemExit) as stop:
        tune_script.main(["--config", str(ok), "--storage", str(tmp_path / "storage"), flag, "1"])
    assert stop.value.code == 2 and "needs at least two" in capsys.readouterr().err
    # What the command line leaves out (None) stays the file's.
    if samples == 1:
        raised = load_spec(sweep, num_samples=3, max_concurrent=None)
        assert (raised.num_samples, raised.max_concurrent) == (3, 2)
    else:
        raised = load_spec(sweep, num_samples=None, max_concurrent=2)
        assert (raised.num_samples, raised.max_concurrent) == (2, 2)


def test_a_report_without_the_sweeps_metric_stops_the_trial_not_the_sweep(tiny_dataset, tmp_path):
    from distdiff.distributed.tuning import tune_metrics

    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, metric="alignment_error", mode="min",
                                 fixed={**FIXED, "data.dataset_id": tiny_dataset, "eval.measure_alignment": True}))
    metrics = {"normalized_score": 1.0, "alignment_error": 0.3, "return_mean": 40.0, "return_std": float("nan"),
               "env_steps": 80, "updates": 8, "weights_version": 3, "best": {}}
    assert tune_metrics(spec, metrics) == {k: v for k, v in metrics.items() if k not in ("return_std", "best")}
    with pytest.raises(RuntimeError, match="the evaluation at update 8 gave no alignment_error"):
        tune_metrics(spec, {**metrics, "alignment_error": float("nan")})


@pytest.fixture(scope="module")
def prior(tiny_dataset, tmp_path_factory):
    """A few pretraining steps, with nets unlike smoke.yaml's (schedule, width): what a sweep's
    `init:` names."""
    from distdiff.pretrain import pretrain

    cfg = config_lib.load(ROOT / "configs" / "smoke.yaml", {"data.dataset_id": tiny_dataset, "train.steps": 2,
                                                            "diffusion.schedule": "sigmoid", "model.dim": 16})
    return pretrain(cfg, tmp_path_factory.mktemp("prior"), quiet=True)


def test_an_init_checkpoint_is_the_trials_base_and_keeps_the_fields_that_made_its_nets(tiny_dataset, prior, tmp_path):
    space = {"guidance.scale": {"uniform": [0.0, 1.0]}, "planner.ddim_steps": {"choice": [2, 3]}}
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, base=None, init=str(prior), space=space))
    cfg = spec.trial_config({"guidance.scale": 0.5})
    assert (cfg.diffusion.schedule, cfg.model.dim, cfg.guidance.scale) == ("sigmoid", 16, 0.5)
    # A run dir names its checkpoint too, relative to the sweep file like `base:`.
    (tmp_path / "runs" / "prior").mkdir(parents=True)
    shutil.copy2(prior, tmp_path / "runs" / "prior" / prior.name)
    (tmp_path / "sweeps").mkdir()
    relative = write_sweep(tmp_path / "sweeps" / "s.yaml", tiny_dataset, base=None, init="../runs/prior", space=space)
    assert load_spec(relative).trial_config({}).model.dim == 16
    for where, extra, says in (
            ("space", {"space": {**space, "model.horizon": {"choice": [8, 16]}}},
             "with model.horizon=16: checkpoint does not fit this model config: model.horizon is 8 there, 16 here"),
            ("space", {"space": {**space, "diffusion.schedule": {"grid": ["sigmoid", "linear"]}}},
             "diffusion.schedule is 'sigmoid' there, 'linear' here"),
            # smoke.yaml's nets are not the checkpoint's
            ("base", {"base": str(ROOT / "configs" / "smoke.yaml")}, "model.dim is 16 there, 8 here"),
            ("init", {"init": str(tmp_path / "nothing.pt")}, "no checkpoint at")):
        kwargs = {"base": None, "init": str(prior), "space": space, **extra}
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_spec(write_sweep(tmp_path / f"{where}.yaml", tiny_dataset, **kwargs))


def test_a_trial_from_an_init_checkpoint_skips_pretraining_and_starts_from_its_weights(ray_session, tiny_dataset, prior,
                                                                                        tmp_path):
    from distdiff.checkpoint import load_checkpoint
    from distdiff.rundir import CHECKPOINT, PRETRAIN

    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.num_actors": 1}
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, base=None, init=str(prior), fixed=fixed,
                                 space={"guidance.scale": {"choice": [0.1]}}))
    from distdiff.distributed.tuning import PINNED, pinned_dataset, sweep_path

    pinned = pinned_dataset(spec)
    (result,) = make_tuner(spec, tmp_path / "storage", pinned=pinned).fit()
    assert result.error is None and result.metrics["updates"] == update_budget(spec.trial_config({}))
    # What the trials trained on, kept for a resume; no fallback of their own.
    assert json.loads((sweep_path(spec, tmp_path / "storage") / PINNED).read_text()) == pinned
    assert pinned == {"data.dataset_id": tiny_dataset, "data.fallback_dataset_id": ""}
    assert not (Path(result.path) / PRETRAIN).exists()
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / CHECKPOINT)
    start = load_checkpoint(prior)
    # Phase 2 keeps the nets it started from: the checkpoint's, not nets of its own pretraining.
    assert {"denoiser", "value"} <= state["prior"].keys()
    for name, weights in state["prior"].items():
        assert all(torch.equal(v, start[f"ema_{name}"][k]) for k, v in weights.items()), name


def test_failed_trials_are_retried_as_the_sweep_says(tiny_dataset, tmp_path):
    from distdiff.distributed.tuning import run_config

    assert run_config(load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset)), tmp_path).failure_config.max_failures == 0
    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, max_failures=3))
    assert run_config(spec, tmp_path).failure_config.max_failures == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="max_failures"):
            load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, max_failures=bad))


def test_a_mode_that_would_rank_the_worst_trials_first_is_refused(tiny_dataset, tmp_path):
    for metric, mode in (("normalized_score", "min"), ("return_mean", "min"), ("alignment_error", "max")):
        with pytest.raises(ConfigError, match=f"mode {mode} with metric {metric}: .* use mode"):
            load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, metric=metric, mode=mode))
    # No better end to check: either mode.
    assert load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, metric="return_std", mode="min")).mode == "min"


def test_the_closing_lines_say_how_to_train_the_best_config(tiny_dataset, prior, tmp_path, monkeypatch, tune_script,
                                                            capsys):
    import ray

    from distdiff.distributed import cluster, tuning

    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    space = {"guidance.scale": {"uniform": [0.0, 1.0]}}
    trial = ({"guidance.scale": 0.5}, {"normalized_score": 3.0, "updates": 8}, None)
    for name, extra, says, silent in (
            ("pbt", {"scheduler": "pbt", "num_samples": 2, "max_concurrent": 2, "pbt": {"mutations": ["guidance.scale"]}},
             "which a run from the start with those values does not repeat", "--init"),
            ("init", {"base": None, "init": str(prior)}, f"best_config.yaml --init {prior}", "PBT")):
        results = FakeResults(*[trial] * extra.get("num_samples", 1))
        monkeypatch.setattr(tuning, "make_tuner", lambda *args, **kwargs: SimpleNamespace(fit=lambda: results))
        sweep = write_sweep(tmp_path / f"{name}.yaml", tiny_dataset, name=name, fixed=fixed, space=space, **extra)
        (tmp_path / "storage" / name).mkdir(parents=True)  # (Tune makes it)
        if name == "pbt":  # (so does PBT, where it changed a trial's config)
            (tmp_path / "storage" / name / "pbt_policy_t0.txt").write_text("[]")
        assert tune_script.main(["--config", str(sweep), "--storage", str(tmp_path / "storage")]) == 0
        out = capsys.readouterr().out
        assert says in out and silent not in out


def test_a_sweep_with_errored_trials_writes_the_best_of_the_others_and_exits_1(tiny_dataset, tmp_path, monkeypatch,
                                                                           tune_script, capsys):
    import ray

    from distdiff.distributed import cluster, tuning

    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    results = FakeResults(({"diffusion.schedule": "linear", "guidance.scale": 0.0}, {"normalized_score": 3.0}, None),
                          ({"diffusion.schedule": "sigmoid", "guidance.scale": 0.5}, {}, "failed"))
    monkeypatch.setattr(tuning, "make_tuner", lambda *args, **kwargs: SimpleNamespace(fit=lambda: results))
    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset)
    (tmp_path / "storage" / "sweep").mkdir(parents=True)  # (Tune makes it)
    assert tune_script.main(["--config", str(sweep), "--storage", str(tmp_path / "storage")]) == 1
    out = capsys.readouterr()
    assert "train it: python launch/train.py --config" in out.out
    assert "1 of 2 trial(s) errored, and the best config is of the others" in out.err and "--resume" in out.err
    assert config_lib.load(tmp_path / "storage" / "sweep" / "best_config.yaml").diffusion.schedule == "linear"


def test_pbt_mutates_no_field_that_made_the_nets_or_the_value_target(tiny_dataset, tmp_path):
    # PBT restores a trial from another's checkpoint into the mutated config.
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    for key, dom in (("diffusion.schedule", {"choice": ["linear", "cosine"]}), ("model.dim", {"choice": [8, 16]}),
                     ("data.discount", {"uniform": [0.9, 0.99]})):
        sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, num_samples=2,
                            max_concurrent=2, space={key: dom}, pbt={"mutations": [key]})
        with pytest.raises(ConfigError, match=f"pbt.mutations: {key} made the trials' nets or what their value net"):
            load_spec(sweep)


def test_pbt_mutates_no_budget_and_no_field_that_only_pretraining_reads(tiny_dataset, tmp_path):
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    for key, dom, says in (
            # The update debt is owed over all of phase 2: x1.2 at 100k env steps owed 10,000 updates at once.
            ("online.updates_per_env_step", {"uniform": [0.1, 0.2]}, "sets a trial's budget or its updates"),
            ("train.lr_schedule", {"choice": ["constant", "cosine"]}, "acts only in pretraining, and PBT acts in "
                                                                      "phase 2")):
        sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, num_samples=2,
                            max_concurrent=2, space={key: dom}, pbt={"mutations": [key]})
        with pytest.raises(ConfigError, match=re.escape(f"pbt.mutations: {key} {says}")):
            load_spec(sweep)
    # A wall-time budget starts again with each process PBT starts for a trial.
    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", max_concurrent=2, num_samples=2,
                        fixed={**fixed, "online.wall_time_s": 600}, space={"guidance.scale": {"uniform": [0.0, 1.0]}},
                        pbt={"mutations": ["guidance.scale"]})
    with pytest.raises(ConfigError, match="online.wall_time_s counts one process's seconds"):
        load_spec(sweep)


def test_a_sweep_stored_before_its_idle_options_were_refused_resumes_with_a_warning(tiny_dataset, tmp_path, monkeypatch,
                                                                                    tune_script, capsys):
    # Its file may not change on a resume, and its trials could go on no other way.
    from ray import tune

    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2, "online.wall_time_s": 600}
    path = write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", max_concurrent=2, num_samples=2,
                       fixed=fixed, space={"guidance.scale": {"uniform": [0.0, 1.0]}},
                       pbt={"mutations": ["guidance.scale"]})
    storage = tmp_path / "storage"
    make_tuner(load_spec(path, allow_idle=True), storage)  # as an older distdiff started it
    monkeypatch.setattr(tune.Tuner, "can_restore", lambda path: True)  # (as if Tune had saved its state)

    class Started(Exception):
        pass

    def connect_job(*args, **kwargs):
        raise Started

    monkeypatch.setattr(tune_script, "connect_job", connect_job)
    with pytest.raises(Started):
        tune_script.main(["--config", str(path), "--storage", str(storage), "--resume"])
    assert "warning: online.wall_time_s counts one process's seconds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a new sweep of it is refused
        tune_script.main(["--config", str(path), "--storage", str(tmp_path / "new")])
    assert stop.value.code == 2 and "online.wall_time_s counts one process's seconds" in capsys.readouterr().err


def test_a_sweep_from_an_init_checkpoint_sweeps_no_field_that_only_pretraining_reads(tiny_dataset, prior, tmp_path):
    # Its trials skip pretraining: they would differ by their seeds alone, and best_config.yaml
    # would name a "best" pretraining field that no trial used.
    space = {"guidance.scale": {"uniform": [0.0, 1.0]}, "train.steps": {"choice": [100, 200]},
             "data.normalizer": {"choice": ["gaussian", "minmax"]}}
    with pytest.raises(ConfigError) as refused:
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, base=None, init=str(prior), space=space))
    for key in ("train.steps", "data.normalizer"):
        assert f"space: {key} acts only in pretraining, which the trials from `init` skip" in str(refused.value)


def test_a_trial_goes_on_from_what_was_restored_or_its_own_last_checkpoint(tmp_path):
    from distdiff.distributed.tuning import trial_start
    from distdiff.rundir import CHECKPOINT, PRETRAIN, REPLAY

    run_dir = tmp_path / "trial"
    assert trial_start(run_dir, None) is False and run_dir.is_dir()  # the first attempt
    (run_dir / PRETRAIN).mkdir()
    (run_dir / PRETRAIN / CHECKPOINT).write_bytes(b"phase 1")
    assert trial_start(run_dir, None) is True  # a retry of an attempt that failed in phase 1, on its node
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / CHECKPOINT).write_bytes(b"reported")
    (restored / REPLAY).write_bytes(b"replay")
    assert trial_start(run_dir, restored) is True
    assert (run_dir / CHECKPOINT).read_bytes() == b"reported" and (run_dir / REPLAY).read_bytes() == b"replay"
    # Restored from a path that is not on this node (storage on one node only): not a fresh start.
    with pytest.raises(RuntimeError, match="has no checkpoint.pt on this node .*every node mounts at the same path"):
        trial_start(run_dir, tmp_path / "on-the-head-only")


def test_a_trial_that_goes_on_from_another_trials_checkpoint_drops_its_own_best(tmp_path):
    # PBT: its best.pt was of the line it leaves, with weights of its old config.
    from distdiff.distributed.tuning import REPORTED_BY, trial_start
    from distdiff.rundir import BEST, BEST_EVAL, BEST_METRICS, CHECKPOINT

    run_dir, restored = tmp_path / "trial", tmp_path / "restored"
    restored.mkdir()
    (restored / CHECKPOINT).write_bytes(b"reported")
    for by, kept in (("mine", True), (None, True), ("other", False)):  # (None: a sweep begun before the mark)
        run_dir.mkdir(exist_ok=True)
        for name in (BEST, BEST_METRICS, BEST_EVAL):
            (run_dir / name).write_text("best so far")
        (restored / REPORTED_BY).unlink(missing_ok=True)
        if by is not None:
            (restored / REPORTED_BY).write_text(by)
        assert trial_start(run_dir, restored, "mine") is True
        assert [(run_dir / name).is_file() for name in (BEST, BEST_METRICS, BEST_EVAL)] == [kept] * 3, by


def test_a_trial_restarted_in_a_new_working_dir_keeps_a_reported_evaluation_better_than_the_stored_best(tmp_path):
    # Storage takes a trial's files only every few minutes: a sweep stopped after the evaluation
    # that beat the best, before the next copy, stored the older best.pt, and the resumed trial
    # does not evaluate its restored checkpoint again.
    from distdiff.checkpoint import load_checkpoint, save_checkpoint
    from distdiff.distributed.tuning import REPORTED_BY, REPORTED_EVALUATION, trial_start
    from distdiff.files import write_json
    from distdiff.rundir import BEST, BEST_EVAL, BEST_METRICS, CHECKPOINT

    for stored_return, restored_return, best_is in ((250.0, 300.0, 1000), (350.0, 300.0, 500), (None, 300.0, 1000)):
        restored, stored, fresh = (tmp_path / f"{stored_return}" / name for name in ("restored", "stored", "fresh"))
        restored.mkdir(parents=True)
        stored.mkdir()
        save_checkpoint(restored / CHECKPOINT, {"step": 1000, "weights": torch.ones(2)})
        (restored / REPORTED_BY).write_text("mine")
        write_json(restored / REPORTED_EVALUATION, {"return_mean": restored_return, "updates": 1000})
        save_checkpoint(stored / BEST, {"step": 500, "weights": torch.zeros(2),
                                        "best": {"return_mean": stored_return, "updates": 500}})
        write_json(stored / BEST_METRICS, {"return_mean": stored_return, "updates": 500})
        (stored / BEST_EVAL).write_text("evaluate.py's summary of the update-500 best")

        assert trial_start(fresh, restored, "mine", stored=stored) is True
        best = load_checkpoint(fresh / BEST)
        assert best["step"] == best["best"]["updates"] == best_is, stored_return
        assert json.loads((fresh / BEST_METRICS).read_text())["updates"] == best_is
        assert (fresh / BEST_EVAL).is_file() == (best_is == 500)


def test_a_trial_restarted_in_a_new_working_dir_takes_its_stored_best_and_events(tmp_path):
    # A sweep resumed in a new Ray session (or a retry on another node) starts the trial in an
    # empty working dir, which Tune syncs over the stored one: its next evaluation, better than
    # nothing, replaced the stored best.pt, and the events logged past the checkpoint stayed.
    from distdiff.distributed.tuning import REPORTED_BY, trial_start
    from distdiff.rundir import BEST, BEST_EVAL, BEST_METRICS, CHECKPOINT

    restored, stored = tmp_path / "restored", tmp_path / "storage" / "trial"
    restored.mkdir()
    stored.mkdir(parents=True)
    (restored / CHECKPOINT).write_bytes(b"reported")
    (restored / REPORTED_BY).write_text("mine")
    for name in (BEST, BEST_METRICS, BEST_EVAL, "events.out.tfevents.1.node.1.0", "metrics.json"):
        (stored / name).write_text(f"stored {name}")
    fresh = tmp_path / "fresh"
    assert trial_start(fresh, restored, "mine", stored=stored) is True
    assert sorted(p.name for p in fresh.iterdir()) == sorted(
        [CHECKPOINT, BEST, BEST_METRICS, BEST_EVAL, "events.out.tfevents.1.node.1.0"])
    assert (fresh / BEST).read_text() == f"stored {BEST}"
    # A working dir that kept its files (the same session and node) keeps its own.
    (fresh / BEST).write_text("its own")
    assert trial_start(fresh, restored, "mine", stored=stored) is True
    assert (fresh / BEST).read_text() == "its own"
    # Another trial's checkpoint (PBT): nothing of this trial's old line comes back.
    other = tmp_path / "other"
    (restored / REPORTED_BY).write_text("theirs")
    trial_start(other, restored, "mine", stored=stored)
    assert sorted(p.name for p in other.iterdir()) == [CHECKPOINT]


def test_the_dataset_is_had_once_where_the_sweep_starts_and_fixed_for_every_trial(tiny_dataset, tmp_path):
    from distdiff.data.minari_io import dataset_exists
    from distdiff.distributed.tuning import pinned_dataset

    here = load_spec(write_sweep(tmp_path / "here.yaml", tiny_dataset))
    assert pinned_dataset(here, log=pytest.fail) == {"data.dataset_id": tiny_dataset, "data.fallback_dataset_id": ""}
    # Not to be had (a remote id, not downloaded): the fallback, collected once here, is what
    # every trial trains on, with no fallback of its own left on a node that lacks it.
    fallback, remote = "local/walker2d/pinned-fallback-v0", "mujoco/walker2d/expert-v0"
    missing = load_spec(write_sweep(tmp_path / "missing.yaml", remote, fixed={
        **FIXED, "data.dataset_id": remote, "data.download": False, "data.fallback_dataset_id": fallback,
        "data.fallback_episodes": 2}))
    said = []
    assert pinned_dataset(missing, log=said.append) == {"data.dataset_id": fallback, "data.fallback_dataset_id": ""}
    assert dataset_exists(fallback)
    assert any(f"the trials train on {fallback!r}, standing in for {remote!r}" in m for m in said), said
    # A swept data field: each trial has its own dataset.
    swept = load_spec(write_sweep(tmp_path / "swept.yaml", tiny_dataset, space={"data.discount": {"grid": [0.97, 0.99]}}))
    assert pinned_dataset(swept) == {}


def test_a_resumed_sweep_keeps_the_dataset_it_started_with(tiny_dataset, tmp_path):
    from distdiff.distributed.tuning import PINNED, sweep_dataset, sweep_path

    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset))
    storage = tmp_path / "storage"
    now = {"data.dataset_id": tiny_dataset, "data.fallback_dataset_id": ""}
    assert sweep_dataset(spec, storage, resume=False, log=pytest.fail) == now
    # A sweep of a distdiff before the record: its trials go on finding their datasets themselves.
    assert sweep_dataset(spec, storage, resume=True, log=pytest.fail) == {}
    # It started offline, on the fallback: a resume goes on with that, not with what it could have now.
    started = {"data.dataset_id": "local/walker2d/pinned-fallback-v0", "data.fallback_dataset_id": ""}
    sweep_path(spec, storage).mkdir(parents=True)
    (sweep_path(spec, storage) / PINNED).write_text(json.dumps(started))
    assert sweep_dataset(spec, storage, resume=True, log=pytest.fail) == started


def test_a_sweep_with_a_quoted_exponent_number_resumes_unchanged(tiny_dataset, tmp_path, monkeypatch):
    from ray import tune

    from distdiff.distributed.tuning import check_resumable, sweep_path

    path = write_sweep(tmp_path / "s.yaml", tiny_dataset, fixed={**FIXED, "data.dataset_id": tiny_dataset,
                                                                  "train.lr": "1e-4"})
    make_tuner(load_spec(path), tmp_path / "storage")
    monkeypatch.setattr(tune.Tuner, "can_restore", lambda p: True)
    spec = load_spec(path)
    assert check_resumable(spec, tmp_path / "storage") == sweep_path(spec, tmp_path / "storage")


def test_a_sweep_recorded_when_exponent_numbers_were_text_resumes(tiny_dataset, tmp_path, monkeypatch):
    from ray import tune

    from distdiff.distributed.tuning import RECORD, check_resumable, sweep_path, sweep_record

    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, fixed={**FIXED, "data.dataset_id": tiny_dataset,
                                                                          "train.lr": 1e-4}))
    then = sweep_record(spec)
    then["fixed"]["train.lr"] = "1e-4"  # as distdiff read `1e-4` before it read YAML 1.2's floats
    sweep_path(spec, tmp_path).mkdir(parents=True)
    (sweep_path(spec, tmp_path) / RECORD).write_text(json.dumps(then))
    monkeypatch.setattr(tune.Tuner, "can_restore", lambda path: True)
    assert check_resumable(spec, tmp_path) == sweep_path(spec, tmp_path)


def test_a_trial_finds_out_at_its_start_that_the_storage_is_on_another_node(tmp_path):
    from ray.train._internal.storage import StorageContext

    from distdiff.distributed.tuning import check_storage_here

    storage = StorageContext(storage_path=str(tmp_path / "storage"), experiment_dir_name="sweep")
    check_storage_here(storage)  # where the sweep started: its marker is there
    # As a worker node sees a local path of the head: the directory and its marker are not there.
    for marker in (tmp_path / "storage" / "sweep").iterdir():
        marker.unlink()
    with pytest.raises(RuntimeError, match=f"--storage {tmp_path / 'storage'} is not on this trial's node"):
        check_storage_here(storage)


def test_a_resume_needs_the_sweep_file_base_and_init_the_sweep_started_with(tiny_dataset, prior, tmp_path,
                                                                               monkeypatch):
    from ray import tune

    from distdiff.distributed.tuning import RECORD, check_resumable, sweep_path, sweep_record

    storage = tmp_path / "storage"
    init = tmp_path / "prior.pt"
    shutil.copy2(prior, init)
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "configs" / "smoke.yaml").read_text())
    fixed = {**FIXED, "data.dataset_id": tiny_dataset}
    space = {"guidance.scale": {"uniform": [0.0, 1.0]}}

    def sweep(**extra):
        return load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, **{"fixed": fixed, "space": space, **extra}))

    make_tuner(sweep(init=str(init), base=None), storage)  # a new sweep records what it starts with
    monkeypatch.setattr(tune.Tuner, "can_restore", lambda path: True)  # (as if Tune had saved its state)
    assert check_resumable(sweep(init=str(init), base=None, num_samples=7), storage) == sweep_path(sweep(), storage)
    for changed, says in (({"init": str(init), "base": None, "fixed": {**fixed, "online.lr_scale": 0.5}}, "fixed"),
                          ({"init": str(prior), "base": None}, "init")):
        with pytest.raises(ConfigError, match=f"started from another sweep file or base config \\(changed: {says}\\)"):
            check_resumable(sweep(**changed), storage)
    torch.save({**torch.load(init, weights_only=True), "step": 10**6}, init)
    with pytest.raises(ConfigError, match="changed: the init checkpoint's contents"):
        check_resumable(sweep(init=str(init), base=None), storage)
    # A base config edited since the sweep started.
    (sweep_path(sweep(), storage) / RECORD).write_text(json.dumps(sweep_record(sweep(base=str(base)))))
    base.write_text(base.read_text().replace("eval: {episodes: 4", "eval: {episodes: 5"))
    with pytest.raises(ConfigError, match="changed: the base config"):
        check_resumable(sweep(base=str(base)), storage)


def test_the_trainable_carries_no_copy_of_the_init_checkpoint(ray_session, tiny_dataset, prior, tmp_path):
    from ray import cloudpickle

    from distdiff.distributed.tuning import make_trainable

    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, base=None, init=str(prior),
                                 space={"guidance.scale": {"uniform": [0.0, 1.0]}}))
    # Ray pickles the trainable for every trial: the checkpoint goes to the object store once.
    assert len(cloudpickle.dumps(make_trainable(spec))) < prior.stat().st_size / 4


def test_autoresume_resumes_a_stored_sweep_and_starts_one_where_none_is(tiny_dataset, tmp_path, monkeypatch, tune_script,
                                                                        capsys):
    from distdiff.distributed import cluster, tuning

    class Started(Exception):
        pass

    resumed = []

    def make_tuner(spec, storage, *, resume, pinned):
        resumed.append(resume)
        raise Started

    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(tuning, "shortfall", lambda spec: [])  # (it asks the Ray this test does not start)
    monkeypatch.setattr(tuning, "make_tuner", make_tuner)
    sweep, storage = write_sweep(tmp_path / "s.yaml", tiny_dataset), tmp_path / "storage"
    argv = ["--config", str(sweep), "--storage", str(storage), "--autoresume", "--num-samples", "2"]
    with pytest.raises(Started):
        tune_script.main(argv)
    assert resumed.pop() is False
    # What Tune restores a sweep from (Tuner.can_restore), as its first start left it.
    (storage / "sweep").mkdir(parents=True)
    (storage / "sweep" / "tuner.pkl").write_bytes(b"")
    with pytest.raises(Started):
        tune_script.main(argv)
    assert resumed.pop() is True
    assert f"--autoresume: a sweep is stored at {storage / 'sweep'}; resuming it" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        tune_script.main([*argv, "--resume"])
    assert stop.value.code == 2 and "drop --resume" in capsys.readouterr().err


def test_a_resume_judges_and_counts_the_sweep_by_the_counts_it_started_with(tiny_dataset, tmp_path, monkeypatch,
                                                                             tune_script):
    # A PBT sweep file that says max_concurrent 1, started with --max-concurrent 2: its --resume,
    # which takes no count flags, was refused for the file's 1 ("pbt ... needs at least two").
    from distdiff.distributed import cluster, tuning

    class Started(Exception):
        pass

    seen = []
    real = tuning.make_tuner

    def make_tuner(spec, storage, *, resume, pinned):
        seen.append((resume, spec.num_samples, spec.max_concurrent))
        if not resume:
            real(spec, storage, resume=False, pinned=pinned)  # (records what the sweep starts with)
        raise Started

    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(tuning, "shortfall", lambda spec: [])
    monkeypatch.setattr(tuning, "sweep_dataset", lambda spec, storage, resume: {})
    monkeypatch.setattr(tuning, "make_tuner", make_tuner)
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, num_samples=2,
                        max_concurrent=1, space={"guidance.scale": {"uniform": [0.0, 1.0]}},
                        pbt={"mutations": ["guidance.scale"]})
    storage = tmp_path / "storage"
    with pytest.raises(Started):
        tune_script.main(["--config", str(sweep), "--storage", str(storage), "--num-samples", "3",
                          "--max-concurrent", "2"])
    (storage / "sweep" / "tuner.pkl").write_bytes(b"")  # as if Tune had saved its state
    for how in (["--resume"], ["--autoresume"], ["--autoresume", "--num-samples", "9"]):
        with pytest.raises(Started):
            tune_script.main(["--config", str(sweep), "--storage", str(storage), *how])
    assert seen == [(False, 3, 2)] + [(True, 3, 2)] * 3


def test_the_best_config_of_a_sweep_that_minimizes_is_its_lowest_trial(tiny_dataset, tmp_path):
    # With metric alignment_error, best_config.yaml must be the best-aligned trial, not the worst.
    from distdiff.distributed.tuning import load_spec, summarize

    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, metric="alignment_error", mode="min"))
    (tmp_path / "storage" / "sweep").mkdir(parents=True)
    results = FakeResults(({"diffusion.schedule": "linear", "guidance.scale": 0.0}, {"alignment_error": 0.5}, None),
                          ({"diffusion.schedule": "sigmoid", "guidance.scale": 0.5}, {"alignment_error": 0.2}, None),
                          ({"diffusion.schedule": "linear", "guidance.scale": 0.1}, {"alignment_error": 0.9}, None))
    best = config_lib.load(summarize(results, spec, tmp_path / "storage")["best_config"])
    assert (best.diffusion.schedule, best.guidance.scale) == ("sigmoid", 0.5)


def test_the_best_config_and_the_trial_table_keep_the_training_seed_each_trial_drew(tiny_dataset, tmp_path):
    # param_space draws a train.seed per trial: best_config.yaml must train the winner again.
    from distdiff.distributed.tuning import load_spec, summarize

    spec = load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset))
    (tmp_path / "storage" / "sweep").mkdir(parents=True)
    results = FakeResults(
        ({"diffusion.schedule": "linear", "guidance.scale": 0.0, "train.seed": 11}, {"normalized_score": 3.0}, None),
        ({"diffusion.schedule": "sigmoid", "guidance.scale": 0.5, "train.seed": 1234}, {"normalized_score": 5.0}, None))
    out = summarize(results, spec, tmp_path / "storage")
    assert config_lib.load(out["best_config"]).train.seed == 1234
    assert "train.seed" in out["table"].read_text().splitlines()[0]


def test_a_randint_upper_bound_far_above_its_low_one_is_checked_before_any_trial(tiny_dataset, tmp_path):
    # A drawn replan_every above the horizon (8) would fail its trial an hour in.
    from distdiff.distributed.tuning import load_spec

    with pytest.raises(ConfigError, match="with planner.replan_every=20: (.|\n)*planner.replan_every must be in"):
        load_spec(write_sweep(tmp_path / "s.yaml", tiny_dataset, space={"planner.replan_every": {"randint": [1, 20]}}))


# tuning.tune_metrics: a trial reports "final" to Tune, which ran_to_the_end ranks by
# (mutant: "final" dropped from REPORTED, so a trial whose budget ended early is left out again).
def test_a_trial_reports_whether_its_evaluation_is_final():
    from distdiff.distributed.tuning import tune_metrics

    spec = SimpleNamespace(metric="normalized_score")
    assert tune_metrics(spec, {"normalized_score": 1.0, "updates": 6, "final": True})["final"] is True
    assert tune_metrics(spec, {"normalized_score": 1.0, "updates": 2, "final": False})["final"] is False


# launch/tune.py: an interrupted sweep counts the trials Tune had not made yet as unfinished
# (mutant: only the unfinished results are counted).
def test_an_interrupted_sweep_counts_the_trials_not_made_yet(tiny_dataset, tmp_path, monkeypatch, tune_script, capsys):
    import ray

    from distdiff.distributed import cluster, tuning

    class Results(list):
        num_errors = 0

    sweep = write_sweep(tmp_path / "s.yaml", tiny_dataset)  # a grid of 2, one sample each: 2 trials
    storage = tmp_path / "storage"
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    results = Results([SimpleNamespace(error=None, metrics={"done": False})])  # the second never made
    monkeypatch.setattr(tuning, "make_tuner", lambda *args, **kwargs: SimpleNamespace(fit=lambda: results))
    assert tune_script.main(["--config", str(sweep), "--storage", str(storage)]) == 130
    assert "sweep interrupted with 2 of 2 trial(s) unfinished" in capsys.readouterr().err
    # Interrupted as the first trial ended, before Tune made the second: none made is unfinished,
    # and the sweep was summarized from one trial of two, and exited 0.
    results[:] = [SimpleNamespace(error=None, metrics={"done": True})]
    assert tune_script.main(["--config", str(sweep), "--storage", str(tmp_path / "storage2")]) == 130
    assert "sweep interrupted with 1 of 2 trial(s) unfinished" in capsys.readouterr().err


def test_the_pbt_note_is_for_sweeps_whose_configs_pbt_changed(tiny_dataset, tmp_path):
    # It was printed after every PBT sweep, also one where PBT changed no trial's config (no
    # pbt_policy file), telling the user that best_config.yaml would not repeat its trial.
    fixed = {**FIXED, "data.dataset_id": tiny_dataset, "online.eval_every": 2}
    pbt = load_spec(write_sweep(tmp_path / "p.yaml", tiny_dataset, scheduler="pbt", fixed=fixed, max_concurrent=2,
                                pbt={"mutations": ["guidance.scale"]}))
    storage = tmp_path / "storage"
    (storage / pbt.name).mkdir(parents=True)
    (storage / pbt.name / "pbt_global.txt").write_text("")
    assert pbt_changes(pbt, storage) == []
    (storage / pbt.name / "pbt_policy_a1_00001.txt").write_text("[]")
    assert pbt_changes(pbt, storage) == [storage.resolve() / pbt.name / "pbt_policy_a1_00001.txt"]
    asha = load_spec(write_sweep(tmp_path / "a.yaml", tiny_dataset, scheduler="asha", fixed=fixed))
    assert pbt_changes(asha, storage) == []
