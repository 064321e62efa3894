"""Which distdiff a process runs: rollout workers and the learner check that it is the driver's."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Optional

import distdiff


def _digest() -> str:
    root = Path(distdiff.__file__).parent
    files = sorted(root.rglob("*.py"))
    if not files:
        # Imported from an archive (a zipped install): only its version can tell it apart.
        return f"version {distdiff.__version__}"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# Taken at import, so it describes the code this process loaded, not files changed since.
CODE_DIGEST = _digest()


def check_same_code(driver_code: Optional[str]) -> None:
    """Refuse to run beside a driver that imports another distdiff (a node with an older
    install): the weights, configs and results of two versions need not fit, and nothing else
    would say why. None: not checked (a process made without a driver)."""
    if driver_code is not None and driver_code != CODE_DIGEST:
        raise RuntimeError(
            f"the distdiff at {Path(distdiff.__file__).parent} on {socket.gethostname()} is not the driver's (source "
            f"digest {CODE_DIGEST}, the driver's {driver_code}): install the same version on every node, or submit "
            "the run with `ray job submit --working-dir .`")
