"""naive backend: the contract written as textbook loops, one output element at a time; numpy only allocates.

conv2d_forward       each output element: bias + sum over (c, r, s) of xp[n, c, i*stride + r, j*stride + s] * w.
conv2d_backward      the same loops once: each dy adds to db, to dw (dy * xp) and, if asked, to dxp (dy * w).
maxpool2d_forward    each kh x kw window scanned row-major, keeping the first maximum (the first NaN, if any).
maxpool2d_backward   each dy copied to the element its window's argmax (di*kw + dj) names.
avgpool2d_forward    each window's sum divided by its kh*kw elements.
avgpool2d_backward   each dy / (kh*kw) written to every element of its window.
batchnorm2d_forward  per channel: mean, variance around it, each element normalised; training moves running stats.
batchnorm2d_backward per channel: sum(dy) and sum(dy * x_hat), then each element's dx by the contract's formula.

Padding is an explicit zero-padded copy of x (np.pad, numpy's one job besides allocating) rather than bounds
checks in the innermost loop, so the loops read exactly as the contract's formula (dx likewise: a padded gradient,
cropped at the end).

Readable first and slow on purpose (interpreted loops, orders of magnitude behind jit): this is the version to read
beside the others, and it runs in the tests on tiny shapes only. Arithmetic stays in the input's dtype (numpy
scalars), so float32 in gives float32 rounding, as in the other backends; sums accumulate in that dtype too.
"""

import numpy as np

from numba_cnn.kernels.contract import BackendInfo

INFO = BackendInfo(summary="textbook Python loops, one output element at a time", slow=True)


def _zero_padded(x, padding):
    """x[N,C,H,W] with `padding` = (top, bottom, left, right) rows and columns of zeros around each image."""
    top, bottom, left, right = padding
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def conv2d_forward(x, w, b, relu, stride, padding):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,P,Q] over x zero-padded by `padding`, with `stride`; ReLU if asked."""
    xp = _zero_padded(x, padding)
    n_images, n_channels, padded_h, padded_w = xp.shape
    n_filters, _, kernel_h, kernel_w = w.shape
    out_h = (padded_h - kernel_h) // stride + 1
    out_w = (padded_w - kernel_w) // stride + 1
    zero = x.dtype.type(0)
    y = np.empty((n_images, n_filters, out_h, out_w), dtype=x.dtype)
    for n in range(n_images):
        for k in range(n_filters):
            for i in range(out_h):
                for j in range(out_w):
                    total = b[k]
                    for c in range(n_channels):
                        for r in range(kernel_h):
                            for s in range(kernel_w):
                                total += xp[n, c, i * stride + r, j * stride + s] * w[k, c, r, s]
                    if relu and total < zero:  # a NaN total fails the test and stays NaN
                        total = zero
                    y[n, k, i, j] = total
    return y


def conv2d_backward(dy, x, w, need_dx, stride, padding):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] or None, dw[K,C,R,S], db[K])."""
    xp = _zero_padded(x, padding)
    n_images, n_channels, _, _ = x.shape
    n_filters, _, kernel_h, kernel_w = w.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    dxp = np.zeros(xp.shape, dtype=x.dtype) if need_dx else None
    dw = np.zeros(w.shape, dtype=x.dtype)
    db = np.zeros(n_filters, dtype=x.dtype)
    for n in range(n_images):
        for k in range(n_filters):
            for i in range(out_h):
                for j in range(out_w):
                    grad = dy[n, k, i, j]
                    db[k] += grad
                    for c in range(n_channels):
                        for r in range(kernel_h):
                            for s in range(kernel_w):
                                dw[k, c, r, s] += grad * xp[n, c, i * stride + r, j * stride + s]
                                if need_dx:
                                    dxp[n, c, i * stride + r, j * stride + s] += grad * w[k, c, r, s]
    if not need_dx:
        return None, dw, db
    top, _, left, _ = padding
    dx = dxp[:, :, top:top + x.shape[2], left:left + x.shape[3]].copy()  # the padding's gradient is dropped
    return dx, dw, db


def maxpool2d_forward(x, size):
    """x[N,C,H,W] -> (y[N,C,H//kh,W//kw], argmax uint8 offset di*kw+dj of each window's first maximum)."""
    n_images, n_channels, height, width = x.shape
    kh, kw = size
    out_h, out_w = height // kh, width // kw  # rows and columns that fill no window are dropped
    y = np.empty((n_images, n_channels, out_h, out_w), dtype=x.dtype)
    argmax = np.empty((n_images, n_channels, out_h, out_w), dtype=np.uint8)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(out_h):
                for j in range(out_w):
                    best, best_offset = x[n, c, kh * i, kw * j], 0
                    for di in range(kh):
                        for dj in range(kw):
                            value = x[n, c, kh * i + di, kw * j + dj]
                            # Strictly greater: on a tie the earlier element keeps the win. A NaN beats every
                            # number (value != value) and, once it is the best, nothing replaces it.
                            if best == best and (value > best or value != value):
                                best, best_offset = value, di * kw + dj
                    y[n, c, i, j] = best
                    argmax[n, c, i, j] = best_offset
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, size):
    """dy[N,C,H//kh,W//kw], argmax, x_shape (N,C,H,W) -> dx[N,C,H,W], dy routed to each window's winner."""
    n_images, n_channels, out_h, out_w = dy.shape
    kh, kw = size
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(out_h):
                for j in range(out_w):
                    di, dj = divmod(int(argmax[n, c, i, j]), kw)
                    dx[n, c, kh * i + di, kw * j + dj] = dy[n, c, i, j]
    return dx


