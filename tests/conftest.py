"""Fixtures shared by the tests: a seeded rng, the `backend` fixture over every backend, and the helpers that move
arrays onto a backend and pick the shapes each backend can afford.

`backend` runs naive, im2col and jit always: a backend that fails to import fails its tests, it is never skipped.
cuda runs when numba-cuda is importable, on the GPU if there is one, else on the simulator (switched on below);
without numba-cuda its tests are skipped with the reason. naive (Python loops) and cuda under the simulator (one
Python thread per CUDA thread) are slow, so they get only the cases marked tiny: parametrize with
`backend_case_params(cases)` to get every (backend, case) pair a backend can afford.
"""

import importlib.util
import os
from dataclasses import dataclass

# Without a GPU the cuda backend's tests run on Numba's CUDA simulator. The switch is read when numba is first
# imported, which no module has done before this conftest runs. NUMBA_ENABLE_CUDASIM=0 keeps a real GPU in use.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402 (after the simulator switch)
import pytest  # noqa: E402

from numba_cnn.kernels import BACKENDS, get_backend  # noqa: E402

# the README's `pytest -n auto`: a worker per usable CPU, at most this many (each holds all the kernels its files
# compile in its own memory). Not in pyproject's addopts: a machine without pytest-xdist (the GPU image) would reject the option.
MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    return max(1, min(len(os.sched_getaffinity(0)), MAX_TEST_WORKERS))


# NUMBA_CNN_SLOW_TESTS=1 also runs the checks that are opt-in on numba's CUDA simulator (each test file says which).
SLOW_TESTS = os.environ.get("NUMBA_CNN_SLOW_TESTS") == "1"

# On numba's CUDA simulator every kernel launch runs one Python thread per CUDA thread (about 0.1-1 s per launch
# here), so finite-difference checks there perturb a random sample of this many elements instead of all of them.
SIMULATOR_FD_ELEMENTS = 6


def cuda_unavailable_reason():
    """Why the cuda backend cannot run here, or None when it can."""
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install numba-cuda)"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    from numba import cuda

    if not cuda.is_available():
        return "no CUDA GPU; set NUMBA_ENABLE_CUDASIM=1 to run the cuda backend on numba's simulator"
    return None


_CUDA_REASON = cuda_unavailable_reason()


def backend_marks(name):
    if name == "cuda" and _CUDA_REASON is not None:
        return [pytest.mark.skip(reason=f"cuda backend: {_CUDA_REASON}")]
    return []


def backend_params(names=BACKENDS):
    return [pytest.param(name, id=name, marks=backend_marks(name)) for name in names]


@dataclass(frozen=True)
class Case:
    """One input configuration: `id` names it in test ids, `tiny` says naive and cuda can afford it, `spec` holds
    the shapes and options the test reads."""
    id: str
    tiny: bool
    spec: dict


def tiny_only(name):
    """Only tiny shapes for a slow backend (Python loops) and for cuda, which runs mostly on the simulator (one
    Python thread per CUDA thread). Read from the module's INFO without importing a backend that cannot load."""
    import importlib

    from numba_cnn.kernels import REGISTRY

    if name == "cuda":
        return True
    return importlib.import_module(REGISTRY[name]).INFO.slow


def backend_case_params(cases, names=BACKENDS):
    """(backend_name, case) pairs: every case on the compiled backends, the tiny ones on the slow ones and cuda."""
    return [pytest.param(name, case, id=f"{name}-{case.id}", marks=backend_marks(name))
            for name in names for case in cases if case.tiny or not tiny_only(name)]


@pytest.fixture(params=backend_params())
def backend_name(request):
    return request.param


@pytest.fixture
def backend(backend_name):
    return get_backend(backend_name)


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def on_cuda_simulator(backend_name):
    return backend_name == "cuda" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture
def cuda_float64_opt_in_on_the_simulator(request):
    """For test files whose cases run in both dtypes on every backend (they use it through pytestmark): cuda's
    float64 cases skip on the simulator unless NUMBA_CNN_SLOW_TESTS=1. There both dtypes run through the same Python
    code, and test_cuda.py checks every cuda op in float64 against the oracle; on a GPU, where float64 kernels are
    compiled apart, every case runs."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    if params.get("dtype") is np.float64 and on_cuda_simulator(params.get("backend_name")) and not SLOW_TESTS:
        pytest.skip("cuda float64 on the simulator repeats float32's code (test_cuda.py checks float64 there): "
                    "NUMBA_CNN_SLOW_TESTS=1 runs it")


def fd_indices(backend, size, rng):
    """The flat indices a finite-difference check perturbs on `backend`: all (None) but on the CUDA simulator."""
    if not on_cuda_simulator(backend.name) or size <= SIMULATOR_FD_ELEMENTS:
        return None
    return rng.choice(size, SIMULATOR_FD_ELEMENTS, replace=False)


def on_device(backend, a):
    """a as this backend's kernels take it. Host backends take numpy arrays as they are (slices and transposes
    included: making them contiguous is the boundary's job, which the tests check), so only a backend with its own
    memory (one that defines to_device) copies."""
    if not isinstance(a, np.ndarray) or getattr(backend.module, "to_device", None) is None:
        return a
    return backend.to_device(a)


def on_host(backend, result):
    """A kernel's result (an array, None, or a tuple of them) as numpy arrays."""
    if isinstance(result, tuple):
        return tuple(on_host(backend, r) for r in result)
    return None if result is None else np.asarray(backend.to_host(result))


@pytest.fixture(params=[2, 4], ids=["F2x2", "F4x4"])
def winograd_tile(request, monkeypatch):
    """The output tile (dy's tile, for the weight gradient) every Winograd call of the jit backend takes in the test
    (the weight gradient's: 3x3 only): the glue's shares (and the weight gradient's least tile count) set so that it
    never or always chooses the 4x4 tile."""
    from numba_cnn.kernels.jit import winograd, winograd_grad

    monkeypatch.setattr(winograd, "WINOGRAD_4X4_SHARE", dict.fromkeys((3, 5), 0.0 if request.param == 2 else 1e9))
    monkeypatch.setattr(winograd_grad, "WINOGRAD_GRAD_4X4_TILES", 0)
    return request.param
