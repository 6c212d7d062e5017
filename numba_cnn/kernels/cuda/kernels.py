"""The cuda backend's contract ops: the eight kernels as numba-cuda `@cuda.jit` kernels on device arrays (a GPU, or
Numba's simulator).

Padding is never materialised: a kernel that reads the zero-padded input tests each tap against the unpadded
input's bounds and reads a zero outside (`_padded_at`), so no padded copy is allocated per call. The zero is still
multiplied, not skipped, so that an infinite or NaN weight or dy meeting the padding gives NaN as the contract's
sum over the padded input does. Only the top and left padding reach a kernel; the bottom and right only size the
output.

The three convolution kernels here are the readable ones; on a GPU conv2d_forward and conv2d_backward launch
tiled.py's tiled versions of them instead (runtime.CONV_KERNELS says which, NUMBA_CNN_CUDA_CONV chooses).

conv2d_forward      a thread per output y[n, k, i, j]: the bias plus the C*R*S products over the padded input,
                    ReLU applied before the one store.
conv2d_backward     dw in two passes without atomics or block synchronisation: a thread per (image, weight) sums
                    that image's P*Q products dy * x (x zero in the padding) into partial[N, K, C, R, S], then a
                    thread per weight adds its N partials in image order. db: a block per channel adds its N*P*Q
                    dy values in shared memory, in a fixed tree order. dx: a thread per input element gathers dy[n, k, i, j] * w[k, c, r, s] over the taps that read it: those with
                    row + top - r a multiple of the stride, i = (row + top - r) / stride in [0, P) (and likewise
                    for columns), so no two threads write one element and elements no output reads get 0.
maxpool2d_forward   a thread per kh x kw window: the first of the largest wins (strict >, row-major order); the
                    first NaN wins over any number and keeps the win.
maxpool2d_backward  a thread per input element: dy of its window if it is the recorded winner, else zero (which
                    also zeroes the dropped rows and columns).
avgpool2d_forward   a thread per window: its kh*kw elements added in row-major order, divided by kh*kw.
avgpool2d_backward  a thread per input element: its window's dy / (kh*kw), zero outside every window.
batchnorm2d_forward training: a block per channel reduces its N*H*W elements in two passes (the mean, then the
                    mean squared deviation from it: no cancellation of E[x^2] - E[x]^2), float32 accumulation in a
                    fixed order (each thread a fixed stride of elements, then the shared-memory tree), so results
                    are the same on every run; thread 0 stores mean and inv_std and moves the running statistics.
                    Inference: a thread per channel takes them from the running statistics (mean a copy). Then a
                    thread per element normalises.
batchnorm2d_backward a block per channel sums dy and dy * x_hat (dbeta, dgamma) the same way, then a thread per
                    element forms dx from them.

Every sum runs in a fixed order: results are the same on every run. Inputs may be device arrays or host arrays
(copied in); outputs are device arrays. Each launcher follows its kernels; the launch configuration is runtime.py's.
"""

import math

import numpy as np

from numba_cnn.kernels.cuda import runtime, tiled
from numba_cnn.kernels.cuda.runtime import (THREADS_PER_BLOCK, ZERO, _block_sum, as_device, cuda, launch,
                                            launch_blocks, sum_outer_inner)


