"""Package layering: only distdiff.distributed imports ray, and the diffusion math only torch."""
from __future__ import annotations

import subprocess
import sys

import distdiff

RAY_FREE = ["distdiff.checkpoint", "distdiff.cli", "distdiff.config", "distdiff.evaluation", "distdiff.layout",
            "distdiff.models", "distdiff.normalizer", "distdiff.planner", "distdiff.plots", "distdiff.pretrain",
            "distdiff.report", "distdiff.rollout", "distdiff.training", "distdiff.data.minari_io",
            "distdiff.data.windows", "distdiff.data.episodes"]
TORCH_ONLY = ["distdiff.diffusion.gaussian", "distdiff.diffusion.guidance", "distdiff.diffusion.schedules",
              "distdiff.nn.temporal", "distdiff.layout"]


def _loaded_after_import(modules):
    code = f"import sys; import {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_only_the_distributed_layer_imports_ray():
    assert "ray" not in _loaded_after_import(RAY_FREE)


def test_the_diffusion_math_imports_only_torch():
    loaded = _loaded_after_import(TORCH_ONLY)
    assert "torch" in loaded
    assert not loaded & {"ray", "gymnasium", "mujoco", "minari", "tensorboard", "matplotlib"}


def test_the_package_has_a_version():
    assert distdiff.__version__ != "0.0.0+unknown"
