"""jit backend: explicit loop kernels compiled by Numba (`parallel=True`), register-blocked; BLAS only for dense layers'
products that none pays for (layers.py, blas.py). The compiled kernels are in tiles.py (the register-tiled stride-1
kernels, Winograd's, 2x2 pooling, and the tile shapes of every convolution kernel with their reasons), columns.py
(stride-1 convolutions with few channels, the lanes along the output columns), narrow_input.py (stride-1 convolutions
with few input channels and many filters, their output channels-last), general.py (the convolution of any stride, and
the stride-1 weight gradient's channels-last tiles), norm.py (pooling of other windows, average pooling, batch
normalisation), sparse.py (the fused backward's listed kernels, channels-last packing), pooled_grad.py (a first
layer's dw behind max-pooling, the listed dw's chunk sums), winograd_grad.py (Winograd's weight gradient, 3x3 and
5x5) and layers.py (dropout, loss, Adam and the dense layers), each file self-contained so that Numba's cache sees
every change (the Winograd stages they share, winograd_stages.py, by its stamp); this file holds the contract
functions and the host-side glue that packs inputs and calls them (Winograd's in winograd.py, the strided layers'
phases in polyphase.py, batch normalisation's in batchnorm.py, pooling's in pooling.py).

Each convolution loop nest keeps an output tile (columns or taps x channel lanes) in registers: the tile is a
stack array (`stack_tile` in `_numba_ext`) that LLVM promotes to vector registers once it unrolls the tile loops
(a np.empty tile stays in memory). The innermost loop, over `lanes` contiguous channels, compiles to FMAs. Tile
shapes are chosen once, in tiles.py (`CONV_TILE_*`, `CONV_POOL_TILE`, `GRAD_LANES_*`), from the vector width and
register count of the target numba compiles for (`_numba_ext.TILE_BITS` / `TILE_REGISTERS`, which honour
NUMBA_CPU_NAME/FEATURES): AVX2 has 16 ymm registers, so a tile of at most 12 accumulators; AVX-512 32 zmm.

Layout. The ops take NCHW arrays stored either way (INFO.channels_last: an NHWC buffer viewed as NCHW passes as it
is); most kernels hand the next layer channels-last arrays, so activations are not transposed between layers; where
a kernel reads the other layout, `nchw` / `nhwc` (jit/buffers.py) copy.

conv2d_forward   stride 1, `_conv_tile_*`: prange over images; x repacked channels-last (N, H, W, C) by
                 `_pack_channels_last` (a view where x is stored so), w to (R, S, C, K padded to the lanes); per
                 output row, tiles of columns x lanes output channels, reduced over (r, s, c) with c innermost
                 (contiguous, the longest loop); bias seeds the tile, ReLU clamps it on the store (NaN kept). The
                 last column tile overlaps the one before; inputs narrower than a tile are zero-padded on the right
                 and the output cropped. The padding is stored, not skipped: the contract's sum multiplies its zeros
                 too (0 * inf is NaN).
                 Few input channels or filters (columns.py's `columns_pay`; LeNet's convolutions):
                 the column tile, lanes along the output columns (short rows: the images), NCHW, the same bits. Few
                 input channels and K a multiple of NARROW_LANES (VGG's first): narrow_input.py's tile, the output
                 channels-last (as the next layer reads it), the same bits; its backward reads dy as it lies.
                 3x3 with C a multiple of WINOGRAD_CHUNK, K over half the narrow lanes, finite w (winograd.py):
                 tiles.py's `_winograd*`, F(4x4, 3x3) (36 products per tile, not 144) or, where its tiles waste
                 more, F(2x2, 3x3) (16, not 36), as matrix products in register tiles; output channels-last.
                 5x5 on the same terms (not fused with a pool): F(4x4, 5x5) (64, not 400) or F(2x2, 5x5) (36).
                 stride >= 2: polyphase.py's phase layer where Winograd takes it (5x5 stride 2: x's four phases
                 stacked along the channels, a 3x3 stride-1 convolution of 4C channels); else general.py's
                 `_strided_forward`: the same tile over the padded channels-last input, its columns read `stride`
                 apart, the last column tile clamping its reads. Channels-last output (a tile's lanes are a pixel's).
conv2d_backward  dw: `_weight_grad_*` over dy repacked channels-last (N, P, Q, K padded) by `_pack_channels_last`;
                 tiles of 3 taps along a kernel row x lanes, split into one contiguous range per thread, images
                 outermost, so each thread streams dy once; with few tiles (conv1: 3) the images are cut into
                 GRAD_IMAGE_CHUNKS fixed chunks instead, a task per chunk, the chunks' sums added in chunk order:
                 every dw element is summed in the same order whatever the thread count.
                 db: per-image sums made by `_pack_channels_last` while it repacks, added up image by image.
                 dx: the full correlation of dy with the flipped kernel through the forward's `_conv_tile_*`
                 (bias 0, no ReLU), reading the same channels-last dy, packed with S-1 zero columns on each side;
                 the R-1 zero rows above and below are skipped by the kernel's row_shift instead of stored. With
                 padding, dw reads a zero-padded NCHW copy of x and dx is the same correlation cropped: it starts
                 `left` columns into the packed dy (col_shift) and R-1-top rows above it (row_shift).
                 3x3 or 5x5 where Winograd fits dy's K channels: dx by winograd.py, dy padded by R-1-top...
                 3x3, C a multiple of WINOGRAD_CHUNK: dw, db by winograd_grad.py's F(3x3, 2x2) (16 products per
                 tile of dy and pair, not 36; 5x5: F(5x5, 4x4) or 2x2); non-finite result: dw tiles.
                 Where the forward takes the column tile (and x and w are finite): columns.py's column tiles for
                 dw and for dx over dy in a zero border, NCHW, no channels-last copy.
                 stride >= 2: the phase layer's Winograd dw and dx where the forward takes it; else general.py,
                 x padded channels-last, dy packed as above (ceil((S-1)/stride) zero columns a side for dx). dw:
                 `_strided_weight_grad`, per tap a tile of input channels x output lanes summed over (n, i, j) in
                 fixed image chunks added in order. dx: `_strided_input_grad`, a gather writing each element once:
                 per input row and column phase, a tile of those columns x input channel lanes summed over the
                 valid taps and the output channels; elements no output reads get 0.
                 Non-finite weights (any stride) take `_input_grad_by_taps` for dx, which multiplies only the
                 products the convolution has, never the zero padding of dy.
maxpool2d_*      `_maxpool_forward`/`_maxpool_backward`: threads over (image, channel) planes; forward compares
                 the 4 window values in row-major order through selects (so it vectorises): a later value wins
                 if it is strictly greater, or if it is NaN and the best so far is not (a NaN beats every number,
                 the first NaN wins, ties keep the first maximum); backward writes each input element once (its
                 window's dy or zero), so no zero-fill pass. A channels-last x (a batch norm's output) takes
                 the `_last` twins (jit/pooling.py), and so does the backward of its channels-last argmax (dy
                 read channels-last): threads over images, a pixel's channels in the lanes, the same rule, the
                 outputs channels-last. Other windows (kh, kw) take norm.py's
                 `_maxpool_any_*`: the same rule written as a select per value in row-major order.
avgpool2d_*      norm.py's `_avgpool_*` (2x2: `_avgpool2x2_*`, the same sums in constant loops): threads over planes;
                 window sums in float64 (no float32 overflow or lost low bits), backward dy / (kh*kw) in float64.
batchnorm2d_*    norm.py's kernels, called by batchnorm.py (the host side, shared with the fused ops): statistics,
                 normalisation and the backward's sums in float64 (a large mean keeps its spread), threads over
                 channels, or for channels-last x over fixed chunks of pixels added in order, results channels-last.

Fused ops (beyond the contract; INFO.fused names them):
batchnorm2d_relu_*  batchnorm2d_* with the ReLU folded in: clamped as y is stored (bitwise the composition), dy
                 read through `0 if y <= 0 else dy` (the same sums; compiled apart, so equal within rounding).
batchnorm2d_relu_maxpool2d_*  channels-last: the forward pools each window's four normalised values as it makes
                 them (`_batchnorm_apply_pool_last`) and the backward routes the pool's gradient to its winners as it
                 reads it (`_pooled_source`): neither full-size array is written. NCHW: composed.
conv2d_relu_maxpool2d_forward   `_conv_pool`: the forward's tiles for one pair of conv rows land in a per-image
                 (2, Q, K) channels-last buffer (L1-sized), ReLU'd, and are pooled from there into y and argmax:
                 the P x Q x K activation is never written, and only the 2 * Q2 columns pooling reads are computed
                 (conv2: 10 of 11, two exact tiles of CONV_POOL_TILE's 5 columns). One input channel and 3x3
                 (conv1) takes `_one_channel_pool`: per window, its 4 x 4 input patch broadcast against vectors of
                 ONE_CHANNEL_LANES output channels, stored channels-last as pooled. Other one-channel kernels with
                 rows of at most CONV1_TILE columns take `_conv1_pool`, a tile along the columns, even columns
                 apart from odd ones so that pooling reads both at one offset. All sum each output as
                 conv2d_forward does (bias, then the taps in (r, s, c) order, as FMAs), so the pooled values and
                 argmax are bitwise those of the composed ops (tested). Where Winograd fits, its kernel pools the
                 2x2 windows of its output tiles (conv2d_forward's tiles and sums: bitwise too), channels-last.
                 Where conv2d_forward has a kernel for the shape with no fused twin: the two ops in turn.
conv2d_relu_maxpool2d_backward  finite x and w, kernel rows of whole LISTED_BLOCKs (S x C: 3x3 over 32 or 64
                 channels): over the conv output's nonzero gradients only (pooling, the ReLU and dropout zero the
                 rest), sparse.py's `_pooled_grad_lists` (values, their winners' offsets, db sums),
                 `_listed_weight_grad` (3 kernel rows in a register tile, the input in L1 bands, fixed image chunks)
                 and `_listed_input_grad` (per pixel, its channels' kernel rows summed in a register tile, added
                 into dx); within rounding of the composition. A first layer: dw from the pooled gradient
                 (pooled_grad.py's two kernels). Else the pool's gradient routed as the column tiles copy dy
                 (`_pad_planes`), or the three ops in turn: bitwise the composition.
conv2d_relu_backward  conv2d_backward of the ReLU's select: the column tiles take it as they copy dy (one pass
                 less over the activation), the other paths call layers.relu_backward first; the same bits.

Results do not depend on the thread count (bitwise): the work splits over images, planes or fixed chunks whose
sums are added in order, and dropout's mask comes from a counter-based generator (layers.py). Float work is in the
input's dtype (float32 or float64), but for the float64 sums of average pooling and batch normalisation.

Buffers (jit/buffers.py): packed data in per-thread scratch buffers, returned arrays from the caller's OutputArena.
Compilation: every kernel goes through `_numba_ext.jit` (its options, the disk cache, NUMBA_CNN_CACHE), compiled on
its first call for a dtype; on a cold cache, training's warm-up compiles its network's (`precompile`).
"""

