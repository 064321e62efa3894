"""Ray Tune sweeps over any config field: the search space lives in YAML.

A sweep file names a base config, fixed overrides, the space (dotted config names → a domain),
the per-trial resources and the scheduler, and may name a checkpoint that every trial starts
phase 2 from. Each trial runs :func:`distdiff.distributed.driver.train` as a function, inside a
placement group that holds its driver, learner and rollout actors, and reports every evaluation
to Tune with the checkpoint of the same weights.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import shutil
import socket
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Float, Sampler

from distdiff import config as config_lib
from distdiff.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from distdiff.config import Config, ConfigError
from distdiff.data.minari_io import REFERENCE_SCORES
from distdiff.files import finite, write_json, write_text
from distdiff.rundir import BEST, BEST_EVAL, BEST_METRICS, CHECKPOINT, REPLAY, checkpoint_file, holds_run
from distdiff.training import VALUE_TARGET_FIELDS, check_dynamics, check_made_with, planner_from_checkpoint

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "pbt", "fifo")
# What trial_config takes from the sweep's resources, overriding the base config.
RESOURCE_FIELDS = ("online.actor_num_cpus", "online.learner_num_cpus", "online.learner_num_gpus")
# What a sweep refuses, and why.
CUSTOM_RESOURCE_FIELDS = ("online.actor_resource", "online.learner_resource")
CUSTOM_RESOURCE_WHY = ("a trial's actors are placed in its placement group, whose bundles hold only the CPUs and GPUs "
                       "of the sweep's `resources:`, so an actor that asks for a custom resource is never placed and "
                       "the trial waits forever; a sweep places its actors through `resources:`")
TRAIN_SEED = "train.seed"  # drawn per trial unless the sweep sets it (param_space)
REPORTED = ("normalized_score", "alignment_error", "return_mean", "return_std", "env_steps", "updates", "weights_version",
            "final")
TIME_ATTR = "updates"  # the schedulers' time (make_scheduler)
RECORD = "distdiff_sweep.json"  # what a sweep started with, in STORAGE/NAME (sweep_record, and its COUNTS)
REPORTED_BY = "trial_id"  # in each checkpoint a trial reports: that trial's id (trial_start)
REPORTED_EVALUATION = "evaluation.json"  # and its evaluation's figures, as best.json holds them
COUNTS = "counts"  # the record's num_samples and max_concurrent, which Tune keeps: not compared on a resume
PINNED = "distdiff_dataset.json"  # the fields that fixed the dataset of its trials (pinned_dataset)
SHARED_STORAGE = ("a sweep over more than one node needs its --storage on a filesystem that every node mounts at "
                  "the same path (README, \"Sweeps (Ray Tune)\")")
# The mode of the metrics that have a better end: the other one would rank the worst trial first.
BETTER = {"normalized_score": "max", "return_mean": "max", "alignment_error": "min"}
# The fields that set a trial's budget, which ASHA's one max_t must match.
BUDGET_FIELDS = ("online.env_steps", "online.updates", "online.updates_per_env_step", "online.wall_time_s")
# The schedulers' numeric options, which Ray checks with bare asserts or not at all.
SCHEDULER_RANGES = {
    ("asha", "grace_period"): (">= 1", lambda v: v >= 1),
    ("asha", "max_t"): (">= 1", lambda v: v >= 1),
    ("asha", "reduction_factor"): ("> 1", lambda v: v > 1),
    ("asha", "brackets"): (">= 1", lambda v: v >= 1),
    ("pbt", "perturbation_interval"): ("> 0", lambda v: v > 0),
    ("pbt", "quantile_fraction"): ("in [0, 0.5]", lambda v: 0 <= v <= 0.5),
    ("pbt", "resample_probability"): ("in [0, 1]", lambda v: 0 <= v <= 1),
}


@dataclass
class TrialResources:
    """A trial's placement group, which replaces its config's CPU and GPU sizes."""

    driver_cpus: float = 0.25  # the trial's own process: phase 1, the driver loop, evaluations
    learner_cpus: float = 0.5
    learner_gpus: float = 0.0
    actor_cpus: float = 0.25  # per rollout actor (online.num_actors of them)

    def bundles(self, num_actors: int) -> List[Dict[str, float]]:
        learner = {"CPU": self.learner_cpus, **({"GPU": self.learner_gpus} if self.learner_gpus else {})}
        return [{"CPU": self.driver_cpus}, learner] + [{"CPU": self.actor_cpus} for _ in range(num_actors)]


@dataclass
class SweepSpec:
    """A sweep file (README's Sweeps section documents each option; configs/tune.yaml shows them)."""

    base: Optional[str] = None  # the trials' base config file, relative to the sweep file
    # A checkpoint (or run dir), relative to the sweep file, that every trial starts phase 2
    # from: no trial pretrains. Its config is the base where `base` is not given.
    init: Optional[str] = None
    fixed: Dict[str, Any] = field(default_factory=dict)  # `section.field` overrides of every trial
    space: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # `section.field` -> domain (DOMAINS)
    name: str = "distdiff-tune"  # the sweep's directory under --storage
    metric: str = "normalized_score"  # what the schedulers and best_config.yaml rank by (one of REPORTED)
    mode: str = "max"
    num_samples: int = 4  # draws of the space (each grid point that many times)
    max_concurrent: int = 2  # trials at once
    seed: int = 0  # seeds the draws of the space
    scheduler: str = "asha"  # SCHEDULERS
    # Keyword arguments of Ray's ASHAScheduler and PopulationBasedTraining, times in learner
    # updates; what is left out comes from the trial config (scheduler_options).
    asha: Dict[str, Any] = field(default_factory=dict)
    pbt: Dict[str, Any] = field(default_factory=lambda: {"mutations": []})
    resources: TrialResources = field(default_factory=TrialResources)
    # Tune's retries of a trial that failed, whatever the error, from its last reported checkpoint.
    max_failures: int = 0
    # The base config file's YAML, read once where the sweep starts: a trial on another node
    # may not have that file, or may have another version of it. None: not read (the file is
    # read where the config is needed).
    base_yaml: Any = field(default=None, init=False, repr=False)
    # `init`'s contents, read once where the sweep starts, for trials on any node.
    init_state: Any = field(default=None, init=False, repr=False)

    def trial_config(self, params: Dict[str, Any]) -> Config:
        """base + fixed + the trial's params, with actor sizes that match the placement group."""
        r = self.resources
        sizes = dict(zip(RESOURCE_FIELDS, (r.actor_cpus, r.learner_cpus, r.learner_gpus)))
        return self.train_config({**params, **sizes})

    def train_config(self, params: Dict[str, Any]) -> Config:
        """The trial's config as launch/train.py runs it: the sizes the base config gives, not the
        trial's share of a placement group (a learner of learner_gpus 0 would stay on the CPU)."""
        return config_lib.load(self.base or self.init, {**self.fixed, **params}, data=self.base_yaml)


def config_field_types() -> Dict[str, Any]:
    """Each config field's type, by its dotted name."""
    defaults = Config()
    return {f"{s.name}.{name}": tp for s in dataclasses.fields(defaults)
            for name, tp in typing.get_type_hints(type(getattr(defaults, s.name))).items()}


def _check_resources(r: TrialResources) -> List[str]:
    errors = [f"resources.{k} must be a number >= 0, got {v!r}" for k, v in dataclasses.asdict(r).items()
              if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf]
    if errors:
        return errors
    # Ray refuses a placement group bundle of zeros. The driver's may be empty: Tune then runs
    # the trial function without a reservation.
    if r.actor_cpus == 0:
        # An actor_num_cpus of 0 would also size the actors from the cluster's free CPUs, not their bundle.
        errors.append("resources.actor_cpus must be > 0: each rollout actor runs in a bundle of that many CPUs")
    if r.learner_cpus == 0 and r.learner_gpus == 0:
        errors.append("resources: the learner runs in a bundle of learner_cpus CPUs and learner_gpus GPUs, and needs "
                      "learner_cpus > 0 or learner_gpus > 0")
    return errors


def _check_domain(key: str, dom: Any, integer: bool) -> List[str]:
    if not isinstance(dom, dict) or len(set(dom) & set(DOMAINS)) != 1:
        return [f"space.{key}: give exactly one of {list(DOMAINS)} (e.g. {{choice: [a, b]}}), got {dom!r}"]
    extra = set(dom) - set(DOMAINS) - {"zero"}
    if extra:
        return [f"space.{key}: unknown options {sorted(extra)}"]
    kind = next(k for k in DOMAINS if k in dom)
    arg = dom[kind]
    if integer and kind in ("uniform", "loguniform"):
        return [f"space.{key}: {kind} draws real numbers, but {key} is an integer; use {{randint: [low, high]}} "
                "(inclusive) or {choice: [...]}"]
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            return [f"space.{key}: {kind} needs a non-empty list"]
    elif not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(v) for v in arg) and arg[0] < arg[1]):
        return [f"space.{key}: {kind} needs [low, high] with low < high, got {arg!r}"]
    elif kind == "loguniform" and arg[0] <= 0:
        return [f"space.{key}: loguniform needs low > 0 (add `zero: P` to also try 0 with probability P)"]
    elif kind == "randint" and not all(float(v).is_integer() for v in arg):
        # Tune's randint truncates them: [0.5, 2.5] would draw 0, 1 and 2.
        return [f"space.{key}: randint draws integers and needs whole-number bounds, got {arg!r}"]
    if "zero" in dom and (kind != "loguniform" or not _is_number(dom["zero"]) or not 0 < dom["zero"] < 1):
        return [f"space.{key}: `zero` (the probability of an exact 0) goes with loguniform and must be a number in "
                f"(0, 1), got {dom['zero']!r}"]
    return []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _examples(dom: Dict[str, Any]) -> List[Any]:
    """Values of a domain that the sweep is checked with before any trial: its values, or its
    bounds; a randint's first 8 integers too, which meet every residue a rule of parity or of
    multiples (the horizon's 2, 4 or 8) can refuse between the bounds."""
    kind = next(k for k in DOMAINS if k in dom)
    values = list(dom[kind])
    if kind == "randint":
        lo, hi = (int(v) for v in values)
        values = sorted({*range(lo, min(hi, lo + 7) + 1), hi})
    return values + ([0.0] if "zero" in dom else [])


