"""Typed configuration: dataclasses with one help string per field, YAML files, CLI overrides.

Every field can be set in YAML (``section: {field: value}``) or on the command line as
``--section.field VALUE``; unknown names and invalid values are rejected, all at once, before
any work starts.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import yaml

from distdiff import files


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem found."""


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class EnvConfig:
    id: str = _f("Walker2d-v5", "Gymnasium environment id the planner acts in.")
    obs_dim: int = _f(17, "Observation size; checked against the dataset.")
    act_dim: int = _f(6, "Action size; checked against the dataset.")
    max_episode_steps: int = _f(1000, "Episode step limit (truncation). Online episodes that an env-step budget cuts short have their return_to_go targets completed up to it.")


@dataclass(kw_only=True)
class DataConfig:
    dataset_id: str = _f("mujoco/walker2d/medium-v0", "Minari dataset id, looked up under MINARI_DATASETS_PATH first.")
    download: bool = _f(True, "Download the dataset from Minari's remote if it is not local (needs internet; ids under local/ never are).")
    fallback_dataset_id: str = _f("local/walker2d/random-v0", "Local dataset (an id under local/) used when dataset_id is not local and cannot be downloaded (offline; a remote that has no such id is an error); collected with a random policy if missing, and recorded as the run's data.dataset_id. Empty: no fallback.")
    fallback_episodes: int = _f(200, "Episodes the fallback dataset is collected with; 0: no fallback.")
    normalizer: str = _f("gaussian", "Per-dimension normalizer: gaussian or minmax.")
    discount: float = _f(0.997, "Discount of the return that the value net predicts.")
    value_target: str = _f("return_to_go", "What the value net predicts of a window. return_to_go: the discounted return from s_0 to the episode's end (Diffuser's; online episodes cut short by the env-step budget are completed to env.max_episode_steps at their mean reward). window: the discounted return of the window's own H transitions, the termination penalty included, i.e. what the plan itself earns; a time limit shows only in the last H-1 windows before it (nothing is earned past it), and past a cut by the env-step budget its real steps stand for the rest (bench/README.md).")
    termination_penalty: float = _f(-100.0, "Reward added at a true termination (not at truncation).")
    start_window_weight: float = _f(1.0, "Windows that begin within an episode's first model.horizon steps are drawn this many times as often in pretraining: long episodes hold few starts, and a planner that starts badly falls early. Phase 2's offline share has its own, online.offline_start_window_weight.")


@dataclass(kw_only=True)
class ModelConfig:
    horizon: int = _f(32, "Planning horizon H: rows (s_j, a_j) per trajectory.")
    dim: int = _f(32, "Base channel width of the denoiser U-Net.")
    dim_mults: Tuple[int, ...] = _f((1, 2, 4), "Channel multipliers per U-Net level; H must be divisible by 2**(levels-1).")
    value_dim: int = _f(32, "Base channel width of the value network.")
    kernel_size: int = _f(5, "Temporal convolution kernel size.")
    returns_condition: bool = _f(False, "Condition the denoiser on the return its window earns (Decision Diffuser, Ajay et al. 2023): the window's reward per step, as a quantile of the offline data's windows; plans are then sampled at guidance.return_quantile. See bench/README.md.")
    dynamics_dim: int = _f(256, "Width of the dynamics model (an MLP of 3 hidden layers over (s_j, a_j)), used by planner.dynamics_candidates.")


@dataclass(kw_only=True)
class DiffusionConfig:
    n_steps: int = _f(20, "Number of diffusion timesteps T.")
    schedule: str = _f("cosine", "Beta schedule: linear, cosine or sigmoid.")
    prediction: str = _f("x0", "What the denoiser predicts: x0 (clean trajectory), epsilon (noise, the seed's Alg. 1.1) "
                               "or v (√ᾱ·ε − √(1−ᾱ)·x0, Salimans & Ho 2022).")
    action_weight: float = _f(10.0, "Loss weight of the first action a_0, the one every plan executes (with replanning, the next few execute too, at weight 1; Diffuser's weighting).")
    clip_denoised: bool = _f(True, "Clip the predicted clean trajectory to the normalized data range while sampling.")


@dataclass(kw_only=True)
class GuidanceConfig:
    scale: float = _f(0.0, "Guidance scale k in τ ← τ + k∇V; 0 samples unguided.")
    n_guide_steps: int = _f(2, "Gradient steps per denoising step.")
    t_stopgrad: int = _f(2, "No guidance at noise levels t < t_stopgrad. The starting noise (level T-1) is always "
                            "guided, so a few-step DDIM sampler is guided even where its steps land below t_stopgrad.")
    scale_grad_by_std: bool = _f(True, "Scale the value gradient by the posterior variance σ_t² (σ_1² at t = 0, as Ho et al.'s code clips it; Diffuser's 1e-20 leaves t = 0 unguided).")
    n_candidates: int = _f(1, "Plans sampled per state; the one with the highest V is executed (needs the value net if > 1).")
    return_quantile: float = _f(0.9, "With model.returns_condition: plans are sampled conditioned on this quantile of the offline data's window returns (reward per step over the horizon).")
    return_scale: float = _f(1.0, "Classifier-free guidance weight w of the return condition (Ho & Salimans 2022): out = out_uncond + w·(out_cond − out_uncond). 1 samples the conditional model (one denoiser pass); > 1 pushes past it at two passes per step.")


