"""The op bench: check, then time, every step of a network on every backend.

The network is a description (bench/networks.py: a preset or a JSON file) and its ops are the steps of its fusion
plan (network/plan.py), each forward and backward: on each backend the steps training runs there (conv+ReLU+pool as
one step where the backend has that fused op) and every layer on its own (the unfused plan), so that a fused step
can be set beside the layers it replaces. Their inputs come from running the network (walk.py): for each backend
and plan, a Model (the seeded weights, with biases and BatchNorm shifts made non-zero so that a kernel that drops
them fails) takes one batch of random images forward through its steps in a training pass and a random gradient
back, and the first call of each op is checked against the float64 oracle there; an op that fails is never timed.
That first call is timed on its own and reported as the compile/first-call time; then each passing backend, in
turn, makes one untimed call and its timed repeats in a block, with the thread settings `train` gives it (see
bench_ops); each figure is the median, with min, max and quartiles. A step holding Dropout runs in the walk, but
its mask is random, so no oracle can check it and it is not timed; the backward of steps before the first layer with
parameters is not run, as in training.

A slow backend (BackendInfo.slow, naive) runs on a batch of its own (one image by default), so every comparison
between backends is per image. networks.FLOP_FORMULA gives the operation counts behind GFLOP/s and
walk.BYTES_FORMULA the bytes behind GB/s and arithmetic intensity (the roofline); the machine's two roofs, the peak
of a large float32 matmul through numpy and a streaming memory bandwidth, are measured before and after the ops.
"""

import time

import numpy as np

from numba_cnn.bench.networks import FLOP_FORMULA, bench_network, first_trained_layer, layers_flops
from numba_cnn.bench.walk import (BYTES_FORMULA, DIRECTIONS, RANDOM_STEP_REASON, is_random, is_selected, step_key,
                                  timed_call, walk)
from numba_cnn.errors import NumbaCNNError, check_int_flag
from numba_cnn.kernels import Backend, BackendUnavailable, backend_names, get_backend
from numba_cnn.kernels.reference import FLOAT32_TOL
from numba_cnn.model import init_state
from numba_cnn.network.plan import plan
from numba_cnn.runtime import (SGEMM_SIZE, STREAM_METHOD, STREAM_MIB, default_threads, keep_freed_heap,
                               machine_description, set_threads, sgemm_gflops, stream_gbs)

# OpenBLAS's idle workers spin for 2^28 cycles (its default THREAD_TIMEOUT, a fraction of a second) before sleeping.
BLAS_SETTLE_S = 0.3
DEFAULT_OP_BACKENDS = ("naive", "im2col", "jit")


def _owning_outputs(call, backend):
    """`call` taking its outputs from an arena it releases before each call, as training's Model does: repeated
    calls reuse one set of buffers (the first one allocates them, untimed) and are timed without page faults."""
    if backend.output_arena is None:
        return call
    arena = backend.output_arena()

    def owned():
        arena.release()
        with arena:
            return call()

    return owned


def bench_state(network, seed):
    """Host float32 weights for the bench: init_state's, with every bias and BatchNorm shift drawn from N(0, 0.1)
    (zeros would let a kernel that ignores them pass)."""
    rng = np.random.default_rng([seed, 5])
    state = init_state(network, seed)
    for name, value in state.items():
        if name.endswith((".b", ".beta")):
            state[name] = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
    return state


def _stats(samples):
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return {"median_s": float(median), "min_s": float(min(samples)), "max_s": float(max(samples)),
            "q1_s": float(q1), "q3_s": float(q3)}


def _pin_threads(threads, backend=None):
    return set_threads(default_threads() if threads is None else threads, backend)


def resolve_backend(backend):
    """A backend name or a ready Backend -> (Backend or None, reason it cannot run)."""
    if isinstance(backend, Backend):
        return backend, None
    try:
        return get_backend(backend), None
    except BackendUnavailable as exc:
        return None, str(exc)
    except ValueError as exc:
        raise NumbaCNNError(str(exc)) from None
    except (ImportError, AttributeError, TypeError) as exc:  # a module that fails to import or breaks the contract
        return None, f"cannot load numba_cnn.kernels.{backend}: {exc}"

