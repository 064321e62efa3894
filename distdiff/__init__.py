"""distdiff: distributed training of diffusion-model trajectory planners for continuous control, on Ray.

The math (``diffusion``, ``nn``, ``models``, ``planner``, ``training``) imports only torch and
numpy; ``distdiff.distributed`` is the only package that imports ray.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distdiff")
except PackageNotFoundError:  # run from a source tree that was never pip-installed
    __version__ = "0.0.0+unknown"
