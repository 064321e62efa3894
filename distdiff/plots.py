"""Figures: a plan beside what its actions really did."""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402

from distdiff.files import replacing  # noqa: E402
from distdiff.rollout import PlanCheck, mean_alignment_error, per_step_alignment_error  # noqa: E402


class ModelNames(NamedTuple):
    """What a MuJoCo env's model names: its observed positions and velocities (where its
    observation is qpos without the forward position, then qvel; else None) and its actuators."""

    positions: Optional[List[str]]
    velocities: Optional[List[str]]
    actuators: List[str]


@functools.lru_cache(maxsize=None)
def model_names(env_id: str) -> Optional[ModelNames]:
    """:class:`ModelNames` of ``env_id`` (Gymnasium's MuJoCo envs: Hopper, HalfCheetah, Walker2d
    observe qpos[1:] + qvel), from its model's joints (``rootz`` …, ``rootx vel`` …) and
    actuators; None for an env without a MuJoCo model, or one that cannot be made here."""
    import gymnasium as gym

    from distdiff.rollout import make_env, observed_positions

    try:
        env = make_env(env_id)
    except gym.error.Error:  # (an id of a test, or of an env this machine lacks: its figure goes on without)
        return None
    try:
        model = getattr(env.unwrapped, "model", None)
        if model is None:
            return None
        # An unnamed actuator (Hopper's) by the joint it drives (transmission type 0: a joint).
        actuators = [model.actuator(a).name or (model.joint(int(model.actuator_trnid[a, 0])).name
                                                if model.actuator_trntype[a] == 0 else "") or f"a[{a}]"
                     for a in range(model.nu)]
        if observed_positions(env) is None:
            return ModelNames(None, None, actuators)
        # One qpos and one qvel per joint where every joint is a hinge or a slide.
        if model.njnt == model.nq == model.nv:
            joints = [model.joint(j).name for j in range(model.njnt)]
            return ModelNames(joints[1:], [f"{name} vel" for name in joints], actuators)
        return ModelNames([f"qpos[{d}]" for d in range(1, model.nq)], [f"qvel[{d}]" for d in range(model.nv)],
                          actuators)
    finally:
        env.close()


def observed_joints(env_id: str, obs_dim: int) -> Optional[Tuple[List[str], List[str]]]:
    """The names of ``env_id``'s ``obs_dim`` observed positions and velocities
    (:func:`model_names`), or None."""
    names = model_names(env_id)
    if names is None or names.positions is None or len(names.positions) + len(names.velocities) != obs_dim:
        return None
    return names.positions, names.velocities


def plan_vs_real_dims(env_id: str, obs_dim: int, act_dim: int, n: int = 6) -> Tuple[List[Tuple[int, str]], List[str]]:
    """The state dims :func:`plan_vs_real_figure` shows, named, and the action names: the body's
    height, angle and forward velocity (a fall and the speed show there) and three joints, in a
    MuJoCo locomotion env (:func:`observed_joints`); elsewhere the first ``n`` dims."""
    if env_id.startswith("Walker2d") and obs_dim == 17:
        names = _WALKER_POS + _WALKER_VEL
        states = [(d, names[d]) for d in (0, 1, 8, 2, 3, 5)]
    elif (joints := observed_joints(env_id, obs_dim)) is not None and len(joints[0]) >= 2:
        positions, velocities = joints
        npos = len(positions)
        chosen = [0, 1, npos] + list(range(2, npos))
        states = [(d, (positions + velocities)[d]) for d in chosen[:n]]
    else:
        states = [(d, f"state[{d}]") for d in range(min(n, obs_dim))]
    return states, action_group(env_id, act_dim).names[:n]


