"""jit backend: explicit loop kernels compiled by Numba (`parallel=True`), register-blocked, no BLAS.

Each convolution loop nest keeps an output tile (columns or taps x channel lanes) in registers: the tile is a
stack array (`_stack_tile`), whose indices become constants once LLVM unrolls the tile loops, so it is promoted to
vector registers (a np.empty tile stays in memory: measured 2-5x slower). The innermost loop runs over `lanes`
channels contiguous in memory and compiles to 512-bit FMAs (the tile's function asks LLVM for 512-bit vectors,
which its Intel tuning otherwise avoids: 256-bit spilled the 4 x 64 tile and ran conv2 forward ~1.7x slower).

conv2d_forward   `_conv_tile_*`: prange over images; x repacked channels-last (N, H, W, C) by `_pack_channels_last`
                 (a free reshape when C = 1) and w to (R, S, C, K padded to the lanes); per output row, tiles of
                 columns x 32 or 64 output channels, reduced over (r, s, c) with c innermost (contiguous, and the
                 longest loop: measured 7.7 -> 5.1 ms on conv2 against an NCHW x with s innermost); bias seeds
                 the tile, ReLU clamps it on the store to NCHW. The last column tile overlaps the one before;
                 inputs narrower than a tile are zero-padded on the right and the output cropped.
conv2d_backward  dw: `_weight_grad_*` over dy repacked channels-last (N, P, Q, K padded) by `_pack_channels_last`;
                 tiles of 3 taps along a kernel row x lanes; the (channel, row, tap block, lane block) tiles are
                 split into one contiguous range per thread, images outermost, so each thread streams dy once;
                 every dw element is summed over (n, i, j) in the same order whatever the thread count.
                 db: per-image sums made by `_pack_channels_last` while it repacks, added up image by image.
                 dx: the full correlation of dy with the flipped kernel through the forward's `_conv_tile_*`
                 (bias 0, no ReLU), reading the same channels-last dy, packed with S-1 zero columns on each side;
                 the R-1 zero rows above and below are skipped by the kernel's row_shift instead of stored.
maxpool2d_*      `_maxpool_forward`/`_maxpool_backward`: prange over (image, channel) planes; forward compares
                 the 4 window values in row-major order with strict `>` (first maximum wins) through selects;
                 backward writes each input element once (its window's dy or zero), so no zero-fill pass.

Private variants, by lane count: `_conv_tile_32` (7 columns) / `_conv_tile_64` (4 columns) and `_weight_grad_32`
/ `_weight_grad_64`. K <= 32 takes 32 lanes so conv1 (K = 32) and conv2's dx (C = 32) compute no padded lanes;
wider K takes 64, as 4 x 64 fills 16 of the 32 zmm registers; 7 columns cover 26 and 13 output columns with
little overlap (6 x 64 measured no faster than 4 x 64 on conv2).

Results do not depend on the thread count (bitwise): forward and dx split over images, dw as above, db from fixed
per-image sums. All float work is in the input's dtype (float32 or float64).

Compilation: every kernel goes through `_jit` (one set of options), compiles lazily on its first call for a dtype,
and is cached on disk (`cache=True`) in `__pycache__` next to this file or, when the package directory is not
writable, in numba's user cache directory (NUMBA_CACHE_DIR overrides both). NUMBA_CNN_CACHE=0 turns the disk cache
off; if no cache location is usable at all, the kernels compile uncached with a warning.
"""

import os
import threading
import warnings

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

from numba_cnn.kernels.contract import BackendInfo

# BLAS at one thread: its only BLAS calls are the dense layer's small matmuls, and OpenBLAS workers that keep
# spinning after each call take the core Numba's threads need (2 cores: a training step measured 41.6 ms with 2
# BLAS threads, 23.6 ms with 1).
INFO = BackendInfo(summary="register-tiled loop kernels compiled by Numba (parallel=True)", blas_threads="one")

# contract + reassoc give FMAs and vectorised reductions; no nnan/ninf, so NaN checks downstream stay valid.
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
CACHE = os.environ.get("NUMBA_CNN_CACHE", "1") != "0"

