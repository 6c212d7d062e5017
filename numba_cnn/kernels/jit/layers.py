"""The jit backend's layers: numba_cnn/layers.py's numpy functions, except four that a training step calls on
small arrays, where numpy's per-call overheads and one thread cost more than the work: dropout's forward, whose mask
a compiled counter-based generator draws in parallel, in float32 (numpy's generator draws one float64 per unit,
serially, a visible share of a step for the model's 128 x 1600 units), its backward (in parallel), the softmax
cross-entropy and the Adam update (compiled loops, serial: 128 x 10 logits, 34,826 parameters). The dense layer
stays numpy's: its matrices are small enough that a compiled version on every core runs no faster than one-thread
BLAS. Each agrees with the numpy layer within float32 rounding (tests/test_layers.py runs both).

The generator is Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; PyTorch's CUDA generator is Philox too): word j of the block for counter c under key k is a pure
function of (c, k), so every unit's bits are the same whatever the thread count and the order units are drawn in.
Each call takes a fresh 64-bit key from the numpy Generator the model passes (two 32-bit words), so seeding,
checkpoints and exact resume work as for the other backends, whose masks come from that Generator's own stream.
Unit i reads word i % 4 of counter i // 4 and is kept when that word's top 24 bits, as a float32 in [0, 1), are
below 1 - rate. Self-contained (no @njit helper from another file), so Numba's cache sees every change.
"""

import math

import numpy as np
from numba import njit, prange

from numba_cnn.kernels._numba_ext import jit as _jit
from numba_cnn import layers as numpy_layers
from numba_cnn.layers import (argmax_rows, as_float_images, dense_backward, dense_forward,  # noqa: F401
                              dropout_rng_state, make_dropout_rng, relu_backward, relu_forward, restore_dropout_rng,
                              take_rows, zeros_like)

_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # the round multipliers
_PHILOX_W0, _PHILOX_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # the key schedule's increments
_BLOCKS_PER_TASK = 1024  # counters per parallel task: 4096 units, enough work to amortise a task's start


