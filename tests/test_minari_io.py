"""Minari datasets: write -> load round trip, refusals with clear messages, reference scores."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import socket
import threading

import minari
import numpy as np
import pytest

from distdiff.data.minari_io import (
    DATASET_ID,
    WALKER2D_REF_MAX_SCORE,
    WALKER2D_REF_MIN_SCORE,
    DatasetError,
    DatasetMissing,
    dataset_exists,
    env_family,
    load_episodes,
    load_minari,
    load_or_collect,
    normalized_score,
    reference_scores,
    write_episodes,
)
import distdiff
from distdiff.data import minari_io
from distdiff.provenance import CODE_DIGEST
from distdiff.rollout import make_env, random_episodes


def _assert_same_episodes(loaded, original):
    assert len(loaded) == len(original)
    for a, b in zip(loaded, original):
        assert np.array_equal(a.observations, b.observations)
        assert np.array_equal(a.actions, b.actions)
        assert np.array_equal(a.rewards, b.rewards)
        assert (a.terminated, a.truncated, a.seed) == (b.terminated, b.truncated, b.seed)


def test_tiny_dataset_round_trip(tiny_dataset, tiny_episodes):
    data = load_episodes(tiny_dataset, obs_dim=17, act_dim=6, env_id="Walker2d-v5")
    assert data.dataset_id == tiny_dataset
    assert data.env_id == "Walker2d-v5"
    _assert_same_episodes(data.episodes, tiny_episodes)
    assert (data.ref_min_score, data.ref_max_score) == (WALKER2D_REF_MIN_SCORE, WALKER2D_REF_MAX_SCORE)
    # Each episode keeps the seed its env was reset with, where Minari's own collector keeps it:
    # a reader of the dataset remakes any episode's start state.
    assert [ep.seed for ep in data.episodes] == list(range(len(tiny_episodes)))
    stored = minari.load_dataset(tiny_dataset).storage.get_episode_metadata([0, len(tiny_episodes) - 1])
    assert [meta["seed"] for meta in stored] == [0, len(tiny_episodes) - 1]
    env = make_env("Walker2d-v5")
    assert all(np.array_equal(env.reset(seed=ep.seed)[0].astype(np.float32), ep.observations[0])
               for ep in data.episodes[:3])


def test_episodes_of_unknown_seeds_are_written_and_read_without_one(minari_root, tiny_episodes):
    unseeded = [dataclasses.replace(ep, seed=None) for ep in tiny_episodes[:2]]
    write_episodes("local/test/unseeded-v0", unseeded, env_id="Walker2d-v5", algorithm_name="random")
    _assert_same_episodes(load_episodes("local/test/unseeded-v0").episodes, unseeded)


def test_round_trip_keeps_termination_and_truncation_flags(minari_root):
    env = make_env("Walker2d-v5", 20)  # short limit: some episodes fall, others hit the limit
    try:
        episodes = random_episodes(env, 8, seed=0)
    finally:
        env.close()
    # and one that neither terminated nor was truncated (a collection cut short)
    episodes.append(dataclasses.replace(episodes[0], terminated=False, truncated=False))
    flags = {(ep.terminated, ep.truncated) for ep in episodes}
    assert flags == {(True, False), (False, True), (False, False)}, "the fixture must cover every flag combination"
    write_episodes("local/test/flags-v0", episodes, env_id="Walker2d-v5", algorithm_name="random", max_episode_steps=20)
    _assert_same_episodes(load_episodes("local/test/flags-v0").episodes, episodes)


def test_episodes_that_contradict_the_step_limit_recorded_are_refused(minari_root):
    # The limit is what the env is remade with from the dataset (Minari's recover_environment).
    env = make_env("Walker2d-v5", 5)
    try:
        episodes = random_episodes(env, 2, seed=0)  # truncated at 5 steps, each
    finally:
        env.close()
    with pytest.raises(DatasetError, match=r"episode 0 has 5 steps and was truncated before the step limit 1000 that "
                                           r"Walker2d-v5 is recorded with: give the limit it was collected under"):
        write_episodes("local/test/unlimited-v0", episodes, env_id="Walker2d-v5", algorithm_name="random")
    with pytest.raises(DatasetError, match=r"episode 0 has 5 steps and is longer than the step limit 4 "):
        write_episodes("local/test/unlimited-v0", episodes, env_id="Walker2d-v5", algorithm_name="random",
                       max_episode_steps=4)
    assert not dataset_exists("local/test/unlimited-v0")
    write_episodes("local/test/unlimited-v0", episodes, env_id="Walker2d-v5", algorithm_name="random",
                   max_episode_steps=5)
    assert minari.load_dataset("local/test/unlimited-v0").spec.env_spec.max_episode_steps == 5


def test_existing_id_is_refused_without_overwrite(tiny_dataset, tiny_episodes):
    with pytest.raises(DatasetError) as info:
        write_episodes(tiny_dataset, tiny_episodes[:2], env_id="Walker2d-v5", algorithm_name="random")
    assert "already exists" in str(info.value) and "--overwrite" in str(info.value)
    assert len(load_episodes(tiny_dataset).episodes) == len(tiny_episodes), "the refused write must not touch the data"


def test_overwrite_replaces_the_dataset(minari_root, tiny_episodes):
    write_episodes("local/test/overwrite-v0", tiny_episodes[:3], env_id="Walker2d-v5", algorithm_name="random")
    write_episodes("local/test/overwrite-v0", tiny_episodes[5:7], env_id="Walker2d-v5", algorithm_name="random",
                   overwrite=True)
    _assert_same_episodes(load_episodes("local/test/overwrite-v0").episodes, tiny_episodes[5:7])
    # A write that fails part way (a full disk, a Ctrl-C) leaves the old dataset, not neither.
    real = minari.create_dataset_from_buffers

    def fails_half_way(**kwargs):
        real(**kwargs)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(minari, "create_dataset_from_buffers", fails_half_way)
        with pytest.raises(KeyboardInterrupt):
            write_episodes("local/test/overwrite-v0", tiny_episodes[:1], env_id="Walker2d-v5", algorithm_name="random",
                           overwrite=True)
    _assert_same_episodes(load_episodes("local/test/overwrite-v0").episodes, tiny_episodes[5:7])
    # Nothing hidden is left beside it, whole or not.
    assert not [p.name for p in (minari_root / "local" / "test").iterdir() if "overwrite-v0" in p.name and
                p.name != "overwrite-v0"]


def test_an_env_named_with_its_module_trains_on_its_own_data(minari_root, tiny_episodes):
    # README's way to a custom env is `module:Env-vN`; Gymnasium records the id without the module.
    env_id = "gymnasium.envs.mujoco:Walker2d-v5"
    assert env_family(env_id) == "Walker2d"
    write_episodes("local/walker2d/module-v0", tiny_episodes[:2], env_id=env_id, algorithm_name="random")
    loaded = load_episodes("local/walker2d/module-v0", env_id=env_id, obs_dim=17, act_dim=6, log=pytest.fail)
    assert len(loaded.episodes) == 2


def test_a_stray_or_copied_folder_in_the_store_neither_hides_nor_breaks_a_dataset(minari_root, tiny_episodes):
    import shutil

    write_episodes("local/test/kept-v0", tiny_episodes[:2], env_id="Walker2d-v5", algorithm_name="random")
    # A backup beside it (Minari's own list of local datasets failed on its name), and a copy
    # under another id (which that list left out, though it loads).
    shutil.copytree(minari_root / "local/test/kept-v0", minari_root / "local/test/kept-v0.bak")
    shutil.copytree(minari_root / "local/test/kept-v0", minari_root / "local/test/copied-v0")
    try:
        assert dataset_exists("local/test/kept-v0") and dataset_exists("local/test/copied-v0")
        assert not dataset_exists("local/test/other-v0")
        assert len(load_episodes("local/test/copied-v0").episodes) == 2
    finally:
        shutil.rmtree(minari_root / "local/test/kept-v0.bak")


def test_episodes_whose_arrays_do_not_have_the_recorded_shapes_are_refused(minari_root):
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    buffers = [EpisodeBuffer(id=0, observations=rng.standard_normal((6, 11)), actions=rng.uniform(-1, 1, (5, 6)),
                             rewards=rng.standard_normal(5), terminations=np.zeros(5, bool),
                             truncations=np.array([0, 0, 0, 0, 1], bool))]
    minari.create_dataset_from_buffers(dataset_id="local/test/narrow-v0", buffer=buffers, env="Walker2d-v5",
                                       algorithm_name="test")
    with pytest.raises(DatasetError, match=r"episode 0 holds observations of shape \(6, 11\).*expected \(T\+1, 17\)"):
        load_episodes("local/test/narrow-v0", obs_dim=17, act_dim=6)


def test_a_dataset_whose_metadata_counts_more_episodes_than_it_holds_is_named_unreadable(minari_root, tiny_episodes):
    write_episodes("local/test/overcounted-v0", tiny_episodes[:2], env_id="Walker2d-v5", algorithm_name="random")
    meta_path = minari_root / "local/test/overcounted-v0/data/metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["total_episodes"] = 5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="rm -r"):
        load_episodes("local/test/overcounted-v0")


def test_no_episodes_is_refused(minari_root):
    with pytest.raises(DatasetError, match="no episodes"):
        write_episodes("local/test/empty-v0", [], env_id="Walker2d-v5", algorithm_name="random")
    assert not dataset_exists("local/test/empty-v0")


def test_a_dataset_minari_made_with_no_episodes_is_refused_on_load(minari_root):
    import gymnasium as gym

    minari.create_dataset_from_buffers(dataset_id="local/test/made-empty-v0", buffer=[], env=gym.make("Walker2d-v5").spec,
                                       algorithm_name="none", author="a", author_email="a@b.c", code_permalink="none",
                                       description="no episodes", data_format="hdf5")
    with pytest.raises(DatasetError, match="'local/test/made-empty-v0' holds no episodes"):
        load_episodes("local/test/made-empty-v0")


@pytest.mark.parametrize("damage, expected", [
    ("removed", "is in the local Minari store .* cannot be read .* cut short leaves it so\\): remove it, rm -r "
                ".*/local/test/damaged-removed-v0, and make it again"),
    ("emptied", "is in the local Minari store .* cannot be read .* remove it, rm -r .*, and make it again"),
    # Not to be removed: another Minari reads it.
    ("newer", r"in the local Minari store .* was made by Minari 99.0.0, which Minari \S+ does not read$"),
    # Metadata another tool wrote, or an edit: each escaped as Minari's own KeyError, AssertionError,
    # AttributeError; and told apart from damage, which alone is to be removed.
    ("unversioned", r"in the local Minari store .* has metadata that Minari \S+ does not read \(KeyError: "
                    r"'minari_version'\), in .*/data/metadata.json: another tool wrote it, or an edit changed it$"),
    ("nullversion", r"in the local Minari store .* has metadata that Minari \S+ does not read \(AssertionError\), in "),
    ("otherformat", r"in the local Minari store .* has metadata that Minari \S+ does not read \(KeyError: 'parquet2'\)"),
    ("listed", r"in the local Minari store .* has metadata that Minari \S+ does not read \(AttributeError: "),
    ("badspace", r"in the local Minari store .* has metadata that Minari \S+ does not read \(KeyError: 'type'\)"),
    ("spacetext", r"in the local Minari store .* has metadata that Minari \S+ does not read \(JSONDecodeError: "),
])
def test_a_damaged_local_dataset_is_a_clear_error(minari_root, tiny_episodes, damage, expected):
    dataset_id = f"local/test/damaged-{damage}-v0"
    write_episodes(dataset_id, tiny_episodes[:2], env_id="Walker2d-v5", algorithm_name="random")
    data = minari_root / dataset_id / "data"
    if damage == "removed":
        (data / "metadata.json").unlink()
    elif damage == "emptied":
        next(data.glob("main_data.*")).write_bytes(b"")
    else:
        metadata = json.loads((data / "metadata.json").read_text())
        edited = {"newer": {**metadata, "minari_version": "99.0.0"},
                  "unversioned": {k: v for k, v in metadata.items() if k != "minari_version"},
                  "nullversion": {**metadata, "minari_version": None},
                  "otherformat": {**metadata, "data_format": "parquet2"},
                  "listed": list(metadata),
                  "badspace": {**metadata, "observation_space": "{}"},
                  "spacetext": {**metadata, "observation_space": "Box(-inf, inf, (17,), float64)"}}[damage]
        (data / "metadata.json").write_text(json.dumps(edited))
    with pytest.raises(DatasetError, match=f"{dataset_id!r} {expected}"):
        load_episodes(dataset_id)


def test_a_dataset_whose_write_was_killed_before_its_metadata_is_to_be_removed(minari_root, monkeypatch):
    # Minari writes a first part of the metadata, then the rest with the dataset's id: a writer
    # killed between the two (SIGKILL, out of memory) runs no cleanup, and leaves a metadata.json
    # that parses.
    import gymnasium as gym
    from minari.dataset.minari_storage import MinariStorage

    class Killed(Exception):
        pass

    def killed(self, metadata):
        raise Killed

    monkeypatch.setattr(MinariStorage, "update_metadata", killed)
    with pytest.raises(Killed):
        minari.create_dataset_from_buffers(dataset_id="local/test/killed-v0", buffer=[],
                                           env=gym.make("Walker2d-v5").spec, algorithm_name="none",
                                           data_format="hdf5")
    monkeypatch.undo()
    with pytest.raises(DatasetError, match=r"'local/test/killed-v0' is in the local Minari store .* cannot be read "
                                           r"\(KeyError: 'dataset_id'; a write or download cut short leaves it so\): "
                                           r"remove it, rm -r .*/local/test/killed-v0, and make it again"):
        load_episodes("local/test/killed-v0")


def test_a_fallback_named_for_another_env_is_not_collected_in_this_one(minari_root, monkeypatch):
    # Hopper episodes under Walker2d's default fallback id would fail every later Walker2d run.
    _remote(monkeypatch, socket.gaierror(-2, "Name or service not known"))
    kwargs = dict(download=True, fallback_episodes=2, env_id="Hopper-v5", obs_dim=11, act_dim=3, max_episode_steps=20,
                  log=lambda s: None)
    with pytest.raises(DatasetError, match="'local/walker2d/random-v0' .* names Walker2d, and would be collected in "
                                           "Hopper-v5: pass --data.fallback_dataset_id local/hopper/random-v0"):
        load_or_collect("mujoco/hopper/medium-v0", fallback_id="local/walker2d/random-v0", **kwargs)
    assert not dataset_exists("local/walker2d/random-v0")


def test_a_store_path_that_is_not_a_directory_is_named(tmp_path, monkeypatch):
    store = tmp_path / "not-a-dir"
    store.write_text("")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    with pytest.raises(DatasetError, match=f"the Minari store {store} cannot be used .* check MINARI_DATASETS_PATH"):
        load_episodes("local/walker2d/random-v0")


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"obs_dim": 11}, ["obs_dim", "11", "(17,)"]),
        ({"act_dim": 3}, ["act_dim", "3", "(6,)"]),
        ({"env_id": "Hopper-v5"}, ["Walker2d-v5", "Hopper-v5"]),
    ],
)
def test_mismatch_with_the_config_is_a_clear_error(tiny_dataset, kwargs, expected):
    with pytest.raises(DatasetError) as info:
        load_episodes(tiny_dataset, **kwargs)
    message = str(info.value)
    assert tiny_dataset in message and "does not match the config" in message
    for part in expected:
        assert part in message


def test_all_mismatches_are_reported_at_once(tiny_dataset):
    with pytest.raises(DatasetError) as info:
        load_episodes(tiny_dataset, obs_dim=11, act_dim=3)
    assert "obs_dim" in str(info.value) and "act_dim" in str(info.value)


def test_a_dataset_with_nan_is_refused(minari_root, tiny_episodes):
    broken = [dataclasses.replace(ep, rewards=ep.rewards.copy()) for ep in tiny_episodes[:4]]
    broken[2].rewards[5] = np.nan
    write_episodes("local/test/nan-v0", broken, env_id="Walker2d-v5", algorithm_name="random")
    with pytest.raises(DatasetError, match=r"1 of 4 episodes hold NaN or infinite values \(the first: episode 2\)"):
        load_episodes("local/test/nan-v0")


def test_missing_dataset_points_to_collect(minari_root):
    with pytest.raises(DatasetError) as info:
        load_episodes("local/walker2d/does-not-exist-v0")
    message = str(info.value)
    assert "local/walker2d/does-not-exist-v0" in message
    assert "collect.py" in message
    assert str(minari_root) in message  # where it was looked for


def test_minari_normalized_score_uses_the_stored_reference_scores(tiny_dataset, tiny_episodes):
    ds = minari.load_dataset(tiny_dataset)
    returns = np.array([ep.episode_return for ep in tiny_episodes] + [WALKER2D_REF_MIN_SCORE, WALKER2D_REF_MAX_SCORE])
    scores = minari.get_normalized_score(ds, returns)
    np.testing.assert_allclose(scores[-2:], [0.0, 1.0], atol=1e-12)
    # distdiff reports D4RL's percent convention, Minari a fraction
    np.testing.assert_allclose(100 * scores, normalized_score(returns, WALKER2D_REF_MIN_SCORE, WALKER2D_REF_MAX_SCORE))
    assert normalized_score(returns, None, None) is None


def test_concurrent_runs_collect_the_fallback_dataset_once(minari_root):
    # Two Tune trials on one machine, neither finding the main dataset: one collects the
    # fallback, the other waits for it and loads the same episodes.
    barrier, loaded, logs = threading.Barrier(2), [None, None], [[], []]

    def run(i):
        barrier.wait()
        loaded[i] = load_or_collect("mujoco/walker2d/nowhere-v0", download=False, fallback_id="local/test/race-v0",
                                    fallback_episodes=3, env_id="Walker2d-v5", obs_dim=17, act_dim=6,
                                    max_episode_steps=10, log=logs[i].append)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(d is not None for d in loaded), "a run failed"
    assert sum(any("collecting" in line for line in log) for log in logs) == 1
    _assert_same_episodes(loaded[0].episodes, loaded[1].episodes)
    assert len(loaded[0].episodes) == 3


def writes_held_after_their_dir(monkeypatch):
    """Minari's dataset writes, each held after it made the dataset's dir (as a download's, whose
    client makes it first too) until ``go`` is set; ``made`` is set then."""
    import minari.utils

    made, go, generate = threading.Event(), threading.Event(), minari.utils._generate_dataset_path

    def slow(dataset_id):
        path = generate(dataset_id)
        made.set()
        go.wait(timeout=60)
        return path

    monkeypatch.setattr(minari.utils, "_generate_dataset_path", slow)
    return made, go


def second_during_first(first, second, made, go) -> None:
    """Run ``first`` (a write held by :func:`writes_held_after_their_dir`), and ``second`` once
    the write's dir is made; the write goes on a second later."""
    writing = threading.Thread(target=first)
    writing.start()
    assert made.wait(timeout=60)
    other = threading.Thread(target=second)
    other.start()
    other.join(timeout=1.0)  # (where it read without waiting, it has failed by now)
    go.set()
    writing.join()
    other.join()


