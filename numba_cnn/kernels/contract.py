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

CONTRACT = ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward", "avgpool2d_forward",
            "avgpool2d_backward", "batchnorm2d_forward", "batchnorm2d_backward")
# Optional fused ops: name -> its forward and backward functions. A backend lists the ones it has in its INFO; the
# network's fusion pass (numba_cnn/network/plan.py) uses them where present and the composition of contract ops
# otherwise (kernels/README.md). conv2d_relu_maxpool2d covers a stride-1 convolution (any zero padding) and a 2x2 pool;
# batchnorm2d_relu is BatchNorm2D then ReLU; conv2d_relu is a backward only (its forward is the contract's
# conv2d_forward with relu=True): the ReLU's derivative taken inside the convolution's backward; so is
# conv2d_relu_avgpool2d (forward: conv2d_forward with relu=True, then avgpool2d_forward with windows of `size`, 2x2 or
# the whole image for a global pool), whose dy is the pool's gradient. batchnorm2d_relu_maxpool2d is
# batchnorm2d_relu_forward then a 2x2 maxpool2d_forward; its backward's dy, y and argmax are the pool's.
FUSED_OPS = {"conv2d_relu_maxpool2d": ("conv2d_relu_maxpool2d_forward", "conv2d_relu_maxpool2d_backward"),
             "batchnorm2d_relu": ("batchnorm2d_relu_forward", "batchnorm2d_relu_backward"),
             "conv2d_relu": ("conv2d_relu_backward",),
             "conv2d_relu_avgpool2d": ("conv2d_relu_avgpool2d_backward",),
             "batchnorm2d_relu_maxpool2d": ("batchnorm2d_relu_maxpool2d_forward",
                                            "batchnorm2d_relu_maxpool2d_backward")}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# What a Backend holds beside its ops and `layers`, by name: its array runtime and its dropout generator. A host
# backend gets numba_cnn/kernels/host.py's and dropout_rng.py's; an on_device module defines its own.
ARRAY_FUNCTIONS = ("to_device", "to_host", "synchronize", "device_event", "zeros_like", "take_rows",
                   "as_float_images")
DROPOUT_RNG_FUNCTIONS = ("make_dropout_rng", "dropout_rng_state", "restore_dropout_rng")


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
        numba_cnn/kernels/layers.py on its arrays), the ARRAY_FUNCTIONS (host.py's on its arrays) and the
        DROPOUT_RNG_FUNCTIONS (dropout_rng.py's for its own generator).
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


def _check_stride(stride):
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    return int(stride)


def _check_padding(padding):
    """0, an int p, a pair (rows, cols) or a 4-tuple (top, bottom, left, right) of non-negative ints ->
    the 4-tuple."""
    values = (padding,) if isinstance(padding, (int, np.integer)) else padding
    if not isinstance(values, (tuple, list)) or len(values) not in (1, 2, 4) or not all(
            isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p >= 0 for p in values):
        raise ValueError(f"padding must be a non-negative int, (rows, cols) or (top, bottom, left, right), "
                         f"got {padding!r}")
    values = tuple(int(p) for p in values)
    if len(values) == 1:
        return values * 4
    if len(values) == 2:
        return (values[0], values[0], values[1], values[1])
    return values


def conv_output_size(size, kernel, stride, before, after):
    """The output length of a convolution along one axis: floor((size + before + after - kernel) / stride) + 1."""
    return (size + before + after - kernel) // stride + 1


def _check_conv_operands(x, w, stride=1, padding=(0, 0, 0, 0)):
    """-> the convolution's output shape (N, K, P, Q)."""
    _check_float("x", x, 4, "(N, C, H, W)")
    _check_float("w", w, 4, "(K, C, R, S)", np.dtype(x.dtype))
    n, c, h, wd = x.shape
    k, wc, r, s = w.shape
    if wc != c:
        raise ValueError(f"w has {wc} input channels (w.shape={tuple(w.shape)}) but x has {c} (x.shape={tuple(x.shape)})")
    top, bottom, left, right = padding
    if r > h + top + bottom or s > wd + left + right:
        raise ValueError(f"kernel {r}x{s} does not fit in a {h}x{wd} input padded by {padding}")
    return (n, k, conv_output_size(h, r, stride, top, bottom), conv_output_size(wd, s, stride, left, right))


def _check_bias(b, w, x):
    _check_float("b", b, 1, "(K,)", np.dtype(x.dtype))
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"b has {b.shape[0]} entries but w has {w.shape[0]} output channels")


def _check_pool_size(size, argmax=True):
    """An int k or a pair (kh, kw) of positive ints -> the pair; with argmax (max pooling), a window's offsets must
    fit argmax's uint8 (an average pool's window may be any size: a global pool's is the whole image)."""
    values = (size, size) if isinstance(size, (int, np.integer)) else size
    if not isinstance(values, (tuple, list)) or len(values) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"size must be a positive int or a pair (rows, cols) of them, got {size!r}")
    kh, kw = int(values[0]), int(values[1])
    if argmax and kh * kw > 256:
        raise ValueError(f"a {kh}x{kw} pooling window has more than 256 elements (argmax is uint8)")
    return kh, kw


