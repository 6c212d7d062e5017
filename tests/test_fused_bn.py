"""The jit backend's fused BatchNorm + ReLU (kernels README: an optional fused op, named in INFO.fused):
batchnorm2d_relu_forward / _backward against the composition they replace (jit's batchnorm2d_forward then numpy's
ReLU, forward: bitwise, running statistics too; layers.relu_backward then jit's batchnorm2d_backward, backward: within
float rounding, its own compiled kernel), against the float64 oracle (numba_cnn/kernels/reference.py) and, in float64,
against finite differences; NaN and infinities as the composition has them; the fusion pass takes the op on jit only,
and a Model gives the same results fused and not. The ops are called through the registry's checked functions, so
inputs stored channels-last reach jit as they are (INFO.channels_last)."""

import numpy as np
import pytest

from gradcheck import assert_gradient_matches, dotted_with
from numba_cnn.kernels import get_backend, reference
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.layers import relu_backward, relu_forward
from numba_cnn.model import Model
from numba_cnn.network import from_dict
from numba_cnn.network.plan import BatchNormRelu, plan

jit = get_backend("jit")
DTYPES = [np.float32, np.float64]
MOMENTUM, EPS = 0.9, 1e-3

# (N, C, H, W): batch 1, one channel, odd H and W, a single pixel per image, a vgg-small-bn block.
SHAPES = [
    pytest.param((1, 3, 5, 7), id="batch1_odd_hw"),
    pytest.param((4, 1, 3, 3), id="one_channel"),
    pytest.param((3, 5, 1, 1), id="one_pixel"),
    pytest.param((2, 7, 9, 11), id="odd_everything"),
    pytest.param((8, 32, 16, 16), id="vgg_block"),
]


def _operands(rng, shape, dtype, layout="contiguous"):
    c = shape[1]
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    if layout == "channels_last":  # x stored NHWC, viewed NCHW, as jit's convolutions hand it over
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gamma, beta = rng.uniform(0.5, 2.0, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    running = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2.0, c).astype(dtype)
    return x, gamma, beta, running


def _both_forwards(x, gamma, beta, running, training):
    """-> (fused result, composed result, fused running statistics, composed running statistics), each from fresh
    copies of `running`."""
    fused_running, composed_running = tuple(map(np.copy, running)), tuple(map(np.copy, running))
    fused = jit.batchnorm2d_relu_forward(x, gamma, beta, *fused_running, MOMENTUM, EPS, training)
    fused = tuple(np.array(a) for a in fused)  # out of the op's buffers before the next call
    y, mean, inv_std = jit.batchnorm2d_forward(x, gamma, beta, *composed_running, MOMENTUM, EPS, training)
    return fused, (relu_forward(y), mean, inv_std), fused_running, composed_running


