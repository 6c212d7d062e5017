"""The cuda backend's device runtime: the import-time check for numba-cuda and a device, the launch configuration,
the array runtime (host <-> device copies, zeroed arrays, gathering a batch's rows, scaling its pixels: the
functions of numba_cnn/kernels/host.py on device arrays), and the block reductions the other cuda modules share.

Importing this module checks that numba-cuda and a GPU (or Numba's CUDA simulator) are there, and raises
BackendUnavailable saying what to install otherwise.

Launches: kernels walk their output with grid-stride loops. On a GPU the grid covers the output once, 256 threads
per block (one element per thread); the simulator runs one Python thread per CUDA thread, so there two blocks of 16
threads walk the whole output instead (NUMBA_CNN_CUDA_LAUNCH=gpu gives the simulator the GPU's configuration).
Sums over many terms with few outputs (dense forward, bias gradients, batch-norm statistics and their gradients)
give one block to each output and add in shared memory in a fixed tree order: no atomics, so results are the same
on every run.
"""


import math
import os
import warnings

import numpy as np

from numba_cnn.kernels.contract import BackendUnavailable

_SIMULATOR_HINT = ("or set NUMBA_ENABLE_CUDASIM=1 before starting Python to run the kernels on the CPU in Numba's "
                   "CUDA simulator (slow: for tests)")

try:
    from numba import cuda
except ImportError as exc:
    raise BackendUnavailable(f"the cuda kernels need numba-cuda, which failed to import ({exc}): install it with "
                             f'`pip install -e ".[cuda]"` and run on a machine with an NVIDIA GPU and driver, '
                             f"{_SIMULATOR_HINT}") from None
if getattr(cuda, "implementation", None) != "NVIDIA":
    # numba itself still ships an old, deprecated numba.cuda: without numba-cuda installed, that is what imports.
    raise BackendUnavailable(f'the cuda kernels need numba-cuda, which is not installed: `pip install -e ".[cuda]"`, '
                             f"then run on a machine with an NVIDIA GPU and driver, {_SIMULATOR_HINT}")

from numba.cuda.core import config as cuda_config  # noqa: E402  (only numba-cuda has this module)

SIMULATED = bool(cuda_config.ENABLE_CUDASIM)
if not cuda.is_available():
    reason = " ".join(str(cuda.cuda_error() or "no device found").split())
    raise BackendUnavailable(f"the cuda kernels found no usable NVIDIA GPU ({reason}): run on a machine with one and "
                             f'its driver (with numba-cuda from `pip install -e ".[cuda]"`), {_SIMULATOR_HINT}')

# On a GPU, device arrays come from a caching pool (memory.py says why); NUMBA_CNN_CUDA_POOL=0 keeps numba-cuda's
# own manager. The manager is chosen before the first allocation creates the context.
POOL_CHOICES = ("1", "0")
POOL = os.environ.get("NUMBA_CNN_CUDA_POOL", "1").strip() or "1"
if POOL not in POOL_CHOICES:
    raise BackendUnavailable(f"NUMBA_CNN_CUDA_POOL={POOL!r} is not one of {', '.join(POOL_CHOICES)}")
if not SIMULATED and POOL == "1":
    from numba_cnn.kernels.cuda.memory import make_memory_manager

    cuda.set_memory_manager(make_memory_manager(cuda))

# The convolution's kernels: the tiled ones (tiled.py), or kernels.py's readable thread-per-output ones, kept to
# teach from and to measure the difference in one run. A GPU runs the tiled ones unless NUMBA_CNN_CUDA_CONV=readable;
# the simulator the readable ones unless NUMBA_CNN_CUDA_CONV=tiled (there the tiles cost several times more: it runs
# a Python thread per CUDA thread, and the tiles' idle lanes and barriers with them; the tiled kernels' own tests
# switch them on).
CONV_CHOICES = ("tiled", "readable")
_CONV_DEFAULT = "readable" if SIMULATED else "tiled"
CONV_KERNELS = os.environ.get("NUMBA_CNN_CUDA_CONV", _CONV_DEFAULT).strip().lower() or _CONV_DEFAULT
if CONV_KERNELS not in CONV_CHOICES:
    raise BackendUnavailable(f"NUMBA_CNN_CUDA_CONV={CONV_KERNELS!r} is not one of {', '.join(CONV_CHOICES)}")