def test_a_run_that_finds_the_fallback_half_written_waits_for_it(minari_root, monkeypatch):
    # Minari makes the dataset's dir before it writes into it: a second run that looked then
    # found "a dataset" and read it half written.
    made, go = writes_held_after_their_dir(monkeypatch)
    loaded, errors, logs = [None, None], [], [[], []]

    def run(i):
        try:
            loaded[i] = load_or_collect("mujoco/walker2d/nowhere-v0", download=False, fallback_id="local/test/half-v0",
                                        fallback_episodes=3, env_id="Walker2d-v5", obs_dim=17, act_dim=6,
                                        max_episode_steps=10, log=logs[i].append)
        except Exception as e:  # (reported below, with what the run said)
            errors.append(e)

    second_during_first(lambda: run(0), lambda: run(1), made, go)
    assert not errors, errors
    _assert_same_episodes(loaded[0].episodes, loaded[1].episodes)
    assert any("is in the store already" in line for line in logs[1])


def test_a_run_that_finds_its_dataset_half_downloaded_or_written_waits_for_it(minari_root, tiny_episodes, monkeypatch):
    # A download, as a write, makes the dataset's dir before its files: a run that looked then
    # was told to remove the dataset that the other run was still downloading.
    made, go = writes_held_after_their_dir(monkeypatch)
    loaded, errors = [], []

    def load():
        try:
            loaded.append(minari_io.load_minari("local/test/busy-v0"))
        except Exception as e:  # (reported below)
            errors.append(e)

    second_during_first(lambda: write_episodes("local/test/busy-v0", tiny_episodes[:3], env_id="Walker2d-v5",
                                               algorithm_name="random"), load, made, go)
    assert not errors, errors
    assert loaded[0].total_episodes == 3


