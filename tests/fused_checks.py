"""What the tests of the jit backend's backward-only fused ops share (test_fused_conv_relu.py,
test_fused_conv_avgpool.py): the fused op against the composition it replaces, bit for bit, with and without dx and
with dy in either layout, the path it took named; and a Model's training pass fused and unfused, bit for bit."""

import numpy as np

from numba_cnn.kernels import get_backend
from numba_cnn.kernels.jit.paths import PathLog
from numba_cnn.model import Model


def conv_operands(rng, shape, k, kernel, stride, padding, dtype, pooled=False):
    """x[N, C, H, W] of `shape`, w[K, C, *kernel], jit's ReLU'd conv output y and a random dy of y's shape (pooled:
    of its 2x2 pool's)."""
    jit = get_backend("jit")
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((k, shape[1]) + kernel) * 0.3).astype(dtype)
    y = jit.conv2d_forward(x, w, np.zeros(k, dtype), True, stride, padding).copy()
    n, k, p, q = y.shape
    dy = rng.standard_normal((n, k, p // 2, q // 2) if pooled else y.shape).astype(dtype)
    return x, w, y, dy


def channels_last(a):
    """a's values stored channels-last (the layout the fused conv + pool hands its gradients on in)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def assert_fused_is_the_composition(fused, composed, dy, path):
    """fused(dy_in, need_dx) and composed(need_dx) -> (dx or None, dw, db): equal bit for bit (NaN where NaN), for
    need_dx True and False and dy_in dy as given or stored channels-last; the fused call's PathLog names `path`."""
    for need_dx in (True, False):
        want = composed(need_dx)
        for dy_layout, dy_in in (("contiguous", dy), ("channels_last", channels_last(dy))):
            with PathLog() as log:
                got = [None if a is None else np.array(a) for a in fused(dy_in, need_dx)]
            assert any(path in p for p in log.paths), log.paths
            for name, g, w in zip(("dx", "dw", "db"), got, want):
                if w is None:
                    assert g is None
                    continue
                assert g.dtype == w.dtype and g.shape == w.shape, name
                assert np.array_equal(g, w, equal_nan=True), f"{name} need_dx={need_dx} dy {dy_layout}"


def assert_model_fused_or_not(backend, network, x, labels):
    """One training pass of `network` on `backend`: the same loss, count and gradients, bit for bit, with the fusion
    pass and with every layer on its own."""
    results = []
    for fuse in (True, False):
        model = Model(backend, seed=3, network=network, fuse=fuse)
        loss, correct = model.forward_backward(x, labels, backend.make_dropout_rng(0))
        results.append((loss, correct, {name: np.array(g) for name, g in model.grads.items()}))
    (loss, correct, grads), (loss0, correct0, grads0) = results
    assert loss == loss0 and correct == correct0 and grads.keys() == grads0.keys()
    for name in grads:
        assert np.array_equal(grads[name], grads0[name]), name
