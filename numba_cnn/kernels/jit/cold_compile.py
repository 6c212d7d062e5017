"""jit's precompile: on a cold disk cache, training's warm-up compiles the float32 kernels the chosen network's
training step uses, and only those, half in this process and half in a second Python process at once, so that the
two cores compile side by side. The second process's machine code reaches this one through numba's disk cache,
which two processes may fill at once (tests/test_concurrent_cache.py).

How the work splits without a list of kernels per network: the units are the network's own steps (each step's forward
and backward on two tiny images of that step's input shape, its x and dy stored as the training pass hands them over,
x as the step before it recorded its forward's output where that unit has run; the convolutions' steps first, the
most parameters first, since they compile longest and this process starts first; after a fused conv + pool's step,
its backward alone, on stand-ins for its forward's outputs, so that the forward's kernels and the backward's compile
side by side, and so after a conv + ReLU's whose weight gradient takes Winograd's kernel), then the loss and Adam.
Both processes walk them in that order, each taking the next unit neither has claimed, so the work splits as it
comes (a unit's compile time is not known ahead: a step with kernels of its own, like a first layer on the column
tiles, costs several times one that reuses others'); a kernel one of them has compiled by the time the other
reaches it is loaded from the disk cache instead of compiled again. Numba compiles one function at a time in a
process, so this roughly halves a cold start (the figures are in docs/results.md).

Kernels are claimed too: steps share kernels (a VGG's 3x3 layers all run the Winograd kernels), so two units often
need one kernel at the same moment, and both compiling it would waste the longest compiles of all. On a cache miss
(`_ClaimingCache`), the process creates a claim file named by numba's own cache key for that kernel and argument
types; when the other process holds it and has not finished, the unit is put off (`_KernelBusy`): the process gives
up the unit's claim and takes the next free unit. Once that kernel is done, whichever process is free first takes
the unit put off and runs it again, loading from the cache what it compiled. So neither process keeps work the other
could do: a process with no unit left to take waits, polling, until every unit is done, as the other may yet put one
off (units kept by the process that put them off once left the other idle for most of a cold start:
docs/results.md).

Whether the cache is cold: after a precompile, a small record in the cache directory, one per network and tile
setting, names the kernels the network used; the cache counts as warm for that network while every one of them has
an entry on disk (Numba drops an entry whose source changed). With no disk cache to share (NUMBA_CNN_CACHE=0, no
writable location) precompile does nothing and the kernels compile on first call.
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from numba_cnn.kernels._numba_ext import CACHE, TILE_BITS, TILE_REGISTERS
from numba_cnn.kernels.contract import is_channels_last

_PRECOMPILE_TIMEOUT_S = 600
_REINTERRUPT_S = 0.1
_IMAGES = 2
_CLAIM_POLL_S = 0.05


def kernels():
    """{name: dispatcher} of every compiled kernel of the backend (the inlined helpers excluded)."""
    from numba.core.dispatcher import Dispatcher

    from numba_cnn.kernels import _numba_ext
    from numba_cnn.kernels.jit import (columns, general, layers, narrow_input, norm, polyphase, pooled_grad, sparse,
                                       tiles, winograd_grad)

    found = {}
    for module in (tiles, columns, narrow_input, sparse, pooled_grad, general, norm, layers, winograd_grad, polyphase,
                   _numba_ext):
        for name, value in vars(module).items():
            value = getattr(value, "task", value)  # a kernel that run_parts runs as tasks: the task is what compiles
            if isinstance(value, Dispatcher) and value.targetoptions.get("error_model") == "numpy":
                found.setdefault(name, value)
    return found


class _KernelBusy(Exception):
    """The other process is compiling a kernel this unit needs (for the same argument types)."""


class _ClaimingCache:
    """A kernel's numba disk cache as compile_part sees it. On a miss, the kernel (for those argument types) is claimed
    for this process by a file in the folder `claims`, named by numba's cache key and holding this process's id,
    and marked done once its machine code is saved, so that the other process loads it instead of compiling it too.
    While the other process holds the claim and is running, the unit is put off (_KernelBusy); a kernel marked
    done but not in the cache (numba could not save it), or claimed by a process that is gone, compiles here. A miss
    inside another kernel's compile compiles at once: raising there would fail that compile."""

    def __init__(self, cache, claims, state):
        self._cache, self._claims, self._state = cache, claims, state

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def _claim_path(self, sig, target_context):
        key = repr((self._cache._cache_file._index_name, self._cache._index_key(sig, target_context.codegen())))
        return os.path.join(self._claims, "kernel-" + hashlib.sha256(key.encode()).hexdigest()[:32])

    def load_overload(self, sig, target_context):
        found = self._cache.load_overload(sig, target_context)
        if found is not None or self._state["compiling"]:
            return found
        try:
            path = self._claim_path(sig, target_context)
        except Exception:  # numba's private cache API has changed: compile as if unclaimed
            return None
        if _create_claim(path):  # ours: compiled in this process
            self._state["claimed"][id(self), str(sig)] = path
            return None
        if _held_elsewhere(path):
            raise _KernelBusy(path)
        return self._cache.load_overload(sig, target_context)  # None: compiled here (see above)

    def save_overload(self, sig, data):
        self._cache.save_overload(sig, data)
        path = self._state["claimed"].pop((id(self), str(sig)), None)
        if path is not None:
            with open(path + ".done", "w"):
                pass


