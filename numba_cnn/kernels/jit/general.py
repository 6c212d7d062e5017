"""The jit backend's general convolution: any stride (the register-tiled kernels of tiles.py cover stride 1), forward
and backward, and the stride-1 weight gradient's channels-last tiles (`_make_weight_grad`, described with the other
stride-1 kernels in jit/__init__.py's docstring). The strided kernels work over an input zero-padded into a
channels-last buffer by the caller (jit/__init__.py), so that every product the contract's padded sum has is computed
(0 * inf is NaN there too). Correct first, with simple register tiles; two choices measured so far
(docs/kernels.md): the weight gradient's image chunks and the input gradient's 16-lane tile for few channels.

`_strided_forward`: prange over images; per output row, tiles of columns x lanes output channels (the tile of
    `_conv_tile_*`), reduced over (r, s, c) with c innermost; the columns of a tile read the input `stride` apart.
`_strided_weight_grad`: per tap (r, s), the C x K matrix sum over (n, i, j) of x column outer dy row, in tiles of
    channels x lanes; tasks are (image chunk, tile) pairs fixed by the shapes (GRAD_IMAGE_CHUNKS chunks, a chunk's
    tiles consecutive so its images are read from cache by all of them), each summing its images in order, the
    chunks' partial sums added in chunk order by the caller: bitwise the same for any thread count.
`_strided_input_grad`: a gather, each dx element written once: per image, input row and column phase (the input
    columns w with (w + left) % stride equal, which the same taps s reach, from consecutive dy columns), tiles of
    those columns x lanes input channels summed over the valid taps (r, s) and the output channels k, from dy
    channels-last with zero columns on both sides (a phase's last columns, when at most half a tile, in a tile of
    half the columns: `_input_grad_tile` inlined with either width); elements no output reads get 0.

Self-contained (no @njit helper from another file), so Numba's cache sees every change to what it compiles; the
tile shapes come from tiles.py as factory arguments, which are part of the cache key.
"""

import numpy as np
from numba import njit, prange

from numba_cnn.kernels._numba_ext import jit as _jit, tile_allocator
from numba_cnn.kernels.jit.tiles import (CONV_TILE_SMALL, GRAD_LANES_NARROW, GRAD_LANES_WIDE, STRIDED_GRAD_TILE,
                                         STRIDED_TILE, TILE_TAPS)


def _make_strided_forward(lanes, columns):
    tile = columns * lanes
    _stack_tile = tile_allocator()

    @_jit
    def strided_forward(xp, wt, b, floor, stride, y):
        """y[n,i,j,k] = relu_floor(b[k] + sum_{r,s,c} xp[n, i*stride+r, j*stride+s, c] * wt[r,s,c,k]), y
        channels-last (a tile's lanes are a pixel's channels: one contiguous store per column);
        xp the padded input channels-last (N, Hp, Wp, C); wt (R, S, C, K) and b padded to a multiple of `lanes`
        output channels; floor 0 for ReLU (NaN kept) or -inf for none. A tile past the last column reads the last
        input column (clamped) and stores nothing."""
        n_images, wp = xp.shape[0], xp.shape[2]
        n_in = xp.shape[3]
        p_out, q_out, n_out = y.shape[1], y.shape[2], y.shape[3]
        r_taps, s_taps, k_padded = wt.shape[0], wt.shape[1], wt.shape[3]
        for n in prange(n_images):
            acc = _stack_tile(tile, xp.dtype)
            xs = _stack_tile(columns, xp.dtype)
            for i in range(p_out):
                for j0 in range(0, q_out, columns):
                    width = min(columns, q_out - j0)
                    for k0 in range(0, k_padded, lanes):
                        for jj in range(columns):
                            for k in range(lanes):
                                acc[jj * lanes + k] = b[k0 + k]
                        for r in range(r_taps):
                            x_row = xp[n, i * stride + r]
                            for s in range(s_taps):
                                for c in range(n_in):
                                    w_vec = wt[r, s, c, k0:k0 + lanes]
                                    for jj in range(columns):
                                        xs[jj] = x_row[min((j0 + jj) * stride + s, wp - 1), c]
                                    for k in range(lanes):
                                        w_k = w_vec[k]
                                        for jj in range(columns):
                                            acc[jj * lanes + k] += xs[jj] * w_k
                        n_lanes = min(lanes, n_out - k0)
                        for jj in range(width):
                            y_px = y[n, i, j0 + jj, k0:]
                            for k in range(n_lanes):
                                v = acc[jj * lanes + k]
                                y_px[k] = floor if v < floor else v  # ReLU (floor 0) keeps NaN

    return strided_forward


