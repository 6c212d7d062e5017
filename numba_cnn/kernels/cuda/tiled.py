"""The convolution's tiled cuda kernels: the same sums as kernels.py's readable thread-per-output versions, arranged
so that each value read from global memory feeds many multiply-adds.

conv2d_forward and the weight gradient are matrix products whose operands are never materialised ("implicit
GEMM"): the forward is y[k, (n, p, q)] = sum over (c, r, s) of w[k, (c, r, s)] * xcol[(c, r, s), (n, p, q)], xcol
being the zero-padded input as im2col would lay it out; the weight gradient dw[k, (c, r, s)] = sum over (n, p, q)
of dy[k, (n, p, q)] * xcol[(c, r, s), (n, p, q)]. A block computes a TILE_M x TILE_N tile of the product: TILE_K
columns of each operand at a time are copied into shared memory (each element computed from its indices, padding
as zeros), then every thread adds a 4 x 4 register tile of products from them. A thread's rows and columns are
interleaved (row ty + 16 i, column tx + 16 j on a GPU), so the threads of a warp read consecutive shared-memory words
(no bank conflicts) and store consecutive output addresses. The padding's zeros are multiplied like any other
element, as the contract's sum over the padded input does; the product's tails (past K, past C*R*S, past N*P*Q)
are zeros multiplied by zeros and never stored.

The weight gradient's sum runs over every pixel of the batch (N*P*Q terms: 15,488 for mnist-cnn's conv2) into few
outputs (K*C*R*S): it is split into fixed chunks of pixels (split-K), each chunk's tile written to partial[chunk],
and the chunks added in order by a second kernel. The chunk size depends on the shape only, so the sum's order, and
the result, is the same on every GPU and every run.

The input gradient takes only the taps that read each element (the contract has no product for the others: a
multiply by a zero there would turn an infinite weight into NaN). A block takes one image, CHANNEL_TILE input
channels and a row of pixels, a thread per pixel; the weights of its channels for a slice of output channels sit
in shared memory, and each dy value read feeds CHANNEL_TILE multiply-adds. Per element the terms are added in
kernels.py's order (k, then r, then s), with the same products.

The tile sizes are the GPU's; in the simulator (a Python thread per CUDA thread), where these kernels run only when
NUMBA_CNN_CUDA_CONV=tiled asks (runtime.py), the same kernels run with small tiles unless NUMBA_CNN_CUDA_LAUNCH=gpu
asks for the GPU's.
"""

import math

import numpy as np

from numba_cnn.kernels.cuda.runtime import GPU_LAUNCH, ZERO, cuda, run_grid

REG = 4  # a thread's register tile is REG x REG outputs
THREAD_ROWS = 16 if GPU_LAUNCH else 2  # threads along a tile's rows (output channels) and along its columns
TILE_M = REG * THREAD_ROWS
TILE_N = REG * THREAD_ROWS
# The simulator's tiles are small, and its blocks few: it starts a Python thread per CUDA thread of every block and
# runs a barrier at each syncthreads, so there the cost is blocks and barriers, not arithmetic.
TILE_K = 16 if GPU_LAUNCH else 8
TILE_THREADS = THREAD_ROWS * THREAD_ROWS
WEIGHT_GRAD_CHUNKS = 64 if GPU_LAUNCH else 2  # about this many pixel chunks in the weight gradient's split sum

CHANNEL_TILE = 8  # input channels per thread in the input gradient
PIXEL_THREADS = 128 if GPU_LAUNCH else 16  # threads (one pixel each) per input-gradient block
STAGED_WEIGHTS = 6144  # floats of w staged at once by an input-gradient block (24 KiB in float32)


@cuda.jit(device=True)
def _padded_x(x, n, c, row, col):
    if row >= 0 and row < x.shape[2] and col >= 0 and col < x.shape[3]:
        return x[n, c, row, col]
    return ZERO


