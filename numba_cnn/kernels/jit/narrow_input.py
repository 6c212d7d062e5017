"""The jit backend's stride-1 convolution with few input channels and many filters (a first layer on RGB images:
VGG's 3 -> 32): the output channels in the lanes and the output channels-last, which is the layout the next layer
reads (Winograd, a channels-last batch norm or pooling), where the column tiles (columns.py) write NCHW planes that
the next layer copies channels-last, and whose backward copies the channels-last gradient it gets back into NCHW
planes. Host side and kernels in one self-contained file (Numba's cache sees every change to what it compiles;
`_numba_ext`'s `stack_tile` and `copy_block` are inlined).

`_narrow_forward`: threads over images; per output row, tiles of columns x lanes output channels, summed over a
    kernel row's S x C values at a time (u = s * C + c: one loop, contiguous in the padded channels-last input row)
    in (r, s, c) order from the bias, as FMAs: each output is summed exactly as the column and channels-last tiles
    sum it (the same bits); ReLU'd in the tile, each column's lanes stored as one block. The last column tile
    overlaps the one before.
`_narrow_weight_grad`: a task per image chunk; per image, lane block, kernel row and tile of `taps` consecutive
    u = s * C + c, a register tile of taps x lanes summed over the image's pixels: per pixel one vector of the
    gradient (through the ReLU's select on the forward's output when fused) against `taps` broadcast inputs. The
    unpadded gradient is read as it lies, in either layout (no copy into zero-bordered planes); the image's gradient
    stays in L2 for its tiles. Per element: images in order, pixels in order; the chunks fixed by the batch, added in
    order by the caller, so the same bits for any thread count.
"""

import numpy as np

from numba_cnn.kernels._numba_ext import (TILE_BITS, TILE_REGISTERS, copy_block, jit as _jit, part_range, parts_kernel,
                                           rest_of, tile_allocator)
from numba_cnn.kernels.jit.buffers import aligned_copy, nhwc, padded_channels_last, reusable_output, scratch
from numba_cnn.kernels.jit.paths import note
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS

# at most this many input channels (beyond, the channels-last tiles' loads are amortised over enough products)
NARROW_MAX_CHANNELS = 8
# K must be a multiple of NARROW_LANES (fewer filters: the column tiles fill more of their lanes). (lanes,
# columns) of the forward's tile and (lanes, taps) of the weight gradient's, timed at VGG's first layer: AVX-512
# 32 x 8 and 32 x 9 (16 and 18 zmm; 32 x 12 and 32 x 4 forward, 16 x 9 dw slower); AVX2 32 x 3 and 8 x 9 (12
# and 9 ymm; 16 x 6, 16 x 4, 8 x 12 forward and 16 x 6, 16 x 4, 8 x 12 dw slower).
NARROW_LANES = 32
if TILE_BITS >= 512 and TILE_REGISTERS >= 32:
    NARROW_FORWARD_TILE, NARROW_GRAD_TILE = (32, 8), (32, 9)
else:
    NARROW_FORWARD_TILE, NARROW_GRAD_TILE = (32, 3), (8, 9)


NARROW_FORWARD_PATH = (f"few input channels, tile {NARROW_FORWARD_TILE[1]} columns x {NARROW_FORWARD_TILE[0]} lanes, "
                       "output channels-last")
NARROW_GRAD_PATH = (f"few input channels, dw tiles of {NARROW_GRAD_TILE[1]} taps x {NARROW_GRAD_TILE[0]} lanes "
                    "over dy as it lies")


def narrow_input_fits(x_shape, w_shape, stride, padding):
    """Whether a convolution takes this file's kernels (forward and backward alike, so that its output's layout and
    its gradients' bits depend on the shapes only): stride 1, at most NARROW_MAX_CHANNELS input channels, K a
    multiple of NARROW_LANES, kernel rows of at least a gradient tile's taps (S x C), output rows of at least a
    forward tile's columns."""
    _, c, h, wd = x_shape
    k, _, r, s = w_shape
    top, bottom, left, right = padding
    p, q = h + top + bottom - r + 1, wd + left + right - s + 1
    return (stride == 1 and c <= NARROW_MAX_CHANNELS and k % NARROW_LANES == 0 and s * c >= NARROW_GRAD_TILE[1]
            and p >= 1 and q >= NARROW_FORWARD_TILE[1])


