"""Tests specific to the jit backend: compiled kernels against their own Python bodies, thread-count
reproducibility, the float64 path, the tile edge cases (narrow outputs, small kernels, many channels), the general
(strided, padded) convolution on awkward shapes, the newer ops (pooling of any window, average pooling, batch
normalisation) on channels-last inputs, and the on-disk cache. Cross-backend parity lives in test_kernels.py."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba_cnn.kernels import reference
from numba_cnn.kernels.contract import is_channels_last

numba = pytest.importorskip("numba")
jit = pytest.importorskip("numba_cnn.kernels.jit")
from numba_cnn.kernels.jit import tiles  # noqa: E402

VALID = (0, 0, 0, 0)  # no padding


def _operands(rng, shape, k, r, s, dtype):
    n, c, h, wd = shape
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((k, c, r, s)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    dy = rng.standard_normal((n, k, h - r + 1, wd - s + 1)).astype(dtype)
    return x, w, b, dy


# tile edge cases: output narrower than a column tile, 1x1 and 1x2 kernels (narrower than a tap tile), K over
# one 64-lane block, one image, one channel, non-square kernels, a kernel row of 5 taps (overlapping tap tiles)
EDGE_CASES = [
    ((1, 1, 3, 3), 1, 1, 1),
    ((2, 3, 5, 4), 5, 1, 2),
    ((3, 2, 7, 9), 70, 3, 3),
    ((1, 4, 6, 12), 33, 4, 2),
    ((2, 2, 7, 6), 3, 2, 5),
    ((2, 1, 28, 28), 32, 3, 3),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,r,s", EDGE_CASES)
def test_conv_edge_shapes_against_reference(shape, k, r, s, dtype):
    rng = np.random.default_rng(7)
    x, w, b, dy = _operands(rng, shape, k, r, s, dtype)
    for relu in (False, True):
        y = jit.conv2d_forward(x, w, b, relu, 1, VALID)
        assert y.dtype == dtype and y.flags.c_contiguous
        reference.assert_close(y, reference.conv2d_forward(x, w, b, relu, 1, VALID), dtype, f"y (relu={relu})")
    dx, dw, db = jit.conv2d_backward(dy, x, w, True, 1, VALID)
    for name, got, want in zip(("dx", "dw", "db"), (dx, dw, db), reference.conv2d_backward(dy, x, w, True, 1, VALID)):
        assert got.dtype == dtype
        reference.assert_close(got, want, dtype, name)
    none, dw2, db2 = jit.conv2d_backward(dy, x, w, False, 1, VALID)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


@pytest.mark.parametrize("start", [np.int64(0), np.int32(3), np.uint64(5), np.int64(7), np.uint8(2)])
def test_rest_of_is_the_slice_from_start_compiled_without_its_checks(start):
    """`rest_of(a, start)` compiled is a[start:]: the same length and the same memory (what is written through it
    lands in a), for starts signed and unsigned, narrower than a pointer or not, the array's end included."""
    from numba import njit

    from numba_cnn.kernels._numba_ext import rest_of

    @njit
    def add_one_from(a, start):
        view = rest_of(a, start)
        for u in range(view.shape[0]):
            view[u] += 1
        return view.shape[0]

    a = np.arange(7, dtype=np.float32)
    want = a.copy()
    want[int(start):] += 1
    assert add_one_from(a, start) == 7 - int(start)
    np.testing.assert_array_equal(a, want)
    assert rest_of(want, start).base is want  # interpreted: the slice itself


def test_tile_kernels_match_their_python_bodies():
    """Each private kernel, compiled and interpreted (prange as range, the stack tile as a heap array), on tiny
    odd shapes: the same loops, so the results agree to rounding."""
    rng = np.random.default_rng(3)
    x_cl = rng.standard_normal((2, 5, 9, 3)).astype(np.float32)  # channels-last, as the tile kernel reads it
    wt = rng.standard_normal((2, 3, 3, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    outputs = []
    for kernel in (jit._conv_tile_narrow, jit._conv_tile_narrow.py_func):
        y = np.empty((2, 5, 4 + 2, 7), np.float32)  # row_shift 1: one virtual zero row above and below
        kernel(x_cl, wt, b, np.float32(0), 1, 0, y)
        outputs.append(y)
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)

    x = rng.standard_normal((2, 3, 5, 9)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 5 + 2, 64)).astype(np.float32)  # P = 5 - 1 + 1, Q = 9 - 5 + 1, 1 pad column
    grads = []
    for kernel in (jit._weight_grad_wide, jit._weight_grad_wide.py_func):
        dwt = np.zeros((2, 3, 1, 5, 64), np.float32)  # two image chunks
        kernel(x, dy, 1, 1, 5, 2, dwt)
        grads.append(dwt)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)

    a = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    packed = []
    for kernel in (jit._pack_channels_last, jit._pack_channels_last.py_func):
        out, sums = np.full((2, 3, 4 + 2 * 2, 32), np.nan, np.float32), np.empty((2, 32), np.float32)
        kernel(a, 2, out, sums)
        np.testing.assert_array_equal(out[:, :, 2:6, :5], a.transpose(0, 2, 3, 1))
        assert not out[:, :, :2].any() and not out[:, :, 6:].any() and not out[..., 5:].any()
        packed.append(sums)
    np.testing.assert_allclose(packed[0], packed[1], rtol=1e-6)
    np.testing.assert_allclose(packed[0][:, :5], a.sum(axis=(2, 3)), rtol=1e-5)

    ties = rng.integers(-1, 2, (2, 3, 7, 5)).astype(np.float32)  # many tied windows
    pooled = []
    for fwd, bwd in ((tiles._maxpool_forward, tiles._maxpool_backward),
                     (tiles._maxpool_forward.py_func, tiles._maxpool_backward.py_func)):
        y, arg = np.empty((2, 3, 3, 2), np.float32), np.empty((2, 3, 3, 2), np.uint8)
        fwd(ties, y, arg)
        dx = np.full(ties.shape, np.nan, np.float32)
        bwd(y + 1, arg, np.float32(0), dx)
        pooled.append((y, arg, dx))
    for got, want in zip(*pooled):
        np.testing.assert_array_equal(got, want)


