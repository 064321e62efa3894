"""Shared pieces of the launch scripts."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator


def limit_threads() -> None:
    """One BLAS/OpenMP thread per process unless the user says otherwise: on small machines a
    second thread competing with rollout processes makes small-model steps far slower."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def default_ray_auth() -> None:
    """Present Ray's auth token (~/.ray/auth_token or RAY_AUTH_TOKEN[_PATH]) to clusters.

    `ray start` and embedded clusters run with token auth, but a driver only sends the token
    when RAY_AUTH_MODE says so, and Ray reads the variable when it is imported: call this first.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def add_ray_arguments(parser) -> None:
    """Where train.py and tune.py find Ray (see ``distdiff.distributed.driver.connect``)."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, a local `ray start` cluster, or an embedded Ray); "
                             "'local' starts an embedded Ray even where a cluster runs.")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all).")


def default_run_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C sets the yielded event instead of raising wherever the main thread is: a
    KeyboardInterrupt inside TensorBoard's writer (a ``with lock:`` is not signal-safe,
    bpo-29988) can leave its close waiting forever, as the interrupted-pretraining test once
    did. Loops check the event between steps or results; a second Ctrl-C raises at once. Off the main
    thread (e.g. a Tune trial) Python cannot handle signals, and the event is never set."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)
