"""The jit backend's Winograd weight gradient, F(3x3, 2x2), F(3x3, 4x4), F(5x5, 2x2) and F(5x5, 4x4)
(jit/winograd_grad.py), with each of dy's tiles forced in turn: which layers take it, dw and db (and dx, Winograd's
where it fits) against the float64 oracle on awkward shapes (odd output sizes, whose last tiles hold zeros past dy;
'same', 'valid' and uneven padding; output channels off the transform's vector and the lanes; fewer and more images
than the fixed chunks; float32 and float64), the same bits for either layout of x and dy and with and without dx, on
one and two threads, against central differences in float64, and non-finite operands sent to the direct kernels
with the oracle's NaN and inf."""

import numpy as np
import pytest
from conv_cases import assert_conv_bits_thread_independent, channels_last, conv_operands
from gradcheck import assert_conv_backward_matches
from numba_cnn.kernels import reference

pytest.importorskip("numba")
jit = pytest.importorskip("numba_cnn.kernels.jit")
from numba_cnn.kernels.jit import winograd, winograd_grad  # noqa: E402
from numba_cnn.kernels.jit.paths import PathLog  # noqa: E402
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS, WINOGRAD_CHUNK, WINOGRAD_TILE_NARROW  # noqa: E402

LANES = winograd_grad.WINOGRAD_GRAD_TILE[1]
# more than 8 input channels and 16 filters (fewer take the column tiles) on both targets
C1, C2 = (max(WINOGRAD_CHUNK, 16) * m for m in (1, 2))
# kernel size, (N, C, H, W), K, padding (top, bottom, left, right)
SHAPES = [
    pytest.param(3, (3, C1, 7, 9), 32, (1, 1, 1, 1), id="same_odd_p_q"),
    pytest.param(3, (2, C2, 8, 8), LANES + 17, (1, 1, 1, 1), id="k_off_the_vector_and_lanes"),
    pytest.param(3, (5, C1, 9, 6), 2 * LANES, (0, 0, 0, 0), id="valid"),
    pytest.param(3, (1, C1, 5, 6), 24, (0, 2, 1, 0), id="uneven_padding_one_image"),
    pytest.param(3, (GRAD_IMAGE_CHUNKS + 3, C2, 4, 3), 32, (0, 0, 0, 0),
                 id="one_output_column_more_images_than_chunks"),
    pytest.param(5, (3, C2, 14, 14), 64, (2, 2, 2, 2), id="5x5_three_conv_conv3"),
    pytest.param(5, (2, C1, 9, 7), WINOGRAD_TILE_NARROW[1] + 3, (2, 2, 2, 2), id="5x5_same_odd_p_q_k_off_the_lanes"),
    pytest.param(5, (2, C2, 8, 11), 40, (0, 0, 0, 0), id="5x5_valid"),
    pytest.param(5, (1, C1, 7, 8), 33, (1, 2, 0, 2), id="5x5_uneven_padding_one_image"),
    pytest.param(5, (GRAD_IMAGE_CHUNKS + 3, C1, 6, 5), 24, (0, 0, 0, 0),
                 id="5x5_one_output_column_more_images_than_chunks"),
]


def _operands(rng, shape, k, padding, dtype, size=3):
    return conv_operands(rng, shape, k, size, padding, dtype, 0.2 if size == 3 else 0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size,shape,k,padding", SHAPES)
def test_weight_gradient_matches_the_oracle_in_either_layout(size, shape, k, padding, dtype, winograd_tile, rng):
    """dw and db against the float64 oracle, the path named (and dx's, Winograd's where it fits dy's channels);
    the same bits for x and dy stored either way and with and without dx (dx then the oracle's too)."""
    x, w, _, dy = _operands(rng, shape, k, padding, dtype, size)
    want = reference.conv2d_backward(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), True, 1,
                                     padding)
    dx_fits = (winograd.winograd_fits(dy.shape, w.transpose(1, 0, 2, 3), 1)
               and min(size - 1 - p for p in padding) >= 0)
    bits = None
    for need_dx in (True, False):
        for x_in, dy_in in ((x, dy), (channels_last(x), channels_last(dy)), (x, channels_last(dy))):
            with PathLog() as log:
                dx, dw, db = jit.conv2d_backward(dy_in, x_in, w, need_dx, 1, padding)
            dw_path = winograd_grad.winograd_grad_path(size, winograd_tile)
            assert len(log.paths) == 1 and dw_path in log.paths[0], log.paths
            dx_path = f"dx by Winograd F({winograd_tile}x{winograd_tile}, {size}x{size})"
            assert (dx_path in log.paths[0]) == (need_dx and dx_fits), log.paths
            assert (dx is None) != need_dx
            if need_dx:
                reference.assert_close(dx, want[0], dtype, "dx")
            for name, got, expected in (("dw", dw, want[1]), ("db", db, want[2])):
                assert got.dtype == dtype and got.shape == expected.shape, name
                reference.assert_close(got, expected, dtype, name)
            if bits is None:
                bits = (dw.copy(), db.copy())
            np.testing.assert_array_equal(dw, bits[0])
            np.testing.assert_array_equal(db, bits[1])