@cuda.jit(device=True)
def _unravel_nchw(e, channels, height, width):
    """Flat index e of a C-contiguous (N, channels, height, width) array -> (n, c, row, col)."""
    col = e % width
    row = (e // width) % height
    c = (e // (width * height)) % channels
    return e // (width * height * channels), c, row, col


@cuda.jit(device=True)
def _padded_at(x, n, c, row, col):
    """x[n, c, row, col] of the zero-padded input, (row, col) in unpadded coordinates: zero outside x. The zero still
    multiplies its partner, so an infinite or NaN weight (forward) or dy (weight gradient) meeting the padding gives
    NaN, as the contract's sum over the padded input does."""
    if row >= 0 and row < x.shape[2] and col >= 0 and col < x.shape[3]:
        return x[n, c, row, col]
    return ZERO


@cuda.jit
def _conv_forward(x, w, b, relu, stride, top, left, y):
    _, k_out, p_out, q_out = y.shape
    c_in, r_k, s_k = w.shape[1], w.shape[2], w.shape[3]
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        n, k, i, j = _unravel_nchw(e, k_out, p_out, q_out)
        row0, col0 = i * stride - top, j * stride - left  # the window's corner in unpadded coordinates
        acc = b[k]
        for c in range(c_in):
            for r in range(r_k):
                for s in range(s_k):
                    acc += _padded_at(x, n, c, row0 + r, col0 + s) * w[k, c, r, s]
        if relu and acc < ZERO:  # not `acc if acc > 0 else 0`: a NaN stays NaN
            acc = ZERO
        y[n, k, i, j] = acc


def conv2d_forward(x, w, b, relu, stride, padding):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,P,Q] on the device: the cross-correlation of the zero-padded input
    (padding = (top, bottom, left, right)) with the given stride, ReLU applied when relu is True."""
    x, w, b = as_device(x, "x"), as_device(w, "w"), as_device(b, "b")
    n, _, h, wd = x.shape
    k, _, r, s = w.shape
    top, bottom, left, right = padding
    p, q = (h + top + bottom - r) // stride + 1, (wd + left + right - s) // stride + 1
    y = cuda.device_array((n, k, p, q), dtype=x.dtype)
    if runtime.CONV_KERNELS == "tiled":
        tiled.conv_forward(x, w, b, relu, stride, top, left, y)
    else:
        launch(_conv_forward, y.size, x, w, b, relu, stride, top, left, y)
    return y


@cuda.jit
def _conv_weight_grad_per_image(dy, x, stride, top, left, partial):
    """partial[n, k, c, r, s] = sum_{i, j} dy[n, k, i, j] * xp[n, c, i * stride + r, j * stride + s] over the
    zero-padded input xp: one image's share of dw."""
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
                acc += dy[n, k, i, j] * _padded_at(x, n, c, i * stride + r - top, j * stride + s - left)
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
def _conv_input_grad(dy, w, stride, top, left, dx):
    """dx[n, c, row, col] = sum over k and the taps (r, s) that read it, i.e. with i = (row + top - r) / stride a
    whole number in [0, P) and j = (col + left - s) / stride one in [0, Q), of dy[n, k, i, j] * w[k, c, r, s]."""
    _, c_in, h_in, w_in = dx.shape
    k_out, p_out, q_out = dy.shape[1], dy.shape[2], dy.shape[3]
    r_k, s_k = w.shape[2], w.shape[3]
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        n, c, row, col = _unravel_nchw(e, c_in, h_in, w_in)
        t, u = row + top, col + left  # the element's position in the padded input
        # taps r <= t (i >= 0) and r >= t - (P - 1) * stride (i < P), congruent to t modulo the stride
        r_low, s_low = max(0, t - (p_out - 1) * stride), max(0, u - (q_out - 1) * stride)
        r_first, r_end = r_low + (t - r_low) % stride, min(r_k, t + 1)
        s_first, s_end = s_low + (u - s_low) % stride, min(s_k, u + 1)
        acc = ZERO
        for k in range(k_out):
            for r in range(r_first, r_end, stride):
                i = (t - r) // stride
                for s in range(s_first, s_end, stride):
                    acc += dy[n, k, i, (u - s) // stride] * w[k, c, r, s]
        dx[n, c, row, col] = acc


def conv2d_backward(dy, x, w, need_dx, stride, padding):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] or None, dw[K,C,R,S], db[K]) on the device, for the
    convolution with this stride and padding (top, bottom, left, right)."""
    dy, x, w = as_device(dy, "dy"), as_device(x, "x"), as_device(w, "w")
    n, k, p, q = dy.shape
    top, _, left, _ = padding
    if runtime.CONV_KERNELS == "tiled" and tiled.weight_grad_fits(w.shape):
        partial = tiled.weight_grad_partials(dy, x, stride, top, left, w.shape)
    else:
        partial = cuda.device_array((n,) + tuple(w.shape), dtype=w.dtype)
        launch(_conv_weight_grad_per_image, partial.size, dy, x, stride, top, left, partial)
    dw = cuda.device_array(w.shape, dtype=w.dtype)
    launch(_sum_rows, dw.size, partial.reshape(partial.shape[0], dw.size), dw.reshape(dw.size))
    db = cuda.device_array((k,), dtype=w.dtype)
    launch_blocks(sum_outer_inner, k, dy.reshape(n, k, p * q), db)
    if not need_dx:
        return None, dw, db
    dx = cuda.device_array(x.shape, dtype=x.dtype)
    if runtime.CONV_KERNELS == "tiled" and tiled.input_grad_fits(x.shape, w.shape):
        tiled.input_grad(dy, w, stride, top, left, dx)
    else:
        launch(_conv_input_grad, dx.size, dy, w, stride, top, left, dx)
    return dx, dw, db


@cuda.jit
def _maxpool_forward(x, kh, kw, y, argmax):
    _, c_in, h_out, w_out = y.shape
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        n, c, i, j = _unravel_nchw(e, c_in, h_out, w_out)
        row0, col0 = i * kh, j * kw
        best = x[n, c, row0, col0]
        winner = 0
        for offset in range(1, kh * kw):  # offset = di * kw + dj, row-major, so a tie keeps the earlier winner
            di = offset // kw
            value = x[n, c, row0 + di, col0 + offset - di * kw]
            if best == best and (value > best or value != value):  # a NaN wins and then keeps the win
                best = value
                winner = offset
        y[n, c, i, j] = best
        argmax[n, c, i, j] = winner


def maxpool2d_forward(x, size):
    """x[N,C,H,W], size (kh, kw) -> (y[N,C,H//kh,W//kw], argmax uint8 of the same shape) on the device."""
    x = as_device(x, "x")
    n, c, h, wd = x.shape
    kh, kw = size
    y = cuda.device_array((n, c, h // kh, wd // kw), dtype=x.dtype)
    argmax = cuda.device_array(y.shape, dtype=np.uint8)
    launch(_maxpool_forward, y.size, x, kh, kw, y, argmax)
    return y, argmax


@cuda.jit
def _maxpool_backward(dy, argmax, kh, kw, dx):
    _, c_in, h_in, w_in = dx.shape
    h_out, w_out = dy.shape[2], dy.shape[3]
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        n, c, row, col = _unravel_nchw(e, c_in, h_in, w_in)
        i, j = row // kh, col // kw
        if i < h_out and j < w_out and argmax[n, c, i, j] == (row - i * kh) * kw + (col - j * kw):
            dx[n, c, row, col] = dy[n, c, i, j]
        else:
            dx[n, c, row, col] = ZERO


def maxpool2d_backward(dy, argmax, x_shape, size):
    """dy[N,C,H//kh,W//kw], argmax, x_shape, size (kh, kw) -> dx[N,C,H,W] on the device, dy routed to each
    window's winner."""
    dy, argmax = as_device(dy, "dy"), as_device(argmax, "argmax")
    kh, kw = size
    dx = cuda.device_array(tuple(x_shape), dtype=dy.dtype)
    launch(_maxpool_backward, dx.size, dy, argmax, kh, kw, dx)
    return dx


@cuda.jit
def _avgpool_forward(x, kh, kw, count, y):
    """count: kh * kw in y's dtype (an int would promote float32 arithmetic to float64)."""
    _, c_in, h_out, w_out = y.shape
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        n, c, i, j = _unravel_nchw(e, c_in, h_out, w_out)
        row0, col0 = i * kh, j * kw
        acc = ZERO
        for di in range(kh):
            for dj in range(kw):
                acc += x[n, c, row0 + di, col0 + dj]
        y[n, c, i, j] = acc / count


def avgpool2d_forward(x, size):
    """x[N,C,H,W], size (kh, kw) -> y[N,C,H//kh,W//kw] on the device, the mean of each window."""
    x = as_device(x, "x")
    n, c, h, wd = x.shape
    kh, kw = size
    y = cuda.device_array((n, c, h // kh, wd // kw), dtype=x.dtype)
    launch(_avgpool_forward, y.size, x, kh, kw, np.dtype(x.dtype).type(kh * kw), y)
    return y


@cuda.jit
def _avgpool_backward(dy, kh, kw, count, dx):
    _, c_in, h_in, w_in = dx.shape
    h_out, w_out = dy.shape[2], dy.shape[3]
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        n, c, row, col = _unravel_nchw(e, c_in, h_in, w_in)
        i, j = row // kh, col // kw
        if i < h_out and j < w_out:
            dx[n, c, row, col] = dy[n, c, i, j] / count
        else:
            dx[n, c, row, col] = ZERO


def avgpool2d_backward(dy, x_shape, size):
    """dy[N,C,H//kh,W//kw], x_shape, size (kh, kw) -> dx[N,C,H,W] on the device: each window's dy / (kh*kw) on
    each of its elements, zero on the dropped rows and columns."""
    dy = as_device(dy, "dy")
    kh, kw = size
    dx = cuda.device_array(tuple(x_shape), dtype=dy.dtype)
    launch(_avgpool_backward, dx.size, dy, kh, kw, np.dtype(dy.dtype).type(kh * kw), dx)
    return dx


@cuda.jit
def _batchnorm_batch_stats(x, one, count, eps, momentum, one_minus_momentum, mean, inv_std, running_mean,
                           running_var):
    """x viewed as [N, C, H*W]; a block per channel c: mean[c] and inv_std[c] = 1 / sqrt(var + eps) from the
    biased variance, two passes (the mean, then the squared deviations from it); then running = momentum * running
    + (1 - momentum) * batch statistic. count = N*H*W; the scalars come in x's dtype (`one` too: math.sqrt returns a
    Python float in the simulator, and a float32 constant divided by it would stay float32 in float64 kernels)."""
    scratch = cuda.shared.array(THREADS_PER_BLOCK, dtype=mean.dtype)
    images, plane = x.shape[0], x.shape[2]
    for c in range(cuda.blockIdx.x, mean.size, cuda.gridDim.x):
        acc = ZERO
        for t in range(cuda.threadIdx.x, images * plane, cuda.blockDim.x):
            n = t // plane
            acc += x[n, c, t - n * plane]
        mu = _block_sum(scratch, acc) / count
        acc = ZERO
        for t in range(cuda.threadIdx.x, images * plane, cuda.blockDim.x):
            n = t // plane
            deviation = x[n, c, t - n * plane] - mu
            acc += deviation * deviation
        var = _block_sum(scratch, acc) / count
        if cuda.threadIdx.x == 0:
            mean[c] = mu
            inv_std[c] = one / math.sqrt(var + eps)
            running_mean[c] = momentum * running_mean[c] + one_minus_momentum * mu
            running_var[c] = momentum * running_var[c] + one_minus_momentum * var


@cuda.jit
def _batchnorm_running_stats(running_mean, running_var, one, eps, mean, inv_std):
    """Inference: a thread per channel, mean = running_mean (a copy), inv_std = 1 / sqrt(running_var + eps)."""
    for c in range(cuda.grid(1), mean.size, cuda.gridsize(1)):
        mean[c] = running_mean[c]
        inv_std[c] = one / math.sqrt(running_var[c] + eps)


@cuda.jit
def _batchnorm_normalise(x, gamma, beta, mean, inv_std, y):
    """x, y viewed as [N, C, H*W]: y = (x - mean[c]) * (inv_std[c] * gamma[c]) + beta[c], a thread per element."""
    _, channels, plane = x.shape
    for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        p = e % plane
        c = (e // plane) % channels
        n = e // (plane * channels)
        y[n, c, p] = (x[n, c, p] - mean[c]) * (inv_std[c] * gamma[c]) + beta[c]


def _channels_view(a):
    n, c, h, w = a.shape
    return a.reshape(n, c, h * w)


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """x[N,C,H,W], gamma, beta, running_mean, running_var [C] -> (y[N,C,H,W], mean[C], inv_std[C]) on the device.
    Training normalises by the batch's per-channel mean and biased variance and moves running_mean and running_var
    towards them in place (Keras: running = momentum * running + (1 - momentum) * batch); inference normalises by
    the running statistics. Host running statistics are updated in place too (through a device copy)."""
    x, gamma, beta = as_device(x, "x"), as_device(gamma, "gamma"), as_device(beta, "beta")
    dev_mean, dev_var = as_device(running_mean, "running_mean"), as_device(running_var, "running_var")
    dtype = np.dtype(x.dtype).type
    n, c, h, wd = x.shape
    mean = cuda.device_array((c,), dtype=x.dtype)
    inv_std = cuda.device_array((c,), dtype=x.dtype)
    if training:
        launch_blocks(_batchnorm_batch_stats, c, _channels_view(x), dtype(1), dtype(n * h * wd), dtype(eps),
                      dtype(momentum), dtype(1.0 - momentum), mean, inv_std, dev_mean, dev_var)
        for host, device in ((running_mean, dev_mean), (running_var, dev_var)):
            if host is not device:  # a host array came in: it is updated in place all the same
                host[...] = device.copy_to_host()
    else:
        launch(_batchnorm_running_stats, c, dev_mean, dev_var, dtype(1), dtype(eps), mean, inv_std)
    y = cuda.device_array(x.shape, dtype=x.dtype)
    launch(_batchnorm_normalise, y.size, _channels_view(x), gamma, beta, mean, inv_std, _channels_view(y))
    return y, mean, inv_std


@cuda.jit
def _batchnorm_grad_sums(dy, x, mean, inv_std, dgamma, dbeta):
    """dy, x viewed as [N, C, H*W]; a block per channel: dbeta[c] = sum dy, dgamma[c] = sum dy * x_hat with
    x_hat = (x - mean[c]) * inv_std[c], in a fixed order."""
    scratch = cuda.shared.array(THREADS_PER_BLOCK, dtype=dgamma.dtype)
    images, plane = x.shape[0], x.shape[2]
    for c in range(cuda.blockIdx.x, dgamma.size, cuda.gridDim.x):
        mu, scale = mean[c], inv_std[c]
        sum_dy = ZERO
        sum_dy_xhat = ZERO
        for t in range(cuda.threadIdx.x, images * plane, cuda.blockDim.x):
            n = t // plane
            g = dy[n, c, t - n * plane]
            sum_dy += g
            sum_dy_xhat += g * ((x[n, c, t - n * plane] - mu) * scale)
        total_dy = _block_sum(scratch, sum_dy)
        total_dy_xhat = _block_sum(scratch, sum_dy_xhat)
        if cuda.threadIdx.x == 0:
            dbeta[c] = total_dy
            dgamma[c] = total_dy_xhat


@cuda.jit
def _batchnorm_input_grad(dy, x, gamma, mean, inv_std, dgamma, dbeta, count, dx):
    """dx = gamma * inv_std * (dy - dbeta / M - x_hat * dgamma / M), a thread per element (count = M in x's
    dtype)."""
    _, channels, plane = x.shape
    for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        p = e % plane
        c = (e // plane) % channels
        n = e // (plane * channels)
        x_hat = (x[n, c, p] - mean[c]) * inv_std[c]
        dx[n, c, p] = (gamma[c] * inv_std[c]) * (dy[n, c, p] - dbeta[c] / count - x_hat * (dgamma[c] / count))


def batchnorm2d_backward(dy, x, gamma, mean, inv_std):
    """dy, x [N,C,H,W], gamma, mean, inv_std [C] -> (dx[N,C,H,W], dgamma[C], dbeta[C]) on the device: the
    training-mode gradient through the batch statistics mean and inv_std."""
    dy, x, gamma = as_device(dy, "dy"), as_device(x, "x"), as_device(gamma, "gamma")
    mean, inv_std = as_device(mean, "mean"), as_device(inv_std, "inv_std")
    n, c, h, wd = x.shape
    dgamma = cuda.device_array((c,), dtype=x.dtype)
    dbeta = cuda.device_array((c,), dtype=x.dtype)
    launch_blocks(_batchnorm_grad_sums, c, _channels_view(dy), _channels_view(x), mean, inv_std, dgamma, dbeta)
    dx = cuda.device_array(x.shape, dtype=x.dtype)
    launch(_batchnorm_input_grad, dx.size, _channels_view(dy), _channels_view(x), gamma, mean, inv_std, dgamma, dbeta,
           np.dtype(x.dtype).type(n * h * wd), _channels_view(dx))
    return dx, dgamma, dbeta
