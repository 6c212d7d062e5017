"""The trainer and the CLI: a run's files, exact resume, Ctrl-C, SIGKILL, divergence, the data a run records,
and one-line errors."""

import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from numba_cnn import checkpoint as ckpt
from numba_cnn.data import IDX_NAMES, MNIST
from numba_cnn.train import TrainConfig, train

N_TRAIN, N_TEST = 192, 64


def synthetic_mnist(seed=0):
    """Digits-shaped data whose class is learnable: class k lights a k-dependent block of pixels."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k:2 * k + 6, 4:24] = 255
        return images, labels

    (x_train, y_train), (x_test, y_test) = make(N_TRAIN), make(N_TEST)
    return x_train, y_train, x_test, y_test


def as_float(images):
    return (images[:, None] / np.float32(255)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x_train, y_train, x_test, y_test = synthetic_mnist()
    return (as_float(x_train), y_train), (as_float(x_test), y_test)


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    x_train, y_train, x_test, y_test = synthetic_mnist()
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def quiet(*args, **kwargs):
    pass


def run_cli(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "numba_cnn", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def fresh_user_env(tmp_path):
    """The environment of a new user: an empty HOME, no $NUMBA_CNN_DATA, no $KERAS_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CNN_DATA", "KERAS_HOME")}
    (tmp_path / "home").mkdir(exist_ok=True)
    return dict(env, HOME=str(tmp_path / "home"))


def assert_one_line_error(result, expected):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def write_idx_folder(folder, seed):
    """synthetic_mnist(seed) as the four gzipped IDX files, by their standard names."""
    folder.mkdir(parents=True)
    for name, array in zip(IDX_NAMES.values(), synthetic_mnist(seed)):
        header = (struct.pack(">IIII", 0x803, *array.shape) if array.ndim == 3
                  else struct.pack(">II", 0x801, len(array)))
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return folder


def interrupt_at(step):
    """on_step callback that sends this process a real SIGINT after global step `step` (the trainer's handler)."""

    def on_step(global_step):
        if global_step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


# ---------------------------------------------------------------- a run's files and timing


