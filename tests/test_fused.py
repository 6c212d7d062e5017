"""The jit backend's fused ops (kernels README: optional beyond the contract, named in the backend's INFO.fused):
conv2d_relu_maxpool2d_forward / _backward against the contract ops they replace, composed (the forward bitwise: the
same tiles and summation order; the backward within float32 rounding with finite operands, where it runs over the
list of nonzero gradients, and bitwise otherwise), against the float64 oracle (numba_cnn/kernels/reference.py,
within its tolerance; argmax exactly) and, in float64, against finite differences. Inputs reach the module's
functions as the registry would hand them over: C-contiguous (np.ascontiguousarray of a sliced view) or, the jit
backend taking them as they are (INFO.channels_last), stored channels-last; outputs come back dense in either layout
(conv1's pooled output channels-last, for the next convolution)."""

import numpy as np
import pytest
from numba_cnn.kernels import reference
from gradcheck import assert_gradient_matches, dotted_with

from numba_cnn.kernels import get_backend
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.layers import relu_backward
from numba_cnn.kernels.jit.paths import PathLog

jit = get_backend("jit").module
DTYPES = [np.float32, np.float64]

# x (N, C, H, W), w (K, C, R, S): batch 1 and one channel, odd P and Q (a dropped last row/column), K off the lanes
# (5, 33, 70), outputs narrower than a column tile, a non-square kernel, the model's two layers.
NO_PADDING = (0, 0, 0, 0)
SHAPES = [
    pytest.param((1, 1, 6, 6), (2, 1, 3, 3), NO_PADDING, id="batch1_one_channel"),
    pytest.param((2, 3, 9, 8), (5, 3, 3, 3), NO_PADDING, id="odd_p_k5"),
    pytest.param((2, 2, 8, 9), (33, 2, 3, 3), NO_PADDING, id="odd_q_k33"),
    pytest.param((1, 4, 7, 7), (70, 4, 2, 2), NO_PADDING, id="odd_p_q_k70"),
    pytest.param((2, 2, 4, 5), (3, 2, 3, 3), NO_PADDING, id="narrow_one_window"),
    pytest.param((2, 3, 9, 12), (6, 3, 2, 3), NO_PADDING, id="kernel_2x3"),
    pytest.param((3, 1, 28, 28), (32, 1, 3, 3), NO_PADDING, id="conv1_mnist"),
    pytest.param((2, 32, 13, 13), (64, 32, 3, 3), NO_PADDING, id="conv2_mnist"),
    # one input channel, 3x3, output channels in the lanes: two and more vector steps, 'same' on odd sizes
    pytest.param((2, 1, 11, 9), (64, 1, 3, 3), (1, 1, 1, 1), id="one_channel_same_k64"),
    # zero padding ('same' and uneven), the input gradient cropped out of the padded one
    pytest.param((2, 3, 8, 8), (32, 3, 3, 3), (1, 1, 1, 1), id="same_3x3_c3"),
    pytest.param((1, 1, 7, 9), (6, 1, 5, 5), (2, 2, 2, 2), id="same_5x5_one_channel"),
    pytest.param((2, 5, 6, 7), (9, 5, 2, 2), (0, 1, 0, 1), id="same_2x2_uneven"),
    pytest.param((2, 32, 9, 9), (64, 32, 3, 3), (1, 1, 1, 1), id="same_vgg_block"),
    # kernel rows of a block of the lists and a remainder (the fused op composes; the lists on their own:
    # test_the_listed_kernels_take_any_kernel_row), two whole blocks
    pytest.param((2, 40, 7, 8), (6, 40, 3, 3), NO_PADDING, id="row_tile_and_remainder"),
    pytest.param((1, 64, 6, 6), (8, 64, 3, 3), (1, 1, 1, 1), id="two_row_tiles"),
    # input rows so long that the listed weight gradient's L1 band holds one pooled row: several bands per image;
    # 5 kernel rows of 160 values (composed; the lists on their own: test_the_listed_kernels_take_any_kernel_row)
    pytest.param((2, 64, 12, 40), (8, 64, 3, 3), (1, 1, 1, 1), id="several_bands"),
    pytest.param((1, 32, 9, 9), (4, 32, 5, 5), (2, 2, 2, 2), id="kernel_rows_past_the_row_group"),
    # dw straight from the pooled gradient (no dx, 3x3): 18 taps in two tiles of 9, a dropped odd row
    pytest.param((2, 2, 9, 8), (16, 2, 3, 3), (1, 1, 1, 1), id="pooled_dw_two_tap_blocks"),
]