@dataclass(kw_only=True)
class PlannerConfig:
    sampler: str = _f("ddim", "ddpm (ancestral, all T steps) or ddim (fewer steps, for acting).")
    ddim_steps: int = _f(2, "Denoising steps of the DDIM sampler. On Walker2d 2 steps scored 55.0 against 49.0 for 5 with plans 36 % closer to the dynamics: each step feeds the denoiser's imprecise low-noise estimates back (bench/README.md).")
    ddim_eta: float = _f(0.0, "DDIM stochasticity η (0 deterministic, 1 ≈ DDPM).")
    execution: str = _f("receding", "open_loop: execute the plan's H actions (the seed's Alg. 2); receding: replan every replan_every steps.")
    replan_every: int = _f(4, "Steps between plans in receding-horizon mode. On Walker2d 4 scored 57.0 against 54.7 for 8 (episodes 990 steps long against 940), and phase 2 no longer cost return; 2 and 1 scored 57.6 and 57.9 at 2x and 4x the sampling (bench/README.md).")
    dynamics_candidates: int = _f(1, "Plans sampled per state; the one the dynamics model ranks best (dynamics_rank) is executed. Costs that many times the sampling (bench/README.md).")
    dynamics_rank: str = _f("error", "How the dynamics model ranks candidates. error: the plan whose states it best reproduces from the plan's actions, open loop from s_0. value: the plan whose actions reach, in the model, the trajectory of highest V (a plan heading for a fall reaches a low-value one, however plausible its own states look).")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = _f(20000, "Updates (gradient steps) of offline pretraining.")
    batch_size: int = _f(64, "Trajectory windows per gradient step.")
    lr: float = _f(2e-4, "Adam learning rate of the denoiser.")
    value_lr: float = _f(2e-4, "Adam learning rate of the value net.")
    lr_schedule: str = _f("constant", "Pretraining's learning-rate schedule: constant, or cosine (half a cosine from the peak rates down to lr_min_ratio of them at train.steps, after warmup_steps of linear warm-up). Over the train.steps in force: a run resumed with more steps goes on where a run of that many would be, so its rate rises again. Phase 2 keeps a constant rate.")
    warmup_steps: int = _f(0, "Linear warm-up steps of the cosine schedule.")
    lr_min_ratio: float = _f(0.0, "The cosine schedule's final rate as a fraction of the peak.")
    train_value: bool = _f(True, "Train the value net (needed for guidance and candidate selection).")
    train_dynamics: bool = _f(False, "Train the dynamics model on the same windows (needed for planner.dynamics_candidates > 1). Off by default: it costs about a fifth of a CPU update (bench/README.md).")
    condition_dropout: float = _f(0.25, "With model.returns_condition: the fraction of training windows whose return is dropped, which trains the unconditional model classifier-free guidance needs.")
    dynamics_lr: float = _f(1e-3, "Adam learning rate of the dynamics model.")
    grad_clip: float = _f(1.0, "Gradient norm clip; 0 (or less) disables.")
    ema_decay: float = _f(0.995, "EMA decay of the weights used for planning.")
    ema_every: int = _f(10, "Gradient steps between EMA updates.")
    ema_start: int = _f(1000, "Steps before the EMA starts tracking (copies the weights until then). A pretraining from an --init checkpoint counts from 0 too, so its EMA becomes the online weights at the first step; 0 keeps averaging from the checkpoint's EMA.")
    log_every: int = _f(100, "Updates between pretraining's TensorBoard scalars (phase 2 logs a point per learner call).")
    checkpoint_every: int = _f(2000, "Updates between pretraining's checkpoints (phase 2: online.checkpoint_every).")
    seed: int = _f(0, "Seed of torch, numpy and the data sampler.")
    device: str = _f("auto", "auto (cuda when present), cpu or cuda: where pretraining trains. Phase 2's learner runs where online.learner_num_gpus places it.")
    num_threads: int = _f(1, "torch threads of pretraining, of phase 2's learner (1 is fastest on small machines) and of evaluations (the run's own, launch/evaluate.py): episodes are chaotic, and the thread count changes their arithmetic; rollout actors always use 1.")
    precision: str = _f("fp32", "fp32, or bf16: forward passes under bfloat16 autocast (weights, optimizer and losses stay float32). Pays on GPUs; see bench/README.md.")
    compile: str = _f("none", "torch.compile the training nets: none, default or reduce-overhead (CUDA graphs). Costs a warm-up of tens of seconds; see bench/README.md.")


@dataclass(kw_only=True)
class EvalConfig:
    episodes: int = _f(10, "Evaluation episodes.")
    num_envs: int = _f(10, "Environments stepped together, planned in one sampler batch.")
    measure_alignment: bool = _f(True, "Replay each plan's actions in a shadow env to measure the alignment error.")
    seed: int = _f(10_000, "Seed of the evaluation envs and sampler.")
    reference_returns: Tuple[float, ...] = _f((), "Returns of a random and an expert policy, which the normalized score maps to 0 and 100: 100·(R − random)/(expert − random), given as RANDOM,EXPERT (with = where RANDOM is negative: --eval.reference_returns=-5,360). Empty: D4RL's for Walker2d, Hopper, HalfCheetah and Ant, and no normalized score in another env (where a Minari dataset's metadata records references of its own, a run's start names them).")
    num_actors: int = _f(0, "A training run's evaluations (online.eval_every's and the final one) run on up to this many of its rollout actors at once (no more than it has), eval.num_envs episodes per task, each in a thread of its own beside the actor's rollouts, which it slows while it runs (mind online.rollout_timeout_s); 0 = in a thread of the driver. With N tasks (eval.episodes / eval.num_envs) or more, the final evaluation then takes about 1/N of the time, and the driver's process stays free for the loop. The sampler's draws are made per task: the figures are those of launch/evaluate.py --num-actors (any N above 1), not of one process.")