import numpy as np
from numba import get_num_threads

from numba_cnn.kernels._numba_ext import CACHE  # noqa: F401  (jit.CACHE: whether the kernels use the disk cache)
from numba_cnn.kernels.contract import BackendInfo, conv_output_size, is_channels_last
from numba_cnn.kernels.jit.tiles import (CONV1_TILE, CONV_POOL_TILE, CONV_POOL_TILE_NARROW, CONV_TILE_NARROW,
                                         CONV_TILE_SMALL, CONV_TILE_WIDE, GRAD_IMAGE_CHUNKS, GRAD_LANES_NARROW,
                                         GRAD_LANES_WIDE, GRAD_MIN_TILES, ONE_CHANNEL_LANES, STRIDED_GRAD_TILE,
                                         STRIDED_TILE, TILE_TAPS, _conv1_pool, _conv_pool, _conv_pool_narrow,
                                         _conv_tile_small, _conv_tile_narrow, _conv_tile_wide, _one_channel_pool)
from numba_cnn.kernels.jit import layers  # noqa: F401  (the backend's layers: dropout, loss and Adam compiled)
from numba_cnn.kernels.jit.cold_compile import compile_cold_cache
from numba_cnn.kernels.jit.buffers import OutputArena  # noqa: F401  (Backend.output_arena)
from numba_cnn.kernels.jit.buffers import (aligned_copy, aligned_zeros, nchw, pad_width, padded_channels_last,
                                          reusable_output, round_up, scratch)
