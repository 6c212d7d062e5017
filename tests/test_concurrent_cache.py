"""Two processes compiling the jit kernels into the same empty Numba cache at the same moment (two training runs
started together on a fresh machine) must both succeed with correct results: Numba writes each cache entry to a
temporary file and renames it into place, so a reader sees a whole entry or none (and then compiles itself).

Each process imports the jit backend, waits for a shared start time so that both compile at once, then runs the
forward ops (convolution with ReLU, pooling) and compares them with the float64 oracle. About 20 s on 2 cores
(two compiles side by side).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

CODE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from numba_cnn.kernels import jit, reference

    time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # both processes start compiling together
    rng = np.random.default_rng(int(sys.argv[2]))
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    y = jit.conv2d_forward(x, w, b, True, 1, (0, 0, 0, 0))
    reference.assert_close(y, reference.conv2d_forward(x, w, b, True, 1, (0, 0, 0, 0)), np.float32, "conv forward")
    pooled, argmax = jit.maxpool2d_forward(y, (2, 2))
    want = reference.maxpool2d_forward(y, (2, 2))
    np.testing.assert_array_equal(pooled, want[0])
    np.testing.assert_array_equal(argmax, want[1])
    print("OK")
""")

PROCESSES = 2


def test_two_processes_compile_into_one_empty_cache_at_once(tmp_path):
    cache = tmp_path / "numba-cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMBA_CNN_CACHE="1")
    start_at = time.time() + 5  # after both have imported numba and numba_cnn (1-3 s each here)
    procs = [subprocess.Popen([sys.executable, "-c", CODE, str(start_at), str(seed)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(PROCESSES)]
    results = [proc.communicate(timeout=600) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0 and stdout.strip() == "OK", stderr[-4000:]
    assert any(cache.rglob("*.nbi")), "nothing was cached"


PRECOMPILE = textwrap.dedent("""
    import json
    from numba_cnn.kernels import jit
    from numba_cnn.kernels.jit.cold_compile import _record_path, compile_part, kernels
    from numba_cnn.model import default_network
    network = default_network()
    print(jit.precompile(network))
    found = kernels()
    used = json.loads(_record_path(network).read_text())["kernels"]
    # every kernel the network used has an entry on disk (an index lists what has been saved for it)
    print(len(used), *sorted(name for name in used if not found[name]._cache._cache_file._load_index()))
    print(",".join(used))
    import sys
    from numba_cnn.kernels.jit.cold_compile import _training_pass
    _training_pass(network)  # warm: every kernel loaded from the cache
    print("numba.np.linalg" in sys.modules)  # imported by numba's refresh before a compile, not by a cache load
    import tempfile
    for part in (0, 1):  # each half in a folder of claims of its own: all the units, loaded from the cache
        compile_part(network, part, tempfile.mkdtemp())
    print(sum(sum(found[name].stats.cache_misses.values()) for name in used))
""")


def test_precompile_fills_a_cold_cache_from_two_processes_and_skips_a_warm_one(tmp_path):
    """On an empty cache precompile(network) compiles the kernels of the network's training step, the units of work
    shared between this process and a second one; afterwards each kernel has an entry in the disk cache and the
    record names them, but none of another network's (BatchNorm, strided convolution, average pooling); a fresh
    process loads them all from there (no compile, so none of the modules numba imports only to compile) and
    precompile() does nothing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), NUMBA_CNN_CACHE="1")
    runs = [subprocess.run([sys.executable, "-c", PRECOMPILE], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    cold, warm = (run.stdout.splitlines() for run in runs)
    assert cold[0] == "True"  # it ran, on the empty cache (the misses then count this process's own compiles)
    used = int(cold[1].split()[0])
    assert used >= 8 and cold[1] == str(used), f"kernels with no cache entry after precompile: {cold[1]}"
    names = cold[2].split(",")
    assert {"_one_channel_pool", "_pooled_weight_grad_3x3", "_winograd_wide", "_dropout", "_adam_update",
            "_listed_input_grad"} <= set(names)
    assert not {"_batchnorm_apply", "_strided_forward", "_avgpool_forward", "_maxpool_any_forward",
                "_conv1_pool"} & set(names)
    assert cold[3] == "True"
    # warm: nothing to do, none of numba's compile-only modules imported by a training pass's loads, and every
    # kernel loaded from the cache
    assert warm == ["False", str(used), cold[2], "False", "0"]


def test_interrupting_precompile_stops_the_second_process_too(tmp_path):
    """Ctrl-C during a cold precompile: the process stops at once and takes the compiling child with it."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), NUMBA_CNN_CACHE="1")
    code = "import os, sys; from numba_cnn.kernels import jit; print(os.getpid(), flush=True); jit.precompile()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pid = int(proc.stdout.readline())
    time.sleep(4)  # both compiling by now
    children = _children(pid)
    assert children, "no second process was started"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    time.sleep(0.5)
    assert not [c for c in children if os.path.exists(f"/proc/{c}")], "the compiling child outlived its parent"


SWALLOWING_COMPILE = textwrap.dedent("""
    import ctypes, ctypes.util, os, sys, time
    from numba_cnn.kernels.jit import cold_compile

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    compare_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

    @compare_type
    def slow_compare(a, b):  # a Python callback under C, as llvmlite's: an exception raised in it is swallowed
        time.sleep(0.05)
        return 0

    def compile_part(network, part, claims, deadline):  # most of its time inside the callback, some in Python
        values = (ctypes.c_int * 2)()
        while True:
            libc.qsort(values, 2, ctypes.sizeof(ctypes.c_int), slow_compare)
            until = time.perf_counter() + 0.01
            while time.perf_counter() < until:
                pass

    cold_compile.compile_part = compile_part
    from numba_cnn.model import default_network
    print(os.getpid(), flush=True)
    try:
        cold_compile.compile_cold_cache(default_network())
    except KeyboardInterrupt:
        print("interrupted", flush=True)
""")


def test_an_interrupt_a_compiler_callback_swallows_still_stops_precompile(tmp_path):
    """A Ctrl-C that lands in a Python callback under C (where llvmlite's compiler swallows it) is raised again until
    it stops the precompile: the process ends with KeyboardInterrupt and prints none of the swallowed ones."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), NUMBA_CNN_CACHE="1")
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWING_COMPILE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    int(proc.stdout.readline())
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out.strip()) == (0, "interrupted"), err[-4000:]
    assert "Exception ignored" not in err, err[-4000:]


def _children(pid):
    """The processes whose parent is pid, from /proc (Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ...
        except (OSError, IndexError):  # not a process, or gone meanwhile
            continue
        if fields[1] == str(pid):
            found.append(int(entry))
    return found


@pytest.mark.parametrize("model, shape, expected", [("mnist-cnn", (1, 28, 28), {0, 1}),
                                                     ("vgg-small", (3, 16, 16), {1, 2, 3}),
                                                     ("lenet5", (1, 28, 28), set())])
def test_fused_conv_pools_and_winograd_weight_gradients_get_a_backward_unit_of_their_own(model, shape, expected):
    """The steps whose backward runs again alone on stand-ins: mnist-cnn's two fused conv + pools; vgg-small's
    fused ones and its plain 3x3 conv + ReLU of 32 input channels (a Winograd weight gradient), not its first
    layer (3 input channels: not Winograd's); lenet5 has neither (5x5 layers fused with average pools)."""
    from numba_cnn.kernels import get_backend
    from numba_cnn.kernels.jit.cold_compile import _stand_in_steps
    from numba_cnn.model import Model
    from numba_cnn.network import build, resolve_description

    doc, _ = resolve_description(model)
    assert _stand_in_steps(Model(get_backend("jit"), network=build(doc["layers"], shape))) == expected


@pytest.mark.parametrize("model, shape, expected", [
    ("lenet5", (1, 28, 28), ["conv2+avgpool2", "conv1+avgpool1", "dense1", "dense2", "dense3", "flatten1"]),
    ("vgg-small", (3, 16, 16), ["conv4+pool2", "conv3", "conv2+pool1", "conv1", "dense1", "dense2", "flatten1",
                                "dropout1"])])
def test_the_convolutions_steps_are_compiled_first_the_widest_first(model, shape, expected):
    """compile_part's order of the steps: the convolutions' first, the most parameters first, then the rest so
    (lenet5's dense layers have over 20 times its convolutions' parameters and compile in a fraction of their time)."""
    from numba_cnn.kernels import get_backend
    from numba_cnn.kernels.jit.cold_compile import _step_order
    from numba_cnn.model import Model
    from numba_cnn.network import build, resolve_description

    doc, _ = resolve_description(model)
    built = Model(get_backend("jit"), network=build(doc["layers"], shape))
    assert [built.steps[i].name for i in _step_order(built)] == expected


def test_a_unit_claimed_by_the_other_process_is_left_to_it(tmp_path):
    """compile_part runs a unit only if it takes the unit's claim file: with every unit done by the other process, it
    runs no kernel; with none taken, it claims every unit (the network's steps, a backward on stand-ins after each
    step _stand_in_steps names, then the loss and Adam) and marks each done."""
    from numba_cnn.kernels.jit.cold_compile import compile_part, kernels
    from numba_cnn.model import default_network

    network = default_network()
    # at most two units per layer (one per step, and its backward on stand-ins), and the loss with Adam
    units = 2 * len(network.layers) + 1
    taken = tmp_path / "taken"
    taken.mkdir()
    for i in range(units):
        (taken / f"unit-{i}").touch()
        (taken / f"unit-{i}.done").touch()
    calls = {name: (dict(d.stats.cache_hits), dict(d.stats.cache_misses), len(d.overloads))
             for name, d in kernels().items()}
    compile_part(network, 1, str(taken))
    assert calls == {name: (dict(d.stats.cache_hits), dict(d.stats.cache_misses), len(d.overloads))
                     for name, d in kernels().items()}
    free = tmp_path / "free"
    free.mkdir()
    compile_part(network, 0, str(free))
    claimed = sorted((p.name for p in free.iterdir() if p.name.startswith("unit-") and "." not in p.name),
                     key=lambda name: int(name.split("-")[1]))  # not the kernels' claims
    assert claimed == [f"unit-{i}" for i in range(len(claimed))] and len(claimed) <= units
    assert all((free / f"{name}.done").exists() and (free / name).read_text() == str(os.getpid())
               for name in claimed)


SPECIALISATIONS = textwrap.dedent("""
    import json, sys, tempfile
    from numba_cnn.kernels.jit import cold_compile
    from numba_cnn.network import build, resolve_description
    doc, _ = resolve_description(sys.argv[1])
    network = build(doc["layers"], tuple(int(v) for v in sys.argv[2].split(",")))
    kernels = cold_compile.kernels()
    made = []
    for action in sys.argv[3:]:
        if action == "units":  # every unit, in this process (a folder of no claims)
            cold_compile.compile_part(network, 0, tempfile.mkdtemp())
        else:
            cold_compile._training_pass(network, count=int(action))
        made.append(sorted(name + str(sig) for name, d in kernels.items() for sig in d.overloads))
    print(json.dumps(made))
""")


def _specialisations(model, shape, *actions):
    """The kernels, with their argument types, a fresh process has made (compiled or loaded from the cache) after
    each action in turn: "units", every unit of the precompile's compile_part; a number, the precompile's training
    pass on that many images."""
    run = subprocess.run([sys.executable, "-c", SPECIALISATIONS, model, ",".join(map(str, shape)), *actions],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return [set(made) for made in json.loads(run.stdout.splitlines()[-1])]


def test_the_precompiles_two_image_pass_calls_every_kernel_a_full_batch_calls():
    """The precompile compiles what its pass on two images calls: a training step and an inference pass on a batch
    of 64 must call no other kernel, nor one with other argument types, or that kernel would compile inside the
    first timed epoch (a path chosen by the batch size). LeNet-5: 5x5 convolutions, average pools, wide dense
    layers."""
    two, then_64 = _specialisations("lenet5", (1, 28, 28), "2", "64")
    assert len(two) >= 8 and then_64 == two, f"made for a batch of 64 only: {sorted(then_64 - two)}"


@pytest.mark.parametrize("model, shape", [("mnist-cnn", (1, 28, 28)), ("lenet5", (1, 28, 28)),
                                          ("vgg-small", (3, 16, 16)), ("vgg-small-bn", (3, 16, 16))])
def test_the_precompiles_units_call_every_kernel_the_training_pass_calls(model, shape):
    """Each unit hands its step x and dy stored as training would (x as the step before recorded its forward's
    output, channels-last where it has not yet; dy channels-last before a fused conv + pool, NCHW from a Flatten),
    so the units make every specialisation the training pass then calls (none compiles in the one process after
    the two have finished) and none it does not call. The units in one process, in their order, the training pass
    in another. mnist-cnn: the fused conv + pool before a Flatten; lenet5: 5x5 layers fused with average pools;
    vgg-small: fused and plain 3x3 layers side by side; vgg-small-bn: batch norm after each convolution. (A 5x5
    stride-2 layer after a one-channel 5x5 one, as in docs/networks.md's three-conv, gets a channels-last x where
    training hands it NCHW: the guess, made before the first layer's unit has run.) A first process fills the
    cache, so that the two compared load every kernel from it: a kernel compiled in a process also makes there the
    specialisations of the kernels it calls, which one loaded from the cache does not. The units make one kernel
    more where a dense layer takes BLAS's two gemms at a full batch (jit/layers.py: compile_dense_backward)."""
    _specialisations(model, shape, "units", "2")
    (units,) = _specialisations(model, shape, "units")
    (training,) = _specialisations(model, shape, "2")
    assert len(training) >= 8
    assert training <= units, f"made by the training pass only: {sorted(training - units)}"
    # beyond it, only the dense backward's two gemms side by side (and the launcher's specialisation for them), which
    # a layer takes from a batch its products reach DENSE_BLAS_PAIR_MIN_MACS at, never at two images
    gemms = {made for made in units - training if made.startswith("_dense_backward_gemms(")}
    launcher = {made for made in units - training if made.startswith("_launch_parts(")
                and "Tuple((int64, int64, bool, Array(float32, 2, 'C'" in made}
    assert units - training - gemms - launcher == set(), f"made by the units only: {sorted(units - training)}"
    assert len(launcher) == len(gemms) <= 1


class _DiskCache:
    """A stand-in for numba's per-kernel disk cache: entries in a dict both "processes" see, and the two private
    names the claims read (the index file's name and the index key of a signature)."""

    def __init__(self):
        self.entries = {}
        self._cache_file = types.SimpleNamespace(_index_name="kernel.nbi")

    def _index_key(self, sig, codegen):
        return sig, "target"

    def load_overload(self, sig, target_context):
        return self.entries.get(sig)

    def save_overload(self, sig, data):
        self.entries[sig] = data


_TARGET = types.SimpleNamespace(codegen=lambda: None)


def _claiming(disk, claims, compiling=0):
    from numba_cnn.kernels.jit.cold_compile import _ClaimingCache

    return _ClaimingCache(disk, str(claims), {"compiling": compiling, "claimed": {}})


def test_a_kernel_is_compiled_by_the_process_that_claims_it_and_loaded_by_the_other(tmp_path):
    """A miss claims the kernel (a file holding this process's id) and compiles it here; once saved, the claim is
    marked done and the other process loads the entry; other argument types are claimed apart."""
    disk = _DiskCache()
    ours = _claiming(disk, tmp_path)
    assert ours.load_overload("f32", _TARGET) is None  # compile here
    (claim,) = tmp_path.iterdir()
    assert claim.read_text() == str(os.getpid())
    ours.save_overload("f32", "machine code")
    assert (tmp_path / (claim.name + ".done")).exists()
    assert _claiming(disk, tmp_path).load_overload("f32", _TARGET) == "machine code"
    assert ours.load_overload("f64", _TARGET) is None
    assert len([p for p in tmp_path.iterdir() if not p.name.endswith(".done")]) == 2


def test_a_kernel_the_other_process_is_compiling_puts_the_unit_off(tmp_path):
    """Claimed by another running process and not done: _KernelBusy; once the claim is marked done, the entry loads;
    a claim whose process is gone, or of this process's own that never finished, compiles here; a miss inside another
    kernel's compile compiles at once, claiming nothing."""
    from numba_cnn.kernels.jit.cold_compile import _KernelBusy

    disk = _DiskCache()
    assert _claiming(disk, tmp_path).load_overload("f32", _TARGET) is None
    (claim,) = tmp_path.iterdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim.write_text(str(other.pid))
        with pytest.raises(_KernelBusy):
            _claiming(disk, tmp_path).load_overload("f32", _TARGET)
        disk.save_overload("f32", "machine code")
        (tmp_path / (claim.name + ".done")).touch()
        assert _claiming(disk, tmp_path).load_overload("f32", _TARGET) == "machine code"
    finally:
        other.kill()
        other.wait()
    assert _claiming(disk, tmp_path).load_overload("i64", _TARGET) is None
    gone = [p for p in tmp_path.iterdir() if p != claim and not p.name.endswith(".done")][0]
    gone.write_text(str(other.pid))  # a finished process's claim, never done
    assert _claiming(disk, tmp_path).load_overload("i64", _TARGET) is None
    gone.write_text(str(os.getpid()))
    assert _claiming(disk, tmp_path).load_overload("i64", _TARGET) is None
    before = set(tmp_path.iterdir())
    assert _claiming(disk, tmp_path, compiling=1).load_overload("u8", _TARGET) is None
    assert set(tmp_path.iterdir()) == before


def test_a_unit_put_off_is_given_up_and_runs_once_its_kernel_is_done(tmp_path):
    """_run_units: a unit the other (running) process has claimed is left to it, and waited for until marked done;
    one that meets a kernel the other process holds is put off and its claim given up, so that the other may take
    it; it runs again once that kernel is marked done, before the units after it; with no unit free, the process
    polls until every unit is done. A unit claimed by a process that is gone is taken."""
    import threading

    from numba_cnn.kernels.jit.cold_compile import _KernelBusy, _run_units

    log = []
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        claims = {name: tmp_path / f"kernel-{name}" for name in "ac"}
        for claim in claims.values():
            claim.write_text(str(other.pid))
        busy = {"a": 1, "c": 1}  # how many more times each unit meets its kernel busy

        def unit(name):
            def run():
                if busy.get(name, 0):
                    busy[name] -= 1
                    log.append(name + " busy")
                    if name == "c":
                        assert not (tmp_path / "unit-0").exists()  # a's claim was given up
                        (tmp_path / "kernel-a.done").touch()  # meanwhile the other process is done with a's kernel
                    raise _KernelBusy(str(claims[name]))
                log.append(name)
            return run

        (tmp_path / "unit-1").write_text(str(other.pid))  # the other process runs b
        (tmp_path / "unit-4").write_text(str(gone.pid))  # e: claimed by a process that ended without finishing it

        def other_finishes():
            time.sleep(0.3)
            (tmp_path / "kernel-c.done").touch()
            (tmp_path / "unit-1.done").touch()

        finishing = threading.Thread(target=other_finishes)
        started = time.perf_counter()
        finishing.start()
        _run_units([unit(name) for name in "abcde"], str(tmp_path), time.monotonic() + 60)
        finishing.join()
    finally:
        other.kill()
        other.wait()
    assert log == ["a busy", "c busy", "d", "a", "e", "c"]
    assert time.perf_counter() - started >= 0.25
    assert all((tmp_path / f"unit-{i}.done").exists() for i in range(5))
    assert (tmp_path / "unit-4").read_text() == str(os.getpid())


def test_the_units_stop_at_the_deadline(tmp_path):
    """_run_units returns at its deadline even while the other process still holds a unit."""
    from numba_cnn.kernels.jit.cold_compile import _run_units

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "unit-0").write_text(str(other.pid))
        started = time.perf_counter()
        _run_units([lambda: None], str(tmp_path), time.monotonic() + 0.3)
        assert 0.25 <= time.perf_counter() - started < 10
    finally:
        other.kill()
        other.wait()
    assert not (tmp_path / "unit-0.done").exists()