def test_maxpool_first_maximum_wins_and_odd_edges_are_zero():
    x = np.zeros((1, 1, 3, 5), np.float32)
    x[0, 0, 0, 2:4] = 1  # window (0, 1): tie between offsets 0 and 1
    y, arg = jit.maxpool2d_forward(x, (2, 2))
    assert y.shape == (1, 1, 1, 2) and arg.tolist() == [[[[0, 0]]]]
    dx = jit.maxpool2d_backward(np.ones_like(y), arg, x.shape, (2, 2))
    expected = np.zeros_like(x)
    expected[0, 0, 0, [0, 2]] = 1
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 numba threads")
def test_one_and_two_threads_give_identical_bits():
    """Forward and dx split over images, dw over tiles (and fixed image chunks) with a fixed summation order per
    element, db from fixed per-image sums: none depends on the thread count, so results are bitwise equal; the
    fused ops too (their listed backward: dx per image, dw per output channel in image order). conv1's shape (one
    channel, 3 dw tiles) takes the image-chunked dw."""
    rng = np.random.default_rng(5)
    cases = [((6, 3, 13, 13), 64, 3, 3), ((5, 1, 12, 10), 32, 3, 3), ((3, 2, 9, 8), 70, 2, 3),
             ((9, 1, 28, 28), 32, 3, 3)]
    before = numba.get_num_threads()
    try:
        for shape, k, r, s in cases:
            x, w, b, dy = _operands(rng, shape, k, r, s, np.float32)
            results = []
            for threads in (1, 2):
                rng_local = np.random.default_rng(11)
                numba.set_num_threads(threads)
                y = jit.conv2d_forward(x, w, b, True, 1, VALID)
                grads = jit.conv2d_backward(dy, x, w, True, 1, VALID)
                pooled = jit.maxpool2d_forward(x, (2, 2))
                fused = jit.conv2d_relu_maxpool2d_forward(x, w, b)
                pooled_shape = fused[0].shape  # a pooled gradient half zeros, as dropout leaves it
                dpool = rng_local.standard_normal(pooled_shape) * (rng_local.random(pooled_shape) < 0.5)
                dpool = dpool.astype(np.float32)
                fused_grads = jit.conv2d_relu_maxpool2d_backward(dpool, *fused, x, w, True)
                fused_grads_no_dx = jit.conv2d_relu_maxpool2d_backward(dpool, *fused, x, w, False)[1:]
                results.append((y, *grads, *pooled, jit.maxpool2d_backward(pooled[0], pooled[1], x.shape, (2, 2)),
                                *fused, *fused_grads, *fused_grads_no_dx))
            for one, two in zip(*results):
                np.testing.assert_array_equal(one, two)
    finally:
        numba.set_num_threads(before)


def _run_python(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_second_process_loads_kernels_from_the_cache(tmp_path):
    """A fresh process with a warm NUMBA_CACHE_DIR loads the compiled kernels instead of compiling them."""
    code = """
        import numpy as np
        from numba_cnn.kernels import jit
        from numba_cnn.kernels.jit import tiles
        x = np.ones((1, 1, 5, 5), np.float32)  # 3 output columns: too few for the column tiles' lanes on any target
        jit.conv2d_forward(x, np.ones((2, 1, 3, 3), np.float32), np.zeros(2, np.float32), True, 1, (0, 0, 0, 0))
        jit.maxpool2d_forward(x, (2, 2))
        for kernel in (jit._conv_tile_small, tiles._maxpool_forward.task):  # K = 2: the small tile
            print(sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values()))
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CNN_CACHE="1")
    first = _run_python(code, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["0", "1", "0", "1"]  # compiled (a miss) and saved
    second = _run_python(code, env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["1", "0", "1", "0"]  # loaded, nothing compiled


def test_cache_toggle_disables_the_disk_cache(tmp_path):
    code = """
        from numba_cnn.kernels import jit
        print(type(jit._conv_tile_wide._cache).__name__, jit.CACHE)
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CNN_CACHE="0")
    result = _run_python(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NullCache", "False"]


def test_tiles_follow_the_target_vector_registers():
    """The tile shapes come from the features numba compiles for: 512-bit vectors and 32 registers with avx512f,
    else 256 and 16; every accumulator tile leaves registers for the operands it multiplies."""
    ext = pytest.importorskip("numba_cnn.kernels._numba_ext")
    assert ext.VECTOR_BITS == (512 if "avx512f" in ext.TARGET_FEATURES else 256 if "avx" in ext.TARGET_FEATURES
                               else 128)
    assert ext.VECTOR_REGISTERS == (32 if ext.AVX512 else 16)
    if not os.environ.get("NUMBA_CNN_TILE_BITS"):
        assert (ext.TILE_BITS, ext.TILE_REGISTERS) == (ext.VECTOR_BITS, ext.VECTOR_REGISTERS)
    per_register = max(ext.TILE_BITS, 256) // 32  # fp32 lanes per vector register
    for lanes, columns in (jit.CONV_TILE_NARROW, jit.CONV_TILE_WIDE, jit.CONV_TILE_SMALL, jit.CONV_POOL_TILE,
                           jit.CONV_POOL_TILE_NARROW):
        assert lanes % per_register == 0
        assert columns * lanes // per_register <= ext.TILE_REGISTERS - 2
    for lanes in (jit.GRAD_LANES_NARROW, jit.GRAD_LANES_WIDE):
        assert jit.TILE_TAPS * lanes // per_register <= ext.TILE_REGISTERS - 2
    columns, channels = jit.CONV1_TILE
    assert columns % per_register == 0 and columns * channels // per_register <= ext.TILE_REGISTERS - 2
    channels, lanes = jit.STRIDED_GRAD_TILE  # the general convolution's dw tile (its other tile is CONV_TILE_NARROW)
    assert lanes % per_register == 0 and channels * lanes // per_register <= ext.TILE_REGISTERS - 2


_IR_PROBE = """
    import numpy as np
    from numba_cnn.kernels import jit, _numba_ext
    from numba_cnn.kernels.jit import tiles
    rng = np.random.default_rng(11)
    # 20 and 40 channels: the direct tiles on every target (20 is a multiple of neither Winograd's channel chunk,
    # 8 or 16, and too many input channels for the column tiles)
    x = rng.standard_normal((2, 20, 7, 7)).astype(np.float32)
    w = rng.standard_normal((40, 20, 3, 3)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    xw = rng.standard_normal((2, 32, 7, 7)).astype(np.float32)  # 32 and 64: Winograd's
    ww = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    bw = rng.standard_normal(64).astype(np.float32)
    y = jit.conv2d_forward(x, w, b, True, 1, (0, 0, 0, 0))
    dx, dw, db = jit.conv2d_backward(y, x, w, True, 1, (0, 0, 0, 0))
    fused = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    fdx, fdw, fdb = jit.conv2d_relu_maxpool2d_backward(np.ones_like(fused[0]), *fused, x, w, True)
    yw = jit.conv2d_forward(xw, ww, bw, True, 1, (0, 0, 0, 0))
    pw, pargw = jit.conv2d_relu_maxpool2d_forward(xw, ww, bw)
    np.savez(OUT, y=y, dx=dx, dw=dw, db=db, py=fused[0], parg=fused[1], fdx=fdx, fdw=fdw, fdb=fdb, yw=yw, pw=pw,
             pargw=pargw)
    attribute = '"prefer-vector-width"="%d"' % _numba_ext.VECTOR_BITS
    for kernel in (jit._conv_tile_wide, jit._conv_tile_narrow, jit._conv_pool, jit._weight_grad_wide,
                   tiles._winograd_wide.task):
        ir = kernel.inspect_llvm(kernel.signatures[0])
        print(kernel.py_func.__name__, attribute in ir)
"""


@pytest.mark.parametrize("stack_tiles", ["1", "0"])
def test_stack_tile_switch_and_vector_width_attribute(tmp_path, stack_tiles):
    """Compiled afresh (inspection needs code compiled in the process), every tile kernel's LLVM IR carries the
    target's vector width, with stack tiles or with NUMBA_CNN_STACK_TILES=0; and the switch changes no result:
    the heap tiles run the same arithmetic in the same order, so the results are bitwise those of this process."""
    out = tmp_path / "results.npz"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_CNN_CACHE="1",
               NUMBA_CNN_STACK_TILES=stack_tiles)
    result = _run_python(f"OUT = {str(out)!r}\n" + textwrap.dedent(_IR_PROBE), env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert [line.split()[1] for line in lines if line] == ["True"] * 5, result.stdout
    got = np.load(out)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 20, 7, 7)).astype(np.float32)
    w = rng.standard_normal((40, 20, 3, 3)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    xw = rng.standard_normal((2, 32, 7, 7)).astype(np.float32)
    ww = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    bw = rng.standard_normal(64).astype(np.float32)
    y = jit.conv2d_forward(x, w, b, True, 1, VALID)
    fused = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    want = dict(zip(("y", "dx", "dw", "db", "py", "parg", "fdx", "fdw", "fdb", "yw", "pw", "pargw"),
                    (y, *jit.conv2d_backward(y, x, w, True, 1, VALID), *fused,
                     *jit.conv2d_relu_maxpool2d_backward(np.ones_like(fused[0]), *fused, x, w, True),
                     jit.conv2d_forward(xw, ww, bw, True, 1, VALID), *jit.conv2d_relu_maxpool2d_forward(xw, ww, bw))))
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


_AVX2 = "+avx,+avx2,+fma,+sse4.2,+popcnt,+f16c,+bmi,+bmi2,+lzcnt,+movbe"
_AVX512 = _AVX2 + ",+avx512f,+avx512bw,+avx512cd,+avx512dq,+avx512vl"
_ASM_PROBE = """
    from numba import types
    from numba_cnn.kernels import jit, _numba_ext
    f32 = types.float32
    sig = (types.Array(f32, 4, "C"), types.Array(f32, 4, "C"), types.Array(f32, 1, "C"), f32, types.int64,
           types.int64, types.Array(f32, 4, "C"))
    kernel = jit._conv_tile_wide
    kernel.compile(sig)  # compiled, never run: this host may lack the instructions
    asm = kernel.inspect_asm(sig)
    print(_numba_ext.VECTOR_BITS, jit.CONV_TILE_WIDE, asm.count("zmm"), asm.count("ymm"), asm.count("vfmadd"))
"""


@pytest.mark.parametrize("cpu,features,bits", [("haswell", _AVX2, 256), ("skylake-avx512", _AVX512, 512)])
def test_other_targets_compile_their_own_tiles(tmp_path, cpu, features, bits):
    """NUMBA_CPU_NAME/NUMBA_CPU_FEATURES pick the tiles: an AVX2 target gets 256-bit FMAs and no zmm register, an
    AVX-512 one its 512-bit tile in zmm registers (compiled here, whatever this host runs)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features)
    result = _run_python(_ASM_PROBE, env)
    assert result.returncode == 0, result.stderr
    width, *tile, zmm, ymm, fmas = result.stdout.replace("(", " ").replace(")", " ").replace(",", " ").split()
    assert int(width) == bits and int(fmas) > 0
    if bits == 512:
        assert int(zmm) > 0
    else:
        assert int(zmm) == 0 and int(ymm) > 0


_OTHER_TILES_PROBE = """
    import numpy as np
    from numba_cnn.kernels import jit, reference
    from numba_cnn.kernels.layers import relu_backward
    print(jit.CONV_TILE_NARROW, jit.CONV_TILE_WIDE, jit.GRAD_LANES_WIDE, jit.CONV1_TILE)
    rng = np.random.default_rng(2)
    for x_shape, w_shape in [((3, 1, 28, 28), (32, 1, 3, 3)), ((3, 32, 13, 13), (64, 32, 3, 3)),
                             ((2, 3, 9, 8), (5, 3, 3, 3)), ((1, 2, 7, 7), (70, 2, 2, 2))]:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        b = rng.standard_normal(w_shape[0]).astype(np.float32)
        y = jit.conv2d_forward(x, w, b, True, 1, (0, 0, 0, 0))
        reference.assert_close(y, reference.conv2d_forward(x, w, b, True, 1, (0, 0, 0, 0)), np.float32, "y")
        dy = rng.standard_normal(y.shape).astype(np.float32)
        for got, want in zip(jit.conv2d_backward(dy, x, w, True, 1, (0, 0, 0, 0)),
                             reference.conv2d_backward(dy, x, w, True, 1, (0, 0, 0, 0))):
            reference.assert_close(got, want, np.float32, "grad")
        pooled, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b)
        want_pooled, want_argmax = jit.maxpool2d_forward(y, (2, 2))
        assert np.array_equal(pooled, want_pooled) and np.array_equal(argmax, want_argmax)
        dp = rng.standard_normal(pooled.shape).astype(np.float32)
        fused = jit.conv2d_relu_maxpool2d_backward(dp, pooled, argmax, x, w, True)
        composed = jit.conv2d_backward(jit.maxpool2d_backward(relu_backward(dp, pooled), argmax, y.shape, (2, 2)),
                                       x, w, True, 1, (0, 0, 0, 0))
        for got, want in zip(fused, composed):
            reference.assert_close(got, want, np.float32, "fused grad")
    from numba_cnn.kernels.jit import layers as jit_layers
    for n, d, m in ((13, 40, 50), (7, 1100, 10), (130, 400, 120)):  # the dense forward's 6-row tile
        x, w, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((n, d), (d, m), (m,)))
        want = x.astype(np.float64) @ w.astype(np.float64) + b
        reference.assert_close(jit_layers.dense_forward(x, w, b), want, np.float32, "dense y")
    print("ok", jit_layers.DENSE_ROWS)
