"""jit's strided convolutions through their phases (jit/polyphase.py): a stride-2 layer (or stride 3) split into
stride^2 phases of stride 1 that Winograd's kernels take. The tap map (every tap of w once, on the phase and offset
its input row gives); forward, dx, dw and db against the float64 oracle on awkward shapes (odd sizes, whose last row
and column no output reads or which the phase grid pads with zeros; 'same', 'valid' and uneven padding; stride 3 with
a 9x9 kernel; more images than the weight gradient's chunks), in either layout and dtype; central differences in
float64; the same bits on one and two threads; non-finite operands sent to the strided kernels with the oracle's NaN
and inf; which layers take it."""

import numpy as np
import pytest
from conv_cases import (assert_conv_bits_thread_independent, assert_non_finite_like_the_oracle, channels_last,
                        jit_and_oracle_results)
from gradcheck import assert_conv_backward_matches
from numba_cnn.kernels import reference

jit = pytest.importorskip("numba_cnn.kernels.jit")
from numba_cnn.kernels.jit import polyphase  # noqa: E402
from numba_cnn.kernels.jit.paths import PathLog  # noqa: E402
from numba_cnn.kernels.jit.tiles import GRAD_IMAGE_CHUNKS, WINOGRAD_CHUNK  # noqa: E402

PHASES = "phases of stride 1"
# (N, C, H, W), K, kernel size, stride, padding (top, bottom, left, right); C a multiple of 4, so 4C (9C for
# stride 3: C a multiple of 16) is one of the transform's vectors on both targets, K too (dx's input channels; 48:
# off the wide tile's lanes)
SHAPES = [
    pytest.param((3, 16, 28, 28), 32, 5, 2, (1, 2, 1, 2), id="three_conv_conv2_keras_same"),
    pytest.param((2, 8, 13, 11), 48, 5, 2, (2, 2, 2, 2), id="same_odd_sizes"),
    pytest.param((2, 8, 12, 15), 32, 5, 2, (0, 0, 0, 0), id="valid_unread_last_column"),
    pytest.param((1, 12, 10, 9), 48, 5, 2, (0, 2, 1, 0), id="uneven_padding_one_image"),
    pytest.param((GRAD_IMAGE_CHUNKS + 3, 8, 9, 9), 32, 5, 2, (2, 2, 2, 2), id="more_images_than_chunks"),
    pytest.param((2, 16, 17, 16), 32, 9, 3, (3, 3, 3, 3), id="stride3_9x9"),
]


def _operands(rng, shape, k, size, stride, padding, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((k, shape[1], size, size)) * 0.1).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    y = reference.conv2d_forward(x, w, b, False, stride, padding)
    return x, w, b, rng.standard_normal(y.shape).astype(dtype)


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


@pytest.mark.parametrize("size,stride", [(r, t) for r in range(1, 10) for t in (2, 3)])
def test_every_tap_lands_once_on_its_phase_and_offset(size, stride):
    """For every padding before the kernel: input row stride * i + u - before = stride * (i + d) + a for the
    phase a and offset d each tap u is given, and every (u, v) once."""
    for before in range(size):
        first, count = polyphase._phase_offsets(size, before, stride)
        taps = polyphase._phase_taps(size, size, stride, count, first, first, before, before)
        assert sorted((u, v) for *_, u, v in taps) == [(u, v) for u in range(size) for v in range(size)]
        for phase, di, dj, u, v in taps:
            a, b = divmod(phase, stride)
            assert u - before == stride * (di + first) + a and v - before == stride * (dj + first) + b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,size,stride,padding", SHAPES)
def test_forward_and_backward_match_the_oracle_in_either_layout(shape, k, size, stride, padding, dtype, rng):
    x, w, b, dy = _operands(rng, shape, k, size, stride, padding, dtype)
    want_grads = reference.conv2d_backward(*_f64(dy, x, w), True, stride, padding)
    for relu in (False, True):
        want = reference.conv2d_forward(*_f64(x, w, b), relu, stride, padding)
        for x_in in (x, channels_last(x)):
            with PathLog() as log:
                y = jit.conv2d_forward(x_in, w, b, relu, stride, padding)
            assert len(log.paths) == 1 and log.paths[0].startswith(
                f"conv2d_forward: {stride * stride} {PHASES}, Winograd"), log.paths
            assert y.dtype == dtype and y.shape == want.shape
            reference.assert_close(y, want, dtype, f"y relu={relu}")
    for x_in, dy_in in ((x, dy), (channels_last(x), channels_last(dy))):
        with PathLog() as log:
            dx, dw, db = jit.conv2d_backward(dy_in, x_in, w, True, stride, padding)
        assert len(log.paths) == 1 and f"{stride * stride} {PHASES}, dw by Winograd" in log.paths[0], log.paths
        assert "dx by Winograd" in log.paths[0]
        for name, got, want in zip(("dx", "dw", "db"), (dx, dw, db), want_grads):
            assert got.dtype == dtype and got.shape == want.shape, name
            reference.assert_close(got, want, dtype, name)
        none, dw_alone, db_alone = jit.conv2d_backward(dy_in, x_in, w, False, stride, padding)
        assert none is None  # and dw's bits do not depend on need_dx
        np.testing.assert_array_equal(dw_alone, dw)
        np.testing.assert_array_equal(db_alone, db)


