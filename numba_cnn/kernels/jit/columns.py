"""The jit backend's convolution kernels for layers with few channels, their vector lanes along the output columns.

The channels-last tiles (tiles.py) put output channels in the lanes: a layer of 6 filters fills 6 of 16 zmm lanes,
and a weight gradient of 16 filters half of its 32. Here the lanes run along a row of the output instead (NCHW, a
row's columns contiguous), so every lane does useful work whatever the channel count, and no channels-last copy is
made. The same tile serves the forward and dx (the full correlation of the zero-bordered dy with the flipped
kernel), and a second one the weight gradient.

`_column_correlation`: prange over images; tiles of 4 output channels x 3 output rows x `lanes` columns (COLUMN_TILE),
    seeded with the bias and summed over (r, s, c) in that order, c innermost, each product an FMA: the order of
    the channels-last tile, so the same bits. Each step loads 3 input segments and broadcasts 4 weights for 12
    FMAs, written out in the body of the loop over the lanes (the only form LLVM vectorised: docs/numba.md). The
    last row block overlaps the one before; the last column block computes past the output's width (the caller
    pads the input) and stores only what exists.
`_column_weight_grad`: dw[k, c, r, s] = sum over (n, i, j) of dy[n, k, i, j] x[n, c, i + r, j + s]: tiles of 4
    output channels x 3 taps of one kernel row x `lanes` columns (COLUMN_GRAD_TILE; dy zero past its width, so the
    extra lanes add nothing), summed per lane over the rows and column blocks of the images of one chunk, then
    across the lanes in lane order. Tasks are (image chunk, tile) pairs fixed by the shapes (GRAD_IMAGE_CHUNKS
    chunks), a chunk's tiles consecutive so its images stay in cache; the caller adds the chunks in order: bitwise
    the same for any thread count.

Self-contained but for tiles.py's constants, like the other kernel files, so Numba's cache sees every change.
"""

import numpy as np
from numba import prange

from numba_cnn.kernels._numba_ext import jit as _jit, tile_allocator
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import layout_copy, reusable_output, round_up, scratch_allocator
from numba_cnn.kernels.jit.paths import note
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS, TILE_BITS

# one vector of float32 lanes along the columns; 4 channels x 3 rows (or 3 taps) is 12 accumulators, which fits the
# 16 ymm of AVX2 with room for the loaded segments and the broadcast weights, and the 32 zmm of AVX-512 easily
COLUMN_LANES = 16 if TILE_BITS >= 512 else 8
# (output channels, output rows) and (output channels, taps of a kernel row): fixed, the kernels spell the tile out
COLUMN_TILE = (4, 3)
COLUMN_GRAD_TILE = (4, 3)


def _make_column_correlation(lanes):
    channels, rows = COLUMN_TILE
    tile = channels * rows * lanes
    _stack_tile = tile_allocator()

    @_jit
    def column_correlation(xp, wt, b, floor, y):
        """y[n,k,i,j] = relu_floor(b[k] + sum_{r,s,c} xp[n,c,i+r,j+s] * wt[k,r,s,c]), y NCHW (N, K, P, Q) with
        P >= 3; xp NCHW, at least P + R - 1 rows and ceil(Q / lanes) * lanes + S - 1 columns (zeros past what the
        sum reads); wt (K padded to 4, R, S, C) and b padded alike; floor 0 for ReLU (NaN kept) or -inf for none.
        The sum runs over wt's C channels (xp may hold more planes)."""
        n_images = xp.shape[0]
        n_out, p_out, q_out = y.shape[1], y.shape[2], y.shape[3]
        k_padded, r_taps, s_taps, n_in = wt.shape
        for n in prange(n_images):
            acc = _stack_tile(tile, xp.dtype)
            for ib in range(0, p_out, rows):
                i0 = min(ib, p_out - rows)  # the last block overlaps the one before instead of overrunning
                for j0 in range(0, q_out, lanes):
                    width = min(lanes, q_out - j0)
                    for k0 in range(0, k_padded, channels):
                        for kk in range(channels):
                            b_k = b[k0 + kk]
                            for a in range(rows * lanes):
                                acc[kk * rows * lanes + a] = b_k
                        for r in range(r_taps):
                            for s in range(s_taps):
                                for c in range(n_in):
                                    w0, w1 = wt[k0, r, s, c], wt[k0 + 1, r, s, c]
                                    w2, w3 = wt[k0 + 2, r, s, c], wt[k0 + 3, r, s, c]
                                    x0 = xp[n, c, i0 + r, j0 + s:]
                                    x1 = xp[n, c, i0 + r + 1, j0 + s:]
                                    x2 = xp[n, c, i0 + r + 2, j0 + s:]
                                    # the tile's 4 x 3 body spelled out in the lane loop: LLVM vectorises that loop
                                    # whole (as loops over channels and rows inside it, it unrolls everything
                                    # into scalar code)
                                    for lane in range(lanes):
                                        a0, a1, a2 = x0[lane], x1[lane], x2[lane]
                                        acc[lane] += a0 * w0
                                        acc[lanes + lane] += a1 * w0
                                        acc[2 * lanes + lane] += a2 * w0
                                        acc[3 * lanes + lane] += a0 * w1
                                        acc[4 * lanes + lane] += a1 * w1
                                        acc[5 * lanes + lane] += a2 * w1
                                        acc[6 * lanes + lane] += a0 * w2
                                        acc[7 * lanes + lane] += a1 * w2
                                        acc[8 * lanes + lane] += a2 * w2
                                        acc[9 * lanes + lane] += a0 * w3
                                        acc[10 * lanes + lane] += a1 * w3
                                        acc[11 * lanes + lane] += a2 * w3
                        for kk in range(min(channels, n_out - k0)):
                            for rr in range(rows):
                                y_seg = y[n, k0 + kk, i0 + rr, j0:]
                                at = (kk * rows + rr) * lanes
                                for lane in range(width):
                                    v = acc[at + lane]
                                    y_seg[lane] = floor if v < floor else v  # ReLU keeps NaN: NaN < 0 is false

    return column_correlation


