"""Kernel registry: backend name -> module, each public call behind the boundary check of its op.

The contract (names, shapes, semantics) is in README.md beside this file, its checks and the BackendInfo each
backend declares in contract.py. Adding a backend is one module plus one line in REGISTRY.

Beside the backends, the numpy pieces every host backend shares: layers.py (the small layers: ReLU, dropout, dense,
softmax cross-entropy, Adam), host.py (the array runtime: to and from the backend, batch gathering, pixel scaling)
and dropout_rng.py (dropout's generator: made, snapshotted, restored). A device backend brings its own of all three.
"""

import importlib

import numpy as np

from numba_cnn.kernels import dropout_rng as host_dropout_rng, host, layers as numpy_layers
from numba_cnn.kernels.contract import (ARRAY_FUNCTIONS, CHECKS, CONTRACT, DROPOUT_RNG_FUNCTIONS, FUSED_OPS,
                                        BackendInfo, BackendUnavailable, UnknownBackend, op_names)

__all__ = ["BACKENDS", "CONTRACT", "FUSED_OPS", "ORACLE", "Backend", "BackendInfo", "BackendUnavailable",
           "UnknownBackend", "backend_names", "get_backend", "register"]

# name -> module, in the order tables and tests list them. The CLI offers every name but ORACLE.
REGISTRY = {
    "naive": "numba_cnn.kernels.naive",
    "im2col": "numba_cnn.kernels.im2col",
    "jit": "numba_cnn.kernels.jit",
    "cuda": "numba_cnn.kernels.cuda",
    "reference": "numba_cnn.kernels.reference",
}
ORACLE = "reference"


def backend_names(include_oracle=False):
    """The registered backend names, in registry order; the float64 oracle only when asked for."""
    return tuple(name for name in REGISTRY if include_oracle or name != ORACLE)


BACKENDS = backend_names()  # the built-in ones the CLI offers


def register(name, module_name):
    """Add a backend (a module with INFO and the contract functions) under `name`; returns the name."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a backend name must be an identifier, got {name!r}")
    REGISTRY[name] = module_name
    _cache.pop(name, None)
    return name


def unregister(name):
    REGISTRY.pop(name, None)
    _cache.pop(name, None)


def _checked(backend_name, module, fname):
    raw, check = getattr(module, fname), CHECKS[fname]
    if module.INFO.channels_last:
        def call(*args, **kwargs):
            return raw(*check(*args, **kwargs))
    else:
        def call(*args, **kwargs):  # channels-last arrays the checks kept become C-contiguous copies here
            return raw(*(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a for a in check(*args, **kwargs)))

    call.__name__ = fname
    call.__qualname__ = f"{backend_name}.{fname}"
    call.__doc__ = raw.__doc__
    return call


class Backend:
    """One backend, ready to use: its checked op functions, what it says about itself, and how its arrays move.

    Attributes: name, module (the raw module, unchecked), info (its BackendInfo), the contract functions and its
    fused ops, `layers` (ReLU, dense, dropout, softmax cross-entropy, Adam on this backend's arrays), the array
    runtime (`to_device`, `to_host`, `synchronize`: None for a host backend, whose calls return when their work is
    done; `zeros_like`, `take_rows`, `as_float_images`), dropout's generator (`make_dropout_rng`,
    `dropout_rng_state`, `restore_dropout_rng`), `precompile` (None unless the module defines one) and
    `output_arena` (the class of the owner-released buffers its ops return while one is open; None unless defined).
    """

    def __init__(self, name, module):
        info = getattr(module, "INFO", None)
        if not isinstance(info, BackendInfo):
            raise TypeError(f"backend module {module.__name__} must define INFO = BackendInfo(...)")
        self.name, self.module, self.info = name, module, info
        for fname in op_names(info):
            setattr(self, fname, _checked(name, module, fname))
        if info.on_device:
            self.layers, arrays, rng = module.layers, module, module
        else:
            # a host backend may bring its own layers (jit: a compiled dropout), else numpy's; its arrays and
            # dropout generator are the host's
            self.layers, arrays, rng = getattr(module, "layers", numpy_layers), host, host_dropout_rng
        for fname in ARRAY_FUNCTIONS:
            setattr(self, fname, getattr(arrays, fname))
        for fname in DROPOUT_RNG_FUNCTIONS:
            setattr(self, fname, getattr(rng, fname))
        # compiles what a training step uses ahead of the warm-up pass, if the backend has a way to (jit: on a cold
        # cache, in two processes at once)
        self.precompile = getattr(module, "precompile", None)
        # the class of the arena its ops take their outputs from while one is open (None: they allocate fresh ones)
        self.output_arena = getattr(module, "OutputArena", None)

    def has_fused(self, op):
        return op in self.info.fused

    def __repr__(self):
        return f"<numba_cnn backend {self.name!r}>"


_cache = {}


def get_backend(name):
    """The backend called `name` (see backend_names). Raises UnknownBackend (a ValueError) for an unknown name and
    BackendUnavailable when the backend's optional dependency or device is missing."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise UnknownBackend(f"unknown backend {name!r}: choose one of {', '.join(backend_names())}")
    if name not in _cache:
        _cache[name] = Backend(name, importlib.import_module(REGISTRY[name]))
    return _cache[name]