def _padded_rows(x, padding):
    """x zero-padded channels-last, each row's W x C values flat: (N, Hp, Wp * C), the layout copy the forward makes
    and the backward reuses."""
    xp = padded_channels_last(x, padding)
    return xp.reshape(xp.shape[0], xp.shape[1], -1)


def narrow_forward(x, w, b, relu, padding):
    """conv2d_forward of a layer `narrow_input_fits` takes -> y[N, K, P, Q], an NCHW view of channels-last y."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    top, bottom, left, right = padding
    p, q = h + top + bottom - r + 1, wd + left + right - s + 1
    note("conv2d_forward", NARROW_FORWARD_PATH, n * k * c * r * s * p * q)
    wt = aligned_copy(w.transpose(2, 3, 1, 0)).reshape(r, s * c, k)
    y = reusable_output((n, p, q, k), x.dtype)
    _narrow_forward(_padded_rows(x, padding), wt, b.astype(x.dtype), x.dtype.type(0 if relu else -np.inf), c, y)
    return y.transpose(0, 3, 1, 2)


def narrow_weight_grad(dy, relu_y, x, w, padding):
    """(dw[K, C, R, S], db[K]) of a layer `narrow_input_fits` takes, from dy[N, K, P, Q] (either layout) or, with
    relu_y (the forward's ReLU'd output), from relu_backward(dy, relu_y), the select made as dy is read. The caller
    notes the path (`NARROW_GRAD_PATH`), with dx if it makes one."""
    n, k, p, q = dy.shape
    _, c, r, s = w.shape
    span = s * c
    chunks = min(GRAD_IMAGE_CHUNKS, n)
    dwt = scratch("narrow.dw", (chunks, r, span, k), dy.dtype)
    dbt = scratch("narrow.db", (chunks, k), dy.dtype)
    select = relu_y is not None

    def pixel_rows(a):  # (N, P, Q * K): a view of channels-last a, else a compiled channels-last copy
        return nhwc(a).reshape(n, p, q * k)

    dy_px = pixel_rows(dy)
    _narrow_weight_grad(_padded_rows(x, padding), dy_px, pixel_rows(relu_y) if select else dy_px, select, c,
                        dy.dtype.type(0), dwt, dbt)
    dw = dwt[0] if chunks == 1 else dwt.sum(axis=0)  # the chunks in order
    db = dbt[0].copy() if chunks == 1 else dbt.sum(axis=0)
    return np.ascontiguousarray(dw.reshape(r, s, c, k).transpose(3, 2, 0, 1)), db


def _make_narrow_forward(lanes, columns):
    tile = lanes * columns
    _stack_tile = tile_allocator()

    @parts_kernel
    @_jit(parallel=False)
    def narrow_forward(part, n_parts, xp, wt, b, floor, channels, y):
        """y[n, i, j, k] (channels last) = relu_floor(b[k] + sum_{r, u} xp[n, i + r, j * C + u] * wt[r, u, k]) with
        u = s * C + c over a kernel row's values, C = channels; xp the zero-padded input channels-last with each
        row flat (N, Hp, Wp * C); wt (R, S * C, K), K a multiple of `lanes`; floor 0 for ReLU (NaN kept) or -inf
        for none. Needs Q >= columns."""
        n_images = xp.shape[0]
        p_out, q_out, n_out = y.shape[1], y.shape[2], y.shape[3]
        r_taps, span = wt.shape[0], wt.shape[1]
        y_flat = y.reshape(-1)
        for n in part_range(part, n_parts, n_images):
            acc = _stack_tile(tile, xp.dtype)
            xs = _stack_tile(columns, xp.dtype)
            for i in range(p_out):
                for jb in range(0, q_out, columns):
                    j0 = min(jb, q_out - columns)  # the last tile overlaps the one before instead of overrunning
                    for k0 in range(0, n_out, lanes):
                        for jj in range(columns):
                            for k in range(lanes):
                                acc[jj * lanes + k] = b[k0 + k]
                        for r in range(r_taps):
                            x_row = xp[n, i + r, j0 * channels:]
                            for u in range(span):
                                w_vec = rest_of(wt[r, u], k0)  # a slice was tested and clamped (docs/numba.md, trap 22)
                                for jj in range(columns):
                                    xs[jj] = x_row[jj * channels + u]
                                for k in range(lanes):
                                    w_k = w_vec[k]
                                    for jj in range(columns):
                                        acc[jj * lanes + k] += xs[jj] * w_k
                        for u in range(tile):
                            v = acc[u]
                            acc[u] = floor if v < floor else v  # ReLU (floor 0) keeps NaN: NaN < 0 is false
                        # each column's lanes stored as one block: a store loop of `lanes` values was unrolled into
                        # scalar stores (docs/numba.md, trap 1)
                        for jj in range(columns):
                            copy_block(y_flat, ((n * p_out + i) * q_out + j0 + jj) * n_out + k0, acc, jj * lanes,
                                       lanes)

    return narrow_forward


def _make_narrow_weight_grad(lanes, taps):
    tile = lanes * taps
    _stack_tile = tile_allocator()

    @parts_kernel
    @_jit(parallel=False)
    def narrow_weight_grad(part, n_parts, xp, dy, relu_y, select, channels, zero, dwt, dbt):
        """dwt[h, r, u, k] = sum over the images n of chunk h (dwt.shape[0] contiguous chunks of the batch) and the
        pixels (i, j) of g[n, i, j, k] * xp[n, i + r, j * C + u], u = s * C + c (C = channels); dbt[h, k] the
        chunk's sum of g (images, then pixels in order). g = dy, or with select the ReLU's select `0 if relu_y <= 0
        else dy` (as layers.relu_backward); dy and relu_y C-contiguous (N, P, Q * K), a pixel's K values together;
        xp as `_narrow_forward` reads it. K a multiple of `lanes`, S * C >= taps (the last tile of a row overlaps
        the one before; its overlapped taps are stored by that one)."""
        n_images = xp.shape[0]
        n_chunks, r_taps, span, n_out = dwt.shape
        p_out, q_out = dy.shape[1], dy.shape[2] // n_out
        for h in part_range(part, n_parts, n_chunks):
            acc = _stack_tile(tile, xp.dtype)
            xs = _stack_tile(taps, xp.dtype)
            total = _stack_tile(lanes, xp.dtype)
            chunk = dwt[h]
            for r in range(r_taps):
                for u in range(span):
                    row = chunk[r, u]
                    for k in range(n_out):
                        row[k] = zero
            sums = dbt[h]
            for k in range(n_out):
                sums[k] = zero
            for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                for k0 in range(0, n_out, lanes):  # every lane block of an image while its gradient is in L2
                    for r in range(r_taps):
                        for u0 in range(0, span, taps):
                            first = min(u0, span - taps)
                            summing = r == 0 and u0 == 0  # the bias gradient's sums, on the first pass
                            for t in range(taps):
                                row = chunk[r, first + t, k0:k0 + lanes]
                                for l in range(lanes):
                                    acc[t * lanes + l] = row[l]
                            sum_row = sums[k0:k0 + lanes]
                            for l in range(lanes):
                                total[l] = sum_row[l]
                            for i in range(p_out):
                                # rest_of, not a slice per pixel: three slices a pixel, each start tested and
                                # clamped, outnumbered its 9 FMAs on a 16-register target (docs/numba.md, trap 25)
                                x_row, dy_row, y_row = xp[n, i + r], dy[n, i], relu_y[n, i]
                                for j in range(q_out):
                                    x_seg = rest_of(x_row, j * channels + first)
                                    dy_px, y_px = rest_of(dy_row, j * n_out + k0), rest_of(y_row, j * n_out + k0)
                                    for t in range(taps):
                                        xs[t] = x_seg[t]
                                    for l in range(lanes):  # one loop over the lanes, the taps inside: it vectorises
                                        # loaded whatever the ReLU says, then selected (a branch would mispredict)
                                        value, y_value = dy_px[l], y_px[l]
                                        g = zero if select and y_value <= zero else value
                                        total[l] += g if summing else zero
                                        for t in range(taps):
                                            acc[t * lanes + l] += g * xs[t]
                            for t in range(u0 - first, taps):
                                row = chunk[r, first + t, k0:k0 + lanes]
                                for l in range(lanes):
                                    row[l] = acc[t * lanes + l]
                            for l in range(lanes):
                                sum_row[l] = total[l]

    return narrow_weight_grad


_narrow_forward = _make_narrow_forward(*NARROW_FORWARD_TILE)
_narrow_weight_grad = _make_narrow_weight_grad(*NARROW_GRAD_TILE)