from numba_cnn.kernels.jit.columns import (COLUMN_TILE, column_backward, column_dx_fits, column_forward,
                                           column_input_finite, columns_pay, padded_nchw)
from numba_cnn.kernels.jit.general import (_strided_forward, _strided_input_grad, _strided_input_grad_small,
                                           _strided_weight_grad, _weight_grad_narrow, _weight_grad_wide)
from numba_cnn.kernels.jit.paths import PathLog, note  # noqa: F401  (PathLog: what the callers open)
from numba_cnn.kernels.jit.polyphase import polyphase_backward, polyphase_forward
from numba_cnn.kernels.jit.winograd import winograd_conv, winograd_fits
from numba_cnn.kernels.jit.winograd_grad import winograd_grad_fits, winograd_weight_grad
from numba_cnn.kernels.jit import batchnorm as _batchnorm  # batch normalisation's host side, plain and fused
from numba_cnn.kernels.jit import pooling as _pooling  # pooling's host side
from numba_cnn.kernels.jit.narrow_input import (NARROW_GRAD_PATH, narrow_forward, narrow_input_fits,
                                                narrow_weight_grad)
from numba_cnn.kernels.jit.listed import first_layer_weight_grad, listed_backward
from numba_cnn.kernels.jit.sparse import LISTED_BLOCK, _pack_channels_last

# BLAS at one thread: its only BLAS calls are the dense layer's small matmuls, and OpenBLAS workers that keep
# spinning after each call take the cores Numba's threads need (on 2 cores, a training step slows markedly).
INFO = BackendInfo(summary="register-tiled loop kernels compiled by Numba (parallel=True)", blas_threads="one",
                   fused=("batchnorm2d_relu", "conv2d_relu_maxpool2d", "conv2d_relu", "conv2d_relu_avgpool2d",
                          "batchnorm2d_relu_maxpool2d"),
                   channels_last=True)


def _conv_tile_shape(out_channels):
    """(lanes, columns) of the correlation tile for `out_channels` outputs."""
    if out_channels <= CONV_TILE_SMALL[0]:
        return CONV_TILE_SMALL
    return CONV_TILE_NARROW if out_channels <= CONV_TILE_NARROW[0] else CONV_TILE_WIDE


def _grad_lanes(out_channels):
    return GRAD_LANES_NARROW if out_channels <= GRAD_LANES_NARROW else GRAD_LANES_WIDE


def _channels_last(x, col_pad=0, channels=None, buffer_name="x_cl"):
    """x[N, C, H, W] (NCHW, or channels-last memory viewed so: the kernel then reads each pixel's channels
    contiguously, the same sums in the same order) -> (x_cl[N, H, W + 2 col_pad, channels], per-image channel
    sums[N, channels]), both in scratch buffers (valid until the next call with the same buffer name)."""
    n, c, h, w = x.shape
    channels = c if channels is None else channels
    x_cl = scratch(buffer_name, (n, h, w + 2 * col_pad, channels), x.dtype)
    sums = scratch(buffer_name + ".sums", (n, channels), x.dtype)
    _pack_channels_last(x, col_pad, x_cl, sums)
    return x_cl, sums


def _input_channels_last(x):
    """x[N, C, H, W] -> its channels-last (N, H, W, C) buffer: a view when x is stored so (one channel: always),
    else packed into a scratch buffer."""
    n, c, h, wd = x.shape
    if c == 1:
        return x.reshape(n, h, wd, 1)
    return x.transpose(0, 2, 3, 1) if is_channels_last(x) else _channels_last(x)[0]


def _packed_weights(w_rsck, bias, lanes, dtype):
    """w[R, S, C, K] and b[K] zero-padded to a multiple of `lanes` output channels."""
    out_channels = w_rsck.shape[3]
    k_padded = round_up(out_channels, lanes)
    wt = aligned_zeros(w_rsck.shape[:3] + (k_padded,), dtype)
    wt[..., :out_channels] = w_rsck
    b = aligned_zeros(k_padded, dtype)
    b[:out_channels] = bias
    return wt, b


