"""The registry and the contract: every backend exports exactly the eight contract functions (then its fused ops),
in contract order, with the contract's parameters; bad input raises ValueError at the boundary, before any backend
code runs."""

import importlib
import inspect
import sys

import numpy as np
import pytest

from numba_cnn import kernels
from numba_cnn.kernels import dropout_rng as host_dropout_rng, host, layers as numpy_layers
from numba_cnn.kernels import (BACKENDS, CONTRACT, FUSED_OPS, ORACLE, BackendInfo, UnknownBackend, backend_names,
                               get_backend, reference)
from numba_cnn.kernels.contract import ARRAY_FUNCTIONS, DROPOUT_RNG_FUNCTIONS, op_names
from conftest import backend_params

CONTRACT_PARAMETERS = {
    "conv2d_forward": ["x", "w", "b", "relu", "stride", "padding"],
    "conv2d_backward": ["dy", "x", "w", "need_dx", "stride", "padding"],
    "maxpool2d_forward": ["x", "size"],
    "maxpool2d_backward": ["dy", "argmax", "x_shape", "size"],
    "avgpool2d_forward": ["x", "size"],
    "avgpool2d_backward": ["dy", "x_shape", "size"],
    "batchnorm2d_forward": ["x", "gamma", "beta", "running_mean", "running_var", "momentum", "eps", "training"],
    "batchnorm2d_backward": ["dy", "x", "gamma", "mean", "inv_std"],
    "conv2d_relu_maxpool2d_forward": ["x", "w", "b", "padding"],
    "conv2d_relu_maxpool2d_backward": ["dy", "y", "argmax", "x", "w", "need_dx", "padding"],
    "batchnorm2d_relu_forward": ["x", "gamma", "beta", "running_mean", "running_var", "momentum", "eps", "training"],
    "batchnorm2d_relu_backward": ["dy", "y", "x", "gamma", "mean", "inv_std"],
    "conv2d_relu_backward": ["dy", "y", "x", "w", "need_dx", "stride", "padding"],
    "conv2d_relu_avgpool2d_backward": ["dy", "y", "x", "w", "need_dx", "stride", "padding", "size"],
    "batchnorm2d_relu_maxpool2d_forward": ["x", "gamma", "beta", "running_mean", "running_var", "momentum", "eps",
                                           "training"],
    "batchnorm2d_relu_maxpool2d_backward": ["dy", "y", "argmax", "x", "gamma", "mean", "inv_std"],
}
# The oracle also carries the one tolerance and the comparison every check uses.
ORACLE_EXTRAS = ["tolerance", "relative_error", "assert_close"]


def public_functions(module):
    """Public functions defined in `module` (plain or numba-compiled), in source order."""
    found = []
    for name, obj in vars(module).items():
        fn = getattr(obj, "py_func", obj)  # a numba dispatcher wraps the Python function it compiles
        if not name.startswith("_") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
            found.append((fn.__code__.co_firstlineno, name))
    return [name for _, name in sorted(found)]


def ops_module(backend_module):
    """The module that defines the backend's ops: the backend module itself, or (for a package) the submodule its
    contract functions come from."""
    fn = backend_module.conv2d_forward
    return sys.modules[getattr(fn, "py_func", fn).__module__]


@pytest.fixture(params=backend_names(include_oracle=True))
def any_backend_name(request):
    return request.param


@pytest.fixture
def backend_module(backend_name):
    return importlib.import_module(kernels.REGISTRY[backend_name])


def test_registry_lists_every_backend():
    assert BACKENDS == ("naive", "im2col", "jit", "cuda") == backend_names()
    assert backend_names(include_oracle=True) == BACKENDS + (ORACLE,)
    assert CONTRACT == ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward",
                        "avgpool2d_forward", "avgpool2d_backward", "batchnorm2d_forward", "batchnorm2d_backward")
    assert set(CONTRACT_PARAMETERS) == set(CONTRACT) | set(sum(FUSED_OPS.values(), ()))


def test_backend_defines_exactly_its_ops_in_order(any_backend_name):
    try:
        module = importlib.import_module(kernels.REGISTRY[any_backend_name])
    except kernels.BackendUnavailable as exc:
        pytest.skip(str(exc))
    assert isinstance(module.INFO, BackendInfo)
    extras = ORACLE_EXTRAS if any_backend_name == ORACLE else []
    optional = ["precompile"] if hasattr(module, "precompile") else []  # the registry's optional hook, last
    assert public_functions(ops_module(module)) == extras + list(op_names(module.INFO)) + optional


