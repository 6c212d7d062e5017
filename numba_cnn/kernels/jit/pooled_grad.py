"""The jit backend's weight gradients of a first conv layer behind ReLU + 2x2 max-pooling, straight from the pooled
gradient (listed.py's `pooled_weight_grad` and `pooled_weight_grad_rows` call them): a first layer computes no dx,
and its kernel rows (S x C values, 3 for one input channel) are too short for the lists of sparse.py.

`_pooled_weight_grad_3x3`, for a 3x3 kernel over one or two input channels: per 2x2 window, the pooled gradient
becomes four copies masked to the window's four positions (three of them zero), and each kernel tap adds the four
products with the inputs that tap sees at those positions: every product of the dense sum over the unpooled
gradient, without writing that gradient. Output channels run in the vector lanes; each window's 4 x 4 input patch is
read once (16 loads at fixed offsets), and the kernel spells out which of the 16 each tap's four products take.

`_pooled_weight_grad_rows`, for any kernel size: per window and output channel, the winner's products only, each of
the C x R kernel rows of input (S values, in whole vectors) times the window's gradient, a quarter of the dense
sum's products. It wins where those rows fill a register tile (several input channels); with one input channel its
few multiply-adds per window do not carry the window's bookkeeping (docs/kernels.md, "The first layer's weight
gradient").

`_sum_listed_chunks` adds up the chunks of sparse.py's listed weight gradient (the other weight gradient behind the
pool) straight into the weight's (K, C, R, S) order, on every thread.

Self-contained (no @njit helper from another file), so Numba's cache sees every change to what it compiles.
"""

import numpy as np
from numba import njit

from numba_cnn.kernels._numba_ext import jit as _jit, part_range, parts_kernel, rest_of, tile_allocator
from numba_cnn.kernels.jit.tiles import TILE_BITS

# the register tile: 9 taps x one vector of output channels
POOLED_GRAD_LANES = 16 if TILE_BITS >= 512 else 8
# the any-size kernel's register tile: rows x vectors at most this many vectors (12 of AVX2's 16 registers), rows
# at most 12, each row at most 3 vectors
POOLED_ROWS_TILE = 12
POOLED_ROWS_LANES = TILE_BITS // 32


@njit(inline="always")
def _through_relu(g_any, pooled, zero):
    """A window's gradient through the ReLU's select: g_any where the pooled value is > 0 or NaN, else 0."""
    return g_any if (pooled > zero) | (pooled != pooled) else zero


@njit(inline="always")  # inlined in numba IR: the lane loops that call it vectorise as if it were written out there
def _window_masks(g_any, pooled, where, zero):
    """A window's gradient through the ReLU's select (`_through_relu`) -> (g, g0, g1, g2, g3): g and its four copies
    masked to the window's positions, the winner's (argmax `where`) holding g."""
    g = _through_relu(g_any, pooled, zero)
    return (g, g if where == 0 else zero, g if where == 1 else zero, g if where == 2 else zero,
            g if where == 3 else zero)


