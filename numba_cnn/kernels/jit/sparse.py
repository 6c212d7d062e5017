"""The jit backend's compiled kernels that run over lists and layouts rather than dense register tiles: the backward
pass of conv + ReLU + 2x2 max-pooling over the nonzero conv-output gradients only, and the channels-last packing.

Pooling passes each window's gradient to one of its four elements, ReLU zeroes more (and in mnist-cnn dropout half
of the pooled gradients): at most a quarter of the conv output's gradient is nonzero. `_pooled_grad_lists` lists
the nonzero elements once; the weight gradient runs over the lists with three kernel rows in a register tile, an
image's input in bands that stay in L1; the input gradient regroups them by pixel and sums each pixel's channels'
kernel rows in a register tile before adding them into dx. Any shape takes them. The layout copies too: into
padded channels-last buffers (`_pad_rows`, `_pad_channels_last`, `_pack_channels_last`), into zero-bordered NCHW
planes (`_pad_planes`, the column tiles' and padded_nchw's, which can also spread a 2x2 average pool's gradient or
route a 2x2 max-pool's on the way) and back to NCHW (`_channels_first`).

Self-contained (no @njit helper from another file), so Numba's cache sees every change to what it compiles.
"""

import numpy as np
from numba import njit, prange

from numba_cnn.kernels._numba_ext import copy_block, jit as _jit, part_range, parts_kernel, rest_of, tile_allocator
from numba_cnn.kernels.jit.tiles import TILE_BITS

# the listed input gradient's tile: a row of 3 taps x 32 channels; 12 of AVX2's 16 vector registers, 6 of AVX-512's
LISTED_BLOCK = 96
# the listed weight gradient's register tile: LISTED_GRAD_ROWS kernel rows x this many values of each (18 zmm; 12 ymm)
LISTED_GRAD_BLOCK = 96 if TILE_BITS >= 512 else 32
LISTED_GRAD_ROWS = 3
# one vector: the weight gradient's rows are computed in whole vectors, its partial sums' rows padded to them
LISTED_GRAD_LANES = TILE_BITS // 32
# bytes of input rows a band of the weight gradient reads over and over: about an L1 data cache; bands of 1 to 16
# pooled rows timed on VGG's and mnist-cnn's layers were fastest at this size (docs/kernels.md)
LISTED_BAND_BYTES = 48 * 1024


@njit(inline="always")
def _through_relu(g, pooled, zero):
    """The lists' ReLU select: g where pooled > 0 or NaN, else zero (g loaded first: behind a branch it waited)."""
    return g if (pooled > zero) | (pooled != pooled) else zero