@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_backward_matches_finite_differences(wrt, winograd_tile, rng):
    """In float64, dx, dw and db against central differences of the forward, plain and through the fused ReLU."""
    padding = (1, 0, 1, 1)
    x, w, b, dy = _operands(rng, (2, C1, 5, 7), 24, padding, np.float64)
    assert_conv_backward_matches(jit, x, w, b, dy, padding, wrt,
                                 lambda path: winograd_grad.winograd_grad_path(3, winograd_tile) in path, "Winograd dw")


@pytest.mark.parametrize("size", [3, 5])
def test_one_and_two_threads_give_identical_bits(size, winograd_tile, rng):
    """The forward (Winograd's for both sizes), dx, dw and db: the same bits on one and two threads."""
    padding = (size // 2,) * 4
    x, w, b, dy = _operands(rng, (GRAD_IMAGE_CHUNKS + 5, C2, 10, 12), 2 * LANES, padding, np.float32, size)
    assert_conv_bits_thread_independent(x, w, b, dy, 1, padding)


@pytest.mark.parametrize("where", ["x", "dy"])
def test_non_finite_operands_take_the_direct_kernels(where, winograd_tile, rng):
    """An inf or NaN in x or dy: the transforms would turn inf into NaN, so the direct tiles compute dw and db, with
    the oracle's NaN and inf in the same places."""
    padding = (1, 1, 1, 1)
    x, w, _, dy = _operands(rng, (2, C1, 6, 6), 32, padding, np.float32)
    operand = x if where == "x" else dy
    operand[0, 1, 2, 3], operand[1, 0, 4, 4] = np.inf, np.nan
    assert winograd_grad.winograd_weight_grad(dy, x, padding) is None
    with PathLog() as log, np.errstate(invalid="ignore", over="ignore"):
        _, dw, db = jit.conv2d_backward(dy, x, w, False, 1, padding)
        want = reference.conv2d_backward(dy.astype(np.float64), x, w, False, 1, padding)
    assert not any("dw by Winograd" in path for path in log.paths), log.paths
    for name, got, expected in (("dw", dw, want[1]), ("db", db, want[2])):
        assert np.array_equal(np.isnan(got), np.isnan(expected)), name
        assert np.array_equal(np.isinf(got), np.isinf(expected)), name
        finite = np.isfinite(expected)
        reference.assert_close(got[finite], expected[finite], np.float32, name)


@pytest.mark.parametrize("size", [3, 5])
def test_dy_takes_4x4_tiles_where_an_image_has_16_of_them(size, rng):
    """F(size x size, 4x4) for a 16x16 dy (16 tiles an image) and 5x5's 14x14 (three-conv's conv3: 16 tiles, 12% of
    them past the output), F(size x size, 2x2) for 8x8 (4 tiles of 4x4: too few for a band)."""
    padding = (size // 2,) * 4
    for side, out in ((16, 4), (8, 2)) if size == 3 else ((14, 4), (8, 2)):
        x, w, _, dy = _operands(rng, (2, C1, side, side), 32, padding, np.float32, size)
        with PathLog() as log:
            jit.conv2d_backward(dy, x, w, False, 1, padding)
        assert winograd_grad.winograd_grad_path(size, out) in log.paths[0], log.paths


def test_which_layers_take_it():
    """3x3 stride-1 layers whose input channels are a multiple of the transform's vector, any filter count (5x5 too,
    test_winograd5.py); not 7x7, not strided, not input channels off the vector."""
    fits = winograd_grad.winograd_grad_fits
    assert fits((64, 32, 3, 3), 1)
    assert fits((17, WINOGRAD_CHUNK, 3, 3), 1)
    assert not fits((64, 32, 7, 7), 1)
    assert not fits((64, 32, 3, 3), 2)
    assert not fits((64, WINOGRAD_CHUNK + 4, 3, 3), 1)


def test_the_chunks_are_added_in_order_in_float64(rng):
    """`_chunks_in_order` (the weight gradient's sum of its image chunks' products): bitwise numpy's float64 sum
    chunk after chunk, on values of wide magnitudes (where another order would round otherwise), an inf meeting
    -inf and a NaN."""
    mt = (rng.standard_normal((GRAD_IMAGE_CHUNKS, 16, 70)) * 10.0 ** rng.uniform(-8, 8, (GRAD_IMAGE_CHUNKS, 16, 70)))
    mt = mt.astype(np.float32)
    mt[0, 0, 0], mt[1, 0, 0], mt[0, 1, 1] = np.inf, -np.inf, np.nan
    want = mt[0].astype(np.float64)
    with np.errstate(invalid="ignore"):
        for h in range(1, GRAD_IMAGE_CHUNKS):
            want += mt[h]
    got = np.empty(want.shape)
    winograd_grad._chunks_in_order(mt, got)
    np.testing.assert_array_equal(got, want)
