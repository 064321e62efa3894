"""Smoke runs of the launch scripts as a user runs them: separate processes, configs/smoke.yaml."""
from __future__ import annotations

import argparse
import json
import os
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List

import numpy as np
import pytest
import torch
import yaml

from _helpers import ROOT, SMOKE_CONFIG, launch_script, script_in_process
from distdiff import config
from distdiff.checkpoint import load_checkpoint
from distdiff.data.minari_io import WALKER2D_REF_MAX_SCORE, WALKER2D_REF_MIN_SCORE, dataset_exists, load_episodes
from distdiff.rollout import make_env, random_episodes
from distdiff.training import Trainer

SMOKE = "configs/smoke.yaml"
WEIGHTS = ("denoiser", "value", "ema_denoiser", "ema_value")


def run(script, *args, env, timeout=120):
    return subprocess.run([sys.executable, f"launch/{script}", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def refused(script, *args, monkeypatch, capsys) -> str:
    """What ``launch/<script>`` says on stderr as it exits with 2, run in this process: each
    subprocess cost ~2 s of imports, and the tests around run the scripts' own processes."""
    main = script_in_process(script.removesuffix(".py"), monkeypatch).main
    with pytest.raises(SystemExit) as exited:
        main(list(map(str, args)))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr[-2000:]
    return stderr


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def pretrain(run_dir, *args, env, dataset):
    # no fallback: a dataset that is not found must fail, not silently collect another one
    return run("pretrain.py", "--config", SMOKE, "--data.dataset_id", dataset, "--data.fallback_dataset_id", "",
               "--run-dir", run_dir, *args, env=env)


@pytest.fixture(scope="module")
def run30(tmp_path_factory, tiny_dataset, subprocess_env):
    run_dir = tmp_path_factory.mktemp("runs") / "pretrain30"
    proc = ok(pretrain(run_dir, "--train.steps", 30, env=subprocess_env, dataset=tiny_dataset))
    assert tiny_dataset in proc.stdout
    return run_dir


@pytest.mark.parametrize("script", ["collect.py", "pretrain.py", "evaluate.py", "train.py", "tune.py", "visualize.py"])
def test_help(script, subprocess_env):
    proc = ok(run(script, "--help", env=subprocess_env))
    assert "usage" in proc.stdout
    if script in ("pretrain.py", "train.py"):
        assert "--model.horizon" in proc.stdout and "Planning horizon" in proc.stdout  # every config field
    if script == "evaluate.py":  # the fields of how a checkpoint acts, not those of its nets
        # As options, not only in the description, which names some of them.
        assert re.search(r"^\s+--guidance\.scale ", proc.stdout, re.M)
        assert re.search(r"^\s+--online\.prior_weight ", proc.stdout, re.M)
        assert "--model.horizon" not in proc.stdout and "--train.lr " not in proc.stdout


def test_collect_random(minari_root, subprocess_env):
    proc = ok(run("collect.py", "--policy", "random", "--episodes", 3, "--max-episode-steps", 30,
                  "--dataset-id", "local/walker2d/collected-v0", "--seed", 4, env=subprocess_env))
    assert "wrote local/walker2d/collected-v0 (Walker2d-v5): 3 episodes" in proc.stdout
    data = load_episodes("local/walker2d/collected-v0", obs_dim=17, act_dim=6, env_id="Walker2d-v5")
    assert data.env_id == "Walker2d-v5"
    assert (data.ref_min_score, data.ref_max_score) == (WALKER2D_REF_MIN_SCORE, WALKER2D_REF_MAX_SCORE)
    # exactly what the seeded random policy produces in-process
    env = make_env("Walker2d-v5", 30)
    try:
        expected = random_episodes(env, 3, seed=4)
    finally:
        env.close()
    assert len(data.episodes) == 3
    for a, b in zip(data.episodes, expected):
        assert np.array_equal(a.observations, b.observations) and np.array_equal(a.actions, b.actions)
        assert (a.terminated, a.truncated) == (b.terminated, b.truncated)
    assert [ep.seed for ep in data.episodes] == [4, 5, 6]  # (their resets')


def test_collect_interrupted_says_how_far_it_got_and_writes_nothing(minari_root, monkeypatch, capsys):
    script = script_in_process("collect", monkeypatch)

    def interrupted_at_the_third(env_id, max_episode_steps, n_episodes, seed, progress):
        for episode in range(2):
            progress(episode)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "random_episodes_in", interrupted_at_the_third)
    assert script.main(["--policy", "random", "--episodes", "5", "--dataset-id", "local/walker2d/cut-v0"]) == 130
    assert ("interrupted after 2 of 5 episodes; nothing was written (the same command collects the same episodes "
            "again)") in capsys.readouterr().err
    assert not dataset_exists("local/walker2d/cut-v0")


def test_collect_interrupted_while_writing_over_a_dataset_says_it_stays(tiny_dataset, tiny_episodes, monkeypatch,
                                                                          capsys):
    # (A Ctrl-C inside the write came out as a traceback; write_episodes puts the old one back.)
    script = script_in_process("collect", monkeypatch)
    monkeypatch.setattr(script, "random_episodes_in", lambda *args, **kwargs: tiny_episodes[:2])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "write_episodes", interrupted)
    assert script.main(["--policy", "random", "--episodes", "2", "--dataset-id", tiny_dataset, "--overwrite"]) == 130
    assert (f"interrupted while writing {tiny_dataset}; nothing was written (the dataset it was to replace stays)"
            in capsys.readouterr().err)


def test_evaluate_interrupted_says_how_far_it_got_and_writes_nothing(run30, tmp_path, monkeypatch, capsys):
    script = script_in_process("evaluate", monkeypatch)

    def interrupted_at_the_second(planner, cfg, progress):
        progress(None)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "evaluate", interrupted_at_the_second)
    out = tmp_path / "eval.json"
    assert script.main(["--checkpoint", str(run30), "--episodes", "4", "--out", str(out)]) == 130
    assert "interrupted after 1 of 4 episodes; nothing was written" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_of_a_planner_with_nan_actions_fails_with_a_message_not_a_traceback(run30, tmp_path, monkeypatch,
                                                                                      capsys):
    from distdiff.rollout import NonFinitePlan

    script = script_in_process("evaluate", monkeypatch)

    def nan_plans(*args, **kwargs):
        raise NonFinitePlan("the planner returned NaN or infinite actions for 1 of 1 observations")

    monkeypatch.setattr(script, "evaluate", nan_plans)
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as stopped:
        script.main(["--checkpoint", str(run30), "--episodes", "1", "--out", str(out)])
    assert stopped.value.code == 2 and not out.exists()
    assert "NaN or infinite actions for 1 of 1 observations: this checkpoint's planner is broken" in capsys.readouterr().err


def test_evaluate_refuses_an_env_without_physics_to_replay_before_any_episode(run30, monkeypatch, capsys):
    script = script_in_process("evaluate", monkeypatch)
    monkeypatch.setattr(script.config_lib, "alignment_problem", lambda env_id: f"env.id {env_id!r} is not a MuJoCo env")
    monkeypatch.setattr(script, "evaluate", lambda *a, **kw: pytest.fail("evaluated"))
    with pytest.raises(SystemExit) as stopped:
        script.main(["--checkpoint", str(run30), "--episodes", "1"])
    assert stopped.value.code == 2
    assert "is not a MuJoCo env: pass --eval.measure_alignment false" in capsys.readouterr().err


def test_collect_refuses_an_existing_id(tiny_dataset, tiny_episodes, monkeypatch, capsys):
    stderr = refused("collect.py", "--policy", "random", "--episodes", 2, "--dataset-id", tiny_dataset,
                     monkeypatch=monkeypatch, capsys=capsys)
    assert "already exists" in stderr and "--overwrite" in stderr
    assert len(load_episodes(tiny_dataset).episodes) == len(tiny_episodes)


def test_collect_refuses_an_id_named_for_another_env_before_any_episode(minari_root, monkeypatch, capsys):
    # Walker2d episodes (the default --env) under a Hopper name: every Hopper run refused them.
    stderr = refused("collect.py", "--policy", "random", "--episodes", 2, "--dataset-id", "local/hopper/oops-v0",
                     monkeypatch=monkeypatch, capsys=capsys)
    assert ("--dataset-id local/hopper/oops-v0 names Hopper, and the episodes would be of Walker2d-v5: name it for "
            "Walker2d-v5 (e.g. local/walker2d/NAME-v0), or pass --env") in stderr
    assert not dataset_exists("local/hopper/oops-v0")