@cuda.jit(device=True)
def _tap(t, rs, s_k):
    """Reduction index t of a convolution's weights -> (c, r, s)."""
    c = t // rs
    r = (t - c * rs) // s_k
    return c, r, t - c * rs - r * s_k


@cuda.jit(device=True)
def _pixel(g, pq, q_out):
    """Output pixel index g over the batch -> (n, p, q)."""
    n = g // pq
    p = (g - n * pq) // q_out
    return n, p, g - n * pq - p * q_out


@cuda.jit(device=True)
def _patch(x, tap, pixel, rs, s_k, pq, q_out, stride, top, left):
    """Element [tap, pixel] of the patch matrix im2col would build (never built here): x[n, c, p*stride + r - top,
    q*stride + s - left], zero in the padding, for the flat indices tap of (c, r, s) and pixel of (n, p, q)."""
    c, r, s = _tap(tap, rs, s_k)
    n, p, q = _pixel(pixel, pq, q_out)
    return _padded_x(x, n, c, p * stride + r - top, q * stride + s - left)


@cuda.jit(device=True)
def _add_tile_products(a_tile, b_tile, acc, ty, tx):
    """Once every thread has staged its share of the tiles: acc[i, j] += the sum over the staged kk of
    a_tile[kk, ty + THREAD_ROWS i] * b_tile[kk, tx + THREAD_ROWS j]; then waits until all are done with them."""
    cuda.syncthreads()
    for kk in range(TILE_K):
        for i in range(REG):
            a = a_tile[kk, ty + THREAD_ROWS * i]
            for j in range(REG):
                acc[i, j] += a * b_tile[kk, tx + THREAD_ROWS * j]
    cuda.syncthreads()


@cuda.jit
def _conv_forward_tiled(x, w, b, relu, stride, top, left, y):
    """y[n, k, p, q] over the grid (column tiles of N*P*Q, row tiles of K): the implicit product above."""
    a_tile = cuda.shared.array((TILE_K, TILE_M), dtype=y.dtype)
    b_tile = cuda.shared.array((TILE_K, TILE_N), dtype=y.dtype)
    acc = cuda.local.array((REG, REG), dtype=y.dtype)
    n_img, k_out, p_out, q_out = y.shape
    c_in, r_k, s_k = w.shape[1], w.shape[2], w.shape[3]
    rs, pq = r_k * s_k, p_out * q_out
    reduction, columns = c_in * rs, n_img * pq
    tid = cuda.threadIdx.x
    ty, tx = tid // THREAD_ROWS, tid % THREAD_ROWS
    m0, n0 = cuda.blockIdx.y * TILE_M, cuda.blockIdx.x * TILE_N
    for i in range(REG):
        for j in range(REG):
            acc[i, j] = ZERO
    for k0 in range(0, reduction, TILE_K):
        for e in range(tid, TILE_K * TILE_M, TILE_THREADS):  # w[m, k0 + kk]: consecutive threads, consecutive kk
            m, kk = e // TILE_K, e % TILE_K
            value = ZERO
            if m0 + m < k_out and k0 + kk < reduction:
                c, r, s = _tap(k0 + kk, rs, s_k)
                value = w[m0 + m, c, r, s]
            a_tile[kk, m] = value
        for e in range(tid, TILE_K * TILE_N, TILE_THREADS):  # consecutive threads, consecutive output pixels
            kk, col = e // TILE_N, e % TILE_N
            value = ZERO
            if n0 + col < columns and k0 + kk < reduction:
                value = _patch(x, k0 + kk, n0 + col, rs, s_k, pq, q_out, stride, top, left)
            b_tile[kk, col] = value
        _add_tile_products(a_tile, b_tile, acc, ty, tx)
    for i in range(REG):
        k = m0 + ty + THREAD_ROWS * i
        if k < k_out:
            for j in range(REG):
                g = n0 + tx + THREAD_ROWS * j
                if g < columns:
                    value = acc[i, j] + b[k]
                    if relu and value < ZERO:  # a NaN stays NaN
                        value = ZERO
                    n, p, q = _pixel(g, pq, q_out)
                    y[n, k, p, q] = value