def _make_pooled_weight_grad_3x3(lanes):
    """`_pooled_weight_grad_3x3` with a register tile of a 3x3 kernel's 9 taps x `lanes` output channels."""
    tile = 9 * lanes
    _stack_tile = tile_allocator()

    @parts_kernel
    @_jit(parallel=False)
    def pooled_weight_grad_3x3(part, n_parts, xp, dy, pooled, argmax, zero, dwt, dbt):
        """dwt[h, c * 9 + r * 3 + s, k] (K a multiple of `lanes`) = sum over the images n of chunk h (dwt.shape[0]
        contiguous chunks of the batch) and the 2x2 windows (pi, pj) of g[n, pi, pj, k] * xp[n, c, 2 pi + a + r,
        2 pj + b + s]: the dense weight gradient of a 3x3 convolution's output gradient behind ReLU + 2x2
        max-pooling, g being dy where pooled > 0 or is NaN (the ReLU's select) and (a, b) the window's winner
        (argmax); dy, pooled and argmax indexed (N, P2, Q2, K), xp NCHW (padded as the convolution reads it).

        The unpooled gradient is never stored: per window, its gradient becomes four copies masked to each of the
        window's four positions, and each tap adds the four products with that position's input, one of them
        nonzero (a select per lane would need a gather of the inputs): every product of the dense sum over the
        unpooled gradient (its zeros included). One input channel at a time, each window's 4 x 4 input patch read
        once, rows 2 pi.. 2 pi + 3 and columns 2 pj.. 2 pj + 3 of the padded plane (tap (r, s) at window position
        (a, b) reads patch row a + r, column b + s). Per element of dwt: images in order, windows in order; the
        chunks are fixed by the batch and the caller adds them in order, so the same bits for any thread count.
        dbt[h, k]: chunk h's sum of g (the bias gradient's), images and windows in order."""
        n_images, n_in = xp.shape[0], xp.shape[1]
        n_chunks, n_out = dwt.shape[0], dwt.shape[2]
        p_half, q_half = dy.shape[1], dy.shape[2]
        k_blocks = n_out // lanes
        for task in part_range(part, n_parts, n_chunks * k_blocks):
            h, k0 = task // k_blocks, task % k_blocks * lanes
            acc = _stack_tile(tile, xp.dtype)
            sums = _stack_tile(lanes, xp.dtype)
            for l in range(lanes):
                sums[l] = zero
            for c in range(n_in):
                for a in range(tile):
                    acc[a] = zero
                for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                    plane = xp[n, c]
                    for pi in range(p_half):
                        row0, row1, row2, row3 = plane[2 * pi], plane[2 * pi + 1], plane[2 * pi + 2], plane[2 * pi + 3]
                        for pj in range(q_half):
                            g_px, pooled_px, arg_px = dy[n, pi, pj, k0:], pooled[n, pi, pj, k0:], argmax[n, pi, pj, k0:]
                            # sliced first, then fixed offsets: no negative-index checks (docs/numba.md)
                            u0, u1, u2, u3 = row0[2 * pj:], row1[2 * pj:], row2[2 * pj:], row3[2 * pj:]
                            x00, x01, x02, x03 = u0[0], u0[1], u0[2], u0[3]
                            x10, x11, x12, x13 = u1[0], u1[1], u1[2], u1[3]
                            x20, x21, x22, x23 = u2[0], u2[1], u2[2], u2[3]
                            x30, x31, x32, x33 = u3[0], u3[1], u3[2], u3[3]
                            for l in range(lanes):  # the 9-tap body spelled out (the form LLVM vectorises)
                                g, g0, g1, g2, g3 = _window_masks(g_px[l], pooled_px[l], arg_px[l], zero)
                                sums[l] += g if c == 0 else zero
                                acc[l] += g0 * x00 + g1 * x01 + g2 * x10 + g3 * x11
                                acc[lanes + l] += g0 * x01 + g1 * x02 + g2 * x11 + g3 * x12
                                acc[2 * lanes + l] += g0 * x02 + g1 * x03 + g2 * x12 + g3 * x13
                                acc[3 * lanes + l] += g0 * x10 + g1 * x11 + g2 * x20 + g3 * x21
                                acc[4 * lanes + l] += g0 * x11 + g1 * x12 + g2 * x21 + g3 * x22
                                acc[5 * lanes + l] += g0 * x12 + g1 * x13 + g2 * x22 + g3 * x23
                                acc[6 * lanes + l] += g0 * x20 + g1 * x21 + g2 * x30 + g3 * x31
                                acc[7 * lanes + l] += g0 * x21 + g1 * x22 + g2 * x31 + g3 * x32
                                acc[8 * lanes + l] += g0 * x22 + g1 * x23 + g2 * x32 + g3 * x33
                for t in range(9):
                    for l in range(lanes):
                        dwt[h, c * 9 + t, k0 + l] = acc[t * lanes + l]
            for l in range(lanes):
                dbt[h, k0 + l] = sums[l]

    return pooled_weight_grad_3x3


