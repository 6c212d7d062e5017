"""The jit backend's Winograd weight gradient of a 3x3 stride-1 convolution, F(3x3, 2x2): the weight gradient is
itself a correlation, of the padded input with dy, whose "output" is the 3x3 kernel and whose "filter" is a 2x2
tile of dy. Host side and kernel in one self-contained file (Numba's cache sees every change to what it compiles;
`_numba_ext`'s `stack_tile`, `copy_block` and `cache_aligned` are inlined).

Why it is exact. The forward's F(2x2, 3x3) computes y = A^T [(G w G^T) * (B^T d B)] A for a 4x4 input tile d, and
that equals the direct sum for every w. So sum_ij y_ij g_ij (g: the tile's 2x2 of dy) can be written both as
sum_rs w_rs dw_rs (the direct weight gradient of that tile) and as sum_rs w_rs [G^T ((A g A^T) * (B^T d B)) G]_rs;
as both hold for every w, the tile's dw = G^T [(A g A^T) * (B^T d B)] G. Summed over the tiles of the batch, the
transform back (G^T . G) is applied once per (k, c) pair at the end:

    M[e, c, k] = sum over tiles t of V[t, e, c] * Z[t, e, k],   V = B^T d B (x's 4x4 window), Z = A g A^T
    dw[k, c] = G^T M[:, c, k] G                                 (e = 4a + b, the 16 elements of a 4x4 tile)

16 products per tile and (c, k) pair against the direct 36 (4 outputs x 9 taps): 2.25 times fewer. M is 16 matrix
products over the tiles (the reduction dimension: images x tiles), each a (C x K) register tile summed over a band
of tiles. db is the sum of Z[5] = the sum of each tile's four dy values.

`_winograd_weight_grad`: a task per fixed chunk of images (GRAD_IMAGE_CHUNKS, so the sums do not depend on the
thread count); per image and band of tiles, V and Z of every tile (additions only) into two buffers that stay in
L2, then the 16 products, each tile of `rows` input channels x `lanes` output channels loaded from the chunk's M,
summed over the band's tiles (a vector of Z against `rows` broadcast values of V) and stored back. The host adds
the chunks in order (float64) and transforms back. Where the result is not finite (an inf or NaN in x or dy: the
transforms' sums turn inf into NaN where the direct sum may keep it), the caller computes directly.
"""

import numpy as np
from numba import prange

from numba_cnn.kernels._numba_ext import (TILE_BITS, TILE_REGISTERS, cache_aligned, copy_block, jit as _jit,
                                          tile_allocator)
from numba_cnn.kernels.jit.buffers import nhwc, round_up, scratch
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS, WINOGRAD_CHUNK
from numba_cnn.kernels.jit.winograd5 import winograd5_grad_fits, winograd5_weight_grad

# (rows of input channels, lanes of output channels) of the products' register tile, and tiles per band
if TILE_BITS >= 512 and TILE_REGISTERS >= 32:
    WINOGRAD_GRAD_TILE = (8, 32)  # 16 zmm
else:
    WINOGRAD_GRAD_TILE = (4, 16)  # 8 ymm
WINOGRAD_GRAD_BAND = 32

WINOGRAD_GRAD_PATH = (f"dw by Winograd F(3x3, 2x2), products in tiles of {WINOGRAD_GRAD_TILE[0]} input x "
                      f"{WINOGRAD_GRAD_TILE[1]} output channels")

def winograd_grad_fits(w_shape, stride):
    """Whether a layer's weight gradient takes this kernel: 3x3, stride 1, input channels a multiple of the
    transform's vector (WINOGRAD_CHUNK), as for the forward (output channels any: dy is then copied with zero
    channels up to a multiple); or winograd5.py's F(5x5, 2x2) for 5x5 on the same terms."""
    k, c, r, s = w_shape
    return (stride == 1 and r == s == 3 and c % WINOGRAD_CHUNK == 0) or winograd5_grad_fits(w_shape, stride)


