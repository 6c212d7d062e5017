"""The jit backend's register-tiled kernels (stride-1 correlation, the fused conv + pool, Winograd's F(2x2, 3x3),
F(4x4, 3x3) and F(2x2, 5x5)), the 2x2 max-pooling kernels (NCHW and channels-last), and the tile shapes of every
convolution kernel of the backend (general.py's too, the stride-1 weight gradient's among them), chosen from the
target's vector registers. Self-contained: Numba's cache does not notice a change in another module's helper, and
the kernels here inline `_pool_window` and `_tile_taps` from this file (and `_numba_ext`'s `stack_tile`,
`copy_block` and `cache_aligned`); the Winograd kernel also inlines winograd_stages.py's stages and closes over that
file's source stamp, which puts it in the cache key. How each kernel computes its op is in the package's docstring
(jit/__init__.py); the host-side glue that calls them is there too (Winograd's in winograd.py, pooling's in
pooling.py).
"""

import numpy as np
from numba import njit, prange

from numba_cnn.kernels._numba_ext import (TILE_BITS, TILE_REGISTERS, cache_aligned, copy_block, jit as _jit, part_range,
                                          parts_kernel, run_parts, tile_allocator)
from numba_cnn.kernels.jit.winograd_stages import (STAGES_STAMP, _forward_products, _output4, _output6, _output6x4,
                                                   _output8x4, _tile_input4, _tile_input6, _tile_input8)

# Tile shapes, (lanes, columns) of the correlation tiles and lanes of the weight-gradient tiles, by the target's
# vector registers. The one place they are chosen; docs/kernels.md tabulates them.
if TILE_BITS >= 512 and TILE_REGISTERS >= 32:
    # 32 zmm: 7 x 32 and 4 x 64 fp32 lanes are 14 and 16 accumulators. 4 x 64 fits the 512-bit register file;
    # the same tile in 256-bit registers spills, and 6 x 64 gains nothing over it.
    CONV_TILE_NARROW, CONV_TILE_WIDE = (32, 7), (64, 4)
    CONV_POOL_TILE = CONV_TILE_WIDE  # the fused op's tile; 5 x 64 (20 zmm) not yet tried on an AVX-512 core
    # and for K <= 32 output channels the narrow tile's, which a 64-lane tile would pad with as many zero lanes
    CONV_POOL_TILE_NARROW = CONV_TILE_NARROW
    GRAD_LANES_NARROW, GRAD_LANES_WIDE = 32, 64
    # K <= 16 (LeNet's 6 and 16 filters, a dx into few input channels): one zmm of lanes, where 32 would compute
    # half or more of every tile on zero weights; 12 columns keep 12 accumulators. (The weight gradient keeps 32
    # lanes: 3 taps x 16 lanes is 3 accumulators, too few to hide the FMA latency, and measured slower.)
    CONV_TILE_SMALL = (16, 12)
else:
    # 16 ymm (AVX2): 3 x 32 is 12 accumulators, leaving registers for the loaded input and broadcast weights;
    # the AVX-512 4 x 64 (32 ymm) and, for conv2's dx, 7 x 32 (28 ymm) spill beyond the 16 registers, and 6 x 16
    # (also 12 ymm) is slower. The weight gradient's 3 taps x 32 lanes is 12 ymm too (64 lanes spills, 16 is slower).
    # One correlation kernel for both: the unfused K = 64 forward (not in a training step, which runs the fused op)
    # gives up a little against 4 x 16, and a kernel fewer to compile shortens a cold start.
    CONV_TILE_NARROW = CONV_TILE_WIDE = (32, 3)
    # the fused conv + pool computes only the pooled columns (conv2: 10, two exact tiles of 5, where 4 computes
    # 12 and throws 2 away): 5 x 16 (10 ymm) does no wasted columns and still fits the register file
    CONV_POOL_TILE = CONV_POOL_TILE_NARROW = (16, 5)
    GRAD_LANES_NARROW, GRAD_LANES_WIDE = 32, 32
    # K <= 16: two ymm of lanes x 6 columns, the same 12 accumulators as the 32-lane tiles
    CONV_TILE_SMALL = (16, 6)
