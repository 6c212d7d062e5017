"""interop: a network built in PyTorch and in Keras from its description and numba_cnn's state computes what
numba_cnn's Model computes, and the state comes back unchanged. Skipped where torch or keras is not installed
(pip install -e ".[baselines]")."""

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
    back = from_torch(network, net)
    assert back.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


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
    back = from_keras(network, model)
    assert back.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_im2col_model_agrees_with_the_oracle_on_the_every_kind_network():
    """The same comparison's other side on a float32 backend: what the frameworks are held to is what im2col
    computes too."""
    network = networks()["every-kind"]
    state = random_state(network)
    x = images(network)
    got = Model("im2col", params=state, network=network).forward(x)
    assert_close(got, reference_logits(network, state, x), np.float32, "im2col logits")
