"""The MNIST CNN, described once in LAYERS and written out layer by layer over whichever backend it is given.

Conv2D(1->32, 3x3)+ReLU -> MaxPool 2x2 -> Conv2D(32->64, 3x3)+ReLU -> MaxPool 2x2 -> Flatten(1600)
-> Dropout(0.5) -> Dense(1600->10) -> softmax, 34,826 parameters, initialised as Keras does (Glorot-uniform
weights, zero biases).

LAYERS feeds the parameter shapes (initialisation, checkpoints), the bench's op list and the baselines; the forward
and backward passes below are written by hand over named activations. Each convolution block is conv + ReLU +
2x2 max-pool: `_conv_relu_pool_forward` and its backward show the backend's fused op and the composition of
contract ops it stands for side by side.
"""

from dataclasses import dataclass, field

import numpy as np

from numba_cnn.kernels import Backend, get_backend
from numba_cnn.timing import NullTimer

DEFAULT_BACKEND = "jit"  # what `train --backend` defaults to
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
DROPOUT_RATE = 0.5
FUSED_CONV_BLOCK = "conv2d_relu_maxpool2d"


@dataclass(frozen=True)
class Layer:
    """One layer: its name, what it is, and its parameters' shapes (conv weights (K, C, R, S); dense (in, out))."""

    name: str
    kind: str  # "conv2d_relu" | "maxpool2d" | "dropout" | "dense"
    params: dict = field(default_factory=dict)


LAYERS = (
    Layer("conv1", "conv2d_relu", {"w": (32, INPUT_SHAPE[0], 3, 3), "b": (32,)}),
    Layer("pool1", "maxpool2d"),
    Layer("conv2", "conv2d_relu", {"w": (64, 32, 3, 3), "b": (64,)}),
    Layer("pool2", "maxpool2d"),
    Layer("dropout", "dropout"),
    Layer("dense", "dense", {"w": (64 * 5 * 5, NUM_CLASSES), "b": (NUM_CLASSES,)}),
)
# name -> shape, in the order the layers run
PARAM_SHAPES = {f"{layer.name}.{p}": shape for layer in LAYERS for p, shape in layer.params.items()}


def glorot_uniform(shape, rng, dtype):
    """Keras's default kernel initialiser: U(-l, l), l = sqrt(6 / (fan_in + fan_out)), where a conv kernel
    (K, C, R, S) has fan_in = C*R*S and fan_out = K*R*S, and a dense (in, out) kernel has in and out."""
    if len(shape) == 4:
        k, c, r, s = shape
        fan_in, fan_out = c * r * s, k * r * s
    else:
        fan_in, fan_out = shape
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def init_params(seed, dtype=np.float32):
    """Fresh host parameters {name: array}, weights Glorot-uniform from a seeded Generator, biases zero."""
    rng = np.random.default_rng(seed)
    return {name: (glorot_uniform(shape, rng, dtype) if name.endswith(".w") else np.zeros(shape, dtype))
            for name, shape in PARAM_SHAPES.items()}


def conv_output_shape(x_shape, w_shape):
    """(N, C, H, W), (K, C, R, S) -> (N, K, H-R+1, W-S+1): a valid, stride-1 convolution."""
    n, _, h, w = x_shape
    k, _, r, s = w_shape
    return (n, k, h - r + 1, w - s + 1)


@dataclass
class Activations:
    """What a training forward pass keeps for the backward pass, by name. hN/argN: block N's pooled output and
    its argmax; aN: block N's conv+ReLU output, kept only where the block ran unfused (None otherwise)."""

    x: object
    a1: object = None
    h1: object = None
    arg1: object = None
    a2: object = None
    h2: object = None
    arg2: object = None
    flat: object = None  # h2 flattened, after dropout
    mask: object = None  # the dropout mask (scale included)


