"""The optimisation ladder: conv2 of mnist-cnn (32 -> 64 channels, 3x3, on 13x13, batch 128), one change per step.

    python tools/ladder.py                 # print the table (about 1-2 minutes on 2 cores)
    python tools/ladder.py --write         # and store it in docs/results.json (then: python tools/make_docs.py)

Each step is checked against the float64 oracle (the `reference` backend) on the same inputs before it is timed,
and a step that disagrees is reported and never timed. Times are the minimum of several calls after one untimed
call (the machine is shared: the minimum is the run least disturbed by other work).

1. naive        the project's `naive` backend: six Python loops. Timed on NAIVE_IMAGES images and scaled to 128.
2. njit         the same loops (NCHW), compiled by `@njit`: no Python objects per multiply-add.
3. channels-last  x as (N, H, W, C), w as (R, S, C, K): the innermost loop runs over 64 contiguous output channels.
4. tile         a register tile of `columns` output columns x `lanes` channels (numba_cnn/kernels/jit/tiles.py's
                CONV_TILE_WIDE), held in vector registers through the 288-term reduction; fastmath `contract`.
5. prange       step 4 with the images split over the threads.
6. fused        the jit backend's conv2d_relu_maxpool2d_forward: conv + ReLU + 2x2 max-pool in one pass (its direct
                tile: Winograd's kernel, which the backend takes for this layer, is switched off here).
7. listed bwd   the jit backend's conv2d_relu_maxpool2d_backward (only the nonzero gradients) against the dense
                backward (maxpool2d_backward, then conv2d_backward) on the same pooled gradient.

The same run records what the compiler made of step 4 (its FMAs, from `inspect_asm`) and of two small loops, with
and without fastmath's flags. Steps 2-5 are self-contained here; steps 1, 6 and 7 call the project's backends.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from numba import get_num_threads, njit, prange

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numba_cnn.kernels.jit as jit_module  # noqa: E402
from numba_cnn.kernels import get_backend  # noqa: E402
from numba_cnn.kernels._numba_ext import TILE_BITS, TILE_REGISTERS, stack_tile  # noqa: E402
from numba_cnn.kernels.jit.tiles import CONV_TILE_WIDE  # noqa: E402
from numba_cnn.kernels.reference import FLOAT32_TOL, relative_error  # noqa: E402
from numba_cnn.kernels.layers import relu_backward  # noqa: E402

@contextmanager
def _direct_kernels():
    """The backend's direct tiles, Winograd's kernels switched off: each rung is one way of making the same
    multiplies faster, and Winograd's fewer multiplies are not one of them (docs/kernels.md has its own figures)."""
    fits = jit_module.winograd_fits
    jit_module.winograd_fits = lambda *args, **kwargs: False
    try:
        yield
    finally:
        jit_module.winograd_fits = fits


RESULTS = ROOT / "docs" / "results.json"
SHAPE = dict(N=128, C=32, H=13, W=13, K=64, R=3, S=3)  # conv2 of mnist-cnn at batch 128
NAIVE_IMAGES = 2
NO_PADDING = (0, 0, 0, 0)


def conv_flops(n, c, k, p, q, r, s):
    """2 FLOPs per multiply-add: every output sums C*R*S products."""
    return 2 * n * k * p * q * c * r * s


# ---------------------------------------------------------------- step 2: the naive loops, compiled


@njit(cache=False)
def conv_njit(x, w, b, y):
    """y[n,k,i,j] = b[k] + sum_{c,r,s} x[n,c,i+r,j+s] * w[k,c,r,s], NCHW, one output at a time."""
    n_images, n_in, _, _ = x.shape
    n_out, _, r_taps, s_taps = w.shape
    p_out, q_out = y.shape[2], y.shape[3]
    for n in range(n_images):
        for k in range(n_out):
            for i in range(p_out):
                for j in range(q_out):
                    total = b[k]
                    for c in range(n_in):
                        for r in range(r_taps):
                            for s in range(s_taps):
                                total += x[n, c, i + r, j + s] * w[k, c, r, s]
                    y[n, k, i, j] = total


# ---------------------------------------------------------------- step 3: channels last


