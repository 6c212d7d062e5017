"""The kernel contract in code: the op names, what a backend says about itself, and the boundary check of each op.

README.md beside this file states the semantics. Every public call of a backend goes through the check of its op
here, once, at the Python boundary, so compiled kernels never see a shape they would read out of bounds; the checks
are cheap (no pass over the data) because they run on the hot path. A check takes the op's arguments and returns
them cleaned (host arrays made C-contiguous or kept channels-last, flags made bool), or raises ValueError naming
the argument.
"""

from dataclasses import dataclass

import numpy as np

from numba_cnn.errors import NumbaCNNError

CONTRACT = ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward")
# Optional fused ops: name -> its forward and backward functions. A backend lists the ones it has in its INFO; the
# model uses them where present and the composition of contract ops otherwise (kernels/README.md).
FUSED_OPS = {"conv2d_relu_maxpool2d": ("conv2d_relu_maxpool2d_forward", "conv2d_relu_maxpool2d_backward")}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class BackendUnavailable(NumbaCNNError):
    """The backend exists but cannot run here (a missing optional package or device)."""


class UnknownBackend(NumbaCNNError, ValueError):
    """No backend has that name."""


@dataclass(frozen=True)
class BackendInfo:
    """What the rest of numba_cnn needs to know about a backend; each backend module defines one as INFO.

    slow: Python-speed loops; tests give it tiny shapes only and the bench a batch of its own.
    blas_threads: "all" uses as many BLAS threads as compute threads; "one" keeps BLAS at one thread (a backend
        whose own threads do the heavy work and whose few BLAS calls would leave spinning workers behind).
    on_device: arrays live off the host; the module then also provides `layers` (the functions of
        numba_cnn/layers.py on its arrays), `to_device`, `to_host` and `synchronize`.
    fused: the names from FUSED_OPS this backend implements.
    channels_last: its ops accept, and may return, 4-D arrays stored channels-last (an NHWC buffer viewed as NCHW,
        `a.transpose(0, 3, 1, 2)` of a C-contiguous a): the checks pass those through as they are, where every other
        backend gets C-contiguous copies.
    """

    summary: str
    slow: bool = False
    blas_threads: str = "all"
    on_device: bool = False
    fused: tuple = ()
    channels_last: bool = False

    def __post_init__(self):
        if self.blas_threads not in ("all", "one"):
            raise ValueError(f"blas_threads must be 'all' or 'one', got {self.blas_threads!r}")
        unknown = set(self.fused) - set(FUSED_OPS)
        if unknown:
            raise ValueError(f"unknown fused ops {sorted(unknown)}: the contract knows {sorted(FUSED_OPS)}")


def op_names(info):
    """The public functions a backend with this INFO defines, in order: the contract, then its fused ops."""
    return CONTRACT + tuple(fn for name in info.fused for fn in FUSED_OPS[name])


# ------------------------------------------------------------------------------------------------ argument checks

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


def is_channels_last(a):
    """True for a 4-D array stored channels-last: its NHWC transpose is C-contiguous (and it is not NCHW-contiguous)."""
    return a.ndim == 4 and not a.flags.c_contiguous and a.transpose(0, 2, 3, 1).flags.c_contiguous


def _contiguous(a):
    # Host arrays may arrive as slices or transposes; kernels index them as dense buffers, C-order or channels-last
    # (the latter only for a backend that says it takes them: see `_checked` in kernels/__init__.py).
    if not isinstance(a, np.ndarray) or a.flags.c_contiguous or is_channels_last(a):
        return a
    return np.ascontiguousarray(a)


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_conv_operands(x, w):
    """-> the convolution's output shape (N, K, P, Q)."""
    _check_float("x", x, 4, "(N, C, H, W)")
    _check_float("w", w, 4, "(K, C, R, S)", np.dtype(x.dtype))
    n, c, h, wd = x.shape
    k, wc, r, s = w.shape
    if wc != c:
        raise ValueError(f"w has {wc} input channels (w.shape={tuple(w.shape)}) but x has {c} (x.shape={tuple(x.shape)})")
    if r > h or s > wd:
        raise ValueError(f"kernel {r}x{s} does not fit in a {h}x{wd} input")
    return (n, k, h - r + 1, wd - s + 1)


def _check_bias(b, w, x):
    _check_float("b", b, 1, "(K,)", np.dtype(x.dtype))
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"b has {b.shape[0]} entries but w has {w.shape[0]} output channels")


def _pooled_shape(x_shape, what="x"):
    n, c, h, w = x_shape
    if h < 2 or w < 2:
        raise ValueError(f"2x2 max-pooling needs H and W of at least 2, got {what} shape {tuple(x_shape)}")
    return (n, c, h // 2, w // 2)


def _check_pooled(dy, argmax, y_shape, dtype=None, x_shape=None):
    _check_float("dy", dy, 4, "(N, C, H//2, W//2)", dtype)
    _check_array("argmax", argmax, 4, "(N, C, H//2, W//2)")
    if np.dtype(argmax.dtype) != np.uint8:
        raise ValueError(f"argmax must be uint8 (as maxpool2d_forward returns it), got {argmax.dtype}")
    for name, a in (("dy", dy), ("argmax", argmax)):
        if tuple(a.shape) != y_shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)} but pooling {x_shape} gives {y_shape}")


def check_conv2d_forward(x, w, b, relu=False):
    _check_conv_operands(x, w)
    _check_bias(b, w, x)
    return _contiguous(x), _contiguous(w), _contiguous(b), _check_bool("relu", relu)


def check_conv2d_backward(dy, x, w, need_dx=True):
    y_shape = _check_conv_operands(x, w)
    _check_float("dy", dy, 4, "(N, K, P, Q)", np.dtype(x.dtype))
    if tuple(dy.shape) != y_shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)} but the convolution's output has shape {y_shape}")
    return _contiguous(dy), _contiguous(x), _contiguous(w), _check_bool("need_dx", need_dx)


def check_maxpool2d_forward(x):
    _check_float("x", x, 4, "(N, C, H, W)")
    _pooled_shape(x.shape)
    return (_contiguous(x),)


def check_maxpool2d_backward(dy, argmax, x_shape):
    dims = tuple(x_shape) if isinstance(x_shape, (tuple, list)) else ()
    if len(dims) != 4 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1
                                 for d in dims):
        raise ValueError(f"x_shape must be four positive integers (N, C, H, W), got {x_shape!r}")
    x_shape = tuple(int(d) for d in dims)
    _check_pooled(dy, argmax, _pooled_shape(x_shape), x_shape=x_shape)
    return _contiguous(dy), _contiguous(argmax), x_shape


def check_conv2d_relu_maxpool2d_forward(x, w, b):
    _pooled_shape(_check_conv_operands(x, w), "convolution output")
    _check_bias(b, w, x)
    return _contiguous(x), _contiguous(w), _contiguous(b)


def check_conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, need_dx=True):
    conv_shape = _check_conv_operands(x, w)
    pooled = _pooled_shape(conv_shape, "convolution output")
    _check_pooled(dy, argmax, pooled, np.dtype(x.dtype), conv_shape)
    _check_float("y", y, 4, "(N, K, P//2, Q//2)", np.dtype(x.dtype))
    if tuple(y.shape) != pooled:
        raise ValueError(f"y has shape {tuple(y.shape)} but the pooled output has shape {pooled}")
    return (_contiguous(dy), _contiguous(y), _contiguous(argmax), _contiguous(x), _contiguous(w),
            _check_bool("need_dx", need_dx))


CHECKS = {name: globals()[f"check_{name}"] for name in CONTRACT + sum(FUSED_OPS.values(), ())}
