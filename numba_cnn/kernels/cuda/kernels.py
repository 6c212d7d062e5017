"""The cuda backend's contract ops: the four kernels as numba-cuda `@cuda.jit` kernels on device arrays (a GPU, or Numba's simulator).

conv2d_forward     a thread per output y[n, k, i, j]: the bias plus the C*R*S products, ReLU applied before the one
                   store.
conv2d_backward    dw in two passes without atomics or block synchronisation: a thread per (image, weight) sums
                   that image's P*Q products dy * x into partial[N, K, C, R, S], then a thread per weight adds its N
                   partials in image order. db: a block per channel adds its N*P*Q dy values in shared memory, in a
                   fixed tree order. dx: a thread per input element gathers dy[n, k, row - r, col - s] * w[k, c, r, s]
                   over the taps that reach it (a gather, so no two threads write one element). Every sum runs
                   in a fixed order: results are the same on every run.
maxpool2d_forward  a thread per window: the first of the four largest wins (strict >, row-major order); the first
                   NaN wins over any number and keeps the win.
maxpool2d_backward a thread per input element: dy of its window if it is the recorded winner, else zero (which also
                   zeroes a dropped last row or column).

Inputs may be device arrays or host arrays (copied in); outputs are device arrays. Each launcher follows its
kernels; the launch configuration is runtime.py's.
"""

import numpy as np

from numba_cnn.kernels.cuda.runtime import ZERO, as_device, cuda, launch, launch_blocks, sum_outer_inner