def test_a_dataset_written_while_a_run_collects_it_as_its_fallback_is_refused_not_mixed(minari_root, tiny_episodes):
    # collect.py, run as the missing-dataset advice says, while a run collects the same id.
    lock = minari_io._lock("local/test/both-v0")
    lock.acquire()
    outcome = []
    writer = threading.Thread(target=lambda: outcome.append(_try_write("local/test/both-v0", tiny_episodes[:2])))
    writer.start()
    writer.join(timeout=1.0)
    assert writer.is_alive(), "the write did not wait for the run collecting it"
    minari_io._write("local/test/both-v0", tiny_episodes[:3], env_id="Walker2d-v5", algorithm_name="random",
                     max_episode_steps=None, description="", overwrite=False)  # (as the run does, its lock held)
    lock.release()
    writer.join()
    assert "already exists" in outcome[0]
    assert len(load_episodes("local/test/both-v0", obs_dim=17, act_dim=6).episodes) == 3


def _try_write(dataset_id, episodes):
    try:
        write_episodes(dataset_id, episodes, env_id="Walker2d-v5", algorithm_name="random")
    except DatasetError as e:
        return str(e)
    return "written"


def _remote(monkeypatch, error):
    """Minari's remote, answering every download with ``error``; the ids it was asked for."""
    asked, load = [], minari.load_dataset

    def load_dataset(dataset_id, download=False):
        if not download:
            return load(dataset_id, download=False)
        asked.append(dataset_id)
        raise error

    monkeypatch.setattr(minari, "load_dataset", load_dataset)
    return asked


