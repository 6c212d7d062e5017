"""bench: the network it runs, the check-then-time gate, the op bench's record and chart, the FLOP count, the
training comparison."""

import argparse
import json
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from numba_cnn import bench
from numba_cnn.bench import baselines, compare, ops, walk
from numba_cnn.bench.report import format_compare_table
from numba_cnn.errors import NumbaCNNError
from numba_cnn.bench.networks import bench_network, first_trained_layer, flops_per_image, layers_flops, \
    parse_input_shape
from numba_cnn.kernels import Backend, BackendInfo, get_backend
from numba_cnn.kernels.contract import is_channels_last, op_names
from numba_cnn.network import build
from numba_cnn.network.layers import (AvgPool2D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D,
                                      MaxPool2D, ReLU)
from numba_cnn.network.plan import plan
from numba_cnn.runtime import stream_gbs
from pictures import assert_png

IM2COL = get_backend("im2col").module
FAKE_SGEMM_GFLOPS = 100.0
FAKE_STREAM_GBS = 10.0


@pytest.fixture(autouse=True)
def fixed_peak(monkeypatch):
    """A fixed 'peak' and bandwidth instead of two 2048^3 matmuls and two 192 MiB adds: faster, and shares of
    peak become exact to check."""
    monkeypatch.setattr(ops, "sgemm_gflops", lambda *a: [FAKE_SGEMM_GFLOPS] * 2)
    monkeypatch.setattr(ops, "stream_gbs", lambda *a: [FAKE_STREAM_GBS] * 2)
    monkeypatch.setattr(compare, "sgemm_gflops", lambda *a: [FAKE_SGEMM_GFLOPS] * 2)


@pytest.fixture(autouse=True)
def restore_threads():
    """bench pins Numba's and BLAS's thread counts for the process; give the other tests theirs back."""
    import numba
    from threadpoolctl import threadpool_limits

    numba_threads = numba.get_num_threads()
    with threadpool_limits(limits=None):  # on exit, restores the limits found on entry
        yield
    numba.set_num_threads(numba_threads)


def recording_copy(base, name, calls=None, info=None, **replacements):
    """Backend `base`'s raw functions (every op its INFO lists, and its own `layers` if it has them) under another
    name, some replaced; `calls` records (name, function) of each contract call."""
    module = get_backend(base).module
    info = module.INFO if info is None else info
    functions = {fn: getattr(module, fn) for fn in op_names(info)}
    functions.update(replacements)
    if calls is not None:
        def recorded(fn_name, fn):
            def call(*args):
                calls.append((name, fn_name))
                return fn(*args)
            return call
        functions = {fn_name: recorded(fn_name, fn) for fn_name, fn in functions.items()}
    extras = {"layers": module.layers} if hasattr(module, "layers") else {}
    return Backend(name, types.SimpleNamespace(INFO=info, **functions, **extras))


def fake_backend(name, calls=None, slow=False, **replacements):
    """im2col under another name, with some contract functions replaced; slow: declared slow, so the bench gives
    it the slow backends' batch and repeat count."""
    info = BackendInfo(summary=f"im2col as {name}", slow=slow)
    return recording_copy("im2col", name, calls, info, **replacements)


def conv_forward_plus(offset):
    def conv2d_forward(x, w, b, relu, stride, padding):
        return IM2COL.conv2d_forward(x, w, b, relu, stride, padding) + x.dtype.type(offset)
    return conv2d_forward


def conv_forward_without_bias(x, w, b, relu, stride, padding):
    return IM2COL.conv2d_forward(x, w, np.zeros_like(b), relu, stride, padding)


def conv_forward_float64(x, w, b, relu, stride, padding):
    return IM2COL.conv2d_forward(x, w, b, relu, stride, padding).astype(np.float64)


def conv_forward_nan(x, w, b, relu, stride, padding):
    y = IM2COL.conv2d_forward(x, w, b, relu, stride, padding)
    y[0, 0, 0, 0] = np.nan
    return y


def conv_forward_raises(x, w, b, relu, stride, padding):
    raise NotImplementedError("not written yet")


def maxpool_forward_last_wins(x, size):
    """Right values, wrong tie rule: the last maximum of each 2x2 window wins instead of the first."""
    y, _ = IM2COL.maxpool2d_forward(x, size)
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    windows = x[:, :, :2 * ho, :2 * wo].reshape(n, c, ho, 2, wo, 2).transpose(0, 1, 2, 4, 3, 5)
    flipped = windows.reshape(n, c, ho, wo, 4)[..., ::-1]
    return y, (3 - flipped.argmax(axis=-1)).astype(np.uint8)