def _held_elsewhere(path):
    """Whether the kernel claimed by the file `path` is being compiled by another process: not marked done, and the
    process whose id the file holds is running (an empty file counts: its writer is between creating and writing
    it). A claim of this process's own that is not done (its compile failed) is not."""
    if os.path.exists(path + ".done"):
        return False
    try:
        with open(path) as f:
            pid = int(f.read() or -1)
    except (OSError, ValueError):
        return False
    if pid == -1:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # running, as another user
        pass
    return True


@contextlib.contextmanager
def _claiming_caches(claims, state):
    """Every kernel's disk cache behind a _ClaimingCache while the block runs (not a null cache: nothing to share)."""
    from numba.core import event

    class Depth(event.Listener):  # whether a kernel's compile is under way (a miss inside it must not raise)
        def on_start(self, e):
            state["compiling"] += 1

        def on_end(self, e):
            state["compiling"] -= 1

    swapped = []
    for dispatcher in kernels().values():
        cache = dispatcher._cache
        # numba's own loads, with the target's refresh that a compile runs anyway: loads that skip it (_numba_ext.jit)
        # let the second process, loading the first kernels this one compiled, reach the units sooner and take
        # those this process should (the order of compile_part's units), leaving it to wait on the kernels they share
        numbas = getattr(cache, "numbas_own", cache)
        if hasattr(numbas, "_index_key") and hasattr(numbas, "_cache_file"):
            dispatcher._cache = _ClaimingCache(numbas, claims, state)
            swapped.append((dispatcher, cache))
    try:
        with event.install_listener("numba:compile", Depth()):
            yield
    finally:
        for dispatcher, cache in swapped:
            dispatcher._cache = cache


