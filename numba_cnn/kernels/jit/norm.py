"""The jit backend's small layers beyond the register tiles: max-pooling with any window but 2x2 (which tiles.py
keeps), average pooling (global pooling is the window (H, W)) and batch normalisation. NCHW (the caller copies a
channels-last input) but for batch normalisation's channels-last twins; memory-bound loops, the threads sharing
(image, channel) planes, channels, or chunks and blocks of pixels (`parts_kernel` tasks; the two-pass
statistics, a cold path, a prange).

`_maxpool_any_forward` / `_maxpool_any_backward`: per window, the values in row-major order through selects: a later
    value wins if it is strictly greater, or if it is NaN and the best so far is not (the rule of tiles.py's
    `_pool_window`: ties keep the first maximum, the first NaN wins); backward writes each input element once, its
    window's dy where argmax points and exactly zero elsewhere (dropped rows and columns too).
`_avgpool_forward` / `_avgpool_backward`: window sums in float64 (no float32 overflow or cancellation), divided by
    kh * kw; backward shares dy / (kh * kw), computed in float64, over the window.
`_channel_stats`: per channel (shared by the threads), the mean over (N, H, W) and then the biased variance around
    it, both summed in float64: a large mean (activations far from zero) costs float32 sums their low bits, and
    one-pass E[x^2] - E[x]^2 would cancel; the caller updates the running statistics from these float64 values, as
    the oracle does.
`_batchnorm_apply`: y = (x - mean) * (inv_std * gamma) + beta, per element in float64 from float64 channel
    constants, clamped below at `floor` by a select (-inf: none; 0: the fused ReLU, `0 if v < 0 else v`, which
    keeps NaN) and rounded once on the store.
`_batchnorm_backward`: per channel (shared by the threads), sum(dy) and sum(dy * x_hat) in float64, then dx = gamma *
    inv_std * (dy - sum(dy) / M - x_hat * sum(dy * x_hat) / M). `_batchnorm_relu_backward`, the fused BatchNorm +
    ReLU's: the same, each dy read through the ReLU's select `0 if y <= 0 else dy` (y its output). One factory makes
    both, the choice a compile-time constant, so the plain kernel compiles as it did without the select.

`_channel_stats_last`, `_batchnorm_apply_last`, `batchnorm_backward_last` (relu and pooled or not): the same for
    channels-last input viewed as (pixels, C), a pixel's channels in the vector lanes: the sums per fixed chunk of
    pixels (partial.shape[0] chunks, shared by the threads) in float64, then added in order by a serial step
    between two tasks; the statistics in one pass over x, each chunk's values shifted by its first pixel's
    (`_channel_stats_two_pass`, the two-pass sums, where that gives non-finite statistics); the element-wise passes
    over blocks of pixels. `_batchnorm_apply_last` computes each element as `_batchnorm_apply` does: the same bits.

`_batchnorm_apply_pool_last`: `_batchnorm_apply_last` and tiles.py's 2x2 `_maxpool_forward_last` in one pass, for
    the fused BatchNorm + ReLU + max-pool: each window's four values normalised, rounded and pooled where they are
    made, so the full-size activation is neither written nor read back.

Every reduction runs inside one index of a loop the threads share, in a fixed order, or over fixed chunks added in
order, so results do not depend on the thread count.
Self-contained but for tiles.py's `_pool_window`, whose file's hash the kernel inlining it closes over, so Numba's
cache sees every change to what it compiles.
"""

import hashlib
from pathlib import Path

import numpy as np
from numba import njit, prange

from numba_cnn.kernels._numba_ext import jit as _jit, part_range, parts_kernel
from numba_cnn.kernels.jit import tiles
from numba_cnn.kernels.jit.tiles import _pool_window

# tiles.py's source, which holds `_pool_window`: closed over by the kernel that inlines it, so that an edit there
# changes that kernel's cache key
_TILES_STAMP = hashlib.sha256(Path(tiles.__file__).read_bytes()).hexdigest()


