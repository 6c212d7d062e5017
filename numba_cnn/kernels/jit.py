"""jit backend: explicit loop kernels compiled by Numba (`parallel=True`), register-blocked, no BLAS.

Each convolution loop nest keeps an output tile (columns or taps x channel lanes) in registers: the tile is a
stack array (`stack_tile` in `_numba_ext`), whose indices become constants once LLVM unrolls the tile loops, so it
is promoted to vector registers (a np.empty tile stays in memory: measured 2-5x slower). The innermost loop runs
over `lanes` channels contiguous in memory and compiles to FMAs as wide as the target's vectors. Tile shapes are
chosen once, below (`CONV_TILE_*`, `GRAD_LANES_*`), from the vector width and register count of the instruction
set numba compiles for (`_numba_ext.TILE_BITS` / `TILE_REGISTERS`, which honour NUMBA_CPU_NAME/FEATURES):
an AVX2 target has 16 ymm registers, so a tile of at most 12 accumulators; an AVX-512 target 32 zmm.

conv2d_forward   `_conv_tile_*`: prange over images; x repacked channels-last (N, H, W, C) by `_pack_channels_last`
                 (a free reshape when C = 1) and w to (R, S, C, K padded to the lanes); per output row, tiles of
                 columns x lanes output channels, reduced over (r, s, c) with c innermost (contiguous, and the
                 longest loop); bias seeds the tile, ReLU clamps it on the store to NCHW (NaN stays NaN). The last
                 column tile overlaps the one before; inputs narrower than a tile are zero-padded on the right and
                 the output cropped.
conv2d_backward  dw: `_weight_grad_*` over dy repacked channels-last (N, P, Q, K padded) by `_pack_channels_last`;
                 tiles of 3 taps along a kernel row x lanes; the (channel, row, tap block, lane block) tiles are
                 split into one contiguous range per thread, images outermost, so each thread streams dy once;
                 with few tiles (conv1: 3) the images are also cut into GRAD_IMAGE_CHUNKS fixed chunks whose
                 partial sums are added in chunk order, so both cores get work; every dw element is summed in the
                 same order whatever the thread count.
                 db: per-image sums made by `_pack_channels_last` while it repacks, added up image by image.
                 dx: the full correlation of dy with the flipped kernel through the forward's `_conv_tile_*`
                 (bias 0, no ReLU), reading the same channels-last dy, packed with S-1 zero columns on each side;
                 the R-1 zero rows above and below are skipped by the kernel's row_shift instead of stored.
maxpool2d_*      `_maxpool_forward`/`_maxpool_backward`: prange over (image, channel) planes; forward compares
                 the 4 window values in row-major order through selects (so it vectorises): a later value wins
                 if it is strictly greater, or if it is NaN and the best so far is not (a NaN beats every number,
                 the first NaN wins, ties keep the first maximum); backward writes each input element once (its
                 window's dy or zero), so no zero-fill pass.

Fused ops (beyond the contract; INFO.fused names them):
conv2d_relu_maxpool2d_forward   `_conv_pool_*`: the forward's tiles for one pair of conv rows land in a per-image
                 (2, Q, K) channels-last buffer (L1-sized), ReLU'd, and are pooled from there into y and argmax:
                 the P x Q x K activation is never written. One input channel with conv rows of at most
                 CONV1_TILE columns (conv1) takes `_conv1_pool` instead, a tile along the columns (9 taps cannot
                 amortise a channels-last tile's transposing store). Both sum each output as conv2d_forward does
                 (bias, then the taps in (r, s, c) order, as FMAs), so the pooled values and argmax are bitwise
                 those of the composed ops (tested).
conv2d_relu_maxpool2d_backward  `_unpool_pack`: the pooled gradient, masked by ReLU (dy * (y > 0)), is scattered
                 through argmax straight into the channels-last dy buffer the dw and dx kernels read (no
                 maxpool2d_backward, no NCHW conv-output gradient), with the same per-image db sums; then the
                 same dw and dx kernels as conv2d_backward, so again bitwise the composed ops' results.

Private variants: `_conv_tile_narrow` / `_conv_tile_wide` (K <= CONV_TILE_NARROW lanes or wider), the same for
`_conv_pool_*` and `_weight_grad_*` (one kernel when both lane counts agree).

Results do not depend on the thread count (bitwise): forward and dx split over images, dw as above, db from fixed
per-image sums. All float work is in the input's dtype (float32 or float64).

Compilation: every kernel goes through `_numba_ext.jit` (one set of options), compiles lazily on its first call
for a dtype, and is cached on disk (`cache=True`) in `__pycache__` next to this file or, when the package
directory is not writable, in numba's user cache directory (NUMBA_CACHE_DIR overrides both). NUMBA_CNN_CACHE=0
turns the disk cache off; if no cache location is usable at all, the kernels compile uncached with a warning.
NUMBA_CNN_STACK_TILES=0 swaps the register tiles for heap arrays (see `_numba_ext`).
"""

