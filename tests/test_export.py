"""export and import: a trained network exported to ONNX (run by ONNX Runtime), to a PyTorch state_dict and to a
.keras file computes numba_cnn's predictions and logits on all 10,000 MNIST test images, for mnist-cnn and for a
network with every layer kind; importing the exported files, or a network built and trained in PyTorch or Keras,
gives the same accuracy; `train --init-from` starts from imported weights; bad inputs get one line and leave no
file behind. The frameworks' tests skip where their extra is missing: pip install -e ".[export,baselines]".

Both networks train briefly first (STEPS steps of BATCH on the jit backend, a few seconds once compiled: mnist-cnn
reaches about 96% test accuracy, the every-kind network, slower to learn through global pooling, about 75%), so that
their logits are a trained network's, spread out, rather than an initial one's, nearly equal.
"""

import dataclasses
import functools
import importlib.util
import json

import numpy as np
import pytest

from numba_cnn.__main__ import main
from numba_cnn.checkpoint import load_checkpoint
from numba_cnn.data import load_dataset
from numba_cnn.interop import InteropError
from numba_cnn.interop.files import read_weights
from numba_cnn.kernels.reference import assert_close
from numba_cnn.model import Model, init_state
from numba_cnn.network import from_dict, preset_document
from numba_cnn.network.layers import (AvgPool2D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D,
                                      MaxPool2D, ReLU)
from numba_cnn.predict import logits, softmax
from numba_cnn.train import TrainConfig, evaluate, train

# Keras on TensorFlow converts its outputs with np.array(x), which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

BACKEND = "jit"
STEPS, BATCH, LEARNING_RATE = 300, 64, 3e-3

# Every layer kind on MNIST's 1x28x28: a 5x3 stride-2 'same' convolution (pads top 1, bottom 2, left 0, right 1:
# each of ONNX's four pads differs), BatchNorm, a bare ReLU, average pooling, a 'same' convolution with a fused
# ReLU, max-pooling that drops a row and a column (7 -> 3), global average pooling, Flatten (on a flat input here;
# mnist-cnn's Flatten reads an image), Dropout, and Dense with and without ReLU.
EVERY_KIND = [Conv2D(16, (5, 3), strides=2, padding="same"), BatchNorm2D(), ReLU(), AvgPool2D(2),
              Conv2D(32, 3, padding="same", activation="relu"), MaxPool2D(2), GlobalAvgPool2D(), Flatten(),
              Dropout(0.25), Dense(64, activation="relu"), Dense(10)]
NETWORKS = {"mnist-cnn": preset_document("mnist-cnn"),
            "every-kind": {"name": "every-kind", "layers": [layer.to_dict() for layer in EVERY_KIND]}}


@functools.cache
def mnist():
    """The shipped MNIST, uint8 pixels."""
    return load_dataset("mnist", normalize=False)


def mnist_test_set():
    _, (x, y) = mnist()
    return x, y


def trained_run(tmp_path_factory, name):
    """The run folder of NETWORKS[name] trained for STEPS steps, trained once per test session."""
    folder = tmp_path_factory.getbasetemp() / "trained-runs" / name
    if not (folder / "checkpoint.npz").is_file():
        data = mnist()
        config = TrainConfig(backend=BACKEND, epochs=1, batch_size=BATCH, lr=LEARNING_RATE, limit=STEPS * BATCH,
                             test_limit=1000, network=NETWORKS[name], data=data.record())
        train(config, data, out_dir=folder, log=lambda *_: None)
    return folder


@dataclasses.dataclass
class Trained:
    folder: object
    network: object
    params: dict
    logits: np.ndarray  # numba_cnn's, on every test image
    accuracy: float


@pytest.fixture(scope="module", params=list(NETWORKS))
def trained(request, tmp_path_factory):
    folder = trained_run(tmp_path_factory, request.param)
    params, _, _, network = load_checkpoint(folder / "checkpoint.npz")
    x, y = mnist_test_set()
    model = Model(BACKEND, params=params, network=network)
    scores = logits(model, x)
    accuracy, _ = evaluate(model, x, y, predictions=scores.argmax(axis=1))
    assert accuracy > 0.5, f"{request.param} did not train: accuracy {accuracy}"
    return Trained(folder, network, params, scores, accuracy)


def installed(*names):
    return all(importlib.util.find_spec(name) is not None for name in names)


def one_error_line(capsys, code):
    """The one line an error printed (exit status 2, nothing else on stderr)."""
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out.err)
    return lines[0]


def assert_agrees(got, expected, what):
    """The same predicted class for every image, and scores within float32 tolerance."""
    mismatched = np.flatnonzero(got.argmax(axis=1) != expected.argmax(axis=1))
    assert len(mismatched) == 0, f"{what}: {len(mismatched)} of {len(got)} predictions differ, e.g. image " \
                                 f"{mismatched[:5]}"
    assert_close(got, expected, np.float32, what)


def export(trained, tmp_path, format, name):
    out = tmp_path / name
    assert main(["export", str(trained.folder), "--format", format, "--out", str(out)]) == 0
    return out