def _make_pooled_grad_lists():
    """`_pooled_grad_lists`, closing over the tile allocator (so that the choice is in numba's cache key)."""
    _stack_tile = tile_allocator()

    @parts_kernel
    @_jit(parallel=False)
    def pooled_grad_lists(part, n_parts, dy, pooled, argmax, width, channels, zero, values, offsets, counts, sums):
        """Per image n and channel k, the nonzero elements of the conv output's gradient behind ReLU + 2x2 max-pooling,
        from the pooled gradient dy, indexed (N, P2, Q2, K) (a view of either layout, as pooled and argmax: no copy
        is made to change it): values[n, k, :counts[n, k]] are dy where pooled > 0 or is NaN (the ReLU's select, as
        layers.relu_backward) and nonzero (NaN counts as nonzero), in window order; offsets the element offset (row
        * width + col) * channels of each window's winner (argmax) in a channels-last image of that conv's input,
        i.e. where its receptive field starts; sums[n, k] the sum of all of them (the bias gradient's per-image
        terms). Branch-free: every window is written, only the nonzero ones advance the count. Four channels' lists
        are built side by side (four independent chains of counts in a stack tile, where one chain's store address
        waits on its last count, unsigned: no negative-index test to store by); the rest one at a time."""
        n_images, p_half, q_half, n_out = dy.shape
        grouped = n_out - n_out % 4
        corners = _stack_tile(4, np.int64)  # a winner's offset from its window's top left element, by argmax
        corners[0], corners[1], corners[2], corners[3] = 0, channels, width * channels, (width + 1) * channels
        for n in part_range(part, n_parts, n_images):
            g_image, pooled_image, arg_image = dy[n], pooled[n], argmax[n]
            group_counts, group_sums = _stack_tile(4, np.uint64), _stack_tile(4, dy.dtype)
            for k in range(0, grouped, 4):
                value_rows, offset_rows = values[n, k:k + 4], offsets[n, k:k + 4]
                for q in range(4):
                    group_counts[q], group_sums[q] = 0, zero
                for pi in range(p_half):
                    for pj in range(q_half):
                        window = (2 * pi * width + 2 * pj) * channels
                        gs, ps, ws = g_image[pi, pj, k:], pooled_image[pi, pj, k:], arg_image[pi, pj, k:]
                        for q in range(4):  # a constant trip count: unrolled, the counts and sums in registers
                            g = _through_relu(gs[q], ps[q], zero)
                            count = group_counts[q]
                            value_rows[q, count], offset_rows[q, count] = g, window + corners[ws[q]]
                            group_counts[q] = count + np.uint64(g != zero)
                            group_sums[q] += g
                for q in range(4):
                    counts[n, k + q], sums[n, k + q] = group_counts[q], group_sums[q]
            for k in range(grouped, n_out):
                values_k, offsets_k = values[n, k], offsets[n, k]
                count = 0
                total = zero
                for pi in range(p_half):
                    for pj in range(q_half):
                        g = _through_relu(g_image[pi, pj, k], pooled_image[pi, pj, k], zero)
                        values_k[count] = g
                        offsets_k[count] = (2 * pi * width + 2 * pj) * channels + corners[arg_image[pi, pj, k]]
                        count += g != zero
                        total += g
                counts[n, k] = count
                sums[n, k] = total

    return pooled_grad_lists


_pooled_grad_lists = _make_pooled_grad_lists()


