"""The jit backend's Winograd convolutions on the host side, F(4x4, 3x3) or F(2x2, 3x3) for 3x3 kernels and
F(4x4, 5x5) or F(2x2, 5x5) for 5x5 ones: which layers take them (`winograd_fits`) and which output tile
(`winograd_output_tile`), the filters' transform (`winograd_weights`, in float64), and the call of tiles.py's
`_make_winograd` kernels with the transformed weights, the bias and a channels-last input, read in place when the
caller's is stored so (the kernel reads the padding as zeros), else copied and padded so that every output tile's
window is in it (`winograd_conv`).
jit/__init__.py uses it for the forward (plain, and for 3x3 fused with ReLU + 2x2 max-pooling, whose windows the
output tiles hold) and for the input gradient of the dense backward (the full correlation of dy with the flipped
kernel, a stride-1 convolution of dy of the same size).

An m x m output tile of an r x r kernel reads an (m + r - 1)^2 window d, and Y = A^T [(G w G^T) * (B^T d B)] A. For
F(2x2, 3x3), the points 0, 1, -1 and infinity: B^T's rows (1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1),
G's (1, 0, 0), (1/2, 1/2, 1/2), (1/2, -1/2, 1/2), (0, 0, 1), A^T's (1, 1, 1, 0), (0, 1, -1, -1): 16 products per
tile and channel pair, against 36 directly. F(4x4, 3x3) and F(2x2, 5x5) both read 6x6 windows, on the points 0, 1,
-1, 2, -2 and infinity, so one B^T serves both: 36 products per tile against 144 and 100,

    B^T = [[4, 0, -5,  0, 1, 0],     G, 5x5 = [[ 1/4,    0,     0,    0,    0  ],    A^T, 5x5 = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4, 1, 1, 0],               [-1/6, -1/6,  -1/6, -1/6, -1/6 ],                [0, 1, -1, 2, -2, 1]]
           [0, 4, -4, -1, 1, 0],               [-1/6,  1/6,  -1/6,  1/6, -1/6 ],
           [0, -2, -1, 2, 1, 0],               [1/24, 1/12,  1/6,   1/3,  2/3 ],    A^T, 3x3 = [[1, 1,  1, 1,  1, 0],
           [0, 2, -1, -2, 1, 0],               [1/24, -1/12, 1/6,  -1/3,  2/3 ],                [0, 1, -1, 2, -2, 0],
           [0, 4, 0, -5,  0, 1]]               [ 0,     0,     0,    0,    1  ]]                [0, 1,  1, 4,  4, 0],
                                                                                                [0, 1, -1, 8, -8, 1]]

and F(4x4, 3x3)'s G has the rows (1/4, 0, 0), (-1/6, -1/6, -1/6), (-1/6, 1/6, -1/6), (1/24, 1/12, 1/6),
(1/24, -1/12, 1/6) and (0, 0, 1). F(4x4, 5x5) reads 8x8 windows, on those points and 1/2, -1/2: 64 products per
tile against 400, B^T and A^T given in winograd_stages.py (`_input_transform8`, `_output_line8x4`), with their rows
and columns scaled by powers of 2 so that their entries are integers, and G (`_G_4x4_5x5`) scaled back.

The 4x4 tile's products are fewer, but its larger transforms cost more per tile and its tiles waste more at a small
image's edge, so the glue takes it where its products, counted as the kernel computes them, are at most
WINOGRAD_4X4_SHARE[size] of F(2x2)'s. The kernels' transforms are winograd_stages.py's. How and why it works, with
numbers: docs/kernels.md, "Winograd: fewer multiplies for 3x3", "F(4x4, 3x3)", "Winograd for 5x5" and
"F(4x4, 5x5)".
"""

import functools

import numpy as np
from numba import get_num_threads

from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import aligned_zeros, padded_channels_last, reusable_output, round_up, scratch
from numba_cnn.kernels.jit.tiles import (WINOGRAD_BAND, WINOGRAD_CHUNK, WINOGRAD_TILE_NARROW, WINOGRAD_TILE_WIDE,
                                         _winograd4_narrow, _winograd4_wide, _winograd5_narrow, _winograd5_wide,
                                         _winograd5x4_narrow, _winograd5x4_wide, _winograd_narrow,
                                         _winograd_sandwich, _winograd_wide)

