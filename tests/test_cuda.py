"""The cuda backend against the float64 oracle (and numpy layers), on tiny shapes (the simulator runs a Python thread per CUDA
thread).

On a machine without a GPU, conftest.py switches Numba's CUDA simulator on, so `python -m pytest` runs these too.
The import-error tests run everywhere; the rest skip, saying why, when numba-cuda is not installed.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from numba_cnn.kernels import host as host_arrays, layers as numpy_layers
from numba_cnn.kernels import BackendUnavailable, get_backend
from numba_cnn.kernels import reference
from numba_cnn.model import Model
from numba_cnn.network import build
from numba_cnn.network.layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D

DTYPES = [np.float32, np.float64]
ORACLE = get_backend("reference")  # the float64 oracle behind the same boundary checks (their defaults filled in)


@pytest.fixture(scope="module")
def cuda_backend():
    try:
        return get_backend("cuda")
    except BackendUnavailable as exc:
        pytest.skip(f"cuda backend unavailable (set NUMBA_ENABLE_CUDASIM=1 to test on the simulator): {exc}")


def random(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_on_device(*arrays):
    for a in arrays:
        assert not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host"), f"{type(a).__name__} is not on the device"


# ------------------------------------------------------------------------------------------ contract kernels

CONV_CASES = [  # (N, C, H, W), (K, R, S)
    ((1, 1, 5, 5), (1, 1, 1)),
    ((2, 3, 7, 6), (4, 2, 3)),
    ((1, 2, 9, 7), (3, 5, 5)),
    ((3, 1, 4, 5), (2, 3, 3)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,kernel", CONV_CASES)
def test_conv_matches_reference(cuda_backend, dtype, x_shape, kernel):
    k, r, s = kernel
    x = random(x_shape, dtype, 1)
    w = random((k, x_shape[1], r, s), dtype, 2)
    b = random((k,), dtype, 3)
    dev = cuda_backend.to_device
    for relu in (False, True):
        y = cuda_backend.conv2d_forward(dev(x), dev(w), dev(b), relu=relu)
        assert_on_device(y)
        reference.assert_close(cuda_backend.to_host(y), ORACLE.conv2d_forward(x, w, b, relu), dtype)
    dy = random(y.shape, dtype, 4)
    dx, dw, db = cuda_backend.conv2d_backward(dev(dy), dev(x), dev(w), need_dx=True)
    assert_on_device(dx, dw, db)
    for got, want in zip((dx, dw, db), ORACLE.conv2d_backward(dy, x, w, True)):
        reference.assert_close(cuda_backend.to_host(got), want, dtype)
    none, dw_only, _ = cuda_backend.conv2d_backward(dev(dy), dev(x), dev(w), need_dx=False)
    assert none is None
    np.testing.assert_array_equal(cuda_backend.to_host(dw_only), cuda_backend.to_host(dw))


# Shapes that cross the tiled kernels' boundaries in the simulator's tiles (8 x 8 products, 4 reduction columns at
# a time, 8 pixels and 8 channels per input-gradient block): several row tiles (K = 10), a reduction that ends
# mid-tile, split sums of several chunks, channel tiles of 8 and a remainder, strides and uneven padding.
TILE_CASES = [  # (N, C, H, W), (K, R, S), stride, padding (top, bottom, left, right)
    pytest.param((2, 9, 4, 3), (10, 3, 3), 1, (1, 1, 1, 1), id="K10-C9-same"),
    pytest.param((2, 3, 5, 7), (5, 2, 3), 2, (0, 1, 2, 0), id="stride2-uneven"),
    pytest.param((1, 1, 9, 9), (3, 1, 1), 1, (0, 0, 0, 0), id="1x1x1-weights-per-image-weight-grad"),
]


@pytest.mark.parametrize("kernels", ["tiled", "readable"])
@pytest.mark.parametrize("x_shape,kernel,stride,padding", TILE_CASES)
def test_both_convolution_kernel_sets_match_the_oracle(cuda_backend, monkeypatch, kernels, x_shape, kernel, stride,
                                                       padding):
    """kernels.py's readable kernels and tiled.py's tiled ones (NUMBA_CNN_CUDA_CONV picks one at import; switched
    here for the test) compute the same convolution, forward and backward, to float32 rounding."""
    from numba_cnn.kernels.cuda import runtime, tiled

    monkeypatch.setattr(runtime, "CONV_KERNELS", kernels)
    k, r, s = kernel
    dtype = np.float32
    x, w, b = random(x_shape, dtype, 11), random((k, x_shape[1], r, s), dtype, 12), random((k,), dtype, 13)
    dev = cuda_backend.to_device
    y = cuda_backend.conv2d_forward(dev(x), dev(w), dev(b), True, stride, padding)
    reference.assert_close(cuda_backend.to_host(y), ORACLE.conv2d_forward(x, w, b, True, stride, padding), dtype)
    dy = random(y.shape, dtype, 14)
    got = cuda_backend.conv2d_backward(dev(dy), dev(x), dev(w), True, stride, padding)
    for g, want in zip(got, ORACLE.conv2d_backward(dy, x, w, True, stride, padding)):
        reference.assert_close(cuda_backend.to_host(g), want, dtype)
    if kernels == "tiled":  # the cases take the paths they were written for
        n, _, p, q = y.shape
        assert tiled.input_grad_fits(x_shape, w.shape)
        if x_shape[1] * r * s == 1:
            assert not tiled.weight_grad_fits(w.shape)
        elif tiled.weight_grad_fits(w.shape):
            assert math.ceil(n * p * q / tiled.weight_grad_chunk(n * p * q)) > 1  # a split sum


@pytest.mark.parametrize("wrt", ["x", "w"])
def test_tiled_convolution_backward_matches_finite_differences(cuda_backend, monkeypatch, wrt):
    """The tiled backward (several row tiles, a reduction ending mid-tile, a split sum of two chunks, a channel-tile
    remainder, stride 2 with uneven padding) against central differences of the convolution, in float64."""
    from gradcheck import assert_gradient_matches
    from numba_cnn.kernels.cuda import runtime

    monkeypatch.setattr(runtime, "CONV_KERNELS", "tiled")
    rng = np.random.default_rng(21)
    stride, padding = 2, (1, 0, 0, 1)
    inputs = {"x": rng.standard_normal((4, 9, 5, 4)), "w": rng.standard_normal((10, 9, 3, 2))}
    b = np.zeros(10)
    dy = rng.standard_normal(ORACLE.conv2d_forward(inputs["x"], inputs["w"], b, False, stride, padding).shape)

    def loss(a):  # the oracle's forward: the derivative checked is the convolution's, not a second tiled kernel's
        args = dict(inputs, **{wrt: a})
        return float(np.sum(ORACLE.conv2d_forward(args["x"], args["w"], b, False, stride, padding) * dy))

    dev = cuda_backend.to_device
    dx, dw, _ = cuda_backend.conv2d_backward(dev(dy), dev(inputs["x"]), dev(inputs["w"]), True, stride, padding)
    analytic = cuda_backend.to_host(dx if wrt == "x" else dw)
    a = inputs[wrt]
    assert_gradient_matches(analytic, loss, a, rng.choice(a.size, 60, replace=False), what=f"tiled conv d{wrt}")


def test_tiled_convolution_keeps_the_nan_and_inf_rules(cuda_backend, monkeypatch):
    """NaN and infinities through the tiled kernels exactly where the oracle has them: in x (the forward and the
    weight gradient multiply the padding's zeros by them), in w (the input gradient must not multiply a tap that
    reads nothing: inf * 0 there would be NaN) and in dy."""
    from numba_cnn.kernels.cuda import runtime
    from test_kernels import assert_matches_oracle

    monkeypatch.setattr(runtime, "CONV_KERNELS", "tiled")
    rng = np.random.default_rng(22)
    dtype = np.float32
    stride, padding = 2, (1, 1, 0, 1)
    x, w = random((2, 9, 5, 4), dtype, 23), random((10, 9, 3, 3), dtype, 24)
    b = random((10,), dtype, 25)
    x[0, 0, 0, 0], x[1, 8, 4, 3], x[1, 3, 2, 2] = np.nan, np.inf, -np.inf
    w_special = w.copy()
    w_special[3, 4, 2, 1], w_special[7, 0, 0, 0] = np.inf, -np.inf
    dy = random(ORACLE.conv2d_forward(x, w, b, False, stride, padding).shape, dtype, 26)
    dy_special = dy.copy()
    dy_special[rng.random(dy.shape) < 0.1] = np.inf
    dy_special[0, 0, 0, 0] = np.nan
    clean_x = random(x.shape, dtype, 27)
    assert_matches_oracle(cuda_backend, "conv2d_forward", (x, w, b, True, stride, padding), dtype)
    for args in ((dy, x, w), (dy, clean_x, w_special), (dy_special, clean_x, w)):
        assert_matches_oracle(cuda_backend, "conv2d_backward", args + (True, stride, padding), dtype)


def test_tiled_kernels_route_what_they_do_not_take():
    from numba_cnn.kernels.cuda import tiled

    assert tiled.input_grad_fits((128, 32, 13, 13), (64, 32, 3, 3))
    assert not tiled.input_grad_fits((2, 3, 64, 64), (4, 3, 31, 31))  # 8 x 31 x 31 weights do not fit the stage
    assert not tiled.input_grad_fits((70_000, 1, 4, 4), (2, 1, 3, 3))  # past the grid's third dimension
    assert not tiled.weight_grad_fits((32, 1, 1, 1)) and tiled.weight_grad_fits((64, 32, 3, 3))
    chunk = tiled.weight_grad_chunk(128 * 11 * 11)
    assert chunk % tiled.TILE_K == 0 and math.ceil(128 * 11 * 11 / chunk) <= tiled.WEIGHT_GRAD_CHUNKS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(1, 1, 2, 2), (2, 3, 5, 7), (1, 2, 6, 4)])
def test_maxpool_matches_reference_with_ties(cuda_backend, dtype, x_shape):
    x = np.round(random(x_shape, dtype, 5))  # small integers: many tied windows
    x[0, 0] = 0  # a whole channel of ties, as after a ReLU
    y, argmax = cuda_backend.maxpool2d_forward(cuda_backend.to_device(x))
    assert_on_device(y, argmax)
    want_y, want_argmax = ORACLE.maxpool2d_forward(x)
    np.testing.assert_array_equal(cuda_backend.to_host(y), want_y)
    np.testing.assert_array_equal(cuda_backend.to_host(argmax), want_argmax)
    assert argmax.dtype == np.uint8
    dy = random(want_y.shape, dtype, 6)
    dx = cuda_backend.maxpool2d_backward(cuda_backend.to_device(dy), argmax, x_shape)
    assert_on_device(dx)
    np.testing.assert_array_equal(cuda_backend.to_host(dx), ORACLE.maxpool2d_backward(dy, want_argmax, x_shape))


STRIDED_CONV_CASES = [  # (N, C, H, W), (K, R, S), stride, padding (top, bottom, left, right)
    pytest.param((1, 2, 5, 6), (2, 3, 3), 2, (1, 1, 1, 1), id="stride2-odd-pad1"),
    pytest.param((2, 1, 7, 5), (2, 5, 5), 2, (0, 1, 0, 1), id="stride2-5x5-pad0101"),
    pytest.param((1, 2, 4, 5), (3, 3, 3), 1, (1, 1, 1, 1), id="same"),
    pytest.param((1, 1, 4, 4), (2, 2, 3), 3, (2, 0, 1, 2), id="stride3-unread-rows"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,kernel,stride,padding", STRIDED_CONV_CASES)
def test_strided_padded_conv_matches_reference(cuda_backend, dtype, x_shape, kernel, stride, padding):
    k, r, s = kernel
    x, w, b = random(x_shape, dtype, 1), random((k, x_shape[1], r, s), dtype, 2), random((k,), dtype, 3)
    dev, host = cuda_backend.to_device, cuda_backend.to_host
    y = cuda_backend.conv2d_forward(dev(x), dev(w), dev(b), True, stride, padding)
    assert_on_device(y)
    reference.assert_close(host(y), ORACLE.conv2d_forward(x, w, b, True, stride, padding), dtype, "y")
    dy = random(y.shape, dtype, 4)
    grads = cuda_backend.conv2d_backward(dev(dy), dev(x), dev(w), True, stride, padding)
    assert_on_device(*grads)
    want = ORACLE.conv2d_backward(dy, x, w, True, stride, padding)
    for got, expected, name in zip(grads, want, ("dx", "dw", "db")):
        reference.assert_close(host(got), expected, dtype, name)
    # input elements no output reads (the bottom rows of the stride-3 case) get exactly 0
    np.testing.assert_array_equal(host(grads[0])[want[0] == 0], 0)


def test_conv_padding_shorthands_reach_the_kernels_normalised(cuda_backend):
    """An int and a (rows, cols) pair for padding, as the boundary check accepts them."""
    x, w, b = random((1, 1, 5, 4), np.float32, 1), random((2, 1, 3, 2), np.float32, 2), random((2,), np.float32, 3)
    for padding in (1, (2, 0)):
        y = cuda_backend.conv2d_forward(x, w, b, False, 2, padding)
        reference.assert_close(cuda_backend.to_host(y), ORACLE.conv2d_forward(x, w, b, False, 2, padding),
                               np.float32, f"padding {padding}")


def test_padding_zeros_meet_infinite_weights_and_gradients(cuda_backend):
    """The padding is zeros that multiply like any input: an infinite weight whose tap reads the padding makes that
    output NaN (inf * 0), and an infinite dy whose window reaches the padding makes the weight gradients NaN."""
    x, w, b = random((1, 1, 4, 4), np.float32, 1), random((1, 1, 3, 3), np.float32, 2), np.zeros(1, np.float32)
    w[0, 0, 0, 0] = np.inf
    y = cuda_backend.conv2d_forward(x, w, b, True, 1, 1)
    want_y = ORACLE.conv2d_forward(x, w, b, True, 1, 1)
    assert np.isnan(want_y[0, 0, 0, 0])
    reference.assert_close(cuda_backend.to_host(y), want_y, np.float32, "y")
    w[0, 0, 0, 0] = 1
    dy = random((1, 1, 2, 2), np.float32, 3)
    dy[0, 0, 0, 0] = np.inf
    for got, want, name in zip(cuda_backend.conv2d_backward(dy, x, w, True, 2, (1, 0, 1, 0)),
                               ORACLE.conv2d_backward(dy, x, w, True, 2, (1, 0, 1, 0)), ("dx", "dw", "db")):
        reference.assert_close(cuda_backend.to_host(got), want, np.float32, name)


POOL_CASES = [  # (N, C, H, W), (kh, kw)
    pytest.param((2, 2, 7, 8), (3, 3), id="3x3-dropped-row-and-columns"),
    pytest.param((1, 3, 5, 7), (2, 3), id="2x3"),
    pytest.param((2, 2, 4, 5), (4, 5), id="global"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,size", POOL_CASES)
def test_maxpool_any_window_matches_reference(cuda_backend, dtype, x_shape, size):
    """Ties (small integers, a channel of zeros), two NaNs in one window (the first wins), +inf, and a NaN in a
    dropped row, which changes nothing."""
    dev, host = cuda_backend.to_device, cuda_backend.to_host
    x = np.round(random(x_shape, dtype, 5))
    x[0, 0] = 0
    x[-1, -1, 0, 1] = x[-1, -1, 1, 0] = np.nan
    x[0, -1, 1, 1] = np.inf
    if x_shape[2] % size[0]:
        x[0, 1, -1, 0] = np.nan
    y, argmax = cuda_backend.maxpool2d_forward(dev(x), size)
    assert_on_device(y, argmax)
    want_y, want_argmax = ORACLE.maxpool2d_forward(x, size)
    np.testing.assert_array_equal(host(y), want_y)
    np.testing.assert_array_equal(host(argmax), want_argmax)
    dy = random(want_y.shape, dtype, 6)
    dx = cuda_backend.maxpool2d_backward(dev(dy), argmax, x_shape, size)
    assert_on_device(dx)
    np.testing.assert_array_equal(host(dx), ORACLE.maxpool2d_backward(dy, want_argmax, x_shape, size))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,size", POOL_CASES)
def test_avgpool_matches_reference(cuda_backend, dtype, x_shape, size):
    dev, host = cuda_backend.to_device, cuda_backend.to_host
    x = random(x_shape, dtype, 7)
    y = cuda_backend.avgpool2d_forward(dev(x), size)
    assert_on_device(y)
    want_y = ORACLE.avgpool2d_forward(x, size)
    reference.assert_close(host(y), want_y, dtype, "y")
    dy = random(want_y.shape, dtype, 8)
    dx = cuda_backend.avgpool2d_backward(dev(dy), x_shape, size)
    assert_on_device(dx)
    want_dx = ORACLE.avgpool2d_backward(dy, x_shape, size)
    reference.assert_close(host(dx), want_dx, dtype, "dx")
    np.testing.assert_array_equal(host(dx)[want_dx == 0], 0)  # dropped rows and columns: exactly zero


def test_avgpool_int_size(cuda_backend):
    x = random((1, 1, 4, 6), np.float32, 9)
    reference.assert_close(cuda_backend.to_host(cuda_backend.avgpool2d_forward(x, 2)),
                           ORACLE.avgpool2d_forward(x, 2), np.float32)


def _batchnorm_inputs(x_shape, dtype):
    """x with a large mean (so a one-pass E[x^2] - E[x]^2 would lose digits) and a constant last channel (zero
    variance), gamma, beta, and positive running statistics."""
    c = x_shape[1]
    x = random(x_shape, dtype, 1) * 3 + 20
    x[:, -1] = 1.5
    return (x, random((c,), dtype, 2), random((c,), dtype, 3), random((c,), dtype, 4),
            (random((c,), dtype, 5) ** 2 + 0.5).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(3, 2, 3, 5), (2, 3, 1, 1)])
def test_batchnorm_training_matches_reference(cuda_backend, dtype, x_shape):
    """Training mode: y and the batch statistics, the running statistics moved as the oracle moves them (in place,
    on the device), the same results on a second run, and the backward."""
    dev, host = cuda_backend.to_device, cuda_backend.to_host
    x, gamma, beta, running_mean, running_var = _batchnorm_inputs(x_shape, dtype)
    want_mean, want_var = running_mean.copy(), running_var.copy()  # the oracle updates these in place
    dev_mean, dev_var = dev(running_mean), dev(running_var)
    got = cuda_backend.batchnorm2d_forward(dev(x), dev(gamma), dev(beta), dev_mean, dev_var, 0.9, 1e-3, True)
    assert_on_device(*got)
    want = ORACLE.batchnorm2d_forward(x, gamma, beta, want_mean, want_var, 0.9, 1e-3, True)
    for g, e, name in zip(got + (dev_mean, dev_var), want + (want_mean, want_var),
                          ("y", "mean", "inv_std", "running_mean", "running_var")):
        reference.assert_close(host(g), e, dtype, name)
    again = cuda_backend.batchnorm2d_forward(dev(x), dev(gamma), dev(beta), dev(running_mean), dev(running_var),
                                             0.9, 1e-3, True)
    for g, h in zip(got, again):
        np.testing.assert_array_equal(host(g), host(h))  # a fixed summation order: bitwise reproducible

    dy = random(x_shape, dtype, 6)
    grads = cuda_backend.batchnorm2d_backward(dev(dy), dev(x), dev(gamma), got[1], got[2])
    assert_on_device(*grads)
    want_grads = reference.batchnorm2d_backward(dy, x, gamma, want[1], want[2])
    for g, e, name in zip(grads, want_grads, ("dx", "dgamma", "dbeta")):
        reference.assert_close(host(g), e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_inference_uses_and_keeps_the_running_statistics(cuda_backend, dtype):
    dev, host = cuda_backend.to_device, cuda_backend.to_host
    x, gamma, beta, running_mean, running_var = _batchnorm_inputs((2, 3, 2, 3), dtype)
    dev_mean, dev_var = dev(running_mean), dev(running_var)
    got = cuda_backend.batchnorm2d_forward(dev(x), dev(gamma), dev(beta), dev_mean, dev_var, 0.9, 1e-3, False)
    assert_on_device(*got)
    want = ORACLE.batchnorm2d_forward(x, gamma, beta, running_mean.copy(), running_var.copy(), 0.9, 1e-3, False)
    for g, e, name in zip(got, want, ("y", "mean", "inv_std")):
        reference.assert_close(host(g), e, dtype, name)
    np.testing.assert_array_equal(host(dev_mean), running_mean)
    np.testing.assert_array_equal(host(dev_var), running_var)
    assert got[1] is not dev_mean  # a copy: a later training step must not change the backward's cache


def test_batchnorm_updates_host_running_statistics_in_place(cuda_backend):
    """Host running statistics (not what the model passes, but the boundary allows them) are updated in place;
    momentum and eps take the contract's defaults (Keras's 0.99 and 1e-3)."""
    x, gamma, beta, running_mean, running_var = _batchnorm_inputs((2, 2, 2, 2), np.float32)
    want_mean, want_var = running_mean.copy(), running_var.copy()
    y, _, _ = cuda_backend.batchnorm2d_forward(x, gamma, beta, running_mean, running_var)
    want_y, _, _ = ORACLE.batchnorm2d_forward(x, gamma, beta, want_mean, want_var)
    reference.assert_close(cuda_backend.to_host(y), want_y, np.float32, "y")
    reference.assert_close(running_mean, want_mean, np.float32, "running_mean")
    reference.assert_close(running_var, want_var, np.float32, "running_var")


def test_host_inputs_are_accepted(cuda_backend):
    x, w, b = random((1, 1, 4, 4), np.float32), random((2, 1, 3, 3), np.float32), np.zeros(2, np.float32)
    y = cuda_backend.conv2d_forward(x, w, b, relu=False)
    assert_on_device(y)
    reference.assert_close(cuda_backend.to_host(y), ORACLE.conv2d_forward(x, w, b, False), np.float32)


# ------------------------------------------------------------------------------------------ layers

@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_and_gather_layers(cuda_backend, dtype):
    L, dev, host = cuda_backend.layers, cuda_backend.to_device, cuda_backend.to_host
    a = random((3, 2, 5), dtype)
    zeros = cuda_backend.zeros_like(dev(a))
    assert_on_device(zeros)
    np.testing.assert_array_equal(host(zeros), np.zeros_like(a))

    data, labels, idx = random((6, 1, 3, 2), dtype), np.arange(6, dtype=np.uint8), np.array([4, 0, 4, 2])
    rows = cuda_backend.take_rows(dev(data), dev(idx))
    assert_on_device(rows)
    np.testing.assert_array_equal(host(rows), data[idx])
    np.testing.assert_array_equal(host(cuda_backend.take_rows(dev(labels), dev(idx)[1:3])), labels[idx[1:3]])

    dy, y = random((2, 3, 4), dtype, 1), np.maximum(random((2, 3, 4), dtype, 2), 0)
    np.testing.assert_array_equal(host(L.relu_backward(dev(dy), dev(y))), numpy_layers.relu_backward(dy, y))

    x = random((2, 3, 2, 2), dtype, 3)
    x.flat[:5] = [np.nan, -np.inf, np.inf, -0.0, 0.0]
    relu = L.relu_forward(dev(x))
    assert_on_device(relu)
    np.testing.assert_array_equal(host(relu), numpy_layers.relu_forward(x))  # NaN stays NaN, -inf becomes 0


def test_layers_module_matches_numpy_layers(cuda_backend):
    public = {name for name, value in vars(numpy_layers).items()
              if callable(value) and not name.startswith("_") and value.__module__ == numpy_layers.__name__}
    missing = sorted(name for name in public if not callable(getattr(cuda_backend.layers, name, None)))
    assert not missing, f"cuda layers lacks {missing}"


def test_pixels_scale_like_numpy(cuda_backend):
    dev, host = cuda_backend.to_device, cuda_backend.to_host
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    scaled = cuda_backend.as_float_images(dev(pixels))
    assert_on_device(scaled)
    np.testing.assert_array_equal(host(scaled), host_arrays.as_float_images(pixels))
    floats = dev(random((2, 1, 3, 3), np.float32))
    assert cuda_backend.as_float_images(floats) is floats


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_layers(cuda_backend, dtype):
    L, dev, host = cuda_backend.layers, cuda_backend.to_device, cuda_backend.to_host
    x, w, b, dy = random((3, 37), dtype, 1), random((37, 4), dtype, 2), random((4,), dtype, 3), random((3, 4), dtype, 4)
    y = L.dense_forward(dev(x), dev(w), dev(b))
    assert_on_device(y)
    reference.assert_close(host(y), numpy_layers.dense_forward(x, w, b), dtype)
    grads = L.dense_backward(dev(dy), dev(x), dev(w))
    assert_on_device(*grads)
    for got, want in zip(grads, numpy_layers.dense_backward(dy, x, w)):
        reference.assert_close(host(got), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_and_argmax(cuda_backend, dtype):
    L, dev, host = cuda_backend.layers, cuda_backend.to_device, cuda_backend.to_host
    logits = random((5, 4), dtype) * 30  # large logits: the max-shift must keep exp finite
    logits[1] = 2  # a tied row: the first class wins
    labels = np.array([0, 0, 3, 1, 2], dtype=np.uint8)
    loss, dlogits, correct = L.softmax_cross_entropy(dev(logits), dev(labels))
    want_loss, want_dlogits, want_correct = numpy_layers.softmax_cross_entropy(logits, labels)
    assert isinstance(loss, float) and isinstance(correct, int)
    assert_on_device(dlogits)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert correct == want_correct
    reference.assert_close(host(dlogits), want_dlogits, dtype)
    predictions = L.argmax_rows(dev(logits))
    assert isinstance(predictions, np.ndarray) and predictions.dtype == np.int64
    np.testing.assert_array_equal(predictions, numpy_layers.argmax_rows(logits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout(cuda_backend, dtype):
    L, dev, host = cuda_backend.layers, cuda_backend.to_device, cuda_backend.to_host
    x = random((3, 50), dtype)
    rng = cuda_backend.make_dropout_rng([7, 2])
    y, mask = L.dropout_forward(dev(x), 0.5, rng)
    assert_on_device(y, mask)
    m = host(mask)
    assert set(np.unique(m)) <= {0.0, 2.0} and 0.3 < (m > 0).mean() < 0.7
    np.testing.assert_array_equal(host(y), x * m)
    dy = random(x.shape, dtype, 1)
    np.testing.assert_array_equal(host(L.dropout_backward(dev(dy), mask)), dy * m)

    # Same seed, same masks; a snapshot taken now restores the generator exactly.
    again = cuda_backend.make_dropout_rng([7, 2])
    np.testing.assert_array_equal(host(L.dropout_forward(dev(x), 0.5, again)[1]), m)
    snapshot = cuda_backend.dropout_rng_state(rng)
    next_mask = host(L.dropout_forward(dev(x), 0.5, rng)[1])
    assert not np.array_equal(next_mask, m)
    restored = cuda_backend.restore_dropout_rng(snapshot)
    np.testing.assert_array_equal(host(L.dropout_forward(dev(x), 0.5, restored)[1]), next_mask)

    # Any shape: elements are drawn in flat order, so a 4-D input gets its flattened twin's mask.
    x4 = random((2, 3, 5, 5), dtype, 2)
    y4, mask4 = L.dropout_forward(dev(x4), 0.5, cuda_backend.make_dropout_rng(3))
    assert y4.shape == mask4.shape == x4.shape
    np.testing.assert_array_equal(host(y4), x4 * host(mask4))
    flat_mask = L.dropout_forward(dev(x4.reshape(2, -1)), 0.5, cuda_backend.make_dropout_rng(3))[1]
    np.testing.assert_array_equal(host(mask4).reshape(2, -1), host(flat_mask))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_matches_numpy(cuda_backend, dtype):
    L, dev, host = cuda_backend.layers, cuda_backend.to_device, cuda_backend.to_host
    param = random((4, 3), dtype)
    want_p, want_m, want_v = param.copy(), np.zeros_like(param), np.zeros_like(param)
    p, m, v = dev(param), cuda_backend.zeros_like(dev(param)), cuda_backend.zeros_like(dev(param))
    for step in range(3):
        grad = random(param.shape, dtype, step + 1)
        alpha = 1e-3 * np.sqrt(1 - 0.999 ** (step + 1)) / (1 - 0.9 ** (step + 1))
        L.adam_update(p, dev(grad), m, v, alpha, 0.9, 0.999, 1e-7)
        numpy_layers.adam_update(want_p, grad, want_m, want_v, alpha, 0.9, 0.999, 1e-7)
    for got, want in ((p, want_p), (m, want_m), (v, want_v)):
        reference.assert_close(host(got), want, dtype)


# ------------------------------------------------------------------------------------------ the whole model

class _MaskReplay:
    """A numpy Generator stand-in for numpy_layers.dropout_forward that reproduces a given mask: random() returns
    0 (kept) where the mask is non-zero and 1 (dropped) elsewhere."""

    def __init__(self, mask):
        self.mask = mask

    def random(self, shape, dtype):
        return np.where(self.mask > 0, 0.0, 1.0).astype(dtype).reshape(shape)


# mnist-cnn's layer kinds, narrow, on a small image whose pools each drop a row and a column: every op of a training
# step, on few enough outputs for the simulator (a Python thread per CUDA thread)
SMALL_CNN = [Conv2D(4, 3, activation="relu"), MaxPool2D(2), Conv2D(8, 3, activation="relu"), MaxPool2D(2), Flatten(),
             Dropout(0.5), Dense(10, activation="softmax")]


def test_model_step_matches_im2col_and_stays_on_device(cuda_backend, monkeypatch):
    """One float32 training step of a small network with mnist-cnn's layer kinds on two images, against the im2col
    model and the float64 oracle model with the same parameters and the same dropout mask. (mnist-cnn itself on the
    cuda Model runs in test_model.py on a GPU.)"""
    masks = []
    dropout_forward = cuda_backend.layers.dropout_forward

    def recording_dropout(x, rate, rng):
        y, mask = dropout_forward(x, rate, rng)
        masks.append(cuda_backend.to_host(mask))
        return y, mask

    monkeypatch.setattr(cuda_backend.layers, "dropout_forward", recording_dropout)
    network = build(SMALL_CNN, (1, 15, 15), name="small-cnn")
    x = np.random.default_rng(0).random((2, *network.input_shape), dtype=np.float32)
    labels = np.array([3, 7])
    model = Model(cuda_backend, seed=0, dtype=np.float32, network=network)
    loss, correct = model.forward_backward(cuda_backend.to_device(x), cuda_backend.to_device(labels),
                                           cuda_backend.make_dropout_rng(0))
    assert_on_device(*model.grads.values(), *model.params.values())
    assert model.grads.keys() == model.params.keys()
    assert 0 < (masks[0] > 0).mean() < 1, "the mask keeps some features and drops others"

    want = Model("im2col", seed=0, dtype=np.float32, network=network)
    want_loss, want_correct = want.forward_backward(x, labels, _MaskReplay(masks[0]))
    assert loss == pytest.approx(want_loss, rel=1e-5) and correct == want_correct
    for name, grad in want.grads.items():
        np.testing.assert_allclose(cuda_backend.to_host(model.grads[name]), grad, rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    oracle = Model("reference", seed=0, dtype=np.float64, network=network)
    oracle_loss, _ = oracle.forward_backward(x.astype(np.float64), labels, _MaskReplay(masks[0]))
    assert loss == pytest.approx(oracle_loss, rel=reference.FLOAT32_TOL)
    for name, grad in oracle.grads.items():
        assert np.abs(grad).max() > 0, f"d{name} is all zeros: comparing it would prove nothing"
        reference.assert_close(cuda_backend.to_host(model.grads[name]), grad, np.float32, f"cuda d{name} vs oracle")


# ------------------------------------------------------------------------------------------ availability errors

def _import_cuda_backend(prelude, env):
    code = prelude + textwrap.dedent("""
        from numba_cnn.kernels import BackendUnavailable, get_backend
        try:
            get_backend("cuda")
        except BackendUnavailable as exc:
            print("UNAVAILABLE:", exc)
        else:
            print("AVAILABLE")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_missing_numba_cuda_is_a_clear_error():
    blocker = textwrap.dedent("""
        import sys

        class BlockNumbaCuda:  # as if numba-cuda (and numba's own old numba.cuda) were not installed
            def find_spec(self, name, path=None, target=None):
                if name == "numba_cuda" or name.startswith(("numba_cuda.", "numba.cuda")):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, BlockNumbaCuda())
    """)
    out = _import_cuda_backend(blocker, dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))
    assert out.startswith("UNAVAILABLE:") and "numba-cuda" in out
    assert 'pip install -e ".[cuda]"' in out and "NUMBA_ENABLE_CUDASIM=1" in out