def _pooled_shape(x_shape, size=(2, 2), what="x"):
    n, c, h, w = x_shape
    kh, kw = size
    if h < kh or w < kw:
        raise ValueError(f"{kh}x{kw} pooling needs H of at least {kh} and W of at least {kw}, got {what} shape "
                         f"{tuple(x_shape)}")
    return (n, c, h // kh, w // kw)


def _check_x_shape(x_shape):
    dims = tuple(x_shape) if isinstance(x_shape, (tuple, list)) else ()
    if len(dims) != 4 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1
                                 for d in dims):
        raise ValueError(f"x_shape must be four positive integers (N, C, H, W), got {x_shape!r}")
    return tuple(int(d) for d in dims)


def _check_pooled(dy, argmax, y_shape, dtype=None, x_shape=None):
    _check_float("dy", dy, 4, "(N, C, H//kh, W//kw)", dtype)
    _check_array("argmax", argmax, 4, "(N, C, H//kh, W//kw)")
    if np.dtype(argmax.dtype) != np.uint8:
        raise ValueError(f"argmax must be uint8 (as maxpool2d_forward returns it), got {argmax.dtype}")
    for name, a in (("dy", dy), ("argmax", argmax)):
        if tuple(a.shape) != y_shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)} but pooling {x_shape} gives {y_shape}")


def _check_channel_vector(name, a, channels, dtype):
    _check_float(name, a, 1, "(C,)", dtype)
    if a.shape[0] != channels:
        raise ValueError(f"{name} has {a.shape[0]} entries but x has {channels} channels")


def _check_fraction(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not low <= value < high:
        raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")
    return float(value)


def check_conv2d_forward(x, w, b, relu=False, stride=1, padding=0):
    stride, padding = _check_stride(stride), _check_padding(padding)
    _check_conv_operands(x, w, stride, padding)
    _check_bias(b, w, x)
    return _contiguous(x), _contiguous(w), _contiguous(b), _check_bool("relu", relu), stride, padding


def check_conv2d_backward(dy, x, w, need_dx=True, stride=1, padding=0):
    stride, padding = _check_stride(stride), _check_padding(padding)
    y_shape = _check_conv_operands(x, w, stride, padding)
    _check_float("dy", dy, 4, "(N, K, P, Q)", np.dtype(x.dtype))
    if tuple(dy.shape) != y_shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)} but the convolution's output has shape {y_shape}")
    return (_contiguous(dy), _contiguous(x), _contiguous(w), _check_bool("need_dx", need_dx), stride, padding)


def check_maxpool2d_forward(x, size=2):
    size = _check_pool_size(size)
    _check_float("x", x, 4, "(N, C, H, W)")
    _pooled_shape(x.shape, size)
    return _contiguous(x), size


def check_maxpool2d_backward(dy, argmax, x_shape, size=2):
    size = _check_pool_size(size)
    x_shape = _check_x_shape(x_shape)
    _check_pooled(dy, argmax, _pooled_shape(x_shape, size), x_shape=x_shape)
    return _contiguous(dy), _contiguous(argmax), x_shape, size


def check_avgpool2d_forward(x, size=2):
    size = _check_pool_size(size, argmax=False)
    _check_float("x", x, 4, "(N, C, H, W)")
    _pooled_shape(x.shape, size)
    return _contiguous(x), size


def check_avgpool2d_backward(dy, x_shape, size=2):
    size = _check_pool_size(size, argmax=False)
    x_shape = _check_x_shape(x_shape)
    y_shape = _pooled_shape(x_shape, size)
    _check_float("dy", dy, 4, "(N, C, H//kh, W//kw)")
    if tuple(dy.shape) != y_shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)} but pooling {x_shape} gives {y_shape}")
    return _contiguous(dy), x_shape, size


def check_batchnorm2d_forward(x, gamma, beta, running_mean, running_var, momentum=0.99, eps=1e-3, training=True):
    _check_float("x", x, 4, "(N, C, H, W)")
    dtype, channels = np.dtype(x.dtype), x.shape[1]
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(name, a, channels, dtype)
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
            raise ValueError(f"{name} is updated in place and must be a contiguous array")
    momentum = _check_fraction("momentum", momentum, 0.0, 1.0)
    eps = _check_fraction("eps", eps, 1e-12, float("inf"))
    return (_contiguous(x), _contiguous(gamma), _contiguous(beta), running_mean, running_var, momentum, eps,
            _check_bool("training", training))


def check_batchnorm2d_backward(dy, x, gamma, mean, inv_std):
    _check_float("x", x, 4, "(N, C, H, W)")
    dtype, channels = np.dtype(x.dtype), x.shape[1]
    _check_float("dy", dy, 4, "(N, C, H, W)", dtype)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy has shape {tuple(dy.shape)} but x has shape {tuple(x.shape)}")
    for name, a in (("gamma", gamma), ("mean", mean), ("inv_std", inv_std)):
        _check_channel_vector(name, a, channels, dtype)
    return _contiguous(dy), _contiguous(x), _contiguous(gamma), _contiguous(mean), _contiguous(inv_std)


