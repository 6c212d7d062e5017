"""Dense: y = x @ w + b on a flat input, weights (in, out) as Keras keeps them, with an optional ReLU. activation
"softmax" is allowed on the last layer only and means what it means in Keras's models: the network's outputs are
class probabilities. The loss applies that softmax (fused with the cross-entropy), so the layer itself returns the
logits.
"""

import dataclasses

import numpy as np

from numba_cnn.network.layers.base import (DescriptionError, Layer, glorot_uniform, keras_activation, one_of,
                                           positive_int, set_fields, torch_relu_at)

ACTIVATIONS = (None, "relu", "softmax")


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    kind = "Dense"
    aliases = ("Linear",)
    units: int = 0
    activation: str | None = None
    in_features: int | None = None  # optional: the input size the author expects, checked against the shapes

    def __post_init__(self):
        set_fields(self, units=positive_int("units", self.units),
                   activation=one_of("activation", self.activation, ACTIVATIONS),
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

    def onnx_nodes(self, graph, x, in_shape, p):
        # the last Dense gives logits whatever its activation: the ONNX graph adds the softmax as its own output
        y = graph.node("Gemm", [x, graph.weight(self, "w", p), graph.weight(self, "b", p)])  # w is (in, out)
        return graph.node("Relu", [y]) if self.activation == "relu" else y

    def torch_state(self, p):
        return {"weight": p["w"].T, "bias": p["b"]}  # nn.Linear keeps (out, in)

    def from_torch_state(self, tensors):
        w = tensors["weight"].T
        return {"w": w, "b": tensors.get("bias", np.zeros(w.shape[1], w.dtype))}  # bias=False: a zero bias here

    def keras_weights(self, p):
        return [p["w"], p["b"]]  # (in, out), as here

    def from_keras_weights(self, weights):
        kernel, *bias = weights  # use_bias=False: a zero bias here
        return {"w": kernel, "b": bias[0] if bias else np.zeros(kernel.shape[1], kernel.dtype)}

    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        from torch import nn

        linear = modules[0]
        if not isinstance(linear, nn.Linear):
            return None
        cls(linear.out_features, in_features=linear.in_features).output_shape(in_shape)  # the sizes must chain
        relu = torch_relu_at(modules, 1)
        return cls(linear.out_features, activation="relu" if relu else None), 1 + relu

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        import keras

        if type(keras_layers[0]) is not keras.layers.Dense:
            return None
        config = keras_layers[0].get_config()
        return cls(config["units"], activation=keras_activation(config["activation"], ACTIVATIONS)), 1