def test_backend_op_signatures(any_backend_name):
    try:
        module = importlib.import_module(kernels.REGISTRY[any_backend_name])
    except kernels.BackendUnavailable as exc:
        pytest.skip(str(exc))
    for name in op_names(module.INFO):
        fn = getattr(module, name)
        fn = getattr(fn, "py_func", fn)
        assert list(inspect.signature(fn).parameters) == CONTRACT_PARAMETERS[name], name


@pytest.mark.parametrize("backend_name", [p for p in backend_params() if p.values[0] == "cuda"])
def test_device_backend_layers_match_the_numpy_layers(backend_name, backend_module):
    """A backend whose arrays live off the host brings, with the same parameters, every function of
    numba_cnn/kernels/layers.py as its `layers`, and the host's array runtime (host.py, with synchronize) and
    dropout generator (dropout_rng.py) as its own functions."""
    assert backend_module.INFO.on_device
    for name in public_functions(numpy_layers):
        theirs = getattr(backend_module.layers, name, None)
        assert theirs is not None, f"{backend_name}.layers lacks {name}"
        assert (list(inspect.signature(theirs).parameters)
                == list(inspect.signature(getattr(numpy_layers, name)).parameters)), name
    assert set(public_functions(host)) <= set(ARRAY_FUNCTIONS)
    assert public_functions(host_dropout_rng) == list(DROPOUT_RNG_FUNCTIONS)
    for source, names in ((host, ARRAY_FUNCTIONS), (host_dropout_rng, DROPOUT_RNG_FUNCTIONS)):
        for name in names:
            theirs = getattr(backend_module, name, None)
            if name == "device_event" and theirs is None:  # the simulator's events hold no times
                assert backend_module.runtime.SIMULATED
                continue
            assert callable(theirs), f"{backend_name} lacks {name}"
            ours = getattr(source, name)
            if inspect.isfunction(ours):  # host.py's to_device and to_host are numpy's own, synchronize None
                assert (list(inspect.signature(theirs).parameters)
                        == list(inspect.signature(ours).parameters)), name


def test_backend_has_header_docstring(backend_module):
    doc = backend_module.__doc__ or ""
    assert doc.strip(), "a backend module starts with a docstring saying how it computes the contract"
    for name in op_names(backend_module.INFO):
        assert (getattr(backend_module, name).__doc__ or "").strip(), f"{name} has no docstring"


def test_get_backend_wraps_the_module(backend_name, backend_module):
    backend = get_backend(backend_name)
    assert backend.name == backend_name and backend.module is backend_module
    assert backend.info is backend_module.INFO
    assert get_backend(backend_name) is backend  # one instance per name
    for name in op_names(backend.info):
        assert getattr(backend, name).__name__ == name
    # the array runtime and dropout generator: a device backend's own, else the host's
    for source, names in ((backend_module if backend.info.on_device else host, ARRAY_FUNCTIONS),
                          (backend_module if backend.info.on_device else host_dropout_rng, DROPOUT_RNG_FUNCTIONS)):
        for name in names:
            assert getattr(backend, name) is getattr(source, name), name


THROWAWAY_BACKEND = '''"""throwaway backend: the oracle's ops under another name, for the registry test."""
from numba_cnn.kernels.contract import BackendInfo
from numba_cnn.kernels.reference import (avgpool2d_backward, avgpool2d_forward, batchnorm2d_backward,
                                        batchnorm2d_forward, conv2d_backward, conv2d_forward, maxpool2d_backward,
                                        maxpool2d_forward)

INFO = BackendInfo(summary="the oracle under another name", slow=True)
'''


def test_adding_a_backend_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    """kernels/README.md's recipe, followed: write a module with INFO and the contract, register it; the registry
    then lists it, checks its input at the boundary and runs it, and Model trains on it."""
    (tmp_path / "throwaway_backend.py").write_text(THROWAWAY_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(kernels, "REGISTRY", dict(kernels.REGISTRY))
    monkeypatch.setattr(kernels, "_cache", {})
    kernels.register("throwaway", "throwaway_backend")
    assert "throwaway" in backend_names()
    backend = get_backend("throwaway")
    assert backend.info.slow and not backend.has_fused("conv2d_relu_maxpool2d")
    with pytest.raises(ValueError, match="4 dimensions"):
        backend.maxpool2d_forward(np.zeros((2, 2), np.float32))
    y, argmax = backend.maxpool2d_forward(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4))
    np.testing.assert_array_equal(y, [[[[5, 7], [13, 15]]]])
    np.testing.assert_array_equal(backend.avgpool2d_forward(np.arange(16.0).reshape(1, 1, 4, 4), size=4), [[[[7.5]]]])
    from numba_cnn.model import Model

    model = Model(backend, dtype=np.float64)
    loss, _ = model.forward_backward(np.zeros((1, 1, 28, 28)), np.array([3]), np.random.default_rng(0))
    assert loss == pytest.approx(np.log(10))  # zero images and zero biases: every class equally likely


