#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run: where a cuda training step's time goes (tools/cuda_step_profile.py,
# shipped and with the pool or the tiled kernels switched off), the cuda tests without the simulator, a 5-epoch cuda
# training run, the op bench for cuda, and the cuda backend against PyTorch on the same GPU. Written for the lent
# H100/H200 machines (Python 3.12, numba 0.68, numba-cuda 0.30.4, torch with CUDA, numpy 2.5, no internet): carry a
# numpy 2.4.x cp312 wheel (pyproject pins numpy<2.5) and pyinstrument's in .whl/, as the device tool's README
# explains. Each step has its own time limit and a failing step does not stop the next; everything lands under
# $OUT (more than the 8 files the device tool brings back: pack them, e.g. into one tar file, at the end).
# GPU_CHECK_STEPS (space-separated step names; a prefix such as "profile" takes each of its steps) runs only some
# steps; by default all but pytest-conv (the convolution tests alone, which pytest-cuda includes).
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD NUMBA_ENABLE_CUDASIM=0 NUMBA_CACHE_DIR=/tmp/nbcache PYTHONUNBUFFERED=1
SUMMARY=$OUT/summary.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$SUMMARY"
python3 -c "import numpy, numba, torch; print('numpy', numpy.__version__, 'numba', numba.__version__, 'torch', torch.__version__, torch.cuda.is_available())" | tee -a "$SUMMARY"

STEPS=${GPU_CHECK_STEPS:-"profile pytest-cuda train-cuda bench-ops compare"}
step() {  # step NAME LIMIT_S COMMAND...: time-limited, logged to $OUT/NAME.log, rc and seconds in the summary
    local name=$1 limit=$2 start=$SECONDS; shift 2
    case " $STEPS " in *" ${name%%-[0-9a-z]*} "*|*" $name "*) ;; *) return 0;; esac
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    echo "$name rc=$rc $((SECONDS - start)) s: $*" | tee -a "$SUMMARY"
}

# where a training step's time goes (tools/cuda_step_profile.py): as shipped, with numba-cuda's own memory manager,
# and with the readable convolution kernels
step profile-tiled 120 python3 tools/cuda_step_profile.py --steps 200
step profile-nopool 120 env NUMBA_CNN_CUDA_POOL=0 python3 tools/cuda_step_profile.py --steps 200
step profile-readable 120 env NUMBA_CNN_CUDA_CONV=readable python3 tools/cuda_step_profile.py --steps 200
step pytest-conv 150 python3 -m pytest tests/test_cuda.py tests/test_nan_inf.py -q -p no:cacheprovider -k "conv and cuda"
grep -h "ms/step" "$OUT"/profile-*.log >> "$SUMMARY" 2>/dev/null
step pytest-cuda 180 python3 -m pytest tests -q -p no:cacheprovider -k cuda --durations=10
step train-cuda 150 python3 -m numba_cnn train --backend cuda --epochs 5 --out "$OUT/train-cuda"
grep -E "^epoch [0-9]/5:|^done:|warm-up" "$OUT/train-cuda.log" >> "$SUMMARY" 2>/dev/null
step bench-ops 100 python3 -m numba_cnn bench --backend cuda --out "$OUT/bench"
step compare 150 python3 -m numba_cnn bench --compare torch:cuda --backend cuda --rounds 2 --steps 200 --out "$OUT/compare"
cat "$SUMMARY"
