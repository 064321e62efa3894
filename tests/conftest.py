"""Shared fixtures of the fast CPU test suite.

Threads are pinned to one before torch is imported: on the 2-core test machines a second
BLAS thread only slows the tiny models down. Datasets live in a per-session temporary
MINARI_DATASETS_PATH, so tests never touch ~/.minari, ../shared or the network. So does HOME:
Ray writes its auth token there (~/.ray/auth_token), Mesa and Matplotlib their caches. Ray's
usage statistics are off and would be sent nowhere: `ray start` reports even that they are off.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The suite checks CPU results, bit-exact resumes among them, which cuDNN's convolutions do not
# promise: a GPU machine's devices are hidden from it and from the Ray and launch-script
# processes it starts. tests/test_cuda.py asks for them: DISTDIFF_TEST_CUDA=1 python -m pytest
# tests/test_cuda.py (bench/cuda_check.sh runs it so).
if os.environ.get("DISTDIFF_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
from distdiff.process import limit_threads  # noqa: E402 (imports no torch)

limit_threads()
_HOME = tempfile.mkdtemp(prefix="distdiff-tests-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.update(HOME=_HOME, XDG_CACHE_HOME=os.path.join(_HOME, ".cache"),
                  MPLCONFIGDIR=os.path.join(_HOME, ".config", "matplotlib"), RAY_USAGE_STATS_ENABLED="0",
                  RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/")
# What launch-script subprocesses start from, before any test (or Ray) changes os.environ.
_ENVIRON = dict(os.environ)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_DATASET_ID = "local/walker2d/tiny-v0"
TINY_EPISODES = 20
TINY_MAX_EPISODE_STEPS = 100


@pytest.fixture(scope="session", autouse=True)
def minari_root(tmp_path_factory):
    """A fresh Minari store for the whole session (autouse: no test can reach ~/.minari).

    Set in os.environ, so subprocesses and worker processes started later inherit it.
    """
    root = tmp_path_factory.mktemp("minari_datasets")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


@pytest.fixture(scope="session")
def tiny_episodes():
    """Random-policy Walker2d-v5 episodes (deterministic: seed 0)."""
    from distdiff.rollout import make_env, random_episodes

    env = make_env("Walker2d-v5", TINY_MAX_EPISODE_STEPS)
    try:
        return random_episodes(env, TINY_EPISODES, seed=0)
    finally:
        env.close()


@pytest.fixture(scope="session")
def tiny_dataset(minari_root, tiny_episodes):
    """Id of a small random-policy Walker2d-v5 dataset written into ``minari_root``."""
    from distdiff.data.minari_io import write_episodes

    write_episodes(TINY_DATASET_ID, tiny_episodes, env_id="Walker2d-v5", algorithm_name="random")
    return TINY_DATASET_ID


@pytest.fixture(scope="session")
def subprocess_env(minari_root):
    """Environment for launch-script subprocesses: the session's Minari store, one thread, and no
    RAY_ADDRESS of the caller's (a test that wants a cluster starts its own)."""
    env = {k: v for k, v in _ENVIRON.items() if k != "RAY_ADDRESS"}
    env.update(MINARI_DATASETS_PATH=str(minari_root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run (Ray 2.60 has no local_mode): 2 CPUs, no dashboard."""
    import ray

    from _helpers import SESSION_RAY

    ray.init(**SESSION_RAY)
    yield
    ray.shutdown()
