"""jit's precompile: on a cold disk cache, training's warm-up compiles the float32 kernels a step uses, half in this
process and half in a second Python process at once, so that the two cores compile side by side. The second
process's machine code reaches this one through numba's disk cache, which two processes may fill at once
(tests/test_concurrent_cache.py)."""

import signal
import subprocess
import sys
import threading

import numpy as np

from numba_cnn.kernels._numba_ext import CACHE
from numba_cnn.kernels.jit.tiles import _conv_tile_narrow, _conv_tile_wide

# Compiling ahead, on a cold disk cache. Numba compiles one function at a time in a process, and compiling the
# backend's float32 kernels one after the other is most of a cold start. `precompile` compiles every one of them,
# half in this process and half in a second Python process at once, which roughly halves that wait (the figures are
# in docs/results.md); the second process's machine code reaches this one through the disk cache, which two
# processes may fill at once (tests/test_concurrent_cache.py). With a warm cache, or no disk cache to share
# (NUMBA_CNN_CACHE=0, no writable location), it does nothing and the kernels load or compile on first call as
# before. The kernels of general.py and norm.py (strided convolution, other pooling windows, average pooling, batch
# normalisation) are not in it: they compile on first call, so only a network that uses them pays for them.
_PRECOMPILE_TIMEOUT_S = 600
_NO_PADDING = (0, 0, 0, 0)


def compile_part(jit, part):
    """Call ops on tiny float32 inputs so that half `part` (0: this process, 1: the second) of every kernel of the
    backend compiles. The halves are balanced by each kernel's compile time (the comments name the kernels each
    call compiles); the packing kernel both need comes first in half 0 and late in half 1, which then loads it from
    the disk cache instead of compiling it again."""
    rng = np.random.default_rng(0)

    def conv_inputs(channels, out_channels):
        return (rng.random((2, channels, 6, 6), dtype=np.float32),
                rng.standard_normal((out_channels, channels, 3, 3)).astype(np.float32),
                np.zeros(out_channels, np.float32))

    x1, w1, b1 = conv_inputs(1, 4)  # conv1's one input channel
    x2, w2, b2 = conv_inputs(32, 64)  # conv2's shape: the wide tiles
    x3, w3, b3 = conv_inputs(3, 8)  # the narrow tiles, several input channels
    if part == 0:
        jit.conv2d_relu_maxpool2d_forward(x2, w2, b2)  # _pack_channels_last, _conv_pool
        jit.conv2d_relu_maxpool2d_forward(x1, w1, b1)  # _conv1_pool
        jit.layers.dropout_forward(x2.reshape(2, -1), 0.5, np.random.default_rng(0))  # _dropout
        # _conv_tile_narrow, _maxpool_forward
        jit.maxpool2d_forward(jit.conv2d_forward(x3, w3, b3, True, 1, _NO_PADDING), (2, 2))
        return
    for x, w, need_dx in ((x1, w1, False), (x2, w2, True)):  # pooled outputs and argmax made up: no forward here
        pooled = rng.random((2, w.shape[0], 2, 2), dtype=np.float32)
        argmax = rng.integers(0, 4, pooled.shape).astype(np.uint8)
        # conv1: _unpool_pack, _weight_grad_narrow; conv2: _pooled_grad_lists, _listed_weight_grad,
        # _listed_input_grad
        jit.conv2d_relu_maxpool2d_backward(np.ones_like(pooled), pooled, argmax, x, w, need_dx)
    dy2 = np.ones((2, 64, 4, 4), np.float32)  # conv2's output gradient, pooled and argmax made up above
    jit.maxpool2d_backward(pooled, argmax, dy2.shape, (2, 2))  # _maxpool_backward
    w2[0, 0, 0, 0] = np.inf
    jit.conv2d_backward(dy2, x2, w2, True, 1, _NO_PADDING)  # _weight_grad_wide where it is another kernel (AVX-512)
    if _conv_tile_wide is not _conv_tile_narrow:  # AVX-512's wide correlation tile
        jit.conv2d_forward(x2, w2, b2, True, 1, _NO_PADDING)
    flat = x2.reshape(2, -1)
    jit.layers.dropout_backward(flat, flat)  # _multiply
    jit.layers.softmax_cross_entropy(flat[:, :10], np.zeros(2, np.int64))  # _softmax_cross_entropy
    jit.layers.adam_update(flat.copy(), flat, flat * 0, flat * 0, 1e-3, 0.9, 0.999, 1e-7)  # _adam_update


def cache_is_cold(jit):
    """True when the dropout kernel (one a training step always calls) has no fresh entry in the disk cache, read
    through numba's cache index (private API: if it has changed, the cache counts as warm)."""
    try:
        return not jit.layers._dropout._cache._cache_file._load_index()
    except Exception:  # a null cache (no location) or another numba: compile in this process alone
        return False


def compile_cold_cache(jit):
    """On a cold disk cache, compile every float32 kernel of the backend, half in this process and half in a second
    one at once; -> True if it did, False if the cache was warm or not shareable."""
    if not CACHE or not cache_is_cold(jit):
        return False
    code = ("from numba_cnn.kernels import jit; from numba_cnn.kernels.jit.cold_compile import compile_part; "
            "compile_part(jit, 1)")
    try:
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    except OSError:
        return False
    # Ctrl-C kills the child at once and stops this process even where the KeyboardInterrupt lands in a compiler
    # callback that swallows it (llvmlite's ctypes callbacks print "Exception ignored" and go on), by raising again
    # once this process's half is done
    interrupted = []

    def stop(signum, frame):
        interrupted.append(signum)
        child.kill()
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGINT, stop) if in_main_thread else None
    try:
        compile_part(jit, 0)
        child.wait(_PRECOMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # whatever it did not finish, this process compiles when it first calls it
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
        if child.poll() is None:  # timed out, or this process stopped: the child goes too, at once
            child.kill()
            child.wait()
    if interrupted:
        raise KeyboardInterrupt
    return True