# Up to this many, every combination of the space's example values is checked before any
# trial, not only each pair: rules over three fields (returns_condition, return_scale,
# condition_dropout) refuse some points whose pairs all pass.
ALL_COMBINATIONS_MAX = 512


def _check_metric(spec: SweepSpec, configs: List[Config]) -> List[str]:
    """Trials report only the metrics they have, and Tune stops the whole sweep at a report
    that lacks its metric: refuse a metric that some trial could never report."""
    if spec.metric == "normalized_score":
        envs = sorted({c.env.id for c in configs if config_lib.reference_returns(c)[0] is None})
        if envs:
            return [f"metric normalized_score: env.id {', '.join(envs)} has no reference returns (D4RL's are known for "
                    f"{', '.join(sorted(REFERENCE_SCORES))}), so its trials would report no normalized_score and Tune "
                    "would stop the sweep at their first report: give them under `fixed` (eval.reference_returns: "
                    "[RANDOM, EXPERT]), or use metric return_mean"]
    if spec.metric == "alignment_error" and not all(c.eval.measure_alignment for c in configs):
        return ["metric alignment_error is measured only with eval.measure_alignment true, and this sweep's trials "
                "can have it false: they would report none and Tune would stop the sweep at their first report; "
                "set eval.measure_alignment true (under `fixed`) or use another metric"]
    return []


def _read_spec(path: Path, overrides: Dict[str, Any]) -> Tuple[SweepSpec, List[str]]:
    """The sweep file's options, of the right types, with its ``base`` and ``init`` read; the
    problems found so far (raised at once where the options could not be read)."""
    raw = config_lib.read(path, what="sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path} must be a mapping of sweep options, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw = {k: v for k, v in raw.items() if v is not None}  # an empty option: its default
    known = {f.name for f in dataclasses.fields(SweepSpec) if f.init}
    unknown = [k for k in raw if k not in known]
    if unknown and set(unknown) <= {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"{path} looks like a training config (it has {', '.join(f'`{k}:`' for k in unknown)}): "
                          f"train with python launch/train.py --config {path}, or name it as a sweep file's `base:`")
    errors = [f"unknown sweep option {k!r}; options are {sorted(known)}" for k in unknown]
    # Types first: a wrong one would otherwise fail as a TypeError deep in SweepSpec or the scheduler.
    for key, kind in (("fixed", dict), ("space", dict), ("asha", dict), ("pbt", dict), ("resources", dict),
                      ("num_samples", int), ("max_concurrent", int), ("seed", int), ("name", str), ("metric", str),
                      ("mode", str), ("scheduler", str), ("base", str), ("init", str), ("max_failures", int)):
        if key in raw and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            errors.append(f"{key} must be {({dict: 'a mapping', int: 'an integer', str: 'a string'})[kind]}, got {raw[key]!r}")
    if errors:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(errors))
    res = raw.pop("resources", {})
    try:
        resources = TrialResources(**res)
    except TypeError as e:
        raise ConfigError(f"invalid sweep resources {res!r}: {e}") from None
    errors += _check_resources(resources)
    spec = SweepSpec(**raw, resources=resources)
    if spec.base is not None:
        spec.base = str((path.parent / spec.base).resolve())
        try:
            spec.base_yaml = config_lib.read(spec.base)
        except ConfigError as e:
            errors.append(str(e))
    if spec.init is not None:
        spec.init = str((path.parent / spec.init).resolve())
        try:
            spec.init_state = load_checkpoint(spec.init)
        except CheckpointError as e:
            errors.append(f"init: {e}")
        else:
            if spec.base is None:
                spec.base_yaml = spec.init_state["config"]
    return spec, errors