@dataclass(kw_only=True)
class OnlineConfig:
    num_actors: int = _f(2, "Rollout actors (each a Ray actor with a CPU copy of the planner).")
    envs_per_actor: int = _f(16, "Envs per actor, planned together in one sampler batch.")
    actor_num_cpus: float = _f(0.0, "CPUs reserved per rollout actor; 0 = share what the learner leaves (fractional on laptops, up to one per actor), so that every actor fits node by node.")
    learner_num_cpus: float = _f(1.0, "CPUs reserved for the learner actor.")
    learner_num_gpus: float = _f(-1.0, "GPUs for the learner, at most 1 (it trains on one; a fraction shares one); -1 = one if a node it may run on (online.learner_resource) has one, else CPU.")
    learner_resource: str = _f("", "Custom Ray resource the learner asks 0.001 of, so it runs only on nodes started with it (e.g. ray start --resources='{\"learner\": 1}'); empty = any node.")
    actor_resource: str = _f("", "Custom Ray resource each rollout actor asks 0.001 of, so actors run only on nodes that carry it (e.g. only the CPU nodes, to keep them off the learner's GPU node); empty = any node.")
    env_steps: int = _f(100_000, "Budget: real env steps collected in phase 2 (0 = unlimited). Each rollout gets a share of what is left, so a run ends at it and never passes it; a share smaller than envs_per_actor whole episodes runs fewer envs, and one smaller than an episode runs one env, its episode cut (truncated) at the share.")
    updates: int = _f(0, "Budget: learner updates in phase 2 (0 = unlimited).")
    wall_time_s: float = _f(0.0, "Budget: seconds of phase 2's loop in this process (0 = unlimited); a resume has them again. "
                                  "Once spent, no rollout or learner call starts; those in flight, an evaluation in flight "
                                  "and the final evaluation still end. metrics.json's phase2_s counts phase 2's "
                                  "seconds across resumes.")
    updates_per_env_step: float = _f(0.5, "Learner updates owed per collected env step. 0 collects without training, and without the checkpoints, figures and evaluations counted in updates: its checkpoint comes at the end, or when stopped.")
    max_update_lag: int = _f(500, "Rollouts pause while the learner owes more updates than this, so the update/step ratio holds.")
    updates_per_call: int = _f(25, "Updates per learner call (one replay sample of that many batches).")
    broadcast_every: int = _f(50, "Learner updates between weight broadcasts (a new weights version), at least: the weights are published after the learner call (online.updates_per_call updates) that reaches it, so 30 with calls of 25 broadcasts every 50.")
    replay_capacity: int = _f(200_000, "Online transitions kept in the replay (FIFO over whole episodes; at least env.max_episode_steps).")
    offline_ratio: float = _f(0.5, "Fraction of each batch drawn from the offline dataset (on average where batch_size × it is no whole number: that batch's count is rounded up or down at random).")
    lr_scale: float = _f(0.25, "Phase 2's learning rates are train.lr, train.value_lr and train.dynamics_lr times this. At 1, 5k updates from a trained Walker2d prior cost it 4-7 points of score, with or without online data; at 0.25 the score held and the online data still aligned (bench/README.md).")
    return_weighting: float = _f(1.0, "β: online windows are sampled ∝ exp(β·z), z = their episode's return in std units below the best stored episode; > 0 prefers the better episodes (self-imitation); 0 = uniform. See bench/README.md for what it did on Walker2d.")
    start_window_weight: float = _f(0.0, "Relative weight of online windows that begin within an episode's first model.horizon steps; 0 leaves how to start an episode to the offline data, so the planner does not imitate its own starts. See bench/README.md.")
    offline_start_window_weight: float = _f(10.0, "Like data.start_window_weight, for the offline windows of phase 2's batches: with online starts left out, the offline ones teach starting (×10 at pretraining gave a weaker prior; in fine-tuning it kept the score, bench/README.md).")
    prior_weight: float = _f(0.0, "w: evaluations (the run's own, launch/evaluate.py, bench/alignment.py) plan with (1 - w) x the aligned nets + w x the nets phase 2 started from, weight by weight (WiSE-FT, Wortsman et al. 2022); rollouts still plan with the aligned nets. 0 = off. Can be set after a run: evaluate.py --online.prior_weight. On Walker2d, 0.4 kept phase 2 from falling where it had learned to (bench/README.md).")
    finish_updates: bool = _f(True, "When the env-step budget is spent, still run the updates owed to the last collected steps (within the update and wall-time budgets).")
    measure_every: int = _f(16, "Actors measure the alignment error of every N-th plan of each episode, its first included (costs H shadow env steps); evaluations measure every plan.")
    checkpoint_every: int = _f(500, "Learner updates between run checkpoints (learner, replay, counters).")
    eval_every: int = _f(0, "Learner updates between evaluations (checkpoint + eval episodes, reported to Ray Tune; they run while training goes on, in a thread of the driver or on eval.num_actors rollout actors); 0 = only at the end.")
    figure_every: int = _f(500, "Learner updates between plan-vs-real figures in TensorBoard.")
    max_nonfinite: int = _f(20, "Consecutive non-finite updates that stop the run.")
    actor_max_restarts: int = _f(-1, "Restarts Ray gives a dead rollout actor (-1 = unlimited).")
    rollout_timeout_s: float = _f(0.0, "Seconds a rollout may take, counted from its submission, before its actor is killed for Ray to restart (a hung env, a node that stopped answering); 0 = no limit. "
                                       "Set it well above the longest rollout, its actor's start included (Walker2d: minutes for 16 whole episodes on a busy laptop), and mind that an actor waiting for a node an autoscaler adds counts too, as does an evaluation beside the rollout (eval.num_actors), which slows it.")
    learner_timeout_s: float = _f(0.0, "Seconds a learner's call (online.updates_per_call updates) may run before the learner is taken for hung (a stuck GPU, a node that stopped answering) and the run stops, its last checkpoint intact, for --resume or --autoresume (a scheduler's requeue) to go on from; 0 = no limit (it is said every 10 minutes that the call still runs). "
                                        "Set it well above the longest call, its first included (torch.compile's warm-up: minutes).")


@dataclass(kw_only=True)
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        for section in out.values():
            for k, v in section.items():
                if isinstance(v, tuple):
                    section[k] = list(v)
        return out