import threading

import numpy as np
from numba import get_num_threads, njit, prange

from numba_cnn.kernels._numba_ext import CACHE, TILE_BITS, TILE_REGISTERS, jit as _jit, tile_allocator  # noqa: F401
# (CACHE re-exported: jit.CACHE tells callers whether the kernels use the disk cache)
from numba_cnn.kernels.contract import BackendInfo

# BLAS at one thread: its only BLAS calls are the dense layer's small matmuls, and OpenBLAS workers that keep
# spinning after each call take the core Numba's threads need (2 cores: a training step measured 41.6 ms with 2
# BLAS threads, 23.6 ms with 1).
INFO = BackendInfo(summary="register-tiled loop kernels compiled by Numba (parallel=True)", blas_threads="one",
                   fused=("conv2d_relu_maxpool2d",))

# Tile shapes, (lanes, columns) of the correlation tiles and lanes of the weight-gradient tiles, by the target's
# vector registers. The one place they are chosen; measured with batch 128 on 2 threads.
if TILE_BITS >= 512 and TILE_REGISTERS >= 32:
    # 32 zmm: 7 x 32 and 4 x 64 fp32 lanes are 14 and 16 accumulators; measured on Zen 4: 4 x 64 in 512-bit
    # registers ran conv2 forward ~1.7x faster than the same tile in 256-bit ones (spilled), 6 x 64 no faster.
    CONV_TILE_NARROW, CONV_TILE_WIDE = (32, 7), (64, 4)
    GRAD_LANES_NARROW, GRAD_LANES_WIDE = 32, 64
else:
    # 16 ymm (AVX2, Zen 3): conv2 forward 4.9 ms with 4 x 16 (8 ymm) vs 5.2 with 3 x 32, 9.0 with 6 x 16 and
    # 24 with the AVX-512 4 x 64 (32 ymm, spilled); conv2 dx (32 lanes) 4.5 ms with 3 x 32 (12 ymm) vs 5.6 with
    # 4 x 16 and 29 with 7 x 32; weight gradient 3 taps x 32 lanes (12 ymm) 7.9 ms vs 9.5 with 64 and >50 with 16.
    CONV_TILE_NARROW, CONV_TILE_WIDE = (32, 3), (16, 4)
    GRAD_LANES_NARROW, GRAD_LANES_WIDE = 32, 32
CONV1_TILE = (32, 3) if TILE_BITS < 512 else (32, 6)  # (columns, channels): 12 ymm / 12 zmm
TILE_TAPS = 3  # kernel taps per weight-gradient tile (a 3x3 kernel splits into 3 exact blocks)
# weight-gradient tiles fewer than this are also split over GRAD_IMAGE_CHUNKS fixed image chunks (conv1 has 3
# tiles for 2 threads: 2:1 imbalance); a constant, not the thread count, so the sums do not depend on threads
GRAD_MIN_TILES, GRAD_IMAGE_CHUNKS = 16, 8


