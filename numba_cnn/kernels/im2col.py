"""im2col backend: convolution as matrix multiplication through BLAS, pooling as strided views.

conv2d_forward   patches of x gathered through a strided view into cols[N, C*R*S, P*Q] (one copy), then one
                 batched matmul w[K, C*R*S] @ cols[n] per image, which lands directly in NCHW order.
conv2d_backward  the same cols laid out as [C*R*S, N*P*Q] so dw = dy[K, N*P*Q] @ cols^T is one large BLAS call
                 (faster here than N small ones), db = sum of dy, dcols = w^T @ dy; col2im scatters dcols back
                 onto dx with one vectorised add per kernel tap (R*S adds, no loop over pixels).
maxpool2d_*      the four strided views x[:, :, di::2, dj::2] compared elementwise (three comparisons, no
                 copy into windows), windows holding a NaN redone apart; backward copies dy through the same
                 views where argmax points.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from numba_cnn.kernels.contract import BackendInfo

INFO = BackendInfo(summary="im2col patches and BLAS matmuls, numpy views for pooling")


def _im2col(x, r, s):
    """x[N, C, H, W] -> cols[N, C*R*S, P*Q]: per image one row per kernel tap (c, r, s), one column per output
    pixel, so w[K, C*R*S] @ cols[n] is that image's output in (K, P*Q) order."""
    n, c = x.shape[:2]
    patches = sliding_window_view(x, (r, s), axis=(2, 3))  # view (N, C, P, Q, R, S)
    p, q = patches.shape[2:4]
    return patches.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * r * s, p * q)


def conv2d_forward(x, w, b, relu):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,H-R+1,W-S+1], ReLU applied when relu is True."""
    n, _, h, wd = x.shape
    k, c, r, s = w.shape
    y = np.matmul(w.reshape(k, c * r * s), _im2col(x, r, s))  # (N, K, P*Q)
    y += b[:, None]
    if relu:
        np.maximum(y, 0, out=y)
    return y.reshape(n, k, h - r + 1, wd - s + 1)


def conv2d_backward(dy, x, w, need_dx):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] or None, dw[K,C,R,S], db[K])."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    p, q = dy.shape[2:]
    dy_rows = dy.transpose(1, 0, 2, 3).reshape(k, n * p * q)
    cols = _im2col(x, r, s).transpose(1, 0, 2).reshape(c * r * s, n * p * q)
    dw = (dy_rows @ cols.T).reshape(w.shape)
    db = dy_rows.sum(axis=1)
    if not need_dx:
        return None, dw, db
    dcols = (w.reshape(k, c * r * s).T @ dy_rows).reshape(c, r, s, n, p, q)
    dx = np.zeros((c, n, h, wd), dtype=x.dtype)  # channel-major, matching dcols, so each add reads whole rows
    for i in range(r):  # col2im: one strided add per kernel tap
        for j in range(s):
            dx[:, :, i:i + p, j:j + q] += dcols[:, i, j]
    return np.ascontiguousarray(dx.transpose(1, 0, 2, 3)), dw, db


def _taps(a, ho, wo):
    """The four strided views a[:, :, di::2, dj::2] (cropped to ho x wo), in window order 2*di + dj."""
    return [a[:, :, di:2 * ho:2, dj:2 * wo:2] for di in (0, 1) for dj in (0, 1)]


def maxpool2d_forward(x):
    """x[N,C,H,W] -> (y[N,C,H//2,W//2], argmax uint8 offset 2*di+dj of each window's first maximum; a window
    holding a NaN pools to NaN, its argmax naming the first NaN)."""
    ho, wo = x.shape[2] // 2, x.shape[3] // 2
    t0, t1, t2, t3 = _taps(x, ho, wo)
    top, bottom = np.maximum(t0, t1), np.maximum(t2, t3)  # np.maximum propagates NaN
    # Strict comparisons keep the earlier position on ties: t0 over t1, t2 over t3, the top row over the bottom.
    argmax = np.where(bottom > top, (t3 > t2).view(np.uint8) + np.uint8(2), (t1 > t0).view(np.uint8))
    y = np.maximum(top, bottom)
    # Comparisons with NaN are False, so above a NaN never wins. One pass over y (a quarter of x) finds the windows
    # that hold one; only those are redone, so the NaN-free path pays that pass and nothing more.
    nan = np.isnan(y)
    if nan.any():
        taps = [np.isnan(t[nan]) for t in (t0, t1, t2)]
        argmax[nan] = np.where(taps[0], 0, np.where(taps[1], 1, np.where(taps[2], 2, 3)))
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape):
    """dy[N,C,H//2,W//2], argmax, x_shape (N,C,H,W) -> dx[N,C,H,W], dy routed to each window's winner."""
    ho, wo = dy.shape[2:]
    dx = np.zeros(x_shape, dtype=dy.dtype)
    # dy * (argmax == offset) is the fast way to route (a masked copy takes three times as long), but it would
    # spread a NaN or infinite dy over all four elements of its window (NaN * 0 and inf * 0 are NaN): a dy that is
    # not all finite (one pass over dy, a quarter of dx, to know) takes the masked copy instead.
    finite = np.isfinite(dy).all()
    for offset, tap in enumerate(_taps(dx, ho, wo)):
        if finite:
            np.multiply(dy, argmax == offset, out=tap)
        else:
            np.copyto(tap, dy, where=argmax == offset)
    return dx
