"""interop: a network built in PyTorch and in Keras from its description and numba_cnn's state computes what
numba_cnn's Model computes, and the state comes back unchanged, as does the description read from the framework's
model; an ONNX graph written from the description computes the same in ONNX Runtime. Skipped where torch, keras or
onnx is not installed (pip install -e ".[baselines,export]")."""

import numpy as np
import pytest

from numba_cnn.kernels.reference import assert_close
from numba_cnn.model import Model, init_state
from numba_cnn.network import build, from_dict, resolve_description
from numba_cnn.network.layers import (AvgPool2D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D,
                                      MaxPool2D, ReLU)

# Every layer kind: a 5x5 stride-2 'same' convolution (an odd total padding, which PyTorch needs an explicit pad
# for), BatchNorm, a bare ReLU, a 3x3 max-pool, a convolution with a fused ReLU, an average pool, global average
# pooling, Flatten (on a flat input here: mnist-cnn's Flatten reads an image, in (C, H, W) order), Dropout, and
# Dense with and without ReLU.
EVERY_KIND = [Conv2D(6, 5, strides=2, padding="same"), BatchNorm2D(), ReLU(), MaxPool2D(3),
              Conv2D(8, 3, padding="same", activation="relu"), AvgPool2D(2), GlobalAvgPool2D(), Flatten(),
              Dropout(0.3), Dense(12, activation="relu"), Dense(5)]
EVERY_KIND_SHAPE = (3, 24, 24)


def networks():
    doc, _ = resolve_description("mnist-cnn", 10)
    return {"mnist-cnn": from_dict(doc, (1, 28, 28), 10),
            "every-kind": build(EVERY_KIND, EVERY_KIND_SHAPE, name="every-kind")}


@pytest.fixture(params=list(networks()), scope="module")
def network(request):
    return networks()[request.param]


def random_state(network, seed=1):
    """Initial weights with every bias, BatchNorm scale and shift and running statistic made non-trivial, so that
    a mapping that drops or swaps one of them shows."""
    rng = np.random.default_rng(seed)
    state = init_state(network, seed)
    for name, value in state.items():
        if name.endswith((".b", ".beta", ".running_mean")):
            state[name] = rng.normal(0.0, 0.3, value.shape).astype(np.float32)
        elif name.endswith((".gamma", ".running_var")):
            state[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    return state


def reference_logits(network, state, x):
    """numba_cnn's inference pass on the float64 oracle."""
    model = Model("reference", dtype=np.float64, params=state, network=network)
    return np.asarray(model.forward(x.astype(np.float64)))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def images(network, n=4, seed=2):
    return np.random.default_rng(seed).random((n, *network.input_shape), dtype=np.float32)


def assert_reads_as(read, network):
    """A network read from a framework's model, with no description given, is `network` but for what does not
    change the function (layer names; the last softmax, which PyTorch's modules do not hold)."""
    from numba_cnn.interop.common import canonical

    assert canonical(read).first_difference(canonical(network)) is None


def test_torch_model_gives_numba_cnns_logits_and_state(network):
    torch = pytest.importorskip("torch")
    from numba_cnn.interop.torch import from_torch, to_torch

    state = random_state(network)
    x = images(network)
    net = to_torch(network, state).eval()
    assert sum(p.numel() for p in net.parameters()) == network.num_params()
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    assert_close(got, reference_logits(network, state, x), np.float32, "torch logits")
    read, back = from_torch(net, network=network)
    assert read is network and back.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert_reads_as(from_torch(net, network.input_shape)[0], network)
    from_model = to_torch(Model("im2col", params=state, network=network)).state_dict()  # a Model is enough
    assert all(torch.equal(from_model[name], tensor) for name, tensor in net.state_dict().items())


def test_keras_model_gives_numba_cnns_outputs_and_state(network):
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    from numba_cnn.interop.keras import from_keras, to_keras

    state = random_state(network)
    x = images(network)
    model = to_keras(network, state)
    assert model.count_params() == network.num_params() + sum(
        int(np.prod(s)) for s in network.buffer_shapes().values())  # Keras counts the moving statistics too
    got = np.asarray(model(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), training=False))
    expected = reference_logits(network, state, x)
    if network.layers[-1].activation == "softmax":  # the Keras model keeps the softmax; ours returns logits
        expected = softmax(expected)
    assert_close(got, expected, np.float32, "keras outputs")
    read, back = from_keras(model, network=network)
    assert read is network and back.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert_reads_as(from_keras(model)[0], network)


def test_onnx_graph_gives_numba_cnns_logits(network):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from numba_cnn.interop.onnx import to_onnx

    state = random_state(network)
    x = images(network)
    session = ort.InferenceSession(to_onnx(network, state).SerializeToString(), providers=["CPUExecutionProvider"])
    got, probabilities = session.run(["logits", "probabilities"], {"images": x})
    expected = reference_logits(network, state, x)
    assert_close(got, expected, np.float32, "onnx logits")
    assert_close(probabilities, softmax(expected), np.float32, "onnx probabilities")


def test_a_network_computing_the_same_takes_the_weights_under_its_own_names():
    """adopt: a Conv2D then a bare ReLU takes the weights of a Conv2D with a fused ReLU, and a last Dense without
    softmax those of one with; another filter count is refused, naming the layer."""
    from numba_cnn.interop.common import InteropError, adopt

    fused = build([Conv2D(4, 3, activation="relu"), Flatten(), Dense(3, activation="softmax")], (1, 6, 6))
    apart = build([Conv2D(4, 3, name="c"), ReLU(), Flatten(), Dense(3, name="d")], (1, 6, 6))
    state = random_state(fused)
    moved = adopt(fused, state, apart, "the source")
    assert moved.keys() == {"c.w", "c.b", "d.w", "d.b"}
    np.testing.assert_array_equal(moved["c.w"], state["conv1.w"])
    wider = build([Conv2D(5, 3), ReLU(), Flatten(), Dense(3)], (1, 6, 6))
    with pytest.raises(InteropError, match=r"the source holds another network .*layer 1 differs: .*\"filters\": 5"):
        adopt(fused, state, wider, "the source")


def test_im2col_model_agrees_with_the_oracle_on_the_every_kind_network():
    """The same comparison's other side on a float32 backend: what the frameworks are held to is what im2col
    computes too."""
    network = networks()["every-kind"]
    state = random_state(network)
    x = images(network)
    got = Model("im2col", params=state, network=network).forward(x)
    assert_close(got, reference_logits(network, state, x), np.float32, "im2col logits")
