"""The jit backend's host-side buffers and layouts: internal packed data lives in per-thread `scratch` buffers; the
multi-megabyte arrays returned (the fused forward's y and argmax, every correlation's y, so dx) come from
`reusable_output`, which recycles an array it returned before only once nothing else references it (so a training
step makes no page faults on them). And the copies between the two layouts the ops take, NCHW and channels-last,
and the zero padding of inputs narrower than a tile.
"""

import sys
import threading

import numpy as np

_per_thread = threading.local()
_SCRATCH_KEPT = 16  # buffers kept per thread: a training step uses 7 (conv2's 5 list arrays, conv1's dy and sums)


def scratch(name, shape, dtype):
    """A reusable uninitialised buffer for internal data that never leaves the backend, one per (name, shape,
    dtype): fresh multi-megabyte arrays cost a page fault per 4 KiB on every call, all of it system time. The
    oldest buffer is dropped beyond _SCRATCH_KEPT."""
    buffers = _per_thread.__dict__.setdefault("by_key", {})
    key = (name, shape, np.dtype(dtype).str)
    buffer = buffers.get(key)
    if buffer is None:
        if len(buffers) >= _SCRATCH_KEPT:
            del buffers[next(iter(buffers))]
        buffer = buffers[key] = np.empty(shape, dtype)
    return buffer


_OUTPUTS_KEPT = 4  # returned arrays kept per (shape, dtype) for reuse: a training step keeps 2 of a kind alive


def reusable_output(shape, dtype):
    """An uninitialised array to return, recycled: one this function returned before and nobody holds any more
    (no reference but this pool's: no caller variable, view or buffer export), else a fresh one. A returned array
    is never handed out again while it is in use; the kernels write every element of their outputs. Fresh
    multi-megabyte outputs cost a page fault per 4 KiB on first touch, inside the parallel kernels (most of a
    training step's faults before this pool)."""
    pools = _per_thread.__dict__.setdefault("outputs", {})
    key = (shape, np.dtype(dtype).str)
    pool = pools.get(key)
    if pool is None:
        if len(pools) >= _SCRATCH_KEPT:
            del pools[next(iter(pools))]
        pool = pools[key] = []
    for a in pool:
        if sys.getrefcount(a) <= 3:  # the pool's list, the loop variable, getrefcount's argument
            return a
    a = np.empty(shape, dtype)
    pool.append(a)
    if len(pool) > _OUTPUTS_KEPT:
        del pool[0]
    return a


def pad_width(x, width, axis=3):
    """x zero-padded on the right of its width axis (3 in NCHW, 2 in channels-last) to at least `width`, for
    inputs narrower than a tile; x itself when it is wide enough."""
    if x.shape[axis] >= width:
        return x
    shape = list(x.shape)
    shape[axis] = width
    wide = np.zeros(shape, x.dtype)
    wide[(slice(None),) * axis + (slice(0, x.shape[axis]),)] = x
    return wide


def nchw(a):
    """a as a C-contiguous NCHW array: itself, or a copy of a channels-last one."""
    return np.ascontiguousarray(a)


def nhwc(a):
    """a[N, C, H, W] as a C-contiguous channels-last (N, H, W, C) array: a view of a channels-last one, else a copy."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))