@pytest.fixture(autouse=True)
def no_settling_pause(monkeypatch):
    """These tests check what is called and recorded, not how fast: skip the pause before each timed block."""
    monkeypatch.setattr(ops, "BLAS_SETTLE_S", 0.0)


def small_bench(backends, layers=None, **kwargs):
    settings = dict(batch_size=4, naive_batch=1, repeats=3, naive_repeats=2, log=lambda *a: None)
    settings.update(kwargs)
    return ops.bench_ops(backends, layers=layers, **settings)


def row(report, op, backend):
    (found,) = [r for r in report["results"] if r["op"] == op and r["backend"] == backend]
    return found


def test_flop_count_follows_the_layers_macs():
    network = bench_network()  # mnist-cnn: conv1, pool1, conv2, pool2, flatten, dropout, dense
    conv2_fwd = 2 * 64 * 32 * 9 * 11 * 11  # 2 * K*C*R*S*P*Q per image
    assert layers_flops(network, [2], "fwd") == conv2_fwd
    # backward: dW and dX cost the forward's count each; conv1 (the first with parameters) skips dX
    assert layers_flops(network, [2], "bwd") == 2 * conv2_fwd
    assert layers_flops(network, [0], "bwd", need_dx=False) == layers_flops(network, [0], "fwd") == 2 * 32 * 9 * 26 * 26
    assert layers_flops(network, [0, 1], "fwd") == layers_flops(network, [0], "fwd"), "pooling counts no FLOPs"
    assert layers_flops(network, [6], "bwd") == 4 * 1600 * 10
    training, inference = flops_per_image(network)
    assert training == pytest.approx(14.257e6, rel=1e-3)  # PERF-NOTES: 14.26 MFLOP per training image
    assert inference == 2 * (32 * 9 * 26 * 26 + 64 * 32 * 9 * 11 * 11 + 1600 * 10)


def test_the_input_shape_comes_from_the_flag_the_data_set_the_description_or_the_preset(tmp_path):
    assert bench_network().input_shape == (1, 28, 28) and bench_network().name == "mnist-cnn"
    assert bench_network("lenet5").input_shape == (1, 28, 28)
    assert bench_network("vgg-small-bn").input_shape == (3, 32, 32)
    assert bench_network("vgg-small", input_shape=(3, 16, 16)).input_shape == (3, 16, 16)
    assert bench_network("mnist-cnn", dataset="cifar10").input_shape == (3, 32, 32)
    stated = tmp_path / "stated.json"
    stated.write_text(json.dumps({"input_shape": [2, 9, 9], "layers": [{"kind": "Flatten"},
                                                                        {"kind": "Dense", "units": 10}]}))
    assert bench_network(str(stated)).input_shape == (2, 9, 9)
    with pytest.raises(NumbaCNNError, match="expects input of shape"):
        bench_network(str(stated), input_shape=(1, 9, 9))
    assert parse_input_shape("3,32,32") == (3, 32, 32)
    for bad in ("3,32", "a,b,c", "0,4,4"):
        with pytest.raises(NumbaCNNError, match="C,H,W"):
            parse_input_shape(bad)


def test_each_op_gets_what_a_training_step_hands_it():
    """The walk feeds every step the output of the one before (pooling sees the ReLU's zeros) and every backward
    the input gradient of the step after, with non-zero biases."""
    seen = {}

    def maxpool2d_forward(x, size):
        seen.setdefault("pool x", x.shape)
        seen.setdefault("zeros", float((x == 0).mean()))
        return IM2COL.maxpool2d_forward(x, size)

    def conv2d_backward(dy, x, w, need_dx, stride, padding):
        seen.setdefault("conv bwd", []).append((dy.shape, need_dx))
        return IM2COL.conv2d_backward(dy, x, w, need_dx, stride, padding)

    def conv2d_forward(x, w, b, relu, stride, padding):
        seen.setdefault("biases", []).append(bool(b.any()))
        return IM2COL.conv2d_forward(x, w, b, relu, stride, padding)

    spy = fake_backend("spy", maxpool2d_forward=maxpool2d_forward, conv2d_backward=conv2d_backward,
                       conv2d_forward=conv2d_forward)
    small_bench([spy], repeats=1, batch_size=3)
    assert seen["pool x"] == (3, 32, 26, 26)
    assert seen["zeros"] > 0.05, "pooling inputs come out of a ReLU, ties included"
    # the backward runs from dlogits down to conv1, which computes no input gradient
    assert set(seen["conv bwd"]) == {((3, 64, 11, 11), True), ((3, 32, 26, 26), False)}
    assert all(seen["biases"]), "biases must be non-zero, or a kernel that ignores them would pass"