def assert_round_trip(path, trained):
    """Importing the exported file gives back the checkpoint's arrays, hence the same accuracy."""
    network, state = read_weights(path, trained.network)
    assert state.keys() == trained.params.keys()
    for name, value in trained.params.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    x, y = mnist_test_set()
    accuracy, _ = evaluate(Model(BACKEND, params=state, network=network), x, y)
    assert accuracy == trained.accuracy


def test_onnx_export_agrees_with_numba_cnn_on_the_test_set(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from numba_cnn.interop.onnx import OPSET

    path = export(trained, tmp_path, "onnx", "model.onnx")
    model = onnx.load(path)
    assert [o.version for o in model.opset_import] == [OPSET]
    assert json.loads({p.key: p.value for p in model.metadata_props}["class_names"]) == [str(k) for k in range(10)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].shape[1:] == [1, 28, 28]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    x, _ = mnist_test_set()
    got, probabilities = session.run(None, {"images": x.astype(np.float32) / 255})
    assert_agrees(got, trained.logits, "ONNX Runtime logits")
    assert_close(probabilities, softmax(trained.logits), np.float32, "ONNX Runtime probabilities")


def test_torch_export_agrees_with_numba_cnn_on_the_test_set(trained, tmp_path):
    torch = pytest.importorskip("torch")
    from numba_cnn.interop import to_torch

    path = export(trained, tmp_path, "torch", "model.pt")
    # what a PyTorch user does: the module from the description beside the weights, then the state_dict
    network = from_dict(json.loads(path.with_suffix(".json").read_text()))
    module = to_torch(network, init_state(network, seed=1)).eval()
    module.load_state_dict(torch.load(path, weights_only=True))
    x, _ = mnist_test_set()
    with torch.no_grad():
        got = np.concatenate([module(torch.from_numpy(x[i:i + 2000].astype(np.float32) / 255)).numpy()
                              for i in range(0, len(x), 2000)])
    assert_agrees(got, trained.logits, "PyTorch logits")
    assert_round_trip(path, trained)


def test_keras_export_agrees_with_numba_cnn_on_the_test_set(trained, tmp_path):
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")

    path = export(trained, tmp_path, "keras", "model.keras")
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    x, _ = mnist_test_set()
    got = model.predict(x.transpose(0, 2, 3, 1).astype(np.float32) / 255, batch_size=1000, verbose=0)
    softmax_last = trained.network.layers[-1].activation == "softmax"  # then the Keras model outputs probabilities
    assert_agrees(got, softmax(trained.logits) if softmax_last else trained.logits, "Keras outputs")
    assert_round_trip(path, trained)


def torch_training(module, steps=200, seed=0):
    """Train a PyTorch module briefly on MNIST with Adam, as its own framework would."""
    import torch

    (x, y), _ = mnist()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    order = np.random.default_rng(seed).permutation(len(x))[:steps * BATCH]
    module.train()
    for start in range(0, len(order), BATCH):
        idx = order[start:start + BATCH]
        loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(x[idx].astype(np.float32) / 255)),
                                                 torch.from_numpy(y[idx].astype(np.int64)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


def test_import_from_torch_gives_torchs_accuracy():
    """A network built and trained in PyTorch (bias-free 'same' convolution, BatchNorm with PyTorch's defaults,
    nested Sequential), read by from_torch, predicts what PyTorch predicts on every test image."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from numba_cnn.interop import from_torch

    torch.manual_seed(0)
    module = torch_training(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU()), nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(16 * 6 * 6, 10)))
    x, y = mnist_test_set()
    with torch.no_grad():
        theirs = module(torch.from_numpy(x.astype(np.float32) / 255)).numpy()
    network, state = from_torch(module, (1, 28, 28))
    ours = logits(Model(BACKEND, params=state, network=network), x)
    assert_agrees(ours, theirs, "numba_cnn on PyTorch's weights")
    accuracy, _ = evaluate(Model(BACKEND, params=state, network=network), x, y, predictions=ours.argmax(axis=1))
    assert accuracy == float((theirs.argmax(axis=1) == y).mean()) > 0.8


def test_import_from_keras_gives_keras_accuracy(tmp_path):
    """A network built and trained in Keras, Keras's way (Flatten straight on the channels-last image, a softmax
    output, a bias-free convolution before BatchNormalization), saved and read back through `.keras` in safe
    mode, predicts what Keras predicts on every test image."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    layers = keras.layers

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), layers.Conv2D(8, 3, activation="relu"), layers.MaxPooling2D(),
                              layers.Conv2D(16, 3, padding="same", use_bias=False), layers.BatchNormalization(),
                              layers.ReLU(), layers.MaxPooling2D(), layers.Flatten(), layers.Dropout(0.2),
                              layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    (x_train, y_train), (x, y) = mnist()
    model.fit(x_train[:STEPS * BATCH].transpose(0, 2, 3, 1) / 255, y_train[:STEPS * BATCH], batch_size=BATCH,
              epochs=1, verbose=0)
    theirs = model.predict(x.transpose(0, 2, 3, 1).astype(np.float32) / 255, batch_size=1000, verbose=0)
    path = tmp_path / "theirs.keras"
    model.save(path)
    network, state = read_weights(path)
    ours = logits(Model(BACKEND, params=state, network=network), x)
    assert_agrees(softmax(ours), theirs, "numba_cnn on Keras's weights")
    accuracy, _ = evaluate(Model(BACKEND, params=state, network=network), x, y, predictions=ours.argmax(axis=1))
    assert accuracy == float((theirs.argmax(axis=1) == y).mean()) > 0.8


