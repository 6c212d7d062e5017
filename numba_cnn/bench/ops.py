"""The op bench: check, then time, every op of the model on every backend.

The ops come from the model's layer table (model.LAYERS), and their inputs from running the model: random images
through Model's training forward pass on im2col, unfused, so pooling inputs carry the ReLU's zeros and ties. For each
op and backend, the first call is checked against the float64 oracle (numba_cnn.kernels.reference; layers.py for
dense) on the same inputs with the oracle's one tolerance; a backend whose result is off, has the wrong shape or
dtype, or raises is marked FAILED and never timed. That first call is timed on its own and reported as the
compile/first-call time; then each passing backend, in turn, makes one untimed call and its timed repeats in a
block, with the thread settings `train` gives it (see bench_ops); each figure is the median, with min, max and
quartiles. Fused ops (conv+ReLU+pool in one call) are timed for the backends that declare them, beside the ops they
replace.
A slow backend (BackendInfo.slow, naive) runs on a batch of its own (one image by default), so every comparison
between backends is per image. Dense is not a kernel of the contract: every CPU backend runs the same numpy code
from layers.py, so its rows differ only by noise and it gets no speedup. FLOP_FORMULA gives the operation counts
behind GFLOP/s and BYTES_FORMULA the bytes behind GB/s and arithmetic intensity (the roofline); the machine's two
roofs, the peak of a large float32 matmul through numpy and a streaming memory bandwidth, are measured before and
after the ops.
"""

import time
from dataclasses import dataclass

import numpy as np

from numba_cnn.errors import NumbaCNNError, check_int_flag
from numba_cnn.kernels import ORACLE, Backend, BackendUnavailable, backend_names, get_backend
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.reference import FLOAT32_TOL, relative_error
from numba_cnn.model import FUSED_CONV_BLOCK, INPUT_SHAPE, LAYERS, Model, conv_output_shape, init_params
from numba_cnn.runtime import (SGEMM_SIZE, STREAM_METHOD, STREAM_MIB, default_threads, keep_freed_heap,
                               machine_description, set_threads, sgemm_gflops, stream_gbs)

FLOP_FORMULA = ("convolution forward 2*N*K*C*R*S*P*Q (one multiply and one add per kernel tap per output pixel); "
                "convolution backward the same count for dW, and again for dX when it is computed (conv2, not "
                "conv1); the bias gradient's N*K*P*Q additions are not counted. Dense forward 2*N*D*M, backward "
                "twice that (dX and dW). Pooling: no FLOPs counted. sgemm peak: 2*n^3 per n x n matmul.")

BYTES_FORMULA = ("bytes moved: the compulsory traffic, counted from the shapes: every input array read once and every "
                 "output written once, 4 bytes per float32 element and 1 per argmax element (uint8); re-reads, "
                 "im2col's unrolled copies and cache misses are not counted, so the real traffic is at least this "
                 "and the arithmetic intensity (FLOPs / bytes) at most what is drawn.")

# OpenBLAS's idle workers spin for 2^28 cycles (its default THREAD_TIMEOUT, about 0.1 s here) before sleeping.
BLAS_SETTLE_S = 0.3
OP_LAYERS = tuple(layer.name for layer in LAYERS if layer.kind != "dropout")
DEFAULT_OP_BACKENDS = ("naive", "im2col", "jit")


def conv_flops(x_shape, w_shape):
    """Multiply-adds of a valid, stride-1 convolution counted as 2 FLOPs: 2*N*K*C*R*S*P*Q."""
    n, c, h, w = x_shape
    k, _, r, s = w_shape
    return 2 * n * k * c * r * s * (h - r + 1) * (w - s + 1)


@dataclass(frozen=True)
class Op:
    """One timed call: `run(backend, *inputs)` returns a tuple of arrays named `outputs`."""

    name: str  # "conv2 bwd"
    layer: str  # the layer the op's time belongs to (a fused op: its convolution's)
    outputs: tuple
    run: object
    flops: object  # inputs -> FLOPs of one call, or None where none are counted
    in_contract: bool = True  # False: layers.py code that every CPU backend shares (no speedup to report)
    fused: str = None  # the FUSED_OPS name a backend must declare to run it; the oracle runs the composition