def _option_errors(spec: SweepSpec) -> List[str]:
    """What is wrong with the sweep's options, each on its own: values, field names, scheduler
    options."""
    errors: List[str] = []
    if spec.max_failures < 0:
        # (Tune's -1, no end, would retry an error of the trial's own for ever.)
        errors.append(f"max_failures must be >= 0, got {spec.max_failures}")
    if spec.scheduler not in SCHEDULERS:
        errors.append(f"scheduler must be one of {list(SCHEDULERS)}, got {spec.scheduler!r}")
    if spec.mode not in ("max", "min"):
        errors.append(f"mode must be max or min, got {spec.mode!r}")
    elif BETTER.get(spec.metric, spec.mode) != spec.mode:
        errors.append(f"mode {spec.mode} with metric {spec.metric}: the schedulers would keep and best_config.yaml "
                      f"would pick the worst trials; use mode {BETTER[spec.metric]}")
    if spec.metric not in REPORTED:
        errors.append(f"metric must be one of {list(REPORTED)}, got {spec.metric!r}")
    if not spec.space:
        errors.append("the space is empty: name at least one config field to sweep")
    if not isinstance(spec.name, str) or not spec.name or "/" in spec.name or spec.name in (".", ".."):
        errors.append(f"name must name one directory under --storage (no '/'), got {spec.name!r}")
    errors += [f"{k} must be >= 1, got {v}" for k, v in (("num_samples", spec.num_samples),
                                                          ("max_concurrent", spec.max_concurrent)) if v < 1]
    if spec.seed < 0:
        errors.append(f"seed must be >= 0, got {spec.seed}")
    types = config_field_types()
    for where, keys in (("space", spec.space), ("fixed", spec.fixed)):
        errors += [f"{where}: unknown field {k}; see `python launch/train.py --help` for the fields" for k in keys if k not in types]
    for key, dom in spec.space.items():
        errors += _check_domain(key, dom, types.get(key) is int)
    for where, keys in (("space", spec.space), ("fixed", spec.fixed)):
        errors += [f"{where}: {k} is set by the sweep's `resources`, the same for every trial" for k in keys
                   if k in RESOURCE_FIELDS]
    errors += [f"space: {k} cannot be swept: {CUSTOM_RESOURCE_WHY}" for k in spec.space if k in CUSTOM_RESOURCE_FIELDS]
    if "eval.reference_returns" in spec.space:
        errors.append("space: eval.reference_returns cannot be swept: it sets the scale trials' normalized scores are "
                      "measured on, not how they train, and trials scored on other scales cannot be ranked; fix it "
                      "under `fixed`")
    errors += [f"{k} is both swept (space) and fixed (`fixed`), where it would never be used: keep one" for k in spec.space
               if k in spec.fixed]
    if spec.scheduler == "asha":
        # ASHA stops every trial at one max_t, and its rungs compare trials at equal updates.
        errors += [f"space: {k} sets a trial's budget, and asha stops every trial at one max_t; fix it under `fixed`, "
                   "or sweep it with fifo" for k in spec.space if k in BUDGET_FIELDS]
    # What the scheduler takes from elsewhere: the metric and mode, and (PBT) the mutations,
    # which are names of space fields here.
    taken = {"time_attr", "metric", "mode", "hyperparam_mutations", "custom_explore_fn"}
    for name, cls, own in (("asha", ASHAScheduler, set()), ("pbt", PopulationBasedTraining, {"mutations"})):
        options = set(inspect.signature(cls).parameters) - taken | own
        unknown = sorted(set(getattr(spec, name)) - options)
        if unknown:
            errors.append(f"{name}: unknown options {unknown}; options are {sorted(options)}")
    for (name, key), (bounds, within) in SCHEDULER_RANGES.items():
        value = getattr(spec, name).get(key)
        if value is not None and not (_is_number(value) and within(value)):
            errors.append(f"{name}.{key} must be a number {bounds}, got {value!r}")
    factors = spec.pbt.get("perturbation_factors")
    if factors is not None and not (isinstance(factors, (list, tuple)) and len(factors) == 2
                                    and all(_is_number(f) and f > 0 for f in factors)):
        errors.append(f"pbt.perturbation_factors must be two positive numbers (down, up), got {factors!r}")
    mutations = spec.pbt.get("mutations", [])
    if not isinstance(mutations, list) or not all(isinstance(k, str) for k in mutations):
        errors.append(f"pbt.mutations must be a list of the space's fields, got {mutations!r}")
        mutations = []
    if spec.scheduler == "pbt":
        for key in mutations:
            if key not in spec.space:
                errors.append(f"pbt.mutations: {key!r} is not in the space")
            elif key in config_lib.net_fields() or key in VALUE_TARGET_FIELDS:
                errors.append(f"pbt.mutations: {key} made the trials' nets or what their value net predicts, and PBT "
                              "restores a trial from another's checkpoint into the mutated config, which that "
                              "checkpoint does not fit; sweep it with asha or fifo")
        if "online.num_actors" in spec.space:
            # PBT hands a trial the whole config of the trial it copies, its number of actors
            # too, while the trial's placement group keeps the size it started with.
            errors.append("space: online.num_actors sizes a trial's placement group when it starts, and PBT copies "
                          "it between trials; fix it under `fixed`, or sweep it with asha or fifo")
    return errors