def _make_column_weight_grad(lanes):
    channels, taps = COLUMN_GRAD_TILE
    tile = channels * taps * lanes
    _stack_tile = tile_allocator()

    @_jit
    def column_weight_grad(xp, dyp, row_off, col_off, p_out, q_out, s_taps, dwt):
        """dwt[h, k, c, r, s] = sum over the images n of chunk h (dwt.shape[0] contiguous chunks), rows i < p_out
        and columns j < Qp (q_out rounded up to `lanes`) of dyp[n, k, row_off + i, col_off + j] * xp[n, c, i + r,
        j + s]; dyp NCHW, K padded to 4 planes, zero in columns col_off + q_out ... col_off + Qp - 1; xp NCHW with
        at least p_out + R - 1 rows and Qp + s_taps - 1 columns; s_taps >= 3 (the tap blocks overlap, never
        overrun)."""
        n_images, n_in = xp.shape[0], xp.shape[1]
        n_chunks, k_padded, r_taps = dwt.shape[0], dwt.shape[1], dwt.shape[3]
        q_padded = (q_out + lanes - 1) // lanes * lanes
        tap_blocks = (s_taps + taps - 1) // taps
        per_block = n_in * r_taps * tap_blocks
        n_tiles = k_padded // channels * per_block
        for task in prange(n_chunks * n_tiles):
            acc = _stack_tile(tile, xp.dtype)
            h, t = task // n_tiles, task % n_tiles
            k0, rest = t // per_block * channels, t % per_block
            c, rest = rest // (r_taps * tap_blocks), rest % (r_taps * tap_blocks)
            r, s_first = rest // tap_blocks, rest % tap_blocks * taps
            s0 = min(s_first, s_taps - taps)  # the last block overlaps the one before, never overruns
            for a in range(tile):
                acc[a] = 0
            for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                for i in range(p_out):
                    x_row = xp[n, c, i + r]
                    for j0 in range(0, q_padded, lanes):
                        x0, x1, x2 = x_row[j0 + s0:], x_row[j0 + s0 + 1:], x_row[j0 + s0 + 2:]
                        at = col_off + j0
                        d0, d1 = dyp[n, k0, row_off + i, at:], dyp[n, k0 + 1, row_off + i, at:]
                        d2, d3 = dyp[n, k0 + 2, row_off + i, at:], dyp[n, k0 + 3, row_off + i, at:]
                        for lane in range(lanes):  # the 4 x 3 body spelled out, as in the correlation above
                            a0, a1, a2 = x0[lane], x1[lane], x2[lane]
                            g = d0[lane]
                            acc[lane] += g * a0
                            acc[lanes + lane] += g * a1
                            acc[2 * lanes + lane] += g * a2
                            g = d1[lane]
                            acc[3 * lanes + lane] += g * a0
                            acc[4 * lanes + lane] += g * a1
                            acc[5 * lanes + lane] += g * a2
                            g = d2[lane]
                            acc[6 * lanes + lane] += g * a0
                            acc[7 * lanes + lane] += g * a1
                            acc[8 * lanes + lane] += g * a2
                            g = d3[lane]
                            acc[9 * lanes + lane] += g * a0
                            acc[10 * lanes + lane] += g * a1
                            acc[11 * lanes + lane] += g * a2
            for kk in range(channels):
                for tt in range(s_first - s0, taps):  # overlapped taps belong to the block before
                    at = (kk * taps + tt) * lanes
                    total = acc[at]
                    for lane in range(1, lanes):
                        total += acc[at + lane]
                    dwt[h, k0 + kk, c, r, s0 + tt] = total

    return column_weight_grad