def test_fused_ops_get_their_inputs_in_the_layout_training_hands_them_over():
    """jit keeps conv1's pooled output channels-last (INFO.channels_last): walking its own plan, the bench hands
    conv2's fused op that output, and conv1's fused backward the input gradient conv2's returned, as a training
    step does; the unfused plan's conv2 gets what an unfused model has."""
    calls, layouts = [], {}
    jit = get_backend("jit").module

    def spy(fn_name):
        def call(*args):
            layouts.setdefault(fn_name, []).append([isinstance(a, np.ndarray) and a.ndim == 4 and is_channels_last(a)
                                                    for a in args])
            return getattr(jit, fn_name)(*args)
        return call

    names = ("conv2d_relu_maxpool2d_forward", "conv2d_relu_maxpool2d_backward", "conv2d_forward")
    rec = recording_copy("jit", "jit", calls, **{fn: spy(fn) for fn in names})
    report = small_bench([rec], repeats=1, batch_size=2)
    assert {r["op"] for r in report["results"]} >= {"conv1+pool1 fwd", "conv2+pool2 bwd", "conv2 fwd", "pool1 fwd"}
    assert all(r["status"] == "ok" for r in report["results"]), report["results"]
    # conv1's fused forward takes the images (C-contiguous), conv2's takes conv1's pooled output as jit returned it
    assert [flags[0] for flags in layouts["conv2d_relu_maxpool2d_forward"][:2]] == [False, True]
    # conv2's fused backward takes the gradient from Flatten (checked on a random one stored alike, then called on
    # it), conv1's the input gradient conv2's returned, channels-last
    assert [flags[0] for flags in layouts["conv2d_relu_maxpool2d_backward"][:3]] == [False, False, True]


@pytest.mark.parametrize("defect, defective_op, reason", [
    (dict(conv2d_forward=conv_forward_plus(1e-2)), "conv1 fwd", "relative error"),
    (dict(conv2d_forward=conv_forward_without_bias), "conv1 fwd", "relative error"),
    (dict(conv2d_forward=conv_forward_float64), "conv1 fwd", "dtype float64"),
    (dict(conv2d_forward=conv_forward_nan), "conv1 fwd", "relative error inf"),
    (dict(conv2d_forward=conv_forward_raises), "conv1 fwd", "raised NotImplementedError"),
    # right values, wrong winners: the backward, which routes through the forward's argmax, fails
    (dict(maxpool2d_forward=maxpool_forward_last_wins), "pool1 bwd", "relative error"),
])
def test_gate_refuses_a_wrong_kernel_without_timing_it(defect, defective_op, reason):
    calls = []
    broken = fake_backend("broken", calls, **defect)
    report = small_bench(["im2col", broken], layers=("conv1", "pool1"))
    failed = row(report, defective_op, "broken")
    assert failed["status"] == "FAILED"
    assert reason in failed["reason"]
    assert not {"samples_s", "median_s", "first_call_s", "gflops"} & failed.keys()
    # conv2 and pool2 run on the oracle (not named): the failed kernel is called once, for its check, never timed
    fn_name = {"conv1 fwd": "conv2d_forward", "pool1 bwd": "maxpool2d_backward"}[defective_op]
    assert calls.count(("broken", fn_name)) == 1, "a failed kernel is called for its check only, never timed"
    # a failed forward leaves its backward unrun; every other op of the same backend, and of im2col, passes
    not_run = {defective_op, "conv1 bwd"} if defective_op == "conv1 fwd" else {defective_op}
    for r in report["results"]:
        if r["backend"] == "broken" and r["op"] in not_run:
            assert r["status"] == "FAILED"
        else:
            assert r["status"] == "ok", r
            assert len(r["samples_s"]) == 3
    if defective_op == "conv1 fwd":
        assert "its forward failed" in row(report, "conv1 bwd", "broken")["reason"]
    assert all(s["op"] != defective_op for s in report["speedups"] if "broken" in s["pair"])


def test_a_wrong_im2col_fails_the_gate():
    """The gate's oracle is the float64 reference, not im2col, so im2col itself is checked: a bias off by 1e-2 in
    its conv forward is refused and never timed."""
    wrong = fake_backend("im2col", conv2d_forward=conv_forward_plus(1e-2))
    report = small_bench([wrong], layers=("conv1",))
    failed = row(report, "conv1 fwd", "im2col")
    assert failed["status"] == "FAILED" and "relative error" in failed["reason"] and "samples_s" not in failed
    assert report["settings"]["oracle"].startswith("numba_cnn.kernels.reference")


