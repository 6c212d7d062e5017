"""The small layers in numpy, each forward beside its backward, shapes first: ReLU, dropout, dense, the softmax
cross-entropy loss (with argmax_rows, its prediction), the Adam update, and flatten (Flatten's forward).

These are a backend's `layers` (Backend.layers): the ops a network runs beside the contract's kernels. They are cheap
next to the convolutions (the dense layer is one small matmul), so naive, im2col and the oracle use these as they
are; jit/layers.py replaces some with compiled ones and cuda/layers.py has every one, same parameters, on device
arrays. The arrays they take come through the backend's array runtime (host.py here, cuda/runtime.py), and dropout
draws from the backend's generator (dropout_rng.py, cuda/dropout_rng.py).
"""

import numpy as np


def relu_forward(x):
    """x[any shape] -> max(x, 0); a NaN stays NaN (np.maximum propagates it, as torch.relu does)."""
    return np.maximum(x, x.dtype.type(0))


def relu_backward(dy, y):
    """dy, y[any shape] -> dy where y > 0, else 0: the ReLU derivative, given the ReLU's output (or a max-pool of
    it). A select, not dy * (y > 0), as torch's threshold_backward (y <= 0 ? 0 : dy): where the ReLU clipped, the
    gradient is exactly 0 even if dy is NaN or infinite (NaN * 0 would be NaN), and a NaN y passes dy on."""
    return np.where(y <= 0, dy.dtype.type(0), dy)


def dropout_forward(x, rate, rng):
    """x[N, D] -> (y[N, D], mask[N, D]): inverted dropout, each unit kept with probability 1 - rate and scaled by
    1 / (1 - rate) so that inference needs no rescaling. The mask already holds the scale; rng is the numpy
    Generator of dropout_rng.py, one float64 drawn per unit."""
    keep = np.asarray(1.0 - rate, dtype=x.dtype)
    mask = (rng.random(x.shape, dtype=np.float64) < keep).astype(x.dtype)
    mask /= keep
    return x * mask, mask


def dropout_backward(dy, mask):
    return dy * mask


def flatten(x):
    """x[N, C, H, W] (either layout) -> [N, C*H*W] in (C, H, W) order: a view of an NCHW-contiguous x, else a copy
    (Flatten's backward reshapes dy back to x's shape, NCHW)."""
    return x.reshape(x.shape[0], -1)


def dense_forward(x, w, b):
    """x[N, D], w[D, M], b[M] -> y[N, M] = x @ w + b."""
    return x @ w + b


def dense_backward(dy, x, w):
    """dy[N, M], x[N, D], w[D, M] -> (dx[N, D], dw[D, M], db[M])."""
    return dy @ w.T, x.T @ dy, dy.sum(axis=0)


def softmax_cross_entropy(logits, labels):
    """logits[N, M], labels[N] int -> (mean loss: float, dlogits[N, M], correct: int).

    log-softmax by log-sum-exp after subtracting each row's max, so large logits cannot overflow; the gradient of
    the mean loss is (softmax - onehot) / N, fused here because it is simpler and stabler than chaining the two.
    """
    n = logits.shape[0]
    rows = np.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    log_probs = shifted[rows, labels] - np.log(sum_exp[:, 0])
    loss = -float(log_probs.mean(dtype=np.float64))
    dlogits = exp / sum_exp
    dlogits[rows, labels] -= 1
    dlogits /= n
    correct = int((logits.argmax(axis=1) == labels).sum())
    return loss, dlogits.astype(logits.dtype, copy=False), correct


def argmax_rows(logits):
    """logits[N, M] -> predicted class per row, int64[N] on the host."""
    return np.asarray(logits).argmax(axis=1)


def adam_update(param, grad, m, v, alpha, beta1, beta2, eps):
    """In place, one Adam step as Keras defines it (alpha already carries the bias corrections):
    m += (g - m)(1 - beta1);  v += (g^2 - v)(1 - beta2);  param -= alpha * m / (sqrt(v) + eps)."""
    dtype = param.dtype.type
    m += (grad - m) * dtype(1 - beta1)
    v += (grad * grad - v) * dtype(1 - beta2)
    param -= dtype(alpha) * m / (np.sqrt(v) + dtype(eps))