CONV1_TILE = (32, 3) if TILE_BITS < 512 else (32, 6)  # (columns, channels): 12 ymm / 12 zmm
# one input channel, 3x3: output channels per vector step of `_make_one_channel_pool` (4 outputs x 2 registers)
ONE_CHANNEL_LANES = 32 if TILE_BITS >= 512 and TILE_REGISTERS >= 32 else 16
TILE_TAPS = 3  # kernel taps per weight-gradient tile (a 3x3 kernel splits into 3 exact blocks)
# weight-gradient tiles fewer than this are split over GRAD_IMAGE_CHUNKS fixed image chunks instead (conv1 has 3
# tiles for 2 threads: 2:1 imbalance); a constant, not the thread count, so the sums do not depend on threads
GRAD_MIN_TILES, GRAD_IMAGE_CHUNKS = 16, 8
# The general convolution (any stride, jit/general.py): correct first, not tuned. One tile shape per kernel, so
# one compile each. Forward and dx: the narrow correlation tile (columns x lanes of output / input channels), its
# register budget already chosen above. dw: STRIDED_GRAD_TILE = (input channels, output-channel lanes) per tap,
# 16 zmm / 12 ymm accumulators, each step loading one dy vector row and broadcasting the channels.
STRIDED_TILE = CONV_TILE_NARROW
STRIDED_GRAD_TILE = (8, 32) if TILE_BITS >= 512 and TILE_REGISTERS >= 32 else (6, 16)
# Winograd (`_make_winograd`, 3x3 and 5x5): (tile rows, lanes) of the small matrix products' register tile, wide
# for K > the narrow lanes, and the channels transformed per step (C must be a multiple): 16 on every target, two
# ymm on AVX2, because LLVM fully unrolls a transform loop of 8 channels before its loop vectoriser runs and the
# unrolled code stays scalar (docs/kernels.md, "The transforms' vectors").
# 4 rows x 64 lanes is 16 zmm; 6 or 8 rows (24 and 16 zmm) compiled into slower code, not tuned further.
WINOGRAD_CHUNK = 16
if TILE_BITS >= 512 and TILE_REGISTERS >= 32:
    WINOGRAD_TILE_WIDE, WINOGRAD_TILE_NARROW = (4, 64), (4, 32)
else:
    WINOGRAD_TILE_WIDE, WINOGRAD_TILE_NARROW = (3, 32), (4, 16)
WINOGRAD_BAND = 32  # tiles whose transforms are held at once (rounded to whole rows of tiles): 36 x 32 x C values


@njit(inline="always")  # inlined into the calling kernel (and its fastmath), in numba IR
def _pool_window(v0, v1, v2, v3):
    """(max, offset) of a 2x2 window given in row-major order: ties keep the first maximum, a NaN beats every
    number and the first NaN wins. Selects only (no branches), so the loops calling it vectorise: the strict-`>`
    chain, then a fix-up for a NaN after a number (costs little over the NaN-blind chain; a NaN test folded into
    each step is far slower, because LLVM no longer vectorises it)."""
    best, where = v0, 0
    where = 1 if v1 > best else where
    best = v1 if v1 > best else best
    where = 2 if v2 > best else where
    best = v2 if v2 > best else best
    where = 3 if v3 > best else where
    best = v3 if v3 > best else best
    # a NaN first has already won (nothing compares greater); a NaN after a number replaces it
    n1, n2, n3 = v1 != v1, v2 != v2, v3 != v3
    fix = (n1 | n2 | n3) & (v0 == v0)
    where = (1 if n1 else (2 if n2 else 3)) if fix else where
    best = (v1 if n1 else (v2 if n2 else v3)) if fix else best
    return best, where


@njit(inline="always")  # inlined into the calling kernel in numba IR, where lanes and columns are constants
def _tile_taps(acc, xs, x_slab, wt, r, k0, lanes, columns):
    """The reduction both correlation kernels run for one kernel row r: acc[jj * lanes + k] += x_slab[jj + s, c] *
    wt[r, s, c, k0 + k] over the row's taps s and the channels c, c innermost (the longest loop, and contiguous in
    x_slab and wt); `acc` stays the calling kernel's register tile."""
    for s in range(wt.shape[1]):
        for c in range(x_slab.shape[1]):
            w_vec = wt[r, s, c, k0:k0 + lanes]  # a slice: w_vec[k] provably contiguous
            for jj in range(columns):
                xs[jj] = x_slab[jj + s, c]
            for k in range(lanes):
                w_k = w_vec[k]
                for jj in range(columns):
                    acc[jj * lanes + k] += xs[jj] * w_k