def test_check_tolerance_is_relative_to_the_largest_reference_value():
    ref = np.full((2, 3), 1000.0)
    # |got - ref| / (|ref| + max |ref|): 0.05 / 2000 passes, 0.3 / 2000 does not (the oracle's 1e-4)
    ok, errors, _ = walk.check_outputs({"y": np.float32(ref + 0.05)}, {"y": ref})
    assert ok and errors["y"] == pytest.approx(2.5e-5, rel=1e-3)
    ok, _, reason = walk.check_outputs({"y": np.float32(ref + 0.3)}, {"y": ref})
    assert not ok and "relative error 0.00015" in reason
    ok, _, reason = walk.check_outputs({"y": np.zeros((3, 2), np.float32)}, {"y": ref})
    assert not ok and "shape" in reason
    ok, _, reason = walk.check_outputs({"dx": ref, "dw": ref}, {"dw": ref})
    assert not ok and "returned dx, dw, expected dw" in reason


def test_first_call_is_timed_apart_and_each_backend_times_a_block_after_a_settling_call():
    calls = []

    def slow_first_call(x, w, b, relu, stride, padding):
        if not calls[:-1]:  # this call is the first one recorded
            time.sleep(0.3)  # stands in for a compile
        return IM2COL.conv2d_forward(x, w, b, relu, stride, padding)

    slow = fake_backend("slow", calls, conv2d_forward=slow_first_call)
    fast = fake_backend("fast", calls)
    report = small_bench([slow, fast], layers=("conv1",), repeats=4)
    r = row(report, "conv1 fwd", "slow")
    assert r["first_call_s"] >= 0.3
    assert max(r["samples_s"]) < 0.3 and len(r["samples_s"]) == 4
    forward_calls = [name for name, fn in calls if fn == "conv2d_forward"]
    # the checked first calls (conv2 runs on the oracle), then per backend one untimed settling call and its 4
    # timed repeats
    assert forward_calls == ["slow", "fast"] + ["slow"] * 5 + ["fast"] * 5


def test_op_bench_record_speedups_and_peak_share():
    slow = fake_backend("naive", slow=True)  # declared slow: gets the slow batch and repeat count
    report = small_bench(["im2col", slow], layers=("conv2", "flatten", "dense"), batch_size=4, naive_batch=2)
    fast_row, slow_row = row(report, "conv2 fwd", "im2col"), row(report, "conv2 fwd", "naive")
    assert (fast_row["batch"], slow_row["batch"]) == (4, 2)
    assert (len(fast_row["samples_s"]), len(slow_row["samples_s"])) == (3, 2)
    for r in (fast_row, slow_row):
        assert r["status"] == "ok" and r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"]
        assert r["median_per_image_s"] == pytest.approx(r["median_s"] / r["batch"])
        assert r["flops"] == r["batch"] * 2 * 64 * 32 * 9 * 11 * 11
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        assert r["peak_share"] == pytest.approx(r["gflops"] / FAKE_SGEMM_GFLOPS)
    speedup = {(s["op"], s["pair"]): s["speedup"] for s in report["speedups"]}
    assert speedup[("conv2 fwd", "im2col vs naive")] == pytest.approx(
        slow_row["median_per_image_s"] / fast_row["median_per_image_s"])
    assert {op for op, _ in speedup} == {"conv2 fwd", "conv2 bwd"}, "dense and flatten run the same code: no speedup"
    assert "pool1 fwd" not in {r["op"] for r in report["results"]}


def test_bytes_moved_and_intensity_count_each_input_once_and_each_output_once():
    report = small_bench(["im2col"], layers=("conv2", "pool2"), batch_size=4)
    x, w, b = (4 * 32 * 13 * 13), 64 * 32 * 3 * 3, 64
    conv = row(report, "conv2 fwd", "im2col")
    assert conv["bytes"] == 4 * (x + w + b + 4 * 64 * 11 * 11)
    assert conv["flops_per_byte"] == pytest.approx(conv["flops"] / conv["bytes"])
    assert conv["gbytes_per_s"] == pytest.approx(conv["bytes"] / conv["median_s"] / 1e9)
    pool = row(report, "pool2 fwd", "im2col")
    assert pool["bytes"] == 4 * (4 * 64 * 11 * 11) + 4 * (4 * 64 * 5 * 5) + 1 * (4 * 64 * 5 * 5)  # x, y, argmax
    assert "flops_per_byte" not in pool and pool["gbytes_per_s"] > 0
    assert report["calibration"]["stream_gbs"] == FAKE_STREAM_GBS
    # each op's own roof: the slower of its arithmetic at the peak and its bytes at the bandwidth
    assert conv["roofline_share"] == pytest.approx(
        max(conv["flops"] / (FAKE_SGEMM_GFLOPS * 1e9), conv["bytes"] / (FAKE_STREAM_GBS * 1e9)) / conv["median_s"])
    assert pool["roofline_share"] == pytest.approx(pool["bytes"] / (FAKE_STREAM_GBS * 1e9) / pool["median_s"])
    assert conv["writes_memory"] and pool["writes_memory"]


