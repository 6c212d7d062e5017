"""Parity: every contract op of every backend against the float64 oracle (numba_cnn/kernels/reference.py), on random and
awkward shapes (strides, padding, pool sizes, batchnorm in both modes), float32 within FLOAT32_TOL and float64 tight;
max-pooling (no arithmetic) must match exactly. The last tests prove the comparison catches a small perturbation of
any output of any op, and a batchnorm that forgets to update its running statistics.

On numba's CUDA simulator cuda runs these cases in float32 only; NUMBA_CNN_SLOW_TESTS=1 adds float64 there (on a
GPU both always run). The simulator runs both dtypes through the same Python code, and test_cuda.py checks every
cuda op in float64 against the oracle on awkward shapes of its own."""

import types

import numpy as np
import pytest

from numba_cnn.kernels import reference
from conftest import Case, backend_case_params, on_device, on_host
from numba_cnn.kernels import CONTRACT, Backend, get_backend
from numba_cnn.kernels import im2col
from numba_cnn.kernels.contract import CHECKS

pytestmark = pytest.mark.usefixtures("cuda_float64_opt_in_on_the_simulator")

DTYPES = [np.float32, np.float64]

# spec: x (N, C, H, W), w (K, C, R, S), stride (default 1), padding (default 0: an int, a pair or the 4-tuple, as
# the contract's checks take it), layout of the inputs handed to the kernel.
CONV_CASES = [
    Case("basic", True, dict(x=(2, 3, 6, 5), w=(4, 3, 3, 3))),
    Case("batch1_one_channel", True, dict(x=(1, 1, 5, 7), w=(2, 1, 3, 3))),
    Case("one_filter", True, dict(x=(2, 2, 4, 5), w=(1, 2, 3, 3))),
    Case("kernel_1x1", True, dict(x=(2, 3, 4, 5), w=(3, 3, 1, 1))),
    Case("kernel_2x3", True, dict(x=(2, 2, 5, 6), w=(3, 2, 2, 3))),
    Case("kernel_5x5", True, dict(x=(2, 2, 7, 6), w=(2, 2, 5, 5))),
    Case("kernel_fills_input", True, dict(x=(2, 2, 5, 5), w=(3, 2, 5, 5))),
    Case("one_output_column", True, dict(x=(1, 2, 5, 3), w=(2, 2, 3, 3))),
    Case("sliced", True, dict(x=(2, 3, 6, 5), w=(4, 3, 3, 3), layout="sliced")),
    Case("transposed", True, dict(x=(2, 3, 6, 5), w=(4, 3, 3, 3), layout="transposed")),
    # stride 2 over odd sizes: the last row and the last column are read by no output (their dx is 0)
    Case("stride2_unread_edges", True, dict(x=(2, 3, 7, 6), w=(4, 3, 3, 3), stride=2)),
    Case("same_padding_one_channel", True, dict(x=(2, 1, 5, 6), w=(2, 1, 3, 3), padding=(1, 1, 1, 1))),
    Case("asymmetric_padding", True, dict(x=(1, 3, 6, 5), w=(3, 3, 2, 2), padding=(0, 1, 0, 1))),
    Case("kernel_5x5_stride2_padded", True, dict(x=(2, 3, 9, 8), w=(2, 3, 5, 5), stride=2, padding=2)),
    Case("stride3_row_padding_pair", True, dict(x=(1, 2, 8, 7), w=(2, 2, 3, 2), stride=3, padding=(1, 0))),
    Case("kernel_larger_than_input", True, dict(x=(1, 1, 2, 2), w=(2, 1, 3, 3), padding=1)),
    Case("sliced_stride2_uneven_padding", True, dict(x=(2, 2, 7, 6), w=(3, 2, 3, 3), stride=2, padding=(2, 0, 0, 1),
                                                     layout="sliced")),
    Case("conv1_mnist", False, dict(x=(3, 1, 28, 28), w=(32, 1, 3, 3))),
    Case("conv2_mnist", False, dict(x=(3, 32, 13, 13), w=(64, 32, 3, 3))),
    Case("wide_odd", False, dict(x=(2, 5, 17, 11), w=(40, 5, 3, 2), layout="transposed")),
    Case("conv2_same_stride2", False, dict(x=(3, 32, 13, 13), w=(48, 32, 3, 3), stride=2, padding=1)),
    Case("wide_5x5_same", False, dict(x=(2, 3, 15, 12), w=(40, 3, 5, 5), padding=2, layout="transposed")),
]