def moved_bytes(op, inputs, outputs):
    """BYTES_FORMULA for one call: the input arrays (as timed, float32 or uint8 argmax) and the outputs' shapes."""
    read = sum(a.size * a.itemsize for a in inputs if isinstance(a, np.ndarray))
    written = sum(o.size * (1 if name == "argmax" else 4) for name, o in zip(op.outputs, outputs))
    return int(read + written)


def _conv_forward(k, x, w, b):
    return (k.conv2d_forward(x, w, b, relu=True),)


def _conv_backward(k, dy, x, w, need_dx):
    dx, dw, db = k.conv2d_backward(dy, x, w, need_dx=need_dx)
    return (dx, dw, db) if need_dx else (dw, db)


def _pool_forward(k, x):
    return k.maxpool2d_forward(x)


def _pool_backward(k, dy, argmax, x_shape):
    return (k.maxpool2d_backward(dy, argmax, x_shape),)


def _fused_forward(k, x, w, b):
    if k.has_fused(FUSED_CONV_BLOCK):
        return k.conv2d_relu_maxpool2d_forward(x, w, b)
    return k.maxpool2d_forward(k.conv2d_forward(x, w, b, relu=True))  # the composition it stands for


def _fused_backward(k, dy, y, argmax, x, w, need_dx):
    if k.has_fused(FUSED_CONV_BLOCK):
        dx, dw, db = k.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, need_dx)
    else:
        da = k.maxpool2d_backward(k.layers.relu_backward(dy, y), argmax, conv_output_shape(x.shape, w.shape))
        dx, dw, db = k.conv2d_backward(da, x, w, need_dx=need_dx)
    return (dx, dw, db) if need_dx else (dw, db)


def _dense_forward(k, x, w, b):
    return (k.layers.dense_forward(x, w, b),)


def _dense_backward(k, dy, x, w):
    return k.layers.dense_backward(dy, x, w)


def _conv_fwd_flops(x, w, *_):
    return conv_flops(x.shape, w.shape)


def _conv_bwd_flops(dy, x, w, need_dx):
    return (2 if need_dx else 1) * conv_flops(x.shape, w.shape)


def _fused_bwd_flops(dy, y, argmax, x, w, need_dx):
    return _conv_bwd_flops(dy, x, w, need_dx)


def model_ops():
    """The ops of model.LAYERS in the order they run forward: each layer's forward and backward op, and for each
    convolution followed by a pooling layer, the fused op for both. The first convolution's backward computes no
    input gradient (the image needs none), as in Model.backward."""
    ops = []
    for i, layer in enumerate(LAYERS):
        name = layer.name
        if layer.kind == "conv2d_relu":
            grads = ("dw", "db") if i == 0 else ("dx", "dw", "db")
            ops += [Op(f"{name} fwd", name, ("y",), _conv_forward, _conv_fwd_flops),
                    Op(f"{name} bwd", name, grads, _conv_backward, _conv_bwd_flops)]
            pool = LAYERS[i + 1] if i + 1 < len(LAYERS) and LAYERS[i + 1].kind == "maxpool2d" else None
            if pool is not None:
                fused = f"{name}+{pool.name}"
                ops += [Op(f"{fused} fwd", name, ("y", "argmax"), _fused_forward, _conv_fwd_flops,
                           fused=FUSED_CONV_BLOCK),
                        Op(f"{fused} bwd", name, grads, _fused_backward, _fused_bwd_flops, fused=FUSED_CONV_BLOCK)]
        elif layer.kind == "maxpool2d":
            ops += [Op(f"{name} fwd", name, ("y", "argmax"), _pool_forward, lambda x: None),
                    Op(f"{name} bwd", name, ("dx",), _pool_backward, lambda dy, argmax, x_shape: None)]
        elif layer.kind == "dense":
            ops += [Op(f"{name} fwd", name, ("y",), _dense_forward, lambda x, w, b: 2 * x.shape[0] * w.size,
                       in_contract=False),
                    Op(f"{name} bwd", name, ("dx", "dw", "db"), _dense_backward,
                       lambda dy, x, w: 4 * x.shape[0] * w.size, in_contract=False)]
    return ops


