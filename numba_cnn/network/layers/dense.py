"""Dense: y = x @ w + b on a flat input, weights (in, out) as Keras keeps them, with an optional ReLU. activation
"softmax" is allowed on the last layer only and means what it means in Keras's models: the network's outputs are
class probabilities. The loss applies that softmax (fused with the cross-entropy), so the layer itself returns the
logits.
"""

import dataclasses

import numpy as np

from numba_cnn.network.layers.base import (DescriptionError, Layer, glorot_uniform, one_of, positive_int,
                                           set_fields)


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    kind = "Dense"
    aliases = ("Linear",)
    units: int = 0
    activation: str | None = None
    in_features: int | None = None  # optional: the input size the author expects, checked against the shapes

    def __post_init__(self):
        set_fields(self, units=positive_int("units", self.units),
                   activation=one_of("activation", self.activation, (None, "relu", "softmax")),
                   in_features=None if self.in_features is None else positive_int("in_features", self.in_features))

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise DescriptionError(f"Dense needs a flat input, got an image of shape {list(in_shape)}: put "
                                   f"Flatten or GlobalAvgPool2D before it")
        if self.in_features is not None and self.in_features != in_shape[0]:
            raise DescriptionError(f"in_features is {self.in_features} but the layer before it gives "
                                   f"{in_shape[0]} values")
        return (self.units,)

    def param_shapes(self, in_shape):
        return {"w": (in_shape[0], self.units), "b": (self.units,)}

    def init(self, in_shape, rng, dtype):
        fan_in = in_shape[0]
        return {"w": glorot_uniform((fan_in, self.units), fan_in, self.units, rng, dtype),
                "b": np.zeros(self.units, dtype)}, {}

    def macs(self, in_shape):
        return in_shape[0] * self.units

    def forward(self, run, p, x):
        y = run.layers.dense_forward(x, p["w"], p["b"])
        if self.activation == "relu":
            y = run.layers.relu_forward(y)
        return y, (x, y)

    def backward(self, run, p, dy, cache, need_dx):
        x, y = cache
        if self.activation == "relu":
            dy = run.layers.relu_backward(dy, y)
        dx, dw, db = run.layers.dense_backward(dy, x, p["w"])
        return dx, {"w": dw, "b": db}

    def torch_modules(self, in_shape):
        from torch import nn

        modules = [nn.Linear(in_shape[0], self.units)]
        return modules + [nn.ReLU()] if self.activation == "relu" else modules

    def keras_layers(self, in_shape):
        import keras

        return [keras.layers.Dense(self.units, activation=self.activation)]

    def torch_state(self, p):
        return {"weight": p["w"].T, "bias": p["b"]}  # nn.Linear keeps (out, in)

    def from_torch_state(self, tensors):
        return {"w": tensors["weight"].T, "b": tensors["bias"]}

    def keras_weights(self, p):
        return [p["w"], p["b"]]  # (in, out), as here

    def from_keras_weights(self, weights):
        kernel, bias = weights
        return {"w": kernel, "b": bias}