# The launch configuration: a GPU's, or the simulator's small one. NUMBA_CNN_CUDA_LAUNCH=gpu forces the GPU's on the
# simulator too (tests run the 256-thread block sums and the 4096 dropout streams that way, on tiny shapes);
# =simulator forces the small one; unset or "auto" picks by where the kernels run. Read once, at import.
LAUNCH_CHOICES = ("auto", "gpu", "simulator")
LAUNCH = os.environ.get("NUMBA_CNN_CUDA_LAUNCH", "auto").strip().lower() or "auto"
if LAUNCH not in LAUNCH_CHOICES:
    raise BackendUnavailable(f"NUMBA_CNN_CUDA_LAUNCH={LAUNCH!r} is not one of {', '.join(LAUNCH_CHOICES)}")
GPU_LAUNCH = (not SIMULATED) if LAUNCH == "auto" else LAUNCH == "gpu"
THREADS_PER_BLOCK = 256 if GPU_LAUNCH else 16  # a power of two: the block sums below halve it
MAX_BLOCKS = 1 << 20 if GPU_LAUNCH else 2
DROPOUT_STREAMS = THREADS_PER_BLOCK * (16 if GPU_LAUNCH else 2)  # 4096 on a GPU, 50 elements each for batch 128

# The small launches (a thread per row of a 128-row batch) are small by nature, not by mistake: numba-cuda warns
# about grids under twice the GPU's multiprocessor count (132 on an H200), so launches below this many blocks
# silence that warning for themselves (only they: importing the backend changes no process-wide warning filter).
SMALL_GRID = 1024

# A typed zero: a bare 0 or 0.0 in a kernel is an int64/float64 literal and would promote float32 arithmetic to
# float64. A float32 zero stays float32 in float32 kernels and widens exactly in float64 ones.
ZERO = np.float32(0)


def to_device(host_array):
    """A host array (any layout) -> a C-contiguous device copy. Device arrays pass through unchanged. The host side
    is copied into a fresh array first: numpy calls x[None] C-contiguous whatever the stride of its length-1 axis,
    and numba-cuda, which checks every stride, then refused the device copy as non-contiguous (seen on a GPU only)."""
    if hasattr(host_array, "copy_to_host"):
        return host_array
    return cuda.to_device(np.array(host_array, order="C"))


def to_host(device_array):
    """A device array -> a host numpy copy. Host arrays pass through as numpy arrays."""
    if hasattr(device_array, "copy_to_host"):
        return device_array.copy_to_host()
    return np.asarray(device_array)


def as_device(a, name="array"):
    """Any input -> a C-contiguous device array: host arrays are copied in, device arrays must be contiguous
    already (every array this backend returns is)."""
    a = to_device(a)
    if not a.is_c_contiguous():
        raise ValueError(f"{name} is a non-contiguous device array (shape {tuple(a.shape)}): the cuda kernels "
                         f"index dense C-order buffers")
    return a


def flat(a):
    """A 1-D view of a contiguous device array."""
    return a.reshape(a.size)


def grid(elements):
    """Blocks for a grid-stride loop over `elements` items: one pass on a GPU, a few blocks in the simulator."""
    return max(1, min(MAX_BLOCKS, math.ceil(elements / THREADS_PER_BLOCK)))


def _run(kernel, blocks, args, threads=THREADS_PER_BLOCK):
    """Launch `kernel` on `blocks` (a count, or a tuple of counts per grid dimension) of `threads` threads."""
    if (math.prod(blocks) if isinstance(blocks, tuple) else blocks) >= SMALL_GRID:
        kernel[blocks, threads](*args)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU under-utilization")
        kernel[blocks, threads](*args)


def run_grid(kernel, blocks, threads, args):
    """Run a kernel that maps its own grid: `blocks` a tuple of block counts (x, y[, z]), `threads` per block."""
    _run(kernel, blocks, args, threads)