@njit(cache=False)
def conv_channels_last(x_cl, w_cl, b, y_cl):
    """x_cl (N, H, W, C), w_cl (R, S, C, K) -> y_cl (N, P, Q, K): for each output pixel, the 64 channels are
    accumulated together, the innermost loop over contiguous k in both w_cl and y_cl."""
    n_images, _, _, n_in = x_cl.shape
    r_taps, s_taps, _, n_out = w_cl.shape
    p_out, q_out = y_cl.shape[1], y_cl.shape[2]
    for n in range(n_images):
        for i in range(p_out):
            for j in range(q_out):
                out = y_cl[n, i, j]
                for k in range(n_out):
                    out[k] = b[k]
                for r in range(r_taps):
                    for s in range(s_taps):
                        for c in range(n_in):
                            xv = x_cl[n, i + r, j + s, c]
                            w_vec = w_cl[r, s, c]
                            for k in range(n_out):
                                out[k] += xv * w_vec[k]


# ---------------------------------------------------------------- steps 4 and 5: the register tile, then threads


def make_tiled(columns, lanes, parallel, fastmath=frozenset({"contract"})):
    """A channels-last kernel computing `columns` output columns x `lanes` output channels at a time into a
    stack_tile (numba_cnn/kernels/_numba_ext.py): indices into it are constants once LLVM unrolls the tile
    loops, so the whole tile is promoted to vector registers. parallel=True runs the prange over images on all
    threads; parallel=False runs it as a plain range."""
    tile = columns * lanes

    @njit(cache=False, parallel=parallel, fastmath=set(fastmath))
    def conv_tiled(x_cl, w_cl, b, y_cl):
        n_images, _, _, n_in = x_cl.shape
        r_taps, s_taps, _, n_out = w_cl.shape
        p_out, q_out = y_cl.shape[1], y_cl.shape[2]
        for n in prange(n_images):
            acc = stack_tile(tile, x_cl.dtype)
            for i in range(p_out):
                for jb in range(0, q_out, columns):
                    j0 = min(jb, q_out - columns)  # the last tile overlaps the one before
                    for k0 in range(0, n_out, lanes):
                        for jj in range(columns):
                            for k in range(lanes):
                                acc[jj * lanes + k] = b[k0 + k]
                        for r in range(r_taps):
                            for s in range(s_taps):
                                for c in range(n_in):
                                    w_vec = w_cl[r, s, c, k0:k0 + lanes]
                                    for jj in range(columns):
                                        xv = x_cl[n, i + r, j0 + jj + s, c]
                                        for k in range(lanes):
                                            acc[jj * lanes + k] += xv * w_vec[k]
                        for jj in range(columns):
                            out = y_cl[n, i, j0 + jj, k0:k0 + lanes]
                            for k in range(lanes):
                                out[k] = acc[jj * lanes + k]

    return conv_tiled


# ---------------------------------------------------------------- small loops for the assembly


@njit(cache=False)
def axpy_strict(a, x, y):
    for i in range(x.shape[0]):
        y[i] += a * x[i]


@njit(cache=False, fastmath={"contract"})
def axpy_contract(a, x, y):
    for i in range(x.shape[0]):
        y[i] += a * x[i]


@njit(cache=False)
def dot_strict(x, y):
    total = np.float32(0)
    for i in range(x.shape[0]):
        total += x[i] * y[i]
    return total


@njit(cache=False, fastmath={"contract", "reassoc"})
def dot_reassoc(x, y):
    total = np.float32(0)
    for i in range(x.shape[0]):
        total += x[i] * y[i]
    return total


ASM_COUNTED = ("vfmadd", "vmulps", "vaddps", "vmulss", "vaddss")


def asm_of(fn):
    return fn.inspect_asm(fn.signatures[0])


def count_instructions(asm):
    """How many instructions of each kind in ASM_COUNTED, and which register files they use."""
    lines = [line.strip() for line in asm.splitlines()]
    counts = {name: sum(1 for line in lines if line.startswith(name)) for name in ASM_COUNTED}
    registers = sorted({m for line in lines if line.startswith("vfmadd") for m in re.findall(r"%([xyz]mm)\d+", line)})
    return counts, registers


