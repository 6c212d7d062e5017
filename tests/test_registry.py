"""The registry and the contract: every backend exports exactly the four contract functions, in contract order,
with the contract's parameters; bad input raises ValueError at the boundary, before any backend code runs."""

import importlib
import inspect

import numpy as np
import pytest

from numba_cnn import kernels
from numba_cnn.kernels import BACKENDS, CONTRACT, UnknownBackend, get_backend

CONTRACT_PARAMETERS = {
    "conv2d_forward": ["x", "w", "b", "relu"],
    "conv2d_backward": ["dy", "x", "w", "need_dx"],
    "maxpool2d_forward": ["x"],
    "maxpool2d_backward": ["dy", "argmax", "x_shape"],
}
# A backend whose arrays live off the host also exports these two (kernels/README.md).
DEVICE_EXTRAS = {"to_device", "to_host"}


def public_functions(module):
    """Public functions defined in `module` (plain or numba-compiled), in source order."""
    found = []
    for name, obj in vars(module).items():
        fn = getattr(obj, "py_func", obj)  # a numba dispatcher wraps the Python function it compiles
        if not name.startswith("_") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
            found.append((fn.__code__.co_firstlineno, name))
    return [name for _, name in sorted(found)]


@pytest.fixture
def backend_module(backend_name):
    return importlib.import_module(f"numba_cnn.kernels.{backend_name}")


def test_registry_lists_every_backend():
    assert BACKENDS == ("naive", "im2col", "jit", "cuda")
    assert CONTRACT == ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward")


def fused_functions(module):
    """The optional fused ops a backend names in FUSED, as <name>_forward, <name>_backward."""
    return [f"{name}_{way}" for name in getattr(module, "FUSED", ()) for way in ("forward", "backward")]


def test_backend_defines_exactly_the_contract_in_order(backend_module):
    functions = public_functions(backend_module)
    extras = DEVICE_EXTRAS if hasattr(backend_module, "to_device") else set()
    fused = fused_functions(backend_module)
    # the contract first, in order, then the fused ops the backend declares, in order
    assert [f for f in functions if f not in extras] == list(CONTRACT) + fused
    assert set(functions) - set(CONTRACT) - set(fused) <= extras


def test_backend_contract_signatures(backend_module):
    for name, parameters in CONTRACT_PARAMETERS.items():
        fn = getattr(backend_module, name)
        fn = getattr(fn, "py_func", fn)
        assert list(inspect.signature(fn).parameters) == parameters, name


def test_backend_has_header_docstring(backend_module):
    doc = backend_module.__doc__ or ""
    assert doc.strip(), "a backend module starts with a docstring saying how it computes the contract"
    for name in CONTRACT:
        assert (getattr(backend_module, name).__doc__ or "").strip(), f"{name} has no docstring"


def test_get_backend_wraps_the_module(backend_name, backend_module):
    backend = get_backend(backend_name)
    assert backend.name == backend_name and backend.module is backend_module
    assert get_backend(backend_name) is backend  # one instance per name
    for name in CONTRACT:
        assert getattr(backend, name).__name__ == name


@pytest.mark.parametrize("name", ["", "numpy", "NAIVE", "im2col ", None])
def test_unknown_backend_raises_value_error(name):
    with pytest.raises(ValueError, match="unknown kernels"):
        get_backend(name)
    assert issubclass(UnknownBackend, ValueError)


def _f32(*shape):
    return np.ones(shape, dtype=np.float32)


def _u8(*shape):
    return np.zeros(shape, dtype=np.uint8)


# (id, op, arguments). Each is wrong in exactly one way against an otherwise valid call:
# conv x(2,3,6,5), w(4,3,3,3), b(4), dy(2,4,4,3); pool x(2,3,6,5) -> dy, argmax (2,3,3,2).
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
    check meant for that argument, not from some other mistake in the test's arguments."""
    good = {
        "conv2d_forward": (_f32(2, 3, 6, 5), _f32(4, 3, 3, 3), _f32(4), False),
        "conv2d_backward": (_f32(2, 4, 4, 3), _f32(2, 3, 6, 5), _f32(4, 3, 3, 3), True),
        "maxpool2d_forward": (_f32(2, 3, 6, 5),),
        "maxpool2d_backward": (_f32(2, 3, 3, 2), _u8(2, 3, 3, 2), (2, 3, 6, 5)),
    }[op]
    getattr(get_backend("im2col"), op)(*good)  # valid: must not raise
    bad = make_args()
    differing = [i for i, (g, b) in enumerate(zip(good, bad)) if not _same_argument(g, b)]
    assert len(differing) == 1, f"a bad call must change exactly one argument of the good one, changed {differing}"


def _same_argument(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype
    return repr(a) == repr(b)  # (2, 3) and (2.0, 3.0) are equal but not the same argument
