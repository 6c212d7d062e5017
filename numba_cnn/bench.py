"""bench: check, then time, every op of the model on every backend; --compare trains against PyTorch and Keras.

Op bench (bench_ops). Inputs are the model's real tensors: random images pushed through the model's layers, so
the pooling inputs carry the ReLU's zeros and ties. For each op and backend, the first call is checked against an
oracle, im2col (layers.py for dense) run in float64 on the same inputs; a backend whose result is off by more than
CHECK_TOLERANCE, has the wrong shape or dtype, or raises is marked FAILED and never timed. That first call is
timed on its own and reported as the compile/first-call time; then each passing backend, in turn, makes one
untimed call and its timed repeats in a block, with the thread settings `train` gives it (see bench_ops); each
figure is the median, with min, max and quartiles.
naive runs on a batch of its own (one image by default: it spends about a second per image in conv2 forward), so
every comparison between backends is per image. Dense is not a kernel of the contract: every CPU backend runs the
same numpy code from layers.py, so its rows differ only by noise and it gets no speedup. FLOP_FORMULA gives the
operation counts behind GFLOP/s; the machine's peak is a large float32 matmul through numpy (SGEMM_SIZE cubed),
measured before and after the ops.

--compare (compare_training). Each contender (our backends, PyTorch, Keras) trains in a subprocess of its own,
so ru_maxrss is that contender's peak memory, on the same batches (one seeded order), batch size and thread
count; contenders take turns round after round. After a few warm-up steps (reported apart, with the imports and
compilation), `--steps` steps are timed and extrapolated to a 60,000-image epoch, or `--epochs` full epochs are
trained and timed; then the 10,000 test images are classified, giving images/second and accuracy.
"""

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from numba_cnn.atomic import write_json
from numba_cnn.errors import NumbaCNNError
from numba_cnn.kernels import BACKENDS, Backend, BackendUnavailable, get_backend
from numba_cnn.model import INPUT_SHAPE, PARAM_SHAPES, init_params

CHECK_TOLERANCE = 1e-4
"""Largest accepted max|got - ref| / max|ref| per output. The longest float32 sum here (conv2 dW over
128*11*11 = 15,488 terms) measured about 5e-7 through BLAS and about 1.4e-6 as one plain running sum, so 1e-4 leaves
room for any summation order; a wrong kernel is off by order 1."""

FLOP_FORMULA = ("convolution forward 2*N*K*C*R*S*P*Q (one multiply and one add per kernel tap per output pixel); "
                "convolution backward the same count for dW, and again for dX when it is computed (conv2, not "
                "conv1); the bias gradient's N*K*P*Q additions are not counted. Dense forward 2*N*D*M, backward "
                "twice that (dX and dW). Pooling: no FLOPs counted. sgemm peak: 2*n^3 per n x n matmul.")

# OpenBLAS's idle workers spin for 2^28 cycles (its default THREAD_TIMEOUT, about 0.1 s here) before sleeping.
BLAS_SETTLE_S = 0.3
SGEMM_SIZE = 2048
SGEMM_REPEATS = 3
OP_LAYERS = ("conv1", "pool1", "conv2", "pool2", "dense")
DEFAULT_OP_KERNELS = ("naive", "im2col", "jit")
DEFAULT_COMPARE_KERNELS = ("jit", "im2col")
SLOW_BACKENDS = ("naive",)  # timed on their own small batch
SPEEDUP_PAIRS = (("jit", "naive"), ("jit", "im2col"), ("im2col", "naive"), ("cuda", "im2col"), ("cuda", "jit"))
TRAIN_IMAGES = 60_000
TEST_IMAGES = 10_000
DEFAULT_OUT = "bench-results"


# ---------------------------------------------------------------------------------------------------------------
# The ops of the model at their real shapes


def conv_flops(x_shape, w_shape):
    """Multiply-adds of a valid, stride-1 convolution counted as 2 FLOPs: 2*N*K*C*R*S*P*Q."""
    n, c, h, w = x_shape
    k, _, r, s = w_shape
    return 2 * n * k * c * r * s * (h - r + 1) * (w - s + 1)


@dataclass(frozen=True)
class Op:
    """One timed call: `run(backend, *inputs)` returns a tuple of arrays named `outputs`."""

    name: str  # "conv2 bwd"
    layer: str
    outputs: tuple
    run: object
    flops: object  # inputs -> FLOPs of one call, or None where none are counted
    in_contract: bool = True  # False: layers.py code that every CPU backend shares (no speedup to report)


def _conv_forward(k, x, w, b):
    return (k.conv2d_forward(x, w, b, relu=True),)


def _conv_backward_dw(k, dy, x, w):
    _, dw, db = k.conv2d_backward(dy, x, w, need_dx=False)
    return dw, db


def _conv_backward(k, dy, x, w):
    return k.conv2d_backward(dy, x, w, need_dx=True)


def _pool_forward(k, x):
    return k.maxpool2d_forward(x)


def _pool_backward(k, dy, argmax, x_shape):
    return (k.maxpool2d_backward(dy, argmax, x_shape),)


def _dense_forward(k, x, w, b):
    return (k.layers.dense_forward(x, w, b),)


def _dense_backward(k, dy, x, w):
    return k.layers.dense_backward(dy, x, w)