def _sections():
    return {f.name: f.type if isinstance(f.type, type) else typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (tuple, Tuple):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            # A flag as YAML reads a file: 1e5 and 3.0 are whole numbers there, 1.5 is not.
            try:
                value = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):  # YAML's on/yes/true would be a scale of 1.0
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        # YAML's null: empty ("no fallback", "no custom resource"), not the string "None". A list,
        # mapping or yes/no is refused, not made its Python text ({learner: 1} as a resource name
        # that no node has: the learner would wait for ever).
        if isinstance(value, (list, tuple, dict, bool)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


# Fields distdiff had and dropped: the value at which each did nothing (None: any, it acted only
# with another of them), the commit that dropped it, and what it was. A config saved before
# (a checkpoint's, a run's config.yaml) still loads where it did not use them.
REMOVED = {
    "online.relabel_weight": (0.0, "e703408", "relabelled plans"),
    "online.relabel_fraction": (None, "e703408", "relabelled plans"),
    "online.relabel_capacity": (None, "e703408", "relabelled plans"),
    "data.return_lookahead": (0, "770256c", "fall-aware return labels"),
}

# Fields added with a default other than what distdiff did before them, with the value that did
# that: a run resumed from a config saved before them (from_saved) goes on as it trained.
BEFORE = {
    "online.lr_scale": (lambda cfg: 1.0, "1354450"),
    "online.finish_updates": (lambda cfg: False, "1453667"),
    "online.offline_start_window_weight": (lambda cfg: cfg.data.start_window_weight, "68ed2b1"),
}


def from_saved(data: Dict[str, Any], log: Callable[[str], None] = print) -> Config:
    """The config a run saved (its checkpoint's), to go on training with: :func:`from_dict`,
    with the fields of :data:`BEFORE` it lacks set to what distdiff did before them, said in
    one line (with today's defaults instead, it would train on otherwise than it did)."""
    cfg = from_dict(data)
    filled = []
    for key, (value_of, commit) in BEFORE.items():
        section, name = key.split(".")
        if name not in (data.get(section) or {}):
            value = value_of(cfg)
            setattr(getattr(cfg, section), name, value)
            filled.append(f"{key} {value!r} (added in {commit})")
    if filled:
        log(f"the run's config is older than some fields; set to what distdiff did before them: {', '.join(filled)}")
    return cfg


def from_dict(data: Optional[Dict[str, Any]], base: Optional[Config] = None) -> Config:
    """Merge a nested dict into ``base`` (defaults if None); unknown keys are errors."""
    cfg, errors = _merge(data, base)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def _merge(data: Optional[Dict[str, Any]], base: Optional[Config]):
    cfg = dataclasses.replace(base) if base else Config()
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = _sections()
    errors = []
    for name, values in data.items():
        if name not in sections:
            errors.append(f"unknown section {name!r}; sections are {sorted(sections)}")
            continue
        if not isinstance(values, dict):
            errors.append(f"section {name!r} must be a mapping")
            continue
        section = dataclasses.replace(getattr(cfg, name))
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            if f"{name}.{key}" in REMOVED:
                off, commit, what = REMOVED[f"{name}.{key}"]
                if off is not None and value != off:
                    errors.append(f"{name}.{key} is {value!r}: distdiff dropped it ({what}) in {commit}; a run "
                                  f"that used it needs the distdiff before that commit")
                continue
            if key not in hints:
                errors.append(f"unknown field {name}.{key}; fields are {sorted(hints)}")
                continue
            try:
                setattr(section, key, _coerce(value, hints[key], f"{name}.{key}"))
            except ConfigError as e:
                errors.append(str(e))
        setattr(cfg, name, section)
    return cfg, errors


def _nest(overrides: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    nested: Dict[str, Dict[str, Any]] = {}
    for key, value in overrides.items():
        section, dot, name = key.partition(".")
        if not dot and isinstance(value, dict):  # a section's fields at once: {"guidance": {"scale": 0.1}}
            nested.setdefault(section, {}).update(value)
        else:
            nested.setdefault(section, {})[name] = value
    return nested


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading every number in exponent form (``1e-4``, ``1.5e3``) as a
    float, as YAML 1.2 does; YAML 1.1, which PyYAML follows, reads those without a dot or an
    exponent sign as text."""


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting text that :class:`_Loader` would read as a number (an
    ``actor_resource`` named ``1e3``), so that a saved config reads back as it was."""


EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _yaml_class in (_Loader, _Dumper):
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))


def read(path: str | Path, what: str = "config file") -> Any:
    """The YAML of a config file, as read (not yet merged or checked); an empty file is ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {_yaml_problem(e)}") from e
    return {} if data is None else data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line, at the file's line and column (its own text names the
    file "<unicode string>" and quotes it over several lines)."""
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return str(e).splitlines()[0]

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    context = f" ({e.context} at {at(e.context_mark)})" if e.context and e.context_mark is not None else ""
    return f"{at(e.problem_mark)}: {e.problem}{context}"


def load(path: Optional[str | Path] = None, overrides: Optional[Dict[str, Any]] = None, *, data: Any = None,
         base: Optional[Config] = None) -> Config:
    """Load a YAML config (defaults if ``path`` is None), apply overrides (dotted,
    ``{"guidance.scale": 0.1}``, or by section, ``{"guidance": {"scale": 0.1}}``), validate.
    ``data``: the file's YAML read earlier (:func:`read`), e.g. on another machine; ``path``
    then only names it in errors. ``base``: what the file and the overrides do not set, instead
    of the defaults (e.g. a checkpoint's config: ``load(None, overrides, base=planner.config)``)."""
    # A copy: a caller who edits the result in place must not edit ``base`` (a planner's config).
    cfg, errors = copy.deepcopy(base) if base is not None else Config(), []
    if path is not None:
        if data is None:
            data = read(path)
        if isinstance(data, dict) and "space" in data:
            # Not also each of its options as an unknown section.
            raise ConfigError(f"{path} looks like a Ray Tune sweep file (it has a `space:`): run it with "
                              f"python launch/tune.py --config {path}")
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections (e.g. `train: {{steps: 100}}`), "
                              f"got {type(data).__name__}")
        cfg, errors = _merge(data, cfg)
    if overrides:
        cfg, more = _merge(_nest(overrides), cfg)
        errors += more
    validate(cfg, errors)
    return cfg