def _operands(rng, x_shape, w_shape, dtype, fill="normal", layout="contiguous"):
    k = w_shape[0]
    if fill == "ties":  # small integers, zero bias: exact sums, many zeros after ReLU, many tied windows
        x = rng.integers(-1, 2, x_shape).astype(dtype)
        w = rng.integers(-1, 2, w_shape).astype(dtype)
        b = np.zeros(k, dtype)
    else:
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        b = rng.standard_normal(k).astype(dtype)
    if layout == "sliced":  # every other element of a larger array, then made contiguous as the registry does
        big = np.zeros(x_shape[:2] + (2 * x_shape[2], 2 * x_shape[3]), dtype)
        big[:, :, ::2, 1::2] = x
        x = np.ascontiguousarray(big[:, :, ::2, 1::2])
    elif layout == "channels_last":  # x stored NHWC, viewed NCHW, as the registry passes it to jit
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        w = np.ascontiguousarray(np.ascontiguousarray(w.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0))
    return x, w, b


def _dense(a):
    return a.flags.c_contiguous or is_channels_last(a)


def _composed_forward(x, w, b, padding=NO_PADDING):
    y = jit.conv2d_forward(x, w, b, True, 1, padding)
    return y, jit.maxpool2d_forward(y, (2, 2))


def _composed_backward(dy, pooled, argmax, conv_shape, x, w, need_dx, padding=NO_PADDING):
    # the ReLU's derivative as the model takes it: a select (layers.relu_backward), which keeps dy where pooled is NaN
    return jit.conv2d_backward(jit.maxpool2d_backward(relu_backward(dy, pooled), argmax, conv_shape, (2, 2)), x, w,
                               need_dx, 1, padding)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill,layout", [("normal", "contiguous"), ("ties", "contiguous"), ("normal", "sliced"),
                                         ("ties", "channels_last")])