# spec: x (N, C, H, W), fill (what values), size (default 2: an int or a pair), layout. Max- and average pooling
# share them: sizes 2, 3 and non-square pairs, leftover rows and columns, ties, and global pooling (size == (H, W)).
POOL_CASES = [
    Case("even", True, dict(x=(2, 3, 6, 8), fill="normal")),
    Case("odd_h_and_w", True, dict(x=(2, 2, 7, 5), fill="normal")),
    Case("single_window", True, dict(x=(1, 1, 2, 2), fill="normal")),
    Case("odd_3x3", True, dict(x=(1, 2, 3, 3), fill="normal")),
    Case("all_zeros", True, dict(x=(2, 2, 6, 5), fill="zeros")),
    Case("small_integers", True, dict(x=(2, 3, 8, 7), fill="small_integers")),
    Case("after_relu", True, dict(x=(2, 3, 6, 6), fill="after_relu")),
    Case("sliced", True, dict(x=(2, 3, 7, 6), fill="small_integers", layout="sliced")),
    Case("transposed", True, dict(x=(2, 3, 6, 7), fill="normal", layout="transposed")),
    Case("size3_leftovers", True, dict(x=(2, 2, 8, 7), fill="normal", size=3)),
    Case("size3_ties", True, dict(x=(1, 3, 6, 9), fill="small_integers", size=3)),
    Case("size_2x3_ties", True, dict(x=(2, 2, 7, 8), fill="small_integers", size=(2, 3))),
    Case("size_3x1", True, dict(x=(2, 1, 7, 4), fill="after_relu", size=(3, 1))),
    Case("size3_transposed", True, dict(x=(2, 3, 7, 6), fill="normal", size=3, layout="transposed")),
    Case("global", True, dict(x=(2, 3, 5, 4), fill="normal", size=(5, 4))),
    Case("global_ties", True, dict(x=(2, 2, 3, 3), fill="small_integers", size=(3, 3))),
    Case("pool1_mnist", False, dict(x=(4, 32, 26, 26), fill="after_relu")),
    Case("pool2_mnist", False, dict(x=(4, 64, 11, 11), fill="small_integers")),
    Case("pool1_size3", False, dict(x=(4, 32, 26, 26), fill="after_relu", size=3)),
    Case("global_pool2", False, dict(x=(4, 64, 11, 11), fill="normal", size=11)),
]
# average pooling only: a window of more than 256 elements (max pooling's argmax is uint8, an average pool has none;
# a global pool over a 17x16 map)
AVG_POOL_CASES = POOL_CASES + [
    Case("global_over_256", True, dict(x=(2, 3, 17, 16), fill="normal", size=(17, 16))),
]

# spec: x (N, C, H, W), layout. x is shifted off zero (mean 3, spread 2) so that a missed centring shows.
BATCHNORM_CASES = [
    Case("basic", True, dict(x=(2, 3, 4, 5))),
    Case("batch1_one_channel", True, dict(x=(1, 1, 3, 3))),
    Case("one_pixel_per_image", True, dict(x=(4, 2, 1, 1))),
    Case("one_element_per_channel", True, dict(x=(1, 2, 1, 1))),  # variance 0: y = beta, dx = 0
    Case("sliced", True, dict(x=(2, 3, 3, 4), layout="sliced")),
    Case("transposed", True, dict(x=(2, 3, 4, 3), layout="transposed")),
    Case("conv2_mnist", False, dict(x=(16, 64, 11, 11))),
    Case("pool1_transposed", False, dict(x=(8, 32, 13, 13), layout="transposed")),
]