# G, the filters' transform, by (kernel size, output tile): (out + size - 1) x size
_G_4x4_3x3 = np.array([[1 / 4, 0, 0],
                       [-1 / 6, -1 / 6, -1 / 6],
                       [-1 / 6, 1 / 6, -1 / 6],
                       [1 / 24, 1 / 12, 1 / 6],
                       [1 / 24, -1 / 12, 1 / 6],
                       [0, 0, 1]])
_G_2x2_5x5 = np.array([[1 / 4, 0, 0, 0, 0],
                       [-1 / 6, -1 / 6, -1 / 6, -1 / 6, -1 / 6],
                       [-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6],
                       [1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3],
                       [1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3],
                       [0, 0, 0, 0, 1]])
# the points 0, 1, -1, 2, -2, 1/2, -1/2 and infinity, its rows divided by the powers of 2 that made B^T and A^T's
# entries integers (winograd_stages.py: _input_transform8, _output_line8x4)
_G_4x4_5x5 = np.array([[1 / 4, 0, 0, 0, 0],
                       [-1 / 18, -1 / 18, -1 / 18, -1 / 18, -1 / 18],
                       [-1 / 18, 1 / 18, -1 / 18, 1 / 18, -1 / 18],
                       [1 / 360, 1 / 180, 1 / 90, 1 / 45, 2 / 45],
                       [1 / 360, -1 / 180, 1 / 90, -1 / 45, 2 / 45],
                       [2 / 45, 1 / 45, 1 / 90, 1 / 180, 1 / 360],
                       [2 / 45, -1 / 45, 1 / 90, -1 / 180, 1 / 360],
                       [0, 0, 0, 0, 1 / 4]])
WINOGRAD_G = {(3, 2): np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
              (3, 4): _G_4x4_3x3, (5, 2): _G_2x2_5x5, (5, 4): _G_4x4_5x5}
_KERNELS = {(3, 2, WINOGRAD_TILE_WIDE[1]): _winograd_wide, (3, 2, WINOGRAD_TILE_NARROW[1]): _winograd_narrow,
            (3, 4, WINOGRAD_TILE_WIDE[1]): _winograd4_wide, (3, 4, WINOGRAD_TILE_NARROW[1]): _winograd4_narrow,
            (5, 2, WINOGRAD_TILE_WIDE[1]): _winograd5_wide, (5, 2, WINOGRAD_TILE_NARROW[1]): _winograd5_narrow,
            (5, 4, WINOGRAD_TILE_WIDE[1]): _winograd5x4_wide, (5, 4, WINOGRAD_TILE_NARROW[1]): _winograd5x4_narrow}
# by kernel size: F(4x4) where its products, tiles rounded as the kernel computes them, are at most this share of
# F(2x2)'s: its larger transforms cost more per tile, so nearly equal counts ran slower (docs/kernels.md)
WINOGRAD_4X4_SHARE = {3: 0.72, 5: 0.8}


