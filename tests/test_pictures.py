"""Pictures and reporting of training: the run's PNG, `report` over several runs, evaluate's grid of misclassified
images, the progress line's speed and ETA, and the note before a run out of proportion."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from numba_cnn import report
from numba_cnn.__main__ import main
from numba_cnn.console import Progress, format_clock
from numba_cnn.data import CIFAR10, FASHION_MNIST
from numba_cnn.estimate import LONG_RUN_S, SUGGESTED_RUN_S, RunSize, format_duration, long_run_note, run_seconds
from numba_cnn.plots import plot_misclassified
from numba_cnn.train import TrainConfig, train

from pictures import assert_png
from test_train_cli import data, quiet, run_cli, synthetic_mnist  # noqa: F401 (data: the fixture)


@pytest.fixture(scope="module")
def two_runs(data, tmp_path_factory):
    """Two short im2col runs (seeds 0 and 1) in their own folders, with the log of the first."""
    root = tmp_path_factory.mktemp("runs")
    lines = []
    for seed in (0, 1):
        train(TrainConfig(backend="im2col", epochs=2, batch_size=64, seed=seed), data, out_dir=root / f"seed{seed}",
              log=lines.append if seed == 0 else quiet)
    return root / "seed0", root / "seed1", lines


def test_a_training_run_draws_its_png_in_its_folder(two_runs):
    first, _, lines = two_runs
    assert_png(first / report.RUN_PNG, min_width=1000, min_height=700)
    assert f"picture: {first / report.RUN_PNG}" in lines
    assert lines.index(f"picture: {first / report.RUN_PNG}") < len(lines) - 1, "said before the closing line"


def test_report_prints_the_runs_table_and_draws_them_on_one_figure(two_runs, tmp_path, capsys):
    first, second, _ = two_runs
    out = tmp_path / "both.png"
    assert main(["report", str(first), str(second / "checkpoint.npz"), "--out", str(out)]) == 0
    assert_png(out, min_width=1000, min_height=700)
    text = capsys.readouterr().out
    table, shares = text.split("share of training time per layer (%)")
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith("seed")}
    assert set(rows) == {"seed0", "seed1"}
    assert {line.split()[0] for line in shares.splitlines() if line.startswith("seed")} == {"seed0", "seed1"}
    metrics = json.loads((first / "metrics.json").read_text())
    last = metrics["epochs"][-1]
    assert rows["seed0"][1:4] == ["im2col", "?", "0"] and f"{last['test_accuracy']:.4f}" in rows["seed0"]
    assert f"written: {out}" in text


def test_report_names_a_folder_that_holds_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a run folder: it has no config.json" in capsys.readouterr().err


def test_evaluate_draws_the_misclassified_images(two_runs, tmp_path):
    x_train, y_train, x_test, y_test = synthetic_mnist()  # the data the runs trained on
    npz = tmp_path / "mnist.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    grid = tmp_path / "wrong.png"
    result = run_cli("evaluate", two_runs[0] / "checkpoint.npz", "--data", npz, "--misclassified", grid)
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.split("test accuracy ")[1].split()[0])
    wrong = round((1 - accuracy) * len(y_test))
    assert wrong > 0, "two short epochs should leave some of the test images wrong, or there is no grid to check"
    assert f"written: {grid} ({min(wrong, 36)} of the {wrong} misclassified images)" in result.stdout
    assert_png(grid, min_width=600, min_height=200)


def test_misclassified_grid_names_fashion_classes_and_draws_none_wrong(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8)
    labels = np.arange(50) % 10
    assert plot_misclassified(images, labels, (labels + 1) % 10, FASHION_MNIST.class_names,
                              tmp_path / "fashion.png") == (36, 50)
    assert_png(tmp_path / "fashion.png", min_width=600, min_height=600)
    assert plot_misclassified(images, labels, labels, FASHION_MNIST.class_names, tmp_path / "none.png") == (0, 0)
    assert_png(tmp_path / "none.png", min_width=300, min_height=100, min_bytes=2000)  # its title only


def coloured_pixels(path):
    """How many pixels of the PNG at path are neither white, black nor grey."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(np.count_nonzero((rgb.max(axis=2) - rgb.min(axis=2)) > 8))