def op_inputs(n, seed=0):
    """{op name: float32 inputs} for a batch of n random images, taken from Model's training forward pass (im2col,
    unfused, so every intermediate is kept), with Glorot weights, small random biases (a kernel that drops the bias
    must fail the check) and standard-normal upstream gradients."""
    rng = np.random.default_rng(seed)
    params = init_params(seed)
    for name in params:
        if name.endswith(".b"):
            params[name] = rng.normal(0.0, 0.1, params[name].shape).astype(np.float32)
    model = Model("im2col", params=params, fuse=False)
    model.forward(rng.random((n, *INPUT_SHAPE), dtype=np.float32), dropout_rng=np.random.default_rng(seed))
    acts, p = model.acts, model.params

    def grad(shape):
        return rng.standard_normal(shape).astype(np.float32)

    inputs = {}
    block, block_input = 0, acts.x
    for i, layer in enumerate(LAYERS):
        name = layer.name
        if layer.kind == "conv2d_relu":
            block += 1  # Activations names block n's conv output a<n>, its pooled output h<n>, argmax arg<n>
            a, h, arg = (getattr(acts, f"{field}{block}") for field in ("a", "h", "arg"))
            w, b, need_dx = p[f"{name}.w"], p[f"{name}.b"], i > 0
            inputs[f"{name} fwd"] = (block_input, w, b)
            inputs[f"{name} bwd"] = (grad(a.shape), block_input, w, need_dx)
            pool = LAYERS[i + 1].name
            inputs[f"{pool} fwd"] = (a,)
            inputs[f"{pool} bwd"] = (grad(h.shape), arg, a.shape)
            inputs[f"{name}+{pool} fwd"] = (block_input, w, b)
            inputs[f"{name}+{pool} bwd"] = (grad(h.shape), h, arg, block_input, w, need_dx)
            block_input = h
        elif layer.kind == "dense":
            w = p[f"{name}.w"]
            inputs[f"{name} fwd"] = (acts.flat, w, p[f"{name}.b"])
            inputs[f"{name} bwd"] = (grad((n, w.shape[1])), acts.flat, w)
    return inputs


def _stored_channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def in_training_layout(op, args, channels_last_ids):
    """A fused block op's host inputs stored as a backend that keeps activations channels-last (INFO.channels_last)
    hands them over in training: the pooled output, its argmax and its gradient, and the next block's input,
    channels-last where that backend's own fused forward returned the pooled output so (channels_last_ids: the ids
    of those pooled outputs among the inputs). Other ops, and other inputs, as they are."""
    if op.fused is None:
        return args
    if op.name.endswith(" fwd"):
        x = args[0]
        return ((_stored_channels_last(x) if id(x) in channels_last_ids else x),) + tuple(args[1:])
    dy, y, argmax, x = args[:4]
    if id(y) in channels_last_ids:
        dy, y, argmax = (_stored_channels_last(a) for a in (dy, y, argmax))
    if id(x) in channels_last_ids:
        x = _stored_channels_last(x)
    return (dy, y, argmax, x) + tuple(args[4:])


def model_flops_per_image():
    """-> (training FLOPs, inference FLOPs) of one image, by the FLOP formulas of model_ops: a training step is
    every layer's forward and backward op, inference the forward ops."""
    inputs = op_inputs(1)
    counted = [(op, op.flops(*inputs[op.name])) for op in model_ops() if op.fused is None]
    counted = [(op, flops) for op, flops in counted if flops is not None]
    return sum(f for _, f in counted), sum(f for op, f in counted if op.name.endswith(" fwd"))


