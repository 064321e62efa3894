"""Reading and writing Minari datasets: local first, then Minari's remote (``data.download``)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
from filelock import FileLock

from distdiff.data.episodes import Episode

# D4RL's reference returns, random and expert (Fu et al. 2020; its infos.py), so normalized
# scores are comparable: its four locomotion envs. Another env's come from eval.reference_returns.
WALKER2D_REF_MIN_SCORE = 1.629008
WALKER2D_REF_MAX_SCORE = 4592.3
REFERENCE_SCORES = {"Walker2d": (WALKER2D_REF_MIN_SCORE, WALKER2D_REF_MAX_SCORE),
                    "Hopper": (-20.272305, 3234.3), "HalfCheetah": (-280.178953, 12135.0), "Ant": (-325.6, 3879.7)}
# What Minari accepts as an id (its DATASET_ID_RE: optional namespaces, a name, no `.` anywhere,
# so never a path out of the store), with the version that distdiff needs.
DATASET_ID = re.compile(r"^(?:[-\w][-\w/]*[-\w]+/)?[-\w]+?-v\d+\Z")
# Ids this machine makes (launch/collect.py, the fallback): never looked up on the remote.
LOCAL_NAMESPACE = "local/"


class DatasetError(RuntimeError):
    """A dataset that is missing, unreachable or does not match the config."""


class DatasetMissing(DatasetError):
    """Not in the local store and not downloadable now (offline, or download not asked for); a
    configured fallback stands in for it. Not raised when the remote says it has no such
    dataset, nor for a missing ``local/`` id, which no download would bring: a mistyped id must
    fail, not train on the fallback."""


class LoadedDataset(NamedTuple):
    dataset_id: str
    env_id: Optional[str]
    episodes: List[Episode]
    ref_min_score: Optional[float]
    ref_max_score: Optional[float]


def datasets_root() -> str:
    return os.environ.get("MINARI_DATASETS_PATH", os.path.join(os.path.expanduser("~"), ".minari", "datasets"))


def env_family(env_id: str) -> str:
    """An env id without its module, namespace and version: ``Walker2d`` for ``Walker2d-v5``,
    ``myns/Walker2d-v4`` or ``mymodule:Walker2d-v4`` (Gymnasium records a dataset's env without
    the module that registered it). Datasets and checkpoints of one family fit each other's
    configs."""
    return env_id.split(":")[-1].split("/")[-1].split("-")[0]


def reference_scores(env_id: str):
    """(random, expert) reference returns of an env id such as ``Walker2d-v5``, or (None, None)."""
    return REFERENCE_SCORES.get(env_family(env_id), (None, None))


def normalized_score(episode_return, ref_min: Optional[float], ref_max: Optional[float]):
    """D4RL's formula, 100·(R − R_random)/(R_expert − R_random), against the references given
    (:func:`distdiff.config.reference_returns` picks a run's); None without them."""
    if ref_min is None or ref_max is None:
        return None
    return 100.0 * (np.asarray(episode_return, dtype=np.float64) - ref_min) / (ref_max - ref_min)


def dataset_exists(dataset_id: str) -> bool:
    """Whether the store holds a dataset at ``dataset_id``'s own path: not Minari's list of every
    local dataset, which fails on a stray folder anywhere in the store (a backup copy named
    ``…-v0.bak``) and leaves out a dataset copied under another id, which loads all the same."""
    return (Path(datasets_root()) / dataset_id / "data").is_dir()


def local_id(env_id: str, name: str = "random-v0") -> str:
    """A local dataset id named for ``env_id`` (``local/hopper/random-v0`` for Hopper-v5): the name
    a dataset of that env must have, :func:`other_env_named` refusing another env's."""
    return f"{LOCAL_NAMESPACE}{env_family(env_id).lower()}/{name}"


def _missing_message(dataset_id: str, why: str, env_id: Optional[str]) -> str:
    """Why ``dataset_id`` is not there, and the commands that make one of ``env_id``'s (the env of
    the run that asked for it; None: not known)."""
    from distdiff.config import EnvConfig

    local = dataset_id.startswith(LOCAL_NAMESPACE)
    get = "Make it" if local else "Download it where there is internet (--data.download true, the default), or make a local one"
    env = env_id or EnvConfig().id
    made = dataset_id if local and not other_env_named(dataset_id, env) else local_id(env)
    return (
        f"dataset {dataset_id!r} is not available: {why}\n"
        f"Local datasets are looked up under MINARI_DATASETS_PATH={datasets_root()}.\n"
        f"{get}, e.g.:\n"
        f"  python launch/collect.py --policy random --episodes 50 --env {env} --dataset-id {made}\n"
        + (f"and pass --data.dataset_id {made}." if made != dataset_id else "then run the same command again.")
    )


def _lock(dataset_id: str) -> FileLock:
    """One process at a time makes a dataset in the store (Tune trials on one machine would each
    download or collect it, and the later writer find it half written), and a run that finds the
    fallback there waits for one half-way through it (Minari makes the dir before writing it)."""
    os.makedirs(datasets_root(), exist_ok=True)
    return FileLock(os.path.join(datasets_root(), f".{dataset_id.replace('/', '__')}.lock"))


# What Minari raises for a dataset it cannot read: files damaged or missing (OSError, ValueError;
# h5py's KeyError), and metadata another tool or version wrote, or an edit left (KeyError,
# TypeError, AttributeError, and AssertionError: Minari checks its metadata with asserts).
UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError)


