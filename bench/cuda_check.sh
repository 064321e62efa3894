#!/usr/bin/env bash
# The GPU learner path in one go: the CUDA tests, then bench/learner.py over precision,
# torch.compile mode and batch size. Needs only torch (with CUDA), numpy, PyYAML, tqdm and pytest
# (the tests), so it runs on a bare GPU machine from the repo root: bash bench/cuda_check.sh [OUTDIR]
# Each line of OUTDIR/learner.jsonl is one bench/learner.py result. It goes on past a failed
# test (the benchmarks may still tell why) and says so on its last line.
set -u -o pipefail
out=${1:-${OUT:-runs/cuda-check}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee -a "$out/gpu.txt"
tests=passed
DISTDIFF_TEST_CUDA=1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" || tests=FAILED

run() {
    echo "== learner.py $*"
    timeout 150 python3 bench/learner.py "$@" | tee -a "$out/learner.jsonl"
}
run --device cpu --updates 30 --warmup 3
# The CPU at the GPU's large batch too: windows/s compared at one batch size.
run --device cpu --updates 5 --warmup 1 --batch-size 1024
for precision in fp32 bf16; do
    run --device cuda --updates 500 --precision $precision
    run --device cuda --updates 500 --precision $precision --compile reduce-overhead --warmup 30
    run --device cuda --updates 200 --precision $precision --batch-size 1024
done
echo "tests/test_cuda.py: $tests (log: $out/test_cuda.log)"
