"""What every layer kind is: a frozen dataclass of its settings, from which its shapes, parameters, FLOPs, passes
and framework equivalents follow. Each kind is one module in this folder, registered in `KINDS` (layers/__init__.py).

A kind implements, for an input of shape `in_shape` ((C, H, W) or (D,), the batch left out):
  output_shape(in_shape)               -> the output's shape; DescriptionError when the settings cannot apply
  param_shapes(in_shape)               -> {short name: shape} of its trainable parameters, in init order
  buffer_shapes(in_shape)              -> {short name: shape} of state that is saved but not trained
  init(in_shape, rng, dtype)           -> ({name: array} parameters, {name: array} buffers)
  forward(run, p, x)                   -> (y, cache); p maps short names to this layer's arrays
  backward(run, p, dy, cache, need_dx) -> (dx or None, {short name: gradient})
  macs(in_shape)                       -> multiply-adds of one image's forward pass (dense count)
  torch_modules(in_shape) / keras_layers(in_shape) -> the same layer in PyTorch / Keras (imported lazily)
  onnx_nodes(graph, x, in_shape, p)    -> its inference as ONNX nodes (numba_cnn/interop/onnx.py)
and, as classmethods, from_torch_modules / from_keras_layers: the kind read back out of a foreign model.
`run` is the Run of the pass (network/run.py): the backend's ops, its small layers, training or not, the RNG.
"""

import dataclasses
from typing import ClassVar

import numpy as np

from numba_cnn.errors import NumbaCNNError


class DescriptionError(NumbaCNNError):
    """A network description that cannot be built; the message names the layer."""


def glorot_uniform(shape, fan_in, fan_out, rng, dtype):
    """Keras's default kernel initialiser: U(-l, l), l = sqrt(6 / (fan_in + fan_out))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Layer:
    """Settings shared by every kind: an optional name (unique in the network; made from the kind when left out)."""

    kind: ClassVar[str] = ""
    aliases: ClassVar[tuple] = ()  # other names the description accepts (Keras's spellings)
    name: str | None = dataclasses.field(default=None, kw_only=True)

    def output_shape(self, in_shape):
        return in_shape

    def param_shapes(self, in_shape):
        return {}

    def buffer_shapes(self, in_shape):
        return {}

    def init(self, in_shape, rng, dtype):
        return {}, {}

    def macs(self, in_shape):
        return 0

    def forward(self, run, p, x):
        raise NotImplementedError

    def backward(self, run, p, dy, cache, need_dx):
        raise NotImplementedError

    def torch_modules(self, in_shape):
        raise NotImplementedError(f"{self.kind} has no PyTorch equivalent")

    def keras_layers(self, in_shape):
        raise NotImplementedError(f"{self.kind} has no Keras equivalent")

    def arrays(self, state, in_shape):
        """This layer's parameters and buffers out of a network-wide {"<layer>.<key>": array} dict, by short key
        ({"w": ..., "b": ...}): what forward, backward and the weight conversions below take as `p`."""
        keys = (*self.param_shapes(in_shape), *self.buffer_shapes(in_shape))
        return {key: state[f"{self.name}.{key}"] for key in keys}

    # Weight conversion for numba_cnn.interop: `p` (this layer's arrays, as `arrays` gives them) to the state of the
    # one PyTorch module / Keras layer of torch_modules / keras_layers that holds weights, and back. Kinds without
    # parameters or buffers keep these defaults.
    def torch_state(self, p):
        """{PyTorch attribute name: array} of the weighted module, in PyTorch's layout."""
        return {}

    def from_torch_state(self, tensors):
        """The inverse of torch_state: {attribute name: array} -> {short key: array}."""
        return {}

    def keras_weights(self, p):
        """The weighted Keras layer's get_weights() list, in Keras's order and layout."""
        return []

    def from_keras_weights(self, weights):
        """The inverse of keras_weights: a get_weights() list -> {short key: array}."""
        return {}

    def onnx_nodes(self, graph, x, in_shape, p):
        """Add this layer's inference pass to `graph` (interop.onnx.OnnxGraph), reading the tensor named `x` of
        shape (N, *in_shape); `p` as `arrays` gives it. -> the name of the output tensor."""
        raise NotImplementedError(f"{self.kind} has no ONNX equivalent")

    # Reading a model built in PyTorch or Keras (numba_cnn.interop.from_torch / from_keras): given the modules (the
    # Keras layers) not yet read, each starting a layer whose input has shape `in_shape`, a kind whose equivalent
    # they start with returns (the layer, how many of them it stands for), any other kind None. Settings this kind
    # cannot take raise DescriptionError naming the setting.
    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        return None

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        return None

    def to_dict(self):
        """The description's entry for this layer: its kind, then every setting that differs from the default."""
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def label(self):
        return f"{self.name} ({self.kind})" if self.name else self.kind


def spatial(layer, in_shape):
    """in_shape as (C, H, W), or a DescriptionError saying the layer needs an image."""
    if len(in_shape) != 3:
        raise DescriptionError(f"{layer.kind} needs an image (C, H, W) as input, got a flat vector of "
                               f"{in_shape[0]} values: it cannot follow Flatten, Dense or global pooling")
    return in_shape


# ---- setting checks: each returns the normalised value or raises DescriptionError naming the setting

def positive_int(setting, value, least=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise DescriptionError(f"{setting} must be an integer of at least {least}, got {value!r}")
    return int(value)


def positive_pair(setting, value):
    """An int k or a pair [a, b] of positive ints -> (a, b)."""
    values = [value, value] if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) != 2:
        raise DescriptionError(f"{setting} must be a positive integer or a pair of them, got {value!r}")
    return tuple(positive_int(setting, v) for v in values)


def one_of(setting, value, choices):
    if value not in choices:
        shown = ", ".join("none" if c is None else repr(c) for c in choices)
        raise DescriptionError(f"{setting} must be one of {shown}, got {value!r}")
    return value


def number_in(setting, value, low, high, low_open=False):
    """A number in [low, high) (or (low, high) with low_open)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and np.isfinite(value)
          and (value > low if low_open else value >= low) and value < high)
    if not ok:
        raise DescriptionError(f"{setting} must be a number in {'(' if low_open else '['}{low}, {high}), "
                               f"got {value!r}")
    return float(value)


def keras_activation(name, choices):
    """A Keras layer's activation name -> the setting here ('linear', Keras's none, is None), one of `choices`."""
    return one_of("activation", None if name == "linear" else name, choices)


def torch_relu_at(modules, index):
    """Whether modules[index] is an nn.ReLU: a convolution or Linear followed by one reads as activation 'relu'."""
    from torch import nn

    return index < len(modules) and isinstance(modules[index], nn.ReLU)


def set_fields(layer, **values):
    """Store normalised settings on a frozen dataclass (used from __post_init__)."""
    for key, value in values.items():
        object.__setattr__(layer, key, value)
