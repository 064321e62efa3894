"""Package layering: only distdiff.distributed imports ray, and the diffusion math only torch; the
Python versions the package claims."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

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


def test_the_launch_scripts_reach_ray_only_through_the_distributed_layer():
    scripts = sorted((PACKAGE.parent / "launch").glob("*.py"))
    assert len(scripts) >= 6
    for script in scripts:
        nodes = list(ast.walk(ast.parse(script.read_text())))
        imported = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
        assert "ray" not in imported, script.name


def test_the_diffusion_math_imports_only_torch():
    loaded = _loaded_after_import(TORCH_ONLY)
    assert "torch" in loaded
    assert not loaded & {"ray", "gymnasium", "mujoco", "minari", "tensorboard", "matplotlib"}
    # In its own source too, numpy included (which torch loads anyway): beside the standard
    # library, torch and the math's own modules alone.
    math = set(TORCH_ONLY)
    for module in TORCH_ONLY:
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        if not path.is_file():
            path = path.with_suffix("") / "__init__.py"
        nodes = list(ast.walk(ast.parse(path.read_text())))
        imported = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        outside = {name for name in imported if name.split(".")[0] not in {*sys.stdlib_module_names, "torch"}
                   and name not in math and name.split(".")[0] != "__future__"}
        assert not outside, f"{module} imports {sorted(outside)}"


# What the lent GPU machines' image lacks (it has torch, numpy, PyYAML, pytest and tqdm):
# bench/cuda_check.sh runs tests/test_cuda.py and bench/learner.py there.
NOT_ON_A_BARE_GPU_MACHINE = ("gymnasium", "mujoco", "ray", "minari", "google_crc32c")


def test_the_gpu_checks_run_without_the_simulator_ray_or_minari():
    # Loading a config once imported gymnasium (for the names of the execution modes), and every
    # CUDA test and learner benchmark failed on the GPU machine before any CUDA code ran.
    code = f"""
import importlib.abc, runpy, sys

class Bare(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {NOT_ON_A_BARE_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")

sys.meta_path.insert(0, Bare())
sys.path[:0] = ["tests"]
import conftest, test_cuda
test_cuda._cfg()
test_cuda._cfg(**{{"model.returns_condition": True, "train.train_dynamics": True}})
sys.argv = ["bench/learner.py", "--updates", "1", "--warmup", "0"]
runpy.run_path("bench/learner.py", run_name="__main__")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"updates_per_s"' in out.stdout


def test_the_package_has_a_version():
    assert distdiff.__version__ != "0.0.0+unknown"


def test_every_python_the_package_claims_has_its_pinned_dependencies():
    # minari 0.5.4 and mujoco 4.0.1 need 3.11: a claim of 3.10 let Ubuntu 22.04's python3 pass the
    # Makefile's check, and pip then found no version of them.
    root = PACKAGE.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lowest = re.fullmatch(r">=\s*(\d+)\.(\d+)", project["requires-python"])
    assert lowest, project["requires-python"]
    version = f"{lowest[1]}.{lowest[2]}"
    pinned = [r for r in map(Requirement, project["dependencies"]) if any(s.operator == "==" for s in r.specifier)]
    assert {"torch", "minari", "mujoco"} <= {r.name for r in pinned}
    for req in pinned:
        needs = importlib.metadata.metadata(req.name)["Requires-Python"] or ""
        assert version in SpecifierSet(needs), f"{req.name} needs Python {needs}, the package claims {version}"
    # The Makefile's own check, before pip runs, asks for the same.
    assert f"sys.version_info >= ({lowest[1]}, {lowest[2]})" in (root / "Makefile").read_text()


def test_the_code_has_no_unused_or_undefined_names():
    # Pyflakes' rules, through ruff (pyproject.toml, [tool.ruff.lint]): CI runs them with the tests.
    root = PACKAGE.parent
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                          "distdiff", "launch", "bench", "tests"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