def _unreadable(dataset_id: str, e: Exception, *, opening: bool = True) -> DatasetError:
    """What a dataset that Minari fails to open (``opening``) or read is: a store path that
    cannot be used, a dataset another Minari version made, metadata that is not Minari's, or
    damaged files (an interrupted write, a partial copy), which only the last is to be removed
    for."""
    import minari

    root = datasets_root()
    data = os.path.join(root, dataset_id, "data")
    if not os.path.isdir(data):
        return DatasetError(f"dataset {dataset_id!r}: the Minari store {root} cannot be used "
                            f"({type(e).__name__}: {e}); check MINARI_DATASETS_PATH")
    metadata = os.path.join(data, "metadata.json")
    try:
        with open(metadata) as f:
            fields = json.load(f)
    except (OSError, ValueError):
        fields = None
    made_by = fields.get("minari_version") if isinstance(fields, dict) else None
    if made_by is not None and made_by not in minari.supported_dataset_versions:
        return DatasetError(f"dataset {dataset_id!r} in the local Minari store ({root}) was made by Minari {made_by}, "
                            f"which Minari {minari.__version__} does not read")
    # Minari writes a dataset's metadata in two steps, its id with the second: without it, a
    # write was cut short (killed: no cleanup ran), not made by another tool.
    cut_short = isinstance(fields, dict) and "dataset_id" not in fields and fields.get("total_episodes") == 0
    # (Opening reads no JSON but metadata.json, which parsed: a JSONDecodeError is of a space or
    # env spec inside it.)
    foreign = isinstance(e, json.JSONDecodeError) or not isinstance(e, (OSError, ValueError))
    if opening and fields is not None and foreign and not cut_short:
        # Written whole, and not as Minari writes it: removing it may lose what another tool made.
        why = ": ".join(filter(None, (type(e).__name__, str(e))))  # (Minari's asserts say nothing)
        return DatasetError(f"dataset {dataset_id!r} in the local Minari store ({root}) has metadata that Minari "
                            f"{minari.__version__} does not read ({why}), in {metadata}: another tool wrote it, "
                            f"or an edit changed it")
    again = "make it again" if dataset_id.startswith(LOCAL_NAMESPACE) else "the next run downloads it again"
    return DatasetError(f"dataset {dataset_id!r} is in the local Minari store ({root}) but cannot be read "
                        f"({type(e).__name__}: {e}; a write or download cut short leaves it so): remove it, "
                        f"rm -r {os.path.join(root, dataset_id)}, and {again}")


