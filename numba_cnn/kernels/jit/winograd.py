"""The jit backend's Winograd F(2x2, 3x3) convolution on the host side: which layers take it (`winograd_fits`), and
the call of tiles.py's `_make_winograd` kernels with the transformed weights, the bias and a channels-last input,
read in place when the caller's is stored so (the kernel reads the padding as zeros), else copied and padded so that
every 2x2 output tile's 4x4 input window is in it (`winograd_conv`). jit/__init__.py uses it for the
forward (plain and fused with ReLU + 2x2 max-pooling, whose windows are the output tiles) and for the input gradient
of the dense backward (the full correlation of dy with the flipped kernel, a 3x3 stride-1 convolution of dy).
How and why it works, with numbers: docs/kernels.md, "Winograd: fewer multiplies for 3x3".
"""

import numpy as np
from numba import get_num_threads

from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import aligned_zeros, padded_channels_last, reusable_output, round_up, scratch
from numba_cnn.kernels.jit.tiles import (WINOGRAD_BAND, WINOGRAD_CHUNK, WINOGRAD_TILE_NARROW, WINOGRAD_TILE_WIDE,
                                         _winograd_narrow, _winograd_weights, _winograd_wide)
from numba_cnn.kernels.jit.winograd5 import winograd5_conv, winograd5_fits


def winograd_fits(x_shape, w, stride, pool=False):
    """Whether a convolution takes the Winograd kernels: 5x5 where winograd5.py's F(2x2, 5x5) fits (not fused with
    the pool); else 3x3, stride 1, input channels a multiple of the transform's vector (WINOGRAD_CHUNK), more output
    channels than half the narrow tile's lanes (fewer would leave most of its lanes idle), finite weights (the transforms' sums would turn an inf weight into NaN outputs that the direct sum
    keeps inf; the inputs are checked by the kernel)."""
    if not pool and winograd5_fits(x_shape, w, stride):
        return True
    k, c, r, s = w.shape
    return (stride == 1 and r == s == 3 and c % WINOGRAD_CHUNK == 0 and 2 * k > WINOGRAD_TILE_NARROW[1]
            and x_shape[2] >= 3 and x_shape[3] >= 3 and np.isfinite(w).all())


def winograd_conv(x, w, b, relu, padding, pool):
    """The Winograd kernel's conv2d_forward (pool False: y[N, K, P, Q]) or conv2d_relu_maxpool2d_forward (pool True,
    relu: (y[N, K, P//2, Q//2], argmax)), as NCHW views of channels-last buffers, with a description of the path and
    the multiply-adds executed (the 16 products per tile, channel and lane; the transforms are additions); None
    when an output came out non-finite (the caller then computes directly). A 5x5 kernel: winograd5.py's."""
    if w.shape[2] == 5:
        return winograd5_conv(x, w, b, relu, padding)
    n, c, h, wd = x.shape
    k = w.shape[0]
    top, bottom, left, right = padding
    p, q = h + top + bottom - 2, wd + left + right - 2
    tile_rows, tile_cols = (p // 2, q // 2) if pool else ((p + 1) // 2, (q + 1) // 2)
    rows, lanes = WINOGRAD_TILE_NARROW if k <= WINOGRAD_TILE_NARROW[1] else WINOGRAD_TILE_WIDE
    k_padded = round_up(k, lanes)
    u = aligned_zeros((16, c, k_padded), x.dtype)
    _winograd_weights(w, u)
    bp = aligned_zeros(k_padded, x.dtype)
    bp[:k] = b
    if is_channels_last(x):  # read in place, the padding and the rows and columns past it as zeros
        x_cl, x_top, x_left = x.transpose(0, 2, 3, 1), top, left
    else:  # the kernel copies whole vectors of channels: a channels-last copy, padded while it is made
        # every tile reads a 4 x 4 window: an odd P or Q needs a zero row or column beyond the padding
        extra_rows, extra_cols = max(0, 2 * tile_rows + 2 - (p + 2)), max(0, 2 * tile_cols + 2 - (q + 2))
        x_cl = padded_channels_last(x, (top, bottom + extra_rows, left, right + extra_cols),
                                    buffer_name="x_winograd")
        x_top = x_left = 0
    y = reusable_output((n, tile_rows, tile_cols, k) if pool else (n, p, q, k), x.dtype)
    argmax = reusable_output(y.shape, np.uint8) if pool else np.empty((1, 1, 1, 1), np.uint8)
    finite = scratch("winograd.finite", (n,), np.bool_)
    kernel = _winograd_narrow if lanes == WINOGRAD_TILE_NARROW[1] else _winograd_wide
    kernel(x_cl, x_top, x_left, u, bp, x.dtype.type(0 if relu else -np.inf), tile_rows, tile_cols, pool,
           get_num_threads(), y, argmax, finite)
    if not finite.all():
        return None
    band = max(1, WINOGRAD_BAND // tile_cols) * tile_cols
    computed_tiles = sum(round_up(min(band, tile_rows * tile_cols - t0), rows)
                         for t0 in range(0, tile_rows * tile_cols, band))
    path = f"Winograd F(2x2, 3x3), products in tiles of {rows} tiles x {lanes} lanes"
    return (y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2) if pool else None, path,
            n * computed_tiles * 16 * c * k_padded)
