"""What the Winograd and phase-layer tests share: a convolution's x, w, b and dy for a kernel size, the
channels-last storage the fused ops hand over, and two checks of the jit backend's convolution (the same bits on one
and two threads; NaN and inf where the float64 oracle has them)."""

import numpy as np


def channels_last(a):
    """a stored channels-last (an NHWC buffer viewed as NCHW)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def conv_operands(rng, shape, k, size, padding, dtype, w_scale):
    """(x[shape], w[k, C, size, size] * w_scale, b[k], dy of the stride-1 output), standard normal draws."""
    n, c, h, wd = shape
    top, bottom, left, right = padding
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((k, c, size, size)) * w_scale).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    dy = rng.standard_normal((n, k, h + top + bottom - size + 1, wd + left + right - size + 1)).astype(dtype)
    return x, w, b, dy


def assert_conv_bits_thread_independent(x, w, b, dy, stride, padding):
    """jit's conv2d_forward (ReLU'd) and conv2d_backward with dx: the same bits on one thread and on two."""
    import numba

    from numba_cnn.kernels import get_backend

    jit = get_backend("jit")
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            y = np.array(jit.conv2d_forward(x, w, b, True, stride, padding))
            results.append([y] + [np.array(g) for g in jit.conv2d_backward(dy, x, w, True, stride, padding)])
    finally:
        numba.set_num_threads(before)
    for got, same in zip(*results):
        np.testing.assert_array_equal(got, same)


def assert_non_finite_like_the_oracle(names, got, want):
    """Each result against the oracle's: NaN and inf in the same places, the finite values within float32's
    tolerance."""
    from numba_cnn.kernels import reference

    for name, got_one, expected in zip(names, got, want):
        assert np.array_equal(np.isnan(got_one), np.isnan(expected)), name
        assert np.array_equal(np.isinf(got_one), np.isinf(expected)), name
        finite = np.isfinite(expected)
        reference.assert_close(got_one[finite], expected[finite], np.float32, name)


def jit_and_oracle_results(x, w, b, dy, stride, padding):
    """(jit's [y, dx, dw, db], the float64 oracle's, the forward's paths, the backward's paths) of a convolution
    without ReLU, NaN and inf operands allowed."""
    from numba_cnn.kernels import get_backend, reference
    from numba_cnn.kernels.jit.paths import PathLog

    jit = get_backend("jit")
    f64 = [a.astype(np.float64) for a in (x, w, b, dy)]
    with np.errstate(invalid="ignore", over="ignore"):
        with PathLog() as forward_log:
            got = [np.array(jit.conv2d_forward(x, w, b, False, stride, padding))]
        with PathLog() as backward_log:
            got += jit.conv2d_backward(dy, x, w, True, stride, padding)
        want = [reference.conv2d_forward(*f64[:3], False, stride, padding),
                *reference.conv2d_backward(f64[3], f64[0], f64[1], True, stride, padding)]
    return got, want, forward_log.paths, backward_log.paths
