"""Diagnostics of a checkpoint (launch/visualize.py): the data behind the seed's Figure 1, the
plan-vs-reality alignment from shared start states, and the Markdown report."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from distdiff.config import Config
from distdiff.data.episodes import Episode
from distdiff.data.minari_io import DatasetMissing, LoadedDataset, dataset_exists, load_episodes
from distdiff.planner import Planner
from distdiff.rollout import (PlanCheck, alignment_errors, make_env, mean_alignment_error, per_step_alignment_error,
                              physics_state, replay_actions, solver_warmstart)


def load_dataset(cfg: Config, dataset_id: Optional[str] = None, log: Callable[[str], None] = print) -> LoadedDataset:
    """The dataset of Figure 1's start state: ``dataset_id`` when given, else the config's
    ``data.dataset_id``, else (when that is not local) its local ``data.fallback_dataset_id``,
    which is what pretraining used offline. Never downloads or collects."""
    kw = dict(obs_dim=cfg.env.obs_dim, act_dim=cfg.env.act_dim, env_id=cfg.env.id)
    if dataset_id:
        return load_episodes(dataset_id, **kw)
    try:
        return load_episodes(cfg.data.dataset_id, **kw)
    except DatasetMissing:
        fallback = cfg.data.fallback_dataset_id
        if not fallback or not dataset_exists(fallback):
            raise
    log(f"dataset {cfg.data.dataset_id!r} is not local; using the fallback dataset {fallback!r} (pass --dataset to choose)")
    return load_episodes(fallback, **kw)


class Figure1Data(NamedTuple):
    episode: int
    start: int
    plan_states: np.ndarray  # [H, obs_dim] raw; plan_states[0] is real_states[0] exactly
    plan_actions: np.ndarray  # [H, act_dim] raw
    real_states: np.ndarray  # [<=H, obs_dim] the dataset's s_t .. s_{t+H-1}
    real_actions: np.ndarray  # [<=H, act_dim] the dataset's a_t .. a_{t+H-1}


def pick_start(episodes: Sequence[Episode], horizon: int, episode: Optional[int] = None, start: Optional[int] = None):
    """(episode, start): by default the first episode with a full horizon of continuation
    (else the longest), from the middle of its admissible starts."""
    if episode is None:
        full = [i for i, ep in enumerate(episodes) if len(ep) >= horizon]
        episode = full[0] if full else int(np.argmax([len(ep) for ep in episodes]))
    if not 0 <= episode < len(episodes):
        raise ValueError(f"--data-episode {episode} is out of range: the dataset has {len(episodes)} episodes")
    n = len(episodes[episode])
    # A start leaves a full horizon of the data's continuation to draw beside the plan; an
    # episode shorter than the horizon has one start, its first. (Later starts drew a few
    # states, and no action line at all.)
    last = max(0, n - horizon)
    if start is None:
        start = last // 2
    if not 0 <= start <= last:
        raise ValueError(f"--data-start {start} is out of range: episode {episode} has {n} steps, so starts 0 to "
                         f"{last} leave a horizon ({horizon}) of data after them")
    return episode, start


def figure1_data(planner: Planner, episodes: Sequence[Episode], *, episode: Optional[int] = None,
                 start: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Figure1Data:
    """A plan conditioned on a real dataset state, beside the dataset's continuation from it."""
    horizon = planner.diffusion.horizon
    episode, start = pick_start(episodes, horizon, episode, start)
    ep = episodes[episode]
    s0 = ep.observations[start]
    plan = planner.plan(s0[None], generator=generator)
    return Figure1Data(episode, start, plan.states[0], plan.actions[0],
                       ep.observations[start:start + horizon], ep.actions[start:start + horizon])


def in_units(planner: Planner, states: np.ndarray, actions: Optional[np.ndarray], units: str):
    """(states, actions) in ``raw`` env units (unchanged) or ``normalized`` by the planner's normalizer."""
    if units == "raw":
        return states, actions
    if units != "normalized":
        raise ValueError(f"units must be raw or normalized, got {units!r}")
    layout = planner.layout
    s = planner.normalizer.slice(layout.state_slice).normalize(np.asarray(states, np.float64))
    a = None if actions is None else planner.normalizer.slice(layout.action_slice).normalize(np.asarray(actions, np.float64))
    return s, a


class StartCheck(NamedTuple):
    seed: int
    qpos: np.ndarray  # physics state after env.reset(seed=seed)
    qvel: np.ndarray
    check: PlanCheck  # the plan from this start beside what its actions did
    errors: np.ndarray  # [H] RMSE per horizon step (normalized units)


