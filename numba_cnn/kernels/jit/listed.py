"""The jit backend's fused conv + ReLU + 2x2 max-pool backward over the nonzero conv-output gradients, on the host
side: the lists, the weight gradient's band height and image chunks, the input gradient's crop and its constants
for exact division, around sparse.py's kernels. jit/__init__.py's conv2d_relu_maxpool2d_backward calls it where it
applies; how it works: docs/kernels.md.
"""

import numpy as np
from numba import get_num_threads

from numba_cnn.kernels.jit.buffers import aligned_copy, nchw, nhwc, reusable_output, round_up, scratch
from numba_cnn.kernels.jit.columns import COLUMN_LANES, _padded_planes, padded_nchw
from numba_cnn.kernels.jit.paths import note
from numba_cnn.kernels.jit.pooled_grad import (POOLED_GRAD_LANES, POOLED_ROWS_LANES, POOLED_ROWS_TILE,
                                              _pooled_weight_grad_3x3, _sum_listed_chunks,
                                              pooled_weight_grad_rows_kernel)
from numba_cnn.kernels.jit.sparse import (LISTED_BAND_BYTES, LISTED_GRAD_LANES, _listed_input_grad, _listed_weight_grad,
                                          _pooled_grad_lists)
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS


def listed_backward(dy, pooled, argmax, x_cl, w, need_dx, padding):
    """The fused backward over the list of nonzero conv-output gradients (jit/sparse.py), from dy, pooled and argmax
    indexed (N, P2, Q2, K) (views of either layout) and x channels-last (N, H, W, C), C-contiguous, which the
    convolution zero-pads by `padding` (the weight gradient pads each band of rows as it reads them); dx comes
    channels-last (viewed NCHW). None if x holds NaN or inf."""
    n, rows, columns, c = x_cl.shape
    k, _, r, s = w.shape
    top, bottom, left, right = padding
    h, wd = rows + top + bottom, columns + left + right  # the padded input's, in which the lists' offsets count
    windows = dy.shape[1] * dy.shape[2]
    values = scratch("listed.values", (n, k, windows), dy.dtype)
    # offsets within one padded image: 32-bit wherever one fits (half the bytes of the largest scratch list)
    offsets = scratch("listed.offsets", (n, k, windows), np.int32 if h * wd * c <= 2**31 - 1 else np.int64)
    counts = scratch("listed.counts", (n, k), np.int64)
    sums = scratch("listed.sums", (n, k), dy.dtype)
    finite = scratch("listed.finite", (n,), np.bool_)
    zero = dy.dtype.type(0)
    _pooled_grad_lists(dy, pooled, argmax, wd, c, zero, values, offsets, counts, sums)
    row_bytes = wd * c * dy.itemsize
    band_rows = max(1, (LISTED_BAND_BYTES // row_bytes - r) // 2)  # pooled rows whose inputs fill the band
    chunks = min(GRAD_IMAGE_CHUNKS, n)
    # the kernel computes whole vectors: each kernel row's S x C values padded to them, and the band with a vector
    # to spare for the last one's reads (zeros there, not whatever the buffer held)
    partial = scratch("listed.dw", (chunks, k, r, round_up(s * c, LISTED_GRAD_LANES)), dy.dtype)
    band_values = (2 * band_rows + r - 1) * wd * c
    bands = scratch("listed.bands", (chunks, round_up(band_values + LISTED_GRAD_LANES, 64 // dy.itemsize)), dy.dtype)
    bands[:, band_values:] = 0
    _listed_weight_grad(x_cl.reshape(n, rows, columns * c), top, left * c, values, offsets, counts, wd * c,
                        dy.shape[1], band_rows, bands, partial, partial.reshape(chunks, -1), zero, finite)
    if not finite.all():  # x is read there, as the bands are filled
        return None
    note("conv2d_relu_maxpool2d_backward", "listed: nonzero conv-output gradients only",
         int(counts.sum()) * r * s * c * (2 if need_dx else 1))
    dw = np.empty(w.shape, dy.dtype)
    _sum_listed_chunks(partial, s, c, dw)
    dx = None
    if need_dx:
        w_flat = aligned_copy(w.transpose(0, 2, 3, 1)).reshape(-1)
        groups = get_num_threads()
        # with padding, each image is summed in a work row and cropped into dx (the stored zeros' gradient dropped)
        work = scratch("listed.dx", (groups, h * wd * c if any(padding) else 0), dy.dtype)
        dx = reusable_output((n, rows, columns, c), dy.dtype)
        _listed_input_grad(values, offsets, counts, w_flat, r, c, *exact_quotient_constants(c), wd * c, groups, zero,
                           work, top, left, rows, dx.reshape(n, -1))
        dx = dx.transpose(0, 3, 1, 2)
    return dx, dw, sums.sum(axis=0)


def exact_quotient_constants(divisor):
    """(shift, inverse) with ((m >> shift) * inverse) mod 2**64 = m // divisor for every multiple m of divisor:
    divisor = odd << shift, and inverse is odd's inverse modulo 2**64 (odd is its own inverse modulo 8, and each
    Newton step, inverse * (2 - odd * inverse), doubles the low bits that are right)."""
    shift = (divisor & -divisor).bit_length() - 1
    odd = divisor >> shift
    inverse = odd
    for _ in range(5):  # 3 -> 6 -> 12 -> 24 -> 48 -> 96 bits
        inverse = inverse * (2 - odd * inverse) % 2**64
    return np.uint64(shift), np.uint64(inverse)


def first_layer_weight_grad(dy, pooled, argmax, x, w, padding):
    """(dw, db) of the fused conv + ReLU + 2x2 max-pool backward of a first layer (no dx), from the pooled gradient:
    `pooled_weight_grad_rows` where its tile fills, else `pooled_weight_grad` for a 3x3 kernel (both need finite
    x); None where neither takes it. dy, pooled and argmax (N, K, P2, Q2) in either layout, x NCHW or
    channels-last."""
    if pooled_weight_grad_rows_fits(w):
        rows = pooled_weight_grad_rows(dy, pooled, argmax, x, w, padding)
        if rows is not None:
            return rows
    if pooled_weight_grad_fits(x, w):
        return pooled_weight_grad(nhwc(dy), nhwc(pooled), nhwc(argmax), x, w, padding)
    return None


def pooled_weight_grad_fits(x, w):
    """Whether `pooled_weight_grad` takes a first layer's backward: a 3x3 kernel, output channels a multiple of its
    vector, finite x and w (it multiplies the unpooled gradient's zeros too, but in another order than the
    composition, so a NaN from 0 * inf could land elsewhere)."""
    k, c, r, s = w.shape
    return (r, s) == (3, 3) and k % POOLED_GRAD_LANES == 0 and np.isfinite(w).all() and np.isfinite(x).all()


def pooled_weight_grad(dy, pooled, argmax, x, w, padding):
    """(dw[K, C, 3, 3], db[K]) of the fused conv + ReLU + 2x2 max-pool backward without dx, by pooled_grad.py's
    `_pooled_weight_grad_3x3`, from dy, pooled and argmax channels-last (N, P2, Q2, K) and x NCHW or channels-last
    (read as NCHW planes, zero-padded by `padding` if any)."""
    n, k = dy.shape[0], dy.shape[3]
    _, c, r, s = w.shape
    xp = padded_nchw(x, padding) if any(padding) else nchw(x)
    chunks = min(GRAD_IMAGE_CHUNKS, n)
    dwt = scratch("pooled.dw", (chunks, c * r * s, k), dy.dtype)
    dbt = scratch("pooled.db", (chunks, k), dy.dtype)
    note("conv2d_relu_maxpool2d_backward", f"dw from the pooled gradient, 3x3 taps from each window's 4x4 inputs "
         f"x {POOLED_GRAD_LANES} lanes", n * dy.shape[1] * dy.shape[2] * 4 * c * r * s * k)
    _pooled_weight_grad_3x3(xp, dy, pooled, argmax, dy.dtype.type(0), dwt, dbt)
    dw, db = _chunks_added(dwt, dbt)
    return np.ascontiguousarray(dw.T.reshape(k, c, r, s)), db


def _chunks_added(dwt, dbt):
    """(dw, db) from the first-layer kernels' per-chunk scratch sums dwt[chunks, ...] and dbt[chunks, K], the chunks
    added in order (numpy's sum over the first axis adds them so); db a new array, dw one too unless one chunk."""
    if dwt.shape[0] == 1:
        return dwt[0], dbt[0].copy()
    return dwt.sum(axis=0), dbt.sum(axis=0)


def _rows_tile(c, r, s):
    """(groups, rows, vectors) of `_pooled_weight_grad_rows`'s work for a C x R x S kernel: its C x R kernel rows of
    S values, each in whole vectors, split evenly into groups of at most POOLED_ROWS_TILE vectors."""
    vectors = -(-s // POOLED_ROWS_LANES)
    groups = -(-(c * r) // (POOLED_ROWS_TILE // vectors))
    return groups, -(-(c * r) // groups), vectors


def pooled_weight_grad_rows_fits(w):
    """Whether `pooled_weight_grad_rows` takes a first layer's backward: kernel rows of at most three vectors, and a
    tile of at least 8 vectors, whose multiply-adds per window outweigh the window's bookkeeping (one input channel,
    3 to 7 rows of one vector, lost to the column tiles and the 3x3 kernel: docs/kernels.md, "The first layer's
    weight gradient")."""
    k, c, r, s = w.shape
    groups, rows, vectors = _rows_tile(c, r, s)
    return vectors <= 3 and rows * vectors >= 8


def pooled_weight_grad_rows(dy, pooled, argmax, x, w, padding):
    """(dw[K, C, R, S], db[K]) of the fused conv + ReLU + 2x2 max-pool backward without dx, by pooled_grad.py's
    `_pooled_weight_grad_rows` (each window's winner only), from dy, pooled and argmax (N, K, P2, Q2) in either
    layout and x NCHW or channels-last; None if x holds NaN or inf (the composition's products of the unpooled
    gradient's zeros with them give NaN, which this sum skips)."""
    n, k = dy.shape[0], dy.shape[1]
    _, c, r, s = w.shape
    top, bottom, left, right = padding
    q = x.shape[3] + left + right - s + 1
    groups, rows, vectors = _rows_tile(c, r, s)
    # the column forward's padded planes (one layout copy for both passes) where a window's last row vector fits
    columns = max(round_up(q, COLUMN_LANES) + s - 1, q - 1 + vectors * POOLED_ROWS_LANES)
    rows_in = x.shape[2] + top + bottom
    xp, sums = _padded_planes(x, top, left, c, rows_in, columns, "x_columns")
    if not np.isfinite(sums).all():  # an image's sum is finite when all its values are (or, rarely, overflows)
        return None
    total = c * r
    row_offsets = np.zeros(groups * rows, np.int64)
    row_offsets[:total] = (np.arange(c)[:, None] * (rows_in * columns) + np.arange(r)[None, :] * columns).reshape(-1)
    chunks = min(GRAD_IMAGE_CHUNKS, n)
    partial = scratch("pooled_rows.dw", (chunks, k, groups * rows, vectors * POOLED_ROWS_LANES), dy.dtype)
    dbt = scratch("pooled_rows.db", (chunks, k), dy.dtype)
    note("conv2d_relu_maxpool2d_backward", f"dw from the pooled gradient, each window's winner only: {total} kernel "
         f"rows of {s} in {vectors} vector(s), a tile of {rows} rows", n * dy.shape[2] * dy.shape[3] * k * total * s)
    pooled_weight_grad_rows_kernel(rows, vectors)(xp.reshape(n, -1), columns, row_offsets.reshape(groups, rows), dy,
                                                  pooled, argmax, dy.dtype.type(0), partial, dbt)
    dw, db = _chunks_added(partial, dbt)
    return np.array(dw[:, :total, :s]).reshape(k, c, r, s), db  # a copy: partial is a scratch buffer