def test_an_op_that_returns_views_of_its_inputs_gets_no_bandwidth_bound():
    report = small_bench(["im2col"], layers=("flatten",), batch_size=4)
    backward = row(report, "flatten bwd", "im2col")  # a reshape of dy: no bytes written
    assert backward["status"] == "ok" and not backward["writes_memory"] and "roofline_share" not in backward


def test_stream_bandwidth_is_measured_per_repeat_after_a_warm_up():
    rates = stream_gbs(threads=2, mib=2, repeats=3)
    assert len(rates) == 3 and all(0.1 < rate < 10_000 for rate in rates)


def parse_bench(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_command_writes_json_and_png(tmp_path, capsys):
    args = parse_bench(["--kernels", "im2col,cuda", "--ops", "pool2,dense", "--batch-size", "1", "--repeats", "2",
                        "--threads", "1", "--out", str(tmp_path)])
    assert bench.run(args) == 0
    (json_path,) = tmp_path.glob("ops-*.json")
    (png_path,) = tmp_path.glob("ops-*.png")
    (roofline_path,) = tmp_path.glob("roofline-*.png")
    assert_png(png_path, min_width=800)
    assert_png(roofline_path, min_width=1200)
    report = json.loads(json_path.read_text())
    assert report["files"] == {"json": str(json_path), "chart": str(png_path), "roofline": str(roofline_path)}
    assert report["calibration"]["stream_gbs"] == FAKE_STREAM_GBS
    assert "counted once" in report["bytes_formula"]
    machine = report["machine"]
    for key in ("processor", "cpus", "numpy", "numba", "python", "numba_threading_layer", "blas"):
        assert key in machine
    assert machine["threads"]["numba_threads"] == 1
    assert all(lib["num_threads"] == 1 for lib in machine["blas"])
    assert report["calibration"]["peak_gflops"] == FAKE_SGEMM_GFLOPS
    assert "K*C*R*S*P*Q" in report["flop_formula"] and "dense" in report["flop_formula"].lower()
    assert report["settings"]["network"]["name"] == "mnist-cnn"
    ops = [r["op"] for r in report["results"] if r["backend"] == "im2col"]
    assert ops == ["pool2 fwd", "pool2 bwd", "dense fwd", "dense bwd"]
    assert all(r["status"] == "ok" and len(r["samples_s"]) == 2 for r in report["results"]
               if r["backend"] == "im2col")
    out = capsys.readouterr().out
    assert f"written: {json_path}, {png_path} and {roofline_path}" in out
    cuda_rows = [r for r in report["results"] if r["backend"] == "cuda"]
    assert len(cuda_rows) == 4
    if cuda_rows[0]["status"] == "skipped":  # no GPU or numba-cuda here: said once in the table, not timed
        assert out.count("cuda skipped:") == 1 and "samples_s" not in cuda_rows[0]


def test_bench_model_times_every_step_of_a_network_from_a_json_file(tmp_path, capsys):
    """A network no preset has, every layer kind in it, from a JSON file: every step of its plan is checked and
    timed forward and backward (Dropout named as untimed), and the table names each."""
    layers = [Conv2D(4, 5, strides=2, padding="same", activation="relu"), BatchNorm2D(), ReLU(), MaxPool2D(3),
              Conv2D(6, 3, padding="same"), AvgPool2D(2), Flatten(), Dropout(0.25), Dense(8, activation="relu"),
              Dense(10, activation="softmax")]
    description = tmp_path / "net.json"
    description.write_text(json.dumps({"name": "tiny-every-kind", "layers": [layer.to_dict() for layer in layers]}))
    args = parse_bench(["--model", str(description), "--input-shape", "2,14,14", "--kernels", "im2col",
                        "--batch-size", "2", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "out")])
    assert bench.run(args) == 0
    (json_path,) = (tmp_path / "out").glob("ops-*.json")
    report = json.loads(json_path.read_text())
    network = bench_network(str(description), (2, 14, 14))
    assert report["settings"]["network"] == network.to_dict()
    first = first_trained_layer(network)
    steps = [step for step in plan(network, get_backend("im2col")) if step.name != "dropout1"]
    expected = [f"{step.name} {d}" for step in steps for d in ("fwd", "bwd") if d == "fwd" or step.first >= first]
    assert [r["op"] for r in report["results"]] == expected
    assert all(r["status"] == "ok" and len(r["samples_s"]) == 1 for r in report["results"])
    assert row(report, "conv1 fwd", "im2col")["flops"] == 2 * 2 * layers[0].macs((2, 14, 14))  # batch 2
    out = capsys.readouterr().out
    assert "network: tiny-every-kind" in out and "dropout1: its dropout mask is random" in out
    for op in expected:
        assert f"{op} " in out
    assert set(report["plan_per_image_s"]) == {"im2col"}


