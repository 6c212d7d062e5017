"""The jit backend's Winograd kernels for 5x5 stride-1 convolutions: F(2x2, 5x5) for the forward (and for dx, a
5x5 stride-1 convolution of dy with the flipped kernel) and F(5x5, 2x2) for the weight gradient. Host side and
kernels in one self-contained file (Numba's cache sees every change to what it compiles; `_numba_ext`'s
`stack_tile`, `copy_block` and `cache_aligned` are inlined).

The transforms, on the points 0, 1, -1, 2, -2 and infinity (the 6 points of F(4x4, 3x3), so B^T is its input
transform): a 2x2 output tile reads a 6x6 input window d, and

    Y = A^T [(G w G^T) * (B^T d B)] A        36 products per tile and channel pair, against 4 x 25 = 100 directly

    B^T = [[4, 0, -5,  0, 1, 0],     G = [[ 1/4,    0,     0,    0,    0  ],     A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4, 1, 1, 0],          [-1/6, -1/6,  -1/6, -1/6, -1/6 ],            [0, 1, -1, 2, -2, 1]]
           [0, 4, -4, -1, 1, 0],          [-1/6,  1/6,  -1/6,  1/6, -1/6 ],
           [0, -2, -1, 2, 1, 0],          [1/24, 1/12,  1/6,   1/3,  2/3 ],
           [0, 2, -1, -2, 1, 0],          [1/24, -1/12, 1/6,  -1/3,  2/3 ],
           [0, 4, 0, -5,  0, 1]]          [ 0,     0,     0,    0,    1  ]]

The weight gradient follows as for 3x3 (winograd_grad.py): Y is exact for every w, so a tile's dw is
G^T [(A g A^T) * (B^T d B)] G with g its 2x2 of dy; summed over the batch's tiles per element, M[e] (C x K) is 36
matrix products over the tiles and the transform back runs once per (k, c). db is the sum of Z[7] = (A g A^T)[1, 1],
the tile's four values. The weights' transform and the transform back run in float64 on the host (numpy).

Where a result is not finite (an inf or NaN in the operands: the transforms' sums turn inf into NaN where the direct
sum may keep it), the caller computes directly. Why and how, with numbers: docs/kernels.md, "Winograd for 5x5".
"""

import numpy as np
from numba import get_num_threads, njit, prange

from numba_cnn.kernels._numba_ext import (TILE_BITS, TILE_REGISTERS, cache_aligned, copy_block, jit as _jit,
                                          tile_allocator)
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import (aligned_zeros, nhwc, padded_channels_last, reusable_output, round_up,
                                           scratch)
from numba_cnn.kernels.jit.tiles import (GRAD_IMAGE_CHUNKS, WINOGRAD_BAND, WINOGRAD_CHUNK, WINOGRAD_TILE_NARROW,
                                         WINOGRAD_TILE_WIDE)

# G (6 x 5): the filter's transform, in float64 on the host
_G = np.array([[1 / 4, 0, 0, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3],
               [1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3],
               [0, 0, 0, 0, 1]])
# (rows of input channels, lanes of output channels) of the weight gradient's products, as for 3x3
WINOGRAD5_GRAD_TILE = (8, 32) if TILE_BITS >= 512 and TILE_REGISTERS >= 32 else (4, 16)
WINOGRAD5_GRAD_BAND = 16  # tiles transformed at once: V and Z of 36 elements each stay in L2


def winograd5_fits(x_shape, w, stride):
    """Whether a convolution takes the F(2x2, 5x5) forward: 5x5, stride 1, input channels a multiple of the
    transform's vector (WINOGRAD_CHUNK), more output channels than half the narrow tile's lanes, finite weights."""
    k, c, r, s = w.shape
    return (stride == 1 and r == s == 5 and c % WINOGRAD_CHUNK == 0 and 2 * k > WINOGRAD_TILE_NARROW[1]
            and x_shape[2] >= 5 and x_shape[3] >= 5 and np.isfinite(w).all())


def winograd5_grad_fits(w_shape, stride):
    """Whether a layer's weight gradient takes F(5x5, 2x2): 5x5, stride 1, C a multiple of WINOGRAD_CHUNK."""
    k, c, r, s = w_shape
    return stride == 1 and r == s == 5 and c % WINOGRAD_CHUNK == 0