def test_train_init_from_starts_from_the_files_weights(tmp_path_factory, tmp_path, capsys):
    """From a run folder, an exported .keras file and a state_dict with its description (where Keras and PyTorch
    are installed), a run of one step at a negligible learning rate ends where the source began; a --model that
    differs from the file's network is refused, naming the first differing layer."""
    folder = trained_run(tmp_path_factory, "mnist-cnn")
    params, *_ = load_checkpoint(folder / "checkpoint.npz")
    sources = [folder]
    for format, name, packages in (("keras", "model.keras", ("keras", "tensorflow")),
                                   ("torch", "model.pt", ("torch",))):
        if installed(*packages):
            sources.append(tmp_path / name)
            assert main(["export", str(folder), "--format", format, "--out", str(sources[-1])]) == 0
    for i, source in enumerate(sources):
        out = tmp_path / f"run{i}"
        assert main(["train", "--init-from", str(source), "--model", "mnist-cnn", "--backend", BACKEND,
                     "--epochs", "1", "--limit", str(BATCH), "--batch-size", str(BATCH), "--lr", "1e-9",
                     "--test-limit", "100", "--out", str(out)]) == 0, capsys.readouterr().err
        started, _, meta, _ = load_checkpoint(out / "checkpoint.npz")
        assert meta["config"]["init_from"] == str(source)
        for name, value in params.items():
            np.testing.assert_allclose(started[name], value, atol=1e-6, err_msg=f"{source}: {name}")
    capsys.readouterr()
    code = main(["train", "--init-from", str(folder), "--model", "lenet5", "--epochs", "1", "--limit", "64",
                 "--out", str(tmp_path / "wrong")])
    line = one_error_line(capsys, code)
    assert "layer 1 differs" in line and '"filters": 6' in line and '"filters": 32' in line, line
    assert not (tmp_path / "wrong").exists()


def test_bad_exports_get_one_line_and_write_nothing(tmp_path_factory, tmp_path, capsys, monkeypatch):
    folder = trained_run(tmp_path_factory, "mnist-cnn")
    not_a_checkpoint = tmp_path / "notes.npz"
    not_a_checkpoint.write_text("not a checkpoint")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [([str(not_a_checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")], "notes.npz"),
             ([str(folder), "--format", "tflite", "--out", str(tmp_path / "m.tflite")], "unknown format 'tflite'"),
             ([str(folder), "--format", "onnx", "--out", str(blocker / "m.onnx")], "cannot write"),
             ([str(folder), "--format", "keras", "--out", str(tmp_path / "m.h5")], "must end in .keras")]
    for args, expected in cases:
        line = one_error_line(capsys, main(["export", *args]))
        assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "notes.npz"]

    pytest.importorskip("torch")
    out = tmp_path / "m.pt"
    out.write_bytes(b"older")
    assert "exists; pass --force" in one_error_line(
        capsys, main(["export", str(folder), "--format", "torch", "--out", str(out)]))
    assert out.read_bytes() == b"older"

    def interrupted(obj, f):  # Ctrl-C halfway through writing the weights
        f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("torch.save", interrupted)
    assert main(["export", str(folder), "--format", "torch", "--out", str(out), "--force"]) == 130
    assert out.read_bytes() == b"older"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "m.pt", "notes.npz"]  # no temporary file left


def test_a_foreign_layer_is_refused_by_name(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from torch import nn

    from numba_cnn.interop import from_torch

    with pytest.raises(InteropError, match=r"module 2 of the nn.Sequential \(Sigmoid\(\)\) has no numba_cnn "):
        from_torch(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)),
                   (1, 28, 28))
    with pytest.raises(InteropError, match="not an nn.Sequential"):
        from_torch(nn.Conv2d(1, 4, 3), (1, 28, 28))
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), path)  # a pickled module, not a state_dict
    line = one_error_line(capsys, main(["train", "--init-from", str(path), "--model", "mnist-cnn"]))
    assert "weights_only=True" in line, line

    if installed("keras", "tensorflow"):
        import keras

        foreign = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 3),
                                    keras.layers.LayerNormalization(), keras.layers.Flatten(),
                                    keras.layers.Dense(10)])
        foreign.save(tmp_path / "foreign.keras")
        line = one_error_line(capsys, main(["train", "--init-from", str(tmp_path / "foreign.keras")]))
        assert "layer 2 of the Keras model" in line and "LayerNormalization) has no numba_cnn equivalent" in line