@pytest.mark.parametrize("x_shape,w_shape,padding", SHAPES)
def test_fused_ops_equal_the_composed_ops_and_the_oracle(x_shape, w_shape, padding, fill, layout, dtype, rng):
    x, w, b = _operands(rng, x_shape, w_shape, dtype, fill, layout)
    with PathLog() as log:
        y_fused, arg_fused = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    conv, (y_comp, arg_comp) = _composed_forward(x, w, b, padding)
    assert y_fused.dtype == dtype and arg_fused.dtype == np.uint8 and _dense(y_fused) and _dense(arg_fused)
    assert y_fused.shape == arg_fused.shape == y_comp.shape
    np.testing.assert_array_equal(y_fused, y_comp)
    np.testing.assert_array_equal(arg_fused, arg_comp)
    conv_ref = reference.conv2d_forward(x, w, b, True, 1, padding)
    y_ref, arg_ref = reference.maxpool2d_forward(conv_ref, (2, 2))
    reference.assert_close(y_fused, y_ref, dtype, "pooled")
    if fill == "ties":  # exact integer sums: the oracle pools the very same values, ties included
        if "F(4x4, 3x3)" in log.paths[0]:
            # but not through F(4x4, 3x3), whose G has sixths and 24ths: where a window's largest value leads the
            # next by a whole unit, rounding cannot reorder them
            n, k, p, q = conv.shape
            windows = np.sort(conv_ref[:, :, :p // 2 * 2, :q // 2 * 2].reshape(n, k, p // 2, 2, q // 2, 2)
                              .transpose(0, 1, 2, 4, 3, 5).reshape(n, k, p // 2, q // 2, 4), axis=-1)
            lead = windows[..., 3] - windows[..., 2] >= 1
            assert lead.mean() > 0.5
            np.testing.assert_array_equal(arg_fused[lead], arg_ref[lead])
        else:
            np.testing.assert_array_equal(arg_fused, arg_ref)
        assert conv.size < 500 or (y_fused == 0).mean() > 0.05  # the big cases hold windows of tied zeros

    dy = rng.standard_normal(y_fused.shape).astype(dtype)
    if layout == "channels_last":
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for need_dx in (True, False):
        fused = jit.conv2d_relu_maxpool2d_backward(dy, y_fused, arg_fused, x, w, need_dx, padding)
        composed = _composed_backward(dy, y_comp, arg_comp, conv.shape, x, w, need_dx, padding)
        oracle = reference.conv2d_backward(
            reference.maxpool2d_backward(relu_backward(dy, y_fused), arg_fused, conv.shape, (2, 2)), x, w, need_dx, 1,
            padding)
        for name, got, same, want in zip(("dx", "dw", "db"), fused, composed, oracle):
            if not need_dx and name == "dx":
                assert got is None and same is None
                continue
            assert got.dtype == dtype and _dense(got)
            reference.assert_close(got, same, dtype, name)
            reference.assert_close(got, want, dtype, name)


@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((3, 1, 28, 28), (32, 1, 3, 3), NO_PADDING),
    ((2, 2, 9, 8), (16, 2, 3, 3), (1, 1, 1, 1)),
    ((2, 2, 12, 13), (32, 2, 3, 3), NO_PADDING)],
    ids=["conv1_mnist", "two_channels_same", "two_channels_odd_width"])
def test_first_layer_takes_the_pooled_weight_gradient(x_shape, w_shape, padding, rng):
    """Without dx, a 3x3 kernel whose rows are not whole blocks of the lists, finite x and w take dw straight from
    the pooled gradient, within float32 rounding of the float64 oracle; an inf in x takes the composition, bit for
    bit."""
    x, w, b = _operands(rng, x_shape, w_shape, np.float32)
    y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    with PathLog() as log:
        _, dw, db = jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, False, padding)
    assert len(log.paths) == 1 and "dw from the pooled gradient, 3x3 taps" in log.paths[0], log.paths
    conv_shape = reference.conv2d_forward(x, w, b, True, 1, padding).shape
    _, dw_ref, db_ref = reference.conv2d_backward(
        reference.maxpool2d_backward(relu_backward(dy, y), argmax, conv_shape, (2, 2)), x, w, False, 1, padding)
    reference.assert_close(dw, dw_ref, np.float32, "dw")
    reference.assert_close(db, db_ref, np.float32, "db")
    x[0, 0, 1, 1] = np.inf
    y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    with PathLog() as log:
        fused = jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, False, padding)
    assert not any("pooled gradient" in path or "listed" in path for path in log.paths), log.paths
    composed = _composed_backward(dy, y, argmax, conv_shape, x, w, False, padding)
    for got, same in zip(fused[1:], composed[1:]):
        np.testing.assert_array_equal(got, same)


