"""The jit backend's convolution kernels for layers with few channels, their vector lanes along the output columns.

The channels-last tiles (tiles.py) put output channels in the lanes: a layer of 6 filters fills 6 of 16 zmm lanes,
and a weight gradient of 16 filters half of its 32. Here the lanes run along a row of the output instead (NCHW, a
row's columns contiguous), so every lane does useful work whatever the channel count, and no channels-last copy is
made. The same tile serves the forward and dx (the full correlation of the zero-bordered dy with the flipped
kernel), and a second one the weight gradient.

`_column_correlation`: threads over images; tiles of 8 (AVX-512) or 4 (AVX2) output channels x 3 output rows x
    `lanes` columns (COLUMN_TILE), seeded with the bias and summed over (r, s, c) in that order, c innermost, each
    product an FMA: the order of the channels-last tile, so the same bits. Each step loads 3 input segments and
    broadcasts 8 (4) weights for 24 (12) FMAs, written out in the body of the loop over the lanes (the only form
    LLVM vectorised: docs/numba.md). The last row block overlaps the one before; the last column block computes
    past the output's width (the caller pads the input) and stores only what exists.
`_column_correlation_six`: the same with a tile of 6 channels x 4 (AVX-512) or 2 (AVX2) rows (COLUMN_TILE_SIX),
    for the layers it computes less of: 6 filters (LeNet's conv1, and its dx into 6 channels) fill it where the
    other computes 8 (`_correlation_tile` picks by the channels and rows each would compute). The same sums in the
    same order: the same bits.
`_column_weight_grad`: dw[k, c, r, s] = sum over (n, i, j) of dy[n, k, i, j] x[n, c, i + r, j + s]: tiles of 4
    output channels x 6 (AVX-512) or 3 (AVX2) taps x `lanes` columns (COLUMN_GRAD_TILE), the taps consecutive in
    the flattened (c, r, s), so a 5x5 kernel or 3 channels of a 3x3 one fill the tile (a tap is an offset into the
    image: any mix of channels, rows and columns is one load), dy zero past its width (the extra lanes add
    nothing); summed per lane over the rows and column blocks of the images of one chunk, then across the lanes in
    lane order. Tasks are (image chunk, tile) pairs fixed by the shapes (GRAD_IMAGE_CHUNKS chunks), a chunk's
    tiles consecutive so its images stay in cache; the caller adds the chunks in order: bitwise the same for any
    thread count. `_column_weight_grad_six`: the same with 6 channels x 4 (AVX-512) or 2 (AVX2) taps
    (COLUMN_GRAD_TILE_SIX), for 5 or 6 filters, where the other computes 8 (`_weight_grad_tile` picks).
`_image_lanes`: for rows that fill under IMAGE_LANES_BELOW of their vectors (`image_lanes_pay`; LeNet's conv2, 10
    columns in 16 lanes), x, and dy after the select or the pool's backward, copied into blocks of COLUMN_LANES
    images, each pixel one vector of the block's images (the images in the lanes); the same tiles run over them
    with a tap s s vectors along the row (`tap_step`), every lane useful and every load aligned, and each lane's
    sums go to its own image of y or dx. The forward and dx sum the same products in the same order as along the
    rows: the same bits; dw adds the images lane by lane.

Self-contained but for tiles.py's constants, like the other kernel files, so Numba's cache sees every change.
"""

import numpy as np
from numba import njit, prange

from numba_cnn.kernels._numba_ext import (TILE_BITS, TILE_REGISTERS, copy_block, jit as _jit, part_range,
                                           parts_kernel, tile_allocator)
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import (aligned_empty, aligned_zeros, layout_copy, nchw, reusable_output, round_up,
                                          scratch_allocator)
from numba_cnn.kernels.jit.paths import note
from numba_cnn.kernels.jit.sparse import _pad_planes
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS

# one vector of float32 lanes along the columns; 4 channels x 3 rows (or 3 taps) is 12 accumulators, which fits the
# 16 ymm of AVX2 with room for the loaded segments and the broadcast weights; the 32 zmm of AVX-512 hold twice as
# many (8 channels x 3 rows, 4 channels x 6 taps), so each loaded value feeds twice the multiply-adds
COLUMN_LANES = 16 if TILE_BITS >= 512 else 8
_WIDE = TILE_BITS >= 512 and TILE_REGISTERS >= 32
# (output channels, output rows) and (output channels, taps): the kernels spell these tiles out
COLUMN_TILE = (8, 3) if _WIDE else (4, 3)
# 6 channels (LeNet's conv1 forward, its dx into 6 channels), for which the tile above computes 8: x 4 rows in 24 zmm,
# x 2 rows in 12 ymm (3 x 4 would need a 17th ymm for the fourth row's segment, and spilled: slower than 4 x 3)
COLUMN_TILE_SIX = (6, 4) if _WIDE else (6, 2)
COLUMN_GRAD_TILE = (4, 6) if _WIDE else (4, 3)
# 6 filters (LeNet's conv1, the first layer of PyTorch's CIFAR-10 tutorial network), for which the tile above
# computes 8: 6 channels x 4 taps in 24 zmm, x 2 taps in 12 ymm
COLUMN_GRAD_TILE_SIX = (6, 4) if _WIDE else (6, 2)
# the share of the lanes a row of output columns must fill for the tiles to run along it rather than over the images
IMAGE_LANES_BELOW = 0.7