def test_collect_refuses_an_id_of_minaris_remote(minari_root, monkeypatch, capsys):
    # A config naming the remote dataset would train on these random episodes instead.
    assert "must be under local/ (e.g. local/walker2d/medium-v0)" in refused(
        "collect.py", "--policy", "random", "--episodes", 1, "--dataset-id", "mujoco/walker2d/medium-v0",
        monkeypatch=monkeypatch, capsys=capsys)
    assert not dataset_exists("mujoco/walker2d/medium-v0")


def test_collect_refuses_an_id_without_version(minari_root, monkeypatch, capsys):
    assert "-vN" in refused("collect.py", "--policy", "random", "--episodes", 1, "--dataset-id",
                            "local/walker2d/noversion", monkeypatch=monkeypatch, capsys=capsys)
    assert not dataset_exists("local/walker2d/noversion")


@pytest.mark.parametrize("flag", ["--episodes", "--max-episode-steps", "--num-envs", "--num-actors"])
def test_collect_refuses_a_count_below_one(flag, minari_root, monkeypatch, capsys):
    args = {"--episodes": 1, flag: 0}
    assert f"argument {flag}: must be >= 1, got 0" in refused(
        "collect.py", "--policy", "random", "--dataset-id", "local/walker2d/zero-v0",
        *(x for kv in args.items() for x in kv), monkeypatch=monkeypatch, capsys=capsys)
    assert not dataset_exists("local/walker2d/zero-v0")


def test_collect_on_a_cluster_address_where_nothing_listens_fails_at_once(minari_root, subprocess_env):
    proc = run("collect.py", "--policy", "random", "--episodes", 2, "--num-actors", 2, "--address", "127.0.0.1:1",
               "--dataset-id", "local/walker2d/nowhere-v0", env=subprocess_env)
    assert proc.returncode == 2 and "cannot connect to the Ray cluster at 127.0.0.1:1: nothing listens" in proc.stderr
    assert "Traceback" not in proc.stderr and not dataset_exists("local/walker2d/nowhere-v0")


def test_collect_refuses_a_checkpoint_it_cannot_plan_with_before_ray_starts(run30, tmp_path, minari_root,
                                                                              subprocess_env):
    state = load_checkpoint(run30 / "checkpoint.pt")
    state["config"]["planner"]["dynamics_candidates"] = 2  # its run trained no dynamics model
    torch.save(state, tmp_path / "unplannable.pt")
    env = {**subprocess_env, "RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens: connecting would fail
    proc = run("collect.py", "--policy", tmp_path / "unplannable.pt", "--episodes", 2, "--num-actors", 2,
               "--dataset-id", "local/walker2d/unplannable-v0", env=env)
    assert proc.returncode == 2 and "dynamics_candidates > 1 needs a checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not dataset_exists("local/walker2d/unplannable-v0")


def test_init_without_config_starts_from_the_checkpoints_config(run30, tmp_path, subprocess_env):
    # The defaults' model would not fit run30's nets (configs/smoke.yaml's sizes).
    ok(run("pretrain.py", "--init", run30, "--run-dir", tmp_path / "tuned", "--train.steps", 3, env=subprocess_env))
    tuned, prior = (load_checkpoint(d / "checkpoint.pt")["config"] for d in (tmp_path / "tuned", run30))
    assert tuned["model"] == prior["model"] and tuned["data"] == prior["data"] and tuned["train"]["steps"] == 3


def test_pretrain_writes_a_checkpoint(run30, tiny_dataset):
    state = load_checkpoint(run30 / "checkpoint.pt")
    assert state["step"] == 30
    assert state["config"]["data"]["dataset_id"] == tiny_dataset
    assert state["config"]["model"]["horizon"] == 8  # configs/smoke.yaml
    assert (run30 / "config.yaml").is_file()
    assert list(run30.glob("events.out.tfevents.*")), "TensorBoard logs"


def test_a_run_dir_that_holds_a_run_is_kept_unless_overwrite(run30, tmp_path, tiny_dataset, subprocess_env):
    again = tmp_path / "again"
    shutil.copytree(run30, again)
    before = (again / "checkpoint.pt").read_bytes()
    proc = pretrain(again, "--train.steps", 3, env=subprocess_env, dataset=tiny_dataset)
    assert proc.returncode == 2 and "holds a run already" in proc.stderr and "--overwrite" in proc.stderr
    assert (again / "checkpoint.pt").read_bytes() == before
    # --overwrite clears the old run only once the new one's inputs have loaded.
    proc = pretrain(again, "--train.steps", 3, "--overwrite", env=subprocess_env, dataset="local/walker2d/missing-v0")
    assert proc.returncode == 2 and "missing-v0" in proc.stderr
    assert (again / "checkpoint.pt").read_bytes() == before
    # --init inside the run dir that --overwrite would clear is refused before anything goes.
    proc = pretrain(again, "--train.steps", 3, "--overwrite", "--init", again, env=subprocess_env, dataset=tiny_dataset)
    assert proc.returncode == 2 and "which --overwrite would clear" in proc.stderr
    (again / "viz").mkdir()
    ok(pretrain(again, "--train.steps", 3, "--overwrite", env=subprocess_env, dataset=tiny_dataset))
    assert load_checkpoint(again / "checkpoint.pt")["step"] == 3
    assert len(list(again.glob("events.out.tfevents.*"))) == 1, "the old run's curves are gone"
    assert (again / "viz").is_dir(), "what the run did not write stays"


@pytest.mark.parametrize("args,expected", [
    (["train.py", "--num-cpus", "0"], "--num-cpus: must be >= 1"),
    # A prefix of a flag is not taken for it: --diffusion.schedul would have set the schedule.
    (["train.py", "--diffusion.schedul", "cosine"],
     "unrecognized arguments: --diffusion.schedul cosine\n  --diffusion.schedul: did you mean --diffusion.schedule?"),
    (["evaluate.py", "--checkpoint", "nowhere", "--out", "."], "--out . is a directory"),
    (["visualize.py", "--checkpoint", "nowhere", "--seed", "-1"], "--seed: must be >= 0, got -1"),
    # The encoders failed on these after all the work, leaving a half-written viz/.
    (["visualize.py", "--checkpoint", "nowhere", "--fps", "nan"], "--fps: must be in [0.01, 1000], got nan"),
    (["visualize.py", "--checkpoint", "nowhere", "--width", "abc"], "--width: expected an integer, got 'abc'"),
    (["visualize.py", "--checkpoint", "nowhere", "--dataset", "nonsense"], "--dataset 'nonsense' must look like "
                                                                           "namespace/name-vN"),
    (["collect.py", "--policy", "random", "--episodes", "1", "--dataset-id", "local/t/x-v0", "--seed", "-1"],
     "--seed: must be >= 0, got -1"),
    # torch seeds its generator with 64 bits: 2**64 failed after the checkpoint had loaded.
    (["visualize.py", "--checkpoint", "nowhere", "--seed", str(2**64)], f"--seed: must be < {2**63}, got {2**64}"),
    # Flags that made or train the nets would be ignored, or misread the checkpoint: refused.
    (["evaluate.py", "--checkpoint", "nowhere", "--train.lr", "1", "--diffusion.schedule", "linear",
      "--guidance.scale", "0.1"], "--diffusion.schedule, --train.lr: these made or trained the checkpoint's nets"),
    (["train.py", "--online.replay_capacity", "500"], "online.replay_capacity (500) must hold a whole episode"),
    # A training run's: evaluate.py ran its episodes serially, the flag taken without a word.
    (["evaluate.py", "--checkpoint", "nowhere", "--eval.num_actors", "8"],
     "--eval.num_actors sets what a training run does; its parallel rollout actors are --num-actors"),
    (["evaluate.py", "--checkpoint", "nowhere", "--num-actors", "2", "--train.num_threads", "2"],
     "--train.num_threads sets the threads of an evaluation in this process (--num-actors 1)"),
])
def test_bad_arguments_fail_before_any_work(args, expected, monkeypatch, capsys):
    # Before Ray starts too: nothing listens at this address, and connecting would fail otherwise.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.chdir(ROOT)
    stderr = refused(*args, monkeypatch=monkeypatch, capsys=capsys)
    assert expected in stderr, stderr[-2000:]


def test_train_refuses_what_its_checkpoint_cannot_do_before_ray_starts(run30, subprocess_env):
    # Nothing listens at this address: a check made after connecting would fail there instead.
    env = {**subprocess_env, "RAY_ADDRESS": "127.0.0.1:1"}
    for args, says in [
        (("--init", run30, "--model.horizon", 16), "checkpoint does not fit this model config: model.horizon is 8 "
                                                   "there, 16 here"),
        (("--init", run30, "--train.steps", 50, "--train.lr_schedule", "cosine", "--train.lr", 1e-4),
         "--train.steps, --train.lr_schedule would do nothing: --init skips phase 1 (pretraining), the only one that "
         "reads them"),
        (("--resume", run30), f"{run30} holds an offline pretraining run (launch/pretrain.py), which phase 2 does not "
                              f"continue: start phase 2 from it with --init {run30}"),
        (("--resume", run30 / "checkpoint.pt"), f"--resume takes the run's dir, not a file in it: --resume {run30}"),
        (("--resume", run30 / "nowhere"), f"--resume {run30 / 'nowhere'}: no such directory"),
    ]:
        proc = run("train.py", *args, env=env)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]
        assert "cannot connect" not in proc.stderr and "Traceback" not in proc.stderr
    proc = run("pretrain.py", "--resume", run30 / "checkpoint.pt", env=subprocess_env)
    assert proc.returncode == 2 and f"--resume takes the run's dir, not a file in it: --resume {run30}" in proc.stderr
    proc = run("pretrain.py", "--init", run30, "--data.normalizer", "minmax", env=subprocess_env)
    assert proc.returncode == 2 and "--data.normalizer would do nothing: a run from --init keeps" in proc.stderr


