"""Finite-difference checks of every backward pass in every backend, in float64: conv dx, dw, db (strided and padded
too), max- and average-pool dx, and batchnorm's training-mode dx, dgamma, dbeta are each compared with central
differences of <forward(...), dy> for a random upstream gradient dy. Shapes are tiny (every element is perturbed
twice; on the CUDA simulator, a sample of them)."""

import numpy as np
import pytest

from conftest import fd_indices, on_device, on_host
from gradcheck import FULL_CHECK_MAX, assert_gradient_matches, covering_indices, dotted_with

# x (N, C, H, W), w (K, C, R, S), stride, padding: odd sizes and a non-square kernel so no transposition can hide;
# a strided convolution whose last row and column no output reads, and uneven padding.
CONV_SHAPES = [
    pytest.param((2, 2, 5, 4), (3, 2, 3, 2), 1, 0, id="3x2_kernel"),
    pytest.param((1, 1, 4, 4), (2, 1, 1, 1), 1, 0, id="1x1_kernel"),
    pytest.param((1, 2, 6, 5), (2, 2, 3, 3), 2, (0, 1, 0, 1), id="stride2_asymmetric_padding"),
    pytest.param((1, 1, 5, 6), (2, 1, 3, 2), 2, (2, 1, 1, 0), id="stride2_uneven_padding"),
]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONV_SHAPES)
@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_conv2d_backward_matches_finite_differences(backend, x_shape, w_shape, stride, padding, wrt, rng):
    inputs = {"x": rng.standard_normal(x_shape), "w": rng.standard_normal(w_shape),
              "b": rng.standard_normal(w_shape[0])}

    def forward(a):
        args = dict(inputs, **{wrt: a})
        y = backend.conv2d_forward(*(on_device(backend, args[k]) for k in "xwb"), relu=False, stride=stride,
                                   padding=padding)
        return on_host(backend, y)

    dy = rng.standard_normal(forward(inputs[wrt]).shape)
    dx, dw, db = on_host(backend, backend.conv2d_backward(
        on_device(backend, dy), on_device(backend, inputs["x"]), on_device(backend, inputs["w"]), need_dx=True,
        stride=stride, padding=padding))
    analytic = {"x": dx, "w": dw, "b": db}[wrt]
    a = inputs[wrt]
    assert_gradient_matches(analytic, dotted_with(forward, dy), a, fd_indices(backend, a.size, rng),
                            what=f"{backend.name} conv d{wrt}")


@pytest.mark.parametrize("x_shape, size", [((2, 2, 4, 6), 2), ((1, 2, 5, 7), 2), ((1, 2, 7, 8), 3),
                                           ((1, 1, 5, 7), (2, 3))],
                         ids=["even", "odd_dropped_edges", "size3", "size_2x3"])
def test_maxpool2d_backward_matches_finite_differences(backend, x_shape, size, rng):
    # Distinct values at least 1e-2 apart: a 1e-6 step never changes a window's winner, so the max is linear there.
    x = rng.permutation(np.prod(x_shape)).reshape(x_shape) * 1e-2 + rng.uniform(0, 1e-3, x_shape)
    y, argmax = on_host(backend, backend.maxpool2d_forward(on_device(backend, x), size))
    dy = rng.standard_normal(y.shape)

    def forward(a):
        return on_host(backend, backend.maxpool2d_forward(on_device(backend, a), size))[0]

    dx = on_host(backend, backend.maxpool2d_backward(on_device(backend, dy), on_device(backend, argmax), x.shape,
                                                     size))
    assert_gradient_matches(dx, dotted_with(forward, dy), x, fd_indices(backend, x.size, rng),
                            what=f"{backend.name} pool dx")


@pytest.mark.parametrize("x_shape, size", [((1, 2, 5, 7), 2), ((1, 2, 7, 8), 3), ((2, 1, 3, 4), (3, 4))],
                         ids=["odd_dropped_edges", "size3", "global"])