def make_array(rng, shape, dtype, fill="normal", layout="contiguous"):
    """A test input of 4-D `shape`, with values from `fill`, laid out in memory as `layout` says: contiguous, sliced
    (every other element of a larger array along H and W) or transposed (stored NHWC, viewed as NCHW)."""
    n, c, h, w = shape
    if layout == "sliced":
        storage_shape = (n, c, 2 * h, 2 * w)
    elif layout == "transposed":
        storage_shape = (n, h, w, c)
    else:
        storage_shape = shape
    if fill == "zeros":
        storage = np.zeros(storage_shape)
    elif fill == "small_integers":  # few distinct values: most windows hold ties
        storage = rng.integers(0, 3, storage_shape).astype(np.float64)
    elif fill == "after_relu":  # about half exact zeros, as the pooling layers see them
        storage = np.maximum(rng.standard_normal(storage_shape), 0.0)
    elif fill == "shifted":  # mean 3, spread 2: far enough from zero that a missed centring shows
        storage = 3.0 + 2.0 * rng.standard_normal(storage_shape)
    else:
        storage = rng.standard_normal(storage_shape)
    storage = storage.astype(dtype)
    if layout == "sliced":
        a = storage[:, :, ::2, 1::2]
    elif layout == "transposed":
        a = storage.transpose(0, 3, 1, 2)
    else:
        a = storage
    assert a.shape == shape and (layout == "contiguous") == a.flags.c_contiguous
    return a


def run_op(backend, op, args):
    """The backend's op on args (host numpy arrays and plain values), results back on the host."""
    return on_host(backend, getattr(backend, op)(*(on_device(backend, a) for a in args)))


def oracle(op, args):
    """The float64 oracle's op on args as the boundary check hands them to every backend: defaults filled in,
    stride, padding and size in their normalised forms."""
    return getattr(reference, op)(*CHECKS[op](*args))


# op -> the positions of its arguments that it updates in place (and names for messages)
UPDATED_IN_PLACE = {"batchnorm2d_forward": {3: "running_mean", 4: "running_var"}}


def assert_matches_oracle(backend, op, args, dtype):
    """The backend's outputs of op(args), and the arguments it updates in place, have the input dtype and agree with
    the float64 oracle's: max-pooling exactly (a max and a routing copy involve no rounding, and NaN matches NaN
    only), everything else within the dtype's tolerance with every non-finite element matched exactly. The oracle
    gets its own copies of the arguments updated in place."""
    updated = UPDATED_IN_PLACE.get(op, {})
    oracle_args = [np.array(a) if i in updated else a for i, a in enumerate(args)]
    device_args = [on_device(backend, a) for a in args]
    actual = on_host(backend, getattr(backend, op)(*device_args))
    expected = oracle(op, oracle_args)
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(actual) == len(expected), f"{op} returned {len(actual)} outputs, expected {len(expected)}"
    names = [f"output {index}" for index in range(len(actual))] + [f"{name} (updated in place)"
                                                                  for name in updated.values()]
    actual += tuple(on_host(backend, device_args[i]) for i in updated)
    expected += tuple(oracle_args[i] for i in updated)
    for name, got, want in zip(names, actual, expected):
        what = f"{backend.name}.{op} {name}"
        if want is None:
            assert got is None, f"{what}: need_dx=False must give None"
            continue
        assert got is not None, f"{what} is None"
        want_dtype = np.uint8 if want.dtype == np.uint8 else dtype
        assert got.dtype == want_dtype, f"{what}: dtype {got.dtype}, expected {np.dtype(want_dtype)}"
        if op.startswith("maxpool"):
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=what)
        else:
            reference.assert_close(got, want, dtype, what)