OPS = (
    Op("conv1 fwd", "conv1", ("y",), _conv_forward, lambda x, w, b: conv_flops(x.shape, w.shape)),
    Op("conv1 bwd", "conv1", ("dw", "db"), _conv_backward_dw, lambda dy, x, w: conv_flops(x.shape, w.shape)),
    Op("pool1 fwd", "pool1", ("y", "argmax"), _pool_forward, lambda x: None),
    Op("pool1 bwd", "pool1", ("dx",), _pool_backward, lambda dy, argmax, x_shape: None),
    Op("conv2 fwd", "conv2", ("y",), _conv_forward, lambda x, w, b: conv_flops(x.shape, w.shape)),
    Op("conv2 bwd", "conv2", ("dx", "dw", "db"), _conv_backward, lambda dy, x, w: 2 * conv_flops(x.shape, w.shape)),
    Op("pool2 fwd", "pool2", ("y", "argmax"), _pool_forward, lambda x: None),
    Op("pool2 bwd", "pool2", ("dx",), _pool_backward, lambda dy, argmax, x_shape: None),
    Op("dense fwd", "dense", ("y",), _dense_forward, lambda x, w, b: 2 * x.shape[0] * w.shape[0] * w.shape[1],
       in_contract=False),
    Op("dense bwd", "dense", ("dx", "dw", "db"), _dense_backward,
       lambda dy, x, w: 4 * x.shape[0] * w.shape[0] * w.shape[1], in_contract=False),
)


def op_inputs(n, seed=0):
    """{op name: float32 inputs} for a batch of n random images run through the model's layers (im2col), with
    Glorot weights, small random biases (a kernel that drops the bias must fail the check) and standard-normal
    upstream gradients."""
    k = get_backend("im2col")
    rng = np.random.default_rng(seed)
    p = init_params(seed)
    for name in ("conv1.b", "conv2.b", "dense.b"):
        p[name] = rng.normal(0.0, 0.1, p[name].shape).astype(np.float32)

    def grad(shape):
        return rng.standard_normal(shape).astype(np.float32)

    x = rng.random((n, *INPUT_SHAPE), dtype=np.float32)
    a1 = k.conv2d_forward(x, p["conv1.w"], p["conv1.b"], relu=True)
    h1, arg1 = k.maxpool2d_forward(a1)
    a2 = k.conv2d_forward(h1, p["conv2.w"], p["conv2.b"], relu=True)
    h2, arg2 = k.maxpool2d_forward(a2)
    flat = np.ascontiguousarray(h2.reshape(n, -1))
    return {
        "conv1 fwd": (x, p["conv1.w"], p["conv1.b"]),
        "conv1 bwd": (grad(a1.shape), x, p["conv1.w"]),
        "pool1 fwd": (a1,),
        "pool1 bwd": (grad(h1.shape), arg1, a1.shape),
        "conv2 fwd": (h1, p["conv2.w"], p["conv2.b"]),
        "conv2 bwd": (grad(a2.shape), h1, p["conv2.w"]),
        "pool2 fwd": (a2,),
        "pool2 bwd": (grad(h2.shape), arg2, a2.shape),
        "dense fwd": (flat, p["dense.w"], p["dense.b"]),
        "dense bwd": (grad((n, PARAM_SHAPES["dense.w"][1])), flat, p["dense.w"]),
    }


def check_outputs(op, got, ref):
    """Compare a backend's outputs with the float64 oracle's -> (passed, {output: error}, reason or None).
    Float outputs: max|got - ref| / max|ref|, and the dtype must be float32; argmax (uint8): exact equality."""
    if len(got) != len(ref):
        return False, {}, f"returned {len(got)} arrays, expected {len(ref)} ({', '.join(op.outputs)})"
    errors = {}
    for name, g, r in zip(op.outputs, got, ref):
        g = np.asarray(g)
        if g.shape != r.shape:
            return False, errors, f"{name} has shape {g.shape}, expected {r.shape}"
        expected_dtype = np.dtype(np.uint8) if r.dtype == np.uint8 else np.dtype(np.float32)
        if g.dtype != expected_dtype:
            return False, errors, f"{name} has dtype {g.dtype}, expected {expected_dtype}"
        if r.dtype == np.uint8:
            wrong = int(np.count_nonzero(g != r))
            errors[name] = wrong / r.size
            if wrong:
                return False, errors, f"{name}: {wrong} of {r.size} winners differ from the oracle's"
            continue
        scale = float(np.abs(r).max())
        err = float(np.abs(g.astype(np.float64) - r).max()) / (scale if scale > 0 else 1.0)
        errors[name] = err
        if not err <= CHECK_TOLERANCE:  # also catches NaN
            return False, errors, f"{name}: relative error {err:.3g} > {CHECK_TOLERANCE:g}"
    return True, errors, None


def _as_float64(inputs):
    return tuple(a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a
                 for a in inputs)


def _stats(samples):
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return {"median_s": float(median), "min_s": float(min(samples)), "max_s": float(max(samples)),
            "q1_s": float(q1), "q3_s": float(q3)}


# ---------------------------------------------------------------------------------------------------------------
# Machine: threads, peak, description


def default_threads():
    """All CPUs this process may run on, capped by the threads Numba started with."""
    import numba

    return min(len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS)