FALLBACK = dict(fallback_id="local/test/stand-in-v0", fallback_episodes=2, env_id="Walker2d-v5", obs_dim=17, act_dim=6,
                max_episode_steps=10)


def test_a_dataset_that_cannot_be_downloaded_falls_back_and_says_so(minari_root, monkeypatch):
    asked = _remote(monkeypatch, socket.gaierror(-2, "Name or service not known"))
    log = []
    data = load_or_collect("farama/walker2d/offline-v0", download=True, log=log.append, **FALLBACK)
    assert asked == ["farama/walker2d/offline-v0"]
    assert data.dataset_id == FALLBACK["fallback_id"] and len(data.episodes) == 2
    assert any("training on the local dataset 'local/test/stand-in-v0' instead" in line for line in log)


def test_the_remote_clients_retries_are_not_printed_one_by_one(minari_root, monkeypatch, capfd):
    from huggingface_hub.utils import logging as hub_logging

    load = minari.load_dataset

    def load_dataset(dataset_id, download=False):
        if not download:
            return load(dataset_id, download=False)
        for wait in (1, 2, 4, 8, 8):  # as huggingface_hub's backoff logs them without a network
            hub_logging.get_logger("huggingface_hub.utils._http").warning(f"Retrying in {wait}s")
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(minari, "load_dataset", load_dataset)
    before = hub_logging.get_verbosity()
    load_or_collect("farama/walker2d/offline-v0", download=True, log=print, **FALLBACK)
    out, err = capfd.readouterr()
    assert "Retrying" not in out + err and "download failed" in out
    assert hub_logging.get_verbosity() == before


