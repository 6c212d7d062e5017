"""Kernel registry: backend name -> module, with the boundary checks every call passes through.

The contract (names, shapes, semantics) is in README.md beside this file. Checks happen here, once, at the Python
boundary, so compiled kernels never see a shape they would read out of bounds; they are cheap (no pass over the
data) because they run on the hot path.
"""

import importlib

import numpy as np

from numba_cnn.errors import NumbaCNNError

CONTRACT = ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward")
BACKENDS = ("naive", "im2col", "jit", "cuda")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class BackendUnavailable(NumbaCNNError):
    """The backend exists but cannot run here (a missing optional package or device)."""


class UnknownBackend(NumbaCNNError, ValueError):
    """No backend has that name."""


def _check_array(name, a, ndim, layout):
    if not (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "ndim")):
        raise ValueError(f"{name} must be an array {layout}, got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(a.shape)}")
    if min(a.shape) < 1:
        raise ValueError(f"{name} {layout} must not have an empty dimension, got shape {tuple(a.shape)}")


def _check_float(name, a, ndim, layout, dtype=None):
    _check_array(name, a, ndim, layout)
    if np.dtype(a.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {a.dtype}")
    if dtype is not None and np.dtype(a.dtype) != dtype:
        raise ValueError(f"{name} has dtype {a.dtype} but the other inputs are {dtype}: use one dtype throughout")


def _contiguous(a):
    # Host arrays may arrive as slices or transposes; kernels index them as dense C-order buffers.
    return np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a


def _check_conv_operands(x, w):
    _check_float("x", x, 4, "(N, C, H, W)")
    _check_float("w", w, 4, "(K, C, R, S)", np.dtype(x.dtype))
    n, c, h, wd = x.shape
    k, wc, r, s = w.shape
    if wc != c:
        raise ValueError(f"w has {wc} input channels (w.shape={tuple(w.shape)}) but x has {c} (x.shape={tuple(x.shape)})")
    if r > h or s > wd:
        raise ValueError(f"kernel {r}x{s} does not fit in a {h}x{wd} input")
    return (n, k, h - r + 1, wd - s + 1)


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _pooled_shape(x_shape):
    n, c, h, w = x_shape
    if h < 2 or w < 2:
        raise ValueError(f"2x2 max-pooling needs H and W of at least 2, got shape {tuple(x_shape)}")
    return (n, c, h // 2, w // 2)


def _checked(backend_name, module):
    """The four contract functions of `module`, each behind its boundary check."""
    conv_fwd, conv_bwd = module.conv2d_forward, module.conv2d_backward
    pool_fwd, pool_bwd = module.maxpool2d_forward, module.maxpool2d_backward

    def conv2d_forward(x, w, b, relu=False):
        _check_conv_operands(x, w)
        _check_float("b", b, 1, "(K,)", np.dtype(x.dtype))
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"b has {b.shape[0]} entries but w has {w.shape[0]} output channels")
        _check_bool("relu", relu)
        return conv_fwd(_contiguous(x), _contiguous(w), _contiguous(b), bool(relu))

    def conv2d_backward(dy, x, w, need_dx=True):
        y_shape = _check_conv_operands(x, w)
        _check_float("dy", dy, 4, "(N, K, P, Q)", np.dtype(x.dtype))
        if tuple(dy.shape) != y_shape:
            raise ValueError(f"dy has shape {tuple(dy.shape)} but the convolution's output has shape {y_shape}")
        _check_bool("need_dx", need_dx)
        return conv_bwd(_contiguous(dy), _contiguous(x), _contiguous(w), bool(need_dx))

    def maxpool2d_forward(x):
        _check_float("x", x, 4, "(N, C, H, W)")
        _pooled_shape(x.shape)
        return pool_fwd(_contiguous(x))

    def maxpool2d_backward(dy, argmax, x_shape):
        dims = tuple(x_shape) if isinstance(x_shape, (tuple, list)) else ()
        if len(dims) != 4 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1
                                     for d in dims):
            raise ValueError(f"x_shape must be four positive integers (N, C, H, W), got {x_shape!r}")
        x_shape = tuple(int(d) for d in dims)
        y_shape = _pooled_shape(x_shape)
        _check_float("dy", dy, 4, "(N, C, H//2, W//2)")
        _check_array("argmax", argmax, 4, "(N, C, H//2, W//2)")
        if np.dtype(argmax.dtype) != np.uint8:
            raise ValueError(f"argmax must be uint8 (as maxpool2d_forward returns it), got {argmax.dtype}")
        for name, a in (("dy", dy), ("argmax", argmax)):
            if tuple(a.shape) != y_shape:
                raise ValueError(f"{name} has shape {tuple(a.shape)} but pooling {x_shape} gives {y_shape}")
        return pool_bwd(_contiguous(dy), _contiguous(argmax), x_shape)

    functions = dict(conv2d_forward=conv2d_forward, conv2d_backward=conv2d_backward,
                     maxpool2d_forward=maxpool2d_forward, maxpool2d_backward=maxpool2d_backward)
    for name, fn in functions.items():
        fn.__name__ = name
        fn.__qualname__ = f"{backend_name}.{name}"
        fn.__doc__ = getattr(module, name).__doc__
    return functions


class Backend:
    """One backend, ready to use: the checked contract functions plus how its arrays and layers work.

    Attributes: name, module (the raw backend module, unchecked), the four contract functions, `layers` (dense,
    dropout, softmax cross-entropy, Adam update on this backend's arrays), `to_device` and `to_host`.
    """

    def __init__(self, name, module):
        from numba_cnn import layers as numpy_layers

        self.name = name
        self.module = module
        for fname, fn in _checked(name, module).items():
            setattr(self, fname, fn)
        self.layers = getattr(module, "layers", numpy_layers)
        self.to_device = getattr(module, "to_device", np.ascontiguousarray)
        self.to_host = getattr(module, "to_host", np.asarray)

    def __repr__(self):
        return f"<numba_cnn backend {self.name!r}>"


_cache = {}


def get_backend(name):
    """The backend called `name` (one of BACKENDS). Raises UnknownBackend (a ValueError) for an unknown name and
    BackendUnavailable when the backend's optional dependency or device is missing."""
    if name not in BACKENDS:
        raise UnknownBackend(f"unknown kernels {name!r}: choose one of {', '.join(BACKENDS)}")
    if name not in _cache:
        module = importlib.import_module(f"numba_cnn.kernels.{name}")
        _cache[name] = Backend(name, module)
    return _cache[name]
