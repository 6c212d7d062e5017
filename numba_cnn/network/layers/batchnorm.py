"""BatchNorm2D: each channel normalised over the batch and the image in training, by running statistics in
inference, then scaled by gamma and shifted by beta. Keras's conventions: momentum 0.99 (running = 0.99 * running +
0.01 * batch statistic), epsilon 1e-3, the biased batch variance in the running variance. The running statistics
are buffers: saved in checkpoints, never trained.
"""

import dataclasses

import numpy as np

from numba_cnn.network.layers.base import DescriptionError, Layer, number_in, one_of, set_fields, spatial


@dataclasses.dataclass(frozen=True)
class BatchNorm2D(Layer):
    kind = "BatchNorm2D"
    aliases = ("BatchNormalization", "BatchNorm2d")
    momentum: float = 0.99
    epsilon: float = 1e-3

    def __post_init__(self):
        set_fields(self, momentum=number_in("momentum", self.momentum, 0.0, 1.0),
                   epsilon=number_in("epsilon", self.epsilon, 0.0, 1.0, low_open=True))

    def output_shape(self, in_shape):
        return spatial(self, in_shape)

    def param_shapes(self, in_shape):
        return {"gamma": (in_shape[0],), "beta": (in_shape[0],)}

    def buffer_shapes(self, in_shape):
        return {"running_mean": (in_shape[0],), "running_var": (in_shape[0],)}

    def init(self, in_shape, rng, dtype):
        c = in_shape[0]
        return ({"gamma": np.ones(c, dtype), "beta": np.zeros(c, dtype)},
                {"running_mean": np.zeros(c, dtype), "running_var": np.ones(c, dtype)})

    def macs(self, in_shape):
        c, h, w = in_shape
        return 2 * c * h * w  # a subtraction and a multiply-add per element, counted as two

    def forward(self, run, p, x):
        y, mean, inv_std = run.ops.batchnorm2d_forward(x, p["gamma"], p["beta"], p["running_mean"],
                                                       p["running_var"], momentum=self.momentum, eps=self.epsilon,
                                                       training=run.training)
        return y, (x, mean, inv_std)

    def backward(self, run, p, dy, cache, need_dx):
        x, mean, inv_std = cache
        dx, dgamma, dbeta = run.ops.batchnorm2d_backward(dy, x, p["gamma"], mean, inv_std)
        return dx, {"gamma": dgamma, "beta": dbeta}

    def torch_modules(self, in_shape):
        from torch import nn

        return [nn.BatchNorm2d(in_shape[0], eps=self.epsilon, momentum=1.0 - self.momentum)]

    def keras_layers(self, in_shape):
        import keras

        return [keras.layers.BatchNormalization(momentum=self.momentum, epsilon=self.epsilon)]

    def onnx_nodes(self, graph, x, in_shape, p):
        inputs = [x] + [graph.weight(self, key, p) for key in ("gamma", "beta", "running_mean", "running_var")]
        return graph.node("BatchNormalization", inputs, epsilon=self.epsilon)  # inference: the running statistics

    @classmethod
    def from_torch_modules(cls, modules, in_shape):
        from torch import nn

        bn = modules[0]
        if not isinstance(bn, nn.BatchNorm2d):
            return None
        if not (bn.affine and bn.track_running_stats) or bn.momentum is None:
            raise DescriptionError("numba_cnn's BatchNorm2D has a scale and shift (affine=True) and running "
                                   "statistics kept with a momentum (track_running_stats=True, momentum a number)")
        return cls(momentum=round(1.0 - bn.momentum, 12), epsilon=bn.eps), 1  # rounded: 1 - (1 - m) is not m

    @classmethod
    def from_keras_layers(cls, keras_layers, in_shape):
        import keras

        if type(keras_layers[0]) is not keras.layers.BatchNormalization:
            return None
        config = keras_layers[0].get_config()
        one_of("axis", config["axis"], (-1, 3, [3], [-1]))  # the channels of a channels-last image
        if not (config["center"] and config["scale"]):
            raise DescriptionError("numba_cnn's BatchNorm2D has a scale and shift (center=True, scale=True)")
        return cls(momentum=config["momentum"], epsilon=config["epsilon"]), 1

    def torch_state(self, p):
        return {"weight": p["gamma"], "bias": p["beta"], "running_mean": p["running_mean"],
                "running_var": p["running_var"]}

    def from_torch_state(self, tensors):
        return {"gamma": tensors["weight"], "beta": tensors["bias"], "running_mean": tensors["running_mean"],
                "running_var": tensors["running_var"]}

    def keras_weights(self, p):
        return [p["gamma"], p["beta"], p["running_mean"], p["running_var"]]  # moving_mean, moving_variance

    def from_keras_weights(self, weights):
        gamma, beta, mean, var = weights
        return {"gamma": gamma, "beta": beta, "running_mean": mean, "running_var": var}