def test_only_a_remote_that_cannot_be_reached_is_a_fallback(minari_root, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # What the client raises here without a network: its own error, raised from the socket's.
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as e:
            raise httpx2.ConnectError(str(e)) from e
    except httpx2.ConnectError as e:
        offline = e
    for error in (offline, httpx2.ConnectTimeout("timed out"), ConnectionRefusedError(111, "Connection refused"),
                  OfflineModeIsEnabled("HF_HUB_OFFLINE is set")):
        _remote(monkeypatch, error)
        assert load_or_collect("farama/walker2d/offline-v0", download=True, log=print, **FALLBACK).dataset_id == \
            FALLBACK["fallback_id"]
    # With a network: a remote that failed, or a full disk, is no reason to train on random data.
    busy = httpx2.Response(503, request=httpx2.Request("GET", "https://remote.invalid/api/datasets"))
    for error, said in ((HfHubHTTPError("503 Server Error: Service Unavailable", response=busy), "503 Server Error"),
                        (httpx2.ReadTimeout("The read operation timed out"), "The read operation timed out"),
                        (httpx2.RemoteProtocolError("Server disconnected"), "Server disconnected"),
                        (OSError(28, "No space left on device"), "No space left on device")):
        _remote(monkeypatch, error)
        with pytest.raises(DatasetError, match=f"could not be downloaded .*{said}.*try again later") as raised:
            load_or_collect("farama/walker2d/offline-v0", download=True, log=print,
                            **{**FALLBACK, "fallback_id": "local/test/unused-v0"})
        assert not isinstance(raised.value, DatasetMissing)
    assert not dataset_exists("local/test/unused-v0")


def test_a_dataset_the_remote_does_not_have_is_an_error_not_a_fallback(minari_root, monkeypatch):
    # A mistyped id, with internet: the remote says it has none, and no run trains on random data.
    _remote(monkeypatch, ValueError("Couldn't find any version for dataset mujoco/walker2d/mediun in the remote"))
    with pytest.raises(DatasetError, match="mediun") as raised:
        load_or_collect("mujoco/walker2d/mediun-v0", download=True, **{**FALLBACK, "fallback_id": "local/test/unused-v0"})
    assert not isinstance(raised.value, DatasetMissing)
    assert not dataset_exists("local/test/unused-v0")


def test_a_missing_local_id_is_an_error_never_looked_up_on_the_remote_nor_a_fallback(minari_root, monkeypatch):
    # A typo, or a MINARI_DATASETS_PATH not exported: no download would bring it, and a run
    # must not train on random data instead.
    asked = _remote(monkeypatch, AssertionError("asked the remote"))
    with pytest.raises(DatasetError, match="local Minari store") as raised:
        load_or_collect("local/walker2d/typo-v0", download=True, **{**FALLBACK, "fallback_id": "local/test/unused-v0"})
    assert not isinstance(raised.value, DatasetMissing)
    assert asked == [] and not dataset_exists("local/test/unused-v0")
    # The fallback's own id is collected when it is missing, asked for directly or not.
    data = load_or_collect(FALLBACK["fallback_id"], download=True, **FALLBACK)
    assert data.dataset_id == FALLBACK["fallback_id"] and len(data.episodes) == 2


def test_a_run_on_the_fallback_records_it_as_its_dataset(tiny_dataset, monkeypatch, tmp_path):
    # Its config.yaml says what it was trained on, and a resume or phase 2 loads the same data
    # even once the configured dataset can be downloaded.
    from _helpers import tiny_online_config
    from distdiff import config
    from distdiff.checkpoint import load_checkpoint
    from distdiff.pretrain import pretrain

    _remote(monkeypatch, socket.gaierror(-2, "Name or service not known"))
    cfg = tiny_online_config("farama/walker2d/offline-v0", **{"data.fallback_dataset_id": tiny_dataset,
                                                               "train.steps": 2})
    ckpt = pretrain(cfg, tmp_path, quiet=True)
    assert config.load(tmp_path / "config.yaml").data.dataset_id == tiny_dataset
    assert load_checkpoint(ckpt)["config"]["data"]["dataset_id"] == tiny_dataset


def test_a_resume_trains_on_its_own_dataset_or_stops_never_on_the_fallback(tiny_episodes, monkeypatch, tmp_path,
                                                                           capsys):
    # A downloaded dataset gone from this machine's store (another node, a shell without
    # MINARI_DATASETS_PATH): random-policy episodes would stand in for the rest of its training.
    from _helpers import tiny_online_config
    from distdiff import config
    from distdiff.checkpoint import load_checkpoint
    from distdiff.pretrain import pretrain

    write_episodes("farama/walker2d/mirror-v0", tiny_episodes[:3], env_id="Walker2d-v5", algorithm_name="random")
    cfg = tiny_online_config("farama/walker2d/mirror-v0", **{"data.fallback_dataset_id": "local/test/unwanted-v0",
                                                              "train.steps": 2})
    pretrain(cfg, tmp_path / "mirrored", quiet=True)
    minari.delete_dataset("farama/walker2d/mirror-v0")
    _remote(monkeypatch, socket.gaierror(-2, "Name or service not known"))
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4))
    with pytest.raises(DatasetMissing, match="A resume trains on the run's own dataset: 'local/test/unwanted-v0'"):
        pretrain(longer, tmp_path / "mirrored", resume=True, quiet=True)
    assert not dataset_exists("local/test/unwanted-v0")
    # A run that trained on the fallback (offline from the start) goes on with it, though the
    # config a notebook or a Tune trial passes names the dataset it stood in for.
    offline = tmp_path / "offline"
    pretrain(cfg, offline, quiet=True)
    assert config.load(offline / "config.yaml").data.dataset_id == "local/test/unwanted-v0"
    capsys.readouterr()
    pretrain(longer, offline, resume=True, quiet=True)
    assert load_checkpoint(offline / "checkpoint.pt")["step"] == 4
    assert config.load(offline / "config.yaml").data.dataset_id == "local/test/unwanted-v0"
    assert ("resuming on the run's own dataset 'local/test/unwanted-v0', not on 'farama/walker2d/mirror-v0', which "
            "the config names") in capsys.readouterr().out


