"""naive backend: the contract written as textbook loops, one output element at a time; numpy only allocates.

conv2d_forward   for every output element (n, k, i, j): the bias plus the sum over channels and kernel taps
                 (c, r, s) of input times weight, then ReLU when asked.
conv2d_backward  walks the same loops once: each output gradient dy[n, k, i, j] adds to db[k], to every weight it
                 multiplied (dw += dy * x) and, when asked, to every input it read (dx += dy * w).
maxpool2d_*      each 2x2 window scanned in row-major order, keeping the first maximum (the first NaN, if any);
                 backward copies each dy to the element its window's argmax names.

Readable first and slow on purpose (about a second per image for conv2's forward): this is the version to read
beside the others, and it runs in the tests on tiny shapes only. Arithmetic stays in the input's dtype (numpy
scalars), so float32 in gives float32 rounding, as in the other backends.
"""

import numpy as np

from numba_cnn.kernels.contract import BackendInfo

INFO = BackendInfo(summary="textbook Python loops, one output element at a time", slow=True)


def conv2d_forward(x, w, b, relu):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,H-R+1,W-S+1], ReLU applied when relu is True."""
    n_images, n_channels, height, width = x.shape
    n_filters, _, kernel_h, kernel_w = w.shape
    out_h, out_w = height - kernel_h + 1, width - kernel_w + 1
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
                                total += x[n, c, i + r, j + s] * w[k, c, r, s]
                    if relu and total < zero:
                        total = zero
                    y[n, k, i, j] = total
    return y


def conv2d_backward(dy, x, w, need_dx):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] or None, dw[K,C,R,S], db[K])."""
    n_images, n_channels, _, _ = x.shape
    n_filters, _, kernel_h, kernel_w = w.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    dx = np.zeros(x.shape, dtype=x.dtype) if need_dx else None
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
                                dw[k, c, r, s] += grad * x[n, c, i + r, j + s]
                                if need_dx:
                                    dx[n, c, i + r, j + s] += grad * w[k, c, r, s]
    return dx, dw, db


def maxpool2d_forward(x):
    """x[N,C,H,W] -> (y[N,C,H//2,W//2], argmax uint8 offset 2*di+dj of each window's first maximum)."""
    n_images, n_channels, height, width = x.shape
    out_h, out_w = height // 2, width // 2  # a last odd row or column fills no window and is dropped
    y = np.empty((n_images, n_channels, out_h, out_w), dtype=x.dtype)
    argmax = np.empty((n_images, n_channels, out_h, out_w), dtype=np.uint8)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(out_h):
                for j in range(out_w):
                    best, best_offset = x[n, c, 2 * i, 2 * j], 0
                    for di in range(2):
                        for dj in range(2):
                            value = x[n, c, 2 * i + di, 2 * j + dj]
                            # Strictly greater: on a tie the earlier element keeps the win. A NaN beats every
                            # number (value != value) and, once it is the best, nothing replaces it.
                            if best == best and (value > best or value != value):
                                best, best_offset = value, 2 * di + dj
                    y[n, c, i, j] = best
                    argmax[n, c, i, j] = best_offset
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape):
    """dy[N,C,H//2,W//2], argmax, x_shape (N,C,H,W) -> dx[N,C,H,W], dy routed to each window's winner."""
    n_images, n_channels, out_h, out_w = dy.shape
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(out_h):
                for j in range(out_w):
                    di, dj = divmod(int(argmax[n, c, i, j]), 2)
                    dx[n, c, 2 * i + di, 2 * j + dj] = dy[n, c, i, j]
    return dx