def test_misclassified_grid_draws_channels_first_images_grey_or_in_colour(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.arange(8) % 10
    colour = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    assert plot_misclassified(colour, labels, (labels + 3) % 10, CIFAR10.class_names, tmp_path / "rgb.png") == (8, 8)
    assert_png(tmp_path / "rgb.png", min_width=600, min_height=200)
    assert coloured_pixels(tmp_path / "rgb.png") > 8 * 32 * 32
    grey = rng.random((8, 1, 28, 28), dtype=np.float32)  # scaled pixels, as the trainer holds them
    assert plot_misclassified(grey, labels, (labels + 1) % 10, FASHION_MNIST.class_names, tmp_path / "grey.png") \
        == (8, 8)
    assert coloured_pixels(tmp_path / "grey.png") == 0


# ---------------------------------------------------------------- the progress line


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_shows_images_per_second_time_left_and_the_layer():
    stream = Terminal()
    progress = Progress(4, "epoch 1/1", stream=stream)
    progress.start -= 2.0  # two seconds into the epoch when the first step ends
    progress.update(1, 0.5, 0.75, images=100)
    progress.set_phase("conv2", "backward")
    progress.last_draw = 0.0
    progress.update(2, 0.4, 0.8, images=100)
    line = stream.getvalue().split("\r")[-1]
    assert "epoch 1/1 [############............] 2/4 loss 0.4000 acc 0.8000" in line
    rate = float(line.split(" img/s")[0].split()[-1])
    assert 90 <= rate <= 100  # 200 images in a little over 2 s
    assert "| ETA 0:02 | conv2 backward" in line  # two steps left at about a second each
    progress.update(4, 0.3, 0.9, images=100)
    assert stream.getvalue().endswith("| 0:02\x1b[K\n") and "ETA" not in stream.getvalue().split("\r")[-1]


def test_progress_without_a_terminal_prints_speed_and_eta_each_tenth():
    stream = io.StringIO()
    progress = Progress(10, "epoch 2/3", stream=stream)
    for step in range(1, 11):
        progress.update(step, 0.1, 0.9, images=32)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and " img/s | ETA " in lines[0] and " img/s | 0:00" in lines[-1]


def test_format_clock_and_duration():
    assert (format_clock(42), format_clock(83), format_clock(3725)) == ("0:42", "1:23", "1:02:05")
    assert (format_duration(42), format_duration(420), format_duration(3 * 3600 + 720),
            format_duration(2 * 86400 + 3 * 3600)) == ("42 s", "7 min", "3 h 12 min", "2 d 3 h")


# ---------------------------------------------------------------- the note before a long run


def never_measured():
    raise AssertionError("the warm-up put the run under the bound: nothing more to time")


def test_a_run_under_the_bound_says_nothing_and_times_nothing_more():
    size = RunSize(60000, 10000, 5, test_limited=False)
    assert long_run_note(size, "jit", LONG_RUN_S / 2 / (5 * 70000), never_measured) is None


def test_a_compile_heavy_warm_up_is_timed_again_before_anything_is_said():
    size = RunSize(60000, 10000, 5, test_limited=False)
    # 20 s of compiling over two images screens as days; the compiled pass says 50 us per image: nothing to say
    assert long_run_note(size, "jit", 10.0, lambda: (50e-6, 20e-6)) is None


@pytest.mark.parametrize("test_images, test_limited, flags", [
    (10000, False, "--limit {n}"),  # --limit N: N training and N test images
    (10000, True, "--limit {n} --test-limit {n}"),  # 10000 test images alone take 50 min: both flags
    (50, True, "--limit {n}"),  # 50 test images leave room: --limit alone
])
def test_a_long_run_says_its_length_and_the_flags_for_about_five_minutes(test_images, test_limited, flags):
    size = RunSize(60000, test_images, 5, test_limited=test_limited)
    train_s, test_s = 0.9, 0.3  # naive's order of magnitude
    note = long_run_note(size, "naive", 2.4, lambda: (train_s, test_s))
    assert note.startswith(f"note: this run will take about {format_duration(run_seconds(size, train_s, test_s))}")
    assert "with --backend naive" in note
    n = int(note.split("--limit ")[1].split()[0])
    assert f"); {flags.format(n=n)} would take about " in note
    tested = n if "--test-limit" in flags or not test_limited else test_images
    seconds = 5 * (n * train_s + tested * test_s)
    assert 0.8 * SUGGESTED_RUN_S <= seconds <= SUGGESTED_RUN_S
    assert note.endswith(f" would take about {format_duration(seconds)}")


def test_a_long_cli_run_says_so_before_its_first_step(tmp_path):
    """End to end through the CLI: the note comes after the warm-up and before the first epoch; then stop. im2col
    for 1000 epochs stands in for naive's 5 (days either way; naive's warm-up alone takes seconds per image)."""
    process = subprocess.Popen([sys.executable, "-m", "numba_cnn", "train", "--kernels", "im2col", "--epochs", "1000",
                                "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        seen = []
        while not seen or not (seen[-1].startswith(("note: ", "epoch")) or seen[-1] == ""):
            seen.append(process.stdout.readline())
    finally:
        process.kill()
        process.wait()
    note = seen[-1]
    assert note.startswith("note: this run will take about "), seen
    assert "1000 epoch(s) of 60000 training and 10000 test images with --backend im2col" in note
    assert int(note.split("--limit ")[1].split()[0]) >= 1
