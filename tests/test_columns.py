"""The jit backend's column tiles (jit/columns.py: lanes along the output columns, for layers with few channels):
which shapes take them, their results against the float64 oracle on awkward shapes with the path forced both ways
(so the channels-last tiles keep their coverage on the same small shapes), the forward's bits against the
channels-last tile's (same summation order), thread-count independence, non-finite inputs kept off them, and
the backward (plain and with the fused ReLU) against finite differences in float64."""

import numpy as np
import pytest
from gradcheck import assert_conv_backward_matches
from numba_cnn.kernels import reference

numba = pytest.importorskip("numba")
jit = pytest.importorskip("numba_cnn.kernels.jit")
from numba_cnn.kernels.jit import columns  # noqa: E402
from numba_cnn.kernels.jit.paths import PathLog  # noqa: E402

# (N, C, H, W), K, (R, S), padding (top, bottom, left, right): K not a multiple of the tile's 4 channels, one
# input channel, kernels narrower than the 3-tap tile (1x1, 2x1) and wider (5x5, 4x3), rows a multiple of the
# 3-row tile and not, exactly 3 output rows, widths under one vector, over one and not a multiple of it,
# asymmetric padding, LeNet's two layers
SHAPES = [
    ((3, 1, 28, 28), 6, (5, 5), (2, 2, 2, 2)),
    ((4, 6, 14, 14), 16, (5, 5), (0, 0, 0, 0)),
    ((2, 3, 5, 19), 3, (1, 1), (0, 0, 0, 0)),
    ((3, 2, 7, 9), 5, (2, 1), (1, 0, 0, 1)),
    ((2, 5, 6, 33), 7, (4, 3), (2, 1, 1, 1)),
    ((1, 7, 3, 40), 9, (1, 3), (0, 0, 1, 1)),
    ((2, 2, 9, 5), 1, (3, 3), (1, 1, 1, 1)),
    ((5, 1, 11, 17), 4, (3, 3), (0, 0, 0, 0)),
]


def _took_columns(path):
    """Whether a PathLog entry ("op: path") names a column tile."""
    return path.split(": ", 1)[1].startswith("column")