def sgemm_gflops(n=SGEMM_SIZE, repeats=SGEMM_REPEATS, seed=0):
    """GFLOP/s of an n x n x n float32 matmul through numpy's BLAS, one figure per repeat after a warm-up call."""
    rng = np.random.default_rng(seed)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        rates.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return rates


def machine_description(threads_record):
    """CPU, cores, versions, thread settings and BLAS libraries, for the JSON record."""
    import threadpoolctl

    from numba_cnn.train import machine_record, threading_layer

    record = machine_record()
    record["usable_cpus"] = len(os.sched_getaffinity(0))
    record["load_average_1_5_15min"] = os.getloadavg()  # other work on the box, which skews every timing
    record["numba_threading_layer"] = threading_layer() or "none started (no parallel kernel ran)"
    record["threads"] = threads_record
    record["blas"] = [{key: info.get(key) for key in ("internal_api", "version", "num_threads", "architecture",
                                                       "threading_layer")}
                      for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    record["threadpoolctl"] = threadpoolctl.__version__
    return record


def _pin_threads(threads, kernels=None):
    from numba_cnn.train import set_threads

    return set_threads(default_threads() if threads is None else threads, kernels)


# ---------------------------------------------------------------------------------------------------------------
# Op bench


def _resolve_backend(backend):
    """A backend name or a ready Backend -> (Backend or None, reason it cannot run)."""
    if isinstance(backend, Backend):
        return backend, None
    try:
        return get_backend(backend), None
    except BackendUnavailable as exc:
        return None, str(exc)
    except ValueError as exc:
        raise NumbaCNNError(str(exc)) from None
    except ImportError as exc:
        return None, f"cannot import numba_cnn.kernels.{backend}: {exc}"


def _timed_call(op, backend, inputs, sync):
    start = time.perf_counter()
    outputs = op.run(backend, *inputs)
    if sync is not None:
        sync()
    return time.perf_counter() - start, outputs


def bench_ops(backends=DEFAULT_OP_KERNELS, layers=OP_LAYERS, batch_size=128, naive_batch=1, repeats=7,
              naive_repeats=3, threads=None, seed=0, sgemm_size=SGEMM_SIZE, log=print):
    """Check, then time, every op of `layers` on every backend (a name from BACKENDS or a Backend object).

    Returns a dict: settings, machine, calibration (sgemm before and after), flop_formula, results (one row per
    op and backend: status "ok" / "FAILED" / "skipped", check errors, first_call_s, per-call statistics, per-image
    median, GFLOP/s and, for backends on the host, share of the sgemm peak) and speedups (per image).
    """
    for name, value, least in (("batch_size", batch_size, 1), ("naive_batch", naive_batch, 1),
                               ("repeats", repeats, 1), ("naive_repeats", naive_repeats, 1)):
        if not isinstance(value, int) or value < least:
            raise NumbaCNNError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    unknown = [layer for layer in layers if layer not in OP_LAYERS]
    if unknown:
        raise NumbaCNNError(f"unknown op layer {', '.join(unknown)}: choose from {', '.join(OP_LAYERS)}")
    threads_record = _pin_threads(threads)
    ops = [op for op in OPS if op.layer in layers]

    resolved, results = [], []
    for backend in backends:
        module, reason = _resolve_backend(backend)
        if module is None:
            log(f"skipping {backend}: {reason}")
            results.extend({"op": op.name, "backend": backend, "status": "skipped", "reason": reason} for op in ops)
        else:
            resolved.append(module)

    def batch_of(k):
        return naive_batch if k.name in SLOW_BACKENDS else batch_size

    sgemm_before = sgemm_gflops(sgemm_size)
    log(f"sgemm {sgemm_size}^3 float32 through numpy: {np.median(sgemm_before):.1f} GFLOP/s "
        f"(median of {len(sgemm_before)}), {threads_record['numba_threads']} thread(s)")

    inputs = {n: op_inputs(n, seed) for n in sorted({batch_of(k) for k in resolved})}
    oracle = get_backend("im2col")
    for op in ops:
        references = {n: tuple(np.asarray(a) for a in op.run(oracle, *_as_float64(inputs[n][op.name])))
                      for n in inputs}
        timed = []
        for k in resolved:
            n = batch_of(k)
            row = {"op": op.name, "backend": k.name, "batch": n}
            results.append(row)
            dev_inputs = tuple(k.to_device(a) if isinstance(a, np.ndarray) else a for a in inputs[n][op.name])
            sync = getattr(k.layers, "synchronize", None)
            try:
                first_s, outputs = _timed_call(op, k, dev_inputs, sync)
            except Exception as exc:  # a kernel that raises fails its check; the bench goes on with the others
                row.update(status="FAILED", reason=f"raised {type(exc).__name__}: {exc}")
                log(f"{op.name:<10} {k.name:<8} FAILED: {row['reason']}")
                continue
            host = tuple(k.to_host(a) for a in outputs if a is not None)
            passed, errors, reason = check_outputs(op, host, references[n])
            row["check_errors"] = errors
            if not passed:
                row.update(status="FAILED", reason=reason)
                log(f"{op.name:<10} {k.name:<8} FAILED: {reason} (not timed)")
                continue
            row.update(status="ok", first_call_s=first_s, samples_s=[])
            timed.append((k, row, dev_inputs, sync, naive_repeats if k.name in SLOW_BACKENDS else repeats))
        # Each backend times its repeats in one block, under the thread settings `train` gives it, after a pause
        # and an untimed call: OpenBLAS workers keep spinning for a while after each BLAS call (the oracle's, the
        # sgemm's, im2col's), and interleaved call by call they took the cores a jit kernel needed (jit conv2
        # forward measured 13-16 ms that way, 3.5 ms in a block of its own).
        for k, row, dev_inputs, sync, wanted in timed:
            _pin_threads(threads, k.name)
            time.sleep(BLAS_SETTLE_S)
            _timed_call(op, k, dev_inputs, sync)
            row["samples_s"] = [_timed_call(op, k, dev_inputs, sync)[0] for _ in range(wanted)]
        _pin_threads(threads)
        for k, row, *_ in timed:
            row.update(_stats(row["samples_s"]))
            row["median_per_image_s"] = row["median_s"] / row["batch"]
            flops = op.flops(*inputs[row["batch"]][op.name])
            row["flops"] = flops
            if flops is not None:
                row["gflops"] = flops / row["median_s"] / 1e9
            row["on_host"] = not hasattr(k.module, "to_device")  # a device backend (cuda) brings its own
            log(f"{op.name:<10} {k.name:<8} ok: median {1e3 * row['median_s']:.3f} ms for {row['batch']} image(s)")

    sgemm_after = sgemm_gflops(sgemm_size)
    order = {name: i for i, name in enumerate(k.name if isinstance(k, Backend) else k for k in backends)}
    results.sort(key=lambda row: ([op.name for op in ops].index(row["op"]), order[row["backend"]]))
    peak = float(np.median(sgemm_before + sgemm_after))
    for row in results:
        if "gflops" in row and row["on_host"]:  # the sgemm peak is the CPU's: no share for a GPU backend
            row["peak_share"] = row["gflops"] / peak
    calibration = {"sgemm_size": sgemm_size, "before_gflops": sgemm_before, "after_gflops": sgemm_after,
                   "peak_gflops": peak}
    first_calls = {}
    for row in results:
        if "first_call_s" in row:
            first_calls[row["backend"]] = first_calls.get(row["backend"], 0.0) + row["first_call_s"]
    return {
        "kind": "numba_cnn op bench",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"backends": [k.name if isinstance(k, Backend) else k for k in backends],
                     "layers": list(layers), "batch_size": batch_size, "naive_batch": naive_batch,
                     "repeats": repeats, "naive_repeats": naive_repeats, "seed": seed,
                     "check_tolerance": CHECK_TOLERANCE, "oracle": "im2col (layers.py for dense) in float64"},
        "machine": machine_description(threads_record),
        "calibration": calibration,
        "flop_formula": FLOP_FORMULA,
        "results": results,
        "first_call_total_s": first_calls,
        "speedups": speedups(results),
    }


