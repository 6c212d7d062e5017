"""The jit backend's Winograd kernels for 5x5 (jit/winograd.py and winograd_grad.py, size 5): F(4x4, 5x5) and
F(2x2, 5x5) for the forward and dx, F(5x5, 4x4) and F(5x5, 2x2) for dw and db (whose oracle checks are
test_winograd_grad.py's), each test that computes them run with each tile forced. The forward against the float64
oracle on awkward shapes (odd output sizes, whose last tiles hold zeros past the output; 'same', 'valid' and uneven
padding; channel counts off the transform's vector and the lanes; fewer and more images than the weight gradient's
fixed chunks; float32 and float64), in either layout, against central differences in float64, and non-finite
operands sent to the direct kernels with the oracle's NaN and inf. Also the two layout fixes three-conv's 5x5 layers
brought: the ReLU select of an NCHW gradient against a channels-last activation, and a global average pool of
channels-last x."""

import numpy as np
import pytest
from conv_cases import assert_non_finite_like_the_oracle, channels_last, conv_operands, jit_and_oracle_results
from gradcheck import assert_conv_backward_matches
from numba_cnn.kernels import layers as numpy_layers
from numba_cnn.kernels import reference

numba = pytest.importorskip("numba")
jit = pytest.importorskip("numba_cnn.kernels.jit")
from numba_cnn.kernels.jit import layers as jit_layers  # noqa: E402
from numba_cnn.kernels.jit import winograd, winograd_grad  # noqa: E402
from numba_cnn.kernels.jit.paths import PathLog  # noqa: E402
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS, WINOGRAD_CHUNK, WINOGRAD_TILE_NARROW  # noqa: E402

# more than 8 input channels (fewer take the column tiles) on both targets
C1, C2 = (max(WINOGRAD_CHUNK, 16) * m for m in (1, 2))
LANES = WINOGRAD_TILE_NARROW[1]
# (N, C, H, W), K, padding (top, bottom, left, right)
SHAPES = [
    pytest.param((3, C2, 14, 14), 64, (2, 2, 2, 2), id="three_conv_conv3"),
    pytest.param((2, C1, 9, 7), LANES + 3, (2, 2, 2, 2), id="same_odd_p_q_k_off_the_lanes"),
    pytest.param((2, C2, 8, 11), 40, (0, 0, 0, 0), id="valid"),
    pytest.param((1, C1, 7, 8), 33, (1, 2, 0, 2), id="uneven_padding_one_image"),
    pytest.param((GRAD_IMAGE_CHUNKS + 3, C1, 6, 5), 24, (0, 0, 0, 0), id="one_output_column_more_images_than_chunks"),
]


@pytest.fixture
def forward(winograd_tile):
    """The forward's path with the tile forced (conftest's winograd_tile)."""
    return f"Winograd F({winograd_tile}x{winograd_tile}, 5x5)"


@pytest.fixture
def dw_path(winograd_tile):
    """The weight gradient's, as forward."""
    return f"dw by Winograd F(5x5, {winograd_tile}x{winograd_tile})"


def _operands(rng, shape, k, padding, dtype):
    return conv_operands(rng, shape, k, 5, padding, dtype, 0.1)


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,padding", SHAPES)
def test_forward_matches_the_oracle_in_either_layout(shape, k, padding, dtype, forward, rng):
    x, w, b, _ = _operands(rng, shape, k, padding, dtype)
    for relu in (False, True):
        want = reference.conv2d_forward(*_f64(x, w, b), relu, 1, padding)
        for x_in in (x, channels_last(x)):
            with PathLog() as log:
                y = jit.conv2d_forward(x_in, w, b, relu, 1, padding)
            assert len(log.paths) == 1 and log.paths[0].startswith(f"conv2d_forward: {forward}"), log.paths
            assert y.dtype == dtype and y.shape == want.shape
            reference.assert_close(y, want, dtype, f"y relu={relu}")


@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_backward_matches_finite_differences(wrt, dw_path, rng):
    """In float64, dx, dw and db against central differences of the (Winograd, each tile) forward, plain and through
    the fused ReLU."""
    padding = (2, 2, 2, 2)
    x, w, b, dy = _operands(rng, (2, C2, 5, 7), 24, padding, np.float64)
    assert_conv_backward_matches(jit, x, w, b, dy, padding, wrt, lambda path: dw_path in path, "Winograd 5x5")