def _operands(rng, shape, k, kernel, padding, dtype):
    n, c, h, wd = shape
    r, s = kernel
    top, bottom, left, right = padding
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((k, c, r, s)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    dy = rng.standard_normal((n, k, h + top + bottom - r + 1, wd + left + right - s + 1)).astype(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("forced", [True, False], ids=["column", "channels-last"])
@pytest.mark.parametrize("shape,k,kernel,padding", SHAPES)
def test_both_paths_against_oracle(shape, k, kernel, padding, forced, dtype, monkeypatch):
    monkeypatch.setattr(jit, "columns_pay", lambda *args: forced)
    x, w, b, dy = _operands(np.random.default_rng(3), shape, k, kernel, padding, dtype)
    with PathLog() as log:
        for relu in (False, True):
            y = jit.conv2d_forward(x, w, b, relu, 1, padding)
            assert y.dtype == dtype and y.flags.c_contiguous
            reference.assert_close(y, reference.conv2d_forward(x, w, b, relu, 1, padding), dtype, f"y relu={relu}")
        grads = jit.conv2d_backward(dy, x, w, True, 1, padding)
        for name, got, want in zip(("dx", "dw", "db"), grads, reference.conv2d_backward(dy, x, w, True, 1, padding)):
            assert got.dtype == dtype and got.shape == want.shape
            reference.assert_close(got, want, dtype, name)
        none, dw, db = jit.conv2d_backward(dy, x, w, False, 1, padding)
    assert none is None
    np.testing.assert_array_equal(dw, grads[1])
    np.testing.assert_array_equal(db, grads[2])
    assert all(_took_columns(path) == forced for path in log.paths), log.paths


@pytest.mark.parametrize("shape,k,kernel,padding", SHAPES)
def test_column_forward_has_the_channels_last_tiles_bits(shape, k, kernel, padding, monkeypatch):
    """Both sum bias, then the taps in (r, s, c) order as FMAs: the same float32 bits, so a network's outputs do
    not depend on which tile a layer's shape picked."""
    x, w, b, _ = _operands(np.random.default_rng(4), shape, k, kernel, padding, np.float32)
    outputs = []
    for forced in (True, False):
        monkeypatch.setattr(jit, "columns_pay", lambda *args: forced)
        outputs.append(jit.conv2d_forward(x, w, b, True, 1, padding).copy())
    np.testing.assert_array_equal(*outputs)


def test_padding_beyond_the_kernel_keeps_the_backward_off_the_column_tiles(monkeypatch):
    """Top or left padding wider than the kernel less one (a 3x3 kernel padded by 4) puts dy's start outside the
    zero border the column dx reads: that backward takes the channels-last path, with dx and without (so dw does
    not depend on need_dx), and matches the oracle; padding beyond the kernel below and right is fine."""
    monkeypatch.setattr(jit, "columns_pay", lambda *args: True)
    for padding, backward_columns in (((4, 3, 4, 2), False), ((0, 4, 1, 5), True)):
        x, w, b, dy = _operands(np.random.default_rng(9), (2, 2, 5, 5), 3, (3, 3), padding, np.float32)
        with PathLog() as log:
            y = jit.conv2d_forward(x, w, b, False, 1, padding)
            grads = jit.conv2d_backward(dy, x, w, True, 1, padding)
            dw_only = jit.conv2d_backward(dy, x, w, False, 1, padding)
        taken = [_took_columns(f"{op}: {path}") for op, path, _ in log.calls]
        assert taken == [True, backward_columns, backward_columns], log.paths
        reference.assert_close(y, reference.conv2d_forward(x, w, b, False, 1, padding), np.float32, "y")
        for got, want in zip(grads, reference.conv2d_backward(dy, x, w, True, 1, padding)):
            reference.assert_close(got, want, np.float32, "gradient")
        for got, want in zip(dw_only[1:], grads[1:]):
            np.testing.assert_array_equal(got, want)


def test_paths_chosen_by_channel_counts():
    """LeNet's two convolutions take the column tiles, forward and backward; mnist-cnn's conv2 (32 -> 64 channels)
    the channels-last ones, and so do rows too short to fill half of the column lanes; VGG's first (3 -> 32
    channels) narrow_input.py's (tests/test_narrow_input.py)."""
    rng = np.random.default_rng(5)
    narrow = max(1, columns.COLUMN_LANES // 2 - 1)
    cases = [((2, 1, 28, 28), 6, (5, 5), (2, 2, 2, 2), True), ((2, 6, 14, 14), 16, (5, 5), (0, 0, 0, 0), True),
             ((2, 3, 32, 32), 32, (3, 3), (1, 1, 1, 1), False), ((2, 32, 13, 13), 64, (3, 3), (0, 0, 0, 0), False),
             ((2, 2, 6, narrow), 4, (1, 1), (0, 0, 0, 0), False)]
    for shape, k, kernel, padding, takes_columns in cases:
        x, w, b, dy = _operands(rng, shape, k, kernel, padding, np.float32)
        with PathLog() as log:
            jit.conv2d_forward(x, w, b, True, 1, padding)
            jit.conv2d_backward(dy, x, w, True, 1, padding)
        assert [_took_columns(path) for path in log.paths] == [takes_columns] * 2, log.paths


def test_each_call_takes_the_correlation_tile_that_computes_less():
    """Six filters (LeNet's conv1) and a dx into six channels (its conv2's) take the six-channel tile, 40 filters
    over VGG's input (32, a multiple of the lanes, take narrow_input.py's kernels) and 8 over 12 rows, forward and
    dx into 16 channels, the other (on either target); the bench's path names the tile, and both give the
    channels-last tiles' bits (the test above runs SHAPES through both)."""
    six, other = columns.COLUMN_TILE_SIX, columns.COLUMN_TILE
    rng = np.random.default_rng(4)
    cases = [((2, 1, 28, 28), 6, (5, 5), (2, 2, 2, 2), six, None),
             ((2, 6, 14, 14), 16, (5, 5), (0, 0, 0, 0), None, six),
             ((2, 3, 32, 32), 40, (3, 3), (1, 1, 1, 1), other, None),
             ((2, 16, 12, 12), 8, (3, 3), (1, 1, 1, 1), other, other)]
    for shape, k, kernel, padding, forward_tile, dx_tile in cases:
        x, w, b, dy = _operands(rng, shape, k, kernel, padding, np.float32)
        with PathLog() as log:
            jit.conv2d_forward(x, w, b, True, 1, padding)
            jit.conv2d_backward(dy, x, w, True, 1, padding)
        forward, backward = log.paths
        if forward_tile:
            assert f"column tile {forward_tile[0]} channels x {forward_tile[1]} rows" in forward, forward
        if dx_tile:
            assert f"dx the column tile {dx_tile[0]} channels x {dx_tile[1]} rows" in backward, backward


def test_each_weight_gradient_takes_the_tile_that_computes_fewer_channels():
    """5 and 6 filters (LeNet's conv1) take the six-channel weight-gradient tile, 4, 7 and 16 the four-channel one
    (on either target); the oracle checks both on SHAPES above (K = 5 and 6 among them)."""
    six, four = columns.COLUMN_GRAD_TILE_SIX, columns.COLUMN_GRAD_TILE
    rng = np.random.default_rng(5)
    for k, tile in ((5, six), (6, six), (4, four), (7, four), (16, four)):
        x, w, b, dy = _operands(rng, (2, 1, 12, 12), k, (5, 5), (2, 2, 2, 2), np.float32)
        with PathLog() as log:
            jit.conv2d_backward(dy, x, w, False, 1, (2, 2, 2, 2))
        assert log.paths == [f"conv2d_backward: column dw tiles of {tile[0]} channels x {tile[1]} taps x "
                             f"{columns.COLUMN_LANES} lanes"], (k, log.paths)


def test_one_and_two_threads_give_identical_bits():
    """Forward split over images, dw over (fixed image chunk, tile) tasks with the chunks added in order, db from
    per-image sums: bitwise the same for any thread count."""
    rng = np.random.default_rng(6)
    before = numba.get_num_threads()
    try:
        for shape, k, kernel, padding in SHAPES[:3]:
            x, w, b, dy = _operands(rng, shape, k, kernel, padding, np.float32)
            results = []
            for threads in (1, 2):
                numba.set_num_threads(threads)
                results.append((columns.column_forward(x, w, b, True, padding).copy(),
                                *(a.copy() for a in columns.column_backward(dy, x, w, True, padding))))
            for one, two in zip(*results):
                np.testing.assert_array_equal(one, two)
    finally:
        numba.set_num_threads(before)


def test_non_finite_inputs_stay_off_the_column_backward():
    """The column dw multiplies dy's zero lanes past the output's width by real inputs, and its dx the zero
    border of dy by the weights; with an inf in x or w those are NaN the contract's sum does not have, so such
    inputs take the channels-last path, which matches the oracle's NaN and inf pattern."""
    rng = np.random.default_rng(8)
    x, w, _, dy = _operands(rng, (2, 1, 12, 12), 6, (3, 3), (1, 1, 1, 1), np.float32)
    for which in ("x", "w"):
        xi, wi = x.copy(), w.copy()
        if which == "x":
            xi[0, 0, 5, 11] = np.inf
        else:
            wi[2, 0, 1, 2] = np.inf
        with PathLog() as log, np.errstate(invalid="ignore", over="ignore"):
            got = jit.conv2d_backward(dy, xi, wi, True, 1, (1, 1, 1, 1))
            want = reference.conv2d_backward(dy, xi, wi, True, 1, (1, 1, 1, 1))
        assert not any(_took_columns(path) for path in log.paths), log.paths
        for name, a, e in zip(("dx", "dw", "db"), got, want):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{which} inf: {name} NaN pattern")
            np.testing.assert_array_equal(np.isinf(a), np.isinf(e), err_msg=f"{which} inf: {name} inf pattern")


@pytest.mark.parametrize("image_lanes", [False, True], ids=["rows", "images-in-lanes"])
@pytest.mark.parametrize("shape,k,kernel,padding", SHAPES[:4])
def test_channels_last_inputs_give_the_same_bits(shape, k, kernel, padding, image_lanes, monkeypatch):
    """x and dy stored channels-last (as the fused ops hand them over) are read a pixel's channels at a time into
    the same buffers (along the rows and over the images in the lanes): the same results, bit for bit."""
    monkeypatch.setattr(columns, "image_lanes_pay", lambda q: image_lanes)
    x, w, b, dy = _operands(np.random.default_rng(10), shape, k, kernel, padding, np.float32)
    results = []
    for layout in (np.ascontiguousarray, lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)):
        with PathLog() as log:
            results.append((jit.conv2d_forward(layout(x), w, b, True, 1, padding).copy(),
                            *(g.copy() for g in jit.conv2d_backward(layout(dy), layout(x), w, True, 1, padding))))
        assert all(_took_columns(path) for path in log.paths), log.paths
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


# narrow enough for quick finite differences, wide enough (>= half a vector of columns) for the column tiles
FD_CASES = [((2, 2, 5, 11), 3, (3, 2), (1, 0, 0, 1)), ((1, 1, 4, 9), 5, (2, 3), (0, 0, 0, 0))]


@pytest.mark.parametrize("image_lanes", [False, True], ids=["rows", "images-in-lanes"])
@pytest.mark.parametrize("shape,k,kernel,padding", FD_CASES)
@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_column_backward_matches_finite_differences(shape, k, kernel, padding, wrt, image_lanes, monkeypatch):
    """In float64, dx, dw and db of the column tiles (along the rows and over the images in the lanes) against
    central differences of their own forward, and the fused ReLU backward against those of the ReLU'd forward
    (differences taken away from the ReLU's kink)."""
    monkeypatch.setattr(jit, "columns_pay", lambda *args: True)
    monkeypatch.setattr(columns, "image_lanes_pay", lambda columns: image_lanes)
    x, w, b, dy = _operands(np.random.default_rng(12), shape, k, kernel, padding, np.float64)
    assert_conv_backward_matches(jit, x, w, b, dy, padding, wrt, _took_columns, "column")


@pytest.mark.parametrize("shape,k,kernel,padding", [SHAPES[0], SHAPES[4], ((2, 2, 9, 20), 6, (5, 5), (4, 4, 2, 2))])
def test_zero_border_rows_skipped_give_the_same_bits(shape, k, kernel, padding):
    """The column correlation skips a kernel row whose tile reads only the zero border (the forward's padding, dx's
    border of dy): the same bits as the kernel reading every row."""
    x, w, b, _ = _operands(np.random.default_rng(12), shape, k, kernel, padding, np.float32)
    h, r = x.shape[2], kernel[0]
    correlation, (channels, rows) = columns._correlation_tile(k, h + padding[0] + padding[1] - r + 1)
    xp = columns.padded_nchw(x, padding, extra_columns=columns.COLUMN_LANES)
    wt = np.zeros((-(-k // channels) * channels, r, kernel[1], x.shape[1]), np.float32)
    wt[:k] = w.transpose(0, 2, 3, 1)
    bp = np.zeros(wt.shape[0], np.float32)
    bp[:k] = b
    y_shape = (x.shape[0], k, h + padding[0] + padding[1] - r + 1, x.shape[3] + padding[2] + padding[3] - kernel[1] + 1)
    skipped, every_row = np.empty(y_shape, np.float32), np.empty(y_shape, np.float32)
    b_tile = columns._bias_tile(bp, rows)
    correlation(xp, xp.reshape(-1), wt, b_tile, np.float32(-np.inf), padding[0], padding[0] + h, skipped,
                skipped.reshape(-1))
    correlation(xp, xp.reshape(-1), wt, b_tile, np.float32(-np.inf), 0, xp.shape[2], every_row, every_row.reshape(-1))
    np.testing.assert_array_equal(skipped, every_row)
    reference.assert_close(skipped, reference.conv2d_forward(x, w, b, False, 1, padding), np.float32, "y")


def test_the_reported_multiply_adds_count_the_rows_the_kernel_runs():
    """The multiply-adds the column paths report count the kernel rows each block of output rows runs, not the ones
    it skips (worked by hand below), nor every tap of every row."""
    # LeNet's conv2 dx: 14 rows of dx, dy's 10 rows at 4..13 of its 18, 5 kernel rows. Blocks of 2 rows start at 0,
    # 2, ..., 12 and run kernel rows 3-4, 1-4, 0-4, 0-4, 0-4, 0-3, 0-1: 27 x 2 = 54 of the 70 a dense count has
    assert columns._row_products(14, 2, 5, 4, 14) == 54
    # blocks of 4 rows start at 0, 4, 8 and 10 (the last overlapping): kernel rows 1-4, 0-4, 0-4, 0-3: 4 x 18 = 72
    assert columns._row_products(14, 4, 5, 4, 14) == 72
    # no border (a valid forward over 14 input rows, 10 output rows) in blocks of 3 at 0, 3, 6, 7: 4 x 3 x 5 = 60
    assert columns._row_products(10, 3, 5, 0, 14) == 60
    n, c, k, h = 2, 6, 16, 14
    rng = np.random.default_rng(14)
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    w = rng.standard_normal((k, c, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((n, k, 10, 10)).astype(np.float32)
    _, (_, dx_rows) = columns._correlation_tile(c, h)
    with PathLog() as log:
        jit.conv2d_backward(dy, x, w, True, 1, (0, 0, 0, 0))
    ((_, path, macs),) = log.calls
    assert path.startswith("column dw tiles"), path
    dense_dw = n * k * c * 5 * 5 * 10 * 10
    assert macs == dense_dw + n * c * h * k * 5 * columns._row_products(h, dx_rows, 5, 4, 14)
    computed_rows = dx_rows * -(-h // dx_rows)  # the last block overlaps the one before (AVX-512's 4 rows: 16)
    assert macs < dense_dw + n * c * computed_rows * h * k * 5 * 5  # fewer than every tap of every row computed


def test_an_inf_weight_reads_the_padding_rows():
    """With an inf weight the contract's sum has NaN where the padding meets it (0 * inf): the column forward then
    reads every row, and gives the oracle's NaN and inf pattern (4 rows of padding: more than a tile's rows)."""
    padding = (4, 4, 2, 2)
    x, w, b, _ = _operands(np.random.default_rng(13), (2, 1, 12, 12), 6, (5, 5), padding, np.float32)
    w[1, 0, 0, 2] = np.inf
    with PathLog() as log, np.errstate(invalid="ignore", over="ignore"):
        got = jit.conv2d_forward(x, w, b, False, 1, padding)
        want = reference.conv2d_forward(x, w, b, False, 1, padding)
    assert all(_took_columns(path) for path in log.paths), log.paths
    assert np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


# over the images in the lanes: batches that fill the last block of lanes and that do not, LeNet's conv2, padding
# on every side and on some, a 1x1 kernel
LANE_SHAPES = [((13, 6, 14, 14), 16, (5, 5), (0, 0, 0, 0)), ((9, 3, 12, 12), 5, (3, 3), (1, 1, 1, 1)),
               ((20, 2, 8, 9), 4, (2, 3), (1, 0, 0, 1)), ((8, 1, 6, 6), 3, (1, 1), (0, 0, 0, 0))]


def _both_ways(monkeypatch, call):
    """call() along the rows, then over the images in the lanes -> ((its results, paths) along the rows, ... over
    the images in the lanes)."""
    out = []
    for image_lanes in (False, True):
        monkeypatch.setattr(columns, "image_lanes_pay", lambda q: image_lanes)
        with PathLog() as log:
            result = call()
        out.append(([None if a is None else np.array(a) for a in result], log.paths))
    return out


@pytest.mark.parametrize("pooled", [None, "average", "max"])
@pytest.mark.parametrize("shape,k,kernel,padding", LANE_SHAPES)
def test_images_in_the_lanes_against_the_rows_and_the_oracle(shape, k, kernel, padding, pooled, monkeypatch):
    """Over the images in the lanes the forward and dx sum the same products in the same order as along the rows,
    so the same bits, and db comes from the same copy of dy; dw adds the images in another order: against the
    oracle (plain), against the rows' within float32 rounding (with a pool's backward folded into dy's copy, which
    tests/test_fused.py checks against the composition)."""
    rng = np.random.default_rng(15)
    x, w, b, dy = _operands(rng, shape, k, kernel, padding, np.float32)
    (rows_y,), (lanes_y,) = (r for r, _ in _both_ways(monkeypatch, lambda: [columns.column_forward(x, w, b, True,
                                                                                                   padding)]))
    np.testing.assert_array_equal(rows_y, lanes_y)
    relu_y, argmax = (rows_y, None) if pooled != "max" else jit.maxpool2d_forward(rows_y, (2, 2))
    if pooled:
        dy = rng.standard_normal((shape[0], k, rows_y.shape[2] // 2, rows_y.shape[3] // 2)).astype(np.float32)
    for need_dx in (True, False):
        (rows, _), (lanes, paths) = _both_ways(monkeypatch, lambda: columns.column_backward(
            dy, x, w, need_dx, padding, relu_y if pooled else None, pooled, argmax))
        assert paths and all("images in the lanes" in path for path in paths), paths
        if need_dx:
            np.testing.assert_array_equal(rows[0], lanes[0])
        np.testing.assert_array_equal(rows[2], lanes[2])
        want = reference.conv2d_backward(dy, x, w, False, 1, padding)[1] if pooled is None else rows[1]
        reference.assert_close(lanes[1], want, np.float32, "dw")


def test_rows_that_leave_lanes_empty_put_the_images_in_the_lanes():
    """LeNet's conv2 (10 output columns: 10 of 16 lanes, on AVX-512 of 16) puts the images in the lanes, forward and
    backward, for a batch of 16 and for one of 2 (the precompile's pass: the path does not depend on the batch);
    LeNet's conv1 (28 columns of 32) and a layer of 16 columns keep the rows."""
    rng = np.random.default_rng(16)
    for shape, k, padding, lanes in (((16, 6, 14, 14), 16, (0, 0, 0, 0), True), ((2, 6, 14, 14), 16, (0, 0, 0, 0),
                                     True), ((16, 1, 28, 28), 6, (2, 2, 2, 2), False),
                                     ((3, 2, 20, 20), 6, (0, 0, 0, 0), False)):
        x, w, b, dy = _operands(rng, shape, k, (5, 5), padding, np.float32)
        with PathLog() as log:
            jit.conv2d_forward(x, w, b, True, 1, padding)
            jit.conv2d_backward(dy, x, w, True, 1, padding)
        assert all(_took_columns(path) for path in log.paths), log.paths
        assert [("images in the lanes" in path) for path in log.paths] == [lanes] * 2, (shape, log.paths)


def test_non_finite_inputs_over_the_images_in_the_lanes():
    """Over the images in the lanes the tiles multiply no input by a zero the contract's sum lacks, so an inf or NaN
    in x stays on them, and the forward and gradients keep the oracle's NaN and inf pattern."""
    rng = np.random.default_rng(17)
    x, w, b, dy = _operands(rng, (16, 6, 14, 14), 16, (5, 5), (0, 0, 0, 0), np.float32)
    x[3, 2, 5, 7], x[10, 0, 0, 0] = np.inf, np.nan
    with PathLog() as log, np.errstate(invalid="ignore", over="ignore"):
        got = [jit.conv2d_forward(x, w, b, False, 1, (0, 0, 0, 0)), *jit.conv2d_backward(dy, x, w, True, 1,
                                                                                           (0, 0, 0, 0))]
        want = [reference.conv2d_forward(x, w, b, False, 1, (0, 0, 0, 0)),
                *reference.conv2d_backward(dy, x, w, True, 1, (0, 0, 0, 0))]
    assert all("images in the lanes" in path for path in log.paths), log.paths
    for name, a, e in zip(("y", "dx", "dw", "db"), got, want):
        assert np.isnan(e).any() or name in ("dx", "db"), name
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{name} NaN pattern")
        np.testing.assert_array_equal(np.isinf(a), np.isinf(e), err_msg=f"{name} inf pattern")
        finite = np.isfinite(e)
        reference.assert_close(np.where(finite, a, 0), np.where(finite, e, 0), np.float32, name)


def test_images_in_the_lanes_give_identical_bits_on_one_and_two_threads(monkeypatch):
    """Blocks of images split over the threads, dw over fixed chunks of blocks added in order: the same bits."""
    monkeypatch.setattr(columns, "image_lanes_pay", lambda q: True)
    x, w, b, dy = _operands(np.random.default_rng(18), *LANE_SHAPES[0], np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append((columns.column_forward(x, w, b, True, (0, 0, 0, 0)).copy(),
                            *(a.copy() for a in columns.column_backward(dy, x, w, True, (0, 0, 0, 0)))))
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
