"""The jit backend's pooling on the host side (jit/__init__.py defines the four contract ops on these): 2x2
max-pooling through tiles.py's kernels, a channels-last input (a batch norm's output; a convolution's dx) pooled or
routed where it lies by the `_last` twins, its results channels-last too, so the convolution after it reads them in
place; other windows, and average pooling, through norm.py's NCHW kernels. The returned arrays come from
reusable_output.
"""

import numpy as np

from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import nchw, nhwc, reusable_output
from numba_cnn.kernels.jit.norm import (_avgpool2x2_backward, _avgpool2x2_forward, _avgpool_backward, _avgpool_forward,
                                        _global_avgpool_last, _global_avgpool_relu_backward_last,
                                        _maxpool_any_backward, _maxpool_any_forward)
from numba_cnn.kernels.jit.paths import note
from numba_cnn.kernels.jit.tiles import (_maxpool_backward, _maxpool_backward_last, _maxpool_forward,
                                         _maxpool_forward_last)


def max_forward(x, size):
    """x[N,C,H,W] -> (y[N,C,H//kh,W//kw], argmax uint8 offset di*kw+dj of each window's first maximum); 2x2
    windows through tiles.py's kernels (a channels-last x pooled where it lies, y and argmax then channels-last),
    others through norm.py's."""
    n, c, h, w = x.shape
    kh, kw = size
    last = (kh, kw) == (2, 2) and is_channels_last(x)
    note("maxpool2d_forward", ("2x2 selects" + ", channels last" * last) if (kh, kw) == (2, 2)
         else "any window, selects", 0)
    if last:
        y_cl = reusable_output((n, h // 2, w // 2, c), x.dtype)
        argmax_cl = reusable_output(y_cl.shape, np.uint8)
        _maxpool_forward_last(x.transpose(0, 2, 3, 1), y_cl, argmax_cl)
        return y_cl.transpose(0, 3, 1, 2), argmax_cl.transpose(0, 3, 1, 2)
    y = reusable_output((n, c, h // kh, w // kw), x.dtype)
    argmax = reusable_output(y.shape, np.uint8)
    if (kh, kw) == (2, 2):
        _maxpool_forward(nchw(x), y, argmax)
    else:
        _maxpool_any_forward(nchw(x), kh, kw, y, argmax)
    return y, argmax


def max_backward(dy, argmax, x_shape, size):
    """dy[N,C,H//kh,W//kw], argmax, x_shape (N,C,H,W) -> dx[N,C,H,W], dy routed to each window's winner; dx
    channels-last when argmax is (the forward pooled a channels-last x)."""
    kh, kw = size
    last = (kh, kw) == (2, 2) and is_channels_last(argmax)
    note("maxpool2d_backward", ("2x2 route" + ", channels last" * last) if (kh, kw) == (2, 2)
         else "any window, route", 0)
    if last:
        n, c, h, w = x_shape
        dx_cl = reusable_output((n, h, w, c), dy.dtype)
        _maxpool_backward_last(nhwc(dy, reusable=True), argmax.transpose(0, 2, 3, 1), dy.dtype.type(0), dx_cl)
        return dx_cl.transpose(0, 3, 1, 2)
    dx = reusable_output(x_shape, dy.dtype)
    if (kh, kw) == (2, 2):
        _maxpool_backward(nchw(dy), nchw(argmax), dy.dtype.type(0), dx)
    else:
        _maxpool_any_backward(nchw(dy), nchw(argmax), kh, kw, dy.dtype.type(0), dx)
    return dx


def average_forward(x, size):
    """x[N,C,H,W] -> y[N,C,H//kh,W//kw], each window's mean (summed in float64)."""
    n, c, h, w = x.shape
    kh, kw = size
    y = reusable_output((n, c, h // kh, w // kw), x.dtype)
    note("avgpool2d_forward", "float64 window sums" + ", 2x2" * ((kh, kw) == (2, 2)), 0)
    if (kh, kw) == (2, 2):
        _avgpool2x2_forward(nchw(x), y)
    elif (kh, kw) == (h, w) and is_channels_last(x):  # a global pool reads channels-last x in place, once
        _global_avgpool_last(nhwc(x), y.reshape(n, c))
    else:  # another large window reads channels-last x in place too: each pixel's line serves its channels
        _avgpool_forward(x if is_channels_last(x) else nchw(x), kh, kw, y)
    return y


def average_backward(dy, x_shape, size):
    """dy[N,C,H//kh,W//kw], x_shape -> dx[N,C,H,W]: dy / (kh*kw) on each element of its window, 0 outside."""
    kh, kw = size
    dx = reusable_output(x_shape, dy.dtype)
    note("avgpool2d_backward", "spread" + ", 2x2" * ((kh, kw) == (2, 2)), 0)
    (_avgpool2x2_backward(nchw(dy), dy.dtype.type(0), dx) if (kh, kw) == (2, 2)
     else _avgpool_backward(nchw(dy), kh, kw, dy.dtype.type(0), dx))
    return dx


def average_relu_backward(dy, y, size):
    """relu_backward(average_backward(dy, y.shape, size), y), the same bits: a global pool (size = y's H x W) of a
    channels-last y in one pass (norm.py's `_global_avgpool_relu_backward_last`), its result channels-last; None
    otherwise (the caller composes)."""
    n, c, h, w = y.shape
    if tuple(size) != (h, w) or not is_channels_last(y) or dy.dtype != y.dtype:
        return None
    dx = reusable_output((n, h, w, c), y.dtype)
    note("avgpool2d_backward", "global spread through the ReLU's select, one pass", 0)
    _global_avgpool_relu_backward_last(nchw(dy).reshape(n, c), nhwc(y), y.dtype.type(0), dx)
    return dx.transpose(0, 3, 1, 2)