@contextlib.contextmanager
def _quiet_retries():
    """Minari's remote client (huggingface_hub) logs each retry of a failing request as two
    warnings; whether the download failed is said once, by the caller."""
    from huggingface_hub.utils import logging as hub_logging  # minari[hf]; its own switch, set on first use

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def load_minari(dataset_id: str, *, download: bool = False, env_id: Optional[str] = None, log=print):
    """The Minari dataset ``dataset_id``, downloaded when it is not local and ``download``;
    ``env_id``: the env it is for, which the advice of a missing one names."""
    import minari

    if not DATASET_ID.match(dataset_id):  # (an id from a checkpoint's config too, which no flag checked)
        raise DatasetError(f"dataset id {dataset_id!r} must look like namespace/name-vN")
    try:
        return minari.load_dataset(dataset_id, download=False)
    except FileNotFoundError:
        if dataset_id.startswith(LOCAL_NAMESPACE):
            raise DatasetError(_missing_message(
                dataset_id, f"it is not in the local Minari store (ids under {LOCAL_NAMESPACE} are made on this machine)",
                env_id)) from None
        if not download:
            raise DatasetMissing(_missing_message(dataset_id, "it is not in the local Minari store", env_id)) from None
    except UNREADABLE as e:
        return _once_written(dataset_id, e)
    log(f"dataset {dataset_id!r} is not local: downloading it from Minari's remote (without a network, its client "
        f"retries for about 25 s)")
    try:
        with _lock(dataset_id), _quiet_retries():  # (one that waited for the lock finds it local)
            return minari.load_dataset(dataset_id, download=True)
    except ValueError as e:
        # The remote answered: it has no such dataset, or none this Minari version reads.
        raise DatasetError(f"dataset {dataset_id!r} cannot be downloaded: {e}") from e
    except Exception as e:  # whatever Minari's HTTP client raises: told apart by unreachable()
        if unreachable(e):
            raise DatasetMissing(_missing_message(dataset_id, f"download failed ({type(e).__name__}: {e})", env_id)) from e
        # Reached, and the remote failed (busy, rate-limited) or a disk did: training
        # on the fallback's random-policy episodes instead would waste the run.
        raise DatasetError(f"dataset {dataset_id!r} could not be downloaded ({type(e).__name__}: {e}); the fallback "
                           f"stands in only where the remote cannot be reached: try again later") from e


def _once_written(dataset_id: str, error: Exception):
    """A dataset Minari failed to open (``error``), opened again once no other process holds its
    lock: one that another run is downloading or writing is half there (both make its dir
    first), and the advice to remove it would have removed that run's download."""
    import minari

    lock = _lock_unless_read_only(dataset_id)
    if lock is None:
        raise _unreadable(dataset_id, error) from error
    try:
        return minari.load_dataset(dataset_id, download=False)
    except UNREADABLE as e:  # (gone meanwhile, too: a writer that failed cleans up)
        raise _unreadable(dataset_id, e) from e
    finally:
        lock.release()


# What an HTTP client raises when it cannot connect (no network, a name that does not resolve,
# a connection refused, dropped or failing at a proxy, Hugging Face's offline mode), by class
# name: httpx's, requests', urllib3's and the standard library's, whichever Minari's client
# uses. Not errors once connected (a read timeout, a reset connection): a busy remote.
UNREACHABLE = frozenset({"ConnectError", "ConnectTimeout", "ProxyError", "NewConnectionError", "gaierror",
                         "ConnectionRefusedError", "OfflineModeIsEnabled"})


