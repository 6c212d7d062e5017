"""NaN and infinity: every op of every backend against the float64 oracle with NaN and +-inf in awkward places
(first and last element, several per window, the dropped last row and column, whole channels), forward and
backward, and the contract's NaN rule for max-pooling written out by hand. The last tests prove the checks fail for a
backend that lets a NaN vanish inside pooling or spreads one through its backward pass.

The rule (kernels/README.md, "NaN and infinity"): a max-pooling window holding a NaN pools to NaN and its argmax
names the first NaN in row-major order, as PyTorch's max_pool2d does; infinities compare as numbers; ties among
numbers keep the first maximum. ReLU keeps a NaN (as np.maximum and torch.relu); its backward is a select, dy where
y > 0 or y is NaN, else exactly 0, as torch's threshold_backward. Average pooling, batchnorm and convolution are
IEEE arithmetic: a NaN term, or +inf and -inf together, make NaN, whatever the order of summation. Non-finite
elements must match the oracle exactly (reference.relative_error); the backward passes route dy through whatever
argmax says.

On numba's CUDA simulator cuda runs these cases in float32 only; NUMBA_CNN_SLOW_TESTS=1 adds float64 there (on a
GPU both always run): the simulator runs both dtypes through the same Python code.
"""

import numpy as np
import pytest

from conftest import Case, backend_case_params, on_device, on_host
from test_kernels import (assert_matches_oracle, expected_routing, im2col_with, oracle, run_op,
                          windows_side_by_side)
from numba_cnn.kernels import layers as numpy_layers
from numba_cnn.kernels import get_backend, reference
from numba_cnn.model import Model

pytestmark = pytest.mark.usefixtures("cuda_float64_opt_in_on_the_simulator")

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
# Odd H and W, so that a last row and column are dropped by 2x2 pooling (and by 3x3 pooling: two rows, a column);
# one case of a pooling layer's size. Max- and average pooling share them.
POOL_CASES = [Case(f"{where}", True, dict(x=(2, 2, 7, 5), where=where, size=2)) for where in PLACES]
POOL_CASES += [Case(f"size3_{where}", True, dict(x=(2, 2, 8, 7), where=where, size=3))
               for where in ("several_per_window", "edges", "scattered")]
POOL_CASES += [Case("scattered_pool1_size", False, dict(x=(2, 32, 26, 26), where="scattered", size=2))]
# The convolution: specials in its input x, its weights w, or the upstream gradient dy; some cases padded and strided
# (the padding's zeros meet the specials: inf * 0 is NaN).
CONV_CASES = [Case(f"{operand}_{where}", True, dict(x=(2, 2, 6, 5), w=(3, 2, 3, 3), operand=operand, where=where))
              for operand in ("x", "w", "dy") for where in ("first", "last", "scattered")]
CONV_CASES += [Case(f"{operand}_{where}_stride2_padded", True, dict(x=(2, 2, 7, 6), w=(3, 2, 3, 3), operand=operand,
                                                                    where=where, stride=2, padding=(1, 0, 1, 1)))
               for operand in ("x", "dy") for where in ("edges", "scattered")]
# Batchnorm: specials in x or in the upstream gradient dy. A NaN or an infinity in a channel's batch statistics
# makes the whole channel NaN in training; in inference each element is on its own.
BATCHNORM_CASES = [Case(f"{operand}_{where}", True, dict(x=(2, 3, 4, 5), operand=operand, where=where))
                   for operand in ("x", "dy") for where in ("first", "infinities", "whole_channel")]


