"""The jit backend's host-side buffers and layouts: internal packed data lives in per-thread `scratch` buffers; the
multi-megabyte arrays the ops return (the fused forward's y and argmax, every correlation's y, so dx) come from the
`OutputArena` their caller owns, if it opened one (the Model does, one per model, so a training step makes no page
faults on them), else fresh. And the copies between the two layouts the ops take, NCHW and channels-last, the
zero-padded copies in either layout, and the zero padding of inputs narrower than a tile.
"""

import itertools
import math
import threading

import numpy as np

from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.sparse import _channels_first, _pad_channels_last, _pad_rows

_per_thread = threading.local()
_SCRATCH_KEPT = 32  # buffers kept per thread, one per name: a preset's training step uses at most 14 (vgg-small)
ALIGNMENT = 64  # bytes: a cache line, and one AVX-512 vector


def _on_a_line(shape, dtype):
    dtype = np.dtype(dtype)
    count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    if ALIGNMENT % dtype.itemsize:
        raw = np.empty(count * dtype.itemsize + ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)
    spare = ALIGNMENT // dtype.itemsize
    raw = np.empty(count + spare, dtype)  # numpy's data start on a multiple of 16 bytes, so of the itemsize here
    start = -raw.ctypes.data % ALIGNMENT // dtype.itemsize
    return raw[start:start + count].reshape(shape)


def aligned_empty(shape, dtype):
    """An uninitialised C-contiguous array whose data starts on an ALIGNMENT-byte boundary, for the scratch and arena
    buffers. numpy's own start 16 or 32 bytes into a cache line, and then every 64-byte vector load from a row that
    starts at a multiple of 64 bytes spans two lines: two reads of the L1 cache for one."""
    return _on_a_line(shape, dtype)


def aligned_zeros(shape, dtype):
    """Zeros starting on an ALIGNMENT-byte boundary, as aligned_empty's: the small arrays an op packs for its kernel
    on every call (weights, bias), which the kernels load as whole vectors."""
    out = _on_a_line(shape, dtype)
    out.fill(0)
    return out


def aligned_copy(a):
    """A C-contiguous copy of a, starting on an ALIGNMENT-byte boundary (a small array packed per call)."""
    out = _on_a_line(a.shape, a.dtype)
    out[...] = a
    return out


def scratch(name, shape, dtype):
    """A reusable uninitialised buffer for internal data that never leaves the backend (its use ends within the op
    that asked for it), one per (name, dtype), viewed in the shape asked for: fresh multi-megabyte arrays cost a page
    fault per 4 KiB on every call, all of it system time. Layers of different shapes share a name's buffer, grown to
    the largest; the oldest buffer is dropped beyond _SCRATCH_KEPT."""
    buffers = _per_thread.__dict__.setdefault("by_key", {})
    key = (name, np.dtype(dtype).str)
    count = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.size < count:
        if buffer is None and len(buffers) >= _SCRATCH_KEPT:
            del buffers[next(iter(buffers))]
        buffer = buffers[key] = aligned_empty(count, dtype)
    return buffer[:count].reshape(shape)


class OutputArena:
    """The arrays the ops return while it is open (`with arena:`, on this thread), owned by whoever opened it.

    `take` hands out a buffer no one else has: one released before, else a new one. `release` gives back every
    buffer handed out since the last release; only the owner calls it, when it knows none of them is read any more
    (the Model: when a new pass begins, since a pass's outputs and caches die with the next one). Nothing is guessed
    from reference counts, so an array the owner still uses is never handed out twice, and a pass of the same shapes
    as the one before reuses its memory without page faults. Outside any open arena the ops return fresh arrays.

    `layout` keeps, until the release, the copies of an op's input in another layout (zero-padded, channels-last,
    planes) that another op of the same pass wants again: the forward's padded input is the backward's. So between
    the use of an array as an input and the release, its owner must not write into it (the Model never does: every
    op writes a new array), except over an array it donated (`donate`), whose copies are dropped then."""

    def __init__(self):
        self._free = {}  # (shape, dtype) -> released buffers
        self._taken = []
        self._outer = []
        self._layouts = {}  # (id of the source array, key) -> (the source, its copy)
        self._donated = None

    def donate(self, a):
        """The owner reads the array `a` no more once the next op has run: that op may write an output of a's
        shape, dtype and layout over it (`take(..., over=a)`), once; None withdraws the offer, as does the release.
        The Model donates each step's input gradient, which the step after made for it alone."""
        self._donated = a

    def take(self, shape, dtype, over=None):
        """A buffer of shape and dtype for an op's output: `over` itself where it is the donated array (or a view of
        all of its memory) and C-contiguous in that shape and dtype, else one released before, else a new one."""
        donated = self._donated
        if (over is not None and donated is not None and over.shape == tuple(shape) and over.dtype == dtype
                and over.flags.c_contiguous and over.nbytes == donated.nbytes
                and over.__array_interface__["data"][0] == donated.__array_interface__["data"][0]):
            self._donated = None
            # a copy of the donated array in another layout would be stale once it is written over
            self._layouts = {key: entry for key, entry in self._layouts.items()
                             if not np.may_share_memory(entry[0], donated)}
            return over
        key = (tuple(shape), np.dtype(dtype).str)
        free = self._free.get(key)
        a = free.pop() if free else aligned_empty(shape, dtype)
        self._taken.append(a)
        return a

    def release(self):
        for a in self._taken:
            self._free.setdefault((a.shape, a.dtype.str), []).append(a)
        self._taken.clear()
        self._layouts.clear()
        self._donated = None

    def layout(self, source, key, make):
        """make(self.take)'s result for (source, key), made once per pass: the first call makes it from buffers of
        this arena, the next ones until the release get the same. The entry holds `source`, so its id names no
        other array meanwhile."""
        entry = self._layouts.get((id(source), key))
        if entry is None:
            entry = self._layouts[(id(source), key)] = (source, make(self.take))
        return entry[1]

    @property
    def nbytes(self):
        """Bytes held, handed out or free."""
        return sum(a.nbytes for a in self._taken) + sum(a.nbytes for free in self._free.values() for a in free)

    def __enter__(self):
        self._outer.append(getattr(_per_thread, "arena", None))
        _per_thread.arena = self
        return self

    def __exit__(self, *exc):
        _per_thread.arena = self._outer.pop()


