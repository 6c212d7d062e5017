"""The jit backend's Winograd weight gradient of a 3x3 or 5x5 stride-1 convolution, F(3x3, 2x2) and F(5x5, 2x2), or
F(3x3, 4x4) and F(5x5, 4x4) where dy has enough 4x4 tiles: the weight gradient is itself a correlation, of the
padded input with dy, whose "output" is the kernel and whose "filter" is a tile of dy. Host side and kernel in one
file; the kernel inlines winograd_stages.py's stages and closes over its source stamp, so Numba's cache sees a change
there too.

Why it is exact. The forward's F(2x2, size x size) (winograd.py) computes y = A^T [(G w G^T) * (B^T d B)] A for the
tile's window d, and that equals the direct sum for every w. So sum_ij y_ij g_ij (g: the tile's 2x2 of dy) can be
written both as sum_rs w_rs dw_rs (the direct weight gradient of that tile) and as
sum_rs w_rs [G^T ((A g A^T) * (B^T d B)) G]_rs; as both hold for every w, the tile's dw = G^T [(A g A^T) *
(B^T d B)] G. Summed over the tiles of the batch, the transform back (G^T . G) is applied once per (k, c) pair:

    M[e, c, k] = sum over tiles t of V[t, e, c] * Z[t, e, k],   V = B^T d B (x's window), Z = A g A^T
    dw[k, c] = G^T M[:, c, k] G                                 (e = window a + b, the tile's elements)

16 products per 2x2 tile and (c, k) pair for 3x3 against the direct 36 (4 outputs x 9 taps), 36 per 4x4 tile
against 144 (its A and G are F(4x4, 3x3)'s, its windows 6x6), for 5x5 36 against 100 and 64 against 400 (F(4x4,
5x5)'s, 8x8 windows).
M is a matrix product per element over the tiles (the reduction dimension: images x tiles), each a (C x K)
register tile summed over a band of tiles. db is the sum of each tile's dy values.

`_make_winograd_weight_grad`: a task per fixed chunk of images (GRAD_IMAGE_CHUNKS, so the sums do not depend on the
thread count); per image and band of tiles, V and Z of every tile into two buffers that stay in L2, then the
products, each tile of `rows` input channels x `lanes` output channels loaded from the chunk's M, summed over the
band's tiles (a vector of Z against `rows` broadcast values of V) and stored back. The host adds the chunks in
order and transforms back, in float64. Where the result is not finite (an inf or NaN in x or dy: the transforms'
sums turn inf into NaN where the direct sum may keep it), the caller computes directly.
"""

import numpy as np

from numba_cnn.kernels._numba_ext import (TILE_BITS, TILE_REGISTERS, cache_aligned, copy_block, jit as _jit, part_range,
                                          parts_kernel, run_parts, tile_allocator)
from numba_cnn.kernels.jit.buffers import nhwc, round_up, scratch
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS, WINOGRAD_CHUNK, _winograd_sandwich
from numba_cnn.kernels.jit.winograd import WINOGRAD_G, winograd_output_tile
from numba_cnn.kernels.jit.winograd_stages import (STAGES_STAMP, _grad_products, _gradient_transform4,
                                                   _gradient_transform6, _gradient_transform6x4,
                                                   _gradient_transform8x4, _load_window, _tile_input4,
                                                   _tile_input6, _tile_input8)

# (rows of input channels, lanes of output channels) of the products' register tile, and tiles per band
if TILE_BITS >= 512 and TILE_REGISTERS >= 32:
    WINOGRAD_GRAD_TILE = (8, 32)  # 16 zmm
else:
    WINOGRAD_GRAD_TILE = (4, 16)  # 8 ymm
WINOGRAD_GRAD_BAND = 32
# dy's 4x4 tiles (F(3x3, 4x4)) from this many per image on, where winograd.py's share also favours them: the products
# sum over an image's band of tiles, and a band of fewer loads and stores its accumulators for too few steps
WINOGRAD_GRAD_4X4_TILES = 16
# G^T by (kernel size, dy's tile): the transforms back of this kernel's elements
WINOGRAD_G_T = {key: np.ascontiguousarray(g.T) for key, g in WINOGRAD_G.items()}


def winograd_grad_path(size, out=2):
    """The path's description that bench and the tests read."""
    return (f"dw by Winograd F({size}x{size}, {out}x{out}), products in tiles of {WINOGRAD_GRAD_TILE[0]} input x "
            f"{WINOGRAD_GRAD_TILE[1]} output channels")


