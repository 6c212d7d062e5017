"""Flatten, ReLU and Dropout: the layers that hold no parameters and change no shape but Flatten's.

Flatten reads the image in (C, H, W) order, PyTorch's; the Keras equivalent, on channels-last images, permutes to
that order first, so the Dense layer after it takes the same weights in both frameworks. A Keras model read back
that flattens the channels-last image as it is gets its next Dense's weights reordered (interop/keras.py).
"""

import dataclasses

from numba_cnn.network.layers.base import DescriptionError, Layer, number_in, one_of


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    kind = "Flatten"

    def output_shape(self, in_shape):
        size = 1
        for d in in_shape:
            size *= d
        return (size,)

    def forward(self, run, p, x):
        return run.layers.flatten(x), x.shape

    def backward(self, run, p, dy, cache, need_dx):
        return dy.reshape(cache), {}

    def torch_modules(self, in_shape):
        from torch import nn

        return [nn.Flatten()]

    def keras_layers(self, in_shape):
        import keras

        if len(in_shape) == 3:  # channels-last (H, W, C) -> (C, H, W) order, then flat
            return [keras.layers.Permute((3, 1, 2)), keras.layers.Flatten()]
        return [keras.layers.Flatten()]

    def onnx_nodes(self, graph, x, in_shape, p):
        return graph.node("Flatten", [x], axis=1)  # NCHW rows: (C, H, W) order, as here

    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        from torch import nn

        if not isinstance(modules[0], nn.Flatten):
            return None
        if (modules[0].start_dim, modules[0].end_dim) != (1, -1):
            raise DescriptionError("numba_cnn's Flatten flattens all but the batch axis (start_dim=1, end_dim=-1)")
        return cls(), 1

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        import keras

        first = keras_layers[0]
        permuted = (type(first) is keras.layers.Permute and tuple(first.get_config()["dims"]) == (3, 1, 2)
                    and len(keras_layers) > 1)  # to_keras's form
        flatten = keras_layers[1] if permuted else first
        if type(flatten) is not keras.layers.Flatten:
            return None
        one_of("data_format", flatten.get_config()["data_format"], ("channels_last",))
        return cls(), 1 + permuted


@dataclasses.dataclass(frozen=True)
class ReLU(Layer):
    kind = "ReLU"

    def forward(self, run, p, x):
        y = run.layers.relu_forward(x)
        return y, y

    def backward(self, run, p, dy, cache, need_dx):
        return run.layers.relu_backward(dy, cache), {}

    def torch_modules(self, in_shape):
        from torch import nn

        return [nn.ReLU()]

    def keras_layers(self, in_shape):
        import keras

        return [keras.layers.ReLU()]

    def onnx_nodes(self, graph, x, in_shape, p):
        return graph.node("Relu", [x])

    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        from torch import nn

        return (cls(), 1) if isinstance(modules[0], nn.ReLU) else None

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        import keras

        layer = keras_layers[0]
        if type(layer) is keras.layers.Activation:  # Activation("relu"); any other activation is no ReLU
            return (cls(), 1) if layer.get_config()["activation"] == "relu" else None
        if type(layer) is not keras.layers.ReLU:
            return None
        config = layer.get_config()
        if (config["max_value"], config["negative_slope"], config["threshold"]) != (None, 0.0, 0.0):
            raise DescriptionError("a capped, leaky or shifted ReLU (max_value, negative_slope, threshold): "
                                   "numba_cnn's ReLU is max(x, 0)")
        return cls(), 1


@dataclasses.dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: in training each value is kept with probability 1 - rate and scaled by 1 / (1 - rate);
    inference passes values through."""

    kind = "Dropout"
    rate: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "rate", number_in("rate", self.rate, 0.0, 1.0))

    def forward(self, run, p, x):
        if not run.training or self.rate == 0.0:
            return x, None
        flat, mask = run.layers.dropout_forward(x.reshape(x.shape[0], -1), self.rate, run.dropout_rng)
        return flat.reshape(x.shape), mask

    def backward(self, run, p, dy, cache, need_dx):
        if cache is None:
            return dy, {}
        return run.layers.dropout_backward(dy.reshape(cache.shape), cache).reshape(dy.shape), {}

    def torch_modules(self, in_shape):
        from torch import nn

        return [nn.Dropout(self.rate)]

    def keras_layers(self, in_shape):
        import keras

        return [keras.layers.Dropout(self.rate)]

    def onnx_nodes(self, graph, x, in_shape, p):
        return x  # inference passes values through: no node

    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        from torch import nn

        return (cls(modules[0].p), 1) if type(modules[0]) is nn.Dropout else None

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        import keras

        if type(keras_layers[0]) is not keras.layers.Dropout:
            return None
        one_of("noise_shape", keras_layers[0].get_config()["noise_shape"], (None,))
        return cls(keras_layers[0].get_config()["rate"]), 1