@njit(inline="always")  # inlined into the calling kernel (and its fastmath), in numba IR
def _pool_window(v0, v1, v2, v3):
    """(max, offset) of a 2x2 window given in row-major order: ties keep the first maximum, a NaN beats every
    number and the first NaN wins. Selects only (no branches), so the loops calling it vectorise: the strict-`>`
    chain, then a fix-up for a NaN after a number (measured 1.3x the NaN-blind chain on pool1; a NaN test folded
    into each step ran 11x slower, LLVM no longer vectorised it)."""
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


def _make_conv_tile(columns, lanes):
    """Correlation kernel with tiles of `columns` output columns x `lanes` output channels."""
    tile = columns * lanes
    _stack_tile = tile_allocator()

    @_jit
    def conv_tile(x_cl, wt, b, floor, row_shift, y):
        """y[n,k,i,j] = relu_floor(b[k] + sum_{r,s,c} x_cl[n,i+r-row_shift,j+s,c] * wt[r,s,c,k]) from a
        channels-last input, rows outside 0..H-1 counting as zeros (skipped, never read); wt and b padded to a
        multiple of `lanes` channels, floor 0 for ReLU (NaN kept) or -inf for none. Needs Q >= columns."""
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
        n_images, n_in = x_cl.shape[0], x_cl.shape[3]
        n_out, p_half, q_half = y.shape[1], y.shape[2], y.shape[3]
        r_taps, s_taps, k_padded = wt.shape[0], wt.shape[1], wt.shape[3]
        for n in prange(n_images):
            acc = _stack_tile(tile, x_cl.dtype)
            xs = _stack_tile(columns, x_cl.dtype)
            rows = np.empty((2, q_tiles, k_padded), x_cl.dtype)  # two ReLU'd conv rows, channels last
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
                                x_slab = x_cl[n, i + r, j0:]
                                for s in range(s_taps):
                                    for c in range(n_in):
                                        w_vec = wt[r, s, c, k0:k0 + lanes]
                                        for jj in range(columns):
                                            xs[jj] = x_slab[jj + s, c]
                                        for k in range(lanes):
                                            w_k = w_vec[k]
                                            for jj in range(columns):
                                                acc[jj * lanes + k] += xs[jj] * w_k
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