def _example_configs(spec: SweepSpec) -> List[Config]:
    """The trial configs of the space's example values, the base config's first; raises on
    the first that is not trainable (or, with ``init``, that its checkpoint does not fit)."""
    # Unknown fields of the base config and invalid values fail here, not in a trial an hour later; so do
    # values that are valid alone but not together (diffusion.n_steps 4 with planner.ddim_steps 8):
    # every example value of each domain (its values, or its bounds) alone and with every one of
    # each other domain, the rest at the base config. With `init`, each must also keep the
    # fields that made its nets.
    examples = {k: _examples(dom) for k, dom in spec.space.items()}
    singles = [{k: v} for k, values in examples.items() for v in values]
    pairs = [{a: va, b: vb} for a, b in itertools.combinations(examples, 2) for va in examples[a] for vb in examples[b]]
    everything = []
    if len(examples) > 2 and math.prod(len(v) for v in examples.values()) <= ALL_COMBINATIONS_MAX:
        everything = [dict(zip(examples, values)) for values in itertools.product(*examples.values())]
    configs = []
    for params in [{}] + singles + pairs + everything:
        try:
            configs.append(spec.trial_config(params))
            config_lib.check_trainable(configs[-1])
            if spec.init_state is not None:
                check_made_with(spec.init_state, configs[-1])
                check_dynamics(spec.init_state, configs[-1])
        except (ConfigError, CheckpointError) as e:
            at = f" with {', '.join(f'{k}={v!r}' for k, v in params.items())}" if params else ""
            of = f" (init: {spec.init})" if isinstance(e, CheckpointError) else ""
            raise ConfigError(f"invalid sweep space{at}: {e}{of}") from None
    if spec.init_state is not None:
        try:
            planner_from_checkpoint(spec.init_state, configs[0])  # its weights load (the fields above are the same)
        except CheckpointError as e:
            raise ConfigError(f"invalid sweep: init {spec.init}: {e}") from None
    return configs


def idle_options(spec: SweepSpec) -> List[str]:
    """What the sweep sets that its trials would never act on as it means. Refused by
    :func:`load_spec` for a new sweep; a sweep stored before these were refused is resumed with
    them said as warnings (its file may not change, and its trials could go on no other way)."""
    problems = []
    if spec.init is not None:
        problems += [f"space: {k} acts only in pretraining, which the trials from `init` skip: it would change "
                     "nothing" for k in spec.space if k in config_lib.PHASE_1_ONLY]
    if spec.scheduler != "pbt":
        return problems
    mutations = spec.pbt.get("mutations")
    for key in mutations if isinstance(mutations, list) else []:  # (another kind is refused elsewhere)
        if key in BUDGET_FIELDS:
            # The update debt is owed over the whole of phase 2: a mutated ratio applied to every
            # env step collected before it (x1.2 at 100k steps: 10,000 updates owed at once, the
            # rollouts parked meanwhile).
            problems.append(f"pbt.mutations: {key} sets a trial's budget or its updates over all its env steps so "
                            "far, not from the mutation on; sweep it with fifo")
        elif key in config_lib.PHASE_1_ONLY:
            problems.append(f"pbt.mutations: {key} acts only in pretraining, and PBT acts in phase 2: the mutation "
                            "would change nothing; sweep it with asha or fifo")
    try:
        wall_time = spec.trial_config({}).online.wall_time_s > 0
    except ConfigError:
        wall_time = False  # (said by the other checks)
    if wall_time or "online.wall_time_s" in spec.space:
        # Counted in the process: a resume has them again, and PBT starts a trial's process again
        # each time it pauses the trial or copies another into it.
        problems.append("online.wall_time_s counts one process's seconds, and pbt starts a trial's process again "
                        "each time it pauses or copies it: a trial's wall time would never run out while PBT kept "
                        "restarting it. Budget the trials with online.env_steps or online.updates")
    return problems


def load_spec(path: str | Path, *, allow_idle: bool = False, **overrides: Any) -> SweepSpec:
    """Read and check a sweep file, with ``overrides`` of its options (the command line's
    ``num_samples`` and ``max_concurrent``; None: the file's); every problem is reported before
    any trial starts. ``allow_idle``: leave :func:`idle_options` to the caller (a resume)."""
    spec, errors = _read_spec(Path(path), overrides)
    errors += _option_errors(spec)
    if not allow_idle:
        errors += idle_options(spec)
    if errors:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(errors))
    configs = _example_configs(spec)
    named = {k: getattr(configs[0].online, k.removeprefix("online.")) for k in CUSTOM_RESOURCE_FIELDS}
    errors = [f"{k} is {v!r} (base config or `fixed`): {CUSTOM_RESOURCE_WHY}; set it to '' under `fixed`"
              for k, v in named.items() if v]
    errors += _check_metric(spec, configs)
    if errors:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(errors))
    if spec.scheduler != "fifo":
        _check_schedule(spec)
    if spec.scheduler == "pbt" and (spec.max_concurrent < 2 or trial_count(spec) < 2):
        # PBT copies the better of the trials running at once into the worse: with fewer than
        # two at a time it never acts, and the sweep would be a plain one that says nothing of it.
        raise ConfigError(f"invalid sweep: pbt compares the trials that run at once, and needs at least two: this "
                          f"sweep has {trial_count(spec)} trial(s), {spec.max_concurrent} at a time; raise num_samples "
                          "and max_concurrent (--num-samples, --max-concurrent), or use asha")
    try:
        make_scheduler(spec, param_space(spec))
    # Ray's schedulers check some of their values with assert statements.
    except (TypeError, ValueError, AssertionError, tune.TuneError) as e:
        raise ConfigError(f"invalid sweep {spec.scheduler}: {e}") from None
    return spec


def trial_count(spec: SweepSpec) -> int:
    """The sweep's trials: ``num_samples`` draws of each grid point."""
    return spec.num_samples * math.prod(len(dom["grid"]) for dom in spec.space.values() if "grid" in dom)


def _eval_every(spec: SweepSpec) -> List[int]:
    """The trials' online.eval_every: every example of its domain when it is swept."""
    if "online.eval_every" in spec.space:
        return [int(v) for v in _examples(spec.space["online.eval_every"])]
    return [spec.trial_config({}).online.eval_every]


def update_budget(cfg: Config) -> Optional[int]:
    """A run's learner updates, when its budget sets them (else it stops on wall time)."""
    o = cfg.online
    budgets = [b for b in (o.updates, config_lib.updates_for(cfg, o.env_steps) if o.env_steps else 0) if b > 0]
    return min(budgets) if budgets else None


def scheduler_options(spec: SweepSpec) -> Dict[str, Any]:
    """The scheduler's options, times in learner updates. Those the sweep leaves out come from the
    trial config: ASHA's first rung at the trials' evaluation interval and its max_t at their
    update budget, PBT's perturbation every two evaluations."""
    every = max(_eval_every(spec))
    if spec.scheduler == "asha":
        budget = update_budget(spec.trial_config({}))
        return {"grace_period": every, "reduction_factor": 2, **({"max_t": budget} if budget else {}), **spec.asha}
    if spec.scheduler == "pbt":
        return {"perturbation_interval": 2 * every, **spec.pbt}
    return {}


