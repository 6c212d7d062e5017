"""The jit backend's Winograd convolutions for 3x3, F(2x2, 3x3) and F(4x4, 3x3) (jit/tiles.py `_make_winograd`, the
glue's winograd.py), each test that takes a `tile` run with each forced: which layers take them and which tile the
glue chooses, their outputs against the float64 oracle on awkward shapes (odd output sizes, whose last tiles run
past the input; 'same' and uneven padding; output channels off the lanes, under and over the narrow tile; one and
three transform vectors of input channels; float32 and float64), the fused conv + ReLU + pool bitwise equal to the
composed ops (the same tiles and sums), a channels-last input read in place (its padding read as zeros) bitwise
equal to the padded copy, thread-count independence, non-finite inputs and weights sent to the direct kernels, the
input gradient (the full correlation of dy with the flipped kernel, a Winograd convolution of dy where it fits)
against the oracle and, in float64, against finite differences, the block copy it relies on (`copy_block`), and
the kernels' disk-cache keys (their own, found again by the next process, changed by an edit of their stages)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gradcheck import assert_gradient_matches, dotted_with
from numba_cnn.kernels import reference

numba = pytest.importorskip("numba")
jit = pytest.importorskip("numba_cnn.kernels.jit")
from numba_cnn.kernels._numba_ext import copy_block  # noqa: E402
from numba_cnn.kernels.jit import winograd  # noqa: E402
from numba_cnn.kernels.jit.paths import PathLog  # noqa: E402
from numba_cnn.kernels.jit.tiles import WINOGRAD_CHUNK, WINOGRAD_TILE_NARROW, WINOGRAD_TILE_WIDE  # noqa: E402

CHUNK = WINOGRAD_CHUNK
NARROW, WIDE = WINOGRAD_TILE_NARROW[1], WINOGRAD_TILE_WIDE[1]
# (N, C, H, W), K, padding (top, bottom, left, right); more than 8 input channels and 16 filters (fewer take the
# column tiles), on both targets (AVX2's transform vector is 8 channels, its narrow tile 16 lanes)
C1, C2, C3 = (max(CHUNK, 16) * m for m in (1, 2, 3))
SHAPES = [
    pytest.param((2, 32, 13, 13), 64, (0, 0, 0, 0), id="mnist_conv2"),
    pytest.param((1, C1, 8, 11), 17, (1, 1, 1, 1), id="same_odd_q_k17"),
    pytest.param((3, C3, 7, 6), WIDE + 3, (0, 1, 1, 0), id="uneven_k_off_the_lanes"),
    pytest.param((2, C1, 5, 5), max(NARROW, 24), (0, 0, 0, 0), id="odd_p_q_one_tile_row"),
    pytest.param((1, C2, 3, 4), WIDE, (0, 0, 0, 0), id="one_output_row"),
    pytest.param((2, C1, 20, 9), 2 * WIDE, (1, 1, 1, 1), id="several_bands"),
]


def _winograd_paths(log):
    return [path for path in log.paths if "Winograd" in path]


@pytest.fixture
def tile(winograd_tile):
    return f"F({winograd_tile}x{winograd_tile}, 3x3)"


def _operands(rng, shape, k, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((k, shape[1], 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,padding", SHAPES)
def test_winograd_matches_the_oracle_and_the_fused_op_the_composed_ones(shape, k, padding, dtype, tile, rng):
    x, w, b = _operands(rng, shape, k, dtype)
    for relu in (True, False):
        with PathLog() as log:
            y = jit.conv2d_forward(x, w, b, relu, 1, padding)
        assert _winograd_paths(log) == log.paths and tile in log.paths[0], log.paths
        assert y.dtype == dtype
        reference.assert_close(y, reference.conv2d_forward(x, w, b, relu, 1, padding), dtype, f"relu={relu}")
    if y.shape[2] < 2 or y.shape[3] < 2:
        return
    with PathLog() as log:
        pooled, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)
    assert len(_winograd_paths(log)) == 1 and tile in _winograd_paths(log)[0], log.paths
    composed, composed_argmax = jit.maxpool2d_forward(jit.conv2d_forward(x, w, b, True, 1, padding), (2, 2))
    np.testing.assert_array_equal(pooled, composed)
    np.testing.assert_array_equal(argmax, composed_argmax)
    want, _ = reference.maxpool2d_forward(reference.conv2d_forward(x, w, b, True, 1, padding), (2, 2))
    reference.assert_close(pooled, want, dtype, "pooled")


@pytest.mark.parametrize("shape,k,padding", SHAPES)
def test_a_channels_last_input_read_in_place_gives_the_bits_of_the_padded_copy(shape, k, padding, tile, rng):
    """A channels-last x is read where it lies, its padding (and the rows and columns odd outputs need past it) read
    as zeros; an NCHW x is copied and padded: the same windows, so the same bits."""
    x, w, b = _operands(rng, shape, k, np.float32)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    with PathLog() as log:
        y_cl = jit.conv2d_forward(x_cl, w, b, True, 1, padding)
    assert _winograd_paths(log) == log.paths, log.paths
    np.testing.assert_array_equal(y_cl, jit.conv2d_forward(x, w, b, True, 1, padding))
    reference.assert_close(y_cl, reference.conv2d_forward(x, w, b, True, 1, padding), np.float32, "channels-last x")
    if y_cl.shape[2] >= 2 and y_cl.shape[3] >= 2:
        for got, want in zip(jit.conv2d_relu_maxpool2d_forward(x_cl, w, b, padding),
                             jit.conv2d_relu_maxpool2d_forward(x, w, b, padding)):
            np.testing.assert_array_equal(got, want)


# (N, C, H, W), K, padding: dx's convolution reads dy's K channels and writes C; 'valid', 'same' and uneven padding
# (K over 16: fewer filters take the column tiles)
DX_SHAPES = [
    pytest.param((2, C2, 13, 13), C3, (0, 0, 0, 0), id="valid"),
    pytest.param((3, WIDE + 5, 9, 8), C3, (1, 1, 1, 1), id="same_c_off_the_lanes"),
    pytest.param((1, max(NARROW, 24), 7, 10), C2, (0, 1, 1, 0), id="uneven"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,padding", DX_SHAPES)
def test_input_gradient_by_winograd_matches_the_oracle(shape, k, padding, dtype, tile, rng):
    x, w, _ = _operands(rng, shape, k, dtype)
    p, q = shape[2] + padding[0] + padding[1] - 2, shape[3] + padding[2] + padding[3] - 2
    dy = rng.standard_normal((shape[0], k, p, q)).astype(dtype)
    with PathLog() as log:
        dx, dw, db = jit.conv2d_backward(dy, x, w, True, 1, padding)
    assert len(log.paths) == 1 and f"dx by Winograd {tile}" in log.paths[0], log.paths
    for name, got, want in zip(("dx", "dw", "db"), (dx, dw, db), reference.conv2d_backward(dy, x, w, True, 1, padding)):
        assert got.shape == want.shape and got.dtype == dtype
        reference.assert_close(got, want, dtype, name)
    _, dw_alone, db_alone = jit.conv2d_backward(dy, x, w, False, 1, padding)
    np.testing.assert_array_equal(dw, dw_alone)  # dw's bits do not depend on whether dx is wanted
    np.testing.assert_array_equal(db, db_alone)


def test_input_gradient_by_winograd_matches_finite_differences(tile, rng):
    """In float64, dx from the Winograd convolution of dy against central differences of the forward."""
    x, w, b = _operands(rng, (1, 24, 5, 6), C2, np.float64)
    padding = (1, 1, 1, 1)
    dy = rng.standard_normal((1, C2, 5, 6))
    with PathLog() as log:
        dx, _, _ = jit.conv2d_backward(dy, x, w, True, 1, padding)
    assert f"dx by Winograd {tile}" in log.paths[0], log.paths
    assert_gradient_matches(dx, dotted_with(lambda a: jit.conv2d_forward(a, w, b, False, 1, padding), dy), x.copy(),
                            what="dx")


def test_non_finite_output_gradient_takes_the_direct_input_gradient(rng):
    x, w, _ = _operands(rng, (2, C2, 8, 8), C3, np.float32)
    dy = rng.standard_normal((2, C3, 6, 6)).astype(np.float32)
    with PathLog() as finite_log:
        jit.conv2d_backward(dy, x, w, True, 1, (0, 0, 0, 0))
    dy[1, 3, 2, 2] = np.inf
    with PathLog() as log:
        dx, _, _ = jit.conv2d_backward(dy, x, w, True, 1, (0, 0, 0, 0))
    assert "dx by Winograd" in finite_log.paths[0] and "correlation's tile" in log.paths[0], log.paths
    want = reference.conv2d_backward(dy, x, w, True, 1, (0, 0, 0, 0))[0]
    assert np.isinf(want).any()
    reference.assert_close(dx, want, np.float32, "dx")


def test_channels_last_input_gives_the_same_bits(rng):
    """An input stored channels-last (as the fused conv1 hands it on) is read in place; the bits do not change."""
    x, w, b = _operands(rng, (2, C2, 9, 10), 40, np.float32)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(jit.conv2d_forward(x_cl, w, b, True, 1, (0, 0, 0, 0)),
                                  jit.conv2d_forward(x, w, b, True, 1, (0, 0, 0, 0)))


def test_which_layers_take_it(rng):
    """3x3, stride 1, input channels a multiple of the transform's vector, enough output channels, finite weights;
    anything else takes the direct kernels, and the path log says which (5x5 takes F(2x2, 5x5),
    7x7 no Winograd kernel)."""
    k = max(NARROW, 24)
    cases = [((1, C1, 8, 8), (k, C1, 3, 3), 1, True),
             ((1, C1 + CHUNK // 2, 8, 8), (k, C1 + CHUNK // 2, 3, 3), 1, False),  # C off the vector
             # K: most of the narrow tile's lanes idle (rows too narrow for the column tiles, which take the rest)
             ((1, C1, 5, 5), (NARROW // 2, C1, 3, 3), 1, False),
             ((1, C1, 8, 8), (WIDE, C1, 5, 5), 1, True),
             ((1, C1, 9, 9), (WIDE, C1, 7, 7), 1, False),
             ((1, C1, 9, 9), (k, C1, 3, 3), 2, False)]
    for x_shape, w_shape, stride, takes in cases:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        b = np.zeros(w_shape[0], np.float32)
        with PathLog() as log:
            y = jit.conv2d_forward(x, w, b, True, stride, (0, 0, 0, 0))
        assert bool(_winograd_paths(log)) == takes, (x_shape, w_shape, stride, log.paths)
        reference.assert_close(y, reference.conv2d_forward(x, w, b, True, stride, (0, 0, 0, 0)), np.float32)


def test_the_glue_chooses_the_tile_with_fewer_products_rounded_as_computed():
    """F(4x4, 3x3) where its 36 products per tile, in whole register tiles per band, come to at most
    WINOGRAD_4X4_SHARE[3] of F(2x2, 3x3)'s 16 per tile; F(4x4, 5x5) where its 64 come to WINOGRAD_4X4_SHARE[5] of
    F(2x2, 5x5)'s 36."""
    rows = 4
    # 32 x 32: 64 tiles of 4x4 (2 bands of 32) against 256 of 2x2 (8 bands): 2304 products against 4096
    assert winograd.winograd_output_tile(3, 32, 32, rows) == 4
    # 10 x 10: 9 tiles rounded to 12 against 25 rounded to 28: 432 products against 448
    assert winograd.winograd_output_tile(3, 10, 10, rows) == 2
    # 4 x 4: one tile, computed as 4, against 4 tiles: 144 against 64
    assert winograd.winograd_output_tile(3, 4, 4, rows) == 2
    # 5x5 at 14 x 14: 16 tiles against 49 rounded to 52, 1024 products against 1872; at 10 x 10 768 against 1008
    assert winograd.winograd_output_tile(5, 14, 14, rows) == 4
    assert winograd.winograd_output_tile(5, 10, 10, rows) == 4
    # 4 x 4: one tile, computed as 4, 256 products against 4 tiles' 144
    assert winograd.winograd_output_tile(5, 4, 4, rows) == 2