@pytest.mark.parametrize("cut, said", [(lambda ep: ep.actions[:0], "episode 1 holds no steps"),
                                        (lambda ep: ep.actions[:-1], "episode 1: ")])
def test_an_episode_without_steps_or_with_lengths_that_do_not_fit_is_a_dataset_error(tiny_dataset, monkeypatch, cut,
                                                                                      said):
    # (Minari's hdf5 writer refuses them; a dataset of another writer may hold them.)
    from minari.dataset.minari_dataset import MinariDataset

    iterate = MinariDataset.iterate_episodes

    def damaged(self, *args, **kwargs):
        for i, ep in enumerate(iterate(self, *args, **kwargs)):
            yield dataclasses.replace(ep, actions=cut(ep)) if i == 1 else ep

    monkeypatch.setattr(MinariDataset, "iterate_episodes", damaged)
    with pytest.raises(DatasetError, match=f"dataset '{tiny_dataset}': {said}"):
        load_episodes(tiny_dataset)


def test_a_written_dataset_records_its_step_limit_and_the_simulators_version(minari_root, tiny_episodes):
    import importlib.metadata

    write_episodes("local/test/limited-v0", tiny_episodes[:2], env_id="Walker2d-v5", algorithm_name="random",
                   max_episode_steps=30)
    ds = minari.load_dataset("local/test/limited-v0")
    # Minari's recover_environment() gives back a 30-step env, and warns under another MuJoCo.
    assert ds.spec.env_spec.max_episode_steps == 30
    assert f"mujoco=={importlib.metadata.version('mujoco')}" in ds.storage.metadata["requirements"]
    # What `minari show` says of it: the limit, the seeds, whose references; and which distdiff.
    description = ds.storage.metadata["description"]
    assert description.startswith("2 Walker2d-v5 episodes collected by distdiff (random); step limit 30; "
                                  "reset seeds 0..1, each episode's in its metadata; reference scores: D4RL's")
    assert ds.storage.metadata["code_permalink"] == f"distdiff {distdiff.__version__}, code {CODE_DIGEST}"


