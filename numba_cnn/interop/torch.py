"""A Network and its state as a PyTorch nn.Sequential, and back; the exported state_dict file and its description.

The modules are each layer's torch_modules, in order; the one module of a layer that holds weights gets them from
the layer's torch_state (conv weights (K, C, R, S) as they are, Dense w (in, out) transposed to Linear's (out, in),
BatchNorm gamma, beta and running statistics as weight, bias, running_mean, running_var). Inputs are NCHW, as here.

Reading goes the other way for any nn.Sequential whose modules each layer kind recognises (from_torch_modules):
a model built in PyTorch, not only one that to_torch made. The file form (save_torch) is a state_dict of tensors
only, loaded with torch.load(weights_only=True), and beside it the network's description (<name>.json, the JSON
`train --model` reads), from which to_torch rebuilds the module.
"""

import json
from pathlib import Path

import numpy as np

from numba_cnn.atomic import atomic_write
from numba_cnn.interop.common import (InteropError, adopt, check_state, network_and_state, one_line, read_layers,
                                      require)
from numba_cnn.model import init_state
from numba_cnn.network import DescriptionError, from_dict, read_json


def _weighted(modules, layer):
    """The one module of `modules` (a layer's torch_modules) that holds parameters or buffers."""
    holders = [m for m in modules if m.state_dict()]
    if len(holders) != 1:
        raise ValueError(f"{layer.label()}: expected one PyTorch module with weights among {modules}, "
                         f"found {len(holders)}")
    return holders[0]


def _load(module, values, layer):
    import torch

    own = module.state_dict()
    with torch.no_grad():
        for name, value in values.items():
            target = own[name]
            value = np.asarray(value)
            if tuple(target.shape) != value.shape:
                raise ValueError(f"{layer.label()}: {name} has shape {value.shape}, PyTorch's module needs "
                                 f"{tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))  # shares storage with the module


def to_torch(model, state=None):
    """A numba_cnn Model, or a Network and its state ({"<layer>.<key>": host array}, e.g. Model.state_dict() or
    model.init_state) -> an nn.Sequential computing the same function (float32), in training mode as built: call
    .eval() for inference (Dropout off, BatchNorm on its running statistics). The last Dense gives logits."""
    from torch import nn

    network, state = network_and_state(model, state)
    modules = []
    for layer, shape in zip(network.layers, network.shapes):
        layer_modules = layer.torch_modules(shape)
        values = layer.torch_state(layer.arrays(state, shape))
        if values:
            _load(_weighted(layer_modules, layer), values, layer)
        modules += layer_modules
    return nn.Sequential(*modules)


def from_torch(module, input_shape=None, network=None):
    """An nn.Sequential (nested ones are read through) -> (network, {"<layer>.<key>": float32 array}).

    The network is read from the modules, for images of input_shape (C, H, W); a module no layer kind recognises
    is an InteropError naming it. With `network` given (input_shape then defaults to its own), the modules must
    compute what it computes, and the state comes keyed by its layer names."""
    if input_shape is None:
        if network is None:
            raise InteropError("reading a PyTorch model needs its input shape (C, H, W): modules do not record it")
        input_shape = network.input_shape
    modules = _modules(module)
    found, groups = read_layers(modules, input_shape, lambda kind, rest, shape: kind.from_torch_modules(rest, shape),
                                lambda number, part: f"module {number} of the nn.Sequential ({part!r})")
    state = {}
    for layer, shape, group in zip(found.layers, found.shapes, groups):
        if layer.param_shapes(shape) or layer.buffer_shapes(shape):
            tensors = {name: t.detach().cpu().numpy().astype(np.float32)
                       for name, t in _weighted(group, layer).state_dict().items()}
            state.update({f"{layer.name}.{key}": np.ascontiguousarray(value)
                          for key, value in layer.from_torch_state(tensors).items()})
    check_state(found, state, "the nn.Sequential")
    return (found, state) if network is None else (network, adopt(found, state, network, "the nn.Sequential"))


def _modules(module):
    """The modules of an nn.Sequential in the order they run, nested nn.Sequentials opened."""
    from torch import nn

    if not isinstance(module, nn.Sequential):
        raise InteropError(f"a {type(module).__name__} is not an nn.Sequential: the order in which a custom "
                           f"module's forward() runs its parts cannot be read; rebuild it as an nn.Sequential")
    return [leaf for child in module for leaf in (_modules(child) if isinstance(child, nn.Sequential) else [child])]


def description_path(weights_path):
    """Where the description of an exported state_dict lies: beside it, <name>.json."""
    return Path(weights_path).with_suffix(".json")


def save_torch(network, state, path):
    """The state_dict of to_torch's module (tensors only) at `path`, the description at description_path(path).
    Each file appears whole or not at all; the weights are in place before the description is."""
    torch = require("torch")
    tensors = {name: t.detach().clone() for name, t in to_torch(network, state).state_dict().items()}
    text = (json.dumps(network.to_dict(), indent=2) + "\n").encode("utf-8")

    def write_description(f):
        f.write(text)
        atomic_write(path, lambda weights: torch.save(tensors, weights))

    atomic_write(description_path(path), write_description)


def load_torch(path, network=None):
    """A state_dict file (save_torch's, or any torch.save(module.state_dict()) of the nn.Sequential that to_torch
    builds) -> (network, state). The network is the description beside the file, else `network`; with both, they
    must compute the same function. Loaded with weights_only=True: the file's pickle may hold tensors only."""
    torch = require("torch")
    path, described = Path(path), description_path(path)
    held = None
    if described.is_file():
        try:
            held = from_dict(read_json(described))
        except DescriptionError as exc:
            raise InteropError(f"{described} (the description beside {path.name}): {exc}") from None
    elif network is None:
        raise InteropError(f"{path}: no network description {described.name} beside it; name the network with "
                           f"--model")
    base = held if held is not None else network
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (UnpicklingError, RuntimeError, OSError, ...) on a bad file
        raise InteropError(f"{path}: not a PyTorch state_dict that loads with weights_only=True "
                           f"({one_line(exc)})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise InteropError(f"{path}: holds a {type(tensors).__name__}, not a state_dict ({{name: tensor}}); "
                           f"save one with torch.save(module.state_dict(), path)")
    module = to_torch(base, init_state(base, 0))
    _check_keys(module.state_dict(), tensors, base, path)
    module.load_state_dict(tensors, strict=False)  # the keys are checked above; num_batches_tracked may be absent
    return from_torch(module, network=base if network is None else network)


def _check_keys(wanted, tensors, network, path):
    """An InteropError naming the layer of the first tensor that is missing, misshapen or has no place."""
    owners = [layer for layer, shape in zip(network.layers, network.shapes) for _ in layer.torch_modules(shape)]
    for name, tensor in wanted.items():
        if name.endswith("num_batches_tracked"):
            continue
        owner = owners[int(name.split(".")[0])].label()
        if name not in tensors:
            raise InteropError(f"{path}: has no {name}, which {owner} needs")
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise InteropError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, {owner} needs "
                               f"{tuple(tensor.shape)}")
    extra = [name for name in tensors if name not in wanted]
    if extra:
        raise InteropError(f"{path}: holds {extra[0]}, which the network has no place for")
