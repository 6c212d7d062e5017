"""MaxPool2D, AvgPool2D and GlobalAvgPool2D: windows of pool_size with a stride equal to the window, as Keras's
default (strides=None) and PyTorch's (stride=kernel_size); rows and columns that fill no window are dropped
('valid'). Global average pooling is an average pool whose window is the whole image, flattened to (C,).
"""

import dataclasses

from numba_cnn.network.layers.base import DescriptionError, Layer, positive_pair, set_fields, spatial


@dataclasses.dataclass(frozen=True)
class _Pool(Layer):
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


@dataclasses.dataclass(frozen=True)
class MaxPool2D(_Pool):
    kind = "MaxPool2D"
    aliases = ("MaxPooling2D", "MaxPool2d")

    def forward(self, run, p, x):
        y, argmax = run.ops.maxpool2d_forward(x, size=self.pool_size)
        return y, (argmax, x.shape)

    def backward(self, run, p, dy, cache, need_dx):
        argmax, x_shape = cache
        return run.ops.maxpool2d_backward(dy, argmax, x_shape, size=self.pool_size), {}

    def torch_modules(self, in_shape):
        from torch import nn

        return [nn.MaxPool2d(self.pool_size)]

    def keras_layers(self, in_shape):
        import keras

        return [keras.layers.MaxPooling2D(self.pool_size)]


@dataclasses.dataclass(frozen=True)
class AvgPool2D(_Pool):
    kind = "AvgPool2D"
    aliases = ("AveragePooling2D", "AvgPool2d")

    def forward(self, run, p, x):
        return run.ops.avgpool2d_forward(x, size=self.pool_size), x.shape

    def backward(self, run, p, dy, cache, need_dx):
        return run.ops.avgpool2d_backward(dy, cache, size=self.pool_size), {}

    def torch_modules(self, in_shape):
        from torch import nn

        return [nn.AvgPool2d(self.pool_size)]

    def keras_layers(self, in_shape):
        import keras

        return [keras.layers.AveragePooling2D(self.pool_size)]


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