_pooled_weight_grad_3x3 = _make_pooled_weight_grad_3x3(POOLED_GRAD_LANES)


@njit(inline="always")  # inlined in numba IR, so that the lane loop calling it is one loop body to vectorise
def _add_row(acc, first, lane, lanes, vectors, g, x_row):
    """acc[first + v lanes + lane] += g * x_row[v lanes + lane] for each of a row's `vectors` (<= 3) vectors."""
    acc[first + lane] += g * x_row[lane]
    if vectors > 1:
        acc[first + lanes + lane] += g * x_row[lanes + lane]
    if vectors > 2:
        acc[first + 2 * lanes + lane] += g * x_row[2 * lanes + lane]


@njit(inline="always")
def _add_four_rows(acc, first, rows, span, lane, lanes, vectors, g, x_a, x_b, x_c, x_d):
    """`_add_row` for the tile's rows first.. first + 3 (of `span` values each) that are under `rows`."""
    if rows > first:
        _add_row(acc, first * span, lane, lanes, vectors, g, x_a)
    if rows > first + 1:
        _add_row(acc, (first + 1) * span, lane, lanes, vectors, g, x_b)
    if rows > first + 2:
        _add_row(acc, (first + 2) * span, lane, lanes, vectors, g, x_c)
    if rows > first + 3:
        _add_row(acc, (first + 3) * span, lane, lanes, vectors, g, x_d)


@njit(inline="always")
def _row_at(image, at, offsets, i, rows):
    """image[at + offsets[i]:] for a row i < rows of the tile; image[at:] (never read) for the others."""
    return rest_of(image, at + (offsets[i] if i < rows else 0))