def _check_schedule(spec: SweepSpec) -> None:
    """A scheduler acts on the trials' evaluations, in learner updates: refuse one that never
    could (no evaluation before a trial's end, its first decision beyond the budget) or whose
    times are in other units (below one evaluation interval: the training_iteration units of
    sweep files written for earlier versions)."""
    name = spec.scheduler
    key = "grace_period" if name == "asha" else "perturbation_interval"
    everies = _eval_every(spec)
    if min(everies) <= 0:
        raise ConfigError(f"invalid sweep: {name} compares trials by their evaluations, and online.eval_every "
                          f"{'can be' if len(everies) > 1 else 'is'} 0 (a trial reports only at its end): set it")
    options = scheduler_options(spec)
    first, budget = options[key], update_budget(spec.trial_config({}))
    if name == "asha" and "max_t" not in options:
        raise ConfigError("invalid sweep: asha needs max_t (learner updates) when the trials' budget sets no "
                          "number of updates (online.updates, or online.env_steps)")
    if isinstance(first, (int, float)) and first < max(everies):
        raise ConfigError(f"invalid sweep: {name}.{key} ({first}) counts learner updates, and is below "
                          f"online.eval_every ({max(everies)}): a trial reports no sooner than that; raise it "
                          "(times are in learner updates) or lower online.eval_every")
    if budget is not None and isinstance(first, (int, float)) and first > budget:
        raise ConfigError(f"invalid sweep: {name}.{key} ({first}) is beyond a trial's budget of {budget} learner "
                          f"updates: {name} would never act; lower it")
    burn_in = options.get("burn_in_period", 0) if name == "pbt" else 0
    if budget is not None and _is_number(burn_in) and burn_in >= budget:
        raise ConfigError(f"invalid sweep: pbt.burn_in_period ({burn_in}) is not below a trial's budget of {budget} "
                          "learner updates: PBT would never act; lower it")


class ZeroOrLogUniform(Sampler):
    """The draws of a `zero:` domain: exactly 0 with probability ``p_zero``, else log-uniform
    over the domain's [lower, upper]. A sampler of Tune's, not a tune.sample_from function:
    Tune draws it with the sweep's seeded generator, where it stores a function as a
    placeholder that a resumed sweep resolves to nothing (its trials not made yet failed on
    a guidance.scale of ``('__fn_ph', ...)``)."""

    def __init__(self, p_zero: float):
        self.p_zero = p_zero

    def sample(self, domain: Float, config=None, size: int = 1, random_state=None):
        # (Domain.sample hands over Tune's generator, the sweep's, or a fresh one for PBT's draws.)
        zero = random_state.uniform(0.0, 1.0, size=size) < self.p_zero
        items = np.where(zero, 0.0, np.exp(random_state.uniform(math.log(domain.lower), math.log(domain.upper),
                                                                size=size)))
        return items if len(items) > 1 else domain.cast(items[0])


def _domain(dom: Dict[str, Any]):
    kind = next(k for k in DOMAINS if k in dom)
    arg = dom[kind]
    if kind == "choice":
        return tune.choice(arg)
    if kind == "grid":
        return tune.grid_search(arg)
    if kind == "uniform":
        return tune.uniform(*arg)
    if kind == "randint":
        return tune.randint(int(arg[0]), int(arg[1]) + 1)
    if "zero" not in dom:
        return tune.loguniform(*arg)
    domain = Float(*arg)
    domain.set_sampler(ZeroOrLogUniform(float(dom["zero"])))
    return domain


def param_space(spec: SweepSpec) -> Dict[str, Any]:
    space = {key: _domain(dom) for key, dom in spec.space.items()}
    if TRAIN_SEED not in spec.space and TRAIN_SEED not in spec.fixed:
        # A training seed of its own per trial, drawn as the rest: the num_samples repeats of a
        # grid point are replicates, not one run again, and their spread is a seed's.
        space[TRAIN_SEED] = tune.randint(0, 2**31)
    return space


def search_alg(spec: SweepSpec) -> BasicVariantGenerator:
    """Tune's default search, seeded by the sweep's ``seed``: the same sweep file draws the same
    trial configs. It also limits the concurrent trials (Tune ignores ``max_concurrent_trials``
    beside a search of one's own)."""
    return BasicVariantGenerator(max_concurrent=spec.max_concurrent, random_state=spec.seed)


def on_trial_driver(cfg: Config, gpu_ids: List[Any]) -> Config:
    """The trial's config as its driver runs it: with no GPU in the driver's bundle, automatic
    pretraining stays on CPU. Ray no longer hides GPUs from a process given none, so it would
    otherwise train on GPU 0, beside the learners Ray gave that GPU to."""
    if cfg.train.device != "auto" or gpu_ids:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))