def speedups(results):
    """[{op, pair: "jit vs naive", speedup}] from per-image medians, for each contract op and each pair in
    SPEEDUP_PAIRS that both passed; above 1 means the first is faster."""
    per_image = {(r["op"], r["backend"]): r["median_per_image_s"] for r in results if r["status"] == "ok"}
    contract_ops = {op.name for op in OPS if op.in_contract}
    out = []
    for op in (name for name in dict.fromkeys(r["op"] for r in results) if name in contract_ops):
        for fast, slow in SPEEDUP_PAIRS:
            if (op, fast) in per_image and (op, slow) in per_image:
                out.append({"op": op, "pair": f"{fast} vs {slow}",
                            "speedup": per_image[(op, slow)] / per_image[(op, fast)]})
    return out


def format_ops_table(report):
    """The op bench as text: one line per op and backend, then the speedups."""
    peak = report["calibration"]["peak_gflops"]
    lines = [f"{'op':<10} {'backend':<8} {'batch':>5} {'check err':>9} {'1st call s':>10} {'median ms':>10} "
             f"{'min-max ms':>17} {'ms/image':>9} {'GFLOP/s':>8} {'% peak':>7}"]
    skipped = {}
    for r in report["results"]:
        if r["status"] == "skipped":
            skipped[r["backend"]] = r["reason"]
            continue
        head = f"{r['op']:<10} {r['backend']:<8} {r['batch']:>5} "
        if r["status"] != "ok":
            lines.append(f"{head}{r['status']:>9}  {r['reason']}")
            continue
        spread = f"{1e3 * r['min_s']:.3f}-{1e3 * r['max_s']:.3f}"
        gflops = f"{r['gflops']:.3g}" if "gflops" in r else "-"
        share = f"{100 * r['peak_share']:.1f}%" if "peak_share" in r else "-"
        lines.append(f"{head}{max(r['check_errors'].values()):>9.1e} {r['first_call_s']:>10.3f} "
                     f"{1e3 * r['median_s']:>10.3f} {spread:>17} {1e3 * r['median_per_image_s']:>9.4f} "
                     f"{gflops:>8} {share:>7}")
    lines.extend(f"{backend} skipped: {reason}" for backend, reason in skipped.items())
    lines.append(f"check err: largest max|got - oracle| / max|oracle| over the op's outputs (FAILED above "
                 f"{CHECK_TOLERANCE:g}); batch: images per call")
    cal, m = report["calibration"], report["machine"]
    blas = ", ".join(f"{b['internal_api']} {b['version']} {b['num_threads']} thread(s)" for b in m["blas"])
    lines.append(f"machine: {m['processor']}, {m['usable_cpus']} usable CPU(s); numba {m['numba']} "
                 f"{m['threads']['numba_threads']} thread(s) ({m['numba_threading_layer']}); BLAS {blas}; "
                 f"load average {m['load_average_1_5_15min'][0]:.2f} at the end (this run included)")
    lines.append("first calls (compile or cache load, first touch), summed over the ops: " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in report["first_call_total_s"].items()))
    lines.append(f"peak: sgemm {cal['sgemm_size']}^3 float32 {peak:.1f} GFLOP/s (median; before "
                 f"{np.median(cal['before_gflops']):.1f}, after {np.median(cal['after_gflops']):.1f})")
    lines.append(f"FLOPs: {report['flop_formula']}")
    if report["speedups"]:
        pairs = list(dict.fromkeys(s["pair"] for s in report["speedups"]))
        by_key = {(s["op"], s["pair"]): s["speedup"] for s in report["speedups"]}
        lines.append("")
        lines.append("speedup per image (median vs median; >1: the first is faster)")
        lines.append(f"{'op':<10}" + "".join(f"{p:>17}" for p in pairs))
        for op in dict.fromkeys(s["op"] for s in report["speedups"]):
            cells = (f"{by_key[(op, p)]:.1f}x" if (op, p) in by_key else "-" for p in pairs)
            lines.append(f"{op:<10}" + "".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def plot_ops(report, path):
    """Bar chart, log-scale milliseconds per image, one group of bars per op, one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in report["results"]))
    backends = list(dict.fromkeys(r["backend"] for r in report["results"] if r["status"] != "skipped"))
    skipped = list(dict.fromkeys(r["backend"] for r in report["results"] if r["status"] == "skipped"))
    by_key = {(r["op"], r["backend"]): r for r in report["results"]}
    width = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(10, 1 + 0.5 * len(ops) * max(1, len(backends)) / 2))
    for i, backend in enumerate(backends):
        ys, ms = [], []
        for j, op in enumerate(ops):
            r = by_key.get((op, backend))
            y = j + (i - (len(backends) - 1) / 2) * width
            if r and r["status"] == "ok":
                ys.append(y)
                ms.append(1e3 * r["median_per_image_s"])
            elif r:
                ax.text(0.01, y, f"{backend}: {r['status']}", transform=ax.get_yaxis_transform(), va="center",
                        fontsize=7, color="crimson")
        batch = next((r["batch"] for r in report["results"] if r["backend"] == backend and "batch" in r), "?")
        ax.barh(ys, ms, height=width, label=f"{backend} (batch {batch})", color=f"C{i}")
    ax.set_xscale("log")
    ax.set_yticks(range(len(ops)), ops)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per image (median, log scale)")
    machine = report["machine"]
    note = f"; not run: {', '.join(skipped)}" if skipped else ""
    ax.set_title(f"numba_cnn ops, {machine['processor']}, {machine['threads']['numba_threads']} thread(s){note}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Training comparison


class NumbaCNNContender:
    """Our model on one backend with the contender interface of baselines.py (train_step, predict)."""

    def __init__(self, kernels, seed=0):
        from numba_cnn.model import Model
        from numba_cnn.optim import Adam

        import numba

        from numba_cnn import __version__

        self.version = f"numba_cnn {__version__} ({kernels} kernels), numba {numba.__version__}"
        self.backend = get_backend(kernels)
        self.model = Model(self.backend, seed=seed)
        self.optimizer = Adam(self.model.params, self.backend.layers)
        self.dropout_rng = self.backend.layers.make_dropout_rng([seed, 2])

    def train_step(self, x, y):
        # x may be raw uint8 pixels, scaled here a batch at a time, exactly as numba_cnn.train does
        to_device, as_float = self.backend.to_device, self.backend.layers.as_float_images
        loss, _ = self.model.forward_backward(as_float(to_device(x)), to_device(y), self.dropout_rng)
        self.optimizer.step(self.model.grads)
        return loss

    def predict(self, x):
        return self.model.predict(self.backend.layers.as_float_images(self.backend.to_device(x)))


def peak_rss_mb():
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_data(data=None, random_data=False, seed=0, limit=None, raw_pixels=False):
    """-> (((x_train, y_train), (x_test, y_test)) with int64 labels, where they came from): MNIST via
    numba_cnn.data.load_mnist, or random images and labels of MNIST's sizes when random_data is set (for timing
    only; the accuracy means nothing). limit: keep only the first `limit` training and test images.
    raw_pixels: keep MNIST's uint8 pixels (numba_cnn's own trainer holds them so and scales each batch)."""
    if random_data:
        rng = np.random.default_rng([seed, 7])
        sizes = (min(TRAIN_IMAGES, limit or TRAIN_IMAGES), min(TEST_IMAGES, limit or TEST_IMAGES))
        return tuple((rng.random((n, *INPUT_SHAPE), dtype=np.float32), rng.integers(0, 10, n, dtype=np.int64))
                     for n in sizes), "random"
    from numba_cnn.data import load_mnist

    mnist = load_mnist(data, normalize=not raw_pixels)
    return tuple((x[:limit], y[:limit].astype(np.int64)) for x, y in mnist), str(getattr(mnist, "source", data))


def _make_contender(name, seed, threads):
    from numba_cnn import baselines

    if name in baselines.BASELINES:
        return baselines.BASELINES[name](seed=seed, threads=threads)
    return NumbaCNNContender(name, seed=seed)


def run_contender(name, steps=50, warmup_steps=3, batch_size=128, threads=None, epochs=0, seed=0, data=None,
                  random_data=False, limit=None):
    """Train and evaluate one contender in this process -> dict of its figures. Meant for a fresh process
    (compare_training starts one per contender), so that peak_rss_mb is this contender's alone."""
    from numba_cnn import baselines

    threads = default_threads() if threads is None else threads
    _pin_threads(threads, name)  # the same thread settings as `train --kernels name`
    # Each contender holds the images as its own training loop would: numba_cnn as uint8 (scaled per batch, as
    # numba_cnn.train does), PyTorch and Keras as the float32 arrays their usual input pipelines take.
    ((x_train, y_train), (x_test, y_test)), source = load_data(data, random_data, seed, limit,
                                                               raw_pixels=name not in baselines.BASELINES)
    out = {"contender": name, "data_source": source, "epoch_images": len(x_train), "test_images": len(x_test),
           "rss_after_data_mb": peak_rss_mb()}

    start = time.perf_counter()
    contender = _make_contender(name, seed, threads)
    out["version"] = contender.version
    # Warm-up batches come from an order of their own, so the measured steps (or epochs) see the same batches
    # whatever the warm-up length.
    warm_batches = baselines.batch_stream(len(x_train), batch_size, np.random.default_rng([seed, 3]))
    if warmup_steps:
        baselines.train_steps(contender, x_train, y_train, warm_batches, warmup_steps)
    contender.predict(x_test[:batch_size])
    out["warmup_s"] = time.perf_counter() - start

    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    order = np.random.default_rng([seed, 1])
    if epochs:
        per_epoch = baselines.train_epochs(contender, x_train, y_train, batch_size, epochs, order)
        out["epoch_s"] = [s for s, _ in per_epoch]
        out["train_loss"] = per_epoch[-1][1]
        out["sec_per_epoch"] = float(np.median(out["epoch_s"]))
    else:
        batches = baselines.batch_stream(len(x_train), batch_size, order)
        seconds, out["train_loss"] = baselines.train_steps(contender, x_train, y_train, batches, steps)
        out["steps_s"] = seconds
        out["sec_per_epoch"] = seconds / steps * steps_per_epoch
    out["test_accuracy"], eval_s = baselines.evaluate(contender, x_test, y_test, batch_size)
    out["inference_s"] = eval_s
    out["inference_img_per_s"] = len(x_test) / eval_s
    out["peak_rss_mb"] = peak_rss_mb()
    out["load_average_1min"] = os.getloadavg()[0]
    return out


