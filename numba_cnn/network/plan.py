"""The fusion pass: the network's layers grouped into the steps a backend runs, neighbours merged where it pays.

FUSIONS lists each pattern once: the kinds of neighbouring layers, when it applies, and the step that stands for
them. The pass walks the layers and takes the first pattern that matches at each position, so patterns can build
on each other (conv + ReLU first becomes a conv with a fused ReLU, which conv + ReLU + pool can then take).
A step has the interface of a layer (forward / backward over the parameters of every layer it covers), so the model
runs a plan of steps as it would the bare layers, and the bench and the layer timer see one entry per step.
"""

import dataclasses

from numba_cnn.network.layers import AvgPool2D, BatchNorm2D, Conv2D, GlobalAvgPool2D, MaxPool2D, ReLU


@dataclasses.dataclass(frozen=True)
class Step:
    """Layers run as one: `layers` (index, layer) pairs in order, `runner` the object whose forward and backward
    run them (a layer itself, or a fused stand-in), and the name the timer shows ("conv1+pool1")."""

    layers: tuple
    runner: object

    @property
    def name(self):
        return "+".join(layer.name for _, layer in self.layers)

    @property
    def first(self):
        return self.layers[0][0]


@dataclasses.dataclass(frozen=True)
class ConvReluPool:
    """conv2d_relu_maxpool2d: a stride-1 conv (any padding) with ReLU and a 2x2 max-pool in one backend op; the ReLU'd
    conv output need never be written. Its backward needs the pooled output and argmax (the ReLU's derivative is
    taken on the pooled value: the gradient reaches only each window's winner, whose ReLU output it is)."""

    conv: Conv2D

    def forward(self, run, p, x):
        y, argmax = run.ops.conv2d_relu_maxpool2d_forward(x, p["w"], p["b"], self.conv.pads(x.shape[1:]))
        return y, (x, y, argmax)

    def backward(self, run, p, dy, cache, need_dx):
        x, y, argmax = cache
        dx, dw, db = run.ops.conv2d_relu_maxpool2d_backward(dy, y, argmax, x, p["w"], need_dx,
                                                            self.conv.pads(x.shape[1:]))
        return dx, {"w": dw, "b": db}


@dataclasses.dataclass(frozen=True)
class BatchNormRelu:
    """batchnorm2d_relu: a BatchNorm2D and the ReLU after it in one backend op, the ReLU applied as the normalised
    value is stored and its derivative as the backward reads dy, so the standalone ReLU's pass over the activation
    (forward and backward) is saved. Parameters, running statistics and the arguments are the BatchNorm2D's
    (inference normalises by the running statistics, as BatchNorm2D.forward does); the backward needs the output."""

    bn: BatchNorm2D

    def forward(self, run, p, x):
        y, mean, inv_std = run.ops.batchnorm2d_relu_forward(x, p["gamma"], p["beta"], p["running_mean"],
                                                            p["running_var"], momentum=self.bn.momentum,
                                                            eps=self.bn.epsilon, training=run.training)
        return y, (x, y, mean, inv_std)

    def backward(self, run, p, dy, cache, need_dx):
        x, y, mean, inv_std = cache
        dx, dgamma, dbeta = run.ops.batchnorm2d_relu_backward(dy, y, x, p["gamma"], mean, inv_std)
        return dx, {"gamma": dgamma, "beta": dbeta}


@dataclasses.dataclass(frozen=True)
class BatchNormReluPool:
    """batchnorm2d_relu_maxpool2d: a fused BatchNorm2D + ReLU followed by a 2x2 max-pool. The forward is one backend
    op that pools the normalised values as it makes them, so the full-size activation need never be written out; the
    backward one that routes each window's gradient to its winner as the batch norm's backward reads it, so the
    pool's full-size gradient need not be either (the ReLU's derivative is taken on the pooled value, the winner's
    output)."""

    bn: BatchNorm2D

    def forward(self, run, p, x):
        pooled, argmax, mean, inv_std = run.ops.batchnorm2d_relu_maxpool2d_forward(
            x, p["gamma"], p["beta"], p["running_mean"], p["running_var"], momentum=self.bn.momentum,
            eps=self.bn.epsilon, training=run.training)
        return pooled, (x, pooled, argmax, mean, inv_std)

    def backward(self, run, p, dy, cache, need_dx):
        x, y, argmax, mean, inv_std = cache
        dx, dgamma, dbeta = run.ops.batchnorm2d_relu_maxpool2d_backward(dy, y, argmax, x, p["gamma"], mean, inv_std)
        return dx, {"gamma": dgamma, "beta": dbeta}


@dataclasses.dataclass(frozen=True)
class ConvRelu:
    """conv2d_relu: a convolution with its ReLU (fused or from the description) that no pool follows. The forward is
    the convolution's own (conv2d_forward with relu=True); the backward one backend op that takes the ReLU's
    derivative inside the convolution's backward, so the ReLU'd gradient need never be written out."""

    conv: Conv2D

    def forward(self, run, p, x):
        return self.conv.forward(run, p, x)

    def backward(self, run, p, dy, cache, need_dx):
        x, y = cache
        dx, dw, db = run.ops.conv2d_relu_backward(dy, y, x, p["w"], need_dx=need_dx, stride=self.conv.strides,
                                                  padding=self.conv.pads(x.shape[1:]))
        return dx, {"w": dw, "b": db}


