"""Finite-difference gradient checks, in float64 only.

A backward pass takes an upstream gradient dy and returns dL/dinput for L = <f(input), dy>. So the check draws a
random dy, makes the scalar L(input) = sum(f(input) * dy), and compares the backward result with L's central
differences (L(a + h e_i) - L(a - h e_i)) / 2h, coordinate by coordinate. Central differences are exact up to
O(h^2) times L's third derivative, which is zero for the linear maps here (convolution, average pooling, dense, and
max-pooling away from ties) and small for softmax and for batchnorm (smooth in x while the variance plus eps stays
well away from zero, as it does for the tests' spread-out inputs); h = 1e-6 keeps float64 rounding
(1e-16 / 1e-6 = 1e-10) well under the 1e-6 tolerance.

Two evaluations per coordinate add up: a 24 x 32 x 5 x 5 weight is 19,200 coordinates, 76,800 forward calls with the
ReLU'd twin, most of a test's time. So an array of more than FULL_CHECK_MAX elements is checked on a covering sample
instead: every index of every axis at least once (each output channel, input channel, kernel row and column, image,
pixel row and column has a coordinate checked), the rest of FULL_CHECK_MAX drawn at random, plus the whole gradient
at once along DIRECTIONS random directions v: <dL/da, v> against (L(a + h v) - L(a - h v)) / 2h. A kernel's bugs
are structural (an edge, a tile, a channel, a scale): the sample meets each edge and channel, and the directions
see an error spread over many elements that no sample might hit; a lone element slightly off could pass both, which
is the price of the sample (arrays up to FULL_CHECK_MAX elements are still checked at every coordinate).
"""

import numpy as np

STEP = 1e-6
# Relative to the largest analytic gradient element: allows rounding (~1e-10) and O(h^2) curvature terms.
GRAD_TOL = 1e-6
FULL_CHECK_MAX = 512
DIRECTIONS = 2


def covering_indices(shape, count, seed=0):
    """Flat indices into an array of `shape`: for every axis and every index along it, one coordinate with that
    index there (the others drawn at random), then random coordinates until there are `count` (or all), sorted,
    each once; drawn from `seed`, so a rerun checks the same ones."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    chosen = set()
    for axis, extent in enumerate(shape):
        for at in range(extent):
            coordinate = [int(rng.integers(n)) for n in shape]
            coordinate[axis] = at
            chosen.add(int(np.ravel_multi_index(coordinate, shape)))
    for i in rng.permutation(size):
        if len(chosen) >= min(count, size):
            break
        chosen.add(int(i))
    return np.array(sorted(chosen))


def numerical_gradient(scalar_fn, a, indices=None, step=STEP):
    """Central differences of scalar_fn at a (float64, perturbed in place and restored) for the flat `indices` of a
    (all of them when None); returns an array shaped like a, NaN where not computed."""
    assert a.dtype == np.float64, "finite differences are only meaningful in float64"
    grad = np.full(a.shape, np.nan)
    flat_a, flat_grad = a.reshape(-1), grad.reshape(-1)  # views: writing them writes a and grad
    for i in range(a.size) if indices is None else indices:
        original = flat_a[i]
        flat_a[i] = original + step
        above = scalar_fn(a)
        flat_a[i] = original - step
        below = scalar_fn(a)
        flat_a[i] = original
        flat_grad[i] = (above - below) / (2 * step)
    return grad


def assert_gradient_matches(analytic, scalar_fn, a, indices=None, what="gradient"):
    """analytic (dL/da from a backward pass) agrees with central differences of scalar_fn at a: at `indices` (flat)
    where given; else at every coordinate of an array of up to FULL_CHECK_MAX elements, and of a larger one at
    covering_indices and along DIRECTIONS random directions (the module's docstring says why)."""
    analytic = np.asarray(analytic, dtype=np.float64)
    assert analytic.shape == a.shape, f"{what}: shape {analytic.shape}, expected {a.shape}"
    sampled = indices is None and a.size > FULL_CHECK_MAX
    if sampled:
        indices = covering_indices(a.shape, FULL_CHECK_MAX)
    numeric = numerical_gradient(scalar_fn, a, indices)
    checked = ~np.isnan(numeric)
    scale = max(float(np.abs(analytic).max()), 1e-12)
    np.testing.assert_allclose(analytic[checked], numeric[checked], rtol=GRAD_TOL, atol=GRAD_TOL * scale,
                               err_msg=what)
    if sampled:
        assert_directional_derivatives_match(analytic, scalar_fn, a, what)


def assert_directional_derivatives_match(analytic, scalar_fn, a, what="gradient", directions=DIRECTIONS):
    """d/dt scalar_fn(a + t v) at t = 0 against <analytic, v> for `directions` random directions v (drawn from a
    fixed seed): every element of the gradient takes part. Each is checked as the gradient of a function of one
    variable t, by assert_gradient_matches."""
    rng = np.random.default_rng(1)
    for d in range(directions):
        v = rng.standard_normal(a.shape)
        assert_gradient_matches(np.array([np.vdot(analytic, v)]), lambda t: scalar_fn(a + t[0] * v), np.zeros(1),
                                what=f"{what}, along random direction {d}")


def dotted_with(fn, upstream):
    """The scalar L(a) = <fn(a), upstream> whose gradient a backward pass given `upstream` returns."""
    return lambda a: float(np.vdot(np.asarray(fn(a), dtype=np.float64), upstream))


def assert_conv_backward_matches(backend, x, w, b, dy, padding, wrt, took_path, what, stride=1):
    """A convolution's backward on `backend` (the jit backend: it has the fused ReLU backward) against
    central differences of its own forward, for the gradient with respect to `wrt` ("x", "w" or "b"): conv2d_backward
    of the plain forward and conv2d_relu_backward of the ReLU'd one (skipped when an output lies within the step of
    the ReLU's kink), each call's PathLog entries ("op: path") passing took_path."""
    import pytest

    from numba_cnn.kernels.jit.paths import PathLog

    inputs = {"x": x, "w": w, "b": b}
    index = "xwb".index(wrt)
    for relu in (False, True):
        def forward(a):
            args = dict(inputs, **{wrt: a})
            return backend.conv2d_forward(args["x"], args["w"], args["b"], relu, stride, padding).copy()

        y = forward(inputs[wrt])
        with PathLog() as log:
            grads = (backend.conv2d_relu_backward(dy, y, x, w, True, stride, padding) if relu
                     else backend.conv2d_backward(dy, x, w, True, stride, padding))
        assert all(took_path(path) for path in log.paths), log.paths
        # coordinates whose +-step moves some ReLU input across zero are skipped: the function has a kink there
        pre = backend.conv2d_forward(x, w, b, False, stride, padding)
        if relu and np.abs(pre).min() < 1e-4:
            pytest.skip("an output within the step of the ReLU's kink")
        assert_gradient_matches(grads[index], dotted_with(forward, dy), inputs[wrt].copy(),
                                what=f"{what} d{wrt} relu={relu}")