"""


@pytest.mark.slow
def test_avx512_tile_constants_compute_the_same_results(tmp_path):
    """The AVX-512 tile shapes (NUMBA_CNN_TILE_BITS=512) run here through the same kernels with other constants:
    correct against the oracle, fused forward == composed and the fused backward within rounding of the composed
    one, though an AVX2 host spills their accumulators."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CNN_TILE_BITS="512")
    result = _run_python(_OTHER_TILES_PROBE, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "(32, 7) (64, 4) 64 (32, 6)" and "ok 6" in result.stdout, result.stdout


def test_outputs_are_fresh_without_an_arena_and_owned_by_the_arena_within_one():
    rng = np.random.default_rng(3)
    x, w, b, _ = _operands(rng, (2, 3, 9, 9), 5, 3, 3, np.float32)
    y1, arg1 = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    keep = y1.copy(), arg1.copy()
    y2, arg2 = jit.conv2d_relu_maxpool2d_forward(x * 2, w, b)  # no arena open: new arrays
    assert not np.shares_memory(y1, y2) and not np.shares_memory(arg1, arg2)
    np.testing.assert_array_equal(y1, keep[0])
    arena = jit.OutputArena()
    with arena:
        y3, arg3 = jit.conv2d_relu_maxpool2d_forward(x * 2, w, b)
        y4, _ = jit.conv2d_relu_maxpool2d_forward(x, w, b)  # not released: another buffer
    assert not np.shares_memory(y3, y4) and arena.nbytes >= y3.nbytes + y4.nbytes
    np.testing.assert_array_equal(y3, y2)
    address = y3.__array_interface__["data"][0]
    arena.release()  # the owner says y3 and y4 are dead: their buffers are handed out again, every element rewritten
    with arena:
        y5, _ = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    assert y5.__array_interface__["data"][0] in (address, y4.__array_interface__["data"][0])
    np.testing.assert_array_equal(y5, keep[0])
    y6, _ = jit.conv2d_relu_maxpool2d_forward(x, w, b)  # the arena is closed again: fresh
    assert not any(np.shares_memory(y6, a) for a in (y3, y4, y5))


def test_relu_backward_writes_over_a_donated_gradient_once_and_nothing_else():
    """Within an arena, relu_backward writes its output over dy where the owner donated dy (either layout, the same
    bits as a fresh output), once per donation; never over an array not donated, nor after the release."""
    from numba_cnn.kernels import numpy_layers

    rng = np.random.default_rng(5)
    y = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    for stored in ((3, 4, 5, 6), (3, 5, 6, 4)):
        dy = rng.standard_normal(stored).astype(np.float32)
        dy = dy if stored == y.shape else dy.transpose(0, 3, 1, 2)
        want = numpy_layers.relu_backward(dy, y)
        arena = jit.OutputArena()
        with arena:
            kept = dy.copy()
            fresh = jit.layers.relu_backward(kept, y)  # not donated: a buffer of the arena's
            assert not np.shares_memory(fresh, kept)
            np.testing.assert_array_equal(kept, dy)
            arena.donate(kept)
            over = jit.layers.relu_backward(kept, y)
            assert np.shares_memory(over, kept) and over.strides == kept.strides
            np.testing.assert_array_equal(over, want)
            np.testing.assert_array_equal(fresh, want)
            again = jit.layers.relu_backward(over, y)  # the donation was used up
            assert not np.shares_memory(again, over)
            withdrawn = dy.copy()
            arena.donate(withdrawn)
            arena.release()
            assert not np.shares_memory(jit.layers.relu_backward(withdrawn, y), withdrawn)
            np.testing.assert_array_equal(withdrawn, dy)


def test_nchw_copies_channels_last_arrays_exactly():
    """buffers.nchw: a channels-last float array comes back as an equal C-contiguous NCHW copy (the compiled
    transposing copy, NaN and inf included, odd shapes); other dtypes too (numpy's copy); an NCHW array, or one
    that is both (a single pixel or channel), itself."""
    from numba_cnn.kernels.jit import buffers

    rng = np.random.default_rng(12)
    for shape in ((3, 5, 7, 9), (2, 33, 4, 1), (1, 1, 1, 1), (4, 2, 17, 3)):
        for dtype in (np.float32, np.float64, np.uint8):
            stored = (rng.standard_normal((shape[0], shape[2], shape[3], shape[1])) * 9).astype(dtype)
            if dtype != np.uint8:
                stored.reshape(-1)[::5] = np.nan
                stored.reshape(-1)[1::7] = -np.inf
            a = stored.transpose(0, 3, 1, 2)
            copy = buffers.nchw(a)
            assert copy.shape == shape and copy.dtype == dtype and copy.flags.c_contiguous
            # one pixel or one channel: both layouts at once, nothing to copy
            assert np.shares_memory(copy, stored) == (shape[1] == 1 or shape[2] * shape[3] == 1)
            np.testing.assert_array_equal(copy, a)
            assert buffers.nchw(copy) is copy


def test_scratch_keeps_one_buffer_per_name_and_dtype_grown_to_the_largest_shape():
    """Layers of different shapes share a scratch name's buffer (its use ends within an op): a smaller shape is a
    view of it, a larger one replaces it, another dtype has a buffer of its own."""
    from numba_cnn.kernels.jit import buffers

    first = buffers.scratch("test.grow", (4, 8), np.float32)
    smaller = buffers.scratch("test.grow", (2, 3), np.float32)
    assert smaller.shape == (2, 3) and smaller.flags.c_contiguous and np.shares_memory(first, smaller)
    larger = buffers.scratch("test.grow", (10, 10), np.float32)
    assert larger.shape == (10, 10) and not np.shares_memory(first, larger)
    assert np.shares_memory(buffers.scratch("test.grow", (4, 8), np.float32), larger)
    other = buffers.scratch("test.grow", (4, 8), np.int32)
    assert other.dtype == np.int32 and not np.shares_memory(other, larger)


def test_buffers_start_on_a_cache_line():
    """The backend's buffers start on 64-byte boundaries (numpy's own start 16 or 32 bytes into a line), whichever
    way they are made: aligned_empty, scratch, an arena's, and an op's output with and without an arena."""
    from numba_cnn.kernels.jit import buffers

    def aligned(a):
        return a.__array_interface__["data"][0] % buffers.ALIGNMENT == 0

    for shape, dtype in (((3,), np.uint8), ((5, 7), np.float32), ((2, 3, 33, 17), np.float64), ((1,), np.int64)):
        a = buffers.aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable and aligned(a)
        a[...] = 1
        assert (a == 1).all()
    assert aligned(buffers.scratch("test.alignment", (3, 5, 7), np.float32))
    rng = np.random.default_rng(4)
    x, w, b, _ = _operands(rng, (2, 3, 9, 9), 5, 3, 3, np.float32)
    y, argmax = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    assert aligned(y) and aligned(argmax)
    arena = jit.OutputArena()
    with arena:
        assert aligned(arena.take((4, 3), np.float32))
        y, _ = jit.conv2d_relu_maxpool2d_forward(x, w, b)
    assert aligned(y)


# ------------------------------------------------------------------------ general convolution and the newer ops

def _channels_last(a):
    """a stored channels-last (an NHWC buffer viewed as NCHW), as INFO.channels_last lets the ops receive it."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


# (x shape, w shape, stride, padding): stride 2 on odd sizes (a bottom/right rest no output reads), 5x5 'same',
# asymmetric padding, one and three input channels, a stride of 3, a 1x1 kernel that skips columns, padding wider
# than the kernel (rows and columns of pure padding), stride 1 padded through the register tiles, K over a lane block,
# rows wide enough for whole column tiles
GENERAL_CASES = [
    ((2, 3, 9, 7), (5, 3, 3, 3), 2, (0, 0, 0, 0)),
    ((2, 1, 9, 8), (4, 1, 5, 5), 2, (2, 2, 2, 2)),
    ((2, 3, 6, 7), (4, 3, 2, 2), 2, (0, 1, 0, 1)),
    ((1, 4, 11, 10), (6, 4, 3, 3), 3, (1, 0, 2, 1)),
    ((2, 2, 5, 6), (3, 2, 1, 1), 2, (0, 0, 0, 0)),
    ((2, 2, 5, 5), (3, 2, 3, 3), 2, (4, 3, 4, 5)),
    ((2, 3, 7, 6), (5, 3, 5, 5), 1, (2, 2, 2, 2)),
    ((2, 1, 6, 7), (3, 1, 2, 2), 1, (0, 1, 0, 1)),
    ((1, 2, 5, 5), (70, 2, 3, 3), 1, (4, 3, 4, 5)),
    ((1, 33, 8, 9), (40, 33, 3, 3), 2, (1, 1, 1, 1)),
    ((2, 3, 8, 9), (5, 3, 3, 3), 1, (0, 0, 0, 0)),
    # dx's column phases: a full tile and a tail of at most half a tile (three-conv's conv2), and a tail of more
    ((2, 16, 28, 28), (32, 16, 5, 5), 2, (1, 2, 1, 2)),
    ((1, 3, 6, 45), (5, 3, 3, 3), 2, (1, 1, 1, 1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape,w_shape,stride,padding", GENERAL_CASES)
def test_general_conv_against_reference(x_shape, w_shape, stride, padding, dtype):
    """Forward (with and without ReLU) and backward (need_dx True and False) of strided and padded convolutions,
    inputs NCHW and channels-last, against the oracle; dw and db do not depend on need_dx, and the backward's
    results do not depend on the layout (the packing reads either in the same order)."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y_want = reference.conv2d_forward(x, w, b, False, stride, padding)
    dy = rng.standard_normal(y_want.shape).astype(dtype)
    grads_want = reference.conv2d_backward(dy, x, w, True, stride, padding)
    by_layout = []
    for layout in (np.asarray, _channels_last):
        for relu in (False, True):
            y = jit.conv2d_forward(layout(x), w, b, relu, stride, padding)
            assert y.dtype == dtype
            reference.assert_close(y, np.maximum(y_want, 0) if relu else y_want, dtype, f"y relu={relu}")
        dx, dw, db = jit.conv2d_backward(layout(dy), layout(x), w, True, stride, padding)
        for name, got, want in zip(("dx", "dw", "db"), (dx, dw, db), grads_want):
            assert got.dtype == dtype and got.shape == want.shape, name
            reference.assert_close(got, want, dtype, name)
        none, dw2, db2 = jit.conv2d_backward(layout(dy), layout(x), w, False, stride, padding)
        assert none is None
        reference.assert_close(dw2, grads_want[1], dtype, "dw without dx")
        np.testing.assert_array_equal(db2, db)
        by_layout.append((dx, dw, db))
    for got, same in zip(*by_layout):
        np.testing.assert_array_equal(got, same)


@pytest.mark.parametrize("stride,padding", [(1, (1, 2, 2, 1)), (2, (1, 1, 0, 2))])
def test_general_conv_non_finite_weights_and_padding(stride, padding):
    """A NaN and an inf in w: the forward multiplies the padding's zeros too (inf * 0 = NaN, as the oracle's padded
    sum does); dx takes the path that multiplies only the products the convolution has."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1, 2, 0, 0], w[3, 0, 2, 1] = np.inf, np.nan
    b = rng.standard_normal(4).astype(np.float32)
    with np.errstate(invalid="ignore"):
        y_want = reference.conv2d_forward(x, w, b, True, stride, padding)
        dy = rng.standard_normal(y_want.shape).astype(np.float32)
        grads_want = reference.conv2d_backward(dy, x, w, True, stride, padding)
    reference.assert_close(jit.conv2d_forward(x, w, b, True, stride, padding), y_want, np.float32, "y")
    for name, got, want in zip(("dx", "dw", "db"), jit.conv2d_backward(dy, x, w, True, stride, padding), grads_want):
        reference.assert_close(got, want, np.float32, name)


def test_general_kernels_match_their_python_bodies():
    """general.py's kernels compiled and interpreted (prange as range, the stack tiles as heap arrays) on a tiny
    strided shape: the same loops, so the results agree to rounding."""
    general = pytest.importorskip("numba_cnn.kernels.jit.general")
    rng = np.random.default_rng(19)
    lanes = jit.STRIDED_TILE[0]
    xp = rng.standard_normal((2, 7, 8, 3)).astype(np.float32)  # padded, channels-last
    wt = rng.standard_normal((3, 3, 3, lanes)).astype(np.float32)
    b = rng.standard_normal(lanes).astype(np.float32)
    dyt = rng.standard_normal((2, 3, 3 + 2, lanes)).astype(np.float32)  # P = Q = 3, one zero column each side
    dyt[:, :, [0, -1]] = 0
    wt_dx = rng.standard_normal((3, 3, 5, lanes)).astype(np.float32)
    results = []
    for forward, weight_grad, input_grad in (
            (general._strided_forward, general._strided_weight_grad, general._strided_input_grad),
            tuple(getattr(k, "py_func", k) for k in (general._strided_forward, general._strided_weight_grad,
                                                      general._strided_input_grad))):
        y = np.empty((2, 3, 3, 5), np.float32)  # channels-last
        forward(xp, wt, b, np.float32(0), 2, y)
        dwt = np.empty((2, 3, 3, 3, lanes), np.float32)
        weight_grad(xp, dyt, 2, 1, 3, 3, dwt)
        dx = np.full((2, 3, 6, 7), np.nan, np.float32)
        input_grad(dyt, wt_dx, 5, 2, 1, 0, 1, dx)
        results.append((y, dwt, dx))
    for got, want in zip(*results):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


POOL_SIZES = [((2, 3, 7, 8), (3, 3)), ((2, 2, 9, 5), (2, 3)), ((2, 3, 5, 6), (5, 6)), ((1, 2, 6, 7), (2, 2)),
              ((2, 19, 7, 9), (2, 2)), ((3, 32, 6, 6), (2, 2))]


@pytest.mark.parametrize("x_shape,size", POOL_SIZES)
def test_pooling_any_window_channels_last(x_shape, size):
    """Max- and average pooling of NCHW and channels-last inputs (and gradients) agree with the oracle: max exactly
    (ties and a NaN, an inf placed in windows), average within float32 rounding on values far from zero."""
    rng = np.random.default_rng(23)
    x = rng.integers(-1, 2, x_shape).astype(np.float32)  # many ties
    x[0, 0, 0, 1], x[-1, -1, 1, 0], x[0, -1, -1, -1] = np.nan, np.inf, -np.inf
    y_want, arg_want = reference.maxpool2d_forward(x, size)
    dy = rng.standard_normal(y_want.shape).astype(np.float32)
    dx_want = reference.maxpool2d_backward(dy, arg_want, x_shape, size)
    far = (rng.standard_normal(x_shape) + 1e3).astype(np.float32)
    for layout in (np.asarray, _channels_last):
        y, arg = jit.maxpool2d_forward(layout(x), size)
        np.testing.assert_array_equal(y, y_want)
        np.testing.assert_array_equal(arg, arg_want)
        dx = jit.maxpool2d_backward(layout(dy), layout(arg_want), x_shape, size)
        np.testing.assert_array_equal(dx, dx_want)
        # 2x2 windows pool a channels-last x where it lies and hand their results on channels-last
        kept = layout is _channels_last and size == (2, 2)
        assert is_channels_last(y) == is_channels_last(arg) == is_channels_last(dx) == kept
        reference.assert_close(jit.avgpool2d_forward(layout(far), size), reference.avgpool2d_forward(far, size),
                               np.float32, "avgpool")
        reference.assert_close(jit.avgpool2d_backward(layout(dy), x_shape, size),
                               reference.avgpool2d_backward(dy, x_shape, size), np.float32, "avgpool dx")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_large_mean_channels_last(dtype):
    """Batch normalisation on activations with a large mean (1e4 + N(0, 1): one-pass float32 statistics would lose
    them), inputs NCHW and channels-last, training (running statistics updated in place as the oracle's) and
    inference, and the backward from the statistics the forward returned."""
    rng = np.random.default_rng(29)
    x = (rng.standard_normal((4, 5, 6, 7)) + 1e4).astype(dtype)
    gamma, beta = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    for layout in (np.asarray, _channels_last):
        for training in (True, False):
            running = rng.standard_normal(5).astype(dtype) + 1e4, rng.random(5).astype(dtype) + 0.5
            mine, theirs = [a.copy() for a in running], [a.copy() for a in running]
            got = jit.batchnorm2d_forward(layout(x), gamma, beta, *mine, 0.9, 1e-3, training)
            want = reference.batchnorm2d_forward(x, gamma, beta, *theirs, 0.9, 1e-3, training)
            for name, g, e in zip(("y", "mean", "inv_std"), got, want):
                assert g.dtype == dtype, name
                reference.assert_close(g, e, dtype, f"{name} training={training}")
            for name, g, e in zip(("running_mean", "running_var"), mine, theirs):
                reference.assert_close(g, e, dtype, name)
            grads = jit.batchnorm2d_backward(layout(dy), layout(x), gamma, got[1], got[2])
            for name, g, e in zip(("dx", "dgamma", "dbeta"), grads,
                                  reference.batchnorm2d_backward(dy, x, gamma, got[1], got[2])):
                assert g.dtype == dtype, name
                reference.assert_close(g, e, dtype, name)


def test_batchnorm_channels_last_statistics_from_shifted_sums():
    """The channels-last statistics sum each chunk of pixels shifted by its first pixel: an outlier there (1e6
    among 1e4 + N(0, 1)) still gives the oracle's mean and variance; an inf or NaN in x makes the shifted sums
    non-finite, and the two-pass sums give the oracle's inf and NaN in the statistics and running statistics."""
    from numba_cnn.kernels.jit.batchnorm import PIXEL_CHUNKS

    rng = np.random.default_rng(37)
    x = rng.standard_normal((PIXEL_CHUNKS, 3, 4, 5)) + 1e4
    x[:, :, 0, 0] = 1e6  # each image is one chunk's pixels: its first pixel is the chunk's shift
    x[1, 2, 3, 4] = 1e6 + 1
    gamma, beta = np.ones(3), np.zeros(3)
    mine, theirs = (np.zeros(3), np.ones(3)), (np.zeros(3), np.ones(3))
    got = jit.batchnorm2d_forward(_channels_last(x), gamma, beta, *mine, 0.9, 1e-3, True)
    want = reference.batchnorm2d_forward(x, gamma, beta, *theirs, 0.9, 1e-3, True)
    for name, g, e in zip(("y", "mean", "inv_std", "running_mean", "running_var"), got + mine, want + theirs):
        reference.assert_close(g, e, np.float64, name)
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    x[0, 1, 0, 0], x[2, 2, 0, 0], x[1, 3, 4, 5] = np.inf, np.nan, -np.inf  # the inf: chunk 0's shift
    mine, theirs = (np.zeros(4, np.float32), np.ones(4, np.float32)), (np.zeros(4), np.ones(4))
    with np.errstate(invalid="ignore"):
        _, mean, inv_std = jit.batchnorm2d_forward(_channels_last(x), np.ones(4, np.float32),
                                                   np.zeros(4, np.float32), *mine, 0.9, 1e-3, True)
        _, want_mean, want_inv_std = reference.batchnorm2d_forward(x, np.ones(4), np.zeros(4), *theirs, 0.9, 1e-3,
                                                                   True)
    for name, g, e in zip(("mean", "inv_std", "running_mean", "running_var"), (mean, inv_std) + mine,
                          (want_mean, want_inv_std) + theirs):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(e), err_msg=name)
        np.testing.assert_array_equal(np.isposinf(g), np.isposinf(e), err_msg=name)
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(e), err_msg=name)
        finite = np.isfinite(e)
        reference.assert_close(g[finite], e[finite], np.float32, name)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 numba threads")