def compile_part(network, part, claims, deadline=None):
    """Compile or load what `network`'s training step uses, unit by unit: each step of its plan (forward and backward
    on two tiny images of that step's input shape), then the loss and Adam. Both parts (0: this process, 1: the
    second) walk the units in one order; a unit is taken by whichever process creates its file in the folder `claims`
    first, so each takes the next free unit when it is done with one, and no unit is compiled twice. A unit that
    needs a kernel the other process is compiling is put off and given up (_ClaimingCache, _run_units). No unit is
    taken after the time.monotonic() `deadline` (default: the precompile's time limit from now)."""
    from threadpoolctl import threadpool_limits

    from numba_cnn.kernels import get_backend
    from numba_cnn.model import Model, Run
    from numba_cnn.network.layers import Dense, Flatten
    from numba_cnn.network.plan import ConvReluPool

    backend = get_backend("jit")
    rng = np.random.default_rng(part)
    model = Model(backend, network=network)
    run = Run(backend, backend.layers, True, backend.make_dropout_rng(0))

    def step_unit(i, dy_layout, stand_in=False):
        step, (_, arrays) = steps[i], model._step_arrays[i]

        def unit():
            layout = x_layout(i)
            x = rng.random((_IMAGES,) + tuple(network.shapes[step.first]), dtype=np.float32)
            if layout == "channels_last":
                x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
            if stand_in:  # the forward's cache: a fused conv + pool's pooled output and argmax (ConvReluPool), a
                # conv + ReLU's output (ConvRelu), stored channels-last as their forwards store them, so that the
                # backward's kernels compile without the forward's
                k, rows, columns = network.shapes[step.layers[-1][0] + 1]
                y = rng.random((_IMAGES, rows, columns, k), dtype=np.float32).transpose(0, 3, 1, 2)
                if fused[i]:
                    argmax = rng.integers(0, 4, (_IMAGES, rows, columns, k), dtype=np.uint8).transpose(0, 3, 1, 2)
                    cache = (x, y, argmax)
                else:
                    cache = (x, y)
            else:
                y, cache = step.runner.forward(run, arrays, x)
                _record_layout(claims, i, "channels_last" if y.ndim == 4 and is_channels_last(y) else "nchw")
            # dy stored as the training pass hands it over, so that the same specialisations compile: channels-last
            # from a fused conv + pool, NCHW from a Flatten (a reshape of a matrix), else as the step's own output
            if dy_layout == "channels_last":
                dy = np.ascontiguousarray(np.ones_like(y).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
            else:
                dy = np.ones(y.shape, y.dtype) if dy_layout == "nchw" else np.ones_like(y)
            # a conv + ReLU's stand-in computes its weight gradient only: the real unit's dx, which it computes
            # after its forward, is another layer's forward kernel
            step.runner.backward(run, arrays, dy, cache, step.first > 0 and (fused[i] or not stand_in))
            if isinstance(step.runner, Dense):
                backend.layers.compile_dense_backward(*arrays["w"].shape)
        return unit

    def loss_and_adam():
        logits = rng.standard_normal((_IMAGES, network.shapes[-1][0]), dtype=np.float32)
        backend.layers.softmax_cross_entropy(logits, np.zeros(_IMAGES, np.int64))
        by_size = sorted(model.params.values(), key=lambda a: a.size)
        for p in (by_size[0], by_size[-1]):  # small arrays are updated serially, large ones on every thread
            backend.layers.adam_update(p.copy(), np.ones_like(p), np.zeros_like(p), np.zeros_like(p), 1e-3, 0.9,
                                       0.999, 1e-7)

    # each unit stores its x and dy as training hands them over, so that no specialisation compiles that training
    # does not call (nor any layout copy): x as the step before stores its output (its unit records how), dy
    # channels-last before a fused conv + pool, whose backward hands its input gradient on so
    steps = model.steps
    fused = [isinstance(step.runner, ConvReluPool) for step in steps]
    stand_ins = _stand_in_steps(model)

    def x_layout(i):
        """"nchw" or "channels_last": how training stores step i's x. NCHW for the network's input; after another
        step, as that step's unit recorded its forward's output, and channels-last while it has not (the fused conv
        + pool, the convolutions' fast paths and batch norm after them store so)."""
        if i == 0 or len(network.shapes[steps[i].first]) != 3:
            return "nchw"
        try:
            return Path(claims, f"layout-{i - 1}").read_text() or "channels_last"
        except OSError:
            return "channels_last"

    def dy_layout(i):
        if i + 1 < len(steps) and fused[i + 1]:
            return "channels_last"
        return "nchw" if i + 1 < len(steps) and isinstance(steps[i + 1].runner, Flatten) else "as_output"

    # after a fused conv + pool's unit, or a conv + ReLU's with a Winograd weight gradient, comes its backward on
    # stand-ins for its forward's outputs, which the other process takes: the forward's kernels (Winograd's the
    # longest of all to compile) and the backward's then compile side by side
    units = []
    for i in _step_order(model):
        units.append(step_unit(i, dy_layout(i)))
        if i in stand_ins:
            units.append(step_unit(i, dy_layout(i), stand_in=True))
    units.append(loss_and_adam)
    state = {"compiling": 0, "claimed": {}}
    # BLAS at one thread, as the backend trains (runtime.set_threads): the dense backward's kernel on two BLAS calls
    # is taken only so, and the second process would otherwise leave it to the training pass after
    with _claiming_caches(claims, state), threadpool_limits(1, user_api="blas"):
        _run_units(units, claims, time.monotonic() + _PRECOMPILE_TIMEOUT_S if deadline is None else deadline)


def _step_order(model):
    """The indices of the model's steps in the order compile_part takes them: the convolutions' steps first, then
    the rest, each the most parameters first. The widest convolutions have the kernels that compile longest (a dense
    layer's, however large, compiles in a fraction of that): this process, which starts while the other is still
    importing, takes the longest unit, and neither is left with a long unit at the end while the other has nothing
    to take."""
    from numba_cnn.network.layers import Conv2D

    sizes = [sum(a.size for a in arrays.values()) for _, arrays in model._step_arrays]
    convolves = [any(isinstance(layer, Conv2D) for _, layer in step.layers) for step in model.steps]
    return sorted(range(len(model.steps)), key=lambda i: (not convolves[i], -sizes[i]))


def _stand_in_steps(model):
    """The steps whose backward compile_part also runs alone, on stand-ins for its forward's outputs: a fused conv +
    pool, and a conv + ReLU whose weight gradient takes Winograd's kernel (the longest of a backward to compile)."""
    from numba_cnn.kernels.jit.winograd_grad import winograd_grad_fits
    from numba_cnn.network.plan import ConvRelu, ConvReluPool

    return {i for i, (step, (_, arrays)) in enumerate(zip(model.steps, model._step_arrays))
            if isinstance(step.runner, ConvReluPool)
            or isinstance(step.runner, ConvRelu) and winograd_grad_fits(arrays["w"].shape, step.runner.conv.strides)}


def _record_layout(claims, i, layout):
    """Record in the folder `claims` how step i's forward stored its output (written whole, then renamed)."""
    with tempfile.NamedTemporaryFile("w", dir=claims, delete=False, suffix=".tmp") as f:
        f.write(layout)
    os.replace(f.name, os.path.join(claims, f"layout-{i}"))


def _run_units(units, claims, deadline):
    """Run the units in order, each one whose claim this process takes in the folder `claims` (`_claim`), until
    every unit is marked done by one process or the other, or the time.monotonic() `deadline` passes. A unit that
    needs a kernel the other process is compiling (_KernelBusy) is put off: what it compiled so far stays in the
    cache, and its claim is given up, so that whichever process is free first once that kernel is done runs it
    again, loading what is compiled. After each unit run the scan starts again from the first, so that the longest
    units (the first) go before the rest as soon as they can. With nothing this process can take, it polls: the other
    process may put off a unit, or finish a kernel one put off here waits for."""
    waits_for = {}  # unit index -> the claim of the kernel it last met busy
    while time.monotonic() < deadline:
        ran = left = False
        for i, unit in enumerate(units):
            path = os.path.join(claims, f"unit-{i}")
            if os.path.exists(path + ".done"):
                continue
            left = True
            if i in waits_for and _held_elsewhere(waits_for[i]) or not _claim(path):
                continue
            try:
                unit()
            except _KernelBusy as busy:
                waits_for[i] = busy.args[0]
                os.unlink(path)
                continue
            with open(path + ".done", "w"):
                pass
            ran = True
            break
        if not left:
            return
        if not ran:
            time.sleep(_CLAIM_POLL_S)


def _create_claim(path):
    """Create the claim file `path`, holding this process's id; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _claim(path):
    """Take the claim file `path` for this process: True if it was free, or held by a process that is gone."""
    if _create_claim(path):
        return True
    if _held_elsewhere(path):
        return False
    with open(path, "w") as f:  # its process ended without finishing it
        f.write(str(os.getpid()))
    return True


def _training_pass(network, count=_IMAGES):
    """A training step and an inference pass of `network` on `count` random images, as training's warm-up makes them
    (after both halves, every kernel loads from the disk cache)."""
    from numba_cnn.kernels import get_backend
    from numba_cnn.model import Model
    from numba_cnn.optim import Adam

    backend = get_backend("jit")
    model = Model(backend, network=network)
    images = np.random.default_rng(0).random((count,) + tuple(network.input_shape), dtype=np.float32)
    model.forward_backward(images, np.zeros(count, np.int64), backend.make_dropout_rng(0))
    Adam(model.params, backend).step(model.grads)
    model.predict(images)


def _record_path(network):
    """Where the record of `network`'s kernels lives: beside numba's cache entries, named by the network's layers
    and input shape and the tile setting (which are part of every kernel's cache key); None without a disk cache."""
    try:
        directory = Path(next(iter(kernels().values()))._cache._cache_path)
    except Exception:  # a null cache (no location) or another numba
        return None
    described = json.dumps({"layers": network.to_dict()["layers"], "input": list(network.input_shape),
                            "tiles": [TILE_BITS, TILE_REGISTERS]}, sort_keys=True)
    return directory / f"numba_cnn-precompiled-{hashlib.sha256(described.encode()).hexdigest()[:16]}.json"


def cache_is_cold(network):
    """True unless a record names the kernels `network` uses and each has an entry in the disk cache (read through
    numba's cache index, a private API: if it has changed, the cache counts as warm)."""
    path = _record_path(network)
    if path is None:
        return False
    try:
        names = json.loads(path.read_text())["kernels"]
        found = kernels()
        return not all(name in found and found[name]._cache._cache_file._load_index() for name in names)
    except (OSError, ValueError, KeyError, TypeError):
        return True
    except Exception:
        return False


def _write_record(network):
    """The record of the kernels the network's step uses: those this process has compiled or loaded, once both
    halves and a whole training pass have run."""
    path = _record_path(network)
    if path is None:
        return
    used = sorted(name for name, d in kernels().items() if d.overloads)
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump({"kernels": used}, f)
        os.replace(f.name, path)
    except OSError:  # a read-only cache: the next run precompiles again, nothing worse
        pass


def compile_cold_cache(network):
    """On a cold disk cache, compile the float32 kernels of `network`'s training step, half in this process and
    half in a second one at once; -> True if it did, False if the cache was warm or not shareable."""
    if not CACHE or not cache_is_cold(network):
        return False
    claims = tempfile.mkdtemp(prefix="numba_cnn-precompile-")
    deadline = time.monotonic() + _PRECOMPILE_TIMEOUT_S  # this process's units and the wait for the other's
    code = ("import json, sys; from numba_cnn.network import from_dict; "
            "from numba_cnn.kernels.jit.cold_compile import compile_part; "
            "compile_part(from_dict(json.loads(sys.stdin.read())), 1, sys.argv[1])")
    try:
        child = subprocess.Popen([sys.executable, "-c", code, claims], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        child.stdin.write(json.dumps(network.to_dict()))
        child.stdin.close()
    except OSError:
        shutil.rmtree(claims, ignore_errors=True)
        return False
    # Ctrl-C kills the child at once and stops this process's half too. The KeyboardInterrupt may land in a compiler
    # callback that swallows it (llvmlite's ctypes callbacks report it as unraisable and go on), so a timer raises it
    # again until it reaches this function's frame; the swallowed ones are not printed
    interrupted = []
    this_frame = sys._getframe()
    jitter = random.Random()  # not the program's own random state

    def stop(signum, frame):
        interrupted.append(signum)
        child.kill()
        signal.setitimer(signal.ITIMER_REAL, _REINTERRUPT_S)
        raise KeyboardInterrupt

    def stop_again(signum, frame):
        if frame is not this_frame:  # still inside the compile: once unwound to here, the finally below runs
            # at uneven intervals, so as not to fall into step with a loop that calls back at a fixed pace
            signal.setitimer(signal.ITIMER_REAL, _REINTERRUPT_S * jitter.uniform(0.5, 1.5))
            raise KeyboardInterrupt

    def quiet_unraisable(unraisable):
        if not (interrupted and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous_hook(unraisable)

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    if in_main_thread:
        previous = signal.signal(signal.SIGINT, stop), signal.signal(signal.SIGALRM, stop_again)
        previous_hook, sys.unraisablehook = sys.unraisablehook, quiet_unraisable
    try:
        compile_part(network, 0, claims, deadline)
        child.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # whatever it did not finish, this process compiles when it first calls it
        pass
    except Exception:
        if not interrupted:
            raise
        # else the compiler's own error after it swallowed the interrupt (a library left without its machine code):
        # the interrupt is what the caller hears of
    finally:
        if in_main_thread:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGALRM, previous[1])
            sys.unraisablehook = previous_hook
        if child.poll() is None:  # timed out, or this process stopped: the child goes too, at once
            child.kill()
            child.wait()
        shutil.rmtree(claims, ignore_errors=True)
    if interrupted:
        raise KeyboardInterrupt
    _training_pass(network)
    _write_record(network)
    return True