def test_no_gpu_and_no_simulator_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = _import_cuda_backend("", env)
    if out.startswith("AVAILABLE"):
        pytest.skip("this machine has a usable CUDA GPU")
    assert out.startswith("UNAVAILABLE:") and "GPU" in out and "NUMBA_ENABLE_CUDASIM=1" in out


# ------------------------------------------------------------------------------------------ float32 hygiene

_PTX_CHECK = textwrap.dedent("""
    import types
    import numpy as np
    import numba
    from numba import cuda
    import numba.cuda.dispatcher
    from numba.cuda.random import xoroshiro128p_dtype

    # Compiling to PTX needs NVVM but no device: pretend one (compute capability 9.0) is there.
    cuda.is_available = lambda: True
    numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    from numba_cnn.kernels.cuda import kernels as K, layers as L, runtime as R

    a = lambda *shape: np.zeros(shape, np.float32)
    one, states, index = np.float32(1), np.zeros(4, xoroshiro128p_dtype), np.zeros(2, np.int64)
    u8 = np.zeros((1, 1, 1, 1), np.uint8)
    cases = [
        (K._conv_forward, (a(1, 1, 3, 3), a(1, 1, 2, 2), a(1), True, 2, 1, 0, a(1, 1, 2, 2))),
        (K._conv_weight_grad_per_image, (a(1, 1, 2, 2), a(1, 1, 3, 3), 2, 1, 0, a(1, 1, 1, 2, 2))),
        (K._sum_rows, (a(2, 3), a(3))),
        (K._conv_input_grad, (a(1, 1, 2, 2), a(1, 1, 2, 2), 2, 1, 0, a(1, 1, 3, 3))),
        (K._maxpool_forward, (a(1, 1, 2, 3), 2, 3, a(1, 1, 1, 1), u8)),
        (K._maxpool_backward, (a(1, 1, 1, 1), u8, 2, 3, a(1, 1, 2, 3))),
        (K._avgpool_forward, (a(1, 1, 2, 3), 2, 3, one, a(1, 1, 1, 1))),
        (K._avgpool_backward, (a(1, 1, 1, 1), 2, 3, one, a(1, 1, 2, 3))),
        (K._batchnorm_batch_stats, (a(2, 3, 4), one, one, one, one, one, a(3), a(3), a(3), a(3))),
        (K._batchnorm_running_stats, (a(3), a(3), one, one, a(3), a(3))),
        (K._batchnorm_normalise, (a(2, 3, 4), a(3), a(3), a(3), a(3), a(2, 3, 4))),
        (K._batchnorm_grad_sums, (a(2, 3, 4), a(2, 3, 4), a(3), a(3), a(3), a(3))),
        (K._batchnorm_input_grad, (a(2, 3, 4), a(2, 3, 4), a(3), a(3), a(3), a(3), a(3), one, a(2, 3, 4))),
        (R._fill_zero, (a(3),)),
        (R._take_rows, (a(3, 2), index, a(2, 2))),
        (L._relu_forward, (a(3), a(3))),
        (L._relu_backward, (a(3), a(3), a(3))),
        (L._multiply, (a(3), a(3), a(3))),
        (L._dropout, (a(3), states, one, one, a(3), a(3))),
        (L._dense_forward, (a(2, 3), a(3, 4), a(4), a(2, 4))),
        (L._dense_input_grad, (a(2, 4), a(3, 4), a(2, 3))),
        (L._dense_weight_grad, (a(2, 4), a(2, 3), a(3, 4))),
        (R.sum_outer_inner, (a(2, 3, 4), a(3))),
        (L._softmax_cross_entropy, (a(2, 3), np.zeros(2, np.uint8), one, one, a(2, 3), a(2, 2))),
        (L._argmax_rows, (a(2, 3), index)),
        (L._adam, (a(3), a(3), a(3), a(3), one, one, one, one)),
    ]
    # numba.cuda.random's uniform_float32 converts its uint64 draw through float64: that one is not ours.
    LIBRARY_F64 = ("cvt.rn.f64.u64", "mul.f64", "cvt.rn.f32.f64")
    for kernel, args in cases:
        ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(numba.typeof(v) for v in args), cc=(9, 0))
        for line in ptx.splitlines():
            line = line.strip()
            if ".f64" in line and not line.startswith(".reg"):
                if not (kernel is L._dropout and line.startswith(LIBRARY_F64)):
                    print("FLOAT64", kernel.__name__, line)
    print("CHECKED", len(cases))
""")


