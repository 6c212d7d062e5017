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


def _padded(x, padding):
    top, bottom, left, right = padding
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def conv2d_forward(x, w, b, relu, stride, padding):
    """y[n,k,i,j] = b[k] + sum_{c,r,s} xp[n,c,i*stride+r,j*stride+s] w[k,c,r,s] over the zero-padded xp, one einsum
    per tap (r, s) over a strided view."""
    xp, w, b = _padded(_f64(x), padding), _f64(w), _f64(b)
    _, _, kernel_h, kernel_w = w.shape
    out_h = (xp.shape[2] - kernel_h) // stride + 1
    out_w = (xp.shape[3] - kernel_w) // stride + 1
    y = np.broadcast_to(b[None, :, None, None], (x.shape[0], w.shape[0], out_h, out_w)).copy()
    for r in range(kernel_h):
        for s in range(kernel_w):
            view = xp[:, :, r:r + stride * (out_h - 1) + 1:stride, s:s + stride * (out_w - 1) + 1:stride]
            y += np.einsum("nchw,kc->nkhw", view, w[:, :, r, s])
    return np.maximum(y, 0.0) if relu else y


def conv2d_backward(dy, x, w, need_dx, stride, padding):
    """The three gradients of the forward above, tap by tap: dw[:, :, r, s] contracts dy with the strided view tap
    (r, s) read; dx receives dy times that tap's weights on the same view of the padded input, then is cropped."""
    dy, xp, w = _f64(dy), _padded(_f64(x), padding), _f64(w)
    _, _, kernel_h, kernel_w = w.shape
    out_h, out_w = dy.shape[2:]
    dw = np.empty_like(w)
    dxp = np.zeros_like(xp)
    for r in range(kernel_h):
        for s in range(kernel_w):
            window = (slice(None), slice(None), slice(r, r + stride * (out_h - 1) + 1, stride),
                      slice(s, s + stride * (out_w - 1) + 1, stride))
            dw[:, :, r, s] = np.einsum("nkhw,nchw->kc", dy, xp[window])
            dxp[window] += np.einsum("nkhw,kc->nchw", dy, w[:, :, r, s])
    top, _, left, _ = padding
    dx = dxp[:, :, top:top + x.shape[2], left:left + x.shape[3]]
    return (dx if need_dx else None), dw, dy.sum(axis=(0, 2, 3))


def _windows(x, size):
    """x[N,C,H,W] -> [N,C,H//kh,W//kw,kh*kw]: each full window's elements in row-major order (di*kw + dj)."""
    n, c, h, w = x.shape
    kh, kw = size
    ho, wo = h // kh, w // kw
    blocks = x[:, :, :kh * ho, :kw * wo].reshape(n, c, ho, kh, wo, kw)
    return blocks.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, kh * kw)


def _unwindows(windows, x_shape, size):
    """The inverse of _windows: [N,C,ho,wo,kh*kw] folded back into an (N,C,H,W) image, zeros where no window is."""
    n, c, h, w = x_shape
    kh, kw = size
    ho, wo = windows.shape[2:4]
    dx = np.zeros((n, c, h, w))
    dx[:, :, :kh * ho, :kw * wo] = windows.reshape(n, c, ho, wo, kh, kw).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, kh * ho, kw * wo)
    return dx


def maxpool2d_forward(x, size):
    windows = _windows(_f64(x), size)
    argmax = np.argmax(windows, axis=-1)  # first occurrence of the maximum: the contract's tie rule
    return windows.max(axis=-1), argmax.astype(np.uint8)


def maxpool2d_backward(dy, argmax, x_shape, size):
    """dy placed by a one-hot of argmax over each window's slots, then the windows folded back into the image;
    rows and columns outside every window stay zero."""
    one_hot = np.asarray(argmax)[..., None] == np.arange(size[0] * size[1])
    return _unwindows(np.where(one_hot, _f64(dy)[..., None], 0.0), x_shape, size)


def avgpool2d_forward(x, size):
    return _windows(_f64(x), size).mean(axis=-1)


def avgpool2d_backward(dy, x_shape, size):
    """Each window's dy shared equally by its kh*kw elements."""
    count = size[0] * size[1]
    return _unwindows(np.repeat(_f64(dy)[..., None] / count, count, axis=-1), x_shape, size)


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """Training: each channel normalised by its batch mean and biased variance over (N, H, W), the running
    statistics moved towards them (running = momentum * running + (1 - momentum) * batch, in place); inference: by
    the running statistics. -> (y, mean, inv_std), the statistics used."""
    x = _f64(x)
    if training:
        mean = x.mean(axis=(0, 2, 3))
        var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
        running_mean[...] = momentum * _f64(running_mean) + (1 - momentum) * mean
        running_var[...] = momentum * _f64(running_var) + (1 - momentum) * var
    else:
        mean, var = _f64(running_mean).copy(), _f64(running_var)
    inv_std = 1.0 / np.sqrt(var + eps)
    y = (x - mean[None, :, None, None]) * (inv_std * _f64(gamma))[None, :, None, None] + _f64(beta)[None, :, None, None]
    return y, mean, inv_std


def batchnorm2d_backward(dy, x, gamma, mean, inv_std):
    """The training-mode gradient, per channel over its M = N*H*W elements, through x_hat = (x - mean) * inv_std:
    dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat)); dgamma = sum(dy * x_hat); dbeta = sum(dy)."""
    dy, x = _f64(dy), _f64(x)
    per_channel = (None, slice(None), None, None)
    x_hat = (x - _f64(mean)[per_channel]) * _f64(inv_std)[per_channel]
    dbeta = dy.sum(axis=(0, 2, 3))
    dgamma = (dy * x_hat).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    dx = (_f64(gamma) * _f64(inv_std))[per_channel] * (
        dy - (dbeta / count)[per_channel] - x_hat * (dgamma / count)[per_channel])
    return dx, dgamma, dbeta