def layout_copy(source, key, make, scratch_name):
    """A copy of the op input `source` in another layout, made by make(allocate) with allocate(shape, dtype): with
    an open OutputArena, once per pass and key (OutputArena.layout); without one, in scratch buffers named after
    scratch_name (valid until the next call with that name and shape)."""
    arena = getattr(_per_thread, "arena", None)
    return make(scratch_allocator(scratch_name)) if arena is None else arena.layout(source, key, make)


def scratch_allocator(name):
    """allocate(shape, dtype) -> a scratch buffer per call: named `name`, then `name.1`, `name.2`, ..."""
    calls = itertools.count()

    def allocate(shape, dtype):
        call = next(calls)
        return scratch(f"{name}.{call}" if call else name, shape, dtype)

    return allocate


def reusable_output(shape, dtype, over=None):
    """An uninitialised array for an op to return: from the open OutputArena of this thread (`over`, an input the op
    reads element by element before it writes the same element, where its owner donated it), else a new one. The
    kernels write every element of their outputs."""
    arena = getattr(_per_thread, "arena", None)
    return aligned_empty(shape, dtype) if arena is None else arena.take(shape, dtype, over)


def round_up(count, multiple):
    """count rounded up to a multiple of `multiple` (channels to a tile's lanes, columns to whole vectors)."""
    return -(-count // multiple) * multiple


def pad_width(x, width, axis=3):
    """x zero-padded at the end of `axis` to at least `width` (the width axis by default: 3 in NCHW, 2 in
    channels-last), for inputs narrower than a tile; x itself when it is wide enough."""
    if x.shape[axis] >= width:
        return x
    shape = list(x.shape)
    shape[axis] = width
    wide = np.zeros(shape, x.dtype)
    wide[(slice(None),) * axis + (slice(0, x.shape[axis]),)] = x
    return wide


def nchw(a, reusable=False):
    """a as a C-contiguous NCHW array: itself, or a copy of a channels-last one (compiled for float arrays, on every
    thread: numpy's transposing copy runs on one, at a fraction of the memory's speed); reusable: the copy from the
    open OutputArena (`reusable_output`), for an op's output or an input copy the op reads before it returns."""
    if not (is_channels_last(a) and a.dtype in (np.float32, np.float64)):
        return np.ascontiguousarray(a)
    out = (reusable_output if reusable else aligned_empty)(a.shape, a.dtype)
    _channels_first(a.transpose(0, 2, 3, 1), out)
    return out


def nhwc(a, reusable=False):
    """a[N, C, H, W] as a C-contiguous channels-last (N, H, W, C) array: a view of a channels-last one, else a copy
    (compiled for float arrays, and from the arena with reusable, as in nchw)."""
    if is_channels_last(a) or a.dtype not in (np.float32, np.float64):
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    out = (reusable_output if reusable else aligned_empty)((a.shape[0], a.shape[2], a.shape[3], a.shape[1]), a.dtype)
    _pad_channels_last(np.ascontiguousarray(a), 0, 0, out)
    return out


def padded_channels_last(x, padding, min_width=0, buffer_name="x_padded"):
    """x[N, C, H, W] (either layout) zero-padded by padding = (top, bottom, left, right), channels last:
    xp[N, H + top + bottom, max(W + left + right, min_width), C] (extra zero columns on the right), a `layout_copy`
    (the fused forward's is the listed backward's)."""
    n, c, h, wd = x.shape
    top, bottom, left, right = padding
    shape = (n, h + top + bottom, max(wd + left + right, min_width), c)

    def make(allocate):
        xp = allocate(shape, x.dtype)
        if is_channels_last(x):  # compiled copies, on every thread (numpy's slice assignments run on one)
            _pad_rows(x.transpose(0, 2, 3, 1), top, left, xp)
        else:  # a transposing copy
            _pad_channels_last(x, top, left, xp)
        return xp

    return layout_copy(x, ("padded_channels_last", tuple(padding), shape, x.dtype.str), make, buffer_name)