def _make_listed_weight_grad(block):
    """`_listed_weight_grad` with a register tile of LISTED_GRAD_ROWS kernel rows x `block` values of each."""
    rows = LISTED_GRAD_ROWS
    lanes = LISTED_GRAD_LANES
    tail_tile = rows * lanes
    tile = rows * block
    _stack_tile = tile_allocator()

    @parts_kernel
    @_jit(parallel=False)
    def listed_weight_grad(part, n_parts, x_rows, top, left_values, values, offsets, counts, row_length, pooled_rows,
                           band_rows, bands, partial, partial_flat, zero, finite):
        """partial[h, k, r, u] = sum over the images n of chunk h (partial.shape[0] contiguous chunks of the batch)
        and the listed elements e of (n, k) of values[n, k, e] * xp[n, offsets[n, k, e] + r * row_length + u],
        u < S * C: chunk h's share of the weight gradient as (K, R, S * C padded to whole vectors of `lanes`:
        the values past S * C are garbage) (channels last), xp[n] being x[n]
        zero-padded by `top` rows above and left_values / C columns on the left (and as many below and right as
        the offsets reach) as (Hp, Wp, C), flattened (row_length = Wp * C); x_rows[n] is x[n] as (H, W * C).

        An image is visited in bands of band_rows pooled rows (the lists are in window order, so a band's elements
        of (n, k) are consecutive): the band's padded input rows are copied into a buffer that stays in L1 (the
        padding written there, never stored for the whole input) while every output channel's elements in it go
        through the register tile: 3 kernel rows x `block` values, loaded from and stored to partial once per
        band and channel. Straight through the lists instead, each multiply-add's input would come from L2, at an
        address known only once its offset is loaded. Per element of partial: images in order, then list order;
        the chunks are fixed by the batch, and the caller adds them in order: the same bits for any thread count.
        bands[h]: chunk h's buffer, at least (2 band_rows + R - 1) row_length + `lanes` values (the last vector of
        a row reads past it), starting on a cache line (so
        are the rows the offsets point at, for C a multiple of a line's values: a vector load then never spans two
        lines, which it did in a buffer allocated here). partial_flat: partial as (chunks, K * R * padded span),
        made by the caller. finite[n]: whether x[n] holds no NaN or inf, checked as its rows are copied into the
        bands (and the rows below the last band's read on their own): the caller drops partial and takes the dense
        path otherwise, whose products of zeros with inf give NaN where these lists skip them."""
        n_images, h_in, x_values = x_rows.shape
        n_chunks, n_out, r_taps, span = partial.shape
        tiled = span - span % block
        r_tiled = r_taps - r_taps % rows
        for h in part_range(part, n_parts, n_chunks):
            acc = _stack_tile(tile, x_rows.dtype)
            tail = _stack_tile(tail_tile, x_rows.dtype)
            band = bands[h]
            chunk, chunk_flat = partial[h], partial_flat[h]
            for k in range(n_out):
                for r in range(r_taps):
                    chunk_row = chunk[k, r]
                    for u in range(span):
                        chunk_row[u] = 0
            cursors = np.empty(n_out, np.int64)
            for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                cursors[:] = 0
                check = zero  # NaN once an element of x[n] is NaN or inf (inf * 0 is NaN)
                for band_start in range(0, pooled_rows, band_rows):
                    # the first offset past the band: its last pooled row's windows start conv row 2 * end - 2
                    limit = 2 * min(band_start + band_rows, pooled_rows) * row_length
                    # the band's padded rows: its windows' conv rows and the R - 1 below them
                    first_row = 2 * band_start
                    for i in range(first_row, 2 * min(band_start + band_rows, pooled_rows) + r_taps - 1):
                        band_row = band[(i - first_row) * row_length:]
                        if i < top or i >= top + h_in:
                            for u in range(row_length):
                                band_row[u] = 0
                            continue
                        x_row, seg = x_rows[n, i - top], band_row[left_values:]
                        for u in range(left_values):
                            band_row[u] = 0
                        for u in range(x_values):
                            v = x_row[u]
                            seg[u] = v
                            check += v * zero
                        for u in range(left_values + x_values, row_length):
                            band_row[u] = 0
                    shift = first_row * row_length  # offsets count from the padded image's first row
                    for k in range(n_out):
                        first = cursors[k]
                        last = first
                        count, offset_row, value_row = counts[n, k], offsets[n, k], values[n, k]
                        while last < count and offset_row[last] < limit:
                            last += 1
                        cursors[k] = last
                        if last == first:
                            continue
                        listed = last - first  # the band's elements, counted from 0: no negative-index tests
                        band_values, band_offsets = rest_of(value_row, first), rest_of(offset_row, first)
                        for r0 in range(0, r_tiled, rows):
                            for u0 in range(0, tiled, block):
                                # in and out by block copies (one loop over three rows of partial ran scalar: trap 4)
                                rows_at = (k * r_taps + r0) * span + u0
                                copy_block(acc, 0, chunk_flat, rows_at, block)
                                copy_block(acc, block, chunk_flat, rows_at + span, block)
                                copy_block(acc, 2 * block, chunk_flat, rows_at + 2 * span, block)
                                for e in range(listed):
                                    g = band_values[e]
                                    at = band_offsets[e] - shift + r0 * row_length + u0
                                    # views first (an index sum would gather), unchecked (rest_of)
                                    x0, x1 = rest_of(band, at), rest_of(band, at + row_length)
                                    x2 = rest_of(band, at + 2 * row_length)
                                    for u in range(block):
                                        acc[u] += g * x0[u]
                                        acc[block + u] += g * x1[u]
                                        acc[2 * block + u] += g * x2[u]
                                copy_block(chunk_flat, rows_at, acc, 0, block)
                                copy_block(chunk_flat, rows_at + span, acc, block, block)
                                copy_block(chunk_flat, rows_at + 2 * span, acc, 2 * block, block)
                        for r in range(r_tiled, r_taps):  # kernel rows beyond the last whole group of 3
                            for u0 in range(0, tiled, block):
                                row_at = (k * r_taps + r) * span + u0
                                copy_block(acc, 0, chunk_flat, row_at, block)
                                for e in range(listed):
                                    g = band_values[e]
                                    x0 = rest_of(band, band_offsets[e] - shift + r * row_length + u0)
                                    for u in range(block):
                                        acc[u] += g * x0[u]
                                copy_block(chunk_flat, row_at, acc, 0, block)
                        # values of a row past the last whole block, a vector of `lanes` at a time (partial's rows
                        # padded to whole vectors; the lanes past S * C add products the caller drops), three rows at
                        # once (each multiply-add waits on its row's last, not the element's before). The lane loop
                        # runs to `width` (= lanes): with a constant trip count LLVM vectorised the elements instead
                        width = min(lanes, span - tiled)
                        for r0 in range(0, r_tiled, rows):
                            for u0 in range(tiled, span, lanes):
                                rows_at = (k * r_taps + r0) * span + u0
                                copy_block(tail, 0, chunk_flat, rows_at, lanes)
                                copy_block(tail, lanes, chunk_flat, rows_at + span, lanes)
                                copy_block(tail, 2 * lanes, chunk_flat, rows_at + 2 * span, lanes)
                                for e in range(listed):
                                    g = band_values[e]
                                    at = band_offsets[e] - shift + r0 * row_length + u0
                                    x0, x1 = rest_of(band, at), rest_of(band, at + row_length)
                                    x2 = rest_of(band, at + 2 * row_length)
                                    for u in range(width):
                                        tail[u] += g * x0[u]
                                        tail[lanes + u] += g * x1[u]
                                        tail[2 * lanes + u] += g * x2[u]
                                copy_block(chunk_flat, rows_at, tail, 0, lanes)
                                copy_block(chunk_flat, rows_at + span, tail, lanes, lanes)
                                copy_block(chunk_flat, rows_at + 2 * span, tail, 2 * lanes, lanes)
                        for r in range(r_tiled, r_taps):
                            for u0 in range(tiled, span, lanes):
                                row_at = (k * r_taps + r) * span + u0
                                copy_block(tail, 0, chunk_flat, row_at, lanes)
                                for e in range(listed):
                                    g = band_values[e]
                                    x0 = rest_of(band, band_offsets[e] - shift + r * row_length + u0)
                                    for u in range(width):
                                        tail[u] += g * x0[u]
                                copy_block(chunk_flat, row_at, tail, 0, lanes)
                # the rows no band reads (below the last pooled row's windows and their R - 1 rows)
                for i in range(max(0, 2 * pooled_rows + r_taps - 1 - top), h_in):
                    x_row = x_rows[n, i]
                    for u in range(x_values):
                        check += x_row[u] * zero
                finite[n] = check == check

    return listed_weight_grad