def test_float32_kernels_compile_to_float32_only_ptx():
    """Compiles every kernel for float32 to PTX (no GPU needed, but NVVM: e.g. pip install
    "cuda-toolkit[nvvm,nvrtc]==13.*" and put its lib folder on LD_LIBRARY_PATH) and fails on float64
    instructions: the simulator runs kernels as Python and cannot see a float64 literal widening float32 math."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", _PTX_CHECK], capture_output=True, text=True, env=env, timeout=300)
    if "CHECKED" not in result.stdout:
        if "nvvm" in result.stderr.lower() or "nvrtc" in result.stderr.lower():
            pytest.skip("NVVM/NVRTC not found: cannot compile to PTX here")
        pytest.fail(result.stderr[-3000:])
    assert "FLOAT64" not in result.stdout, result.stdout


def test_device_copies_have_canonical_strides(cuda_backend):
    """numpy calls x[None, None] C-contiguous whatever the strides of its length-1 axes; numba-cuda on a GPU checks
    every stride and refused such a copy as non-contiguous (found on an H200), so to_device makes fresh strides."""
    x = np.zeros((2, 15), np.float32)[None, None]
    assert x.flags.c_contiguous and x.strides[0] != 2 * 15 * 4
    assert cuda_backend.to_device(x).strides == (120, 120, 60, 4)


@pytest.mark.parametrize("seed", [0, 1, 12345, [0, 2], [1, 2], [2, 2], [7, 2]])
def test_dropout_seeds_fit_the_int64_a_gpu_seeds_through(cuda_backend, seed):
    from numba_cnn.kernels.cuda import dropout_rng

    assert 0 <= dropout_rng._seed_int(seed) < 2 ** 63