def check_outputs(op, got, ref):
    """Compare a backend's outputs with the float64 oracle's -> (passed, {output: error}, reason or None).
    Float outputs: the oracle's relative_error within its float32 tolerance, and the dtype must be float32;
    argmax (uint8): exact equality."""
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
        err = relative_error(g, r)
        errors[name] = err
        if not err <= FLOAT32_TOL:
            return False, errors, f"{name}: relative error {err:.3g} > {FLOAT32_TOL:g}"
    return True, errors, None


def _as_float64(inputs):
    return tuple(a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a
                 for a in inputs)


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
    except ImportError as exc:
        return None, f"cannot import numba_cnn.kernels.{backend}: {exc}"


def _timed_call(op, backend, inputs, sync):
    start = time.perf_counter()
    outputs = op.run(backend, *inputs)
    if sync is not None:
        sync()
    return time.perf_counter() - start, outputs


def bench_ops(backends=DEFAULT_OP_BACKENDS, layers=OP_LAYERS, batch_size=128, naive_batch=1, repeats=7,
              naive_repeats=3, threads=None, seed=0, sgemm_size=SGEMM_SIZE, log=print):
    """Check, then time, every op of `layers` on every backend (a name from BACKENDS or a Backend object).

    Returns a dict: settings, machine, calibration (sgemm before and after), flop_formula, results (one row per
    op and backend: status "ok" / "FAILED" / "skipped", check errors, first_call_s, per-call statistics, per-image
    median, GFLOP/s and, for backends on the host, share of the sgemm peak) and speedups (per image).
    """
    for name, value in (("batch_size", batch_size), ("naive_batch", naive_batch), ("repeats", repeats),
                        ("naive_repeats", naive_repeats)):
        check_int_flag(name, value)
    unknown = [layer for layer in layers if layer not in OP_LAYERS]
    if unknown:
        raise NumbaCNNError(f"unknown op layer {', '.join(unknown)}: choose from {', '.join(OP_LAYERS)}")
    threads_record = _pin_threads(threads)
    keep_freed_heap()  # as `train` runs
    ops = [op for op in model_ops() if op.layer in layers]

    resolved, results = [], []
    for backend in backends:
        module, reason = resolve_backend(backend)
        if module is None:
            log(f"skipping {backend}: {reason}")
            results.extend({"op": op.name, "backend": backend, "status": "skipped", "reason": reason} for op in ops)
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

    inputs = {n: op_inputs(n, seed) for n in sorted({batch_of(k) for k in resolved})}
    oracle = get_backend(ORACLE)
    channels_last_ids = {}  # backend name -> ids of the pooled outputs its fused forward returned channels-last
    for op in ops:
        references = {n: tuple(np.asarray(a) for a in op.run(oracle, *_as_float64(inputs[n][op.name])))
                      for n in inputs}
        timed = []
        for k in resolved:
            if op.fused is not None and not k.has_fused(op.fused):
                continue  # an optional op this backend does not have: its composition is timed op by op
            n = batch_of(k)
            row = {"op": op.name, "backend": k.name, "batch": n}
            results.append(row)
            dev_inputs = tuple(k.to_device(a) if isinstance(a, np.ndarray) else a for a in inputs[n][op.name])
            if k.info.channels_last:  # after to_device, which makes host arrays C-contiguous (the same objects here)
                dev_inputs = in_training_layout(op, dev_inputs, channels_last_ids.setdefault(k.name, set()))
            sync = k.synchronize
            try:
                first_s, outputs = _timed_call(op, k, dev_inputs, sync)
            except Exception as exc:  # a kernel that raises fails its check; the bench goes on with the others
                row.update(status="FAILED", reason=f"raised {type(exc).__name__}: {exc}")
                log(f"{op.name:<10} {k.name:<8} FAILED: {row['reason']}")
                continue
            if k.info.channels_last and op.fused is not None and op.name.endswith(" fwd") and \
                    is_channels_last(outputs[0]):  # later ops take this pooled output channels-last, as in training
                channels_last_ids[k.name].add(id(inputs[n][op.name[:-len("fwd")] + "bwd"][1]))
            host = tuple(k.to_host(a) for a in outputs if a is not None)
            passed, errors, reason = check_outputs(op, host, references[n])
            row["check_errors"] = errors
            if not passed:
                row.update(status="FAILED", reason=reason)
                log(f"{op.name:<10} {k.name:<8} FAILED: {reason} (not timed)")
                continue
            row.update(status="ok", first_call_s=first_s, samples_s=[])
            timed.append((k, row, dev_inputs, sync, naive_repeats if k.info.slow else repeats))
        # Each backend times its repeats in one block, under the thread settings `train` gives it, after a pause
        # and an untimed call: OpenBLAS workers keep spinning for a while after each BLAS call (the oracle's, the
        # sgemm's, im2col's), and interleaved call by call they took the cores a jit kernel needed (jit conv2
        # forward measured 13-16 ms that way, 3.5 ms in a block of its own).
        for k, row, dev_inputs, sync, wanted in timed:
            _pin_threads(threads, k)
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
            row["bytes"] = moved_bytes(op, inputs[row["batch"]][op.name], references[row["batch"]])
            row["gbytes_per_s"] = row["bytes"] / row["median_s"] / 1e9
            if flops is not None:
                row["flops_per_byte"] = flops / row["bytes"]
            row["on_host"] = not k.info.on_device
            log(f"{op.name:<10} {k.name:<8} ok: median {1e3 * row['median_s']:.3f} ms for {row['batch']} image(s)")

    sgemm_after = sgemm_gflops(sgemm_size)
    stream_after = stream_gbs(stream_threads)
    order = {name: i for i, name in enumerate(k.name if isinstance(k, Backend) else k for k in backends)}
    results.sort(key=lambda row: ([op.name for op in ops].index(row["op"]), order[row["backend"]]))
    peak = float(np.median(sgemm_before + sgemm_after))
    for row in results:
        if "gflops" in row and row["on_host"]:  # the sgemm peak is the CPU's: no share for a GPU backend
            row["peak_share"] = row["gflops"] / peak
    calibration = {"sgemm_size": sgemm_size, "before_gflops": sgemm_before, "after_gflops": sgemm_after,
                   "peak_gflops": peak, "stream_method": STREAM_METHOD.format(mib=STREAM_MIB, threads=stream_threads),
                   "stream_before_gbs": stream_before, "stream_after_gbs": stream_after,
                   "stream_gbs": float(np.median(stream_before + stream_after))}
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
                     "check_tolerance": FLOAT32_TOL, "oracle": "numba_cnn.kernels.reference (layers.py for dense), float64"},
        "machine": machine_description(threads_record),
        "calibration": calibration,
        "flop_formula": FLOP_FORMULA,
        "bytes_formula": BYTES_FORMULA,
        "results": results,
        "first_call_total_s": first_calls,
        "speedups": speedups(results, ops),
    }


def speedups(results, ops):
    """[{op, pair: "jit vs naive", speedup}] from per-image medians, for each contract op and each pair of
    backends that both passed it, the later one in registry order first; above 1 means the first is faster."""
    per_image = {(r["op"], r["backend"]): r["median_per_image_s"] for r in results if r["status"] == "ok"}
    contract_ops = {op.name for op in ops if op.in_contract}
    names = backend_names()
    pairs = [(names[j], names[i]) for j in range(len(names)) for i in range(j)]
    out = []
    for op in (name for name in dict.fromkeys(r["op"] for r in results) if name in contract_ops):
        for fast, slow in pairs:
            if (op, fast) in per_image and (op, slow) in per_image:
                out.append({"op": op, "pair": f"{fast} vs {slow}",
                            "speedup": per_image[(op, slow)] / per_image[(op, fast)]})
    return out
