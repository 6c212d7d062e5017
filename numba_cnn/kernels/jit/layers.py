"""The jit backend's layers: numba_cnn/kernels/layers.py's numpy functions, except those a training step calls on
arrays where numpy's per-call overheads and one thread cost more than the work: ReLU forward and backward
(memory-bound selects over every conv activation not fused away, on all threads and into the caller's output arena,
where numpy allocates a fresh array and makes a boolean mask on one thread), dropout's forward, whose mask
a compiled counter-based generator draws in parallel, in float32 (numpy's generator draws one float64 per unit,
serially, a visible share of a step for the model's 128 x 1600 units), its backward (in parallel), the softmax
cross-entropy and the Adam update (compiled loops, serial for 128 x 10 logits and for small arrays of parameters,
large arrays over the threads), and the dense layer's forward where it has at least two vectors of outputs (a
register tile over every thread, where one-thread BLAS beside Numba's threads ran LeNet's and VGG's hidden layers
slower at inference: docs/kernels.md) and its backward: for few outputs from many inputs a compiled kernel, for
large products numpy's own BLAS, one call for dx and one for dw, on two of Numba's threads at once (jit/blas.py).
Each agrees with the numpy layer within float32 rounding (tests/test_layers.py runs both).

The generator is Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; PyTorch's CUDA generator is Philox too): word j of the block for counter c under key k is a pure
function of (c, k), so every unit's bits are the same whatever the thread count and the order units are drawn in.
Each call takes a fresh 64-bit key (two 32-bit words) from the numpy Generator the model passes (the host backends'
numba_cnn/kernels/dropout_rng.py), so seeding, checkpoints and exact resume work as for the other host backends,
whose masks come from that Generator's own stream.
Unit i reads word i % 4 of counter i // 4 and is kept when that word's top 24 bits, as a float32 in [0, 1), are
below 1 - rate. Self-contained (no @njit helper from another file), so Numba's cache sees every change.
"""

import math

import numpy as np
from numba import get_num_threads, njit, prange

from numba_cnn.kernels._numba_ext import (TILE_BITS, call_gemm, jit as _jit, part_range, parts_kernel, rest_of,
                                          tile_allocator)
from numba_cnn.kernels import layers as numpy_layers
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.blas import gemm_address
from numba_cnn.kernels.jit.buffers import aligned_copy, nchw, pad_width, reusable_output, round_up
from numba_cnn.kernels.jit.paths import note
from numba_cnn.kernels.layers import argmax_rows  # noqa: F401

_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # the round multipliers
_PHILOX_W0, _PHILOX_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # the key schedule's increments
_BLOCKS_PER_TASK = 1024  # counters per parallel task: 4096 units, enough work to amortise a task's start


_LANES = 64  # counters whose rounds run side by side in vector registers; an argument, not a constant (below)
_WORD_SHIFT = np.uint64(8)  # a unit's uniform is its word's top 24 bits