def _make_conv_tile(columns, lanes):
    """Correlation kernel with tiles of `columns` output columns x `lanes` output channels."""
    tile = columns * lanes
    _stack_tile = tile_allocator()

    @_jit
    def conv_tile(x_cl, wt, b, floor, row_shift, col_shift, y):
        """y[n,k,i,j] = relu_floor(b[k] + sum_{r,s,c} x_cl[n,i+r-row_shift,j+col_shift+s,c] * wt[r,s,c,k]) from a
        channels-last input, rows outside 0..H-1 counting as zeros (skipped, never read; row_shift may be any
        int), columns read from col_shift >= 0 on (x_cl at least Q + S - 1 + col_shift wide); wt and b padded to a
        multiple of `lanes` channels, floor 0 for ReLU (NaN kept) or -inf for none. Needs Q >= columns."""
        n_images, h_in = x_cl.shape[0], x_cl.shape[1]
        n_out, p_out, q_out = y.shape[1], y.shape[2], y.shape[3]
        r_taps, k_padded = wt.shape[0], wt.shape[3]
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
                            _tile_taps(acc, xs, x_cl[n, i + r - row_shift, j0 + col_shift:], wt, r, k0, lanes,
                                       columns)
                        for k in range(min(lanes, n_out - k0)):
                            y_seg = y[n, k0 + k, i, j0:]  # the tile's columns are contiguous in y
                            for jj in range(columns):
                                v = acc[jj * lanes + k]
                                y_seg[jj] = floor if v < floor else v  # ReLU (floor 0) keeps NaN: NaN < 0 is false

    return conv_tile


def _make_conv_pool(columns, lanes):
    """Fused correlation + ReLU + 2x2 max-pooling kernel with the tiles of `_make_conv_tile(columns, lanes)`."""
    tile = columns * lanes
    _stack_tile = tile_allocator()

    @_jit
    def conv_pool(x_cl, wt, b, zero, q_tiles, y, argmax):
        """y[n,k,i,j], argmax[n,k,i,j] = the 2x2 max-pooling (window (2i.., 2j..), first maximum, first NaN wins)
        of relu(b[k] + sum_{r,s,c} x_cl[n,i'+r,j'+s,c] * wt[r,s,c,k]); each pair of conv rows is computed over
        q_tiles >= max(2 * Q2, columns) columns (x_cl at least q_tiles + S - 1 wide) into a per-image buffer."""
        n_images = x_cl.shape[0]
        n_out, p_half, q_half = y.shape[1], y.shape[2], y.shape[3]
        r_taps, k_padded = wt.shape[0], wt.shape[3]
        for n in prange(n_images):
            acc = _stack_tile(tile, x_cl.dtype)
            xs = _stack_tile(columns, x_cl.dtype)
            rows = cache_aligned(np.empty(2 * q_tiles * k_padded + 16, x_cl.dtype),  # two ReLU'd conv rows,
                                 2 * q_tiles * k_padded).reshape(2, q_tiles, k_padded)  # channels last
            for pi in range(p_half):
                for half in range(2):
                    i = 2 * pi + half
                    for jb in range(0, q_tiles, columns):
                        j0 = min(jb, q_tiles - columns)
                        for k0 in range(0, k_padded, lanes):
                            for jj in range(columns):
                                for k in range(lanes):
                                    acc[jj * lanes + k] = b[k0 + k]
                            for r in range(r_taps):
                                _tile_taps(acc, xs, x_cl[n, i + r, j0:], wt, r, k0, lanes, columns)
                            for jj in range(columns):
                                out = rows[half, j0 + jj, k0:k0 + lanes]
                                for k in range(lanes):
                                    v = acc[jj * lanes + k]
                                    out[k] = zero if v < zero else v  # ReLU; NaN stays
                for pj in range(q_half):
                    a0, a1 = rows[0, 2 * pj], rows[0, 2 * pj + 1]
                    a2, a3 = rows[1, 2 * pj], rows[1, 2 * pj + 1]
                    for k in range(n_out):
                        best, where = _pool_window(a0[k], a1[k], a2[k], a3[k])
                        y[n, k, pi, pj] = best
                        argmax[n, k, pi, pj] = where

    return conv_pool


