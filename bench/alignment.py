"""Online alignment on real data: prior vs aligned planner on the same start states.

Pretrains on a fixed budget on `local/walker2d/sac-medium-v0` (../shared/data, see its README),
evaluates that prior, runs Algorithm 2 from it on a fixed env-step budget, evaluates the aligned
planner with the same evaluation seeds, and prints one JSON line:
{"prior": {"alignment_error": …, "normalized_score": …}, "aligned": {…}, "behaviour": {"normalized_score": …}}

`alignment_error` is measured on the evaluation episodes, so on the states each planner reaches;
`alignment_error_data_states` on the same --data-states offline states for both planners, and
`one_step_error_data_states` there too: each planned transition replayed alone from its planned
state, so how much of the error is transitions the dynamics cannot make, not compounding.
`--init PRIOR --aligned CKPT` compares two existing checkpoints without the online phase.

The default budget fits about an hour on a 2-core machine; --scale multiplies every budget for
bigger machines (e.g. --scale 8 with a GPU learner and 32 actors).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MINARI_PATH_HELP, HelpFormatter, add_config_argument, load_config, positive_float,  # noqa: E402
                     start_local_ray, use_minari_store)

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from distdiff import config as config_lib  # noqa: E402
from distdiff.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from distdiff.cli import positive_int  # noqa: E402
from distdiff.files import to_json  # noqa: E402
from distdiff.data.minari_io import load_episodes, normalized_score  # noqa: E402
from distdiff.distributed.driver import train  # noqa: E402
from distdiff.evaluation import alignment_on_observations, evaluate  # noqa: E402
from distdiff.pretrain import pretrain  # noqa: E402
from distdiff.rollout import make_env, observed_positions, observed_velocity_clip  # noqa: E402
from distdiff.training import check_made_with, planner_from_checkpoint  # noqa: E402


def keep(summary):
    keys = ("return_mean", "return_std", "return_se", "normalized_score", "normalized_score_se", "alignment_error",
            "episode_length_mean", "terminations")
    return {k: summary[k] for k in keys}


def main():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_config_argument(p)
    p.add_argument("--dataset", default="local/walker2d/sac-medium-v0", help="Offline dataset of pretraining and phase 2.")
    p.add_argument("--minari-path", default=None, help=MINARI_PATH_HELP)
    p.add_argument("--scale", type=positive_float, default=1.0, help="Multiplies pretraining steps, online env steps and eval episodes.")
    p.add_argument("--pretrain-steps", type=positive_int, default=30000,
                   help="Offline steps of the prior; 9,000 left it under-trained: as many offline updates alone doubled its score (bench/README.md).")
    p.add_argument("--online-env-steps", type=positive_int, default=10000, help="Phase 2's env-step budget.")
    p.add_argument("--eval-episodes", type=positive_int, default=100,
                   help="Evaluation episodes per planner; 10 left score differences of ~10 points within the noise (bench/README.md).")
    p.add_argument("--num-actors", type=positive_int, default=1, help="Phase 2's rollout actors.")
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-alignment", help="Where the prior's and the aligned run's dirs go (a rerun replaces them).")
    p.add_argument("--init", type=Path, default=None,
                   help="Reuse a pretrained checkpoint (or run dir) instead of pretraining. It is judged and fine-tuned "
                        "under --config, whose model must be the checkpoint's: pass the config it was made with (its "
                        "run dir's config.yaml) where that is not configs/walker2d.yaml.")
    p.add_argument("--aligned", type=Path, default=None,
                   help="With --init: compare with this aligned checkpoint instead of running the online phase.")
    p.add_argument("--data-states", type=positive_int, default=256,
                   help="Offline-data states (fixed seed) on which prior and aligned plans are also compared.")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="Override a config field for the whole benchmark, e.g. --set online.return_weighting=0 (repeatable).")
    args = p.parse_args()
    if args.aligned and not args.init:
        p.error("--aligned needs --init (the prior to compare it with)")
    if any("=" not in item for item in args.set):
        p.error("--set takes SECTION.FIELD=VALUE")
    overrides = dict(item.split("=", 1) for item in args.set)  # (a field set twice: the last one)
    use_minari_store(args.minari_path)
    episodes = max(1, int(args.eval_episodes * args.scale))
    cfg = load_config(p, args.config, {
        "data.dataset_id": args.dataset, "data.fallback_dataset_id": "", "train.steps": int(args.pretrain_steps * args.scale),
        "train.num_threads": os.cpu_count(), "eval.episodes": episodes, "eval.num_envs": episodes,
        "online.env_steps": int(args.online_env_steps * args.scale), "online.num_actors": args.num_actors,
        "online.envs_per_actor": 4, "online.checkpoint_every": 1000, "online.figure_every": 250, **overrides,
    })
    # Loaded once, and checked here, not after the dataset has loaded and the prior has been judged.
    given = {}
    for flag, path in (("--init", args.init), ("--aligned", args.aligned)):
        if path is not None:
            try:
                given[flag] = load_checkpoint(path)
                check_made_with(given[flag], cfg)
            except CheckpointError as e:
                p.error(f"{flag} {path}: {e}; the benchmark builds its planners from --config {args.config}: pass "
                        f"the config the checkpoint was made with (its run dir's config.yaml)")
    t0 = time.perf_counter()
    ckpt = args.init or pretrain(cfg, args.out / "prior", quiet=True, overwrite=True)
    t_pretrain = time.perf_counter() - t0
    # Pretraining had the machine to itself; online, the learner shares it with rollout actors,
    # and a second math thread competing with them is far slower than one.
    cfg = config_lib.from_dict({"train": {"num_threads": 1}}, cfg)
    data = load_episodes(args.dataset)
    # The evaluation's alignment error is measured on the states each planner's own episodes
    # reach (a planner that falls early is judged near the start); these states are shared.
    rng = np.random.default_rng(0)
    all_obs = np.concatenate([e.observations[:-1] for e in data.episodes])
    env = make_env(cfg.env.id)
    n_pos = observed_positions(env)
    env.close()
    if n_pos is None:
        p.error(f"{cfg.env.id}: its observations are not qpos[1:] + qvel, from which the shared states' physics is set")
    # (The physics is unknown at the clip.)
    all_obs = all_obs[np.abs(all_obs[:, n_pos:]).max(axis=1) < observed_velocity_clip(cfg.env.id)]
    data_states = all_obs[rng.choice(len(all_obs), size=args.data_states, replace=False)]

    def judge(checkpoint):
        # Episodes are chaotic: with two threads' rounding the same weights scored 14.4 and 40.4
        # instead of 17.4 and 33.0, so every judgement uses one thread, pretrained here or not.
        torch.set_num_threads(1)
        planner = planner_from_checkpoint(checkpoint, cfg)
        out = keep(evaluate(planner, cfg))
        shared = alignment_on_observations(planner, cfg, data_states)
        out["alignment_error_data_states"] = shared["alignment_error"]
        out["one_step_error_data_states"] = shared["one_step_error"]
        return out

    prior = judge(given.get("--init", ckpt))
    metrics = {"env_steps": None, "updates": None}
    t1 = time.perf_counter()
    if args.aligned is None:
        start_local_ray(num_cpus=os.cpu_count())
        # judge() evaluates the aligned planner; the run's own final evaluation would repeat it.
        online_cfg = config_lib.from_dict({"eval": {"episodes": 1, "num_envs": 1}}, cfg)
        metrics = train(online_cfg, args.out / "aligned", init=ckpt, init_state=given.get("--init"),
                        log=lambda s: print(s, file=sys.stderr), progress=False, overwrite=True)
        ray.shutdown()
    t_online = time.perf_counter() - t1
    aligned = judge(given.get("--aligned", args.out / "aligned" / "checkpoint.pt"))
    # The references the planners are scored with (the config's: D4RL's on Walker2d), not the dataset's own.
    behaviour = normalized_score(np.mean([e.episode_return for e in data.episodes]), *config_lib.reference_returns(cfg))
    print(to_json({
        "prior": prior, "aligned": aligned, "behaviour": {"normalized_score": None if behaviour is None else float(behaviour)},
        "budget": {"pretrain_steps": None if args.init else cfg.train.steps,  # --init: whatever made that checkpoint
                   "online_env_steps": metrics["env_steps"], "online_updates": metrics["updates"],
                   "pretrain_s": t_pretrain, "online_s": t_online, "eval_episodes": episodes},
    }))


if __name__ == "__main__":
    main()