@pytest.mark.parametrize("where", ["x", "w"])
def test_non_finite_operands_take_the_direct_kernels(where, tile, rng):
    """A lone inf gives inf outputs in the direct sum but inf - inf = NaN in the transforms: an inf or NaN input
    (flagged by the kernel, then recomputed) or weight (checked first) gives the direct kernels' results, which
    place NaN and inf as the oracle does."""
    x, w, b = _operands(rng, (2, C1, 9, 8), 40, np.float32)
    w *= 0.1
    if where == "x":
        x[0, 3, 4, 4] = np.inf
        x[1, 0, 2, 6] = np.nan
    else:
        w[5, 2, 1, 1] = np.inf
    with PathLog() as log:
        y = jit.conv2d_forward(x, w, b, False, 1, (0, 0, 0, 0))
        pooled, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    assert not _winograd_paths(log), log.paths
    want = reference.conv2d_forward(x, w, b, False, 1, (0, 0, 0, 0))
    assert np.isinf(want).any() and (where == "w" or np.isnan(want).any())
    reference.assert_close(y, want, np.float32)  # non-finite elements matched exactly
    want_pooled, _ = reference.maxpool2d_forward(reference.conv2d_forward(x, w, b, True, 1, (0, 0, 0, 0)), (2, 2))
    reference.assert_close(pooled, want_pooled, np.float32)