class Model:
    """The CNN on one backend. `params` and, after `forward_backward`, `grads` map names to backend arrays."""

    def __init__(self, backend=DEFAULT_BACKEND, seed=0, dtype=np.float32, params=None, fuse=True):
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend)
        self.dtype = np.dtype(dtype)
        self.fused = fuse and self.backend.has_fused(FUSED_CONV_BLOCK)
        host = init_params(seed, self.dtype) if params is None else params
        self.load_state_dict(host)
        self.grads = {}
        self.acts = None
        self.timer = NullTimer()

    @property
    def num_params(self):
        return sum(int(np.prod(p.shape)) for p in self.params.values())

    def state_dict(self):
        """Parameters as host numpy arrays (copies)."""
        return {name: np.array(self.backend.to_host(p)) for name, p in self.params.items()}

    def load_state_dict(self, host_params):
        missing = set(PARAM_SHAPES) - set(host_params)
        if missing:
            raise ValueError(f"parameters missing: {', '.join(sorted(missing))}")
        for name, shape in PARAM_SHAPES.items():
            if tuple(host_params[name].shape) != shape:
                raise ValueError(f"parameter {name} has shape {tuple(host_params[name].shape)}, this model needs {shape}")
        self.params = {name: self.backend.to_device(np.asarray(host_params[name], dtype=self.dtype))
                       for name in PARAM_SHAPES}

    # ---- conv + ReLU + 2x2 max-pool: the backend's fused op, or the composition of contract ops it stands for

    def _conv_relu_pool_forward(self, conv, pool, x):
        """x -> (pooled h, argmax, a): a is the conv+ReLU output where the block ran unfused, else None."""
        k, t = self.backend, self.timer
        w, b = self.params[f"{conv}.w"], self.params[f"{conv}.b"]
        if self.fused:
            with t.section(f"{conv}+{pool}", "forward"):
                h, arg = k.conv2d_relu_maxpool2d_forward(x, w, b)
            return h, arg, None
        with t.section(conv, "forward"):
            a = k.conv2d_forward(x, w, b, relu=True)
        with t.section(pool, "forward"):
            h, arg = k.maxpool2d_forward(a)
        return h, arg, a

    def _conv_relu_pool_backward(self, conv, pool, dh, h, arg, x, need_dx):
        """The pooled output's gradient dh -> (dx or None, dw, db) of the block's conv."""
        k, t = self.backend, self.timer
        w = self.params[f"{conv}.w"]
        if self.fused:
            with t.section(f"{conv}+{pool}", "backward"):
                return k.conv2d_relu_maxpool2d_backward(dh, h, arg, x, w, need_dx)
        with t.section(pool, "backward"):
            # The ReLU derivative taken on the pooled output: the gradient reaches only each window's winner,
            # whose ReLU output is the pooled value (kernels/README.md).
            da = k.maxpool2d_backward(self.backend.layers.relu_backward(dh, h), arg, conv_output_shape(x.shape, w.shape))
        with t.section(conv, "backward"):
            return k.conv2d_backward(da, x, w, need_dx=need_dx)

    # ---- the network

    def forward(self, x, dropout_rng=None):
        """x[N, 1, 28, 28] -> logits[N, 10]. With a dropout_rng the pass is a training pass: dropout is applied
        and self.acts keeps what backward() needs; without one it is inference."""
        L, p, t = self.backend.layers, self.params, self.timer
        acts = Activations(x=x)
        acts.h1, acts.arg1, acts.a1 = self._conv_relu_pool_forward("conv1", "pool1", x)
        acts.h2, acts.arg2, acts.a2 = self._conv_relu_pool_forward("conv2", "pool2", acts.h1)
        acts.flat = acts.h2.reshape(acts.h2.shape[0], -1)
        if dropout_rng is not None:
            with t.section("dropout", "forward"):
                acts.flat, acts.mask = L.dropout_forward(acts.flat, DROPOUT_RATE, dropout_rng)
        with t.section("dense", "forward"):
            logits = L.dense_forward(acts.flat, p["dense.w"], p["dense.b"])
        self.acts = acts if dropout_rng is not None else None
        return logits

    def backward(self, dlogits):
        """dlogits[N, 10] -> self.grads for every parameter, through the activations of the last training forward."""
        L, p, t, acts, g = self.backend.layers, self.params, self.timer, self.acts, self.grads
        if acts is None:
            raise RuntimeError("backward() needs a training forward pass (forward with a dropout_rng) before it")
        with t.section("dense", "backward"):
            dflat, g["dense.w"], g["dense.b"] = L.dense_backward(dlogits, acts.flat, p["dense.w"])
        with t.section("dropout", "backward"):
            dflat = L.dropout_backward(dflat, acts.mask)
        dh2 = dflat.reshape(acts.h2.shape)
        dh1, g["conv2.w"], g["conv2.b"] = self._conv_relu_pool_backward("conv2", "pool2", dh2, acts.h2, acts.arg2,
                                                                        acts.h1, need_dx=True)
        _, g["conv1.w"], g["conv1.b"] = self._conv_relu_pool_backward("conv1", "pool1", dh1, acts.h1, acts.arg1,
                                                                      acts.x, need_dx=False)
        self.acts = None
        return g

    def forward_backward(self, x, labels, dropout_rng):
        """One training pass: returns (mean loss, number correct) and fills self.grads."""
        logits = self.forward(x, dropout_rng)
        with self.timer.section("loss", "forward"):
            loss, dlogits, correct = self.backend.layers.softmax_cross_entropy(logits, labels)
        self.backward(dlogits)
        return loss, correct

    def predict(self, x):
        """x[N, 1, 28, 28] -> predicted class per image, int64[N] on the host."""
        return self.backend.layers.argmax_rows(self.forward(x))