def winograd5_conv(x, w, b, relu, padding):
    """(y[N, K, P, Q] as an NCHW view of a channels-last buffer, None, a description of the path, the multiply-adds
    executed: 36 per tile, channel and lane) of conv2d_forward by F(2x2, 5x5); None where an output came out
    non-finite (the caller then computes directly)."""
    n, c, h, wd = x.shape
    k = w.shape[0]
    top, bottom, left, right = padding
    p, q = h + top + bottom - 4, wd + left + right - 4
    tile_rows, tile_cols = (p + 1) // 2, (q + 1) // 2
    rows, lanes = WINOGRAD_TILE_NARROW if k <= WINOGRAD_TILE_NARROW[1] else WINOGRAD_TILE_WIDE
    k_padded = round_up(k, lanes)
    u = aligned_zeros((36, c, k_padded), x.dtype)
    gw = np.tensordot(w.astype(np.float64), _G, axes=(3, 1))  # [K, C, 5, 6]: w G^T, then G on the rows
    u[:, :, :k] = np.tensordot(_G, gw, axes=(1, 2)).transpose(0, 3, 2, 1).reshape(36, c, k)
    bp = aligned_zeros(k_padded, x.dtype)
    bp[:k] = b
    if is_channels_last(x):  # read in place, the padding and the rows and columns past it as zeros
        x_cl, x_top, x_left = x.transpose(0, 2, 3, 1), top, left
    else:  # a channels-last copy, padded while it is made, with the zero row or column an odd P or Q reads
        x_cl = padded_channels_last(x, (top, bottom + 2 * tile_rows - p, left, right + 2 * tile_cols - q),
                                    buffer_name="x_winograd")
        x_top = x_left = 0
    y = reusable_output((n, p, q, k), x.dtype)
    finite = scratch("winograd.finite", (n,), np.bool_)
    kernel = _winograd5_narrow if lanes == WINOGRAD_TILE_NARROW[1] else _winograd5_wide
    kernel(x_cl, x_top, x_left, u, bp, x.dtype.type(0 if relu else -np.inf), tile_rows, tile_cols,
           get_num_threads(), y, finite)
    if not finite.all():
        return None
    band = max(1, WINOGRAD_BAND // tile_cols) * tile_cols
    computed_tiles = sum(round_up(min(band, tile_rows * tile_cols - t0), rows)
                         for t0 in range(0, tile_rows * tile_cols, band))
    path = f"Winograd F(2x2, 5x5), products in tiles of {rows} tiles x {lanes} lanes"
    return y.transpose(0, 3, 1, 2), None, path, n * computed_tiles * 36 * c * k_padded


def winograd5_weight_grad(dy, x, padding):
    """(dw[K, C, 5, 5], db[K], multiply-adds executed, the path) of a stride-1 5x5 convolution of x[N, C, H, W]
    zero-padded by padding = (top, bottom, left, right), from dy[N, K, P, Q] (either layout); None where a result
    came out non-finite (the caller then computes directly)."""
    n, k, p, q = dy.shape
    c = x.shape[1]
    rows, lanes = WINOGRAD5_GRAD_TILE
    k_padded = round_up(k, lanes)
    tile_rows, tile_cols = (p + 1) // 2, (q + 1) // 2
    chunks = min(GRAD_IMAGE_CHUNKS, n)
    mt = scratch("winograd5_grad.m", (chunks, 36, c * k_padded), x.dtype)
    dbt = scratch("winograd5_grad.db", (chunks, k_padded), x.dtype)
    if k % WINOGRAD_CHUNK:  # the transform reads whole vectors of channels: zero channels up to one
        dy_cl = scratch("winograd5_grad.dy", (n, p, q, round_up(k, WINOGRAD_CHUNK)), dy.dtype)
        dy_cl[..., k:] = 0
        dy_cl[..., :k] = dy.transpose(0, 2, 3, 1)
    else:
        dy_cl = nhwc(dy)
    _winograd5_weight_grad(nhwc(x), padding[0], padding[2], dy_cl, tile_rows, tile_cols, mt, dbt)
    with np.errstate(invalid="ignore", over="ignore"):  # an inf or NaN operand: checked below
        m = mt[0].astype(np.float64)
        for h in range(1, chunks):  # the chunks in order: the same sums whatever the thread count
            m += mt[h]
        gm = np.tensordot(_G, m.reshape(6, 6, c, k_padded)[:, :, :, :k], axes=(0, 0))  # [5, 6, C, K]: G^T M
        dw = np.tensordot(gm, _G, axes=(1, 0)).transpose(2, 1, 0, 3).astype(x.dtype)  # then . G: [K, C, 5, 5]
    db = dbt.sum(axis=0, dtype=np.float64)[:k].astype(x.dtype)
    if not (np.isfinite(dw).all() and np.isfinite(db).all()):
        return None
    path = f"dw by Winograd F(5x5, 2x2), products in tiles of {rows} input x {lanes} output channels"
    return dw, db, n * tile_rows * tile_cols * 36 * c * k_padded, path


@njit(inline="always")  # inlined into the calling kernel in numba IR
def _input_transform(x0, x1, x2, x3, x4, x5):
    """B^T x for one 6-vector. Multiples as sums: an integer literal times a float32 is a float64 in Numba."""
    a, s, d, e = x0 - x2, x1 + x2, x1 - x2, x3 - x1
    a2, s2, d2, e2 = a + a, s + s, d + d, e + e
    return a2 + a2 - x2 + x4, x3 + x4 - (s2 + s2), d2 + d2 + x4 - x3, e2 + x4 - x2, x4 - x2 - e2, x5 - x3 - (e2 + e2)


@njit(inline="always")
def _pair_transform(x0, x1):
    """A x for one 2-vector (A's rows (1, 0), (1, 1), (1, -1), (1, 2), (1, -2), (0, 1))."""
    x2 = x1 + x1
    return x0, x0 + x1, x0 - x1, x0 + x2, x0 - x2, x1


@njit(inline="always")
def _window_transform(d, tt, v, at, chunk):
    """v[6a + b, at + l] = (B^T d B)[a, b] of the 6x6 window held as d[(6i + j) * chunk + l], by rows (into tt)
    then by columns; l innermost, so each step is a vector over `chunk` channels. Views at each row or column,
    then constant offsets: LLVM then sees every index >= 0 (no negative-index code, which kept the loops scalar)."""
    for i in range(6):
        src, dst = d[6 * i * chunk:], tt[6 * i * chunk:]
        for l in range(chunk):
            t0, t1, t2, t3, t4, t5 = _input_transform(src[l], src[chunk + l], src[2 * chunk + l],
                                                      src[3 * chunk + l], src[4 * chunk + l], src[5 * chunk + l])
            dst[l], dst[chunk + l], dst[2 * chunk + l] = t0, t1, t2
            dst[3 * chunk + l], dst[4 * chunk + l], dst[5 * chunk + l] = t3, t4, t5
    for j in range(6):
        src = tt[j * chunk:]
        v0s, v1s, v2s = v[j, at:], v[6 + j, at:], v[12 + j, at:]
        v3s, v4s, v5s = v[18 + j, at:], v[24 + j, at:], v[30 + j, at:]
        for l in range(chunk):
            v0, v1, v2, v3, v4, v5 = _input_transform(src[l], src[6 * chunk + l], src[12 * chunk + l],
                                                      src[18 * chunk + l], src[24 * chunk + l],
                                                      src[30 * chunk + l])
            v0s[l], v1s[l], v2s[l], v3s[l], v4s[l], v5s[l] = v0, v1, v2, v3, v4, v5


@njit(inline="always")
def _load_window(d, x_cl, n, row0, col0, c0, chunk, zeros):
    """d[(6i + j) * chunk:][:chunk] = x_cl[n, row0 + i, col0 + j, c0:c0 + chunk], zeros outside x_cl."""
    h_in, w_in = x_cl.shape[1], x_cl.shape[2]
    for i in range(6):
        row = row0 + i
        for j in range(6):
            col = col0 + j
            if 0 <= row < h_in and 0 <= col < w_in:
                copy_block(d, (6 * i + j) * chunk, x_cl[n, row, col], c0, chunk)
            else:  # the padding
                copy_block(d, (6 * i + j) * chunk, zeros, 0, chunk)


def _make_winograd5(rows, lanes, chunk):
    """F(2x2, 5x5) forward kernel: matrix-product tiles of `rows` tiles x `lanes` output channels, input channels
    transformed `chunk` at a time."""
    tile = rows * lanes
    staged = 36 * chunk
    row_sums, quad = 12 * lanes, 4 * lanes
    _stack_tile = tile_allocator()

    @_jit
    def winograd5(x_cl, top, left, u, b, floor, tile_rows, tile_cols, n_groups, y, finite):
        """The 5x5 stride-1 correlation of channels-last x_cl[N, H, W, C] (C a multiple of `chunk`) zero-padded by
        `top` rows and `left` columns, and below and right by as many as the tiles read, with the transformed
        weights u[36, C, K padded to `lanes`] (u[6a + b] = (G w G^T)[a, b]), plus b, ReLU'd against floor (0;
        -inf for none; NaN kept), into y[N, P, Q, K] (channels last): per band of 2x2 output tiles, V = B^T d B of
        each tile's 6x6 window, M[e] = V[e] @ u[e] for the 36 elements, then Y = A^T M A. finite[n]: whether image
        n's outputs all came out finite. Images are dealt to n_groups tasks; each image's outputs are computed
        alike whatever the grouping."""
        n_images, c = x_cl.shape[0], x_cl.shape[3]
        k_padded = u.shape[2]
        p_out, q_out, n_out = y.shape[1], y.shape[2], y.shape[3]
        band_rows = max(1, WINOGRAD_BAND // tile_cols)
        band_padded = (min(band_rows, tile_rows) * tile_cols + rows - 1) // rows * rows
        zero = x_cl.dtype.type(0)
        n_groups = min(n_groups, n_images)
        for group in prange(n_groups):
            acc = _stack_tile(tile, x_cl.dtype)
            xs = _stack_tile(rows, x_cl.dtype)
            d = _stack_tile(staged, x_cl.dtype)
            tt = _stack_tile(staged, x_cl.dtype)
            ss = _stack_tile(row_sums, x_cl.dtype)
            outs = _stack_tile(quad, x_cl.dtype)
            zeros = _stack_tile(chunk, x_cl.dtype)
            for l in range(chunk):
                zeros[l] = zero
            # per element, a band's V[e] (tiles x C) and M[e] (tiles x lanes), rows 16 values past a multiple of
            # the band's size so that the 36 rows a tile writes fall into different L1 sets
            v_row, m_row = band_padded * c + 16, band_padded * lanes + 16
            v = cache_aligned(np.zeros(36 * v_row + 16, x_cl.dtype), 36 * v_row).reshape(36, v_row)
            m = cache_aligned(np.empty(36 * m_row + 16, x_cl.dtype), 36 * m_row).reshape(36, m_row)
            for n in range(group, n_images, n_groups):
                check = zero
                for tr0 in range(0, tile_rows, band_rows):
                    n_band = (min(tr0 + band_rows, tile_rows) - tr0) * tile_cols
                    for t in range(n_band):
                        tr, tc = tr0 + t // tile_cols, t % tile_cols
                        for c0 in range(0, c, chunk):
                            _load_window(d, x_cl, n, 2 * tr - top, 2 * tc - left, c0, chunk, zeros)
                            _window_transform(d, tt, v, t * c + c0, chunk)
                    for k0 in range(0, k_padded, lanes):
                        for e in range(36):
                            v_e, u_e, m_e = v[e], u[e], m[e]
                            for t0 in range(0, n_band, rows):  # the band's last tile rows may run into stale V
                                for i in range(rows):
                                    for l in range(lanes):
                                        acc[i * lanes + l] = zero
                                for ch in range(c):
                                    u_vec = u_e[ch, k0:k0 + lanes]
                                    for i in range(rows):
                                        xs[i] = v_e[np.uint64((t0 + i) * c + ch)]  # unsigned: no wraparound code
                                    for l in range(lanes):
                                        u_l = u_vec[l]
                                        for i in range(rows):
                                            acc[i * lanes + l] += xs[i] * u_l
                                for i in range(rows):
                                    copy_block(m_e, (t0 + i) * lanes, acc, i * lanes, lanes)
                        b_vec = b[k0:k0 + lanes]
                        n_lanes = min(lanes, n_out - k0)
                        for t in range(n_band):
                            tr, tc = tr0 + t // tile_cols, t % tile_cols
                            at = t * lanes
                            for j in range(6):  # A^T M: the two output rows of each column of M
                                m0, m1, m2 = m[j, at:], m[6 + j, at:], m[12 + j, at:]
                                m3, m4, m5 = m[18 + j, at:], m[24 + j, at:], m[30 + j, at:]
                                s0, s1 = ss[j * lanes:], ss[(6 + j) * lanes:]
                                for l in range(lanes):
                                    s0[l] = m0[l] + m1[l] + m2[l] + m3[l] + m4[l]
                                    m34 = m3[l] - m4[l]
                                    s1[l] = m1[l] - m2[l] + (m34 + m34) + m5[l]
                            for i in range(2):  # then along each row: the tile's two outputs
                                s, o0s, o1s = ss[6 * i * lanes:], outs[2 * i * lanes:], outs[(2 * i + 1) * lanes:]
                                for l in range(lanes):
                                    o0 = b_vec[l] + (s[l] + s[lanes + l] + s[2 * lanes + l] + s[3 * lanes + l]
                                                     + s[4 * lanes + l])
                                    s34 = s[3 * lanes + l] - s[4 * lanes + l]
                                    o1 = b_vec[l] + (s[lanes + l] - s[2 * lanes + l] + (s34 + s34) + s[5 * lanes + l])
                                    check += (o0 + o1) * zero  # NaN once either is NaN or inf
                                    o0s[l] = floor if o0 < floor else o0  # ReLU; NaN < 0 is false: NaN stays
                                    o1s[l] = floor if o1 < floor else o1
                            for o in range(4):
                                i, j = 2 * tr + o // 2, 2 * tc + o % 2
                                if i < p_out and j < q_out:
                                    if n_lanes == lanes:
                                        copy_block(y[n, i, j], k0, outs, o * lanes, lanes)
                                    else:
                                        y_px = y[n, i, j, k0:]
                                        for l in range(n_lanes):
                                            y_px[l] = outs[o * lanes + l]
                finite[n] = check == check

    return winograd5


def _make_winograd5_weight_grad(rows, lanes, chunk, band):
    tile = rows * lanes
    staged, quad = 36 * chunk, 4 * chunk
    _stack_tile = tile_allocator()

    @_jit
    def winograd5_weight_grad(x_cl, top, left, dy, tile_rows, tile_cols, mt, dbt):
        """mt[h, e, c, k] = sum over the images of chunk h (mt.shape[0] contiguous chunks of the batch) and their
        2x2 tiles of dy of V[e, c] * Z[e, k] (V = B^T d B of the tile's 6x6 window of x_cl[N, H, W, C] zero-padded
        by `top` rows and `left` columns, Z = A g A^T of its 2x2 of dy[N, P, Q, K], dy past P or Q as zeros);
        dbt[h, k] the chunk's sum of dy. C and dy's K multiples of `chunk`, C of `rows`; mt's K padded to `lanes`
        (the padded lanes come out zero). Per element: images in order, tiles in order."""
        n_images, c = x_cl.shape[0], x_cl.shape[3]
        p_out, q_out, n_out = dy.shape[1], dy.shape[2], dy.shape[3]
        n_chunks, k_padded = mt.shape[0], dbt.shape[1]
        n_tiles = tile_rows * tile_cols
        zero = x_cl.dtype.type(0)
        for h in prange(n_chunks):
            acc = _stack_tile(tile, x_cl.dtype)
            xs = _stack_tile(rows, x_cl.dtype)
            d = _stack_tile(staged, x_cl.dtype)
            tt = _stack_tile(staged, x_cl.dtype)
            g = _stack_tile(quad, x_cl.dtype)
            zeros = _stack_tile(chunk, x_cl.dtype)
            for l in range(chunk):
                zeros[l] = zero
            v_row, z_row = band * c + 16, band * k_padded + 16
            v = cache_aligned(np.empty(36 * v_row + 16, x_cl.dtype), 36 * v_row).reshape(36, v_row)
            z = cache_aligned(np.empty(36 * z_row + 16, x_cl.dtype), 36 * z_row).reshape(36, z_row)
            for e in range(36):  # Z's padded lanes are never written: zeros
                for i in range(z_row):
                    z[e, i] = zero
            part = mt[h]
            for e in range(36):
                for i in range(c * k_padded):
                    part[e, i] = zero
            sums = dbt[h]
            for k in range(k_padded):
                sums[k] = zero
            for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                for t0 in range(0, n_tiles, band):
                    n_band = min(band, n_tiles - t0)
                    for t in range(n_band):
                        tr, tc = (t0 + t) // tile_cols, (t0 + t) % tile_cols
                        for c0 in range(0, c, chunk):
                            _load_window(d, x_cl, n, 2 * tr - top, 2 * tc - left, c0, chunk, zeros)
                            _window_transform(d, tt, v, t * c + c0, chunk)
                        for k0 in range(0, n_out, chunk):
                            for a in range(2):
                                for b in range(2):
                                    i, j = 2 * tr + a, 2 * tc + b
                                    if i < p_out and j < q_out:
                                        copy_block(g, (2 * a + b) * chunk, dy[n, i, j], k0, chunk)
                                    else:  # past an odd P or Q
                                        copy_block(g, (2 * a + b) * chunk, zeros, 0, chunk)
                            sum_row = sums[k0:k0 + chunk]
                            for l in range(chunk):
                                g0, g1, g2, g3 = g[l], g[chunk + l], g[2 * chunk + l], g[3 * chunk + l]
                                sum_row[l] += (g0 + g1) + (g2 + g3)  # Z[7]: the tile's four values
                            # A g A^T: A on the columns of g (rows of tt), then on each of the 6 rows
                            for j in range(2):
                                src, dst = g[j * chunk:], tt[j * chunk:]
                                for l in range(chunk):
                                    r0, r1, r2, r3, r4, r5 = _pair_transform(src[l], src[2 * chunk + l])
                                    dst[l], dst[2 * chunk + l], dst[4 * chunk + l] = r0, r1, r2
                                    dst[6 * chunk + l], dst[8 * chunk + l], dst[10 * chunk + l] = r3, r4, r5
                            for a in range(6):
                                src, at = tt[2 * a * chunk:], t * k_padded + k0
                                z0s, z1s, z2s = z[6 * a, at:], z[6 * a + 1, at:], z[6 * a + 2, at:]
                                z3s, z4s, z5s = z[6 * a + 3, at:], z[6 * a + 4, at:], z[6 * a + 5, at:]
                                for l in range(chunk):
                                    z0, z1, z2, z3, z4, z5 = _pair_transform(src[l], src[chunk + l])
                                    z0s[l], z1s[l], z2s[l], z3s[l], z4s[l], z5s[l] = z0, z1, z2, z3, z4, z5
                    for e in range(36):
                        v_e, z_e, m_e = v[e], z[e], part[e]
                        for c0 in range(0, c, rows):
                            for k0 in range(0, k_padded, lanes):
                                for i in range(rows):
                                    copy_block(acc, i * lanes, m_e, (c0 + i) * k_padded + k0, lanes)
                                for t in range(n_band):
                                    # unsigned indices: no code for negative ones (wraparound) in the inner loop
                                    z_at, v_at = np.uint64(t * k_padded + k0), np.uint64(t * c + c0)
                                    for i in range(rows):
                                        xs[i] = v_e[v_at + np.uint64(i)]
                                    for l in range(lanes):
                                        z_l = z_e[z_at + np.uint64(l)]
                                        for i in range(rows):
                                            acc[i * lanes + l] += xs[i] * z_l
                                for i in range(rows):
                                    copy_block(m_e, (c0 + i) * k_padded + k0, acc, i * lanes, lanes)

    return winograd5_weight_grad


_winograd5_wide = _make_winograd5(*WINOGRAD_TILE_WIDE, WINOGRAD_CHUNK)
_winograd5_narrow = _make_winograd5(*WINOGRAD_TILE_NARROW, WINOGRAD_CHUNK)
_winograd5_weight_grad = _make_winograd5_weight_grad(*WINOGRAD5_GRAD_TILE, WINOGRAD_CHUNK, WINOGRAD5_GRAD_BAND)
