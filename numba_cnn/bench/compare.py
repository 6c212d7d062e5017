"""Training comparison (`bench --compare`): our backends against PyTorch and Keras, on the same network, the same
initial weights and the same batches.

The network is the one `--model` names (bench/networks.py); each contender builds it from its description, the
baselines through numba_cnn.interop with numba_cnn's own initial weights (model.init_state with the run's seed).
Each contender (our backends, each PyTorch setting, Keras on each backend) trains in a subprocess of its own, so its
high-water mark (`peak_rss_mb`) is that contender's peak memory (and that peak less the memory held once the data is
loaded, before any framework or Numba is imported, its own), on the same batches (one seeded order), batch size and
thread count, every one holding the images as uint8 and scaling each batch; contenders take turns round after round
and each figure is the median over rounds, with its spread. PyTorch's figure is its best setting in the same run,
and the "fastest framework" is the best of all baselines on each metric. After a few warm-up steps (reported apart,
with the imports and compilation), `--steps` steps are timed and extrapolated to an epoch of the training set, or
`--epochs` full epochs are trained and timed; then the test images are classified, giving images/second and
accuracy.
"""

import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from numba_cnn.bench import baselines
from numba_cnn.bench.networks import bench_network, first_trained_layer, flops_per_image, layers_flops
from numba_cnn.bench.ops import resolve_backend
from numba_cnn.errors import NumbaCNNError, check_int_flag
from numba_cnn.kernels import BACKENDS, get_backend
from numba_cnn.model import Model
from numba_cnn.network import from_dict
from numba_cnn.optim import Adam
from numba_cnn.runtime import (default_threads, keep_freed_heap, machine_description, set_blas_threads, set_threads,
                               sgemm_gflops, usable_cpus)

TRAIN_IMAGES = 60_000  # --random-data's sizes: MNIST's
TEST_IMAGES = 10_000


class NumbaCNNContender:
    """Our model on one backend with the contender interface of baselines.py (train_step, predict)."""

    def __init__(self, backend, network, seed=0):
        import numba

        from numba_cnn import __version__

        self.version = f"numba_cnn {__version__} ({backend} backend), numba {numba.__version__}"
        self.backend = get_backend(backend)
        self.model = Model(self.backend, seed=seed, network=network)
        self.optimizer = Adam(self.model.params, self.backend)
        self.dropout_rng = self.backend.make_dropout_rng([seed, 2])

    def train_step(self, x, y):
        # x may be raw uint8 pixels, scaled here a batch at a time, exactly as numba_cnn.train does
        to_device, as_float = self.backend.to_device, self.backend.as_float_images
        loss, _ = self.model.forward_backward(as_float(to_device(x)), to_device(y), self.dropout_rng)
        self.optimizer.step(self.model.grads)
        return loss

    def predict(self, x):
        return self.model.predict(self.backend.as_float_images(self.backend.to_device(x)))

    def executed_flops_per_image(self, x, y):
        """FLOPs one training image costs as executed: 2 per multiply-add the kernels of each step reported (a
        backend's PathLog), the dense count for steps that report none; None when the backend reports nothing.
        One untimed forward and backward (no update), buffers restored, the training's dropout stream untouched."""
        log_class = getattr(self.backend.module, "PathLog", None)
        if log_class is None:
            return None
        model, network = self.model, self.model.network
        saved = {name: a.copy() for name, a in model.buffers.items()}  # a training pass moves BatchNorm's statistics
        per_section = {}

        class Sections:  # the Model's timer interface: one log per step and direction
            @contextlib.contextmanager
            def section(self, name, direction):
                with log_class() as log:
                    yield
                per_section[(name, direction)] = log.calls

        timer, model.timer = model.timer, Sections()
        try:
            as_float = self.backend.as_float_images
            model.forward_backward(as_float(self.backend.to_device(x)), self.backend.to_device(y),
                                   self.backend.make_dropout_rng([0, 9]))
        finally:
            model.timer = timer
            for name, a in model.buffers.items():
                a[...] = saved[name]
        first = first_trained_layer(network)
        flops = 0
        for step in model.steps:
            indices = [i for i, _ in step.layers]
            for direction, name in (("fwd", "forward"), ("bwd", "backward")):
                if direction == "bwd" and step.layers[-1][0] < first:
                    continue
                calls = per_section.get((step.name, name), [])
                macs = sum(m for _, _, m in calls)
                dense = layers_flops(network, indices, direction, need_dx=step.first > first) * len(x)
                flops += 2 * macs if macs else dense
        return flops / len(x)