@parts_kernel
@_jit(parallel=False)
def _maxpool_any_forward(part, n_parts, x, kh, kw, y, argmax):
    """y[n,c,i,j], argmax[n,c,i,j] = the max of window (i*kh.., j*kw..) of x and its offset di*kw + dj."""
    n_images, n_ch = x.shape[0], x.shape[1]
    ho, wo = y.shape[2], y.shape[3]
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        plane = x[n, c]
        for i in range(ho):
            y_row, arg_row = y[n, c, i], argmax[n, c, i]
            for j in range(wo):
                best, where = plane[i * kh, j * kw], 0
                for di in range(kh):
                    row = plane[i * kh + di, j * kw:]
                    for dj in range(kw):
                        v = row[dj]
                        later = (v > best) | ((v != v) & (best == best))  # | and &: selects, no branches
                        where = di * kw + dj if later else where
                        best = v if later else best
                y_row[j] = best
                arg_row[j] = where


@parts_kernel
@_jit(parallel=False)
def _maxpool_any_backward(part, n_parts, dy, argmax, kh, kw, zero, dx):
    """dx[n,c] = each window's dy at its argmax offset, exactly zero elsewhere (dropped rows and columns too)."""
    n_images, n_ch, h, w = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        plane = dx[n, c]
        dy_plane, arg_plane = dy[n, c], argmax[n, c]
        for i in range(ho):
            for di in range(kh):
                row = plane[i * kh + di]
                for j in range(wo):
                    g, where = dy_plane[i, j], arg_plane[i, j]
                    for dj in range(kw):
                        row[j * kw + dj] = g if where == di * kw + dj else zero
            for di in range(kh):
                row = plane[i * kh + di]
                for u in range(wo * kw, w):
                    row[u] = zero
        for i in range(ho * kh, h):
            plane[i] = zero


@parts_kernel
@_jit(parallel=False)
def _avgpool_forward(part, n_parts, x, kh, kw, y):
    """y[n,c,i,j] = the mean of window (i*kh.., j*kw..) of x, summed in float64."""
    n_images, n_ch = x.shape[0], x.shape[1]
    ho, wo = y.shape[2], y.shape[3]
    count = kh * kw
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        plane = x[n, c]
        y_plane = y[n, c]
        for i in range(ho):
            for j in range(wo):
                total = np.float64(0)  # not 0.0: interpreted, numpy would keep a float32 sum
                for di in range(kh):
                    row = plane[i * kh + di, j * kw:]
                    for dj in range(kw):
                        total += row[dj]
                y_plane[i, j] = total / count


@parts_kernel
@_jit(parallel=False)
def _global_avgpool_last(part, n_parts, x_cl, y):
    """y[n, c] = the mean of x_cl[n, :, :, c] (channels-last x, a window over the whole image), summed in float64
    over the pixels in row-major order, a vector of channels at a time: one pass over the image, where
    `_avgpool_forward` walks it once per channel."""
    n_images, h, w, n_ch = x_cl.shape
    count = h * w
    for n in part_range(part, n_parts, n_images):
        totals = np.zeros(n_ch)
        for i in range(h):
            for j in range(w):
                pixel = x_cl[n, i, j]
                for c in range(n_ch):
                    totals[c] += pixel[c]
        y_row = y[n]
        for c in range(n_ch):
            y_row[c] = totals[c] / count


@parts_kernel
@_jit(parallel=False)
def _global_avgpool_relu_backward_last(part, n_parts, dy, y_cl, zero, dx_cl):
    """dx_cl[n, i, j, c] = 0 where y_cl[n, i, j, c] <= 0, else dy[n, c] / (H * W) (in float64, rounded once): the
    composition of `_avgpool_backward` over a window of the whole image and the ReLU's select against a
    channels-last y (jit/layers.py: relu_backward), in one pass that reads y and writes dx channels-last."""
    n_images, h, w, n_ch = y_cl.shape
    count = h * w
    for n in part_range(part, n_parts, n_images):
        spread = np.empty(n_ch, dx_cl.dtype)
        for c in range(n_ch):
            spread[c] = np.float64(dy[n, c]) / count
        for i in range(h):
            for j in range(w):
                y_px, dx_px = y_cl[n, i, j], dx_cl[n, i, j]
                for c in range(n_ch):
                    dx_px[c] = zero if y_px[c] <= zero else spread[c]