def test_gap_network_runs_on_the_oracle_alone_as_well():
    """The bench checks against the float64 oracle whatever the backend: a Backend object (here im2col's module
    under another name) with GlobalAvgPool2D, whose op is an average pool over the whole image."""
    network = build([Conv2D(3, 3), GlobalAvgPool2D(), Dense(10)], (1, 6, 6))
    report = ops.bench_ops([fake_backend("other")], network=network, batch_size=2, repeats=1, log=lambda *a: None)
    assert [r["op"] for r in report["results"]] == ["conv1 fwd", "conv1 bwd", "gap1 fwd", "gap1 bwd", "dense1 fwd",
                                                    "dense1 bwd"]
    assert all(r["status"] == "ok" for r in report["results"])


def test_bench_refuses_bad_settings():
    with pytest.raises(NumbaCNNError, match="unknown layer conv3"):
        small_bench(["im2col"], layers=("conv3",))
    with pytest.raises(NumbaCNNError, match="repeats"):
        small_bench(["im2col"], layers=("dense",), repeats=0)
    with pytest.raises(NumbaCNNError, match="unknown backend"):
        small_bench(["fortran"], layers=("dense",))
    with pytest.raises(NumbaCNNError, match="too slow"):
        compare.compare_training(["naive"], log=lambda *a: None)