def bench_ops(backends=DEFAULT_OP_BACKENDS, network=None, layers=None, batch_size=128, naive_batch=1, repeats=7,
              naive_repeats=3, threads=None, seed=0, sgemm_size=SGEMM_SIZE, log=print):
    """Check, then time, the forward and backward of every step of `network` (default: bench_network(), the
    mnist-cnn preset) on every backend (a name from BACKENDS or a Backend object). layers: the names of the layers
    whose steps to time (a fused step counts when one of its layers is named); default all.

    Returns a dict: settings (the network's description included), machine, calibration (sgemm and streaming
    bandwidth before and after), flop and bytes formulas, results (one row per op and backend: status "ok" /
    "FAILED" / "skipped", check errors, the contract kernels the step called, first_call_s, per-call statistics,
    per-image median, GFLOP/s, GB/s and, for backends on the host, share of the sgemm peak), plan_per_image_s
    (each backend's training plan, forward and backward, summed) and speedups (per image).
    """
    for name, value in (("batch_size", batch_size), ("naive_batch", naive_batch), ("repeats", repeats),
                        ("naive_repeats", naive_repeats)):
        check_int_flag(name, value)
    network = bench_network() if network is None else network
    names = [layer.name for layer in network.layers]
    layers = tuple(names) if layers is None else tuple(layers)
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise NumbaCNNError(f"unknown layer {', '.join(unknown)}: the network's layers are {', '.join(names)}")
    threads_record = _pin_threads(threads)
    keep_freed_heap()  # as `train` runs

    resolved, results = [], []
    unfused = [step for step in plan(network, None, fuse=False) if is_selected(step, layers)]
    for backend in backends:
        module, reason = resolve_backend(backend)
        if module is None:
            log(f"skipping {backend}: {reason}")
            results.extend({"op": f"{step.name} {direction}", "step": step.name, "direction": direction,
                            "backend": backend, "status": "skipped", "reason": reason}
                           for step in unfused for direction in DIRECTIONS)
        else:
            resolved.append(module)

    def batch_of(k):
        return naive_batch if k.info.slow else batch_size

    sgemm_before = sgemm_gflops(sgemm_size)
    stream_threads = threads_record["numba_threads"]
    stream_before = stream_gbs(stream_threads)
    log(f"sgemm {sgemm_size}^3 float32 through numpy: {np.median(sgemm_before):.1f} GFLOP/s "
        f"(median of {len(sgemm_before)}), {threads_record['numba_threads']} thread(s); streaming add "
        f"{np.median(stream_before):.1f} GB/s")

    rng = np.random.default_rng(seed)
    most = max((batch_of(k) for k in resolved), default=1)
    images = rng.random((most, *network.input_shape), dtype=np.float32)
    dlogits = rng.standard_normal((most, *network.output_shape)).astype(np.float32)
    state = bench_state(network, seed)
    checked = {}  # (step key, direction) -> {backend name: CheckedOp}
    steps_by_key = {}
    for k in resolved:
        n = batch_of(k)
        # checked under the thread settings it is timed under, where a path depends on them (jit's dense backward
        # takes its two-thread BLAS pair only while BLAS runs one thread), so that the check and the path named
        # are the timed call's
        _pin_threads(threads, k)
        fused_keys = [step_key(step) for step in plan(network, k, fuse=True)]
        for fuse in (True, False):  # the plan training runs, then every layer on its own
            if not fuse and fused_keys == [step_key(step) for step in plan(network, k, fuse=False)]:
                continue  # nothing fused on this backend: the one walk covered every layer
            for op in walk(k, network, fuse, images[:n], dlogits[:n], state, seed, set(layers), log):
                if k.name not in checked.setdefault(op.key, {}):
                    checked[op.key][k.name] = op
                    steps_by_key[op.key] = op.row["step"]
        _pin_threads(threads)
    order = sorted(checked, key=lambda key: (key[0][0], len(key[0]), DIRECTIONS.index(key[1])))

    # Each backend times its repeats in one block, under the thread settings `train` gives it, after a pause and an
    # untimed call: OpenBLAS workers keep spinning for a while after each BLAS call (the oracle's, the sgemm's,
    # im2col's), and interleaved call by call they took the cores a jit kernel needed (jit's conv2 forward ran
    # several times slower that way than in a block of its own).
    by_name = {k.name: k for k in resolved}
    for key in order:
        for k in resolved:
            op = checked[key].get(k.name)
            if op is None or op.call is None:
                continue
            _pin_threads(threads, k)
            time.sleep(BLAS_SETTLE_S)
            call = _owning_outputs(op.call, k)
            timed_call(call, k.synchronize)
            wanted = naive_repeats if k.info.slow else repeats
            op.row["samples_s"] = [timed_call(call, k.synchronize)[0] for _ in range(wanted)]
            log(f"{op.row['op']:<16} {k.name:<8} ok: median {1e3 * float(np.median(op.row['samples_s'])):.3f} ms "
                f"for {op.row['batch']} image(s)")
        _pin_threads(threads)

    sgemm_after = sgemm_gflops(sgemm_size)
    stream_after = stream_gbs(stream_threads)
    peak = float(np.median(sgemm_before + sgemm_after))
    stream_gbs_median = float(np.median(stream_before + stream_after))
    first_trained = first_trained_layer(network)
    for key in order:
        for k in resolved:
            op = checked[key].get(k.name)
            if op is None:
                continue
            row = op.row
            results.append(row)
            if row["status"] != "ok":
                continue
            row.update(_stats(row["samples_s"]))
            row["median_per_image_s"] = row["median_s"] / row["batch"]
            need_dx = key[1] == "fwd" or key[0][0] > first_trained
            flops = layers_flops(network, key[0], key[1], need_dx) * row["batch"]
            row["flops"] = flops or None
            # executed: the multiply-adds the kernels counted (skipped zeros left out), else the dense count
            executed = 2 * row["executed_macs"] if "executed_macs" in row else flops
            row["executed_flops"] = executed or None
            if flops:
                row["gflops"] = flops / row["median_s"] / 1e9
                row["flops_per_byte"] = executed / row["bytes"]
            if executed:
                row["executed_gflops"] = executed / row["median_s"] / 1e9
            row["gbytes_per_s"] = row["bytes"] / row["median_s"] / 1e9
            row["on_host"] = not k.info.on_device
            if flops and row["on_host"]:  # the sgemm peak is the CPU's: no share for a GPU backend
                row["peak_share"] = row["gflops"] / peak
            if executed and row["on_host"]:
                row["executed_peak_share"] = row["executed_gflops"] / peak
            if row["on_host"] and row["writes_memory"]:  # its own roof: FLOPs at the peak or bytes at the bandwidth
                bound_s = max((executed or 0) / (peak * 1e9), row["bytes"] / (stream_gbs_median * 1e9))
                row["roofline_share"] = bound_s / row["median_s"]
    order_of_backend = {name: i for i, name in enumerate(k.name if isinstance(k, Backend) else k for k in backends)}
    op_order = {f"{steps_by_key[key]} {key[1]}": i for i, key in enumerate(order)}
    results.sort(key=lambda r: (op_order.get(r["op"], -1), order_of_backend[r["backend"]]))
    calibration = {"sgemm_size": sgemm_size, "before_gflops": sgemm_before, "after_gflops": sgemm_after,
                   "peak_gflops": peak, "stream_method": STREAM_METHOD.format(mib=STREAM_MIB, threads=stream_threads),
                   "stream_before_gbs": stream_before, "stream_after_gbs": stream_after,
                   "stream_gbs": stream_gbs_median}
    first_calls = {}
    for row in results:
        if "first_call_s" in row:
            first_calls[row["backend"]] = first_calls.get(row["backend"], 0.0) + row["first_call_s"]
    plan_totals = plan_per_image(results, layers == tuple(names))
    untimed = [step.name for step in plan(network, None, fuse=False) if is_random(step)]
    return {
        "kind": "numba_cnn op bench",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"backends": [k.name if isinstance(k, Backend) else k for k in backends],
                     "network": network.to_dict(), "layers": list(layers), "batch_size": batch_size,
                     "naive_batch": naive_batch, "repeats": repeats, "naive_repeats": naive_repeats, "seed": seed,
                     "check_tolerance": FLOAT32_TOL,
                     "oracle": "numba_cnn.kernels.reference (layers.py's numpy code beyond the kernels), float64",
                     "not_timed": {name: RANDOM_STEP_REASON for name in untimed}},
        "machine": machine_description(threads_record),
        "calibration": calibration,
        "flop_formula": FLOP_FORMULA,
        "bytes_formula": BYTES_FORMULA,
        "results": results,
        "first_call_total_s": first_calls,
        "plan_per_image_s": plan_totals,
        "speedups": speedups(results, by_name, plan_totals),
    }