def test_a_dataset_recorded_under_another_simulator_says_so(minari_root, tiny_episodes):
    # Minari warns only where it remakes the env, which distdiff does not.
    write_episodes("local/test/oldsim-v0", tiny_episodes[:2], env_id="Walker2d-v5", algorithm_name="random")
    said = []
    load_episodes("local/test/oldsim-v0", env_id="Walker2d-v5", log=said.append)
    assert said == []  # (recorded with this simulator)
    metadata = minari_root / "local/test/oldsim-v0/data/metadata.json"
    fields = json.loads(metadata.read_text())
    fields["requirements"] = ["mujoco==3.1.6", "gymnasium>=1.0", "not a requirement", "torch==0.0.1",
                              'mujoco==2.0; python_version < "3"']
    metadata.write_text(json.dumps(fields))
    load_episodes("local/test/oldsim-v0", env_id="Walker2d-v5", log=said.append)
    assert said == [f"note: dataset 'local/test/oldsim-v0' was recorded with mujoco==3.1.6 (here "
                    f"{importlib.metadata.version('mujoco')}): the dynamics of its episodes and of the rollouts may "
                    f"differ"]


def test_reference_scores_are_d4rls_for_every_family_and_namespace():
    assert reference_scores("Hopper-v5") == (-20.272305, 3234.3)
    assert reference_scores("HalfCheetah-v5") == (-280.178953, 12135.0)
    assert reference_scores("Ant-v5") == (-325.6, 3879.7)
    assert reference_scores("Swimmer-v5") == (None, None)  # D4RL has none
    assert env_family("myns/Walker2d-v4") == "Walker2d"
    assert reference_scores("myns/Walker2d-v4") == reference_scores("Walker2d-v5") != (None, None)


def test_dataset_ids_need_a_version_number():
    assert DATASET_ID.match("local/walker2d/random-v0") and DATASET_ID.match("mujoco/walker2d/medium-v12")
    assert not DATASET_ID.match("local/walker2d/random-v") and not DATASET_ID.match("local/walker2d/random")
    # Minari's own rule, checked here rather than failing once a fallback was collected or a
    # download began; none of them can name a path out of the store.
    from minari.dataset.minari_dataset import DATASET_ID_RE

    for dataset_id in ("local/walker2d/sac.medium-v0", "../walker2d-v0", "local/../../x-v0", "/tmp/x-v0", "a/x-v0",
                       "local/walker2d/random-v0", "mujoco/walker2d/medium-v12", "walker2d_mine-v3", "a-b/c_d/e-f-v0",
                       "local/walker2d/random-v0\n"):  # (a trailing newline: Minari writes nothing of it)
        assert bool(DATASET_ID.match(dataset_id)) == bool(DATASET_ID_RE.fullmatch(dataset_id)), dataset_id
    # Nor is one read, wherever it comes from (a checkpoint's config skips validation).
    with pytest.raises(DatasetError, match="must look like namespace/name-vN"):
        load_minari("local/../../x-v0")


def test_a_dataset_recorded_through_wrappers_says_so(minari_root, tiny_episodes):
    # Another tool's dataset of Walker2d-v5 with its actions rescaled: the planner would learn
    # actions the env does not take, without a word.
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    env = gym.wrappers.RescaleAction(gym.make("Walker2d-v5"), -2.0, 2.0)
    buffers = [EpisodeBuffer(id=i, observations=ep.observations, actions=(2.0 * ep.actions).astype(np.float32),
                             rewards=ep.rewards, terminations=np.eye(len(ep.rewards), dtype=bool)[-1] & ep.terminated,
                             truncations=np.eye(len(ep.rewards), dtype=bool)[-1] & ep.truncated)
               for i, ep in enumerate(tiny_episodes[:2])]
    minari.create_dataset_from_buffers("local/test/rescaled-v0", buffers, env=env, algorithm_name="other tool")
    said = []
    load_episodes("local/test/rescaled-v0", obs_dim=17, act_dim=6, env_id="Walker2d-v5", log=said.append)
    assert said == ["warning: dataset 'local/test/rescaled-v0' was recorded in Walker2d-v5 wrapped in RescaleAction, "
                    "and the planner acts in Walker2d-v5 as registered here: their dynamics may differ"]


def test_a_dataset_of_another_version_of_the_env_fits_the_config_and_says_so(minari_root, tiny_episodes):
    write_episodes("local/test/v4-v0", tiny_episodes[:2], env_id="Walker2d-v4", algorithm_name="random")
    said = []
    data = load_episodes("local/test/v4-v0", obs_dim=17, act_dim=6, env_id="Walker2d-v5", log=said.append)
    assert data.env_id == "Walker2d-v4" and len(data.episodes) == 2
    assert said == ["warning: dataset 'local/test/v4-v0' was recorded in Walker2d-v4, and the planner acts in "
                    "Walker2d-v5 as registered here: their dynamics may differ"]
    load_episodes("local/test/v4-v0", env_id="Walker2d-v4", log=said.append)
    assert len(said) == 1  # the same env: nothing to say