def test_cli_train_writes_run_folder_and_evaluate_reads_it(npz_path, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--kernels", "im2col", "--data", npz_path, "--epochs", "2", "--batch-size", "32",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    assert "epoch 2/2" in result.stdout and "test acc" in result.stdout and "done: test accuracy" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["backend"] == "im2col" and config["batch_size"] == 32
    assert config["data"]["dataset"] == "mnist" and config["data"]["path"] == str(npz_path)
    assert config["data"]["origin"] == "path" and set(config["data"]["sha256"]) == set(IDX_NAMES.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["epochs"]) == 2
    assert metrics["run"]["warmup_seconds"] > 0
    params, adam_state, meta, _ = ckpt.load_checkpoint(out / "checkpoint.npz")
    assert meta["epoch"] == 2 and meta["step"] == 0 and int(adam_state["iterations"]) == 2 * N_TRAIN // 32
    assert meta["config"]["data"] == config["data"]
    assert not list(out.glob("*.tmp")), "a temporary checkpoint file was left behind"

    result = run_cli("evaluate", out / "checkpoint.npz", "--data", npz_path)
    assert result.returncode == 0, result.stderr
    assert f"data: MNIST (as recorded in the checkpoint), {npz_path} (the data path)" in result.stdout
    assert f"on {N_TEST} images" in result.stdout
    matrix = [line.split()[1:] for line in result.stdout.splitlines()[-10:]]
    assert sum(int(v) for row in matrix for v in row) == N_TEST


def test_epoch_timing_table_covers_every_layer_and_adds_up(data, tmp_path):
    result = train(TrainConfig(backend="im2col", epochs=2, batch_size=32), data, out_dir=tmp_path, log=quiet)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for epoch in metrics["epochs"]:
        rows = {row["layer"]: row for row in epoch["layers"]}
        for layer in ("conv1", "pool1", "conv2", "pool2", "dropout", "dense"):
            assert rows[layer]["forward_ms"] > 0 and rows[layer]["backward_ms"] > 0, layer
        for part in ("data", "loss", "optimizer"):
            assert rows[part]["seconds"] > 0, part
        assert all(row["calls"] == N_TRAIN // 32 for row in epoch["layers"])
        timed = sum(row["seconds"] for row in epoch["layers"])
        # The sections cover everything but the loop's own bookkeeping (progress bar, counters): on these tiny
        # batches that is a few percent of the epoch; on MNIST batches of 128 it is well under one.
        assert 0.80 * epoch["seconds"] <= timed <= epoch["seconds"]
        assert abs(sum(row["share"] for row in epoch["layers"]) - timed / epoch["seconds"]) < 1e-9
    assert result.status == "finished"


def test_training_learns_the_synthetic_task(data, tmp_path):
    result = train(TrainConfig(backend="im2col", epochs=3, batch_size=16), data, out_dir=tmp_path, log=quiet)
    losses = [e["train_loss"] for e in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["test_accuracy"] > 0.8


# ---------------------------------------------------------------- exact resume, Ctrl-C, divergence


def final_params(result):
    return result.model.state_dict()


# The metrics of an epoch that depend on the numbers alone (not on timing or on where a run was resumed).
EXACT_METRICS = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "test_images")


# mnist-cnn's layers with 4 and 8 filters instead of 32 and 64, for naive: its Python loops make mnist-cnn itself
# slow, and exact resume does not depend on the widths
NARROW_CNN = {"name": "narrow-cnn", "layers": [
    {"kind": "Conv2D", "filters": 4, "kernel_size": 3, "activation": "relu"}, {"kind": "MaxPool2D", "pool_size": 2},
    {"kind": "Conv2D", "filters": 8, "kernel_size": 3, "activation": "relu"}, {"kind": "MaxPool2D", "pool_size": 2},
    {"kind": "Flatten"}, {"kind": "Dropout", "rate": 0.5}, {"kind": "Dense", "units": 10, "activation": "softmax"}]}


@pytest.mark.parametrize("kernels, epochs, limit, batch, interrupt_step, network", [
    ("im2col", 2, 96, 32, 4, None),  # mid-epoch 2 of 2
    ("im2col", 2, 96, 32, 3, None),  # at the end of epoch 1
    ("naive", 2, 4, 2, 3, NARROW_CNN),  # mid-epoch 2 of 2, two two-image steps per epoch
    ("jit", 2, 96, 32, 4, None),  # jit's sums run in a fixed order whatever the thread count: exact too
    ("jit", 2, 96, 32, 2, None),  # mid-epoch 1 of 2
], ids=["im2col-mid-epoch-2", "im2col-end-of-epoch-1", "naive-narrow-mid-epoch-2", "jit-mid-epoch-2",
        "jit-mid-epoch-1"])
def test_interrupted_then_resumed_run_matches_uninterrupted_run(data, tmp_path, kernels, epochs, limit, batch,
                                                                interrupt_step, network):
    """Exact resume is a promise on one machine for these backends: straight and interrupted-then-resumed runs end
    with bitwise-identical parameters, Adam moments and step count, RNG states and metrics (README: where
    exactness ends). network None: mnist-cnn."""
    config = dict(backend=kernels, epochs=epochs, batch_size=batch, limit=limit, test_limit=2, network=network)
    straight = train(TrainConfig(**config), data, out_dir=tmp_path / "straight", log=quiet)

    messages = []
    stopped = train(TrainConfig(**config), data, out_dir=tmp_path / "stopped", log=messages.append,
                    on_step=interrupt_at(interrupt_step))
    assert stopped.status == "interrupted" and stopped.exit_code == 130
    assert any("--resume" in m for m in messages)
    _, adam_state, meta, _ = ckpt.load_checkpoint(stopped.checkpoint)
    assert int(adam_state["iterations"]) == interrupt_step

    resumed = train(TrainConfig(**config), data, resume=stopped.checkpoint, log=quiet)
    assert resumed.status == "finished"
    assert [e["epoch"] for e in resumed.history] == list(range(1, epochs + 1))
    a, b = final_params(straight), final_params(resumed)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    (params_a, adam_a, meta_a, _), (params_b, adam_b, meta_b, _) = (ckpt.load_checkpoint(r.checkpoint)
                                                              for r in (straight, resumed))
    assert set(adam_a) == set(adam_b)
    for key in adam_a:
        np.testing.assert_array_equal(adam_a[key], adam_b[key], err_msg=f"adam.{key}")
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name], err_msg=f"checkpoint {name}")
    for key in ("epoch", "step", "order_rng_epoch_start", "dropout_rng", "divergence"):
        assert meta_a[key] == meta_b[key], key
    metrics = [[{k: e[k] for k in EXACT_METRICS} for e in r.history] for r in (straight, resumed)]
    assert metrics[0] == metrics[1]  # == on floats: bitwise


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf images are the point here
def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(data, tmp_path):
    (x_train, y_train), test = data
    poisoned = x_train.copy()

    def poison_after_first_epoch(global_step):  # 3 steps of 32 per epoch with limit 96
        if global_step == 3:
            poisoned[:] = np.inf  # the trainer reads this very array (CPU backends do not copy it)

    messages = []
    result = train(TrainConfig(backend="im2col", epochs=2, batch_size=32, limit=96, checkpoint_every=1),
                   ((poisoned, y_train), test), out_dir=tmp_path, log=messages.append,
                   on_step=poison_after_first_epoch)
    assert result.status == "diverged" and result.exit_code == 3
    assert any("epoch 2, step 1" in m and "loss is nan" in m for m in messages), messages
    params, adam_state, meta, _ = ckpt.load_checkpoint(result.checkpoint)
    assert (meta["epoch"], meta["step"]) == (1, 0) and int(adam_state["iterations"]) == 3
    assert all(np.isfinite(p).all() for p in params.values())


