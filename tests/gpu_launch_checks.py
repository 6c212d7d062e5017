"""The cuda backend under a GPU's launch configuration (256 threads per block, one pass over the output, 4096 dropout
streams), on whatever numba.cuda runs here: `python tests/gpu_launch_checks.py GROUP` with NUMBA_CNN_CUDA_LAUNCH=gpu
(and NUMBA_ENABLE_CUDASIM=1 without a GPU). test_cuda_gpu_launch.py starts it in a subprocess because runtime.py
reads the switch once, at import. Each check raises AssertionError on a mismatch; the script prints one line per
check with its time, then "OK GROUP".

Shapes are tiny: the simulator runs a Python thread per CUDA thread, and a GPU launch makes at least 256 of them
per block (a whole-model pass on one image makes about 170,000: 2-4 minutes on 2 cores).
"""

import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's numba_cnn

from numba_cnn.kernels import layers as numpy_layers  # noqa: E402
from numba_cnn.kernels import Backend, get_backend, reference  # noqa: E402
from numba_cnn.kernels.cuda import dropout_rng as cuda_dropout_rng, runtime  # noqa: E402
from numba_cnn.model import Model, init_params  # noqa: E402
from replay import GivenDropout  # noqa: E402  (tests/ is this script's folder, first on sys.path)

B = get_backend("cuda")
ORACLE = get_backend("reference")  # the float64 oracle behind the same boundary checks (defaults filled in)
L, dev, host = B.layers, B.to_device, B.to_host
# float32 only: the launch configuration does not depend on the dtype, and each 256-thread block costs the
# simulator about 0.4 s (float64 runs in test_cuda.py and test_nan_inf.py under the simulator's own launches).
DTYPE = np.float32


