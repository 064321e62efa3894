"""Figures: a plan beside what its actions really did."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from distdiff.rollout import PlanCheck  # noqa: E402


def plan_vs_real_figure(check: PlanCheck, max_dims: int = 6):
    """States planned vs reached (executing the planned actions from the same start), and the
    planned actions, over the horizon; one panel per dimension."""
    h = len(check.planned_states)
    steps = np.arange(h)
    n_s = min(max_dims, check.planned_states.shape[1])
    n_a = min(max_dims, check.planned_actions.shape[1])
    fig, axes = plt.subplots(2, max(n_s, n_a), figsize=(2.6 * max(n_s, n_a), 5), squeeze=False)
    for d in range(n_s):
        ax = axes[0, d]
        ax.plot(steps, check.planned_states[:, d], label="planned")
        ax.plot(steps, check.reached_states[:, d], label="reached", linestyle="--")
        ax.set_title(f"state[{d}]", fontsize=9)
    for d in range(n_a):
        axes[1, d].plot(steps, check.planned_actions[:, d], color="C2", label="planned action")
        axes[1, d].set_title(f"action[{d}]", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("horizon step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig
