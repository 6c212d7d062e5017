"""The op bench's walk: a network run once on a backend, step by step through its fusion plan, each step's first
call checked against the float64 oracle (check-then-time; ops.py times what passes).

Forward, each step takes the output of the one before; backward, the input gradient of the one after: every op gets
what a training step hands it (the ReLU's zeros and pooling's ties, the backend's own caches, channels-last arrays
where the backend keeps them so). The oracle (numba_cnn.kernels.reference, and layers.py's numpy code for what is
not a kernel) runs the composition of the step's layers on float64 copies of the same inputs; a result off by more
than its one tolerance, of the wrong shape or dtype, or an exception marks the op FAILED, and the walk goes on from
the oracle's result. A backward is checked on a fresh standard-normal gradient stored as the one training hands it
(a gradient that came through BatchNorm sums to zero over each channel, which would leave the bias gradient before
it all rounding error), then timed on that one; where the backend's float32 conv output and the oracle's fall on
either side of a ReLU's kink or tie in a max-pool window within rounding, the backend's choice stands in the
oracle's caches (either is right). Steps whose layers the bench was not asked for run on the oracle.
"""

import contextlib
import dataclasses
import time

import numpy as np

from numba_cnn.bench.networks import first_trained_layer
from numba_cnn.kernels import ORACLE, get_backend
from numba_cnn.kernels.contract import op_names
from numba_cnn.kernels.reference import FLOAT32_TOL, relative_error
from numba_cnn.model import Model, Run
from numba_cnn.network.layers import Conv2D, Dropout, ReLU
from numba_cnn.network.plan import ConvReluPool

BYTES_FORMULA = ("bytes moved: the compulsory traffic of the arrays a call takes and returns, each counted once at "
                 "its own item size (views of one buffer once): its input (for a backward, the gradient and the "
                 "forward's cache), the layer's parameters, its output and what it newly caches (argmax, batch "
                 "statistics); re-reads, im2col's unrolled copies and cache misses are not counted, so the real "
                 "traffic is at least this and the arithmetic intensity (FLOPs / bytes) at most what is drawn.")
DIRECTIONS = ("fwd", "bwd")
RANDOM_STEP_REASON = "its dropout mask is random: no oracle can check it, so it is not timed"


def step_key(step):
    """The layer indices a step covers: the same step in two plans (or on two backends) has the same key."""
    return tuple(i for i, _ in step.layers)


def is_random(step):
    return any(isinstance(layer, Dropout) and layer.rate > 0 for _, layer in step.layers)


def is_selected(step, layers):
    """Whether the step is timed: one of its layers is named in `layers` and its result can be checked."""
    return not is_random(step) and any(layer.name in layers for _, layer in step.layers)


def step_arrays(network, step, arrays):
    """{short key: array} of the step's layers out of {"<layer>.<key>": array} (a step holds one such layer)."""
    out = {}
    for i, layer in step.layers:
        out.update(layer.arrays(arrays, network.shapes[i]))
    return out


class Recording:
    """An object seen through a proxy that notes the name of every function taken from it (`called`, in order):
    `names` limits what counts (the contract's ops of a backend), None counts every callable (its `layers`)."""

    def __init__(self, target, names=None):
        self._target, self._names, self.called = target, names, []

    def __getattr__(self, name):
        value = getattr(self._target, name)
        counted = callable(value) if self._names is None else name in self._names
        if counted and name not in self.called:
            self.called.append(name)
        return value


def recording_run(run, backend):
    """run with its ops and layers recorded -> (that run, ops Recording, layers Recording): what a row says the step
    called, the contract's kernels apart from the backend's `layers` code."""
    ops, layers = Recording(backend, set(op_names(backend.info))), Recording(backend.layers)
    return dataclasses.replace(run, ops=ops, layers=layers), ops, layers


def oracle_forward(network, step, state64, x, run):
    """The step as the composition of its layers on the oracle -> (y, [each layer's cache])."""
    caches = []
    for i, layer in step.layers:
        x, cache = layer.forward(run, layer.arrays(state64, network.shapes[i]), x)
        caches.append(cache)
    return x, caches


def oracle_backward(network, step, state64, dy, caches, need_dx, run):
    """The composition's backward -> {"dx" (when need_dx), "d<key>" for each parameter: float64 array}."""
    grads = {}
    for (i, layer), cache in reversed(list(zip(step.layers, caches))):
        dy, layer_grads = layer.backward(run, layer.arrays(state64, network.shapes[i]), dy, cache,
                                         need_dx or i != step.first)
        grads.update({f"d{key}": g for key, g in layer_grads.items()})
    return ({"dx": dy} if need_dx else {}) | grads


def check_outputs(got, expected):
    """A backend's outputs against the oracle's, both {name: host array} -> (passed, {name: error}, reason or
    None): the same names, each of the expected shape, float32, within the oracle's relative_error tolerance."""
    if got.keys() != expected.keys():
        return False, {}, f"returned {', '.join(got) or 'nothing'}, expected {', '.join(expected)}"
    errors = {}
    for name, ref in expected.items():
        g = np.asarray(got[name])
        if g.shape != ref.shape:
            return False, errors, f"{name} has shape {g.shape}, expected {ref.shape}"
        if g.dtype != np.float32:
            return False, errors, f"{name} has dtype {g.dtype}, expected float32"
        errors[name] = err = relative_error(g, ref)
        if not err <= FLOAT32_TOL:
            return False, errors, f"{name}: relative error {err:.3g} > {FLOAT32_TOL:g}"
    return True, errors, None


def _arrays_in(values):
    """The arrays among `values` (nested in tuples, lists and dicts), each once: views of the same memory (a
    reshape, a channels-last view) count as one."""
    seen, found = set(), []

    def visit(v):
        if isinstance(v, (tuple, list)):
            for item in v:
                visit(item)
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)
        elif getattr(v, "ndim", 0) > 0 and hasattr(v, "dtype"):
            key = (v.__array_interface__["data"][0], v.nbytes) if isinstance(v, np.ndarray) else id(v)
            if key not in seen:
                seen.add(key)
                found.append(v)

    visit(values)
    return found


def moved_bytes(*values):
    """BYTES_FORMULA for one call: every array among `values` (its inputs and outputs) once."""
    return int(sum(a.size * np.dtype(a.dtype).itemsize for a in _arrays_in(values)))


def writes_memory(inputs, outputs):
    """Whether a call's outputs include an array that is not a view of its inputs (a reshape writes nothing: its
    bytes are no traffic, and no bandwidth bound applies). Arrays on a device count as written."""
    given = [a for a in _arrays_in(inputs) if isinstance(a, np.ndarray)]
    return any(not isinstance(out, np.ndarray) or not any(np.may_share_memory(out, a) for a in given)
               for out in _arrays_in(outputs))


def random_like(backend, a, rng):
    """Standard-normal values in an array of a's shape, stored as `a` is (channels-last stays so), on the
    backend."""
    host = backend.to_host(a)
    values = np.empty_like(host)  # the same memory order as host
    values[...] = rng.standard_normal(host.shape)
    return backend.to_device(values) if backend.info.on_device else values


def _float64(a):
    return np.asarray(a, dtype=np.float64)


def _relu_output(oracle_caches, step):
    """The array in the oracle's caches of a step that starts with a convolution and its ReLU that holds the ReLU's
    output (the one its backward selects on): the conv's own output where the conv has the ReLU as its activation,
    the ReLU layer's cache where a ReLU layer follows it; None for a step that starts otherwise."""
    layers = [layer for _, layer in step.layers]
    if not isinstance(layers[0], Conv2D):
        return None
    if layers[0].activation == "relu":
        return oracle_caches[0][1]
    if len(layers) > 1 and isinstance(layers[1], ReLU):
        return oracle_caches[1]
    return None


def _adopt_near_tie_winners(oracle_caches, argmax, step):
    """In the oracle's caches of a fused conv + ReLU + max-pool step, the backend's pooling winners (`argmax`) where
    they tie with the oracle's within FLOAT32_TOL of the conv output's largest magnitude: the backend pooled its
    own float32 conv output, and where two values of a window differ by a rounding its winner is as right as the
    oracle's (the gradient goes to one or the other, a difference a backward check must not count). A winner
    further from the window's maximum stays the oracle's, and the check fails on it. The step's layers are a conv
    with its ReLU and the pool, or a conv, a ReLU layer and the pool (whose caches hold the ReLU's output)."""
    relu_y = _relu_output(oracle_caches, step)
    conv_out = oracle_caches[0][1] if relu_y is None else relu_y  # what the pool took
    oracle_argmax = oracle_caches[-1][0]
    kh, kw = step.layers[-1][1].pool_size
    n, k, p, q = oracle_argmax.shape
    windows = conv_out[:, :, :p * kh, :q * kw].reshape(n, k, p, kh, q, kw).transpose(0, 1, 2, 4, 3, 5)
    windows = windows.reshape(n, k, p, q, kh * kw)
    theirs = np.take_along_axis(windows, argmax[..., None].astype(np.intp), axis=-1)[..., 0]
    ours = np.take_along_axis(windows, oracle_argmax[..., None].astype(np.intp), axis=-1)[..., 0]
    scale = np.abs(conv_out).max()
    near = np.abs(theirs - ours) <= FLOAT32_TOL * scale
    oracle_argmax[near] = argmax[near]