@parts_kernel
@_jit(parallel=False)
def _avgpool2x2_forward(part, n_parts, x, y):
    """`_avgpool_forward` for 2x2 windows, the window's four values summed in the same order (so the same bits),
    with constant trip counts that LLVM vectorises along the row."""
    n_images, n_ch = x.shape[0], x.shape[1]
    ho, wo = y.shape[2], y.shape[3]
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        for i in range(ho):
            top, bottom, y_row = x[n, c, 2 * i], x[n, c, 2 * i + 1], y[n, c, i]
            for j in range(wo):
                total = np.float64(top[2 * j]) + np.float64(top[2 * j + 1])
                total += np.float64(bottom[2 * j])
                total += np.float64(bottom[2 * j + 1])
                y_row[j] = total / 4


@parts_kernel
@_jit(parallel=False)
def _avgpool2x2_backward(part, n_parts, dy, zero, dx):
    """`_avgpool_backward` for 2x2 windows (the same bits)."""
    n_images, n_ch, h, w = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        plane, dy_plane = dx[n, c], dy[n, c]
        for i in range(ho):
            top, bottom, dy_row = plane[2 * i], plane[2 * i + 1], dy_plane[i]
            for j in range(wo):
                g = np.float64(dy_row[j]) / 4
                top[2 * j] = g
                top[2 * j + 1] = g
                bottom[2 * j] = g
                bottom[2 * j + 1] = g
            for u in range(2 * wo, w):
                top[u] = zero
                bottom[u] = zero
        for i in range(2 * ho, h):
            plane[i] = zero


@parts_kernel
@_jit(parallel=False)
def _avgpool_backward(part, n_parts, dy, kh, kw, zero, dx):
    """dx[n,c] = each window's dy / (kh * kw) (in float64, rounded once) on its elements, zero outside every
    window."""
    n_images, n_ch, h, w = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    count = kh * kw
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        plane, dy_plane = dx[n, c], dy[n, c]
        for i in range(ho):
            for di in range(kh):
                row = plane[i * kh + di]
                for j in range(wo):
                    g = np.float64(dy_plane[i, j]) / count
                    for dj in range(kw):
                        row[j * kw + dj] = g
                for u in range(wo * kw, w):
                    row[u] = zero
        for i in range(ho * kh, h):
            plane[i] = zero


@parts_kernel
@_jit(parallel=False)
def _channel_stats(part, n_parts, x, mean, var):
    """x[N, C, M] -> float64 mean[c] and biased var[c] over (N, M): two passes, each summed in float64."""
    n_images, n_ch, plane = x.shape
    count = n_images * plane
    for c in part_range(part, n_parts, n_ch):
        total = np.float64(0)  # not 0.0: interpreted, numpy would keep a float32 sum
        for n in range(n_images):
            row = x[n, c]
            for u in range(plane):
                total += row[u]
        m = total / count
        squares = np.float64(0)
        for n in range(n_images):
            row = x[n, c]
            for u in range(plane):
                d = row[u] - m
                squares += d * d
        mean[c] = m
        var[c] = squares / count


@parts_kernel
@_jit(parallel=False)
def _batchnorm_apply(part, n_parts, x, mean, scale, shift, floor, y):
    """y[n, c, u] = max((x[n, c, u] - mean[c]) * scale[c] + shift[c], floor), in float64 (mean, scale, shift,
    floor float64), over x[N, C, M]; the max a select that keeps NaN, floor -inf for none, 0 for a ReLU."""
    n_images, n_ch, plane = x.shape
    for nc in part_range(part, n_parts, n_images * n_ch):
        n, c = nc // n_ch, nc % n_ch
        m, a, t = mean[c], scale[c], shift[c]
        src, dst = x[n, c], y[n, c]
        for u in range(plane):
            v = (src[u] - m) * a + t
            dst[u] = floor if v < floor else v