# output columns per correlation tile, by lane count: 7 x 32 and 4 x 64 fp32 lanes are 14 and 16 zmm accumulators
# (of 32), and 7 columns cover conv1's 26 and dx's 13 output columns with little overlap, 4 covers conv2's 11.
TILE_COLUMNS_32, TILE_COLUMNS_64 = 7, 4
TILE_TAPS = 3  # kernel taps per weight-gradient tile (a 3x3 kernel splits into 3 exact blocks)


def _jit(fn):
    """njit with this backend's options; without a usable cache location, fall back to no disk cache."""
    options = dict(parallel=True, fastmath=FASTMATH, error_model="numpy")
    if CACHE:
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError as err:  # "cannot cache function ...: no locator available"
            warnings.warn(f"numba_cnn jit kernels compile without a disk cache: {err}", RuntimeWarning)
    return njit(cache=False, **options)(fn)


def _stack_tile(size, dtype):
    """A scratch vector of `size` (a compile-time constant) elements of `dtype`. Interpreted: a heap array.
    Compiled: a stack array, which LLVM keeps in registers, where np.empty is heap memory it must reload."""
    return np.empty(size, dtype)


@intrinsic(prefer_literal=True)
def _alloca_vector(typingctx, size, dtype_of):
    """The compiled `_stack_tile`: a C-contiguous 1-D array over an alloca of a literal number of elements."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    dtype = dtype_of.dtype
    vector_type = types.Array(dtype, 1, "C")

    def codegen(context, builder, signature, args):
        count = size.literal_value
        element = context.get_data_type(dtype)
        intp = context.get_value_type(types.intp)
        itemsize = context.get_abi_sizeof(element)
        storage = cgutils.alloca_once(builder, ir.ArrayType(element, count))  # in the entry block: once per call
        # LLVM's tuning for Intel AVX-512 cores prefers 256-bit vectors, which halves the tile a register file
        # holds (4 x 64 fp32 lanes spill as 32 ymm but fit as 16 zmm). Ask for 512 bits in the function that
        # holds the tile only; llvmlite's attribute set has no key="value" form, so the string is added raw.
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        vector = make_array(vector_type)(context, builder)
        populate_array(vector, data=builder.bitcast(storage, element.as_pointer()),
                       shape=[ir.Constant(intp, count)], strides=[ir.Constant(intp, itemsize)],
                       itemsize=ir.Constant(intp, itemsize), meminfo=None)
        return vector._getvalue()

    return vector_type(size, dtype_of), codegen


@overload(_stack_tile, prefer_literal=True, inline="always")  # the intrinsic must land in the kernel itself
def _stack_tile_compiled(size, dtype):
    def impl(size, dtype):
        return _alloca_vector(size, dtype)
    return impl


def _make_conv_tile(columns, lanes):
    """Correlation kernel with tiles of `columns` output columns x `lanes` output channels."""
    tile = columns * lanes

    @_jit
    def conv_tile(x_cl, wt, b, floor, row_shift, y):
        """y[n,k,i,j] = max(floor, b[k] + sum_{r,s,c} x_cl[n,i+r-row_shift,j+s,c] * wt[r,s,c,k]) from a
        channels-last input, rows outside 0..H-1 counting as zeros (skipped, never read); wt and b padded to a
        multiple of `lanes` channels, floor 0 for ReLU or -inf for none. Needs Q >= columns."""
        n_images, h_in, n_in = x_cl.shape[0], x_cl.shape[1], x_cl.shape[3]
        n_out, p_out, q_out = y.shape[1], y.shape[2], y.shape[3]
        r_taps, s_taps, k_padded = wt.shape[0], wt.shape[1], wt.shape[3]
        for n in prange(n_images):
            acc = _stack_tile(tile, x_cl.dtype)
            xs = _stack_tile(columns, x_cl.dtype)
            for i in range(p_out):
                r_first = max(0, row_shift - i)
                r_stop = min(r_taps, h_in + row_shift - i)
                for jb in range(0, q_out, columns):
                    j0 = min(jb, q_out - columns)  # the last tile overlaps the one before instead of overrunning
                    for k0 in range(0, k_padded, lanes):
                        for jj in range(columns):
                            for k in range(lanes):
                                acc[jj * lanes + k] = b[k0 + k]
                        for r in range(r_first, r_stop):
                            x_slab = x_cl[n, i + r - row_shift, j0:]  # sliced once: inner indices are ranges
                            for s in range(s_taps):
                                # the channel loop innermost of the reduction: long, and contiguous in x_cl and wt
                                for c in range(n_in):
                                    w_vec = wt[r, s, c, k0:k0 + lanes]  # a slice: w_vec[k] provably contiguous
                                    for jj in range(columns):
                                        xs[jj] = x_slab[jj + s, c]
                                    for k in range(lanes):
                                        w_k = w_vec[k]
                                        for jj in range(columns):
                                            acc[jj * lanes + k] += xs[jj] * w_k
                        for k in range(min(lanes, n_out - k0)):
                            y_seg = y[n, k0 + k, i, j0:]  # the tile's columns are contiguous in y
                            for jj in range(columns):
                                y_seg[jj] = max(acc[jj * lanes + k], floor)

    return conv_tile


def _make_weight_grad(lanes):
    """Weight-gradient kernel with tiles of TILE_TAPS taps along a kernel row x `lanes` output channels."""
    taps = TILE_TAPS
    tile = taps * lanes

    @_jit
    def weight_grad(x, dyt, col_pad, r_taps, s_taps, n_groups, dwt):
        """dwt[c, r, s, k] = sum_{n,i,j} x[n,c,i+r,j+s] * dyt[n,i,col_pad+j,k], dyt channels-last padded to a
        multiple of `lanes` channels and by col_pad columns on each side; needs S >= TILE_TAPS. Tiles (c, r, tap block, lane block) are split into n_groups
        contiguous ranges, one per task, each looping over images outermost."""
        n_images, n_in = x.shape[0], x.shape[1]
        p_out, q_out, k_padded = dyt.shape[1], dyt.shape[2] - 2 * col_pad, dyt.shape[3]
        tap_blocks = (s_taps + taps - 1) // taps
        lane_blocks = k_padded // lanes
        per_channel = r_taps * tap_blocks * lane_blocks
        n_tiles = n_in * per_channel
        for g in prange(n_groups):
            acc = _stack_tile(tile, x.dtype)
            xs = _stack_tile(taps, x.dtype)
            first, last = g * n_tiles // n_groups, (g + 1) * n_tiles // n_groups
            for n in range(n_images):
                for t in range(first, last):
                    c, rest = t // per_channel, t % per_channel
                    r, rest = rest // (tap_blocks * lane_blocks), rest % (tap_blocks * lane_blocks)
                    s_first = rest // lane_blocks * taps
                    s0 = min(s_first, s_taps - taps)  # the last block overlaps the one before, never overruns
                    k0 = rest % lane_blocks * lanes
                    for tt in range(taps):
                        dw_vec = dwt[c, r, s0 + tt, k0:k0 + lanes]
                        for k in range(lanes):
                            acc[tt * lanes + k] = dw_vec[k]
                    for i in range(p_out):
                        x_seg = x[n, c, i + r, s0:]
                        for j in range(q_out):
                            dy_vec = dyt[n, i, col_pad + j, k0:k0 + lanes]
                            for tt in range(taps):
                                xs[tt] = x_seg[j + tt]
                            for k in range(lanes):
                                dy_k = dy_vec[k]
                                for tt in range(taps):
                                    acc[tt * lanes + k] += xs[tt] * dy_k
                    for tt in range(s_first - s0, taps):  # overlapped taps belong to the block before
                        dw_vec = dwt[c, r, s0 + tt, k0:k0 + lanes]
                        for k in range(lanes):
                            dw_vec[k] = acc[tt * lanes + k]

    return weight_grad


_conv_tile_32 = _make_conv_tile(TILE_COLUMNS_32, 32)
_conv_tile_64 = _make_conv_tile(TILE_COLUMNS_64, 64)
_weight_grad_32, _weight_grad_64 = _make_weight_grad(32), _make_weight_grad(64)


@_jit
def _pack_channels_last(a, col_pad, out, sums):
    """a[N, C, H, W] -> out[N, H, W + 2 col_pad, C_padded]: channels last, zero columns on both sides and zero
    padded channels; sums[n, c] = sum of a[n, c], summed in one fixed order per image (the bias gradient's terms,
    independent of the thread count)."""
    n_images, n_ch, h, w = a.shape
    c_padded = out.shape[3]
    for n in prange(n_images):
        total = sums[n]
        total[:] = 0
        for i in range(h):
            out[n, i, :col_pad] = 0
            out[n, i, col_pad + w:] = 0
            for j in range(w):
                row = out[n, i, col_pad + j]
                for c in range(n_ch):
                    row[c] = a[n, c, i, j]
                for c in range(n_ch, c_padded):
                    row[c] = 0
                for c in range(c_padded):
                    total[c] += row[c]


@_jit
def _maxpool_forward(x, y, argmax):
    n_images, n_ch = x.shape[0], x.shape[1]
    ho, wo = y.shape[2], y.shape[3]
    for nc in prange(n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        for i in range(ho):
            top, bottom = x[n, c, 2 * i], x[n, c, 2 * i + 1]
            y_row, arg_row = y[n, c, i], argmax[n, c, i]
            for j in range(wo):
                # strict > in row-major order keeps the first maximum; selects, not branches, so it vectorises
                best, where = top[2 * j], 0
                v = top[2 * j + 1]
                where = 1 if v > best else where
                best = v if v > best else best
                v = bottom[2 * j]
                where = 2 if v > best else where
                best = v if v > best else best
                v = bottom[2 * j + 1]
                where = 3 if v > best else where
                best = v if v > best else best
                y_row[j] = best
                arg_row[j] = where


@_jit
def _maxpool_backward(dy, argmax, dx):
    n_images, n_ch, h, w = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    for nc in prange(n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        plane = dx[n, c]
        zero = dy[n, c, 0, 0] * 0
        for i in range(ho):
            top, bottom = plane[2 * i], plane[2 * i + 1]
            dy_row, arg_row = dy[n, c, i], argmax[n, c, i]
            for j in range(wo):
                g, where = dy_row[j], arg_row[j]
                top[2 * j] = g if where == 0 else zero
                top[2 * j + 1] = g if where == 1 else zero
                bottom[2 * j] = g if where == 2 else zero
                bottom[2 * j + 1] = g if where == 3 else zero
        # an odd last row or column belongs to no window
        for i in range(2 * ho, h):
            plane[i] = zero
        for i in range(2 * ho):
            for j in range(2 * wo, w):
                plane[i, j] = zero


def _lanes(channels):
    return 32 if channels <= 32 else 64


def _padded(channels, lanes):
    return -(-channels // lanes) * lanes


def _pad_width(x, width):
    """x zero-padded on the right of axis 3 to `width`, for inputs narrower than a tile."""
    if x.shape[3] >= width:
        return x
    wide = np.zeros(x.shape[:3] + (width,), x.dtype)
    wide[..., :x.shape[3]] = x
    return wide


_scratch_buffers = threading.local()
_SCRATCH_KEPT = 8  # buffers kept per thread: a training step uses 3 (conv2's x, conv2's and conv1's dy)


def _scratch(name, shape, dtype):
    """A reusable uninitialised buffer for internal data that never leaves this module, one per (name, shape,
    dtype): fresh multi-megabyte arrays cost a page fault per 4 KiB on every call (measured ~12 ms of system
    time per training step). The oldest buffer is dropped beyond _SCRATCH_KEPT."""
    buffers = _scratch_buffers.__dict__.setdefault("by_key", {})
    key = (name, shape, np.dtype(dtype).str)
    buffer = buffers.get(key)
    if buffer is None:
        if len(buffers) >= _SCRATCH_KEPT:
            del buffers[next(iter(buffers))]
        buffer = buffers[key] = np.empty(shape, dtype)
    return buffer


def _channels_last(x, col_pad=0, channels=None, scratch="x_cl"):
    """x[N, C, H, W] -> (x_cl[N, H, W + 2 col_pad, channels], per-image channel sums[N, channels]), both in
    scratch buffers (valid until the next call with the same scratch name)."""
    n, c, h, w = x.shape
    channels = c if channels is None else channels
    x_cl = _scratch(scratch, (n, h, w + 2 * col_pad, channels), x.dtype)
    sums = _scratch(scratch + ".sums", (n, channels), x.dtype)
    _pack_channels_last(x, col_pad, x_cl, sums)
    return x_cl, sums


def _correlate(x_cl, w_rsck, bias, relu, row_shift=0):
    """Correlation of channels-last x_cl[N, H, W, C] with w_rsck[R, S, C, K] through a tile kernel -> y[N, K, P, Q];
    row_shift > 0 treats x_cl as zero-padded by row_shift rows at the top and bottom without storing them."""
    n, h, wd, _ = x_cl.shape
    r, s, _, out_channels = w_rsck.shape
    lanes = _lanes(out_channels)
    columns = TILE_COLUMNS_32 if lanes == 32 else TILE_COLUMNS_64
    k_padded = _padded(out_channels, lanes)
    wt = np.zeros(w_rsck.shape[:3] + (k_padded,), x_cl.dtype)
    wt[..., :out_channels] = w_rsck
    b = np.zeros(k_padded, x_cl.dtype)
    b[:out_channels] = bias
    q = wd - s + 1
    if q < columns:  # narrower than a tile: zero columns on the right, cropped off the output
        wide = np.zeros((n, h, columns + s - 1, x_cl.shape[3]), x_cl.dtype)
        wide[:, :, :wd] = x_cl
        x_cl = wide
    y = np.empty((n, out_channels, h + 2 * row_shift - r + 1, x_cl.shape[2] - s + 1), x_cl.dtype)
    floor = x_cl.dtype.type(0 if relu else -np.inf)
    (_conv_tile_32 if lanes == 32 else _conv_tile_64)(x_cl, wt, b, floor, row_shift, y)
    return y if y.shape[3] == q else np.ascontiguousarray(y[..., :q])


def conv2d_forward(x, w, b, relu):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,H-R+1,W-S+1], ReLU applied when relu is True."""
    n, c, h, wd = x.shape
    x_cl = x.reshape(n, h, wd, 1) if c == 1 else _channels_last(x)[0]  # one channel: already channels-last
    return _correlate(x_cl, w.transpose(2, 3, 1, 0), b, relu)