def test_one_and_two_threads_give_identical_bits(tile, rng):
    """Images are dealt to tasks, each image's tiles summed alike: bitwise the same for any thread count."""
    x, w, b = _operands(rng, (5, C2, 11, 12), WIDE + 1, np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append((jit.conv2d_forward(x, w, b, True, 1, (1, 1, 1, 1)).copy(),
                            *(a.copy() for a in jit.conv2d_relu_maxpool2d_forward(x, w, b))))
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_copy_block_copies_a_constant_count_compiled_and_interpreted():
    @numba.njit
    def copy_compiled(dst, src):
        copy_block(dst, 3, src, 5, 16)

    src = np.arange(30, dtype=np.float32)
    for copy in (copy_compiled, lambda dst, s: copy_block(dst, 3, s, 5, 16)):
        dst = np.full(24, -1.0, np.float32)
        copy(dst, src)
        np.testing.assert_array_equal(dst[3:19], src[5:21])
        assert (dst[:3] == -1).all() and (dst[19:] == -1).all()
    with pytest.raises(numba.core.errors.TypingError):  # a strided view is refused, not copied as if contiguous
        copy_compiled(np.zeros(24, np.float32), src[::2])


_WINOGRAD_KERNELS = ("tiles._winograd_wide", "tiles._winograd_narrow", "tiles._winograd4_wide", "tiles._winograd4_narrow",
                     "tiles._winograd5_wide", "tiles._winograd5_narrow", "tiles._winograd5x4_wide",
                     "tiles._winograd5x4_narrow", "winograd_grad._winograd_weight_grad",
                     "winograd_grad._winograd4_weight_grad", "winograd_grad._winograd5_weight_grad",
                     "winograd_grad._winograd5x4_weight_grad")
_INDEX_KEYS = """
    import sys
    from numba import types
    from numba.core.registry import cpu_target
    from numba_cnn.kernels.jit import tiles, winograd_grad
    sig = (types.float32[:, :, :, ::1],)  # any signature: the key's other parts are what differ
    for name in sys.argv[1:]:
        module, kernel = name.split(".")
        print(getattr(vars()[module], kernel).task._cache._index_key(sig, cpu_target.target_context.codegen())[2])
"""


def _index_keys(*names):
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_INDEX_KEYS), *names], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, NUMBA_CNN_CACHE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def test_winograd_kernels_have_cache_keys_of_their_own_that_the_next_process_finds_again():
    """Each Winograd kernel's work is a task, a jit function that run_parts runs in parallel; what compiles, and is
    cached, is the task. Its disk cache key is the same in two processes (else the next process would compile it
    again), and different for each kernel, whose code is the same and whose constants (window, tile) differ."""
    first, second = _index_keys(*_WINOGRAD_KERNELS), _index_keys(*_WINOGRAD_KERNELS)
    assert len(first) == len(_WINOGRAD_KERNELS) and first == second
    assert len(set(first)) == len(first)