def _run_in_subprocess(spec, threads):
    """Run one contender in a fresh interpreter (python -m numba_cnn.bench SPEC.json) -> its result dict.
    A NumbaCNNError there (bad data path, missing package) is raised here with the same message."""
    env = dict(os.environ, KERAS_BACKEND="torch")
    # The child imports this very package, wherever the parent found it (an uninstalled checkout included).
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)  # thread pools sized at start-up, before anyone can call set_num_threads
    with tempfile.TemporaryDirectory(prefix="numba-cnn-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(dict(spec, result_path=str(result_path))), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "numba_cnn.bench", str(spec_path)], env=env,
                              capture_output=True, text=True)
        result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.exists() else None
    if result is not None and "user_error" in result:
        raise NumbaCNNError(result["user_error"])
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"contender": spec["name"], "error": f"exit status {proc.returncode}: " + " | ".join(tail)}
    return result


def compare_training(contenders=("jit", "im2col", "torch", "keras"), steps=50, warmup_steps=3, batch_size=128,
                     threads=None, rounds=2, epochs=0, seed=0, data=None, random_data=False, limit=None,
                     profile=False, log=print):
    """Train each contender (our backend names, "torch", "keras") in its own subprocess, `rounds` times in turn
    -> dict with per-contender medians over rounds (peak memory: the largest), every run, and ratios to torch.

    With epochs=0, `steps` timed steps after `warmup_steps` warm-up steps, extrapolated to a 60,000-image epoch;
    with epochs > 0, that many full epochs, timed (their median), and the test accuracy that results.
    limit: train and test on the first `limit` images only (quick checks; an epoch is then `limit` images).
    profile: each subprocess writes a pyinstrument profile of its run into profiles/.
    """
    from numba_cnn import baselines

    for name, value, least in (("steps", steps, 1), ("warmup_steps", warmup_steps, 0), ("rounds", rounds, 1),
                               ("batch_size", batch_size, 1), ("epochs", epochs, 0), ("limit", limit or 1, 1)):
        if not isinstance(value, int) or value < least:
            raise NumbaCNNError(f"--{name.replace('_', '-')} must be an integer of at least {least}, got {value!r}")
    threads = default_threads() if threads is None else threads
    threads_record = _pin_threads(threads)  # here, so a bad --threads is refused before any training
    if "naive" in contenders:
        raise NumbaCNNError("naive is too slow to train (seconds per image): leave it out of --compare's kernels")
    entries, runnable = {}, []
    for name in contenders:
        if name in baselines.BASELINES:
            missing = baselines.missing_packages(name)
            reason = f"{', '.join(missing)} not installed; {baselines.INSTALL_HINT}" if missing else None
        elif name in BACKENDS:
            reason = _resolve_backend(name)[1]
        else:
            raise NumbaCNNError(f"unknown contender {name!r}: choose from {', '.join(BACKENDS)}, "
                                f"{', '.join(baselines.BASELINES)}")
        entries[name] = {"contender": name, "runs": []}
        if reason:
            entries[name].update(status="skipped", reason=reason)
            log(f"skipping {name}: {reason}")
        else:
            runnable.append(name)
    epoch_images = min(TRAIN_IMAGES, limit or TRAIN_IMAGES)
    measure = (f"median of {epochs} full epoch(s) of {epoch_images:,} images" if epochs
               else f"extrapolated from {steps} steps to an epoch of {epoch_images:,} images")
    for round_number in range(1, rounds + 1):
        for name in runnable:
            spec = dict(name=name, steps=steps, warmup_steps=warmup_steps, batch_size=batch_size, threads=threads,
                        epochs=epochs, seed=seed, data=data, random_data=random_data, limit=limit,
                        profile=profile)
            run = _run_in_subprocess(spec, threads)
            run["round"] = round_number
            entries[name]["runs"].append(run)
            if "error" in run:
                log(f"round {round_number}/{rounds} {name}: FAILED {run['error']}")
            else:
                log(f"round {round_number}/{rounds} {name}: {run['sec_per_epoch']:.2f} s/epoch, "
                    f"{run['inference_img_per_s']:.0f} img/s inference, {run['peak_rss_mb']:.0f} MB peak, "
                    f"warm-up {run['warmup_s']:.1f} s")
    for entry in entries.values():
        if "status" in entry:
            continue
        good = [run for run in entry["runs"] if "error" not in run]
        if not good:
            entry.update(status="FAILED", reason=entry["runs"][0]["error"])
            continue
        entry.update(status="ok", sec_per_epoch=float(np.median([r["sec_per_epoch"] for r in good])),
                     inference_img_per_s=float(np.median([r["inference_img_per_s"] for r in good])),
                     peak_rss_mb=max(r["peak_rss_mb"] for r in good),
                     rss_after_data_mb=max(r["rss_after_data_mb"] for r in good),
                     warmup_s=[r["warmup_s"] for r in good], test_accuracy=good[-1]["test_accuracy"],
                     version=good[0]["version"])
    sources = {run["data_source"] for entry in entries.values() for run in entry["runs"] if "data_source" in run}
    reference = entries.get("torch", {})
    for entry in entries.values():
        if entry["status"] == "ok" and reference.get("status") == "ok":
            entry["vs_torch"] = {key: entry[key] / reference[key]
                                 for key in ("sec_per_epoch", "inference_img_per_s", "peak_rss_mb")}
    return {
        "kind": "numba_cnn training comparison",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"contenders": list(contenders), "steps": steps, "warmup_steps": warmup_steps,
                     "batch_size": batch_size, "threads": threads, "rounds": rounds, "epochs": epochs, "seed": seed,
                     "data": ", ".join(sorted(sources)) or ("random" if random_data else data or "default"),
                     "limit": limit, "measure": measure},
        "machine": machine_description(threads_record),
        "contenders": list(entries.values()),
    }