def conv_forward(x, w, b, relu, stride, top, left, y):
    """Fill y[N,K,P,Q] (the layout kernels.py's launcher made) with the tiled forward."""
    n, k, p, q = y.shape
    run_grid(_conv_forward_tiled, (math.ceil(n * p * q / TILE_N), math.ceil(k / TILE_M)), TILE_THREADS,
             (x, w, b, relu, stride, top, left, y))


def weight_grad_fits(w_shape):
    """Whether the tiled weight gradient pays: its product has C*R*S columns, and with fewer than half a tile
    (a first layer's 1 x 3 x 3) most of every tile would be computed on zeros; the per-image kernel is used then."""
    return w_shape[1] * w_shape[2] * w_shape[3] >= TILE_N // 2


def weight_grad_chunk(pixels):
    """Pixels per chunk of the weight gradient's split sum: a multiple of TILE_K, about WEIGHT_GRAD_CHUNKS chunks."""
    per_chunk = math.ceil(pixels / WEIGHT_GRAD_CHUNKS)
    return max(TILE_K, math.ceil(per_chunk / TILE_K) * TILE_K)


@cuda.jit
def _conv_weight_grad_tiled(dy, x, stride, top, left, chunk, partial):
    """partial[z, k, (c, r, s)] = the sum over the pixels of chunk z of dy[n, k, p, q] * xpad[n, c, p*stride + r,
    q*stride + s]; grid (column tiles of C*R*S, row tiles of K, chunks)."""
    a_tile = cuda.shared.array((TILE_K, TILE_M), dtype=partial.dtype)
    b_tile = cuda.shared.array((TILE_K, TILE_N), dtype=partial.dtype)
    acc = cuda.local.array((REG, REG), dtype=partial.dtype)
    n_img, k_out, p_out, q_out = dy.shape
    r_k, s_k = partial.shape[3], partial.shape[4]
    rs, pq = r_k * s_k, p_out * q_out
    columns = partial.shape[2] * rs
    pixels = n_img * pq
    tid = cuda.threadIdx.x
    ty, tx = tid // THREAD_ROWS, tid % THREAD_ROWS
    m0, n0 = cuda.blockIdx.y * TILE_M, cuda.blockIdx.x * TILE_N
    start = cuda.blockIdx.z * chunk
    end = min(start + chunk, pixels)
    for i in range(REG):
        for j in range(REG):
            acc[i, j] = ZERO
    for k0 in range(start, end, TILE_K):
        for e in range(tid, TILE_K * TILE_M, TILE_THREADS):  # dy[n, m, p, q]: consecutive threads, consecutive pixels
            m, kk = e // TILE_K, e % TILE_K
            value = ZERO
            if m0 + m < k_out and k0 + kk < end:
                n, p, q = _pixel(k0 + kk, pq, q_out)
                value = dy[n, m0 + m, p, q]
            a_tile[kk, m] = value
        for e in range(tid, TILE_K * TILE_N, TILE_THREADS):  # xpad for (c, r, s): consecutive threads, consecutive s
            kk, col = e // TILE_N, e % TILE_N
            value = ZERO
            if n0 + col < columns and k0 + kk < end:
                value = _patch(x, n0 + col, k0 + kk, rs, s_k, pq, q_out, stride, top, left)
            b_tile[kk, col] = value
        _add_tile_products(a_tile, b_tile, acc, ty, tx)
    for i in range(REG):
        k = m0 + ty + THREAD_ROWS * i
        if k < k_out:
            for j in range(REG):
                t = n0 + tx + THREAD_ROWS * j
                if t < columns:
                    c, r, s = _tap(t, rs, s_k)
                    partial[cuda.blockIdx.z, k, c, r, s] = acc[i, j]


