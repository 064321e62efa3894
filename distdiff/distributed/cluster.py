"""Finding Ray for a job (a running cluster, else an embedded one), and the errors a job's
launch script turns into a message instead of a traceback (``distdiff.cli.connect_job``)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Callable, Dict, Optional

import ray
from ray.exceptions import AuthenticationError

from distdiff import process
from distdiff.process import (RAY_JOB_ENV, keep_ray_token_private, make_ray_token_if_none, ray_token_available,
                              ray_token_mode)
from distdiff.distributed.faults import cause


class ClusterUnreachable(RuntimeError):
    """The Ray cluster given (``--address``, RAY_ADDRESS, a local ``ray start``) refused or did
    not answer this driver, or the token this driver is told to present cannot be read."""


class RunFailed(RuntimeError):
    """A job on Ray cannot go on: in phase 2 the learner failed or no rollout actor is left (the
    last checkpoint in the run dir is intact); in a collection an actor was not restarted, or a
    task kept failing."""


def _live_local_cluster() -> Optional[str]:
    """The address `ray start` recorded on this machine, if a GCS still listens there.

    A stale record (a cluster that was killed) would make ``ray.init(address="auto")`` retry
    for minutes before failing.
    """
    from ray._private.utils import read_ray_address  # Ray is pinned; this is its own lookup

    address = read_ray_address()
    return address if address and _listens(address) else None


def _listens(address: str) -> Optional[bool]:
    """Whether something accepts connections at ``host:port`` (``[v6]:port`` too); None for an
    address of another form, which only Ray can judge."""
    from ray._common.network_utils import parse_address  # Ray is pinned; its own parser

    parsed = parse_address(address)
    if parsed is None or not parsed[1].isdigit():
        return None
    try:
        socket.create_connection((parsed[0], int(parsed[1])), timeout=2).close()
    except OSError:
        return False
    return True


def job_runtime_env(runtime_env: Optional[Dict[str, object]], embedded: bool) -> Optional[Dict[str, object]]:
    """The runtime env of this driver's job: ``runtime_env`` with the thread limits
    (:data:`distdiff.process.THREAD_VARS`, as this process holds them after
    :func:`~distdiff.process.limit_threads`), less the variables the job sets already
    (:func:`beside_the_job`). Every task and actor of the job, a Tune trial's too, runs with
    them; one of ``runtime_env``'s own values wins. An embedded Ray's workers inherit this
    process's environment, so there every variable it holds already is left out: a runtime env
    that Ray must set up starts each worker through its runtime-env agent, which cost ~0.3 s of
    CPU per actor on 2 cores (four actors started in 4.5-5.1 s with one, 3.4-3.9 s without)."""
    runtime_env = runtime_env or {}
    env_vars = {**{var: os.environ.get(var, "1") for var in process.THREAD_VARS}, **(runtime_env.get("env_vars") or {})}
    if embedded:
        env_vars = {k: v for k, v in env_vars.items() if os.environ.get(k) != v}
    return beside_the_job({**runtime_env, "env_vars": env_vars})


def beside_the_job(runtime_env: Optional[Dict[str, object]]) -> Optional[Dict[str, object]]:
    """``runtime_env`` less the environment variables that the Ray job this driver runs in
    (``ray job submit --runtime-env-json``) sets already: Ray refuses to start a driver whose
    runtime env names a variable of its job's again, even with the same value. None where
    nothing is left (no ``env_vars`` where none are)."""
    job = os.environ.get(RAY_JOB_ENV)
    taken = ((json.loads(job).get("runtime_env") or {}).get("env_vars") or {}) if job else {}
    runtime_env = runtime_env or {}
    env_vars = {k: v for k, v in (runtime_env.get("env_vars") or {}).items() if k not in taken}
    rest = {k: v for k, v in runtime_env.items() if k != "env_vars"}
    return {**rest, **({"env_vars": env_vars} if env_vars else {})} or None


def allotted_cpus() -> Optional[int]:
    """The CPUs an embedded Ray offers: those this process could run on as it started
    (:data:`distdiff.process.STARTED_ON`: a Slurm job's, taskset's, a container's cpuset), at most
    Ray's own count. Ray 2.60 counts the machine's cores and a cgroup limit at the root only: a
    Slurm job of 32 CPUs on a 128-core node offered 128, and sweeps and actors' shares went by
    them. None where there is no affinity (macOS): Ray's."""
    if process.STARTED_ON is None:
        return None
    from ray._private.utils import get_num_cpus  # (Ray is pinned; its cgroup quota, e.g. docker --cpus)

    return max(1, min(len(process.STARTED_ON), int(get_num_cpus(override_docker_cpu_warning=True))))


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, log: Callable[[str], None] = print,
            runtime_env: Optional[Dict[str, object]] = None) -> bool:
    """Connect to a running cluster (``address``, ``RAY_ADDRESS`` or a local ``ray start``), else
    start an embedded one; ``address="local"`` starts an embedded one whatever runs. Returns True
    when this process started Ray (and must stop it).

    The job's tasks and actors get one BLAS/OpenMP thread each unless this process's
    environment says otherwise (:func:`job_runtime_env`); while an embedded Ray starts, this
    process's environment holds those it lacks (:func:`~distdiff.process.thread_limits`), for
    Ray's processes to inherit, and is as it was after. A Ray initialized already is used as it
    is: its workers have whatever environment it gave them (the actors set their torch threads
    themselves either way)."""
    if ray.is_initialized():
        log("ray: using the already initialized Ray instance")
        return False
    problem = process.token_path_problem()
    if problem:
        raise ClusterUnreachable(problem)
    address = address or os.environ.get("RAY_ADDRESS")
    asked_local = address == "local"
    if address == "auto":
        # Looked up as ray.init looks it up (the cluster `ray start` recorded on this machine), and
        # checked: a stale record (a cluster killed without `ray stop`) made ray.init retry it
        # for minutes.
        from ray._private.services import get_ray_address_from_environment  # Ray is pinned

        try:
            address = get_ray_address_from_environment("auto", None)
        except ConnectionError as e:
            raise ClusterUnreachable(f"address 'auto': {e}") from e
        if _listens(address) is False:
            raise ClusterUnreachable(f"address 'auto': the cluster `ray start` recorded at {address} does not answer "
                                     f"(stopped, or killed without `ray stop`)")
    if not asked_local:
        address = address or _live_local_cluster()
    embedded = asked_local or not address
    if not embedded:
        runtime_env = job_runtime_env(runtime_env, embedded=False)
        # Ray retries an address where nothing listens for minutes, logging each try.
        if "://" not in address and _listens(address) is False:
            raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: nothing listens there (is "
                                     f"`ray start --head` running there? check --address and RAY_ADDRESS)")
        try:
            ray.init(address=address, logging_level="warning", runtime_env=runtime_env)
        except ValueError as e:  # an address Ray cannot parse
            hint = (" (an http:// address is the dashboard's, which `ray job submit` takes; a driver connects to "
                    "the head's HOST:6379, or its Ray Client address ray://HOST:10001)") if "http" in address else ""
            raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {e}{hint}") from e
        except (ConnectionError, AuthenticationError) as e:
            if ray_token_mode():
                hint = ""
            elif "RAY_AUTH_MODE" not in os.environ and ray_token_available():
                # (The launch scripts call it first; a notebook or script may import Ray before.)
                hint = ("; this machine has a token, but Ray was imported before RAY_AUTH_MODE=token was set: call "
                        "distdiff.process.default_ray_auth() before anything imports ray, or set RAY_AUTH_MODE=token")
            else:
                hint = ("; a cluster with token auth (the default where `ray start` found a token) needs its token "
                        "here: ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
            raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {cause(e)}{hint}") from e
        log(f"ray: connected to the cluster at {address}: {describe(ray.cluster_resources())}")
        if not ray_token_mode():
            # (It took no token: a cluster with token auth would have refused this driver.)
            log("warning: this cluster runs without token auth: whoever reaches its ports can run code on it as its "
                "user. `ray get-auth-token --generate` before `ray start --head` turns auth on (README, Usage)")
        keep_ray_token_private(log)
        return False
    make_ray_token_if_none()
    with process.thread_limits():
        ray.init(address="local", num_cpus=num_cpus or allotted_cpus(), include_dashboard=False,
                 logging_level="warning", runtime_env=job_runtime_env(runtime_env, embedded=True))
    why = "as the address 'local' asks" if asked_local else "no running cluster found"
    log(f"ray: {why}; started an embedded local Ray: {describe(ray.cluster_resources())}")
    keep_ray_token_private(log)  # (one it made just now among them)
    return True


def shutdown() -> None:
    """``ray.shutdown()``, of a Ray this process started, at a job's end. A Ctrl-C during it
    cuts only the clean-up short: what the job made is on disk by then, and a traceback would
    say otherwise."""
    with contextlib.suppress(KeyboardInterrupt):
        ray.shutdown()


def describe(resources: Dict[str, float]) -> str:
    """A cluster's resources in words (Ray's dict also lists a resource per node and its memory
    in bytes): nodes, CPUs, GPUs, object store and the custom resources the config may name."""
    nodes = sum(1 for k in resources if k.startswith("node:") and k != "node:__internal_head__")
    custom = {k: v for k, v in resources.items()
              if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith(("node:", "accelerator_type:"))}
    words = [f"{nodes} node{'s' * (nodes != 1)}", f"{resources.get('CPU', 0):g} CPU", f"{resources.get('GPU', 0):g} GPU",
             f"object store {resources.get('object_store_memory', 0) / 2**30:.1f} GiB"]
    return ", ".join(words + [f"{k} {v:g}" for k, v in sorted(custom.items())])
