"""Planner speed on one core: env steps/s while planning, vs random actions in the same run.

Prints one JSON line:
{"random_env_steps_per_s": …, "default": {"ms_per_plan": …, "env_steps_per_s": …, "envs": …, "ratio_to_random": …},
 "default_measuring": {…}, "diffuser_settings": {…}, "torch_threads": 1}

"default" is configs/walker2d.yaml's acting config with online.envs_per_actor envs planned in one
batch (the target's figure); "default_measuring" the same as a rollout actor runs it in phase 2,
also measuring the alignment error of every online.measure_every-th plan of an episode in shadow
envs (H env steps each; untrained episodes are so short that each one's first plan is measured,
about one shadow step per real step, where a walking planner's take ~0.5). "diffuser_settings"
is Diffuser's published Walker2d setting (H=32, a U-Net of dim_mults (1, 2, 4, 8) for denoiser and value, 20 DDPM steps, 64 candidates,
2 guide steps, replan every step, one env). Weights are untrained: a plan costs the same, but
their episodes fall within ~15 steps and each reset leaves a batch a little emptier than a
walking planner's (~80 % full at 16 envs), so the default rate is somewhat understated.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distdiff.models import build_models  # noqa: E402
from distdiff.planner import Planner  # noqa: E402
from distdiff.rollout import make_env, run_episodes  # noqa: E402

from _common import HelpFormatter, add_config_argument, load_config, positive_float, unit_normalizer  # noqa: E402


def random_rate(env_id: str, steps: int) -> float:
    env = make_env(env_id, 1000)
    env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - t0)


def planner_rate(cfg, n_envs: int, seconds: float, measure: bool) -> dict:
    normalizer = unit_normalizer(cfg)
    diffusion, denoiser, value, dynamics = build_models(cfg, normalizer)
    planner = Planner.from_config(cfg, diffusion=diffusion, denoiser=denoiser.eval(), value=value.eval(),
                                  dynamics=dynamics.eval(), normalizer=normalizer)
    gen = torch.Generator().manual_seed(0)
    plan_times = []

    def plan_fn(obs):
        t = time.perf_counter()
        p = planner.plan(obs, generator=gen)
        plan_times.append(time.perf_counter() - t)
        return p

    envs = [make_env(cfg.env.id, cfg.env.max_episode_steps) for _ in range(n_envs)]
    # (as RolloutWorker._run measures)
    measuring = {"state_normalizer": planner.state_normalizer, "shadows": [make_env(cfg.env.id) for _ in envs],
                 "measure_every": cfg.online.measure_every} if measure else {}
    steps, t0 = 0, time.perf_counter()
    seed = 0
    while time.perf_counter() - t0 < seconds:
        results = run_episodes(plan_fn, envs, n_episodes=n_envs, execution=cfg.planner.execution,
                               horizon=cfg.model.horizon, replan_every=cfg.planner.replan_every, seed=seed, **measuring)
        steps += sum(len(r.episode) for r in results)
        seed += n_envs
    elapsed = time.perf_counter() - t0
    return {"ms_per_plan": 1000 * float(np.mean(plan_times)), "env_steps_per_s": steps / elapsed, "envs": n_envs}


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_config_argument(p)
    p.add_argument("--seconds", type=positive_float, default=20.0, help="Wall time per planner measurement.")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(p, args.config)
    diffuser = load_config(p, args.config, {
        "model.horizon": 32, "model.dim_mults": (1, 2, 4, 8), "diffusion.n_steps": 20, "planner.sampler": "ddpm", "guidance.n_candidates": 64,
        "guidance.scale": 0.1, "guidance.n_guide_steps": 2, "planner.execution": "receding", "planner.replan_every": 1})
    rand = random_rate(cfg.env.id, 5000)
    out = {"random_env_steps_per_s": rand}
    for name, c, n, measure in (("default", cfg, cfg.online.envs_per_actor, False),
                                ("default_measuring", cfg, cfg.online.envs_per_actor, True),
                                ("diffuser_settings", diffuser, 1, False)):
        r = planner_rate(c, n, args.seconds, measure)
        r["ratio_to_random"] = r["env_steps_per_s"] / rand
        out[name] = r
    out["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
