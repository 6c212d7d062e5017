"""Networks as data: presets, the JSON description and its errors, the fusion pass, checkpoints that carry their
network, a non-preset network with every layer kind checked against the oracle and finite differences, and a
throwaway layer kind added as one module plus one registry line."""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import backend_params
from gradcheck import assert_gradient_matches
from numba_cnn import checkpoint as ckpt
from numba_cnn.errors import CheckpointError
from numba_cnn.kernels import get_backend, reference
from numba_cnn.model import Model, default_network, init_state
from numba_cnn.network import DescriptionError, from_dict, layers, preset_document, resolve_description
from numba_cnn.network.layers import KINDS, Layer
from numba_cnn.network.plan import ConvRelu, ConvReluAvgPool, ConvReluPool, plan
from numba_cnn.network.presets import PRESETS
from numba_cnn.optim import Adam

CPU_BACKENDS = ("naive", "im2col", "jit")

# Every layer kind, on a 1x20x20 input: conv (no activation) + ReLU (fused into one conv), max-pool 3, a 5x5 'same'
# conv, average pool, a strided 'same' conv, BatchNorm, global average pooling, dropout, dense with and without ReLU.
EVERY_KIND = {"name": "every-kind", "layers": [
    {"kind": "Conv2D", "filters": 4, "kernel_size": 3},
    {"kind": "ReLU"},
    {"kind": "MaxPool2D", "pool_size": 3},
    {"kind": "Conv2D", "filters": 6, "kernel_size": 5, "padding": "same", "activation": "relu"},
    {"kind": "AvgPool2D", "pool_size": 2},
    {"kind": "Conv2D", "filters": 8, "kernel_size": 3, "strides": 2, "padding": "same"},
    {"kind": "BatchNorm2D"},
    {"kind": "ReLU"},
    {"kind": "GlobalAvgPool2D"},
    {"kind": "Flatten"},
    {"kind": "Dropout", "rate": 0.25},
    {"kind": "Dense", "units": 16, "activation": "relu"},
    {"kind": "Dense", "units": 10, "activation": "softmax"}]}
EVERY_KIND_INPUT = (1, 20, 20)
# A bias just before BatchNorm is subtracted again with the batch mean: its gradient is exactly zero, so it is
# checked against zero on the scale of the other gradients rather than relative to itself.
ZERO_GRADIENT = {"conv3.b"}


def every_kind_network():
    return from_dict(EVERY_KIND, EVERY_KIND_INPUT, num_classes=10)


# ------------------------------------------------------------------------------------------------ presets, shapes

def test_presets_build_for_grey_and_colour_images():
    counts = {}
    for name in PRESETS:
        for shape in ((1, 28, 28), (3, 32, 32)):
            doc, where = resolve_description(name)
            network = from_dict(doc, shape, num_classes=10)
            assert network.output_shape == (10,) and where == f"preset {name}"
            counts[name, shape] = network.num_params()
    assert counts["mnist-cnn", (1, 28, 28)] == 34_826  # Keras's MNIST convnet example
    assert counts["lenet5", (1, 28, 28)] == 61_706  # LeNet-5's published count
    assert {layer.kind for layer in from_dict(preset_document("vgg-small-bn"), (3, 32, 32)).layers} >= {
        "BatchNorm2D", "ReLU", "Conv2D", "MaxPool2D", "Dropout", "Dense"}