def launch(kernel, elements, *args):
    """Run `kernel` over `elements` outputs (a thread per output, grid-stride) with THREADS_PER_BLOCK threads."""
    _run(kernel, grid(elements), args)


def launch_blocks(kernel, outputs, *args):
    """Run a one-block-per-output `kernel` (block-stride over `outputs`, threads inside a block share the sum)."""
    _run(kernel, max(1, min(MAX_BLOCKS, outputs)), args)


def synchronize():
    """Wait for every launched kernel (a host clock read after it includes them)."""
    cuda.synchronize()


def _device_event():
    return cuda.event(timing=True)


# Layer timing on the device's own timeline: the layer timer records an event before and after a layer, on the
# stream the kernels run on, and reads the time between them later, so a timed step does not wait for the device
# after every layer. The simulator's events hold no times: there (None) the timer synchronises and reads the host
# clock, which is exact where every launch runs to its end before returning.
device_event = None if SIMULATED else _device_event


# The array runtime beyond the copies: the functions of numba_cnn/kernels/host.py on device arrays, so a batch
# is gathered and scaled where it will be used.

@cuda.jit
def _fill_zero(out):
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[e] = ZERO


def zeros_like(a):
    out = cuda.device_array(a.shape, dtype=a.dtype)
    launch(_fill_zero, out.size, flat(out))
    return out


@cuda.jit
def _take_rows(data, idx, out):
    """out[b, f] = data[idx[b], f]."""
    row_size = out.shape[1]
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        b = e // row_size
        f = e - b * row_size
        out[b, f] = data[idx[b], f]


def take_rows(data, idx):
    """data[N, ...], idx[B] int (both on the device) -> data[idx], a new device array (one mini-batch)."""
    data, idx = as_device(data, "data"), as_device(idx, "idx")
    rows = idx.shape[0]
    row_size = data.size // data.shape[0]
    out = cuda.device_array((rows,) + tuple(data.shape[1:]), dtype=data.dtype)
    launch(_take_rows, out.size, data.reshape(data.shape[0], row_size), idx, out.reshape(rows, row_size))
    return out


@cuda.jit
def _scale_pixels(pixels, out):
    """out = pixel / 255 in float32, the same arithmetic as numba_cnn/kernels/host.py's as_float_images."""
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[e] = np.float32(pixels[e]) / np.float32(255)


def as_float_images(images):
    """uint8 pixels -> float32 in [0, 1] on the device (pixel / 255); float images pass through."""
    images = as_device(images, "images")
    if images.dtype != np.uint8:
        return images
    out = cuda.device_array(images.shape, dtype=np.float32)
    launch(_scale_pixels, out.size, flat(images), flat(out))
    return out


@cuda.jit(device=True)
def _block_sum(scratch, value):
    """The sum of `value` over the block's threads, returned to every thread. scratch: a shared array of
    THREADS_PER_BLOCK elements. Every thread of the block must call it (it synchronises)."""
    t = cuda.threadIdx.x
    scratch[t] = value
    cuda.syncthreads()
    half = THREADS_PER_BLOCK // 2
    while half > 0:
        if t < half:
            scratch[t] += scratch[t + half]
        cuda.syncthreads()
        half //= 2
    total = scratch[0]
    cuda.syncthreads()  # nobody may overwrite scratch[0] for the next output before everyone has read it
    return total


@cuda.jit
def sum_outer_inner(a, out):
    """a[A, B, C] -> out[B] = sum over a's first and last axes; one block per out[b]. It gives the bias gradient
    of a dense layer (dy viewed as [N, M, 1]) and of a convolution (dy viewed as [N, K, P*Q])."""
    scratch = cuda.shared.array(THREADS_PER_BLOCK, dtype=out.dtype)
    outer, inner = a.shape[0], a.shape[2]
    for b in range(cuda.blockIdx.x, out.size, cuda.gridDim.x):
        acc = ZERO
        for t in range(cuda.threadIdx.x, outer * inner, cuda.blockDim.x):
            i = t // inner
            acc += a[i, b, t - i * inner]
        total = _block_sum(scratch, acc)
        if cuda.threadIdx.x == 0:
            out[b] = total