def tune_metrics(spec: SweepSpec, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """What a trial reports of an evaluation's metrics: those of REPORTED it has, as metrics.json
    has them (a NaN, e.g. no plan measured, is no value). One without the sweep's metric stops
    the trial: Tune would stop the whole sweep at a report that lacks it."""
    if finite(metrics.get(spec.metric)) is None:
        raise RuntimeError(f"the evaluation at update {metrics.get('updates')} gave no {spec.metric} "
                           f"({metrics.get(spec.metric)!r}): this trial stops, the sweep goes on")
    return {k: v for k in REPORTED if (v := finite(metrics.get(k))) is not None}


def pinned_dataset(spec: SweepSpec, log=print) -> Dict[str, Any]:
    """The dataset every trial trains on, had once where the sweep starts (downloaded, or the
    fallback collected, as a trial would), as fields that fix it for the trials, with no
    fallback left to them: on a node without it a trial fails, rather than train on a random
    fallback of its own and be ranked beside trials that had the real data. Each trial is
    spared the download's wait too. {} where a data field is swept: each trial has its own."""
    if any(key.startswith("data.") for key in spec.space):
        return {}
    from distdiff.pretrain import dataset_to_train_on

    cfg = spec.train_config({})
    had = dataset_to_train_on(cfg, log=log)
    if had != cfg.data.dataset_id:
        log(f"the trials train on {had!r}, standing in for {cfg.data.dataset_id!r} (best_config.yaml names the one "
            f"configured)")
    return {"data.dataset_id": had, "data.fallback_dataset_id": ""}


def sweep_dataset(spec: SweepSpec, storage: Path, *, resume: bool, log=print) -> Dict[str, Any]:
    """:func:`pinned_dataset` of a new sweep; a resumed one goes on with the dataset it started
    with (recorded in its dir by :func:`make_tuner`), even where another could be had now (the
    configured one, downloadable by then, in place of its fallback)."""
    path = sweep_path(spec, storage) / PINNED
    if resume:
        # (A sweep of a distdiff before this record: its trials found their datasets themselves.)
        return json.loads(path.read_text()) if path.is_file() else {}
    return pinned_dataset(spec, log=log)


def make_trainable(spec: SweepSpec, pinned: Optional[Dict[str, Any]] = None):
    """The Tune trainable, sized by a placement group for the trial's driver, learner and actors.
    An `init` checkpoint goes to the object store once, not into every trial's pickled function.
    ``pinned``: fields fixed for every trial (:func:`pinned_dataset`), beside the sweep file's."""
    from distdiff.distributed.driver import BEST_KEYS, train

    init_state, spec = spec.init_state, copy.copy(spec)
    spec.init_state = None
    spec.fixed = {**spec.fixed, **(pinned or {})}

    def trial(params: Dict[str, Any], init_state: Optional[Dict[str, Any]] = None) -> None:
        check_storage_here(tune.get_context().get_storage())
        cfg = on_trial_driver(spec.trial_config(params), ray.get_gpu_ids())
        # The trial's working directory (where Tune starts it, unless RAY_CHDIR_TO_TRIAL_DIR=0):
        # what is written there reaches the sweep's storage from any node (sync_artifacts in
        # make_tuner). get_trial_dir() is a directory on the trial's node that only the sweep's
        # own node syncs.
        run_dir = Path(tune.get_context().get_storage().trial_working_directory)
        trial_id = tune.get_context().get_trial_id()
        restored = tune.get_checkpoint()
        if restored is None:
            resume = trial_start(run_dir, None)
        else:
            with restored.as_directory() as d:
                resume = trial_start(run_dir, Path(d), trial_id,
                                     stored=Path(tune.get_context().get_storage().trial_fs_path))

        def report(metrics: Dict[str, Any]) -> None:
            reported = tune_metrics(spec, metrics)
            with tempfile.TemporaryDirectory() as d:
                for name in (CHECKPOINT, REPLAY):
                    if (run_dir / name).is_file():
                        shutil.copy2(run_dir / name, Path(d) / name)
                (Path(d) / REPORTED_BY).write_text(trial_id)
                write_json(Path(d) / REPORTED_EVALUATION, {k: metrics[k] for k in BEST_KEYS})
                tune.report(reported, checkpoint=tune.Checkpoint.from_directory(d))

        # A trial restores only checkpoints reported, each with its evaluation's result, and
        # maybe another trial's (PBT), which the metrics.json of its dir does not describe.
        start = {} if resume or init_state is None else {"init": spec.init, "init_state": init_state}
        train(cfg, run_dir, resume=resume, log=lambda s: print(s, flush=True), progress=False, on_evaluation=report,
              own_run_dir=False, **start)

    if init_state is not None:
        trial = tune.with_parameters(trial, init_state=init_state)
    return tune.with_resources(trial, lambda params: trial_resources(spec, params))


def check_storage_here(storage) -> None:
    """That the sweep's --storage is on this trial's node: Ray checks it only as the trial's
    first checkpoint is stored, after its pretraining, which a retry would then do again."""
    try:
        storage._check_validation_file()  # Ray is pinned: its own check, a marker the sweep's start wrote
    except RuntimeError as e:
        raise RuntimeError(f"--storage {storage.storage_fs_path} is not on this trial's node ({socket.gethostname()}): "
                           f"{SHARED_STORAGE}") from e


def trial_start(run_dir: Path, restored: Optional[Path], trial_id: Optional[str] = None,
                stored: Optional[Path] = None) -> bool:
    """Where trial ``trial_id`` starts from, in its run dir; True: it resumes. A restored
    checkpoint (PBT copying another trial, a resumed sweep, a retry of a failed trial) is copied
    in, and, where it is the trial's own and the run dir is new, what the trial had synced to
    ``stored`` (its dir in the sweep's storage): its best so far and its TensorBoard events. Without
    one, a retry on the node of a failed attempt goes on from that attempt's last checkpoint of
    its own (of phase 1 or 2; Tune saw none of them); elsewhere, or at first, the trial starts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if restored is not None:
        if not (restored / CHECKPOINT).is_file():
            # (Ray itself refuses a path that is not here at all.) Without the file, the trial
            # would start again from nothing, and be ranked as if it had gone on.
            raise RuntimeError(f"the checkpoint Tune restores this trial from, {restored}, has no {CHECKPOINT} on this "
                               f"node ({socket.gethostname()}): {SHARED_STORAGE}")
        for name in (CHECKPOINT, REPLAY):
            if (restored / name).is_file():
                shutil.copy2(restored / name, run_dir / name)
        by = restored / REPORTED_BY
        if by.is_file() and by.read_text() != trial_id:
            # Another trial's (PBT): this trial's best evaluation so far is of the line it leaves,
            # with weights of its old config; kept, best.pt would stand beside the new config
            # until the new line beat it. (A checkpoint that names no trial is of a sweep begun
            # before this mark, and taken for the trial's own.)
            for name in (BEST, BEST_METRICS, BEST_EVAL):
                (run_dir / name).unlink(missing_ok=True)
        elif stored is not None and not (run_dir / BEST).exists() and stored.resolve() != run_dir.resolve():
            # A working dir of its own that this attempt starts empty (a sweep resumed in a new Ray
            # session, a retry on another node), which Tune syncs over the stored one and never
            # deletes there: without its best.*, its next evaluation would be "best" and replace
            # the stored best; without its events, those logged past the checkpoint would stay
            # stored beside the ones logged again. (The run trims the copies to the checkpoint.)
            for name in (BEST, BEST_METRICS, BEST_EVAL):
                if (stored / name).is_file():
                    shutil.copy2(stored / name, run_dir / name)
            for events in stored.glob("events.out.tfevents.*"):
                if not (run_dir / events.name).exists():
                    shutil.copy2(events, run_dir / events.name)
            best_of_restored(run_dir, restored)
    return holds_run(run_dir)


def best_of_restored(run_dir: Path, restored: Path) -> None:
    """Make the restored checkpoint ``best.pt`` where its evaluation beats the best in ``run_dir``
    (the stored one, just copied): Tune copies a trial's files to storage only every few
    minutes, at a report, and a sweep stopped in between kept an older best.pt there. The
    restored checkpoint was reported with its evaluation, which the trial does not run again."""
    from distdiff.distributed.driver import beats

    if not (restored / REPORTED_EVALUATION).is_file():  # (reported by an older distdiff)
        return
    evaluation = json.loads((restored / REPORTED_EVALUATION).read_text())
    try:
        best = json.loads((run_dir / BEST_METRICS).read_text())["return_mean"]
    except (OSError, ValueError, KeyError, TypeError):
        best = None  # none, or one that cannot be read: the run's next evaluation would replace it too
    if beats(evaluation["return_mean"], best):
        save_checkpoint(run_dir / BEST, {**load_checkpoint(restored / CHECKPOINT), "best": evaluation})
        write_json(run_dir / BEST_METRICS, evaluation)
        (run_dir / BEST_EVAL).unlink(missing_ok=True)  # launch/evaluate.py's summary of the old one


def trial_resources(spec: SweepSpec, params: Dict[str, Any]):
    """A trial's placement group: its driver, learner and one bundle per rollout actor of its
    own config. Tune puts the actors a trial starts into its group, so an actor beyond the
    group's bundles would never be placed, and the trial would wait on it forever."""
    try:
        actors = spec.trial_config(params).online.num_actors
    except ConfigError:
        # A drawn config the checks before the sweep did not meet: Tune asks for this in its
        # controller, where an error stops the whole sweep; the trial fails on its own instead.
        actors = int(params.get("online.num_actors", spec.trial_config({}).online.num_actors))
    return tune.PlacementGroupFactory(spec.resources.bundles(actors))


def largest_trial(spec: SweepSpec) -> Dict[str, float]:
    """The CPUs and GPUs the largest trial reserves: its driver, learner and rollout actors, at
    the most actors the space can give it."""
    if "online.num_actors" in spec.space:
        counts = [int(v) for v in _examples(spec.space["online.num_actors"])]
    else:
        counts = [spec.trial_config({}).online.num_actors]
    bundles = spec.resources.bundles(max(counts))
    return {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}


def shortfall(spec: SweepSpec) -> List[str]:
    """What a trial reserves beyond what the connected cluster has, in words: the largest trial
    (:func:`largest_trial`) beyond all of it, or a bundle of its placement group (its learner's,
    its driver's, a rollout actor's) beyond every node, where the bundle must fit whole. Such a
    trial never starts unless an autoscaler adds nodes."""
    need, have = largest_trial(spec), ray.cluster_resources()
    short = [f"{need[k]:g} {k} for its driver, learner and rollout actors (the cluster has {have.get(k, 0):g})"
             for k in need if need[k] > have.get(k, 0) + 1e-9]
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    driver, learner, actor = spec.resources.bundles(1)
    for who, bundle in (("its learner", learner), ("its driver", driver), ("each rollout actor", actor)):
        asks = {k: v for k, v in bundle.items() if v > 0}
        if asks and nodes and not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in asks.items()) for node in nodes):
            most = {k: max(node.get(k, 0.0) for node in nodes) for k in asks}
            short.append(f"{' and '.join(f'{v:g} {k}' for k, v in asks.items())} for {who} on one node (the nodes "
                         f"have at most {' and '.join(f'{v:g} {k}' for k, v in most.items())} each)")
    return short


