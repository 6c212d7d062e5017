"""im2col backend: convolution as matrix multiplication through BLAS, pooling and batchnorm as numpy on views.

conv2d_forward       padded x's strided patches copied into cols[N, C*R*S, P*Q], then one batched w @ cols[n].
conv2d_backward      dw = dy @ cols^T and dcols = w^T @ dy (BLAS); col2im adds dcols through the strided taps.
maxpool2d_forward    the kh*kw strided views x[:, :, di::kh, dj::kw] in a pairwise tournament; NaN windows redone.
maxpool2d_backward   dy copied through the same views where argmax points.
avgpool2d_forward    the sum of the kh*kw strided views, divided by kh*kw.
avgpool2d_backward   dy / (kh*kw) written through each of the views.
batchnorm2d_forward  per-channel mean and variance by numpy reductions over (N, H, W), then (x - mean) * scale + beta.
batchnorm2d_backward the two per-channel sums (dy, dy * x_hat), then dx by the contract's formula, all vectorised.

Padding is one np.pad copy of x (none when unpadded); col2im adds into a padded dx and crops it. Pooling never
copies x into windows: its taps are strided slices that elementwise numpy reads directly.

Arithmetic stays in the input dtype, sums included: numpy's reductions sum pairwise (batchnorm's channel sums stay
near 1e-7 relative in float32 at batch 128), and a pooling window's sum has at most 256 terms.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from numba_cnn.kernels.contract import BackendInfo

INFO = BackendInfo(summary="im2col patches and BLAS matmuls, numpy views for pooling and batchnorm")


def _zero_padded(x, padding):
    """x[N,C,H,W] with `padding` = (top, bottom, left, right) rows and columns of zeros; x itself when none."""
    top, bottom, left, right = padding
    if not any(padding):
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def _im2col(xp, r, s, stride):
    """padded xp[N, C, H, W] -> (cols[N, C*R*S, P*Q], (P, Q)): per image one row per kernel tap (c, r, s), one
    column per output pixel, so w[K, C*R*S] @ cols[n] is that image's output in (K, P*Q) order."""
    n, c = xp.shape[:2]
    patches = sliding_window_view(xp, (r, s), axis=(2, 3))[:, :, ::stride, ::stride]  # view (N, C, P, Q, R, S)
    p, q = patches.shape[2:4]
    return patches.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * r * s, p * q), (p, q)


def conv2d_forward(x, w, b, relu, stride, padding):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,P,Q] over x zero-padded by `padding`, with `stride`; ReLU if asked."""
    k, c, r, s = w.shape
    cols, out_shape = _im2col(_zero_padded(x, padding), r, s, stride)
    y = np.matmul(w.reshape(k, c * r * s), cols)  # (N, K, P*Q)
    y += b[:, None]
    if relu:
        np.maximum(y, 0, out=y)
    return y.reshape((x.shape[0], k) + out_shape)


def conv2d_backward(dy, x, w, need_dx, stride, padding):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] or None, dw[K,C,R,S], db[K])."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    p, q = dy.shape[2:]
    xp = _zero_padded(x, padding)
    dy_rows = dy.transpose(1, 0, 2, 3).reshape(k, n * p * q)
    cols = _im2col(xp, r, s, stride)[0].transpose(1, 0, 2).reshape(c * r * s, n * p * q)
    dw = (dy_rows @ cols.T).reshape(w.shape)
    db = dy_rows.sum(axis=1)
    if not need_dx:
        return None, dw, db
    dcols = (w.reshape(k, c * r * s).T @ dy_rows).reshape(c, r, s, n, p, q)
    # channel-major, matching dcols, so each add reads whole rows; padded, so every tap's view is in bounds
    dxp = np.zeros((c, n) + xp.shape[2:], dtype=x.dtype)
    for i in range(r):  # col2im: one strided add per kernel tap
        for j in range(s):
            dxp[:, :, i:i + stride * (p - 1) + 1:stride, j:j + stride * (q - 1) + 1:stride] += dcols[:, i, j]
    top, _, left, _ = padding
    return np.ascontiguousarray(dxp[:, :, top:top + h, left:left + wd].transpose(1, 0, 2, 3)), dw, db


def _taps(a, size, out_shape):
    """The kh*kw strided views a[:, :, di::kh, dj::kw] cropped to the out_shape (ho, wo) windows, in window order
    di*kw + dj: tap t holds element t of every window."""
    kh, kw = size
    ho, wo = out_shape
    return [a[:, :, di:kh * ho:kh, dj:kw * wo:kw] for di in range(kh) for dj in range(kw)]


def _first_maximum(taps):
    """The taps in a pairwise tournament -> (their elementwise maximum, uint8 index of the first tap holding it).
    Each match keeps the earlier group's winner unless the later one's is strictly greater, so ties go to the first
    in window order; the index moves by arithmetic on the comparison's bytes (np.where would take 3 times as long).
    np.maximum propagates NaN but a comparison with NaN is False: the caller fixes a NaN's index."""
    entries = [(tap, np.uint8(index)) for index, tap in enumerate(taps)]
    while len(entries) > 1:
        matches = [(np.maximum(a, b), index_a + (b > a).view(np.uint8) * (index_b - index_a))
                   for (a, index_a), (b, index_b) in zip(entries[0::2], entries[1::2])]
        entries = matches + entries[2 * len(matches):]  # an odd one out meets the winners in the next round
    return entries[0]


