"""The jit backend's convolution with few input channels and many filters (jit/narrow_input.py: the output channels
in the lanes, the output channels-last, dw over dy as it lies): the forward bitwise the column tiles' and the
channels-last tiles' (the same sums in the same order), the backward against the float64 oracle and central
differences, its dw and db the same bits with and without dx and for dy in either layout, the ReLU's select fused
bitwise, NaN and inf carried as the oracle carries them, and the same bits on one and two threads."""

import numpy as np
import pytest
from gradcheck import assert_conv_backward_matches
from numba_cnn.kernels import reference
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.layers import relu_backward

numba = pytest.importorskip("numba")
jit = pytest.importorskip("numba_cnn.kernels.jit")
from numba_cnn.kernels.jit import narrow_input  # noqa: E402
from numba_cnn.kernels.jit.paths import PathLog  # noqa: E402

LANES = narrow_input.NARROW_LANES
COLUMNS = narrow_input.NARROW_FORWARD_TILE[1]

# (N, C, H, W), K, (R, S), padding: VGG's first layer, 1 input channel with a 3x9 kernel row, the most channels,
# 5x5 with uneven padding, output rows exactly one tile wide and one column more (the last tile overlaps), kernel
# rows of S x C not a multiple of the 9-tap gradient tile (10, 12, 16, 40 values), two lane blocks
SHAPES = [
    ((3, 3, 12, 11), 32, (3, 3), (1, 1, 1, 1)),
    ((2, 1, 7, 14), LANES, (3, 9), (1, 0, 2, 1)),
    ((2, 8, 6, COLUMNS + 4), 2 * LANES, (3, 5), (0, 0, 0, 0)),
    ((2, 2, 9, COLUMNS + 1), LANES, (5, 5), (2, 1, 2, 2)),
    ((3, 4, 5, COLUMNS + 2), LANES, (1, 3), (0, 1, 0, 0)),
    ((2, 5, 8, 10), 2 * LANES, (2, 2), (1, 0, 1, 0)),
]


def _operands(rng, shape, k, kernel, padding, dtype):
    n, c, h, wd = shape
    top, bottom, left, right = padding
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((k, c) + kernel) * 0.3).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    dy = rng.standard_normal((n, k, h + top + bottom - kernel[0] + 1, wd + left + right - kernel[1] + 1)).astype(dtype)
    return x, w, b, dy


def _channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shape,k,kernel,padding", SHAPES)
def test_forward_is_the_other_tiles_bitwise_and_the_oracle(shape, k, kernel, padding, monkeypatch):
    """With and without ReLU, x holding a NaN and an inf: the output is channels-last, matches the oracle, and is
    bitwise what the column tiles or the channels-last tiles give the same layer (each output summed from the bias,
    taps in (r, s, c) order)."""
    x, w, b, _ = _operands(np.random.default_rng(3), shape, k, kernel, padding, np.float32)
    x[0, 0, 1, 2], x[-1, -1, -1, 0] = np.nan, np.inf
    assert narrow_input.narrow_input_fits(x.shape, w.shape, 1, padding)
    for relu in (False, True):
        with PathLog() as log:
            y = jit.conv2d_forward(x, w, b, relu, 1, padding)
        assert log.paths == [f"conv2d_forward: {narrow_input.NARROW_FORWARD_PATH}"]
        assert is_channels_last(y)
        with np.errstate(invalid="ignore"):
            want = reference.conv2d_forward(x, w, b, relu, 1, padding)
        finite = np.isfinite(want)
        assert np.array_equal(np.isnan(y), np.isnan(want)) and np.array_equal(np.isinf(y), np.isinf(want))
        reference.assert_close(np.where(finite, y, 0), np.where(finite, want, 0), np.float32, "y")
        with monkeypatch.context() as patch:
            patch.setattr(jit, "narrow_input_fits", lambda *args: False)
            for columns_pay in (True, False):
                patch.setattr(jit, "columns_pay", lambda *args, pay=columns_pay: pay)
                other = jit.conv2d_forward(x, w, b, relu, 1, padding)
                assert np.array_equal(y, other, equal_nan=True), f"relu={relu} columns={columns_pay}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,kernel,padding", SHAPES)