def _assert_bitwise(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert np.array_equal(got, want, equal_nan=True), what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_forward_is_the_composition_bitwise_and_close_to_the_oracle(shape, layout, dtype, rng):
    x, gamma, beta, running = _operands(rng, shape, dtype, layout)
    for training in (True, False):
        fused, composed, fused_running, composed_running = _both_forwards(x, gamma, beta, running, training)
        for name, got, want in zip(("y", "mean", "inv_std"), fused, composed):
            _assert_bitwise(got, want, f"{name}, training={training}")
        for name, got, want in zip(("running_mean", "running_var"), fused_running, composed_running):
            _assert_bitwise(got, want, f"{name}, training={training}")
        if not training:  # inference reads the running statistics and leaves them alone
            for got, given in zip(fused_running, running):
                _assert_bitwise(got, given, "running statistics in inference")
        oracle_running = tuple(a.astype(np.float64) for a in running)
        y_ref, mean_ref, inv_std_ref = reference.batchnorm2d_forward(x, gamma, beta, *oracle_running, MOMENTUM, EPS,
                                                                     training)
        reference.assert_close(fused[0], np.maximum(y_ref, 0), dtype, "y")
        reference.assert_close(fused[1], mean_ref, dtype, "mean")
        reference.assert_close(fused[2], inv_std_ref, dtype, "inv_std")
        for got, want in zip(fused_running, oracle_running):
            reference.assert_close(got, want, dtype, "running statistics")
    assert (fused[0] == 0).any() and (fused[0] > 0).any() or x.size < 20  # the ReLU clipped some, not all


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_backward_equals_the_composition_and_the_oracle(shape, layout, dtype, rng):
    x, gamma, beta, running = _operands(rng, shape, dtype, layout)
    (y, mean, inv_std), _, _, _ = _both_forwards(x, gamma, beta, running, True)
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "channels_last":  # the gradient as a channels-last next layer would hand it back
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    fused = tuple(np.array(a) for a in jit.batchnorm2d_relu_backward(dy, y, x, gamma, mean, inv_std))
    composed = jit.batchnorm2d_backward(relu_backward(dy, y), x, gamma, mean, inv_std)
    oracle = reference.batchnorm2d_backward(relu_backward(dy, y), x, gamma, mean, inv_std)
    for name, got, same, want in zip(("dx", "dgamma", "dbeta"), fused, composed, oracle):
        assert got.dtype == dtype and got.shape == same.shape, name
        if name == "dx":  # in x's layout: the channels-last kernels give channels-last results
            assert is_channels_last(got) if is_channels_last(x) else got.flags.c_contiguous, name
        reference.assert_close(got, same, dtype, f"{name} vs the composition")
        reference.assert_close(got, want, dtype, f"{name} vs the oracle")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fused", [True, False], ids=["relu", "plain"])
def test_backward_over_a_donated_gradient_gives_the_bits_of_a_fresh_output(fused, layout, rng):
    """Within an arena where the model donated dy, the batch norm's backward (plain and + ReLU, NCHW and
    channels-last) writes dx over dy: the same bits as into a fresh buffer (each element's gradient read before its dx
    is written), the parameters' gradients too."""
    x, gamma, beta, running = _operands(rng, (4, 16, 9, 10), np.float32, layout)
    (y, mean, inv_std), _, _, _ = _both_forwards(x, gamma, beta, running, True)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    if layout == "channels_last":
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    from numba_cnn.kernels import jit as jit_module  # the module's ops: the arena is the caller's, not the registry's

    def backward(gradient):
        if fused:
            return jit_module.batchnorm2d_relu_backward(gradient, y, x, gamma, mean, inv_std)
        return jit_module.batchnorm2d_backward(gradient, x, gamma, mean, inv_std)

    arena = jit_module.OutputArena()
    with arena:
        fresh = tuple(np.array(a) for a in backward(dy.copy(order="K")))
        kept = dy.copy(order="K")  # in dy's layout, as the model donates it
        arena.donate(kept)
        over = backward(kept)
        assert np.shares_memory(over[0], kept)
        for name, got, want in zip(("dx", "dgamma", "dbeta"), over, fresh):
            _assert_bitwise(got, want, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_fused_ops_with_nan_and_inf(training, dtype, rng):
    """A NaN or infinity in x reaches y as in the composition (training: its channel's statistics, so the whole
    channel; inference: that element, the ReLU keeping NaN and clipping -inf to 0); in dy, only where y > 0 or y is
    NaN: the ReLU's select zeroes it elsewhere, exactly, as layers.relu_backward does."""
    x, gamma, beta, running = _operands(rng, (3, 4, 5, 6), dtype)
    x[0, 1, 2, 3] = np.nan
    x[1, 2, 0, 0] = np.inf
    x[2, 2, 4, 5] = -np.inf
    x[2, 3, 1, 1] = -np.inf
    fused, composed, fused_running, composed_running = _both_forwards(x, gamma, beta, running, training)
    for got, want in zip(fused + fused_running, composed + composed_running):
        _assert_bitwise(got, want, "forward with NaN and inf")
    y, mean, inv_std = fused
    assert np.isnan(y).any() and (y == 0).any()
    if not training:
        assert np.isinf(y).any()  # +inf stays, -inf was clipped
        assert y[2, 3, 1, 1] == 0 or gamma[3] < 0
    # dy: NaN and inf where the ReLU passed the gradient and where it did not
    dy = rng.standard_normal(x.shape).astype(dtype)
    live, dead = np.flatnonzero(~(y <= 0)), np.flatnonzero(y <= 0)
    dy.reshape(-1)[live[-2:]] = [np.nan, np.inf]
    dy.reshape(-1)[dead[:2]] = [np.nan, -np.inf]
    fused_grads = jit.batchnorm2d_relu_backward(dy, y, x, gamma, mean, inv_std)
    composed_grads = jit.batchnorm2d_backward(relu_backward(dy, y), x, gamma, mean, inv_std)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), fused_grads, composed_grads):
        # non-finite elements equal exactly, the others within rounding (relative_error's rule)
        reference.assert_close(got, want, dtype, name)
    # with finite x, only the dy where the ReLU was off: no effect at all
    x, gamma, beta, running = _operands(rng, (3, 4, 5, 6), dtype)
    (y, mean, inv_std), _, _, _ = _both_forwards(x, gamma, beta, running, True)
    dy = rng.standard_normal(x.shape).astype(dtype)
    clean = jit.batchnorm2d_relu_backward(dy, y, x, gamma, mean, inv_std)
    clean = tuple(np.array(a) for a in clean)
    dy[y <= 0] = np.nan
    for got, want in zip(jit.batchnorm2d_relu_backward(dy, y, x, gamma, mean, inv_std), clean):
        _assert_bitwise(got, want, "dy masked where y <= 0")