def test_batch_stream_covers_each_epoch_once_in_a_seeded_order():
    stream = baselines.batch_stream(10, 4, np.random.default_rng(5))
    epoch = [next(stream) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(np.concatenate(epoch)) == list(range(10))
    again = baselines.batch_stream(10, 4, np.random.default_rng(5))
    assert all(np.array_equal(a, next(again)) for a in epoch)


def test_compare_our_backend_in_a_subprocess():
    report = compare.compare_training(["im2col"], steps=2, warmup_steps=1, batch_size=32, rounds=2, threads=1,
                                    random_data=True, limit=256, log=lambda *a: None)
    (entry,) = report["contenders"]
    assert entry["status"] == "ok", entry
    assert [run["round"] for run in entry["runs"]] == [1, 2]
    for run in entry["runs"]:
        assert run["epoch_images"] == 256 and run["test_images"] == 256
        assert run["sec_per_epoch"] == pytest.approx(run["steps_s"] / 2 * 8)  # 256 / 32 = 8 steps per epoch
        assert 0 < run["rss_after_data_mb"] <= run["peak_rss_mb"]
        assert run["own_memory_mb"] == run["peak_rss_mb"] - run["rss_after_data_mb"]
        assert run["inference_img_per_s"] == pytest.approx(256 / run["inference_s"])
        assert 0 <= run["test_accuracy"] <= 1 and np.isfinite(run["train_loss"])
    assert entry["sec_per_epoch"] == pytest.approx(np.median([r["sec_per_epoch"] for r in entry["runs"]]))
    assert entry["sec_per_epoch_range"] == [min(r["sec_per_epoch"] for r in entry["runs"]),
                                            max(r["sec_per_epoch"] for r in entry["runs"])]
    flops = report["calibration"]["training_flops_per_image"]
    assert flops == pytest.approx(14.257e6, rel=1e-3)  # PERF-NOTES: 14.26 MFLOP per training image
    assert entry["gflops"] == pytest.approx(flops * 256 / entry["sec_per_epoch"] / 1e9)
    assert entry["peak_share"] == pytest.approx(entry["gflops"] / FAKE_SGEMM_GFLOPS)
    assert "vs_torch_best" not in entry and "vs_fastest_framework" not in entry  # no baseline ran
    assert "extrapolated from 2 steps" in report["settings"]["measure"]


def test_ratios_take_the_best_setting_of_each_metric():
    def entry(name, seconds, rate, mb, own_mb, baseline=True):
        return dict(contender=name, status="ok", sec_per_epoch=seconds, inference_img_per_s=rate, peak_rss_mb=mb,
                    own_memory_mb=own_mb, baseline=baseline)

    entries = [entry("jit", 5.0, 30_000, 200, 100, baseline=False), entry("torch:nchw", 20.0, 8_000, 700, 450),
               entry("torch:channels_last", 16.0, 9_000, 800, 400), entry("keras:tensorflow", 10.0, 20_000, 900, 500),
               dict(contender="torch:compile", status="FAILED", reason="x")]
    compare._add_ratios(entries)
    jit = entries[0]
    assert jit["vs_torch_best"] == {"sec_per_epoch": 5 / 16, "inference_img_per_s": 30_000 / 9_000,
                                    "peak_rss_mb": 200 / 700, "own_memory_mb": 100 / 400}
    assert jit["vs_torch_best_names"]["sec_per_epoch"] == "torch:channels_last"
    assert jit["vs_torch_best_names"]["peak_rss_mb"] == "torch:nchw"
    assert jit["vs_torch_best_names"]["own_memory_mb"] == "torch:channels_last"  # each metric's best on its own
    assert jit["vs_fastest_framework"]["sec_per_epoch"] == 0.5
    assert jit["vs_fastest_framework_names"]["inference_img_per_s"] == "keras:tensorflow"


def test_compare_passes_a_data_error_through(tmp_path):
    with pytest.raises(NumbaCNNError, match="missing"):
        compare.compare_training(["im2col"], steps=1, rounds=1, data=str(tmp_path / "missing"), log=lambda *a: None)


@pytest.mark.skipif(baselines.missing_packages("torch") != [], reason="torch not installed (.[baselines] extra)")
def test_torch_model_starts_from_our_weights_and_compares_on_any_network():
    from numba_cnn.model import Model, init_state

    network = bench_network()
    torch_model = baselines.TorchCNN(network, seed=0, threads=1)
    assert sum(p.numel() for p in torch_model.net.parameters()) == Model("im2col").num_params == 34_826
    np.testing.assert_array_equal(torch_model.net[0].weight.detach().numpy(), init_state(network, 0)["conv1.w"])
    assert torch_model.optimizer.defaults["eps"] == 1e-7 and torch_model.optimizer.defaults["lr"] == 1e-3

    assert baselines.expand("torch") == ["torch:nchw", "torch:channels_last", "torch:flush_denormal"]
    small = build([Conv2D(4, 3, strides=2, padding="same"), BatchNorm2D(), ReLU(), GlobalAvgPool2D(),
                   Dense(10, activation="softmax")], (3, 12, 12), name="small-bn")
    report = compare.compare_training(["im2col", "torch"], network=small, steps=2, warmup_steps=1, batch_size=16,
                                      rounds=1, threads=1, random_data=True, limit=64, log=lambda *a: None)
    assert report["settings"]["network"]["name"] == "small-bn"
    entries = {e["contender"]: e for e in report["contenders"]}
    assert list(entries) == ["im2col", "torch:nchw", "torch:channels_last", "torch:flush_denormal"]
    assert all(e["status"] == "ok" for e in entries.values()), entries
    assert [run["numba_loaded"] for e in entries.values() for run in e["runs"]] == [True, False, False, False]
    torch_best = min((e for name, e in entries.items() if name.startswith("torch")), key=lambda e: e["sec_per_epoch"])
    assert torch_best["vs_torch_best"]["sec_per_epoch"] == 1.0
    ours = entries["im2col"]
    assert ours["vs_torch_best"]["sec_per_epoch"] == pytest.approx(ours["sec_per_epoch"] / torch_best["sec_per_epoch"])
    assert ours["vs_torch_best_names"]["sec_per_epoch"] == torch_best["contender"]
    assert "channels last" in entries["torch:channels_last"]["version"]
    assert report["calibration"]["training_flops_per_image"] == flops_per_image(small)[0]
    assert "x torch*" in format_compare_table(report)


@pytest.mark.slow
@pytest.mark.skipif(baselines.missing_packages("keras") != [], reason="keras/tensorflow not installed (.[baselines])")
def test_keras_model_trains_in_a_subprocess():
    report = compare.compare_training(["keras"], steps=2, warmup_steps=1, batch_size=32, rounds=1, threads=1,
                                    random_data=True, limit=128, log=lambda *a: None)
    (entry,) = report["contenders"]
    assert entry["status"] == "ok", entry
    # Not strictly greater: both are the process's high-water mark (VmHWM), and importing TensorFlow can set it
    # before the data is loaded, higher than two tiny training steps then reach.
    assert 0 <= entry["test_accuracy"] <= 1 and entry["peak_rss_mb"] >= entry["rss_after_data_mb"] > 0


def test_missing_baseline_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(baselines, "missing_packages", lambda name: [name])
    report = compare.compare_training(["torch"], steps=1, rounds=1, random_data=True, limit=64, log=lambda *a: None)
    assert len(report["contenders"]) == 3  # torch's three eager settings, each skipped
    for entry in report["contenders"]:
        assert entry["status"] == "skipped" and baselines.INSTALL_HINT in entry["reason"] and not entry["runs"]


def test_bench_and_baselines_import_neither_torch_nor_keras():
    code = ("import sys, numba_cnn.bench, numba_cnn.bench.baselines; "
            "print(sorted(m for m in ('torch', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_framework_contender_runs_in_a_process_that_never_imports_numba():
    """Numba's import would count in the framework's peak memory, and its OpenMP pool, once started, is the one
    PyTorch then runs on: a framework's process limits BLAS only. The framework is a stand-in here (torch may be
    absent), the harness around it the real one."""
    code = """
import sys
import numpy as np
from numba_cnn.bench import baselines, compare

class StandIn:
    version = "stand-in"
    def __init__(self, name, network, seed, threads):
        pass
    def train_step(self, x, y):
        return 0.0
    def predict(self, x):
        return np.zeros(len(x), np.int64)

baselines.make_baseline = StandIn
out = compare.run_contender("torch:nchw", compare.bench_network().to_dict(), steps=2, batch_size=32,
                            random_data=True, limit=64)
print(out["numba_loaded"], "numba" in sys.modules, out["test_accuracy"] >= 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]


def test_a_contender_process_peak_memory_starts_from_its_own_not_its_parents():
    """Linux carries ru_maxrss over an exec: a child started while this process holds 200 MB more would report at
    least that. peak_rss_mb reads the child's own high-water mark."""
    held = np.ones(25_000_000)  # 200 MB resident here, in the parent
    code = "from numba_cnn.bench.compare import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert compare.peak_rss_mb() > child + 150, (compare.peak_rss_mb(), child)
    del held


def test_bench_refuses_an_unwritable_out_folder_before_running(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(bench, "bench_ops", lambda *a, **k: pytest.fail("the bench ran before the check"))
    with pytest.raises(NumbaCNNError, match="not a writable folder"):
        bench.run(parse_bench(["--out", str(blocker / "results")]))
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"], "nothing created"


def test_compare_gets_compiled_backends_ready_before_the_rounds(monkeypatch):
    """jit's kernels are compiled (or loaded) in a process of their own before round 1, so no round's time, warm-up
    or peak memory holds a cold cache's compile; the frameworks and backends without a precompile get no such pass."""
    specs, lines = [], []

    def fake_run(spec, threads):
        specs.append(dict(spec))
        if spec.get("prepare_only"):
            return {"contender": spec["name"], "prepare_s": 12.5, "compiled": True}
        return {"contender": spec["name"], "sec_per_epoch": 2.0, "inference_img_per_s": 1000.0, "peak_rss_mb": 200.0,
                "rss_after_data_mb": 100.0, "own_memory_mb": 100.0, "warmup_s": 0.5, "test_accuracy": 0.5,
                "version": "x", "epoch_images": 64, "data_source": "random"}

    monkeypatch.setattr(compare, "_run_in_subprocess", fake_run)
    report = compare.compare_training(["jit", "im2col"], steps=1, rounds=2, random_data=True, limit=64,
                                      log=lines.append)
    assert [(s["name"], bool(s.get("prepare_only"))) for s in specs] == [
        ("jit", True), ("jit", False), ("im2col", False), ("jit", False), ("im2col", False)]
    jit, im2col = report["contenders"]
    assert jit["prepare"] == {"contender": "jit", "prepare_s": 12.5, "compiled": True} and "prepare" not in im2col
    assert "jit: kernels compiled (the disk cache was cold) in 12.5 s before the rounds" in lines


def test_prepare_runs_the_precompile_then_a_step_and_an_inference_pass(monkeypatch):
    backend = compare.get_backend("jit")
    networks = []
    monkeypatch.setattr(backend, "precompile", lambda network: networks.append(network) or False)
    network = compare.bench_network()
    out = compare.run_contender("jit", network.to_dict(), threads=1, prepare_only=True)
    assert [n.to_dict() for n in networks] == [network.to_dict()]
    assert out["contender"] == "jit" and out["compiled"] is False and out["prepare_s"] > 0
    assert "peak_rss_mb" not in out  # no data loaded, nothing timed


def test_a_conv_with_a_relu_layer_before_its_max_pool_is_checked_as_one_fused_step():
    """Conv2D without activation, ReLU and MaxPool2D fuse into one conv + ReLU + pool step of three layers; the
    check of its backward reads the ReLU layer's output and the pool's winners from the oracle's three caches."""
    network = build([Conv2D(6, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(10)], (1, 12, 12))
    assert [len(step.layers) for step in plan(network, get_backend("jit"))][0] == 3
    report = small_bench(["jit"], network=network, batch_size=4)
    fused = [r for r in report["results"] if r["op"].startswith("conv1+relu1+pool1")]
    assert {r["op"] for r in fused} == {"conv1+relu1+pool1 fwd", "conv1+relu1+pool1 bwd"}
    assert all(r["status"] == "ok" for r in fused), [r.get("reason") for r in fused]