_listed_weight_grad = _make_listed_weight_grad(LISTED_GRAD_BLOCK)


def _make_listed_input_grad(block):
    """`_listed_input_grad` with a register tile of `block` values of a kernel row (S x C, channels last)."""
    _stack_tile = tile_allocator()

    @_jit
    def listed_input_grad(values, offsets, counts, w_flat, r_taps, channels, channel_shift, channel_inverse,
                          row_length, n_groups, zero, work, top, left, rows, dx):
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
        A pixel lists each channel at most once (the 2x2 pooling windows do not overlap), so at most K slots. An
        offset's pixel, offset // channels, is a shift and a multiply (listed.py's `exact_quotient_constants`: an
        offset is a multiple of channels), not a 64-bit division per listed element.

        Cropped: with a work buffer (n_groups rows of one padded image), each image is summed there, in L2, and
        its rows top.. top + rows - 1, columns left.. copied into dx[n] (rows x W_out x C, W_out = dx.shape[1] //
        (rows * C)); with an empty one (no padding), summed in dx[n] itself."""
        n_images, n_out = counts.shape
        cropped = work.shape[1] > 0
        n_pixels = (work.shape[1] if cropped else dx.shape[1]) // channels
        out_row = dx.shape[1] // rows  # W_out x C values
        span = w_flat.shape[0] // (n_out * r_taps)
        tiled = span - span % block
        n_groups = min(n_groups, n_images)
        for group in prange(n_groups):
            acc = _stack_tile(block, dx.dtype)
            # per pixel, its listed channels so far; unsigned, as the pixels: indices that need no test for a
            # negative value
            filled = np.empty(n_pixels, np.uint64)
            w_starts = np.empty((n_pixels, n_out), np.int64)  # where each one's kernel starts in w_flat
            grads = np.empty((n_pixels, n_out), dx.dtype)
            for n in range(group, n_images, n_groups):
                image = work[group] if cropped else dx[n]
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
                else:
                    filled[:] = 0
                    for k in range(n_out):
                        value_row, offset_row = values[n, k], offsets[n, k]
                        for e in range(counts[n, k]):
                            pixel = (np.uint64(offset_row[e]) >> channel_shift) * channel_inverse
                            slot = filled[pixel]
                            w_starts[pixel, slot] = k * r_taps * span
                            grads[pixel, slot] = value_row[e]
                            filled[pixel] = slot + np.uint64(1)
                    for r in range(r_taps):
                        for u0 in range(0, tiled, block):
                            w_at = r * span + u0
                            for pixel in range(n_pixels):
                                m = np.int64(filled[pixel])
                                if m == 0:
                                    continue
                                start_row, grad_row = w_starts[pixel], grads[pixel]
                                # the tile starts from the first product: zeroing it first is stored element by
                                # element and read back as vectors, a stall per block
                                g = grad_row[0]
                                # views first (an index sum would gather), unchecked (rest_of)
                                w_seg = rest_of(w_flat, start_row[0] + w_at)
                                for u in range(block):
                                    acc[u] = g * w_seg[u]
                                for e in range(1, m):
                                    g = grad_row[e]
                                    w_seg = rest_of(w_flat, start_row[e] + w_at)
                                    for u in range(block):
                                        acc[u] += g * w_seg[u]
                                seg = rest_of(image, pixel * channels + r * row_length + u0)
                                for u in range(block):
                                    seg[u] += acc[u]
                        if tiled < span:
                            for pixel in range(n_pixels):
                                start_row, grad_row = w_starts[pixel], grads[pixel]
                                seg = image[pixel * channels + r * row_length:]
                                for e in range(np.int64(filled[pixel])):
                                    g = grad_row[e]
                                    w_seg = w_flat[start_row[e] + r * span:]
                                    for u in range(tiled, span):
                                        seg[u] += g * w_seg[u]
                if cropped:  # the image's rows without the padding, into dx[n]
                    out_image = dx[n]
                    for i in range(rows):
                        seg = image[(top + i) * row_length + left * channels:]
                        out_seg = out_image[i * out_row:]
                        for u in range(out_row):
                            out_seg[u] = seg[u]

    return listed_input_grad


_listed_input_grad = _make_listed_input_grad(LISTED_BLOCK)


@parts_kernel
@_jit(parallel=False)
def _pack_channels_last(part, n_parts, a, col_pad, out, sums):
    """a[N, C, H, W] -> out[N, H, W + 2 col_pad, C_padded]: channels last, zero columns on both sides and zero
    padded channels; sums[n, c] = sum of a[n, c], summed in one fixed order per image (the bias gradient's terms,
    independent of the thread count). From NCHW memory a row's C input rows are staged first (as `_pad_channels_last`
    stages them); from channels-last memory viewed NCHW, a pixel's values are read where they lie."""
    n_images, n_ch, h, w = a.shape
    c_padded = out.shape[3]
    planar = a.strides[1] != a.itemsize
    for n in part_range(part, n_parts, n_images):
        total = sums[n]
        total[:] = 0
        staged = np.empty((n_ch, w), a.dtype)
        for i in range(h):
            out[n, i, :col_pad] = 0
            out[n, i, col_pad + w:] = 0
            if planar:
                for c in range(n_ch):
                    a_row, staged_row = a[n, c, i], staged[c]
                    for j in range(w):
                        staged_row[j] = a_row[j]
            for j in range(w):
                row = out[n, i, col_pad + j]
                if planar:
                    for c in range(n_ch):
                        row[c] = staged[c, j]
                else:
                    for c in range(n_ch):
                        row[c] = a[n, c, i, j]
                for c in range(n_ch, c_padded):
                    row[c] = 0
                for c in range(c_padded):
                    total[c] += row[c]