def _make_strided_weight_grad(channels, lanes):
    tile = channels * lanes
    _stack_tile = tile_allocator()
    assert channels in (6, 8)  # the tile's channels are spelled out below

    @_jit
    def strided_weight_grad(xp, dyt, stride, col_pad, r_taps, s_taps, dwt):
        """dwt[h, r, s, c, k] = sum_{n in chunk h, i, j} xp[n, i*stride+r, j*stride+s, c] * dyt[n, i, col_pad+j, k]
        over the images cut into dwt.shape[0] contiguous chunks; xp padded channels-last (N, Hp, Wp, C); dyt
        channels-last (N, P, Q + 2 col_pad, K padded to a multiple of `lanes`), both C-contiguous. One task per
        (chunk, tap, channel block, lane block), in a fixed order, a chunk's tasks consecutive so its images stay
        in cache; a channel block past C reads the last channel and stores nothing for it. Flat offsets as unsigned
        integers (no wrap-around fix, no slice per pixel: docs/numba.md, trap 8)."""
        n_images, hp, wp, n_in = xp.shape
        n_chunks = dwt.shape[0]
        p_out, dy_cols, k_padded = dyt.shape[1], dyt.shape[2], dyt.shape[3]
        q_out = dy_cols - 2 * col_pad
        c_blocks = (n_in + channels - 1) // channels
        k_blocks = k_padded // lanes
        per_tap = c_blocks * k_blocks
        n_tiles = r_taps * s_taps * per_tap
        x_flat, dy_flat = xp.reshape(-1), dyt.reshape(-1)
        x_step = np.uint64(stride * n_in)
        for task in prange(n_chunks * n_tiles):
            acc = _stack_tile(tile, xp.dtype)
            h, t = task // n_tiles, task % n_tiles
            tap, rest = t // per_tap, t % per_tap
            r, s = tap // s_taps, tap % s_taps
            c0, k0 = rest // k_blocks * channels, rest % k_blocks * lanes
            o0, o1 = np.uint64(min(c0, n_in - 1)), np.uint64(min(c0 + 1, n_in - 1))
            o2, o3 = np.uint64(min(c0 + 2, n_in - 1)), np.uint64(min(c0 + 3, n_in - 1))
            o4, o5 = np.uint64(min(c0 + 4, n_in - 1)), np.uint64(min(c0 + 5, n_in - 1))
            o6, o7 = np.uint64(min(c0 + 6, n_in - 1)), np.uint64(min(c0 + 7, n_in - 1))
            for u in range(tile):
                acc[u] = 0
            for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                for i in range(p_out):
                    x_at = np.uint64(((n * hp + i * stride + r) * wp + s) * n_in)
                    dy_at = np.uint64(((n * p_out + i) * dy_cols + col_pad) * k_padded + k0)
                    for j in range(q_out):
                        xu = x_at + np.uint64(j) * x_step
                        a0, a1, a2, a3 = x_flat[xu + o0], x_flat[xu + o1], x_flat[xu + o2], x_flat[xu + o3]
                        a4, a5, a6, a7 = x_flat[xu + o4], x_flat[xu + o5], x_flat[xu + o6], x_flat[xu + o7]
                        dv = dy_at + np.uint64(j * k_padded)
                        for lane in range(lanes):
                            g = dy_flat[dv + np.uint64(lane)]
                            acc[lane] += a0 * g
                            acc[lanes + lane] += a1 * g
                            acc[2 * lanes + lane] += a2 * g
                            acc[3 * lanes + lane] += a3 * g
                            acc[4 * lanes + lane] += a4 * g
                            acc[5 * lanes + lane] += a5 * g
                            if channels == 8:  # the AVX-512 tile's; AVX2's has 6
                                acc[6 * lanes + lane] += a6 * g
                                acc[7 * lanes + lane] += a7 * g
            dw_part = dwt[h, r, s]
            for cc in range(min(channels, n_in - c0)):
                dw_vec = dw_part[c0 + cc, k0:k0 + lanes]
                for k in range(lanes):
                    dw_vec[k] = acc[cc * lanes + k]

    return strided_weight_grad


