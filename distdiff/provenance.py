"""Which distdiff a process runs: rollout workers and the learner check that it is the driver's."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Optional, Tuple

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
# What the driver hands its actors to check: the digest, and where it was taken.
DRIVER_CODE: Tuple[str, str] = (CODE_DIGEST, f"{Path(distdiff.__file__).parent} on {socket.gethostname()}")


def check_same_code(driver_code: Optional[Tuple[str, str] | str]) -> None:
    """Refuse to run beside a driver that imports another distdiff (a node with an older
    install): the weights, configs and results of two versions need not fit, and nothing else
    would say why. None: not checked (a process made without a driver). A bare digest is what
    drivers of an older distdiff send."""
    if isinstance(driver_code, str):
        driver_code = (driver_code, "an older distdiff")
    if driver_code is None or driver_code[0] == CODE_DIGEST:
        return
    digest, origin = driver_code
    here = DRIVER_CODE[1]
    if origin == here:
        why = "its files changed after the driver started: start the run again"
    elif origin.endswith(f" on {socket.gethostname()}"):
        why = ("a non-editable install run from the source tree it was installed from: the driver imports the "
               "install, Ray's workers the tree in their working directory; install with `pip install -e .`, "
               "or start from another directory")
    else:
        why = "install the same version on every node, or submit the run with `ray job submit --working-dir .`"
    raise RuntimeError(f"the distdiff at {here} (source digest {CODE_DIGEST}) is not the driver's at {origin} "
                       f"({digest}): {why}")