@pytest.mark.parametrize("x_shape", [(2, 2, 3, 3), (3, 1, 1, 2), (1, 3, 3, 5)],
                         ids=["two_channels", "two_pixels_per_image", "batch1_odd"])
@pytest.mark.parametrize("wrt", ["x", "gamma", "beta"])
def test_fused_backward_matches_finite_differences(x_shape, wrt, rng):
    """L = <relu(batchnorm(x)), dy> in training mode, the statistics recomputed from each perturbed input (the
    running statistics fresh copies each call)."""
    x, gamma, beta, running = _operands(rng, x_shape, np.float64)
    inputs = {"x": x, "gamma": gamma, "beta": beta}

    def forward(a):
        args = dict(inputs, **{wrt: a})
        return jit.batchnorm2d_relu_forward(args["x"], args["gamma"], args["beta"], *map(np.copy, running),
                                            MOMENTUM, EPS, True)

    y, mean, inv_std = (np.array(a) for a in forward(inputs[wrt]))
    assert (y == 0).any() and (y > 0).any()  # the ReLU matters
    assert np.abs(y[y != 0]).min() > 1e-4  # no value at the kink, where differences would straddle it
    dy = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = jit.batchnorm2d_relu_backward(dy, y, x, gamma, mean, inv_std)
    analytic = {"x": dx, "gamma": dgamma, "beta": dbeta}[wrt]
    assert_gradient_matches(np.array(analytic), dotted_with(lambda a: forward(a)[0], dy), inputs[wrt].copy(),
                            what=f"fused batchnorm + relu d{wrt}")


BN_NETWORK = {"name": "tiny-bn", "layers": [
    {"kind": "Conv2D", "filters": 4, "kernel_size": 3, "padding": "same"},
    {"kind": "BatchNorm2D"},
    {"kind": "ReLU"},
    {"kind": "MaxPool2D", "pool_size": 2},
    {"kind": "Conv2D", "filters": 6, "kernel_size": 3},
    {"kind": "BatchNorm2D", "momentum": 0.8},
    {"kind": "ReLU"},
    {"kind": "Flatten"},
    {"kind": "Dense", "units": 10, "activation": "softmax"}]}


def _bn_network():
    return from_dict(BN_NETWORK, (2, 9, 10), num_classes=10)


