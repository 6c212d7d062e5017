"""Finite-difference checks of every backward pass in every backend, in float64: conv dx, dw, db and pool dx are
each compared with central differences of <forward(...), dy> for a random upstream gradient dy. Shapes are tiny
(every element is perturbed twice; on the CUDA simulator, a sample of them)."""

import numpy as np
import pytest

from conftest import fd_indices, on_device, on_host
from gradcheck import assert_gradient_matches, dotted_with

# x (N, C, H, W) and w (K, C, R, S): odd sizes and a non-square kernel so no transposition can hide.
CONV_SHAPES = [((2, 2, 5, 4), (3, 2, 3, 2)), ((1, 1, 4, 4), (2, 1, 1, 1))]


@pytest.mark.parametrize("x_shape, w_shape", CONV_SHAPES, ids=["3x2_kernel", "1x1_kernel"])
@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_conv2d_backward_matches_finite_differences(backend, x_shape, w_shape, wrt, rng):
    inputs = {"x": rng.standard_normal(x_shape), "w": rng.standard_normal(w_shape),
              "b": rng.standard_normal(w_shape[0])}
    out_shape = (x_shape[0], w_shape[0], x_shape[2] - w_shape[2] + 1, x_shape[3] - w_shape[3] + 1)
    dy = rng.standard_normal(out_shape)

    def forward(a):
        args = dict(inputs, **{wrt: a})
        y = backend.conv2d_forward(*(on_device(backend, args[k]) for k in "xwb"), relu=False)
        return on_host(backend, y)

    dx, dw, db = on_host(backend, backend.conv2d_backward(
        on_device(backend, dy), on_device(backend, inputs["x"]), on_device(backend, inputs["w"]), need_dx=True))
    analytic = {"x": dx, "w": dw, "b": db}[wrt]
    a = inputs[wrt]
    assert_gradient_matches(analytic, dotted_with(forward, dy), a, fd_indices(backend, a.size, rng),
                            what=f"{backend.name} conv d{wrt}")


@pytest.mark.parametrize("x_shape", [(2, 2, 4, 6), (1, 2, 5, 7)], ids=["even", "odd_dropped_edges"])
def test_maxpool2d_backward_matches_finite_differences(backend, x_shape, rng):
    # Distinct values at least 1e-2 apart: a 1e-6 step never changes a window's winner, so the max is linear there.
    x = rng.permutation(np.prod(x_shape)).reshape(x_shape) * 1e-2 + rng.uniform(0, 1e-3, x_shape)
    y, argmax = on_host(backend, backend.maxpool2d_forward(on_device(backend, x)))
    dy = rng.standard_normal(y.shape)

    def forward(a):
        return on_host(backend, backend.maxpool2d_forward(on_device(backend, a)))[0]

    dx = on_host(backend, backend.maxpool2d_backward(on_device(backend, dy), on_device(backend, argmax), x.shape))
    assert_gradient_matches(dx, dotted_with(forward, dy), x, fd_indices(backend, x.size, rng),
                            what=f"{backend.name} pool dx")


def test_gradient_check_catches_a_slightly_wrong_gradient(rng):
    """The check above is not vacuous: dL/da of L = <a * a, dy> is 2 a dy; one element off by 1e-4 fails it."""
    a, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    loss = dotted_with(lambda v: v * v, dy)
    assert_gradient_matches(2 * a * dy, loss, a)
    wrong = 2 * a * dy
    wrong[1, 2] += 1e-4 * np.abs(wrong).max()
    with pytest.raises(AssertionError):
        assert_gradient_matches(wrong, loss, a)