def _make_batchnorm_backward(relu):
    """The batch-norm backward kernel; with `relu` (a compile-time constant), of the fused BatchNorm + ReLU: dy read
    through the ReLU's select. Without, y is not read and the kernel is the plain op's."""

    @parts_kernel
    @_jit(parallel=False)
    def batchnorm_backward(part, n_parts, dy, y, x, gamma, mean, inv_std, dx, dgamma, dbeta):
        """The training-mode gradient over dy, y, x, dx [N, C, M]: per channel, in float64, with g = dy, or with
        relu g = 0 where y <= 0 and dy elsewhere (y the ReLU's output; a NaN y keeps dy), x_hat = (x - mean) *
        inv_std, dbeta = sum(g), dgamma = sum(g * x_hat), dx = gamma * inv_std * (g - dbeta / M - x_hat * dgamma /
        M)."""
        n_images, n_ch, plane = x.shape
        count = n_images * plane
        zero = np.float64(0)
        for c in part_range(part, n_parts, n_ch):
            m, s = np.float64(mean[c]), np.float64(inv_std[c])
            sum_dy, sum_dy_xhat = np.float64(0), np.float64(0)
            for n in range(n_images):
                dy_row, y_row, x_row = dy[n, c], y[n, c], x[n, c]
                for u in range(plane):
                    d = np.float64(dy_row[u])
                    g = (zero if y_row[u] <= 0 else d) if relu else d
                    sum_dy += g
                    sum_dy_xhat += g * ((x_row[u] - m) * s)
            dbeta[c] = sum_dy
            dgamma[c] = sum_dy_xhat
            a = np.float64(gamma[c]) * s
            mean_dy, mean_dy_xhat = sum_dy / count, sum_dy_xhat / count
            gs = np.empty(plane)  # g first, then dx from it: dx may be dy's buffer (see the channels-last kernel)
            for n in range(n_images):
                dy_row, y_row, x_row, dx_row = dy[n, c], y[n, c], x[n, c], dx[n, c]
                for u in range(plane):
                    d = np.float64(dy_row[u])
                    gs[u] = (zero if y_row[u] <= 0 else d) if relu else d
                for u in range(plane):
                    dx_row[u] = a * (gs[u] - mean_dy - (x_row[u] - m) * s * mean_dy_xhat)

    return batchnorm_backward


_batchnorm_backward = _make_batchnorm_backward(False)
_batchnorm_relu_backward = _make_batchnorm_backward(True)


_PIXEL_BLOCK = 256  # pixels per task of the channels-last element-wise passes


@_jit(parallel=False)
def _chunk_sums_done(partial, count, out):
    """out[c] = the sum over chunks h, in order, of partial[h, c], divided by count."""
    for c in range(out.shape[0]):
        total = np.float64(0)
        for h in range(partial.shape[0]):
            total += partial[h, c]
        out[c] = total / count


