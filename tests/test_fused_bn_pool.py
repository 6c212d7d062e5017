"""The jit backend's fused BatchNorm + ReLU + 2x2 max-pool (kernels README: batchnorm2d_relu_maxpool2d_*). The
forward: bitwise the composition it replaces (batchnorm2d_relu_forward, then maxpool2d_forward), pooled values,
argmax, statistics and running statistics, in training and inference, for x in either layout (channels-last: the
kernel that pools the values as it makes them), odd sizes, NaN and infinities; against the float64 oracle. The
backward: the composition it replaces (relu_backward on the pooled output, maxpool2d_backward, then
batchnorm2d_backward) for x in either layout (NCHW: the composition itself, bitwise; channels-last: the kernel that
routes the pool's gradient as it reads it, the same sums in the same order but compiled apart, so within rounding),
odd sizes whose last row and column no window covers, NaN and infinities where the ReLU's select decides; against
the float64 oracle and, in float64, finite differences. Both: the same bits on one and two threads; the fusion pass
takes them on jit only."""

import numpy as np
import pytest

from gradcheck import assert_gradient_matches, dotted_with
from numba_cnn.kernels import get_backend, reference
from numba_cnn.kernels.jit.paths import PathLog
from numba_cnn.kernels.layers import relu_backward
from numba_cnn.network import from_dict
from numba_cnn.network.plan import BatchNormReluPool, plan

jit = get_backend("jit")
MOMENTUM, EPS = 0.9, 1e-3
SHAPES = [
    pytest.param((2, 16, 6, 8), id="even"),
    pytest.param((3, 8, 7, 5), id="odd_h_w"),
    pytest.param((1, 3, 5, 2), id="batch1_one_window_column"),
    pytest.param((4, 32, 16, 16), id="vgg_block"),
]


def _channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _operands(rng, shape, dtype, layout):
    """x (1 + 2 N(0, 1), so the ReLU clips some), gamma, beta, the fused forward's statistics, and the pool's
    output, argmax and a random dy of its shape."""
    c = shape[1]
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    x = _channels_last(x) if layout == "channels_last" else x
    gamma, beta = rng.uniform(0.5, 2.0, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    y, mean, inv_std = jit.batchnorm2d_relu_forward(x, gamma, beta, np.zeros(c, dtype), np.ones(c, dtype), MOMENTUM,
                                                    EPS, True)
    pooled, argmax = (np.array(a) for a in jit.maxpool2d_forward(y, (2, 2)))
    dy = rng.standard_normal(pooled.shape).astype(dtype)
    return x, gamma, np.array(mean), np.array(inv_std), pooled, argmax, dy


def _composed(dy, y, argmax, x, gamma, mean, inv_std):
    routed = jit.maxpool2d_backward(relu_backward(dy, y), argmax, x.shape, (2, 2))
    return jit.batchnorm2d_backward(routed, x, gamma, mean, inv_std)


def _forward_operands(rng, shape, dtype, layout):
    """x (1 + 2 N(0, 1)) in `layout`, gamma, beta, and running statistics away from 0 and 1."""
    c = shape[1]
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    x = _channels_last(x) if layout == "channels_last" else x
    return (x, rng.uniform(0.5, 2.0, c).astype(dtype), rng.standard_normal(c).astype(dtype),
            rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2.0, c).astype(dtype))