def make_scheduler(spec: SweepSpec, space: Dict[str, Any]):
    """The sweep's scheduler. Its time is a trial's learner updates, not its number of reports:
    evaluations run beside training and come once however many intervals one spans, so the
    k-th reports of two trials may come after different numbers of updates (a planner whose
    episodes last longer evaluates slower). Trials are then compared at their first report past
    each milestone, which is as close to it as their evaluations are on time."""
    if spec.scheduler == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, **scheduler_options(spec))
    if spec.scheduler == "pbt":
        options = scheduler_options(spec)
        mutated = options.pop("mutations", [])
        return PopulationBasedTraining(time_attr=TIME_ATTR,
                                       hyperparam_mutations={k: _mutation(spec.space[k], space[k]) for k in mutated},
                                       # (None without mutations, which PBT then refuses)
                                       custom_explore_fn=WithinBounds(spec, mutated) if mutated else None, **options)
    return FIFOScheduler()


def _mutation(dom: Dict[str, Any], domain: Any) -> Any:
    """What PBT draws or perturbs a swept field with. A list for choice and grid: PBT moves to a
    neighbour in it or resamples it, where a domain would have it multiply the value by 0.8 or
    1.2 ("cosine" * 1.2 stops the sweep). The domain for the numbers, whose perturbations
    :class:`WithinBounds` keeps in range."""
    kind = next(k for k in DOMAINS if k in dom)
    if kind in ("choice", "grid"):
        return list(dom[kind])
    return domain


class WithinBounds:
    """PBT's custom_explore_fn: a perturbed number (the old value × 0.8 or 1.2) clamped to its
    domain's [low, high], so that no trial runs a value beyond those load_spec checked. The
    exact 0 of a `zero:` domain stays 0."""

    def __init__(self, spec: SweepSpec, keys: List[str]):
        self.bounds = {k: tuple(spec.space[k][kind]) for k in keys
                       for kind in ("uniform", "loguniform", "randint") if kind in spec.space[k]}
        self.zero = {k for k in self.bounds if "zero" in spec.space[k]}

    def __call__(self, config: Dict[str, Any]) -> Dict[str, Any]:
        for key, (low, high) in self.bounds.items():
            value = config[key]
            if not (value == 0 and key in self.zero):
                config[key] = type(value)(min(max(value, low), high))
        return config


def pbt_changes(spec: SweepSpec, storage: Path) -> List[Path]:
    """The files in which PBT recorded the trial configs it changed (Ray's
    ``pbt_policy_TRIAL.txt``, one per trial it changed): none where it changed none."""
    return sorted(sweep_path(spec, storage).glob("pbt_policy_*.txt")) if spec.scheduler == "pbt" else []


def sweep_path(spec: SweepSpec, storage: Path) -> Path:
    # Tune's storage layer (pyarrow) refuses relative paths, the default --storage among them.
    return Path(storage).resolve() / spec.name