def conv2d_backward(dy, x, w, need_dx):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] or None, dw[K,C,R,S], db[K])."""
    k, c, r, s = w.shape
    # dy channels-last, its channels padded to the lanes; for dx also padded by S-1 zero columns on each side
    col_pad = s - 1 if need_dx else 0
    dyt, dy_sums = _channels_last(dy, col_pad, _padded(k, _lanes(k)), scratch="dy_cl")
    db = dy_sums[:, :k].sum(axis=0)
    # kernels narrower than a tap tile: zero columns on the right of x add taps that are computed and dropped
    s_tiled = max(s, TILE_TAPS)
    dwt = np.zeros((c, r, s_tiled, dyt.shape[3]), dy.dtype)
    weight_grad = _weight_grad_32 if _lanes(k) == 32 else _weight_grad_64
    weight_grad(_pad_width(x, x.shape[3] + s_tiled - s), dyt, col_pad, r, s_tiled, get_num_threads(), dwt)
    dw = np.ascontiguousarray(dwt[:, :, :s, :k].transpose(3, 0, 1, 2))
    if not need_dx:
        return None, dw, db
    # dx is the full correlation of dy with the flipped kernel: the zero columns are in dyt, the R-1 zero rows
    # above and below are skipped through row_shift; dyt's padded channels meet zero rows of w_flipped
    w_flipped = np.zeros((r, s, dyt.shape[3], c), dy.dtype)
    w_flipped[:, :, :k] = w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
    dx = _correlate(dyt, w_flipped, np.zeros(c, dy.dtype), False, row_shift=r - 1)
    return dx, dw, db


def maxpool2d_forward(x):
    """x[N,C,H,W] -> (y[N,C,H//2,W//2], argmax uint8 offset 2*di+dj of each window's first maximum)."""
    n, c, h, w = x.shape
    y = np.empty((n, c, h // 2, w // 2), x.dtype)
    argmax = np.empty(y.shape, np.uint8)
    _maxpool_forward(x, y, argmax)
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape):
    """dy[N,C,H//2,W//2], argmax, x_shape (N,C,H,W) -> dx[N,C,H,W], dy routed to each window's winner."""
    dx = np.empty(x_shape, dy.dtype)
    _maxpool_backward(dy, argmax, dx)
    return dx