def winograd_weight_grad(dy, x, padding, size=3):
    """(dw[K, C, 3, 3], db[K], multiply-adds executed, the path) of a stride-1 3x3 convolution of x[N, C, H, W]
    zero-padded by padding = (top, bottom, left, right), from dy[N, K, P, Q] (either layout; copied channels-last
    where not so); None where a result came out non-finite (the caller then computes directly). size 5: the 5x5
    kernel's, by winograd5.py."""
    if size == 5:
        return winograd5_weight_grad(dy, x, padding)
    n, k, p, q = dy.shape
    c = x.shape[1]
    rows, lanes = WINOGRAD_GRAD_TILE
    k_padded = round_up(k, lanes)
    tile_rows, tile_cols = (p + 1) // 2, (q + 1) // 2
    chunks = min(GRAD_IMAGE_CHUNKS, n)
    mt = scratch("winograd_grad.m", (chunks, 16, c * k_padded), x.dtype)
    dbt = scratch("winograd_grad.db", (chunks, k_padded), x.dtype)
    if k % WINOGRAD_CHUNK:  # the transform reads whole vectors of channels: zero channels up to one
        dy_cl = scratch("winograd_grad.dy", (n, p, q, round_up(k, WINOGRAD_CHUNK)), dy.dtype)
        dy_cl[..., k:] = 0
        dy_cl[..., :k] = dy.transpose(0, 2, 3, 1)
    else:
        dy_cl = nhwc(dy)
    _winograd_weight_grad(nhwc(x), padding[0], padding[2], dy_cl, tile_rows, tile_cols, mt, dbt)
    dw = np.empty((k, c, 3, 3), x.dtype)
    _transform_back(mt, dw)
    db = dbt.sum(axis=0, dtype=np.float64)[:k].astype(x.dtype)
    if not (np.isfinite(dw).all() and np.isfinite(db).all()):
        return None
    return dw, db, n * tile_rows * tile_cols * 16 * c * k_padded, WINOGRAD_GRAD_PATH


def _make_winograd_weight_grad(rows, lanes, chunk, band):
    tile = rows * lanes
    staged = 16 * chunk
    quad = 4 * chunk
    _stack_tile = tile_allocator()

    @_jit
    def winograd_weight_grad(x_cl, top, left, dy, tile_rows, tile_cols, mt, dbt):
        """mt[h, e, c, k] = sum over the images of chunk h (mt.shape[0] contiguous chunks of the batch) and their
        2x2 tiles of dy of V[e, c] * Z[e, k] (V = B^T d B of the tile's 4x4 window of x_cl[N, H, W, C] zero-padded
        by `top` rows and `left` columns, Z = A g A^T of its 2x2 of dy[N, P, Q, K], dy past P or Q as zeros);
        dbt[h, k] the chunk's sum of dy. C and dy's K multiples of `chunk`, C of `rows`; mt's K padded to `lanes`
        (the padded lanes come out zero). Per element: images in order, tiles in order."""
        n_images, h_in, w_in, c = x_cl.shape
        p_out, q_out, n_out = dy.shape[1], dy.shape[2], dy.shape[3]
        n_chunks, k_padded = mt.shape[0], dbt.shape[1]
        n_tiles = tile_rows * tile_cols
        zero = x_cl.dtype.type(0)
        for h in prange(n_chunks):
            acc = _stack_tile(tile, x_cl.dtype)
            xs = _stack_tile(rows, x_cl.dtype)
            d = _stack_tile(staged, x_cl.dtype)
            vv = _stack_tile(staged, x_cl.dtype)
            g = _stack_tile(quad, x_cl.dtype)
            zeros = _stack_tile(chunk, x_cl.dtype)
            for l in range(chunk):
                zeros[l] = zero
            # per element e, the band's V[e] (tiles x C) and Z[e] (tiles x K padded), each row on a cache line and
            # 16 values past a multiple of the band's size (the 16 rows a tile writes fall in different L1 sets)
            v_row, z_row = band * c + 16, band * k_padded + 16
            v = cache_aligned(np.empty(16 * v_row + 16, x_cl.dtype), 16 * v_row).reshape(16, v_row)
            z = cache_aligned(np.empty(16 * z_row + 16, x_cl.dtype), 16 * z_row).reshape(16, z_row)
            for e in range(16):  # Z's padded lanes are never written: zeros
                for i in range(z_row):
                    z[e, i] = zero
            part = mt[h]
            for e in range(16):
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
                            for i in range(4):
                                row = 2 * tr + i - top
                                for j in range(4):
                                    col = 2 * tc + j - left
                                    if 0 <= row < h_in and 0 <= col < w_in:
                                        copy_block(d, (4 * i + j) * chunk, x_cl[n, row, col], c0, chunk)
                                    else:  # the padding
                                        copy_block(d, (4 * i + j) * chunk, zeros, 0, chunk)
                            for l in range(chunk):
                                # B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3), then the same on columns
                                d0, d1, d2, d3 = d[l], d[chunk + l], d[2 * chunk + l], d[3 * chunk + l]
                                d4, d5, d6, d7 = d[4 * chunk + l], d[5 * chunk + l], d[6 * chunk + l], d[7 * chunk + l]
                                d8, d9, d10, d11 = (d[8 * chunk + l], d[9 * chunk + l], d[10 * chunk + l],
                                                    d[11 * chunk + l])
                                d12, d13, d14, d15 = (d[12 * chunk + l], d[13 * chunk + l], d[14 * chunk + l],
                                                      d[15 * chunk + l])
                                e0, e1, e2, e3 = d0 - d8, d1 - d9, d2 - d10, d3 - d11
                                e4, e5, e6, e7 = d4 + d8, d5 + d9, d6 + d10, d7 + d11
                                e8, e9, e10, e11 = d8 - d4, d9 - d5, d10 - d6, d11 - d7
                                e12, e13, e14, e15 = d4 - d12, d5 - d13, d6 - d14, d7 - d15
                                vv[l], vv[chunk + l] = e0 - e2, e1 + e2
                                vv[2 * chunk + l], vv[3 * chunk + l] = e2 - e1, e1 - e3
                                vv[4 * chunk + l], vv[5 * chunk + l] = e4 - e6, e5 + e6
                                vv[6 * chunk + l], vv[7 * chunk + l] = e6 - e5, e5 - e7
                                vv[8 * chunk + l], vv[9 * chunk + l] = e8 - e10, e9 + e10
                                vv[10 * chunk + l], vv[11 * chunk + l] = e10 - e9, e9 - e11
                                vv[12 * chunk + l], vv[13 * chunk + l] = e12 - e14, e13 + e14
                                vv[14 * chunk + l], vv[15 * chunk + l] = e14 - e13, e13 - e15
                            for e in range(16):
                                copy_block(v[e], t * c + c0, vv, e * chunk, chunk)
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
                                # A g A^T, A's rows (1, 0), (1, 1), (1, -1), (0, -1): on rows, then on columns
                                g0, g1, g2, g3 = g[l], g[chunk + l], g[2 * chunk + l], g[3 * chunk + l]
                                r0, r1 = g0, g1
                                r2, r3 = g0 + g2, g1 + g3
                                r4, r5 = g0 - g2, g1 - g3
                                r6, r7 = -g2, -g3
                                vv[l], vv[chunk + l] = r0, r0 + r1
                                vv[2 * chunk + l], vv[3 * chunk + l] = r0 - r1, -r1
                                vv[4 * chunk + l], vv[5 * chunk + l] = r2, r2 + r3
                                vv[6 * chunk + l], vv[7 * chunk + l] = r2 - r3, -r3
                                vv[8 * chunk + l], vv[9 * chunk + l] = r4, r4 + r5
                                vv[10 * chunk + l], vv[11 * chunk + l] = r4 - r5, -r5
                                vv[12 * chunk + l], vv[13 * chunk + l] = r6, r6 + r7
                                vv[14 * chunk + l], vv[15 * chunk + l] = r6 - r7, -r7
                                sum_row[l] += r2 + r3  # Z[5]: the tile's four values
                            for e in range(16):
                                copy_block(z[e], t * k_padded + k0, vv, e * chunk, chunk)
                    for e in range(16):
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

    return winograd_weight_grad