def unreachable(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, says no server was reached."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(c.__name__ in UNREACHABLE for c in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def load_episodes(dataset_id: str, *, download: bool = False, obs_dim: Optional[int] = None, act_dim: Optional[int] = None,
                  env_id: Optional[str] = None, log=print) -> LoadedDataset:
    """Load every episode, checking the dataset's env and shapes against what the config expects."""
    ds = load_minari(dataset_id, download=download, env_id=env_id, log=log)
    try:  # (the spec reads metadata Minari did not check on opening)
        spec = ds.spec.env_spec
        obs_shape, act_shape = ds.spec.observation_space.shape, ds.spec.action_space.shape
    except UNREADABLE as e:
        raise _unreadable(dataset_id, e) from e
    ds_env = spec.id if spec is not None else None
    problems = []
    if env_id is not None and ds_env is not None and env_family(ds_env) != env_family(env_id):
        problems.append(f"it was recorded in {ds_env}, the config's env is {env_id}")
    if obs_dim is not None and tuple(obs_shape or ()) != (obs_dim,):
        problems.append(f"observations have shape {obs_shape}, the config's env.obs_dim is {obs_dim}")
    if act_dim is not None and tuple(act_shape or ()) != (act_dim,):
        problems.append(f"actions have shape {act_shape}, the config's env.act_dim is {act_dim}")
    if problems:
        raise DatasetError(f"dataset {dataset_id!r} does not match the config: " + "; ".join(problems))
    recorded = _recorded_otherwise(spec, env_id) if env_id is not None and spec is not None else ""
    if recorded:
        # Walker2d-v4's feet have other frictions than v5's, for one: the plans learnt from the
        # data then follow dynamics other than the rollouts', and the alignment error shows both.
        log(f"warning: dataset {dataset_id!r} was recorded in {recorded}, and the planner acts in {env_id} as "
            f"registered here: their dynamics may differ")
    simulator = _other_simulator(ds.storage.metadata.get("requirements") or [])
    if simulator:
        # Minari says so only when it remakes the env (recover_environment), which distdiff does not.
        # A note, not a warning: distdiff pins its simulator, and Minari's own datasets were made
        # with an older one, so nothing is to be done about it but to know it.
        log(f"note: dataset {dataset_id!r} was recorded with {simulator}: the dynamics of its episodes and of "
            f"the rollouts may differ")
    try:
        raw = list(ds.iterate_episodes())
        seeds = [meta.get("seed") for meta in ds.storage.get_episode_metadata(ds.episode_indices)]
    except (ValueError, OSError, KeyError) as e:  # Minari reads the episodes' files only now (h5py: KeyError)
        raise _unreadable(dataset_id, e, opening=False) from e
    episodes = []
    widths = (obs_dim or (obs_shape or (None,))[0], act_dim or (act_shape or (None,))[0])
    for i, ep in enumerate(raw):
        if len(ep.actions) == 0:
            raise DatasetError(f"dataset {dataset_id!r}: episode {i} holds no steps")
        # The arrays themselves, not only the space the dataset recorded: a dataset made from
        # buffers by hand is not checked against it.
        shapes = [np.shape(ep.observations), np.shape(ep.actions), np.shape(ep.rewards)]
        if (len(shapes[0]) != 2 or len(shapes[1]) != 2 or len(shapes[2]) != 1
                or any(w is not None and s[1] != w for s, w in zip(shapes, widths))):
            raise DatasetError(f"dataset {dataset_id!r}: episode {i} holds observations of shape {shapes[0]}, actions "
                               f"of shape {shapes[1]} and rewards of shape {shapes[2]}; expected (T+1, {widths[0]}), "
                               f"(T, {widths[1]}) and (T,)")
        try:
            episodes.append(Episode(observations=ep.observations, actions=ep.actions, rewards=ep.rewards,
                                    terminated=bool(np.asarray(ep.terminations)[-1]),
                                    truncated=bool(np.asarray(ep.truncations)[-1]), seed=seeds[i]))
        except ValueError as e:  # arrays whose lengths do not fit each other
            raise DatasetError(f"dataset {dataset_id!r}: episode {i}: {e}") from e
    if not episodes:
        raise DatasetError(f"dataset {dataset_id!r} holds no episodes")
    # One NaN would make the normalizer and the value statistics NaN, and every update after
    # them non-finite and skipped, far from the cause.
    bad = [i for i, ep in enumerate(episodes)
           if not all(np.isfinite(a).all() for a in (ep.observations, ep.actions, ep.rewards))]
    if bad:
        raise DatasetError(f"dataset {dataset_id!r}: {len(bad)} of {len(episodes)} episodes hold NaN or infinite "
                           f"values (the first: episode {bad[0]})")
    meta = ds.storage.metadata
    return LoadedDataset(dataset_id, ds_env, episodes, meta.get("ref_min_score"), meta.get("ref_max_score"))


