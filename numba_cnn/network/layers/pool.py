"""MaxPool2D, AvgPool2D and GlobalAvgPool2D: windows of pool_size with a stride equal to the window, as Keras's
default (strides=None) and PyTorch's (stride=kernel_size); rows and columns that fill no window are dropped
('valid'). Global average pooling is an average pool whose window is the whole image, flattened to (C,).
"""

import dataclasses

from numba_cnn.network.layers.base import DescriptionError, Layer, one_of, positive_pair, set_fields, spatial


@dataclasses.dataclass(frozen=True)
class _Pool(Layer):
    """What max and average pooling share; each names its equivalent in PyTorch (torch.nn), Keras (keras.layers)
    and ONNX (the operator)."""

    torch_name = keras_name = onnx_op = ""
    pool_size: tuple = 2
    strides: tuple | None = None

    def __post_init__(self):
        size = positive_pair("pool_size", self.pool_size)
        if self.strides is not None and positive_pair("strides", self.strides) != size:
            raise DescriptionError(f"strides must equal pool_size ({list(size)}): overlapping or gapped windows "
                                   f"are not supported, got {self.strides!r}")
        set_fields(self, pool_size=size, strides=None)

    def output_shape(self, in_shape):
        c, h, w = spatial(self, in_shape)
        kh, kw = self.pool_size
        if kh > h or kw > w:
            raise DescriptionError(f"its {kh}x{kw} window does not fit in the {h}x{w} image it gets")
        return (c, h // kh, w // kw)

    def torch_modules(self, in_shape):
        from torch import nn

        return [getattr(nn, self.torch_name)(self.pool_size)]

    def keras_layers(self, in_shape):
        import keras

        return [getattr(keras.layers, self.keras_name)(self.pool_size)]

    def onnx_nodes(self, graph, x, in_shape, p):
        return graph.node(self.onnx_op, [x], kernel_shape=list(self.pool_size), strides=list(self.pool_size))

    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        from torch import nn

        pool = modules[0]
        if type(pool) is not getattr(nn, cls.torch_name):
            return None
        one_of("padding", pool.padding, (0, (0, 0)))
        one_of("ceil_mode", pool.ceil_mode, (False,))
        if getattr(pool, "dilation", 1) != 1 or getattr(pool, "divisor_override", None) is not None:
            raise DescriptionError("a dilated window or a divisor override: numba_cnn's pools have neither")
        return cls(pool.kernel_size, strides=pool.stride), 1

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        import keras

        if type(keras_layers[0]) is not getattr(keras.layers, cls.keras_name):
            return None
        config = keras_layers[0].get_config()
        one_of("data_format", config["data_format"], ("channels_last",))
        one_of("padding", config["padding"], ("valid",))
        return cls(tuple(config["pool_size"]), strides=tuple(config["strides"] or config["pool_size"])), 1


@dataclasses.dataclass(frozen=True)
class MaxPool2D(_Pool):
    kind = "MaxPool2D"
    aliases = ("MaxPooling2D", "MaxPool2d")
    torch_name, keras_name, onnx_op = "MaxPool2d", "MaxPooling2D", "MaxPool"

    def forward(self, run, p, x):
        y, argmax = run.ops.maxpool2d_forward(x, size=self.pool_size)
        return y, (argmax, x.shape)

    def backward(self, run, p, dy, cache, need_dx):
        argmax, x_shape = cache
        return run.ops.maxpool2d_backward(dy, argmax, x_shape, size=self.pool_size), {}


@dataclasses.dataclass(frozen=True)
class AvgPool2D(_Pool):
    kind = "AvgPool2D"
    aliases = ("AveragePooling2D", "AvgPool2d")
    torch_name, keras_name, onnx_op = "AvgPool2d", "AveragePooling2D", "AveragePool"

    def forward(self, run, p, x):
        return run.ops.avgpool2d_forward(x, size=self.pool_size), x.shape

    def backward(self, run, p, dy, cache, need_dx):
        return run.ops.avgpool2d_backward(dy, cache, size=self.pool_size), {}


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool2D(Layer):
    kind = "GlobalAvgPool2D"
    aliases = ("GlobalAveragePooling2D",)

    def output_shape(self, in_shape):
        return (spatial(self, in_shape)[0],)

    def forward(self, run, p, x):
        n, c, h, w = x.shape
        return run.ops.avgpool2d_forward(x, size=(h, w)).reshape(n, c), x.shape

    def backward(self, run, p, dy, cache, need_dx):
        n, c, h, w = cache
        return run.ops.avgpool2d_backward(dy.reshape(n, c, 1, 1), cache, size=(h, w)), {}

    def torch_modules(self, in_shape):
        from torch import nn

        return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]

    def keras_layers(self, in_shape):
        import keras

        return [keras.layers.GlobalAveragePooling2D()]

    def onnx_nodes(self, graph, x, in_shape, p):
        return graph.node("Flatten", [graph.node("GlobalAveragePool", [x])], axis=1)

    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        from torch import nn

        if not isinstance(modules[0], nn.AdaptiveAvgPool2d):
            return None
        one_of("output_size", positive_pair("output_size", modules[0].output_size), ((1, 1),))
        if len(modules) < 2 or not isinstance(modules[1], nn.Flatten) or (modules[1].start_dim,
                                                                           modules[1].end_dim) != (1, -1):
            raise DescriptionError("global average pooling is AdaptiveAvgPool2d(1) then Flatten() here")
        return cls(), 2

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        import keras

        if type(keras_layers[0]) is not keras.layers.GlobalAveragePooling2D:
            return None
        config = keras_layers[0].get_config()
        one_of("data_format", config["data_format"], ("channels_last",))
        one_of("keepdims", config["keepdims"], (False,))
        return cls(), 1