def random_array(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def pool_operands(rng, case, dtype):
    """x with the case's specials, its pool size, and an upstream gradient of the pooled shape with specials of its
    own."""
    x = place_specials(random_array(rng, case.spec["x"], dtype), case.spec["where"], rng)
    size = case.spec["size"]
    dy = place_specials(random_array(rng, oracle("avgpool2d_forward", (x, size)).shape, dtype), "scattered", rng)
    return x, size, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_maxpool2d_forward_with_nan_and_inf(backend, case, dtype, rng):
    x, size, _ = pool_operands(rng, case, dtype)
    assert_matches_oracle(backend, "maxpool2d_forward", (x, size), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_maxpool2d_backward_with_nan_and_inf(backend, case, dtype, rng):
    """argmax from an input with specials (pointing at NaNs), and an upstream gradient with specials of its own: each
    dy lands on its window's winner only (a NaN dy must not spread to the window's other elements)."""
    x, size, dy = pool_operands(rng, case, dtype)
    _, argmax = oracle("maxpool2d_forward", (x, size))
    assert_matches_oracle(backend, "maxpool2d_backward", (dy, argmax, x.shape, size), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(POOL_CASES))
def test_avgpool2d_with_nan_and_inf(backend, case, dtype, rng):
    """A window's mean is NaN if it holds a NaN or both infinities, else an infinity it holds; backward spreads each
    dy / (kh*kw), special or not, over its window and leaves dropped rows and columns exactly 0."""
    x, size, dy = pool_operands(rng, case, dtype)
    assert_matches_oracle(backend, "avgpool2d_forward", (x, size), dtype)
    assert_matches_oracle(backend, "avgpool2d_backward", (dy, x.shape, size), dtype)


def conv_operands(rng, case, dtype):
    """x, w, b, dy with the case's specials in one of x, w, dy; and its (stride, padding)."""
    x = random_array(rng, case.spec["x"], dtype)
    w, b = random_array(rng, case.spec["w"], dtype), random_array(rng, case.spec["w"][:1], dtype)
    geometry = (case.spec.get("stride", 1), case.spec.get("padding", 0))
    dy = random_array(rng, oracle("conv2d_forward", (x, w, b, False) + geometry).shape, dtype)
    operands = dict(x=x, w=w, dy=dy)
    operands[case.spec["operand"]] = place_specials(operands[case.spec["operand"]], case.spec["where"], rng)
    return operands["x"], operands["w"], b, operands["dy"], geometry


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params([c for c in CONV_CASES
                                                                   if c.spec["operand"] != "dy"]))
def test_conv2d_forward_with_nan_and_inf(backend, case, dtype, rng):
    x, w, b, _, geometry = conv_operands(rng, case, dtype)
    for relu in (False, True):  # ReLU keeps a NaN and clips -inf to 0
        assert_matches_oracle(backend, "conv2d_forward", (x, w, b, relu) + geometry, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(CONV_CASES))
def test_conv2d_backward_with_nan_and_inf(backend, case, dtype, rng):
    x, w, _, dy, geometry = conv_operands(rng, case, dtype)
    assert_matches_oracle(backend, "conv2d_backward", (dy, x, w, True) + geometry, dtype)


def batchnorm_operands(rng, case, dtype):
    """x, gamma, beta, running_mean, running_var, dy, with the case's specials in x or dy."""
    x, dy = random_array(rng, case.spec["x"], dtype), random_array(rng, case.spec["x"], dtype)
    channels = x.shape[1]
    gamma, beta, running_mean = (random_array(rng, (channels,), dtype) for _ in range(3))
    running_var = rng.uniform(0.5, 2.0, channels).astype(dtype)
    if case.spec["operand"] == "x":
        x = place_specials(x, case.spec["where"], rng)
    else:
        dy = place_specials(dy, case.spec["where"], rng)
    return x, gamma, beta, running_mean, running_var, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(BATCHNORM_CASES))
def test_batchnorm2d_with_nan_and_inf(backend, case, dtype, rng):
    """Forward in both modes (in training a special reaches its channel's statistics, so the running statistics and
    the whole channel; in inference only its own element), and backward through the training statistics."""
    x, gamma, beta, running_mean, running_var, dy = batchnorm_operands(rng, case, dtype)
    for training in (True, False):
        args = (x, gamma, beta, running_mean.copy(), running_var.copy(), 0.9, 1e-3, training)
        assert_matches_oracle(backend, "batchnorm2d_forward", args, dtype)
    _, mean, inv_std = oracle("batchnorm2d_forward", (x, gamma, beta, running_mean, running_var, 0.9, 1e-3, True))
    args = (dy, x, gamma, mean.astype(dtype), inv_std.astype(dtype))
    assert_matches_oracle(backend, "batchnorm2d_backward", args, dtype)


# The fused op's geometry: a stride-1 unpadded convolution, then 2x2 pooling. The oracle is called directly below,
# where its float64 intermediates meet the float32 operands (which the boundary checks would refuse).
FUSED_GEOMETRY, FUSED_POOL = (1, (0, 0, 0, 0)), (2, 2)


def oracle_conv_relu_pool(x, w, b):
    return reference.maxpool2d_forward(reference.conv2d_forward(x, w, b, True, *FUSED_GEOMETRY), FUSED_POOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name, case", backend_case_params(
    [c for c in CONV_CASES if c.spec["operand"] == "x" and "stride" not in c.spec]))  # the fused op: stride 1, unpadded
def test_fused_conv_relu_pool_with_nan_and_inf(backend, case, dtype, rng):
    """A backend's fused ops (if any) against the oracle's composition: conv+ReLU, pool; backward through
    numpy's relu_backward on the pooled output, the pool's routing and the conv's backward."""
    fused = [name for name in backend.info.fused]
    if not fused:
        pytest.skip(f"{backend.name} has no fused ops")
    x, w, b, _, _ = conv_operands(rng, case, dtype)
    h, argmax = run_op(backend, "conv2d_relu_maxpool2d_forward", (x, w, b))
    want_h, want_argmax = oracle_conv_relu_pool(x, w, b)
    reference.assert_close(h, want_h, dtype, "fused forward")
    np.testing.assert_array_equal(argmax[np.isnan(want_h)], want_argmax[np.isnan(want_h)])
    dh = place_specials(random_array(rng, want_h.shape, dtype), "scattered", rng)
    conv_shape = (x.shape[0], w.shape[0], x.shape[2] - w.shape[2] + 1, x.shape[3] - w.shape[3] + 1)
    da = reference.maxpool2d_backward(numpy_layers.relu_backward(dh, want_h), want_argmax, conv_shape, FUSED_POOL)
    expected = reference.conv2d_backward(da, x, w, True, *FUSED_GEOMETRY)
    got = run_op(backend, "conv2d_relu_maxpool2d_backward", (dh, h.astype(dtype), argmax, x, w, True))
    for name, g, e in zip(("dx", "dw", "db"), got, expected):
        reference.assert_close(g, e, dtype, f"fused backward {name}")