def _make_winograd(size, out, rows, lanes, chunk):
    """Winograd convolution kernel F(out x out, size x size): F(2x2, 3x3) on 4x4 windows, F(4x4, 3x3) and
    F(2x2, 5x5) on 6x6 ones, transformed by the same B^T, F(4x4, 5x5) on 8x8 ones; matrix-product tiles of
    `rows` tiles x `lanes` output channels, input channels transformed `chunk` at a time. The stages are
    winograd_stages.py's."""
    window = out + size - 1
    elements = window * window
    tile = rows * lanes
    staged = elements * chunk
    outputs = out * out * lanes
    sums_size = window * out * lanes
    pooled = out // 2  # pooled rows and columns per tile
    _stack_tile = tile_allocator()
    stages = STAGES_STAMP

    @_jit(parallel=False)
    def winograd_task(group, n_groups, x_cl, top, left, u, b, floor, tile_rows, tile_cols, pool, y, argmax, finite):
        """winograd's work for the images group, group + n_groups, ...: one of its parts, compiled on its own and run
        by run_parts (docs/numba.md, "What a kernel costs to compile")."""
        _ = stages  # the inlined stages' source stamp, in Numba's cache key
        n_images, c = x_cl.shape[0], x_cl.shape[3]
        k_padded = u.shape[2]
        p_out, q_out, n_out = y.shape[1], y.shape[2], y.shape[3]
        band_rows = max(1, WINOGRAD_BAND // tile_cols)
        band_padded = (min(band_rows, tile_rows) * tile_cols + rows - 1) // rows * rows
        zero = x_cl.dtype.type(0)
        acc = _stack_tile(tile, x_cl.dtype)
        xs = _stack_tile(rows, x_cl.dtype)
        d = _stack_tile(staged, x_cl.dtype)
        tt = _stack_tile(staged, x_cl.dtype)
        vv = _stack_tile(staged, x_cl.dtype)
        ss = _stack_tile(sums_size, x_cl.dtype)
        outs = _stack_tile(outputs, x_cl.dtype)
        # the padding's zeros, in a stack tile: with an np.zeros array here the kernel loaded from numba's disk
        # cache gave other bits than the one compiled in the process (the tile-switch test in test_jit caught it)
        zeros = _stack_tile(chunk, x_cl.dtype)
        for l in range(chunk):
            zeros[l] = zero
        # per element e, a band's V[e] (tiles x C) and M[e] (tiles x lanes); each row 16 values past a
        # multiple of the band's size, which for 32 tiles x 32 channels is 4 KiB: the rows a tile's transform
        # writes would otherwise fall into one set of the L1 cache
        v_row, m_row = band_padded * c + 16, band_padded * lanes + 16
        v = cache_aligned(np.zeros(elements * v_row + 16, x_cl.dtype), elements * v_row).reshape(elements, v_row)
        m = cache_aligned(np.empty(elements * m_row + 16, x_cl.dtype), elements * m_row).reshape(elements, m_row)
        for n in range(group, n_images, n_groups):
            check = zero
            for tr0 in range(0, tile_rows, band_rows):
                n_band = (min(tr0 + band_rows, tile_rows) - tr0) * tile_cols
                for t in range(n_band):
                    tr, tc = tr0 + t // tile_cols, t % tile_cols
                    row0, col0 = out * tr - top, out * tc - left
                    if window == 4:
                        _tile_input4(v, t * c, d, tt, vv, x_cl, n, row0, col0, chunk, zeros, window)
                    elif window == 6:
                        _tile_input6(v, t * c, d, tt, vv, x_cl, n, row0, col0, chunk, zeros, window)
                    else:
                        _tile_input8(v, t * c, d, tt, vv, x_cl, n, row0, col0, chunk, zeros, window)
                for k0 in range(0, k_padded, lanes):
                    _forward_products(v, u, m, acc, xs, n_band, c, k0, zero, elements, rows, lanes)
                    b_vec = b[k0:k0 + lanes]
                    n_lanes = min(lanes, n_out - k0)
                    for t in range(n_band):
                        tr, tc = tr0 + t // tile_cols, t % tile_cols
                        if window == 4:
                            check += _output4(m, t * lanes, b_vec, floor, zero, outs, lanes)
                        elif window == 8:
                            check += _output8x4(m, t * lanes, b_vec, floor, zero, ss, outs, lanes)
                        elif size == 3:
                            check += _output6x4(m, t * lanes, b_vec, floor, zero, ss, outs, lanes)
                        else:
                            check += _output6(m, t * lanes, b_vec, floor, zero, ss, outs, lanes)
                        # the 5x5 kernels never pool (winograd_fits): `size` prunes the branch from their IR
                        if size == 3 and pool:  # the tile's 2x2 windows: (a, b) holds outputs (2a + di, 2b + dj)
                            for q in range(pooled * pooled):
                                i, j = pooled * tr + q // pooled, pooled * tc + q % pooled
                                if i < p_out and j < q_out:
                                    at = np.uint64(2 * (out * (q // pooled) + q % pooled) * lanes)  # trap 19
                                    y_px, arg_px = y[n, i, j, k0:], argmax[n, i, j, k0:]
                                    for l in range(n_lanes):
                                        a = at + np.uint64(l)
                                        y_px[l], arg_px[l] = _pool_window(outs[a], outs[a + np.uint64(lanes)],
                                                                          outs[a + np.uint64(out * lanes)],
                                                                          outs[a + np.uint64((out + 1) * lanes)])
                            continue
                        for q in range(out * out):
                            i, j = out * tr + q // out, out * tc + q % out
                            if i < p_out and j < q_out:
                                if n_lanes == lanes:
                                    copy_block(y[n, i, j], k0, outs, q * lanes, lanes)
                                else:
                                    y_px = y[n, i, j, k0:]
                                    for l in range(n_lanes):
                                        y_px[l] = outs[q * lanes + l]
            finite[n] = check == check

    def winograd(x_cl, top, left, u, b, floor, tile_rows, tile_cols, pool, n_groups, y, argmax, finite):
        """The size x size stride-1 correlation of channels-last x_cl[N, H, W, C] (C a multiple of `chunk`)
        zero-padded by `top` rows and `left` columns, and below and right by as many as the tiles read (out tile_rows
        + size - 1 rows and out tile_cols + size - 1 columns in all), the zeros read from a vector of zeros instead
        of a padded copy, with the transformed weights u[elements, C, K padded to `lanes`] (u[window a + b] =
        (G w G^T)[a, b]), plus b, ReLU'd against floor (0; -inf for none; NaN kept), by output tiles of out x out:
        per tile, V = B^T d B of its window (additions), M[e] = V[e] @ u[e] for each element e (the multiplies per
        tile and channel pair: 16 for F(2x2, 3x3) against 36 directly, 36 for F(4x4, 3x3) against 144, 36 for
        F(2x2, 5x5) against 100), then Y = A^T M A. pool (3x3 only): y[N, P // 2, Q // 2, K] and argmax (channels
        last) are the 2x2 max-pooling of the tile's (out / 2)^2 windows (first maximum, first NaN wins); else
        y[N, P, Q, K] (channels last), the tiles' outputs inside P x Q. finite[n]: whether every output of image
        n's tiles came out finite (an inf or NaN input makes one of them inf or NaN, as does an overflow): where
        not, the caller recomputes directly, since the transforms' sums turn a lone inf into NaN where the direct
        sum keeps it inf. Images are dealt to n_groups tasks; each image's outputs are computed alike whatever the
        grouping."""
        n_groups = min(n_groups, x_cl.shape[0])
        run_parts(winograd_task, n_groups, n_groups, x_cl, top, left, u, b, floor, tile_rows, tile_cols, pool, y,
                  argmax, finite)

    winograd.task = winograd_task  # the jit function that compiles (cold_compile.kernels claims it)
    return winograd


@parts_kernel
@_jit(parallel=False)
def _winograd_sandwich(part, n_parts, x, g, from_weights, out):
    """(g x_ck g^T)[a, b] for each input channel c and lane k that x and out both have, g (n x m), x_ck (m x m), in
    float64, rounded once: Winograd's filter transform G w G^T (from_weights: x = w[K, C, R, S] in float64, g = G,
    into out[a n + b, c, k], lanes past K left as they are; winograd.py) and its weight gradient's G^T M G (x =
    M[m, m, C, K padded], g = G^T, into out[k, c, a n + b] = dw[k, c, a, b]; winograd_grad.py): one specialisation
    for both. A task per input channel, its filters gathered along the vectors (a task per filter was scalar code)."""
    size, window, n_in = x.shape[2 if from_weights else 0], g.shape[0], x.shape[1 if from_weights else 2]
    n_out = min(x.shape[0], out.shape[2]) if from_weights else min(x.shape[3], out.shape[0])
    xc, gx, total = np.empty((size, size, n_out)), np.empty((window, size, n_out)), np.empty(n_out)
    for c in part_range(part, n_parts, n_in):
        for r in range(size):
            for s in range(size):
                row = xc[r, s]
                for k in range(n_out):
                    row[k] = x[k, c, r, s] if from_weights else x[r, s, c, k]
        gx[:] = 0.0  # g x_ck, then (g x_ck) g^T a row of the window at a time
        for a in range(window):
            for r in range(size):
                g_ar = g[a, r]
                for s in range(size):
                    for k in range(n_out):
                        gx[a, s, k] += g_ar * xc[r, s, k]
        for a in range(window):
            for b in range(window):
                total[:] = 0.0
                for s in range(size):
                    g_bs = g[b, s]
                    for k in range(n_out):
                        total[k] += gx[a, s, k] * g_bs
                for k in range(n_out):
                    if from_weights:
                        out[a * window + b, c, k] = total[k]
                    else:
                        out[k, c, a * window + b] = total[k]


def _make_conv1_pool(columns, channels):
    """Fused correlation + ReLU + 2x2 max-pooling for ONE input channel (conv1) whose conv rows fit one tile: 9 taps
    per output are too few to amortise a channels-last tile's transposing store, so this tile runs along the output
    columns instead (a whole conv row of `columns` columns x `channels` output channels). The loops outside the
    tile run with trip counts LLVM cannot fold (the ReLU over the whole tile, pooling along a channel's row), so
    they stay vectorised loops instead of being unrolled into scalar code: ReLU'd rows into a (2, tile) buffer,
    pooled from there (faster than a per-channel-row ReLU). y and argmax are written channels-last, the layout the
    next convolution reads, a pooled row at a time once all its channel blocks are pooled: faster than both the
    NCHW store per channel block and a channels-last store per block (short strided writes).

    A channel's row in the tile holds its even output columns, then its odd ones (acc[kk, p, jj] is column 2 jj + p
    of channel kk), so pooling reads a window's two columns from the two halves at the same offset instead of
    deinterleaving adjacent ones. The loads stay contiguous: per image, each input row is copied once per tap s in
    the tile's column order (x_taps[i * S + s, p * half + jj] = x[i, 2 jj + p + s], zero past the width, so the
    input needs no padded copy), and the tile loop still runs over all `columns` at once (two loops of `half`
    compile to scalar code). The bias seeds the tile from a copy laid out as the tile (b_tiles): broadcasting b[k]
    in the kernel compiled to a scalar store per accumulator, as many instructions as the tile's FMAs."""
    tile = columns * channels
    half = columns // 2
    _stack_tile = tile_allocator()

    @_jit
    def conv1_pool(x, wt, b_tiles, zero, y, argmax):
        """y[n, i, j, k], argmax[n, i, j, k] (channels last) = pool(relu(b[k] + sum_{r,s} x[n, i'+r, j'+s] *
        wt[k, r, s])); x (N, H, W), 2 * Q2 <= `columns` (columns past W read as zeros); wt (K, R, S) padded to a
        multiple of `channels`; b_tiles[k // channels] the bias as the tile holds it (b[k] at [k % channels *
        columns + j])."""
        n_images, h_in, width = x.shape
        p_half, q_half, n_out = y.shape[1], y.shape[2], y.shape[3]
        k_padded, r_taps, s_taps = wt.shape
        n_taps = r_taps * s_taps
        w_taps = wt.reshape(k_padded, n_taps)  # tap t = r * S + s
        n_stored = min(tile, k_padded * columns)  # = tile, unknown to LLVM: the loops below stay loops
        n_windows = n_stored // (2 * channels)  # = half, as unknown
        for n in prange(n_images):
            acc = _stack_tile(tile, x.dtype)
            ws = _stack_tile(channels, x.dtype)
            rows = np.empty((2, tile), x.dtype)
            pooled = np.empty(k_padded * half, x.dtype)  # a pooled row, channel by channel
            won = np.empty(k_padded * half, np.uint8)
            x_taps = np.empty((h_in * s_taps, columns), x.dtype)
            for i in range(h_in):
                for s in range(s_taps):
                    x_row, taps_row = x[n, i], x_taps[i * s_taps + s]
                    for jj in range(half):  # columns past the input's width are zeros (never pooled)
                        even, odd = 2 * jj + s, 2 * jj + 1 + s
                        taps_row[jj] = x_row[even] if even < width else zero
                        taps_row[half + jj] = x_row[odd] if odd < width else zero
            for pi in range(p_half):
                for k0 in range(0, k_padded, channels):
                    for h in range(2):
                        b_tile = b_tiles[k0 // channels]
                        for t in range(tile):
                            acc[t] = b_tile[t]
                        # tap t = (r, s) reads x_taps row (2 pi + h + r) * S + s = (2 pi + h) * S + t
                        taps_here = x_taps[(2 * pi + h) * s_taps:]
                        for t in range(n_taps):
                            x_seg = taps_here[t]
                            for kk in range(channels):
                                ws[kk] = w_taps[k0 + kk, t]
                            # LLVM unrolls the short channel loop and vectorises the column loop (the shape of the
                            # channels-last tile's inner loops, with the roles swapped)
                            for jj in range(columns):
                                x_j = x_seg[jj]
                                for kk in range(channels):
                                    acc[kk * columns + jj] += x_j * ws[kk]
                        row = rows[h]
                        for t in range(n_stored):
                            v = acc[t]
                            row[t] = zero if v < zero else v  # ReLU; NaN < 0 is false: NaN stays
                    top, bottom = rows[0], rows[1]
                    for kk in range(channels):
                        at = kk * columns  # channel kk's even columns, then its odd ones at + half
                        pooled_k, won_k = pooled[(k0 + kk) * half:], won[(k0 + kk) * half:]
                        for pj in range(n_windows):
                            best, where = _pool_window(top[at + pj], top[at + half + pj], bottom[at + pj],
                                                       bottom[at + half + pj])
                            pooled_k[pj] = best
                            won_k[pj] = where
                for pj in range(q_half):  # the row into y channels-last, once all its channels are pooled
                    y_px, arg_px = y[n, pi, pj], argmax[n, pi, pj]
                    for k in range(n_out):
                        y_px[k] = pooled[k * half + pj]
                        arg_px[k] = won[k * half + pj]

    return conv1_pool


@njit(inline="always")  # inlined into the calling kernel in numba IR, where `at` is a constant
def _taps3x3(xs, at, taps, lanes, lane):
    """taps[9 * lanes + lane] (the bias) + the 3 x 3 products of a 4 x 4 patch xs (row-major) from offset `at` with
    the taps' weights taps[t * lanes + lane], in (r, s) order: as the correlation tiles sum them, so the same bits."""
    return (taps[9 * lanes + lane] + xs[at] * taps[lane] + xs[at + 1] * taps[lanes + lane]
            + xs[at + 2] * taps[2 * lanes + lane] + xs[at + 4] * taps[3 * lanes + lane]
            + xs[at + 5] * taps[4 * lanes + lane] + xs[at + 6] * taps[5 * lanes + lane]
            + xs[at + 8] * taps[6 * lanes + lane] + xs[at + 9] * taps[7 * lanes + lane]
            + xs[at + 10] * taps[8 * lanes + lane])


def _make_one_channel_pool(lanes):
    """Fused 3x3 correlation + ReLU + 2x2 max-pooling for one input channel with the output channels in the lanes:
    a pooling window's four conv outputs need the 16 inputs of its 4 x 4 patch, each a broadcast, and 36 FMAs on
    each vector of channels, its pooled values and argmax stored channels-last, a vector at a time."""
    _stack_tile, tap_values = tile_allocator(), 10 * lanes  # a vector step's 9 taps' weights and its bias

    @parts_kernel
    @_jit(parallel=False)
    def one_channel_pool(part, n_parts, x, wt, zero, y, argmax):
        """y[n, i, j, k], argmax[n, i, j, k] (channels last, K a multiple of `lanes`) = pool(relu(wt[9, k] + sum
        over r, s of x[n, 2i + a + r, 2j + b + s] * wt[3r + s, k])) over the window's positions (a, b); x (N, H, W)
        holding the padding. Its lane loop touches stack tiles only: on arrays, LLVM tested overlaps every window."""
        n_images = x.shape[0]
        p_half, q_half, n_out = y.shape[1], y.shape[2], y.shape[3]
        for n in part_range(part, n_parts, n_images):
            xs = _stack_tile(16, x.dtype)
            taps = _stack_tile(tap_values, x.dtype)
            best_tile, where_tile = _stack_tile(lanes, y.dtype), _stack_tile(lanes, argmax.dtype)
            image = x[n]
            for k0 in range(0, n_out, lanes):
                for t in range(10):
                    copy_block(taps, t * lanes, wt[t], k0, lanes)
                for pi in range(p_half):
                    rows = image[2 * pi:]
                    for pj in range(q_half):
                        for a in range(4):
                            row = rows[a, 2 * pj:]
                            for c in range(4):
                                xs[4 * a + c] = row[c]
                        for l in range(lanes):
                            v0 = _taps3x3(xs, 0, taps, lanes, l)
                            v1 = _taps3x3(xs, 1, taps, lanes, l)
                            v2 = _taps3x3(xs, 4, taps, lanes, l)
                            v3 = _taps3x3(xs, 5, taps, lanes, l)
                            v0 = zero if v0 < zero else v0  # ReLU; NaN < 0 is false: NaN stays
                            v1 = zero if v1 < zero else v1
                            v2 = zero if v2 < zero else v2
                            v3 = zero if v3 < zero else v3
                            best_tile[l], where_tile[l] = _pool_window(v0, v1, v2, v3)
                        copy_block(y[n, pi, pj], k0, best_tile, 0, lanes)
                        copy_block(argmax[n, pi, pj], k0, where_tile, 0, lanes)

    return one_channel_pool


_conv_tile_narrow = _make_conv_tile(CONV_TILE_NARROW[1], CONV_TILE_NARROW[0])
_conv_tile_small = _make_conv_tile(CONV_TILE_SMALL[1], CONV_TILE_SMALL[0])
_conv_tile_wide = (_conv_tile_narrow if CONV_TILE_WIDE == CONV_TILE_NARROW
                   else _make_conv_tile(CONV_TILE_WIDE[1], CONV_TILE_WIDE[0]))
_conv_pool = _make_conv_pool(CONV_POOL_TILE[1], CONV_POOL_TILE[0])
_conv_pool_narrow = (_conv_pool if CONV_POOL_TILE_NARROW == CONV_POOL_TILE
                     else _make_conv_pool(CONV_POOL_TILE_NARROW[1], CONV_POOL_TILE_NARROW[0]))
_conv1_pool = _make_conv1_pool(*CONV1_TILE)
_one_channel_pool = _make_one_channel_pool(ONE_CHANNEL_LANES)
_winograd_wide = _make_winograd(3, 2, *WINOGRAD_TILE_WIDE, WINOGRAD_CHUNK)
_winograd_narrow = _make_winograd(3, 2, *WINOGRAD_TILE_NARROW, WINOGRAD_CHUNK)
_winograd4_wide = _make_winograd(3, 4, *WINOGRAD_TILE_WIDE, WINOGRAD_CHUNK)
_winograd4_narrow = _make_winograd(3, 4, *WINOGRAD_TILE_NARROW, WINOGRAD_CHUNK)
_winograd5_wide = _make_winograd(5, 2, *WINOGRAD_TILE_WIDE, WINOGRAD_CHUNK)
_winograd5_narrow = _make_winograd(5, 2, *WINOGRAD_TILE_NARROW, WINOGRAD_CHUNK)
_winograd5x4_wide = _make_winograd(5, 4, *WINOGRAD_TILE_WIDE, WINOGRAD_CHUNK)
_winograd5x4_narrow = _make_winograd(5, 4, *WINOGRAD_TILE_NARROW, WINOGRAD_CHUNK)


@parts_kernel
@_jit(parallel=False)
def _maxpool_forward(part, n_parts, x, y, argmax):
    n_images, n_ch = x.shape[0], x.shape[1]
    ho, wo = y.shape[2], y.shape[3]
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        for i in range(ho):
            top, bottom = x[n, c, 2 * i], x[n, c, 2 * i + 1]
            y_row, arg_row = y[n, c, i], argmax[n, c, i]
            for j in range(wo):
                best, where = _pool_window(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1])
                y_row[j] = best
                arg_row[j] = where


@parts_kernel
@_jit(parallel=False)
def _maxpool_backward(part, n_parts, dy, argmax, zero, dx):
    n_images, n_ch, h, w = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        plane = dx[n, c]
        for i in range(ho):
            dy_row, arg_row = dy[n, c, i], argmax[n, c, i]
            # the windows' top, then bottom row: one output stream per loop (both rows in one loop stayed scalar)
            for half in range(2):
                row = plane[2 * i + half]
                first = np.uint8(2 * half)
                for j in range(wo):
                    g, where = dy_row[j], arg_row[j]
                    row[2 * j] = g if where == first else zero
                    row[2 * j + 1] = g if where == first + 1 else zero
        # an odd last row or column belongs to no window
        for i in range(2 * ho, h):
            plane[i] = zero
        for i in range(2 * ho):
            for j in range(2 * wo, w):
                plane[i, j] = zero


@parts_kernel
@_jit(parallel=False)
def _maxpool_forward_last(part, n_parts, x, y, argmax):
    """`_maxpool_forward` for channels-last x[N, H, W, C]: y and argmax[N, H // 2, W // 2, C] channels-last, a
    pixel's channels in the lanes; the same windows and rule, so the same values."""
    n_images, ho, wo, n_ch = y.shape
    for n in part_range(part, n_parts, n_images):
        for i in range(ho):
            top, bottom = x[n, 2 * i], x[n, 2 * i + 1]
            for j in range(wo):
                a0, a1, a2, a3 = top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]
                y_px, arg_px = y[n, i, j], argmax[n, i, j]
                for c in range(n_ch):
                    best, where = _pool_window(a0[c], a1[c], a2[c], a3[c])
                    y_px[c] = best
                    arg_px[c] = where


@parts_kernel
@_jit(parallel=False)
def _maxpool_backward_last(part, n_parts, dy, argmax, zero, dx):
    """`_maxpool_backward` for channels-last dy, argmax[N, H // 2, W // 2, C] and dx[N, H, W, C], an output row at a
    time through flat views (written per pixel through views of its channels, the loop stayed scalar)."""
    n_images, h, w, n_ch = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    for n in part_range(part, n_parts, n_images):
        image = dx[n]
        for i in range(ho):
            g_row, arg_row = dy[n, i].reshape(wo * n_ch), argmax[n, i].reshape(wo * n_ch)
            for half in range(2):  # the windows' top, then bottom row
                out = image[2 * i + half].reshape(w * n_ch)
                first = np.uint8(2 * half)
                for j in range(wo):
                    at, left = j * n_ch, 2 * j * n_ch
                    for c in range(n_ch):
                        g, where = g_row[at + c], arg_row[at + c]
                        out[left + c] = g if where == first else zero
                    for c in range(n_ch):
                        g, where = g_row[at + c], arg_row[at + c]
                        out[left + n_ch + c] = g if where == first + 1 else zero
        # an odd last row or column belongs to no window
        for i in range(2 * ho, h):
            image[i] = zero
        for i in range(2 * ho):
            for j in range(2 * wo, w):
                image[i, j] = zero