def test_avgpool2d_backward_matches_finite_differences(backend, x_shape, size, rng):
    x = rng.standard_normal(x_shape)

    def forward(a):
        return on_host(backend, backend.avgpool2d_forward(on_device(backend, a), size))

    dy = rng.standard_normal(forward(x).shape)
    dx = on_host(backend, backend.avgpool2d_backward(on_device(backend, dy), x.shape, size))
    assert_gradient_matches(dx, dotted_with(forward, dy), x, fd_indices(backend, x.size, rng),
                            what=f"{backend.name} avgpool dx")


@pytest.mark.parametrize("x_shape", [(2, 2, 3, 3), (3, 1, 1, 2)], ids=["two_channels", "two_pixels_per_image"])
@pytest.mark.parametrize("wrt", ["x", "gamma", "beta"])
def test_batchnorm2d_backward_matches_finite_differences(backend, x_shape, wrt, rng):
    """The training-mode gradient, through the batch mean and variance: L(x) = <forward(x), dy> with the statistics
    recomputed from each perturbed x (the running statistics, updated in place, are fresh copies each call)."""
    channels = x_shape[1]
    inputs = {"x": 1.0 + 2.0 * rng.standard_normal(x_shape), "gamma": rng.uniform(0.5, 2.0, channels),
              "beta": rng.standard_normal(channels)}
    running = rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)

    def forward_with_statistics(a):
        args = dict(inputs, **{wrt: a})
        return on_host(backend, backend.batchnorm2d_forward(
            *(on_device(backend, v) for v in (args["x"], args["gamma"], args["beta"]) + tuple(map(np.copy, running))),
            momentum=0.9, eps=1e-3, training=True))

    y, mean, inv_std = forward_with_statistics(inputs[wrt])
    dy = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = on_host(backend, backend.batchnorm2d_backward(
        *(on_device(backend, v) for v in (dy, inputs["x"], inputs["gamma"], mean, inv_std))))
    analytic = {"x": dx, "gamma": dgamma, "beta": dbeta}[wrt]
    a = inputs[wrt]
    assert_gradient_matches(analytic, dotted_with(lambda v: forward_with_statistics(v)[0], dy), a,
                            fd_indices(backend, a.size, rng), what=f"{backend.name} batchnorm d{wrt}")


def test_gradient_check_catches_a_slightly_wrong_gradient(rng):
    """The check above is not vacuous: dL/da of L = <a * a, dy> is 2 a dy; one element off by 1e-4 fails it."""
    a, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    loss = dotted_with(lambda v: v * v, dy)
    assert_gradient_matches(2 * a * dy, loss, a)
    wrong = 2 * a * dy
    wrong[1, 2] += 1e-4 * np.abs(wrong).max()
    with pytest.raises(AssertionError):
        assert_gradient_matches(wrong, loss, a)


def test_sampled_gradient_check_covers_every_axis_index_and_catches_structural_errors(rng):
    """Above FULL_CHECK_MAX elements the check samples: every index of every axis is met, the sample stays within
    the budget, and an error confined to one channel fails it (the sample meets the channel), as does an error in
    every element the sample leaves out (the random directions see it)."""
    shape = (6, 40, 5, 3)
    picked = covering_indices(shape, FULL_CHECK_MAX)
    assert len(picked) == FULL_CHECK_MAX and len(set(picked)) == len(picked)
    coords = np.unravel_index(picked, shape)
    assert all(set(axis.tolist()) == set(range(n)) for axis, n in zip(coords, shape))
    assert np.array_equal(picked, covering_indices(shape, FULL_CHECK_MAX)), "a rerun checks the same coordinates"
    a, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    loss = dotted_with(lambda v: v * v, dy)
    right = 2 * a * dy
    assert_gradient_matches(right, loss, a)
    one_channel = right.copy()
    one_channel[:, 17] *= -1
    off_sample = right * 1.01
    off_sample.reshape(-1)[picked] = right.reshape(-1)[picked]
    for wrong, what in ((one_channel, "one input channel"), (off_sample, "the unsampled elements 1% off")):
        with pytest.raises(AssertionError):
            assert_gradient_matches(wrong, loss, a, what=what)