def check_batchnorm2d_relu_forward(x, gamma, beta, running_mean, running_var, momentum=0.99, eps=1e-3,
                                   training=True):
    return check_batchnorm2d_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training)


def check_batchnorm2d_relu_backward(dy, y, x, gamma, mean, inv_std):
    dy, x, gamma, mean, inv_std = check_batchnorm2d_backward(dy, x, gamma, mean, inv_std)
    _check_float("y", y, 4, "(N, C, H, W)", np.dtype(x.dtype))
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"y has shape {tuple(y.shape)} but x has shape {tuple(x.shape)}")
    return dy, _contiguous(y), x, gamma, mean, inv_std


def check_conv2d_relu_backward(dy, y, x, w, need_dx=True, stride=1, padding=0):
    dy, x, w, need_dx, stride, padding = check_conv2d_backward(dy, x, w, need_dx, stride, padding)
    _check_float("y", y, 4, "(N, K, P, Q)", np.dtype(x.dtype))
    if tuple(y.shape) != tuple(dy.shape):
        raise ValueError(f"y has shape {tuple(y.shape)} but dy has shape {tuple(dy.shape)}")
    return dy, _contiguous(y), x, w, need_dx, stride, padding


def check_conv2d_relu_avgpool2d_backward(dy, y, x, w, need_dx=True, stride=1, padding=0, size=2):
    stride, padding, size = _check_stride(stride), _check_padding(padding), _check_pool_size(size, argmax=False)
    conv_shape = _check_conv_operands(x, w, stride, padding)
    _check_float("y", y, 4, "(N, K, P, Q)", np.dtype(x.dtype))
    if tuple(y.shape) != conv_shape:
        raise ValueError(f"y has shape {tuple(y.shape)} but the convolution's output has shape {conv_shape}")
    pooled = _pooled_shape(conv_shape, size, what="convolution output")
    _check_float("dy", dy, 4, "(N, K, P//kh, Q//kw)", np.dtype(x.dtype))
    if tuple(dy.shape) != pooled:
        raise ValueError(f"dy has shape {tuple(dy.shape)} but the pooled output has shape {pooled}")
    return (_contiguous(dy), _contiguous(y), _contiguous(x), _contiguous(w), _check_bool("need_dx", need_dx), stride,
            padding, size)


def check_conv2d_relu_maxpool2d_forward(x, w, b, padding=0):
    padding = _check_padding(padding)
    _pooled_shape(_check_conv_operands(x, w, 1, padding), what="convolution output")
    _check_bias(b, w, x)
    return _contiguous(x), _contiguous(w), _contiguous(b), padding


def check_conv2d_relu_maxpool2d_backward(dy, y, argmax, x, w, need_dx=True, padding=0):
    padding = _check_padding(padding)
    conv_shape = _check_conv_operands(x, w, 1, padding)
    pooled = _pooled_shape(conv_shape, what="convolution output")
    _check_pooled(dy, argmax, pooled, np.dtype(x.dtype), conv_shape)
    _check_float("y", y, 4, "(N, K, P//2, Q//2)", np.dtype(x.dtype))
    if tuple(y.shape) != pooled:
        raise ValueError(f"y has shape {tuple(y.shape)} but the pooled output has shape {pooled}")
    return (_contiguous(dy), _contiguous(y), _contiguous(argmax), _contiguous(x), _contiguous(w),
            _check_bool("need_dx", need_dx), padding)


def check_batchnorm2d_relu_maxpool2d_forward(x, gamma, beta, running_mean, running_var, momentum=0.99, eps=1e-3,
                                             training=True):
    checked = check_batchnorm2d_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training)
    _pooled_shape(x.shape)
    return checked


def check_batchnorm2d_relu_maxpool2d_backward(dy, y, argmax, x, gamma, mean, inv_std):
    _check_float("x", x, 4, "(N, C, H, W)")
    dtype, pooled = np.dtype(x.dtype), _pooled_shape(x.shape)
    _check_pooled(dy, argmax, pooled, dtype, tuple(x.shape))
    _check_float("y", y, 4, "(N, C, H//2, W//2)", dtype)
    if tuple(y.shape) != pooled:
        raise ValueError(f"y has shape {tuple(y.shape)} but the pooled output has shape {pooled}")
    for name, a in (("gamma", gamma), ("mean", mean), ("inv_std", inv_std)):
        _check_channel_vector(name, a, x.shape[1], dtype)
    return (_contiguous(dy), _contiguous(y), _contiguous(argmax), _contiguous(x), _contiguous(gamma),
            _contiguous(mean), _contiguous(inv_std))


CHECKS = {name: globals()[f"check_{name}"] for name in CONTRACT + sum(FUSED_OPS.values(), ())}