def validate(cfg: Config, errors: Optional[List[str]] = None) -> None:
    """Raise one ConfigError listing every problem (``errors``: problems already found)."""
    from distdiff.diffusion.schedules import SCHEDULES  # torch-only, imported late to keep config light
    from distdiff.diffusion.gaussian import PREDICTIONS
    from distdiff.training import LR_SCHEDULES
    from distdiff.data.windows import VALUE_TARGETS
    from distdiff.data.minari_io import DATASET_ID, LOCAL_NAMESPACE
    from distdiff.nn.temporal import group_norm_problem
    from distdiff.normalizer import KINDS as NORMALIZERS
    from distdiff.planner import EXECUTIONS

    e: List[str] = list(errors or [])

    def need(cond: bool, msg: str):
        if not cond:
            e.append(msg)

    def value(key: str):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    # One message per field, with its value: a flag's error names the flag that is wrong.
    def at_least(minimum: int, *keys: str) -> None:
        for key in keys:
            need(value(key) >= minimum, f"{key} must be >= {minimum}, got {value(key)}")

    def positive(*keys: str) -> None:
        for key in keys:
            need(value(key) > 0, f"{key} must be positive, got {value(key)}")

    positive("env.obs_dim", "env.act_dim", "env.max_episode_steps")
    # Minari parses the -vN version only when it writes, after the fallback has been collected.
    need(bool(DATASET_ID.match(cfg.data.dataset_id)),
         f"data.dataset_id must look like namespace/name-vN (Minari needs the -vN version), got {cfg.data.dataset_id!r}")
    # Under local/: random-policy episodes stored under a remote's id would pass for its data.
    need(not cfg.data.fallback_dataset_id or bool(DATASET_ID.match(cfg.data.fallback_dataset_id))
         and cfg.data.fallback_dataset_id.startswith(LOCAL_NAMESPACE),
         f"data.fallback_dataset_id must be empty (no fallback) or look like {LOCAL_NAMESPACE}name-vN, got "
         f"{cfg.data.fallback_dataset_id!r}")
    need(cfg.data.normalizer in NORMALIZERS, f"data.normalizer must be one of {list(NORMALIZERS)}, got {cfg.data.normalizer!r}")
    at_least(0, "online.start_window_weight")
    positive("online.offline_start_window_weight", "data.start_window_weight")
    need(0.0 < cfg.data.discount <= 1.0, f"data.discount must be in (0, 1], got {cfg.data.discount}")
    need(cfg.data.value_target in VALUE_TARGETS, f"data.value_target must be one of {list(VALUE_TARGETS)}, got {cfg.data.value_target!r}")
    positive("model.horizon", "model.dynamics_dim")
    need(len(cfg.model.dim_mults) > 0 and all(m > 0 for m in cfg.model.dim_mults), "model.dim_mults must be positive integers")
    factor = 2 ** (len(cfg.model.dim_mults) - 1)
    if cfg.model.horizon > 0 and cfg.model.dim_mults:
        need(cfg.model.horizon % factor == 0, f"model.horizon {cfg.model.horizon} must be a multiple of {factor} for dim_mults {cfg.model.dim_mults}")
    for key in ("dim", "value_dim"):
        # Both nets embed the noise level sinusoidally: half sines, half cosines, over >= 2 frequencies.
        need(getattr(cfg.model, key) >= 4 and getattr(cfg.model, key) % 2 == 0,
             f"model.{key} must be an even number >= 4, got {getattr(cfg.model, key)}")
        trained = key == "dim" or cfg.train.train_value
        if trained and cfg.model.horizon > 0 and cfg.model.dim_mults and cfg.model.horizon % factor == 0 and all(
                m > 0 for m in cfg.model.dim_mults):
            problem = group_norm_problem(cfg.model.horizon, getattr(cfg.model, key), cfg.model.dim_mults,
                                         unet=key == "dim")
            net = "the denoiser" if key == "dim" else "the value net"
            need(not problem, f"model.{key} {getattr(cfg.model, key)} with model.horizon {cfg.model.horizon}: {problem} "
                              f"in {net}; raise either")
    need(not cfg.model.dim_mults or cfg.model.dim_mults[0] == 1,
         f"model.dim_mults must start with 1 (the U-Net's outer level has model.dim channels), got {cfg.model.dim_mults}")
    need(cfg.model.kernel_size >= 1 and cfg.model.kernel_size % 2 == 1, "model.kernel_size must be a positive odd number")
    # T = 1 leaves no posterior step to take variance from (q(x_{t-1} | x_t, x_0) needs t >= 1).
    need(cfg.diffusion.n_steps >= 2, f"diffusion.n_steps must be >= 2, got {cfg.diffusion.n_steps}")
    need(cfg.diffusion.schedule in SCHEDULES, f"diffusion.schedule must be one of {sorted(SCHEDULES)}, got {cfg.diffusion.schedule!r}")
    need(cfg.diffusion.prediction in PREDICTIONS, f"diffusion.prediction must be one of {list(PREDICTIONS)}, got {cfg.diffusion.prediction!r}")
    positive("diffusion.action_weight")
    at_least(0, "guidance.scale", "guidance.return_scale")
    at_least(1, "guidance.n_guide_steps", "guidance.n_candidates", "planner.dynamics_candidates")
    need(0.0 <= cfg.guidance.return_quantile <= 1.0, f"guidance.return_quantile must be in [0, 1], got {cfg.guidance.return_quantile}")
    need(0.0 <= cfg.train.condition_dropout < 1.0, f"train.condition_dropout must be in [0, 1), got {cfg.train.condition_dropout}")
    if cfg.model.returns_condition and cfg.guidance.return_scale != 1.0:
        need(cfg.train.condition_dropout > 0, "guidance.return_scale != 1 needs an unconditional model: one trained with "
                                              "train.condition_dropout > 0 (a checkpoint trained without has none)")
    need(cfg.guidance.n_candidates == 1 or cfg.planner.dynamics_candidates == 1,
         "choose plans by value (guidance.n_candidates > 1) or by dynamics (planner.dynamics_candidates > 1), not both")
    if cfg.planner.dynamics_candidates > 1:
        need(cfg.train.train_dynamics, "planner.dynamics_candidates > 1 needs the dynamics model: train.train_dynamics true "
                                       "(a checkpoint trained without it has none)")
    # A window of one row holds no transition: the dynamics model would learn nothing and rank by NaN.
    need(cfg.model.horizon >= 2 or not cfg.train.train_dynamics,
         f"train.train_dynamics needs model.horizon >= 2 (a window of {cfg.model.horizon} row holds no transition)")
    need(cfg.planner.dynamics_rank in ("error", "value"), f"planner.dynamics_rank must be error or value, got {cfg.planner.dynamics_rank!r}")
    if cfg.planner.dynamics_candidates > 1 and cfg.planner.dynamics_rank == "value":
        need(cfg.train.train_value, "planner.dynamics_rank value needs the value net: train.train_value true (a "
                                    "checkpoint trained without it has none)")
    if cfg.guidance.scale > 0 or cfg.guidance.n_candidates > 1:
        need(cfg.train.train_value, "guidance (scale > 0 or n_candidates > 1) needs the value net: train.train_value "
                                    "true (a checkpoint trained without it has none)")
    if cfg.guidance.scale > 0:
        need(0 <= cfg.guidance.t_stopgrad < cfg.diffusion.n_steps,
             f"guidance.t_stopgrad must be in [0, diffusion.n_steps={cfg.diffusion.n_steps}) when guidance.scale > 0: "
             "no noise level would be guided")
    need(cfg.planner.sampler in ("ddpm", "ddim"), f"planner.sampler must be ddpm or ddim, got {cfg.planner.sampler!r}")
    need(1 <= cfg.planner.ddim_steps <= cfg.diffusion.n_steps,
         f"planner.ddim_steps must be in [1, diffusion.n_steps={cfg.diffusion.n_steps}], got {cfg.planner.ddim_steps}")
    need(0.0 <= cfg.planner.ddim_eta <= 1.0, f"planner.ddim_eta must be in [0, 1], got {cfg.planner.ddim_eta}")
    need(cfg.planner.execution in EXECUTIONS, f"planner.execution must be one of {list(EXECUTIONS)}, got {cfg.planner.execution!r}")
    need(1 <= cfg.planner.replan_every <= cfg.model.horizon,
         f"planner.replan_every must be in [1, model.horizon={cfg.model.horizon}], got {cfg.planner.replan_every}")
    at_least(0, "train.steps", "train.warmup_steps", "data.fallback_episodes")
    at_least(1, "train.batch_size", "train.ema_every", "train.log_every", "train.checkpoint_every", "train.num_threads")
    positive("train.lr", "train.value_lr", "train.dynamics_lr")
    need(cfg.train.lr_schedule in LR_SCHEDULES, f"train.lr_schedule must be one of {list(LR_SCHEDULES)}, got {cfg.train.lr_schedule!r}")
    need(0.0 <= cfg.train.lr_min_ratio <= 1.0, f"train.lr_min_ratio must be in [0, 1], got {cfg.train.lr_min_ratio}")
    need(0.0 <= cfg.train.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay}")
    need(cfg.train.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {cfg.train.device!r}")
    need(cfg.train.precision in ("fp32", "bf16"), f"train.precision must be fp32 or bf16, got {cfg.train.precision!r}")
    need(cfg.train.compile in ("none", "default", "reduce-overhead"),
         f"train.compile must be none, default or reduce-overhead, got {cfg.train.compile!r}")
    # Seeds feed numpy's SeedSequence and Gymnasium's reset, which take non-negative integers.
    for key, seed in (("train.seed", cfg.train.seed), ("eval.seed", cfg.eval.seed)):
        need(0 <= seed < 2**63, f"{key} must be in [0, 2**63), got {seed}")
    at_least(1, "eval.episodes", "eval.num_envs")
    refs = cfg.eval.reference_returns
    need(refs == () or usable_references(refs),
         f"eval.reference_returns must be empty or two finite returns, random below expert, got {list(refs)}")
    at_least(0, "eval.num_actors")
    o = cfg.online
    at_least(1, "online.num_actors", "online.envs_per_actor", "online.updates_per_call", "online.broadcast_every",
             "online.measure_every", "online.checkpoint_every", "online.figure_every", "online.max_nonfinite")
    budgets = ("online.env_steps", "online.updates", "online.wall_time_s")
    at_least(0, "online.actor_num_cpus", "online.learner_num_cpus", *budgets, "online.updates_per_env_step",
             "online.eval_every", "online.return_weighting")
    # Ray refuses reservations finer than 1e-4 of a CPU or GPU.
    for key in ("actor_num_cpus", "learner_num_cpus", "learner_num_gpus"):
        amount = getattr(o, key)
        need(not 0 < amount < 1e-4, f"online.{key} must be 0 or at least 0.0001 (Ray's finest share), got {amount}")
    need(o.actor_max_restarts >= -1, f"online.actor_max_restarts must be >= -1 (-1: unlimited), got {o.actor_max_restarts}")
    for key in ("learner_resource", "actor_resource"):
        name = getattr(o, key)
        need(name == "" or (name.strip() == name and name not in ("CPU", "GPU", "memory", "object_store_memory") and not name.startswith("node:")),
             f"online.{key} must be empty or a custom resource name (not CPU, GPU, memory, object_store_memory, node:..., no surrounding spaces), got {name!r}")
    if all(value(key) >= 0 for key in budgets):  # (a negative one is said above)
        need(o.env_steps > 0 or o.updates > 0 or o.wall_time_s > 0, "online needs a budget: env_steps, updates or wall_time_s")
    need(o.updates_per_env_step > 0 or o.updates <= 0 or o.env_steps > 0 or o.wall_time_s > 0,
         "online.updates is the only budget but online.updates_per_env_step is 0: no update would ever run")
    need(o.max_update_lag >= o.updates_per_call,
         f"online.max_update_lag must be >= online.updates_per_call ({o.updates_per_call}), got {o.max_update_lag}")
    need(o.replay_capacity >= cfg.model.horizon,
         f"online.replay_capacity must hold at least one horizon ({cfg.model.horizon}), got {o.replay_capacity}")
    need(0.0 <= o.offline_ratio <= 1.0, f"online.offline_ratio must be in [0, 1], got {o.offline_ratio}")
    need(o.lr_scale > 0, f"online.lr_scale must be positive, got {o.lr_scale}")
    need(0.0 <= o.prior_weight < 1.0, f"online.prior_weight must be in [0, 1), got {o.prior_weight}")
    need(o.rollout_timeout_s >= 0, f"online.rollout_timeout_s must be >= 0 (0: no limit), got {o.rollout_timeout_s}")
    need(o.learner_timeout_s >= 0, f"online.learner_timeout_s must be >= 0 (0: no limit), got {o.learner_timeout_s}")
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))