@pytest.mark.parametrize("where", ["x", "dy"])
def test_non_finite_operands_take_the_direct_kernels(where, forward, dw_path, rng):
    """An inf or NaN in x (the forward, dw) or dy (dx, dw): the transforms would turn inf into NaN, so the direct
    kernels compute, with the oracle's NaN and inf in the same places."""
    padding = (2, 2, 2, 2)
    x, w, b, dy = _operands(rng, (2, C2, 7, 6), 32, padding, np.float32)
    operand = x if where == "x" else dy
    operand[0, 1, 2, 3], operand[1, 0, 4, 4] = np.inf, np.nan
    assert winograd_grad.winograd_weight_grad(dy, x, padding, 5) is None
    got, want, forward_paths, backward_paths = jit_and_oracle_results(x, w, b, dy, 1, padding)
    # the forward reads x, dx reads dy, dw both: each takes Winograd only where its operands are finite
    assert (forward in forward_paths[0]) == (where == "dy"), forward_paths
    assert dw_path not in backward_paths[0] and (f"dx by {forward}" in backward_paths[0]) == (where == "x")
    assert_non_finite_like_the_oracle(("y", "dx", "dw", "db"), got, want)


def test_which_layers_take_it():
    """5x5 stride-1 layers whose input channels are a multiple of the transform's vector (the forward also more
    output channels than half the narrow lanes, finite weights, and not fused with a pool); not 7x7, not strided,
    not input channels off the vector."""
    w = np.zeros((64, C2, 5, 5), np.float32)
    assert winograd.winograd_fits((8, C2, 14, 14), w, 1)
    assert not winograd.winograd_fits((8, C2, 14, 14), w, 2)
    assert not winograd.winograd_fits((8, C2, 14, 14), w[:LANES // 2], 1)
    assert not winograd.winograd_fits((8, C2, 4, 14), w, 1)
    assert not winograd.winograd_fits((8, C2 + 4, 14, 14), np.zeros((64, C2 + 4, 5, 5), np.float32), 1)
    w_inf = w.copy()
    w_inf[0, 0, 0, 0] = np.inf
    assert not winograd.winograd_fits((8, C2, 14, 14), w_inf, 1)
    assert not winograd.winograd_fits((8, C2, 14, 14), np.zeros((64, C2, 7, 7), np.float32), 1)
    assert not winograd.winograd_fits((8, C2, 14, 14), w, 1, pool=True)
    assert winograd_grad.winograd_grad_fits((17, C1, 5, 5), 1)
    assert not winograd_grad.winograd_grad_fits((64, C1, 5, 5), 2)
    assert not winograd_grad.winograd_grad_fits((64, C1 + 4, 5, 5), 1)
    assert not winograd_grad.winograd_grad_fits((64, C1, 7, 7), 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_select_of_an_nchw_gradient_against_a_channels_last_activation(dtype, rng):
    """jit's relu_backward(dy NCHW, y channels-last): numpy's bits (NaN and inf where the select decides), given
    channels-last."""
    dy = rng.standard_normal((3, 5, 4, 6)).astype(dtype)
    y = channels_last(rng.standard_normal(dy.shape).astype(dtype))
    y[0, 1, 2, 3], y[1, 2, 0, 0] = np.nan, 0
    dy[0, 0, 0, 0], dy[2, 4, 3, 5] = np.inf, np.nan
    got = jit_layers.relu_backward(dy, y)
    assert got.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_array_equal(got, numpy_layers.relu_backward(dy, y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [(5, 6), (2, 3), (5, 2)])
def test_average_pool_of_channels_last_x(dtype, size, rng):
    """A pool window other than 2x2 reads channels-last x in place, a window over the whole image (5x6) in one
    pass per image (`_global_avgpool_last`), others window by window (their float64 sums then run in another
    order than over the NCHW copy's contiguous rows: equal within rounding, not bitwise). An inf stays inf."""
    x = rng.standard_normal((3, 7, 5, 6)).astype(dtype)
    x[1, 2, 0, 0] = np.inf
    want = reference.avgpool2d_forward(x.astype(np.float64), size)
    for x_in in (x, channels_last(x)):
        got = jit.avgpool2d_forward(x_in, size)
        assert np.isinf(got[1, 2, 0, 0])
        reference.assert_close(got, want, dtype, "y")