def start_training(npz_path, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "numba_cnn", "train", "--kernels", "im2col", "--data",
                             str(npz_path), "--epochs", "50", "--batch-size", "16", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_ctrl_c_checkpoints_and_exits_130_then_resume_continues(npz_path, tmp_path):
    out = tmp_path / "run"
    proc = start_training(npz_path, out)
    wait_for(out / "checkpoint.npz", proc)  # at least one epoch done
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Resume with: python -m numba_cnn train --resume" in stdout
    _, adam_state, meta, _ = ckpt.load_checkpoint(out / "checkpoint.npz")
    done = int(adam_state["iterations"])
    assert done >= N_TRAIN // 16 and done == meta["epoch"] * (N_TRAIN // 16) + meta["step"]

    result = run_cli("train", "--resume", out / "checkpoint.npz", "--data", npz_path, "--epochs",
                     str(meta["epoch"] + 1), "--kernels", "im2col")
    assert result.returncode == 0, result.stderr
    _, adam_state, meta, _ = ckpt.load_checkpoint(out / "checkpoint.npz")
    assert meta["step"] == 0 and int(adam_state["iterations"]) == meta["epoch"] * (N_TRAIN // 16)


def test_second_ctrl_c_exits_at_once_leaving_checkpoint_whole(npz_path, tmp_path):
    out = tmp_path / "run"
    proc = start_training(npz_path, out)
    wait_for(out / "checkpoint.npz", proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    ckpt.load_checkpoint(out / "checkpoint.npz")  # whichever version is there is complete


def test_sigkill_mid_epoch_leaves_a_checkpoint_that_resumes(npz_path, tmp_path):
    out = tmp_path / "run"
    proc = start_training(npz_path, out, "--checkpoint-every", "1")
    wait_for(out / "checkpoint.npz", proc)
    time.sleep(0.5)  # let it get into the middle of later steps and checkpoint writes
    proc.kill()
    proc.communicate()
    _, adam_state, meta, _ = ckpt.load_checkpoint(out / "checkpoint.npz")
    assert int(adam_state["iterations"]) >= 1
    result = run_cli("train", "--resume", out / "checkpoint.npz", "--data", npz_path, "--epochs",
                     str(meta["epoch"] + 1), "--kernels", "im2col")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout


# ---------------------------------------------------------------- bad input: one line, non-zero exit


def make_bad_checkpoints(tmp_path, good):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a checkpoint at all")
    params, adam_state, meta, _ = ckpt.load_checkpoint(good)
    params["dense.w"] = np.zeros((1600, 12), np.float32)
    other_model = tmp_path / "other_model.npz"
    ckpt.save_checkpoint(other_model, params, adam_state, meta)
    foreign = tmp_path / "foreign.npz"  # right arrays, but no run state to resume from
    ckpt.save_checkpoint(foreign, ckpt.load_checkpoint(good)[0], adam_state, {"config": meta["config"]})
    return {"truncated": truncated, "garbage": garbage, "other_model": other_model, "foreign": foreign}


@pytest.fixture(scope="module")
def good_checkpoint(npz_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    train(TrainConfig(backend="im2col", epochs=1, batch_size=64, limit=64), bad_input_data(npz_path),
          out_dir=out, log=quiet)
    return out / "checkpoint.npz"


def bad_input_data(npz_path):
    with np.load(npz_path) as z:
        return (as_float(z["x_train"]), z["y_train"]), (as_float(z["x_test"]), z["y_test"])


@pytest.mark.parametrize("args, expected", [
    (["train", "--kernels", "cudnn"], "unknown backend 'cudnn'"),
    (["train", "--epochs", "0"], "--epochs must be a positive integer"),
    (["train", "--batch-size", "-4"], "--batch-size must be a positive integer"),
    (["train", "--lr", "0"], "--lr must be a positive number"),
    (["train", "--lr", "nan"], "--lr must be a positive number"),
    (["train", "--limit", "100000"], f"--limit 100000 is larger than the {N_TRAIN} training images"),
    (["train", "--threads", "0"], "--threads must be a positive integer"),
    (["train", "--out", "/proc/numba_cnn_run"], "cannot write to output folder /proc/numba_cnn_run"),
    (["train", "--resume", "{tmp}/missing.npz"], "missing.npz does not exist"),
    (["train", "--resume", "{truncated}"], "truncated or corrupt"),
    (["evaluate", "{garbage}"], "truncated or corrupt"),
    (["train", "--resume", "{foreign}"], "not a numba_cnn training checkpoint"),
    (["evaluate", "{other_model}"], "is damaged: dense.w has shape (1600, 12)"),
    (["train", "--data", "{tmp}/no_such_folder"], "no_such_folder"),
    (["train", "--dataset", "cifar100"], "unknown data set 'cifar100'"),
    (["evaluate", "{good}", "--dataset", "cifar100"], "unknown data set 'cifar100'"),
    (["evaluate", "{good}", "--dataset", "cifar10", "--data", "{tmp}/no_cifar"], "no_cifar"),
])
def test_bad_input_gives_one_line_error_and_exit_2(args, expected, npz_path, good_checkpoint, tmp_path):
    paths = {"tmp": tmp_path, "good": good_checkpoint, **make_bad_checkpoints(tmp_path, good_checkpoint)}
    args = [a.format(**paths) for a in args]
    if "--data" not in args:
        args += ["--data", str(npz_path)]
    if args[0] == "train" and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert_one_line_error(run_cli(*args), expected)


# ---------------------------------------------------------------- the data a run records and finds again


def test_default_data_is_the_shipped_mnist_and_evaluate_finds_it_without_data(tmp_path):
    env = fresh_user_env(tmp_path)
    out = tmp_path / "run"
    result = run_cli("train", "--kernels", "im2col", "--limit", "256", "--batch-size", "64", "--epochs", "1",
                     "--out", out, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (f"data: MNIST (the default), IDX files in {MNIST.shipped} (the copy shipped with numba_cnn)"
            in result.stdout)
    accuracy = result.stdout.split("done: test accuracy ")[1].split()[0]
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["origin"] == "shipped" and config["data"]["sha256"] == MNIST.idx_sha256

    result = run_cli("evaluate", out / "checkpoint.npz", "--test-limit", "256", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "data: MNIST (as recorded in the checkpoint), IDX files in" in result.stdout
    assert f"test accuracy {accuracy} on 256 images" in result.stdout


def test_fashion_mnist_from_a_folder_then_evaluate_names_classes_and_refuses_other_data(tmp_path):
    env = fresh_user_env(tmp_path)
    fashion, other = write_idx_folder(tmp_path / "fashion", 0), write_idx_folder(tmp_path / "other", 1)
    out = tmp_path / "run"
    result = run_cli("train", "--dataset", "fashion-mnist", "--data", fashion, "--kernels", "im2col", "--epochs", "1",
                     "--batch-size", "32", "--out", out, env=env)
    assert result.returncode == 0, result.stderr
    assert f"data: Fashion-MNIST (--dataset), IDX files in {fashion} (the data path)" in result.stdout
    assert json.loads((out / "config.json").read_text())["data"]["dataset"] == "fashion-mnist"
    checkpoint = out / "checkpoint.npz"

    result = run_cli("evaluate", checkpoint, "--data", fashion, env=env)
    assert result.returncode == 0, result.stderr
    assert "data: Fashion-MNIST (as recorded in the checkpoint)" in result.stdout
    rows = result.stdout.splitlines()[-10:]
    assert rows[0].split()[:2] == ["0", "T-shirt/top"] and rows[9].split()[:3] == ["9", "Ankle", "boot"]
    assert sum(int(v) for row in rows for v in row.split()[-10:]) == N_TEST

    assert_one_line_error(run_cli("evaluate", checkpoint, "--data", other, env=env),
                          "is not the data the checkpoint's run read from")
    assert_one_line_error(run_cli("train", "--resume", checkpoint, "--data", other, "--epochs", "2", env=env),
                          "pass --allow-data-mismatch to use it anyway")
    assert_one_line_error(run_cli("evaluate", checkpoint, "--dataset", "mnist", "--data", fashion, env=env),
                          "the checkpoint's run used data set 'fashion-mnist', not 'mnist'")
    result = run_cli("evaluate", checkpoint, "--data", other, "--allow-data-mismatch", env=env)
    assert result.returncode == 0, result.stderr
    assert "warning: " in result.stdout and "differ" in result.stdout


def test_damaged_shipped_mnist_is_one_line_naming_the_file(tmp_path):
    """A copy of the package whose shipped t10k labels have one label changed (a valid file, other content)."""
    package = tmp_path / "site" / "numba_cnn"
    shutil.copytree(Path(ckpt.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
    damaged = package / "datasets" / "mnist" / "t10k-labels-idx1-ubyte.gz"
    for name in IDX_NAMES.values():
        (package / "datasets" / "mnist" / f"{name}.gz").symlink_to(MNIST.shipped / f"{name}.gz")
    content = bytearray(gzip.decompress(damaged.read_bytes()))
    content[8] = (content[8] + 1) % 10
    damaged.unlink()
    damaged.write_bytes(gzip.compress(bytes(content)))
    env = dict(fresh_user_env(tmp_path), PYTHONPATH=str(tmp_path / "site"))
    result = run_cli("train", "--limit", "64", "--epochs", "1", "--out", tmp_path / "run", env=env, cwd=tmp_path)
    assert_one_line_error(result, f"the MNIST copy shipped with numba_cnn is damaged: {damaged}: damaged: the "
                                  "SHA-256 of its content is")


def test_keep_freed_heap_stops_a_step_like_loop_from_faulting():
    """With glibc's malloc told to keep freed memory (runtime.keep_freed_heap, which train and bench call), a loop
    that frees and makes again arrays of a training step's sizes faults no fresh pages after its first rounds."""
    code = textwrap.dedent('''
        import resource, sys
        import numpy as np
        from numba_cnn.runtime import keep_freed_heap
        if not keep_freed_heap():
            print("no glibc"); sys.exit()
        def step():  # four 800 KB arrays, like dropout's y and mask: freed together, the heap's top is trimmed
            arrays = [np.ones(200_000, np.float32) for _ in range(4)]
            del arrays
        for _ in range(5):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            step()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if out == "no glibc":
        pytest.skip("not glibc's malloc")
    assert int(out) < 50, f"{out} page faults in 50 rounds"  # without it: about 750 a round (37,450) here