@functools.lru_cache(maxsize=None)
def _made(env_id: str):
    """``(problem, (observation shape, action shape), replayable)``: why ``env_id`` cannot be made
    here ("" if it can): unknown, or its simulator is not installed (Gymnasium's v2/v3 MuJoCo envs
    need mujoco-py), or a MUJOCO_GL that MuJoCo does not import with; and whether plans can be
    replayed in it to measure their alignment error (:func:`distdiff.rollout.can_replay`)."""
    import gymnasium as gym

    from distdiff.rollout import can_replay

    try:
        made = gym.make(env_id)
        shapes = made.observation_space.shape, made.action_space.shape
        replayable = can_replay(made)
        made.close()
    except Exception as e:  # a probe: whatever stops it here would stop every rollout actor
        # MuJoCo reads MUJOCO_GL on import: a backend set for rendering elsewhere (osmesa, egl)
        # that is not installed here stops every env, with an error about OpenGL.
        gl = os.environ.get("MUJOCO_GL")
        problem = _import_problem("mujoco") if gl else ""
        why = (f"MuJoCo does not import with MUJOCO_GL={gl} ({problem}): unset MUJOCO_GL, or install that backend "
               f"(training and evaluation do not render; launch/visualize.py picks an installed one where it is "
               f"unset)") if problem else f"{type(e).__name__}: {e}"
        return why, None, False
    return "", shapes, replayable


def env_problem(env: EnvConfig) -> str:
    """Why ``env`` cannot be trained here ("" if it can): its id cannot be made (:func:`_made`),
    or its spaces have other sizes than ``obs_dim``/``act_dim``."""
    why, shapes, _ = _made(env.id)
    if why:
        return f"env.id {env.id!r} cannot be made here: {why}"
    if shapes != ((env.obs_dim,), (env.act_dim,)):
        # Found otherwise at the dataset, after Ray starts, or in the rollout actors, after pretraining.
        return (f"env.id {env.id!r} has observations of shape {shapes[0]} and actions of shape {shapes[1]}, the "
                f"config's env.obs_dim and env.act_dim are {env.obs_dim} and {env.act_dim}: pass --env.obs_dim and "
                f"--env.act_dim")
    return ""