@functools.lru_cache(maxsize=256)  # a few shapes per network, asked for on every call
def _computed_tiles(tile_rows, tile_cols, rows):
    """Tiles an image's products compute: each band of about WINOGRAD_BAND tiles (whole rows of tiles) rounded up
    to the register tile's `rows`."""
    band = max(1, WINOGRAD_BAND // tile_cols) * tile_cols
    return sum(round_up(min(band, tile_rows * tile_cols - t0), rows) for t0 in range(0, tile_rows * tile_cols, band))


def winograd_output_tile(size, p, q, rows):
    """The output tile's side for a size x size kernel over p x q outputs (winograd_conv passes their even part)
    with products in register tiles of `rows` tiles: 4 where F(4x4)'s products ((size + 3)^2 per tile: 36 for 3x3,
    64 for 5x5) come to WINOGRAD_4X4_SHARE[size] of F(2x2)'s ((size + 1)^2: 16, 36) or less, else 2."""
    products_4 = (size + 3) ** 2 * _computed_tiles(-(-p // 4), -(-q // 4), rows)
    products_2 = (size + 1) ** 2 * _computed_tiles(-(-p // 2), -(-q // 2), rows)
    return 4 if products_4 <= WINOGRAD_4X4_SHARE[size] * products_2 else 2


def winograd_fits(x_shape, w, stride, pool=False):
    """Whether a convolution takes the Winograd kernels: 3x3, or 5x5 when not fused with the pool; stride 1, input
    channels a multiple of the transform's step (WINOGRAD_CHUNK), more output channels than half the narrow
    tile's lanes (fewer would leave most of its lanes idle), finite weights (the transforms' sums would turn an inf
    weight into NaN outputs that the direct sum keeps inf; the inputs are checked by the kernel)."""
    k, c, r, s = w.shape
    return (stride == 1 and r == s and (r == 3 or (r == 5 and not pool)) and c % WINOGRAD_CHUNK == 0
            and 2 * k > WINOGRAD_TILE_NARROW[1] and x_shape[2] >= r and x_shape[3] >= r and np.isfinite(w).all())


def winograd_weights(w, out, k_padded):
    """u[window a + b, c, k] = (G w[k, c] G^T)[a, b] for F(out x out, size x size) (tiles.py's
    `_winograd_sandwich`: float64, rounded once), its lanes past K zero (the sandwich writes every lane below K)."""
    k, c, size, _ = w.shape
    window = out + size - 1
    u = scratch(f"winograd.u{window}", (window * window, c, k_padded), w.dtype)  # read only by the op that asks
    if k_padded > k:
        u[..., k:] = 0
    _winograd_sandwich(w.astype(np.float64), WINOGRAD_G[size, out], True, u)
    return u


def winograd_conv(x, w, b, relu, padding, pool):
    """The Winograd kernel's conv2d_forward (pool False: y[N, K, P, Q]) or, for 3x3, conv2d_relu_maxpool2d_forward
    (pool True, relu: (y[N, K, P//2, Q//2], argmax)), as NCHW views of channels-last buffers, with a description of
    the path and the multiply-adds executed ((out + size - 1)^2 products per tile, channel and lane; the transforms
    are additions and multiples); None when an output came out non-finite (the caller then computes directly)."""
    n, c, h, wd = x.shape
    k, _, size, _ = w.shape
    top, bottom, left, right = padding
    p, q = h + top + bottom - size + 1, wd + left + right - size + 1
    rows, lanes = WINOGRAD_TILE_NARROW if k <= WINOGRAD_TILE_NARROW[1] else WINOGRAD_TILE_WIDE
    # with the pool, tiles cover the pooled rows and columns, (out / 2)^2 windows a tile (an odd last row or column
    # of the convolution is pooled by none, as in the composed ops). The tile is chosen on those even rows and
    # columns with or without the pool: the fused op and the composed ones take the same tiles, so the same bits
    even_p, even_q = p // 2 * 2, q // 2 * 2
    out = winograd_output_tile(size, max(even_p, 1), max(even_q, 1), rows)
    tile_rows, tile_cols = (-(-even_p // out), -(-even_q // out)) if pool else (-(-p // out), -(-q // out))
    k_padded = round_up(k, lanes)
    u = winograd_weights(w, out, k_padded)
    bp = aligned_zeros(k_padded, x.dtype)
    bp[:k] = b
    if is_channels_last(x):  # read in place, the padding and the rows and columns past it as zeros
        x_cl, x_top, x_left = x.transpose(0, 2, 3, 1), top, left
    else:  # the kernel copies whole vectors of channels: a channels-last copy, padded while it is made
        # every tile reads its whole window: an odd P or Q needs a zero row or column beyond the padding
        extra_rows, extra_cols = max(0, out * tile_rows - p), max(0, out * tile_cols - q)
        x_cl = padded_channels_last(x, (top, bottom + extra_rows, left, right + extra_cols),
                                    buffer_name="x_winograd")
        x_top = x_left = 0
    y = reusable_output((n, p // 2, q // 2, k) if pool else (n, p, q, k), x.dtype)
    argmax = reusable_output(y.shape, np.uint8) if pool else np.empty((1, 1, 1, 1), np.uint8)
    finite = scratch("winograd.finite", (n,), np.bool_)
    _KERNELS[size, out, lanes](x_cl, x_top, x_left, u, bp, x.dtype.type(0 if relu else -np.inf), tile_rows,
                               tile_cols, pool, get_num_threads(), y, argmax, finite)
    if not finite.all():
        return None
    computed_tiles = _computed_tiles(tile_rows, tile_cols, rows)
    path = f"Winograd F({out}x{out}, {size}x{size}), products in tiles of {rows} tiles x {lanes} lanes"
    return (y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2) if pool else None, path,
            n * computed_tiles * (out + size - 1) ** 2 * c * k_padded)