@njit(inline="always")  # inlined in numba IR into the kernels below
def _philox4x32(c0, c1, c2, c3, k0, k1):
    """The four 32-bit words (as uint64) of Philox4x32-10 for counter (c0, c1, c2, c3) and key (k0, k1)."""
    for _ in range(10):
        p0, p1 = _PHILOX_M0 * c0, _PHILOX_M1 * c2
        c0, c1, c2, c3 = (p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _LOW32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _LOW32
        k0, k1 = (k0 + _PHILOX_W0) & _LOW32, (k1 + _PHILOX_W1) & _LOW32
    return c0, c1, c2, c3


@_jit
def _dropout(x, key0, key1, threshold, outcomes, y, mask):
    """mask[i] = outcomes[1] (the scale) if the top 24 bits of word i % 4 of Philox4x32-10(counter (i // 4, 0, 0, 0),
    key (key0, key1)) are below threshold, else outcomes[0] (zero); y = x * mask. x, y, mask flat. The outcome is
    looked up, not selected: a select on random bits compiled to branches, mispredicted half the time."""
    n = x.shape[0]
    k0, k1, limit = np.uint64(key0), np.uint64(key1), np.uint64(threshold) << np.uint64(8)
    for c in prange((n + 3) // 4):
        words = _philox4x32(np.uint64(c) & _LOW32, np.uint64(c) >> _SHIFT32, np.uint64(0), np.uint64(0), k0, k1)
        for j in range(min(4, n - 4 * c)):  # 4 but in a short last block
            kept = outcomes[int(words[j] < limit)]  # word >> 8 < threshold
            mask[4 * c + j] = kept
            y[4 * c + j] = x[4 * c + j] * kept


def dropout_forward(x, rate, rng):
    """x[N, D] -> (y[N, D], mask[N, D]): inverted dropout as numba_cnn.layers.dropout_forward (each unit kept with
    probability 1 - rate, the mask holding the scale 1 / (1 - rate)), the mask drawn by Philox4x32-10 under a key
    taken from the numpy Generator `rng`."""
    x = np.ascontiguousarray(x)
    dtype = x.dtype.type
    keep = dtype(1.0 - rate)
    # a unit's uniform is (word >> 8) * 2**-24; it is below keep exactly when word >> 8 < ceil(keep * 2**24)
    threshold = math.ceil(float(keep) * 2 ** 24)
    key = rng.integers(0, 2 ** 32, size=2, dtype=np.uint64)
    y, mask = np.empty_like(x), np.empty_like(x)
    outcomes = np.array([0, dtype(1) / keep], x.dtype)
    _dropout(x.reshape(-1), key[0], key[1], threshold, outcomes, y.reshape(-1), mask.reshape(-1))
    return y, mask


@_jit
def _multiply(a, b, out):
    for i in prange(out.shape[0]):
        out[i] = a[i] * b[i]


def dropout_backward(dy, mask):
    """dy[N, D], mask[N, D] (the scale included) -> dy * mask."""
    dy, mask = np.ascontiguousarray(dy), np.ascontiguousarray(mask)
    dx = np.empty_like(dy)
    _multiply(dy.reshape(-1), mask.reshape(-1), dx.reshape(-1))
    return dx


@_jit(parallel=False)
def _softmax_cross_entropy(logits, labels, zero, batch, dlogits, log_probs):
    """Per row n: dlogits[n] = (softmax(logits[n]) - onehot(labels[n])) / batch and log_probs[n] = log
    softmax(logits[n])[labels[n]], each as numba_cnn.layers.softmax_cross_entropy computes it (the row's max
    subtracted first); -> how many rows have their label at the first largest logit (NaN counting as the largest,
    the first NaN first: numpy's argmax)."""
    n_rows, n_classes = logits.shape
    correct = 0
    for n in range(n_rows):
        row, out = logits[n], dlogits[n]
        top, best = row[0], 0
        for m in range(1, n_classes):
            v = row[m]
            later_wins = (v > top) | ((v != v) & (top == top))
            best = m if later_wins else best
            top = v if later_wins else top
        sum_exp = zero
        for m in range(n_classes):
            out[m] = np.exp(row[m] - top)
            sum_exp += out[m]
        label = labels[n]
        log_probs[n] = (row[label] - top) - np.log(sum_exp)
        for m in range(n_classes):
            out[m] /= sum_exp
        out[label] -= 1
        for m in range(n_classes):
            out[m] /= batch
        correct += best == label
    return correct


def softmax_cross_entropy(logits, labels):
    """logits[N, M], labels[N] int -> (mean loss: float, dlogits[N, M], correct: int), as
    numba_cnn.layers.softmax_cross_entropy."""
    logits, labels = np.ascontiguousarray(logits), np.ascontiguousarray(labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):  # compiled code does not check
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    dtype = logits.dtype.type
    dlogits = np.empty_like(logits)
    log_probs = np.empty(logits.shape[0], logits.dtype)
    correct = _softmax_cross_entropy(logits, labels, dtype(0), dtype(logits.shape[0]), dlogits, log_probs)
    return -float(log_probs.mean(dtype=np.float64)), dlogits, int(correct)


@_jit(parallel=False)
def _adam_update(param, grad, m, v, alpha, keep1, keep2, eps):
    """In place over flat arrays, Adam's step as numba_cnn.layers.adam_update writes it (keepN = 1 - betaN)."""
    for i in range(param.shape[0]):
        g = grad[i]
        m[i] += (g - m[i]) * keep1
        v[i] += (g * g - v[i]) * keep2
        param[i] -= alpha * m[i] / (np.sqrt(v[i]) + eps)


def adam_update(param, grad, m, v, alpha, beta1, beta2, eps):
    """In place, one Adam step as numba_cnn.layers.adam_update (alpha carries the bias corrections)."""
    if not (param.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        return numpy_layers.adam_update(param, grad, m, v, alpha, beta1, beta2, eps)  # needs flat views below
    dtype = param.dtype.type
    _adam_update(param.reshape(-1), np.ascontiguousarray(grad, param.dtype).reshape(-1), m.reshape(-1),
                 v.reshape(-1), dtype(alpha), dtype(1 - beta1), dtype(1 - beta2), dtype(eps))