def test_a_module_without_info_is_refused():
    with pytest.raises(TypeError, match="INFO"):
        kernels.Backend("bare", type(sys)("bare"))


def test_oracle_is_registered_but_not_offered():
    assert ORACLE not in BACKENDS and get_backend(ORACLE).module is reference


@pytest.mark.parametrize("name", ["", "numpy", "NAIVE", "im2col ", None])
def test_unknown_backend_raises_value_error(name):
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend(name)
    assert issubclass(UnknownBackend, ValueError)


def _f32(*shape):
    return np.ones(shape, dtype=np.float32)


def _u8(*shape):
    return np.zeros(shape, dtype=np.uint8)


def good_call(op):
    """A valid call of op, every argument given: conv x(2,3,6,5), w(4,3,3,3), b(4), dy(2,4,4,3); the pooling
    backward passes x_shape (2,3,6,5) -> dy, argmax (2,3,3,2); the pooling forward passes x(2,3,17,17), room for a
    17x17 window; batchnorm x, dy (2,3,6,5) and vectors of 3."""
    return {
        "conv2d_forward": (_f32(2, 3, 6, 5), _f32(4, 3, 3, 3), _f32(4), False, 1, 0),
        "conv2d_backward": (_f32(2, 4, 4, 3), _f32(2, 3, 6, 5), _f32(4, 3, 3, 3), True, 1, 0),
        "maxpool2d_forward": (_f32(2, 3, 17, 17), 2),
        "maxpool2d_backward": (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2), (2, 3, 6, 5), 2),
        "avgpool2d_forward": (_f32(2, 3, 17, 17), 2),
        "avgpool2d_backward": (_f32(2, 3, 3, 2), (2, 3, 6, 5), 2),
        "batchnorm2d_forward": (_f32(2, 3, 6, 5), _f32(3), _f32(3), _f32(3), _f32(3), 0.99, 1e-3, True),
        "batchnorm2d_backward": (_f32(2, 3, 6, 5), _f32(2, 3, 6, 5), _f32(3), _f32(3), _f32(3)),
    }[op]


def changed(op, **arguments):
    """good_call(op) with the named arguments replaced."""
    call = list(good_call(op))
    for name, value in arguments.items():
        call[CONTRACT_PARAMETERS[op].index(name)] = value
    return tuple(call)