def format_compare_table(report):
    s = report["settings"]
    lines = [f"training comparison: batch {s['batch_size']}, {s['threads']} thread(s), {s['rounds']} round(s), "
             f"data {s['data']}; s/epoch {s['measure']}; medians over rounds, peak memory the largest",
             f"{'contender':<10} {'s/epoch':>9} {'x torch':>8} {'infer img/s':>12} {'x torch':>8} "
             f"{'peak MB':>8} {'x torch':>8} {'data MB':>8} {'warm-up s':>14} {'test acc':>9}"]
    for e in report["contenders"]:
        if e["status"] != "ok":
            lines.append(f"{e['contender']:<10} {e['status']}: {e['reason']}")
            continue
        ratio = e.get("vs_torch", {})

        def x(key):
            return f"{ratio[key]:.2f}" if key in ratio else "-"

        warm = "/".join(f"{w:.1f}" for w in e["warmup_s"])
        lines.append(f"{e['contender']:<10} {e['sec_per_epoch']:>9.2f} {x('sec_per_epoch'):>8} "
                     f"{e['inference_img_per_s']:>12.0f} {x('inference_img_per_s'):>8} {e['peak_rss_mb']:>8.0f} "
                     f"{x('peak_rss_mb'):>8} {e['rss_after_data_mb']:>8.0f} {warm:>14} {e['test_accuracy']:>9.4f}")
    lines.append("x torch: contender / PyTorch (s/epoch and MB: above 1 is worse; img/s: above 1 is better). "
                 "data MB: peak memory once imports and data are loaded (numba_cnn holds uint8 pixels and scales "
                 "each batch, as its trainer does; PyTorch and Keras hold float32). "
                 "warm-up: imports, model build, compile, warm-up steps, per round.")
    lines.append("versions: " + "; ".join(e["version"] for e in report["contenders"] if e["status"] == "ok"))
    loads = [run["load_average_1min"] for e in report["contenders"] for run in e["runs"] if "error" not in run]
    if loads:
        lines.append(f"load average (1 min) at the end of each run: {min(loads):.2f} to {max(loads):.2f} on "
                     f"{report['machine']['usable_cpus']} usable CPU(s), each run's own threads included")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _names(text):
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser):
    """The flags of `python -m numba_cnn bench`."""
    parser.add_argument("--kernels", type=_names, metavar="LIST",
                        help=f"comma-separated backends from {', '.join(BACKENDS)} (default "
                             f"{','.join(DEFAULT_OP_KERNELS)}; with --compare {','.join(DEFAULT_COMPARE_KERNELS)})")
    parser.add_argument("--ops", type=_names, default=OP_LAYERS, metavar="LIST",
                        help=f"layers whose forward and backward ops to time (default {','.join(OP_LAYERS)})")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="Numba and BLAS threads (torch's too with --compare); default: all usable CPUs")
    parser.add_argument("--repeats", type=int, default=7, metavar="N", help="timed calls per op and backend (default 7)")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N", help="images per call / per step (default 128)")
    parser.add_argument("--naive-batch", type=int, default=1, metavar="N",
                        help="images per call for naive, which takes seconds per image (default 1)")
    parser.add_argument("--naive-repeats", type=int, default=3, metavar="N",
                        help="timed calls per op for naive (default 3)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for the JSON record and the PNG chart (default {DEFAULT_OUT}/)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the weights, inputs and data order (default 0)")
    parser.add_argument("--profile", action="store_true",
                        help="write a pyinstrument profile into profiles/ (with --compare, one per contender run)")
    parser.add_argument("--compare", type=_names, metavar="LIST",
                        help="train against baselines instead (torch, keras): our --kernels and each baseline in "
                             "its own process, same data, batch and threads")
    parser.add_argument("--steps", type=int, default=50, metavar="N", help="--compare: timed training steps (default 50)")
    parser.add_argument("--warmup-steps", type=int, default=3, metavar="N", help="--compare: untimed steps first (default 3)")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="--compare: contenders take turns N times (default 2; 1 with --epochs)")
    parser.add_argument("--epochs", type=int, default=0, metavar="N",
                        help="--compare: train N full epochs instead of --steps, and report test accuracy")
    parser.add_argument("--data", metavar="PATH", help="--compare: MNIST folder or mnist.npz (default: "
                        "$NUMBA_CNN_DATA, then numba_cnn.data's own search)")
    parser.add_argument("--random-data", action="store_true",
                        help="--compare: random images instead of MNIST (timing only; accuracy meaningless)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="--compare: train and test on the first N images only (quick checks)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _check_writable(folder):
    """Refuse an output folder that cannot be written before the bench runs, not after; create nothing yet."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise NumbaCNNError(f"cannot write the bench results into {folder}: {existing} is not a writable folder")


def _write_json(path, record):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)  # atomic: an interrupted bench leaves no half-written record
    except OSError as exc:
        raise NumbaCNNError(f"cannot write {path}: {exc.strerror or exc}") from None


def run(args):
    """`python -m numba_cnn bench`: the op bench, or the training comparison with --compare -> exit code."""
    from numba_cnn.profiling import maybe_profile

    out = Path(args.out)
    _check_writable(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.compare is not None:
        kernels = args.kernels or DEFAULT_COMPARE_KERNELS
        report = compare_training(kernels + args.compare, steps=args.steps, warmup_steps=args.warmup_steps,
                                  batch_size=args.batch_size, threads=args.threads,
                                  rounds=args.rounds or (1 if args.epochs else 2), epochs=args.epochs,
                                  seed=args.seed, data=args.data, random_data=args.random_data, limit=args.limit,
                                  profile=args.profile)
        print(format_compare_table(report))
        path = out / f"compare-{stamp}.json"
        _write_json(path, report)
        print(f"written: {path}")
        return 0 if all(e["status"] != "FAILED" for e in report["contenders"]) else 1
    kernels = args.kernels or DEFAULT_OP_KERNELS
    with maybe_profile(args.profile, "bench", "+".join(kernels)):
        report = bench_ops(kernels, layers=args.ops, batch_size=args.batch_size, naive_batch=args.naive_batch,
                           repeats=args.repeats, naive_repeats=args.naive_repeats, threads=args.threads,
                           seed=args.seed)
    json_path, png_path = out / f"ops-{stamp}.json", out / f"ops-{stamp}.png"
    report["files"] = {"json": str(json_path), "chart": str(png_path)}
    print(format_ops_table(report))
    _write_json(json_path, report)
    plot_ops(report, png_path)
    print(f"written: {json_path} and {png_path}")
    return 0 if all(r["status"] != "FAILED" for r in report["results"]) else 1


def _contender_process(spec_path):
    """Entry point of a --compare subprocess: read the spec, run the contender, write its result (or the
    user-facing error) as JSON where the spec says."""
    from numba_cnn.profiling import maybe_profile

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result_path = Path(spec.pop("result_path"))
    try:
        with maybe_profile(spec.pop("profile"), "bench-compare", spec["name"]):
            result = run_contender(**spec)
    except NumbaCNNError as exc:
        result = {"user_error": str(exc)}
    _write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(_contender_process(sys.argv[1]))
