"""The cuda backend's `layers`: every function of numba_cnn/kernels/layers.py, on device arrays, each launcher
beside its kernels.

Arrays stay on the device from `to_device` to `to_host`: each function below launches kernels on device arrays and
returns device arrays, except the two that hand the host a metric (softmax_cross_entropy's loss and count,
argmax_rows's predictions). Host numpy arrays are accepted anywhere and copied in first, which the tests rely on.

Dropout draws from numba.cuda.random's xoroshiro128p generators (their states: dropout_rng.py), a fixed number of
independent streams; stream t serves elements t, t + streams, t + 2 * streams, ... of the input in flat C order (any
shape), so a mask depends only on the seed, the stream count (4096 on a GPU, 32 in the simulator; a checkpoint keeps
its own), the number of elements and the calls before it.
"""

import math
import warnings

import numpy as np

from numba_cnn.kernels.cuda.runtime import (THREADS_PER_BLOCK, ZERO, _block_sum, as_device, cuda, flat, launch,
                                            launch_blocks, sum_outer_inner)

with warnings.catch_warnings():
    # In the simulator numba.cuda.random decorates its CPU seeding helpers with nopython=False (deprecated).
    warnings.simplefilter("ignore", DeprecationWarning)
    from numba.cuda.random import xoroshiro128p_uniform_float32


@cuda.jit
def _relu_forward(x, y):
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        value = x[e]
        y[e] = ZERO if value < ZERO else value  # not `value if value > 0 else 0`: a NaN stays NaN


def relu_forward(x):
    """x[any shape] -> max(x, 0), a new device array; a NaN stays NaN and -inf becomes 0
    (numba_cnn/kernels/layers.py)."""
    x = as_device(x, "x")
    y = cuda.device_array(x.shape, dtype=x.dtype)
    launch(_relu_forward, y.size, flat(x), flat(y))
    return y


@cuda.jit
def _relu_backward(dy, y, dx):
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        dx[e] = ZERO if y[e] <= ZERO else dy[e]


def relu_backward(dy, y):
    """dy, y[any shape] -> dy where y > 0 or y is NaN, else exactly 0 (numba_cnn/kernels/layers.py)."""
    dy, y = as_device(dy, "dy"), as_device(y, "y")
    dx = cuda.device_array(dy.shape, dtype=dy.dtype)
    launch(_relu_backward, dx.size, flat(dy), flat(y), flat(dx))
    return dx


@cuda.jit
def _dropout(x, states, keep, scale, y, mask):
    """Thread t owns stream t and the elements t, t + len(states), t + 2 * len(states), ..."""
    stream = cuda.grid(1)
    if stream < states.size:
        for e in range(stream, x.size, states.size):
            kept = xoroshiro128p_uniform_float32(states, stream) < keep
            m = scale if kept else ZERO
            mask[e] = m
            y[e] = x[e] * m


def dropout_forward(x, rate, rng):
    """x[any shape] -> (y, mask) of x's shape: inverted dropout, each unit kept with probability 1 - rate and
    scaled by 1 / (1 - rate); the mask holds the scale. Elements are drawn in x's flat C order."""
    x = as_device(x, "x")
    dtype = np.dtype(x.dtype).type
    keep = dtype(1.0 - rate)
    y = cuda.device_array(x.shape, dtype=x.dtype)
    mask = cuda.device_array(x.shape, dtype=x.dtype)
    blocks = math.ceil(rng.states.size / THREADS_PER_BLOCK)  # a thread per stream, not per element
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the simulator's uint64 arithmetic wraps on purpose
        _dropout[blocks, THREADS_PER_BLOCK](flat(x), rng.states, np.float32(keep), dtype(1) / keep, flat(y),
                                            flat(mask))
    return y, mask


@cuda.jit
def _multiply(a, b, out):
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[e] = a[e] * b[e]


def dropout_backward(dy, mask):
    dy, mask = as_device(dy, "dy"), as_device(mask, "mask")
    dx = cuda.device_array(dy.shape, dtype=dy.dtype)
    launch(_multiply, dx.size, flat(dy), flat(mask), flat(dx))
    return dx


@cuda.jit
def _dense_forward(x, w, b, y):
    """One block per y[n, m]; its threads split the D products x[n, d] * w[d, m]."""
    scratch = cuda.shared.array(THREADS_PER_BLOCK, dtype=y.dtype)
    outputs = y.shape[1]
    for e in range(cuda.blockIdx.x, y.size, cuda.gridDim.x):
        n = e // outputs
        m = e - n * outputs
        acc = ZERO
        for d in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
            acc += x[n, d] * w[d, m]
        total = _block_sum(scratch, acc)
        if cuda.threadIdx.x == 0:
            y[n, m] = b[m] + total


def flatten(x):
    """numpy_layers.flatten on a device array (C-contiguous: a view)."""
    x = as_device(x)
    return x.reshape(x.shape[0], -1)


def dense_forward(x, w, b):
    """x[N, D], w[D, M], b[M] -> y[N, M] = x @ w + b."""
    x, w, b = as_device(x, "x"), as_device(w, "w"), as_device(b, "b")
    y = cuda.device_array((x.shape[0], w.shape[1]), dtype=x.dtype)
    launch_blocks(_dense_forward, y.size, x, w, b, y)
    return y


