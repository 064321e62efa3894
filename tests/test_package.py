"""Package layering: only distdiff.distributed imports ray, and the diffusion math only torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import distdiff

PACKAGE = Path(distdiff.__file__).parent
MODULES = sorted(".".join(("distdiff",) + p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py"))
RAY_FREE = [m for m in MODULES if not m.startswith("distdiff.distributed")]
TORCH_ONLY = [m for m in MODULES if m.startswith(("distdiff.diffusion", "distdiff.nn"))] + ["distdiff.layout"]


def _loaded_after_import(modules):
    code = f"import sys; import {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_only_the_distributed_layer_imports_ray():
    assert "distdiff.planner" in RAY_FREE and "distdiff.distributed.driver" in MODULES  # the walk found the tree
    assert "ray" not in _loaded_after_import(RAY_FREE)


def test_the_diffusion_math_imports_only_torch():
    loaded = _loaded_after_import(TORCH_ONLY)
    assert "torch" in loaded
    assert not loaded & {"ray", "gymnasium", "mujoco", "minari", "tensorboard", "matplotlib"}


def test_the_package_has_a_version():
    assert distdiff.__version__ != "0.0.0+unknown"