def weight_grad_partials(dy, x, stride, top, left, w_shape):
    """-> partial[chunks, K, C, R, S], the chunks' shares of dw (to be added in chunk order)."""
    n, k, p, q = dy.shape
    chunk = weight_grad_chunk(n * p * q)
    chunks = math.ceil(n * p * q / chunk)
    partial = cuda.device_array((chunks,) + tuple(w_shape), dtype=dy.dtype)
    c, r, s = w_shape[1], w_shape[2], w_shape[3]
    run_grid(_conv_weight_grad_tiled, (math.ceil(c * r * s / TILE_N), math.ceil(k / TILE_M), chunks), TILE_THREADS,
             (dy, x, stride, top, left, chunk, partial))
    return partial


@cuda.jit
def _conv_input_grad_tiled(dy, w, stride, top, left, dx):
    """dx[n, c, row, col] over the grid (pixel rows of H*W, channel tiles, images), the taps that read each element
    only, k then r then s as kernels.py's _conv_input_grad adds them."""
    staged = cuda.shared.array(STAGED_WEIGHTS, dtype=dx.dtype)
    acc = cuda.local.array(CHANNEL_TILE, dtype=dx.dtype)
    _, c_in, h_in, w_in = dx.shape
    k_out, p_out, q_out = dy.shape[1], dy.shape[2], dy.shape[3]
    r_k, s_k = w.shape[2], w.shape[3]
    rs = r_k * s_k
    n = cuda.blockIdx.z
    c0 = cuda.blockIdx.y * CHANNEL_TILE
    pixel = cuda.blockIdx.x * PIXEL_THREADS + cuda.threadIdx.x
    row, col = pixel // w_in, pixel % w_in
    t, u = row + top, col + left  # the element's position in the padded input
    r_low, s_low = max(0, t - (p_out - 1) * stride), max(0, u - (q_out - 1) * stride)
    r_first, r_end = r_low + (t - r_low) % stride, min(r_k, t + 1)
    s_first, s_end = s_low + (u - s_low) % stride, min(s_k, u + 1)
    for ct in range(CHANNEL_TILE):
        acc[ct] = ZERO
    slice_k = max(1, STAGED_WEIGHTS // (CHANNEL_TILE * rs))  # output channels whose weights are staged at once
    for k0 in range(0, k_out, slice_k):
        k_count = min(slice_k, k_out - k0)
        cuda.syncthreads()
        for e in range(cuda.threadIdx.x, k_count * CHANNEL_TILE * rs, PIXEL_THREADS):
            kk = e // (CHANNEL_TILE * rs)
            ct = (e // rs) % CHANNEL_TILE
            tap = e % rs
            value = ZERO
            if c0 + ct < c_in:
                value = w[k0 + kk, c0 + ct, tap // s_k, tap % s_k]
            staged[e] = value
        cuda.syncthreads()
        if pixel < h_in * w_in:
            for kk in range(k_count):
                for r in range(r_first, r_end, stride):
                    i = (t - r) // stride
                    for s in range(s_first, s_end, stride):
                        g = dy[n, k0 + kk, i, (u - s) // stride]
                        base = kk * CHANNEL_TILE * rs + r * s_k + s
                        for ct in range(CHANNEL_TILE):
                            acc[ct] += g * staged[base + ct * rs]
    if pixel < h_in * w_in:
        for ct in range(CHANNEL_TILE):
            if c0 + ct < c_in:
                dx[n, c0 + ct, row, col] = acc[ct]


def input_grad_fits(x_shape, w_shape):
    """Whether the tiled input gradient takes this shape: one output channel's weights for CHANNEL_TILE input
    channels fit the staging buffer, and the batch fits the grid's third dimension."""
    return CHANNEL_TILE * w_shape[2] * w_shape[3] <= STAGED_WEIGHTS and x_shape[0] <= 65535


def input_grad(dy, w, stride, top, left, dx):
    """Fill dx[N,C,H,W] with the tiled input gradient."""
    n, c, h, wd = dx.shape
    run_grid(_conv_input_grad_tiled, (math.ceil(h * wd / PIXEL_THREADS), math.ceil(c / CHANNEL_TILE), n),
             PIXEL_THREADS, (dy, w, stride, top, left, dx))