def peak_rss_mb():
    """This process's peak resident memory so far, in MB: Linux's VmHWM, the high-water mark of this process's own
    memory. Not ru_maxrss where VmHWM is there: Linux carries ru_maxrss over an exec, so a contender's process
    would start from its parent's resident memory when it forked (the bench's own, with Numba loaded), above what
    a small network's process holds once its data is loaded."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_data(network, dataset=None, data=None, random_data=False, seed=0, limit=None):
    """-> (((x_train, y_train), (x_test, y_test)) with uint8 images and int64 labels, where they came from): the
    data set (numba_cnn.data.load_dataset; default MNIST), which must have the network's input shape and classes,
    or random pixels of that shape and labels, in MNIST's numbers, when random_data is set (for timing only; the
    accuracy means nothing). limit: keep only the first `limit` training and test images."""
    classes = network.output_shape[0]
    if random_data:
        rng = np.random.default_rng([seed, 7])
        sizes = (min(TRAIN_IMAGES, limit or TRAIN_IMAGES), min(TEST_IMAGES, limit or TEST_IMAGES))
        return tuple((rng.integers(0, 256, (n, *network.input_shape), dtype=np.uint8),
                      rng.integers(0, classes, n, dtype=np.int64)) for n in sizes), "random"
    from numba_cnn.data import load_dataset

    loaded = load_dataset(dataset or "mnist", data, normalize=False)
    shape, found = tuple(loaded[0][0].shape[1:]), len(loaded.dataset.class_names)
    if shape != tuple(network.input_shape) or found != classes:
        raise NumbaCNNError(f"the network takes {list(network.input_shape)} images into {classes} classes, "
                            f"{loaded.dataset.title} has {list(shape)} images in {found} classes: choose the "
                            f"data with --dataset or the network's input with --input-shape")
    return tuple((x[:limit], y[:limit].astype(np.int64)) for x, y in loaded), str(loaded.source)


def _is_baseline(name):
    return baselines.family(name) in ("torch", "keras")


def _make_contender(name, network, seed, threads):
    if _is_baseline(name):
        return baselines.make_baseline(name, network, seed, threads)
    return NumbaCNNContender(name, network, seed=seed)


def _set_contender_threads(name, threads):
    """The thread settings of `train --backend name` for our backends; BLAS's alone for a framework, whose process
    never imports Numba (set_blas_threads says why) and which sets its own threads -> the thread count."""
    if _is_baseline(name):
        threads = usable_cpus() if threads is None else threads
        set_blas_threads(threads)
    else:
        threads = default_threads() if threads is None else threads
        set_threads(threads, get_backend(name))
    return threads


def _prepare(name, network):
    """What `train --backend name` does before its first epoch: the backend's precompile (jit: on a cold disk
    cache, its kernels compiled in two processes), then a training step and an inference pass on two images (the
    rest compiled or loaded) -> {"prepare_s", "compiled"} (compiled: the precompile found the cache cold)."""
    backend = get_backend(name)
    start = time.perf_counter()
    compiled = bool(backend.precompile(network)) if backend.precompile is not None else False
    contender = NumbaCNNContender(name, network)
    x = np.zeros((2, *network.input_shape), np.uint8)
    contender.train_step(x, np.zeros(2, np.int64))
    contender.predict(x)
    return {"contender": name, "prepare_s": time.perf_counter() - start, "compiled": compiled}


def run_contender(name, network, steps=50, warmup_steps=3, batch_size=128, threads=None, epochs=0, seed=0,
                  dataset=None, data=None, random_data=False, limit=None, prepare_only=False):
    """Train and evaluate one contender in this process -> dict of its figures. network: the description
    (Network.to_dict(), input shape included). Meant for a fresh process (compare_training starts one per
    contender), so that peak_rss_mb is this contender's alone. prepare_only: only compile or load what the
    contender runs (`_prepare`), so that no timed round pays for a compile or measures its memory."""
    network = from_dict(network)
    keep_freed_heap()  # every contender, frameworks too, with the malloc settings `train` uses
    if prepare_only:
        _set_contender_threads(name, threads)
        return _prepare(name, network)
    # Every contender holds uint8 pixels and scales each batch, as numba_cnn.train does: peak memory then
    # compares the frameworks, not the data format. The data comes before any framework (Numba included) is
    # imported, so that what a contender adds to the memory after it (own_memory_mb) is its own.
    ((x_train, y_train), (x_test, y_test)), source = load_data(network, dataset, data, random_data, seed, limit)
    out = {"contender": name, "data_source": source, "epoch_images": len(x_train), "test_images": len(x_test),
           "rss_after_data_mb": peak_rss_mb()}
    threads = _set_contender_threads(name, threads)

    start = time.perf_counter()
    contender = _make_contender(name, network, seed, threads)
    out["version"] = contender.version
    # Warm-up batches come from an order of their own, so the measured steps (or epochs) see the same batches
    # whatever the warm-up length.
    warm_batches = baselines.batch_stream(len(x_train), batch_size, np.random.default_rng([seed, 3]))
    if warmup_steps:
        baselines.train_steps(contender, x_train, y_train, warm_batches, warmup_steps)
    contender.predict(x_test[:batch_size])
    out["warmup_s"] = time.perf_counter() - start
    executed = getattr(contender, "executed_flops_per_image", None)
    if executed is not None:
        first = next(warm_batches)
        out["executed_flops_per_image"] = executed(x_train[first], y_train[first])

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
    out["own_memory_mb"] = out["peak_rss_mb"] - out["rss_after_data_mb"]
    out["numba_loaded"] = "numba" in sys.modules
    out["load_average_1min"] = os.getloadavg()[0]
    return out


def _run_in_subprocess(spec, threads):
    """Run one contender in a fresh interpreter (python -m numba_cnn.bench SPEC.json) -> its result dict.
    A NumbaCNNError there (bad data path, missing package) is raised here with the same message."""
    env = dict(os.environ)
    # The child imports this very package, wherever the parent found it (an uninstalled checkout included).
    package_root = str(Path(__file__).resolve().parents[2])
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


def compare_training(contenders=("jit", "im2col", "torch", "keras"), network=None, steps=50, warmup_steps=3,
                     batch_size=128, threads=None, rounds=3, epochs=0, seed=0, dataset=None, data=None,
                     random_data=False, limit=None, profile=False, log=print):
    """Train `network` (a Network; default bench_network(), mnist-cnn) as each contender (our backend names; "torch" for its eager settings or "torch:<variant>"; "keras" for
    Keras on its default backend or "keras:<backend>") in its own subprocess, `rounds` times in turn -> dict with
    per-contender medians over rounds and their spread (peak memory: the largest), every run, and ratios to
    PyTorch's best setting and to the fastest framework, metric by metric.

    With epochs=0, `steps` timed steps after `warmup_steps` warm-up steps, extrapolated to a 60,000-image epoch;
    with epochs > 0, that many full epochs, timed (their median), and the test accuracy that results.
    dataset, data: the data set and where it is (numba_cnn.data.load_dataset; default MNIST); random_data: random
    images of the network's input shape instead. limit: train and test on the first `limit` images only (quick
    checks; an epoch is then `limit` images).
    profile: each subprocess writes a pyinstrument profile of its run into profiles/.
    """
    for name, value, least in (("steps", steps, 1), ("warmup_steps", warmup_steps, 0), ("rounds", rounds, 1),
                               ("batch_size", batch_size, 1), ("epochs", epochs, 0), ("limit", limit or 1, 1)):
        check_int_flag(name, value, least)
    threads = default_threads() if threads is None else threads
    threads_record = set_threads(threads)  # here, so a bad --threads is refused before any training
    network = bench_network() if network is None else network
    names = []
    for name in contenders:
        if name in BACKENDS:
            backend, _ = resolve_backend(name)
            if backend is not None and backend.info.slow:
                raise NumbaCNNError(f"{name} is too slow to train (seconds per image): leave it out of --compare's "
                                    f"backends")
            names.append(name)
        elif name in baselines.baseline_names():
            names.extend(baselines.expand(name))
        else:
            raise NumbaCNNError(f"unknown contender {name!r}: choose from {', '.join(BACKENDS)}, "
                                f"{', '.join(baselines.baseline_names())}")
    entries, runnable = {}, []
    for name in dict.fromkeys(names):
        if _is_baseline(name):
            missing = baselines.missing_packages(name)
            reason = f"{', '.join(missing)} not installed; {baselines.INSTALL_HINT}" if missing else None
        else:
            reason = resolve_backend(name)[1]
        entries[name] = {"contender": name, "runs": []}
        if reason:
            entries[name].update(status="skipped", reason=reason)
            log(f"skipping {name}: {reason}")
        else:
            runnable.append(name)
    # our compiled backends get their kernels ready first, as `train` does before its first epoch: a cold disk
    # cache's compile would otherwise land in round 1, its warm-up and its peak memory
    for name in runnable:
        if _is_baseline(name) or get_backend(name).precompile is None:
            continue
        spec = dict(name=name, network=network.to_dict(), threads=threads, profile=False, prepare_only=True)
        prepared = _run_in_subprocess(spec, threads)
        if "error" in prepared:
            log(f"{name}: getting its kernels ready FAILED {prepared['error']}")
            continue
        entries[name]["prepare"] = prepared
        log(f"{name}: kernels {'compiled (the disk cache was cold)' if prepared['compiled'] else 'ready'} in "
            f"{prepared['prepare_s']:.1f} s before the rounds")
    sgemm_before = sgemm_gflops()
    for round_number in range(1, rounds + 1):
        for name in runnable:
            spec = dict(name=name, network=network.to_dict(), steps=steps, warmup_steps=warmup_steps,
                        batch_size=batch_size, threads=threads, epochs=epochs, seed=seed, dataset=dataset,
                        data=data, random_data=random_data, limit=limit, profile=profile)
            run = _run_in_subprocess(spec, threads)
            run["round"] = round_number
            entries[name]["runs"].append(run)
            if "error" in run:
                log(f"round {round_number}/{rounds} {name}: FAILED {run['error']}")
            else:
                log(f"round {round_number}/{rounds} {name}: {run['sec_per_epoch']:.2f} s/epoch, "
                    f"{run['inference_img_per_s']:.0f} img/s inference, {run['peak_rss_mb']:.0f} MB peak, "
                    f"warm-up {run['warmup_s']:.1f} s")
    set_threads(threads)
    sgemm_after = sgemm_gflops()
    peak = float(np.median(sgemm_before + sgemm_after))
    train_flops, _ = flops_per_image(network)
    for entry in entries.values():
        if "status" in entry:
            continue
        good = [run for run in entry["runs"] if "error" not in run]
        if not good:
            entry.update(status="FAILED", reason=entry["runs"][0]["error"])
            continue
        seconds = [r["sec_per_epoch"] for r in good]
        rates = [r["inference_img_per_s"] for r in good]
        entry.update(status="ok", sec_per_epoch=float(np.median(seconds)), sec_per_epoch_range=[min(seconds), max(seconds)],
                     inference_img_per_s=float(np.median(rates)), inference_img_per_s_range=[min(rates), max(rates)],
                     peak_rss_mb=max(r["peak_rss_mb"] for r in good),
                     rss_after_data_mb=max(r["rss_after_data_mb"] for r in good),
                     own_memory_mb=max(r["own_memory_mb"] for r in good),
                     warmup_s=[r["warmup_s"] for r in good], test_accuracy=good[-1]["test_accuracy"],
                     version=good[0]["version"], baseline=_is_baseline(entry["contender"]))
        entry["gflops"] = train_flops * good[0]["epoch_images"] / entry["sec_per_epoch"] / 1e9
        entry["peak_share"] = entry["gflops"] / peak
        if good[0].get("executed_flops_per_image"):
            entry["executed_flops_per_image"] = good[0]["executed_flops_per_image"]
            entry["executed_gflops"] = (entry["executed_flops_per_image"] * good[0]["epoch_images"]
                                        / entry["sec_per_epoch"] / 1e9)
            entry["executed_peak_share"] = entry["executed_gflops"] / peak
    _add_ratios(list(entries.values()))
    sources = {run["data_source"] for entry in entries.values() for run in entry["runs"] if "data_source" in run}
    epoch_images = next((run["epoch_images"] for entry in entries.values() for run in entry["runs"]
                         if "epoch_images" in run), min(TRAIN_IMAGES, limit or TRAIN_IMAGES))
    measure = (f"median of {epochs} full epoch(s) of {epoch_images:,} images" if epochs
               else f"extrapolated from {steps} steps to an epoch of {epoch_images:,} images")
    return {
        "kind": "numba_cnn training comparison",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"contenders": list(contenders), "runs": list(entries), "network": network.to_dict(),
                     "steps": steps,
                     "warmup_steps": warmup_steps, "batch_size": batch_size, "threads": threads, "rounds": rounds,
                     "epochs": epochs, "seed": seed,
                     "dataset": "random" if random_data else dataset or "mnist",
                     "data": ", ".join(sorted(sources)) or ("random" if random_data else data or "default"),
                     "limit": limit, "measure": measure},
        "machine": machine_description(threads_record),
        "calibration": {"sgemm_before_gflops": sgemm_before, "sgemm_after_gflops": sgemm_after, "peak_gflops": peak,
                        "training_flops_per_image": train_flops},
        "contenders": list(entries.values()),
    }


# per metric: the key and whether more is better
RATIO_METRICS = (("sec_per_epoch", False), ("inference_img_per_s", True), ("peak_rss_mb", False),
                 ("own_memory_mb", False))


def _add_ratios(entries):
    """For every finished entry, each metric divided by PyTorch's best setting's (vs_torch_best) and by the best
    framework's (vs_fastest_framework), metric by metric; the best settings are named in `torch_best` and
    `fastest_framework`."""
    ok = [e for e in entries if e["status"] == "ok"]
    groups = {"vs_torch_best": [e for e in ok if baselines.family(e["contender"]) == "torch"],
              "vs_fastest_framework": [e for e in ok if e["baseline"]]}
    for key, group in groups.items():
        if not group:
            continue
        best = {metric: (max if more else min)(group, key=lambda e, m=metric: e[m]) for metric, more in RATIO_METRICS}
        # a tiny run can add nothing to the memory the data load left (own_memory_mb 0): no ratio to that
        metrics = [metric for metric, _ in RATIO_METRICS if best[metric][metric] > 0]
        for entry in ok:
            entry[key] = {metric: entry[metric] / best[metric][metric] for metric in metrics}
            entry[key + "_names"] = {metric: best[metric]["contender"] for metric in metrics}