# first layers whose C x R kernel rows fill a tile of at least 8 vectors: 5x5 over 3 channels (the tutorial's, two
# groups of rows), 3x3 'same' with K off the lanes and odd P and Q, 11x11 rows of two vectors in groups with a row
# past the last, 17x17 rows of three vectors (AVX2; two on AVX-512)
ROWS_CASES = [
    pytest.param((2, 3, 32, 32), (6, 3, 5, 5), NO_PADDING, id="torch_tutorial_conv1"),
    pytest.param((3, 3, 9, 11), (5, 3, 3, 3), (1, 1, 1, 1), id="same_3x3_odd"),
    pytest.param((2, 3, 16, 15), (4, 3, 11, 11), (5, 5, 5, 5), id="rows_of_two_vectors"),
    pytest.param((1, 1, 21, 22), (3, 1, 17, 17), (0, 1, 2, 0), id="rows_of_three_vectors")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,padding", ROWS_CASES)
def test_first_layer_takes_the_pooled_gradient_rows(x_shape, w_shape, padding, dtype, rng):
    """Without dx, kernel rows that fill a tile of 8 vectors take dw from each window's winner only: within
    rounding of the float64 oracle, dy in either layout, the same bits on 1 and 2 threads; an inf in x takes the
    composition, bit for bit (its 0 * inf products give NaN that the winners' sum would skip)."""
    import numba

    x, w, b = _operands(rng, x_shape, w_shape, dtype)
    y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    dy = rng.standard_normal(y.shape).astype(dtype) * (rng.random(y.shape) < 0.7)
    conv_shape = reference.conv2d_forward(x, w, b, True, 1, padding).shape
    _, dw_ref, db_ref = reference.conv2d_backward(
        reference.maxpool2d_backward(relu_backward(dy, y), argmax, conv_shape, (2, 2)), x, w, False, 1, padding)
    before = numba.get_num_threads()
    results = []
    try:
        for threads, gradient in ((1, dy), (2, dy), (2, np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(
                0, 3, 1, 2))):
            numba.set_num_threads(threads)
            with PathLog() as log:
                dx, dw, db = jit.conv2d_relu_maxpool2d_backward(gradient, y, argmax, x, w, False, padding)
            assert dx is None and len(log.paths) == 1 and "each window's winner only" in log.paths[0], log.paths
            results.append((dw.copy(), db.copy()))
    finally:
        numba.set_num_threads(before)
    for dw, db in results[1:]:
        np.testing.assert_array_equal(dw, results[0][0])
        np.testing.assert_array_equal(db, results[0][1])
    reference.assert_close(results[0][0], dw_ref, dtype, "dw")
    reference.assert_close(results[0][1], db_ref, dtype, "db")
    x[-1, -1, -1, 0] = np.inf
    y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    with PathLog() as log:
        fused = jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, False, padding)
    assert not any("pooled gradient" in path for path in log.paths), log.paths
    composed = _composed_backward(dy, y, argmax, conv_shape, x, w, False, padding)
    for got, same in zip(fused[1:], composed[1:]):
        np.testing.assert_array_equal(got, same)


# (x, w, padding, need_dx, the fused forward's tile or the composition, the backward's path): the paths timed
# faster on first and second layers of small networks (docs/kernels.md, "When fusing does not pay")
ROUTED = "the 2x2 max-pool's gradient routed in dy's copy"
# 16 filters fill the fused tile's lanes on AVX2 (16) and half of them on AVX-512 (32), where the forward composes
K16_FORWARD = "pooled from an L1 tile" if jit.CONV_POOL_TILE_NARROW[0] <= 16 else "conv2d_forward: column tile"
PATH_CASES = [
    pytest.param((2, 3, 32, 32), (6, 3, 5, 5), NO_PADDING, False, "conv2d_forward: column tile",
                 "each window's winner only", id="torch_tutorial_conv1"),
    pytest.param((2, 6, 14, 14), (16, 6, 5, 5), NO_PADDING, True, K16_FORWARD, ROUTED, id="torch_tutorial_conv2"),
    pytest.param((2, 3, 16, 16), (32, 3, 3, 3), (1, 1, 1, 1), False, "conv2d_forward: few input channels",
                 "dw from the pooled gradient", id="c3_k32_first_layer"),
    pytest.param((2, 3, 16, 16), (16, 3, 3, 3), (1, 1, 1, 1), False, "conv2d_forward: column tile",
                 "dw from the pooled gradient", id="c3_k16_first_layer"),
    pytest.param((2, 1, 28, 28), (16, 1, 5, 5), NO_PADDING, False, "one-channel column tile", ROUTED,
                 id="one_channel_5x5"),
    pytest.param((2, 5, 11, 13), (7, 5, 3, 3), (1, 1, 1, 1), True, "conv2d_forward: column tile", ROUTED,
                 id="odd_rows_and_columns"),
    pytest.param((2, 16, 14, 14), (32, 16, 5, 5), (2, 2, 2, 2), True, "conv2d_forward: Winograd F",
                 "composed of relu_backward", id="winograd_5x5"),
    pytest.param((2, 32, 13, 13), (64, 32, 3, 3), NO_PADDING, True, "Winograd F", "listed", id="conv2_mnist"),
    pytest.param((2, 16, 12, 12), (32, 16, 3, 3), (1, 1, 1, 1), True, "Winograd F", "composed of relu_backward",
                 id="c16_3x3")]

