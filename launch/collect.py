"""Collect episodes into a local Minari dataset, with a random policy or a checkpoint.

    python launch/collect.py --policy random --episodes 50 --dataset-id local/walker2d/random-v0
    python launch/collect.py --policy runs/pretrain-X/checkpoint.pt --episodes 20 --dataset-id local/walker2d/planner-v0

Datasets land under MINARI_DATASETS_PATH (default ~/.minari/datasets), with ids under local/ (the
others are Minari's remote datasets); an existing id is refused unless --overwrite is given. The env
is Walker2d-v5 unless --env says otherwise (a checkpoint collects in its own). D4RL's reference
scores are stored where D4RL has them (Walker2d, Hopper, HalfCheetah, Ant), so
minari.get_normalized_score works on the result (on 0-1, where distdiff reports 0-100).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Tuple

from distdiff.cli import add_ray_arguments, connect_job, fail, line_buffered_output, make_parser, positive_int, seed_int
from distdiff.process import default_ray_auth, limit_threads, progress_bar

limit_threads()
line_buffered_output()
default_ray_auth()

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from distdiff import config as config_lib  # noqa: E402
from distdiff.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from distdiff.data.minari_io import (DATASET_ID, LOCAL_NAMESPACE, DatasetError, dataset_exists,  # noqa: E402
                                     datasets_root, local_id, other_env_named, write_episodes)
from distdiff.rollout import NonFinitePlan, make_env, random_episodes_in, run_episodes  # noqa: E402
from distdiff.training import planner_from_checkpoint  # noqa: E402


DEFAULT_ENV = "Walker2d-v5"


def collect(args, state, cfg, planner, bar) -> Tuple[str, str, list]:
    """The episodes ``args`` asks for, in parallel on Ray or in this process: their env id, the
    algorithm they are recorded under, and the episodes."""
    if args.num_actors > 1:
        from distdiff.distributed.collection import collect_episodes
        from distdiff.distributed.cluster import RunFailed, shutdown

        started = connect_job(args.address, args.num_cpus, log=bar.write)
        try:
            env_id = args.env if state is None else cfg.env.id
            episodes = collect_episodes(args.episodes, num_actors=args.num_actors, env_id=env_id,
                                        max_episode_steps=args.max_episode_steps, seed=args.seed, checkpoint=state,
                                        envs_per_actor=args.num_envs, progress=bar.update, log=bar.write)
        except RunFailed as e:
            fail(f"{e}\nnothing was written", code=1)
        finally:
            if started:
                shutdown()
        algorithm = "random" if state is None else f"distdiff:{args.policy}"
    elif args.policy == "random":
        env_id, algorithm = args.env, "random"
        episodes = random_episodes_in(env_id, args.max_episode_steps, args.episodes, args.seed,
                                      progress=lambda ep: bar.update(1))
    else:
        torch.set_num_threads(cfg.train.num_threads)
        env_id, algorithm = cfg.env.id, f"distdiff:{args.policy}"
        envs = [make_env(env_id, args.max_episode_steps) for _ in range(min(args.num_envs, args.episodes))]
        generator = torch.Generator().manual_seed(args.seed)
        try:
            results = run_episodes(lambda obs: planner.plan(obs, generator=generator), envs, n_episodes=args.episodes,
                                   execution=cfg.planner.execution, horizon=cfg.model.horizon,
                                   replan_every=cfg.planner.replan_every, seed=args.seed,
                                   progress=lambda r: bar.update(1))
        finally:
            for env in envs:
                env.close()
        episodes = [r.episode for r in results]
    return env_id, algorithm, episodes


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--policy", required=True, help="'random', or the path of a distdiff checkpoint.")
    p.add_argument("--episodes", type=positive_int, required=True, help="Number of episodes to collect.")
    p.add_argument("--dataset-id", required=True, help="Minari id under local/, ending in -vN (e.g. local/walker2d/random-v0).")
    p.add_argument("--env", default=None,
                   help=f"Gymnasium env id for the random policy (default: {DEFAULT_ENV}); a checkpoint collects in its own.")
    p.add_argument("--max-episode-steps", type=positive_int, default=1000,
                   help="Time limit: an episode that has not fallen by then ends truncated (default: %(default)s).")
    p.add_argument("--num-envs", type=positive_int, default=8, help="Envs planned together (checkpoint policy), per actor (default: %(default)s).")
    p.add_argument("--num-actors", type=positive_int, default=1,
                   help="Collect with this many parallel Ray actors, on the Ray that --address finds (1: in this "
                        "process, without Ray; default: %(default)s).")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="Seeds the episodes' starts and the policy: the same command collects the same episodes. The "
                        "random policy's do not depend on --num-actors; a checkpoint's are the same for every "
                        "--num-actors above 1, and others with 1, which plans in this process (default: %(default)s).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing dataset with this id.")
    add_ray_arguments(p)
    args = p.parse_args(argv)
    if not DATASET_ID.match(args.dataset_id):
        fail(f"dataset id {args.dataset_id!r} must look like namespace/name-vN (Minari needs the -vN version)")
    if not args.dataset_id.startswith(LOCAL_NAMESPACE):
        # Under a remote's id (mujoco/walker2d/medium-v0), a config that names that dataset
        # would train on these episodes instead, and record them as the remote's.
        fail(f"dataset id {args.dataset_id!r} must be under {LOCAL_NAMESPACE} (e.g. {LOCAL_NAMESPACE}walker2d/"
             f"{args.dataset_id.rpartition('/')[2]}): ids elsewhere are Minari's remote datasets")
    if dataset_exists(args.dataset_id) and not args.overwrite:
        fail(f"dataset {args.dataset_id!r} already exists under {datasets_root()}; pass --overwrite to replace it")
    state = cfg = planner = None
    if args.policy != "random":
        try:
            state = load_checkpoint(Path(args.policy))
            # Here, before Ray starts: the parallel workers build the same planner.
            cfg = config_lib.from_dict(state["config"])
            planner = planner_from_checkpoint(state, cfg)
        except (CheckpointError, config_lib.ConfigError) as e:
            fail(f"--policy {args.policy}: neither 'random' nor a checkpoint: {e}" if not Path(args.policy).exists()
                 else str(e))
        if args.env is not None and args.env != cfg.env.id:
            fail(f"--env {args.env}: the checkpoint plans in {cfg.env.id}, and collects there; drop --env")
    else:
        args.env = args.env or DEFAULT_ENV
        try:
            env = make_env(args.env, args.max_episode_steps)
        except gym.error.Error as e:
            fail(f"--env {args.env}: {e}")
        discrete = not isinstance(env.action_space, gym.spaces.Box)
        env.close()
        if discrete:
            fail(f"--env {args.env}: its actions are {type(env.action_space).__name__}, and distdiff plans continuous "
                 "(Box) actions")
    env_id = args.env if state is None else cfg.env.id
    other = other_env_named(args.dataset_id, env_id)
    if other:
        # Every run of env_id would refuse it by its name, and its records those of another env.
        fail(f"--dataset-id {args.dataset_id} names {other}, and the episodes would be of {env_id}: "
             f"name it for {env_id} (e.g. {local_id(env_id, 'NAME-v0')})"
             + (", or pass --env" if state is None else ""))
    bar = progress_bar(total=args.episodes, desc="collect")
    try:
        env_id, algorithm, episodes = collect(args, state, cfg, planner, bar)
    except NonFinitePlan as e:
        bar.close()
        fail(f"{e}: this checkpoint's planner is broken; nothing was written")
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted after {bar.n} of {args.episodes} episodes; nothing was written (the same command collects "
              "the same episodes again)", file=sys.stderr)
        return 130
    bar.close()
    try:
        write_episodes(args.dataset_id, episodes, env_id=env_id, algorithm_name=algorithm,
                       max_episode_steps=args.max_episode_steps, overwrite=args.overwrite)
    except DatasetError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(f"interrupted while writing {args.dataset_id}; nothing was written"
              + (" (the dataset it was to replace stays)" if dataset_exists(args.dataset_id) else ""), file=sys.stderr)
        return 130
    returns = np.array([ep.episode_return for ep in episodes])
    print(f"wrote {args.dataset_id} ({env_id}): {len(episodes)} episodes, {sum(len(e) for e in episodes)} steps, "
          f"return {returns.mean():.1f} ± {returns.std():.1f} -> {datasets_root()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