def _correlate(x_cl, w_rsck, bias, relu, row_shift=0, col_shift=0, out_hw=None):
    """Correlation of channels-last x_cl[N, H, W, C] with w_rsck[R, S, C, K] through a tile kernel -> y[N, K, P, Q];
    row_shift > 0 treats x_cl as zero-padded by row_shift rows at the top (and below as many as the output needs)
    without storing them, and the output column j reads from column j + col_shift on. out_hw = (P, Q), by default
    (H + 2 row_shift - R + 1, W - S + 1)."""
    n, h, wd, _ = x_cl.shape
    r, s, _, out_channels = w_rsck.shape
    lanes, columns = _conv_tile_shape(out_channels)
    wt, b = _packed_weights(w_rsck, bias, lanes, x_cl.dtype)
    p, q = out_hw if out_hw is not None else (h + 2 * row_shift - r + 1, wd - s + 1)
    q_tiles = max(q, columns)  # narrower than a tile: zero columns, cropped off the output
    x_cl = pad_width(x_cl, q_tiles + s - 1 + col_shift, axis=2)
    y = reusable_output((n, out_channels, p, q_tiles), x_cl.dtype)
    floor = x_cl.dtype.type(0 if relu else -np.inf)
    kernel = {CONV_TILE_SMALL: _conv_tile_small, CONV_TILE_NARROW: _conv_tile_narrow}.get((lanes, columns),
                                                                                           _conv_tile_wide)
    kernel(x_cl, wt, b, floor, row_shift, col_shift, y)
    return y if q_tiles == q else np.ascontiguousarray(y[..., :q])


def _dw_from_tiles(dwt, k, s):
    """dw[K, C, R, S] from the weight-gradient kernels' per-chunk dwt[chunks, C, R, S tiled, K padded]."""
    dw_crsk = dwt[0] if dwt.shape[0] == 1 else np.sum(dwt, axis=0)  # chunk by chunk, in order
    return np.ascontiguousarray(dw_crsk[:, :, :s, :k].transpose(3, 0, 1, 2))


def _input_grad_by_taps(dy_cl, w, x_shape, stride=1, padding=(0, 0, 0, 0)):
    """dx[N, C, H, W] from dy channels-last (N, P, Q, K) and w[K, C, R, S]: per tap (r, s), dy times w[:, :, r, s]
    added at the positions (r + stride i, s + stride j) of the padded input, then cropped, so only the products the
    convolution has: a non-finite weight reaches only the elements it multiplies (the compiled dx kernels multiply
    zero padding too, and 0 * inf is NaN). For weights holding NaN or inf only (a diverged run): numpy, far slower
    than the tiles."""
    n, c, h, wd = x_shape
    top, bottom, left, right = padding
    dx = np.zeros((n, c, h + top + bottom, wd + left + right), dy_cl.dtype)
    p, q = dy_cl.shape[1], dy_cl.shape[2]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf are expected here, as in compiled code
        for r in range(w.shape[2]):
            for s in range(w.shape[3]):
                dx[:, :, r:r + stride * (p - 1) + 1:stride, s:s + stride * (q - 1) + 1:stride] += np.einsum(
                    "npqk,kc->ncpq", dy_cl, w[:, :, r, s])
    return dx if not any(padding) else np.ascontiguousarray(dx[:, :, top:top + h, left:left + wd])


