"""Conv2D: a 2-D cross-correlation with a bias per filter, any kernel size, stride, 'valid' or 'same' padding and an
optional fused ReLU, as Keras's Conv2D (channels first here: weights (K, C, R, S), PyTorch's layout).

'same' pads so that the output is ceil(H / stride) rows, as TensorFlow does: the total padding is
max((out - 1) * stride + R - H, 0), split with the extra row (if odd) at the bottom and the extra column at the right.
"""

import dataclasses

import numpy as np

from numba_cnn.kernels.contract import conv_output_size
from numba_cnn.network.layers.base import (DescriptionError, Layer, glorot_uniform, keras_activation, one_of,
                                           positive_int, positive_pair, set_fields, spatial, torch_relu_at)

ACTIVATIONS = (None, "relu")


def same_padding(size, kernel, stride):
    """(before, after) zeros along one axis so that a 'same' convolution gives ceil(size / stride) outputs."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _with_padding(conv, pads, in_shape):
    """`conv` with the padding, 'valid' or 'same', that pads in_shape by `pads` (top, bottom, left, right)."""
    for padding in ("valid", "same"):
        layer = dataclasses.replace(conv, padding=padding)
        if layer.pads(in_shape) == tuple(pads):
            return layer
    raise DescriptionError(f"its padding {list(pads)} (top, bottom, left, right) is neither 'valid' nor 'same' "
                           f"for its {in_shape[1]}x{in_shape[2]} input")


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
        # y only where the backward's ReLU reads it: kept, it would outlive its use (an owner frees what no cache holds)
        return y, (x, y if self.activation == "relu" else None)

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

    def onnx_nodes(self, graph, x, in_shape, p):
        top, bottom, left, right = self.pads(in_shape)
        y = graph.node("Conv", [x, graph.weight(self, "w", p), graph.weight(self, "b", p)],
                       kernel_shape=list(self.kernel_size), strides=[self.strides] * 2,
                       pads=[top, left, bottom, right])  # ONNX orders pads as all starts, then all ends
        return graph.node("Relu", [y]) if self.activation == "relu" else y

    def torch_state(self, p):
        return {"weight": p["w"], "bias": p["b"]}  # (K, C, R, S) is PyTorch's layout already

    def from_torch_state(self, tensors):
        w = tensors["weight"]
        return {"w": w, "b": tensors.get("bias", np.zeros(len(w), w.dtype))}  # bias=False: a zero bias here

    def keras_weights(self, p):
        return [p["w"].transpose(2, 3, 1, 0), p["b"]]  # Keras's kernel is (R, S, C, K)

    def from_keras_weights(self, weights):
        kernel, *bias = weights  # use_bias=False: a zero bias here
        return {"w": kernel.transpose(3, 2, 0, 1),
                "b": bias[0] if bias else np.zeros(kernel.shape[-1], kernel.dtype)}

    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        from torch import nn

        extra, used = (0, 0, 0, 0), 0  # an nn.ZeroPad2d before the convolution: its (left, right, top, bottom)
        if isinstance(modules[0], nn.ZeroPad2d) and len(modules) > 1 and isinstance(modules[1], nn.Conv2d):
            left, right, top, bottom = modules[0].padding
            extra, used = (top, bottom, left, right), 1
        conv = modules[used]
        if not isinstance(conv, nn.Conv2d):
            return None
        one_of("groups", conv.groups, (1,))
        one_of("dilation", tuple(conv.dilation), ((1, 1),))
        one_of("padding_mode", conv.padding_mode, ("zeros",))
        strides = positive_pair("stride", conv.stride)
        if strides[0] != strides[1]:
            raise DescriptionError(f"stride {list(strides)}: numba_cnn's Conv2D takes one stride for both axes")
        kernel = positive_pair("kernel_size", conv.kernel_size)
        if conv.padding == "same":  # PyTorch's 'same' (stride 1 only) splits the padding as TensorFlow does
            pads = cls(conv.out_channels, kernel, padding="same").pads(spatial(cls, in_shape))
        else:
            pad_h, pad_w = (0, 0) if conv.padding == "valid" else conv.padding
            pads = (pad_h, pad_h, pad_w, pad_w)
        pads = tuple(a + b for a, b in zip(pads, extra))
        layer = _with_padding(cls(conv.out_channels, kernel, strides=strides[0]), pads, spatial(cls, in_shape))
        relu = torch_relu_at(modules, used + 1)
        return (dataclasses.replace(layer, activation="relu") if relu else layer), used + 1 + relu

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        import keras

        conv = keras_layers[0]
        if type(conv) is not keras.layers.Conv2D:
            return None
        config = conv.get_config()
        one_of("data_format", config["data_format"], ("channels_last",))
        one_of("dilation_rate", tuple(config["dilation_rate"]), ((1, 1),))
        one_of("groups", config["groups"], (1,))
        strides = positive_pair("strides", config["strides"])
        if strides[0] != strides[1]:
            raise DescriptionError(f"strides {list(strides)}: numba_cnn's Conv2D takes one stride for both axes")
        return cls(config["filters"], tuple(config["kernel_size"]), strides=strides[0], padding=config["padding"],
                   activation=keras_activation(config["activation"], ACTIVATIONS)), 1

