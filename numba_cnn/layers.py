"""The layers that are not convolution or pooling, in numpy: each forward beside its backward, shapes first.

These are cheap next to the convolutions (the dense layer is one small matmul), so every CPU backend shares them.
A backend whose arrays live elsewhere (cuda) provides a module with these same functions as its `layers`.
"""

import numpy as np


def zeros_like(a):
    return np.zeros_like(a)


def take_rows(data, idx):
    """data[N, ...], idx[B] int -> data[idx] as a new contiguous array (one mini-batch)."""
    return data[idx]


def as_float_images(images):
    """Images as the network takes them: raw uint8 pixels become float32 in [0, 1] (pixel / 255; load_mnist
    scales through here too); float images pass through. The trainer keeps the set in uint8, a quarter of
    the memory, and converts one batch at a time."""
    if images.dtype != np.uint8:
        return images
    scaled = images.astype(np.float32)
    scaled /= np.float32(255)  # in place: scaling the whole set must not hold a second float copy
    return scaled


def relu_forward(x):
    """x[any shape] -> max(x, 0); a NaN stays NaN (np.maximum propagates it, as torch.relu does)."""
    return np.maximum(x, x.dtype.type(0))


def relu_backward(dy, y):
    """dy, y[any shape] -> dy where y > 0, else 0: the ReLU derivative, given the ReLU's output (or a max-pool of
    it). A select, not dy * (y > 0), as torch's threshold_backward (y <= 0 ? 0 : dy): where the ReLU clipped, the
    gradient is exactly 0 even if dy is NaN or infinite (NaN * 0 would be NaN), and a NaN y passes dy on."""
    return np.where(y <= 0, dy.dtype.type(0), dy)


def make_dropout_rng(seed):
    return np.random.default_rng(seed)


def dropout_rng_state(rng):
    """A JSON-serialisable snapshot of the dropout RNG (checkpoints store it for exact resume)."""
    return rng.bit_generator.state


def restore_dropout_rng(state):
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def dropout_forward(x, rate, rng):
    """x[N, D] -> (y[N, D], mask[N, D]): inverted dropout, each unit kept with probability 1 - rate and scaled by
    1 / (1 - rate) so that inference needs no rescaling. The mask already holds the scale."""
    keep = np.asarray(1.0 - rate, dtype=x.dtype)
    mask = (rng.random(x.shape, dtype=np.float64) < keep).astype(x.dtype)
    mask /= keep
    return x * mask, mask


def dropout_backward(dy, mask):
    return dy * mask


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