_FRESH_AND_CACHED = """
    import sys
    import numpy as np
    from numba_cnn.kernels.jit import winograd, winograd_grad
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 32, 9, 9)).astype(np.float32)
    w = rng.standard_normal((40, 32, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((3, 40, 9, 9)).astype(np.float32)
    y = winograd.winograd_conv(x, w, w[:, 0, 0, 0].copy(), True, (1, 1, 1, 1), False)[0]
    dw, db = winograd_grad.winograd_weight_grad(dy, x, (1, 1, 1, 1))[:2]
    np.savez(sys.argv[1], y=y, dw=dw, db=db)
"""


def test_kernels_loaded_from_the_cache_give_the_bits_of_the_ones_compiled_in_the_process(tmp_path):
    """A Winograd forward and weight gradient compiled in one process and loaded from the disk cache by the next
    give the same bits: the task is one compiled function, called by its address, and not linked into (and
    optimised again inside) each kernel, where a copy compiled in the process and one loaded from the cache once
    came out with different sums."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_CNN_CACHE="1")
    for name in ("compiled", "loaded"):
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(_FRESH_AND_CACHED), str(tmp_path / name)],
                             capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
    compiled, loaded = np.load(tmp_path / "compiled.npz"), np.load(tmp_path / "loaded.npz")
    for key in ("y", "dw", "db"):
        np.testing.assert_array_equal(compiled[key], loaded[key])


def test_kernels_inlining_the_stages_carry_their_source_stamp():
    """Numba's cache keys a function on its own code and closure variables, not on the helpers it inlines from another
    module: every task built from winograd_stages.py closes over the SHA-256 of that file, so an edit there gives
    the tasks new cache keys (the stamp changed here in place)."""
    import hashlib
    from pathlib import Path

    from numba.core import types
    from numba.core.registry import cpu_target

    from numba_cnn.kernels.jit import tiles, winograd_grad, winograd_stages

    stamp = hashlib.sha256(Path(winograd_stages.__file__).read_bytes()).hexdigest()
    assert winograd_stages.STAGES_STAMP == stamp
    sig, codegen = (types.float32[:, ::1],), cpu_target.target_context.codegen()
    for name in _WINOGRAD_KERNELS:
        module, attribute = name.split(".")
        task = getattr({"tiles": tiles, "winograd_grad": winograd_grad}[module], attribute).task
        (cell,) = [cell for cell in task.py_func.__closure__ if cell.cell_contents == stamp]
        key = task._cache._index_key(sig, codegen)
        try:
            cell.cell_contents = "edited"
            assert task._cache._index_key(sig, codegen) != key, name
        finally:
            cell.cell_contents = stamp
        assert task._cache._index_key(sig, codegen) == key
