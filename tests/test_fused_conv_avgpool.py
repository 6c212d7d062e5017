"""The jit backend's fused backward of conv + ReLU + average pooling, 2x2 or global (kernels README:
conv2d_relu_avgpool2d, a backward-only fused op): bitwise the composition it replaces (avgpool2d_backward, then
conv2d_relu_backward) on the column tiles, which spread a 2x2 pool's gradient as they copy it into their border, for
a global pool of a channels-last output (spread through the select in one pass), and on the paths that run the
composition, with NaN and infinities where the ReLU's select decides and odd outputs whose last row and column no
window covers; against the float64 oracle and finite differences; the fusion pass takes it on jit only (conv + ReLU
then AvgPool2D 2x2 or GlobalAvgPool2D), and a Model gives bitwise the same results fused or not."""

import numpy as np
import pytest

from fused_checks import assert_fused_is_the_composition, assert_model_fused_or_not, channels_last, conv_operands
from numba_cnn.kernels import get_backend, reference
from numba_cnn.kernels.layers import relu_backward
from numba_cnn.network import from_dict
from numba_cnn.network.plan import ConvReluAvgPool, plan

jit = get_backend("jit")

# (N, C, H, W), K, (R, S), stride, padding, the path's name as `bench` prints it
CASES = [
    pytest.param((3, 1, 28, 28), 6, (5, 5), 1, (2, 2, 2, 2), "pool's gradient spread", id="lenet_conv1_columns"),
    pytest.param((2, 6, 14, 14), 16, (5, 5), 1, (0, 0, 0, 0), "pool's gradient spread", id="lenet_conv2_columns"),
    pytest.param((2, 3, 13, 11), 4, (3, 3), 1, (1, 1, 1, 1), "pool's gradient spread", id="odd_output_columns"),
    pytest.param((2, 32, 9, 9), 64, (3, 3), 1, (1, 1, 1, 1), "dw tiles", id="wide_channels_last_odd"),
    pytest.param((2, 4, 13, 12), 5, (3, 3), 2, (1, 1, 1, 1), "strided", id="strided_odd"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,kernel,stride,padding,path", CASES)
def test_fused_is_bitwise_the_composition(shape, k, kernel, stride, padding, path, dtype):
    rng = np.random.default_rng(1)
    x, w, y, dy = conv_operands(rng, shape, k, kernel, stride, padding, dtype, pooled=True)
    # NaN and infinities where the select decides: under a clipped y they give 0, a NaN y passes them on
    dy[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    y[0, 0, 0, :4] = 0
    y[0, 1, 1, 1] = np.nan
    dy[0, 1, 0, 0] = np.nan

    def composed(need_dx):
        spread = np.array(jit.avgpool2d_backward(dy, y.shape, (2, 2)))
        return jit.conv2d_relu_backward(spread, y, x, w, need_dx, stride, padding)

    assert_fused_is_the_composition(
        lambda dy_in, need_dx: jit.conv2d_relu_avgpool2d_backward(dy_in, y, x, w, need_dx, stride, padding),
        composed, dy, path)


@pytest.mark.parametrize("shape,k,kernel,stride,padding,path", CASES)
def test_fused_against_the_oracle(shape, k, kernel, stride, padding, path):
    rng = np.random.default_rng(2)
    x, w, y, dy = conv_operands(rng, shape, k, kernel, stride, padding, np.float32, pooled=True)
    got = jit.conv2d_relu_avgpool2d_backward(dy, y, x, w, True, stride, padding)
    spread = reference.avgpool2d_backward(dy.astype(np.float64), y.shape, (2, 2))
    want = reference.conv2d_backward(relu_backward(spread, y.astype(np.float64)), x, w, True, stride, padding)
    for name, a, e in zip(("dx", "dw", "db"), got, want):
        reference.assert_close(a, e, np.float32, name)


def _network():
    return from_dict({"layers": [
        {"kind": "Conv2D", "filters": 6, "kernel_size": 5, "padding": "same", "activation": "relu"},
        {"kind": "AvgPool2D"},
        {"kind": "Conv2D", "filters": 8, "kernel_size": 3},
        {"kind": "ReLU"},
        {"kind": "AvgPool2D"},
        {"kind": "Flatten"},
        {"kind": "Dense", "units": 10, "activation": "softmax"}]}, (1, 13, 13))


def test_fusion_pass_and_model_fused_or_not(rng):
    """Both conv + pool pairs (one conv with its activation, one followed by a ReLU layer; the first pool's output
    odd) become ConvReluAvgPool steps on jit, none on im2col (which has no such op); a training pass gives bitwise
    the same loss and gradients fused and with every layer on its own."""
    network = _network()
    assert [type(s.runner) for s in plan(network, jit)].count(ConvReluAvgPool) == 2
    assert not any(isinstance(s.runner, ConvReluAvgPool) for s in plan(network, get_backend("im2col")))
    x = rng.uniform(0, 1, (5, 1, 13, 13)).astype(np.float32)
    assert_model_fused_or_not(jit, network, x, np.array([1, 0, 9, 4, 4]))


def test_the_check_refuses_a_dy_of_the_wrong_shape(rng):
    x, w, y, dy = conv_operands(rng, (2, 1, 8, 8), 4, (3, 3), 1, (0, 0, 0, 0), np.float32, pooled=True)
    with pytest.raises(ValueError, match="pooled output has shape"):
        jit.conv2d_relu_avgpool2d_backward(y, y, x, w, True, 1, 0)
    with pytest.raises(ValueError, match="y has shape"):
        jit.conv2d_relu_avgpool2d_backward(dy, y[:, :, :3], x, w, True, 1, 0)


@pytest.mark.parametrize("shape,k,kernel,stride,padding,path", [CASES[2], CASES[4]])
@pytest.mark.parametrize("wrt", ["x", "w"])
def test_fused_matches_finite_differences(shape, k, kernel, stride, padding, path, wrt):
    """In float64, dx and dw of the fused backward (the column tiles' spread, an odd output, and the composition
    on the strided path) against central differences of avgpool(relu(conv(x, w)))."""
    from gradcheck import assert_gradient_matches, dotted_with

    rng = np.random.default_rng(13)
    x, w, y, dy = conv_operands(rng, shape, k, kernel, stride, padding, np.float64, pooled=True)
    b = np.zeros(k)
    pre = jit.conv2d_forward(x, w, b, False, stride, padding)
    if np.abs(pre).min() < 1e-4:
        pytest.skip("an output within the step of the ReLU's kink")
    inputs = {"x": x, "w": w}

    def forward(a):
        args = dict(inputs, **{wrt: a})
        conv = jit.conv2d_forward(args["x"], args["w"], b, True, stride, padding)
        return np.array(jit.avgpool2d_forward(conv, (2, 2)))

    grads = jit.conv2d_relu_avgpool2d_backward(dy, y, x, w, True, stride, padding)
    assert_gradient_matches(grads["xw".index(wrt)], dotted_with(forward, dy), inputs[wrt].copy(),
                            what=f"fused d{wrt} ({path})")


# (N, C, H, W), K, kernel, padding, y channels-last (as Winograd's forward stores it) or NCHW (the column tiles')
GLOBAL_CASES = [
    pytest.param((2, 32, 9, 7), 64, (5, 5), (2, 2, 2, 2), True, id="winograd_channels_last"),
    pytest.param((2, 32, 9, 7), 64, (5, 5), (2, 2, 2, 2), False, id="winograd_nchw_y"),
    pytest.param((2, 3, 9, 8), 6, (3, 3), (1, 1, 1, 1), False, id="columns_nchw"),
]


def _global_operands(rng, shape, k, kernel, padding, dtype, y_channels_last=False):
    x, w, y, _ = conv_operands(rng, shape, k, kernel, 1, padding, dtype)
    dy = rng.standard_normal(y.shape[:2] + (1, 1)).astype(dtype)
    return x, w, channels_last(y) if y_channels_last else y, dy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,kernel,padding,y_channels_last", GLOBAL_CASES)
def test_global_pool_fused_is_bitwise_the_composition(shape, k, kernel, padding, y_channels_last, dtype):
    rng = np.random.default_rng(5)
    x, w, y, dy = _global_operands(rng, shape, k, kernel, padding, dtype, y_channels_last)
    dy[0, 1, 0, 0], dy[1, 2, 0, 0] = np.inf, np.nan
    y[0, 1, 0, :3] = 0
    y[0, 1, 1, 1] = np.nan
    size = y.shape[2:]

    def composed(need_dx):
        spread = np.array(jit.avgpool2d_backward(dy, y.shape, size))
        with np.errstate(invalid="ignore"):
            return jit.conv2d_relu_backward(spread, y, x, w, need_dx, 1, padding)

    path = "global spread through the ReLU's select" if y_channels_last else "avgpool2d_backward: spread"
    with np.errstate(invalid="ignore"):
        assert_fused_is_the_composition(
            lambda dy_in, need_dx: jit.conv2d_relu_avgpool2d_backward(dy_in, y, x, w, need_dx, 1, padding, size),
            composed, dy, path)


@pytest.mark.parametrize("shape,k,kernel,padding,y_channels_last", GLOBAL_CASES)
def test_global_pool_fused_against_the_oracle(shape, k, kernel, padding, y_channels_last):
    rng = np.random.default_rng(6)
    x, w, y, dy = _global_operands(rng, shape, k, kernel, padding, np.float32, y_channels_last)
    got = jit.conv2d_relu_avgpool2d_backward(dy, y, x, w, True, 1, padding, y.shape[2:])
    spread = reference.avgpool2d_backward(dy.astype(np.float64), y.shape, y.shape[2:])
    want = reference.conv2d_backward(relu_backward(spread, y.astype(np.float64)), x, w, True, 1, padding)
    for name, a, e in zip(("dx", "dw", "db"), got, want):
        reference.assert_close(a, e, np.float32, name)


def test_global_pool_fusion_and_model_fused_or_not(rng):
    """A conv with its ReLU then GlobalAvgPool2D becomes one ConvReluAvgPool step (global_pool) on jit, on
    Winograd's channels-last forward here; a training pass gives bitwise the same loss and gradients fused and
    not."""
    network = from_dict({"layers": [
        {"kind": "Conv2D", "filters": 32, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"kind": "GlobalAvgPool2D"},
        {"kind": "Dense", "units": 10, "activation": "softmax"}]}, (16, 9, 8))
    steps = plan(network, jit)
    assert [(type(s.runner), getattr(s.runner, "global_pool", None)) for s in steps[:1]] == [(ConvReluAvgPool, True)]
    assert not any(isinstance(s.runner, ConvReluAvgPool) for s in plan(network, get_backend("im2col")))
    x = rng.uniform(0, 1, (5, 16, 9, 8)).astype(np.float32)
    assert_model_fused_or_not(jit, network, x, np.array([1, 0, 9, 4, 4]))


def test_the_check_refuses_a_global_dy_of_the_wrong_shape(rng):
    x, w, y, dy = _global_operands(rng, (2, 3, 6, 6), 4, (3, 3), (1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="pooled output has shape"):
        jit.conv2d_relu_avgpool2d_backward(dy, y, x, w, True, 1, 1, size=(3, 3))
