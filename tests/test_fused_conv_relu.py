"""The jit backend's fused ReLU backward of a convolution (kernels README: conv2d_relu_backward, a backward-only fused
op): bitwise the composition it replaces (layers.relu_backward, then conv2d_backward) on every path a convolution
can take (the column tiles, which apply the select as they copy dy, the channels-last tiles, Winograd's weight
gradient and the strided kernels, which run the composition), with NaN where the select has to decide; against the
float64 oracle; the fusion pass takes it on jit only, and a Model gives bitwise the same results fused or not."""

import numpy as np
import pytest

from fused_checks import assert_fused_is_the_composition, assert_model_fused_or_not, conv_operands
from numba_cnn.kernels import get_backend, reference
from numba_cnn.kernels.layers import relu_backward
from numba_cnn.network import from_dict
from numba_cnn.network.plan import ConvRelu, plan

jit = get_backend("jit")

# (N, C, H, W), K, (R, S), stride, padding, the path's name as `bench` prints it
CASES = [
    pytest.param((3, 1, 28, 28), 6, (5, 5), 1, (2, 2, 2, 2), "column", id="lenet_conv1_columns"),
    pytest.param((2, 6, 14, 14), 16, (5, 5), 1, (0, 0, 0, 0), "column", id="lenet_conv2_columns"),
    pytest.param((2, 32, 9, 9), 64, (3, 3), 1, (1, 1, 1, 1), "dw by Winograd", id="wide_winograd"),
    pytest.param((2, 20, 9, 9), 64, (3, 3), 1, (1, 1, 1, 1), "dw tiles", id="wide_channels_last"),
    pytest.param((2, 4, 9, 8), 5, (3, 3), 2, (1, 1, 1, 1), "strided", id="strided"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,kernel,stride,padding,path", CASES)
def test_fused_is_bitwise_the_composition(shape, k, kernel, stride, padding, path, dtype):
    rng = np.random.default_rng(1)
    x, w, y, dy = conv_operands(rng, shape, k, kernel, stride, padding, dtype)
    # NaN and infinities where the select decides: a NaN dy where the ReLU clipped gives 0, a NaN y passes dy on
    dy[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    y[0, 0, 0, :3] = 0
    y[0, 1, 1, 1] = np.nan
    assert_fused_is_the_composition(
        lambda dy_in, need_dx: jit.conv2d_relu_backward(dy_in, y, x, w, need_dx, stride, padding),
        lambda need_dx: jit.conv2d_backward(relu_backward(dy, y), x, w, need_dx, stride, padding), dy, path)


@pytest.mark.parametrize("shape,k,kernel,stride,padding,path", CASES)
def test_fused_against_the_oracle(shape, k, kernel, stride, padding, path):
    rng = np.random.default_rng(2)
    x, w, y, dy = conv_operands(rng, shape, k, kernel, stride, padding, np.float32)
    got = jit.conv2d_relu_backward(dy, y, x, w, True, stride, padding)
    want = reference.conv2d_backward(relu_backward(dy.astype(np.float64), y.astype(np.float64)), x, w, True, stride,
                                     padding)
    for name, a, e in zip(("dx", "dw", "db"), got, want):
        reference.assert_close(a, e, np.float32, name)


def _network():
    return from_dict({"layers": [
        {"kind": "Conv2D", "filters": 6, "kernel_size": 5, "padding": "same", "activation": "relu"},
        {"kind": "AvgPool2D", "pool_size": 3},  # a 2x2 one would make the pair a ConvReluAvgPool
        {"kind": "Conv2D", "filters": 8, "kernel_size": 3},
        {"kind": "ReLU"},
        {"kind": "Flatten"},
        {"kind": "Dense", "units": 10, "activation": "softmax"}]}, (1, 12, 12))


def test_fusion_pass_and_model_fused_or_not(rng):
    """Both convolutions (one with its activation, one followed by a ReLU layer) become ConvRelu steps on jit, none
    on im2col (which has no such op); a training pass gives bitwise the same loss and gradients with the fused op
    and with every layer on its own."""
    network = _network()
    assert [type(s.runner) for s in plan(network, jit)].count(ConvRelu) == 2
    assert not any(isinstance(s.runner, ConvRelu) for s in plan(network, get_backend("im2col")))
    x = rng.uniform(0, 1, (5, 1, 12, 12)).astype(np.float32)
    assert_model_fused_or_not(jit, network, x, np.array([1, 0, 9, 4, 4]))


def test_the_check_refuses_a_mismatched_y(rng):
    x, w, y, dy = conv_operands(rng, (2, 1, 8, 8), 4, (3, 3), 1, (0, 0, 0, 0), np.float32)
    with pytest.raises(ValueError, match="y has shape"):
        jit.conv2d_relu_backward(dy, y[:, :, :3], x, w, True, 1, 0)