def test_channels_last_batch_norm_bits_do_not_depend_on_the_thread_count(rng):
    """A channels-last x takes the kernels that sum fixed chunks of pixels and add the chunks in order: forward
    (statistics, running update) and backward, plain and fused, bitwise the same with 1 and 2 threads, their
    results channels-last, and within rounding of the NCHW kernels' (which sum each channel in one run)."""
    numba = pytest.importorskip("numba")
    x, gamma, beta, running = _operands(rng, (6, 24, 9, 7), np.float32, "channels_last")
    dy = np.ascontiguousarray(rng.standard_normal((6, 9, 7, 24)).astype(np.float32)).transpose(0, 3, 1, 2)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            fused, composed, fused_running, _ = _both_forwards(x, gamma, beta, running, True)
            y, mean, inv_std = fused
            grads = [np.array(a) for a in jit.batchnorm2d_relu_backward(dy, y, x, gamma, mean, inv_std)]
            grads += [np.array(a) for a in jit.batchnorm2d_backward(dy, x, gamma, mean, inv_std)]
            results.append([*fused, *fused_running, *grads])
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results):
        _assert_bitwise(one, two, "1 vs 2 threads")
    assert is_channels_last(results[0][-3])
    nchw = [np.ascontiguousarray(a) for a in (x, dy)]
    _, _, nchw_running, _ = _both_forwards(nchw[0], gamma, beta, running, True)
    for got, want in zip(results[0][3:5], nchw_running):
        reference.assert_close(got, want, np.float32, "running statistics vs the NCHW kernels")
    for got, want in zip(results[0][-3:], jit.batchnorm2d_backward(nchw[1], nchw[0], gamma, *results[0][1:3])):
        reference.assert_close(got, want, np.float32, "gradients vs the NCHW kernels")


def test_fusion_pass_takes_batchnorm_relu_on_jit_only():
    network = _bn_network()
    steps = plan(network, jit)
    # bn1 + relu1 and the 2x2 pool after them: the fused backward of all three (tests/test_fused_bn_pool.py)
    assert [s.name for s in steps] == ["conv1", "bn1+relu1+pool1", "conv2", "bn2+relu2", "flatten1", "dense1"]
    assert isinstance(steps[3].runner, BatchNormRelu)
    assert steps[1].runner.bn is network.layers[1] and steps[3].runner.bn is network.layers[5]
    im2col = get_backend("im2col")
    assert not im2col.has_fused("batchnorm2d_relu")
    assert [s.name for s in plan(network, im2col)] == [layer.name for layer in network.layers]
    assert [s.name for s in plan(network, jit, fuse=False)] == [layer.name for layer in network.layers]


def test_model_gives_the_same_results_fused_or_not(rng):
    """A training pass (loss, every gradient, the running statistics) and an inference pass (which normalises by
    the running statistics) on jit, with the fused op and with every layer on its own."""
    network = _bn_network()
    x = rng.uniform(0, 1, (5, 2, 9, 10)).astype(np.float32)
    labels = np.array([1, 0, 9, 4, 4])
    models = [Model(jit, seed=3, network=network, fuse=fuse) for fuse in (True, False)]
    assert models[0].fused and not models[1].fused
    assert any(isinstance(s.runner, BatchNormRelu) for s in models[0].steps)
    results = []
    for model in models:
        loss, correct = model.forward_backward(x, labels, jit.make_dropout_rng(0))
        grads = {name: np.array(g) for name, g in model.grads.items()}
        logits = np.array(model.forward(x))  # inference, after the training pass moved the running statistics
        results.append((loss, correct, grads, model.state_dict(), logits))
    (loss, correct, grads, state, logits), (loss0, correct0, grads0, state0, logits0) = results
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    assert correct == correct0
    assert grads.keys() == grads0.keys()
    for name in grads:
        reference.assert_close(grads[name], grads0[name], np.float32, name)
    for name in state:  # the forward is bitwise the composition: the running statistics are too
        _assert_bitwise(state[name], state0[name], name)
    _assert_bitwise(logits, logits0, "inference logits")


def test_the_checks_refuse_a_mismatched_y(rng):
    x, gamma, beta, running = _operands(rng, (2, 3, 4, 5), np.float32)
    y, mean, inv_std = jit.batchnorm2d_relu_forward(x, gamma, beta, *running, MOMENTUM, EPS, True)
    dy = np.ones_like(x)
    with pytest.raises(ValueError, match="y has shape"):
        jit.batchnorm2d_relu_backward(dy, y[:, :, :3], x, gamma, mean, inv_std)
    with pytest.raises(ValueError, match="y has dtype float64"):
        jit.batchnorm2d_relu_backward(dy, y.astype(np.float64), x, gamma, mean, inv_std)
    with pytest.raises(ValueError, match="momentum"):
        jit.batchnorm2d_relu_forward(x, gamma, beta, *running, 1.5, EPS, True)