def winograd_grad_fits(w_shape, stride):
    """Whether a layer's weight gradient takes this kernel: 3x3 or 5x5, stride 1, input channels a multiple of the
    transform's step (WINOGRAD_CHUNK), as for the forward (output channels any: dy is then copied with zero
    channels up to a multiple)."""
    k, c, r, s = w_shape
    return stride == 1 and r == s and r in (3, 5) and c % WINOGRAD_CHUNK == 0


def winograd_weight_grad(dy, x, padding, size=3):
    """(dw[K, C, size, size], db[K], multiply-adds executed, the path) of a stride-1 convolution of x[N, C, H, W]
    zero-padded by padding = (top, bottom, left, right), from dy[N, K, P, Q] (either layout; copied channels-last
    where not so); None where a result came out non-finite (the caller then computes directly)."""
    n, k, p, q = dy.shape
    c = x.shape[1]
    rows, lanes = WINOGRAD_GRAD_TILE
    # the products sum over the tiles: no rounding to register tiles
    out = winograd_output_tile(size, p, q, 1) if -(-p // 4) * -(-q // 4) >= WINOGRAD_GRAD_4X4_TILES else 2
    window = out + size - 1
    elements = window * window
    k_padded = round_up(k, lanes)
    tile_rows, tile_cols = -(-p // out), -(-q // out)
    chunks = min(GRAD_IMAGE_CHUNKS, n)
    mt = scratch(f"winograd_grad.m{size}x{out}", (chunks, elements, c * k_padded), x.dtype)
    dbt = scratch("winograd_grad.db", (chunks, k_padded), x.dtype)
    if k % WINOGRAD_CHUNK:  # the transform reads whole vectors of channels: zero channels up to one
        dy_cl = scratch("winograd_grad.dy", (n, p, q, round_up(k, WINOGRAD_CHUNK)), dy.dtype)
        dy_cl[..., k:] = 0
        dy_cl[..., :k] = dy.transpose(0, 2, 3, 1)
    else:
        dy_cl = nhwc(dy)
    _KERNELS[size, out](nhwc(x), padding[0], padding[2], dy_cl, tile_rows, tile_cols, mt, dbt)
    m = scratch(f"winograd_grad.m{size}x{out}.sum", mt.shape[1:], np.float64)
    _chunks_in_order(mt, m)
    dw = np.empty((k, c, size, size), x.dtype)
    # G^T M G, rounded once
    _winograd_sandwich(m.reshape(window, window, c, k_padded), WINOGRAD_G_T[size, out], False,
                       dw.reshape(k, c, size * size))
    db = dbt.sum(axis=0, dtype=np.float64)[:k].astype(x.dtype)
    if not (np.isfinite(dw).all() and np.isfinite(db).all()):
        return None
    return dw, db, n * tile_rows * tile_cols * elements * c * k_padded, winograd_grad_path(size, out)


@parts_kernel
@_jit(parallel=False)
def _chunks_in_order(part, n_parts, mt, m):
    """m[e, i] = the sum of mt[h, e, i] over the chunks h in order, in float64 (the same sums whatever the thread
    count); the chunks run in an outer loop, so each element's additions keep that order under fastmath."""
    n_chunks, elements, width = mt.shape
    for e in part_range(part, n_parts, elements):
        total, term = m[e], mt[0, e]
        for i in range(width):
            total[i] = term[i]
        for h in range(1, n_chunks):
            term = mt[h, e]
            for i in range(width):
                total[i] += term[i]


def _make_winograd_weight_grad(size, out, rows, lanes, chunk, band):
    window = out + size - 1
    elements = window * window
    tile = rows * lanes
    staged = elements * chunk
    dy_tile = out * out * chunk
    _stack_tile = tile_allocator()
    stages = STAGES_STAMP

    @_jit(parallel=False)
    def weight_grad_task(h, x_cl, top, left, dy, tile_rows, tile_cols, mt, dbt):
        """winograd_weight_grad's work for chunk h of the images: one of its parts, compiled on its own and run by
        run_parts (docs/numba.md, "What a kernel costs to compile")."""
        _ = stages  # the inlined stages' source stamp, in Numba's cache key
        n_images, c = x_cl.shape[0], x_cl.shape[3]
        n_out = dy.shape[3]
        n_chunks, k_padded = mt.shape[0], dbt.shape[1]
        n_tiles = tile_rows * tile_cols
        zero = x_cl.dtype.type(0)
        acc = _stack_tile(tile, x_cl.dtype)
        xs = _stack_tile(rows, x_cl.dtype)
        d = _stack_tile(staged, x_cl.dtype)
        tt = _stack_tile(staged, x_cl.dtype)
        vv = _stack_tile(staged, x_cl.dtype)
        g = _stack_tile(dy_tile, x_cl.dtype)
        zeros = _stack_tile(chunk, x_cl.dtype)
        for l in range(chunk):
            zeros[l] = zero
        # per element e, the band's V[e] (tiles x C) and Z[e] (tiles x K padded), each row on a cache line and
        # 16 values past a multiple of the band's size (the rows a tile writes fall in different L1 sets)
        v_row, z_row = band * c + 16, band * k_padded + 16
        v = cache_aligned(np.empty(elements * v_row + 16, x_cl.dtype), elements * v_row).reshape(elements, v_row)
        z = cache_aligned(np.empty(elements * z_row + 16, x_cl.dtype), elements * z_row).reshape(elements, z_row)
        for e in range(elements):  # Z's padded lanes are never written: zeros
            for i in range(z_row):
                z[e, i] = zero
        part = mt[h]
        for e in range(elements):
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
                    row0, col0 = out * tr - top, out * tc - left
                    if window == 4:
                        _tile_input4(v, t * c, d, tt, vv, x_cl, n, row0, col0, chunk, zeros, window)
                    elif window == 6:
                        _tile_input6(v, t * c, d, tt, vv, x_cl, n, row0, col0, chunk, zeros, window)
                    else:
                        _tile_input8(v, t * c, d, tt, vv, x_cl, n, row0, col0, chunk, zeros, window)
                    for k0 in range(0, n_out, chunk):
                        _load_window(g, dy, n, out * tr, out * tc, k0, chunk, zeros, out)  # zeros past P or Q
                        if out == 4 and size == 5:
                            _gradient_transform8x4(g, tt, vv, sums[k0:k0 + chunk], chunk)
                        elif out == 4:
                            _gradient_transform6x4(g, tt, vv, sums[k0:k0 + chunk], chunk)
                        elif size == 3:
                            _gradient_transform4(g, vv, sums[k0:k0 + chunk], chunk)
                        else:
                            _gradient_transform6(g, vv, sums[k0:k0 + chunk], chunk)
                        for e in range(elements):
                            copy_block(z[e], t * k_padded + k0, vv, e * chunk, chunk)
                _grad_products(v, z, part, acc, xs, n_band, c, k_padded, elements, rows, lanes)

    def winograd_weight_grad(x_cl, top, left, dy, tile_rows, tile_cols, mt, dbt):
        """mt[h, e, c, k] = sum over the images of chunk h (mt.shape[0] contiguous chunks of the batch) and their
        2x2 tiles of dy of V[e, c] * Z[e, k] (V = B^T d B of the tile's window of x_cl[N, H, W, C] zero-padded by
        `top` rows and `left` columns, Z = A g A^T of its 2x2 of dy[N, P, Q, K], dy past P or Q as zeros);
        dbt[h, k] the chunk's sum of dy. C and dy's K multiples of `chunk`, C of `rows`; mt's K padded to `lanes`
        (the padded lanes come out zero). Per element: images in order, tiles in order."""
        run_parts(weight_grad_task, mt.shape[0], x_cl, top, left, dy, tile_rows, tile_cols, mt, dbt)

    winograd_weight_grad.task = weight_grad_task  # the jit function that compiles (cold_compile.kernels)
    return winograd_weight_grad


_winograd_weight_grad = _make_winograd_weight_grad(3, 2, *WINOGRAD_GRAD_TILE, WINOGRAD_CHUNK, WINOGRAD_GRAD_BAND)
_winograd4_weight_grad = _make_winograd_weight_grad(3, 4, *WINOGRAD_GRAD_TILE, WINOGRAD_CHUNK, WINOGRAD_GRAD_BAND)
_winograd5_weight_grad = _make_winograd_weight_grad(5, 2, *WINOGRAD_GRAD_TILE, WINOGRAD_CHUNK, WINOGRAD_GRAD_BAND)
_winograd5x4_weight_grad = _make_winograd_weight_grad(5, 4, *WINOGRAD_GRAD_TILE, WINOGRAD_CHUNK, WINOGRAD_GRAD_BAND)
_KERNELS = {(3, 2): _winograd_weight_grad, (3, 4): _winograd4_weight_grad, (5, 2): _winograd5_weight_grad,
            (5, 4): _winograd5x4_weight_grad}