def test_backward_against_the_oracle(shape, k, kernel, padding, dtype):
    """dx, dw and db with and without the fused ReLU against the float64 oracle; dw and db the same bits with and
    without dx and for dy stored either way; the fused select bitwise the composition."""
    x, w, b, dy = _operands(np.random.default_rng(4), shape, k, kernel, padding, dtype)
    y = jit.conv2d_forward(x, w, b, True, 1, padding)
    dy_relu = relu_backward(dy, np.asarray(y))
    want = reference.conv2d_backward(dy_relu.astype(np.float64), x, w, True, 1, padding)
    bits = None
    for need_dx in (True, False):
        for dy_in in (dy, _channels_last(dy)):
            with PathLog() as log:
                fused = jit.conv2d_relu_backward(dy_in, y, x, w, need_dx, 1, padding)
            assert all(narrow_input.NARROW_GRAD_PATH in p for p in log.paths), log.paths
            composed = jit.conv2d_backward(relu_backward(dy_in, y), x, w, need_dx, 1, padding)
            for name, got, same, expected in zip(("dx", "dw", "db"), fused, composed, want):
                if not need_dx and name == "dx":
                    assert got is None and same is None
                    continue
                assert got.dtype == dtype and got.shape == expected.shape, name
                reference.assert_close(got, expected, dtype, name)
                np.testing.assert_array_equal(got, same, err_msg=f"{name}: fused against composed")
            if bits is None:
                bits = [np.array(g) for g in fused[1:]]
            for got, same in zip(fused[1:], bits):
                np.testing.assert_array_equal(got, same)


def test_non_finite_gradients_and_outputs_take_the_select_as_the_oracle():
    """A NaN y passes dy on, a NaN or inf dy where the ReLU clipped contributes nothing, an inf in x reaches dw as
    the oracle's products give it (inf, or NaN where times a zero gradient)."""
    x, w, b, dy = _operands(np.random.default_rng(6), (2, 3, 9, 12), LANES, (3, 3), (1, 1, 1, 1), np.float32)
    y = np.array(jit.conv2d_forward(x, w, b, True, 1, (1, 1, 1, 1)))
    y[0, 0, 0, :3] = 0
    dy[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    y[1, 2, 3, 4] = np.nan
    x[1, 1, 4, 5] = np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        want = reference.conv2d_backward(relu_backward(dy, y).astype(np.float64), x, w, False, 1, (1, 1, 1, 1))
        _, dw, db = jit.conv2d_relu_backward(_channels_last(dy), _channels_last(y), x, w, False, 1, (1, 1, 1, 1))
    for name, got, expected in (("dw", dw, want[1]), ("db", db, want[2])):
        assert np.array_equal(np.isnan(got), np.isnan(expected)), name
        assert np.array_equal(np.isinf(got), np.isinf(expected)), name
        finite = np.isfinite(expected)
        reference.assert_close(got[finite], expected[finite], np.float32, name)


@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_backward_matches_finite_differences(wrt):
    """In float64, dx, dw and db against central differences of the forward, plain and through the fused ReLU
    (coordinates near the ReLU's kink avoided by the draw)."""
    padding = (1, 0, 2, 1)
    x, w, b, dy = _operands(np.random.default_rng(12), (1, 2, 4, COLUMNS + 1), LANES, (2, 5), padding, np.float64)
    assert_conv_backward_matches(jit, x, w, b, dy, padding, wrt, lambda path: narrow_input.NARROW_GRAD_PATH in path,
                                 "few-channel")


def test_one_and_two_threads_give_identical_bits():
    x, w, b, dy = _operands(np.random.default_rng(8), (9, 3, 10, 12), 2 * LANES, (3, 3), (1, 1, 1, 1), np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            y = jit.conv2d_forward(x, w, b, True, 1, (1, 1, 1, 1))
            results.append([np.array(y)] + [np.array(g) for g in jit.conv2d_relu_backward(
                _channels_last(dy), y, x, w, True, 1, (1, 1, 1, 1))])
    finally:
        numba.set_num_threads(before)
    for got, same in zip(*results):
        np.testing.assert_array_equal(got, same)


def test_which_layers_it_takes():
    """Stride 1, few input channels, filters a multiple of the lanes, kernel rows of at least the gradient tile's
    taps and output rows of at least a forward tile: VGG's first layer yes; LeNet's (6 filters), mnist-cnn's first
    (one channel, 3x3: rows of 3 values), a deep layer, a strided one and a too narrow output no."""
    fits = narrow_input.narrow_input_fits
    same = (1, 1, 1, 1)
    assert fits((2, 3, 32, 32), (32, 3, 3, 3), 1, same)
    assert not fits((2, 1, 28, 28), (6, 1, 5, 5), 1, (2, 2, 2, 2))
    assert not fits((2, 1, 28, 28), (32, 1, 3, 3), 1, (0, 0, 0, 0))
    assert not fits((2, 32, 16, 16), (64, 32, 3, 3), 1, same)
    assert not fits((2, 3, 32, 32), (32, 3, 3, 3), 2, same)
    assert not fits((2, 3, 8, COLUMNS - 1), (32, 3, 3, 3), 1, (0, 0, 1, 1))
