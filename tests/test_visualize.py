"""Diagnostics (launch/visualize.py): Figure 1, imposing states on the simulator, the plan-vs-real
video, the report, and the script as a user runs it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import matplotlib.colors
import numpy as np
import pytest
import torch

from _helpers import ROOT, SMOKE_CONFIG, gaussian_normalizer, launch_script
from distdiff import config, plots, render
from distdiff.checkpoint import load_checkpoint
from distdiff.data.episodes import Episode
from distdiff.layout import TrajectoryLayout
from distdiff.planner import Plan
from distdiff.report import (alignment_starts, figure1_data, in_units, load_dataset, mean_error, pick_start,
                             render_report)
from distdiff.rollout import make_env
from distdiff.training import planner_from_checkpoint


def read_video(path) -> np.ndarray:
    """All frames of an MP4 or GIF, ``[T, height, width, 3]`` uint8."""
    import imageio.v2 as iio2

    reader = iio2.get_reader(path)
    try:
        return np.stack([np.asarray(f)[..., :3] for f in reader])
    finally:
        reader.close()


WIDTH, HEIGHT = 64, 48


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_dataset):
    from distdiff.pretrain import pretrain

    cfg = config.load(SMOKE_CONFIG, overrides={"data.dataset_id": tiny_dataset, "train.steps": 20})
    return pretrain(cfg, tmp_path_factory.mktemp("viz") / "run", quiet=True)


@pytest.fixture(scope="module")
def planner_cfg(tiny_ckpt):
    state = load_checkpoint(tiny_ckpt)
    cfg = config.from_dict(state["config"])
    return planner_from_checkpoint(state, cfg), cfg


def test_figure1_panels_lines_and_exact_start(planner_cfg, tiny_dataset):
    import torch

    planner, cfg = planner_cfg
    data = load_dataset(cfg)
    assert data.dataset_id == tiny_dataset
    f1 = figure1_data(planner, data.episodes, episode=3, start=2, generator=torch.Generator().manual_seed(0))
    h = cfg.model.horizon
    s0 = data.episodes[3].observations[2]
    assert f1.plan_states.shape == (h, 17) and f1.plan_actions.shape == (h, 6)
    assert np.array_equal(f1.plan_states[0], s0) and np.array_equal(f1.real_states[0], s0)  # exact conditioning
    groups = plots.state_groups(cfg.env.id, cfg.env.obs_dim)
    fig = plots.figure1(f1.plan_states, f1.plan_actions, f1.real_states, f1.real_actions, groups,
                        plots.action_group(cfg.env.id, cfg.env.act_dim))
    try:
        assert len(fig.axes) == 3  # positions, velocities, actions
        assert [len(ax.lines) for ax in fig.axes] == [2 * 8, 2 * 9, 2 * 6]  # plan + dataset per dim
        for ax, g in zip(fig.axes[:2], groups):
            plan_lines = ax.lines[0::2]
            assert [line.get_ydata()[0] for line in plan_lines] == [s0[d] for d in g.dims]  # exact, in the figure
            assert all(len(line.get_xdata()) == h for line in plan_lines)
        for ax in fig.axes:
            assert ax.get_xlabel() == "horizon step" and "raw" in ax.get_ylabel()
            assert ax.get_legend() is not None
    finally:
        plots.plt.close(fig)


def test_imposing_an_observation_reads_it_back(tiny_episodes):
    env = make_env("Walker2d-v5")
    try:
        env.reset(seed=0)
        for ep in tiny_episodes[:3]:
            for obs in ep.observations[:: max(1, len(ep) // 4)]:
                render.impose_observation(env, obs, x=1.25)
                assert np.allclose(env.unwrapped._get_obs(), obs, rtol=0, atol=1e-6)
                assert env.unwrapped.data.qpos[0] == 1.25
    finally:
        env.close()
    xs = render.integrate_x(np.array([[0.0] * 8 + [1.0] + [0.0] * 8, [0.0] * 8 + [3.0] + [0.0] * 8,
                                      [0.0] * 17]), dt=0.5, x0=2.0)
    assert np.allclose(xs, [2.0, 2.5, 4.0])


def test_the_videos_real_side_goes_on_past_a_fall_as_the_alignment_error_replays_it():
    problem = render.gl_problem(width=WIDTH, height=HEIGHT)
    if problem is not None:
        pytest.skip(f"no headless OpenGL backend here: {problem}")
    from distdiff.rollout import physics_state, replay_actions

    env = render.make_render_env("Walker2d-v5", WIDTH, HEIGHT)
    try:
        env.reset(seed=0)
        qpos, qvel = physics_state(env)
        qpos[1] = 0.5  # below the healthy height: the first step terminates
        actions = np.random.default_rng(0).uniform(-1, 1, size=(5, 6))
        frames, obs, ended = render.render_rollout(env, qpos, qvel, actions)
        replayed = replay_actions(env, qpos, qvel, np.concatenate([actions, actions[-1:]]))
    finally:
        env.close()
    assert ended == 1 and len(frames) == 6
    np.testing.assert_allclose(obs, replayed, atol=1e-9)  # (MuJoCo's solver warm start: ~1e-13)


def test_plan_vs_real_video(planner_cfg, tmp_path):
    problem = render.gl_problem(width=WIDTH, height=HEIGHT)
    if problem is not None:
        pytest.skip(f"no headless OpenGL backend here: {problem}")
    planner, cfg = planner_cfg
    start = alignment_starts(planner, cfg.env.id, [5])[0]
    h = cfg.model.horizon
    env = render.make_render_env(cfg.env.id, WIDTH, HEIGHT)
    try:
        # the plan's s_0 imposed on the simulator looks exactly like the real start state
        imposed = render.render_states(env, start.check.planned_states[:1], x0=start.qpos[0])[0]
        real, _, _ = render.render_rollout(env, start.qpos, start.qvel, start.check.planned_actions[:1])
        assert np.array_equal(imposed, real[0])
        frames = render.plan_vs_real_frames(env, start.check.planned_states, start.check.planned_actions,
                                            start.qpos, start.qvel)
    finally:
        env.close()
    assert frames.shape == (h + 1, HEIGHT, 2 * WIDTH, 3)
    for fmt in ("auto", "gif"):
        path = render.write_video(tmp_path / f"video_{fmt}", frames, fps=8, fmt=fmt)
        assert path.is_file()
        if fmt == "auto" and render.ffmpeg_available():
            assert path.suffix == ".mp4"
        video = read_video(path)
        assert video.shape == (h + 1, HEIGHT, 2 * WIDTH, 3)
        assert all(f.astype(np.float64).var() > 0 for f in video)


@pytest.fixture(scope="module")
def viz_run(tiny_ckpt, subprocess_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("viz_out")
    proc = subprocess.run([sys.executable, "launch/visualize.py", "--checkpoint", str(tiny_ckpt), "--compare",
                           str(tiny_ckpt.parent), "--out", str(out), "--episodes", "1", "--starts", "2",
                           "--width", str(WIDTH), "--height", str(HEIGHT), "--units", "normalized"],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=180)
    return proc, out


def test_script_smoke(viz_run):
    proc, out = viz_run
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    for name in ("figure1.png", "figure1.svg", "alignment.png", "alignment.svg", "report.md", "summary.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    assert "normalizes states differently" not in proc.stderr  # the same checkpoint twice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert {"diagnostics/figure1", "diagnostics/alignment"} <= set(tags["images"])
    if "No video" not in (out / "report.md").read_text():
        assert "diagnostics/plan_vs_real" in tags["images"]


def test_report_references_existing_files(viz_run):
    proc, out = viz_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert {"figure1.png", "alignment.png"} <= set(links)
    for link in links:
        assert not link.startswith("/") and (out / link).is_file(), link
    assert "normalized score" in text and "alignment error" in text
    assert text.count("| run") == 2  # the checkpoint and --compare, side by side
    if "No video" not in text:
        assert any(link.startswith("plan_vs_real.") for link in links)


def test_best_pt_beside_checkpoint_pt_gets_its_own_label_and_dir(tiny_ckpt, subprocess_env, tmp_path):
    # Two planners of one run: their diagnostics must not overwrite each other or share a label.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_ckpt, run_dir / "checkpoint.pt")
    shutil.copy(tiny_ckpt, run_dir / "best.pt")
    proc = subprocess.run([sys.executable, "launch/visualize.py", "--checkpoint", str(run_dir / "best.pt"), "--compare",
                           str(run_dir), "--episodes", "0", "--starts", "1", "--no-video"],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (run_dir / "viz-best" / "report.md").read_text()
    assert "| run/best " in report and "| run " in report
    assert not (run_dir / "viz").exists()


def test_help_and_bad_checkpoint(tmp_path, capsys):
    script = launch_script("visualize")
    help_text = script.parser().format_help()
    for flag in ("--checkpoint", "--dataset", "--episodes", "--out", "--compare", "--width", "--height", "--units"):
        assert flag in help_text
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        script.main(["--checkpoint", str(bad)])
    assert e.value.code == 2
    assert "not a readable distdiff checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        script.main(["--checkpoint", str(tmp_path / "missing")])
    assert e.value.code == 2


def test_interrupted_it_lists_the_files_it_wrote_and_writes_no_report(tiny_ckpt, tmp_path, monkeypatch, capsys):
    script = launch_script("visualize")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # during the evaluation, after the figures

    monkeypatch.setattr(script, "evaluate", interrupted)
    out = tmp_path / "viz"
    assert script.main(["--checkpoint", str(tiny_ckpt), "--out", str(out), "--episodes", "1", "--starts", "1",
                        "--no-video"]) == 130
    printed = capsys.readouterr()
    assert f"wrote {out / 'figure1.png'}" in printed.out and f"wrote {out / 'alignment.png'}" in printed.out
    assert (out / "alignment.png").is_file() and not (out / "report.md").exists()
    assert f"interrupted: report.md and summary.json not written in {out}" in printed.err


def test_each_checkpoints_numbers_are_at_its_own_step_and_a_rerun_replaces_its_events(tiny_ckpt, tmp_path,
                                                                                        tiny_dataset, capsys):
    # --compare's numbers stood at the first checkpoint's step; a rerun into the same --out (its
    # default is fixed) added its points beside the last run's, at the same steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distdiff.pretrain import pretrain

    cfg = config.load(SMOKE_CONFIG, overrides={"data.dataset_id": tiny_dataset, "train.steps": 10})
    shorter = pretrain(cfg, tmp_path / "shorter", quiet=True)
    script = launch_script("visualize")
    out = tmp_path / "viz"
    argv = ["--checkpoint", str(tiny_ckpt), "--compare", str(shorter), "--out", str(out), "--episodes", "0",
            "--starts", "1", "--no-video"]
    for _ in range(2):
        assert script.main(argv) == 0
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert f"removed the TensorBoard events of an earlier visualize.py in {out}: 1 file(s)" in capsys.readouterr().out
    acc = EventAccumulator(str(out)).Reload()
    steps = {tag.rsplit("/", 1)[1]: [e.step for e in acc.Scalars(tag)]
             for tag in acc.Tags()["scalars"] if tag.startswith("diagnostics/alignment_error_starts/")}
    assert steps == {"run": [20], "shorter": [10]}
    assert "(step 20)" in (out / "report.md").read_text()
    # A directory of other events (a run's, TensorBoard's logdir of something else) is not cleared.
    from torch.utils.tensorboard import SummaryWriter

    other = tmp_path / "other"
    with SummaryWriter(str(other)) as writer:
        writer.add_scalar("losses/denoiser", 1.0, 5)
    [events] = other.glob("events.out.tfevents.*")
    with pytest.raises(SystemExit) as stop:
        script.main([*argv[:4], "--out", str(other), *argv[6:]])
    assert stop.value.code == 2 and events.is_file()
    assert f"holds TensorBoard events of something else than visualize.py ({events.name})" in capsys.readouterr().err
    # Nor are bytes that are no event file, under an event file's name.
    events.write_bytes(b"not a record at all, but a user's file" * 3)
    with pytest.raises(SystemExit) as stop:
        script.main([*argv[:4], "--out", str(other), *argv[6:]])
    assert stop.value.code == 2 and events.is_file()


def test_the_reports_mean_error_averages_per_step_means_like_the_figures():
    # A start with no error past step 0 (NaN: not measured): per-step means 0, 1, 2; over the steps after the exact
    # start, 1.5, where pooling every finite entry past it (1, 2) would give the same only by luck
    # and with (0, 1, 2, 0) all in, 0.75.
    assert mean_error(np.array([[0.0, 1.0, 2.0], [0.0, np.nan, np.nan]])) == pytest.approx(1.5)
    assert mean_error(np.array([[0.0, 1.0, 3.0], [0.0, 2.0, np.nan]])) == pytest.approx((1.5 + 3.0) / 2)
    assert mean_error(np.full((2, 3), np.nan)) is None


def test_a_best_pt_is_judged_on_other_episodes_than_those_that_chose_it(tiny_ckpt, tmp_path, monkeypatch, capsys):
    # As evaluate.py judges it: on the seeds that chose it, it looks better than it is.
    import shutil

    script = launch_script("visualize")
    seeds = []

    def evaluate(planner, cfg, *, episodes, seed, **kwargs):
        seeds.append(seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "evaluate", evaluate)
    best = tmp_path / "run" / "best.pt"
    best.parent.mkdir()
    shutil.copy(tiny_ckpt, best)
    own = load_checkpoint(tiny_ckpt)["config"]["eval"]["seed"]
    assert script.main(["--checkpoint", str(tiny_ckpt), "--compare", str(best), "--out", str(tmp_path / "viz"),
                        "--episodes", "1", "--starts", "1", "--no-video"]) == 130
    assert seeds == [own + 1_000_000]
    assert (f"note: best.pt was chosen by the run's evaluations on eval.seed={own}; it is judged on other episodes, "
            f"seed={own + 1_000_000} (--seed for others)") in capsys.readouterr().err
    # A seed given is the one used.
    seeds.clear()
    assert script.main(["--checkpoint", str(best), "--out", str(tmp_path / "viz2"), "--seed", "7",
                        "--episodes", "1", "--starts", "1", "--no-video"]) == 130
    assert seeds == [7] and "note:" not in capsys.readouterr().err
    # With no episodes evaluated too: its alignment starts (and video) are of those episodes.
    starts = []

    def alignment_starts(planner, env_id, seeds, **kwargs):
        starts.append(seeds)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "alignment_starts", alignment_starts)
    assert script.main(["--checkpoint", str(best), "--out", str(tmp_path / "viz3"), "--episodes", "0", "--starts", "1",
                        "--no-video"]) == 130
    assert starts == [[own + 1_000_000]] and "note: best.pt was chosen" in capsys.readouterr().err


def test_compare_notices_checkpoints_scored_against_other_reference_returns(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import torch as torch_lib

    script = launch_script("visualize")

    def evaluate(*args, **kwargs):  # (stops the script once the warnings are out)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "evaluate", evaluate)
    state = load_checkpoint(tiny_ckpt)
    state["config"]["eval"]["reference_returns"] = [-5.0, 360.0]
    other = tmp_path / "other.pt"
    torch_lib.save(state, other)
    args = ["--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "viz"), "--episodes", "1", "--starts", "1",
            "--no-video"]
    assert script.main([*args, "--compare", str(other)]) == 130
    assert ("scores against reference returns [-5.0, 360.0], --checkpoint against reference returns "
            "[1.629008, 4592.3]" in capsys.readouterr().err)
    assert script.main([*args, "--compare", str(tiny_ckpt)]) == 130
    assert "reference returns" not in capsys.readouterr().err


def test_compare_notices_checkpoints_that_normalize_states_differently(tiny_ckpt):
    # Alignment errors are in each checkpoint's own normalized units.
    script = launch_script("visualize")
    mine = load_checkpoint(tiny_ckpt)["normalizer"]
    assert script._same_normalizer(mine, {k: v.clone() if hasattr(v, "clone") else v for k, v in mine.items()})
    assert not script._same_normalizer(mine, {**mine, "scale": mine["scale"] * 2})


def test_figure1_shows_the_datasets_own_actions_from_the_start_state():
    ep = Episode(np.arange(11.0)[:, None].repeat(17, 1), np.arange(10.0)[:, None].repeat(6, 1), np.zeros(10), False, True)
    planner = SimpleNamespace(diffusion=SimpleNamespace(horizon=4),
                              plan=lambda s0, generator=None: Plan(np.zeros((1, 4, 17)), np.zeros((1, 4, 6)), None, torch.zeros(0)))
    f1 = figure1_data(planner, [ep], episode=0, start=3)
    np.testing.assert_array_equal(f1.real_states[:, 0], [3, 4, 5, 6])
    np.testing.assert_array_equal(f1.real_actions[:, 0], [3, 4, 5, 6])


def test_pick_start_defaults_to_the_middle_of_the_first_full_episode():
    def ep(n):
        return Episode(np.zeros((n + 1, 1)), np.zeros((n, 1)), np.zeros(n), False, True)
    assert pick_start([ep(3), ep(4), ep(20)], horizon=4) == (1, 0)
    assert pick_start([ep(20)], horizon=4) == (0, 8)
    # Only starts with a horizon of data after them: the last is 20 - 4 (the audit's 870 of 871
    # drew two states and no action); an episode shorter than the horizon has its first alone.
    assert pick_start([ep(20)], horizon=4, episode=0, start=16) == (0, 16)
    with pytest.raises(ValueError, match="episode 0 has 20 steps, so starts 0 to 16 leave a horizon"):
        pick_start([ep(20)], horizon=4, episode=0, start=17)
    assert pick_start([ep(3)], horizon=4, episode=0, start=0) == (0, 0)
    with pytest.raises(ValueError, match="starts 0 to 0"):
        pick_start([ep(3)], horizon=4, episode=0, start=1)


def test_alignment_starts_replays_each_starts_own_actions():
    def plan(obs, generator=None):
        n = len(obs)
        actions = np.zeros((n, 4, 6))
        actions[1] = 1.0  # the second start pushes, the first holds still
        return Plan(np.repeat(obs[:, None], 4, axis=1), actions, None, torch.zeros(0))

    planner = SimpleNamespace(plan=plan, state_normalizer=gaussian_normalizer(17))
    starts = alignment_starts(planner, "Walker2d-v5", [5, 6])
    env = make_env("Walker2d-v5")
    try:
        for s, a in zip(starts, (0.0, 1.0)):
            env.reset(seed=s.seed)
            expected = env.step(np.full(6, a))[0]
            np.testing.assert_allclose(s.check.reached_states[1], expected, atol=1e-9)
    finally:
        env.close()


def test_normalized_units_normalize_the_actions_too():
    layout = TrajectoryLayout(obs_dim=2, act_dim=1)
    planner = SimpleNamespace(layout=layout, normalizer=gaussian_normalizer(3, shift=1.0, scale=2.0))
    s, a = in_units(planner, np.full((2, 2), 3.0), np.full((2, 1), 5.0), "normalized")
    np.testing.assert_allclose(s, 1.0)
    np.testing.assert_allclose(a, 2.0)


def test_the_plan_vs_real_figure_names_the_walkers_height_angle_and_speed():
    from distdiff.rollout import PlanCheck

    dims, actions = plots.plan_vs_real_dims("Walker2d-v5", 17, 6)
    assert dims[:3] == [(0, "torso z"), (1, "torso angle"), (8, "ẋ")] and actions[0] == "thigh R"
    planned = np.zeros((8, 17))
    planned[:, 8] = 1.0  # a plan to walk at 1 m/s ...
    check = PlanCheck(planned, np.zeros((8, 6)), np.zeros((8, 17)))  # ... whose actions stood still
    fig = plots.plan_vs_real_figure(check, dims, actions, "a title")
    assert [ax.get_title() for ax in fig.axes[:3]] == ["torso z", "torso angle", "ẋ"]
    planned_line, reached_line = fig.axes[2].get_lines()
    assert set(planned_line.get_ydata()) == {1.0} and set(reached_line.get_ydata()) == {0.0}
    assert fig.axes[6].get_title() == "action: thigh R" and fig._suptitle.get_text() == "a title"
    # Another env whose observation is not qpos[1:] + qvel: its first dims, unnamed; its actions
    # by its actuators.
    dims, actions = plots.plan_vs_real_dims("Swimmer-v5", 8, 2)
    assert dims == [(d, f"state[{d}]") for d in range(6)] and actions == ["motor1_rot", "motor2_rot"]
    assert plots.action_group("Other-v0", 2).names == ["a[0]", "a[1]"]  # (an env not made here)


def test_other_locomotion_envs_are_drawn_by_their_joints_positions_apart_from_velocities():
    # Hopper's and HalfCheetah's states shared one panel of a 10-color cycle (s[10] in s[0]'s
    # color), and the plan-vs-real figure showed HalfCheetah's first six positions, no speed.
    dims, _ = plots.plan_vs_real_dims("HalfCheetah-v5", 17, 6)
    assert dims[:3] == [(0, "rootz"), (1, "rooty"), (8, "rootx vel")]
    positions, velocities = plots.state_groups("Hopper-v5", 11)
    assert positions.dims == list(range(5)) and velocities.dims == list(range(5, 11))
    assert positions.names[:2] == ["rootz", "rooty"] and velocities.names[0] == "rootx vel"
    # Hopper's actuators have no names: the joints they drive name them.
    assert plots.action_group("Hopper-v5", 3).names == ["thigh_joint", "leg_joint", "foot_joint"]
    many = plots.state_groups("Other-v0", 17)[0]
    fig, ax = plots.plt.subplots()
    try:
        plots._pair_panel(ax, many, np.zeros((3, 17)), np.zeros((3, 17)), units="raw", title="", labels=("a", "b"),
                          fontsize=9)
        colors = {tuple(matplotlib.colors.to_rgba(line.get_color())) for line in ax.lines}
        assert len(colors) == 17
    finally:
        plots.plt.close(fig)



def _legend(ax):
    return {t.get_text(): h.get_linestyle() for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}


def test_the_plan_vs_real_figures_bottom_row_shows_the_planned_actions():
    from distdiff.rollout import PlanCheck

    dims, names = plots.plan_vs_real_dims("Walker2d-v5", 17, 6)
    actions = np.tile(np.arange(6.0), (8, 1)) + 10.0
    fig = plots.plan_vs_real_figure(PlanCheck(np.zeros((8, 17)), actions, np.ones((8, 17))), dims, names)
    try:
        for d in range(6):
            (line,) = fig.axes[6 + d].get_lines()
            assert set(line.get_ydata()) == {10.0 + d}
    finally:
        plots.plt.close(fig)


def test_figure1_draws_the_dataset_dashed_and_the_legend_says_which_is_which():
    # Solid: the plan, dashed: the dataset (which may be shorter); the legend must say the same,
    # or a reader compares the wrong curves.
    groups = plots.state_groups("Other-v0", 2)
    plan_s, real_s = np.zeros((4, 2)), np.ones((3, 2))
    fig = plots.figure1(plan_s, np.zeros((4, 1)), real_s, np.full((3, 1), 2.0), groups, plots.action_group("Other-v0", 1))
    try:
        ax = fig.axes[0]
        plan_lines, real_lines = ax.lines[0::2], ax.lines[1::2]
        assert all(set(line.get_ydata()) == {0.0} and line.get_linestyle() == "-" for line in plan_lines)
        assert all(set(line.get_ydata()) == {1.0} and line.get_linestyle() == "--" for line in real_lines)
        legend = _legend(ax)
        assert legend["plan (sampled)"] == "-" and legend["dataset (real)"] == "--"
        assert set(fig.axes[1].lines[1].get_ydata()) == {2.0}
    finally:
        plots.plt.close(fig)


def test_the_alignment_figure_shows_reached_states_and_the_mean_error_over_starts():
    groups = plots.state_groups("Other-v0", 2)
    errors = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, np.nan]])
    run = plots.AlignmentRun("run", np.zeros((3, 2)), np.full((3, 2), 5.0), errors)
    fig = plots.alignment_figure([run], groups)
    try:
        top, bottom = fig.axes[0], fig.axes[-1]
        assert set(top.lines[1].get_ydata()) == {5.0} and top.lines[1].get_linestyle() == "--"
        assert _legend(top)["reached (executing the plan)"] == "--"
        mean_line = bottom.lines[-1]
        np.testing.assert_allclose(mean_line.get_ydata(), [0.0, 2.0, 2.0])  # per step over starts, NaN left out
        assert bottom.get_legend().get_texts()[0].get_text() == "run (mean 2.000; thin: each start)"
    finally:
        plots.plt.close(fig)


def test_the_alignment_figures_checkpoints_are_told_apart_without_colour_and_not_by_the_dimensions_colours():
    # Greyscale, or a reader who does not tell red from green: markers and dashes; and not C0, C1,
    # which name the state dimensions in the panels above.
    groups = plots.state_groups("Other-v0", 2)
    runs = [plots.AlignmentRun(name, np.zeros((3, 2)), np.ones((3, 2)), np.ones((2, 3))) for name in ("a", "b")]
    fig = plots.alignment_figure(runs, groups)
    try:
        means = [line for line in fig.axes[-1].lines if line.get_linewidth() == 2.0]
        assert len(means) == 2
        assert means[0].get_marker() != means[1].get_marker()
        assert means[0].get_linestyle() != means[1].get_linestyle()
        dimension_colours = {matplotlib.colors.to_hex(f"C{i}") for i in range(10)}
        assert not {matplotlib.colors.to_hex(line.get_color()) for line in means} & dimension_colours
    finally:
        plots.plt.close(fig)


def test_a_figures_svg_keeps_its_text_as_text(tmp_path):
    # A paper's figure editor changes a label; as glyph outlines it could not.
    import xml.etree.ElementTree as ET

    fig = plots.alignment_figure([plots.AlignmentRun("run", np.zeros((3, 2)), np.ones((3, 2)), np.ones((1, 3)))],
                                 plots.state_groups("Other-v0", 2))
    png, svg = plots.save_figure(fig, tmp_path / "alignment")
    plots.plt.close(fig)
    texts = ["".join(t.itertext()) for t in ET.parse(svg).iter("{http://www.w3.org/2000/svg}text")]
    assert "alignment error per horizon step" in texts



def test_the_report_table_and_captions_say_what_the_figures_show(tmp_path):
    out = tmp_path / "viz"
    rows = [{"label": "run", "checkpoint": "runs/a/checkpoint.pt", "step": 40, "return_mean": 120.0,
             "return_std": 7.5, "normalized_score": 3.3, "alignment_error": 0.5, "alignment_error_starts": None}]
    figure1 = {"png": str(out / "figure1.png"), "svg": str(out / "figure1.svg"), "dataset": "d", "episode": 1,
               "start": 2, "units": "raw"}
    text = render_report(out, title="T", rows=rows, episodes=3, figure1=figure1, alignment=None, video=None)
    assert "| 120.0 ± 7.5 | 3.3 |" in text
    assert "(figure1.png)" in text and "(figure1.svg)" in text  # relative to the report
    with pytest.raises(ValueError, match="out of range"):  # the last state has no step to plan from
        pick_start([Episode(np.zeros((5, 1)), np.zeros((4, 1)), np.zeros(4), False, True)], 2, 0, 4)
    assert "the plan sampled conditioned on that state (solid) against the dataset's own continuation (dashed)" in text
    # TensorBoard's copy names the figure's tag: its server serves no file of the log dir.
    tagged = render_report(out, title="T", rows=rows, episodes=3, figure1=figure1, alignment=None, video=None,
                           tags={"figure1": "diagnostics/figure1", "alignment": "a", "video": "v"})
    assert "![" not in tagged and "figure1.svg" not in tagged and "In the Images tab: `diagnostics/figure1`." in tagged



def test_the_video_pairs_the_plans_state_k_with_the_state_reached_after_k_actions(monkeypatch):
    h = 4
    planned = [np.full((2, 2, 3), k, np.uint8) for k in range(h)]
    real = [np.full((2, 2, 3), 100 + k, np.uint8) for k in range(h + 1)]
    seen = {}

    def render_states(env, states, x0=0.0):
        seen["x0"] = x0
        return planned

    monkeypatch.setattr(render, "render_states", render_states)
    monkeypatch.setattr(render, "render_rollout", lambda env, qpos, qvel, actions: (real, None, 2))
    labels = []
    monkeypatch.setattr(render, "label", lambda frame, text: labels.append(text) or frame)
    frames = render.plan_vs_real_frames(None, np.zeros((h, 17)), np.zeros((h, 6)), np.array([1.5] + [0.0] * 8), None)
    assert frames.shape == (h + 1, 2, 4, 3)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 1, 2, 3, 3]  # the plan's last state held in frame H
    assert [int(f[0, -1, 0]) for f in frames] == [100, 101, 102, 103, 104]
    assert labels[0::2] == ["plan t=0", "plan t=1", "plan t=2", "plan t=3", "plan t=3 (end)"]
    assert labels[1::2] == ["real t=0", "real t=1", "real t=2 (fell at 2)", "real t=3 (fell at 2)", "real t=4 (fell at 2)"]
    assert seen["x0"] == 1.5  # the plan starts where the real walker stands


def test_a_chosen_opengl_platform_is_kept(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setenv("PYOPENGL_PLATFORM", "osmesa")
    assert render.configure_gl() == "egl"
    assert os.environ["PYOPENGL_PLATFORM"] == "osmesa"


def test_observations_that_are_not_qpos_and_qvel_are_refused():
    # Imposing another env's observation would set joints from velocities, silently.
    placed = []
    env = SimpleNamespace(unwrapped=SimpleNamespace(model=SimpleNamespace(nq=9, nv=9),
                                                    set_state=lambda *state: placed.append(state)), spec=None)
    with pytest.raises(ValueError, match="not qpos"):
        render.impose_observation(env, np.zeros(20))
    assert not placed
    render.impose_observation(env, np.arange(17.0), x=2.0)
    (qpos, qvel), = placed
    assert qpos.tolist() == [2.0, *range(8)] and qvel.tolist() == list(range(8, 17))
