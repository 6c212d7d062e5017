"""What reading and writing other frameworks' models share: the error they raise, the (network, state) of a Model,
the walk that reads a foreign model's parts as numba_cnn layers, and moving a state onto a network that computes the
same function under other layer names."""

import dataclasses
import importlib

from numba_cnn.errors import NumbaCNNError
from numba_cnn.network import KINDS, DescriptionError, build
from numba_cnn.network.layers import Conv2D, Dense, ReLU

INSTALL = {"onnx": "export", "torch": "baselines", "keras": "baselines"}  # the extra that brings each


class InteropError(NumbaCNNError):
    """A model or file that cannot be exported or imported; the message names the layer or the file."""


def require(module):
    """Import an optional dependency, or an InteropError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InteropError(f"{module} is not installed ({exc}): pip install -e \".[{INSTALL[module]}]\"") from None


def one_line(exc):
    """An exception from another library as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def network_and_state(model, state=None):
    """A numba_cnn Model (its network and current state), or a Network with its state dict -> (network, state)."""
    if state is None:
        return model.network, model.state_dict()
    return model, state


def read_layers(parts, input_shape, read, label):
    """A foreign model's parts (modules, Keras layers) in order -> (Network, [the parts each layer stands for]).

    read(kind, rest, shape) asks a layer kind whether `rest` (the parts not yet read, entering with `shape`) starts
    with its equivalent: (layer, parts used) or None. label(number, part) names a part in messages. A part no kind
    claims, or a claimed one with settings numba_cnn lacks, is an InteropError naming it."""
    kinds = list(dict.fromkeys(KINDS.values()))
    layers, groups, shape, start = [], [], tuple(input_shape), 0
    while start < len(parts):
        rest = parts[start:]
        try:
            found = next(filter(None, (read(kind, rest, shape) for kind in kinds)), None)
            if found is None:
                raise InteropError(f"{label(start + 1, rest[0])} has no numba_cnn equivalent; numba_cnn's layer "
                                   f"kinds are {', '.join(kind.kind for kind in kinds)}")
            layer, used = found
            shape = layer.output_shape(shape)
        except DescriptionError as exc:
            raise InteropError(f"{label(start + 1, rest[0])}: {exc}") from None
        layers.append(layer)
        groups.append(rest[:used])
        start += used
    try:
        return build(layers, input_shape), groups
    except DescriptionError as exc:
        raise InteropError(f"read as numba_cnn layers, the model is no numba_cnn network: {exc}") from None


def check_state(network, state, where):
    """An InteropError naming the first layer whose arrays in `state` do not have its shapes."""
    for layer, shape in zip(network.layers, network.shapes):
        for key, wanted in {**layer.param_shapes(shape), **layer.buffer_shapes(shape)}.items():
            got = state[f"{layer.name}.{key}"].shape
            if tuple(got) != tuple(wanted):
                raise InteropError(f"{where}: {layer.label()} has {key} of shape {tuple(got)}, its input "
                                   f"{list(shape)} needs {tuple(wanted)}")


def canonical(network):
    """The network with what changes neither its function nor its training left out: layer names, Dense's
    in_features, the last layer's softmax (the loss applies it) and a bare ReLU after a Conv2D or Dense without
    activation (folded into it): two networks equal in this form take each other's weights."""
    layers = []
    for layer in network.layers:
        layer = dataclasses.replace(layer, name=None)
        if isinstance(layer, Dense):
            layer = dataclasses.replace(layer, in_features=None,
                                        activation=None if layer.activation == "softmax" else layer.activation)
        if isinstance(layer, ReLU) and layers and isinstance(layers[-1], (Conv2D, Dense)) \
                and layers[-1].activation is None:
            layers[-1] = dataclasses.replace(layers[-1], activation="relu")
            continue
        layers.append(layer)
    return build(layers, network.input_shape)


def adopt(source, state, target, where):
    """`state` of network `source` as the state of `target` (its layer names), which must compute the same
    function; an InteropError naming the first layer that differs otherwise."""
    if source is target:
        return state
    difference = canonical(target).first_difference(canonical(source))
    if difference:
        raise InteropError(f"{where} holds another network than the one asked for: {difference} (asked for, "
                           f"then found)")
    out = {}
    for (mine, keys), (theirs, _) in zip(weighted(target), weighted(source)):
        out.update({f"{mine.name}.{key}": state[f"{theirs.name}.{key}"] for key in keys})
    return out


def weighted(network):
    """(layer, the short keys of its arrays) for each layer that holds parameters or buffers, in order."""
    pairs = [(layer, (*layer.param_shapes(shape), *layer.buffer_shapes(shape)))
             for layer, shape in zip(network.layers, network.shapes)]
    return [(layer, keys) for layer, keys in pairs if keys]
