"""Parity: every contract op of every backend against the float64 oracle (numba_cnn/kernels/reference.py), on random and
awkward shapes, float32 within FLOAT32_TOL and float64 tight; pooling (no arithmetic) must match exactly. The last
tests prove the comparison catches a small perturbation of any output of any op."""

import types

import numpy as np
import pytest

from numba_cnn.kernels import reference
from conftest import Case, backend_case_params, on_device, on_host
from numba_cnn.kernels import Backend, get_backend
from numba_cnn.kernels import im2col

DTYPES = [np.float32, np.float64]

# spec: x (N, C, H, W), w (K, C, R, S), layout of the inputs handed to the kernel.
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
    Case("conv1_mnist", False, dict(x=(3, 1, 28, 28), w=(32, 1, 3, 3))),
    Case("conv2_mnist", False, dict(x=(3, 32, 13, 13), w=(64, 32, 3, 3))),
    Case("wide_odd", False, dict(x=(2, 5, 17, 11), w=(40, 5, 3, 2), layout="transposed")),
]

# spec: x (N, C, H, W), fill (what values), layout.
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
    Case("pool1_mnist", False, dict(x=(4, 32, 26, 26), fill="after_relu")),
    Case("pool2_mnist", False, dict(x=(4, 64, 11, 11), fill="small_integers")),
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


def assert_matches_oracle(backend, op, args, dtype):
    """The backend's outputs of op(args) have the input dtype and agree with the float64 oracle: within the dtype's
    tolerance for convolution, exactly for pooling (a max and a routing copy involve no rounding)."""
    actual = run_op(backend, op, args)
    expected = getattr(reference, op)(*args)
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(actual) == len(expected), f"{op} returned {len(actual)} outputs, expected {len(expected)}"
    for index, (got, want) in enumerate(zip(actual, expected)):
        what = f"{backend.name}.{op} output {index}"
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
    layout = case.spec.get("layout", "contiguous")
    x = make_array(rng, case.spec["x"], dtype, layout=layout)
    w = make_array(rng, case.spec["w"], dtype, layout=layout)
    b = rng.standard_normal(case.spec["w"][0]).astype(dtype)
    n, _, h, wd = case.spec["x"]
    k, _, r, s = case.spec["w"]
    dy = make_array(rng, (n, k, h - r + 1, wd - s + 1), dtype, layout=layout)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("backend_name, case", backend_case_params(CONV_CASES))
