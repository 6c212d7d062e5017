"""The MNIST CNN, written out layer by layer over whichever kernel backend it is given.

Conv2D(1->32, 3x3)+ReLU -> MaxPool 2x2 -> Conv2D(32->64, 3x3)+ReLU -> MaxPool 2x2 -> Flatten(1600)
-> Dropout(0.5) -> Dense(1600->10) -> softmax, 34,826 parameters, initialised as Keras does (Glorot-uniform
weights, zero biases).
"""

import numpy as np

from numba_cnn.kernels import Backend, get_backend
from numba_cnn.timing import NullTimer

# name -> shape, in the order the layers run. Conv weights are (K, C, R, S); the dense weight is (in, out).
PARAM_SHAPES = {
    "conv1.w": (32, 1, 3, 3), "conv1.b": (32,),
    "conv2.w": (64, 32, 3, 3), "conv2.b": (64,),
    "dense.w": (1600, 10), "dense.b": (10,),
}
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
DROPOUT_RATE = 0.5


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


class Model:
    """The CNN on one backend. `params` and, after `forward_backward`, `grads` map names to backend arrays."""

    def __init__(self, backend="im2col", seed=0, dtype=np.float32, params=None):
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend)
        self.dtype = np.dtype(dtype)
        host = init_params(seed, self.dtype) if params is None else params
        self.load_state_dict(host)
        self.grads = {}
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

    def forward(self, x, dropout_rng=None):
        """x[N, 1, 28, 28] -> logits[N, 10]. With a dropout_rng the pass is a training pass: dropout is applied
        and everything backward() needs is kept; without one it is inference."""
        k, L, p, t = self.backend, self.backend.layers, self.params, self.timer
        training = dropout_rng is not None
        with t.section("conv1", "forward"):
            a1 = k.conv2d_forward(x, p["conv1.w"], p["conv1.b"], relu=True)
        with t.section("pool1", "forward"):
            h1, arg1 = k.maxpool2d_forward(a1)
        with t.section("conv2", "forward"):
            a2 = k.conv2d_forward(h1, p["conv2.w"], p["conv2.b"], relu=True)
        with t.section("pool2", "forward"):
            h2, arg2 = k.maxpool2d_forward(a2)
        flat = h2.reshape(h2.shape[0], -1)
        mask = None
        if training:
            with t.section("dropout", "forward"):
                flat, mask = L.dropout_forward(flat, DROPOUT_RATE, dropout_rng)
        with t.section("dense", "forward"):
            logits = L.dense_forward(flat, p["dense.w"], p["dense.b"])
        if training:
            self._cache = (x, a1.shape, h1, arg1, a2.shape, h2, arg2, flat, mask)
        return logits

    def backward(self, dlogits):
        """dlogits[N, 10] -> self.grads for every parameter, through the cache of the last training forward."""
        k, L, p, t = self.backend, self.backend.layers, self.params, self.timer
        x, a1_shape, h1, arg1, a2_shape, h2, arg2, flat, mask = self._cache
        g = self.grads
        with t.section("dense", "backward"):
            dflat, g["dense.w"], g["dense.b"] = L.dense_backward(dlogits, flat, p["dense.w"])
        with t.section("dropout", "backward"):
            dflat = L.dropout_backward(dflat, mask)
        dh2 = dflat.reshape(h2.shape)
        with t.section("pool2", "backward"):
            # The ReLU derivative taken on the pooled output: the gradient reaches only each window's winner,
            # whose ReLU output is the pooled value (kernels/README.md).
            da2 = k.maxpool2d_backward(L.relu_backward(dh2, h2), arg2, a2_shape)
        with t.section("conv2", "backward"):
            dh1, g["conv2.w"], g["conv2.b"] = k.conv2d_backward(da2, h1, p["conv2.w"], need_dx=True)
        with t.section("pool1", "backward"):
            da1 = k.maxpool2d_backward(L.relu_backward(dh1, h1), arg1, a1_shape)
        with t.section("conv1", "backward"):
            _, g["conv1.w"], g["conv1.b"] = k.conv2d_backward(da1, x, p["conv1.w"], need_dx=False)
        self._cache = None
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