def plan_vs_real_figure(check: PlanCheck, dims: Sequence[Tuple[int, str]], action_names: Sequence[str],
                        title: str = ""):
    """States planned vs reached (executing the planned actions from the same start), in env
    units, and the planned actions, over the horizon; one panel per dimension (``dims``: index
    and name, and the action names, as :func:`plan_vs_real_dims` gives them)."""
    h = len(check.planned_states)
    steps = np.arange(h)
    columns = max(len(dims), len(action_names))
    # 72 dpi: a run of days logs thousands of these; a fifth smaller than at 100 dpi (~110 KB).
    fig, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 5.3 if title else 5), dpi=72, squeeze=False)
    for ax, (d, name) in zip(axes[0], dims):
        ax.plot(steps, check.planned_states[:, d], label="planned")
        ax.plot(steps, check.reached_states[:, d], label="reached", linestyle="--")
        ax.set_title(name, fontsize=9)
    for d, (ax, name) in enumerate(zip(axes[1], action_names)):
        ax.plot(steps, check.planned_actions[:, d], color="C2", label="planned action")
        ax.set_title(f"action: {name}", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("horizon step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ----- diagnostics figures (launch/visualize.py) ---------------------------------------------


class DimGroup(NamedTuple):
    """Dimensions plotted together in one panel."""

    title: str
    dims: List[int]  # indices into the state or action vector
    names: List[str]  # one per dim
    unit: str  # y-axis unit in raw env units


# Walker2d-v5 observation: qpos[1:] (torso height, torso angle, 6 joint angles) + qvel (9).
_WALKER_POS = ["torso z", "torso angle", "thigh R", "leg R", "foot R", "thigh L", "leg L", "foot L"]
_WALKER_VEL = ["ẋ", "ż", "torso ω", "thigh R ω", "leg R ω", "foot R ω", "thigh L ω", "leg L ω", "foot L ω"]
_WALKER_ACT = ["thigh R", "leg R", "foot R", "thigh L", "leg L", "foot L"]


def state_groups(env_id: str, obs_dim: int) -> List[DimGroup]:
    """Position and velocity dims of the env's observation, in two groups (Walker2d's named by
    hand, other MuJoCo locomotion envs' by their joints: :func:`observed_joints`), else one."""
    if env_id.startswith("Walker2d") and obs_dim == 17:
        return [DimGroup("positions (qpos[1:])", list(range(8)), _WALKER_POS, "z: m, angles: rad"),
                DimGroup("velocities (qvel)", list(range(8, 17)), _WALKER_VEL, "ẋ, ż: m/s, ω: rad/s")]
    joints = observed_joints(env_id, obs_dim)
    if joints is not None:
        positions, velocities = joints
        npos = len(positions)
        return [DimGroup("positions (qpos[1:])", list(range(npos)), positions, "m or rad"),
                DimGroup("velocities (qvel)", list(range(npos, obs_dim)), velocities, "m/s or rad/s")]
    return [DimGroup("state", list(range(obs_dim)), [f"s[{d}]" for d in range(obs_dim)], "env units")]


def _color(i: int, n: int):
    """The color of dim ``i`` of a panel of ``n``: matplotlib's 10-color cycle, or 20 colors for
    more dims than 10 (an 11th dim drawn in the first one's color reads as the same curve)."""
    return f"C{i}" if n <= 10 else plt.get_cmap("tab20")(i % 20)


def action_group(env_id: str, act_dim: int) -> DimGroup:
    """The actions, named: Walker2d's by hand, another MuJoCo env's by its actuators."""
    if env_id.startswith("Walker2d") and act_dim == 6:
        return DimGroup("actions (joint torque commands)", list(range(6)), _WALKER_ACT, "control in [-1, 1]")
    names = model_names(env_id)
    if names is not None and len(names.actuators) == act_dim:
        return DimGroup("actions (actuators)", list(range(act_dim)), names.actuators, "env units")
    return DimGroup("actions", list(range(act_dim)), [f"a[{d}]" for d in range(act_dim)], "env units")


def _ylabel(group: DimGroup, units: str) -> str:
    return "normalized (by the checkpoint's normalizer)" if units == "normalized" else f"raw ({group.unit})"


def _style_legend(ax, group: DimGroup, solid: str, dashed: str):
    handles = [Line2D([], [], color=_color(i, len(group.names)), label=n) for i, n in enumerate(group.names)]
    handles += [Line2D([], [], color="k", label=solid), Line2D([], [], color="k", linestyle="--", label=dashed)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _pair_panel(ax, group: DimGroup, first: np.ndarray, second: np.ndarray, *, units: str, title: str, labels,
                fontsize: int):
    """Each dim of ``group`` in its color: ``first`` solid, ``second`` dashed (it may be shorter)."""
    for i, d in enumerate(group.dims):
        color = _color(i, len(group.dims))
        ax.plot(np.arange(len(first)), first[:, d], color=color, linewidth=1.6)
        ax.plot(np.arange(len(second)), second[:, d], color=color, linewidth=1.2, linestyle="--")
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("horizon step")
    ax.set_ylabel(_ylabel(group, units), fontsize=fontsize - 1)
    ax.grid(alpha=0.3)
    _style_legend(ax, group, *labels)


def figure1(plan_states: np.ndarray, plan_actions: np.ndarray, real_states: np.ndarray, real_actions: np.ndarray,
            groups: Sequence[DimGroup], act_group: DimGroup, *, units: str = "raw", title: str = ""):
    """The seed's Figure 1: a plan sampled from a real start state against the dataset's
    continuation from that state, one panel per dimension group (states) plus the actions.

    Each panel holds two lines per dim, in the dim's color: the plan (solid, first) and the
    dataset (dashed, second). The dataset's continuation may be shorter than the plan when its
    episode ends. ``units`` (``raw`` or ``normalized``) only labels the axes: pass the series
    already in those units.
    """
    panels = [(g, plan_states, real_states) for g in groups] + [(act_group, plan_actions, real_actions)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.5, 3.0 * len(panels)), squeeze=False)
    for ax, (g, plan, real) in zip(axes[:, 0], panels):
        _pair_panel(ax, g, plan, real, units=units, title=g.title, labels=("plan (sampled)", "dataset (real)"),
                    fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# The error panel's checkpoints: colour, marker and dashes (black and grey, not tab10's C0-C9,
# which name the state dimensions in the panels above).
CHECKPOINT_STYLES = (("black", "o", "-"), ("0.55", "s", "--"), ("#8c510a", "^", ":"), ("#01665e", "D", "-."))


class AlignmentRun(NamedTuple):
    """One checkpoint's plans from shared start states, beside what their actions really did."""

    label: str
    planned_states: np.ndarray  # [H, obs_dim] of the first start, in the figure's units
    reached_states: np.ndarray  # [H, obs_dim]
    errors: np.ndarray  # [n_starts, H] RMSE per horizon step, normalized units


def alignment_figure(runs: Sequence[AlignmentRun], groups: Sequence[DimGroup], *, units: str = "raw", title: str = ""):
    """Per checkpoint (one row each): planned vs reached states of the first start state, one panel
    per dimension group; last row: the alignment error (RMSE per horizon step, normalized units)
    of every checkpoint, the mean over start states bold and each start thin."""
    n_rows, n_cols = len(runs) + 1, len(groups)
    fig = plt.figure(figsize=(6.0 * n_cols + 1.5, 3.0 * n_rows))
    grid = fig.add_gridspec(n_rows, n_cols)
    for r, run in enumerate(runs):
        for c, g in enumerate(groups):
            _pair_panel(fig.add_subplot(grid[r, c]), g, run.planned_states, run.reached_states, units=units,
                        title=f"{run.label}: {g.title}", labels=("planned", "reached (executing the plan)"), fontsize=9)
    ax = fig.add_subplot(grid[n_rows - 1, :])
    for k, run in enumerate(runs):
        # Not the dimensions' colours above, and a marker and dash each: told apart in greyscale
        # and by readers who do not tell red from green.
        color, marker, dashes = CHECKPOINT_STYLES[k % len(CHECKPOINT_STYLES)]
        steps = np.arange(run.errors.shape[1])
        for e in run.errors:
            ax.plot(steps, e, color=color, alpha=0.25, linewidth=0.8, linestyle=dashes)
        mean = per_step_alignment_error(run.errors)
        overall = mean_alignment_error(mean)
        ax.plot(steps, mean, color=color, linewidth=2.0, marker=marker, markersize=4, linestyle=dashes,
                label=f"{run.label} (mean {overall:.3f}; thin: each start)")
    ax.set_title("alignment error per horizon step", fontsize=10)
    ax.set_xlabel("horizon step")
    ax.set_ylabel("RMSE (normalized state units)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, stem, formats: Sequence[str] = ("png", "svg"), dpi: int = 110) -> List[str]:
    """Save ``fig`` as ``stem.<fmt>`` for each format; returns the paths."""
    from pathlib import Path

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = stem.with_suffix(f".{fmt}")
        # An interrupted rerun leaves the old figure, not half a new one. SVG text as text, not
        # glyph outlines: labels a paper's figure editor can change.
        with replacing(p) as tmp, plt.rc_context({"svg.fonttype": "none"}):
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        paths.append(str(p))
    return paths
