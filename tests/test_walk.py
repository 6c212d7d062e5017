"""The op bench's check of a backward after a conv + ReLU: pooling winners that tie within rounding are the
backend's to choose, any other winner is the oracle's; so is the side of the ReLU's kink where the two conv outputs
lie within rounding of zero on either side (bench/walk.py)."""

import numpy as np

from numba_cnn.bench.walk import _adopt_near_tie_winners, _adopt_near_zero_relu_sides
from numba_cnn.network.layers import Conv2D, GlobalAvgPool2D, MaxPool2D
from numba_cnn.network.plan import ConvRelu, ConvReluAvgPool, ConvReluPool, Step


def _caches(window):
    conv_out = np.array(window, np.float64).reshape(1, 1, 2, 2)
    oracle_argmax = np.array([[[[int(np.argmax(window))]]]], np.uint8)
    return [(None, conv_out), (oracle_argmax, conv_out.shape)]


def test_a_winner_within_rounding_is_adopted_and_any_other_is_not():
    conv, pool = Conv2D(1, 1), MaxPool2D(2)
    step = Step(((0, conv), (1, pool)), ConvReluPool(conv))
    window = [1.0, 1.0 + 1e-9, 0.5, 0.0]  # the first two tie in float32
    for backend_winner, kept in ((0, 0), (1, 1), (2, 1), (3, 1)):
        caches = _caches(window)
        _adopt_near_tie_winners(caches, np.array([[[[backend_winner]]]], np.uint8), step)
        assert int(caches[1][0][0, 0, 0, 0]) == kept, backend_winner


def test_a_relu_side_within_rounding_of_zero_is_adopted_and_any_other_is_not():
    """The oracle's ReLU'd conv output (largest 10) against the backend's: an output the oracle puts just above zero
    and the backend at 0, or the other way round, takes the backend's side; one either puts further from zero keeps
    the oracle's (the check then fails on it). For the conv's own step and for the conv + global pool step."""
    conv = Conv2D(1, 1, activation="relu")
    steps = (Step(((0, conv),), ConvRelu(conv)),
             Step(((0, conv), (1, GlobalAvgPool2D())), ConvReluAvgPool(conv, global_pool=True)))
    oracle = np.array([10.0, 2e-4, 0.0, 0.5, 0.0]).reshape(1, 1, 1, 5)
    backend = np.array([10.0, 0.0, 3e-4, 0.0, 0.5]).reshape(1, 1, 1, 5)
    for step in steps:
        caches = [(None, oracle.copy()), (1, 1, 1, 5)]
        _adopt_near_zero_relu_sides(caches, backend, step)
        np.testing.assert_array_equal(caches[0][1].ravel(), [10.0, 0.0, 3e-4, 0.5, 0.0])
    plain = Conv2D(1, 1)  # no ReLU: nothing to adopt
    caches = [(None, oracle.copy())]
    _adopt_near_zero_relu_sides(caches, backend, Step(((0, plain),), plain))
    np.testing.assert_array_equal(caches[0][1], oracle)


def test_every_jit_step_of_a_non_preset_network_names_its_kernel_paths():
    """A network with every layer kind on jit: every op is checked against the oracle and passes, and every contract
    kernel a step called reported the path it took (none fell back without saying so), with executed multiply-adds
    for the convolutions: the listed backward's and the first layer's winners' fewer than the dense count, the
    others at least the dense count."""
    from numba_cnn.bench import ops
    from numba_cnn.network import build
    from numba_cnn.network.layers import AvgPool2D, BatchNorm2D, Dense, Dropout, Flatten, GlobalAvgPool2D, ReLU

    layers = [Conv2D(32, 3, padding="same", activation="relu"), MaxPool2D(2),  # fused, padded: dw from the winners
              Conv2D(8, 3, padding="same", activation="relu"), MaxPool2D(2),  # fused, its rows 96 values: listed
              Conv2D(8, 3, strides=2, padding="same"), BatchNorm2D(), ReLU(), MaxPool2D(3),
              Conv2D(6, 1), AvgPool2D(1), Conv2D(10, 1), GlobalAvgPool2D(), Dropout(0.2), Dense(12, activation="relu"),
              Flatten(), Dense(10, activation="softmax")]
    network = build(layers, (3, 36, 36), name="every-kind-jit")
    report = ops.bench_ops(["jit"], network=network, batch_size=4, repeats=1, log=lambda *a: None)
    rows = report["results"]
    assert rows and all(r["status"] == "ok" for r in rows), [(r["op"], r.get("reason")) for r in rows]
    assert "conv1+pool1 fwd" in [r["op"] for r in rows]
    for r in rows:
        if r["kernels"]:
            named = {entry.split(":")[0] for entry in r["paths"]}
            # a fused op that runs the ops it replaces says so, and they name their own paths
            composed = " ".join(entry for entry in r["paths"] if ": composed of " in entry)
            assert set(r["kernels"]) <= named and all(op in composed for op in named - set(r["kernels"])), r["op"]
        for dense in {"dense_forward", "dense_backward"} & set(r["layer_functions"]):  # jit's own, or BLAS's
            assert [entry for entry in r["paths"] if entry.startswith(dense + ":")], (r["op"], r["paths"])
            assert r["executed_flops"] == r["flops"] > 0, r["op"]
        if any(k.startswith("conv2d") for k in r["kernels"]):
            assert r["executed_flops"] > 0, r["op"]
            if r["op"] == "conv2+pool2 bwd":
                assert r["paths"] == ["conv2d_relu_maxpool2d_backward: listed: nonzero conv-output gradients only"]
                assert r["executed_flops"] < r["flops"]
            elif r["op"] == "conv1+pool1 bwd":
                assert len(r["paths"]) == 1 and "each window's winner only" in r["paths"][0], r["paths"]
                assert r["executed_flops"] < r["flops"]
            else:
                assert r["executed_flops"] >= r["flops"], r["op"]