@njit(inline="always")  # inlined in numba IR: the counter loop vectorises as if the round were written out there
def _philox_round(c0, c1, c2, c3, key0, key1, r):
    """Round r (0-9) of Philox4x32-10 on the counter block (c0, c1, c2, c3), key (key0, key1) bumped r times."""
    k0 = (key0 + np.uint64(r) * _PHILOX_W0) & _LOW32
    k1 = (key1 + np.uint64(r) * _PHILOX_W1) & _LOW32
    p0, p1 = _PHILOX_M0 * (c0 & _LOW32), _PHILOX_M1 * (c2 & _LOW32)
    return (p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _LOW32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _LOW32


@parts_kernel
@_jit(parallel=False)
def _dropout(part, n_parts, x, key0, key1, threshold, scale, zero, y, mask, lanes):
    """mask[i] = scale if the top 24 bits of word i % 4 of Philox4x32-10(counter (i // 4, 0, 0, 0), key (key0,
    key1)) are below threshold, else zero; y = x * mask. x, y, mask flat; scale and zero in x's dtype.

    One counter per iteration of a loop over `lanes` counters, its ten rounds an inner loop that LLVM unrolls (a
    constant trip count), so that the counter's four words stay in registers through all ten and the loop over
    counters is the one LLVM vectorises (4 counters per ymm, 8 per zmm; the 32 x 32 -> 64-bit products as vpmuludq,
    the operands masked to 32 bits so that LLVM sees it). `lanes` is passed in rather than a constant because LLVM
    fully unrolls a loop of constant trip count before it vectorises, and unrolled, the counters stayed scalar. Each
    word's top 24 bits go out as an int32 in unit order, and the select runs as one vector loop of 32-bit lanes (a
    blend, not a branch on random bits)."""
    n = x.shape[0]
    counters = (n + 3) // 4
    key0, key1 = np.uint64(key0), np.uint64(key1)
    limit = np.int32(threshold)
    for task in part_range(part, n_parts, (counters + _BLOCKS_PER_TASK - 1) // _BLOCKS_PER_TASK):
        top_bits = np.empty(4 * lanes, np.int32)
        first, last = task * _BLOCKS_PER_TASK, min(counters, (task + 1) * _BLOCKS_PER_TASK)
        for base in range(first, last, lanes):
            count = min(lanes, last - base)
            for lane in range(count):
                c = np.uint64(base + lane)
                c0, c1, c2, c3 = c & _LOW32, c >> _SHIFT32, np.uint64(0), np.uint64(0)
                for r in range(10):  # a constant trip count: unrolled, the words kept in registers
                    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, key0, key1, r)
                top_bits[4 * lane], top_bits[4 * lane + 1] = np.int32(c0 >> _WORD_SHIFT), np.int32(c1 >> _WORD_SHIFT)
                top_bits[4 * lane + 2] = np.int32(c2 >> _WORD_SHIFT)
                top_bits[4 * lane + 3] = np.int32(c3 >> _WORD_SHIFT)
            start = 4 * base
            # sliced first: indexed as start + i, which might be negative to numba, the loop stayed scalar
            x_block, mask_block, y_block = x[start:], mask[start:], y[start:]
            for i in range(min(4 * count, n - start)):
                kept = scale if top_bits[i] < limit else zero
                mask_block[i] = kept
                y_block[i] = x_block[i] * kept


def flatten(x):
    """numpy_layers.flatten, with a channels-last x (every fused conv + pool's output) copied to NCHW on every
    thread (`nchw`, into the output arena) rather than by numpy's one-thread transposing copy inside reshape."""
    return nchw(x, reusable=True).reshape(x.shape[0], -1)


def dropout_forward(x, rate, rng):
    """x[N, D] -> (y[N, D], mask[N, D]): inverted dropout as numpy_layers.dropout_forward (each unit kept with
    probability 1 - rate, the mask holding the scale 1 / (1 - rate)), the mask drawn by Philox4x32-10 under a key
    taken from the numpy Generator `rng`."""
    x = np.ascontiguousarray(x)
    dtype = x.dtype.type
    keep = dtype(1.0 - rate)
    # a unit's uniform is (word >> 8) * 2**-24; it is below keep exactly when word >> 8 < ceil(keep * 2**24)
    threshold = math.ceil(float(keep) * 2 ** 24)
    key = rng.integers(0, 2 ** 32, size=2, dtype=np.uint64)
    y, mask = reusable_output(x.shape, x.dtype), reusable_output(x.shape, x.dtype)
    _dropout(x.reshape(-1), key[0], key[1], threshold, dtype(1) / keep, dtype(0), y.reshape(-1), mask.reshape(-1),
             _LANES)
    return y, mask


_RELU_BLOCK = 16384  # elements per parallel task of the ReLU kernels: a task's start amortised, L1-sized pieces


@_jit
def _relu(x, zero, y):
    """y = x where not x < 0 (NaN kept, as np.maximum), else 0; flat arrays, in blocks over the threads."""
    n = x.shape[0]
    for block in prange((n + _RELU_BLOCK - 1) // _RELU_BLOCK):
        start, stop = block * _RELU_BLOCK, min(n, (block + 1) * _RELU_BLOCK)
        x_block, y_block = x[start:stop], y[start:stop]  # indexed from the block's start, the loop stayed scalar
        for i in range(stop - start):
            v = x_block[i]
            y_block[i] = zero if v < zero else v


_RELU_STAGE = 256  # elements of dx selected into a stack tile, then copied out


def _make_relu_select():
    _stack_tile = tile_allocator()

    @_jit
    def relu_select(dy, y, zero, dx):
        """dx = 0 where y <= 0 else dy (a select: a NaN or infinite dy where the ReLU clipped still gives 0, a NaN y
        passes dy on); flat arrays, in blocks over the threads. dx may be dy itself (the Model donates dy): a loop
        that reads dy and writes dx at one address fails LLVM's run-time overlap check and runs scalar, so each
        piece is selected into a stack tile and copied out."""
        n = dy.shape[0]
        for block in prange((n + _RELU_BLOCK - 1) // _RELU_BLOCK):
            staged = _stack_tile(_RELU_STAGE, dx.dtype)
            for start in range(block * _RELU_BLOCK, min(n, (block + 1) * _RELU_BLOCK), _RELU_STAGE):
                count = min(_RELU_STAGE, n - start)
                # sliced first: indexed as start + i, which might be negative to numba, the loop stayed scalar
                dy_piece, y_piece, dx_piece = dy[start:], y[start:], dx[start:]
                for i in range(count):
                    g = dy_piece[i]  # loaded before the select: as its else-branch the load stayed a branch
                    staged[i] = zero if y_piece[i] <= zero else g
                for i in range(count):
                    dx_piece[i] = staged[i]

    return relu_select


_relu_select = _make_relu_select()


@_jit
def _relu_select_nhwc(dy, y, zero, dx):
    """_relu_select for 4-D arrays viewed NCHW whose dx is stored channels-last and one of dy and y NCHW: walked in
    dx's memory order (pixels, then their channels), the NCHW one read per channel."""
    n_images, n_ch, h, w = dy.shape
    for n in prange(n_images):
        for i in range(h):
            for j in range(w):
                for c in range(n_ch):
                    g = dy[n, c, i, j]
                    dx[n, c, i, j] = zero if y[n, c, i, j] <= zero else g


def _memory_order(a):
    """'C' or 'NHWC' when a's elements fill its memory in that order (so a flat view walks them all), else None."""
    if a.flags.c_contiguous:
        return "C"
    return "NHWC" if a.ndim == 4 and is_channels_last(a) else None


def _flat(a, order):
    return a.reshape(-1) if order == "C" else a.transpose(0, 2, 3, 1).reshape(-1)


def _like(a, order, over_a=False):
    """An output of a's shape laid out in `order`, from the caller's output arena when one is open; over_a: a's own
    memory where its owner donated it (an elementwise op's output)."""
    if order == "C":
        return reusable_output(a.shape, a.dtype, a if over_a else None)
    n, c, h, w = a.shape
    return reusable_output((n, h, w, c), a.dtype, a.transpose(0, 2, 3, 1) if over_a else None).transpose(0, 3, 1, 2)


def relu_forward(x):
    """x[any shape] -> max(x, 0), NaN kept: numpy's relu_forward, compiled over the threads, in x's layout."""
    order = _memory_order(x)
    if order is None:
        return numpy_layers.relu_forward(x)
    y = _like(x, order)
    _relu(_flat(x, order), x.dtype.type(0), _flat(y, order))
    return y


def relu_backward(dy, y):
    """dy, y[any shape] -> dy where y > 0, else 0: numpy's relu_backward (the same select), compiled over the threads,
    in dy's layout where both are stored alike or dy is channels-last and y NCHW, channels-last where y is so and dy
    NCHW (a pooling's spread gradient against a channels-last conv output: the convolution's backward then reads
    it in place); otherwise numpy's."""
    order, y_order = _memory_order(dy), _memory_order(y)
    if order is None or y_order is None or dy.dtype != y.dtype:
        return numpy_layers.relu_backward(dy, y)
    if y_order != order and order != "NHWC":
        dx = _like(dy, "NHWC")
        _relu_select_nhwc(dy, y, dy.dtype.type(0), dx)
        return dx
    dx = _like(dy, order, over_a=True)  # the select reads each element of dy before it writes that of dx
    if y_order == order:
        _relu_select(_flat(dy, order), _flat(y, order), dy.dtype.type(0), _flat(dx, order))
    else:  # a channels-last gradient (the fused backward's dx) against an NCHW activation
        _relu_select_nhwc(dy, y, dy.dtype.type(0), dx)
    return dx


@_jit
def _multiply(a, b, out):
    for i in prange(out.shape[0]):
        out[i] = a[i] * b[i]


def dropout_backward(dy, mask):
    """dy[N, D], mask[N, D] (the scale included) -> dy * mask."""
    dy, mask = np.ascontiguousarray(dy), np.ascontiguousarray(mask)
    dx = np.empty_like(dy)
    _multiply(dy.reshape(-1), mask.reshape(-1), dx.reshape(-1))
    return dx


# The dense forward's register tile: DENSE_ROWS rows of x (spelled out in the kernel) x two vectors of outputs. Six
# rows on AVX-512 (12 accumulators of its 32 registers); five on AVX2, whose 16 registers hold 10 accumulators, the
# rows' 5 broadcasts and a vector of w: with six, LLVM loads all six broadcasts before the multiply-adds and spills
# accumulators to the stack inside the loop (docs/kernels.md)
DENSE_ROWS, DENSE_LANES = 6 if TILE_BITS >= 512 else 5, 2 * TILE_BITS // 32


def _make_dense_forward(rows, lanes):
    tile = rows * lanes
    _stack_tile = tile_allocator()

    @parts_kernel
    @_jit(parallel=False)
    def dense_forward(part, n_parts, x, panels, b, y):
        """y[n, m] = sum over d of x[n, d] * w[d, m], d in order, then + b[m]: tasks of `rows` (5 or 6) rows x
        `lanes` outputs (x at least `rows` rows; the last row block overlaps the one before and stores only its new
        rows), each step one broadcast per row and one load of w's `lanes` values for 2 x `rows` vector FMAs.
        panels[c] holds w[:, c * lanes:(c + 1) * lanes] (y's columns padded with zeros to a multiple of `lanes`)
        row after row: a task reads its w as one stream, not one line every w.shape[1] values, whose lines fall in
        a few of L1's sets and evict each other."""
        n_rows, depth = x.shape
        n_out = y.shape[1]
        n_row_blocks = (n_rows + rows - 1) // rows
        n_col_blocks = (n_out + lanes - 1) // lanes
        # a block of outputs' tasks in a row (one part's share is contiguous): its w stays in cache
        for task in part_range(part, n_parts, n_row_blocks * n_col_blocks):
            column_block = task // n_row_blocks
            j0 = column_block * lanes
            first = (task % n_row_blocks) * rows
            r0 = min(first, n_rows - rows)
            width = min(lanes, n_out - j0)
            acc = _stack_tile(tile, x.dtype)
            for u in range(tile):
                acc[u] = 0
            panel = panels[column_block]
            # a five-row tile reads its fifth row again as the sixth, whose sums the constant test below drops
            x0, x1, x2, x3, x4, x5 = x[r0], x[r0 + 1], x[r0 + 2], x[r0 + 3], x[r0 + 4], x[r0 + rows - 1]
            for d in range(depth):
                w_seg = rest_of(panel, d * lanes)
                a0, a1, a2, a3, a4, a5 = x0[d], x1[d], x2[d], x3[d], x4[d], x5[d]
                # the tile's body in the lane loop, which LLVM vectorises whole (docs/numba.md)
                for lane in range(lanes):
                    w_l = w_seg[lane]
                    acc[lane] += a0 * w_l
                    acc[lanes + lane] += a1 * w_l
                    acc[2 * lanes + lane] += a2 * w_l
                    acc[3 * lanes + lane] += a3 * w_l
                    acc[4 * lanes + lane] += a4 * w_l
                    if rows == 6:
                        acc[5 * lanes + lane] += a5 * w_l
            for r in range(first - r0, rows):
                y_row = y[r0 + r, j0:]
                for u in range(width):
                    y_row[u] = acc[r * lanes + u] + b[j0 + u]

    return dense_forward


_dense_forward = _make_dense_forward(DENSE_ROWS, DENSE_LANES)
# one vector of outputs per task, for layers with at most that many (a classifier's 10 on AVX-512, where the wide
# tile's two vectors would be more than two thirds padding)
DENSE_NARROW_LANES = TILE_BITS // 32
_dense_forward_narrow = _make_dense_forward(DENSE_ROWS, DENSE_NARROW_LANES)


def dense_forward(x, w, b):
    """x[N, D], w[D, M], b[M] -> y[N, M] = x @ w + b: compiled over the threads for at least DENSE_LANES outputs, or
    for fewer from at least DENSE_COMPILED_MIN_INPUTS inputs (a tile of one vector of outputs where they fit in one),
    each element summed in one fixed order, so the same bits for any thread count and whatever rows share the batch
    (fewer than DENSE_ROWS rows run padded with zero rows); else numpy's (one-thread BLAS was faster on a few
    outputs from a few hundred inputs: docs/kernels.md)."""
    n_rows, (depth, n_out) = x.shape[0], w.shape
    lanes = DENSE_LANES if n_out > DENSE_NARROW_LANES else DENSE_NARROW_LANES
    compiled = (n_rows > 0 and depth > 0 and (n_out >= DENSE_LANES or depth >= DENSE_COMPILED_MIN_INPUTS)
                and x.dtype == w.dtype == b.dtype and x.dtype in (np.float32, np.float64))
    macs = n_rows * depth * n_out
    if not compiled:
        note("dense_forward", "numpy's matmul (one-thread BLAS)", macs)
        return numpy_layers.dense_forward(x, w, b)
    note("dense_forward", f"register tile {DENSE_ROWS} rows x {lanes} lanes", macs)
    n_panels = round_up(n_out, lanes) // lanes
    panels = pad_width(w, n_panels * lanes, axis=1).reshape(depth, n_panels, lanes).transpose(1, 0, 2)
    panels = np.ascontiguousarray(panels).reshape(n_panels, depth * lanes)
    x_rows = np.ascontiguousarray(pad_width(x, DENSE_ROWS, axis=0))  # the tile reads whole blocks of rows
    y = np.empty((x_rows.shape[0], n_out), x.dtype)
    (_dense_forward if lanes == DENSE_LANES else _dense_forward_narrow)(x_rows, panels, np.ascontiguousarray(b), y)
    return y if n_rows >= DENSE_ROWS else y[:n_rows].copy()


# The backward of dense layers with at most this many outputs from at least this many inputs runs compiled on every
# thread: BLAS runs at one thread here (see jit/__init__.py), and fills few lanes with 10 outputs. Timed against
# numpy's, the compiled kernel only won there (mnist-cnn's 1600 -> 10); with 32 or more outputs, or a few hundred
# inputs (LeNet's 84 -> 10), numpy's was faster (docs/kernels.md). The forward's tile (above) was no faster than
# BLAS for the backward's two products inside a training step (docs/kernels.md), so those stay numpy's. The forward's
# narrow tile takes the same bound on the inputs: below it, BLAS's call costs less than the tile's padded copy of w.
DENSE_COMPILED_MAX_OUTPUTS = 16
DENSE_COMPILED_MIN_INPUTS = 1024


# values of a row summed in registers at a time, two rows of them in the backward's tile: 8 zmm, or 8 ymm of AVX2's 16
_DENSE_TILE = 64 if TILE_BITS >= 512 else 32


def _make_dense_backward(tile):
    pair_tile = 2 * tile
    _stack_tile = tile_allocator()

    @parts_kernel
    @_jit(parallel=False)
    def dense_backward(part, n_parts, dy, x, w_t, dx, dw):
        """dx[n] = sum over m of dy[n, m] * w_t[m] (w_t = w transposed, (M, D)), the outputs m in order, and dw[d,
        m] = sum over n of dy[n, m] * x[n, d], the images in order: each part takes its share of the pairs of rows of
        dx, then its share of the blocks of `tile` inputs of dw, two outputs m at a time (two loops, so that each
        splits evenly over the parts), 2 x `tile` values summed in registers at a time: each w_t or x segment loaded
        serves two sums. An odd last row or output is paired with itself."""
        n_rows, n_out = dy.shape
        depth = dx.shape[1]
        tiled = depth - depth % tile
        n_blocks = (depth + tile - 1) // tile
        for pair in part_range(part, n_parts, (n_rows + 1) // 2):
            acc = _stack_tile(pair_tile, dx.dtype)
            row_a = 2 * pair
            row_b = min(row_a + 1, n_rows - 1)
            dy_a, dy_b, dx_a, dx_b = dy[row_a], dy[row_b], dx[row_a], dx[row_b]
            for d0 in range(0, tiled, tile):
                g_a, g_b, w_seg = dy_a[0], dy_b[0], w_t[0, d0:]
                for u in range(tile):
                    acc[u] = g_a * w_seg[u]
                    acc[tile + u] = g_b * w_seg[u]
                for m in range(1, n_out):
                    g_a, g_b, w_seg = dy_a[m], dy_b[m], w_t[m, d0:]
                    for u in range(tile):
                        acc[u] += g_a * w_seg[u]
                        acc[tile + u] += g_b * w_seg[u]
                out_a, out_b = dx_a[d0:], dx_b[d0:]
                for u in range(tile):
                    out_a[u] = acc[u]
                    out_b[u] = acc[tile + u]
            for row in (row_a, row_b):
                for d in range(tiled, depth):  # the rest one value at a time, the same order
                    total = dy[row, 0] * w_t[0, d]
                    for m in range(1, n_out):
                        total += dy[row, m] * w_t[m, d]
                    dx[row, d] = total
        for block in part_range(part, n_parts, n_blocks):
            acc = _stack_tile(pair_tile, dx.dtype)
            d0 = block * tile
            if d0 < tiled:
                for m_a in range(0, n_out, 2):
                    m_b = min(m_a + 1, n_out - 1)
                    g_a, g_b, x_seg = dy[0, m_a], dy[0, m_b], x[0, d0:]
                    for u in range(tile):
                        acc[u] = g_a * x_seg[u]
                        acc[tile + u] = g_b * x_seg[u]
                    for n in range(1, n_rows):
                        g_a, g_b, x_seg = dy[n, m_a], dy[n, m_b], x[n, d0:]
                        for u in range(tile):
                            acc[u] += g_a * x_seg[u]
                            acc[tile + u] += g_b * x_seg[u]
                    out = dw[d0:]
                    for u in range(tile):
                        out[u, m_a] = acc[u]
                        out[u, m_b] = acc[tile + u]
            else:  # the last, partial block: one value at a time, the same order
                out = dw[d0:]
                for m in range(n_out):
                    for u in range(depth - d0):
                        total = dy[0, m] * x[0, d0 + u]
                        for n in range(1, n_rows):
                            total += dy[n, m] * x[n, d0 + u]
                        out[u, m] = total

    return dense_backward


_dense_backward = _make_dense_backward(_DENSE_TILE)


# a backward whose products have at least this many multiply-adds each runs them side by side, one per thread
DENSE_BLAS_PAIR_MIN_MACS = 2 ** 21
_CBLAS_AS_STORED, _CBLAS_TRANSPOSED = 111, 112  # CBLAS's CblasNoTrans and CblasTrans


@parts_kernel
@_jit(parallel=False)
def _dense_backward_gemms(part, n_parts, gemm, wide_ints, dy, x, w, dx, dw):
    """dx[N, D] = dy[N, M] @ w[D, M]^T and dw[D, M] = x[N, D]^T @ dy[N, M], each one call of BLAS's gemm at address
    `gemm` (single-threaded), the two on two parts at once (in turn on one): each product's bits are BLAS's own,
    whichever thread runs it."""
    n_rows, n_out = dy.shape
    depth = x.shape[1]
    for product in part_range(part, n_parts, 2):
        if product == 0:
            call_gemm(gemm, wide_ints, _CBLAS_AS_STORED, _CBLAS_TRANSPOSED, n_rows, depth, n_out, dy, n_out, w, n_out,
                      dx, depth)
        else:
            call_gemm(gemm, wide_ints, _CBLAS_TRANSPOSED, _CBLAS_AS_STORED, depth, n_out, n_rows, x, depth, dy, n_out,
                      dw, n_out)


def dense_backward(dy, x, w):
    """dy[N, M], x[N, D], w[D, M] -> (dx[N, D], dw[D, M], db[M]): compiled over the threads for few outputs from
    many inputs (each element summed in one fixed order, so the same bits for any thread count); products of at
    least DENSE_BLAS_PAIR_MIN_MACS multiply-adds by numpy's own BLAS running one thread, one gemm call each, dx and dw
    at once on two threads (jit/blas.py; one call's bits whichever thread makes it); else numpy's."""
    compiled = (_dense_compiled(*w.shape) and x.shape[0] > 0 and x.dtype == w.dtype == dy.dtype
                and x.dtype in (np.float32, np.float64))
    macs = 2 * x.shape[0] * w.shape[0] * w.shape[1]  # dx and dw
    gemm = (gemm_address(x.dtype) if not compiled and macs >= 2 * DENSE_BLAS_PAIR_MIN_MACS and x.dtype == w.dtype
            == dy.dtype else None)
    if gemm is not None:
        note("dense_backward", "BLAS's gemm, dx and dw on two threads at once", macs)
        dy, x, w = np.ascontiguousarray(dy), np.ascontiguousarray(x), np.ascontiguousarray(w)
        dx, dw = reusable_output(x.shape, x.dtype), np.empty(w.shape, x.dtype)
        _dense_backward_gemms(*gemm, dy, x, w, dx, dw)
        return dx, dw, dy.sum(axis=0)
    if not compiled:
        note("dense_backward", "numpy's matmuls (one-thread BLAS)", macs)
        return numpy_layers.dense_backward(dy, x, w)
    note("dense_backward", f"compiled, {_DENSE_TILE} inputs per register tile", macs)
    dy, x = np.ascontiguousarray(dy), np.ascontiguousarray(x)
    dx = reusable_output(x.shape, x.dtype)
    dw = np.empty(w.shape, x.dtype)
    _dense_backward(dy, x, aligned_copy(w.T), dx, dw)
    return dx, dw, dy.sum(axis=0)


def _dense_compiled(inputs, outputs):
    """Whether a dense layer's backward runs the compiled kernel (_dense_backward) whatever the batch."""
    return 0 < outputs <= DENSE_COMPILED_MAX_OUTPUTS and inputs >= DENSE_COMPILED_MIN_INPUTS


def compile_dense_backward(inputs, outputs, dtype=np.float32):
    """Compile or load the backward's two gemms side by side for a dense layer that takes them at some batch size
    (DENSE_BLAS_PAIR_MIN_MACS): the precompile's passes of two images never reach it."""
    gemm = gemm_address(dtype)
    if gemm is not None and not _dense_compiled(inputs, outputs):
        x, w = np.zeros((2, inputs), dtype), np.zeros((inputs, outputs), dtype)
        dy = np.zeros((2, outputs), dtype)
        _dense_backward_gemms(*gemm, dy, x, w, np.empty(x.shape, dtype), np.empty(w.shape, dtype))


@_jit(parallel=False)
def _softmax_cross_entropy(logits, labels, zero, batch, dlogits, log_probs):
    """Per row n: dlogits[n] = (softmax(logits[n]) - onehot(labels[n])) / batch and log_probs[n] = log
    softmax(logits[n])[labels[n]], each as numpy_layers.softmax_cross_entropy computes it (the row's max
    subtracted first); -> how many rows have their label at the first largest logit (NaN counting as the largest,
    the first NaN first: numpy's argmax)."""
    n_rows, n_classes = logits.shape
    correct = 0
    for n in range(n_rows):
        row, out = logits[n], dlogits[n]
        top, best = row[0], 0
        for m in range(1, n_classes):
            v = row[m]
            later_wins = (v > top) | ((v != v) & (top == top))
            best = m if later_wins else best
            top = v if later_wins else top
        sum_exp = zero
        for m in range(n_classes):
            out[m] = np.exp(row[m] - top)
            sum_exp += out[m]
        label = labels[n]
        log_probs[n] = (row[label] - top) - np.log(sum_exp)
        for m in range(n_classes):
            out[m] /= sum_exp
        out[label] -= 1
        for m in range(n_classes):
            out[m] /= batch
        correct += best == label
    return correct


def softmax_cross_entropy(logits, labels):
    """logits[N, M], labels[N] int -> (mean loss: float, dlogits[N, M], correct: int), as
    numpy_layers.softmax_cross_entropy."""
    logits, labels = np.ascontiguousarray(logits), np.ascontiguousarray(labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):  # compiled code does not check
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    dtype = logits.dtype.type
    dlogits = np.empty_like(logits)
    log_probs = np.empty(logits.shape[0], logits.dtype)
    correct = _softmax_cross_entropy(logits, labels, dtype(0), dtype(logits.shape[0]), dlogits, log_probs)
    return -float(log_probs.mean(dtype=np.float64)), dlogits, int(correct)


@_jit(parallel=False)
def _adam_update(param, grad, m, v, alpha, keep1, keep2, eps):
    """In place over flat arrays, Adam's step as numpy_layers.adam_update writes it (keepN = 1 - betaN)."""
    for i in range(param.shape[0]):
        g = grad[i]
        m[i] += (g - m[i]) * keep1
        v[i] += (g * g - v[i]) * keep2
        param[i] -= alpha * m[i] / (np.sqrt(v[i]) + eps)


# an array of at least this many parameters is updated on every thread (fewer: a launch costs more than it saves)
ADAM_PARALLEL_MIN = 2 ** 15


@parts_kernel
@_jit(parallel=False)
def _adam_update_parts(part, n_parts, param, grad, m, v, alpha, keep1, keep2, eps):
    """_adam_update, each part on a contiguous share of the elements (each element alike: the same bits)."""
    share = part_range(part, n_parts, param.shape[0])
    first, stop = share.start, share.stop
    _adam_update(param[first:stop], grad[first:stop], m[first:stop], v[first:stop], alpha, keep1, keep2, eps)


def adam_update(param, grad, m, v, alpha, beta1, beta2, eps):
    """In place, one Adam step as numpy_layers.adam_update (alpha carries the bias corrections); arrays of at least
    ADAM_PARALLEL_MIN parameters on every thread (elementwise: the same bits on any thread count)."""
    if not (param.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        return numpy_layers.adam_update(param, grad, m, v, alpha, beta1, beta2, eps)  # needs flat views below
    dtype = param.dtype.type
    update = _adam_update_parts if param.size >= ADAM_PARALLEL_MIN and get_num_threads() > 1 else _adam_update
    update(param.reshape(-1), np.ascontiguousarray(grad, param.dtype).reshape(-1), m.reshape(-1), v.reshape(-1),
           dtype(alpha), dtype(1 - beta1), dtype(1 - beta2), dtype(eps))