# Windows of one size side by side, each with its values and the argmax the contract demands (di*kw + dj).
NAN_WINDOWS = {
    (2, 2): [
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
    ],
    (3, 3): [
        ([[0, 0, 0], [0, 0, 0], [0, 0, NAN]], 8),  # the last element, a NaN, beats the zeros before it
        ([[9, 9, 9], [9, NAN, 9], [NAN, 9, 9]], 4),  # the first of two NaNs
        ([[INF, 1, 1], [1, 1, 1], [1, NAN, 1]], 7),  # a NaN beats +inf
        ([[-INF, -INF, -INF], [-INF, -INF, -INF], [-INF, -INF, -INF]], 0),
        ([[-INF, -INF, -INF], [-INF, -INF, -INF], [-INF, -INF, -7]], 8),
        ([[1, INF, 2], [INF, 3, 4], [5, 6, INF]], 1),  # ties between infinities keep the first
    ],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", list(NAN_WINDOWS), ids=lambda size: f"{size[0]}x{size[1]}")
def test_maxpool2d_nan_windows_by_hand(backend, size, dtype):
    """Independent of the oracle: the windows side by side (NaNs in the dropped last row and column must change
    nothing), y and argmax per window, and dy, some of it NaN and -inf, routed to exactly those elements."""
    windows = NAN_WINDOWS[size]
    x = windows_side_by_side(windows, size, dtype, dropped=NAN)
    y, argmax = run_op(backend, "maxpool2d_forward", (x, size))
    np.testing.assert_array_equal(argmax[0, 0, 0], [expected for _, expected in windows])
    np.testing.assert_array_equal(y[0, 0, 0], [np.array(v).reshape(-1)[e] for v, e in windows])
    dy = np.arange(1, len(windows) + 1, dtype=dtype).reshape(1, 1, 1, -1)
    dy[0, 0, 0, 0], dy[0, 0, 0, 1] = NAN, -INF  # special upstream gradients reach their winner and no other element
    dx = run_op(backend, "maxpool2d_backward", (dy, argmax, x.shape, size))
    np.testing.assert_array_equal(dx, expected_routing(windows, size, dy, x.shape))


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

def _strict_greater_forward(x, size):
    """The pooling naive and jit had before the NaN rule: strict > in row-major order (a NaN wins only if first)."""
    kh, kw = size
    ho, wo = x.shape[2] // kh, x.shape[3] // kw
    taps = [x[:, :, di:kh * ho:kh, dj:kw * wo:kw] for di in range(kh) for dj in range(kw)]
    y, argmax = taps[0].copy(), np.zeros(taps[0].shape, np.uint8)
    for offset in range(1, kh * kw):
        wins = taps[offset] > y
        y[wins], argmax[wins] = taps[offset][wins], offset
    return y, argmax


def _multiplying_backward(dy, argmax, x_shape, size):
    """Routing by dy * (argmax == offset): a NaN or infinite dy spreads NaN over its whole window."""
    kh, kw = size
    ho, wo = dy.shape[2:]
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for offset in range(kh * kw):
        dx[:, :, offset // kw:kh * ho:kh, offset % kw:kw * wo:kw] = dy * (argmax == offset)
    return dx


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_checks_catch_a_pooling_that_drops_a_nan(dtype, rng):
    broken = im2col_with("maxpool2d_forward", _strict_greater_forward, "a NaN-unsafe maxpool2d_forward")
    for size in NAN_WINDOWS:
        with pytest.raises(AssertionError):
            test_maxpool2d_nan_windows_by_hand(broken, size, dtype)
    x = place_specials(random_array(rng, (2, 2, 7, 5), dtype), "scattered", rng)
    assert_matches_oracle(get_backend("im2col"), "maxpool2d_forward", (x,), dtype)
    with pytest.raises(AssertionError):
        assert_matches_oracle(broken, "maxpool2d_forward", (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_checks_catch_a_backward_that_spreads_a_nan(dtype, rng):
    broken = im2col_with("maxpool2d_backward", _multiplying_backward, "a NaN-unsafe maxpool2d_backward")
    x = random_array(rng, (2, 2, 7, 5), dtype)
    _, argmax = oracle("maxpool2d_forward", (x,))
    dy = place_specials(random_array(rng, argmax.shape, dtype), "first", rng)
    assert_matches_oracle(get_backend("im2col"), "maxpool2d_backward", (dy, argmax, x.shape), dtype)
    with pytest.raises(AssertionError):
        assert_matches_oracle(broken, "maxpool2d_backward", (dy, argmax, x.shape), dtype)
