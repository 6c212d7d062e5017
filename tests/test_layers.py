"""The layers around the kernels (numba_cnn/kernels/layers.py, or a backend's own `layers`): dense, ReLU backward,
dropout and softmax cross-entropy, forward against values worked out by hand and backward against finite
differences in float64."""

import numpy as np
import pytest

from conftest import backend_params, fd_indices
from gradcheck import assert_gradient_matches, dotted_with
from numba_cnn.kernels import get_backend


# naive and im2col share numba_cnn/kernels/layers.py, so im2col stands for both; jit brings its own dropout, cuda
# its own layers.
@pytest.fixture(params=backend_params(("im2col", "jit", "cuda")))
def layers_backend(request):
    return get_backend(request.param)


class OnBackend:
    """Calls a layers function with host arrays moved to the backend and its array results moved back."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, name, *args):
        b = self.backend
        result = getattr(b.layers, name)(*(b.to_device(a) if isinstance(a, np.ndarray) else a for a in args))
        if isinstance(result, tuple):
            return tuple(self._host(r) for r in result)
        return self._host(result)

    def _host(self, r):
        return r if isinstance(r, (int, float)) else np.asarray(self.backend.to_host(r))


@pytest.fixture
def call(layers_backend):
    return OnBackend(layers_backend)


def test_dense_forward_by_hand(call):
    x = np.array([[1.0, 2.0], [0.0, -1.0]])
    w = np.array([[1.0, 0.0, 2.0], [3.0, -1.0, 0.5]])
    b = np.array([0.5, 0.0, -1.0])
    np.testing.assert_allclose(call("dense_forward", x, w, b), [[7.5, -2.0, 2.0], [-2.5, 1.0, -1.5]])


@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_dense_backward_matches_finite_differences(call, layers_backend, wrt, rng):
    # N, D and M all differ; few outputs, as cuda's dense forward sums them one block-wide reduction after another,
    # which the simulator runs slowly, and the check calls it twice per perturbed element
    inputs = {"x": rng.standard_normal((2, 5)), "w": rng.standard_normal((5, 3)), "b": rng.standard_normal(3)}
    dy = rng.standard_normal((2, 3))
    dx, dw, db = call("dense_backward", dy, inputs["x"], inputs["w"])

    def forward(a):
        args = dict(inputs, **{wrt: a})
        return call("dense_forward", args["x"], args["w"], args["b"])

    a = inputs[wrt]
    assert_gradient_matches({"x": dx, "w": dw, "b": db}[wrt], dotted_with(forward, dy), a,
                            fd_indices(layers_backend, a.size, rng), what=wrt)


def test_relu_backward_masks_by_output(call, layers_backend, rng):
    x = rng.standard_normal((4, 6))
    x[0, :3] = 0.0  # the derivative at 0 is taken as 0: a unit whose output is 0 passes no gradient
    dy = rng.standard_normal((4, 6))
    dx = call("relu_backward", dy, np.maximum(x, 0.0))
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0.0))
    x[0, :3] = 0.5  # away from the kink, it is the derivative of max(x, 0)
    assert_gradient_matches(call("relu_backward", dy, np.maximum(x, 0.0)),
                            dotted_with(lambda a: np.maximum(a, 0.0), dy), x, fd_indices(layers_backend, x.size, rng))


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_dropout_keeps_the_expectation(call, layers_backend, rate):
    x = np.full((100, 100), 3.0, dtype=np.float32)
    y, mask = call("dropout_forward", x, rate, layers_backend.make_dropout_rng(7))
    keep = 1.0 - rate
    assert y.dtype == np.float32 and mask.dtype == np.float32
    np.testing.assert_allclose(np.unique(mask), [0.0, 1.0 / keep], rtol=1e-6)  # dropped, or kept and rescaled
    np.testing.assert_array_equal(y, x * mask)
    # 10,000 independent units: the kept fraction's standard deviation is sqrt(rate * keep / 10000) <= 0.005.
    assert abs(np.mean(mask > 0) - keep) < 0.025
    assert abs(y.mean() - 3.0) < 3.0 * 0.025 / keep


def test_dropout_rng_is_reproducible_and_advances(call, layers_backend):
    x = np.ones((8, 50))
    first = call("dropout_forward", x, 0.5, layers_backend.make_dropout_rng(3))[1]
    rng = layers_backend.make_dropout_rng(3)
    again, following = (call("dropout_forward", x, 0.5, rng)[1] for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, following)


def test_dropout_backward_reuses_the_forward_mask(call, layers_backend, rng):
    x, dy = rng.standard_normal((6, 20)), rng.standard_normal((6, 20))
    seed = 11
    y, mask = call("dropout_forward", x, 0.5, layers_backend.make_dropout_rng(seed))
    dx = call("dropout_backward", dy, mask)
    np.testing.assert_array_equal(dx == 0, mask == 0)  # a dropped unit gets no gradient
    np.testing.assert_allclose(dx, dy * mask)

    def forward(a):  # the same mask on every evaluation: the rng re-seeded each time
        return call("dropout_forward", a, 0.5, layers_backend.make_dropout_rng(seed))[0]

    assert_gradient_matches(dx, dotted_with(forward, dy), x, fd_indices(layers_backend, x.size, rng))


def test_softmax_cross_entropy_by_hand(call):
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = np.array([2, 0])
    loss, dlogits, correct = call("softmax_cross_entropy", logits, labels)
    row0 = np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0)) - 3.0
    assert loss == pytest.approx((row0 + np.log(3.0)) / 2, rel=1e-12)
    softmax0 = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    np.testing.assert_allclose(dlogits, [(softmax0 - [0, 0, 1]) / 2, (np.full(3, 1 / 3) - [1, 0, 0]) / 2])
    assert correct == 2  # row 0 predicts 2; row 1 ties everywhere and argmax takes the first, its label 0
    _, _, correct = call("softmax_cross_entropy", logits, np.array([0, 1]))
    assert correct == 0


def test_softmax_cross_entropy_matches_finite_differences(call, layers_backend, rng):
    logits, labels = 3 * rng.standard_normal((5, 10)), rng.integers(0, 10, 5)
    _, dlogits, _ = call("softmax_cross_entropy", logits, labels)
    assert_gradient_matches(dlogits, lambda a: call("softmax_cross_entropy", a, labels)[0], logits,
                            fd_indices(layers_backend, logits.size, rng))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_is_stable_for_huge_logits(call, dtype):
    # exp(1e4) overflows either dtype: only the max-subtracted form gives these finite, exact answers.
    logits = np.array([[1e4, 0.0, -1e4], [1e4, 1e4 - 2.0, 0.0], [-1e4, -1e4, -1e4]], dtype=dtype)
    labels = np.array([1, 0, 2])
    loss, dlogits, correct = call("softmax_cross_entropy", logits, labels)
    # row 0: -log softmax = 1e4; row 1: log(1 + e^-2); row 2: three equal logits, log 3.
    expected_rows = [1e4, np.log1p(np.exp(-2.0)), np.log(3.0)]
    assert np.isfinite(loss) and loss == pytest.approx(np.mean(expected_rows), rel=1e-6)
    assert dlogits.dtype == dtype and np.all(np.isfinite(dlogits))
    p1 = 1.0 / (1.0 + np.exp(-2.0))  # softmax of row 1's first logit
    expected = np.array([[1, -1, 0], [p1 - 1, 1 - p1, 0], [1 / 3, 1 / 3, 1 / 3 - 1]]) / 3
    np.testing.assert_allclose(dlogits, expected, atol=1e-6)
    assert correct == 1  # row 1 (label 0) only


# The layers a backend compiles for itself against numpy's (jit: dropout's backward, softmax cross-entropy, Adam),
# on awkward inputs: one row, NaN and infinite logits, tied logits, parameters that are not contiguous.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_softmax_cross_entropy_agrees_with_numpy(call, layers_backend, dtype, rng):
    from numba_cnn.kernels import layers as numpy_layers

    cases = [rng.standard_normal((1, 10)), 20 * rng.standard_normal((7, 3)), np.zeros((4, 10)),
             np.array([[1.0, np.nan, 3.0, np.nan], [np.inf, 0.0, np.inf, 1.0], [-np.inf, 2.0, 2.0, 0.0]])]
    for logits in cases:
        logits = logits.astype(dtype)
        labels = rng.integers(0, logits.shape[1], logits.shape[0])
        with np.errstate(invalid="ignore"):
            got = call("softmax_cross_entropy", logits, labels)
            want = numpy_layers.softmax_cross_entropy(logits, labels)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6 if dtype == np.float32 else 1e-13)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-7)
        assert got[1].dtype == dtype
        # cuda picks another largest logit than numpy's argmax where a row holds NaN (left alone: such a run has
        # diverged); the host backends count as numpy does
        if layers_backend.name != "cuda" or np.isfinite(logits).all():
            assert got[2] == want[2]


def test_softmax_cross_entropy_refuses_labels_out_of_range(layers_backend):
    if layers_backend.name != "jit":
        pytest.skip("numpy's indexing checks labels itself")
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        layers_backend.layers.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_and_dropout_backward_agree_with_numpy(call, layers_backend, dtype, rng):
    from numba_cnn.kernels import layers as numpy_layers

    for shape in [(3,), (4, 1, 3, 3), (5, 7)]:
        want = [rng.standard_normal(shape).astype(dtype), np.zeros(shape, dtype), np.zeros(shape, dtype)]
        got = [layers_backend.to_device(a.copy()) for a in want]
        for step in range(1, 4):
            grad = rng.standard_normal(shape).astype(dtype)
            alpha = 1e-3 * np.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step)
            layers_backend.layers.adam_update(*got[:1], layers_backend.to_device(grad), *got[1:], alpha, 0.9, 0.999,
                                              1e-7)
            numpy_layers.adam_update(want[0], grad, want[1], want[2], alpha, 0.9, 0.999, 1e-7)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(layers_backend.to_host(g)), w,
                                       rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-7)
    if layers_backend.name == "jit":  # a parameter that is a strided view is updated in place all the same
        big = rng.standard_normal((6, 4)).astype(dtype)
        param, expected = big[::2], big[::2].copy()
        moments = [np.zeros((3, 4), dtype)[:, ::1], np.zeros((3, 4), dtype)]
        grad = rng.standard_normal((3, 4)).astype(dtype)
        layers_backend.layers.adam_update(param, grad, *moments, 1e-3, 0.9, 0.999, 1e-7)
        numpy_layers.adam_update(expected, grad, np.zeros((3, 4), dtype), np.zeros((3, 4), dtype), 1e-3, 0.9,
                                 0.999, 1e-7)
        np.testing.assert_allclose(big[::2], expected, rtol=1e-6)
    dy, mask = rng.standard_normal((3, 50)).astype(dtype), (rng.random((3, 50)) < 0.5).astype(dtype) * 2
    np.testing.assert_array_equal(call("dropout_backward", dy, mask), dy * mask)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed", "flat"])
def test_jit_relu_equals_numpys_in_every_layout(layout, rng):
    """jit's compiled ReLU forward and backward give numpy's results bit for bit, NaN and infinities included (a NaN
    x stays NaN, a clipped unit passes exactly 0 whatever dy holds), in the layout of their input; a pair stored in
    two layouts takes numpy's code."""
    from numba_cnn.kernels.jit import layers as jit_layers
    from numba_cnn.kernels import layers as np_layers

    shape = (3, 5, 7, 9) if layout != "flat" else (130, 700)  # the flat one spans several parallel blocks
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:4] = [np.nan, np.inf, -np.inf, -0.0]
    dy.reshape(-1)[4:7] = [np.nan, np.inf, -np.inf]
    if layout in ("channels_last", "mixed"):
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if layout == "channels_last":
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if layout == "mixed":  # and the other way round: a channels-last gradient against an NCHW activation
        y_nchw = np.maximum(np.ascontiguousarray(x), 0)
        dy_cl = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dx = jit_layers.relu_backward(dy_cl, y_nchw)
        np.testing.assert_array_equal(dx, np_layers.relu_backward(dy_cl, y_nchw))
        assert dx.strides == dy_cl.strides
    y = jit_layers.relu_forward(x)
    np.testing.assert_array_equal(y, np_layers.relu_forward(x))
    assert y.strides == x.strides
    dx = jit_layers.relu_backward(dy, y)
    np.testing.assert_array_equal(dx, np_layers.relu_backward(dy, y))
    assert np.isnan(y.reshape(-1)[0]) and (dx[y <= 0] == 0).all()
    from numba_cnn.kernels.jit.buffers import OutputArena

    with OutputArena() as arena:  # over a donated dy, as the Model runs it: read and written at one address
        donated = dy.copy(order="K")
        arena.donate(donated)
        over = jit_layers.relu_backward(donated, y)
        assert np.shares_memory(over, donated) == (layout != "mixed")  # mixed: dx channels-last, y's layout
        np.testing.assert_array_equal(over, np_layers.relu_backward(dy, y))


def test_flatten_keeps_the_channel_major_order(call, layers_backend, rng):
    """flatten gives each image's values in (C, H, W) order, as Flatten's backward reshapes them back, on every
    backend; on the host backends from a channels-last array too (jit copies it on every thread)."""
    x = rng.standard_normal((3, 5, 4, 6)).astype(np.float32)
    want = x.reshape(3, -1).copy()
    np.testing.assert_array_equal(call("flatten", x), want)
    if not layers_backend.info.on_device:
        x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        got = layers_backend.layers.flatten(x_cl)
        assert got.shape == (3, 120)
        np.testing.assert_array_equal(got, want)