def plan_per_image(results, whole_network):
    """{backend: seconds per image of its training plan, every step forward and backward, summed} for each backend
    whose every op of that plan passed (only when the bench covered the whole network)."""
    if not whole_network:
        return {}
    totals = {}
    for backend in dict.fromkeys(r["backend"] for r in results):
        rows = [r for r in results if r["backend"] == backend and r.get("in_plan")]
        if rows and all(r["status"] == "ok" for r in rows):
            totals[backend] = sum(r["median_per_image_s"] for r in rows)
    return totals


def same_code(row_a, row_b, backend_a, backend_b):
    """Whether an op ran the same code on two backends: no kernel of the contract on either, and the very same
    `layers` functions (or none, as Flatten's reshape)."""
    if row_a["kernels"] or row_b["kernels"]:
        return False
    names = set(row_a["layer_functions"]) | set(row_b["layer_functions"])
    return all(getattr(backend_a.layers, name) is getattr(backend_b.layers, name) for name in names)


def speedups(results, backends, plan_totals):
    """[{op, pair: "jit vs naive", speedup}] from per-image medians, for each op that two backends both passed,
    the later one in registry order first; above 1 means the first is faster. An op that runs the same code on
    both (same_code) is left out: there is no speedup to report, only noise. The op
    "training plan" compares plan_totals: each backend's own plan, fused steps and all."""
    per_image = {(r["op"], r["backend"]): r for r in results if r["status"] == "ok"}
    names = backend_names(include_oracle=True)
    known = [name for name in names if name in backends] + [name for name in backends if name not in names]
    pairs = [(known[j], known[i]) for j in range(len(known)) for i in range(j)]
    out = []
    for op in dict.fromkeys(r["op"] for r in results):
        for fast, slow in pairs:
            a, b = per_image.get((op, fast)), per_image.get((op, slow))
            if a is None or b is None:
                continue
            if same_code(a, b, backends[fast], backends[slow]):
                continue
            out.append({"op": op, "pair": f"{fast} vs {slow}",
                        "speedup": b["median_per_image_s"] / a["median_per_image_s"]})
    for fast, slow in pairs:
        if fast in plan_totals and slow in plan_totals:
            out.append({"op": "training plan", "pair": f"{fast} vs {slow}",
                        "speedup": plan_totals[slow] / plan_totals[fast]})
    return out
