"""The jit backend's host-side buffers and layouts: internal packed data lives in per-thread `scratch` buffers; the
multi-megabyte arrays the ops return (the fused forward's y and argmax, every correlation's y, so dx) come from the
`OutputArena` their caller owns, if it opened one (the Model does, one per model, so a training step makes no page
faults on them), else fresh. And the copies between the two layouts the ops take, NCHW and channels-last, the
zero-padded copies in either layout, and the zero padding of inputs narrower than a tile.
"""

import bisect
import ctypes
import itertools
import math
import threading

import numpy as np

from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.sparse import _channels_first, _pad_channels_last, _pad_rows

_per_thread = threading.local()
_SCRATCH_KEPT = 32  # buffers kept per thread, one per name: a preset's training step uses at most 14 (vgg-small)
ALIGNMENT = 64  # bytes: a cache line, and one AVX-512 vector
# An arena's slabs are reserved this large (or as large as the output asked for): address space only, since the
# system gives a page its memory when it is first written, so one slab holds a pass's outputs and its free blocks
# merge into blocks the size of larger ones
ARENA_SLAB_BYTES = 256 << 20


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


def _arrays_in(held):
    """The arrays in `held`: an array, or tuples, lists and dict values of them, nested (other objects, such as
    shapes' ints, hold none)."""
    found, pending = [], [held]
    while pending:
        item = pending.pop()
        if isinstance(item, np.ndarray):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return found


