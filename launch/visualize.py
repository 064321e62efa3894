"""Diagnostics of a checkpoint, as files and in TensorBoard:

  figure1.png/.svg        the seed's Figure 1: a plan sampled conditioned on a real dataset state
                          against the dataset's own continuation (states by group, actions)
  alignment.png/.svg      planned states vs the states reached by executing the planned actions
                          from the same real start states (env.reset(seed=s)), and the alignment
                          error (RMSE per horizon step, normalized units); with --compare, a
                          second checkpoint from the same start states
  plan_vs_real.mp4/.gif   the plan's states imposed on the simulator (left) beside the real
                          execution of its actions (right): H+1 frames
  report.md               return, normalized score, alignment error; embeds the above
  summary.json, events.*  the numbers; TensorBoard: tensorboard --logdir OUT

    python launch/visualize.py --checkpoint runs/pretrain-X/checkpoint.pt
    python launch/visualize.py --checkpoint runs/train-X/ --compare runs/train-X/pretrain/ --episodes 5

Rendering is headless: MUJOCO_GL=egl (Debian: libegl1 libgl1 libopengl0 libgl1-mesa-dri) or
osmesa (libosmesa6); when MUJOCO_GL is unset the script picks the one installed. MP4 needs the
imageio-ffmpeg package, else a GIF is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdiff.cli import (check_output, fail, held_out_for_best, int_at_least, line_buffered_output, make_parser,
                          non_negative_int, positive_int, seed_int)
from distdiff.process import limit_threads

limit_threads()
line_buffered_output()

from distdiff.render import configure_gl  # noqa: E402  (light: must run before anything imports mujoco)

configure_gl()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distdiff import config as config_lib  # noqa: E402
from distdiff import plots, render  # noqa: E402
from distdiff.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from distdiff.data.minari_io import DATASET_ID, DatasetError  # noqa: E402
from distdiff.evaluation import evaluate  # noqa: E402
from distdiff.events import EVENTS_GLOB, event_tags  # noqa: E402
from distdiff.files import write_json, write_text  # noqa: E402
from distdiff.report import (alignment_starts, figure1_data, in_units, load_dataset, mean_error,  # noqa: E402
                             render_report)
from distdiff.rollout import NonFinitePlan  # noqa: E402
from distdiff.rundir import CHECKPOINT, checkpoint_file, holds_run  # noqa: E402
from distdiff.training import planner_from_checkpoint  # noqa: E402

DIAGNOSTICS = "diagnostics"  # the TensorBoard tags' section: what this script writes, and may remove again


MIN_FPS, MAX_FPS = 0.01, 1000.0


def _even_size(text: str) -> int:
    v = int_at_least(16)(text)
    if v % 2:
        raise argparse.ArgumentTypeError(f"must be even (H.264 needs even sizes), got {v}")
    return v


def _fps(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    # (The encoders fail on a NaN or infinite rate, and GIF's frame time overflows near 0.001.)
    if not MIN_FPS <= v <= MAX_FPS:
        raise argparse.ArgumentTypeError(f"must be in [{MIN_FPS:g}, {MAX_FPS:g}], got {text}")
    return v


def parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt (or its run dir).")
    p.add_argument("--dataset", default=None, metavar="ID",
                   help="Minari dataset of Figure 1's start state (default: the checkpoint's data.dataset_id, or its "
                        "local data.fallback_dataset_id when that is not local).")
    p.add_argument("--episodes", type=non_negative_int, default=2, metavar="N",
                   help="Evaluation episodes per checkpoint for the report's return, score and alignment error "
                        "(default 2; 0 skips evaluation).")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="Output directory, also the TensorBoard log dir (default: viz/ next to checkpoint.pt, "
                        "viz-NAME/ next to NAME.pt).")
    p.add_argument("--compare", type=Path, default=None, metavar="PATH",
                   help="A second checkpoint (same env) shown beside the first in the alignment figure and report.")
    p.add_argument("--starts", type=positive_int, default=4, metavar="K",
                   help="Real start states of the alignment figure: env.reset(seed=SEED+i), i < K (default 4).")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="Seed of the start states, the sampler and the evaluation (default: the checkpoint's eval.seed; "
                        "for a best.pt, which the run's evaluations chose on those episodes, another one, as "
                        "evaluate.py judges it).")
    p.add_argument("--data-episode", type=non_negative_int, default=None, metavar="I",
                   help="Dataset episode of Figure 1 (default: the first with a full horizon of continuation).")
    p.add_argument("--data-start", type=non_negative_int, default=None, metavar="T",
                   help="Step of that episode to start from, at most its length minus the horizon, so that a "
                        "horizon of the data follows it (default: the middle of those starts).")
    p.add_argument("--units", choices=("raw", "normalized"), default="raw",
                   help="Units of the state and action plots: raw env units (m, rad, m/s, rad/s; actions in [-1, 1]) "
                        "or normalized by the checkpoint's normalizer (default raw). Alignment errors are always normalized.")
    p.add_argument("--width", type=_even_size, default=240, help="Width of each video panel in pixels (default 240).")
    p.add_argument("--height", type=_even_size, default=240, help="Height of the video frames in pixels (default 240).")
    p.add_argument("--fps", type=_fps, default=8.0, help="Video frames per second (default 8: slow motion).")
    p.add_argument("--video-format", choices=("auto", "mp4", "gif"), default="auto",
                   help="auto (default): MP4 when imageio-ffmpeg is installed, else GIF.")
    p.add_argument("--no-video", action="store_true", help="Skip the rendered video (no OpenGL needed).")
    return p


def _load(path: Path):
    state = load_checkpoint(path)
    cfg = config_lib.from_dict(state["config"])
    return state, cfg, planner_from_checkpoint(state, cfg)


def _same_normalizer(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] if isinstance(a[k], str) else torch.equal(a[k], b[k]) for k in a)


def _scale(references) -> str:
    return "no reference returns" if references[0] is None else f"reference returns {list(references)}"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.dataset is not None and not DATASET_ID.match(args.dataset):
        fail(f"--dataset {args.dataset!r} must look like namespace/name-vN (a Minari dataset id)")
    if args.video_format == "mp4" and not args.no_video and not render.ffmpeg_available():
        fail("--video-format mp4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg); or use gif")
    try:
        state, cfg, planner = _load(args.checkpoint)
        runs = [("checkpoint", args.checkpoint, state, cfg, planner)]
        if args.compare is not None:
            state2, cfg2, planner2 = _load(args.compare)
            mine = (cfg.env.id, cfg.env.obs_dim, cfg.env.act_dim)
            theirs = (cfg2.env.id, cfg2.env.obs_dim, cfg2.env.act_dim)
            if mine != theirs:
                raise ValueError(f"--compare {args.compare} is for env {theirs}, --checkpoint is for {mine}")
            runs.append(("compare", args.compare, state2, cfg2, planner2))
            if not _same_normalizer(state["normalizer"], state2["normalizer"]):
                print(f"warning: --compare {args.compare} normalizes states differently (another dataset?): each "
                      "checkpoint's alignment errors are in its own normalized units, not comparable", file=sys.stderr)
            refs, refs2 = config_lib.reference_returns(cfg), config_lib.reference_returns(cfg2)
            if refs != refs2:
                print(f"warning: --compare {args.compare} scores against {_scale(refs2)}, --checkpoint against "
                      f"{_scale(refs)} (eval.reference_returns): their normalized scores are not comparable, compare "
                      "their returns", file=sys.stderr)
        # (Before any figure is written: a MUJOCO_GL whose backend is missing fails the first env.)
        problem = config_lib.env_problem(cfg.env)
        if problem:
            raise ValueError(problem)
        torch.set_num_threads(cfg.train.num_threads)
        data = load_dataset(cfg, args.dataset)
    except DatasetError as e:
        fail(f"{e}\n(visualize.py takes the dataset id as --dataset ID)")
    except (config_lib.ConfigError, CheckpointError, ValueError) as e:
        fail(str(e))
    labels = []
    for kind, path, *_ in runs:
        # By run dir, and by file beside checkpoint.pt: best.pt of the same run is another planner.
        file = checkpoint_file(path).resolve()
        name = file.parent.name if file.name == CHECKPOINT else f"{file.parent.name}/{file.stem}"
        labels.append(name if name not in labels else f"{name} ({kind})")
    first = checkpoint_file(args.checkpoint)
    out = args.out or first.parent / ("viz" if first.name == CHECKPOINT else f"viz-{first.stem}")
    check_output(out, "--out", directory=True)
    seed = cfg.eval.seed if args.seed is None else args.seed
    if args.seed is None:
        # (--compare's too, where its run chose it on these seeds; with no episodes evaluated as
        # well: the alignment starts and the video are of the same episodes)
        seed = held_out_for_best([path for _, path, _, c, _ in runs if c.eval.seed == seed], seed, "--seed")

    def gen(p):  # the same sampler noise for every checkpoint
        return torch.Generator(device=p.device).manual_seed(seed)

    # Figure 1: a plan from a real dataset state against the dataset's continuation
    try:
        f1 = figure1_data(planner, data.episodes, episode=args.data_episode, start=args.data_start, generator=gen(planner))
    except ValueError as e:
        fail(str(e))

    from torch.utils.tensorboard import SummaryWriter

    step = int(state["step"])
    # Each checkpoint named with its step in the figures (a lab meeting sees "run (step 350)");
    # the bare labels name TensorBoard's tags, the same across reruns.
    titled = [f"{label} (step {int(st['step'])})" for label, (_, _, st, _, _) in zip(labels, runs)]
    out.mkdir(parents=True, exist_ok=True)
    # An earlier run of this script's (the default --out is fixed): its points at the same steps
    # would stand beside these, and TensorBoard show one of them. Events of anything else (a run's
    # curves, another logdir) are not this script's to remove.
    earlier = sorted(path for path in out.glob(EVENTS_GLOB) if path.is_file())
    foreign = [path for path in earlier
               if (tags := event_tags(path)) is None or any(not tag.startswith(f"{DIAGNOSTICS}/") for tag in tags)]
    if holds_run(out) or foreign:
        fail(f"--out {out} holds TensorBoard events of something else than visualize.py "
             f"({(foreign or earlier or [out / CHECKPOINT])[0].name}): give a directory of its own")
    for path in earlier:
        path.unlink()
    if earlier:
        print(f"removed the TensorBoard events of an earlier visualize.py in {out}: {len(earlier)} file(s)")
    writer = SummaryWriter(str(out))
    notes, written, interrupted = [], [], False
    try:
        ps, pa = in_units(planner, f1.plan_states, f1.plan_actions, args.units)
        rs, ra = in_units(planner, f1.real_states, f1.real_actions, args.units)
        groups = plots.state_groups(cfg.env.id, cfg.env.obs_dim)
        fig = plots.figure1(ps, pa, rs, ra, groups, plots.action_group(cfg.env.id, cfg.env.act_dim), units=args.units,
                            title=f"{titled[0]}: plan from {data.dataset_id} episode {f1.episode} step {f1.start} "
                                  f"vs the dataset's continuation")
        fig1 = plots.save_figure(fig, out / "figure1")
        writer.add_figure(f"{DIAGNOSTICS}/figure1", fig, step)  # closes the figure
        written += fig1
        if len(f1.real_states) < len(f1.plan_states):
            notes.append(f"Figure 1: the dataset episode ends {len(f1.real_states) - 1} steps after the start state, "
                         f"before the plan's horizon of {len(f1.plan_states)}.")

        # Alignment: the same real start states for every checkpoint
        seeds = [seed + i for i in range(args.starts)]
        align_runs, starts_of = [], []
        for label, (_, _, _, c, p) in zip(titled, runs):
            checks = alignment_starts(p, c.env.id, seeds, generator=gen(p))
            starts_of.append(checks)
            planned, _ = in_units(p, checks[0].check.planned_states, None, args.units)
            reached, _ = in_units(p, checks[0].check.reached_states, None, args.units)
            align_runs.append(plots.AlignmentRun(label, planned, reached, np.stack([s.errors for s in checks])))
        fig = plots.alignment_figure(align_runs, groups, units=args.units,
                                     title=f"plans from env.reset(seed=s), s = {seeds[0]}..{seeds[-1]}, "
                                           f"vs executing their actions")
        align = plots.save_figure(fig, out / "alignment")
        writer.add_figure(f"{DIAGNOSTICS}/alignment", fig, step)
        written += align
        for label, run, (_, _, st, _, _) in zip(labels, align_runs, runs):
            if mean_error(run.errors) is not None:
                # (At each checkpoint's own step: --compare's is another run's.)
                writer.add_scalar(f"{DIAGNOSTICS}/alignment_error_starts/{label}", mean_error(run.errors), int(st["step"]))

        # Video: the first start's plan imposed on the simulator beside the real execution of its actions
        video = None
        problem = "--no-video" if args.no_video else render.gl_problem(cfg.env.id)
        if problem is None:
            start = starts_of[0][0]
            env = render.make_render_env(cfg.env.id, args.width, args.height)
            try:
                frames = render.plan_vs_real_frames(env, start.check.planned_states, start.check.planned_actions,
                                                    start.qpos, start.qvel)
            except ValueError as e:
                # An env whose observation is not qpos[1:] + qvel (Ant, Swimmer): its planned states
                # cannot be imposed on the simulator. The figures and the report need no video.
                problem = str(e)
            finally:
                env.close()
        if problem is None:
            path = render.write_video(out / "plan_vs_real", frames, args.fps, args.video_format)
            render.add_video(writer, f"{DIAGNOSTICS}/plan_vs_real", frames, args.fps, step)
            video = {"path": path, "frames": len(frames), "fps": args.fps, "seed": start.seed}
            written.append(str(path))
        elif args.no_video:
            notes.append("No video: --no-video was given.")
        else:
            print(f"warning: no video: {problem}", file=sys.stderr)
            notes.append(f"No video: {problem}.")

        # Evaluation in the real env
        rows = []
        for label, (_, path, st, c, p) in zip(labels, runs):
            row = {"label": label, "checkpoint": str(path), "step": int(st["step"]),
                   "alignment_error_starts": mean_error(np.stack([s.errors for s in starts_of[len(rows)]]))}
            if args.episodes > 0:
                print(f"evaluating {label}: {args.episodes} episode(s)", flush=True)
                try:
                    summary = evaluate(p, c, episodes=args.episodes, seed=seed)
                except NonFinitePlan as e:
                    fail(f"{label}: {e}: this checkpoint's planner is broken; report.md and summary.json not written")
                row.update(summary)
                for k in ("return_mean", "normalized_score", "alignment_error"):
                    if summary.get(k) is not None:
                        writer.add_scalar(f"{DIAGNOSTICS}/{k}/{label}", summary[k], row["step"])
            rows.append(row)

        fig1_info = {"dataset": data.dataset_id, "episode": f1.episode, "start": f1.start, "units": args.units,
                     "png": fig1[0], "svg": fig1[1]}
        align_info = {"seeds": seeds, "units": args.units, "png": align[0], "svg": align[1]}
        report = dict(title=f"Diagnostics of {titled[0]}", rows=rows, episodes=args.episodes, figure1=fig1_info,
                      alignment=align_info, video=video, notes=notes)
        write_text(out / "report.md", render_report(out, **report))
        written.append(str(out / "report.md"))
        writer.add_text(f"{DIAGNOSTICS}/report", render_report(out, **report, tags={
            "figure1": f"{DIAGNOSTICS}/figure1", "alignment": f"{DIAGNOSTICS}/alignment",
            "video": f"{DIAGNOSTICS}/plan_vs_real"}), step)
        write_json(out / "summary.json", {"rows": rows, "figure1": {k: v for k, v in fig1_info.items()},
                                          "alignment_seeds": seeds,
                                          "video": None if video is None else {**video, "path": str(video["path"])}})
        written.append(str(out / "summary.json"))
    except KeyboardInterrupt:
        interrupted = True  # what is on disk is whole: each file is replaced at once
    finally:
        writer.close()
    for f in written:
        print(f"wrote {f}")
    if interrupted:
        # (A report.md or summary.json of an earlier run in --out stays, and is not of these files.)
        missing = [f.name for f in (out / "report.md", out / "summary.json") if str(f) not in written]
        print(f"interrupted: {' and '.join(missing)} not written in {out}", file=sys.stderr)
        return 130
    print(f"report: {out / 'report.md'}   TensorBoard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