_winograd_weight_grad = _make_winograd_weight_grad(*WINOGRAD_GRAD_TILE, WINOGRAD_CHUNK, WINOGRAD_GRAD_BAND)


@_jit
def _transform_back(mt, dw):
    """dw[k, c] = G^T M G (F(2x2, 3x3)'s G: rows (1, 0, 0), (1/2, 1/2, 1/2), (1/2, -1/2, 1/2), (0, 0, 1)) of
    M[e = 4a + b] = the sum of the chunks' mt[h, e, c * K padded + k] in chunk order, in float64, rounded once."""
    n_chunks = mt.shape[0]
    n_out, n_in = dw.shape[0], dw.shape[1]
    k_padded = mt.shape[2] // n_in
    for ch in prange(n_in):
        m = np.empty((16, n_out))
        for e in range(16):
            for k in range(n_out):
                m[e, k] = 0.0
            for h in range(n_chunks):
                row = mt[h, e, ch * k_padded:]
                for k in range(n_out):
                    m[e, k] += row[k]
        t = np.empty(12)  # G^T M of one (c, k), 3 x 4
        for k in range(n_out):
            for b in range(4):
                m0, m1, m2, m3 = m[b, k], m[4 + b, k], m[8 + b, k], m[12 + b, k]
                t[b], t[4 + b], t[8 + b] = m0 + 0.5 * (m1 + m2), 0.5 * (m1 - m2), 0.5 * (m1 + m2) + m3
            for r in range(3):
                t0, t1, t2, t3 = t[4 * r], t[4 * r + 1], t[4 * r + 2], t[4 * r + 3]
                dw[k, ch, r, 0] = t0 + 0.5 * (t1 + t2)
                dw[k, ch, r, 1] = 0.5 * (t1 - t2)
                dw[k, ch, r, 2] = 0.5 * (t1 + t2) + t3
