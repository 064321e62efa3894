"""Helpers shared by the benchmarks (not part of the library)."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

import numpy as np

from distdiff import config as config_lib
from distdiff.data.episodes import Episode
from distdiff.distributed.messages import Weights
from distdiff.models import build_models, layout_of
from distdiff.normalizer import Normalizer
from distdiff.training import Trainer, flat_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINARI_PATH_HELP = "Minari store (default: MINARI_DATASETS_PATH, else ../shared/data/minari next to the repo)."


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "walker2d.yaml"),
                        help="Config the benchmark's model and run are built from.")


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (seconds, scales)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def load_config(parser: argparse.ArgumentParser, path, overrides: Optional[Dict[str, object]] = None):
    """``--config`` with the benchmark's ``overrides``; a usage error, not a traceback, for a config
    (or a flag's value) that does not load."""
    try:
        return config_lib.load(path, overrides)
    except config_lib.ConfigError as e:
        parser.error(str(e))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and the default of every flag that has one and does not
    say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, []) or "default" in text:
            return text
        return super()._get_help_string(action)


def start_local_ray(**options) -> None:
    """A Ray of the benchmark's own (not one that RAY_ADDRESS or a `ray start` names), whose
    processes inherit one BLAS/OpenMP thread each, as an embedded run's do (``cluster.connect``)."""
    import ray

    from distdiff.process import limit_threads

    limit_threads()
    ray.init(**{"address": "local", "include_dashboard": False, "logging_level": "warning", **options})


def use_minari_store(path) -> None:
    """An explicit --minari-path wins over MINARI_DATASETS_PATH, which wins over ../shared."""
    if path is not None:
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(path)
    os.environ.setdefault("MINARI_DATASETS_PATH", os.path.join(ROOT, "..", "shared", "data", "minari"))


def unit_normalizer(cfg) -> Normalizer:
    d = cfg.env.obs_dim + cfg.env.act_dim
    return Normalizer(kind="gaussian", shift=np.zeros(d), scale=np.ones(d), clip_min=-5 * np.ones(d), clip_max=5 * np.ones(d))


def fresh_weights(cfg, version: int = 1) -> Weights:
    """A weights version as the learner publishes it, from untrained nets."""
    _, denoiser, value, _ = build_models(cfg, unit_normalizer(cfg))
    return Weights(version=version, weights={"denoiser": flat_weights(denoiser), "value": flat_weights(value)})


def fresh_checkpoint(cfg) -> dict:
    """Untrained nets, with the step counter past pretraining as a fine-tuning learner's is
    (the EMA then updates every ``train.ema_every`` steps instead of copying every step)."""
    # Any increasing table will do for a return-conditioned config: the nets are untrained.
    state = Trainer(cfg, unit_normalizer(cfg), value_mean=0.0, value_std=1.0,
                    return_quantiles=np.linspace(-1.0, 1.0, 101)).state_dict()
    state["step"] = cfg.train.steps
    return state


def synthetic_episodes(cfg, n: int, rng: np.random.Generator) -> List[Episode]:
    """``n`` time-limit-long episodes of Gaussian states, uniform actions and Gaussian rewards: a
    replay's cost depends on their number and length, not on their values."""
    steps, obs, act = cfg.env.max_episode_steps, cfg.env.obs_dim, cfg.env.act_dim
    return [Episode(rng.normal(size=(steps + 1, obs)).astype(np.float32),
                    rng.uniform(-1, 1, size=(steps, act)).astype(np.float32),
                    rng.normal(size=steps).astype(np.float32), False, True) for _ in range(n)]


def replay_kwargs(cfg, offline: List[Episode]) -> Dict[str, object]:
    """The Replay's arguments as a run of ``cfg`` gives them, with ``offline`` as its offline
    episodes and a normalizer fitted on them."""
    o = cfg.online
    data = np.concatenate([np.concatenate([e.observations[:-1], e.actions], axis=1) for e in offline])
    return dict(offline_episodes=offline, normalizer=Normalizer.fit(data, kind=cfg.data.normalizer).state_dict(),
                layout=layout_of(cfg), horizon=cfg.model.horizon, discount=cfg.data.discount,
                termination_penalty=cfg.data.termination_penalty, capacity=o.replay_capacity,
                offline_ratio=o.offline_ratio, value_target=cfg.data.value_target,
                return_weighting=o.return_weighting, offline_start_weight=o.offline_start_window_weight,
                online_start_weight=o.start_window_weight, time_limit=cfg.env.max_episode_steps, seed=0)