@pytest.mark.parametrize("x_shape,w_shape,padding,need_dx,forward_path,backward_path", PATH_CASES)
def test_the_fused_ops_compose_where_the_convolution_alone_is_faster(x_shape, w_shape, padding, need_dx,
                                                                    forward_path, backward_path, rng):
    """The forward runs conv2d_forward then the pool where the convolution alone takes a kernel made for its shape
    (few input channels, 5x5 Winograd), and the backward takes the lists only where a kernel row (S x C values) is
    a whole number of their blocks, dw from the pooled gradient for a first 3x3 layer, else the composition: the
    paths named, the composed ones' results bit for bit the composition's."""
    x, w, b = _operands(rng, x_shape, w_shape, np.float32)
    with PathLog() as log:
        y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    assert any(forward_path in path for path in log.paths), log.paths
    conv, (y_comp, arg_comp) = _composed_forward(x, w, b, padding)
    np.testing.assert_array_equal(y, y_comp)
    np.testing.assert_array_equal(argmax, arg_comp)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    with PathLog() as log:
        fused = jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, need_dx, padding)
    assert any(backward_path in path for path in log.paths), log.paths
    if backward_path in (ROUTED, "composed of relu_backward"):
        # bit for bit the composition, NaN and inf in the pooled gradient too (where the ReLU was on and off)
        dy.reshape(-1)[np.flatnonzero(y > 0)[:2]] = [np.nan, np.inf]
        dy.reshape(-1)[np.flatnonzero(y <= 0)[:1]] = np.nan
        for gradient in (dy, np.nan_to_num(dy)):
            fused = jit.conv2d_relu_maxpool2d_backward(gradient, y, argmax, x, w, need_dx, padding)
            composed = _composed_backward(gradient, y_comp, arg_comp, conv.shape, x, w, need_dx, padding)
            for got, same in zip(fused, composed):
                if got is None:
                    assert same is None
                else:
                    np.testing.assert_array_equal(got, same)


@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((2, 40, 7, 8), (6, 40, 3, 3), NO_PADDING),
    ((1, 32, 9, 9), (4, 32, 5, 5), (2, 2, 2, 2)),
    ((2, 3, 9, 8), (5, 3, 3, 3), NO_PADDING),
    ((1, 1, 7, 9), (6, 1, 5, 5), (2, 2, 2, 2))],
    ids=["row_tile_and_remainder", "kernel_rows_past_the_row_group", "rows_shorter_than_a_block", "one_channel"])
