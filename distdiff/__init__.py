"""distdiff: distributed training of diffusion-model trajectory planners for continuous control, on Ray.

The math (``layout``, ``diffusion``, ``nn``) imports only torch; no module outside
``distdiff.distributed`` imports Ray.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distdiff")
except PackageNotFoundError:  # run from a source tree that was never pip-installed
    __version__ = "0.0.0+unknown"