@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_backward_matches_finite_differences(wrt, rng):
    """In float64, dx, dw and db against central differences of the (phase) forward, plain and through the fused
    ReLU."""
    padding = (1, 2, 1, 2)
    x, w, b, dy = _operands(rng, (2, 8, 9, 8), 32, 5, 2, padding, np.float64)
    assert_conv_backward_matches(jit, x, w, b, dy, padding, wrt, lambda path: PHASES in path, "phases", stride=2)


def test_one_and_two_threads_give_identical_bits(rng):
    padding = (1, 2, 1, 2)
    x, w, b, dy = _operands(rng, (GRAD_IMAGE_CHUNKS + 5, 16, 14, 13), 32, 5, 2, padding, np.float32)
    assert_conv_bits_thread_independent(x, w, b, dy, 2, padding)


@pytest.mark.parametrize("where", ["x", "dy"])
def test_non_finite_operands_take_the_strided_kernels(where, rng):
    """An inf or NaN in x (the forward, dw) or dy (dx, dw): Winograd's transforms would turn inf into NaN, so the
    strided kernels compute, with the oracle's NaN and inf in the same places."""
    padding = (2, 2, 2, 2)
    x, w, b, dy = _operands(rng, (2, 8, 11, 10), 32, 5, 2, padding, np.float32)
    operand = x if where == "x" else dy
    operand[0, 1, 2, 3], operand[1, 0, 4, 4] = np.inf, np.nan
    got, want, forward_paths, backward_paths = jit_and_oracle_results(x, w, b, dy, 2, padding)
    assert (PHASES in forward_paths[-1]) == (where == "dy"), forward_paths
    assert PHASES not in backward_paths[-1], backward_paths
    assert_non_finite_like_the_oracle(("y", "dx", "dw", "db"), got, want)


def test_which_layers_take_it():
    """5x5 stride 2 ('same' or 'valid') and 9x9 stride 3 with 3 offsets a phase; not 3x3 stride 2 (2 offsets padded to
    3: more products than the direct 9), not 7x7 stride 2 (4 offsets: F(2x2, 5x5) on 4 phases, 144 products a tile
    against 196), not stride 1, not input channels whose phases miss the transform's vector, not too few filters or
    filters off the vector (dx's input channels), not non-finite weights."""
    w = np.zeros((32, 16, 5, 5), np.float32)
    x_shape = (4, 16, 28, 28)
    plan = polyphase.polyphase_plan(x_shape, w, 2, (1, 2, 1, 2))
    assert (plan.side, plan.channels, plan.rows, plan.cols, plan.padding) == (3, 64, 15, 15, (1, 0, 1, 0))
    assert polyphase.polyphase_plan(x_shape, w, 2, (0, 0, 0, 0)).padding == (0, 0, 0, 0)
    assert polyphase.polyphase_plan((4, 16, 17, 17), np.zeros((32, 16, 9, 9)), 3, (3, 3, 3, 3)).side == 3
    assert polyphase.polyphase_plan(x_shape, np.zeros((32, 16, 3, 3)), 2, (1, 1, 1, 1)) is None
    assert polyphase.polyphase_plan(x_shape, np.zeros((32, 16, 7, 7)), 2, (3, 3, 3, 3)) is None
    assert polyphase.polyphase_plan(x_shape, w, 1, (2, 2, 2, 2)) is None
    assert polyphase.polyphase_plan((4, 3, 28, 28), np.zeros((32, 3, 5, 5)), 2, (2, 2, 2, 2)) is None
    assert polyphase.polyphase_plan(x_shape, w[:4], 2, (2, 2, 2, 2)) is None
    assert polyphase.polyphase_plan(x_shape, np.zeros((WINOGRAD_CHUNK + 4, 16, 5, 5)), 2, (2, 2, 2, 2)) is None
    w_inf = w.copy()
    w_inf[3, 2, 1, 0] = np.inf
    assert polyphase.polyphase_plan(x_shape, w_inf, 2, (2, 2, 2, 2)) is None