def test_new_ops_give_identical_bits_on_one_and_two_threads():
    """The general convolution (forward and dx over images, dw over fixed (image chunk, tile) tasks; dx into 3
    channels through the small tile, into 20 through the wide one), the padded stride-1 path, pooling of other
    windows, average pooling and batch normalisation (per channel reductions): bitwise equal on 1 and 2 threads."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((6, 3, 13, 12)).astype(np.float32)
    x_deep = rng.standard_normal((5, 20, 9, 8)).astype(np.float32)
    w_deep = rng.standard_normal((6, 20, 3, 3)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w_wide = rng.standard_normal((40, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    gamma, beta = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            out = []
            for weights, stride, padding in ((w, 2, (1, 1, 1, 1)), (w_wide, 2, (0, 1, 0, 1)),
                                             (w_wide, 1, (1, 1, 1, 1))):
                y = jit.conv2d_forward(x, weights, b[:weights.shape[0]], True, stride, padding).copy()
                out += [y, *jit.conv2d_backward(y, x, weights, True, stride, padding)]
            y = jit.conv2d_forward(x_deep, w_deep, b[:6], False, 2, (1, 0, 1, 0)).copy()
            out += [y, *jit.conv2d_backward(y, x_deep, w_deep, True, 2, (1, 0, 1, 0))]
            y, arg = jit.maxpool2d_forward(x, (3, 3))
            out += [y, arg, jit.maxpool2d_backward(y, arg, x.shape, (3, 3))]
            y = jit.avgpool2d_forward(x, (13, 12))
            out += [y, jit.avgpool2d_backward(y, x.shape, (13, 12))]
            running = [np.zeros(3, np.float32), np.ones(3, np.float32)]
            y, mean, inv_std = jit.batchnorm2d_forward(x, gamma, beta, *running, 0.9, 1e-3, True)
            out += [y.copy(), mean, inv_std, *running, *jit.batchnorm2d_backward(x, x, gamma, mean, inv_std)]
            results.append([np.array(a) for a in out])
    finally:
        numba.set_num_threads(before)
    for index, (one, two) in enumerate(zip(*results)):
        np.testing.assert_array_equal(one, two, err_msg=f"output {index}")


# (N, D, M): one image, one input, D past a weight-gradient block (256) and under it, M at the compiled bound (16),
# and one shape the bounds send to the compiled kernel as they stand (mnist-cnn's dense layer)
DENSE_SHAPES = [(1, 7, 3), (5, 1, 10), (9, 300, 16), (128, 1600, 10), (3, 513, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,m", DENSE_SHAPES)
def test_compiled_dense_layers_match_the_oracle(n, d, m, dtype, monkeypatch):
    """jit's own kernel for the backward of dense layers (taken for at most DENSE_COMPILED_MAX_OUTPUTS outputs from
    at least DENSE_COMPILED_MIN_INPUTS inputs; here for every input count): all three gradients against float64
    matmuls, on awkward shapes; wider ones, and fewer inputs under the bound as it stands, are numpy's, bit for
    bit (BLAS runs its own threads here, so larger products do not take the BLAS pair of the test below)."""
    from numba_cnn.kernels.jit import layers as jit_layers
    from numba_cnn.kernels import layers as numpy_layers

    rng = np.random.default_rng(n * 1000 + d + m)
    x, w = rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((d, m)).astype(dtype)
    b, dy = rng.standard_normal(m).astype(dtype), rng.standard_normal((n, m)).astype(dtype)
    assert m <= jit_layers.DENSE_COMPILED_MAX_OUTPUTS
    if d < jit_layers.DENSE_COMPILED_MIN_INPUTS:
        for got, want in zip(jit_layers.dense_backward(dy, x, w), numpy_layers.dense_backward(dy, x, w)):
            np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(jit_layers, "DENSE_COMPILED_MIN_INPUTS", 1)
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    reference.assert_close(jit_layers.dense_forward(x, w, b), x64 @ w64 + b, dtype, "y")
    dx, dw, db = jit_layers.dense_backward(dy, x, w)
    for got, want, name in ((dx, dy64 @ w64.T, "dx"), (dw, x64.T @ dy64, "dw"), (db, dy64.sum(axis=0), "db")):
        assert got.dtype == dtype and got.shape == want.shape
        reference.assert_close(got, want, dtype, name)
    wide = rng.standard_normal((d, jit_layers.DENSE_COMPILED_MAX_OUTPUTS + 1)).astype(dtype)
    dy_wide = rng.standard_normal((n, wide.shape[1])).astype(dtype)
    for got, want in zip(jit_layers.dense_backward(dy_wide, x, wide), numpy_layers.dense_backward(dy_wide, x, wide)):
        np.testing.assert_array_equal(got, want)


# (N, D, M) for the compiled forward: fewer rows than a tile (padded), rows past whole tiles of 6, one input,
# outputs under, at and past a whole number of the tile's lanes (16 on AVX2, 32 on AVX-512), LeNet's and VGG's hidden
# layers
DENSE_FORWARD_SHAPES = [(1, 7, 16), (5, 3, 40), (32, 7, 16), (37, 1, 17), (41, 300, 33), (128, 400, 120),
                        (128, 4096, 128), (50, 9, 64), (37, 1100, 10), (3, 1030, 16), (1, 1024, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,m", DENSE_FORWARD_SHAPES)
def test_compiled_dense_forward_matches_the_oracle(n, d, m, dtype):
    """jit's dense forward tiles (the wide one for at least DENSE_LANES outputs, the narrow one for fewer from at
    least DENSE_COMPILED_MIN_INPUTS inputs) against a float64 matmul on awkward shapes, each row's bits the same
    whatever rows share its batch; elsewhere numpy's, bit for bit."""
    from numba_cnn.kernels.jit import layers as jit_layers
    from numba_cnn.kernels import layers as numpy_layers

    rng = np.random.default_rng(n * 1000 + d + m)
    x, w = rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((d, m)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype)
    if m < jit_layers.DENSE_LANES and d < jit_layers.DENSE_COMPILED_MIN_INPUTS:
        np.testing.assert_array_equal(jit_layers.dense_forward(x, w, b), numpy_layers.dense_forward(x, w, b))
        return
    y = jit_layers.dense_forward(x, w, b)
    assert y.dtype == dtype and y.shape == (n, m)
    reference.assert_close(y, x.astype(np.float64) @ w.astype(np.float64) + b, dtype, "y")
    for picked in (slice(0, 1), slice(n // 2, n), slice(None, None, -1)):
        np.testing.assert_array_equal(jit_layers.dense_forward(np.ascontiguousarray(x[picked]), w, b), y[picked])


def test_compiled_dense_forward_leaves_no_lane_or_row_unwritten():
    """Every element of y gets its exact value (small integers, exact in float32), those of the last, partial block
    of lanes and of the last row block, which overlaps the one before, included."""
    from numba_cnn.kernels.jit import layers as jit_layers

    # the wide tile with a partial second vector; the narrow one with a partial vector, over enough inputs to take it
    for n, d, m in ((44, 3, jit_layers.DENSE_LANES + 3),
                    (44, jit_layers.DENSE_COMPILED_MIN_INPUTS, jit_layers.DENSE_NARROW_LANES - 3)):
        x = np.arange(n * d, dtype=np.float32).reshape(n, d) % 7
        w = np.arange(d * m, dtype=np.float32).reshape(d, m) % 5
        b = np.arange(m, dtype=np.float32)
        # small integers, sums below 2**24: exact in float32, whatever the order
        np.testing.assert_array_equal(jit_layers.dense_forward(x, w, b), x @ w + b)


def test_compiled_dense_forward_reads_weights_of_any_memory_order():
    """w as a transposed view (not C-contiguous) with whole vectors of outputs (read without a padded copy) and with
    a partial vector (padded): the same bits as from a C-ordered w."""
    from numba_cnn.kernels.jit import layers as jit_layers

    rng = np.random.default_rng(7)
    for m in (2 * jit_layers.DENSE_LANES, jit_layers.DENSE_LANES + 5):
        x = rng.standard_normal((13, 21)).astype(np.float32)
        w_t = rng.standard_normal((m, 21)).astype(np.float32)
        b = rng.standard_normal(m).astype(np.float32)
        assert not w_t.T.flags.c_contiguous
        np.testing.assert_array_equal(jit_layers.dense_forward(x, w_t.T, b),
                                      jit_layers.dense_forward(x, np.ascontiguousarray(w_t.T), b))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 numba threads")
def test_compiled_dense_layers_give_identical_bits_on_one_and_two_threads():
    from numba_cnn.kernels.jit import layers as jit_layers

    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((37, 1100)).astype(np.float32), rng.standard_normal((1100, 10)).astype(np.float32)
    b, dy = rng.standard_normal(10).astype(np.float32), rng.standard_normal((37, 10)).astype(np.float32)
    w_wide, b_wide = rng.standard_normal((1100, 70)).astype(np.float32), rng.standard_normal(70).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append([np.array(a) for a in (jit_layers.dense_forward(x, w, b),
                                                  *jit_layers.dense_backward(dy, x, w),
                                                  jit_layers.dense_forward(x, w_wide, b_wide))])
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 numba threads")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,m", [(128, 400, 120), (37, 2100, 31), (200, 90, 130)])
def test_dense_backward_runs_its_two_products_side_by_side(n, d, m, dtype):
    """Products of at least DENSE_BLAS_PAIR_MIN_MACS multiply-adds (LeNet's first hidden layer, one with an odd
    number of outputs, one with few inputs) go to numpy's own BLAS, one gemm call each, dx and dw at once on two
    Numba threads: that path is taken, the gradients agree with float64 matmuls, and their bits are the same on one
    thread and on two."""
    from threadpoolctl import threadpool_limits

    from numba_cnn.kernels.jit import layers as jit_layers
    from numba_cnn.kernels.jit.blas import gemm_address
    from numba_cnn.kernels.jit.paths import PathLog

    assert n * d * m >= jit_layers.DENSE_BLAS_PAIR_MIN_MACS
    rng = np.random.default_rng(n + d + m)
    x, w, dy = (rng.standard_normal(shape).astype(dtype) for shape in ((n, d), (d, m), (n, m)))
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    before, results = numba.get_num_threads(), []
    try:
        with threadpool_limits(1, user_api="blas"):  # as the jit backend runs it
            if gemm_address(np.dtype(dtype)) is None:
                pytest.skip("numpy's BLAS is not an OpenBLAS whose CBLAS symbols jit/blas.py knows")
            for threads in (1, 2):
                numba.set_num_threads(threads)
                with PathLog() as log:
                    results.append([np.array(g) for g in jit_layers.dense_backward(dy, x, w)])
                assert log.paths == ["dense_backward: BLAS's gemm, dx and dw on two threads at once"]
    finally:
        numba.set_num_threads(before)
    for got, want, name in zip(results[0], (dy64 @ w64.T, x64.T @ dy64, dy64.sum(axis=0)), ("dx", "dw", "db")):
        assert got.dtype == dtype and got.shape == want.shape
        reference.assert_close(got, want, dtype, name)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_compile_dense_backward_compiles_what_a_full_batch_then_runs():
    """The precompile's two images never reach DENSE_BLAS_PAIR_MIN_MACS, so it compiles the two-gemm backward of a
    dense layer that takes it at a larger batch (compile_dense_backward): a batch of 128 through LeNet's first
    hidden layer then finds that machine code and compiles nothing; a layer whose backward runs the compiled kernel
    at any batch compiles no gemm kernel."""
    from threadpoolctl import threadpool_limits

    from numba_cnn.kernels.jit import layers as jit_layers
    from numba_cnn.kernels.jit.blas import gemm_address

    kernel = jit_layers._dense_backward_gemms.task
    with threadpool_limits(1, user_api="blas"):
        if gemm_address(np.dtype(np.float32)) is None:
            pytest.skip("numpy's BLAS is not an OpenBLAS whose CBLAS symbols jit/blas.py knows")
        before = set(kernel.overloads)
        jit_layers.compile_dense_backward(2048, 10)  # the compiled kernel's shape: no gemm kernel
        assert set(kernel.overloads) == before
        jit_layers.compile_dense_backward(400, 120)
        compiled = set(kernel.overloads)
        assert any(sig[4] == numba.types.Array(numba.float32, 2, "C") for sig in compiled)
        rng = np.random.default_rng(5)
        x, w, dy = (rng.standard_normal(shape).astype(np.float32) for shape in ((128, 400), (400, 120), (128, 120)))
        jit_layers.dense_backward(dy, x, w)
    assert set(kernel.overloads) == compiled


def test_dense_backward_keeps_numpys_matmuls_while_blas_runs_threads_of_its_own():
    """With BLAS on two threads (the backend holds it to one while it trains), the two single-threaded gemm calls
    are not taken: numpy's matmuls, with BLAS's own threads, and their bits."""
    from threadpoolctl import threadpool_limits

    from numba_cnn.kernels import layers as numpy_layers
    from numba_cnn.kernels.jit import layers as jit_layers
    from numba_cnn.kernels.jit.blas import gemm_address
    from numba_cnn.kernels.jit.paths import PathLog

    rng = np.random.default_rng(11)
    x, w, dy = (rng.standard_normal(shape).astype(np.float32) for shape in ((128, 400), (400, 120), (128, 120)))
    with threadpool_limits(2, user_api="blas"):
        assert gemm_address(np.dtype(np.float32)) is None
        with PathLog() as log:
            got = jit_layers.dense_backward(dy, x, w)
        want = numpy_layers.dense_backward(dy, x, w)
    assert log.paths == ["dense_backward: numpy's matmuls (one-thread BLAS)"]
    for g, expected in zip(got, want):
        np.testing.assert_array_equal(g, expected)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 numba threads")
def test_adam_on_a_large_array_gives_the_same_bits_on_one_and_two_threads():
    """An array of at least ADAM_PARALLEL_MIN parameters (an odd count: uneven shares) is updated on every thread:
    three steps give the bits of one thread's serial loop, and agree with numpy's Adam."""
    from numba_cnn.kernels import layers as numpy_layers
    from numba_cnn.kernels.jit import layers as jit_layers

    rng = np.random.default_rng(13)
    size = jit_layers.ADAM_PARALLEL_MIN + 7
    start, grads = rng.standard_normal(size).astype(np.float32), rng.standard_normal((3, size)).astype(np.float32)
    before, results = numba.get_num_threads(), []
    try:
        for threads, update in ((1, jit_layers.adam_update), (2, jit_layers.adam_update),
                                (None, numpy_layers.adam_update)):
            if threads:
                numba.set_num_threads(threads)
            state = [start.copy(), np.zeros(size, np.float32), np.zeros(size, np.float32)]
            for step, grad in enumerate(grads, 1):
                update(state[0], grad, state[1], state[2], 1e-3 * np.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step),
                       0.9, 0.999, 1e-7)
            results.append(state)
    finally:
        numba.set_num_threads(before)
    for one, two, numpy_state in zip(*results):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_allclose(two, numpy_state, rtol=1e-5, atol=1e-7)


