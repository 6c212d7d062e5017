"""Operands the Winograd tests share: a convolution's x, w, b and dy for a kernel size, and the channels-last
storage the fused ops hand over."""

import numpy as np


def channels_last(a):
    """a stored channels-last (an NHWC buffer viewed as NCHW)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def conv_operands(rng, shape, k, size, padding, dtype, w_scale):
    """(x[shape], w[k, C, size, size] * w_scale, b[k], dy of the stride-1 output), standard normal draws."""
    n, c, h, wd = shape
    top, bottom, left, right = padding
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((k, c, size, size)) * w_scale).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    dy = rng.standard_normal((n, k, h + top + bottom - size + 1, wd + left + right - size + 1)).astype(dtype)
    return x, w, b, dy