def conv_inputs(rng, case, dtype):
    """x, w, b, dy for the case, and its (stride, padding) as the case gives them."""
    layout = case.spec.get("layout", "contiguous")
    x = make_array(rng, case.spec["x"], dtype, layout=layout)
    w = make_array(rng, case.spec["w"], dtype, layout=layout)
    b = rng.standard_normal(case.spec["w"][0]).astype(dtype)
    geometry = (case.spec.get("stride", 1), case.spec.get("padding", 0))
    dy = make_array(rng, oracle("conv2d_forward", (x, w, b, False) + geometry).shape, dtype, layout=layout)
    return x, w, b, dy, geometry


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("backend_name, case", backend_case_params(CONV_CASES))
def test_conv2d_forward(backend, case, relu, dtype, rng):
    x, w, b, _, geometry = conv_inputs(rng, case, dtype)
    assert_matches_oracle(backend, "conv2d_forward", (x, w, b, relu) + geometry, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("backend_name, case", backend_case_params(CONV_CASES))
def test_conv2d_backward(backend, case, need_dx, dtype, rng):
    x, w, _, dy, geometry = conv_inputs(rng, case, dtype)
    assert_matches_oracle(backend, "conv2d_backward", (dy, x, w, need_dx) + geometry, dtype)


def pool_input(rng, case, dtype):
    """x for the case, and its pool size as the case gives it."""
    x = make_array(rng, case.spec["x"], dtype, case.spec["fill"], case.spec.get("layout", "contiguous"))
    return x, case.spec.get("size", 2)


def pooled_gradient(rng, case, x, size, dtype):
    """A random upstream gradient of the pooled shape, laid out as the case says."""
    pooled_shape = oracle("avgpool2d_forward", (x, size)).shape
    return make_array(rng, pooled_shape, dtype, layout=case.spec.get("layout", "contiguous"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_maxpool2d_forward(backend, case, dtype, rng):
    assert_matches_oracle(backend, "maxpool2d_forward", pool_input(rng, case, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_maxpool2d_backward(backend, case, dtype, rng):
    """dy routed by the argmax of the case's input: ties, incomplete windows and all."""
    x, size = pool_input(rng, case, dtype)
    _, argmax = oracle("maxpool2d_forward", (x, size))
    dy = pooled_gradient(rng, case, x, size, dtype)
    assert_matches_oracle(backend, "maxpool2d_backward", (dy, argmax, x.shape, size), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(AVG_POOL_CASES))
def test_avgpool2d_forward(backend, case, dtype, rng):
    assert_matches_oracle(backend, "avgpool2d_forward", pool_input(rng, case, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(AVG_POOL_CASES))
def test_avgpool2d_backward(backend, case, dtype, rng):
    x, size = pool_input(rng, case, dtype)
    dy = pooled_gradient(rng, case, x, size, dtype)
    assert_matches_oracle(backend, "avgpool2d_backward", (dy, x.shape, size), dtype)


def batchnorm_inputs(rng, case, dtype):
    """x (shifted off zero), gamma (both signs), beta, running_mean, running_var (positive) for the case."""
    x = make_array(rng, case.spec["x"], dtype, "shifted", case.spec.get("layout", "contiguous"))
    channels = x.shape[1]
    gamma = rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 2.0, channels)
    beta, running_mean = rng.standard_normal(channels), rng.standard_normal(channels)
    running_var = rng.uniform(0.5, 2.0, channels)
    return tuple(a.astype(dtype) for a in (x, gamma, beta, running_mean, running_var))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend_name, case", backend_case_params(BATCHNORM_CASES))
def test_batchnorm2d_forward(backend, case, training, dtype, rng):
    """y, the statistics used, and the running statistics afterwards (moved in place in training, untouched in
    inference)."""
    args = batchnorm_inputs(rng, case, dtype) + (0.9, 1e-3, training)
    assert_matches_oracle(backend, "batchnorm2d_forward", args, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(BATCHNORM_CASES))
def test_batchnorm2d_backward(backend, case, dtype, rng):
    x, gamma, beta, running_mean, running_var = batchnorm_inputs(rng, case, dtype)
    _, mean, inv_std = oracle("batchnorm2d_forward", (x, gamma, beta, running_mean, running_var, 0.9, 1e-3, True))
    dy = make_array(rng, x.shape, dtype, layout=case.spec.get("layout", "contiguous"))
    args = (dy, x, gamma, mean.astype(dtype), inv_std.astype(dtype))
    assert_matches_oracle(backend, "batchnorm2d_backward", args, dtype)


# Windows of one size side by side, each with its values and the argmax the contract demands: the first maximum in
# row-major order, as the offset di*kw + dj.
TIE_WINDOWS = {
    (2, 2): [
        ([[0, 0], [0, 0]], 0),
        ([[1, 1], [1, 1]], 0),
        ([[0, 2], [2, 0]], 1),
        ([[0, 0], [3, 3]], 2),
        ([[-1, -2], [-3, -1]], 0),
        ([[-5, -5], [-5, -4]], 3),
        ([[0, 1], [0, 1]], 1),
    ],
    (2, 3): [
        ([[0, 5, 1], [5, 2, 5]], 1),
        ([[0, 0, 0], [0, 0, 7]], 5),
        ([[1, 0, 0], [2, 0, 2]], 3),
        ([[4, 4, 4], [4, 4, 4]], 0),
    ],
    (3, 3): [
        ([[0, 0, 0], [0, 0, 0], [0, 0, 0]], 0),
        ([[1, 2, 3], [3, 2, 1], [0, 3, 0]], 2),
        ([[-1, -1, -1], [-1, -1, -1], [-1, -1, 0]], 8),
        ([[0, 0, 0], [0, 4, 4], [4, 0, 0]], 4),
        ([[5, 0, 0], [0, 0, 0], [0, 0, 5]], 0),
        ([[0, 0, 0], [6, 0, 0], [0, 0, 0]], 3),
    ],
}


def windows_side_by_side(windows, size, dtype, dropped):
    """One (1, 1, kh + 1, kw * len(windows) + 1) image: the windows in a row, then a last row and column filled
    with `dropped` that belong to no window."""
    kh, kw = size
    x = np.full((kh + 1, kw * len(windows) + 1), dropped, dtype=dtype)
    for index, (values, _) in enumerate(windows):
        x[:kh, kw * index:kw * (index + 1)] = values
    return x[None, None]


def expected_routing(windows, size, dy, x_shape):
    """dx with each window's dy at the element its expected offset names, zero elsewhere."""
    kh, kw = size
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for index, (_, offset) in enumerate(windows):
        dx[0, 0, offset // kw, kw * index + offset % kw] = dy[0, 0, 0, index]
    return dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", list(TIE_WINDOWS), ids=lambda size: f"{size[0]}x{size[1]}")
def test_maxpool2d_ties_go_to_the_first_maximum(backend, size, dtype):
    """Written out by hand, independent of the oracle: the argmax per window (di*kw + dj), y, and dy routed to
    exactly those positions; the 9s in the dropped last row and column change nothing."""
    windows = TIE_WINDOWS[size]
    x = windows_side_by_side(windows, size, dtype, dropped=9)
    y, argmax = run_op(backend, "maxpool2d_forward", (x, size))
    np.testing.assert_array_equal(argmax[0, 0, 0], [expected for _, expected in windows])
    np.testing.assert_array_equal(y[0, 0, 0], [np.max(values) for values, _ in windows])
    dy = np.arange(1, len(windows) + 1, dtype=dtype).reshape(1, 1, 1, -1)
    dx = run_op(backend, "maxpool2d_backward", (dy, argmax, x.shape, size))
    np.testing.assert_array_equal(dx, expected_routing(windows, size, dy, x.shape))


def test_oracle_against_hand_computed_values():
    """The oracle itself, on values worked out by hand: a 2x2 kernel over a 3x3 image (unpadded, and padded and
    strided), pooling windows, and batchnorm on two elements."""
    no_padding = (0, 0, 0, 0)
    x = np.arange(9.0).reshape(1, 1, 3, 3)  # [[0 1 2] [3 4 5] [6 7 8]]
    w = np.array([[1.0, 0.0], [0.0, -1.0]]).reshape(1, 1, 2, 2)  # x[i, j] - x[i+1, j+1] = -4 everywhere
    bias = np.array([0.5])
    np.testing.assert_array_equal(reference.conv2d_forward(x, w, bias, False, 1, no_padding),
                                  np.full((1, 1, 2, 2), -3.5))
    np.testing.assert_array_equal(reference.conv2d_forward(x, w, bias, True, 1, no_padding), np.zeros((1, 1, 2, 2)))
    dx, dw, db = reference.conv2d_backward(np.ones((1, 1, 2, 2)), x, w, True, 1, no_padding)
    np.testing.assert_array_equal(db, [4.0])
    np.testing.assert_array_equal(dw[0, 0], [[0 + 1 + 3 + 4, 1 + 2 + 4 + 5], [3 + 4 + 6 + 7, 4 + 5 + 7 + 8]])
    np.testing.assert_array_equal(dx[0, 0], [[1, 1, 0], [1, 0, -1], [0, -1, -1]])
    # a zero row on top and a zero column on the left, stride 2: xp = [[0 0 0 0] [0 0 1 2] [0 3 4 5] [0 6 7 8]]
    ones = np.ones((1, 1, 2, 2))
    y = reference.conv2d_forward(x, ones, np.zeros(1), False, 2, (1, 0, 1, 0))
    np.testing.assert_array_equal(y[0, 0], [[0, 0 + 1 + 2], [3 + 6, 4 + 5 + 7 + 8]])
    dx, dw, _ = reference.conv2d_backward(np.ones((1, 1, 2, 2)), x, ones, True, 2, (1, 0, 1, 0))
    np.testing.assert_array_equal(dx[0, 0], np.ones((3, 3)))  # every input read exactly once
    np.testing.assert_array_equal(dw[0, 0], [[0 + 0 + 0 + 4, 0 + 0 + 3 + 5], [0 + 1 + 0 + 7, 0 + 2 + 6 + 8]])
    y, argmax = reference.maxpool2d_forward(np.array([[[[1.0, 7.0, 0.0], [7.0, 2.0, 9.0]]]]), (2, 2))
    assert y.tolist() == [[[[7.0]]]] and argmax.tolist() == [[[[1]]]]
    dx = reference.maxpool2d_backward(np.array([[[[5.0]]]]), argmax, (1, 1, 2, 3), (2, 2))
    np.testing.assert_array_equal(dx, [[[[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]]])
    _, argmax = reference.maxpool2d_forward(np.array([[[[1.0, 7.0, 0.0], [7.0, 2.0, 9.0]]]]), (2, 3))
    assert argmax.tolist() == [[[[5]]]]  # di*kw + dj = 1*3 + 2
    y = reference.avgpool2d_forward(np.array([[[[1.0, 7.0, 0.0], [7.0, 2.0, 9.0]]]]), (2, 2))
    assert y.tolist() == [[[[4.25]]]]
    dx = reference.avgpool2d_backward(np.array([[[[8.0]]]]), (1, 1, 2, 3), (2, 2))
    np.testing.assert_array_equal(dx, [[[[2.0, 2.0, 0.0], [2.0, 2.0, 0.0]]]])
    # one channel holding 1 and 3: mean 2, biased variance 1, so (eps 0) x_hat = [-1, 1]
    running_mean, running_var = np.zeros(1), np.zeros(1)
    y, mean, inv_std = reference.batchnorm2d_forward(np.array([[[[1.0, 3.0]]]]), np.array([2.0]), np.array([0.5]),
                                                     running_mean, running_var, 0.75, 0.0, True)
    np.testing.assert_array_equal(y, [[[[-1.5, 2.5]]]])
    assert mean.tolist() == [2.0] and inv_std.tolist() == [1.0]
    assert running_mean.tolist() == [0.5] and running_var.tolist() == [0.25]  # 0.75 * 0 + 0.25 * batch
    dx, dgamma, dbeta = reference.batchnorm2d_backward(np.array([[[[1.0, 0.0]]]]), np.array([[[[1.0, 3.0]]]]),
                                                       np.array([2.0]), mean, inv_std)
    assert dbeta.tolist() == [1.0] and dgamma.tolist() == [-1.0]
    # dx = 2 * (dy - 1/2 - x_hat * (-1/2)) = 2 * ([1, 0] - 0.5 + [-0.5, 0.5]) = [0, 0]: with two elements x_hat is
    # [-1, 1] whatever x is, so y does not depend on x at all
    np.testing.assert_array_equal(dx, [[[[0.0, 0.0]]]])


# --- the comparison catches a perturbed kernel ---------------------------------------------------------------

def im2col_with(op, replacement, label):
    """The im2col backend with one contract function replaced, behind the registry's boundary checks."""
    module = types.ModuleType(f"im2col_with_{op}_replaced")
    module.INFO = im2col.INFO
    for name in CONTRACT:
        setattr(module, name, getattr(im2col, name))
    setattr(module, op, replacement)
    return Backend(f"im2col with {label}", module)


def perturbed_backend(op, output_index, dtype):
    """im2col with one output of one op slightly wrong at a single element: a float output moved by 10 times the
    dtype's tolerance relative to its largest element, an argmax pointing at another slot of its window."""
    def perturbed(*args):
        outputs = getattr(im2col, op)(*args)
        outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
        wrong = outputs[output_index].copy()
        flat = wrong.reshape(-1)
        if wrong.dtype == np.uint8:
            flat[flat.size // 2] = (flat[flat.size // 2] + 1) % 2  # differs from any slot and fits any window
        else:
            flat[flat.size // 2] += 10 * reference.tolerance(dtype) * max(np.abs(flat).max(), 1.0)
        outputs[output_index] = wrong
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    return im2col_with(op, perturbed, f"{op} output {output_index} perturbed")


PERTURBED_OUTPUTS = [("conv2d_forward", 0), ("conv2d_backward", 0), ("conv2d_backward", 1), ("conv2d_backward", 2),
                     ("maxpool2d_forward", 0), ("maxpool2d_forward", 1), ("maxpool2d_backward", 0),
                     ("avgpool2d_forward", 0), ("avgpool2d_backward", 0), ("batchnorm2d_forward", 0),
                     ("batchnorm2d_forward", 1), ("batchnorm2d_forward", 2), ("batchnorm2d_backward", 0),
                     ("batchnorm2d_backward", 1), ("batchnorm2d_backward", 2)]


def op_arguments(op, rng, dtype):
    """Arguments for op: a strided, asymmetrically padded convolution, 3x3 pooling with leftovers, batchnorm in
    training."""
    conv_case = next(case for case in CONV_CASES if case.id == "sliced_stride2_uneven_padding")
    x, w, b, dy, geometry = conv_inputs(rng, conv_case, dtype)
    pool_x, size = make_array(rng, (2, 3, 7, 8), dtype), (3, 3)
    pool_dy = make_array(rng, (2, 3, 2, 2), dtype)
    bn_x, gamma, beta, running_mean, running_var = batchnorm_inputs(rng, BATCHNORM_CASES[0], dtype)
    _, mean, inv_std = oracle("batchnorm2d_forward", (bn_x, gamma, beta, running_mean.copy(), running_var.copy(),
                                                      0.9, 1e-3, True))
    return {"conv2d_forward": (x, w, b, True) + geometry, "conv2d_backward": (dy, x, w, True) + geometry,
            "maxpool2d_forward": (pool_x, size),
            "maxpool2d_backward": (pool_dy, oracle("maxpool2d_forward", (pool_x, size))[1], pool_x.shape, size),
            "avgpool2d_forward": (pool_x, size), "avgpool2d_backward": (pool_dy, pool_x.shape, size),
            "batchnorm2d_forward": (bn_x, gamma, beta, running_mean, running_var, 0.9, 1e-3, True),
            "batchnorm2d_backward": (make_array(rng, bn_x.shape, dtype), bn_x, gamma, mean.astype(dtype),
                                     inv_std.astype(dtype))}[op]


def fresh_copies(args):
    """args with every array copied: an op's in-place updates must not carry over from one call to the next."""
    return tuple(np.array(a) if isinstance(a, np.ndarray) else a for a in args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, output_index", PERTURBED_OUTPUTS)
def test_parity_check_catches_a_perturbed_kernel(op, output_index, dtype, rng):
    args = op_arguments(op, rng, dtype)
    assert_matches_oracle(get_backend("im2col"), op, fresh_copies(args), dtype)  # the unperturbed kernel passes ...
    with pytest.raises(AssertionError):  # ... and the same check fails once one element is off
        assert_matches_oracle(perturbed_backend(op, output_index, dtype), op, fresh_copies(args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_check_catches_running_statistics_left_alone(dtype, rng):
    """A batchnorm whose outputs are right but which updates copies of the running statistics, not the arrays it
    was given, fails the check."""
    def on_copies(x, gamma, beta, running_mean, running_var, momentum, eps, training):
        return im2col.batchnorm2d_forward(x, gamma, beta, running_mean.copy(), running_var.copy(), momentum, eps,
                                          training)

    args = op_arguments("batchnorm2d_forward", rng, dtype)
    with pytest.raises(AssertionError, match="updated in place"):
        assert_matches_oracle(im2col_with("batchnorm2d_forward", on_copies, "running statistics left alone"),
                              "batchnorm2d_forward", args, dtype)