@njit(inline="always")  # inlined in numba IR, where lanes and columns are the caller's constants
def _input_grad_tile(acc, ds, dyt, wt, n, hp, phase, j_base, c0, n_out, stride, dx, h, w_first, t0, width, lanes,
                     columns):
    """dx[n, c0 + c, h, w_first + (t0 + tt) * stride] for tt < width (<= columns) = the gather's sum for the input
    columns of one phase from dy column j_base + tt on (j_base: that of the tile's first column at tap s = phase),
    over the valid kernel rows r and the taps s of the phase, and the output channels k, in acc[tt * lanes + c];
    reads past dy's width clamp to its last (zero) column."""
    p_out, dy_width = dyt.shape[1], dyt.shape[2]
    r_taps, s_taps = wt.shape[0], wt.shape[1]
    for u in range(columns * lanes):
        acc[u] = 0
    for r in range(hp % stride, min(r_taps, hp + 1), stride):
        i = (hp - r) // stride
        if i >= p_out:
            continue
        dy_row = dyt[n, i]
        for s in range(phase, s_taps, stride):
            # column w_first + t * stride reads dy column (w_first + left - s) / stride + t
            j_first = j_base - (s - phase) // stride
            for k in range(n_out):
                w_vec = wt[r, s, k, c0:c0 + lanes]
                for tt in range(columns):
                    ds[tt] = dy_row[min(j_first + tt, dy_width - 1), k]
                for c in range(lanes):
                    w_c = w_vec[c]
                    for tt in range(columns):
                        acc[tt * lanes + c] += ds[tt] * w_c
    for c in range(min(lanes, dx.shape[1] - c0)):
        dx_row = dx[n, c0 + c, h]
        for tt in range(width):
            dx_row[w_first + (t0 + tt) * stride] = acc[tt * lanes + c]


def _make_strided_input_grad(lanes, columns):
    tile = columns * lanes
    # the last tile of a phase with at most this many columns left: no wasted half. An even count: a 3-column tile
    # (AVX2's half of 6) compiled to code slower than the whole tile's
    half = min(columns, max(2, (columns // 2 + 1) // 2 * 2))
    half_tile = half * lanes
    _stack_tile = tile_allocator()

    @_jit
    def strided_input_grad(dyt, wt, n_out, stride, top, left, col_pad, dx):
        """dx[n,c,h,w] (NCHW) = sum over taps (r, s) and output channels k < n_out of dyt[n, i, col_pad + j, k] *
        wt[r, s, k, c] where h + top = i*stride + r and w + left = j*stride + s, 0 <= i < P (j out of range reads
        the zero columns of dyt, at least ceil(S / stride) on each side); wt (R, S, K, C padded to a multiple of
        `lanes`). Every element written once, 0 where no output reads it. A phase's last columns, when no more
        than half a tile, take a tile of half the columns (the same sums per column)."""
        n_images = dyt.shape[0]
        h_in, w_in = dx.shape[2], dx.shape[3]
        c_padded = wt.shape[3]
        for n in prange(n_images):
            acc = _stack_tile(tile, dyt.dtype)
            ds = _stack_tile(columns, dyt.dtype)
            # the half-width tile in registers of its own (one tile in two shapes stayed on the stack on AVX2)
            acc_half = _stack_tile(half_tile, dyt.dtype)
            ds_half = _stack_tile(half, dyt.dtype)
            for h in range(h_in):
                hp = h + top
                for phase in range(stride):  # the columns w with (w + left) % stride == phase
                    w_first = (phase - left % stride + stride) % stride
                    count = (w_in - w_first + stride - 1) // stride
                    for t0 in range(0, count, columns):
                        width = min(columns, count - t0)
                        j_base = col_pad + (w_first + left - phase) // stride + t0
                        for c0 in range(0, c_padded, lanes):
                            if width > half:
                                _input_grad_tile(acc, ds, dyt, wt, n, hp, phase, j_base, c0, n_out, stride, dx, h,
                                                 w_first, t0, width, lanes, columns)
                            else:
                                _input_grad_tile(acc_half, ds_half, dyt, wt, n, hp, phase, j_base, c0, n_out, stride,
                                                 dx, h, w_first, t0, width, lanes, half)

    return strided_input_grad


_strided_forward = _make_strided_forward(*STRIDED_TILE)
_strided_weight_grad = _make_strided_weight_grad(*STRIDED_GRAD_TILE)
_strided_input_grad = _make_strided_input_grad(*STRIDED_TILE)
# dx into at most CONV_TILE_SMALL's lanes of input channels (three-conv's conv2: 16): the wide tile would compute
# as many zero lanes
_strided_input_grad_small = _make_strided_input_grad(*CONV_TILE_SMALL)


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


_weight_grad_narrow = _make_weight_grad(GRAD_LANES_NARROW)
_weight_grad_wide = (_weight_grad_narrow if GRAD_LANES_WIDE == GRAD_LANES_NARROW
                     else _make_weight_grad(GRAD_LANES_WIDE))