def _make_conv1_pool(columns, channels):
    """Fused correlation + ReLU + 2x2 max-pooling for ONE input channel (conv1) whose conv rows fit one tile: 9 taps
    per output are too few to amortise a channels-last tile's transposing store, so this tile runs along the output
    columns instead (a whole conv row of `columns` columns x `channels` output channels). Every loop outside the
    tile runs over a whole tile (all channels' rows back to back), with a trip count LLVM cannot fold, so it stays a
    vectorised loop instead of being unrolled into scalar code: ReLU'd rows into a (2, tile) buffer, pooled along
    it, then copied into y row by row (measured 4.7 -> 3.7 ms on conv1, 1 thread, against a per-channel-row
    version)."""
    tile = columns * channels
    half = columns // 2
    _stack_tile = tile_allocator()

    @_jit
    def conv1_pool(x, wt, b, zero, y, argmax):
        """y, argmax = pool(relu(b[k] + sum_{r,s} x[n, i+r, j+s] * wt[k, r, s])); x (N, H, W) at least
        `columns` + S - 1 wide, 2 * Q2 <= `columns`; wt (K, R, S) and b padded to a multiple of `channels`."""
        n_images = x.shape[0]
        n_out, p_half, q_half = y.shape[1], y.shape[2], y.shape[3]
        k_padded, r_taps, s_taps = wt.shape
        n_stored = min(tile, k_padded * columns)  # = tile, unknown to LLVM: the loops below stay loops
        n_pooled = n_stored // 2
        for n in prange(n_images):
            acc = _stack_tile(tile, x.dtype)
            ws = _stack_tile(channels, x.dtype)
            rows = np.empty((2, tile), x.dtype)
            pooled = np.empty(tile // 2, x.dtype)
            won = np.empty(tile // 2, np.uint8)
            for k0 in range(0, k_padded, channels):
                for pi in range(p_half):
                    for h in range(2):
                        for kk in range(channels):
                            for jj in range(columns):
                                acc[kk * columns + jj] = b[k0 + kk]
                        for r in range(r_taps):
                            for s in range(s_taps):
                                x_seg = x[n, 2 * pi + h + r, s:]
                                for kk in range(channels):
                                    ws[kk] = wt[k0 + kk, r, s]
                                # LLVM unrolls the short channel loop and vectorises the column loop (the shape
                                # of the channels-last tile's inner loops, with the roles swapped)
                                for jj in range(columns):
                                    x_j = x_seg[jj]
                                    for kk in range(channels):
                                        acc[kk * columns + jj] += x_j * ws[kk]
                        row = rows[h]
                        for t in range(n_stored):
                            v = acc[t]
                            row[t] = zero if v < zero else v  # ReLU; NaN < 0 is false: NaN stays
                    top, bottom = rows[0], rows[1]
                    for u in range(n_pooled):  # window u: columns 2u, 2u + 1 of both rows (channel u // half)
                        best, where = _pool_window(top[2 * u], top[2 * u + 1], bottom[2 * u], bottom[2 * u + 1])
                        pooled[u] = best
                        won[u] = where
                    for kk in range(min(channels, n_out - k0)):
                        y_row, arg_row = y[n, k0 + kk, pi], argmax[n, k0 + kk, pi]
                        for pj in range(q_half):
                            y_row[pj] = pooled[kk * half + pj]
                            arg_row[pj] = won[kk * half + pj]

    return conv1_pool


def _make_weight_grad(lanes):
    """Weight-gradient kernel with tiles of TILE_TAPS taps along a kernel row x `lanes` output channels."""
    taps = TILE_TAPS
    tile = taps * lanes
    _stack_tile = tile_allocator()

    @_jit
    def weight_grad(x, dyt, col_pad, r_taps, s_taps, n_groups, dwt):
        """dwt[h, c, r, s, k] = sum_{n in chunk h, i, j} x[n,c,i+r,j+s] * dyt[n,i,col_pad+j,k], the images cut
        into dwt.shape[0] contiguous chunks; dyt channels-last padded to a multiple of `lanes` channels and by
        col_pad columns on each side; needs S >= TILE_TAPS. Tiles (c, r, tap block, lane block) are split into
        n_groups contiguous ranges; each task (chunk, range) loops over its images outermost."""
        n_images, n_in = x.shape[0], x.shape[1]
        n_chunks = dwt.shape[0]
        p_out, q_out, k_padded = dyt.shape[1], dyt.shape[2] - 2 * col_pad, dyt.shape[3]
        tap_blocks = (s_taps + taps - 1) // taps
        lane_blocks = k_padded // lanes
        per_channel = r_taps * tap_blocks * lane_blocks
        n_tiles = n_in * per_channel
        for task in prange(n_chunks * n_groups):
            acc = _stack_tile(tile, x.dtype)
            xs = _stack_tile(taps, x.dtype)
            h, g = task // n_groups, task % n_groups
            first, last = g * n_tiles // n_groups, (g + 1) * n_tiles // n_groups
            dw_part = dwt[h]
            for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                for t in range(first, last):
                    c, rest = t // per_channel, t % per_channel
                    r, rest = rest // (tap_blocks * lane_blocks), rest % (tap_blocks * lane_blocks)
                    s_first = rest // lane_blocks * taps
                    s0 = min(s_first, s_taps - taps)  # the last block overlaps the one before, never overruns
                    k0 = rest % lane_blocks * lanes
                    for tt in range(taps):
                        dw_vec = dw_part[c, r, s0 + tt, k0:k0 + lanes]
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
                        dw_vec = dw_part[c, r, s0 + tt, k0:k0 + lanes]
                        for k in range(lanes):
                            dw_vec[k] = acc[tt * lanes + k]

    return weight_grad


_conv_tile_narrow = _make_conv_tile(CONV_TILE_NARROW[1], CONV_TILE_NARROW[0])
_conv_tile_wide = _make_conv_tile(CONV_TILE_WIDE[1], CONV_TILE_WIDE[0])
_conv_pool_narrow = _make_conv_pool(CONV_TILE_NARROW[1], CONV_TILE_NARROW[0])
_conv_pool_wide = _make_conv_pool(CONV_TILE_WIDE[1], CONV_TILE_WIDE[0])
_conv1_pool = _make_conv1_pool(*CONV1_TILE)
_weight_grad_narrow = _make_weight_grad(GRAD_LANES_NARROW)
_weight_grad_wide = (_weight_grad_narrow if GRAD_LANES_WIDE == GRAD_LANES_NARROW
                     else _make_weight_grad(GRAD_LANES_WIDE))


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
def _unpool_pack(dy, pooled, argmax, col_pad, zero, out, sums):
    """The gradient of a conv output before ReLU + 2x2 max-pooling, from the pooled gradient dy[N, K, P//2, Q//2]:
    dy * (pooled > 0) routed to each window's argmax, written channels-last into out[N, P, Q + 2 col_pad,
    K_padded] (every element once: zero elsewhere, in the padding columns and channels and the dropped odd
    row/column); sums[n, k] as `_pack_channels_last` makes them, in the same order (so the same bits)."""
    n_images, n_ch, p_half, q_half = dy.shape
    p_out, c_padded = out.shape[1], out.shape[3]
    for n in prange(n_images):
        # the masked gradient and argmax of this image, channels last first (contiguous reads, a small L1-sized
        # transpose), so the scatter below runs along contiguous channels (measured 3x faster than reading the
        # NCHW planes across channels there)
        g_t = np.empty((p_half * q_half, n_ch), dy.dtype)
        where_t = np.empty((p_half * q_half, n_ch), np.uint8)
        for c in range(n_ch):
            dy_plane, pooled_plane, arg_plane = dy[n, c], pooled[n, c], argmax[n, c]
            for pi in range(p_half):
                for pj in range(q_half):
                    g = dy_plane[pi, pj]
                    # dy * (pooled > 0), inf * 0 = NaN included
                    g_t[pi * q_half + pj, c] = g if pooled_plane[pi, pj] > zero else g * zero
                    where_t[pi * q_half + pj, c] = arg_plane[pi, pj]
        total = sums[n]
        total[:] = zero
        for i in range(p_out):
            pi, di = i // 2, i % 2
            out[n, i, :col_pad] = zero
            out[n, i, col_pad + 2 * q_half:] = zero  # the dropped odd column and the right padding
            if pi >= p_half:  # the dropped odd last row
                out[n, i] = zero
                continue
            first = np.uint8(2 * di)
            for pj in range(q_half):
                left, right = out[n, i, col_pad + 2 * pj], out[n, i, col_pad + 2 * pj + 1]
                g_row, where_row = g_t[pi * q_half + pj], where_t[pi * q_half + pj]
                for c in range(n_ch):
                    g, where = g_row[c], where_row[c]
                    left[c] = g if where == first else zero
                    right[c] = g if where == first + 1 else zero
                for c in range(n_ch, c_padded):
                    left[c] = zero
                    right[c] = zero
                for c in range(c_padded):
                    total[c] += left[c]
                for c in range(c_padded):
                    total[c] += right[c]


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
                best, where = _pool_window(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1])
                y_row[j] = best
                arg_row[j] = where


@_jit
def _maxpool_backward(dy, argmax, zero, dx):
    n_images, n_ch, h, w = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    for nc in prange(n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        plane = dx[n, c]
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


def _conv_tile_shape(out_channels):
    """(lanes, columns) of the correlation tile for `out_channels` outputs."""
    return CONV_TILE_NARROW if out_channels <= CONV_TILE_NARROW[0] else CONV_TILE_WIDE


def _grad_lanes(out_channels):
    return GRAD_LANES_NARROW if out_channels <= GRAD_LANES_NARROW else GRAD_LANES_WIDE


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


def _input_channels_last(x):
    n, c, h, wd = x.shape
    return x.reshape(n, h, wd, 1) if c == 1 else _channels_last(x)[0]  # one channel: already channels-last


def _packed_weights(w_rsck, bias, lanes, dtype):
    """w[R, S, C, K] and b[K] zero-padded to a multiple of `lanes` output channels."""
    out_channels = w_rsck.shape[3]
    k_padded = _padded(out_channels, lanes)
    wt = np.zeros(w_rsck.shape[:3] + (k_padded,), dtype)
    wt[..., :out_channels] = w_rsck
    b = np.zeros(k_padded, dtype)
    b[:out_channels] = bias
    return wt, b


def _correlate(x_cl, w_rsck, bias, relu, row_shift=0):
    """Correlation of channels-last x_cl[N, H, W, C] with w_rsck[R, S, C, K] through a tile kernel -> y[N, K, P, Q];
    row_shift > 0 treats x_cl as zero-padded by row_shift rows at the top and bottom without storing them."""
    n, h, wd, _ = x_cl.shape
    r, s, _, out_channels = w_rsck.shape
    lanes, columns = _conv_tile_shape(out_channels)
    wt, b = _packed_weights(w_rsck, bias, lanes, x_cl.dtype)
    q = wd - s + 1
    if q < columns:  # narrower than a tile: zero columns on the right, cropped off the output
        wide = np.zeros((n, h, columns + s - 1, x_cl.shape[3]), x_cl.dtype)
        wide[:, :, :wd] = x_cl
        x_cl = wide
    y = np.empty((n, out_channels, h + 2 * row_shift - r + 1, x_cl.shape[2] - s + 1), x_cl.dtype)
    floor = x_cl.dtype.type(0 if relu else -np.inf)
    kernel = _conv_tile_narrow if lanes == CONV_TILE_NARROW[0] else _conv_tile_wide
    kernel(x_cl, wt, b, floor, row_shift, y)
    return y if y.shape[3] == q else np.ascontiguousarray(y[..., :q])


def _conv_backward_packed(dyt, dy_sums, x, w, need_dx):
    """conv2d_backward from dy already packed channels-last (N, P, Q + 2 col_pad, K padded to the grad lanes),
    col_pad = S - 1 when need_dx else 0, and its per-image channel sums."""
    k, c, r, s = w.shape
    col_pad = s - 1 if need_dx else 0
    db = dy_sums[:, :k].sum(axis=0)
    # kernels narrower than a tap tile: zero columns on the right of x add taps that are computed and dropped
    s_tiled = max(s, TILE_TAPS)
    lanes = _grad_lanes(k)
    n_tiles = c * r * (-(-s_tiled // TILE_TAPS)) * (dyt.shape[3] // lanes)
    chunks = min(GRAD_IMAGE_CHUNKS, x.shape[0]) if n_tiles < GRAD_MIN_TILES else 1
    dwt = np.zeros((chunks, c, r, s_tiled, dyt.shape[3]), x.dtype)
    weight_grad = _weight_grad_narrow if lanes == GRAD_LANES_NARROW else _weight_grad_wide
    weight_grad(_pad_width(x, x.shape[3] + s_tiled - s), dyt, col_pad, r, s_tiled, get_num_threads(), dwt)
    dw_crsk = dwt[0] if chunks == 1 else np.sum(dwt, axis=0)  # chunk by chunk, in order
    dw = np.ascontiguousarray(dw_crsk[:, :, :s, :k].transpose(3, 0, 1, 2))
    if not need_dx:
        return None, dw, db
    # dx is the full correlation of dy with the flipped kernel: the zero columns are in dyt, the R-1 zero rows
    # above and below are skipped through row_shift; dyt's padded channels meet zero rows of w_flipped
    w_flipped = np.zeros((r, s, dyt.shape[3], c), x.dtype)
    w_flipped[:, :, :k] = w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
    dx = _correlate(dyt, w_flipped, np.zeros(c, x.dtype), False, row_shift=r - 1)
    return dx, dw, db


def conv2d_forward(x, w, b, relu):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,H-R+1,W-S+1], ReLU applied when relu is True."""
    return _correlate(_input_channels_last(x), w.transpose(2, 3, 1, 0), b, relu)


def conv2d_backward(dy, x, w, need_dx):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] or None, dw[K,C,R,S], db[K])."""
    k, c, r, s = w.shape
    # dy channels-last, its channels padded to the lanes; for dx also padded by S-1 zero columns on each side
    col_pad = s - 1 if need_dx else 0
    dyt, dy_sums = _channels_last(dy, col_pad, _padded(k, _grad_lanes(k)), scratch="dy_cl")
    return _conv_backward_packed(dyt, dy_sums, x, w, need_dx)


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
    _maxpool_backward(dy, argmax, dy.dtype.type(0), dx)
    return dx


def conv2d_relu_maxpool2d_forward(x, w, b):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> (y[N,K,P//2,Q//2], argmax uint8), P = H-R+1, Q = W-S+1: equal to
    maxpool2d_forward(conv2d_forward(x, w, b, relu=True)) without writing the conv output."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    p_half, q_half = (h - r + 1) // 2, (wd - s + 1) // 2
    y = np.empty((n, k, p_half, q_half), x.dtype)
    argmax = np.empty(y.shape, np.uint8)
    if c == 1 and 2 * q_half <= CONV1_TILE[0]:  # a tile along the columns (see _make_conv1_pool)
        columns, channels = CONV1_TILE
        x_1 = _pad_width(x, columns + s - 1).reshape(n, h, -1)
        k_padded = _padded(k, channels)
        wt = np.zeros((k_padded, r, s), x.dtype)
        wt[:k] = w[:, 0]
        bp = np.zeros(k_padded, x.dtype)
        bp[:k] = b
        _conv1_pool(x_1, wt, bp, x.dtype.type(0), y, argmax)
        return y, argmax
    lanes, columns = _conv_tile_shape(k)
    x_cl = _input_channels_last(x)
    wt, bp = _packed_weights(w.transpose(2, 3, 1, 0), b, lanes, x.dtype)
    q_tiles = max(2 * q_half, columns)
    if wd < q_tiles + s - 1:  # narrower than a tile: zero columns on the right, never pooled
        wide = np.zeros((n, h, q_tiles + s - 1, c), x.dtype)
        wide[:, :, :wd] = x_cl
        x_cl = wide
    kernel = _conv_pool_narrow if lanes == CONV_TILE_NARROW[0] else _conv_pool_wide
    kernel(x_cl, wt, bp, x.dtype.type(0), q_tiles, y, argmax)
    return y, argmax


def conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, need_dx):
    """dy[N,K,P//2,Q//2] (gradient of the pooled output), y (the pooled output), argmax, x[N,C,H,W], w[K,C,R,S] ->
    (dx[N,C,H,W] or None, dw[K,C,R,S], db[K]): equal to conv2d_backward(maxpool2d_backward(dy * (y > 0), argmax,
    (N, K, P, Q)), x, w, need_dx), the pooled gradient scattered straight into the packed conv gradient."""
    k, c, r, s = w.shape
    n, _, h, wd = x.shape
    col_pad = s - 1 if need_dx else 0
    shape = (n, h - r + 1, wd - s + 1 + 2 * col_pad, _padded(k, _grad_lanes(k)))
    dyt = _scratch("dy_cl", shape, dy.dtype)
    sums = _scratch("dy_cl.sums", (n, shape[3]), dy.dtype)
    _unpool_pack(dy, y, argmax, col_pad, dy.dtype.type(0), dyt, sums)
    return _conv_backward_packed(dyt, sums, x, w, need_dx)