def test_the_descriptions_in_the_networks_page_build():
    """Every JSON block of docs/networks.md is a description that builds for its own input shape; the two
    tutorial networks have the parameter counts their tutorials print (PyTorch's 62,006, TensorFlow's 122,570)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "networks.md").read_text(encoding="utf-8")
    counts = {}
    for block in re.findall(r"```json\n(.*?)```", page, flags=re.S):
        doc = json.loads(block)
        network = from_dict(doc, tuple(doc.get("input_shape", (1, 28, 28))), num_classes=10)
        counts[doc["name"]] = network.num_params()
    assert counts["torch-tutorial"] == 62_006 and counts["tf-tutorial"] == 122_570, counts


def test_shapes_follow_from_the_input():
    network = every_kind_network()
    assert network.shapes == ((1, 20, 20), (4, 18, 18), (4, 18, 18), (4, 6, 6), (6, 6, 6), (6, 3, 3), (8, 2, 2),
                              (8, 2, 2), (8, 2, 2), (8,), (8,), (8,), (16,), (10,))
    assert [layer.name for layer in network.layers][:4] == ["conv1", "relu1", "pool1", "conv2"]


def test_a_description_round_trips_through_json():
    network = every_kind_network()
    again = from_dict(json.loads(json.dumps(network.to_dict())))
    assert again == network and again.first_difference(network) is None


def test_same_padding_follows_tensorflow():
    conv = layers.Conv2D(4, 3, strides=2, padding="same")
    assert conv.output_shape((1, 7, 8)) == (4, 4, 4)
    assert conv.pads((1, 7, 8)) == (1, 1, 0, 1)  # odd totals put the extra zero below and to the right


# ------------------------------------------------------------------------------------------------ bad descriptions

def _doc(*entries, **extra):
    return {"layers": list(entries) + [{"kind": "Flatten"}, {"kind": "Dense", "units": 10}], **extra}


BAD_DESCRIPTIONS = [
    ("unknown_kind", _doc({"kind": "Conv3D", "filters": 4}), r"layer 1: unknown kind 'Conv3D'"),
    ("zero_filters", _doc({"kind": "Conv2D", "filters": 0}), r"layer 1 \(Conv2D\): filters must be"),
    ("negative_kernel", _doc({"kind": "Conv2D", "filters": 4, "kernel_size": -3}),
     r"layer 1 \(Conv2D\): kernel_size must be"),
    ("bool_units", {"layers": [{"kind": "Flatten"}, {"kind": "Dense", "units": True}]},
     r"layer 2 \(Dense\): units must be"),
    ("shrinks_below_1x1", _doc({"kind": "Conv2D", "filters": 4, "kernel_size": 5, "name": "c5"},
                               {"kind": "MaxPool2D", "pool_size": 2}, {"kind": "Conv2D", "filters": 4, "kernel_size": 13}),
     r"layer 3 \(conv1, Conv2D\): its 13x13 kernel does not fit in the 12x12 image"),
    ("pool_too_big", _doc({"kind": "MaxPool2D", "pool_size": 29}), r"layer 1 \(pool1, MaxPool2D\): its 29x29 window"),
    ("dense_in_features", {"layers": [{"kind": "Flatten"}, {"kind": "Dense", "units": 10, "in_features": 100}]},
     r"layer 2 \(dense1, Dense\): in_features is 100 but the layer before it gives 784 values"),
    ("dense_on_image", {"layers": [{"kind": "Dense", "units": 10}]}, r"layer 1 \(dense1, Dense\): Dense needs a flat"),
    ("unknown_setting", _doc({"kind": "Conv2D", "filters": 4, "kernal_size": 3}),
     r"layer 1 \(Conv2D\): unknown setting 'kernal_size'"),
    ("bad_padding", _doc({"kind": "Conv2D", "filters": 4, "padding": "full"}), r"padding must be one of"),
    ("dropout_rate_1", _doc({"kind": "Dropout", "rate": 1.0}), r"layer 1 \(Dropout\): rate must be"),
    ("not_an_object", [1, 2, 3], r"a network description is a JSON object"),
    ("no_layers", {"name": "x"}, r"no 'layers' list"),
    ("empty_layers", {"layers": []}, r"'layers' must be a non-empty list"),
    ("layer_not_object", {"layers": ["Conv2D"]}, r"layer 1: each layer must be an object"),
    ("unknown_top_key", {"layers": [], "optimizer": "sgd"}, r"unknown key 'optimizer'"),
    ("wrong_classes", {"layers": [{"kind": "Flatten"}, {"kind": "Dense", "units": 7}]},
     r"ends with 7 outputs .* 10 classes"),
    ("image_output", {"layers": [{"kind": "Conv2D", "filters": 10}]}, r"must end with a flat output"),
    ("softmax_not_last", _doc({"kind": "Flatten"}, {"kind": "Dense", "units": 5, "activation": "softmax"}),
     r"'softmax' is allowed on the last layer only"),
    ("duplicate_names", _doc({"kind": "Conv2D", "filters": 4, "name": "a"}, {"kind": "Conv2D", "filters": 4, "name": "a"}),
     r"layer name 'a' is used more than once"),
    ("input_shape_disagrees", _doc(input_shape=[3, 32, 32]), r"expects input of shape \[3, 32, 32\] but the data"),
    ("too_many_parameters", {"layers": [{"kind": "Flatten"}, {"kind": "Dense", "units": 200000},
                                        {"kind": "Dense", "units": 10}]}, r"numba_cnn is for small networks"),
]


@pytest.mark.parametrize("doc, message", [pytest.param(doc, msg, id=case) for case, doc, msg in BAD_DESCRIPTIONS])
def test_a_bad_description_is_one_clear_error_naming_the_layer(doc, message):
    with pytest.raises(DescriptionError, match=message) as caught:
        from_dict(doc, (1, 28, 28), num_classes=10)
    assert "\n" not in str(caught.value)


def test_cli_refuses_a_bad_description_before_training(tmp_path, capsys):
    from numba_cnn.__main__ import main

    bad = tmp_path / "net.json"
    bad.write_text(json.dumps(_doc({"kind": "Conv2D", "filters": -1})))
    out = tmp_path / "run"
    assert main(["train", "--model", str(bad), "--out", str(out), "--kernels", "im2col", "--limit", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: layer 1 (Conv2D): filters must be") and "\n" not in err
    assert not out.exists()
    not_json = tmp_path / "net2.json"
    not_json.write_text("import os; os.system('echo executed')")  # data, never executed
    assert main(["train", "--model", str(not_json), "--kernels", "im2col"]) == 2
    assert "is not JSON" in capsys.readouterr().err


# An entry made of the settings the kinds know, with values from the edges of what is valid and past them.
SETTING_VALUES = st.one_of(st.integers(-3, 40), st.floats(-1, 2), st.just(float("nan")), st.booleans(), st.none(),
                           st.sampled_from(["same", "valid", "relu", "softmax", "x", ""]),
                           st.lists(st.integers(-1, 6), max_size=3))
SETTING_NAMES = st.sampled_from(["filters", "kernel_size", "strides", "padding", "activation", "pool_size", "rate",
                                 "units", "in_features", "momentum", "epsilon", "name", "bogus"])
ENTRIES = st.builds(lambda kind, settings: {"kind": kind, **settings},
                    st.sampled_from(sorted(KINDS) + ["Nope", 3]),
                    st.dictionaries(SETTING_NAMES, SETTING_VALUES, max_size=4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(ENTRIES, max_size=8), shape=st.tuples(st.integers(1, 4), st.integers(1, 40),
                                                                st.integers(1, 40)))
def test_random_descriptions_build_or_give_one_clear_error(entries, shape):
    try:
        network = from_dict({"layers": entries}, shape, num_classes=10)
    except DescriptionError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert network.output_shape == (10,)
        init_state(network, 0)  # every shape it promised can be allocated


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_mutated_preset_descriptions_build_or_give_one_clear_error(data):
    doc = preset_document(data.draw(st.sampled_from(sorted(PRESETS))))
    entry = data.draw(st.integers(0, len(doc["layers"]) - 1))
    key = data.draw(SETTING_NAMES)
    doc["layers"][entry][key] = data.draw(SETTING_VALUES)
    try:
        from_dict(doc, (1, 28, 28), num_classes=10)
    except DescriptionError as exc:
        assert "\n" not in str(exc)


# ------------------------------------------------------------------------------------------------ fusion pass

def test_fusion_pass_merges_what_the_backend_has():
    jit, im2col = get_backend("jit"), get_backend("im2col")
    mnist = default_network()
    assert [s.name for s in plan(mnist, jit)] == ["conv1+pool1", "conv2+pool2", "flatten", "dropout", "dense"]
    assert [s.name for s in plan(mnist, jit, fuse=False)] == [layer.name for layer in mnist.layers]
    assert not any(isinstance(s.runner, ConvReluPool) for s in plan(mnist, im2col)) or im2col.has_fused(
        "conv2d_relu_maxpool2d")
    steps = plan(every_kind_network(), jit)
    # conv + ReLU became one conv with its ReLU, whose backward is jit's fused conv2d_relu_backward (no pool after it);
    # the padded conv with its ReLU and a 2x2 average pool one ConvReluAvgPool step; a 3x3 pool and a strided conv
    # (followed by BatchNorm) are not fused
    assert [s.name for s in steps][:4] == ["conv1+relu1", "pool1", "conv2+avgpool1", "conv3"]
    assert isinstance(steps[0].runner, ConvRelu) and steps[0].runner.conv.activation == "relu"
    assert isinstance(steps[2].runner, ConvReluAvgPool)


# ------------------------------------------------------------------------------------------------ every kind, model-level

SEED, DROPOUT_SEED = 3, 5


def _every_kind_batch(n=2):
    rng = np.random.default_rng(11)
    return rng.uniform(0, 1, (n, *EVERY_KIND_INPUT)), np.array([3, 7, 1, 0][:n])


def _training_pass(backend, dtype, params=None):
    model = Model(backend, seed=SEED, dtype=dtype, network=every_kind_network(), params=params)
    x, labels = _every_kind_batch()
    loss, _ = model.forward_backward(backend.to_device(x.astype(dtype)), backend.to_device(labels),
                                     backend.make_dropout_rng(DROPOUT_SEED))
    return model, loss


@pytest.mark.parametrize("backend_name", backend_params(("im2col", "jit")))
def test_every_kind_gradients_match_finite_differences(backend_name):
    backend = get_backend(backend_name)
    model, _ = _training_pass(backend, np.float64)
    grads = {name: np.asarray(backend.to_host(g)) for name, g in model.grads.items()}
    assert set(grads) == set(model.network.param_shapes())
    start = model.state_dict()
    x, labels = _every_kind_batch()
    rng = np.random.default_rng(0)

    def loss_at(state):
        model.load_state_dict(state)
        logits = model.forward(backend.to_device(x), dropout_rng=backend.make_dropout_rng(DROPOUT_SEED))
        return model.backend.layers.softmax_cross_entropy(logits, backend.to_device(labels))[0]

    for name in model.network.param_shapes():
        p = start[name]
        if name in ZERO_GRADIENT:
            assert np.abs(grads[name]).max() < 1e-12, name
            continue
        indices = None if p.size <= 24 else rng.choice(p.size, 6, replace=False)
        assert_gradient_matches(grads[name], lambda a, name=name: loss_at(dict(start, **{name: a})), p.copy(),
                                indices, what=name)


@pytest.mark.parametrize("backend_name", backend_params(CPU_BACKENDS))
def test_every_kind_matches_the_float64_oracle(backend_name):
    """float32 on each CPU backend against the float64 oracle: loss, every gradient and the running statistics.
    The dropout masks agree because every CPU backend but jit draws them from numpy's Generator; jit's own
    generator is replayed into the oracle."""
    backend = get_backend(backend_name)
    recorded = []
    model = Model(backend, seed=SEED, network=every_kind_network())
    real_dropout = backend.layers.dropout_forward

    class Recording:
        def __getattr__(self, name):
            return getattr(backend.layers, name)

        def dropout_forward(self, x, rate, rng):
            y, mask = real_dropout(x, rate, rng)
            recorded.append(np.array(mask, dtype=np.float64))
            return y, mask

    from numba_cnn.model import Run
    x, labels = _every_kind_batch()
    run = Run(backend, Recording(), True, backend.make_dropout_rng(DROPOUT_SEED))
    oracle_model = Model("reference", seed=SEED, dtype=np.float64, network=every_kind_network())

    def passes(m, run):
        caches, h = [], m.backend.to_device(x.astype(m.dtype))
        for step, (_, arrays) in zip(m.steps, m._step_arrays):
            h, cache = step.runner.forward(run, arrays, h)
            caches.append(cache)
        loss, dy, _ = run.layers.softmax_cross_entropy(h, labels)
        grads = {}
        for i in range(len(m.steps) - 1, -1, -1):
            owner, arrays = m._step_arrays[i]
            dy, g = m.steps[i].runner.backward(run, arrays, dy, caches[i], need_dx=i > 0)
            grads.update({f"{owner}.{k}": np.asarray(v) for k, v in g.items()})
        return loss, grads

    loss, grads = passes(model, run)
    (mask,) = recorded

    class Replay:
        def __getattr__(self, name):
            return getattr(oracle_model.backend.layers, name)

        def dropout_forward(self, x, rate, rng):
            return x * mask, mask

    want_loss, want_grads = passes(oracle_model, Run(oracle_model.backend, Replay(), True, None))
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name, want in want_grads.items():
        if name in ZERO_GRADIENT:
            scale = max(np.abs(g).max() for g in want_grads.values())
            assert np.abs(grads[name]).max() < 1e-5 * scale, name
            continue
        reference.assert_close(grads[name], want, np.float32, what=name)
    state, want_state = model.state_dict(), oracle_model.state_dict()
    for name in model.network.buffer_shapes():
        reference.assert_close(state[name], want_state[name], np.float32, what=name)


# ------------------------------------------------------------------------------------------------ checkpoints

def _small_checkpoint(path, network):
    model = Model("im2col", network=network)
    optimizer = Adam(model.params, model.backend)
    meta = {"config": {"backend": "im2col"}, "network": network.to_dict(), "epoch": 1, "step": 0,
            "order_rng_epoch_start": {}, "dropout_rng": {}, "history": []}
    ckpt.save_checkpoint(path, model.state_dict(), optimizer.state_dict(np.asarray), meta)
    return path


def test_a_checkpoint_carries_its_network_and_buffers(tmp_path):
    network = every_kind_network()
    params, adam, meta, loaded = ckpt.load_checkpoint(_small_checkpoint(tmp_path / "c.npz", network))
    assert loaded == network
    assert set(params) == set(network.param_shapes()) | set(network.buffer_shapes())
    assert "bn1.running_var" in params and f"m.bn1.running_var" not in adam and "m.bn1.gamma" in adam


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_checkpoints_load_or_give_one_clear_error(tmp_path, data):
    good = tmp_path / "good.npz"
    if not good.exists():
        _small_checkpoint(good, every_kind_network())
    raw = bytearray(good.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    try:
        ckpt.load_checkpoint(bad)
    except CheckpointError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=SETTING_VALUES, key=SETTING_NAMES, entry=st.integers(0, len(EVERY_KIND["layers"]) - 1))
def test_checkpoints_with_mutated_descriptions_give_one_clear_error(tmp_path, value, key, entry):
    good = tmp_path / "good.npz"
    if not good.exists():
        _small_checkpoint(good, every_kind_network())
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["network"]["layers"][entry][key] = value
    arrays["meta"] = np.array(json.dumps(meta))
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    try:
        ckpt.load_checkpoint(bad)
    except CheckpointError as exc:
        assert "\n" not in str(exc)


# ------------------------------------------------------------------------------------------------ a throwaway kind

@dataclasses.dataclass(frozen=True)
class Scale(Layer):
    """y = x * s with one trained scalar s per channel: a kind the package does not have."""

    kind = "Scale"

    def param_shapes(self, in_shape):
        return {"s": (in_shape[0],)}

    def init(self, in_shape, rng, dtype):
        return {"s": np.ones(in_shape[0], dtype)}, {}

    def forward(self, run, p, x):
        s = np.asarray(p["s"]).reshape(1, -1, *([1] * (x.ndim - 2)))
        return x * s, (x, s)

    def backward(self, run, p, dy, cache, need_dx):
        x, s = cache
        axes = (0,) + tuple(range(2, x.ndim))
        return dy * s, {"s": (dy * x).sum(axis=axes).astype(x.dtype)}


@pytest.fixture
def scale_kind():
    layers.register(Scale)
    yield Scale
    layers.unregister(Scale)


@pytest.mark.parametrize("backend_name", backend_params(CPU_BACKENDS))
def test_adding_a_layer_kind_is_one_module_and_one_registry_line(scale_kind, backend_name):
    doc = {"layers": [{"kind": "Conv2D", "filters": 4, "kernel_size": 3},
                      {"kind": "Scale"}, {"kind": "MaxPool2D"}, {"kind": "Flatten"}, {"kind": "Dense", "units": 2}]}
    network = from_dict(doc, (1, 6, 6), num_classes=2)
    model = Model(backend_name, seed=1, network=network)
    optimizer = Adam(model.params, model.backend, lr=0.05)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 1, 6, 6)).astype(np.float32)
    labels = np.array([0, 1] * 4)
    x[labels == 1, :, :3] += 1.0  # class 1: a bright top half
    losses, scales = [], []
    for _ in range(12):
        loss, _ = model.forward_backward(x, labels, model.backend.make_dropout_rng(0))
        optimizer.step(model.grads)
        losses.append(loss)
        scales.append(np.array(model.params["scale1.s"]))
    assert losses[-1] < 0.05 * losses[0]
    assert not np.array_equal(scales[0], scales[-1])  # the new kind's parameter learns too