def sweep_record(spec: SweepSpec) -> Dict[str, Any]:
    """What a resume must find as the sweep started: the sweep file's options, its base config
    and the contents of its `init` checkpoint. Tune keeps the params of its trials and its own
    state, and the trials it has yet to run would take the rest from the file as it is then.
    (Not num_samples and max_concurrent, which Tune keeps, whatever the file says.)"""
    record = {f.name: getattr(spec, f.name) for f in dataclasses.fields(SweepSpec)
              if f.init and f.name not in ("num_samples", "max_concurrent", "resources")}
    record.update(resources=dataclasses.asdict(spec.resources), base_yaml=spec.base_yaml if spec.base else None,
                  init_sha256=None)
    if spec.init:
        with open(checkpoint_file(spec.init), "rb") as f:
            record["init_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def check_resumable(spec: SweepSpec, storage: Path) -> Path:
    """The path of the sweep to resume in ``storage``, which must have started from the same
    sweep (:func:`sweep_record`; sweeps of earlier versions recorded none); no Ray needed, so
    launch/tune.py checks it before it starts or joins one."""
    path = sweep_path(spec, storage)
    if not stored(spec, storage):
        raise ConfigError(f"no sweep to resume at {path}")
    if (path / RECORD).is_file():
        started, now = _as_read_now(json.loads((path / RECORD).read_text())), _as_read_now(sweep_record(spec))
        started.pop(COUNTS, None)
        changed = sorted(k for k in started.keys() | now.keys() if started.get(k) != now.get(k))
        if changed:
            what = ", ".join("the init checkpoint's contents" if k == "init_sha256" else
                             "the base config" if k == "base_yaml" else k for k in changed)
            raise ConfigError(f"the sweep at {path} started from another sweep file or base config (changed: {what}): "
                              "Tune would go on with the trials it stored and run the rest with the new values. Resume "
                              "it with the files it started with, or start another sweep (another `name` or --storage)")
    return path


def _as_read_now(value: Any) -> Any:
    """A sweep's record with numbers in exponent form (``1e-4``) as numbers, on both sides of a
    resume's comparison: distdiff read them as text before it read YAML 1.2's floats, and a
    quoted one (``"1e-4"``) is text in the record and a number once read back; else a resume
    of an unchanged file would be refused as changed."""
    if isinstance(value, dict):
        return {k: _as_read_now(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_read_now(v) for v in value]
    if isinstance(value, str) and config_lib.EXPONENT_FLOAT.match(value):
        return float(value.replace("_", ""))
    return value


def stored(spec: SweepSpec, storage: Path) -> bool:
    """Whether a sweep of ``spec``'s name is stored in ``storage``, for Tune to resume."""
    return tune.Tuner.can_restore(str(sweep_path(spec, storage)))


def started_counts(path: str | Path, storage: Path) -> Dict[str, int]:
    """``num_samples`` and ``max_concurrent`` as the sweep of the sweep file at ``path`` started
    with them (the file's, or the command line's then), where that sweep is stored in
    ``storage``: Tune keeps them, and a resume checks and reports its sweep by them, not by what
    the file says now. {} where no sweep is stored, or one of a distdiff before this record."""
    raw = config_lib.read(Path(path), what="sweep file")
    name = raw.get("name") if isinstance(raw, dict) else None
    spec = SweepSpec(**({"name": name} if isinstance(name, str) else {}))
    record = sweep_path(spec, storage) / RECORD
    if not (stored(spec, storage) and record.is_file()):
        return {}
    return json.loads(record.read_text()).get(COUNTS, {})


def check_new(spec: SweepSpec, storage: Path) -> None:
    """Refuse a new sweep where one is stored: Tune would add its trials to the old ones', and
    a later --resume would pick whichever state file is newest."""
    path = sweep_path(spec, storage)
    if stored(spec, storage):
        raise ConfigError(f"a sweep is already stored at {path}: continue it with --resume, or give this one another "
                          "`name` or --storage (or remove that directory)")


def run_config(spec: SweepSpec, storage: Path) -> tune.RunConfig:
    return tune.RunConfig(name=spec.name, storage_path=str(sweep_path(spec, storage).parent),
                          # PBT restores trials from other trials' older checkpoints: keep them all.
                          # Others keep the two best by the sweep's metric, and the latest (Ray never
                          # drops it: a resume goes on from it): the two newest dropped the best
                          # weights, which get_best_checkpoint and best_checkpoints then missed.
                          checkpoint_config=tune.CheckpointConfig(
                              num_to_keep=None if spec.scheduler == "pbt" else 2,
                              checkpoint_score_attribute=spec.metric, checkpoint_score_order=spec.mode),
                          # Each trial's run dir (TensorBoard events, best.pt, metrics.json) goes to
                          # storage in the background every few minutes and at its end; not at each
                          # report, which would wait for a copy of the whole run dir, checkpoint and
                          # replay included, every evaluation.
                          sync_config=tune.SyncConfig(sync_artifacts=True, sync_artifacts_on_checkpoint=False),
                          failure_config=tune.FailureConfig(max_failures=spec.max_failures))


def make_tuner(spec: SweepSpec, storage: Path, *, resume: bool = False, pinned: Optional[Dict[str, Any]] = None):
    trainable = make_trainable(spec, pinned)
    if resume:
        return tune.Tuner.restore(str(check_resumable(spec, storage)), trainable=trainable, resume_errored=True)
    path = sweep_path(spec, storage)
    path.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: --resume reads both.
    counts = {"num_samples": spec.num_samples, "max_concurrent": spec.max_concurrent}
    write_text(path / RECORD, json.dumps({**sweep_record(spec), COUNTS: counts}, indent=1, sort_keys=True))
    write_text(path / PINNED, json.dumps(pinned or {}, indent=1, sort_keys=True))
    space = param_space(spec)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    search_alg=search_alg(spec), scheduler=make_scheduler(spec, space)),
        run_config=run_config(spec, storage),
    )


def ran_to_the_end(spec: SweepSpec, finished: List[Any]) -> List[Any]:
    """The trials to rank: under ASHA, those whose last report is their run's final evaluation
    (``final``), or that trained to its ``max_t`` (or, short of that, the most updates). The
    ones it stopped at a rung reported last after fewer updates, and a lucky early evaluation
    would outrank the final ones of the trials it judged better; a trial whose budget ended
    after fewer updates than others' (a wall-time budget, online.finish_updates false) ran to
    its end all the same."""
    if spec.scheduler != "asha" or not finished:
        return finished
    most = max(r.metrics.get(TIME_ATTR, 0) for r in finished)
    end = min(most, scheduler_options(spec).get("max_t", most))
    return [r for r in finished if r.metrics.get("final") or r.metrics.get(TIME_ATTR, 0) >= end]


def summarize(results, spec: SweepSpec, storage: Path) -> Dict[str, Any]:
    """Write the trial table (CSV) and the config of the best trial that ended without an error
    (a YAML that train.py accepts); ``best_config`` is None when no trial did."""
    out_dir = sweep_path(spec, storage)
    df = results.get_dataframe()
    drawn = [*spec.space, *([TRAIN_SEED] if TRAIN_SEED not in spec.space else [])]  # (with the seed param_space drew)
    columns = ["trial_id"] + [f"config/{k}" for k in drawn] + [m for m in REPORTED if m in df.columns]
    table = df[[c for c in columns if c in df.columns]].rename(columns=lambda c: c.removeprefix("config/"))
    csv_path = out_dir / "trials.csv"
    table.to_csv(csv_path, index=False)
    # Not Tune's get_best_result: it ranks failed trials too, and returns the only trial however it ended.
    finished = ran_to_the_end(spec, [r for r in results
                                     if r.error is None and math.isfinite(r.metrics.get(spec.metric, math.nan))])
    best_path = out_dir / "best_config.yaml"
    if finished:
        best = (max if spec.mode == "max" else min)(finished, key=lambda r: r.metrics[spec.metric])
        config_lib.save(spec.train_config({k: best.config[k] for k in drawn if k in best.config}), best_path)
    else:
        # An earlier sweep of the same name may have left one beside this sweep's table.
        best_path.unlink(missing_ok=True)
        best_path = None
    return {"table": csv_path, "best_config": best_path, "table_text": table.to_string(index=False)}