# The packages whose version changes an env's dynamics, of those a dataset records as its requirements.
SIMULATOR = ("mujoco", "gymnasium")


def _other_simulator(requirements: Sequence[str]) -> str:
    """Which of a dataset's ``requirements`` (pip-style, Minari's metadata) the simulator
    installed here does not meet, as "mujoco==3.1.6 (here 4.0.1)"; "" if none. Those that do not
    parse, or name a package not installed, are left to Minari to say."""
    import importlib.metadata

    from packaging.requirements import InvalidRequirement, Requirement

    unmet = []
    for text in requirements:
        try:
            req = Requirement(str(text))
            installed = importlib.metadata.version(req.name)
        except (InvalidRequirement, importlib.metadata.PackageNotFoundError):
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue  # (for another platform or Python)
        if req.name.lower() in SIMULATOR and not req.specifier.contains(installed, prereleases=True):
            unmet.append(f"{text} (here {installed})")
    return ", ".join(unmet)


# Arguments of a MuJoCo env that change how it is drawn, not how it moves.
RENDERING = frozenset({"render_mode", "width", "height", "camera_id", "camera_name", "default_camera_config",
                       "visual_options", "max_geom"})


def _recorded_otherwise(spec, env_id: str) -> str:
    """How the env that a dataset's ``spec`` recorded differs from ``env_id`` as made here: its
    id, and the keyword arguments it was made with that are not the constructor's defaults and
    the registered ones ("" if not at all, or where ``env_id`` cannot be made)."""
    import inspect

    import gymnasium as gym
    from gymnasium.envs.registration import load_env_creator

    try:
        # (As made: a `module:` prefix imports its registration, an id without a version is the latest.)
        made = gym.make(env_id)
        here = made.spec
        made.close()
        creator = here.entry_point if callable(here.entry_point) else load_env_creator(here.entry_point)
        defaults = {k: p.default for k, p in inspect.signature(creator).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    except Exception:  # a probe: whatever stops it, the env's own checks say elsewhere
        return ""
    expected = {**defaults, **here.kwargs}
    changed = {k: v for k, v in (spec.kwargs or {}).items()
               if k not in RENDERING and (k not in expected or _plain(v) != _plain(expected[k]))}
    # Wrappers the recording env had beyond gym.make's own (a normalized observation, rescaled
    # actions): the data's states or actions are not the env's.
    ours = {w.name for w in here.additional_wrappers or ()}
    wrapped = [w.name for w in getattr(spec, "additional_wrappers", None) or () if w.name not in ours]
    if spec.id == here.id and not changed and not wrapped:
        return ""
    return (spec.id + (f" with {', '.join(f'{k}={v!r}' for k, v in sorted(changed.items()))}" if changed else "")
            + (f" wrapped in {', '.join(wrapped)}" if wrapped else ""))


def _plain(value):
    """``value`` as a dataset's JSON env spec holds it (tuples as lists, arrays as lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def write_episodes(
    dataset_id: str,
    episodes: Sequence[Episode],
    *,
    env_id: str,
    algorithm_name: str,
    max_episode_steps: Optional[int] = None,
    description: str = "",
    overwrite: bool = False,
):
    """Write a Minari dataset; an existing id is refused unless ``overwrite``. It records the
    env the episodes were collected in (its step limit ``max_episode_steps``, None: the
    registered one) and the simulator's version, which changes the dynamics."""
    if not episodes:
        raise DatasetError("no episodes to write")
    # (A run collecting the same id as its fallback meanwhile: one at a time, the second refused.)
    with _lock(dataset_id):
        return _write(dataset_id, episodes, env_id=env_id, algorithm_name=algorithm_name,
                      max_episode_steps=max_episode_steps, description=description, overwrite=overwrite)


def _write(dataset_id: str, episodes: Sequence[Episode], *, env_id: str, algorithm_name: str,
           max_episode_steps: Optional[int], description: str, overwrite: bool):
    """:func:`write_episodes`, its lock held."""
    target = os.path.join(datasets_root(), *dataset_id.split("/"))
    aside = None
    if dataset_exists(dataset_id):
        if not overwrite:
            raise DatasetError(f"dataset {dataset_id!r} already exists under {datasets_root()}; pass --overwrite to replace it")
        # Kept, hidden (Minari lists no hidden dir), until the new one is whole: a write that
        # fails (a full disk, a Ctrl-C) puts it back rather than leave neither.
        aside = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.replaced-{secrets.token_hex(4)}")
        os.rename(target, aside)
    elif os.path.exists(target):
        raise DatasetError(f"{target} exists but holds no readable dataset (an interrupted write?); remove it first")
    try:
        written = _create(dataset_id, episodes, env_id=env_id, algorithm_name=algorithm_name,
                          max_episode_steps=max_episode_steps, description=description)
    except BaseException:
        # A half-written dataset would block every later write of this id and load as garbage.
        shutil.rmtree(target, ignore_errors=True)
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return written


def _create(dataset_id: str, episodes: Sequence[Episode], *, env_id: str, algorithm_name: str,
            max_episode_steps: Optional[int], description: str):
    """The Minari dataset of ``episodes`` at ``dataset_id``, where nothing is (:func:`write_episodes`)."""
    import importlib.metadata

    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    import distdiff
    from distdiff.provenance import CODE_DIGEST

    ref_min, ref_max = reference_scores(env_id)
    env = gym.make(env_id, **({} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}))
    limit = env.spec.max_episode_steps
    if limit is not None:
        # The limit is recorded for whoever remakes the env from the dataset: one the episodes
        # contradict would be wrong for all of them.
        longer = [i for i, ep in enumerate(episodes) if len(ep) > limit]
        cut = [i for i, ep in enumerate(episodes) if ep.truncated and not ep.terminated and len(ep) < limit]
        if longer or cut:
            env.close()
            i = (longer or cut)[0]
            raise DatasetError(f"episode {i} has {len(episodes[i])} steps and "
                               f"{'is longer than' if longer else 'was truncated before'} the step limit {limit} that "
                               f"{env_id} is recorded with: give the limit it was collected under (max_episode_steps)")
    buffers = [
        EpisodeBuffer(
            id=i,
            observations=ep.observations.astype(np.float64),
            actions=ep.actions.astype(np.float32),
            rewards=ep.rewards.astype(np.float64),
            terminations=np.eye(1, len(ep), len(ep) - 1, dtype=bool)[0] & ep.terminated,
            truncations=np.eye(1, len(ep), len(ep) - 1, dtype=bool)[0] & ep.truncated,
            seed=ep.seed,
        )
        for i, ep in enumerate(episodes)
    ]
    try:
        return minari.create_dataset_from_buffers(
            dataset_id=dataset_id,
            buffer=buffers,
            env=env.spec,
            algorithm_name=algorithm_name,
            author="distdiff",
            author_email="n/a",
            # No public address to link to: which distdiff made it, as its runs name the code.
            code_permalink=f"distdiff {distdiff.__version__}, code {CODE_DIGEST}",
            eval_env=env.spec,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            # (Minari warns where a dataset's env is recovered with other versions.)
            requirements=[f"{name}=={importlib.metadata.version(name)}" for name in ("gymnasium", "mujoco")],
            description=description or _describe(episodes, env_id, algorithm_name, limit, ref_min is not None),
            data_format="hdf5",
        )
    finally:
        env.close()


