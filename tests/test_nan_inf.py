"""NaN and infinity: every op of every backend against the float64 oracle with NaN and +-inf in awkward places
(first and last element, several per window, the dropped last row and column, whole channels), forward and
backward, and the contract's NaN rule for pooling written out by hand. The last tests prove the checks fail for a
backend that lets a NaN vanish inside pooling or spreads one through its backward pass.

The rule (kernels/README.md, "NaN and infinity"): a 2x2 window holding a NaN pools to NaN and its argmax names the
first NaN in row-major order, as PyTorch's max_pool2d does; infinities compare as numbers; ties among numbers keep
the first maximum. ReLU keeps a NaN (as np.maximum and torch.relu); its backward is a select, dy where y > 0 or y
is NaN, else exactly 0, as torch's threshold_backward. Non-finite elements must match the oracle exactly
(reference.relative_error); the backward passes route dy through whatever argmax says.
"""

import types

import numpy as np
import pytest

from conftest import Case, backend_case_params, on_device, on_host
from numba_cnn import layers as numpy_layers
from numba_cnn.kernels import Backend, get_backend, im2col, reference
from numba_cnn.model import Model

DTYPES = [np.float32, np.float64]
NAN, INF = np.nan, np.inf


def place_specials(a, where, rng):
    """A copy of the float array `a` (N, C, H, W) with NaN/+-inf written at the places `where` names."""
    a = np.array(a)
    flat = a.reshape(-1)
    n, c, h, w = a.shape
    if where == "first":
        flat[0] = NAN
    elif where == "last":  # in an odd-sized image the last element is in the dropped row/column
        flat[-1] = NAN
        flat[-2] = INF
    elif where == "several_per_window":
        a[0, 0, 0:2, 0:2] = [[1.0, NAN], [NAN, INF]]  # two NaNs and an inf: the first NaN wins
        a[-1, -1, 0:2, 2:4] = [[-INF, 0.5], [INF, NAN]]  # a NaN last, after both infinities
        a[0, -1, 2:4, 0:2] = [[INF, INF], [NAN, NAN]]
    elif where == "edges":  # the last row and column (dropped by pooling when odd) and the first row
        a[:, :, -1, :] = NAN
        a[:, :, :, -1] = -INF
        a[0, 0, 0, :] = INF
    elif where == "infinities":  # no NaN: infinities must compare as numbers
        mask = rng.random(a.shape) < 0.3
        a[mask] = rng.choice([INF, -INF], size=int(mask.sum()))
    elif where == "scattered":  # a mix of all three, about a fifth of the elements
        mask = rng.random(a.shape) < 0.2
        a[mask] = rng.choice([NAN, INF, -INF], size=int(mask.sum()))
    elif where == "whole_channel":
        a[0, 0] = NAN
        a[-1, -1] = -INF
    else:
        raise ValueError(where)
    return a


PLACES = ["first", "last", "several_per_window", "edges", "infinities", "scattered", "whole_channel"]
# Odd H and W, so that a last row and column are dropped by pooling; one case of a pooling layer's size.
POOL_CASES = [Case(f"{where}", True, dict(x=(2, 2, 7, 5), where=where)) for where in PLACES]
POOL_CASES += [Case("scattered_pool1_size", False, dict(x=(2, 32, 26, 26), where="scattered"))]
# The convolution: specials in its input x, its weights w, or the upstream gradient dy.
CONV_CASES = [Case(f"{operand}_{where}", True, dict(x=(2, 2, 6, 5), w=(3, 2, 3, 3), operand=operand, where=where))
              for operand in ("x", "w", "dy") for where in ("first", "last", "scattered")]


def run_op(backend, op, args):
    return on_host(backend, getattr(backend, op)(*(on_device(backend, a) for a in args)))


def assert_matches_oracle(backend, op, args, dtype):
    """Each output agrees with the oracle's: pooling exactly (NaN where the oracle has NaN), convolution within the
    dtype's tolerance with every non-finite element matched exactly."""
    actual = run_op(backend, op, args)
    expected = getattr(reference, op)(*args)
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for index, (got, want) in enumerate(zip(actual, expected)):
        what = f"{backend.name}.{op} output {index}"
        if want is None:
            assert got is None, what
        elif op.startswith("maxpool"):
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=what)  # NaN matches NaN only
        else:
            reference.assert_close(got, want, dtype, what)