@cuda.jit(device=True)
def _unravel_nchw(e, channels, height, width):
    """Flat index e of a C-contiguous (N, channels, height, width) array -> (n, c, row, col)."""
    col = e % width
    row = (e // width) % height
    c = (e // (width * height)) % channels
    return e // (width * height * channels), c, row, col


@cuda.jit
def _conv_forward(x, w, b, relu, y):
    _, k_out, p_out, q_out = y.shape
    c_in, r_k, s_k = w.shape[1], w.shape[2], w.shape[3]
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        n, k, i, j = _unravel_nchw(e, k_out, p_out, q_out)
        acc = b[k]
        for c in range(c_in):
            for r in range(r_k):
                for s in range(s_k):
                    acc += x[n, c, i + r, j + s] * w[k, c, r, s]
        if relu and acc < ZERO:
            acc = ZERO
        y[n, k, i, j] = acc


def conv2d_forward(x, w, b, relu):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,H-R+1,W-S+1] on the device, ReLU applied when relu is True."""
    x, w, b = as_device(x, "x"), as_device(w, "w"), as_device(b, "b")
    n, _, h, wd = x.shape
    k, _, r, s = w.shape
    y = cuda.device_array((n, k, h - r + 1, wd - s + 1), dtype=x.dtype)
    launch(_conv_forward, y.size, x, w, b, relu, y)
    return y


@cuda.jit
def _conv_weight_grad_per_image(dy, x, partial):
    """partial[n, k, c, r, s] = sum_{i, j} dy[n, k, i, j] * x[n, c, i + r, j + s]: one image's share of dw."""
    _, k_out, p_out, q_out = dy.shape
    _, c_in, r_k, s_k = partial.shape[1], partial.shape[2], partial.shape[3], partial.shape[4]
    for e in range(cuda.grid(1), partial.size, cuda.gridsize(1)):
        s = e % s_k
        r = (e // s_k) % r_k
        c = (e // (s_k * r_k)) % c_in
        k = (e // (s_k * r_k * c_in)) % k_out
        n = e // (s_k * r_k * c_in * k_out)
        acc = ZERO
        for i in range(p_out):
            for j in range(q_out):
                acc += dy[n, k, i, j] * x[n, c, i + r, j + s]
        partial[n, k, c, r, s] = acc


@cuda.jit
def _sum_rows(partial, out):
    """out[e] = sum_n partial[n, e], a thread per column (adjacent threads read adjacent addresses)."""
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        acc = ZERO
        for n in range(partial.shape[0]):
            acc += partial[n, e]
        out[e] = acc


@cuda.jit
def _conv_input_grad(dy, w, dx):
    """dx[n, c, row, col] = sum over k and the taps (r, s) with 0 <= row - r < P, 0 <= col - s < Q of
    dy[n, k, row - r, col - s] * w[k, c, r, s]."""
    _, c_in, h_in, w_in = dx.shape
    k_out, p_out, q_out = dy.shape[1], dy.shape[2], dy.shape[3]
    r_k, s_k = w.shape[2], w.shape[3]
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        n, c, row, col = _unravel_nchw(e, c_in, h_in, w_in)
        r_first, r_end = max(0, row - p_out + 1), min(r_k, row + 1)
        s_first, s_end = max(0, col - q_out + 1), min(s_k, col + 1)
        acc = ZERO
        for k in range(k_out):
            for r in range(r_first, r_end):
                for s in range(s_first, s_end):
                    acc += dy[n, k, row - r, col - s] * w[k, c, r, s]
        dx[n, c, row, col] = acc


def conv2d_backward(dy, x, w, need_dx):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] or None, dw[K,C,R,S], db[K]) on the device."""
    dy, x, w = as_device(dy, "dy"), as_device(x, "x"), as_device(w, "w")
    n, k, p, q = dy.shape
    partial = cuda.device_array((n,) + tuple(w.shape), dtype=w.dtype)
    launch(_conv_weight_grad_per_image, partial.size, dy, x, partial)
    dw = cuda.device_array(w.shape, dtype=w.dtype)
    launch(_sum_rows, dw.size, partial.reshape(n, dw.size), dw.reshape(dw.size))
    db = cuda.device_array((k,), dtype=w.dtype)
    launch_blocks(sum_outer_inner, k, dy.reshape(n, k, p * q), db)
    if not need_dx:
        return None, dw, db
    dx = cuda.device_array(x.shape, dtype=x.dtype)
    launch(_conv_input_grad, dx.size, dy, w, dx)
    return dx, dw, db


@cuda.jit
def _maxpool_forward(x, y, argmax):
    _, c_in, h_out, w_out = y.shape
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        n, c, i, j = _unravel_nchw(e, c_in, h_out, w_out)
        best = x[n, c, 2 * i, 2 * j]
        winner = 0
        for offset in range(1, 4):  # offset = 2 * di + dj, row-major, so a tie keeps the earlier winner
            value = x[n, c, 2 * i + offset // 2, 2 * j + offset % 2]
            if best == best and (value > best or value != value):  # a NaN wins and then keeps the win
                best = value
                winner = offset
        y[n, c, i, j] = best
        argmax[n, c, i, j] = winner


def maxpool2d_forward(x):
    """x[N,C,H,W] -> (y[N,C,H//2,W//2], argmax uint8 of the same shape) on the device."""
    x = as_device(x, "x")
    n, c, h, wd = x.shape
    y = cuda.device_array((n, c, h // 2, wd // 2), dtype=x.dtype)
    argmax = cuda.device_array(y.shape, dtype=np.uint8)
    launch(_maxpool_forward, y.size, x, y, argmax)
    return y, argmax


@cuda.jit
def _maxpool_backward(dy, argmax, dx):
    _, c_in, h_in, w_in = dx.shape
    h_out, w_out = dy.shape[2], dy.shape[3]
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        n, c, row, col = _unravel_nchw(e, c_in, h_in, w_in)
        i, j = row // 2, col // 2
        if i < h_out and j < w_out and argmax[n, c, i, j] == 2 * (row - 2 * i) + (col - 2 * j):
            dx[n, c, row, col] = dy[n, c, i, j]
        else:
            dx[n, c, row, col] = ZERO


def maxpool2d_backward(dy, argmax, x_shape):
    """dy[N,C,H//2,W//2], argmax, x_shape -> dx[N,C,H,W] on the device, dy routed to each window's winner."""
    dy, argmax = as_device(dy, "dy"), as_device(argmax, "argmax")
    dx = cuda.device_array(tuple(x_shape), dtype=dy.dtype)
    launch(_maxpool_backward, dx.size, dy, argmax, dx)
    return dx