def _conv_backward_packed(dyt, dy_sums, x, w, need_dx, padding=(0, 0, 0, 0)):
    """Stride-1 conv2d_backward from dy already packed channels-last (N, P, Q + 2 col_pad, K padded to the grad
    lanes), col_pad = S - 1 when need_dx else 0, and its per-image channel sums; x NCHW when unpadded, either layout
    when padded."""
    k, c, r, s = w.shape
    col_pad = s - 1 if need_dx else 0
    db = dy_sums[:, :k].sum(axis=0)
    x_shape = x.shape
    # kernels narrower than a tap tile: zero columns on the right of x add taps that are computed and dropped
    s_tiled = max(s, TILE_TAPS)
    if any(padding):  # dw reads a zero-padded NCHW copy (its products with the padding are the contract's too)
        x = padded_nchw(x, padding, s_tiled - s)
    else:
        x = pad_width(x, x.shape[3] + s_tiled - s)
    lanes = _grad_lanes(k)
    n_tiles = c * r * (-(-s_tiled // TILE_TAPS)) * (dyt.shape[3] // lanes)
    chunks = min(GRAD_IMAGE_CHUNKS, x.shape[0]) if n_tiles < GRAD_MIN_TILES else 1
    dwt = np.zeros((chunks, c, r, s_tiled, dyt.shape[3]), x.dtype)
    weight_grad = _weight_grad_narrow if lanes == GRAD_LANES_NARROW else _weight_grad_wide
    # image chunks: each takes all the tiles, so dy of an image is read once into L2 for them all
    groups = 1 if chunks > 1 else get_num_threads()
    weight_grad(x, dyt, col_pad, r, s_tiled, groups, dwt)
    dw = _dw_from_tiles(dwt, k, s)
    if not need_dx:
        return None, dw, db
    return _input_grad_packed(dyt, w, x_shape, padding), dw, db


def _input_grad_packed(dyt, w, x_shape, padding):
    """Stride-1 dx[N, C, H, W] from dy packed channels-last with S - 1 zero columns on each side (N, P, Q + 2 (S - 1),
    K or more channels)."""
    k, c, r, s = w.shape
    if not np.isfinite(w).all():  # microseconds; a diverged run's weights take the path that skips the padding
        return _input_grad_by_taps(dyt[:, :, s - 1:dyt.shape[2] - s + 1, :k], w, x_shape, 1, padding)
    # dx is the full correlation of dy with the flipped kernel, cropped by the padding: the zero columns are in
    # dyt (read from column `left` on), the R-1-top zero rows above and those below are skipped through row_shift;
    # dyt's padded channels meet zero rows of w_flipped
    top, _, left, _ = padding
    w_flipped = aligned_zeros((r, s, dyt.shape[3], c), dyt.dtype)
    w_flipped[:, :, :k] = w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
    return _correlate(dyt, w_flipped, np.zeros(c, dyt.dtype), False, row_shift=r - 1 - top, col_shift=left,
                      out_hw=x_shape[2:])


def _strided_forward_glue(x, w, b, relu, stride, padding):
    """conv2d_forward for stride >= 2: the padded channels-last input through general.py's `_strided_forward`."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    top, bottom, left, right = padding
    p, q = (h + top + bottom - r) // stride + 1, (wd + left + right - s) // stride + 1
    xp = padded_channels_last(x, padding)
    wt, bp = _packed_weights(w.transpose(2, 3, 1, 0), b, STRIDED_TILE[0], x.dtype)
    y = reusable_output((n, p, q, k), x.dtype)  # channels-last, as the tile holds it and the next layer reads it
    note("conv2d_forward", f"strided tile {STRIDED_TILE[0]} lanes x {STRIDED_TILE[1]} columns", y.size * c * r * s)
    _strided_forward(xp, wt, bp, x.dtype.type(0 if relu else -np.inf), stride, y)
    return y.transpose(0, 3, 1, 2)


def _strided_backward(dy, x, w, need_dx, stride, padding):
    """conv2d_backward for stride >= 2 through general.py's kernels: dy packed channels-last (its channels padded
    to the dw lanes, and for dx ceil((S-1) / stride) zero columns on each side) with its per-image sums (db); x
    padded channels-last."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    lanes = STRIDED_GRAD_TILE[1]
    note("conv2d_backward", "strided dw tiles, dx gathered by column phase", dy.size * c * r * s * (1 + need_dx))
    col_pad = -(-(s - 1) // stride) if need_dx else 0
    dyt, dy_sums = _channels_last(dy, col_pad, round_up(k, lanes), buffer_name="dy_cl")
    db = dy_sums[:, :k].sum(axis=0)
    xp = padded_channels_last(x, padding)
    chunks = min(GRAD_IMAGE_CHUNKS, n)  # each chunk's images read from cache by all its tiles
    dwt = np.empty((chunks, r, s, c, dyt.shape[3]), x.dtype)
    _strided_weight_grad(xp, dyt, stride, col_pad, r, s, dwt)
    dw_rsck = dwt[0] if chunks == 1 else np.sum(dwt, axis=0)  # chunk by chunk, in order
    dw = np.ascontiguousarray(dw_rsck[..., :k].transpose(3, 2, 0, 1))
    if not need_dx:
        return None, dw, db
    if not np.isfinite(w).all():  # as in _input_grad_packed
        return _input_grad_by_taps(dyt[:, :, col_pad:dyt.shape[2] - col_pad, :k], w, x.shape, stride, padding), dw, db
    small = c <= CONV_TILE_SMALL[0]
    wt = aligned_zeros((r, s, k, round_up(c, CONV_TILE_SMALL[0] if small else STRIDED_TILE[0])), x.dtype)
    wt[..., :c] = w.transpose(2, 3, 0, 1)
    dx = reusable_output(x.shape, x.dtype)
    (_strided_input_grad_small if small else _strided_input_grad)(dyt, wt, k, stride, padding[0], padding[2], col_pad,
                                                                   dx)
    return dx, dw, db


def conv2d_forward(x, w, b, relu, stride, padding):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> y[N,K,P,Q] (NCHW), the correlation of x zero-padded by padding = (top,
    bottom, left, right) with the given stride; ReLU applied when relu is True."""
    w_rsck = w.transpose(2, 3, 1, 0)
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    top, bottom, left, right = padding
    out_hw = ((h + top + bottom - r) // stride + 1, (wd + left + right - s) // stride + 1)
    macs = n * k * c * r * s * out_hw[0] * out_hw[1]
    if stride != 1:  # the phases' stride-1 layer where Winograd takes it
        y = polyphase_forward(x, w, b, relu, stride, padding)
        return _strided_forward_glue(x, w, b, relu, stride, padding) if y is None else y
    if narrow_input_fits(x.shape, w.shape, stride, padding):
        return narrow_forward(x, w, b, relu, padding)
    lanes, columns = _conv_tile_shape(k)
    if out_hw[0] >= COLUMN_TILE[1] and columns_pay(c, k, out_hw[1]):
        return column_forward(x, w, b, relu, padding)
    if winograd_fits(x.shape, w, stride):
        winograd = winograd_conv(x, w, b, relu, padding, pool=False)
        if winograd is not None:
            y, _, path, executed = winograd
            note("conv2d_forward", path, executed)
            return y
    note("conv2d_forward", f"stride-1 tile {lanes} lanes x {columns} columns" + (", padded copy" * any(padding)),
         macs)
    if not any(padding):
        return _correlate(_input_channels_last(x), w_rsck, b, relu)
    # the tile needs Q >= its columns: the buffer gets the zero columns a narrow input lacks at once
    x_cl = padded_channels_last(x, padding, min_width=columns + s - 1)
    return _correlate(x_cl, w_rsck, b, relu, out_hw=out_hw)


def conv2d_backward(dy, x, w, need_dx, stride, padding):
    """dy[N,K,P,Q], x[N,C,H,W], w[K,C,R,S] -> (dx[N,C,H,W] (NCHW) or None, dw[K,C,R,S], db[K])."""
    return _conv_backward(dy, x, w, need_dx, stride, padding, None)


def _column_backward_fits(x, w, k, q, stride, padding):
    """Whether a convolution's backward (K outputs, Q columns) takes the column tiles: the same path with and
    without dx, so dw's bits do not depend on need_dx; not where narrow_input.py's kernels take the layer."""
    return (stride == 1 and not narrow_input_fits(x.shape, w.shape, stride, padding) and columns_pay(x.shape[1], k, q)
            and column_dx_fits(x.shape, w.shape, padding) and np.isfinite(w).all()
            and column_input_finite(x, w.shape, padding, q))


def _conv_backward(dy, x, w, need_dx, stride, padding, relu_y):
    """conv2d_backward of dy, or with relu_y (the forward's ReLU'd output) of relu_backward(dy, relu_y): the column
    tiles apply the select as they copy dy, the other paths run layers.relu_backward first (the same bits)."""
    n, k, p, q = dy.shape
    _, c, r, s = w.shape
    dw_macs = n * k * c * r * s * p * q
    if narrow_input_fits(x.shape, w.shape, stride, padding):  # dw over dy as it lies, dx the correlation's tile
        note("conv2d_backward", NARROW_GRAD_PATH + ", dx the correlation's tile" * need_dx,
             dw_macs + (n * c * x.shape[2] * x.shape[3] * k * r * s if need_dx else 0))
        dw, db = narrow_weight_grad(dy, relu_y, x, w, padding)
        if not need_dx:
            return None, dw, db
        dy = dy if relu_y is None else layers.relu_backward(dy, relu_y)
        dyt, _ = _channels_last(dy, s - 1, buffer_name="dy_cl")
        return _input_grad_packed(dyt, w, x.shape, padding), dw, db
    if _column_backward_fits(x, w, k, q, stride, padding):
        return column_backward(dy, x, w, need_dx, padding, relu_y)
    if relu_y is not None:
        dy = layers.relu_backward(dy, relu_y)
    if stride != 1:  # the phases' stride-1 layer where Winograd takes it
        return (polyphase_backward(dy, x, w, need_dx, stride, padding)
                or _strided_backward(dy, x, w, need_dx, stride, padding))
    # dx is the full correlation of the zero-bordered dy with the flipped kernel: a stride-1 convolution of dy
    # padded by R-1-top.. (a product for every tap at every input element), Winograd's where it fits
    dx_padding = (r - 1 - padding[0], r - 1 - padding[1], s - 1 - padding[2], s - 1 - padding[3])
    dx_winograd = None
    if need_dx and min(dx_padding) >= 0:
        w_flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        if winograd_fits(dy.shape, w_flipped, 1):
            dx_winograd = winograd_conv(dy, w_flipped, np.zeros(c, dy.dtype), False, dx_padding, pool=False)
    dx, dx_path, dx_executed = None, "dx the correlation's tile", n * c * x.shape[2] * x.shape[3] * k * r * s * need_dx
    if dx_winograd is not None:
        dx, _, dx_path, dx_executed = dx_winograd
        dx_path = "dx by " + dx_path
    winograd_grads = winograd_weight_grad(dy, x, padding, r) if winograd_grad_fits(w.shape, stride) else None
    if winograd_grads is not None:
        dw, db, dw_executed, dw_path = winograd_grads
        note("conv2d_backward", dw_path + f", {dx_path}" * need_dx, dw_executed + dx_executed)
        if need_dx and dx is None:
            dx = _input_grad_packed(_channels_last(dy, s - 1, buffer_name="dy_cl")[0], w, x.shape, padding)
        return dx, dw, db
    note("conv2d_backward", f"dw tiles of {TILE_TAPS} taps x {_grad_lanes(k)} lanes" + f", {dx_path}" * need_dx,
         dw_macs + dx_executed)
    # dy channels-last, its channels padded to the lanes; for dx also padded by S-1 zero columns on each side
    need_dx = need_dx and dx is None
    col_pad = s - 1 if need_dx else 0
    dyt, dy_sums = _channels_last(dy, col_pad, round_up(k, _grad_lanes(k)), buffer_name="dy_cl")
    packed = _conv_backward_packed(dyt, dy_sums, x if any(padding) else nchw(x), w, need_dx, padding)
    return packed if dx is None else (dx, packed[1], packed[2])


def maxpool2d_forward(x, size):
    """x[N,C,H,W] -> (y[N,C,H//kh,W//kw], argmax uint8 offset di*kw+dj of each window's first maximum)."""
    return _pooling.max_forward(x, size)


def maxpool2d_backward(dy, argmax, x_shape, size):
    """dy[N,C,H//kh,W//kw], argmax, x_shape (N,C,H,W) -> dx[N,C,H,W], dy routed to each window's winner."""
    return _pooling.max_backward(dy, argmax, x_shape, size)


def avgpool2d_forward(x, size):
    """x[N,C,H,W] -> y[N,C,H//kh,W//kw], each window's mean (summed in float64)."""
    return _pooling.average_forward(x, size)


def avgpool2d_backward(dy, x_shape, size):
    """dy[N,C,H//kh,W//kw], x_shape -> dx[N,C,H,W]: dy / (kh*kw) on each element of its window, 0 outside."""
    return _pooling.average_backward(dy, x_shape, size)


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """x[N,C,H,W] -> (y[N,C,H,W], mean[C], inv_std[C]): normalised by the batch statistics (training; the running
    ones updated in place, running = momentum * running + (1 - momentum) * batch, biased variance) or by the running
    statistics (inference). Statistics and the normalisation in float64, rounded once."""
    return _batchnorm.forward("batchnorm2d_forward", x, gamma, beta, running_mean, running_var, momentum, eps,
                              training, -np.inf)


def batchnorm2d_backward(dy, x, gamma, mean, inv_std):
    """dy, x [N,C,H,W] -> (dx[N,C,H,W], dgamma[C], dbeta[C]), the training-mode gradient (sums in float64)."""
    return _batchnorm.backward("batchnorm2d_backward", dy, None, x, gamma, mean, inv_std)


def batchnorm2d_relu_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """-> (relu(y), mean, inv_std) of batchnorm2d_forward, bitwise: the ReLU (`0 if v < 0 else v`, NaN kept) made
    as y is stored, so the normalised activation is written once and never read back."""
    return _batchnorm.forward("batchnorm2d_relu_forward", x, gamma, beta, running_mean, running_var, momentum, eps,
                              training, 0.0)


def batchnorm2d_relu_backward(dy, y, x, gamma, mean, inv_std):
    """dy, y (the fused forward's output), x [N,C,H,W] -> (dx, dgamma, dbeta) = batchnorm2d_backward(
    relu_backward(dy, y), x, gamma, mean, inv_std), the select `0 if y <= 0 else dy` made as the kernel reads dy."""
    return _batchnorm.backward("batchnorm2d_relu_backward", dy, y, x, gamma, mean, inv_std)


def _convolution_alone_pays(x_shape, w, padding, pool_lanes):
    """Whether the fused conv + pool forward runs conv2d_forward then maxpool2d_forward, not its tile of `pool_lanes`
    channels (summed over C innermost): few input channels (narrow_input.py's kernels; the column tile where K fills
    under its lanes or C <= 4) or 5x5 Winograd, none fused (docs/kernels.md, "When fusing does not pay")."""
    k, c, r, s = w.shape
    p, q = conv_output_size(x_shape[2], r, 1, *padding[:2]), conv_output_size(x_shape[3], s, 1, *padding[2:])
    return (narrow_input_fits(x_shape, w.shape, 1, padding) or (r == 5 and winograd_fits(x_shape, w, 1))
            or ((k < pool_lanes or c <= 4) and p >= COLUMN_TILE[1] and columns_pay(c, k, q)))


def conv2d_relu_maxpool2d_forward(x, w, b, padding=(0, 0, 0, 0)):
    """x[N,C,H,W], w[K,C,R,S], b[K] -> (y[N,K,P//2,Q//2], argmax uint8), P = H+top+bottom-R+1, Q = W+left+right-S+1
    with padding = (top, bottom, left, right) zeros: equal to maxpool2d_forward(conv2d_forward(x, w, b, relu=True,
    stride=1, padding)) without writing the conv output."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    top, bottom, left, right = padding
    p_half, q_half = (h + top + bottom - r + 1) // 2, (wd + left + right - s + 1) // 2
    macs = n * k * c * r * s * 4 * p_half * q_half  # the conv outputs pooling reads, no others
    if c == 1 and r == s == 3 and k % ONE_CHANNEL_LANES == 0 and p_half and q_half:  # channels in the lanes
        note("conv2d_relu_maxpool2d_forward", f"one-channel 3x3, {ONE_CHANNEL_LANES} channels per vector step", macs)
        y = reusable_output((n, p_half, q_half, k), x.dtype)  # channels last, as the next convolution reads it
        argmax = reusable_output(y.shape, np.uint8)
        xp = padded_nchw(x, padding)[:, 0] if any(padding) else x.reshape(n, h, wd)
        wt = aligned_copy(np.concatenate([w.reshape(k, 9).T, b.reshape(1, k)]).astype(x.dtype))  # the bias as row 9
        _one_channel_pool(xp, wt, x.dtype.type(0), y, argmax)
        return y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2)
    if c == 1 and 2 * q_half <= CONV1_TILE[0] and not any(padding):  # a tile along the columns (_make_conv1_pool)
        note("conv2d_relu_maxpool2d_forward", f"one-channel column tile {CONV1_TILE[0]} x {CONV1_TILE[1]}", macs)
        y = reusable_output((n, p_half, q_half, k), x.dtype)  # channels last, as the next convolution reads it
        argmax = reusable_output(y.shape, np.uint8)
        columns, channels = CONV1_TILE
        k_padded = round_up(k, channels)
        wt = aligned_zeros((k_padded, r, s), x.dtype)
        wt[:k] = w[:, 0]
        # the bias as the tile holds it: each channel's value repeated along the columns
        b_tiles = aligned_copy(np.repeat(np.pad(b.astype(x.dtype), (0, k_padded - k)), columns).reshape(
            k_padded // channels, -1))
        _conv1_pool(x.reshape(n, h, wd), wt, b_tiles, x.dtype.type(0), y, argmax)
        return y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2)
    if winograd_fits(x.shape, w, 1, pool=True) and p_half and q_half:
        winograd = winograd_conv(x, w, b, True, padding, pool=True)
        if winograd is not None:
            y, argmax, path, executed = winograd
            note("conv2d_relu_maxpool2d_forward", path, executed)
            return y, argmax
    narrow = k <= CONV_POOL_TILE_NARROW[0] < CONV_POOL_TILE[0]
    lanes, columns = CONV_POOL_TILE_NARROW if narrow else CONV_POOL_TILE
    if _convolution_alone_pays(x.shape, w, padding, lanes):
        note("conv2d_relu_maxpool2d_forward", "composed of conv2d_forward and maxpool2d_forward", 0)
        return maxpool2d_forward(conv2d_forward(x, w, b, True, 1, padding), (2, 2))
    y = reusable_output((n, k, p_half, q_half), x.dtype)
    argmax = reusable_output(y.shape, np.uint8)
    note("conv2d_relu_maxpool2d_forward", f"conv rows pooled from an L1 tile, {lanes} lanes x {columns} columns"
         + (", padded copy" * any(padding)), macs)
    wt, bp = _packed_weights(w.transpose(2, 3, 1, 0), b, lanes, x.dtype)
    q_tiles = max(2 * q_half, columns)  # narrower than a tile: zero columns, never pooled
    if any(padding):  # the zeros stored, as conv2d_forward does, so every product of the contract's sum is made
        x_cl = padded_channels_last(x, padding, min_width=q_tiles + s - 1)
    else:
        x_cl = pad_width(_input_channels_last(x), q_tiles + s - 1, axis=2)
    (_conv_pool_narrow if narrow else _conv_pool)(x_cl, wt, bp, x.dtype.type(0), q_tiles, y, argmax)
    return y, argmax


def conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, need_dx, padding=(0, 0, 0, 0)):
    """dy[N,K,P//2,Q//2] (gradient of the pooled output), y (the pooled output), argmax, x[N,C,H,W], w[K,C,R,S] ->
    (dx[N,C,H,W] or None, dw[K,C,R,S], db[K]): equal to conv2d_backward(maxpool2d_backward(relu_backward(dy, y),
    argmax, (N, K, P, Q)), x, w, need_dx, 1, padding): listed.py's `listed_backward` (rows of whole blocks) or
    `first_layer_weight_grad` (no dx), within rounding; else bitwise that composition (0 * inf gives NaN as there),
    on the column tiles with the pool's backward made as dy is copied into their border."""
    k, c, r, s = w.shape
    if (s * c) % LISTED_BLOCK == 0 and np.isfinite(w).all():
        listed = listed_backward(*(a.transpose(0, 2, 3, 1) for a in (dy, y, argmax)), _input_channels_last(x), w,
                                 need_dx, padding)
        if listed is not None:
            return listed
    if not need_dx and (first_layer := first_layer_weight_grad(dy, y, argmax, x, w, padding)) is not None:
        return (None, *first_layer)
    conv_shape = (x.shape[0], k, conv_output_size(x.shape[2], r, 1, *padding[:2]),
                  conv_output_size(x.shape[3], s, 1, *padding[2:]))
    if _column_backward_fits(x, w, k, conv_shape[3], 1, padding):  # the pool's backward folded into dy's copy
        return column_backward(dy, x, w, need_dx, padding, y, pooled="max", argmax=argmax)
    note("conv2d_relu_maxpool2d_backward", "composed of relu_backward, maxpool2d_backward and conv2d_backward", 0)
    dy_conv = maxpool2d_backward(layers.relu_backward(dy, y), argmax, conv_shape, (2, 2))
    return conv2d_backward(dy_conv, x, w, need_dx, 1, padding)


def conv2d_relu_backward(dy, y, x, w, need_dx, stride, padding):
    """conv2d_backward(relu_backward(dy, y), ...) in one op: y the ReLU'd output of conv2d_forward."""
    return _conv_backward(dy, x, w, need_dx, stride, padding, y)


def conv2d_relu_avgpool2d_backward(dy, y, x, w, need_dx, stride, padding, size=(2, 2)):
    """conv2d_relu_backward(avgpool2d_backward(dy, y.shape, size), y, ...) in one op, dy the gradient of the average
    pool (2x2 or global) of conv2d_forward's ReLU'd y: the column tiles spread a 2x2 pool's dy as they copy it into
    their border, a global pool of a channels-last y is spread through the select in one pass; else the composition."""
    if tuple(size) == (2, 2) and _column_backward_fits(x, w, y.shape[1], y.shape[3], stride, padding):
        return column_backward(dy, x, w, need_dx, padding, y, pooled="average")
    spread = _pooling.average_relu_backward(dy, y, size)
    if spread is not None:
        return _conv_backward(spread, x, w, need_dx, stride, padding, None)
    return _conv_backward(avgpool2d_backward(dy, y.shape, size), x, w, need_dx, stride, padding, y)


def batchnorm2d_relu_maxpool2d_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """-> (y, argmax, mean, inv_std): batchnorm2d_relu_forward then 2x2 maxpool2d_forward, bitwise (kernels README)."""
    return _batchnorm.forward("batchnorm2d_relu_maxpool2d_forward", x, gamma, beta, running_mean, running_var,
                              momentum, eps, training, 0.0, pool=True)


def batchnorm2d_relu_maxpool2d_backward(dy, y, argmax, x, gamma, mean, inv_std):
    """Backward of batchnorm2d_relu_maxpool2d_forward (kernels README); dy, y, argmax the pool's."""
    return _batchnorm.backward("batchnorm2d_relu_maxpool2d_backward", dy, y, x, gamma, mean, inv_std, argmax)


def precompile(network=None):
    """On a cold disk cache, compile the float32 kernels of `network`'s training step (the default network's when
    None), half in this process and half in a second one at once (jit/cold_compile.py); -> True if it did, False if
    the cache was warm for it or not shareable."""
    if network is None:
        from numba_cnn.model import default_network

        network = default_network()
    return compile_cold_cache(network)