def test_flags_that_would_do_nothing_or_the_wrong_thing_are_refused(run30, minari_root, subprocess_env, tmp_path):
    for args, says in [
        # The planner collects in its own env: --env used to be ignored without a word.
        (("collect.py", "--policy", run30 / "checkpoint.pt", "--env", "Hopper-v5", "--episodes", 1, "--dataset-id",
          "local/walker2d/hop-v0"), "--env Hopper-v5: the checkpoint plans in Walker2d-v5, and collects there"),
        # A dataset distdiff could never train on.
        (("collect.py", "--policy", "random", "--env", "CartPole-v1", "--episodes", 1, "--dataset-id",
          "local/cartpole/random-v0"), "--env CartPole-v1: its actions are Discrete"),
        # A pretraining checkpoint is its own prior: blended with itself, it is judged unchanged.
        (("evaluate.py", "--checkpoint", run30, "--online.prior_weight", 0.5, "--episodes", 1),
         "--online.prior_weight blends a phase-2 checkpoint with the prior it started from"),
        # A return condition the checkpoint's denoiser does not have: it was judged unchanged,
        # with the flag recorded as an override.
        (("evaluate.py", "--checkpoint", run30, "--guidance.return_quantile", 0.99, "--episodes", 1),
         "--guidance.return_quantile would do nothing: it acts only with model.returns_condition true"),
    ]:
        proc = run(*args, env=subprocess_env)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]
        assert "summary:" not in proc.stdout and "wrote" not in proc.stdout
    assert not dataset_exists("local/walker2d/hop-v0") and not dataset_exists("local/cartpole/random-v0")
    # A weight of 0 blends nothing: judged as it is, as before.
    ok(run("evaluate.py", "--checkpoint", run30, "--online.prior_weight", 0, "--episodes", 1, "--env.max_episode_steps",
           20, "--out", tmp_path / "w0.json", env=subprocess_env))


def test_a_mistyped_flag_is_answered_in_a_few_lines_not_the_whole_usage(subprocess_env):
    proc = run("train.py", "--train.stepz", "3", "--no-such-flag", env=subprocess_env)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "usage: train.py [options] (see --help)",
        "train.py: error: unrecognized arguments: --train.stepz 3 --no-such-flag",
        "  --train.stepz: did you mean --train.steps?"]
    # Not a flag this script hides and refuses (evaluate.py judges a checkpoint as it was made).
    proc = run("evaluate.py", "--checkpoint", "x", "--model.horizn", "3", env=subprocess_env)
    assert proc.returncode == 2 and "did you mean" not in proc.stderr


