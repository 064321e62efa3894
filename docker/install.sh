#!/usr/bin/env bash
# Installs distdiff into the current Python environment: the image's Python in docker/Dockerfile
# and docker/Dockerfile.gpu, an activated virtual environment anywhere else (CI runs it in a
# fresh one, so the images' install step is tested on every run).
#
#   bash docker/install.sh                          # torch (the version pinned in pyproject.toml), then distdiff
#   SKIP_TORCH=1 bash docker/install.sh             # keep a torch already installed (e.g. a CUDA build)
#   TORCH_PIP_ARGS="<pip options>" bash docker/install.sh   # e.g. what PyTorch's install selector shows
#
# Settings (environment variables):
#   PYTHON          interpreter to install into (default: python, else python3)
#   TORCH_SPEC      what pip installs for torch (default: the torch==X pin of pyproject.toml).
#                   On Linux x86_64 the default package index serves a CUDA build of torch; for the
#                   CPU-only build (much smaller), or a particular CUDA version, pass the index that
#                   PyTorch's install selector ("Get Started" page) shows for that torch version, in
#                   TORCH_PIP_ARGS.
#   TORCH_PIP_ARGS  extra pip arguments for the torch install only (e.g. the selector's index option)
#   SKIP_TORCH=1    do not install torch; the installed one must match the pin (the GPU image installs
#                   its CUDA build in a layer of its own first)
#   EDITABLE=1      pip install -e (default: a regular install)
#   EXTRAS          extras of distdiff, e.g. "[dev]" (default: none)
#   PIP_ARGS        extra pip arguments for every install, e.g. "--no-cache-dir"
#   CHECK_RENDER=1  also render one MuJoCo frame headless with the current MUJOCO_GL (osmesa, egl)
#   DRY_RUN=1       print the pip commands instead of running them (used by tests/test_docker.py)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
PIN=$(sed -n 's/^[[:space:]]*"\(torch==[^";]*\)".*/\1/p' pyproject.toml | head -n 1)
if [ -z "$PIN" ]; then
    echo "install.sh: no torch==VERSION pin found in pyproject.toml" >&2
    exit 1
fi
TORCH_SPEC=${TORCH_SPEC:-$PIN}
TORCH_VERSION=${PIN#torch==}
read -r -a torch_args <<< "${TORCH_PIP_ARGS:-}"
read -r -a pip_args <<< "${PIP_ARGS:-}"

run() {
    echo "+ $*"
    if [ "${DRY_RUN:-0}" != 1 ]; then
        "$@"
    fi
}

if [ "${SKIP_TORCH:-0}" = 1 ]; then
    echo "install.sh: SKIP_TORCH=1, keeping the installed torch"
    if [ "${DRY_RUN:-0}" != 1 ]; then
        have=$("$PYTHON" -c 'import torch; print(torch.__version__)') || {
            echo "install.sh: SKIP_TORCH=1 but torch is not installed in $PYTHON" >&2; exit 1; }
        case "$have" in
            "$TORCH_VERSION" | "$TORCH_VERSION"+*) ;;
            *) echo "install.sh: installed torch $have does not match the pin $PIN; pip would replace it" >&2; exit 1 ;;
        esac
    fi
else
    run "$PYTHON" -m pip install ${pip_args[@]+"${pip_args[@]}"} ${torch_args[@]+"${torch_args[@]}"} "$TORCH_SPEC"
fi

target=".${EXTRAS:-}"
if [ "${EDITABLE:-0}" = 1 ]; then
    run "$PYTHON" -m pip install ${pip_args[@]+"${pip_args[@]}"} -e "$target"
else
    # setuptools builds in ./build; remove it when it was not there before, since a stale
    # build/lib would carry deleted modules into the next install.
    [ -e build ] && had_build=1 || had_build=0
    run "$PYTHON" -m pip install ${pip_args[@]+"${pip_args[@]}"} "$target"
    if [ "$had_build" = 0 ] && [ "${DRY_RUN:-0}" != 1 ]; then
        rm -rf build
    fi
fi

# Import from outside the source tree, so that the installed package is what is checked.
check='
import importlib.metadata as md
import distdiff, gymnasium, minari, ray, torch
assert ray.__version__ == md.version("ray"), ray.__version__
env = gymnasium.make("Walker2d-v5")
env.reset(seed=0)
env.step(env.action_space.sample())
env.close()
version = md.version("distdiff")
print(f"install.sh: distdiff {version} from {distdiff.__file__}; ray {ray.__version__}, "
      f"torch {torch.__version__} (cuda {torch.version.cuda}), gymnasium {gymnasium.__version__}, minari {minari.__version__}")
'
render='
import os
import gymnasium
env = gymnasium.make("Walker2d-v5", render_mode="rgb_array", width=64, height=64)
env.reset(seed=0)
frame = env.render()
env.close()
assert frame.shape == (64, 64, 3) and frame.any(), frame.shape
backend = os.environ.get("MUJOCO_GL")
print(f"install.sh: rendered a {frame.shape} frame with MUJOCO_GL={backend}")
'
if [ "${DRY_RUN:-0}" != 1 ]; then
    (cd / && "$PYTHON" -c "$check")
    if [ "${CHECK_RENDER:-0}" = 1 ]; then
        (cd / && "$PYTHON" -c "$render")
    fi
fi
echo "install.sh: done ($ROOT -> $PYTHON)"