def test_run_parts_runs_each_part_once_with_its_arguments_of_any_layout():
    """run_parts calls a task's compiled code by its address, looked up by the arguments' types: a C-contiguous and
    a strided array (other compiled code, other addresses) each get the task compiled for them, and every part runs
    once. A task that returns a value is refused."""
    from numba_cnn.kernels._numba_ext import jit as backend_jit
    from numba_cnn.kernels._numba_ext import native_address, run_parts

    @backend_jit(parallel=False)
    def add_part(i, out, scale):
        for j in range(out.shape[1]):
            out[i, j] += i * scale + j

    expected = np.arange(7)[:, None] * 2.0 + np.arange(5)
    dense = np.zeros((7, 5))
    run_parts(add_part, 7, dense, 2.0)
    np.testing.assert_array_equal(dense, expected)
    strided = np.zeros((7, 10))[:, ::2]
    run_parts(add_part, 7, strided, 2.0)
    np.testing.assert_array_equal(strided, expected)
    assert native_address(add_part, np.int64(0), dense, 2.0) != native_address(add_part, np.int64(0), strided, 2.0)
    assert len(add_part.signatures) == 2

    @backend_jit(parallel=False)
    def part_with_a_result(i, out):  # the call by address leaves no room for a result: refused, not written past
        return out[i]

    with pytest.raises(TypeError, match="must return nothing"):
        run_parts(part_with_a_result, 2, dense)


def test_run_parts_passes_a_tasks_error_on():
    """A task that reports an error (a raise, in one of its parts) makes run_parts raise, not return as if every
    part had run."""
    from numba_cnn.kernels._numba_ext import jit as backend_jit
    from numba_cnn.kernels._numba_ext import run_parts

    @backend_jit(parallel=False)
    def failing_part(i, out):
        if i == 1:
            raise ValueError("part 1 fails")
        out[i] = 1.0

    out = np.zeros(3)
    with pytest.raises(RuntimeError, match="reported an error"):
        run_parts(failing_part, 3, out)
    assert out[0] == out[2] == 1.0


def test_a_kernel_closing_over_a_jit_function_is_refused():
    """Numba keys a disk cache on a pickle of the closure, and a jit function pickles differently in every process:
    such a kernel would compile again in every process, so jit refuses it and names run_parts."""
    from numba_cnn.kernels._numba_ext import jit as backend_jit

    @backend_jit(parallel=False)
    def helper(x):
        return x + 1

    def kernel(x):
        return helper(x)

    with pytest.raises(TypeError, match="run_parts"):
        backend_jit(kernel)