def _adopt_near_zero_relu_sides(oracle_caches, y, step):
    """In the oracle's cache of a step that starts with a convolution and its ReLU (alone, or before a pool whose
    backward reads the ReLU'd output `y`), the backend's side of the ReLU's kink where both outputs lie within
    FLOAT32_TOL of the largest one from zero but on different sides: the two sums differ by a rounding there, the
    gradient passes on one side and not on the other, and either is right (the forward's check accepts both). Where
    either output is further from zero, the oracle's side stays, and a wrong one fails the check."""
    oracle_y = _relu_output(oracle_caches, step)
    if oracle_y is None or oracle_y.shape != y.shape:
        return
    limit = FLOAT32_TOL * np.abs(oracle_y).max()
    near = (np.abs(oracle_y) <= limit) & (np.abs(y) <= limit) & ((oracle_y > 0) != (y > 0))
    oracle_y[near] = y[near]


def path_log(backend):
    """A context that records the kernel paths a call takes and the multiply-adds they execute, on a backend that
    reports them (jit's PathLog, which `with` gives); elsewhere a no-op that gives None."""
    log_class = getattr(backend.module, "PathLog", None)
    return log_class() if log_class is not None else contextlib.nullcontext()


def path_record(log):
    """A row's fields from a path_log: {"paths": ["op: path", ...], "executed_macs": n (when a kernel counted any)};
    nothing for a backend that reports no paths."""
    if log is None:
        return {}
    return {"paths": log.paths} | ({"executed_macs": log.executed_macs} if log.executed_macs else {})


def timed_call(call, sync):
    """-> (seconds, what call() returned), waited for with `sync` (a device backend's synchronize) where given."""
    start = time.perf_counter()
    outputs = call()
    if sync is not None:
        sync()
    return time.perf_counter() - start, outputs


@dataclasses.dataclass
class CheckedOp:
    """One op of one backend after its checked first call: its row and, when it passed, the call to time."""

    key: tuple  # (step_key, direction)
    row: dict
    call: object = None


@dataclasses.dataclass
class _Visit:
    """A step in the walk: its arrays, its input and what the backward walk needs of its forward."""

    step: object
    arrays: dict
    x: object
    on_backend: bool  # one of its layers is named: it runs on the backend (else on the oracle)
    checked: bool  # and its result can be checked: its ops get rows
    cache: object = None  # the backend's forward cache; None where the forward did not run there or failed
    oracle_caches: list = None