def _composed_forward(x, gamma, beta, running_mean, running_var, training):
    y, mean, inv_std = jit.batchnorm2d_relu_forward(x, gamma, beta, running_mean, running_var, MOMENTUM, EPS,
                                                    training)
    pooled, argmax = jit.maxpool2d_forward(y, (2, 2))
    return [np.array(a) for a in (pooled, argmax, mean, inv_std)]


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_forward_is_the_composition_bitwise_and_the_oracle(shape, layout, dtype, training, rng):
    x, gamma, beta, running_mean, running_var = _forward_operands(rng, shape, dtype, layout)
    fused_stats, composed_stats = (running_mean.copy(), running_var.copy()), (running_mean.copy(), running_var.copy())
    with PathLog() as log:
        got = [np.array(a) for a in jit.batchnorm2d_relu_maxpool2d_forward(x, gamma, beta, *fused_stats, MOMENTUM,
                                                                           EPS, training)]
    pooled_as_made = any("2x2 max-pooled as made" in path for path in log.paths)
    assert pooled_as_made == (layout == "channels_last"), log.paths
    want = _composed_forward(x, gamma, beta, *composed_stats, training)
    for name, g, w in zip(("y", "argmax", "mean", "inv_std"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), name
    assert got[0].shape == (shape[0], shape[1], shape[2] // 2, shape[3] // 2) and got[1].dtype == np.uint8
    assert all(np.array_equal(f, c) for f, c in zip(fused_stats, composed_stats))
    if training:
        assert not np.array_equal(fused_stats[0], running_mean)  # updated in place
    oracle_stats = (running_mean.astype(np.float64), running_var.astype(np.float64))
    y, mean, inv_std = reference.batchnorm2d_forward(x.astype(np.float64), gamma, beta, *oracle_stats, MOMENTUM, EPS,
                                                     training)
    oracle_pooled, _ = reference.maxpool2d_forward(np.maximum(y, 0), (2, 2))
    reference.assert_close(got[0], oracle_pooled, dtype, "y")
    reference.assert_close(got[2], mean, dtype, "mean")
    reference.assert_close(got[3], inv_std, dtype, "inv_std")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_forward_with_nan_and_inf_is_the_composition(layout, rng):
    """Inference (running statistics, so the non-finite values stay in their windows): a NaN wins its window
    (the first NaN), +inf wins, -inf is clipped to 0 by the ReLU; the same values and argmax as the composition."""
    x, gamma, beta, running_mean, running_var = _forward_operands(rng, (2, 4, 6, 6), np.float32, layout)
    x = np.array(x) if layout == "contiguous" else _channels_last(np.array(x))
    x[0, 0, 0, 1], x[0, 0, 1, 0] = np.nan, np.nan  # two NaNs in one window: the first in row-major order wins
    x[0, 1, 2, 2], x[1, 2, 3, 3], x[1, 3, 4, 5] = np.inf, -np.inf, np.nan
    with np.errstate(invalid="ignore"):
        got = [np.array(a) for a in jit.batchnorm2d_relu_maxpool2d_forward(x, gamma, beta, running_mean.copy(),
                                                                           running_var.copy(), MOMENTUM, EPS, False)]
        want = _composed_forward(x, gamma, beta, running_mean.copy(), running_var.copy(), False)
    assert np.isnan(got[0][0, 0, 0, 0]) and got[1][0, 0, 0, 0] == 1
    assert np.isinf(got[0][0, 1, 1, 1]) and np.isnan(got[0][1, 3, 2, 2])
    for name, g, w in zip(("y", "argmax", "mean", "inv_std"), got, want):
        assert np.array_equal(g, w, equal_nan=True), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_backward_is_the_composition_bitwise_and_the_oracle(shape, layout, dtype, rng):
    x, gamma, mean, inv_std, y, argmax, dy = _operands(rng, shape, dtype, layout)
    with PathLog() as log:
        got = [np.array(a) for a in jit.batchnorm2d_relu_maxpool2d_backward(dy, y, argmax, x, gamma, mean, inv_std)]
    routed_in_kernel = any("the pool's gradient routed" in path for path in log.paths)
    assert routed_in_kernel == (layout == "channels_last"), log.paths
    want = _composed(dy, y, argmax, x, gamma, mean, inv_std)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        if layout == "contiguous":
            assert np.array_equal(g, w), name
        else:
            reference.assert_close(g, w, dtype, name)
    routed = reference.maxpool2d_backward(relu_backward(dy, y).astype(np.float64), argmax, x.shape, (2, 2))
    oracle = reference.batchnorm2d_backward(routed, x.astype(np.float64), gamma, mean, inv_std)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, oracle):
        reference.assert_close(g, w, dtype, name)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_inf_where_the_select_decides(layout, rng):
    """A NaN or inf dy under a clipped winner contributes nothing, a NaN pooled y passes dy on: as the composition."""
    x, gamma, mean, inv_std, y, argmax, dy = _operands(rng, (2, 4, 6, 6), np.float32, layout)
    y[0, 0, 0, :3] = 0
    dy[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    y[1, 2, 1, 1] = np.nan
    with np.errstate(invalid="ignore"):
        got = [np.array(a) for a in jit.batchnorm2d_relu_maxpool2d_backward(dy, y, argmax, x, gamma, mean, inv_std)]
        want = _composed(dy, y, argmax, x, gamma, mean, inv_std)
    assert all(np.isfinite(g).all() for g in got)  # the clipped NaN and infinities gave 0
    y[1, 2, 1, 1] = 0  # the NaN winner had passed its gradient on: clipped, channel 2's results change
    assert not np.array_equal(got[2][2], jit.batchnorm2d_relu_maxpool2d_backward(dy, y, argmax, x, gamma, mean,
                                                                                  inv_std)[2][2])
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        reference.assert_close(g, w, np.float32, name)


@pytest.mark.parametrize("wrt", ["x", "gamma", "beta"])
def test_fused_backward_matches_finite_differences(wrt, rng):
    """L = <maxpool(relu(batchnorm(x))), dy> in training mode, x channels-last (the fused kernel), the statistics
    recomputed from each perturbed input."""
    x, gamma, beta = (1.0 + 2.0 * rng.standard_normal((2, 3, 5, 4)), rng.uniform(0.5, 2.0, 3),
                      rng.standard_normal(3))
    x = _channels_last(x)
    inputs = {"x": x, "gamma": gamma, "beta": beta}

    def forward(a, stats=False):
        args = dict(inputs, **{wrt: a})
        y, mean, inv_std = jit.batchnorm2d_relu_forward(args["x"], args["gamma"], args["beta"], np.zeros(3),
                                                        np.ones(3), MOMENTUM, EPS, True)
        pooled, argmax = jit.maxpool2d_forward(y, (2, 2))
        return (np.array(pooled), np.array(argmax), np.array(mean), np.array(inv_std)) if stats else np.array(pooled)

    y, argmax, mean, inv_std = forward(inputs[wrt], stats=True)
    assert (y == 0).any() and (y > 0).any() and np.abs(y[y != 0]).min() > 1e-4  # the ReLU matters, no kink hit
    dy = rng.standard_normal(y.shape)
    grads = jit.batchnorm2d_relu_maxpool2d_backward(dy, y, argmax, x, gamma, mean, inv_std)
    analytic = dict(zip(("x", "gamma", "beta"), grads))[wrt]
    assert_gradient_matches(np.array(analytic), dotted_with(forward, dy), inputs[wrt].copy(),
                            what=f"fused batchnorm + relu + pool d{wrt}")


def test_one_and_two_threads_give_identical_bits(rng):
    numba = pytest.importorskip("numba")
    operands = _operands(rng, (6, 24, 9, 7), np.float32, "channels_last")
    forward_operands = _forward_operands(rng, (6, 24, 9, 7), np.float32, "channels_last")
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            x, gamma, mean, inv_std, y, argmax, dy = operands
            fx, fgamma, fbeta, running_mean, running_var = forward_operands
            results.append([np.array(a) for a in
                            jit.batchnorm2d_relu_maxpool2d_backward(dy, y, argmax, x, gamma, mean, inv_std)]
                           + [np.array(a) for a in jit.batchnorm2d_relu_maxpool2d_forward(
                               fx, fgamma, fbeta, running_mean.copy(), running_var.copy(), MOMENTUM, EPS, True)])
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results):
        assert np.array_equal(one, two)


def test_fusion_pass_takes_it_on_jit_only():
    network = from_dict({"name": "bn-pool", "layers": [
        {"kind": "Conv2D", "filters": 4, "kernel_size": 3, "padding": "same"}, {"kind": "BatchNorm2D"},
        {"kind": "ReLU"}, {"kind": "MaxPool2D", "pool_size": 2}, {"kind": "Conv2D", "filters": 4, "kernel_size": 3},
        {"kind": "BatchNorm2D"}, {"kind": "ReLU"}, {"kind": "MaxPool2D", "pool_size": 3}, {"kind": "Flatten"},
        {"kind": "Dense", "units": 10, "activation": "softmax"}]}, (1, 12, 12), num_classes=10)
    steps = plan(network, jit)
    assert [s.name for s in steps] == ["conv1", "bn1+relu1+pool1", "conv2", "bn2+relu2", "pool2", "flatten1",
                                       "dense1"]
    assert isinstance(steps[1].runner, BatchNormReluPool) and steps[1].runner.bn is network.layers[1]
    im2col = get_backend("im2col")
    assert not im2col.has_fused("batchnorm2d_relu_maxpool2d")
    assert [s.name for s in plan(network, im2col)] == [layer.name for layer in network.layers]


def test_the_checks_refuse_mismatched_shapes(rng):
    x, gamma, mean, inv_std, y, argmax, dy = _operands(rng, (2, 3, 4, 6), np.float32, "contiguous")
    with pytest.raises(ValueError, match="y has shape"):
        jit.batchnorm2d_relu_maxpool2d_backward(dy, y[:, :, :1], argmax, x, gamma, mean, inv_std)
    with pytest.raises(ValueError, match="argmax"):
        jit.batchnorm2d_relu_maxpool2d_backward(dy, y, argmax.astype(np.int32), x, gamma, mean, inv_std)
    with pytest.raises(ValueError, match="dy has shape"):
        jit.batchnorm2d_relu_maxpool2d_backward(dy[:, :, :, :2], y, argmax, x, gamma, mean, inv_std)
    with pytest.raises(ValueError, match="pool"):
        jit.batchnorm2d_relu_maxpool2d_forward(x[:, :, :1], gamma, gamma, mean, inv_std, MOMENTUM, EPS, True)
