"""Model: a Network (the layers as data, network/) run on one backend, step by step through the fusion plan.

The forward pass walks the plan's steps in order, each returning its output and the cache its backward needs; the
backward pass walks them in reverse. Parameters are named "<layer>.<param>" (conv1.w, conv1.b, bn1.gamma, ...),
buffers (BatchNorm's running statistics) "<layer>.<buffer>"; weights are initialised as Keras does (Glorot-uniform,
zero biases) from one seeded Generator, layer by layer in order.
"""

import collections
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from numba_cnn.kernels import Backend, get_backend
from numba_cnn.network import DEFAULT_PRESET, build, preset_document
from numba_cnn.network.plan import plan
from numba_cnn.timing import NullTimer

DEFAULT_BACKEND = "jit"  # what `train --backend` defaults to
DEFAULT_INPUT_SHAPE = (1, 28, 28)  # MNIST's, for the default network


def default_network(input_shape=DEFAULT_INPUT_SHAPE, num_classes=10):
    """The mnist-cnn preset built for `input_shape`."""
    return build(preset_document(DEFAULT_PRESET, num_classes)["layers"], input_shape, name=DEFAULT_PRESET)


def init_state(network, seed, dtype=np.float32):
    """Fresh host arrays {name: array} for every parameter and buffer, from a Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    state = {}
    for layer, shape in zip(network.layers, network.shapes):
        params, buffers = layer.init(shape, rng, np.dtype(dtype))
        state.update({f"{layer.name}.{key}": value for key, value in params.items()})
        state.update({f"{layer.name}.{key}": value for key, value in buffers.items()})
    return state


def init_params(seed, dtype=np.float32, network=None):
    """The trained parameters of init_state (the default network's unless one is given)."""
    network = default_network() if network is None else network
    state = init_state(network, seed, dtype)
    return {name: state[name] for name in network.param_shapes()}


@dataclass
class Run:
    """What the layers of one pass see: the backend's ops and small layers, training or inference, dropout's RNG."""

    ops: Backend
    layers: object
    training: bool
    dropout_rng: object = None


class Model:
    """A network on one backend. `params` (trained) and `buffers` (saved, untrained) map names to backend arrays;
    after `forward_backward`, `grads` maps each parameter's name to its gradient."""

    def __init__(self, backend=DEFAULT_BACKEND, seed=0, dtype=np.float32, params=None, fuse=True, network=None):
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend)
        self.dtype = np.dtype(dtype)
        self.network = default_network() if network is None else network
        self.steps = plan(self.network, self.backend, fuse)
        self.fused = any(len(step.layers) > 1 for step in self.steps)
        state = init_state(self.network, seed, self.dtype)
        if params is not None:
            state.update(params)  # buffers a caller leaves out (an old checkpoint) keep their initial values
        self.load_state_dict(state)
        self.grads = {}
        self._caches = None
        # the buffers the backend's ops return during a pass, owned here: released when the next pass begins,
        # when the last one's outputs and caches are dead (a backward needs the training forward just before it),
        # and in the backward as soon as no layer below reads them (backward)
        self._arena = self.backend.output_arena() if self.backend.output_arena is not None else None
        self.timer = NullTimer()

    @property
    def num_params(self):
        return sum(int(np.prod(p.shape)) for p in self.params.values())

    def state_dict(self):
        """Parameters and buffers as host numpy arrays (copies), parameters first."""
        return {name: np.array(self.backend.to_host(a)) for name, a in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, host_arrays):
        """Every parameter and buffer from {name: host array}; a ValueError naming the first missing or misshapen."""
        wanted = {**self.network.param_shapes(), **self.network.buffer_shapes()}
        missing = [name for name in wanted if name not in host_arrays]
        if missing:
            raise ValueError(f"parameters missing: {', '.join(missing)}")
        for name, shape in wanted.items():
            if tuple(host_arrays[name].shape) != tuple(shape):
                raise ValueError(f"parameter {name} has shape {tuple(host_arrays[name].shape)}, this model needs "
                                 f"{tuple(shape)}")
        arrays = {name: self.backend.to_device(np.array(host_arrays[name], dtype=self.dtype)) for name in wanted}
        self.params = {name: arrays[name] for name in self.network.param_shapes()}
        self.buffers = {name: arrays[name] for name in self.network.buffer_shapes()}
        self._step_arrays = [self._arrays_of(step) for step in self.steps]
        # the first step with parameters needs no input gradient: nothing before it learns
        self._first_trained = next((i for i, (owner, _) in enumerate(self._step_arrays) if owner), 0)

    def _arrays_of(self, step):
        """{short name: array} of the one layer of `step` that holds parameters or buffers (fusions never merge two
        such layers), and that layer's name ('' when none does)."""
        state = {**self.params, **self.buffers}
        for index, layer in step.layers:
            arrays = layer.arrays(state, self.network.shapes[index])
            if arrays:
                return layer.name, arrays
        return "", {}

    def forward(self, x, dropout_rng=None):
        """x[N, C, H, W] -> logits[N, classes]. With a dropout_rng the pass is a training pass (dropout applied,
        BatchNorm on batch statistics) and keeps what backward() needs; without one it is inference."""
        training = dropout_rng is not None
        run = Run(self.backend, self.backend.layers, training, dropout_rng)
        self._caches = None
        if self._arena is not None:
            self._arena.release()
        caches = []
        last = len(self.steps) - 1
        for i, (step, (_, arrays)) in enumerate(zip(self.steps, self._step_arrays)):
            # the last step's output leaves the model, so it is never the arena's
            with self.timer.section(step.name, "forward"), self._owned_outputs(i < last):
                x, cache = step.runner.forward(run, arrays, x)
            caches.append(cache)
        self._caches = (run, caches) if training else None
        return x

    def _owned_outputs(self, owned=True):
        return self._arena if owned and self._arena is not None else nullcontext()

    def backward(self, dlogits):
        """dlogits[N, classes] -> self.grads for every parameter, through the caches of the last training forward."""
        if self._caches is None:
            raise RuntimeError("backward() needs a training forward pass (forward with a dropout_rng) before it")
        run, caches = self._caches
        dy, grads = dlogits, self.grads
        first_trained = self._first_trained
        last = len(self.steps) - 1
        arena = self._arena
        if arena is not None:  # the arena's blocks each step's cache holds, and how many steps below step i hold each
            cache_blocks = [arena.blocks_of(cache) for cache in caches]
            held_below = collections.Counter(block for blocks in cache_blocks[:last] for block in blocks)
            grad_blocks = set()
        for i in range(last, first_trained - 1, -1):
            step, (owner, arrays) = self.steps[i], self._step_arrays[i]
            with self.timer.section(step.name, "backward"), self._owned_outputs():
                if arena is not None and i < last:  # dy was made by the step after, for this one alone
                    arena.donate(dy)
                dy, step_grads = step.runner.backward(run, arrays, dy, caches[i], need_dx=i > first_trained)
                if arena is not None:
                    arena.donate(None)
            grads.update({f"{owner}.{key}": g for key, g in step_grads.items()})
            if arena is not None and i > first_trained:
                # this step's cache and the gradient it was given are read no more: the steps below may take
                # their memory for their own gradients
                grad_blocks |= arena.blocks_of(step_grads)
                arena.retire(held_below.keys() | arena.blocks_of(dy) | grad_blocks)
                held_below.subtract(cache_blocks[i - 1])
                held_below = +held_below  # only the blocks some step below still holds
        self._caches = None
        return grads

    def forward_backward(self, x, labels, dropout_rng):
        """One training pass: returns (mean loss, number correct) and fills self.grads."""
        logits = self.forward(x, dropout_rng)
        with self.timer.section("loss", "forward"):
            loss, dlogits, correct = self.backend.layers.softmax_cross_entropy(logits, labels)
        self.backward(dlogits)
        return loss, correct

    def predict(self, x):
        """x[N, C, H, W] -> predicted class per image, int64[N] on the host."""
        return self.backend.layers.argmax_rows(self.forward(x))