def alignment_starts(planner: Planner, env_id: str, seeds: Sequence[int],
                     generator: Optional[torch.Generator] = None) -> List[StartCheck]:
    """Plans from the real start states ``env.reset(seed=s)``, one batch, each replayed from the
    same physics state in a shadow env (as the training metric does)."""
    env, shadow = make_env(env_id), make_env(env_id)
    try:
        starts = []
        for s in seeds:
            obs, _ = env.reset(seed=int(s))
            starts.append((int(s), obs, *physics_state(env), solver_warmstart(env)))
        plan = planner.plan(np.stack([o for _, o, _, _, _ in starts]), generator=generator)
        out = []
        for k, (s, obs, qpos, qvel, warmstart) in enumerate(starts):
            reached = replay_actions(shadow, qpos, qvel, plan.actions[k], warmstart=warmstart, observation=obs)
            errors = alignment_errors(plan.states[k], reached, planner.state_normalizer)
            out.append(StartCheck(s, qpos, qvel, PlanCheck(plan.states[k], plan.actions[k], reached), errors))
        return out
    finally:
        env.close()
        shadow.close()


def mean_error(errors: np.ndarray) -> Optional[float]:
    """The mean over horizon steps of each step's mean over the starts, as the figures' legends
    and the evaluation summaries average (:func:`distdiff.rollout.mean_alignment_error`, step 0
    left out)."""
    mean = mean_alignment_error(per_step_alignment_error(errors))
    return mean if np.isfinite(mean) else None


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _figure_section(title: str, alt: str, caption: str, files: dict, out_dir, tag: Optional[str]) -> list:
    """A report section: caption, the PNG embedded, a link to the SVG; or, with ``tag``, where
    TensorBoard shows the figure (its server serves no file of the log dir: they showed broken)."""
    if tag is not None:
        return [f"## {title}", "", caption, "", f"In the Images tab: `{tag}`.", ""]
    return [f"## {title}", "", caption, "", f"![{alt}]({_rel(files['png'], out_dir)})", "",
            f"Vector version: [{Path(files['svg']).name}]({_rel(files['svg'], out_dir)})", ""]


def _rel(path, base: Path) -> str:
    return Path(os.path.relpath(Path(path), base)).as_posix()


def render_report(out_dir: Path, *, title: str, rows: Sequence[Dict[str, object]], episodes: int,
                  figure1: Optional[Dict[str, object]], alignment: Optional[Dict[str, object]],
                  video: Optional[Dict[str, object]], notes: Sequence[str] = (),
                  tags: Optional[Dict[str, str]] = None) -> str:
    """The Markdown of report.md; every path is written relative to ``out_dir``. ``tags``: the
    TensorBoard tags of the figures and video by name (figure1, alignment, video), for the copy
    in TensorBoard's Text tab, which names them in place of the files.

    rows: one per checkpoint: label, checkpoint, step, and the evaluation summary's
    return_mean, return_std, normalized_score, alignment_error, plus alignment_error_starts (the
    mean error of the alignment figure's start states).
    """
    lines = [f"# {title}", ""]
    lines += ["## Summary", ""]
    if episodes > 0:
        lines.append(f"Evaluation: {episodes} episode(s) per checkpoint in the real env "
                     "(`distdiff.evaluation.evaluate`). Alignment error: RMSE between planned states and the states "
                     "reached by executing the planned actions from the same start, normalized state units, "
                     "averaged over horizon steps 1 to H-1 (step 0 is the start state, exact in every plan).")
    else:
        lines.append("Evaluation skipped (`--episodes 0`).")
    lines += ["", "| checkpoint | step | return (mean ± std) | normalized score (0-100) | alignment error (evaluation) "
              "| alignment error (figure's start states) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ret = "n/a" if r.get("return_mean") is None else f"{r['return_mean']:.1f} ± {r['return_std']:.1f}"
        lines.append(f"| {r['label']} (`{r['checkpoint']}`) | {r['step']} | {ret} | {_fmt(r.get('normalized_score'), '.1f')} "
                     f"| {_fmt(r.get('alignment_error'))} | {_fmt(r.get('alignment_error_starts'))} |")
    lines.append("")
    if figure1 is not None:
        lines += _figure_section(
            "Figure 1: a plan from a real dataset state", "Figure 1",
            f"Dataset `{figure1['dataset']}`, episode {figure1['episode']}, step {figure1['start']}: the plan "
            f"sampled conditioned on that state (solid) against the dataset's own continuation (dashed), "
            f"{figure1['units']} units.", figure1, out_dir, tags and tags["figure1"])
    if alignment is not None:
        lines += _figure_section(
            "Alignment: planned vs reached states", "Alignment",
            f"Start states: `env.reset(seed=s)` for s in {list(alignment['seeds'])} (the same for every checkpoint). "
            f"Top: the first start's planned (solid) and reached (dashed) states, {alignment['units']} units; "
            "bottom: RMSE per horizon step in normalized units.", alignment, out_dir, tags and tags["alignment"])
    if video is not None:
        where = (f"In the Images tab: `{tags['video']}`" if tags
                 else f"[{Path(video['path']).name}]({_rel(video['path'], out_dir)})")
        lines += ["## Imagined plan vs real rollout", "",
                  f"{where} ({video['frames']} frames, "
                  f"{video['fps']:g} fps): left, the plan's states imposed on the simulator (x integrated from the "
                  f"planned forward velocity); right, the plan's actions executed from the same start "
                  f"(`env.reset(seed={video['seed']})`).", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