def fma_excerpt(asm, lines_wanted=8):
    """The first vector FMA (packed: `ps`) with the two lines before it and what follows, up to lines_wanted + 2
    lines: what a hot loop looks like. Scalar FMAs (`ss`, a loop's remainder) are passed over."""
    lines = [re.sub(r"\s+", " ", line.strip()) for line in asm.splitlines()]
    lines = [line for line in lines if line and not line.startswith((".", "#"))]
    for i, line in enumerate(lines):
        if line.startswith("vfmadd") and "ps " in line:
            return lines[max(i - 2, 0):i + lines_wanted]
    return []


def assembly_report(tile_kernel=None, tile_kernel_strict=None):
    """Instruction counts of the small loops (compiled here) and of the tile kernels given (already compiled), with
    an excerpt of the first vector FMAs of axpy_contract and of the tile."""
    n = 1024
    x = np.ones(n, np.float32)
    y = np.ones(n, np.float32)
    axpy_strict(np.float32(2), x, y)
    axpy_contract(np.float32(2), x, y)
    dot_strict(x, y)
    dot_reassoc(x, y)
    kernels = [("axpy_strict", axpy_strict), ("axpy_contract", axpy_contract), ("dot_strict", dot_strict),
               ("dot_reassoc", dot_reassoc)]
    if tile_kernel is not None:
        kernels += [("tile", tile_kernel), ("tile_strict", tile_kernel_strict)]
    report = {}
    for name, fn in kernels:
        asm = asm_of(fn)
        counts, registers = count_instructions(asm)
        report[name] = {"counts": counts, "fma_registers": registers}
    report["axpy_contract"]["excerpt"] = fma_excerpt(asm_of(axpy_contract), 6)
    if tile_kernel is not None:
        report["tile"]["excerpt"] = fma_excerpt(asm_of(tile_kernel), 8)
    return report


# ---------------------------------------------------------------- timing


