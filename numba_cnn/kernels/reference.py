"""reference: the float64 oracle every backend is compared with, and the one tolerance of those comparisons.

It shares no code with any backend and computes each op another way: convolution as a sum over kernel taps of
einsum contractions of shifted slices (no patch matrix, no explicit pixel loop), pooling by lining up each
window's four elements on a last axis in row-major order and taking np.argmax (documented to return the first
maximum, and the first NaN where there is one: the contract's NaN rule). It is registered as a backend, so the
whole Model also runs on it in float64, but the CLI does not offer it. Inputs of any float dtype are computed on in
float64; outputs are float64 (argmax uint8). Tests, the bench's check-then-time gate and the cuda tests all
compare with it through `relative_error` and `tolerance`.
"""

import numpy as np

from numba_cnn.kernels.contract import BackendInfo

INFO = BackendInfo(summary="float64 oracle (einsum per kernel tap), for checks only", blas_threads="all")

# float32 results vs this oracle (and vs each other): |actual - expected| <= FLOAT32_TOL * (|expected| +
# max |expected|), elementwise. float32 keeps 24 bits (unit roundoff 6e-8). A convolution output sums C*R*S
# products (288 for conv2) and a weight gradient N*P*Q of them (15,488 for conv2's dW at batch 128); rounding grows
# about with the square root of the term count, so the error relative to the largest element stays near
# 1e-7..1e-6 (im2col vs this oracle on conv2 with a batch of 64: 5.7e-7 forward, 3.9e-7 on dw; a jit conv2 forward
# tile: 7.6e-5 absolute on outputs near 50, 1.5e-6 relative). 1e-4 leaves two orders of magnitude for other
# summation orders and for the Model's chained layers, while a real bug (a missed tap, an off-by-one, a wrong sign)
# moves elements by 1e-2..1 relative.
FLOAT32_TOL = 1e-4
# float64 results: the same sums with 53 bits (unit roundoff 1.1e-16) stay below 1e-13 relative here.
FLOAT64_TOL = 1e-10


def tolerance(dtype):
    return FLOAT32_TOL if np.dtype(dtype) == np.float32 else FLOAT64_TOL


def relative_error(actual, expected):
    """max over elements of |actual - expected| / (|expected| + max |expected|): the measure every comparison with
    the oracle uses, so that near-zero elements of a large sum are judged on the sum's scale. Non-finite expected
    elements must be matched exactly (NaN by NaN, an infinity by the same infinity), else the error is inf."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape}, expected {expected.shape}")
    finite = np.isfinite(expected)
    same_special = (np.isnan(expected) & np.isnan(actual)) | (np.isinf(expected) & (actual == expected))
    if not np.all(finite | same_special) or not np.all(np.isfinite(actual[finite])):
        return float("inf")
    if not finite.any():
        return 0.0
    diff = np.abs(actual[finite] - expected[finite])
    bound = np.abs(expected[finite]) + np.abs(expected[finite]).max()
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / bound)
    return float(ratio.max())


def assert_close(actual, expected, dtype, what="result"):
    """actual within the tolerance of `dtype` of expected, by relative_error."""
    actual, expected = np.asarray(actual), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    err = relative_error(actual, expected)
    assert err <= tolerance(dtype), f"{what}: relative error {err:.3g} > {tolerance(dtype):g}"


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def conv2d_forward(x, w, b, relu):
    """y[n,k,i,j] = b[k] + sum_{c,r,s} x[n,c,i+r,j+s] w[k,c,r,s], one einsum per tap (r, s) over a shifted view."""
    x, w, b = _f64(x), _f64(w), _f64(b)
    _, _, kernel_h, kernel_w = w.shape
    out_h, out_w = x.shape[2] - kernel_h + 1, x.shape[3] - kernel_w + 1
    y = np.broadcast_to(b[None, :, None, None], (x.shape[0], w.shape[0], out_h, out_w)).copy()
    for r in range(kernel_h):
        for s in range(kernel_w):
            y += np.einsum("nchw,kc->nkhw", x[:, :, r:r + out_h, s:s + out_w], w[:, :, r, s])
    return np.maximum(y, 0.0) if relu else y


def conv2d_backward(dy, x, w, need_dx):
    """The three gradients of the forward above, tap by tap: dw[:, :, r, s] contracts dy with the slice tap (r, s)
    read; dx receives dy times that tap's weights on the same slice."""
    dy, x, w = _f64(dy), _f64(x), _f64(w)
    _, _, kernel_h, kernel_w = w.shape
    out_h, out_w = dy.shape[2:]
    dw = np.empty_like(w)
    dx = np.zeros_like(x)
    for r in range(kernel_h):
        for s in range(kernel_w):
            window = (slice(None), slice(None), slice(r, r + out_h), slice(s, s + out_w))
            dw[:, :, r, s] = np.einsum("nkhw,nchw->kc", dy, x[window])
            dx[window] += np.einsum("nkhw,kc->nchw", dy, w[:, :, r, s])
    return (dx if need_dx else None), dw, dy.sum(axis=(0, 2, 3))


def _windows(x):
    """x[N,C,H,W] -> [N,C,H//2,W//2,4]: each full 2x2 window's elements in row-major order (2*di + dj)."""
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    blocks = x[:, :, :2 * ho, :2 * wo].reshape(n, c, ho, 2, wo, 2)
    return blocks.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, 4)


def maxpool2d_forward(x):
    windows = _windows(_f64(x))
    argmax = np.argmax(windows, axis=-1)  # first occurrence of the maximum: the contract's tie rule
    return windows.max(axis=-1), argmax.astype(np.uint8)


def maxpool2d_backward(dy, argmax, x_shape):
    """dy placed by a one-hot of argmax over each window's four slots, then the windows folded back into the image;
    rows and columns outside every window stay zero."""
    n, c, h, w = x_shape
    ho, wo = h // 2, w // 2
    one_hot = np.asarray(argmax)[..., None] == np.arange(4)
    windows = np.where(one_hot, _f64(dy)[..., None], 0.0)  # [N, C, ho, wo, 4]
    dx = np.zeros((n, c, h, w))
    dx[:, :, :2 * ho, :2 * wo] = windows.reshape(n, c, ho, wo, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, 2 * ho, 2 * wo)
    return dx