def _describe(episodes: Sequence[Episode], env_id: str, algorithm_name: str, limit: Optional[int],
              d4rl_references: bool) -> str:
    """A dataset's default description: what ``minari show`` says of it."""
    seeds = [ep.seed for ep in episodes if ep.seed is not None]
    parts = [f"{len(episodes)} {env_id} episodes collected by distdiff ({algorithm_name})",
             f"step limit {limit}" if limit is not None else "no step limit"]
    if seeds:
        parts.append(f"reset seeds {min(seeds)}..{max(seeds)}, each episode's in its metadata")
    if d4rl_references:
        parts.append(f"reference scores: D4RL's {env_family(env_id)} random and expert returns, measured in its "
                     f"v2 env")
    return "; ".join(parts)


def _collect_random(dataset_id: str, n_episodes: int, env_id: str, max_episode_steps: int, seed: int, log) -> None:
    from distdiff.rollout import random_episodes_in

    log(f"collecting {n_episodes} random-policy episodes into {dataset_id!r} under {datasets_root()}")
    episodes = random_episodes_in(env_id, max_episode_steps, n_episodes, seed)
    _write(dataset_id, episodes, env_id=env_id, algorithm_name="random", max_episode_steps=max_episode_steps,
           description="", overwrite=False)  # (the caller holds its lock)