def maxpool2d_forward(x, size):
    """x[N,C,H,W] -> (y[N,C,H//kh,W//kw], argmax uint8 offset di*kw+dj of each window's first maximum; a window
    holding a NaN pools to NaN, its argmax naming the first NaN)."""
    taps = _taps(x, size, (x.shape[2] // size[0], x.shape[3] // size[1]))
    y, argmax = _first_maximum(taps)
    if len(taps) == 1:  # a 1x1 window: the tournament had no match, y is x itself
        y, argmax = y.copy(), np.zeros(y.shape, np.uint8)
    # One pass over y (1/(kh*kw) of x) finds the windows holding a NaN; only those are redone, so the NaN-free
    # path pays that pass and nothing more. argmax of booleans is the first True.
    nan = np.isnan(y)
    if nan.any():
        argmax[nan] = np.argmax(np.stack([np.isnan(tap[nan]) for tap in taps]), axis=0)
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, size):
    """dy[N,C,H//kh,W//kw], argmax, x_shape (N,C,H,W) -> dx[N,C,H,W], dy routed to each window's winner."""
    dx = np.zeros(x_shape, dtype=dy.dtype)
    # dy * (argmax == offset) is the fast way to route (a masked copy takes three times as long), but it would
    # spread a NaN or infinite dy over its whole window (NaN * 0 and inf * 0 are NaN): a dy that is not all finite
    # (one pass over dy, 1/(kh*kw) of dx, to know) takes the masked copy instead.
    finite = np.isfinite(dy).all()
    for offset, tap in enumerate(_taps(dx, size, dy.shape[2:])):
        if finite:
            np.multiply(dy, argmax == offset, out=tap)
        else:
            np.copyto(tap, dy, where=argmax == offset)
    return dx


def avgpool2d_forward(x, size):
    """x[N,C,H,W] -> y[N,C,H//kh,W//kw], the mean of each kh x kw window. Adding whole views is several times
    faster than numpy's reduction over two small window axes."""
    taps = _taps(x, size, (x.shape[2] // size[0], x.shape[3] // size[1]))
    y = taps[0].copy()
    for tap in taps[1:]:
        y += tap
    y /= x.dtype.type(len(taps))
    return y


def avgpool2d_backward(dy, x_shape, size):
    """dy[N,C,H//kh,W//kw], x_shape (N,C,H,W) -> dx[N,C,H,W]: each window's dy / (kh*kw) on each of its elements."""
    dx = np.zeros(x_shape, dtype=dy.dtype)
    share = dy / dy.dtype.type(size[0] * size[1])
    for tap in _taps(dx, size, dy.shape[2:]):
        tap[...] = share
    return dx


_PER_CHANNEL = (None, slice(None), None, None)  # a [C] vector indexed so it broadcasts over (N, C, H, W)
_CHANNEL_SUM = (0, 2, 3)


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """x[N,C,H,W] -> (y, mean[C], inv_std[C]): each channel normalised by its batch statistics (training, which
    also moves running_mean and running_var towards them, in place) or by the running ones (inference)."""
    if training:
        mean = x.mean(axis=_CHANNEL_SUM)
        y = x - mean[_PER_CHANNEL]
        var = np.square(y).mean(axis=_CHANNEL_SUM)  # biased, around the batch mean (two passes)
        running_mean *= momentum
        running_mean += (1 - momentum) * mean
        running_var *= momentum
        running_var += (1 - momentum) * var
    else:
        mean, var = running_mean.copy(), running_var
        y = x - mean[_PER_CHANNEL]
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))
    y *= (inv_std * gamma)[_PER_CHANNEL]
    y += beta[_PER_CHANNEL]
    return y, mean, inv_std


def batchnorm2d_backward(dy, x, gamma, mean, inv_std):
    """dy, x[N,C,H,W], and the forward's gamma, mean, inv_std -> (dx[N,C,H,W], dgamma[C], dbeta[C]), the
    training-mode gradient (through the batch statistics too)."""
    count = x.dtype.type(x.shape[0] * x.shape[2] * x.shape[3])
    x_hat = (x - mean[_PER_CHANNEL]) * inv_std[_PER_CHANNEL]
    dbeta = dy.sum(axis=_CHANNEL_SUM)
    dgamma = (dy * x_hat).sum(axis=_CHANNEL_SUM)
    dx = dy - (dbeta / count)[_PER_CHANNEL]
    x_hat *= (dgamma / count)[_PER_CHANNEL]
    dx -= x_hat
    dx *= (gamma * inv_std)[_PER_CHANNEL]
    return dx, dgamma, dbeta