def alignment_problem(env_id: str) -> str:
    """Why the alignment error cannot be measured in ``env_id`` ("" if it can, or if the env
    cannot be made at all, which :func:`check_trainable` reports on its own)."""
    why, _, replayable = _made(env_id)
    if why or replayable:
        return ""
    return (f"env.id {env_id!r} is not a MuJoCo env: the alignment error replays each plan's actions in a copy "
            f"of the env set to the real one's physics state, which only MuJoCo envs allow")


def usable_references(pair) -> bool:
    """Whether ``pair`` can be a normalized score's (random, expert) returns: two finite numbers,
    random below expert."""
    return len(pair) == 2 and all(map(math.isfinite, pair)) and pair[0] < pair[1]


def reference_returns(cfg: Config) -> Tuple[Optional[float], Optional[float]]:
    """The (random, expert) returns that ``cfg``'s normalized score is measured between:
    ``eval.reference_returns``, else D4RL's for its env, else (None, None): no score."""
    from distdiff.data.minari_io import reference_scores

    if cfg.eval.reference_returns:
        low, high = cfg.eval.reference_returns
        return low, high
    return reference_scores(cfg.env.id)


def _import_problem(module: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as e:  # whatever the module raises on import
        return f"{type(e).__name__}: {e}"
    return ""


def dataset_problems(cfg: Config) -> List[str]:
    """``data.dataset_id`` and ``data.fallback_dataset_id`` that name another env than
    ``env.id`` (``local/walker2d/random-v0`` for Hopper-v5): refused before any work. Later, the
    dataset is refused only once it is downloaded, and a fallback collected under another env's
    name would be refused by every run of that env."""
    from distdiff.data.minari_io import local_id, other_env_named

    problems = []
    for key in ("dataset_id", "fallback_dataset_id"):
        dataset_id = getattr(cfg.data, key)
        other = other_env_named(dataset_id, cfg.env.id) if dataset_id else None
        if other:
            problems.append(f"data.{key} {dataset_id!r} names {other}, and env.id is {cfg.env.id}: pass --data.{key} "
                            f"with a dataset of {cfg.env.id} (e.g. {local_id(cfg.env.id)})")
    return problems


def nonfinite_problems(cfg: Config, keys: Optional[Iterable[str]] = None) -> List[str]:
    """The fields of ``cfg`` (or of them, ``keys``) that are NaN or infinite. NaN passes every
    comparison of validate, and an infinity most; only two fields mean something by one (no
    clipping, no time limit). Not part of validate: old checkpoints with others still load."""
    problems = []
    for key in keys if keys is not None else [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
                                               for f in dataclasses.fields(getattr(cfg, s.name))]:
        value = value_of(cfg, key)
        if isinstance(value, float) and not math.isfinite(value) and not (
                math.isinf(value) and value > 0 and key in ("train.grad_clip", "online.wall_time_s")):
            problems.append(f"{key} must be a finite number, got {value}")
    return problems


def check_trainable(cfg: Config) -> None:
    """What training needs of a config beyond :func:`validate`: not part of it, since the configs
    of checkpoints saved before these checks must still load to be evaluated. The env is made
    once here, before any work, not first in every rollout actor after pretraining."""
    errors = nonfinite_problems(cfg)
    o = cfg.online
    if not (0 <= o.learner_num_gpus <= 1 or o.learner_num_gpus == -1):
        errors.append(f"online.learner_num_gpus must be in [0, 1] (the learner trains on one GPU), or -1 for one if "
                      f"the cluster has any, got {o.learner_num_gpus}")
    if o.replay_capacity < cfg.env.max_episode_steps:
        errors.append(f"online.replay_capacity ({o.replay_capacity}) must hold a whole episode "
                      f"(env.max_episode_steps={cfg.env.max_episode_steps}): pass --online.replay_capacity")
    problem = env_problem(cfg.env)
    if problem:
        errors.append(problem)
    errors.extend(dataset_problems(cfg))
    problem = alignment_problem(cfg.env.id)
    if problem:
        errors.append(f"{problem} (phase 2 measures it on every run)")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def as_written(ratio: float) -> Fraction:
    """A config's ratio as its decimal reads: products of counts with the float round some
    whole numbers down (0.29 × 100,000 is 28,999.99…)."""
    return Fraction(str(float(ratio)))


def updates_for(cfg: Config, env_steps: int) -> int:
    """The learner updates that ``env_steps`` env steps call for (``online.updates_per_env_step``)."""
    return int(as_written(cfg.online.updates_per_env_step) * env_steps)


def value_of(cfg: Config, name: str) -> Any:
    """A field's value by its dotted name (``section.field``)."""
    section, key = name.split(".")
    return getattr(getattr(cfg, section), key)


def differences(ran: Config, given: Config) -> List[Tuple[str, Any, Any]]:
    """``(field, value in ran, value in given)`` for each field whose value differs between the
    config a run ran with and ``given``, save a ``data.dataset_id`` the run recorded as
    ``given``'s fallback (it trained on that where the configured dataset could not be had, and
    said so in its config)."""
    ran_d, given_d = ran.to_dict(), given.to_dict()
    out = []
    for section, fields in given_d.items():
        for name, value in fields.items():
            before = ran_d[section][name]
            fell_back = (section, name) == ("data", "dataset_id") and before == given.data.fallback_dataset_id
            if before != value and not fell_back:
                out.append((f"{section}.{name}", before, value))
    return out


def changed_fields(ran: Config, given: Config) -> List[str]:
    """``field RAN there, GIVEN here`` for each of :func:`differences`."""
    return [f"{key} {before!r} there, {value!r} here" for key, before, value in differences(ran, given)]


def net_fields() -> List[str]:
    """The fields a checkpoint's nets were made with: their shapes (env dims, model) and the noise
    levels the denoiser learned to read and undo (the schedule, its steps, what it predicts). A
    run, resume or planner from the checkpoint keeps them: nets of the same shapes load under
    another schedule, and denoise wrong."""
    return ["env.obs_dim", "env.act_dim", *(f"model.{f.name}" for f in dataclasses.fields(ModelConfig)),
            "diffusion.n_steps", "diffusion.schedule", "diffusion.prediction"]


# Acting fields that only a training run reads, with what a caller judging a checkpoint has instead.
TRAINING_ONLY = {"eval.num_actors": "its parallel rollout actors are --num-actors"}


def acting_fields() -> List[str]:
    """The fields that change how a trained checkpoint acts, which judging it may override. The
    others made its nets (model, diffusion schedule, normalizer, value target) or train them."""
    acting = ["env.max_episode_steps", "diffusion.clip_denoised", "online.prior_weight", "train.num_threads"]
    acting += [f"{name}.{f.name}" for name in ("guidance", "planner", "eval") for f in dataclasses.fields(_sections()[name])
               if f"{name}.{f.name}" not in TRAINING_ONLY]
    return acting


def add_arguments(parser: argparse.ArgumentParser, *, from_checkpoint: bool = False) -> None:
    """Add ``--config`` and one ``--section.field`` flag per config field, with its help. With
    ``from_checkpoint`` the flags override a checkpoint's config, only those of
    :func:`acting_fields` are shown, and there is no ``--config``; the others still parse, so
    that the caller can refuse them with a reason (:func:`refused_overrides`)."""
    if not from_checkpoint:
        parser.add_argument("--config", type=Path, default=None, help="YAML config file (defaults are used for missing fields).")
    shown = acting_fields() if from_checkpoint else None
    for name, section_type in _sections().items():
        group = parser.add_argument_group(f"{name} (config section)")
        hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            default = "the checkpoint's" if from_checkpoint else "empty" if f.default in ((), "") else f.default
            metavar = {bool: "BOOL", int: "INT", float: "FLOAT", Tuple[int, ...]: "INT,INT,...",
                       Tuple[float, ...]: "FLOAT,FLOAT"}.get(hints[f.name], "VALUE")
            # argparse %-formats help strings: a literal % (as in "36 % closer") must be doubled.
            text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
            if shown is not None and f"{name}.{f.name}" not in shown:
                text = argparse.SUPPRESS
            group.add_argument(f"--{name}.{f.name}", dest=f"cfg__{name}__{f.name}", default=None, metavar=metavar,
                               help=text)


def field_value(key: str, value: Any) -> Any:
    """``value`` (a flag's text, or a value) as the field ``key`` (``section.field``) takes it;
    ConfigError where it cannot."""
    section, name = key.split(".")
    return _coerce(value, typing.get_type_hints(type(getattr(Config(), section)))[name], key)


def given_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``--section.field`` flags given (as text), by dotted field name."""
    return {key.removeprefix("cfg__").replace("__", "."): value for key, value in vars(args).items()
            if key.startswith("cfg__") and value is not None}


def refused_overrides(args: argparse.Namespace) -> List[str]:
    """The ``--section.field`` flags given that are not :func:`acting_fields`: a checkpoint's nets
    were made and trained with its own, so overriding them would change nothing or misread it."""
    acting = set(acting_fields())
    return [f"--{key}" for key in given_overrides(args) if key not in acting]


# Fields that act only under another field's setting: (fields, whether it holds, what it is).
INERT_UNLESS: Tuple[Tuple[Tuple[str, ...], Callable[[Config], bool], str], ...] = (
    (("guidance.return_quantile", "guidance.return_scale", "train.condition_dropout"),
     lambda c: c.model.returns_condition, "model.returns_condition true"),
    (("guidance.n_guide_steps", "guidance.t_stopgrad", "guidance.scale_grad_by_std"),
     lambda c: c.guidance.scale > 0, "guidance.scale > 0"),
    (("planner.ddim_steps", "planner.ddim_eta"), lambda c: c.planner.sampler == "ddim", "planner.sampler ddim"),
    (("planner.replan_every",), lambda c: c.planner.execution == "receding", "planner.execution receding"),
    (("planner.dynamics_rank",), lambda c: c.planner.dynamics_candidates > 1, "planner.dynamics_candidates > 1"),
    (("train.warmup_steps", "train.lr_min_ratio"), lambda c: c.train.lr_schedule == "cosine", "train.lr_schedule cosine"),
    (("train.value_lr",), lambda c: c.train.train_value, "train.train_value true"),
    (("train.dynamics_lr",), lambda c: c.train.train_dynamics, "train.train_dynamics true"),
)


# Fields that only phase 1 (offline pretraining) reads: launch/train.py --init skips it, and took
# a flag for one of them without a word. (The normalizer is fit there; phase 2 keeps the prior's.)
PHASE_1_ONLY = ("train.steps", "train.lr_schedule", "train.warmup_steps", "train.lr_min_ratio", "train.log_every",
                "train.checkpoint_every", "train.device", "data.start_window_weight", "data.normalizer")


def inert_flags(cfg: Config, given) -> List[str]:
    """Why each of the ``given`` fields (dotted names) would change nothing under ``cfg``, if any
    would: a flag for one of them was taken without a word. Flags only: a config file or a
    sweep's space may set them all alike, whatever else it sets."""
    problems = []
    for fields, holds, needs in INERT_UNLESS:
        named = [f"--{key}" for key in fields if key in given]
        if named and not holds(cfg):
            problems.append(f"{', '.join(named)} would do nothing: {'they act' if len(named) > 1 else 'it acts'} "
                            f"only with {needs}")
    return problems


def from_args(args: argparse.Namespace, base: Optional[Config] = None) -> Config:
    """Build the config from ``--config`` (or ``base``, e.g. a checkpoint's) and the ``--section.field`` flags.
    Refuses flags that would do nothing under the config they make (:func:`inert_flags`)."""
    overrides = given_overrides(args)
    if base is None:
        path = getattr(args, "config", None)
        data = read(path) if path is not None else None
        if data == {}:
            # (The defaults, as for no file; said, in case the wrong file was given.)
            print(f"warning: config file {path} sets nothing: the defaults are used", file=sys.stderr)
        cfg = load(path, overrides, data=data)
    else:
        cfg, errors = _merge(_nest(overrides), base)
        validate(cfg, errors)
    # NaN or infinite flags, before any work (--guidance inf planned NaN, blamed on the checkpoint;
    # --train.grad_clip nan switched clipping off): those of a checkpoint's config still load.
    problems = inert_flags(cfg, overrides) + nonfinite_problems(cfg, overrides)
    if problems:
        raise ConfigError("invalid flags:\n  " + "\n  ".join(problems))
    return cfg


def is_config_file(path: str | Path) -> bool:
    """Whether ``path`` holds a distdiff config: a mapping of some of its sections, as
    :func:`save` writes one (not whether its values are valid)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and bool(data) and set(data) <= set(_sections())


def save(cfg: Config, path: str | Path) -> None:
    files.write_text(Path(path), yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False))


def to_markdown(cfg: Config) -> str:
    """The config as a markdown table of ``section.field | value``: TensorBoard's Text tab shows
    it beside the run's curves (as CleanRL logs its hyperparameters)."""
    rows = [f"|{section}.{key}|{json.dumps(value)}|" for section, fields in cfg.to_dict().items()
            for key, value in fields.items()]
    return "\n".join(["|field|value|", "|-|-|", *rows])