@njit(inline="always")  # inlined in numba IR: the lane loops that call it vectorise as if it were written out there
def _six_by_two(acc, at, stride, lanes, a0, a1, b0, b1, b2, b3, b4, b5):
    """The six-channel tiles' step: acc[(m * stride + t) * lanes + at] += a_t * b_m for the 6 values b_m and the
    2 values a_t (the correlation: 6 weights x 2 rows of input, stride its rows; the weight gradient: 6 channels
    of dy x 2 taps of input, stride its taps)."""
    acc[at] += a0 * b0
    acc[lanes + at] += a1 * b0
    acc[stride * lanes + at] += a0 * b1
    acc[(stride + 1) * lanes + at] += a1 * b1
    acc[2 * stride * lanes + at] += a0 * b2
    acc[(2 * stride + 1) * lanes + at] += a1 * b2
    acc[3 * stride * lanes + at] += a0 * b3
    acc[(3 * stride + 1) * lanes + at] += a1 * b3
    acc[4 * stride * lanes + at] += a0 * b4
    acc[(4 * stride + 1) * lanes + at] += a1 * b4
    acc[5 * stride * lanes + at] += a0 * b5
    acc[(5 * stride + 1) * lanes + at] += a1 * b5


def _make_column_correlation(lanes, channels, rows, tap_step=1):
    tile = channels * rows * lanes
    _stack_tile = tile_allocator()

    @parts_kernel
    @_jit(parallel=False)
    def column_correlation(part, n_parts, xp, flat, wt, b_tile, floor, row_lo, row_hi, y, y_flat):
        """y[n,k,i,j] = relu_floor(b[k] + sum_{r,s,c} xp[n,c,i+r,j+s] * wt[k,r,s,c]), y NCHW (N, K, P, Q) with
        P >= the tile's rows; xp C-contiguous NCHW, at least P + R - 1 rows and ceil(Q / lanes) * lanes + S - 1
        columns (zeros past what the sum reads); wt (K padded to the tile's channels, R, S, C); b_tile the bias
        of each of those channels repeated over the tile's rows x lanes (`_bias_tile`); floor 0 for ReLU (NaN
        kept) or -inf for none. The sum runs over wt's C channels (xp may hold more planes). Rows of xp outside
        [row_lo, row_hi) are zeros and wt finite: a kernel row whose tile reads only such rows is skipped (its
        products are zeros, which leave every sum as it was). flat, y_flat: xp.reshape(-1) and y.reshape(-1), made
        by the caller: reshaped in the task, LLVM kept the tile in memory, not in registers (docs/numba.md). With
        tap_step = lanes, xp holds the images in the lanes (`_image_lanes`: image n * lanes + l of block n in lane
        l of every column), at least Q + S - 1 columns of them, and each lane's sums go to its own image of y."""
        n_images, n_planes, x_rows, x_cols = xp.shape
        n_real, n_out, p_out, q_out = y.shape
        k_padded, r_taps, s_taps, n_in = wt.shape
        # flat offsets as unsigned integers: numba adds no wrap-around fix to them (a slice per load costs more
        # scalar instructions than the tile's multiply-adds), and the tile's rows are one constant stride apart
        row_step = np.uint64(x_cols)
        for n in part_range(part, n_parts, n_images):
            acc = _stack_tile(tile, xp.dtype)
            for ib in range(0, p_out, rows):
                i0 = min(ib, p_out - rows)  # the last block overlaps the one before instead of overrunning
                for j0 in range(0, q_out * tap_step, lanes):  # images in the lanes: a column per vector
                    width = min(lanes, q_out - j0)
                    for k0 in range(0, k_padded, channels):
                        # seeded from the bias tile: a loop storing each channel's bias was unrolled into one
                        # scalar store per element (docs/numba.md, trap 20)
                        copy_block(acc, 0, b_tile, k0 * rows * lanes, tile)
                        # kernel rows whose tile reads only the zero border are skipped: those outside this range
                        for r in range(max(0, row_lo - i0 - rows + 1), min(r_taps, row_hi - i0)):
                            for s in range(s_taps):
                                for c in range(n_in):
                                    at = ((n * n_planes + c) * x_rows + i0 + r) * x_cols + j0 + s * tap_step
                                    # the tile's body spelled out in the lane loop: LLVM vectorises that loop whole
                                    # (as loops over channels and rows inside it, it unrolls everything into
                                    # scalar code); each tile shape is a section compiled only for its kernel
                                    if rows == 3:
                                        w0, w1 = wt[k0, r, s, c], wt[k0 + 1, r, s, c]
                                        w2, w3 = wt[k0 + 2, r, s, c], wt[k0 + 3, r, s, c]
                                        for lane in range(lanes):
                                            u = np.uint64(at + lane)
                                            a0, a1, a2 = flat[u], flat[u + row_step], flat[u + row_step + row_step]
                                            acc[lane] += a0 * w0
                                            acc[lanes + lane] += a1 * w0
                                            acc[2 * lanes + lane] += a2 * w0
                                            acc[3 * lanes + lane] += a0 * w1
                                            acc[4 * lanes + lane] += a1 * w1
                                            acc[5 * lanes + lane] += a2 * w1
                                            acc[6 * lanes + lane] += a0 * w2
                                            acc[7 * lanes + lane] += a1 * w2
                                            acc[8 * lanes + lane] += a2 * w2
                                            acc[9 * lanes + lane] += a0 * w3
                                            acc[10 * lanes + lane] += a1 * w3
                                            acc[11 * lanes + lane] += a2 * w3
                                            if channels == 8:
                                                w4, w5 = wt[k0 + 4, r, s, c], wt[k0 + 5, r, s, c]
                                                w6, w7 = wt[k0 + 6, r, s, c], wt[k0 + 7, r, s, c]
                                                acc[12 * lanes + lane] += a0 * w4
                                                acc[13 * lanes + lane] += a1 * w4
                                                acc[14 * lanes + lane] += a2 * w4
                                                acc[15 * lanes + lane] += a0 * w5
                                                acc[16 * lanes + lane] += a1 * w5
                                                acc[17 * lanes + lane] += a2 * w5
                                                acc[18 * lanes + lane] += a0 * w6
                                                acc[19 * lanes + lane] += a1 * w6
                                                acc[20 * lanes + lane] += a2 * w6
                                                acc[21 * lanes + lane] += a0 * w7
                                                acc[22 * lanes + lane] += a1 * w7
                                                acc[23 * lanes + lane] += a2 * w7
                                    else:  # 6 channels x 2 or 4 rows
                                        w0, w1, w2 = wt[k0, r, s, c], wt[k0 + 1, r, s, c], wt[k0 + 2, r, s, c]
                                        w3, w4, w5 = wt[k0 + 3, r, s, c], wt[k0 + 4, r, s, c], wt[k0 + 5, r, s, c]
                                        two_rows = row_step + row_step
                                        for lane in range(lanes):
                                            u = np.uint64(at + lane)
                                            a0, a1 = flat[u], flat[u + row_step]
                                            _six_by_two(acc, lane, rows, lanes, a0, a1, w0, w1, w2, w3, w4, w5)
                                            if rows == 4:
                                                a2, a3 = flat[u + two_rows], flat[u + two_rows + row_step]
                                                _six_by_two(acc, 2 * lanes + lane, rows, lanes, a2, a3, w0, w1, w2,
                                                            w3, w4, w5)
                        if tap_step > 1:  # images in the lanes: each lane's value to its own image of y
                            for kk in range(min(channels, n_out - k0)):
                                for rr in range(rows):
                                    at = np.uint64((kk * rows + rr) * lanes)
                                    for lane in range(min(lanes, n_real - n * lanes)):
                                        v = acc[at + np.uint64(lane)]
                                        y_flat[np.uint64((((n * lanes + lane) * n_out + k0 + kk) * p_out + i0 + rr)
                                                         * q_out + j0 // lanes)] = floor if v < floor else v
                            continue
                        # y through flat offsets: a view of it per row (y[n, k, i, j0:]) took a reference to y's
                        # memory and gave it back, two calls of numba's runtime with the live vector registers saved
                        # around them, more than the multiply-adds of a small layer's tile (docs/numba.md, trap 24)
                        for kk in range(min(channels, n_out - k0)):
                            for rr in range(rows):
                                y_at = np.uint64(((n * n_out + k0 + kk) * p_out + i0 + rr) * q_out + j0)
                                at = np.uint64((kk * rows + rr) * lanes)  # unsigned: a signed sum gathered (trap 19)
                                for lane in range(width):
                                    v = acc[at + np.uint64(lane)]
                                    # ReLU keeps NaN: NaN < 0 is false
                                    y_flat[y_at + np.uint64(lane)] = floor if v < floor else v

    return column_correlation


def _make_column_weight_grad(lanes, channels, taps, tap_step=1):
    tile = channels * taps * lanes
    _stack_tile = tile_allocator()

    @_jit
    def column_weight_grad(xp, dyp, row_off, col_off, p_out, q_out, r_taps, s_taps, dwt):
        """dwt[h, k, (c, r, s)] = sum over the images n of chunk h (dwt.shape[0] contiguous chunks), rows i < p_out
        and columns j < Qp (q_out rounded up to `lanes`) of dyp[n, k, row_off + i, col_off + j] * xp[n, c, i + r,
        j + s], the taps (c, r, s) flattened in that order (dwt.shape[2] = C * R * S); dyp C-contiguous NCHW, K
        padded to the tile's channels, zero in columns col_off + q_out ... col_off + Qp - 1; xp C-contiguous NCHW
        with at least p_out + R - 1 rows and Qp + S - 1 columns. With tap_step = lanes, xp and dyp hold the
        images in the lanes (`_image_lanes`), col_off and q_out count lanes (columns x lanes), a tap's s is s
        vectors along the row, and the lanes' sums add the images."""
        n_images, n_in, x_rows, x_cols = xp.shape
        n_chunks, k_padded, n_taps = dwt.shape
        dy_rows, dy_cols = dyp.shape[2], dyp.shape[3]
        q_padded = (q_out + lanes - 1) // lanes * lanes
        tap_blocks = (n_taps + taps - 1) // taps
        n_tiles = k_padded // channels * tap_blocks
        x_flat, dy_flat = xp.reshape(-1), dyp.reshape(-1)
        dy_plane = np.uint64(dy_rows * dy_cols)  # unsigned offsets: no wrap-around fix (see the correlation)
        # the 6-channel tile's further planes (an int times an unsigned int is a float in numba)
        plane3, plane4, plane5 = (np.uint64(3 * dy_rows * dy_cols), np.uint64(4 * dy_rows * dy_cols),
                                  np.uint64(5 * dy_rows * dy_cols))
        for task in prange(n_chunks * n_tiles):
            acc = _stack_tile(tile, xp.dtype)
            h, t = task // n_tiles, task % n_tiles
            k0, block = t // tap_blocks * channels, t % tap_blocks
            # a block of `taps` consecutive taps of the flattened (c, r, s): the last one overlaps the one before
            # (its first taps are that block's), and with fewer taps than the tile the extra ones repeat the last
            first = max(0, min(block * taps, n_taps - taps))
            tap_at = _stack_tile(taps, np.uint64)
            for tt in range(taps):
                g = min(first + tt, n_taps - 1)
                c, rs = g // (r_taps * s_taps), g % (r_taps * s_taps)
                tap_at[tt] = np.uint64((c * x_rows + rs // s_taps) * x_cols + rs % s_taps * tap_step)
            o0, o1, o2 = tap_at[0], tap_at[1], tap_at[2 % taps]
            o3, o4, o5 = tap_at[3 % taps], tap_at[4 % taps], tap_at[5 % taps]
            for a in range(tile):
                acc[a] = 0
            for n in range(h * n_images // n_chunks, (h + 1) * n_images // n_chunks):
                for i in range(p_out):
                    x_at = (n * n_in * x_rows + i) * x_cols
                    dy_at = ((n * k_padded + k0) * dy_rows + row_off + i) * dy_cols + col_off
                    for j0 in range(0, q_padded, lanes):
                        if channels == 6:  # 6 channels x 2 taps, taps 2-3 only in the 4-tap tile
                            for lane in range(lanes):
                                u, v = np.uint64(x_at + j0 + lane), np.uint64(dy_at + j0 + lane)
                                a0, a1 = x_flat[u + o0], x_flat[u + o1]
                                g0, g1 = dy_flat[v], dy_flat[v + dy_plane]
                                g2, g3 = dy_flat[v + dy_plane + dy_plane], dy_flat[v + plane3]
                                g4, g5 = dy_flat[v + plane4], dy_flat[v + plane5]
                                _six_by_two(acc, lane, taps, lanes, a0, a1, g0, g1, g2, g3, g4, g5)
                                if taps == 4:
                                    a2, a3 = x_flat[u + o2], x_flat[u + o3]
                                    _six_by_two(acc, 2 * lanes + lane, taps, lanes, a2, a3, g0, g1, g2, g3, g4, g5)
                            continue
                        # the 4 x 3 body spelled out, as in the correlation; taps 3-5 only in the 6-tap tile
                        for lane in range(lanes):
                            u, v = np.uint64(x_at + j0 + lane), np.uint64(dy_at + j0 + lane)
                            a0, a1, a2 = x_flat[u + o0], x_flat[u + o1], x_flat[u + o2]
                            g0, g1 = dy_flat[v], dy_flat[v + dy_plane]
                            g2, g3 = dy_flat[v + dy_plane + dy_plane], dy_flat[v + dy_plane + dy_plane + dy_plane]
                            acc[lane] += g0 * a0
                            acc[lanes + lane] += g0 * a1
                            acc[2 * lanes + lane] += g0 * a2
                            acc[taps * lanes + lane] += g1 * a0
                            acc[(taps + 1) * lanes + lane] += g1 * a1
                            acc[(taps + 2) * lanes + lane] += g1 * a2
                            acc[2 * taps * lanes + lane] += g2 * a0
                            acc[(2 * taps + 1) * lanes + lane] += g2 * a1
                            acc[(2 * taps + 2) * lanes + lane] += g2 * a2
                            acc[3 * taps * lanes + lane] += g3 * a0
                            acc[(3 * taps + 1) * lanes + lane] += g3 * a1
                            acc[(3 * taps + 2) * lanes + lane] += g3 * a2
                            if taps == 6:
                                a3, a4, a5 = x_flat[u + o3], x_flat[u + o4], x_flat[u + o5]
                                acc[3 * lanes + lane] += g0 * a3
                                acc[4 * lanes + lane] += g0 * a4
                                acc[5 * lanes + lane] += g0 * a5
                                acc[9 * lanes + lane] += g1 * a3
                                acc[10 * lanes + lane] += g1 * a4
                                acc[11 * lanes + lane] += g1 * a5
                                acc[15 * lanes + lane] += g2 * a3
                                acc[16 * lanes + lane] += g2 * a4
                                acc[17 * lanes + lane] += g2 * a5
                                acc[21 * lanes + lane] += g3 * a3
                                acc[22 * lanes + lane] += g3 * a4
                                acc[23 * lanes + lane] += g3 * a5
            for kk in range(channels):
                for tt in range(block * taps - first, min(taps, n_taps - first)):  # overlapped taps: the block before
                    at = (kk * taps + tt) * lanes
                    total = acc[at]
                    for lane in range(1, lanes):
                        total += acc[at + lane]
                    dwt[h, k0 + kk, first + tt] = total

    return column_weight_grad


_column_correlation = _make_column_correlation(COLUMN_LANES, *COLUMN_TILE)
_column_correlation_six = _make_column_correlation(COLUMN_LANES, *COLUMN_TILE_SIX)
_column_weight_grad = _make_column_weight_grad(COLUMN_LANES, *COLUMN_GRAD_TILE)
_column_weight_grad_six = _make_column_weight_grad(COLUMN_LANES, *COLUMN_GRAD_TILE_SIX)
# the same tiles over images in the lanes (`_image_lanes`' layout), where a tap s is s whole vectors along the row
_IMAGE_LANES = {(make, tile): make(COLUMN_LANES, *tile, tap_step=COLUMN_LANES)
                for make, tiles in ((_make_column_correlation, (COLUMN_TILE, COLUMN_TILE_SIX)),
                                    (_make_column_weight_grad, (COLUMN_GRAD_TILE, COLUMN_GRAD_TILE_SIX)))
                for tile in tiles}


def _make_image_lanes(lanes):
    @parts_kernel
    @_jit(parallel=False)
    def image_lanes(part, n_parts, src, src_flat, channels_last, top, left, dst, dst_flat):
        """dst[b, c, top + i, (left + j) * lanes + l] = x[b * lanes + l, c, i, j] in zeros: the images in the
        vector lanes, `lanes` of them per block; x given as src, C-contiguous NCHW, or NHWC when channels_last (one
        compiled kernel for both); dst (ceil(N / lanes), planes >= C, rows, columns * lanes) C-contiguous, the
        lanes past the last image zeros; src_flat and dst_flat their reshape(-1)."""
        n_images = src.shape[0]
        n_ch, h, w = (src.shape[3], src.shape[1], src.shape[2]) if channels_last else src.shape[1:]
        n_planes, rows, row_length = dst.shape[1], dst.shape[2], dst.shape[3]
        block_size = n_planes * rows * row_length
        image_size = n_ch * h * w
        column_step = n_ch if channels_last else 1
        zero = dst.dtype.type(0)
        for b in part_range(part, n_parts, dst.shape[0]):
            for t in range(block_size):
                dst_flat[np.uint64(b * block_size + t)] = zero
            last = min(lanes, n_images - b * lanes) - 1
            for c in range(n_ch):
                for i in range(h):
                    src_at = b * lanes * image_size + (i * w * n_ch + c if channels_last else (c * h + i) * w)
                    at = ((b * n_planes + c) * rows + top + i) * row_length + left * lanes
                    for j in range(w):
                        # a vector's lanes, each from its own image, stored at once (a loop of the lanes, a
                        # constant: one vector store; the last block's empty lanes read its last image, store zero)
                        for lane in range(lanes):
                            value = src_flat[np.uint64(src_at + min(lane, last) * image_size + j * column_step)]
                            dst_flat[np.uint64(at + j * lanes + lane)] = value if lane <= last else zero

    return image_lanes


_image_lanes = _make_image_lanes(COLUMN_LANES)


def _lane_use(count, lanes):
    """The share of a tile's lanes doing useful work when `count` values are spread over vectors of `lanes`."""
    return count / round_up(count, lanes)


def image_lanes_pay(columns):
    """Whether the column tiles run over the images in the lanes (`_image_lanes`) rather than along the rows: where a
    row of Q output columns fills under IMAGE_LANES_BELOW of the lanes it takes (LeNet's conv2: 10 columns fill 10
    of 16). Whatever the batch: a batch under the lanes' count fills fewer, but a path chosen by the batch size
    would leave kernels for the precompile's two-image pass to miss (cold_compile.py)."""
    return _lane_use(columns, COLUMN_LANES) < IMAGE_LANES_BELOW


def columns_pay(in_channels, out_channels, columns):
    """Whether a stride-1 convolution takes the column tiles: few input channels (the channels-last tiles reduce
    over them innermost, so each step's loads are amortised over few products, and their dx fills few lanes) or
    few filters (their lanes half empty or worse), and rows wide enough to fill at least half of the column lanes.
    The bounds are where the two paths crossed in one measurement of layers of the presets and the networks in
    docs (docs/kernels.md, "Few channels: lanes along the columns")."""
    return (in_channels <= 8 or out_channels <= 16) and _lane_use(columns, COLUMN_LANES) >= 0.5


def column_dx_fits(x_shape, w_shape, padding):
    """Whether `column_backward` can give dx: at least COLUMN_TILE's rows of input, and top and left padding of at
    most the kernel's size less one (dy then starts inside the zero border the full correlation reads)."""
    top, _, left, _ = padding
    return x_shape[2] >= COLUMN_TILE[1] and top < w_shape[2] and left < w_shape[3]


def column_input_finite(x, w_shape, padding, q):
    """Whether x (the input of a convolution with Q output columns that the column tiles compute) holds no NaN or
    inf where that matters: over the images in the lanes it never does (they multiply no input by a stored zero
    that the contract's sum lacks); along the rows, read from the per-image plane sums of its zero-padded planes:
    the copy the forward made and the backward reads (one `layout_copy`), so x is not read again. A sum is finite
    only if every value in it is; a finite sum's overflow reads as non-finite, which only sends the call to the
    exact, slower path."""
    if image_lanes_pay(q):
        return True
    top, bottom, left, _ = padding
    _, c, h, _ = x.shape
    _, sums = _padded_planes(x, top, left, c, h + top + bottom, round_up(q, COLUMN_LANES) + w_shape[3] - 1,
                             "x_columns")
    return bool(np.isfinite(sums).all())


# the pool whose backward `_padded_planes` folds into its copy: `_pad_planes`' codes; and the argmax it passes when
# that is not a max-pool (not read: a stand-in of the type the kernel is compiled for)
_POOLED = {None: 0, "average": 1, "max": 2}
_NO_ARGMAX = np.zeros((1, 1, 1, 1), np.uint8)


def _padded_planes(a, top, left, planes, rows, columns, buffer_name, relu_y=None, pooled=None, argmax=None):
    """a[N, C, H, W] (either layout; through the ReLU's select on relu_y if given) placed at (top, left) in zeros
    (N, planes, rows, columns), and the per-image channel sums (N, C): a `layout_copy` of a (the forward's padded
    input is the backward's), in scratch buffers with relu_y. pooled "average": a is the gradient of relu_y's 2x2
    average pool, spread over the windows as it is copied; "max": a is the gradient of a 2x2 max-pool whose output
    is relu_y (after a ReLU) and winners argmax, routed to the winners as it is copied."""
    n, c = a.shape[:2]
    channels_last = is_channels_last(a) and not pooled
    src = a.transpose(0, 2, 3, 1) if channels_last else nchw(a)
    relu_y, argmax = (nchw(relu_y), nchw(argmax)) if pooled == "max" else (relu_y, _NO_ARGMAX)

    def make(allocate):
        out, sums = allocate((n, planes, rows, columns), a.dtype), allocate((n, c), a.dtype)
        _pad_planes(src, src.reshape(-1), channels_last, relu_y is not None, _POOLED[pooled],
                    src if relu_y is None else relu_y, argmax, top, left, out, out.reshape(-1), sums)
        return out, sums

    if relu_y is not None:
        return make(scratch_allocator(buffer_name))
    return layout_copy(a, ("planes", top, left, planes, rows, columns, a.dtype.str), make, buffer_name)


def _image_lanes_planes(a, top, left, planes, rows, columns, buffer_name, allocate=None):
    """a[N, C, H, W] (either layout) placed at (top, left) in zeros with its images in the lanes: (ceil(N /
    COLUMN_LANES), planes, rows, columns * COLUMN_LANES) (`_image_lanes`); a `layout_copy` of a (the forward's input
    is the backward's), or from `allocate` if given."""
    channels_last = is_channels_last(a)
    src = a.transpose(0, 2, 3, 1) if channels_last else nchw(a)

    def make(allocate):
        out = allocate((-(-a.shape[0] // COLUMN_LANES), planes, rows, columns * COLUMN_LANES), a.dtype)
        _image_lanes(src, src.reshape(-1), channels_last, top, left, out, out.reshape(-1))
        return out

    if allocate is not None:
        return make(allocate)
    return layout_copy(a, ("image lanes", top, left, planes, rows, columns, a.dtype.str), make, buffer_name)


def padded_nchw(x, padding, extra_columns=0):
    """x[N, C, H, W] (either layout) zero-padded by padding = (top, bottom, left, right) and extra_columns more on
    the right, NCHW: `_padded_planes`' compiled copy (numpy's slice assignments run on one thread), a layout copy
    shared with any other of the same shape in the pass."""
    n, c, h, wd = x.shape
    top, bottom, left, right = padding
    return _padded_planes(x, top, left, c, h + top + bottom, wd + left + right + extra_columns, "x_padded_nchw")[0]


def _correlation_tile(out_channels, out_rows, image_lanes=False):
    """-> (kernel, (channels, rows)): of the two column correlation tiles, the one that computes fewer channels x
    rows for K output channels and P output rows (K rounded up to its channels, P to whole blocks of its rows: the
    last block overlaps the one before), COLUMN_TILE on a tie or when P is under the other's rows; its kernel over
    the images in the lanes if image_lanes."""
    def computed(tile):
        return round_up(out_channels, tile[0]) * round_up(out_rows, tile[1])

    six = out_rows >= COLUMN_TILE_SIX[1] and computed(COLUMN_TILE_SIX) < computed(COLUMN_TILE)
    tile = COLUMN_TILE_SIX if six else COLUMN_TILE
    if image_lanes:
        return _IMAGE_LANES[_make_column_correlation, tile], tile
    return (_column_correlation_six if six else _column_correlation), tile


def _weight_grad_tile(out_channels, image_lanes=False):
    """-> (kernel, (channels, taps)): of the two column weight-gradient tiles, the one that computes fewer channels
    for K output channels (K rounded up to its channels), COLUMN_GRAD_TILE on a tie; over the images in the lanes
    if image_lanes."""
    six = round_up(out_channels, COLUMN_GRAD_TILE_SIX[0]) < round_up(out_channels, COLUMN_GRAD_TILE[0])
    tile = COLUMN_GRAD_TILE_SIX if six else COLUMN_GRAD_TILE
    if image_lanes:
        return _IMAGE_LANES[_make_column_weight_grad, tile], tile
    return (_column_weight_grad_six if six else _column_weight_grad), tile


def _row_products(out_rows, rows, r_taps, row_lo, row_hi):
    """Output rows x kernel rows the column correlation computes for a plane of `out_rows` rows in blocks of `rows`
    (the last block overlapping the one before), each block skipping the kernel rows whose tile reads only rows
    outside [row_lo, row_hi): the work the kernel does, for the multiply-adds `note` reports."""
    total = 0
    for block in range(0, out_rows, rows):
        i0 = min(block, out_rows - rows)
        total += rows * max(0, min(r_taps, row_hi - i0) - max(0, row_lo - i0 - rows + 1))
    return total


def _bias_tile(b_padded, rows):
    """Each channel's bias repeated over a column tile of `rows` rows x COLUMN_LANES lanes, the tiles in channel
    order: the column correlation copies a tile's worth at once into its accumulators."""
    out = aligned_empty(b_padded.shape[0] * rows * COLUMN_LANES, b_padded.dtype)
    out.reshape(b_padded.shape[0], -1)[...] = b_padded[:, None]
    return out


def column_forward(x, w, b, relu, padding):
    """conv2d_forward at stride 1 through `_column_correlation` or `_column_correlation_six` (needs P >=
    COLUMN_TILE's rows), along the rows or over the images in the lanes (`image_lanes_pay`)."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    top, bottom, left, right = padding
    p, q = h + top + bottom - r + 1, wd + left + right - s + 1
    image_lanes = image_lanes_pay(q)
    correlation, (channels, rows) = _correlation_tile(k, p, image_lanes)
    if image_lanes:
        xp = _image_lanes_planes(x, top, left, c, h + top + bottom, wd + left + right, "x_image_lanes")
    else:
        xp, _ = _padded_planes(x, top, left, c, h + top + bottom, round_up(q, COLUMN_LANES) + s - 1, "x_columns")
    wt = aligned_zeros((round_up(k, channels), r, s, c), x.dtype)
    wt[:k] = w.transpose(0, 2, 3, 1)
    bp = aligned_zeros(wt.shape[0], x.dtype)
    bp[:k] = b
    y = reusable_output((n, k, p, q), x.dtype)
    # the padding's rows are skipped where that changes nothing: an inf weight makes NaN of them in the contract's sum
    rows_read = (top, top + h) if np.isfinite(wt).all() else (0, xp.shape[2])
    note("conv2d_forward", f"column tile {channels} channels x {rows} rows x {COLUMN_LANES} "
         + ("images in the lanes" if image_lanes else "lanes") + ", padded copy" * any(padding),
         n * k * c * s * q * _row_products(p, rows, r, *rows_read))
    correlation(xp, xp.reshape(-1), wt, _bias_tile(bp, rows), x.dtype.type(0 if relu else -np.inf), *rows_read, y,
                y.reshape(-1))
    return y


def column_backward(dy, x, w, need_dx, padding, relu_y=None, pooled=None, argmax=None):
    """conv2d_backward at stride 1 through `_column_weight_grad` and, for dx, the column correlation over dy in a
    zero border (the full correlation with the flipped kernel, cropped by the padding); w finite (dx multiplies dy's
    zero border by the weights, a product the contract's sum lacks), x too along the rows (lanes past the output's
    width multiply zeros of dy by real inputs; `column_input_finite`), and `column_dx_fits`. With relu_y, of
    relu_backward(dy, relu_y): the select applied as dy is copied into its border; pooled "average" too, of the 2x2
    average pool's backward first (dy the pool's gradient, spread over the windows in the same copy); pooled "max",
    of the 2x2 max-pool's (relu_y the pool's output, argmax its winners: the select on the pooled values, then each
    routed to its winner in the same copy). Over the images in the lanes (`image_lanes_pay`), dy takes that copy
    unbordered, then the lanes' copy with the border."""
    _, c, r, s = w.shape
    n, k = dy.shape[:2]
    h, wd = x.shape[2:]
    top, bottom, left, right = padding
    p, q = h + top + bottom - r + 1, wd + left + right - s + 1
    image_lanes = image_lanes_pay(q)
    weight_grad, (channels, taps) = _weight_grad_tile(k, image_lanes)
    lanes = COLUMN_LANES
    dx_correlation, (dx_channels, dx_rows) = _correlation_tile(c, h, image_lanes)
    q_padded = round_up(q, lanes)
    # dy in zeros: for dx bordered as the full correlation reads it (R-1-top rows above, S-1-left columns left)
    row_off, col_off = (r - 1 - top, s - 1 - left) if need_dx else (0, 0)
    dw_macs = n * k * c * r * s * p * q
    dx_macs = n * c * wd * k * s * _row_products(h, dx_rows, r, row_off, row_off + p) if need_dx else 0
    note("conv2d_backward", f"column dw tiles of {channels} channels x {taps} taps x {lanes} "
         + ("images in the lanes" if image_lanes else "lanes")
         + f", dx the column tile {dx_channels} channels x {dx_rows} rows" * need_dx
         + {None: "", "average": ", the 2x2 average pool's gradient spread in dy's copy",
            "max": ", the 2x2 max-pool's gradient routed in dy's copy"}[pooled], dw_macs + dx_macs)
    dy_rows = max(h + r - 1, row_off + p) if need_dx else p
    if image_lanes:
        dy_columns = max(wd + s - 1, col_off + q) if need_dx else q
        dy_conv, dy_sums = _padded_planes(dy, 0, 0, k, p, q, "dy_columns", relu_y, pooled, argmax)
        dyp = _image_lanes_planes(dy_conv, row_off, col_off, round_up(k, channels), dy_rows, dy_columns, None,
                                  scratch_allocator("dy_image_lanes"))
        # the forward's copy (the same key)
        xp = _image_lanes_planes(x, top, left, c, h + top + bottom, wd + left + right, "x_image_lanes")
        col_off, q_grad = col_off * lanes, q * lanes  # a column is a vector of the lanes' images
    else:
        dy_columns = max(col_off + q_padded, round_up(wd, lanes) + s - 1 if need_dx else 0)
        dyp, dy_sums = _padded_planes(dy, row_off, col_off, round_up(k, channels), dy_rows, dy_columns,
                                      "dy_columns", relu_y, pooled, argmax)
        # the forward's padded input (the same key: its columns are the output's rounded up to the lanes, plus S - 1)
        xp, _ = _padded_planes(x, top, left, c, h + top + bottom, q_padded + s - 1, "x_columns")
        q_grad = q
    db = dy_sums.sum(axis=0)
    chunks = min(GRAD_IMAGE_CHUNKS, xp.shape[0])
    dwt = np.empty((chunks, dyp.shape[1], c * r * s), x.dtype)
    weight_grad(xp, dyp, row_off, col_off, p, q_grad, r, s, dwt)
    dw = (dwt[0] if chunks == 1 else np.sum(dwt, axis=0))[:k].reshape(k, c, r, s)  # chunks added in order
    if not need_dx:
        return None, dw, db
    wf = aligned_zeros((round_up(c, dx_channels), r, s, k), x.dtype)
    wf[:c] = w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)
    dx = reusable_output(x.shape, x.dtype)
    dx_correlation(dyp, dyp.reshape(-1), wf, _bias_tile(np.zeros(wf.shape[0], x.dtype), dx_rows),
                   x.dtype.type(-np.inf), row_off, row_off + p, dx, dx.reshape(-1))
    return dx, dw, db