def rand(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------- xoroshiro128+ in Python integers

MASK64 = (1 << 64) - 1
JUMP = (0xBEAC0467EBA5FACB, 0xD86B048B86AA9922)


def _next(state):
    """numba.cuda.random.xoroshiro128p_next on a [s0, s1] list of Python ints: returns the draw, advances state."""
    s0, s1 = state
    result = (s0 + s1) & MASK64
    s1 ^= s0
    state[0] = (((s0 << 55) | (s0 >> 9)) & MASK64) ^ s1 ^ ((s1 << 14) & MASK64)
    state[1] = ((s1 << 36) | (s1 >> 28)) & MASK64
    return result


def xoroshiro_states(n, seed):
    """numba.cuda.random.create_xoroshiro128p_states(n, seed) as [s0, s1] lists: splitmix64 of the seed, then each
    stream 2**64 draws after the previous. Pure Python ints take about a second for 4096 streams; the library's
    own initialiser runs in object mode on the simulator and takes 40 s."""
    z = (seed + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    states, state = [], [z, z]
    for i in range(n):
        if i:
            s0 = s1 = 0
            for word in JUMP:
                for bit in range(64):
                    if word >> bit & 1:
                        s0 ^= state[0]
                        s1 ^= state[1]
                    _next(state)
            state = [s0, s1]
        states.append(list(state))
    return states


def uniform_float32(state):
    return np.float32((_next(state) >> 11) * (1.0 / (1 << 53)))


def gpu_dropout_rng(seed):
    """A DropoutRNG with DROPOUT_STREAMS streams, exactly what B.make_dropout_rng(seed) makes, built fast."""
    states = xoroshiro_states(runtime.DROPOUT_STREAMS, cuda_dropout_rng._seed_int(seed))
    return B.restore_dropout_rng({"s0": [s[0] for s in states], "s1": [s[1] for s in states]}), states


# ------------------------------------------------------------------------- the checks


def check_configuration():
    assert (runtime.THREADS_PER_BLOCK, runtime.MAX_BLOCKS, runtime.DROPOUT_STREAMS) == (256, 1 << 20, 4096), (
        runtime.THREADS_PER_BLOCK, runtime.MAX_BLOCKS, runtime.DROPOUT_STREAMS)
    assert runtime.grid(1000) == 4 and runtime.grid(100_000) == 391  # the output covered in one pass


def check_kernels():
    """The original four contract ops (stride 1, no padding, 2x2 pools) against the oracle, each output larger than
    one 256-thread block (432 conv outputs, 384 input gradients, 280 pooling windows), so that several blocks share
    it; the bias gradient sums its N*P*Q = 108 terms in a 256-thread block, half its threads adding zeros."""
    dtype = DTYPE
    x, w, b = rand((3, 2, 8, 8), dtype, 1), rand((4, 2, 3, 3), dtype, 2), rand((4,), dtype, 3)
    reference.assert_close(host(B.conv2d_forward(x, w, b, True)), ORACLE.conv2d_forward(x, w, b, True),
                           dtype, "conv forward")
    dy = rand((3, 4, 6, 6), dtype, 4)
    for got, want, name in zip(B.conv2d_backward(dy, x, w, True), ORACLE.conv2d_backward(dy, x, w, True),
                               ("dx", "dw", "db")):
        reference.assert_close(host(got), want, dtype, f"conv backward {name}")
    px = np.round(rand((2, 5, 9, 14), dtype, 5))  # ties, an odd row dropped, 2*5*4*7 = 280 windows
    px[0, 0, 0, 1], px[1, 4, 3, 3] = np.nan, np.inf
    y, argmax = B.maxpool2d_forward(px)
    want_y, want_argmax = ORACLE.maxpool2d_forward(px)
    np.testing.assert_array_equal(host(y), want_y)
    np.testing.assert_array_equal(host(argmax), want_argmax)
    pdy = rand(want_y.shape, dtype, 6)
    np.testing.assert_array_equal(host(B.maxpool2d_backward(pdy, argmax, px.shape)),
                                  ORACLE.maxpool2d_backward(pdy, want_argmax, px.shape))


def check_strided_and_pooling():
    """The widened ops under 256-thread blocks: a stride-2 convolution with asymmetric padding (300 outputs, 594
    input gradients, a row of them read by no output), 2x3 max and average pooling (270 windows, a dropped column)
    and global average pooling (windows of 25 elements)."""
    dtype = DTYPE
    x, w, b = rand((3, 2, 11, 9), dtype, 1), rand((4, 2, 3, 3), dtype, 2), rand((4,), dtype, 3)
    stride, padding = 2, (1, 0, 2, 1)
    y = B.conv2d_forward(x, w, b, False, stride, padding)
    reference.assert_close(host(y), ORACLE.conv2d_forward(x, w, b, False, stride, padding), dtype,
                           "strided conv forward")
    dy = rand(y.shape, dtype, 4)
    for got, want, name in zip(B.conv2d_backward(dy, x, w, True, stride, padding),
                               ORACLE.conv2d_backward(dy, x, w, True, stride, padding), ("dx", "dw", "db")):
        reference.assert_close(host(got), want, dtype, f"strided conv backward {name}")
    px = np.round(rand((3, 5, 12, 10), dtype, 5))  # ties, a dropped column
    px[0, 0, 0, 1], px[1, 4, 3, 3] = np.nan, np.inf
    size = (2, 3)
    y, argmax = B.maxpool2d_forward(px, size)
    want_y, want_argmax = ORACLE.maxpool2d_forward(px, size)
    np.testing.assert_array_equal(host(y), want_y)
    np.testing.assert_array_equal(host(argmax), want_argmax)
    pdy = rand(want_y.shape, dtype, 6)
    np.testing.assert_array_equal(host(B.maxpool2d_backward(pdy, argmax, px.shape, size)),
                                  ORACLE.maxpool2d_backward(pdy, want_argmax, px.shape, size))
    ax = rand(px.shape, dtype, 7)
    reference.assert_close(host(B.avgpool2d_forward(ax, size)), ORACLE.avgpool2d_forward(ax, size), dtype,
                           "avgpool forward")
    reference.assert_close(host(B.avgpool2d_backward(pdy, ax.shape, size)),
                           ORACLE.avgpool2d_backward(pdy, ax.shape, size), dtype, "avgpool backward")
    gx = rand((3, 4, 5, 5), dtype, 8)
    reference.assert_close(host(B.avgpool2d_forward(gx, (5, 5))), ORACLE.avgpool2d_forward(gx, (5, 5)), dtype,
                           "global avgpool forward")


def check_batchnorm():
    """Batch normalisation's block-per-channel sums with 256 threads: 3 channels of N*H*W = 300 elements (44
    threads adding two), training (running statistics included), inference, and the backward's two sums."""
    dtype = DTYPE
    x = rand((3, 3, 10, 10), dtype, 1) * 3 + 2
    gamma, beta = rand((3,), dtype, 2), rand((3,), dtype, 3)
    running_mean, running_var = rand((3,), dtype, 4), rand((3,), dtype, 5) ** 2 + 0.5
    want_mean, want_var = running_mean.copy(), running_var.copy()  # the oracle updates these in place
    dev_mean, dev_var = dev(running_mean), dev(running_var)
    got = B.batchnorm2d_forward(x, gamma, beta, dev_mean, dev_var, 0.9, 1e-3, True)
    want = ORACLE.batchnorm2d_forward(x, gamma, beta, want_mean, want_var, 0.9, 1e-3, True)
    for g, e, name in zip(got + (dev_mean, dev_var), want + (want_mean, want_var),
                          ("y", "mean", "inv_std", "running_mean", "running_var")):
        reference.assert_close(host(g), e, dtype, f"batchnorm training {name}")
    dy = rand(x.shape, dtype, 6)
    for g, e, name in zip(B.batchnorm2d_backward(dy, x, gamma, got[1], got[2]),
                          reference.batchnorm2d_backward(dy, x, gamma, want[1], want[2]), ("dx", "dgamma", "dbeta")):
        reference.assert_close(host(g), e, dtype, f"batchnorm backward {name}")
    got = B.batchnorm2d_forward(x, gamma, beta, dev_mean, dev_var, 0.9, 1e-3, False)
    want = ORACLE.batchnorm2d_forward(x, gamma, beta, want_mean, want_var, 0.9, 1e-3, False)
    for g, e, name in zip(got, want, ("y", "mean", "inv_std")):
        reference.assert_close(host(g), e, dtype, f"batchnorm inference {name}")


def check_block_sums():
    """The shared-memory tree sums with 256 threads (8 halvings): the dense layer (a block per output; D = 300
    products over 256 threads, 44 of them adding two) and the bias gradients (sum_outer_inner over 2 and 600
    terms: most threads idle, or every thread adding a few)."""
    dtype = DTYPE
    x, w, b = rand((2, 300), dtype, 1), rand((300, 3), dtype, 2), rand((3,), dtype, 3)
    reference.assert_close(host(L.dense_forward(x, w, b)), numpy_layers.dense_forward(x, w, b), dtype, "dense")
    dy = rand((2, 3), dtype, 4)
    for got, want, name in zip(L.dense_backward(dy, x, w), numpy_layers.dense_backward(dy, x, w),
                               ("dx", "dw", "db")):
        reference.assert_close(host(got), want, dtype, f"dense backward {name}")
    a = rand((3, 2, 200), dtype, 5)
    out = runtime.cuda.device_array((2,), dtype=dtype)
    runtime.launch_blocks(runtime.sum_outer_inner, 2, dev(a), out)
    reference.assert_close(host(out), a.sum(axis=(0, 2)), dtype, "sum_outer_inner")


def check_elementwise_layers():
    for dtype in (DTYPE,):
        logits = rand((5, 10), dtype, 1) * 20
        labels = np.array([0, 3, 9, 1, 2], dtype=np.uint8)
        loss, dlogits, correct = L.softmax_cross_entropy(logits, labels)
        want_loss, want_dlogits, want_correct = numpy_layers.softmax_cross_entropy(logits, labels)
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss) and correct == want_correct
        reference.assert_close(host(dlogits), want_dlogits, dtype, "dlogits")
        np.testing.assert_array_equal(L.argmax_rows(logits), numpy_layers.argmax_rows(logits))
        y, dy = rand((3, 300), dtype, 2), rand((3, 300), dtype, 3)
        y[0, :4] = [np.nan, 0.0, -1.0, np.inf]
        np.testing.assert_array_equal(host(L.relu_backward(dy, y)), numpy_layers.relu_backward(dy, y))
        np.testing.assert_array_equal(host(L.relu_forward(y)), numpy_layers.relu_forward(y))
        p, g = rand((700,), dtype, 4), rand((700,), dtype, 5)
        want_p, want_m, want_v = p.copy(), np.zeros_like(p), np.zeros_like(p)
        dp, dm, dv = dev(p), B.zeros_like(dev(p)), B.zeros_like(dev(p))
        L.adam_update(dp, g, dm, dv, 1e-3, 0.9, 0.999, 1e-7)
        numpy_layers.adam_update(want_p, g, want_m, want_v, 1e-3, 0.9, 0.999, 1e-7)
        for got, want in ((dp, want_p), (dm, want_m), (dv, want_v)):
            reference.assert_close(host(got), want, dtype, "adam")


def check_dropout_streams():
    """4096 streams: stream t draws for elements t, t + 4096, ...; a (3, 1600) batch makes streams 0..703 draw
    twice. Every mask element against xoroshiro128+ in Python integers, the states after the call too; the fast
    states against the library's own initialiser on the first 16 streams."""
    from numba.cuda.random import create_xoroshiro128p_states

    seed = [7, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        library = create_xoroshiro128p_states(16, seed=cuda_dropout_rng._seed_int(seed)).copy_to_host()
    rng, states = gpu_dropout_rng(seed)
    assert [[int(s["s0"]), int(s["s1"])] for s in library] == states[:16]
    for dtype in (DTYPE,):
        x = rand((3, 1600), dtype, 1)
        y, mask = L.dropout_forward(x, 0.5, rng)
        keep, expected = np.float32(0.5), np.empty(x.size, dtype=dtype)
        for e in range(x.size):
            expected[e] = dtype(2) if uniform_float32(states[e % len(states)]) < keep else dtype(0)
        np.testing.assert_array_equal(host(mask).reshape(-1), expected)
        np.testing.assert_array_equal(host(y), x * expected.reshape(x.shape))
        after = B.dropout_rng_state(rng)
        assert after == {"s0": [s[0] for s in states], "s1": [s[1] for s in states]}


def check_model(images=1):
    """A float32 training pass of the whole cuda Model (the GPU's launches throughout) on `images` images against
    the float64 oracle Model with the same parameters and dropout mask: logits, loss and every gradient."""
    rng = np.random.default_rng(1)
    x = rng.random((images, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, images).astype(np.uint8)
    dropout_rng, _ = gpu_dropout_rng(5)
    model = Model(B, seed=3)
    masks = []
    layers = L

    class Recording:
        def __getattr__(self, name):
            return getattr(layers, name)

        def dropout_forward(self, a, rate, r):
            out, mask = layers.dropout_forward(a, rate, r)
            masks.append(host(mask))
            return out, mask

    backend = Backend("cuda", B.module)
    backend.layers = Recording()
    model.backend = backend
    start = time.perf_counter()
    logits = model.forward(dev(x), dropout_rng)
    loss, dlogits, _ = L.softmax_cross_entropy(logits, dev(labels))
    grads = {name: host(g) for name, g in model.backward(dlogits).items()}
    print(f"  cuda model pass on {images} image(s), GPU launches: {time.perf_counter() - start:.1f} s", flush=True)

    oracle = Backend("reference", reference)
    oracle.layers = GivenDropout(masks[0].astype(np.float64))
    want = Model(oracle, dtype=np.float64, params=init_params(3))
    want_logits = want.forward(x.astype(np.float64), dropout_rng=object())
    want_loss, want_dlogits, _ = numpy_layers.softmax_cross_entropy(want_logits, labels)
    want_grads = want.backward(want_dlogits)
    reference.assert_close(host(logits), want_logits, np.float32, "logits")
    assert abs(loss - want_loss) <= reference.FLOAT32_TOL * abs(want_loss), (loss, want_loss)
    for name, expected in want_grads.items():
        assert grads[name].dtype == np.float32
        reference.assert_close(grads[name], expected, np.float32, f"d{name}")


GROUPS = {
    "kernels": (check_configuration, check_kernels),
    "ops": (check_strided_and_pooling, check_batchnorm),
    "layers": (check_block_sums, check_elementwise_layers),
    "dropout": (check_dropout_streams,),
    "model": (check_model,),
}

if __name__ == "__main__":
    group = sys.argv[1]
    for check in GROUPS[group]:
        start = time.perf_counter()
        check()
        print(f"{check.__name__}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"OK {group}")