def min_time(call, repeats):
    """One untimed call, then the minimum of `repeats` timed ones (seconds)."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def first_call(call):
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


def checked(name, got, expected):
    err = max(relative_error(g, e) for g, e in zip(got, expected))
    if not err <= FLOAT32_TOL:
        raise AssertionError(f"step {name}: relative error {err:.3g} against the oracle (> {FLOAT32_TOL}): not timed")
    return err


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    n, c, h, w, k, r, s = (shape[key] for key in "NCHWKRS")
    x = rng.random((n, c, h, w), dtype=np.float32)  # non-negative, as a ReLU'd and pooled activation is
    limit = np.sqrt(6 / (c * r * s + k * r * s))
    wt = rng.uniform(-limit, limit, (k, c, r, s)).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, k).astype(np.float32)
    return x, wt, b


def machine():
    model = platform.processor() or platform.machine()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        model = fields.get("Model name", model)
        family, number = fields.get("CPU family"), fields.get("Model")
        if family and number:
            model = f"{model} (family {family}, model {number})"
        flags = fields.get("Flags", "").split()
    except (OSError, subprocess.CalledProcessError):
        flags = []
    import numba

    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    return {"cpu": model, "isa": isa, "cpus": os.cpu_count(), "numba_threads": get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "tile_bits": TILE_BITS, "tile_registers": TILE_REGISTERS,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def run_ladder(shape=SHAPE, repeats=5, rounds=3, naive_images=NAIVE_IMAGES, log=print):
    """Check every step against the oracle, then time them all in `rounds` rounds (each step's `repeats` calls in
    a block, steps taking turns, so a busy spell of the machine hits all of them); a step's time is its minimum over
    every round. -> the results record (steps in order, plus the assembly report)."""
    n, c, h, wd, k, r, s = (shape[key] for key in "NCHWKRS")
    p, q = h - r + 1, wd - s + 1
    flops = conv_flops(n, c, k, p, q, r, s)
    x, w, b = inputs(shape)
    oracle = get_backend("reference")
    naive, jit = get_backend("naive"), get_backend("jit")
    expected = oracle.conv2d_forward(x, w, b, relu=False, stride=1, padding=NO_PADDING)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    w_cl = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    x_in = x_cl.transpose(0, 3, 1, 2)  # NCHW view of a channels-last buffer: how training hands conv2 its input
    y_nchw = np.empty((n, k, p, q), np.float32)
    y_cl = np.empty((n, p, q, k), np.float32)
    y_cl_as_nchw = y_cl.transpose(0, 3, 1, 2)
    lanes, columns = CONV_TILE_WIDE
    steps = []

    def add(key, title, call, got, expected_values, flop_count=flops, scale=1.0, note="", repeats_here=repeats):
        """Check (the first call, timed alone as the compile/first-call time), then queue for timing."""
        (_, compile_s) = first_call(call)
        err = checked(key, got(), expected_values)
        steps.append({"key": key, "title": title, "call": call, "flops": flop_count, "scale": scale,
                      "compile_s": compile_s, "error": err, "note": note, "repeats": repeats_here})
        log(f"checked {key}: relative error {err:.1e} (first call {compile_s:.2f} s)")

    few = slice(0, naive_images)
    naive_out = {}

    def naive_call():
        naive_out["y"] = naive.conv2d_forward(x[few], w, b, relu=False, stride=1, padding=NO_PADDING)

    add("naive", "naive Python loops", naive_call, lambda: [naive_out["y"]], [expected[few]],
        scale=n / naive_images, repeats_here=1, note=f"timed on {naive_images} images, scaled to {n}")
    add("njit", "@njit, the same loops (NCHW)", lambda: conv_njit(x, w, b, y_nchw), lambda: [y_nchw], [expected],
        repeats_here=max(1, repeats // 2))
    add("channels_last", "channels-last, k innermost", lambda: conv_channels_last(x_cl, w_cl, b, y_cl),
        lambda: [y_cl_as_nchw], [expected])
    tiled = make_tiled(columns, lanes, parallel=False)
    add("tile", f"register tile, {columns} columns x {lanes} lanes", lambda: tiled(x_cl, w_cl, b, y_cl),
        lambda: [y_cl_as_nchw], [expected], note="fastmath contract; one thread")
    tiled_strict = make_tiled(columns, lanes, parallel=False, fastmath=frozenset())
    add("tile_strict", "the same tile without fastmath", lambda: tiled_strict(x_cl, w_cl, b, y_cl),
        lambda: [y_cl_as_nchw], [expected], note="no FMA: a separate multiply and add")
    steps[-1]["rung"] = False
    threaded = make_tiled(columns, lanes, parallel=True)
    add("prange", f"+ prange over images ({get_num_threads()} threads)", lambda: threaded(x_cl, w_cl, b, y_cl),
        lambda: [y_cl_as_nchw], [expected])

    fused_out = {}

    def fused_call():
        with _direct_kernels():
            fused_out["y"] = jit.conv2d_relu_maxpool2d_forward(x_in, w, b)

    pooled_ref, argmax_ref = oracle.maxpool2d_forward(np.maximum(expected, 0), size=(2, 2))
    add("fused", "+ ReLU and 2x2 max-pool fused (jit)", fused_call, lambda: [fused_out["y"][0]], [pooled_ref],
        note="the jit backend's conv2d_relu_maxpool2d_forward; FLOPs of the dense convolution")
    pooled, argmax = (np.ascontiguousarray(a) for a in fused_out["y"])
    if not np.array_equal(argmax, argmax_ref):
        raise AssertionError("step fused: argmax differs from the oracle's: not timed")
    unfused = {}

    def unfused_call():
        with _direct_kernels():
            unfused["y"] = jit.conv2d_forward(x_in, w, b, relu=True, stride=1, padding=NO_PADDING)

    add("jit_conv2d_forward", "jit's own conv2d_forward (ReLU, no pool)", unfused_call, lambda: [unfused["y"]],
        [np.maximum(expected, 0)], note="the backend's unfused stride-1 kernel, for comparison")
    steps[-1]["rung"] = False

    # the backward: dense against listed, on a pooled gradient with dropout's zeros (half of it) as in training
    rng = np.random.default_rng(1)
    dy = (rng.standard_normal(pooled.shape) * (rng.random(pooled.shape) < 0.5) * 2).astype(np.float32)
    conv_shape = (n, k, p, q)
    dz_ref = oracle.maxpool2d_backward(relu_backward(dy, pooled_ref), argmax_ref, conv_shape, size=(2, 2))
    expected_bwd = oracle.conv2d_backward(dz_ref, x.astype(np.float64), w.astype(np.float64), need_dx=True,
                                          stride=1, padding=NO_PADDING)
    nonzero = float(np.count_nonzero(dz_ref)) / dz_ref.size
    bwd = {}

    def dense_backward():
        dz = jit.maxpool2d_backward(relu_backward(dy, pooled), argmax, conv_shape, size=(2, 2))
        bwd["dense"] = jit.conv2d_backward(dz, x_in, w, need_dx=True, stride=1, padding=NO_PADDING)

    def listed_backward():
        bwd["listed"] = jit.conv2d_relu_maxpool2d_backward(dy, pooled, argmax, x_in, w, need_dx=True)

    add("dense_backward", "jit: dense backward (dX, dW, db)", dense_backward, lambda: bwd["dense"], expected_bwd,
        flop_count=2 * flops, note="relu_backward, maxpool2d_backward, then conv2d_backward")
    steps[-1]["rung"] = False
    add("listed_backward", "jit: listed backward, fused", listed_backward, lambda: bwd["listed"], expected_bwd,
        flop_count=2 * flops, note=f"conv2d_relu_maxpool2d_backward over the nonzero gradients ({nonzero:.1%} of "
                                   f"the conv output's); GFLOP/s of the dense backward's FLOPs")

    best = {step["key"]: float("inf") for step in steps}
    for _ in range(rounds):
        for step in steps:
            best[step["key"]] = min(best[step["key"]], min_time(step["call"], step["repeats"]))
    results = []
    rung = 0
    for step in steps:
        seconds = best[step["key"]] * step["scale"]
        entry = {key: step[key] for key in ("key", "title", "compile_s", "error", "note", "repeats")}
        entry.update(ms=seconds * 1e3, gflops=step["flops"] / seconds / 1e9, flops=step["flops"],
                     rung=step.get("rung", True))
        if entry["rung"]:
            rung += 1
        entry["step"] = rung if entry["rung"] else None
        results.append(entry)
        label = f"{rung}." if entry["rung"] else "  "
        log(f"{label:3} {entry['title']:<44} {entry['ms']:11.2f} ms  {entry['gflops']:7.2f} GFLOP/s")

    asm = assembly_report(tiled, tiled_strict)
    return {"shape": shape, "flops": flops, "repeats": repeats, "rounds": rounds, "naive_images": naive_images,
            "tile": {"lanes": lanes, "columns": columns}, "steps": results,
            "nonzero_conv_gradients": nonzero, "asm": asm}


def print_small_loops():
    """Compile the four small loops and print, for each, its instruction counts and first vector FMAs."""
    report = assembly_report(None, None)
    for name in ("axpy_strict", "axpy_contract", "dot_strict", "dot_reassoc"):
        counts = ", ".join(f"{key} {value}" for key, value in report[name]["counts"].items())
        print(f"{name}: {counts}")
    print("axpy_contract's first vector FMAs:")
    print("\n".join("    " + line for line in report["axpy_contract"]["excerpt"]))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"store the results in {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round (naive: 1, njit: half)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the steps taking turns")
    parser.add_argument("--asm", action="store_true", help="only compile the small loops and print their FMAs")
    args = parser.parse_args(argv)
    if args.asm:
        return print_small_loops()
    info = machine()
    print(f"{info['cpu']}, {info['cpus']} CPUs ({info['isa']}), {info['numba_threads']} Numba threads; "
          f"numba {info['numba']}, numpy {info['numpy']}")
    start = time.perf_counter()
    ladder = run_ladder(repeats=args.repeats, rounds=args.rounds)
    ladder["machine"] = info
    ladder["command"] = "python tools/ladder.py --write"  # the defaults: 3 rounds of 10
    ladder["seconds"] = round(time.perf_counter() - start, 1)
    print(f"whole run: {ladder['seconds']} s; each time the minimum over {args.rounds} rounds of {args.repeats} calls "
          f"(naive: 1 call a round, njit: {max(1, args.repeats // 2)})")
    if args.write:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results["ladder"] = ladder
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"written: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
