"""The jit backend's compiled kernels that run over lists and layouts rather than dense register tiles: the backward
pass of conv + ReLU + 2x2 max-pooling over the nonzero conv-output gradients only, and the channels-last packing.

Pooling passes each window's gradient to one of its four elements, ReLU zeroes more, and in the model dropout zeroes
half of the pooled gradients before that: at most a quarter of the conv output's gradient is nonzero, and in
training conv2 lists fewer still. `_pooled_grad_lists` lists the nonzero elements once; the weight gradient runs
over the lists with one kernel row in a register tile, the input gradient regroups them by pixel and sums each
pixel's channels' kernel rows in a register tile before adding them into dx. Any shape takes them.

Self-contained (no @njit helper from another file), so Numba's cache sees every change to what it compiles.
"""

import numpy as np
from numba import prange

from numba_cnn.kernels._numba_ext import jit as _jit, tile_allocator

# values of a kernel row per register tile in the listed weight gradient: the model's conv2 row (3 taps x 32
# channels), 12 of AVX2's 16 vector registers, 6 of AVX-512's 32
LISTED_BLOCK = 96
LISTED_IMAGES = 8  # images per pass of a weight-gradient tile: 8 x 21.6 KB of conv2's inputs, within L2


@_jit
def _pooled_grad_lists(dy, pooled, argmax, x_flat, width, channels, zero, values, offsets, counts, sums, finite):
    """Per image n and channel k, the nonzero elements of the conv output's gradient behind ReLU + 2x2 max-pooling,
    from the pooled gradient dy[N, K, P2, Q2]: values[n, k, :counts[n, k]] are dy where pooled > 0 or is NaN (the
    ReLU's select, as layers.relu_backward) and nonzero (NaN counts as nonzero), in window order; offsets the
    element offset (row * width + col) * channels of each window's winner (argmax) in a channels-last image of that
    conv's input, i.e. where its receptive field starts; sums[n, k] the sum of all of them (the bias gradient's
    per-image terms). Branch-free: every window is written, only the nonzero ones advance the count. finite[n]:
    whether the conv's input image x_flat[n] (any layout) holds no NaN or inf, read here where the image is
    visited anyway: the caller takes the dense path otherwise."""
    n_images, n_out, p_half, q_half = dy.shape
    for n in prange(n_images):
        check = zero
        x_image = x_flat[n]
        for u in range(x_image.shape[0]):
            check += x_image[u] * zero  # NaN once any element is NaN or inf (inf * 0 is NaN)
        finite[n] = check == check
        for k in range(n_out):
            count = 0
            total = zero
            g_plane, pooled_plane, arg_plane = dy[n, k], pooled[n, k], argmax[n, k]
            value_row, offset_row = values[n, k], offsets[n, k]
            for pi in range(p_half):
                for pj in range(q_half):
                    p = pooled_plane[pi, pj]
                    g = g_plane[pi, pj] if (p > zero) | (p != p) else zero  # | not or: a select, no branch
                    where = arg_plane[pi, pj]
                    value_row[count] = g
                    offset_row[count] = ((2 * pi + where // 2) * width + 2 * pj + where % 2) * channels
                    count += g != zero
                    total += g
            counts[n, k] = count
            sums[n, k] = total


def _make_listed_weight_grad(block):
    """`_listed_weight_grad` with a register tile of `block` values of a kernel row (S x C, channels last)."""
    _stack_tile = tile_allocator()

    @_jit
    def listed_weight_grad(x_flat, values, offsets, counts, row_length, n_groups, dw):
        """dw[k, r, u] = sum over images n and listed elements e of (n, k) of values[n, k, e] *
        x_flat[n, offsets[n, k, e] + r * row_length + u], u < S * C: the weight gradient as (K, R, S * C) (channels
        last) from the inputs channels-last, flattened per image (x_flat[n] is x[n] as (H, W, C); row_length =
        W * C). Each kernel row's values go in blocks of `block` through a register tile over LISTED_IMAGES images'
        lists at a time (their inputs stay in L2), the rest one by one in memory. The output channels are dealt to
        n_groups tasks in turn (k, k + n_groups, ...: channels with long and short lists spread evenly), each
        looping over the images in order, so every element of dw is summed in image order, then list order,
        whatever the thread count. dw is zeroed by the caller."""
        n_images = x_flat.shape[0]
        n_out, r_taps, span = dw.shape
        tiled = span - span % block
        for group in prange(n_groups):
            acc = _stack_tile(block, x_flat.dtype)
            for n0 in range(0, n_images, LISTED_IMAGES):
                images = range(n0, min(n0 + LISTED_IMAGES, n_images))
                for k in range(group, n_out, n_groups):  # interleaved: busy and idle channels spread evenly
                    for r in range(r_taps):
                        dw_r = dw[k, r]
                        for u0 in range(0, tiled, block):
                            for u in range(block):
                                acc[u] = dw_r[u0 + u]
                            for n in images:
                                x_image, value_row, offset_row = x_flat[n], values[n, k], offsets[n, k]
                                for e in range(counts[n, k]):
                                    g = value_row[e]
                                    x_seg = x_image[offset_row[e] + r * row_length + u0:]
                                    for u in range(block):
                                        acc[u] += g * x_seg[u]
                            for u in range(block):
                                dw_r[u0 + u] = acc[u]
                        for n in images:
                            x_image, value_row, offset_row = x_flat[n], values[n, k], offsets[n, k]
                            for e in range(counts[n, k]):
                                g = value_row[e]
                                x_seg = x_image[offset_row[e] + r * row_length:]
                                for u in range(tiled, span):
                                    dw_r[u] += g * x_seg[u]

    return listed_weight_grad


_listed_weight_grad = _make_listed_weight_grad(LISTED_BLOCK)


def _make_listed_input_grad(block):
    """`_listed_input_grad` with a register tile of `block` values of a kernel row (S x C, channels last)."""
    _stack_tile = tile_allocator()

    @_jit
    def listed_input_grad(values, offsets, counts, w_flat, r_taps, channels, row_length, n_groups, zero, dx):
        """dx[n] (channels last, flattened: dx[n, (i * W + j) * C + c]) = the scatter of every listed element e of
        (n, k) through the kernel: values[n, k, e] * w[k, r, s, c] added at (row + r, col + s, c), (row, col, 0)
        being where offsets[n, k, e] points (row_length = W * C; w_flat is w as (K, R, S, C), flattened).

        Gathered by conv-output pixel first: per image the lists are regrouped into, per pixel, the output
        channels whose gradient there is nonzero, and for each pixel and kernel row the block of S x C values that
        row adds is summed over those channels in a register tile, then added into dx once. Scattered one listed
        value at a time, every multiply-add would load and store its dx element (the kernel-row block of all
        K channels, K x `block` values, stays in L1 while the pixels go by). Per dx element: kernel rows in order,
        pixels in order, each pixel's channels in order; per image, the images dealt to n_groups tasks, so
        independent of the thread count. Values of a row beyond the last whole block go one channel at a time, and
        rows shorter than a block are scattered one listed value at a time (channels in order, then list order).
        A pixel lists each channel at most once (the 2x2 pooling windows do not overlap), so at most K slots."""
        n_images, n_out = counts.shape
        n_pixels = dx.shape[1] // channels
        span = w_flat.shape[0] // (n_out * r_taps)
        tiled = span - span % block
        n_groups = min(n_groups, n_images)
        for group in prange(n_groups):
            acc = _stack_tile(block, dx.dtype)
            filled = np.empty(n_pixels, np.int64)  # per pixel, its listed channels so far
            w_starts = np.empty((n_pixels, n_out), np.int64)  # where each one's kernel starts in w_flat
            grads = np.empty((n_pixels, n_out), dx.dtype)
            for n in range(group, n_images, n_groups):
                image = dx[n]
                image[:] = zero
                if tiled == 0:  # rows shorter than a tile: no tile to sum in, each value scattered as it is listed
                    for k in range(n_out):
                        for e in range(counts[n, k]):
                            g = values[n, k, e]
                            for r in range(r_taps):
                                seg = image[offsets[n, k, e] + r * row_length:]
                                w_seg = w_flat[(k * r_taps + r) * span:]
                                for u in range(span):
                                    seg[u] += g * w_seg[u]
                    continue
                filled[:] = 0
                for k in range(n_out):
                    value_row, offset_row = values[n, k], offsets[n, k]
                    for e in range(counts[n, k]):
                        pixel = offset_row[e] // channels
                        slot = filled[pixel]
                        w_starts[pixel, slot] = k * r_taps * span
                        grads[pixel, slot] = value_row[e]
                        filled[pixel] = slot + 1
                for r in range(r_taps):
                    for u0 in range(0, tiled, block):
                        w_at = r * span + u0
                        for pixel in range(n_pixels):
                            m = filled[pixel]
                            if m == 0:
                                continue
                            start_row, grad_row = w_starts[pixel], grads[pixel]
                            # the tile starts from the first product: zeroing it first is stored element by
                            # element and read back as vectors, a stall per block
                            g = grad_row[0]
                            w_seg = w_flat[start_row[0] + w_at:]  # sliced first: an index sum would gather
                            for u in range(block):
                                acc[u] = g * w_seg[u]
                            for e in range(1, m):
                                g = grad_row[e]
                                w_seg = w_flat[start_row[e] + w_at:]
                                for u in range(block):
                                    acc[u] += g * w_seg[u]
                            seg = image[pixel * channels + r * row_length + u0:]
                            for u in range(block):
                                seg[u] += acc[u]
                    if tiled < span:
                        for pixel in range(n_pixels):
                            start_row, grad_row = w_starts[pixel], grads[pixel]
                            seg = image[pixel * channels + r * row_length:]
                            for e in range(filled[pixel]):
                                g = grad_row[e]
                                w_seg = w_flat[start_row[e] + r * span:]
                                for u in range(tiled, span):
                                    seg[u] += g * w_seg[u]

    return listed_input_grad


_listed_input_grad = _make_listed_input_grad(LISTED_BLOCK)


@_jit
def _pack_channels_last(a, col_pad, out, sums):
    """a[N, C, H, W] -> out[N, H, W + 2 col_pad, C_padded]: channels last, zero columns on both sides and zero
    padded channels; sums[n, c] = sum of a[n, c], summed in one fixed order per image (the bias gradient's terms,
    independent of the thread count)."""
    n_images, n_ch, h, w = a.shape
    c_padded = out.shape[3]
    for n in prange(n_images):
        total = sums[n]
        total[:] = 0
        for i in range(h):
            out[n, i, :col_pad] = 0
            out[n, i, col_pad + w:] = 0
            for j in range(w):
                row = out[n, i, col_pad + j]
                for c in range(n_ch):
                    row[c] = a[n, c, i, j]
                for c in range(n_ch, c_padded):
                    row[c] = 0
                for c in range(c_padded):
                    total[c] += row[c]


@_jit
def _pad_channels_last(x, top, left, out):
    """x[N, C, H, W] (NCHW) -> out[N, Hp, Wp, C]: channels last, x at rows top.. and columns left.., zeros around
    it. Per image and output row, the C input rows it reads are first copied whole into a small buffer, then
    interleaved from there: read straight from x, a pixel's C values lie H * W apart, and at 32 x 32 that stride
    is 4 KiB, so they all fall into one set of the L1 cache and evict each other."""
    n_images, n_ch, h, w = x.shape
    hp = out.shape[1]
    for n in prange(n_images):
        rows = np.empty((n_ch, w), x.dtype)
        for i in range(hp):
            row = out[n, i]
            src = i - top
            if src < 0 or src >= h:
                row[:, :] = 0
                continue
            row[:left, :] = 0
            row[left + w:, :] = 0
            for c in range(n_ch):
                x_row, staged = x[n, c, src], rows[c]
                for j in range(w):
                    staged[j] = x_row[j]
            seg = row[left:left + w]
            for j in range(w):
                px = seg[j]
                for c in range(n_ch):
                    px[c] = rows[c, j]

