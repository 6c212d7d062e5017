"""The jit backend's Winograd convolutions on the host side, F(2x2, 3x3) for 3x3 kernels and F(2x2, 5x5) for 5x5
ones: which layers take them (`winograd_fits`), the filters' transform (`winograd_weights`, in float64), and the call
of tiles.py's `_make_winograd` kernels with the transformed weights, the bias and a channels-last input, read in
place when the caller's is stored so (the kernel reads the padding as zeros), else copied and padded so that every
2x2 output tile's window is in it (`winograd_conv`). jit/__init__.py uses it for the forward (plain, and for 3x3
fused with ReLU + 2x2 max-pooling, whose windows are the output tiles) and for the input gradient of the dense
backward (the full correlation of dy with the flipped kernel, a stride-1 convolution of dy of the same size).

A 2x2 output tile of a size x size kernel reads a (size + 1)^2 window d, and Y = A^T [(G w G^T) * (B^T d B)] A. For
3x3, the points 0, 1, -1 and infinity: B^T's rows (1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1), G's
(1, 0, 0), (1/2, 1/2, 1/2), (1/2, -1/2, 1/2), (0, 0, 1), A^T's (1, 1, 1, 0), (0, 1, -1, -1): 16 products per tile
and channel pair, against 36 directly. For 5x5, the points 0, 1, -1, 2, -2 and infinity (F(4x4, 3x3)'s, so B^T is
its input transform): 36 products against 100,

    B^T = [[4, 0, -5,  0, 1, 0],     G = [[ 1/4,    0,     0,    0,    0  ],     A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4, 1, 1, 0],          [-1/6, -1/6,  -1/6, -1/6, -1/6 ],            [0, 1, -1, 2, -2, 1]]
           [0, 4, -4, -1, 1, 0],          [-1/6,  1/6,  -1/6,  1/6, -1/6 ],
           [0, -2, -1, 2, 1, 0],          [1/24, 1/12,  1/6,   1/3,  2/3 ],
           [0, 2, -1, -2, 1, 0],          [1/24, -1/12, 1/6,  -1/3,  2/3 ],
           [0, 4, 0, -5,  0, 1]]          [ 0,     0,     0,    0,    1  ]]

The kernels' transforms are winograd_stages.py's. How and why it works, with numbers: docs/kernels.md, "Winograd:
fewer multiplies for 3x3" and "Winograd for 5x5".
"""

import numpy as np
from numba import get_num_threads

from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import aligned_zeros, padded_channels_last, reusable_output, round_up, scratch
from numba_cnn.kernels.jit.tiles import (WINOGRAD_BAND, WINOGRAD_CHUNK, WINOGRAD_TILE_NARROW, WINOGRAD_TILE_WIDE,
                                         _winograd5_narrow, _winograd5_wide, _winograd_narrow, _winograd_sandwich,
                                         _winograd_wide)

# G, the filters' transform, by kernel size: (size + 1) x size
WINOGRAD_G = {3: np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
              5: np.array([[1 / 4, 0, 0, 0, 0],
                           [-1 / 6, -1 / 6, -1 / 6, -1 / 6, -1 / 6],
                           [-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6],
                           [1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3],
                           [1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3],
                           [0, 0, 0, 0, 1]])}
_KERNELS = {(3, WINOGRAD_TILE_WIDE[1]): _winograd_wide, (3, WINOGRAD_TILE_NARROW[1]): _winograd_narrow,
            (5, WINOGRAD_TILE_WIDE[1]): _winograd5_wide, (5, WINOGRAD_TILE_NARROW[1]): _winograd5_narrow}


def winograd_fits(x_shape, w, stride, pool=False):
    """Whether a convolution takes the Winograd kernels: 3x3, or 5x5 when not fused with the pool; stride 1, input
    channels a multiple of the transform's vector (WINOGRAD_CHUNK), more output channels than half the narrow
    tile's lanes (fewer would leave most of its lanes idle), finite weights (the transforms' sums would turn an inf
    weight into NaN outputs that the direct sum keeps inf; the inputs are checked by the kernel)."""
    k, c, r, s = w.shape
    return (stride == 1 and r == s and (r == 3 or (r == 5 and not pool)) and c % WINOGRAD_CHUNK == 0
            and 2 * k > WINOGRAD_TILE_NARROW[1] and x_shape[2] >= r and x_shape[3] >= r and np.isfinite(w).all())


def winograd_weights(w, k_padded):
    """u[(size + 1) a + b, c, k] = (G w[k, c] G^T)[a, b] (tiles.py's `_winograd_sandwich`: float64, rounded
    once), its lanes past K zero."""
    k, c, size, _ = w.shape
    u = aligned_zeros(((size + 1) ** 2, c, k_padded), w.dtype)
    _winograd_sandwich(w.transpose(2, 3, 1, 0), WINOGRAD_G[size], u)
    return u


def winograd_conv(x, w, b, relu, padding, pool):
    """The Winograd kernel's conv2d_forward (pool False: y[N, K, P, Q]) or, for 3x3, conv2d_relu_maxpool2d_forward
    (pool True, relu: (y[N, K, P//2, Q//2], argmax)), as NCHW views of channels-last buffers, with a description of
    the path and the multiply-adds executed ((size + 1)^2 products per tile, channel and lane; the transforms are
    additions and multiples); None when an output came out non-finite (the caller then computes directly)."""
    n, c, h, wd = x.shape
    k, _, size, _ = w.shape
    top, bottom, left, right = padding
    p, q = h + top + bottom - size + 1, wd + left + right - size + 1
    tile_rows, tile_cols = (p // 2, q // 2) if pool else ((p + 1) // 2, (q + 1) // 2)
    rows, lanes = WINOGRAD_TILE_NARROW if k <= WINOGRAD_TILE_NARROW[1] else WINOGRAD_TILE_WIDE
    k_padded = round_up(k, lanes)
    u = winograd_weights(w, k_padded)
    bp = aligned_zeros(k_padded, x.dtype)
    bp[:k] = b
    if is_channels_last(x):  # read in place, the padding and the rows and columns past it as zeros
        x_cl, x_top, x_left = x.transpose(0, 2, 3, 1), top, left
    else:  # the kernel copies whole vectors of channels: a channels-last copy, padded while it is made
        # every tile reads its whole window: an odd P or Q needs a zero row or column beyond the padding
        extra_rows, extra_cols = max(0, 2 * tile_rows - p), max(0, 2 * tile_cols - q)
        x_cl = padded_channels_last(x, (top, bottom + extra_rows, left, right + extra_cols),
                                    buffer_name="x_winograd")
        x_top = x_left = 0
    y = reusable_output((n, tile_rows, tile_cols, k) if pool else (n, p, q, k), x.dtype)
    argmax = reusable_output(y.shape, np.uint8) if pool else np.empty((1, 1, 1, 1), np.uint8)
    finite = scratch("winograd.finite", (n,), np.bool_)
    _KERNELS[size, lanes](x_cl, x_top, x_left, u, bp, x.dtype.type(0 if relu else -np.inf), tile_rows, tile_cols,
                          pool, get_num_threads(), y, argmax, finite)
    if not finite.all():
        return None
    band = max(1, WINOGRAD_BAND // tile_cols) * tile_cols
    computed_tiles = sum(round_up(min(band, tile_rows * tile_cols - t0), rows)
                         for t0 in range(0, tile_rows * tile_cols, band))
    path = f"Winograd F(2x2, {size}x{size}), products in tiles of {rows} tiles x {lanes} lanes"
    return (y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2) if pool else None, path,
            n * computed_tiles * (size + 1) ** 2 * c * k_padded)