@cuda.jit
def _dense_input_grad(dy, w, dx):
    """dx[n, d] = sum_m dy[n, m] * w[d, m] (M is small: 10 classes)."""
    inputs = dx.shape[1]
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        n = e // inputs
        d = e - n * inputs
        acc = ZERO
        for m in range(dy.shape[1]):
            acc += dy[n, m] * w[d, m]
        dx[n, d] = acc


@cuda.jit
def _dense_weight_grad(dy, x, dw):
    """dw[d, m] = sum_n x[n, d] * dy[n, m] (N is one batch)."""
    outputs = dw.shape[1]
    for e in range(cuda.grid(1), dw.size, cuda.gridsize(1)):
        d = e // outputs
        m = e - d * outputs
        acc = ZERO
        for n in range(x.shape[0]):
            acc += x[n, d] * dy[n, m]
        dw[d, m] = acc


def dense_backward(dy, x, w):
    """dy[N, M], x[N, D], w[D, M] -> (dx[N, D], dw[D, M], db[M])."""
    dy, x, w = as_device(dy, "dy"), as_device(x, "x"), as_device(w, "w")
    dx = cuda.device_array(x.shape, dtype=x.dtype)
    dw = cuda.device_array(w.shape, dtype=w.dtype)
    db = cuda.device_array((w.shape[1],), dtype=w.dtype)
    launch(_dense_input_grad, dx.size, dy, w, dx)
    launch(_dense_weight_grad, dw.size, dy, x, dw)
    launch_blocks(sum_outer_inner, db.size, dy.reshape(dy.shape[0], dy.shape[1], 1), db)
    return dx, dw, db


@cuda.jit
def _softmax_cross_entropy(logits, labels, one, batch, dlogits, row_stats):
    """A thread per row n: dlogits[n] = (softmax(logits[n]) - onehot(labels[n])) / batch, row_stats[n] =
    (-log softmax(logits[n])[label], 1 if the first largest logit is the label's else 0). `one` and `batch` come
    in the logits' dtype: math.exp returns a Python float in the simulator, which must not widen or narrow."""
    classes = logits.shape[1]
    for n in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        top = logits[n, 0]
        best = 0
        for m in range(1, classes):
            if logits[n, m] > top:
                top = logits[n, m]
                best = m
        sum_exp = one  # the largest logit's term, exp(top - top)
        for m in range(classes):
            if m != best:
                sum_exp += math.exp(logits[n, m] - top)
        label = labels[n]
        for m in range(classes):
            p = math.exp(logits[n, m] - top) / sum_exp
            dlogits[n, m] = (p - one if m == label else p) / batch
        row_stats[n, 0] = math.log(sum_exp) - (logits[n, label] - top)
        row_stats[n, 1] = one if best == label else ZERO


def softmax_cross_entropy(logits, labels):
    """logits[N, M], labels[N] int -> (mean loss: float, dlogits[N, M] on the device, correct: int).

    The per-row losses and hits come back to the host (2N numbers) for the two metrics; nothing else does.
    """
    logits, labels = as_device(logits, "logits"), as_device(labels, "labels")
    n = logits.shape[0]
    dlogits = cuda.device_array(logits.shape, dtype=logits.dtype)
    row_stats = cuda.device_array((n, 2), dtype=logits.dtype)
    dtype = np.dtype(logits.dtype).type
    launch(_softmax_cross_entropy, n, logits, labels, dtype(1), dtype(n), dlogits, row_stats)
    stats = row_stats.copy_to_host()
    return float(stats[:, 0].mean(dtype=np.float64)), dlogits, int(stats[:, 1].sum(dtype=np.float64))


@cuda.jit
def _argmax_rows(logits, out):
    for n in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        best = 0
        for m in range(1, logits.shape[1]):
            if logits[n, m] > logits[n, best]:
                best = m
        out[n] = best


def argmax_rows(logits):
    """logits[N, M] -> predicted class per row, int64[N] on the host."""
    logits = as_device(logits, "logits")
    out = cuda.device_array(logits.shape[0], dtype=np.int64)
    launch(_argmax_rows, logits.shape[0], logits, out)
    return out.copy_to_host()


@cuda.jit
def _adam(param, grad, m, v, alpha, one_minus_beta1, one_minus_beta2, eps):
    for e in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        g = grad[e]
        m[e] += (g - m[e]) * one_minus_beta1
        v[e] += (g * g - v[e]) * one_minus_beta2
        param[e] -= alpha * m[e] / (math.sqrt(v[e]) + eps)


def adam_update(param, grad, m, v, alpha, beta1, beta2, eps):
    """In place, one Adam step as Keras defines it (alpha already carries the bias corrections):
    m += (g - m)(1 - beta1);  v += (g^2 - v)(1 - beta2);  param -= alpha * m / (sqrt(v) + eps).
    param, m and v must be device arrays (they are updated where they are)."""
    dtype = np.dtype(param.dtype).type
    grad = as_device(grad, "grad")
    launch(_adam, param.size, flat(param), flat(grad), flat(m), flat(v), dtype(alpha), dtype(1 - beta1),
           dtype(1 - beta2), dtype(eps))