@_jit
def _pad_planes(src, channels_last, select, relu_y, top, left, dst, sums):
    """dst[n, c] = the plane (n, c) of src placed at (top, left) in zeros, and sums[n, c] its sum (row by row, the
    same code for either layout, so the same bits); src a C-contiguous NCHW array, or NHWC when channels_last (then
    read a pixel's channels at a time; one compiled kernel serves both layouts), dst NCHW with at least as many
    planes (the extra ones all zeros). With select, the values pass through the ReLU's select on relu_y (NCHW) on
    the way, `0 if y <= 0 else value`, as layers.relu_backward computes it (without, relu_y is not read: one
    compiled kernel for both, which shortens a cold start)."""
    n_images = src.shape[0]
    n_ch, h, w = (src.shape[3], src.shape[1], src.shape[2]) if channels_last else (src.shape[1], src.shape[2],
                                                                                    src.shape[3])
    zero = src.dtype.type(0)
    for n in prange(n_images):
        image = dst[n].reshape(-1)  # zeros first, then the planes over them: simpler than zeroing only the border
        for t in range(image.shape[0]):
            image[t] = zero
        if channels_last:
            # Each row's W x C values are transposed into a small buffer first, then each plane row is written
            # whole from there: written straight from the pixels, one value per plane at a time, the C plane rows
            # (H x W apart: 4 KiB at 32 x 32) fall into one set of the L1 cache and evict each other at every step.
            staged = np.empty((n_ch, w), src.dtype)
            for i in range(h):
                pixels = src[n, i]
                for j in range(w):
                    px = pixels[j]
                    for c in range(n_ch):
                        staged[c, j] = px[c]
                for c in range(n_ch):
                    seg, y_row, row = dst[n, c, top + i, left:left + w], relu_y[n, c, i], staged[c]
                    for j in range(w):
                        seg[j] = zero if select and y_row[j] <= zero else row[j]
        else:
            for c in range(n_ch):
                for i in range(h):
                    # indexed by the loop counter alone (an index like left + j keeps numba's wrap-around check)
                    seg, src_row, y_row = dst[n, c, top + i, left:left + w], src[n, c, i], relu_y[n, c, i]
                    for j in range(w):
                        seg[j] = zero if select and y_row[j] <= zero else src_row[j]
        for c in range(n_ch):
            total = zero
            for i in range(h):
                seg = dst[n, c, top + i, left:left + w]
                for j in range(w):
                    total += seg[j]
            sums[n, c] = total


_column_correlation = _make_column_correlation(COLUMN_LANES)
_column_weight_grad = _make_column_weight_grad(COLUMN_LANES)


def _lane_use(count, lanes):
    """The share of a tile's lanes doing useful work when `count` values are spread over vectors of `lanes`."""
    return count / round_up(count, lanes)


def columns_pay(in_channels, out_channels, columns):
    """Whether a stride-1 convolution takes the column tiles: few input channels (the channels-last tiles reduce
    over them innermost, so each step's loads are amortised over few products, and their dx fills few lanes) or
    few filters (their lanes half empty or worse), and rows wide enough to fill at least half of the column lanes.
    The bounds are where the two paths crossed in one measurement of layers of the presets and the networks in
    docs (docs/kernels.md, "Few channels: lanes along the columns")."""
    return (in_channels <= 8 or out_channels <= 16) and _lane_use(columns, COLUMN_LANES) >= 0.5


def column_dx_fits(x_shape, w_shape, padding):
    """Whether `column_backward` can give dx: at least COLUMN_TILE's rows of input, and top and left padding of at
    most the kernel's size less one (dy then starts inside the zero border the full correlation reads)."""
    top, _, left, _ = padding
    return x_shape[2] >= COLUMN_TILE[1] and top < w_shape[2] and left < w_shape[3]