# (id, op, arguments). Each is wrong in exactly one way against the valid call above (the first ones leave the
# trailing arguments to their defaults).
BAD_CALLS = [
    ("conv_fwd_x_3d", "conv2d_forward", lambda: (_f32(3, 6, 5), _f32(4, 3, 3, 3), _f32(4), False)),
    ("conv_fwd_w_5d", "conv2d_forward", lambda: (_f32(2, 3, 6, 5), _f32(1, 4, 3, 3, 3), _f32(4), False)),
    ("conv_fwd_channel_mismatch", "conv2d_forward", lambda: (_f32(2, 3, 6, 5), _f32(4, 2, 3, 3), _f32(4), False)),
    ("conv_fwd_kernel_too_big", "conv2d_forward", lambda: (_f32(2, 3, 6, 5), _f32(4, 3, 3, 6), _f32(4), False)),
    ("conv_fwd_empty_batch", "conv2d_forward", lambda: (_f32(0, 3, 6, 5), _f32(4, 3, 3, 3), _f32(4), False)),
    ("conv_fwd_w_float64", "conv2d_forward",
     lambda: (_f32(2, 3, 6, 5), _f32(4, 3, 3, 3).astype(np.float64), _f32(4), False)),
    ("conv_fwd_b_float64", "conv2d_forward",
     lambda: (_f32(2, 3, 6, 5), _f32(4, 3, 3, 3), _f32(4).astype(np.float64), False)),
    ("conv_fwd_x_int", "conv2d_forward",
     lambda: (_f32(2, 3, 6, 5).astype(np.int32), _f32(4, 3, 3, 3), _f32(4), False)),
    ("conv_fwd_x_float16", "conv2d_forward",
     lambda: (_f32(2, 3, 6, 5).astype(np.float16), _f32(4, 3, 3, 3), _f32(4), False)),
    ("conv_fwd_b_wrong_length", "conv2d_forward", lambda: (_f32(2, 3, 6, 5), _f32(4, 3, 3, 3), _f32(3), False)),
    ("conv_fwd_b_2d", "conv2d_forward", lambda: (_f32(2, 3, 6, 5), _f32(4, 3, 3, 3), _f32(4, 1), False)),
    ("conv_fwd_x_list", "conv2d_forward",
     lambda: (_f32(2, 3, 6, 5).tolist(), _f32(4, 3, 3, 3), _f32(4), False)),
    ("conv_fwd_relu_int", "conv2d_forward", lambda: (_f32(2, 3, 6, 5), _f32(4, 3, 3, 3), _f32(4), 1)),
    ("conv_bwd_dy_wrong_shape", "conv2d_backward",
     lambda: (_f32(2, 4, 4, 4), _f32(2, 3, 6, 5), _f32(4, 3, 3, 3), True)),
    ("conv_bwd_dy_float64", "conv2d_backward",
     lambda: (_f32(2, 4, 4, 3).astype(np.float64), _f32(2, 3, 6, 5), _f32(4, 3, 3, 3), True)),
    ("conv_bwd_dy_3d", "conv2d_backward", lambda: (_f32(4, 4, 3), _f32(2, 3, 6, 5), _f32(4, 3, 3, 3), True)),
    ("conv_bwd_x_scalar", "conv2d_backward", lambda: (_f32(2, 4, 4, 3), 1.0, _f32(4, 3, 3, 3), True)),
    ("conv_bwd_need_dx_none", "conv2d_backward",
     lambda: (_f32(2, 4, 4, 3), _f32(2, 3, 6, 5), _f32(4, 3, 3, 3), None)),
    ("pool_fwd_height_1", "maxpool2d_forward", lambda: (_f32(2, 3, 1, 5),)),
    ("pool_fwd_x_5d", "maxpool2d_forward", lambda: (_f32(1, 2, 3, 6, 5),)),
    ("pool_fwd_x_int", "maxpool2d_forward", lambda: (_u8(2, 3, 6, 5),)),
    ("pool_fwd_x_list", "maxpool2d_forward", lambda: ([[[[1.0, 2.0], [3.0, 4.0]]]],)),
    ("pool_bwd_argmax_int64", "maxpool2d_backward",
     lambda: (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2).astype(np.int64), (2, 3, 6, 5))),
    ("pool_bwd_argmax_wrong_shape", "maxpool2d_backward", lambda: (_f32(2, 3, 3, 2), _u8(2, 3, 2, 2), (2, 3, 6, 5))),
    ("pool_bwd_argmax_list", "maxpool2d_backward",
     lambda: (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2).tolist(), (2, 3, 6, 5))),
    ("pool_bwd_dy_wrong_shape", "maxpool2d_backward", lambda: (_f32(2, 3, 3, 3), _u8(2, 3, 3, 2), (2, 3, 6, 5))),
    ("pool_bwd_dy_int", "maxpool2d_backward", lambda: (_u8(2, 3, 3, 2), _u8(2, 3, 3, 2), (2, 3, 6, 5))),
    ("pool_bwd_x_shape_3_dims", "maxpool2d_backward", lambda: (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2), (3, 6, 5))),
    ("pool_bwd_x_shape_zero", "maxpool2d_backward", lambda: (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2), (2, 3, 6, 0))),
    ("pool_bwd_x_shape_floats", "maxpool2d_backward",
     lambda: (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2), (2.0, 3.0, 6.0, 5.0))),
    ("pool_bwd_x_shape_disagrees", "maxpool2d_backward",
     lambda: (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2), (2, 3, 8, 5))),
    ("pool_bwd_x_shape_none", "maxpool2d_backward", lambda: (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2), None)),
    ("conv_fwd_stride_0", "conv2d_forward", lambda: changed("conv2d_forward", stride=0)),
    ("conv_fwd_stride_negative", "conv2d_forward", lambda: changed("conv2d_forward", stride=-1)),
    ("conv_fwd_stride_float", "conv2d_forward", lambda: changed("conv2d_forward", stride=2.0)),
    ("conv_fwd_stride_bool", "conv2d_forward", lambda: changed("conv2d_forward", stride=True)),
    ("conv_fwd_padding_negative", "conv2d_forward", lambda: changed("conv2d_forward", padding=-1)),
    ("conv_fwd_padding_negative_side", "conv2d_forward", lambda: changed("conv2d_forward", padding=(1, 1, -1, 1))),
    ("conv_fwd_padding_three_sides", "conv2d_forward", lambda: changed("conv2d_forward", padding=(1, 1, 1))),
    ("conv_fwd_padding_float", "conv2d_forward", lambda: changed("conv2d_forward", padding=1.5)),
    ("conv_bwd_stride_0", "conv2d_backward", lambda: changed("conv2d_backward", stride=0)),
    ("conv_bwd_padding_negative", "conv2d_backward", lambda: changed("conv2d_backward", padding=(0, -1))),
    ("conv_bwd_dy_not_strided", "conv2d_backward", lambda: changed("conv2d_backward", stride=2)),
    ("conv_bwd_dy_not_padded", "conv2d_backward", lambda: changed("conv2d_backward", padding=1)),
    ("pool_fwd_size_0", "maxpool2d_forward", lambda: changed("maxpool2d_forward", size=0)),
    ("pool_fwd_size_bool", "maxpool2d_forward", lambda: changed("maxpool2d_forward", size=True)),
    ("pool_fwd_size_three_values", "maxpool2d_forward", lambda: changed("maxpool2d_forward", size=(2, 2, 2))),
    ("pool_fwd_size_larger_than_input", "maxpool2d_forward", lambda: changed("maxpool2d_forward", size=(2, 18))),
    ("pool_fwd_size_17x17", "maxpool2d_forward", lambda: changed("maxpool2d_forward", size=17)),  # argmax: uint8
    ("pool_bwd_size_disagrees", "maxpool2d_backward", lambda: changed("maxpool2d_backward", size=3)),
    ("pool_bwd_size_larger_than_input", "maxpool2d_backward", lambda: changed("maxpool2d_backward", size=(7, 1))),
    ("avgpool_fwd_x_3d", "avgpool2d_forward", lambda: changed("avgpool2d_forward", x=_f32(3, 17, 17))),
    ("avgpool_fwd_x_int", "avgpool2d_forward", lambda: changed("avgpool2d_forward", x=_u8(2, 3, 17, 17))),
    ("avgpool_fwd_size_negative", "avgpool2d_forward", lambda: changed("avgpool2d_forward", size=(2, -2))),
    ("avgpool_fwd_size_larger_than_input", "avgpool2d_forward", lambda: changed("avgpool2d_forward", size=18)),
    ("avgpool_bwd_dy_wrong_shape", "avgpool2d_backward", lambda: changed("avgpool2d_backward", dy=_f32(2, 3, 2, 2))),
    ("avgpool_bwd_dy_float16", "avgpool2d_backward",
     lambda: changed("avgpool2d_backward", dy=_f32(2, 3, 3, 2).astype(np.float16))),
    ("avgpool_bwd_x_shape_3_dims", "avgpool2d_backward", lambda: changed("avgpool2d_backward", x_shape=(3, 6, 5))),
    ("avgpool_bwd_size_disagrees", "avgpool2d_backward", lambda: changed("avgpool2d_backward", size=(2, 3))),
    ("bn_fwd_x_3d", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", x=_f32(3, 6, 5))),
    ("bn_fwd_gamma_wrong_length", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", gamma=_f32(4))),
    ("bn_fwd_beta_2d", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", beta=_f32(3, 1))),
    ("bn_fwd_running_mean_float64", "batchnorm2d_forward",
     lambda: changed("batchnorm2d_forward", running_mean=_f32(3).astype(np.float64))),
    ("bn_fwd_running_var_strided", "batchnorm2d_forward",  # updated in place: a copy would lose the update
     lambda: changed("batchnorm2d_forward", running_var=_f32(6)[::2])),
    ("bn_fwd_running_var_list", "batchnorm2d_forward",
     lambda: changed("batchnorm2d_forward", running_var=[1.0, 1.0, 1.0])),
    ("bn_fwd_momentum_1", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", momentum=1.0)),
    ("bn_fwd_momentum_negative", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", momentum=-0.1)),
    ("bn_fwd_momentum_none", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", momentum=None)),
    ("bn_fwd_eps_0", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", eps=0.0)),
    ("bn_fwd_eps_negative", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", eps=-1e-3)),
    ("bn_fwd_training_int", "batchnorm2d_forward", lambda: changed("batchnorm2d_forward", training=1)),
    ("bn_bwd_dy_wrong_shape", "batchnorm2d_backward", lambda: changed("batchnorm2d_backward", dy=_f32(2, 3, 6, 4))),
    ("bn_bwd_dy_float64", "batchnorm2d_backward",
     lambda: changed("batchnorm2d_backward", dy=_f32(2, 3, 6, 5).astype(np.float64))),
    ("bn_bwd_gamma_wrong_length", "batchnorm2d_backward", lambda: changed("batchnorm2d_backward", gamma=_f32(2))),
    ("bn_bwd_mean_2d", "batchnorm2d_backward", lambda: changed("batchnorm2d_backward", mean=_f32(1, 3))),
    ("bn_bwd_inv_std_float64", "batchnorm2d_backward",
     lambda: changed("batchnorm2d_backward", inv_std=_f32(3).astype(np.float64))),
]


@pytest.fixture
def tripwired_backend(backend_name, backend_module, monkeypatch):
    """The registry's backend built afresh over its module with every raw contract function replaced by one that
    fails the test if it is ever called, so anything that reaches backend code is caught."""
    def tripwire(name):
        def raw_function_called(*args, **kwargs):
            pytest.fail(f"{backend_name}.{name} ran: the boundary check let bad input through")
        return raw_function_called

    for name in CONTRACT:
        monkeypatch.setattr(backend_module, name, tripwire(name))
    monkeypatch.setattr(kernels, "_cache", {})
    return get_backend(backend_name)


def test_tripwire_fires_on_good_input(tripwired_backend):
    # Without this, a tripwire that never fires would make the test below pass vacuously.
    with pytest.raises(pytest.fail.Exception, match="ran: the boundary check"):
        tripwired_backend.maxpool2d_forward(_f32(2, 3, 6, 5))


@pytest.mark.parametrize("op, make_args", [pytest.param(op, make, id=case) for case, op, make in BAD_CALLS])
def test_bad_input_raises_value_error_before_backend_code(tripwired_backend, op, make_args):
    with pytest.raises(ValueError):
        getattr(tripwired_backend, op)(*make_args())


@pytest.mark.parametrize("op, make_args", [pytest.param(op, make, id=case) for case, op, make in BAD_CALLS])
def test_bad_call_differs_from_a_good_one_in_one_place(op, make_args):
    """Each bad call is a valid call with exactly one argument changed, so the ValueError above comes from the
    check meant for that argument, not from some other mistake in the test's arguments. A bad call may leave
    trailing arguments to their defaults, which are the good call's."""
    good = good_call(op)
    getattr(get_backend("im2col"), op)(*good)  # valid: must not raise
    getattr(get_backend("im2col"), op)(*good[:len(make_args())])  # the defaults left out are valid too
    bad = make_args()
    assert len(bad) <= len(good)
    differing = [i for i, (g, b) in enumerate(zip(good, bad)) if not _same_argument(g, b)]
    assert len(differing) == 1, f"a bad call must change exactly one argument of the good one, changed {differing}"


def _same_argument(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and a.flags.c_contiguous == b.flags.c_contiguous
    return repr(a) == repr(b)  # (2, 3) and (2.0, 3.0) are equal but not the same argument


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_inputs_reach_only_the_backends_that_take_them(channels_last):
    """A 4-D array stored channels-last (an NHWC buffer viewed NCHW) passes the boundary as it is to a backend whose
    INFO says channels_last (jit) and as a C-contiguous copy to any other; other strided arrays arrive C-contiguous
    everywhere."""
    seen = []

    def record(*args):
        seen.append(args[0])

    module = type(sys)("probe_backend")
    module.INFO = BackendInfo(summary="records what it is handed", channels_last=channels_last)
    for name in CONTRACT:
        setattr(module, name, record)
    backend = kernels.Backend("probe", module)
    rng = np.random.default_rng(0)
    nhwc = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    stored_channels_last = nhwc.transpose(0, 3, 1, 2)  # (2, 3, 5, 6)
    sliced = rng.standard_normal((2, 3, 10, 6)).astype(np.float32)[:, :, ::2]
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    for x in (stored_channels_last, sliced):
        backend.conv2d_forward(x, w, np.zeros(4, np.float32), True)
    got_channels_last, got_sliced = seen
    assert got_sliced.flags.c_contiguous
    np.testing.assert_array_equal(got_channels_last, stored_channels_last)
    if channels_last:
        assert got_channels_last is stored_channels_last
    else:
        assert got_channels_last.flags.c_contiguous