def walk(backend, network, fuse, images, dlogits, state, seed, layers, log=print):
    """Run `network` once on `backend`, forward from `images` and backward from `dlogits`, step by step through
    its plan (fused or not), each step taking the output (the input gradient) of the one before (after). The steps
    of the layers named in `layers` run on the backend, and the first call of each of their ops is timed and
    checked against the oracle (is_selected); the others run on the oracle, so that a bench of a few layers costs
    the backend those alone. -> [CheckedOp], in plan order, the forwards before the backwards."""
    oracle = get_backend(ORACLE)
    model = Model(backend, params=state, network=network, fuse=fuse)
    arrays = {**model.params, **model.buffers}
    state64 = {name: _float64(value) for name, value in state.items()}
    run = Run(backend, backend.layers, True, backend.make_dropout_rng([seed, 2]))
    oracle_run = Run(oracle, oracle.layers, True, oracle.make_dropout_rng([seed, 2]))
    n, sync = len(images), backend.synchronize
    check_rng = np.random.default_rng([seed, 11])
    checked_ops = []

    def new_row(visit, direction):
        step = visit.step
        return {"op": f"{step.name} {direction}", "step": step.name, "direction": direction,
                "layers": [layer.name for _, layer in step.layers], "backend": backend.name, "batch": n,
                "in_plan": fuse}

    def failed(visit, row, reason, untimed=" (not timed)"):
        row.update(status="FAILED", reason=reason)
        log(f"{row['op']:<16} {backend.name:<8} FAILED: {reason}{untimed}")
        if visit.checked:
            checked_ops.append(CheckedOp((step_key(visit.step), row["direction"]), row))

    def passed(visit, row, first_s, nbytes, writes, call):
        row.update(status="ok", first_call_s=first_s, bytes=nbytes, writes_memory=writes)
        checked_ops.append(CheckedOp((step_key(visit.step), row["direction"]), row, call))

    def on_device(value):
        return backend.to_device(np.asarray(value, dtype=np.float32))

    def oracle_y(visit):
        y, visit.oracle_caches = oracle_forward(network, visit.step, state64, _float64(backend.to_host(visit.x)),
                                                oracle_run)
        return y

    def forward(visit):
        """The step's forward on the backend (checked where visit.checked), else the oracle's -> its output."""
        step, p, x = visit.step, visit.arrays, visit.x
        if not visit.on_backend:
            return on_device(oracle_y(visit))
        row = new_row(visit, "fwd")
        checked_run, ops, functions = recording_run(run, backend)
        try:
            with path_log(backend) as paths:
                first_s, (y, cache) = timed_call(lambda: step.runner.forward(checked_run, p, x), sync)
        except Exception as exc:  # a kernel that raises fails its check; the walk goes on from the oracle's result
            failed(visit, row, f"raised {type(exc).__name__}: {exc}")
            return on_device(oracle_y(visit))
        if not visit.checked:
            visit.cache = cache
            return y
        expected = oracle_y(visit)
        ok, errors, reason = check_outputs({"y": backend.to_host(y)}, {"y": expected})
        row.update(check_errors=errors, kernels=ops.called, layer_functions=functions.called, **path_record(paths))
        if not ok:
            failed(visit, row, reason)
            return on_device(expected)
        visit.cache = cache
        passed(visit, row, first_s, moved_bytes(x, p, y, cache), writes_memory((x, p), (y, cache)),
               lambda: step.runner.forward(run, p, x))
        return y

    def backward(visit, dy, need_dx):
        """The step's backward on the backend (checked where visit.checked), else the oracle's -> its input
        gradient (None without need_dx)."""
        step, p, cache = visit.step, visit.arrays, visit.cache

        def expected(gradient):
            if visit.oracle_caches is None:
                oracle_y(visit)
            if cache is not None and isinstance(step.runner, ConvReluPool):
                _adopt_near_tie_winners(visit.oracle_caches, backend.to_host(cache[2]), step)
            elif isinstance(cache, tuple) and len(cache) == 2 and cache[1] is not None:
                # a conv's (x, y), its ReLU's sides decided by y (a conv without a ReLU keeps no y)
                _adopt_near_zero_relu_sides(visit.oracle_caches, _float64(backend.to_host(cache[1])), step)
            return oracle_backward(network, step, state64, _float64(backend.to_host(gradient)),
                                   visit.oracle_caches, need_dx, oracle_run)

        def from_oracle(grads):
            return on_device(grads["dx"]) if need_dx else None

        if not visit.on_backend:
            return from_oracle(expected(dy))
        row = new_row(visit, "bwd")
        checked_run, ops, functions = recording_run(run, backend)
        if cache is None:
            if visit.checked:
                failed(visit, row, "not run: its forward failed the check", untimed="")
            return from_oracle(expected(dy))
        given = random_like(backend, dy, check_rng) if visit.checked else dy
        try:
            with path_log(backend) as paths:
                first_s, (dx, grads) = timed_call(lambda: step.runner.backward(
                    checked_run, p, given, cache, need_dx), sync)
        except Exception as exc:
            failed(visit, row, f"raised {type(exc).__name__}: {exc}")
            return from_oracle(expected(dy))
        if not visit.checked:
            return dx
        got = ({"dx": dx} if need_dx else {}) | {f"d{key}": g for key, g in grads.items()}
        reference = expected(given)
        ok, errors, reason = check_outputs({name: backend.to_host(a) for name, a in got.items()}, reference)
        row.update(check_errors=errors, kernels=ops.called, layer_functions=functions.called, **path_record(paths))
        if not ok:
            failed(visit, row, reason)
            return from_oracle(expected(dy))

        def call():
            return step.runner.backward(run, p, dy, cache, need_dx)

        passed(visit, row, first_s, moved_bytes(dy, cache, p, tuple(got.values())),
               writes_memory((given, cache, p), tuple(got.values())), call)
        return call()[0]  # the gradient training passes on, from the one it hands this step

    visits, x = [], backend.to_device(images)
    for step in model.steps:
        named = any(layer.name in layers for _, layer in step.layers)
        visit = _Visit(step, step_arrays(network, step, arrays), x, named, is_selected(step, layers))
        visits.append(visit)
        x = forward(visit)
    first_trained = first_trained_layer(network)
    dy = backend.to_device(dlogits)
    for visit in reversed(visits):
        if visit.step.layers[-1][0] < first_trained:
            break  # nothing before the first layer with parameters learns: training runs no backward there
        dy = backward(visit, dy, need_dx=visit.step.first > first_trained)
        visit.oracle_caches = None  # float64 intermediates: not needed any more
    return checked_ops