def _make_pooled_weight_grad_rows(rows, vectors):
    """`_pooled_weight_grad_rows` with a register tile of `rows` x `vectors` vectors (at most POOLED_ROWS_TILE)."""
    _stack_tile = tile_allocator()
    lanes = POOLED_ROWS_LANES
    span = vectors * lanes
    tile = rows * span

    @parts_kernel
    @_jit(parallel=False)
    def pooled_weight_grad_rows(part, n_parts, xp, row_length, row_offsets, dy, pooled, argmax, zero, partial, dbt):
        """partial[h, k, t, u] = sum over the images n of chunk h (partial.shape[0] contiguous chunks of the batch)
        and the 2x2 windows (pi, pj) of g[n, k, pi, pj] * xp[n, 2 (pi row_length + pj) + (a row_length + b) +
        row_offsets[t // rows, t % rows] + u], u < `span` (vectors x lanes): the weight gradient of a convolution
        whose output gradient went through ReLU + 2x2 max-pooling, g being dy where pooled > 0 or is NaN (the ReLU's
        select) and (a, b) the window's winner (argmax); dy, pooled and argmax indexed (N, K, P2, Q2) (views of
        either layout). xp[n]: image n's padded NCHW planes of row_length columns, flattened, readable `span`
        values on from any window's kernel row; row_offsets[group, i]: where the tile's row i starts in the
        image (c plane + r row_length for kernel row r of channel c; 0 for a row past the last, whose sums the
        caller drops, as it drops the values past S in each row). dbt[h, k]: chunk h's sum of g.

        Each window adds its winner's products only, the other three positions' gradient being zero: a quarter of
        the dense sum's products, and no list to build. Tasks: chunks x K x groups of `rows` rows (row_offsets'
        first axis), each running over its images' windows with its tile in registers. Per element: images in
        order, windows in order; the chunks are fixed by the batch and the caller adds them in order, so the same
        bits for any thread count."""
        n_chunks, n_out = partial.shape[:2]
        n_images = xp.shape[0]
        groups = row_offsets.shape[0]
        p_half, q_half = dy.shape[2], dy.shape[3]
        corners = _stack_tile(4, np.int64)  # a winner's offset from its window's top left value, by argmax
        corners[0], corners[1], corners[2], corners[3] = 0, 1, row_length, row_length + 1
        for task in part_range(part, n_parts, n_chunks * n_out * groups):
            h, k, group = task // (n_out * groups), task // groups % n_out, task % groups
            offsets = row_offsets[group]
            acc = _stack_tile(tile, xp.dtype)
            for u in range(tile):
                acc[u] = zero
            total = zero
            for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                image = xp[n]
                g_plane, pooled_plane, arg_plane = dy[n, k], pooled[n, k], argmax[n, k]
                for pi in range(p_half):
                    for pj in range(q_half):
                        g = _through_relu(g_plane[pi, pj], pooled_plane[pi, pj], zero)
                        total += g
                        at = 2 * (pi * row_length + pj) + corners[arg_plane[pi, pj]]
                        x0, x1, x2 = _row_at(image, at, offsets, 0, rows), _row_at(image, at, offsets, 1, rows), \
                            _row_at(image, at, offsets, 2, rows)
                        x3, x4, x5 = _row_at(image, at, offsets, 3, rows), _row_at(image, at, offsets, 4, rows), \
                            _row_at(image, at, offsets, 5, rows)
                        x6, x7, x8 = _row_at(image, at, offsets, 6, rows), _row_at(image, at, offsets, 7, rows), \
                            _row_at(image, at, offsets, 8, rows)
                        x9, x10, x11 = _row_at(image, at, offsets, 9, rows), _row_at(image, at, offsets, 10, rows), \
                            _row_at(image, at, offsets, 11, rows)
                        # the tile's body spelled out in the lane loop: LLVM vectorises that loop whole (loops over
                        # the rows inside it, it unrolls into scalar code); a row past `rows` is compiled out
                        for lane in range(lanes):
                            _add_four_rows(acc, 0, rows, span, lane, lanes, vectors, g, x0, x1, x2, x3)
                            _add_four_rows(acc, 4, rows, span, lane, lanes, vectors, g, x4, x5, x6, x7)
                            _add_four_rows(acc, 8, rows, span, lane, lanes, vectors, g, x8, x9, x10, x11)
            out = partial[h, k]
            for t in range(rows):
                for u in range(span):
                    out[group * rows + t, u] = acc[t * span + u]
            if group == 0:  # every group sums the same g in the same order
                dbt[h, k] = total

    return pooled_weight_grad_rows


_POOLED_ROWS_KERNELS = {}


def pooled_weight_grad_rows_kernel(rows, vectors):
    """The `_pooled_weight_grad_rows` kernel for a tile of `rows` x `vectors` vectors, made once per tile."""
    if (rows, vectors) not in _POOLED_ROWS_KERNELS:
        _POOLED_ROWS_KERNELS[rows, vectors] = _make_pooled_weight_grad_rows(rows, vectors)
    return _POOLED_ROWS_KERNELS[rows, vectors]


@parts_kernel
@_jit(parallel=False)
def _sum_listed_chunks(part, n_parts, partial, taps, channels, dw):
    """dw[k, c, r, s] = partial[0, k, r, s C + c] + partial[1, k, r, s C + c] + ..., the chunks added in order (as
    numpy's sum over the first axis adds them, so the same bits), from the listed weight gradient's per-chunk rows
    partial[chunks, K, R, >= S C] (each kernel row's S x C values, padded to whole vectors). A part takes whole
    output channels: their rows summed in a vector loop, then spread into dw's order."""
    n_chunks, n_out, rows = partial.shape[0], partial.shape[1], partial.shape[2]
    row_values = taps * channels
    acc = np.empty(row_values, partial.dtype)
    for k in part_range(part, n_parts, n_out):
        out = dw[k]
        for r in range(rows):
            first = partial[0, k, r]
            for j in range(row_values):
                acc[j] = first[j]
            for chunk in range(1, n_chunks):
                row = partial[chunk, k, r]
                for j in range(row_values):
                    acc[j] += row[j]
            for s in range(taps):
                for c in range(channels):
                    out[c, r, s] = acc[s * channels + c]
