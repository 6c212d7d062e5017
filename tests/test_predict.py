"""predict: image files classified as `evaluate` classifies the same test images, with the run's own preprocessing;
an image that does not fit the network, or cannot be read, gets one line and a non-zero exit; --resize fits it."""

import json

import numpy as np
import pytest

from numba_cnn.__main__ import main
from numba_cnn.checkpoint import load_checkpoint
from numba_cnn.model import Model
from numba_cnn.predict import Preprocessing, load_image
from numba_cnn.train import predict
from test_export import BACKEND, mnist_test_set, one_error_line, trained_run

Image = pytest.importorskip("PIL.Image")  # Pillow comes with matplotlib, a dependency

PICKED = [0, 1, 2, 3, 4, 7, 8, 9, 11, 18]  # ten test images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory, "mnist-cnn")


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """PICKED test images as grey PNG files, and the classes `evaluate`'s predict gives them."""
    folder = tmp_path_factory.mktemp("pngs")
    x, _ = mnist_test_set()
    files = []
    for index in PICKED:
        files.append(folder / f"test-{index}.png")
        Image.fromarray(x[index, 0]).save(files[-1])
    return files


def evaluate_predictions(run):
    params, _, _, network = load_checkpoint(run / "checkpoint.npz")
    x, _ = mnist_test_set()
    return predict(Model(BACKEND, params=params, network=network), x[PICKED])


def test_predict_gives_evaluates_classes(run, pngs, capsys):
    assert main(["predict", str(run), *map(str, pngs), "--json", "--backend", BACKEND]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = evaluate_predictions(run)
    assert [r["label"] for r in results] == list(expected)
    assert [r["class"] for r in results] == [str(k) for k in expected]  # MNIST's class names are the digits
    for result in results:
        assert len(result["top"]) == 3 and result["top"][0]["label"] == result["label"]
        probabilities = [t["probability"] for t in result["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-9

    assert main(["predict", str(run / "checkpoint.npz"), *map(str, pngs[:3]), "--backend", BACKEND]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "28x28 grey images" in lines[0] and lines[1].split() == ["image", "class", "top", "3"]
    for line, png, label in zip(lines[2:], pngs, expected):
        assert line.split()[:2] == [str(png), str(label)] and line.count("%") == 3


def test_a_misfit_or_unreadable_image_gets_one_line(run, pngs, tmp_path, capsys):
    x, _ = mnist_test_set()
    colour = tmp_path / "big-colour.png"
    Image.fromarray(np.repeat(x[0, 0], 2, axis=0).repeat(2, axis=1)).convert("RGB").save(colour)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    for files, expected in (([pngs[0], colour], "big-colour.png: 56x56 RGB, but the network takes 28x28 grey"),
                            ([broken], "broken.png: cannot read as a PNG or JPEG image"),
                            ([tmp_path / "absent.png"], "absent.png: no such file")):
        line = one_error_line(capsys, main(["predict", str(run), *map(str, files), "--backend", BACKEND]))
        assert expected in line, line
    assert capsys.readouterr().out == ""

    assert main(["predict", str(run), str(colour), "--resize", "--json", "--backend", BACKEND]) == 0
    result, = json.loads(capsys.readouterr().out)
    assert result["resized_from"] == "56x56 RGB"
    assert result["label"] == evaluate_predictions(run)[0]  # the digit, doubled in size and back, is still read


def test_jpeg_and_channel_conversion(tmp_path):
    """A JPEG is read; --resize converts grey to RGB (the grey value in each channel) for a colour network."""
    pixels = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    path = tmp_path / "grey.jpg"
    Image.fromarray(pixels).save(path, quality=100)
    grey, resized = load_image(path, Preprocessing((1, 8, 8), ("a", "b")))
    assert resized is None and grey.shape == (1, 8, 8) and np.abs(grey[0].astype(int) - pixels).max() <= 2
    rgb, resized = load_image(path, Preprocessing((3, 8, 8), ("a", "b")), resize=True)
    assert resized == "8x8 grey" and rgb.shape == (3, 8, 8)
    assert (rgb == grey).all()