def test_conv2d_forward(backend, case, relu, dtype, rng):
    x, w, b, _ = conv_inputs(rng, case, dtype)
    assert_matches_oracle(backend, "conv2d_forward", (x, w, b, relu), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("backend_name, case", backend_case_params(CONV_CASES))
def test_conv2d_backward(backend, case, need_dx, dtype, rng):
    x, w, _, dy = conv_inputs(rng, case, dtype)
    assert_matches_oracle(backend, "conv2d_backward", (dy, x, w, need_dx), dtype)


def pool_input(rng, case, dtype):
    return make_array(rng, case.spec["x"], dtype, case.spec["fill"], case.spec.get("layout", "contiguous"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_maxpool2d_forward(backend, case, dtype, rng):
    assert_matches_oracle(backend, "maxpool2d_forward", (pool_input(rng, case, dtype),), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_maxpool2d_backward(backend, case, dtype, rng):
    """dy routed by the argmax of the case's input: ties, incomplete windows and all."""
    x = pool_input(rng, case, dtype)
    _, argmax = reference.maxpool2d_forward(x)
    dy = make_array(rng, argmax.shape, dtype, layout=case.spec.get("layout", "contiguous"))
    assert_matches_oracle(backend, "maxpool2d_backward", (dy, argmax, x.shape), dtype)


# One 2x2 window per case, its values, and the argmax the contract demands (first maximum in row-major order).
TIE_WINDOWS = [
    ([[0, 0], [0, 0]], 0),
    ([[1, 1], [1, 1]], 0),
    ([[0, 2], [2, 0]], 1),
    ([[0, 0], [3, 3]], 2),
    ([[-1, -2], [-3, -1]], 0),
    ([[-5, -5], [-5, -4]], 3),
    ([[0, 1], [0, 1]], 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool2d_ties_go_to_the_first_maximum(backend, dtype):
    """Written out by hand, independent of the oracle: the windows side by side in one (1, 1, 2, 2*W) image plus
    a dropped last column, the argmax per window, and dy routed to exactly those positions."""
    x = np.concatenate([np.array(values, dtype=dtype) for values, _ in TIE_WINDOWS], axis=1)
    x = np.concatenate([x, np.full((2, 1), 9, dtype=dtype)], axis=1)[None, None]  # the 9s sit in no window
    y, argmax = run_op(backend, "maxpool2d_forward", (x,))
    np.testing.assert_array_equal(argmax[0, 0, 0], [expected for _, expected in TIE_WINDOWS])
    np.testing.assert_array_equal(y[0, 0, 0], [np.max(values) for values, _ in TIE_WINDOWS])
    dy = np.arange(1, len(TIE_WINDOWS) + 1, dtype=dtype).reshape(1, 1, 1, -1)
    dx = run_op(backend, "maxpool2d_backward", (dy, argmax, x.shape))
    expected_dx = np.zeros(x.shape, dtype=dtype)
    for window, (_, offset) in enumerate(TIE_WINDOWS):
        expected_dx[0, 0, offset // 2, 2 * window + offset % 2] = window + 1
    np.testing.assert_array_equal(dx, expected_dx)


def test_oracle_against_hand_computed_values():
    """The oracle itself, on values worked out by hand: a 2x2 kernel over a 3x3 image, and one pooling window."""
    x = np.arange(9.0).reshape(1, 1, 3, 3)  # [[0 1 2] [3 4 5] [6 7 8]]
    w = np.array([[1.0, 0.0], [0.0, -1.0]]).reshape(1, 1, 2, 2)  # x[i, j] - x[i+1, j+1] = -4 everywhere
    np.testing.assert_array_equal(reference.conv2d_forward(x, w, np.array([0.5]), False), np.full((1, 1, 2, 2), -3.5))
    np.testing.assert_array_equal(reference.conv2d_forward(x, w, np.array([0.5]), True), np.zeros((1, 1, 2, 2)))
    dx, dw, db = reference.conv2d_backward(np.ones((1, 1, 2, 2)), x, w, True)
    np.testing.assert_array_equal(db, [4.0])
    np.testing.assert_array_equal(dw[0, 0], [[0 + 1 + 3 + 4, 1 + 2 + 4 + 5], [3 + 4 + 6 + 7, 4 + 5 + 7 + 8]])
    np.testing.assert_array_equal(dx[0, 0], [[1, 1, 0], [1, 0, -1], [0, -1, -1]])
    y, argmax = reference.maxpool2d_forward(np.array([[[[1.0, 7.0, 0.0], [7.0, 2.0, 9.0]]]]))
    assert y.tolist() == [[[[7.0]]]] and argmax.tolist() == [[[[1]]]]
    dx = reference.maxpool2d_backward(np.array([[[[5.0]]]]), argmax, (1, 1, 2, 3))
    np.testing.assert_array_equal(dx, [[[[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]]])


# --- the comparison catches a perturbed kernel ---------------------------------------------------------------

def perturbed_backend(op, output_index, dtype):
    """im2col with one output of one op slightly wrong at a single element: a float output moved by 10 times the
    dtype's tolerance relative to its largest element, an argmax pointing at the next window slot."""
    def perturbed(*args):
        outputs = getattr(im2col, op)(*args)
        outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
        wrong = outputs[output_index].copy()
        flat = wrong.reshape(-1)
        if wrong.dtype == np.uint8:
            flat[flat.size // 2] = (flat[flat.size // 2] + 1) % 4
        else:
            flat[flat.size // 2] += 10 * reference.tolerance(dtype) * max(np.abs(flat).max(), 1.0)
        outputs[output_index] = wrong
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    module = types.ModuleType("perturbed_im2col")
    module.INFO = im2col.INFO
    for name in ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward"):
        setattr(module, name, getattr(im2col, name))
    setattr(module, op, perturbed)
    return Backend(f"im2col with {op} output {output_index} perturbed", module)


PERTURBED_OUTPUTS = [("conv2d_forward", 0), ("conv2d_backward", 0), ("conv2d_backward", 1), ("conv2d_backward", 2),
                     ("maxpool2d_forward", 0), ("maxpool2d_forward", 1), ("maxpool2d_backward", 0)]


def op_arguments(op, rng, dtype):
    x, w, b, dy = conv_inputs(rng, CONV_CASES[0], dtype)
    pool_x = make_array(rng, (2, 3, 6, 5), dtype)
    pool_dy = make_array(rng, (2, 3, 3, 2), dtype)
    return {"conv2d_forward": (x, w, b, True), "conv2d_backward": (dy, x, w, True),
            "maxpool2d_forward": (pool_x,),
            "maxpool2d_backward": (pool_dy, reference.maxpool2d_forward(pool_x)[1], pool_x.shape)}[op]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, output_index", PERTURBED_OUTPUTS)
def test_parity_check_catches_a_perturbed_kernel(op, output_index, dtype, rng):
    args = op_arguments(op, rng, dtype)
    assert_matches_oracle(get_backend("im2col"), op, args, dtype)  # the unperturbed kernel passes ...
    with pytest.raises(AssertionError):  # ... and the same check fails once one element is off
        assert_matches_oracle(perturbed_backend(op, output_index, dtype), op, args, dtype)