@njit(inline="always")  # inlined into the copy kernels below, in numba IR
def _stage_channels(pixels, staged):
    """staged[c, j] = pixels[j, c]: one row of a channels-last image transposed into a small buffer, from which the
    caller writes each plane's row whole. Written straight from the pixels, one value per plane at a time, the
    plane rows (H x W apart: 4 KiB at 32 x 32) fall into one set of the L1 cache and evict each other at every
    step (docs/numba.md, trap 7)."""
    for j in range(pixels.shape[0]):
        px = pixels[j]
        for c in range(pixels.shape[1]):
            staged[c, j] = px[c]


@parts_kernel
@_jit(parallel=False)
def _channels_first(part, n_parts, x_cl, out):
    """x_cl[N, H, W, C] (channels last, C-contiguous) -> out[N, C, H, W]: per image, one plane at a time, written
    whole from a strided read of the image (which stays in cache over its planes). Written in the image's order,
    one value per plane at a time, the plane rows collide in the L1 cache (docs/numba.md, trap 7)."""
    n_images, h, w, n_ch = x_cl.shape
    plane = h * w
    for n in part_range(part, n_parts, n_images):
        pixels, planes = x_cl[n].reshape(plane * n_ch), out[n].reshape(n_ch * plane)
        for c in range(n_ch):
            row = planes[c * plane:]
            for p in range(plane):
                row[p] = pixels[p * n_ch + c]


