"""Conv2D: a 2-D cross-correlation with a bias per filter, any kernel size, stride, 'valid' or 'same' padding and an
optional fused ReLU, as Keras's Conv2D (channels first here: weights (K, C, R, S), PyTorch's layout).

'same' pads so that the output is ceil(H / stride) rows, as TensorFlow does: the total padding is
max((out - 1) * stride + R - H, 0), split with the extra row (if odd) at the bottom and the extra column at the right.
"""

import dataclasses

import numpy as np

from numba_cnn.kernels.contract import conv_output_size
from numba_cnn.network.layers.base import (DescriptionError, Layer, glorot_uniform, one_of, positive_int,
                                           positive_pair, set_fields, spatial)

ACTIVATIONS = (None, "relu")


def same_padding(size, kernel, stride):
    """(before, after) zeros along one axis so that a 'same' convolution gives ceil(size / stride) outputs."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@dataclasses.dataclass(frozen=True)
class Conv2D(Layer):
    kind = "Conv2D"
    aliases = ("Conv2d", "Convolution2D")
    filters: int = 0
    kernel_size: tuple = 3
    strides: int = 1
    padding: str = "valid"
    activation: str | None = None

    def __post_init__(self):
        set_fields(self, filters=positive_int("filters", self.filters),
                   kernel_size=positive_pair("kernel_size", self.kernel_size),
                   strides=positive_int("strides", self.strides),
                   padding=one_of("padding", self.padding, ("valid", "same")),
                   activation=one_of("activation", self.activation, ACTIVATIONS))

    def pads(self, in_shape):
        """(top, bottom, left, right) zero rows and columns, as the kernel contract takes them."""
        _, h, w = in_shape
        r, s = self.kernel_size
        if self.padding == "valid":
            return (0, 0, 0, 0)
        return same_padding(h, r, self.strides) + same_padding(w, s, self.strides)

    def output_shape(self, in_shape):
        _, h, w = spatial(self, in_shape)
        r, s = self.kernel_size
        top, bottom, left, right = self.pads(in_shape)
        if r > h + top + bottom or s > w + left + right:
            raise DescriptionError(f"its {r}x{s} kernel does not fit in the {h}x{w} image it gets "
                                   f"(padding {self.padding!r})")
        return (self.filters, conv_output_size(h, r, self.strides, top, bottom),
                conv_output_size(w, s, self.strides, left, right))

    def param_shapes(self, in_shape):
        return {"w": (self.filters, in_shape[0]) + self.kernel_size, "b": (self.filters,)}

    def init(self, in_shape, rng, dtype):
        k, c, r, s = self.param_shapes(in_shape)["w"]
        w = glorot_uniform((k, c, r, s), c * r * s, k * r * s, rng, dtype)
        return {"w": w, "b": np.zeros((k,), dtype)}, {}

    def macs(self, in_shape):
        k, p, q = self.output_shape(in_shape)
        r, s = self.kernel_size
        return k * p * q * in_shape[0] * r * s

    def forward(self, run, p, x):
        y = run.ops.conv2d_forward(x, p["w"], p["b"], relu=self.activation == "relu", stride=self.strides,
                                   padding=self.pads(x.shape[1:]))
        return y, (x, y)

    def backward(self, run, p, dy, cache, need_dx):
        x, y = cache
        if self.activation == "relu":
            dy = run.layers.relu_backward(dy, y)
        dx, dw, db = run.ops.conv2d_backward(dy, x, p["w"], need_dx=need_dx, stride=self.strides,
                                             padding=self.pads(x.shape[1:]))
        return dx, {"w": dw, "b": db}

    def torch_modules(self, in_shape):
        from torch import nn

        top, bottom, left, right = self.pads(in_shape)
        modules = []
        if (top, left) != (bottom, right):  # PyTorch pads symmetrically; an odd total needs an explicit pad first
            modules.append(nn.ZeroPad2d((left, right, top, bottom)))
            top = left = 0
        modules.append(nn.Conv2d(in_shape[0], self.filters, self.kernel_size, stride=self.strides,
                                 padding=(top, left)))
        if self.activation == "relu":
            modules.append(nn.ReLU())
        return modules

    def keras_layers(self, in_shape):
        import keras

        return [keras.layers.Conv2D(self.filters, self.kernel_size, strides=self.strides, padding=self.padding,
                                    activation=self.activation)]

    def torch_state(self, p):
        return {"weight": p["w"], "bias": p["b"]}  # (K, C, R, S) is PyTorch's layout already

    def from_torch_state(self, tensors):
        return {"w": tensors["weight"], "b": tensors["bias"]}

    def keras_weights(self, p):
        return [p["w"].transpose(2, 3, 1, 0), p["b"]]  # Keras's kernel is (R, S, C, K)

    def from_keras_weights(self, weights):
        kernel, bias = weights
        return {"w": kernel.transpose(3, 2, 0, 1), "b": bias}