def random_array(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_maxpool2d_forward_with_nan_and_inf(backend, case, dtype, rng):
    x = place_specials(random_array(rng, case.spec["x"], dtype), case.spec["where"], rng)
    assert_matches_oracle(backend, "maxpool2d_forward", (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_maxpool2d_backward_with_nan_and_inf(backend, case, dtype, rng):
    """argmax from an input with specials (pointing at NaNs), and an upstream gradient with specials of its own: each
    dy lands on its window's winner only (a NaN dy must not spread to the window's other elements)."""
    x = place_specials(random_array(rng, case.spec["x"], dtype), case.spec["where"], rng)
    _, argmax = reference.maxpool2d_forward(x)
    dy = place_specials(random_array(rng, argmax.shape, dtype), "scattered", rng)
    assert_matches_oracle(backend, "maxpool2d_backward", (dy, argmax, x.shape), dtype)


def conv_operands(rng, case, dtype):
    n, c, h, wd = case.spec["x"]
    k, _, r, s = case.spec["w"]
    x, w = random_array(rng, (n, c, h, wd), dtype), random_array(rng, (k, c, r, s), dtype)
    b, dy = random_array(rng, (k,), dtype), random_array(rng, (n, k, h - r + 1, wd - s + 1), dtype)
    operands = dict(x=x, w=w, dy=dy)
    operands[case.spec["operand"]] = place_specials(operands[case.spec["operand"]], case.spec["where"], rng)
    return operands["x"], operands["w"], b, operands["dy"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params([c for c in CONV_CASES if c.spec["operand"] != "dy"]))
def test_conv2d_forward_with_nan_and_inf(backend, case, dtype, rng):
    x, w, b, _ = conv_operands(rng, case, dtype)
    for relu in (False, True):  # ReLU keeps a NaN and clips -inf to 0
        assert_matches_oracle(backend, "conv2d_forward", (x, w, b, relu), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(CONV_CASES))
def test_conv2d_backward_with_nan_and_inf(backend, case, dtype, rng):
    x, w, _, dy = conv_operands(rng, case, dtype)
    assert_matches_oracle(backend, "conv2d_backward", (dy, x, w, True), dtype)


def oracle_conv_relu_pool(x, w, b):
    y, argmax = reference.maxpool2d_forward(reference.conv2d_forward(x, w, b, True))
    return y, argmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params([c for c in CONV_CASES if c.spec["operand"] == "x"]))
def test_fused_conv_relu_pool_with_nan_and_inf(backend, case, dtype, rng):
    """A backend's fused ops (if any) against the oracle's composition: conv+ReLU, pool; backward through
    numpy's relu_backward on the pooled output, the pool's routing and the conv's backward."""
    fused = [name for name in backend.info.fused]
    if not fused:
        pytest.skip(f"{backend.name} has no fused ops")
    x, w, b, _ = conv_operands(rng, case, dtype)
    h, argmax = run_op(backend, "conv2d_relu_maxpool2d_forward", (x, w, b))
    want_h, want_argmax = oracle_conv_relu_pool(x, w, b)
    reference.assert_close(h, want_h, dtype, "fused forward")
    np.testing.assert_array_equal(argmax[np.isnan(want_h)], want_argmax[np.isnan(want_h)])
    dh = place_specials(random_array(rng, want_h.shape, dtype), "scattered", rng)
    conv_shape = (x.shape[0], w.shape[0], x.shape[2] - w.shape[2] + 1, x.shape[3] - w.shape[3] + 1)
    da = reference.maxpool2d_backward(numpy_layers.relu_backward(dh, want_h), want_argmax, conv_shape)
    expected = reference.conv2d_backward(da, x, w, True)
    got = run_op(backend, "conv2d_relu_maxpool2d_backward", (dh, h.astype(dtype), argmax, x, w, True))
    for name, g, e in zip(("dx", "dw", "db"), got, expected):
        reference.assert_close(g, e, dtype, f"fused backward {name}")


# One 2x2 window per case, its values, and the argmax the contract demands.
NAN_WINDOWS = [
    ([[0, 0], [0, NAN]], 3),  # the window: strict > alone would pool it to 0
    ([[NAN, 1], [2, 3]], 0),
    ([[1, NAN], [NAN, 3]], 1),  # the first NaN
    ([[NAN, NAN], [NAN, NAN]], 0),
    ([[-INF, 5], [INF, NAN]], 3),  # a NaN beats +inf
    ([[INF, NAN], [0, 0]], 1),
    ([[INF, INF], [1, 2]], 0),  # infinities compare as numbers: ties keep the first
    ([[-INF, -INF], [-INF, -INF]], 0),
    ([[-INF, -3], [-INF, -INF]], 1),
    ([[1, 2], [INF, 2]], 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool2d_nan_windows_by_hand(backend, dtype):
    """Independent of the oracle: the windows side by side in one (1, 1, 2, 2*W + 1) image (a NaN in the dropped
    last column must change nothing), y and argmax per window, and dy routed to exactly those elements."""
    x = np.concatenate([np.array(values, dtype=dtype) for values, _ in NAN_WINDOWS], axis=1)
    x = np.concatenate([x, np.full((2, 1), NAN, dtype=dtype)], axis=1)[None, None]
    y, argmax = run_op(backend, "maxpool2d_forward", (x,))
    np.testing.assert_array_equal(argmax[0, 0, 0], [expected for _, expected in NAN_WINDOWS])
    np.testing.assert_array_equal(y[0, 0, 0], [np.array(v).reshape(-1)[e] for v, e in NAN_WINDOWS])
    dy = np.arange(1, len(NAN_WINDOWS) + 1, dtype=dtype).reshape(1, 1, 1, -1)
    dy[0, 0, 0, 0], dy[0, 0, 0, 1] = NAN, -INF  # special upstream gradients reach their winner and no other element
    dx = run_op(backend, "maxpool2d_backward", (dy, argmax, x.shape))
    expected_dx = np.zeros(x.shape, dtype=dtype)
    for window, (_, offset) in enumerate(NAN_WINDOWS):
        expected_dx[0, 0, offset // 2, 2 * window + offset % 2] = dy[0, 0, 0, window]
    np.testing.assert_array_equal(dx, expected_dx)


RELU_Y = [1.0, 0.0, -0.0, NAN, INF, 2.0, 0.0, NAN]
RELU_DY = [NAN, NAN, INF, 3.0, -INF, INF, -2.0, NAN]
RELU_DX = [NAN, 0.0, 0.0, 3.0, -INF, INF, 0.0, NAN]  # dy where y > 0 or y is NaN; exactly 0 where y <= 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_is_a_select(backend, dtype):
    """dx = dy where y > 0 or y is NaN (torch's threshold_backward: y <= 0 ? 0 : dy), exactly 0 where y <= 0, even
    for a NaN or infinite dy there."""
    y, dy = np.array(RELU_Y, dtype=dtype), np.array(RELU_DY, dtype=dtype)
    dx = on_host(backend, backend.layers.relu_backward(on_device(backend, dy), on_device(backend, y)))
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, np.array(RELU_DX, dtype=dtype))


@pytest.mark.parametrize("backend_name", ["naive", "im2col", "jit"])
def test_a_nan_pixel_reaches_the_logits(backend_name):
    """One NaN pixel mid-image: every layer must carry it (a ReLU written as `acc if acc > 0 else 0` or a pooling
    that skips NaN would drop it) to that image's logits, and so to the loss where the divergence stop sees it,
    leaving the other image alone. (A NaN at the bottom-right pixel would not get there in any backend: conv1 reads it
    in its last output only, and pool2 drops conv2's last row and column, as Keras 'valid' pooling does.)"""
    images = 1 if backend_name == "naive" else 2  # naive: about 4 s per image
    x = np.random.default_rng(0).random((images, 1, 28, 28), dtype=np.float32)
    x[0, 0, 14, 15] = NAN
    logits = get_backend(backend_name).to_host(Model(backend_name, seed=0).forward(x))
    assert np.isnan(logits[0]).all(), logits[0]
    assert np.isfinite(logits[1:]).all()


# --- the checks catch a backend that drops or spreads a NaN -------------------------------------------------------

def _strict_greater_forward(x):
    """The pooling naive and jit had before the NaN rule: strict > in row-major order (a NaN wins only if first)."""
    ho, wo = x.shape[2] // 2, x.shape[3] // 2
    taps = [x[:, :, di:2 * ho:2, dj:2 * wo:2] for di in (0, 1) for dj in (0, 1)]
    y, argmax = taps[0].copy(), np.zeros(taps[0].shape, np.uint8)
    for offset in (1, 2, 3):
        wins = taps[offset] > y
        y[wins], argmax[wins] = taps[offset][wins], offset
    return y, argmax


def _multiplying_backward(dy, argmax, x_shape):
    """Routing by dy * (argmax == offset): a NaN or infinite dy spreads NaN over its whole window."""
    ho, wo = dy.shape[2:]
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for offset in range(4):
        dx[:, :, offset // 2:2 * ho:2, offset % 2:2 * wo:2] = dy * (argmax == offset)
    return dx


def broken_backend(op, replacement):
    module = types.ModuleType(f"nan_broken_{op}")
    module.INFO = im2col.INFO
    for name in ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward"):
        setattr(module, name, getattr(im2col, name))
    setattr(module, op, replacement)
    return Backend(f"im2col with a NaN-unsafe {op}", module)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_checks_catch_a_pooling_that_drops_a_nan(dtype, rng):
    broken = broken_backend("maxpool2d_forward", _strict_greater_forward)
    with pytest.raises(AssertionError):
        test_maxpool2d_nan_windows_by_hand(broken, dtype)
    x = place_specials(random_array(rng, (2, 2, 7, 5), dtype), "scattered", rng)
    assert_matches_oracle(get_backend("im2col"), "maxpool2d_forward", (x,), dtype)
    with pytest.raises(AssertionError):
        assert_matches_oracle(broken, "maxpool2d_forward", (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_checks_catch_a_backward_that_spreads_a_nan(dtype, rng):
    broken = broken_backend("maxpool2d_backward", _multiplying_backward)
    x = random_array(rng, (2, 2, 7, 5), dtype)
    _, argmax = reference.maxpool2d_forward(x)
    dy = place_specials(random_array(rng, argmax.shape, dtype), "first", rng)
    assert_matches_oracle(get_backend("im2col"), "maxpool2d_backward", (dy, argmax, x.shape), dtype)
    with pytest.raises(AssertionError):
        assert_matches_oracle(broken, "maxpool2d_backward", (dy, argmax, x.shape), dtype)