def test_a_cluster_address_where_nothing_listens_fails_at_once(subprocess_env, tiny_dataset, tmp_path):
    # Ray itself would retry it for minutes.
    proc = run("train.py", "--config", SMOKE, "--dataset", tiny_dataset, "--run-dir", tmp_path / "run",
               "--address", "127.0.0.1:1", env=subprocess_env, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot connect to the Ray cluster at 127.0.0.1:1: nothing listens there" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_resume_continues_the_step_count_exactly(run30, tmp_path, tiny_dataset, subprocess_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    resumed = tmp_path / "resumed"
    shutil.copytree(run30, resumed)
    # As a run killed at step 40, past its checkpoint at 30, would have logged it: the resume
    # logs step 40 again, and TensorBoard must show that one only.
    with SummaryWriter(str(resumed)) as crashed:
        crashed.add_scalar("losses/denoiser", 1e6, 40)
    ok(run("pretrain.py", "--resume", resumed, "--train.steps", 40, env=subprocess_env))
    state = load_checkpoint(resumed / "checkpoint.pt")
    assert state["step"] == 40
    acc = EventAccumulator(str(resumed)).Reload()
    logged = acc.Scalars("losses/denoiser")
    # (30: the run's updates after its point at 20, logged as it ended; 40: those of the resume)
    assert [e.step for e in logged] == [20, 30, 40] and 1e6 not in [e.value for e in logged]
    # The config at the start and at the resume, with the resume's override.
    configs = acc.Tensors("config/text_summary")
    assert [e.step for e in configs] == [0, 30]
    assert "|train.steps|40|" in configs[-1].tensor_proto.string_val[0].decode()
    # 30 + 10 resumed steps are the same 40 steps as one uninterrupted run: weights, optimizer
    # moments, data sampler and torch RNG all continue where they were
    ok(pretrain(tmp_path / "straight", "--train.steps", 40, env=subprocess_env, dataset=tiny_dataset))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert straight["step"] == 40
    for name in WEIGHTS:
        for k, v in straight[name].items():
            assert torch.equal(state[name][k], v), f"{name}.{k}"
    # and it did train on from step 30: the weights moved
    first = load_checkpoint(run30 / "checkpoint.pt")
    assert any(not torch.equal(first["denoiser"][k], v) for k, v in state["denoiser"].items())


def test_pretraining_whose_updates_keep_going_non_finite_fails_with_1_not_the_refusal_2(tmp_path, tiny_dataset,
                                                                                         monkeypatch, capsys):
    # 2 says "refused before any work" (README, Exit status): a scheduler's retry logic reads it so.
    from distdiff import pretrain as pretrain_lib

    script = script_in_process("pretrain", monkeypatch)
    update = Trainer.update
    monkeypatch.setattr(pretrain_lib, "MAX_SKIPPED_IN_A_ROW", 2)
    monkeypatch.setattr(Trainer, "update", lambda self, batch: update(self, batch) if self.step < 4 else None)
    with pytest.raises(SystemExit) as stop:
        script.main(["--config", SMOKE, "--data.dataset_id", tiny_dataset, "--data.fallback_dataset_id", "",
                     "--run-dir", str(tmp_path / "run"), "--train.steps", "50", "--train.checkpoint_every", "2"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "2 non-finite updates in a row" in err, err[-2000:]
    assert f"its last checkpoint: {tmp_path / 'run' / 'checkpoint.pt'}" in err
    assert load_checkpoint(tmp_path / "run").get("step") == 4


def test_interrupted_pretrain_saves_a_resumable_checkpoint(tmp_path, tiny_dataset, subprocess_env):
    run_dir = tmp_path / "interrupted"
    args = ["--config", SMOKE, "--data.dataset_id", tiny_dataset, "--data.fallback_dataset_id", "",
            "--run-dir", run_dir, "--train.steps", 100_000, "--train.checkpoint_every", 100_000]
    proc = subprocess.Popen([sys.executable, "launch/pretrain.py", *map(str, args)], cwd=ROOT, env=subprocess_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    chunks: List[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    try:
        # Interrupted once its progress bar shows a step done: a fixed pause after it started
        # could, on a loaded machine, end before the first (slowest) step.
        deadline = time.monotonic() + 60
        while not re.search(r"\b[1-9]\d*/100000\b", "".join(chunks)) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.1)
        assert re.search(r"\b[1-9]\d*/100000\b", "".join(chunks)), "no step within 60 s: " + "".join(chunks)[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    stderr = "".join(chunks)
    assert proc.returncode == 130, stderr[-3000:]
    assert f"resume with: python launch/pretrain.py --resume {run_dir}" in stderr
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert 0 < state["step"] < 100_000
    assert Trainer.from_checkpoint(state).step == state["step"]


def test_pretrain_rejects_an_invalid_config_before_any_work(tmp_path, tiny_dataset, subprocess_env):
    run_dir = tmp_path / "never"
    proc = pretrain(run_dir, "--model.horizon", -1, "--diffusion.schedule", "bogus",
                    env=subprocess_env, dataset=tiny_dataset)
    assert proc.returncode != 0
    assert "model.horizon" in proc.stderr and "diffusion.schedule" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_pretrain_refuses_a_non_finite_value_of_its_config_file_as_train_does(tmp_path, tiny_dataset, monkeypatch,
                                                                              capsys):
    # The flags were checked, a --config file's values were not: grad_clip .nan switched
    # clipping off (nan > 0 is false) for a pretraining that train.py would have refused.
    script = script_in_process("pretrain", monkeypatch)
    monkeypatch.setattr(script, "pretrain", lambda *a, **k: pytest.fail("pretrained on a non-finite config"))
    path = tmp_path / "nan.yaml"
    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    raw["train"]["grad_clip"] = float("nan")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as stop:
        script.main(["--config", str(path), "--dataset", tiny_dataset, "--run-dir", str(tmp_path / "never")])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and "train.grad_clip must be a finite number, got nan" in err
    assert "pretraining on" not in out and not (tmp_path / "never").exists()


def test_pretrain_on_a_missing_dataset_says_how_to_make_one(tmp_path, minari_root, subprocess_env):
    proc = pretrain(tmp_path / "run", env=subprocess_env, dataset="local/walker2d/missing-v0")
    assert proc.returncode != 0
    assert "local/walker2d/missing-v0" in proc.stderr and "collect.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate(run30, subprocess_env):
    proc = ok(run("evaluate.py", "--checkpoint", run30 / "checkpoint.pt", "--episodes", 2,
                  "--env.max_episode_steps", 60, env=subprocess_env))
    summary = json.loads((run30 / "eval.json").read_text())
    assert {"return_mean", "return_std", "normalized_score", "alignment_error"} <= summary.keys()
    assert summary["episodes"] == 2 and summary["step"] == 30
    # What was judged besides the checkpoint's own config, as it was applied.
    assert summary["overrides"] == {"env.max_episode_steps": 60, "eval.episodes": 2}
    for key in ("return_mean", "return_std", "normalized_score", "alignment_error"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["return_std"] >= 0 and summary["alignment_error"] >= 0
    want = 100 * (summary["return_mean"] - WALKER2D_REF_MIN_SCORE) / (WALKER2D_REF_MAX_SCORE - WALKER2D_REF_MIN_SCORE)
    assert summary["normalized_score"] == pytest.approx(want)
    assert summary["episode_length_mean"] <= 60
    # plans start at the real state: (almost) no error at horizon step 0, float32 rounding at most
    assert summary["alignment_error_per_step"][0] < 1e-5
    assert "summary:" in proc.stdout


def test_evaluating_best_pt_keeps_its_own_summary_and_judges_it_on_other_episodes(run30, tmp_path, subprocess_env):
    shutil.copyfile(run30 / "checkpoint.pt", tmp_path / "checkpoint.pt")
    shutil.copyfile(run30 / "checkpoint.pt", tmp_path / "best.pt")
    common = ("--episodes", 1, "--env.max_episode_steps", 20)
    ok(run("evaluate.py", "--checkpoint", tmp_path, *common, env=subprocess_env))
    proc = ok(run("evaluate.py", "--checkpoint", tmp_path / "best.pt", *common, env=subprocess_env))
    # Judged on other episodes than the run's evaluations chose it on, and it says so.
    seed = load_checkpoint(run30 / "checkpoint.pt")["config"]["eval"]["seed"]
    assert f"judged on other episodes, eval.seed={seed + 1_000_000}" in proc.stderr
    judged = json.loads((tmp_path / "best.eval.json").read_text())
    assert judged["overrides"]["eval.seed"] == seed + 1_000_000
    # Neither summary overwrites the other.
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint"] == str(tmp_path)
    assert judged["checkpoint"] == str(tmp_path / "best.pt")
    proc = ok(run("evaluate.py", "--checkpoint", tmp_path / "best.pt", "--eval.seed", 1, *common, env=subprocess_env))
    assert "eval.seed" not in proc.stderr
    assert json.loads((tmp_path / "best.eval.json").read_text())["overrides"]["eval.seed"] == 1


@pytest.mark.parametrize("script", ["evaluate.py", "visualize.py"])
def test_a_mujoco_gl_whose_backend_is_missing_is_said_before_any_work(script, run30, tmp_path, subprocess_env):
    # A traceback from OpenGL at the first env made; visualize.py had written its first figure.
    out = tmp_path / "out"
    proc = run(script, "--checkpoint", run30, "--episodes", 1, "--out", out / ("eval.json" if script == "evaluate.py"
                                                                             else "viz"),
               env={**subprocess_env, "MUJOCO_GL": "nonesuch"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "MuJoCo does not import with MUJOCO_GL=nonesuch" in proc.stderr and "unset MUJOCO_GL" in proc.stderr
    assert not out.exists()


def test_evaluate_refuses_a_corrupt_checkpoint(tmp_path, subprocess_env):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    proc = run("evaluate.py", "--checkpoint", bad, "--episodes", 1, env=subprocess_env)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
    # A config file would be silently ignored: the checkpoint's own config plans.
    proc = run("evaluate.py", "--checkpoint", bad, "--config", SMOKE, env=subprocess_env)
    assert proc.returncode == 2 and "drop --config" in proc.stderr


def test_collect_with_a_checkpoint_policy(run30, minari_root, subprocess_env):
    ok(run("collect.py", "--policy", run30 / "checkpoint.pt", "--episodes", 2, "--max-episode-steps", 30,
           "--num-envs", 2, "--dataset-id", "local/walker2d/planner-v0", env=subprocess_env))
    data = load_episodes("local/walker2d/planner-v0", obs_dim=17, act_dim=6, env_id="Walker2d-v5")
    assert len(data.episodes) == 2
    for ep in data.episodes:
        assert 1 <= len(ep) <= 30
        assert ep.terminated or ep.truncated and len(ep) == 30  # whole episodes
        assert np.all(np.abs(ep.actions) <= 1.0)  # clipped to the action space
    # The checkpoint's planner acted, seeded as collect.py seeds it (--seed 0): the same episodes
    # in this process.
    from distdiff.config import from_dict
    from distdiff.rollout import run_episodes
    from distdiff.training import planner_from_checkpoint

    state = load_checkpoint(run30 / "checkpoint.pt")
    planner, cfg = planner_from_checkpoint(state), from_dict(state["config"])
    envs = [make_env("Walker2d-v5", 30) for _ in range(2)]
    try:
        generator = torch.Generator().manual_seed(0)
        expected = run_episodes(lambda obs: planner.plan(obs, generator=generator), envs, n_episodes=2,
                                execution=cfg.planner.execution, horizon=cfg.model.horizon,
                                replan_every=cfg.planner.replan_every, seed=0)
    finally:
        for env in envs:
            env.close()
    for ep, want in zip(data.episodes, expected):
        np.testing.assert_array_equal(ep.actions, want.episode.actions.astype(ep.actions.dtype))


@pytest.mark.parametrize("where", ["none", "file", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "empty RAY_AUTH_TOKEN",
                                   "explicit mode"])
def test_the_scripts_present_a_token_to_clusters_only_where_there_is_one(where, tmp_path, monkeypatch):
    # Token mode with no token refuses every cluster, a plain `ray start --head` on a fresh
    # machine included; without token mode a driver never sends the one it has.
    from distdiff.process import default_ray_auth

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(var, "")  # so that teardown puts back what was there, whatever this test sets
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))
    if where == "file":
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    elif where in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(where, "t" * 32)
    elif where == "empty RAY_AUTH_TOKEN":
        monkeypatch.setenv("RAY_AUTH_TOKEN", "")
    elif where == "explicit mode":
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    default_ray_auth()
    expected = {"none": None, "empty RAY_AUTH_TOKEN": None, "explicit mode": "disabled"}.get(where, "token")
    assert os.environ.get("RAY_AUTH_MODE") == expected


def test_a_token_file_that_cannot_serve_and_a_dashboards_address_are_said_before_ray_starts(tmp_path, monkeypatch):
    # Ray raised an AuthenticationError (the token file) or a ValueError (the address) that the
    # scripts turned into tracebacks; the token's also stopped an embedded Ray.
    import ray

    from distdiff.distributed import cluster

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("Ray started"))
    missing, empty = tmp_path / "missing.token", tmp_path / "empty.token"
    empty.write_text("\n")
    for path, why in ((missing, "which cannot be read (No such file or directory)"), (empty, "which is empty")):
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
        with pytest.raises(cluster.ClusterUnreachable, match=f"RAY_AUTH_TOKEN_PATH names {path}, {re.escape(why)}"):
            cluster.connect(address="local", log=lambda s: None)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # (no token is read then)
    assert cluster.process.token_path_problem() == ""
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")

    def unparsed(**kwargs):
        raise ValueError(f"Invalid address format: {kwargs['address']}")

    monkeypatch.setattr(ray, "init", unparsed)
    with pytest.raises(cluster.ClusterUnreachable, match="an http:// address is the dashboard's"):
        cluster.connect(address="http://127.0.0.1:8265", log=lambda s: None)


def test_rays_token_file_is_made_this_users_alone(tmp_path, monkeypatch):
    # Ray writes it with the umask's mode: another user of a shared server could read it and run
    # jobs as this one on every cluster it guards.
    from distdiff.process import keep_ray_token_private

    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("t" * 32)
    token.chmod(0o644)
    said = []
    keep_ray_token_private(said.append)
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == "t" * 32
    assert said == [f"ray: {token} was readable by other users of this machine; it is now this user's alone (0600)"]
    keep_ray_token_private(said.append)  # already private: nothing to do or say
    assert len(said) == 1
    # A team's token, linked here or named by RAY_AUTH_TOKEN_PATH, may be shared on purpose.
    team = tmp_path / "team.token"
    team.write_text("t" * 32)
    team.chmod(0o640)
    token.unlink()
    token.symlink_to(team)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(team))
    keep_ray_token_private(said.append)
    assert team.stat().st_mode & 0o777 == 0o640 and len(said) == 1


def test_progress_bars_redraw_rarely_into_a_log_file():
    # A run that lasts days under nohup or `ray job submit` would write ~25 MB a day of redraws.
    import io

    from distdiff.process import progress_bar

    log = io.StringIO()
    bar = progress_bar(total=1000, desc="online", file=log)
    now = [bar.last_print_t]
    bar._time = lambda: now[0]  # tqdm's clock: one update per simulated second
    for _ in range(300):
        now[0] += 1.0
        bar.update(1)
    draws = log.getvalue().count("\r")
    bar.close()
    assert 9 <= draws <= 12  # the first draw, then one per 30 s of the 300
    assert bar.maxinterval == 30.0  # nor does tqdm's monitor thread redraw it every 10 s


def test_train_interrupted_before_any_checkpoint_does_not_advise_a_resume(tmp_path, monkeypatch, capsys):
    from distdiff.distributed import cluster, driver

    script = launch_script("train")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. during the dataset's download, before phase 1 wrote anything

    shutdowns = []
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: True)
    monkeypatch.setattr(cluster, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(driver, "train", interrupted)
    run_dir = tmp_path / "run"
    assert script.main(["--config", str(ROOT / SMOKE), "--run-dir", str(run_dir)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; no checkpoint was written yet" and shutdowns == [1]
    # Where a checkpoint is (here, the run --overwrite was about to replace), the resume it allows.
    (run_dir / "pretrain").mkdir(parents=True)
    (run_dir / "pretrain" / "checkpoint.pt").write_bytes(b"")
    assert script.main(["--config", str(ROOT / SMOKE), "--run-dir", str(run_dir), "--overwrite"]) == 130
    assert f"interrupted; resume with: python launch/train.py --resume {run_dir}" in capsys.readouterr().err


def test_train_that_fails_says_whether_its_last_checkpoint_resumes_it(tmp_path, monkeypatch, capsys):
    import errno

    from distdiff.distributed import cluster, driver

    script = launch_script("train")
    error = [cluster.RunFailed("the learner failed: 3 updates in a row were not finite")]

    def failing(*args, **kwargs):
        raise error[0]

    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: True)
    monkeypatch.setattr(cluster, "shutdown", lambda: None)
    monkeypatch.setattr(driver, "train", failing)
    run_dir = tmp_path / "run"
    argv = ["--config", str(ROOT / SMOKE), "--run-dir", str(run_dir), "--overwrite"]
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().endswith(f"{run_dir} holds no checkpoint yet: the run must start again")
    # With one (phase 1's here), the run goes on from it: the failure left it as it was.
    (run_dir / "pretrain").mkdir(parents=True)
    (run_dir / "pretrain" / "checkpoint.pt").write_bytes(b"")
    error[0] = OSError(errno.ENOSPC, "No space left on device")  # TensorBoard's writer, metrics.json
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "No space left on device" in err
    assert f"the last checkpoint in {run_dir} is intact: python launch/train.py --resume {run_dir}" in err
    # Phase 1's updates that kept going non-finite (its learner's, in phase 2, are a RunFailed).
    from distdiff.training import NonFiniteError

    error[0] = NonFiniteError("3 non-finite updates in a row (in the last: denoiser loss); stopping with the last "
                              "good checkpoint")
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "3 non-finite updates in a row" in err
    assert f"the last checkpoint in {run_dir} is intact: python launch/train.py --resume {run_dir}" in err
    # Any other OSError is a bug to see whole.
    error[0] = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(PermissionError):
        script.main(argv)


def test_train_stopped_by_sigterm_as_it_starts_says_so_as_for_ctrl_c(tmp_path, monkeypatch, capsys):
    # A scheduler's stop while the data loads or the actors start: Ray's handler exited with 15.
    from distdiff.distributed import cluster, driver

    script = launch_script("train")

    def stopped(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "SIGTERM would end the test session"
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: True)
    monkeypatch.setattr(cluster, "shutdown", lambda: None)
    monkeypatch.setattr(driver, "train", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert script.main(["--config", str(ROOT / SMOKE), "--run-dir", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; no checkpoint was written yet"
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_launch_scripts_write_stdout_line_by_line_into_files(tmp_path):
    # A batch job's log: a warning or an evaluation shows as it happens, not 8 KB later.
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('s', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); print(sys.stdout.line_buffering)")
    for name in ("train", "pretrain", "tune", "collect", "evaluate", "visualize"):
        with open(tmp_path / "log", "w") as log:
            subprocess.run([sys.executable, "-c", code, str(ROOT / "launch" / f"{name}.py")], stdout=log, check=True)
        assert (tmp_path / "log").read_text().strip() == "True", name


def test_an_embedded_ray_offers_the_cpus_this_process_may_run_on(tmp_path, monkeypatch):
    import ray
    import ray._private.utils

    from distdiff import process
    from distdiff.distributed import cluster

    # A Slurm job of 3 CPUs on a 128-core node (as the process started: torch's OpenMP may pin
    # its main thread to one later); a container with a quota of 2 CPUs on 8.
    monkeypatch.setattr(process, "STARTED_ON", frozenset({4, 5, 6}))
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda **kwargs: 128)
    assert cluster.allotted_cpus() == 3
    monkeypatch.setattr(process, "STARTED_ON", frozenset(range(8)))
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda **kwargs: 2)
    assert cluster.allotted_cpus() == 2
    # What connect() starts an embedded Ray with: those CPUs, and a token already written.
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(
        (kwargs, (tmp_path / ".ray" / "auth_token").is_file())))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert cluster.connect(address="local", log=lambda s: None) is True
    assert started[0][0]["num_cpus"] == 2 and started[0][1]
    cluster.connect(address="local", num_cpus=5, log=lambda s: None)  # --num-cpus as given
    assert started[1][0]["num_cpus"] == 5


def test_an_embedded_ray_starts_with_a_token_written_once_and_private(tmp_path, monkeypatch):
    from distdiff.process import make_ray_token_if_none

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    make_ray_token_if_none()
    first = token.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", first) and token.stat().st_mode & 0o777 == 0o600
    assert token.parent.stat().st_mode & 0o777 == 0o700
    # Runs starting at once keep the one written first; Ray's own would each write theirs.
    make_ray_token_if_none()
    assert token.read_text() == first
    # Auth turned off, or a token given otherwise: nothing is written.
    token.unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    make_ray_token_if_none()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 64)
    make_ray_token_if_none()
    assert not token.exists()


def test_a_ctrl_c_while_ray_shuts_down_is_not_a_traceback(monkeypatch):
    import ray

    from distdiff.distributed import cluster

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "shutdown", interrupted)
    cluster.shutdown()  # the job's work is on disk by then: nothing to report


def test_a_ctrl_c_while_connecting_to_ray_is_one_line(monkeypatch, capsys):
    from distdiff import cli
    from distdiff.distributed import cluster

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # ray.init waits seconds for a cluster, or while it starts one

    monkeypatch.setattr(cluster, "connect", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.connect_job(None, None)
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted while connecting to Ray; nothing was started"

    def unreachable(*args, **kwargs):
        raise cluster.ClusterUnreachable("cannot connect to the Ray cluster at 10.0.0.1:6379: nothing listens there")

    monkeypatch.setattr(cluster, "connect", unreachable)
    with pytest.raises(SystemExit) as stop:
        cli.connect_job("10.0.0.1:6379", None)
    assert stop.value.code == 2 and "nothing listens there" in capsys.readouterr().err


def test_a_ray_job_refuses_run_dirs_in_its_temporary_copy(tmp_path, monkeypatch, capsys):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from distdiff import cli, process

    import inspect

    from ray._private.runtime_env.working_dir import WorkingDirPlugin

    assert process.RAY_JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR  # what Ray sets in a job's driver
    assert '"working_dir_files"' in inspect.getsource(WorkingDirPlugin.__init__)  # where it unpacks the copy
    monkeypatch.setenv(process.RAY_JOB_ENV, "{}")
    relative = Path("runs") / "job"
    # A job without --working-dir, or one that changed directory: the relative path is the user's.
    cli.check_run_dir(relative, overwrite=False)
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    for check in (lambda: cli.check_run_dir(relative, overwrite=False), lambda: cli.check_resume_dir(relative),
                  lambda: cli.check_outside_job_copy(relative, "--storage")):
        with pytest.raises(SystemExit) as stop:
            check()
        assert stop.value.code == 2
        assert f"{relative} is a relative path, and this Ray job runs in Ray's temporary copy" in capsys.readouterr().err
    cli.check_run_dir(tmp_path / "run", overwrite=False)  # absolute
    monkeypatch.delenv(process.RAY_JOB_ENV)
    cli.check_run_dir(relative, overwrite=False)  # outside a job


def test_a_run_dir_that_holds_files_of_a_runs_names_that_no_run_wrote_is_refused(tmp_path, capsys):
    from distdiff import cli, config
    from distdiff.rundir import check_new_run

    # A --run-dir of ~ or of a project's root: its config.yaml would be written over, and
    # --overwrite would remove it and its metrics.json.
    home = tmp_path / "home"
    home.mkdir()
    for name in ("config.yaml", "metrics.json", "notes.txt"):
        (home / name).write_text("editor: vim\n")
    for overwrite in (False, True):
        with pytest.raises(SystemExit) as stop:
            cli.check_run_dir(home, overwrite=overwrite)
        assert stop.value.code == 2
        assert (f"{home} holds no run, and config.yaml, metrics.json of something else, which the run would write over"
                in capsys.readouterr().err)
    # The library refuses it too (a notebook's train(), a script's pretrain()).
    with pytest.raises(FileExistsError, match="holds no run, and config.yaml, metrics.json of something else"):
        check_new_run(home, resume=False, overwrite=True)
    # A run that stopped before its first checkpoint (its config written), with what its user
    # keeps beside it: its log (tee, sbatch --output), its own config, the --init checkpoint.
    stopped = tmp_path / "stopped"
    (stopped / "pretrain").mkdir(parents=True)
    config.save(config.load(None), stopped / "config.yaml")
    for name in ("events.out.tfevents.1.vm.1.0", "train.log", "exp.yaml", "init.pt", "metrics.json"):
        (stopped / name).write_text("")
    (stopped / "lost+found").mkdir()
    cli.check_run_dir(stopped, overwrite=False)
    check_new_run(stopped, resume=False, overwrite=False)
    cli.check_run_dir(tmp_path / "new", overwrite=False)
    cli.check_run_dir(home / "sub", overwrite=False)
    # A project's own pretrain/ (a package, say): clear_run would remove its files too.
    project = tmp_path / "project"
    (project / "pretrain").mkdir(parents=True)
    for name in ("config.yaml", "metrics.json"):
        (project / "pretrain" / name).write_text("lr: 1\n")
    with pytest.raises(SystemExit):
        cli.check_run_dir(project, overwrite=True)
    assert "holds no run, and pretrain/config.yaml, pretrain/metrics.json of something else" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="pretrain/config.yaml, pretrain/metrics.json of something else"):
        check_new_run(project, resume=False, overwrite=True)
    # A run stopped in its phase 1, before that phase's first checkpoint: pretrain/ holds its config.
    config.save(config.load(None), project / "pretrain" / "config.yaml")
    cli.check_run_dir(project, overwrite=False)


def test_an_earlier_runs_best_pt_and_the_init_checkpoint_are_not_cleared_unasked(tmp_path, capsys):
    # Its checkpoint.pt deleted to save space, best.pt kept: no run is held, and yet --overwrite
    # cleared the --init checkpoint in it, and without --overwrite the new run wrote over it.
    from distdiff import cli, config

    run = tmp_path / "run"
    run.mkdir()
    config.save(config.load(None), run / "config.yaml")
    (run / "best.pt").write_bytes(b"weights")
    with pytest.raises(SystemExit):
        cli.check_run_dir(run, overwrite=True, keep=run / "best.pt")
    assert "--init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.check_run_dir(run, overwrite=False, keep=tmp_path / "prior.pt")
    assert "holds best.pt of an earlier run (without its checkpoint.pt)" in capsys.readouterr().err
    cli.check_run_dir(run, overwrite=True, keep=tmp_path / "prior.pt")


def test_an_output_behind_a_link_to_nothing_is_refused_before_the_work(tmp_path, capsys):
    from distdiff import cli

    (tmp_path / "runs").symlink_to(tmp_path / "purged")
    for path, directory in ((tmp_path / "runs" / "train-1", True), (tmp_path / "runs" / "eval.json", False)):
        with pytest.raises(SystemExit):
            cli.check_output(path, "--out", directory=directory)
        assert f"{tmp_path / 'runs'} is a link to {tmp_path / 'purged'}, which is not there" in capsys.readouterr().err


def test_evaluate_refuses_to_write_its_summary_over_a_checkpoint(run30, capsys):
    from distdiff import cli

    for out in (run30 / "best.pt", run30 / "checkpoint.pt", run30 / "elsewhere.pt"):
        with pytest.raises(SystemExit):
            cli.check_eval_output(out)
        assert "would write the summary over a checkpoint or a file of a run" in capsys.readouterr().err
    cli.check_eval_output(run30 / "other.eval.json")


def test_default_run_dirs_of_runs_started_in_the_same_second_differ(monkeypatch):
    from distdiff import cli

    # (A job array starts many at once, on nodes or in containers whose processes may share a
    # pid: none holds a checkpoint yet, so none would be refused.)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20261206-120000")
    names = {cli.default_run_dir("train").name for _ in range(100)}
    assert len(names) == 100 and all(re.fullmatch(r"train-20261206-120000-[0-9a-f]{6}", n) for n in names)


def test_sigterm_interrupts_work_that_has_no_checks_and_its_handler_is_given_back():
    from distdiff.process import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler runs at the next bytecode)
    assert signal.getsignal(signal.SIGTERM) == before


def _autoresume_argv(run_dir, dataset, *extra, config=ROOT / SMOKE):
    # As the run30 fixture's pretraining was started.
    return ["--autoresume", "--run-dir", str(run_dir), "--config", str(config), "--data.dataset_id", dataset,
            "--data.fallback_dataset_id", "", "--train.steps", "30", *map(str, extra)]


def _other_smoke_config(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text((ROOT / SMOKE).read_text().replace("train: {steps: 200,", "train: {steps: 200, lr: 0.001,"))
    return other


def test_pretrain_autoresume_resumes_a_run_it_started_and_starts_one_that_is_not_there(run30, tmp_path, tiny_dataset,
                                                                                      monkeypatch, capsys):
    script = script_in_process("pretrain", monkeypatch)
    calls = []
    monkeypatch.setattr(script, "pretrain", lambda cfg, run_dir, **kw: calls.append((cfg, run_dir, kw)) or run_dir)
    run_dir = tmp_path / "run"
    shutil.copytree(run30, run_dir)
    # The job requeued with the command line that started it, and fields it may change: a larger
    # budget trains it on, and the log says what the flags changed.
    assert script.main(_autoresume_argv(run_dir, tiny_dataset, "--train.checkpoint_every", 7, "--train.steps", 40)) == 0
    cfg, where, kw = calls.pop()
    assert where == run_dir and kw["resume"] and kw["init"] is None
    assert cfg.train.checkpoint_every == 7 and cfg.train.steps == 40
    out = capsys.readouterr().out
    assert f"--autoresume: {run_dir} holds a run; resuming it" in out
    assert f"note: resuming {run_dir} with this command line's changes to its config: " in out
    assert "train.steps 30 -> 40" in out and "train.checkpoint_every 100 -> 7" in out
    # Its budget done: nothing to train, nothing written, no start line.
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert script.main(_autoresume_argv(run_dir, tiny_dataset, "--train.lr", 0.001)) == 0
    out = capsys.readouterr().out
    assert not calls and f"{run_dir} has pretrained its 30 steps: nothing to train, nothing written" in out
    assert "pretraining on" not in out and {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # Where nothing is yet: the same command line starts the run.
    assert script.main(_autoresume_argv(tmp_path / "new", tiny_dataset)) == 0
    cfg, where, kw = calls.pop()
    assert where == tmp_path / "new" and not kw["resume"] and cfg.data.dataset_id == tiny_dataset
    # A config file that changed since the run started: neither the run's training nor the file's.
    with pytest.raises(SystemExit) as stop:
        script.main(_autoresume_argv(run_dir, tiny_dataset, config=_other_smoke_config(tmp_path)))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not calls
    assert f"the run in {run_dir} was started with another config" in err and "train.lr 0.0002 there, 0.001 here" in err
    assert f"python launch/pretrain.py --resume {run_dir}" in err
    for flags, expected in [([], "--autoresume needs --run-dir"), (["--run-dir", run_dir, "--overwrite"], "--overwrite"),
                            (["--resume", run_dir], "drop --resume")]:
        with pytest.raises(SystemExit) as stop:
            script.main(["--autoresume", *map(str, flags)])
        assert stop.value.code == 2 and expected in capsys.readouterr().err


def test_pretrain_refuses_a_resume_it_cannot_continue_before_its_start_line(run30, tmp_path, monkeypatch, capsys):
    from distdiff.checkpoint import save_checkpoint

    script = script_in_process("pretrain", monkeypatch)
    save_checkpoint(tmp_path / "checkpoint.pt", {"run": {"env_steps": 40}, "step": 24,
                                                 "config": config.Config().to_dict()})
    with pytest.raises(SystemExit) as stop:
        script.main(["--resume", str(tmp_path)])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and "holds a launch/train.py run" in err and "pretraining on" not in out
    # Nor nets the run did not make: another value target.
    with pytest.raises(SystemExit) as stop:
        script.main(["--resume", str(run30), "--data.value_target", "window", "--train.steps", "40"])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and "value" in err and "pretraining on" not in out


@pytest.mark.parametrize("script, flags, said", [
    ("evaluate", ["--checkpoint", "nowhere", "--guidance", "0.2", "--guidance.scale", "0.3"],
     "--guidance 0.2 and --guidance.scale 0.3 set the same field"),
    ("evaluate", ["--checkpoint", "nowhere", "--episodes", "2", "--eval.episodes", "3"],
     "--episodes 2 and --eval.episodes 3 set the same field"),
    ("train", ["--dataset", "local/a-v0", "--data.dataset_id", "local/b-v0"],
     "--dataset local/a-v0 and --data.dataset_id local/b-v0 set the same field"),
    ("train", ["--num-actors", "2", "--online.num_actors", "4"], "--num-actors 2 and --online.num_actors 4"),
    ("pretrain", ["--dataset", "local/a-v0", "--data.dataset_id", "local/b-v0"], "--dataset local/a-v0 and"),
])
def test_a_short_flag_and_its_fields_flag_given_different_values_are_refused(script, flags, said, monkeypatch, capsys):
    # argparse kept one of the two without a word: a run trained on other data than one flag said.
    with pytest.raises(SystemExit) as stop:
        script_in_process(script, monkeypatch).main(flags)
    assert stop.value.code == 2 and said in capsys.readouterr().err


def test_evaluate_takes_a_short_flag_and_its_fields_flag_that_agree(run30, tmp_path, monkeypatch):
    script = script_in_process("evaluate", monkeypatch)
    judged = []
    monkeypatch.setattr(script, "judge", lambda args, cfg, planner, bar: judged.append(cfg) or {})
    assert script.main(["--checkpoint", str(run30), "--guidance", "0.2", "--guidance.scale", "0.2", "--episodes", "2",
                        "--eval.episodes", "2", "--out", str(tmp_path / "e.json")]) == 0
    assert judged[0].guidance.scale == 0.2 and judged[0].eval.episodes == 2


@pytest.mark.parametrize("short, field, value, text", [
    ("guidance", "guidance.scale", 0.2, "0.2"), ("guidance", "guidance.scale", 0.2, "2e-1"),
    ("episodes", "eval.episodes", 3, "3"), ("num-actors", "online.num_actors", 2, "2"),
    ("dataset", "data.dataset_id", "local/a-v0", "local/a-v0")])
def test_a_short_flag_and_its_fields_flag_may_agree(short, field, value, text):
    # As the parser leaves them: the short flag typed, the field's flag as its text.
    from distdiff import cli

    args = argparse.Namespace(**{short.replace("-", "_"): value, "cfg__" + field.replace(".", "__"): text})
    cli.take_alias(args, short, field)
    assert config.field_value(field, getattr(args, "cfg__" + field.replace(".", "__"))) == value
    args = argparse.Namespace(**{short.replace("-", "_"): None, "cfg__" + field.replace(".", "__"): text})
    cli.take_alias(args, short, field)  # the short one not given: the field's stands
    assert getattr(args, "cfg__" + field.replace(".", "__")) == text


def test_an_empty_dataset_flag_is_none(monkeypatch):
    from distdiff import cli

    args = argparse.Namespace(dataset="", cfg__data__dataset_id="local/b-v0")
    cli.take_alias(args, "dataset", "data.dataset_id")
    assert args.cfg__data__dataset_id == "local/b-v0"


def test_train_autoresume_resumes_a_run_stopped_in_phase_1_and_refuses_another_config(run30, tmp_path, tiny_dataset,
                                                                                       monkeypatch, capsys):
    from distdiff.distributed import cluster, driver

    script = script_in_process("train", monkeypatch)
    calls = []
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(driver, "train", lambda cfg, run_dir, **kw: calls.append((cfg, run_dir, kw)) or {})
    run_dir = tmp_path / "run"
    (run_dir / "pretrain").mkdir(parents=True)
    shutil.copy(run30 / "checkpoint.pt", run_dir / "pretrain" / "checkpoint.pt")
    assert script.main(_autoresume_argv(run_dir, tiny_dataset)) == 0
    cfg, where, kw = calls.pop()
    assert where == run_dir and kw["resume"] and kw["init"] is None and cfg.train.steps == 30
    assert "note: resuming" not in capsys.readouterr().out  # its own config: nothing changed
    # A flag that changes the run's config (the budget of a requeued job) is said as it resumes.
    assert script.main(_autoresume_argv(run_dir, tiny_dataset, "--online.env_steps", 999)) == 0
    assert calls.pop()[0].online.env_steps == 999
    assert re.search(rf"note: resuming {run_dir} with this command line's changes to its config: "
                     r"online.env_steps \d+ -> 999\n", capsys.readouterr().out)
    with pytest.raises(SystemExit) as stop:
        script.main(_autoresume_argv(run_dir, tiny_dataset, "--num-actors", 3, config=_other_smoke_config(tmp_path)))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not calls
    # The flags are on both sides: only the file's change is named.
    assert "train.lr 0.0002 there, 0.001 here" in err and "num_actors" not in err
    assert f"python launch/train.py --resume {run_dir}" in err
    assert script.main(_autoresume_argv(tmp_path / "new", tiny_dataset)) == 0
    _, where, kw = calls.pop()
    assert where == tmp_path / "new" and not kw["resume"]


def test_overwrite_refuses_an_init_checkpoint_anywhere_inside_the_run_dir(tmp_path, capsys):
    # --overwrite clears phase 1's dir too: the prior passed as --init would be gone.
    from distdiff import cli

    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "checkpoint.pt").write_bytes(b"weights")
    with pytest.raises(SystemExit):
        cli.check_run_dir(run, overwrite=True, keep=run / "pretrain" / "checkpoint.pt")
    assert "which --overwrite would clear" in capsys.readouterr().err


def test_an_output_under_a_file_is_refused_in_words_before_the_work(tmp_path, capsys):
    # mkdir would fail on it after the whole run or evaluation.
    from distdiff import cli

    (tmp_path / "notes").write_text("")
    for path, directory in ((tmp_path / "notes" / "run", True), (tmp_path / "notes" / "eval.json", False)):
        with pytest.raises(SystemExit):
            cli.check_output(path, "--out", directory=directory)
        assert f"{tmp_path / 'notes'} is a file" in capsys.readouterr().err


def test_autoresume_refuses_overwrite_in_its_own_words(tmp_path, capsys):
    # Otherwise a requeued job with --overwrite is told to drop --resume, which it never gave.
    from distdiff import cli

    with pytest.raises(SystemExit):
        cli.check_autoresume_flags(argparse.Namespace(resume=None, run_dir=tmp_path, overwrite=True))
    assert "--autoresume continues the run in --run-dir; --overwrite would remove it" in capsys.readouterr().err


def test_autoresume_given_config_and_init_compares_with_the_config_file(tmp_path):
    # --init's config is the base only without --config: with both, the file's model is what
    # the job trains, and what a found run is compared with.
    from distdiff import cli
    from distdiff.checkpoint import save_checkpoint

    init = save_checkpoint(tmp_path / "init.pt", {"config": config.load(None).to_dict()})
    args = argparse.Namespace(config=ROOT / SMOKE, init=init, cfg__train__steps="30")
    assert cli.start_config(args) == config.load(ROOT / SMOKE, {"train.steps": 30})
    assert cli.start_config(argparse.Namespace(config=None, init=init, cfg__train__steps="30")) == \
        config.load(None, {"train.steps": 30})


# cli.take_alias: the short flag given alone must set its field (mutant: setattr dropped).
def test_a_short_flag_given_alone_sets_its_field():
    from distdiff import cli

    args = argparse.Namespace(guidance=0.2, cfg__guidance__scale=None)
    cli.take_alias(args, "guidance", "guidance.scale")
    assert args.cfg__guidance__scale == 0.2


# cli.take_alias: a field's flag that does not parse is not "the same" as the short flag's value
# (mutant: `same = True` on ConfigError silently drops --guidance.scale abc).
def test_a_short_flag_beside_an_unparseable_fields_flag_is_refused(capsys):
    from distdiff import cli

    args = argparse.Namespace(guidance=0.2, cfg__guidance__scale="abc")
    with pytest.raises(SystemExit) as stop:
        cli.take_alias(args, "guidance", "guidance.scale")
    assert stop.value.code == 2 and "set the same field" in capsys.readouterr().err


# cli.held_out_for_best: one best.pt among several checkpoints (visualize.py --compare) is enough
# to judge them all on held-out episodes (mutant: any -> all).
def test_one_best_pt_among_the_compared_checkpoints_moves_the_seed(tmp_path, capsys):
    from distdiff.cli import held_out_for_best
    from distdiff.evaluation import held_out_seed

    paths = [tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "best.pt"]
    assert held_out_for_best(paths, 7, "--seed") == held_out_seed(7) != 7
    assert "--seed" in capsys.readouterr().err
    assert held_out_for_best(paths[:1], 7, "--seed") == 7


# launch/evaluate.py judge: any --num-actors above 1 runs the episodes on Ray's actors
# (mutant: `num_actors <= 2` ran --num-actors 2 in this process, its flag ignored).
def test_evaluate_with_two_actors_runs_them_on_ray(monkeypatch):
    from distdiff.distributed import collection

    script = script_in_process("evaluate", monkeypatch)
    monkeypatch.setattr(script, "connect_job", lambda *a, **k: False)
    monkeypatch.setattr(collection, "evaluate_in_parallel",
                        lambda planner, cfg, *, num_actors, progress, log: {"num_actors": num_actors})
    monkeypatch.setattr(script, "evaluate", lambda *a, **k: pytest.fail("evaluated in this process"))
    bar = SimpleNamespace(write=print, update=lambda n=1: None, close=lambda: None)
    assert script.judge(SimpleNamespace(num_actors=2, address=None, num_cpus=None), None, None, bar) == {"num_actors": 2}


@pytest.mark.parametrize("script", ["train", "pretrain"])
def test_a_resume_from_a_damaged_checkpoint_says_how_to_go_on(script, run30, tmp_path, tiny_dataset, monkeypatch,
                                                              capsys):
    # Damaged from outside (distdiff's writes are atomic): every --autoresume of a requeued job
    # stopped on it, saying only that it could not be read.
    from distdiff.distributed import cluster, driver

    main = script_in_process(script, monkeypatch).main
    calls = []
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(driver, "train", lambda cfg, run_dir, **kw: calls.append(kw) or {})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(run30.joinpath("checkpoint.pt").read_bytes()[:5000])
    if script == "train":
        shutil.copy(run30 / "checkpoint.pt", run_dir / "best.pt")
    with pytest.raises(SystemExit) as stop:
        main(_autoresume_argv(run_dir, tiny_dataset))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not calls
    assert f"{run_dir / 'checkpoint.pt'} is not a readable distdiff checkpoint" in err
    assert "Start the run again with --overwrite in place of --resume or --autoresume" in err
    assert (f"or start phase 2 from its best evaluation's weights: --init {run_dir / 'best.pt'}" in err) \
        == (script == "train")
    if script == "train":
        # The way out it names goes: the run starts again there.
        assert main(["--config", str(ROOT / SMOKE), "--dataset", tiny_dataset, "--run-dir", str(run_dir),
                     "--overwrite"]) == 0
        assert calls.pop()["overwrite"]


# The flags README's commands give to other programs: Ray's CLI, Docker, Slurm's sbatch,
# TensorBoard, apt; and the placeholder of every config field.
OTHER_PROGRAMS_FLAGS = {"--block", "--head", "--include-dashboard", "--resources", "--temp-dir", "--generate",
                        "--runtime-env-json", "--working-dir", "--entrypoint-num-gpus", "--follow", "--build",
                        "--build-arg", "--scale", "--cpus-per-task", "--mem", "--time", "--signal", "--requeue",
                        "--open-mode", "--logdir", "--samples_per_plugin", "--no-install-recommends", "--section.field"}


def test_every_flag_readme_names_is_one_a_script_takes(monkeypatch, capsys):
    # A flag renamed in a script and not in README is a command that fails as the user copies it.
    taken = set()
    for name in ("collect", "pretrain", "evaluate", "train", "tune", "visualize"):
        main = script_in_process(name, monkeypatch).main
        with pytest.raises(SystemExit) as stop:
            main(["--help"])
        assert stop.value.code == 0
        taken |= set(re.findall(r"(?<![\w-])--[a-z][\w.-]*\w", capsys.readouterr().out))
    assert {"--num-actors", "--model.horizon", "--guidance.scale", "--compare", "--max-concurrent"} <= taken
    named = set(re.findall(r"(?<![\w-])--[a-z][\w.-]*\w", (ROOT / "README.md").read_text()))
    assert not named - taken - OTHER_PROGRAMS_FLAGS
    assert not OTHER_PROGRAMS_FLAGS - named, "no longer in README: drop them from the list"


def test_the_tensorboard_commands_readme_gives_are_ones_tensorboard_takes():
    # `--samples_per_plugin images=all` read well, and TensorBoard 2.21 refused it.
    import argparse

    from tensorboard.plugins.core.core_plugin import CorePluginLoader

    parser = argparse.ArgumentParser(exit_on_error=False)
    CorePluginLoader().define_flags(parser)
    commands = re.findall(r"`tensorboard (--[^`]*)`", (ROOT / "README.md").read_text())
    assert any("--samples_per_plugin" in c for c in commands)
    for command in commands:
        parser.parse_args(command.replace("RUN", "runs/x").split())