@parts_kernel
@_jit(parallel=False)
def _channel_chunk_stats_last(part, n_parts, x, partial):
    """x[P, C] (channels-last pixels) -> per fixed chunk h of pixels (partial.shape[0] chunks),
    partial[h] = (its first pixel's values K as the chunk's shift, sum(x - K), sum((x - K)^2)), in float64."""
    n_px, n_ch = x.shape
    chunks = partial.shape[0]
    for h in part_range(part, n_parts, chunks):
        shift, s1, s2 = partial[h, 0], partial[h, 1], partial[h, 2]
        first = x[h * n_px // chunks]
        for c in range(n_ch):
            shift[c] = np.float64(first[c])
            s1[c] = 0
            s2[c] = 0
        for p in range(h * n_px // chunks, (h + 1) * n_px // chunks):
            px = x[p]
            for c in range(n_ch):
                d = np.float64(px[c]) - shift[c]
                s1[c] += d
                s2[c] += d * d


@_jit(parallel=False)
def _chunk_stats_combined(n_px, partial, mean, var):
    """`_channel_chunk_stats_last`'s chunks of n_px pixels -> float64 mean[c] and biased var[c], the chunks' means
    and squared deviations combined in order (Chan et al.'s pairwise update: M2 = sum over chunks of M2_h
    + n_h (mean_h - mean)^2)."""
    chunks, _, n_ch = partial.shape
    for c in range(n_ch):
        total = np.float64(0)
        for h in range(chunks):
            count = (h + 1) * n_px // chunks - h * n_px // chunks
            total += count * partial[h, 0, c] + partial[h, 1, c]
        mean[c] = total / n_px
        m2 = np.float64(0)
        for h in range(chunks):
            count = (h + 1) * n_px // chunks - h * n_px // chunks
            shifted_mean = partial[h, 1, c] / count
            m2 += partial[h, 2, c] - partial[h, 1, c] * shifted_mean
            m2 += count * (partial[h, 0, c] + shifted_mean - mean[c]) ** 2
        var[c] = m2 / n_px


def _channel_stats_last(x, partial, mean, var):
    """x[P, C] (channels-last pixels) -> float64 mean[c] and biased var[c] over the P pixels in one pass: per fixed
    chunk of pixels (partial.shape[0] chunks, the threads sharing them) shifted sums, then the chunks combined in
    order. Shifting by a value of the data keeps a large mean from cancelling the spread, as the two-pass sum does.
    Non-finite x makes non-finite statistics, which the caller recomputes with `_channel_stats_two_pass` (as the
    oracle sums them)."""
    _channel_chunk_stats_last(x, partial)
    _chunk_stats_combined(x.shape[0], partial, mean, var)


@_jit
def _channel_stats_two_pass(x, partial, mean, var):
    """x[P, C] -> float64 mean[c] and biased var[c] over the P pixels, two passes (the values, then their squared
    deviations from the mean), each summed in float64 per chunk of pixels into partial[h] (partial.shape[0] fixed
    chunks), the chunks added in order: what a non-finite x takes."""
    n_px, n_ch = x.shape
    chunks = partial.shape[0]
    for deviations in (False, True):
        for h in prange(chunks):
            acc = partial[h]
            for c in range(n_ch):
                acc[c] = 0
            for p in range(h * n_px // chunks, (h + 1) * n_px // chunks):
                px = x[p]
                for c in range(n_ch):
                    d = px[c] - mean[c] if deviations else np.float64(px[c])
                    acc[c] += d * d if deviations else d
        _chunk_sums_done(partial, n_px, var if deviations else mean)


@parts_kernel
@_jit(parallel=False)
def _batchnorm_apply_last(part, n_parts, x, mean, scale, shift, floor, y):
    """`_batchnorm_apply` over channels-last x[P, C] into y[P, C]."""
    n_px, n_ch = x.shape
    for block in part_range(part, n_parts, (n_px + _PIXEL_BLOCK - 1) // _PIXEL_BLOCK):
        for p in range(block * _PIXEL_BLOCK, min(n_px, (block + 1) * _PIXEL_BLOCK)):
            src, dst = x[p], y[p]
            for c in range(n_ch):
                v = (src[c] - mean[c]) * scale[c] + shift[c]
                dst[c] = floor if v < floor else v


@njit(inline="always")  # inlined into the calling kernel, in numba IR
def _pooled_source(n, i, j, height, width):
    """(row of the pooled arrays, offset 2 di + dj in its 2x2 window) of pixel (n, i, j) of an N x height x width
    batch, channels-last; a pixel in no window (an odd last row or column): row 0 and offset 4, which no argmax
    holds."""
    p_half, q_half = height // 2, width // 2
    if i >= 2 * p_half or j >= 2 * q_half:
        return 0, 4
    return (n * p_half + i // 2) * q_half + j // 2, 2 * (i % 2) + j % 2


@njit(inline="always")
def _next_pixel(n, i, j, height, width):
    """The pixel after (n, i, j) in channels-last order, without a division per pixel."""
    j += 1
    if j == width:
        j = 0
        i += 1
        if i == height:
            i = 0
            n += 1
    return n, i, j


def _make_batchnorm_backward_last(relu, pooled):
    """`_make_batchnorm_backward`'s kernel over channels-last (pixels, C) arrays, as two tasks and a serial step
    between them (`batchnorm_backward_last`). pooled (with relu): the backward of the 2x2 max-pool after the fused
    BatchNorm + ReLU as well, the pool's gradient routed as it is read. -> (sums task, dx task)."""

    @parts_kernel
    @_jit(parallel=False)
    def batchnorm_grad_sums_last(part, n_parts, dy, y, argmax, x, height, width, mean, inv_std, partial):
        """sum(g) and sum(g * x_hat) per fixed chunk h of x's pixels into partial[h, 0] and partial[h, 1] (float64).
        pooled: dy, y and argmax are the pool's (N * height//2 * width//2 pixels, C), and a pixel's g is its
        window's dy where argmax names it and the pooled y is not <= 0 (as relu_backward, then the pool's routing,
        would give it), else 0: the same values, sums and bits as the composition."""
        n_px, n_ch = x.shape
        chunks = partial.shape[0]
        zero = np.float64(0)
        for h in part_range(part, n_parts, chunks):
            sum_g, sum_g_xhat = partial[h, 0], partial[h, 1]
            for c in range(n_ch):
                sum_g[c] = 0
                sum_g_xhat[c] = 0
            first = h * n_px // chunks
            n, i, j = first // (height * width), first // width % height, first % width
            for p in range(first, (h + 1) * n_px // chunks):
                src, corner = p, 0
                if pooled:  # the pixel's window, and the next pixel's (n, i, j): only the pooled kernel needs them
                    src, corner = _pooled_source(n, i, j, height, width)
                    n, i, j = _next_pixel(n, i, j, height, width)
                dy_px, y_px, won_px, x_px = dy[src], y[src], argmax[src if pooled else 0], x[p]
                for c in range(n_ch):
                    d = np.float64(dy_px[c])
                    if pooled:
                        g = zero if won_px[c] != corner or y_px[c] <= 0 else d
                    else:
                        g = (zero if y_px[c] <= 0 else d) if relu else d
                    sum_g[c] += g
                    sum_g_xhat[c] += g * ((x_px[c] - np.float64(mean[c])) * np.float64(inv_std[c]))

    @parts_kernel
    @_jit(parallel=False)
    def batchnorm_grad_last(part, n_parts, dy, y, argmax, x, height, width, consts, dx):
        """dx[P, C] per block of pixels from `_batchnorm_grad_constants`' consts (mean, inv_std, gamma * inv_std,
        the means of g and of g * x_hat), each pixel's g read as `batchnorm_grad_sums_last` reads it."""
        n_px, n_ch = x.shape
        m, s, a, mean_g, mean_g_xhat = consts[0], consts[1], consts[2], consts[3], consts[4]
        zero = np.float64(0)
        for block in part_range(part, n_parts, (n_px + _PIXEL_BLOCK - 1) // _PIXEL_BLOCK):
            # a pixel's g first into gs, then dx from gs: dx may be dy's own buffer (donated by the caller), and a loop
            # that reads dy and writes dx at one address fails LLVM's run-time overlap check and runs scalar (not
            # vectorised)
            gs = np.empty(n_ch)
            first = block * _PIXEL_BLOCK
            n, i, j = first // (height * width), first // width % height, first % width
            for p in range(first, min(n_px, (block + 1) * _PIXEL_BLOCK)):
                src, corner = p, 0
                if pooled:  # the pixel's window, and the next pixel's (n, i, j): only the pooled kernel needs them
                    src, corner = _pooled_source(n, i, j, height, width)
                    n, i, j = _next_pixel(n, i, j, height, width)
                dy_px, y_px, won_px, x_px, dx_px = dy[src], y[src], argmax[src if pooled else 0], x[p], dx[p]
                for c in range(n_ch):
                    d = np.float64(dy_px[c])
                    if pooled:
                        gs[c] = zero if won_px[c] != corner or y_px[c] <= 0 else d
                    else:
                        gs[c] = (zero if y_px[c] <= 0 else d) if relu else d
                for c in range(n_ch):
                    dx_px[c] = a[c] * (gs[c] - mean_g[c] - (x_px[c] - m[c]) * s[c] * mean_g_xhat[c])

    return batchnorm_grad_sums_last, batchnorm_grad_last


@_jit(parallel=False)
def _batchnorm_grad_constants(partial, n_px, gamma, mean, inv_std, dgamma, dbeta, consts):
    """The step between the backward's tasks: the chunks' sums added in order into dbeta = sum(g) and dgamma =
    sum(g * x_hat), and consts[5, C] = (mean, inv_std, gamma * inv_std, sum(g) / n_px, sum(g * x_hat) / n_px) in
    float64, what the dx task reads."""
    n_ch = consts.shape[1]
    sums = np.empty((2, n_ch))
    _chunk_sums_done(partial[:, 0], 1, sums[0])
    _chunk_sums_done(partial[:, 1], 1, sums[1])
    for c in range(n_ch):
        dbeta[c] = sums[0, c]
        dgamma[c] = sums[1, c]
        consts[0, c], consts[1, c] = np.float64(mean[c]), np.float64(inv_std[c])
        consts[2, c] = np.float64(gamma[c]) * consts[1, c]
        consts[3, c] = sums[0, c] / n_px  # the means of g and g * x_hat
        consts[4, c] = sums[1, c] / n_px


_batchnorm_sums_last, _batchnorm_dx_last = _make_batchnorm_backward_last(False, False)
_batchnorm_relu_sums_last, _batchnorm_relu_dx_last = _make_batchnorm_backward_last(True, False)
_batchnorm_relu_pool_sums_last, _batchnorm_relu_pool_dx_last = _make_batchnorm_backward_last(True, True)
# (relu, pooled) -> the backward's two tasks (named above too: the precompile finds kernels by module-level name)
BATCHNORM_BACKWARD_LAST = {(False, False): (_batchnorm_sums_last, _batchnorm_dx_last),
                           (True, False): (_batchnorm_relu_sums_last, _batchnorm_relu_dx_last),
                           (True, True): (_batchnorm_relu_pool_sums_last, _batchnorm_relu_pool_dx_last)}


def batchnorm_backward_last(dy, y, argmax, x, height, width, gamma, mean, inv_std, partial, dx, dgamma, dbeta,
                            relu, pooled):
    """The training-mode gradient over dy, y, x, dx [P, C], as `_make_batchnorm_backward`'s kernel computes it:
    sum(g) and sum(g * x_hat) per fixed chunk of pixels into partial[h, 0] and partial[h, 1] (float64, the threads
    sharing the chunks), the chunks added in order, then dx over blocks of pixels (the threads sharing them)."""
    sums_task, dx_task = BATCHNORM_BACKWARD_LAST[relu, pooled]
    sums_task(dy, y, argmax, x, height, width, mean, inv_std, partial)
    consts = np.empty((5, x.shape[1]))
    _batchnorm_grad_constants(partial, x.shape[0], gamma, mean, inv_std, dgamma, dbeta, consts)
    dx_task(dy, y, argmax, x, height, width, consts, dx)


def _make_batchnorm_apply_pool_last():
    tiles_stamp = _TILES_STAMP

    @parts_kernel
    @_jit(parallel=False)
    def batchnorm_apply_pool_last(part, n_parts, x, mean, scale, shift, floor, y, argmax):
        """`_batchnorm_apply_last` of channels-last x[N, H, W, C], each value computed as it computes it and rounded
        to x's dtype, then pooled over 2x2 windows as tiles.py's `_maxpool_forward_last` pools them (its
        `_pool_window`): y and argmax[N, H // 2, W // 2, C], the same bits as the two kernels in turn, in one pass
        that never stores the normalised activation. An odd last row or column, in no window, is not read."""
        _ = tiles_stamp  # the inlined `_pool_window`'s file, in Numba's cache key
        n_images, ho, wo, n_ch = y.shape
        for task in part_range(part, n_parts, n_images * ho):
            n, i = task // ho, task % ho
            top, bottom = x[n, 2 * i], x[n, 2 * i + 1]
            y_row, arg_row = y[n, i], argmax[n, i]
            for j in range(wo):
                a0, a1, a2, a3 = top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]
                y_px, arg_px = y_row[j], arg_row[j]
                for c in range(n_ch):
                    m, a, t = mean[c], scale[c], shift[c]
                    v0, v1 = (a0[c] - m) * a + t, (a1[c] - m) * a + t
                    v2, v3 = (a2[c] - m) * a + t, (a3[c] - m) * a + t
                    best, where = _pool_window(y.dtype.type(floor if v0 < floor else v0),
                                               y.dtype.type(floor if v1 < floor else v1),
                                               y.dtype.type(floor if v2 < floor else v2),
                                               y.dtype.type(floor if v3 < floor else v3))
                    y_px[c] = best
                    arg_px[c] = where

    return batchnorm_apply_pool_last


_batchnorm_apply_pool_last = _make_batchnorm_apply_pool_last()
