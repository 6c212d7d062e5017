"""A Network and its state as a keras.Sequential, and back; the exported .keras file.

Keras models are channels-last: the model takes (N, H, W, C) images. Its layers are each layer's keras_layers, in
order; Flatten permutes to (C, H, W) order first, so the Dense weights after it carry over unchanged. The one Keras
layer of each of ours that holds weights gets them from keras_weights: conv kernels (K, C, R, S) -> (R, S, C, K),
Dense (in, out) as it is, BatchNormalization [gamma, beta, moving_mean, moving_variance]. A last Dense with
activation "softmax" keeps it, as a Keras model would: that model outputs probabilities where numba_cnn's Model
(whose loss applies the softmax) returns logits.

Reading goes the other way for any keras.Sequential whose layers each layer kind recognises (from_keras_layers),
built in Keras or by to_keras. A Flatten straight on a channels-last image (Keras's usual form, without our
Permute) reads the image in (H, W, C) order: the rows of the Dense weights after it are put in (C, H, W) order.
Files are loaded with safe_mode=True: a .keras file whose config would run code (a Lambda layer) is refused.
"""

import tempfile
from pathlib import Path

import numpy as np

from numba_cnn.atomic import atomic_write
from numba_cnn.interop.common import (InteropError, adopt, check_state, network_and_state, one_line, read_layers,
                                      require)


def channels_last(shape):
    """(C, H, W) -> (H, W, C); a flat (D,) stays."""
    return (*shape[1:], shape[0]) if len(shape) == 3 else tuple(shape)


def channels_first(shape):
    """(H, W, C) -> (C, H, W); a flat (D,) stays."""
    return (shape[-1], *shape[:-1]) if len(shape) == 3 else tuple(shape)


def _weighted(keras_layers, layer):
    holders = [k for k in keras_layers if k.weights]
    if len(holders) != 1:
        raise ValueError(f"{layer.label()}: expected one Keras layer with weights among {keras_layers}, "
                         f"found {len(holders)}")
    return holders[0]


def to_keras(model, state=None):
    """A numba_cnn Model, or a Network and its state ({"<layer>.<key>": host array}) -> a built keras.Sequential
    taking channels-last input, with the same weights. model.predict / model(x, training=False) for inference."""
    import keras

    network, state = network_and_state(model, state)
    per_layer = [layer.keras_layers(shape) for layer, shape in zip(network.layers, network.shapes)]
    model = keras.Sequential([keras.Input(shape=channels_last(network.input_shape))]
                             + [k for keras_layers in per_layer for k in keras_layers])
    for layer, shape, keras_layers in zip(network.layers, network.shapes, per_layer):
        weights = layer.keras_weights(layer.arrays(state, shape))
        if weights:
            _weighted(keras_layers, layer).set_weights([np.asarray(w, dtype=np.float32) for w in weights])
    return model


def from_keras(model, network=None):
    """A built keras.Sequential -> (network, {"<layer>.<key>": float32 array}).

    The network is read from the layers and the model's input shape; a layer no layer kind recognises is an
    InteropError naming it. With `network` given, the model must compute what it computes, and the state comes
    keyed by its layer names."""
    import keras

    if not isinstance(model, keras.Sequential):
        raise InteropError(f"a {type(model).__name__} is not a keras.Sequential: only a plain stack of layers is "
                           f"read")
    try:
        input_shape = channels_first(tuple(model.input_shape[1:]))
    except (AttributeError, ValueError):
        raise InteropError("the Keras model has no input shape: build it (keras.Input) first") from None
    found, groups = read_layers(list(model.layers), input_shape,
                                lambda kind, rest, shape: kind.from_keras_layers(rest, shape),
                                lambda number, part: f"layer {number} of the Keras model ({part.name}, "
                                                     f"{type(part).__name__})")
    state, rows = {}, None
    for layer, shape, group in zip(found.layers, found.shapes, groups):
        if len(shape) == 3 and type(group[0]) is keras.layers.Flatten:  # flattened in (H, W, C) order
            c, h, w = shape
            rows = np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()
        if layer.param_shapes(shape) or layer.buffer_shapes(shape):
            weights = [np.asarray(w, dtype=np.float32) for w in _weighted(group, layer).get_weights()]
            values = layer.from_keras_weights(weights)
            if rows is not None:  # the first weighted layer after that Flatten is the Dense that reads it
                values["w"], rows = values["w"][rows], None
            state.update({f"{layer.name}.{key}": np.ascontiguousarray(value) for key, value in values.items()})
    check_state(found, state, "the Keras model")
    return (found, state) if network is None else (network, adopt(found, state, network, "the Keras model"))


def save_keras(network, state, path):
    """to_keras's model as a .keras file at `path`, which appears whole or not at all (Keras writes it under a
    temporary name, then its bytes are moved into place)."""
    require("keras")
    model = to_keras(network, state)
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder) / "model.keras"
        model.save(staged)
        atomic_write(path, lambda f: f.write(staged.read_bytes()))


def load_keras(path, network=None):
    """A .keras file -> (network, state), as from_keras reads its model; loaded in Keras's safe mode, uncompiled."""
    keras = require("keras")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises many kinds (ValueError, OSError, TypeError, zip errors) on a bad file
        raise InteropError(f"{path}: cannot be loaded as a Keras model in safe mode ({one_line(exc)})") from None
    return from_keras(model, network)
