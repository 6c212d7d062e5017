"""Training networks other than the default through the CLI: a JSON network with every kind of layer on MNIST-
and Fashion-MNIST-shaped data, the VGG-style preset on colour images from a folder, on every CPU backend; the run
folder and checkpoint carry the network, so evaluate and --resume rebuild it, and refuse another."""

import json

import numpy as np
import pytest

from numba_cnn import checkpoint as ckpt
from numba_cnn.__main__ import main
from test_train_cli import write_idx_folder

CPU_BACKENDS = ("naive", "im2col", "jit")

# three 5x5 'same' convolutions, one of them strided, BatchNorm and global average pooling (docs/networks.md)
THREE_CONV = {"name": "three-conv", "layers": [
    {"kind": "Conv2D", "filters": 4, "kernel_size": 5, "padding": "same", "activation": "relu"},
    {"kind": "MaxPool2D", "pool_size": 2},
    {"kind": "Conv2D", "filters": 6, "kernel_size": 5, "strides": 2, "padding": "same"},
    {"kind": "BatchNorm2D"},
    {"kind": "ReLU"},
    {"kind": "Conv2D", "filters": 8, "kernel_size": 5, "padding": "same", "activation": "relu"},
    {"kind": "GlobalAvgPool2D"},
    {"kind": "Dropout", "rate": 0.2},
    {"kind": "Dense", "units": 10, "activation": "softmax"}]}


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def three_conv_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("nets") / "three-conv.json"
    path.write_text(json.dumps(THREE_CONV))
    return path


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    return write_idx_folder(tmp_path_factory.mktemp("idx") / "data", 0)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_json_network_trains_then_evaluates_from_its_run_folder(backend, dataset, three_conv_json, idx_folder,
                                                                   tmp_path, capsys):
    limit = 4 if backend == "naive" else 64  # naive (Python loops): one step of four images
    out = tmp_path / "run"
    code, stdout, stderr = run_main(capsys, "train", "--model", three_conv_json, "--dataset", dataset, "--data",
                                    idx_folder, "--kernels", backend, "--epochs", "1", "--batch-size", "8",
                                    "--limit", limit, "--out", out)
    assert code == 0, stderr
    assert "network: three-conv" in stdout and "done: test accuracy" in stdout
    assert json.loads((out / "network.json").read_text())["layers"][2]["strides"] == 2
    _, _, meta, network = ckpt.load_checkpoint(out / "checkpoint.npz")
    assert network.name == "three-conv" and network.input_shape == (1, 28, 28)
    assert meta["network"] == network.to_dict()
    accuracy = stdout.split("done: test accuracy ")[1].split()[0]

    code, stdout, stderr = run_main(capsys, "evaluate", out, "--data", idx_folder, "--kernels", backend,
                                    "--test-limit", limit)
    assert code == 0, stderr
    assert f"test accuracy {accuracy} on {limit} images" in stdout


def test_resume_refuses_another_network_naming_the_first_layer_that_differs(three_conv_json, idx_folder, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    code, _, stderr = run_main(capsys, "train", "--model", three_conv_json, "--data", idx_folder, "--kernels",
                               "im2col", "--epochs", "1", "--batch-size", "32", "--limit", "64", "--out", out)
    assert code == 0, stderr
    other = json.loads(json.dumps(THREE_CONV))
    other["layers"][2]["filters"] = 12
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    code, _, stderr = run_main(capsys, "train", "--resume", out, "--model", other_path, "--data", idx_folder,
                               "--epochs", "2")
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "layer 3 differs" in stderr and '"filters": 12' in stderr
    code, stdout, stderr = run_main(capsys, "train", "--resume", out / "checkpoint.npz", "--data", idx_folder,
                                    "--kernels", "im2col", "--epochs", "2")
    assert code == 0, stderr
    assert "epoch 2/2" in stdout


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_vgg_preset_trains_on_colour_images_from_a_folder(backend, tmp_path, capsys):
    """vgg-small-bn (BatchNorm and dropout included) on RGB PNGs in class folders, then evaluate on its run
    folder. naive (Python loops: a minute and more per 32x32 image through this network) trains on 4x4 images of
    the same folder layout, one per class (two 2x2 pools take them to 1x1); the compiled backends on 32x32,
    CIFAR-10's size."""
    from test_data_shapes import write_image_folder

    size, per_class = (4, (1, 1)) if backend == "naive" else (32, (4, 2))
    write_image_folder(tmp_path / "images", shape=(3, size, size), classes=("ant", "bee", "cat"), per_class=per_class)
    out = tmp_path / "run"
    code, stdout, stderr = run_main(capsys, "train", "--model", "vgg-small-bn", "--dataset", "folder", "--data",
                                    tmp_path / "images", "--kernels", backend, "--epochs", "1", "--batch-size", "6",
                                    "--out", out)
    assert code == 0, stderr
    assert f"input [3, {size}, {size}]" in stdout and "done: test accuracy" in stdout
    _, _, _, network = ckpt.load_checkpoint(out / "checkpoint.npz")
    assert network.output_shape == (3,) and "bn1.running_mean" in network.buffer_shapes()
    code, stdout, stderr = run_main(capsys, "evaluate", out, "--data", tmp_path / "images", "--kernels", backend)
    assert code == 0, stderr
    assert "test accuracy" in stdout and "ant" in stdout


@pytest.mark.parametrize("backend", ("im2col", "jit"))
def test_a_global_average_pool_over_more_than_256_pixels_trains(backend, tmp_path, capsys):
    """GlobalAvgPool2D right after a 'same' convolution on 24x24 colour images: one window of 576 pixels (the
    pooling checks once capped every window at 256 elements, which only max pooling's uint8 argmax needs)."""
    from test_data_shapes import write_image_folder

    write_image_folder(tmp_path / "images", shape=(3, 24, 24), classes=("ant", "bee"), per_class=(3, 2))
    net = tmp_path / "gap.json"
    net.write_text(json.dumps({"name": "gap", "layers": [
        {"kind": "Conv2D", "filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"kind": "GlobalAvgPool2D"},
        {"kind": "Dense", "units": 2, "activation": "softmax"}]}))
    code, stdout, stderr = run_main(capsys, "train", "--model", net, "--dataset", "folder", "--data",
                                    tmp_path / "images", "--kernels", backend, "--epochs", "1", "--batch-size", "3",
                                    "--out", tmp_path / "run")
    assert code == 0, stderr
    assert "input [3, 24, 24]" in stdout and "done: test accuracy" in stdout