@dataclasses.dataclass(frozen=True)
class ConvReluAvgPool:
    """conv2d_relu_avgpool2d: a convolution with its ReLU followed by a 2x2 average pool, or with global_pool by
    GlobalAvgPool2D (a window of the whole image, its output flattened to (N, K)). The forward runs the two ops as
    they are (the pool reads the ReLU'd output, which the backward needs anyway); the backward is one backend op
    that spreads the pool's gradient over the windows and takes the ReLU's derivative inside the convolution's
    backward, so the full-size gradient between them need never be written out."""

    conv: Conv2D
    global_pool: bool = False

    def _size(self, y):
        return tuple(y.shape[2:]) if self.global_pool else (2, 2)

    def forward(self, run, p, x):
        y, cache = self.conv.forward(run, p, x)
        pooled = run.ops.avgpool2d_forward(y, size=self._size(y))
        return (pooled.reshape(y.shape[:2]) if self.global_pool else pooled), cache

    def backward(self, run, p, dy, cache, need_dx):
        x, y = cache
        if self.global_pool:
            dy = dy.reshape(y.shape[:2] + (1, 1))
        dx, dw, db = run.ops.conv2d_relu_avgpool2d_backward(dy, y, x, p["w"], need_dx=need_dx,
                                                            stride=self.conv.strides,
                                                            padding=self.conv.pads(x.shape[1:]), size=self._size(y))
        return dx, {"w": dw, "b": db}


@dataclasses.dataclass(frozen=True)
class Fusion:
    """A pattern: neighbouring layer kinds, `applies(backend, *layers)`, and `fuse(*layers)` -> the runner."""

    name: str
    kinds: tuple
    applies: object
    fuse: object


def _conv_then_relu(backend, conv, relu):
    return conv.activation is None


def _conv_relu_pool(backend, conv, pool):
    return (backend.has_fused("conv2d_relu_maxpool2d") and conv.activation == "relu" and conv.strides == 1
            and pool.pool_size == (2, 2))


def _conv_relu_avgpool(backend, conv, pool):
    return backend.has_fused("conv2d_relu_avgpool2d") and conv.activation == "relu" and pool.pool_size == (2, 2)


def _conv_relu_global_avgpool(backend, conv, pool):
    return backend.has_fused("conv2d_relu_avgpool2d") and conv.activation == "relu"


def _batchnorm_relu(backend, bn, relu):
    return backend.has_fused("batchnorm2d_relu")


def _batchnorm_relu_pool(backend, bn_relu, pool):
    return backend.has_fused("batchnorm2d_relu_maxpool2d") and pool.pool_size == (2, 2)


def _conv_relu(backend, conv):
    return backend.has_fused("conv2d_relu") and conv.activation == "relu"


FUSIONS = (
    # no backend op needed: the contract's convolution applies the ReLU in its own pass
    Fusion("conv2d+relu", (Conv2D, ReLU), _conv_then_relu,
           lambda conv, relu: dataclasses.replace(conv, activation="relu")),
    Fusion("conv2d_relu_maxpool2d", (Conv2D, MaxPool2D), _conv_relu_pool, lambda conv, pool: ConvReluPool(conv)),
    Fusion("conv2d_relu_avgpool2d", (Conv2D, AvgPool2D), _conv_relu_avgpool, lambda conv, pool: ConvReluAvgPool(conv)),
    Fusion("conv2d_relu_avgpool2d (global)", (Conv2D, GlobalAvgPool2D), _conv_relu_global_avgpool,
           lambda conv, pool: ConvReluAvgPool(conv, global_pool=True)),
    Fusion("batchnorm2d_relu", (BatchNorm2D, ReLU), _batchnorm_relu, lambda bn, relu: BatchNormRelu(bn)),
    Fusion("batchnorm2d_relu_maxpool2d", (BatchNormRelu, MaxPool2D), _batchnorm_relu_pool,
           lambda bn_relu, pool: BatchNormReluPool(bn_relu.bn)),
    # last: a pattern of one layer, taken only where no pattern before it (a pool after the conv) matched
    Fusion("conv2d_relu", (Conv2D,), _conv_relu, ConvRelu),
)


def plan(network, backend, fuse=True):
    """-> the Steps that run `network` on `backend`; fuse=False runs every layer as itself."""
    steps = [Step(((i, layer),), layer) for i, layer in enumerate(network.layers)]
    if not fuse:
        return steps
    merged = True
    while merged:  # until no pattern matches: a fused step may be the start of another pattern
        merged = False
        for fusion in FUSIONS:
            width = len(fusion.kinds)
            for start in range(len(steps) - width + 1):
                window = steps[start:start + width]
                runners = [step.runner for step in window]
                if all(type(r) is kind for r, kind in zip(runners, fusion.kinds)) and fusion.applies(backend, *runners):
                    fused = Step(sum((step.layers for step in window), ()), fusion.fuse(*runners))
                    steps[start:start + width] = [fused]
                    merged = True
                    break
            if merged:
                break
    return steps
