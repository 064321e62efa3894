"""How precisely a checkpoint's denoiser rebuilds clean offline trajectories, per noise level.

For each checkpoint and each timestep t: noise the same offline windows to t (s_0 clamped, as
in sampling), take the denoiser's estimate τ̂⁰ (clipped like the samplers clip it) and print the
RMSE, in normalized units, of its states and actions against the clean windows, beside the
RMSE of the noisy input itself. At the lowest noise level an estimate worse than its input
is a floor that no sampler setting removes: a plan's states are at least that far from
anything the dynamics can produce (bench/README.md, 2026-11-29).

    python bench/denoiser.py runs/prior30k/checkpoint.pt runs/bench-v/prior/checkpoint.pt
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MINARI_PATH_HELP, HelpFormatter, use_minari_store  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distdiff.checkpoint import load_checkpoint  # noqa: E402
from distdiff.cli import non_negative_int, positive_int  # noqa: E402
from distdiff.config import from_dict  # noqa: E402
from distdiff.data.minari_io import load_episodes  # noqa: E402
from distdiff.data.windows import WindowDataset  # noqa: E402
from distdiff.training import planner_from_checkpoint, quantile_of  # noqa: E402


def rmse(err: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((err**2) * mask).sum() / mask.sum().clamp(min=1)) ** 0.5


@torch.no_grad()
def reconstruction(path: Path, dataset: str, n_windows: int, timesteps, seed: int) -> dict:
    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    beyond = [t for t in timesteps if t >= cfg.diffusion.n_steps]
    if beyond:
        raise ValueError(f"--timesteps {' '.join(map(str, beyond))}: {path} has noise levels 0 to "
                         f"{cfg.diffusion.n_steps - 1} (diffusion.n_steps {cfg.diffusion.n_steps})")
    planner = planner_from_checkpoint(state, cfg)
    diffusion, layout = planner.diffusion, planner.layout
    episodes = load_episodes(dataset, obs_dim=cfg.env.obs_dim, act_dim=cfg.env.act_dim).episodes
    # The window returns a conditioned denoiser is given, as in its training: falls penalized.
    windows = WindowDataset(episodes, layout=layout, horizon=cfg.model.horizon, normalizer=planner.normalizer,
                            discount=cfg.data.discount, termination_penalty=cfg.data.termination_penalty)
    batch = windows.sample(n_windows, np.random.default_rng(seed))
    # Padding and the clamped s_0 are not the network's to rebuild.
    mask = batch.mask * (1 - layout.condition_mask(cfg.model.horizon))
    generator = torch.Generator().manual_seed(seed)
    model = planner.denoiser
    if state.get("return_quantiles") is not None:
        # A return-conditioned denoiser is asked what it was trained on: each window's own return.
        model = functools.partial(model, returns=quantile_of(batch.window_returns.float(),
                                                             torch.tensor(state["return_quantiles"])))
    out = {"prediction": cfg.diffusion.prediction, "train_steps": int(state["step"]),
           "condition": "own window return" if model is not planner.denoiser else "none"}
    states, actions = layout.state_slice, layout.action_slice
    for t in timesteps:
        tt = torch.full((n_windows,), t, dtype=torch.long)
        noise = torch.randn(batch.x_start.shape, generator=generator)
        x_t = layout.condition(diffusion.q_sample(batch.x_start, tt, noise), batch.cond)
        x_hat = diffusion.model_predictions(model, x_t, tt).x_start
        out[f"t{t}"] = {
            "input_states": rmse((x_t - batch.x_start)[..., states], mask[..., states]),
            "states": rmse((x_hat - batch.x_start)[..., states], mask[..., states]),
            "actions": rmse((x_hat - batch.x_start)[..., actions], mask[..., actions]),
        }
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+", help="Checkpoints (or run dirs) to measure.")
    p.add_argument("--dataset", default="local/walker2d/sac-medium-v0", help="Dataset the offline windows come from.")
    p.add_argument("--minari-path", default=None, help=MINARI_PATH_HELP)
    p.add_argument("--windows", type=positive_int, default=512, help="Offline windows measured (the same for every checkpoint).")
    p.add_argument("--timesteps", type=non_negative_int, nargs="+", default=[0, 1, 2, 4, 8], help="Noise levels t measured.")
    p.add_argument("--seed", type=int, default=1, help="Seed of the windows drawn and of their noise.")
    args = p.parse_args()
    use_minari_store(args.minari_path)
    torch.set_num_threads(1)
    try:
        out = {str(c): reconstruction(c, args.dataset, args.windows, args.timesteps, args.seed) for c in args.checkpoints}
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