def other_env_named(dataset_id: str, env_id: str) -> Optional[str]:
    """The registered env family that a namespace of ``dataset_id`` names (``walker2d`` in
    local/walker2d/random-v0), when it is not ``env_id``'s; None otherwise."""
    import gymnasium as gym

    family = env_family(env_id)
    families = {env_family(k).lower(): env_family(k) for k in gym.registry}
    named = [families[s] for s in dataset_id.lower().split("/")[:-1] if s in families]
    return next((n for n in named if n != family), None)


def load_or_collect(dataset_id: str, *, download: bool, fallback_id: str, fallback_episodes: int, env_id: str,
                    obs_dim: int, act_dim: int, max_episode_steps: int, seed: int = 0, log=print) -> LoadedDataset:
    """Load ``dataset_id``; when it cannot be had now (:class:`DatasetMissing`) and a fallback is
    configured, load the local ``fallback_id``, collecting it with a random policy first if it
    does not exist yet (also when it is ``dataset_id`` itself)."""
    had = have_or_collect(dataset_id, download=download, fallback_id=fallback_id, fallback_episodes=fallback_episodes,
                          env_id=env_id, max_episode_steps=max_episode_steps, seed=seed, log=log)
    return load_episodes(had, obs_dim=obs_dim, act_dim=act_dim, env_id=env_id, log=log)


def have_or_collect(dataset_id: str, *, download: bool, fallback_id: str, fallback_episodes: int, env_id: str,
                    max_episode_steps: int, seed: int = 0, log=print) -> str:
    """The id of the dataset :func:`load_or_collect` loads, which is then local: ``dataset_id``
    (downloaded if it must be), else the fallback (collected if it must be). Its episodes are
    not read."""
    if dataset_id != fallback_id or fallback_episodes < 1:
        try:
            load_minari(dataset_id, download=download, env_id=env_id, log=log)
            return dataset_id
        except DatasetMissing as e:
            if not fallback_id or fallback_episodes < 1:
                raise
            log(f"warning: {str(e).splitlines()[0]}; training on the local dataset {fallback_id!r} instead, "
                f"not on {dataset_id!r} (data.fallback_dataset_id; empty: no fallback)")
    if not dataset_exists(fallback_id):
        other = other_env_named(fallback_id, env_id)
        if other:
            # Collected in this env under that name, it would fail every later run of that env.
            raise DatasetError(f"the fallback dataset {fallback_id!r} (data.fallback_dataset_id) names {other}, and would "
                               f"be collected in {env_id}: pass --data.fallback_dataset_id {local_id(env_id)} "
                               f"(or '' for no fallback)")
    lock = _lock_unless_read_only(fallback_id)
    try:
        if not dataset_exists(fallback_id):  # or another run made it while this one waited
            if lock is None:
                raise DatasetError(f"the fallback dataset {fallback_id!r} cannot be collected: the Minari store "
                                   f"{datasets_root()} cannot be written to")
            _collect_random(fallback_id, fallback_episodes, env_id, max_episode_steps, seed, log)
        else:
            log(f"the fallback dataset {fallback_id!r} is in the store already: its episodes are those it was made "
                f"with (data.fallback_episodes and env.max_episode_steps apply only where it is collected)")
    finally:
        if lock is not None:
            lock.release()
    return fallback_id


def _lock_unless_read_only(dataset_id: str) -> Optional[FileLock]:
    """:func:`_lock` of ``dataset_id``, acquired; None for a store this process cannot write to
    (one shared read-only), where none of its runs writes either."""
    try:
        lock = _lock(dataset_id)
        lock.acquire()
    except OSError:
        return None
    return lock