def _padded_planes(a, top, left, planes, rows, columns, buffer_name, relu_y=None):
    """a[N, C, H, W] (either layout; through the ReLU's select on relu_y if given) placed at (top, left) in zeros
    (N, planes, rows, columns), and the per-image channel sums (N, C): a `layout_copy` of a (the forward's padded
    input is the backward's), in scratch buffers with relu_y."""
    n, c = a.shape[:2]
    channels_last = is_channels_last(a)
    src = a.transpose(0, 2, 3, 1) if channels_last else a

    def make(allocate):
        out, sums = allocate((n, planes, rows, columns), a.dtype), allocate((n, c), a.dtype)
        _pad_planes(src, channels_last, relu_y is not None, src if relu_y is None else relu_y, top, left, out, sums)
        return out, sums

    if relu_y is not None:
        return make(scratch_allocator(buffer_name))
    return layout_copy(a, ("planes", top, left, planes, rows, columns, a.dtype.str), make, buffer_name)


def column_forward(x, w, b, relu, padding):
    """conv2d_forward at stride 1 through `_column_correlation` (needs P >= COLUMN_TILE's rows)."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    top, bottom, left, right = padding
    p, q = h + top + bottom - r + 1, wd + left + right - s + 1
    channels = COLUMN_TILE[0]
    note("conv2d_forward", f"column tile {channels} channels x {COLUMN_TILE[1]} rows x {COLUMN_LANES} lanes"
         + ", padded copy" * any(padding), n * k * c * r * s * p * q)
    xp, _ = _padded_planes(x, top, left, c, h + top + bottom, round_up(q, COLUMN_LANES) + s - 1, "x_columns")
    wt = np.zeros((round_up(k, channels), r, s, c), x.dtype)
    wt[:k] = w.transpose(0, 2, 3, 1)
    bp = np.zeros(wt.shape[0], x.dtype)
    bp[:k] = b
    y = reusable_output((n, k, p, q), x.dtype)
    _column_correlation(xp, wt, bp, x.dtype.type(0 if relu else -np.inf), y)
    return y


def column_backward(dy, x, w, need_dx, padding, relu_y=None):
    """conv2d_backward at stride 1 through `_column_weight_grad` and, for dx, `_column_correlation` over dy in a
    zero border (the full correlation with the flipped kernel, cropped by the padding); x and w finite (lanes past
    the output's width multiply zeros of dy by real inputs, and dx multiplies dy's zero border by the weights: the
    contract's sum has neither product), and `column_dx_fits`. With relu_y, of relu_backward(dy, relu_y): the
    select applied as dy is copied into its border."""
    n, k, p, q = dy.shape
    _, c, r, s = w.shape
    h, wd = x.shape[2:]
    top, bottom, left, right = padding
    channels, taps = COLUMN_GRAD_TILE
    lanes = COLUMN_LANES
    dw_macs = n * k * c * r * s * p * q
    note("conv2d_backward", f"column dw tiles of {channels} channels x {taps} taps x {lanes} lanes"
         + ", dx the column tile" * need_dx, dw_macs + (n * c * h * wd * k * r * s if need_dx else 0))
    q_padded = round_up(q, lanes)
    # dy in zeros: for dx bordered as the full correlation reads it (R-1-top rows above, S-1-left columns left)
    row_off, col_off = (r - 1 - top, s - 1 - left) if need_dx else (0, 0)
    dy_rows = max(h + r - 1, row_off + p) if need_dx else p
    dy_columns = max(col_off + q_padded, round_up(wd, lanes) + s - 1 if need_dx else 0)
    dyp, dy_sums = _padded_planes(dy, row_off, col_off, round_up(k, channels), dy_rows, dy_columns, "dy_columns",
                                  relu_y)
    db = dy_sums.sum(axis=0)
    s_tiled = max(s, taps)
    xp, _ = _padded_planes(x, top, left, c, h + top + bottom, q_padded + s_tiled - 1, "x_columns")
    chunks = min(GRAD_IMAGE_CHUNKS, n)
    dwt = np.empty((chunks, dyp.shape[1], c, r, s_tiled), x.dtype)
    _column_weight_grad(xp, dyp, row_off, col_off, p, q, s_tiled, dwt)
    dw = np.ascontiguousarray((dwt[0] if chunks == 1 else np.sum(dwt, axis=0))[:k, :, :, :s])  # chunks in order
    if not need_dx:
        return None, dw, db
    wf = np.zeros((round_up(c, COLUMN_TILE[0]), r, s, k), x.dtype)
    wf[:c] = w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)
    dx = reusable_output(x.shape, x.dtype)
    _column_correlation(dyp, wf, np.zeros(wf.shape[0], x.dtype), x.dtype.type(-np.inf), dx)
    return dx, dw, db
