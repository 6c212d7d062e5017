"""The cuda backend with a GPU's launch configuration, even on the simulator: 256 threads per block, a grid that
covers the output in one pass, 4096 dropout streams (NUMBA_CNN_CUDA_LAUNCH=gpu, read by kernels/cuda/runtime.py
at import, hence one subprocess per group of checks in tests/gpu_launch_checks.py). Without it, the simulator's
16-thread blocks would leave the 256-thread shared-memory sums and the GPU's dropout streams unrun anywhere but on
a GPU. The convolutions run tiled.py's kernels there (NUMBA_CNN_CUDA_CONV=tiled), with a GPU's 256-thread tiles.

On the simulator each 256-thread block costs about 0.4 s (a Python thread per CUDA thread), so the shapes are tiny
and float32 only: the four default groups (the original kernels; strided and padded convolution, any-window pooling
and batch normalisation; the layers; dropout) take about 45 s together on 2 cores. The whole-model pass under the GPU
configuration launches about 170,000 simulated threads (2-4 minutes on 2 cores): it runs on a GPU always, on the
simulator only with NUMBA_CNN_SLOW_TESTS=1. The whole model under the simulator's own launches is checked against
the float64 oracle in test_cuda.py (one step of a small network with mnist-cnn's layer kinds).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cuda_unavailable_reason

CHECKS = Path(__file__).with_name("gpu_launch_checks.py")
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SLOW_ON_SIMULATOR = pytest.mark.skipif(SIMULATED and os.environ.get("NUMBA_CNN_SLOW_TESTS") != "1",
                                       reason="the whole cuda model under a GPU's launches takes 2-4 minutes "
                                              "on the simulator: set NUMBA_CNN_SLOW_TESTS=1 to run it")

pytestmark = pytest.mark.skipif(cuda_unavailable_reason() is not None,
                                reason=f"cuda backend: {cuda_unavailable_reason()}")


def run_checks(group, timeout):
    env = dict(os.environ, NUMBA_CNN_CUDA_LAUNCH="gpu", NUMBA_CNN_CUDA_CONV="tiled", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(CHECKS), group], capture_output=True, text=True, env=env,
                            timeout=timeout)
    print(result.stdout)
    assert result.returncode == 0 and f"OK {group}" in result.stdout, result.stdout + result.stderr[-4000:]


@pytest.mark.parametrize("group", ["kernels", "ops", "layers", "dropout"])
def test_cuda_kernels_with_the_gpu_launch_configuration(group):
    run_checks(group, timeout=300)


@pytest.mark.slow
@SLOW_ON_SIMULATOR
def test_cuda_model_with_the_gpu_launch_configuration():
    run_checks("model", timeout=900)


@pytest.mark.parametrize("variable,value,choices", [("NUMBA_CNN_CUDA_LAUNCH", "tpu", "auto, gpu, simulator"),
                                                     ("NUMBA_CNN_CUDA_CONV", "fast", "tiled, readable"),
                                                     ("NUMBA_CNN_CUDA_POOL", "yes", "1, 0")])
def test_an_unknown_setting_of_the_cuda_runtime_is_a_clear_error(variable, value, choices):
    env = dict(os.environ, **{variable: value})
    code = ("from numba_cnn.kernels import BackendUnavailable, get_backend\n"
            "try:\n    get_backend('cuda')\nexcept BackendUnavailable as exc:\n    print('UNAVAILABLE:', exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert f"UNAVAILABLE: {variable}={value!r} is not one of {choices}" in result.stdout, (
        result.stdout + result.stderr)