@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_listed_kernels_take_any_kernel_row(x_shape, w_shape, padding, need_dx, dtype, rng):
    """listed.py's `listed_backward` called on its own with kernel rows that are not whole blocks of its register
    tiles (the fused op takes the composition there, which was faster): the remainders and the rows shorter than a
    block, within rounding of the float64 oracle."""
    from numba_cnn.kernels.jit.listed import listed_backward

    x, w, b = _operands(rng, x_shape, w_shape, dtype)
    y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    dy = rng.standard_normal(y.shape).astype(dtype) * (rng.random(y.shape) < 0.5)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = listed_backward(*(a.transpose(0, 2, 3, 1) for a in (dy, y, argmax)), x_cl, w, need_dx, padding)
    conv_shape = reference.conv2d_forward(x, w, b, True, 1, padding).shape
    oracle = reference.conv2d_backward(
        reference.maxpool2d_backward(relu_backward(dy, y), argmax, conv_shape, (2, 2)), x, w, need_dx, 1, padding)
    for name, g, e in zip(("dx", "dw", "db"), got, oracle):
        if not need_dx and name == "dx":
            assert g is None
            continue
        reference.assert_close(g, e, dtype, name)


@pytest.mark.parametrize("padding", [NO_PADDING, (1, 1, 1, 1)], ids=["valid", "same"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ops_with_nan_and_inf(dtype, padding, rng):
    """NaN and inf flow through the fused ops as through the composed ones: ReLU keeps NaN, a window holding a NaN
    pools to NaN at its first NaN, infinities compare as numbers; the oracle (np.argmax: first NaN) agrees."""
    x, w, b = _operands(rng, (2, 3, 12, 11), (5, 3, 3, 3), dtype)
    x[0, 1, 2, 3] = np.nan
    x[1, 0, 7, 7] = np.inf
    x[1, 2, 0, 0] = -np.inf
    y_fused, arg_fused = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    conv, (y_comp, arg_comp) = _composed_forward(x, w, b, padding)
    assert np.isnan(y_fused).any() and np.isinf(y_fused).any()
    np.testing.assert_array_equal(y_fused, y_comp)  # NaN where NaN
    np.testing.assert_array_equal(arg_fused, arg_comp)
    y_ref, arg_ref = reference.maxpool2d_forward(reference.conv2d_forward(x, w, b, True, 1, padding), (2, 2))
    np.testing.assert_array_equal(np.isnan(y_fused), np.isnan(y_ref))
    nan_windows = np.isnan(y_ref)
    np.testing.assert_array_equal(arg_fused[nan_windows], arg_ref[nan_windows])
    dy = rng.standard_normal(y_fused.shape).astype(dtype)
    fused = jit.conv2d_relu_maxpool2d_backward(dy, y_fused, arg_fused, x, w, True, padding)
    composed = _composed_backward(dy, y_comp, arg_comp, conv.shape, x, w, True, padding)
    for got, same in zip(fused, composed):
        np.testing.assert_array_equal(got, same)


def test_exact_quotient_constants_divide_every_multiple_exactly():
    """The listed input gradient finds an offset's pixel as ((offset >> shift) * inverse) mod 2**64: exactly
    offset // channels for every multiple of channels, odd, even and powers of two alike, up to 2**62."""
    from numba_cnn.kernels.jit.listed import exact_quotient_constants

    rng = np.random.default_rng(3)
    for divisor in [*range(1, 130), 384, 1000, 3 << 20, (1 << 31) - 1]:
        shift, inverse = exact_quotient_constants(divisor)
        quotients = np.concatenate([np.arange(0, 300), rng.integers(0, (1 << 62) // divisor, 300)]).astype(np.uint64)
        with np.errstate(over="ignore"):  # the product wraps modulo 2**64 by design
            got = ((quotients * np.uint64(divisor)) >> shift) * inverse
        np.testing.assert_array_equal(got, quotients)


@pytest.mark.parametrize("chunks, k, c, r, s", [(8, 64, 32, 3, 3), (1, 5, 3, 5, 5), (3, 7, 20, 3, 2)],
                         ids=["mnist_conv2", "one_chunk", "odd_shape"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_listed_chunks_add_in_order_into_the_weight_layout(chunks, k, c, r, s, dtype, rng):
    """_sum_listed_chunks: the listed weight gradient's per-chunk rows (K, R, S x C padded with garbage) added in
    chunk order, bit for bit as one adds them in turn, and laid out as dw[K, C, R, S]; the padding never read."""
    from numba_cnn.kernels.jit.pooled_grad import _sum_listed_chunks

    partial = rng.standard_normal((chunks, k, r, s * c + 13)).astype(dtype)
    partial[..., s * c:] = np.nan  # the padding past S x C
    expected = partial[0, ..., :s * c].copy()
    for chunk in range(1, chunks):
        expected += partial[chunk, ..., :s * c]
    dw = np.empty((k, c, r, s), dtype)
    _sum_listed_chunks(partial, s, c, dw)
    np.testing.assert_array_equal(dw, expected.reshape(k, r, s, c).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("row", [0, 6, 12], ids=["first_row", "middle_row", "row_no_window_reaches"])
def test_a_non_finite_input_anywhere_sends_the_backward_to_the_dense_path(row, rng):
    """The listed backward finds x's NaN or inf as its weight gradient copies x's rows (and reads the rows no
    pooling window reaches, below the dropped last conv row, on their own): with one anywhere, the composition's
    0 * inf gives NaN that the lists would skip, so the dense path runs and the result is the composition's, bit
    for bit; finite, the listed path runs."""
    x, w, b = _operands(rng, (2, 32, 13, 11), (8, 32, 3, 3), np.float32)
    y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    conv_shape = (2, 8, 11, 9)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    with PathLog() as log:
        jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, True)
    assert "listed" in log.paths[0], log.paths
    x[1, 5, row, 4] = np.inf
    with PathLog() as log:
        fused = jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, True)
    assert "listed" not in log.paths[-1], log.paths
    composed = _composed_backward(dy, y, argmax, conv_shape, x, w, True)
    assert np.isnan(fused[1]).any()  # dw: 0 * inf
    for got, same in zip(fused, composed):
        np.testing.assert_array_equal(got, same)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape", [((2, 32, 13, 13), (64, 32, 3, 3)), ((2, 32, 9, 8), (5, 32, 3, 3))])
def test_listed_backward_carries_nan_and_inf_gradients(x_shape, w_shape, dtype, rng):
    """Finite x and w take the listed backward; a NaN or inf in the pooled gradient reaches dx, dw and db where the
    oracle's composition puts it (non-finite elements equal exactly), zeros (as dropout leaves) are skipped."""
    x, w, b = _operands(rng, x_shape, w_shape, dtype)
    y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    dy = rng.standard_normal(y.shape).astype(dtype) * (rng.random(y.shape) < 0.5)
    live = np.flatnonzero(y > 0)
    dy.reshape(-1)[live[:2]] = [np.nan, np.inf]
    dy.reshape(-1)[np.flatnonzero(y <= 0)[:1]] = -np.inf  # where the ReLU was off: no effect at all
    conv_shape = (x.shape[0], w.shape[0], x.shape[2] - w.shape[2] + 1, x.shape[3] - w.shape[3] + 1)
    oracle = reference.conv2d_backward(
        reference.maxpool2d_backward(relu_backward(dy, y), argmax, conv_shape, (2, 2)), x, w, True, 1, (0, 0, 0, 0))
    got = jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, True)
    for name, g, e in zip(("dx", "dw", "db"), got, oracle):
        assert np.isnan(g).any() and np.isnan(e).any()
        reference.assert_close(g, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_nan_first_ties_first_and_relu_keeps_nan(dtype):
    nan, inf = np.nan, np.inf
    windows = [  # row-major 2x2 windows -> (max, argmax)
        ([1, nan, nan, 5], (nan, 1)), ([nan, 2, 3, nan], (nan, 0)), ([2, 3, 3, nan], (nan, 3)),
        ([1, 1, inf, inf], (inf, 2)), ([-inf] * 4, (-inf, 0)), ([0, 0, 0, 0], (0, 0)), ([-1, 4, 4, 2], (4, 1)),
        ([-inf, -5, nan, inf], (nan, 2)),
    ]
    x = np.array([[v[:2], v[2:]] for v, _ in windows], dtype)[None]  # (1, windows, 2, 2)
    y, argmax = jit.maxpool2d_forward(x, (2, 2))
    want_y = np.array([m for _, (m, _) in windows], dtype)
    np.testing.assert_array_equal(y.reshape(-1), want_y)
    assert argmax.reshape(-1).tolist() == [a for _, (_, a) in windows]
    # the fused op pools the same windows after ReLU (which keeps NaN and clamps negatives to 0): a 1x1 identity
    # kernel, one window at a time (a channel-mixing kernel would spread a NaN through 0 * NaN)
    one, zero = np.ones((1, 1, 1, 1), dtype), np.zeros(1, dtype)
    for values, _ in windows:
        window = np.array(values, dtype).reshape(1, 1, 2, 2)
        y_fused, arg_fused = jit.conv2d_relu_maxpool2d_forward(window, one, zero)
        relu = jit.conv2d_forward(window, one, zero, True, 1, (0, 0, 0, 0))
        np.testing.assert_array_equal(relu, np.maximum(window, 0))  # NaN stays NaN, as np.maximum / torch.relu
        y_relu, arg_relu = jit.maxpool2d_forward(relu, (2, 2))
        y_ref, arg_ref = reference.maxpool2d_forward(np.maximum(window, 0), (2, 2))
        np.testing.assert_array_equal(y_fused, y_relu)
        np.testing.assert_array_equal(arg_fused, arg_relu)
        np.testing.assert_array_equal(y_fused, y_ref)
        np.testing.assert_array_equal(arg_fused, arg_ref)


@pytest.mark.parametrize("wrt", ["x", "w", "b"])
@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((2, 2, 7, 6), (3, 2, 3, 2), NO_PADDING), ((1, 1, 5, 5), (2, 1, 2, 2), NO_PADDING),
    ((1, 32, 5, 5), (2, 32, 3, 3), NO_PADDING), ((2, 3, 5, 6), (4, 3, 3, 3), (1, 1, 1, 1)),
    ((1, 2, 5, 4), (3, 2, 2, 3), (0, 1, 1, 1))], ids=["odd_3x2_kernel", "one_channel", "listed_register_tile",
                                                    "same_3x3", "uneven_padding"])
def test_fused_backward_matches_finite_differences(x_shape, w_shape, padding, wrt, rng):
    inputs = dict(zip("xwb", _operands(rng, x_shape, w_shape, np.float64)))
    y, argmax = jit.conv2d_relu_maxpool2d_forward(inputs["x"], inputs["w"], inputs["b"], padding)
    dy = rng.standard_normal(y.shape)

    def forward(a):
        args = dict(inputs, **{wrt: a})
        return jit.conv2d_relu_maxpool2d_forward(args["x"], args["w"], args["b"], padding)[0]

    dx, dw, db = jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, inputs["x"], inputs["w"], True, padding)
    analytic = {"x": dx, "w": dw, "b": db}[wrt]
    assert_gradient_matches(analytic, dotted_with(forward, dy), inputs[wrt].copy(), what=f"fused d{wrt}")
    if wrt != "x":  # without dx: a first layer's paths (the 3x3 taps, the winners' rows where a tile fills)
        _, dw, db = jit.conv2d_relu_maxpool2d_backward(dy, y, argmax, inputs["x"], inputs["w"], False, padding)
        assert_gradient_matches({"w": dw, "b": db}[wrt], dotted_with(forward, dy), inputs[wrt].copy(),
                                what=f"fused d{wrt} without dx")