def test_a_dataset_recorded_with_other_env_arguments_says_which(minari_root, tiny_episodes, monkeypatch):
    import gymnasium as gym

    make = gym.make
    # A third party's data, made with Walker2d-v5(frame_skip=2): the same shapes, other dynamics.
    monkeypatch.setattr(gym, "make", lambda env_id, **kw: make(env_id, **{"frame_skip": 2, "render_mode": "rgb_array",
                                                                           **kw}))
    write_episodes("local/test/skip-v0", tiny_episodes[:2], env_id="Walker2d-v5", algorithm_name="random")
    monkeypatch.setattr(gym, "make", make)
    said = []
    load_episodes("local/test/skip-v0", env_id="Walker2d-v5", log=said.append)
    assert said and "was recorded in Walker2d-v5 with frame_skip=2, and the planner acts in Walker2d-v5" in said[0]
    assert "render_mode" not in said[0]  # how it is drawn is no difference
    # Made with the constructor's defaults given explicitly (as Minari's DataCollector users
    # may), and planned in the id without its version: the same env, nothing to say.
    monkeypatch.setattr(gym, "make", lambda env_id, **kw: make(env_id, **{"frame_skip": 4, "healthy_z_range": (0.8, 2.0),
                                                                           "xml_file": "walker2d_v5.xml", **kw}))
    write_episodes("local/test/explicit-v0", tiny_episodes[:2], env_id="Walker2d-v5", algorithm_name="random")
    monkeypatch.setattr(gym, "make", make)
    said.clear()
    load_episodes("local/test/explicit-v0", env_id="Walker2d-v5", log=said.append)
    load_episodes("local/test/explicit-v0", env_id="Walker2d", log=said.append)
    assert said == []


def test_the_fallback_is_collected_with_the_given_seed(minari_root):
    data = load_or_collect("local/test/seeded-v0", download=False, fallback_id="local/test/seeded-v0",
                           fallback_episodes=2, env_id="Walker2d-v5", obs_dim=17, act_dim=6, max_episode_steps=5,
                           seed=3, log=lambda s: None)
    env = make_env("Walker2d-v5")
    try:
        expected = [env.reset(seed=s)[0] for s in (3, 4)]
    finally:
        env.close()
    for ep, start in zip(data.episodes, expected):
        np.testing.assert_array_equal(ep.observations[0], start.astype(np.float32))


@pytest.mark.parametrize("damage, said", [
    (lambda ep: {"rewards": ep.rewards[:, None]}, r"rewards of shape \(\d+, 1\)"),  # broadcast into [T, T] returns
    (lambda ep: {"actions": ep.actions[:, :5]}, r"actions of shape \(\d+, 5\)"),  # not the config's act_dim
])
def test_an_episode_whose_arrays_have_other_shapes_than_the_config_is_refused(tiny_dataset, monkeypatch, damage, said):
    from minari.dataset.minari_dataset import MinariDataset

    from distdiff.data.minari_io import DatasetError, load_episodes

    iterate = MinariDataset.iterate_episodes

    def damaged(self, *args, **kwargs):
        for i, ep in enumerate(iterate(self, *args, **kwargs)):
            yield dataclasses.replace(ep, **damage(ep)) if i == 1 else ep

    monkeypatch.setattr(MinariDataset, "iterate_episodes", damaged)
    with pytest.raises(DatasetError, match=f"episode 1 holds .*{said}"):
        load_episodes(tiny_dataset, obs_dim=17, act_dim=6)


def test_a_dataset_with_a_nan_action_is_refused(tiny_dataset, monkeypatch):
    # One NaN action makes the normalizer NaN and every update non-finite, far from the cause.
    from minari.dataset.minari_dataset import MinariDataset

    from distdiff.data.minari_io import DatasetError, load_episodes

    iterate = MinariDataset.iterate_episodes

    def with_nan(self, *args, **kwargs):
        for i, ep in enumerate(iterate(self, *args, **kwargs)):
            if i == 3:
                actions = ep.actions.copy()
                actions[2, 1] = np.nan
                ep = dataclasses.replace(ep, actions=actions)
            yield ep

    monkeypatch.setattr(MinariDataset, "iterate_episodes", with_nan)
    with pytest.raises(DatasetError, match=r"hold NaN or infinite values \(the first: episode 3\)"):
        load_episodes(tiny_dataset)


def test_a_missing_datasets_advice_makes_one_of_the_runs_env_under_a_name_of_its_own():
    # It named Walker2d's dataset and env whatever the run's env: followed in a Hopper run, it
    # made Hopper episodes under a Walker2d name.
    with pytest.raises(DatasetError) as missing:
        load_minari("local/hopper/typo-v0", env_id="Hopper-v5")
    assert ("python launch/collect.py --policy random --episodes 50 --env Hopper-v5 --dataset-id "
            "local/hopper/typo-v0\nthen run the same command again.") in str(missing.value)
    with pytest.raises(DatasetError) as missing:
        load_minari("local/walker2d/absent-v0", env_id="Hopper-v5")
    assert ("--env Hopper-v5 --dataset-id local/hopper/random-v0\nand pass --data.dataset_id "
            "local/hopper/random-v0.") in str(missing.value)