def avgpool2d_forward(x, size):
    """x[N,C,H,W] -> y[N,C,H//kh,W//kw], the mean of each kh x kw window."""
    n_images, n_channels, height, width = x.shape
    kh, kw = size
    out_h, out_w = height // kh, width // kw
    count = x.dtype.type(kh * kw)
    y = np.empty((n_images, n_channels, out_h, out_w), dtype=x.dtype)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(out_h):
                for j in range(out_w):
                    total = x.dtype.type(0)
                    for di in range(kh):
                        for dj in range(kw):
                            total += x[n, c, kh * i + di, kw * j + dj]
                    y[n, c, i, j] = total / count
    return y


def avgpool2d_backward(dy, x_shape, size):
    """dy[N,C,H//kh,W//kw], x_shape (N,C,H,W) -> dx[N,C,H,W]: each window's dy / (kh*kw) on each of its elements."""
    n_images, n_channels, out_h, out_w = dy.shape
    kh, kw = size
    count = dy.dtype.type(kh * kw)
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(out_h):
                for j in range(out_w):
                    share = dy[n, c, i, j] / count
                    for di in range(kh):
                        for dj in range(kw):
                            dx[n, c, kh * i + di, kw * j + dj] = share
    return dx


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """x[N,C,H,W] -> (y, mean[C], inv_std[C]): each channel normalised by its batch statistics (training, which
    also moves running_mean and running_var towards them, in place) or by the running ones (inference)."""
    n_images, n_channels, height, width = x.shape
    dtype = x.dtype.type
    count = dtype(n_images * height * width)
    momentum, eps = dtype(momentum), dtype(eps)
    mean = np.empty(n_channels, dtype=x.dtype)
    inv_std = np.empty(n_channels, dtype=x.dtype)
    y = np.empty(x.shape, dtype=x.dtype)
    for c in range(n_channels):
        if training:
            total = dtype(0)
            for n in range(n_images):
                for i in range(height):
                    for j in range(width):
                        total += x[n, c, i, j]
            channel_mean = total / count
            squares = dtype(0)
            for n in range(n_images):
                for i in range(height):
                    for j in range(width):
                        centred = x[n, c, i, j] - channel_mean
                        squares += centred * centred
            channel_var = squares / count  # biased: divided by the count, not count - 1
            running_mean[c] = momentum * running_mean[c] + (dtype(1) - momentum) * channel_mean
            running_var[c] = momentum * running_var[c] + (dtype(1) - momentum) * channel_var
        else:
            channel_mean, channel_var = running_mean[c], running_var[c]
        mean[c] = channel_mean
        inv_std[c] = dtype(1) / np.sqrt(channel_var + eps)
        for n in range(n_images):
            for i in range(height):
                for j in range(width):
                    y[n, c, i, j] = (x[n, c, i, j] - mean[c]) * (inv_std[c] * gamma[c]) + beta[c]
    return y, mean, inv_std


def batchnorm2d_backward(dy, x, gamma, mean, inv_std):
    """dy, x[N,C,H,W], and the forward's gamma, mean, inv_std -> (dx[N,C,H,W], dgamma[C], dbeta[C]), the
    training-mode gradient (through the batch statistics too)."""
    n_images, n_channels, height, width = x.shape
    dtype = x.dtype.type
    count = dtype(n_images * height * width)
    dx = np.empty(x.shape, dtype=x.dtype)
    dgamma = np.zeros(n_channels, dtype=x.dtype)
    dbeta = np.zeros(n_channels, dtype=x.dtype)
    for c in range(n_channels):
        for n in range(n_images):
            for i in range(height):
                for j in range(width):
                    x_hat = (x[n, c, i, j] - mean[c]) * inv_std[c]
                    dbeta[c] += dy[n, c, i, j]
                    dgamma[c] += dy[n, c, i, j] * x_hat
        for n in range(n_images):
            for i in range(height):
                for j in range(width):
                    x_hat = (x[n, c, i, j] - mean[c]) * inv_std[c]
                    dx[n, c, i, j] = gamma[c] * inv_std[c] * (
                        dy[n, c, i, j] - dbeta[c] / count - x_hat * (dgamma[c] / count))
    return dx, dgamma, dbeta