class OutputArena:
    """The arrays the ops return while it is open (`with arena:`, on this thread), owned by whoever opened it.

    Its memory is a slab (more where one fills), cut into blocks as the ops ask for outputs. `take` hands out a
    block no one else has: the smallest free one that fits (its rest stays free), else one of a new slab. `release`
    frees every block handed out since the last release, and free neighbours merge again; only the owner calls it,
    when it knows none of them is read any more (the Model: when a new pass begins, since a pass's outputs and
    caches die with the next one). `retire` frees some within a pass: every block but those the owner names
    (`blocks_of` the arrays it still reads; the Model: after each layer's backward, all but the caches of the layers
    before it, the input gradient it returned and the parameter gradients, so the backward's gradients reuse the
    memory of the forward's dead activations). Nothing is guessed from reference counts, so an array the owner still
    uses is never handed out twice, and a pass of the same shapes as the one before reuses its memory without page
    faults. Outside any open arena the ops return fresh arrays.

    `layout` keeps, until the release, the copies of an op's input in another layout (zero-padded, channels-last,
    planes) that another op of the same pass wants again: the forward's padded input is the backward's. So between
    the use of an array as an input and the release, its owner must not write into it (the Model never does: every
    op writes a new array), except over an array it donated (`donate`), whose copies are dropped then. A retirement
    keeps the copies of the arrays in the blocks it keeps (and of arrays not the arena's) and drops the rest.

    poison: fill each retired block with 0xFF bytes (a float NaN), so that a read of an array retired too early
    shows in the results (the tests' check of the owner's liveness)."""

    def __init__(self, poison=False):
        self._slabs = {}  # address -> the slab there: 1-D uint8, starting on ALIGNMENT
        self._used = {}  # a slab's address -> the end of the furthest block handed out in it (the memory written)
        self._free = {}  # a slab's address -> sorted [start, stop) byte ranges free in it
        self._taken = {}  # id of an array handed out since the release -> (it, its slab's address, start, stop)
        self._outer = []
        self._layouts = {}  # (id of the source array, key) -> (the source, its copy)
        self._donated = None
        self._poison = poison

    def donate(self, a):
        """The owner reads the array `a` no more once the next op has run: that op may write an output of a's
        shape, dtype and layout over it (`take(..., over=a)`), once; None withdraws the offer, as does the release.
        The Model donates each step's input gradient, which the step after made for it alone."""
        self._donated = a

    def take(self, shape, dtype, over=None):
        """A buffer of shape and dtype for an op's output: `over` itself where it is the donated array (or a view of
        all of its memory) and C-contiguous in that shape and dtype, else a view of a free block, else of a new
        slab."""
        donated = self._donated
        if (over is not None and donated is not None and over.shape == tuple(shape) and over.dtype == dtype
                and over.flags.c_contiguous and over.nbytes == donated.nbytes
                and over.__array_interface__["data"][0] == donated.__array_interface__["data"][0]):
            self._donated = None
            # a copy of the donated array in another layout would be stale once it is written over
            self._layouts = {key: entry for key, entry in self._layouts.items()
                             if not np.may_share_memory(entry[0], donated)}
            return over
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        size = round_up(max(nbytes, 1), ALIGNMENT)  # every block starts on a cache line
        best, best_size = None, 0
        for slab_at, ranges in self._free.items():
            for index, (start, stop) in enumerate(ranges):
                if size <= stop - start and (best is None or stop - start < best_size):
                    best, best_size = (slab_at, index, start, stop), stop - start
        if best is None:
            slab = aligned_empty(max(size, ARENA_SLAB_BYTES), np.uint8)
            slab_at = slab.ctypes.data
            self._slabs[slab_at] = slab
            self._free[slab_at] = [(size, slab.size)] if slab.size > size else []
            self._used[slab_at] = 0
            start = 0
        else:
            slab_at, index, start, stop = best
            ranges = self._free[slab_at]
            if stop - start > size:
                ranges[index] = (start + size, stop)
            else:
                del ranges[index]
        self._used[slab_at] = max(self._used[slab_at], start + size)
        # the array's memory is exported by a block object of its own, not by the slab, so that numpy's views of it
        # have it (not the slab) as their base: `_block_of` finds its block by identity
        block = (ctypes.c_char * size).from_address(slab_at + start)
        block.slab = self._slabs[slab_at]  # the slab lives as long as any array in it
        a = np.ndarray(shape, dtype, block)
        self._taken[id(a)] = (a, slab_at, start, start + size)
        return a

    def release(self):
        self._free = {slab_at: [(0, slab.size)] for slab_at, slab in self._slabs.items()}
        self._taken.clear()
        self._layouts.clear()
        self._donated = None

    def _give_back(self, slab_at, start, stop):
        """Free [start, stop) of a slab, merged with the free ranges beside it."""
        ranges = self._free[slab_at]
        at = bisect.bisect_left(ranges, (start, stop))
        if at > 0 and ranges[at - 1][1] == start:
            at -= 1
            start = ranges.pop(at)[0]
        if at < len(ranges) and ranges[at][0] == stop:
            stop = ranges.pop(at)[1]
        ranges.insert(at, (start, stop))

    def _block_of(self, a):
        """The key of the taken block that array a lies in, or None where it is empty or not the arena's memory.
        Every array the arena hands out is a block's, and every view of one has it as its base (or its base's)."""
        if a.size == 0:
            return None
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        entry = self._taken.get(id(root))
        if entry is not None and entry[0] is root:
            return id(root)
        if root.base is None:  # owns its memory: not the arena's
            return None
        # a view the arena did not make (compiled code's): its block found from its address
        address = a.__array_interface__["data"][0]
        for key, (_, slab_at, start, stop) in self._taken.items():
            if slab_at + start <= address < slab_at + stop:
                return key
        return None

    def blocks_of(self, held):
        """The keys of the taken blocks that the arrays in `held` (arrays, or tuples, lists and dicts of them) lie
        in: what `retire` is told to keep."""
        return {block for block in map(self._block_of, _arrays_in(held)) if block is not None}

    def retire(self, kept_blocks):
        """Free, within the pass, every block handed out since the release but those whose keys are in
        `kept_blocks` (from `blocks_of`) and the layout copies of the arrays in them: the owner says nothing else
        will read them. Layout copies of arrays in freed blocks are dropped; copies of arrays that are not the
        arena's (the pass's input, the weights) stay."""
        held = set(kept_blocks)
        layouts, pending = {}, dict(self._layouts)
        while True:  # a copy of a kept array is kept, and so are the copies made from it
            found = {}
            for key, (source, copy) in pending.items():
                block = self._block_of(source)
                if block is None or block in held:
                    found[key] = (source, copy)
            if not found:
                break
            for key, (_, copy) in found.items():
                held |= self.blocks_of(copy)
                del pending[key]
            layouts.update(found)
        self._layouts = layouts
        for key in [key for key in self._taken if key not in held]:
            _, slab_at, start, stop = self._taken.pop(key)
            if self._poison:
                self._slabs[slab_at][start:stop] = 0xFF
            self._give_back(slab_at, start, stop)

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
        """Bytes of its slabs handed out at least once (to the end of the furthest block): the memory it holds."""
        return sum(self._used.values())

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
