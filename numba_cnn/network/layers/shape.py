"""Flatten, ReLU and Dropout: the layers that hold no parameters and change no shape but Flatten's.

Flatten reads the image in (C, H, W) order, PyTorch's; the Keras equivalent, on channels-last images, permutes to
that order first, so the Dense layer after it takes the same weights in both frameworks.
"""

import dataclasses

from numba_cnn.network.layers.base import Layer, number_in


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    kind = "Flatten"

    def output_shape(self, in_shape):
        size = 1
        for d in in_shape:
            size *= d
        return (size,)

    def forward(self, run, p, x):
        return x.reshape(x.shape[0], -1), x.shape

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