@parts_kernel
@_jit(parallel=False)
def _pad_planes(part, n_parts, src, src_flat, channels_last, select, pooled, relu_y, argmax, top, left, dst, dst_flat,
                sums):
    """dst[n, c] = the plane (n, c) of src placed at (top, left) in zeros, and sums[n, c] its sum (down the columns,
    then across them; the same code for either layout, so the same bits); src a C-contiguous NCHW array, or NHWC
    when channels_last (then read a pixel's channels at a time; one compiled kernel serves both layouts), dst NCHW
    with at least as many planes (the extra ones all zeros). With select, the values pass through the ReLU's select
    on relu_y (NCHW) on the way, `0 if y <= 0 else value`, as layers.relu_backward computes it (without, relu_y is
    not read: one compiled kernel for both, which shortens a cold start). pooled 1 (NCHW src, with select): src is
    the gradient of relu_y's 2x2 average pool, (N, C, H // 2, W // 2), and the plane is that pool's backward, never
    written out: each value's src / 4 (in float64, rounded on the store, as norm.py's `_avgpool2x2_backward`) on the
    four elements of its window, the rows and columns no window covers zero, bit for bit. pooled 2 (NCHW src, with
    select): src is the gradient of a 2x2 max-pool of a ReLU'd convolution output, relu_y that pool's output and
    argmax its winners (all (N, C, P2, Q2), NCHW), and the plane (2 P2 x 2 Q2, an odd last row or column zero) is
    the composition's maxpool2d_backward(relu_backward(src, relu_y), argmax): each window's value through the
    select on its winner, zero on the other three, bit for bit; argmax is read only then. src_flat and dst_flat:
    src.reshape(-1) and dst.reshape(-1), made by the caller, as for the column correlation (`parts_kernel`)."""
    n_images = src.shape[0]
    if pooled == 2:
        n_ch, h, w = relu_y.shape[1], 2 * relu_y.shape[2], 2 * relu_y.shape[3]
    elif pooled:
        n_ch, h, w = relu_y.shape[1], relu_y.shape[2], relu_y.shape[3]
    elif channels_last:
        n_ch, h, w = src.shape[3], src.shape[1], src.shape[2]
    else:
        n_ch, h, w = src.shape[1], src.shape[2], src.shape[3]
    n_planes, rows, columns = dst.shape[1], dst.shape[2], dst.shape[3]
    zero = src.dtype.type(0)
    # flat offsets as unsigned integers into dst (C-contiguous) and an NCHW src: no wrap-around fix and no slice per
    # row (their scalar work outweighed these short rows' copies)
    for n in part_range(part, n_parts, n_images):
        image_at = n * n_planes * rows * columns
        for t in range(n_planes * rows * columns):  # zeros first, then the planes over them: simpler than the border
            dst_flat[np.uint64(image_at + t)] = zero
        if channels_last:
            # each row staged (see _stage_channels), then each plane row written whole from there
            staged = np.empty((n_ch, w), src.dtype)
            for i in range(h):
                _stage_channels(src[n, i], staged)
                for c in range(n_ch):
                    seg, y_row, row = dst[n, c, top + i, left:left + w], relu_y[n, c, i], staged[c]
                    for j in range(w):
                        value = row[j]
                        seg[j] = zero if select and y_row[j] <= zero else value
        elif pooled == 2:
            # a pooled row through the ReLU's select into a row buffer, then each of its two conv rows written as
            # maxpool2d_backward writes them, one output stream per loop (as one loop they stayed scalar)
            selected = np.empty(w // 2, src.dtype)
            for c in range(n_ch):
                out_plane = dst[n, c]
                for pi in range(h // 2):
                    dy_row, y_row, where_row = src[n, c, pi], relu_y[n, c, pi], argmax[n, c, pi]
                    for pj in range(w // 2):
                        selected[pj] = zero if y_row[pj] <= zero else dy_row[pj]
                    for half in range(2):
                        row = out_plane[top + 2 * pi + half, left:]
                        first = np.uint8(2 * half)
                        for pj in range(w // 2):
                            g, where = selected[pj], where_row[pj]
                            row[2 * pj] = g if where == first else zero
                            row[2 * pj + 1] = g if where == first + 1 else zero
        elif pooled:
            # each pooled row spread into a row buffer, then the select into dst: as one loop of two stores a window
            # into dst, the select ran scalar
            spread = np.empty(w, src.dtype)
            for c in range(n_ch):
                for i in range(2 * (h // 2)):
                    dy_row, y_row = src[n, c, i // 2], relu_y[n, c, i]
                    if i % 2 == 0:
                        for j in range(w // 2):
                            g = np.float64(dy_row[j]) / 4
                            spread[2 * j] = g
                            spread[2 * j + 1] = g
                    seg = dst_flat[((n * n_planes + c) * rows + top + i) * columns + left:]
                    for u in range(2 * (w // 2)):
                        value = spread[u]
                        seg[u] = zero if select and y_row[u] <= zero else value
        else:
            for c in range(n_ch):
                for i in range(h):
                    at, src_at, y_row = (((n * n_planes + c) * rows + top + i) * columns + left,
                                         ((n * n_ch + c) * h + i) * w, relu_y[n, c, i])
                    for j in range(w):
                        value = src_flat[np.uint64(src_at + j)]
                        dst_flat[np.uint64(at + j)] = zero if select and y_row[j] <= zero else value
        column_sums = np.empty(w, dst.dtype)
        for c in range(n_ch):
            # down the columns first (w independent sums, vectorised), then across them, in a fixed order
            for j in range(w):  # a loop: a slice assignment outside a prange is numba's slower general indexing
                column_sums[j] = zero
            for i in range(h):
                at = ((n * n_planes + c) * rows + top + i) * columns + left
                for j in range(w):
                    column_sums[j] += dst_flat[np.uint64(at + j)]
            total = zero
            for j in range(w):
                total += column_sums[j]
            sums[n, c] = total


@parts_kernel
@_jit(parallel=False)
def _pad_rows(part, n_parts, x_cl, top, left, out):
    """x_cl[N, H, W, C] (channels last, C-contiguous) -> out[N, Hp, Wp, C]: x at rows top.. and columns left..,
    zeros around it; a row's W x C values copied as one run."""
    n_images, h, w, n_ch = x_cl.shape
    hp, wp = out.shape[1], out.shape[2]
    zero = x_cl.dtype.type(0)
    for n in part_range(part, n_parts, n_images):
        for i in range(hp):
            row = out[n, i].reshape(wp * n_ch)
            src = i - top
            if src < 0 or src >= h:
                for u in range(wp * n_ch):
                    row[u] = zero
                continue
            for u in range(left * n_ch):
                row[u] = zero
            for u in range((left + w) * n_ch, wp * n_ch):
                row[u] = zero
            seg, x_row = row[left * n_ch:], x_cl[n, src].reshape(w * n_ch)
            for u in range(w * n_ch):
                seg[u] = x_row[u]


@parts_kernel
@_jit(parallel=False)
def _pad_channels_last(part, n_parts, x, top, left, out):
    """x[N, C, H, W] (NCHW) -> out[N, Hp, Wp, C]: channels last, x at rows top.. and columns left.., zeros around
    it. Per image and output row, the C input rows it reads are first copied whole into a small buffer, then
    interleaved from there: read straight from x, a pixel's C values lie H * W apart, and at 32 x 32 that stride
    is 4 KiB, so they all fall into one set of the L1 cache and evict each other."""
    n_images, n_ch, h, w = x.shape
    hp = out.shape[1]
    for n in part_range(part, n_parts, n_images):
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

