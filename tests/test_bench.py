"""bench: the check-then-time gate, the op bench's record and chart, the FLOP count, the training comparison."""

import argparse
import json
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from numba_cnn import bench
from numba_cnn.bench import baselines, compare, ops
from numba_cnn.bench.report import format_compare_table
from numba_cnn.errors import NumbaCNNError
from numba_cnn.kernels import Backend, BackendInfo, get_backend
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


def fake_backend(name, calls=None, slow=False, **replacements):
    """im2col under another name, with some contract functions replaced; `calls` records (name, function);
    slow: declared slow, so the bench gives it the slow backends' batch and repeat count."""
    functions = {fn: getattr(IM2COL, fn) for fn in
                 ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward")}
    functions.update(replacements)
    if calls is not None:
        def recorded(fn_name, fn):
            def call(*args):
                calls.append((name, fn_name))
                return fn(*args)
            return call
        functions = {fn_name: recorded(fn_name, fn) for fn_name, fn in functions.items()}
    info = BackendInfo(summary=f"im2col as {name}", slow=slow)
    return Backend(name, types.SimpleNamespace(INFO=info, **functions))


def conv_forward_plus(offset):
    def conv2d_forward(x, w, b, relu):
        return IM2COL.conv2d_forward(x, w, b, relu) + x.dtype.type(offset)
    return conv2d_forward


def conv_forward_without_bias(x, w, b, relu):
    return IM2COL.conv2d_forward(x, w, np.zeros_like(b), relu)


def conv_forward_float64(x, w, b, relu):
    return IM2COL.conv2d_forward(x, w, b, relu).astype(np.float64)


def conv_forward_nan(x, w, b, relu):
    y = IM2COL.conv2d_forward(x, w, b, relu)
    y[0, 0, 0, 0] = np.nan
    return y


def conv_forward_raises(x, w, b, relu):
    raise NotImplementedError("not written yet")


def maxpool_forward_last_wins(x):
    """Right values, wrong tie rule: the last maximum of each window wins instead of the first."""
    y, _ = IM2COL.maxpool2d_forward(x)
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    windows = x[:, :, :2 * ho, :2 * wo].reshape(n, c, ho, 2, wo, 2).transpose(0, 1, 2, 4, 3, 5)
    flipped = windows.reshape(n, c, ho, wo, 4)[..., ::-1]
    return y, (3 - flipped.argmax(axis=-1)).astype(np.uint8)


@pytest.fixture(autouse=True)
def no_settling_pause(monkeypatch):
    """These tests check what is called and recorded, not how fast: skip the pause before each timed block."""
    monkeypatch.setattr(ops, "BLAS_SETTLE_S", 0.0)


def small_bench(backends, layers, **kwargs):
    settings = dict(batch_size=4, naive_batch=1, repeats=3, naive_repeats=2, log=lambda *a: None)
    settings.update(kwargs)
    return ops.bench_ops(backends, layers=layers, **settings)


def row(report, op, backend):
    (found,) = [r for r in report["results"] if r["op"] == op and r["backend"] == backend]
    return found


def test_conv_flop_formula_on_conv2():
    # conv2 at batch 128: 2 * N*K*C*R*S*P*Q = 2 * 128*64*32*3*3*11*11
    assert ops.conv_flops((128, 32, 13, 13), (64, 32, 3, 3)) == 570_949_632
    by_name = {op.name: op for op in ops.model_ops()}
    inputs = ops.op_inputs(2)
    assert by_name["conv2 fwd"].flops(*inputs["conv2 fwd"]) == 2 * 2 * 64 * 32 * 9 * 11 * 11
    # backward: dW and dX cost the forward's count each; conv1 skips dX
    assert by_name["conv2 bwd"].flops(*inputs["conv2 bwd"]) == 2 * by_name["conv2 fwd"].flops(*inputs["conv2 fwd"])
    assert by_name["conv1 bwd"].flops(*inputs["conv1 bwd"]) == by_name["conv1 fwd"].flops(*inputs["conv1 fwd"]) \
        == 2 * 2 * 32 * 1 * 9 * 26 * 26
    assert by_name["dense bwd"].flops(*inputs["dense bwd"]) == 4 * 2 * 1600 * 10
    assert by_name["pool1 fwd"].flops(*inputs["pool1 fwd"]) is None


def test_op_inputs_have_the_models_shapes():
    inputs = ops.op_inputs(3)
    assert inputs["conv1 fwd"][0].shape == (3, 1, 28, 28)
    assert inputs["pool1 fwd"][0].shape == (3, 32, 26, 26)
    assert inputs["conv2 bwd"][0].shape == (3, 64, 11, 11)
    assert inputs["pool2 bwd"][2] == (3, 64, 11, 11)
    assert inputs["dense fwd"][0].shape == (3, 1600)
    assert inputs["conv2 fwd"][2].any(), "biases must be non-zero, or a kernel that ignores them would pass"
    pooled_input = inputs["pool1 fwd"][0]
    assert (pooled_input == 0).mean() > 0.05, "pooling inputs come out of a ReLU, ties included"


def test_fused_ops_get_their_inputs_in_the_layout_training_hands_them_over():
    """jit keeps conv1's pooled output channels-last (INFO.channels_last): the bench then hands conv1's fused
    backward its pooled output, argmax and gradient, and conv2's fused ops their input, stored so, as a training
    step does; the values stay the same."""
    from numba_cnn.kernels.contract import is_channels_last

    jit = get_backend("jit")
    inputs = ops.op_inputs(2)
    h1 = inputs["conv1+pool1 bwd"][1]
    assert jit.to_device(h1) is h1  # the bench lays out what to_device returns: the same host arrays, by id
    ids, seen = set(), {}
    for op in ops.model_ops():
        args = ops.in_training_layout(op, inputs[op.name], ids)
        for got, given in zip(args, inputs[op.name]):
            if isinstance(given, np.ndarray):
                np.testing.assert_array_equal(got, given)
        seen[op.name] = [isinstance(a, np.ndarray) and is_channels_last(a) for a in args]
        if op.fused is not None and op.name.endswith(" fwd"):
            if is_channels_last(op.run(jit, *args)[0]):
                ids.add(id(inputs[op.name[:-len("fwd")] + "bwd"][1]))
    assert seen["conv1+pool1 bwd"] == [True, True, True, False, False, False]
    assert seen["conv2+pool2 fwd"] == [True, False, False]
    assert seen["conv2+pool2 bwd"] == [False, False, False, True, False, False]
    assert not any(seen["conv2 fwd"]) and not any(seen["pool1 bwd"])  # unfused ops: as an unfused model has them


@pytest.mark.parametrize("defect, reason", [
    (dict(conv2d_forward=conv_forward_plus(1e-2)), "relative error"),
    (dict(conv2d_forward=conv_forward_without_bias), "relative error"),
    (dict(conv2d_forward=conv_forward_float64), "dtype float64"),
    (dict(conv2d_forward=conv_forward_nan), "relative error inf"),
    (dict(conv2d_forward=conv_forward_raises), "raised NotImplementedError"),
    (dict(maxpool2d_forward=maxpool_forward_last_wins), "winners differ"),
])
def test_gate_refuses_a_wrong_kernel_without_timing_it(defect, reason):
    calls = []
    broken = fake_backend("broken", calls, **defect)
    report = small_bench(["im2col", broken], layers=("conv1", "pool1"))
    defective_op = "conv1 fwd" if "conv2d_forward" in defect else "pool1 fwd"
    failed = row(report, defective_op, "broken")
    assert failed["status"] == "FAILED"
    assert reason in failed["reason"]
    assert not {"samples_s", "median_s", "first_call_s", "gflops"} & failed.keys()
    fn_name = next(iter(defect))
    assert calls.count(("broken", fn_name)) == 1, "a failed kernel is called once, for its check, and never timed"
    # the other ops of the same backend, and every op of im2col, pass and are timed
    for r in report["results"]:
        if (r["op"], r["backend"]) != (defective_op, "broken"):
            assert r["status"] == "ok", r
            assert len(r["samples_s"]) == 3
    assert all(s["op"] != defective_op for s in report["speedups"])


def test_a_wrong_im2col_fails_the_gate():
    """The gate's oracle is the float64 reference, not im2col, so im2col itself is checked: a bias off by 1e-2 in
    its conv forward is refused and never timed."""
    wrong = fake_backend("im2col", conv2d_forward=conv_forward_plus(1e-2))
    report = small_bench([wrong], layers=("conv1",))
    failed = row(report, "conv1 fwd", "im2col")
    assert failed["status"] == "FAILED" and "relative error" in failed["reason"] and "samples_s" not in failed
    assert report["settings"]["oracle"].startswith("numba_cnn.kernels.reference")


def test_check_tolerance_is_relative_to_the_largest_reference_value():
    op = next(op for op in ops.model_ops() if op.name == "conv2 fwd")
    ref = np.full((2, 3), 1000.0)
    # |got - ref| / (|ref| + max |ref|): 0.05 / 2000 passes, 0.3 / 2000 does not (the oracle's 1e-4)
    ok, errors, _ = ops.check_outputs(op, (np.float32(ref + 0.05),), (ref,))
    assert ok and errors["y"] == pytest.approx(2.5e-5, rel=1e-3)
    ok, _, reason = ops.check_outputs(op, (np.float32(ref + 0.3),), (ref,))
    assert not ok and "relative error 0.00015" in reason
    ok, _, reason = ops.check_outputs(op, (np.zeros((3, 2), np.float32),), (ref,))
    assert not ok and "shape" in reason


def test_first_call_is_timed_apart_and_each_backend_times_a_block_after_a_settling_call():
    calls = []

    def slow_first_call(x, w, b, relu):
        if not calls[:-1]:  # this call is the first one recorded
            time.sleep(0.3)  # stands in for a compile
        return IM2COL.conv2d_forward(x, w, b, relu)

    slow = fake_backend("slow", calls, conv2d_forward=slow_first_call)
    fast = fake_backend("fast", calls)
    report = small_bench([slow, fast], layers=("conv1",), repeats=4)
    r = row(report, "conv1 fwd", "slow")
    assert r["first_call_s"] >= 0.3
    assert max(r["samples_s"]) < 0.3 and len(r["samples_s"]) == 4
    forward_calls = [name for name, fn in calls if fn == "conv2d_forward"]
    # the checked first calls, then per backend one untimed settling call and its 4 timed repeats
    assert forward_calls == ["slow", "fast"] + ["slow"] * 5 + ["fast"] * 5


def test_op_bench_record_speedups_and_peak_share():
    slow = fake_backend("naive", slow=True)  # declared slow: gets the slow batch and repeat count
    report = small_bench(["im2col", slow], layers=("conv2", "dense"), batch_size=4, naive_batch=2)
    fast_row, slow_row = row(report, "conv2 fwd", "im2col"), row(report, "conv2 fwd", "naive")
    assert (fast_row["batch"], slow_row["batch"]) == (4, 2)
    assert (len(fast_row["samples_s"]), len(slow_row["samples_s"])) == (3, 2)
    for r in (fast_row, slow_row):
        assert r["status"] == "ok" and r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"]
        assert r["median_per_image_s"] == pytest.approx(r["median_s"] / r["batch"])
        assert r["flops"] == ops.conv_flops((r["batch"], 32, 13, 13), (64, 32, 3, 3))
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        assert r["peak_share"] == pytest.approx(r["gflops"] / FAKE_SGEMM_GFLOPS)
    speedup = {(s["op"], s["pair"]): s["speedup"] for s in report["speedups"]}
    assert speedup[("conv2 fwd", "im2col vs naive")] == pytest.approx(
        slow_row["median_per_image_s"] / fast_row["median_per_image_s"])
    assert {op for op, _ in speedup} == {"conv2 fwd", "conv2 bwd"}, "dense is shared layers.py code: no speedup"
    assert "pool1 fwd" not in {r["op"] for r in report["results"]}


def test_bytes_moved_and_intensity_count_each_input_once_and_each_output_once():
    report = small_bench(["im2col"], layers=("conv2", "pool2"), batch_size=4)
    x, w, b = ops.op_inputs(4)["conv2 fwd"]
    conv = row(report, "conv2 fwd", "im2col")
    assert conv["bytes"] == 4 * (x.size + w.size + b.size + 4 * 64 * 11 * 11)
    assert conv["flops_per_byte"] == pytest.approx(conv["flops"] / conv["bytes"])
    assert conv["gbytes_per_s"] == pytest.approx(conv["bytes"] / conv["median_s"] / 1e9)
    pool = row(report, "pool2 fwd", "im2col")
    assert pool["bytes"] == 4 * (4 * 64 * 11 * 11) + 4 * (4 * 64 * 5 * 5) + 1 * (4 * 64 * 5 * 5)  # x, y, argmax
    assert "flops_per_byte" not in pool and pool["gbytes_per_s"] > 0
    assert report["calibration"]["stream_gbs"] == FAKE_STREAM_GBS


def test_stream_bandwidth_is_measured_per_repeat_after_a_warm_up():
    rates = stream_gbs(threads=2, mib=2, repeats=3)
    assert len(rates) == 3 and all(0.1 < rate < 10_000 for rate in rates)


def parse_bench(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_command_writes_json_and_png(tmp_path, capsys):
    args = parse_bench(["--kernels", "im2col,cuda", "--ops", "pool1,dense", "--batch-size", "4", "--repeats", "2",
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
    assert "read once" in report["bytes_formula"]
    machine = report["machine"]
    for key in ("processor", "cpus", "numpy", "numba", "python", "numba_threading_layer", "blas"):
        assert key in machine
    assert machine["threads"]["numba_threads"] == 1
    assert all(lib["num_threads"] == 1 for lib in machine["blas"])
    assert report["calibration"]["peak_gflops"] == FAKE_SGEMM_GFLOPS
    assert "2*N*K*C*R*S*P*Q" in report["flop_formula"]
    ops = [r["op"] for r in report["results"] if r["backend"] == "im2col"]
    assert ops == ["pool1 fwd", "pool1 bwd", "dense fwd", "dense bwd"]
    assert all(r["status"] == "ok" and len(r["samples_s"]) == 2 for r in report["results"]
               if r["backend"] == "im2col")
    out = capsys.readouterr().out
    assert f"written: {json_path}, {png_path} and {roofline_path}" in out
    cuda_rows = [r for r in report["results"] if r["backend"] == "cuda"]
    assert len(cuda_rows) == 4
    if cuda_rows[0]["status"] == "skipped":  # no GPU or numba-cuda here: said once in the table, not timed
        assert out.count("cuda skipped:") == 1 and "samples_s" not in cuda_rows[0]


def test_bench_refuses_bad_settings():
    with pytest.raises(NumbaCNNError, match="unknown op layer"):
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
    def entry(name, seconds, rate, mb, baseline=True):
        return dict(contender=name, status="ok", sec_per_epoch=seconds, inference_img_per_s=rate, peak_rss_mb=mb,
                    baseline=baseline)

    entries = [entry("jit", 5.0, 30_000, 200, baseline=False), entry("torch:nchw", 20.0, 8_000, 700),
               entry("torch:channels_last", 16.0, 9_000, 800), entry("keras:tensorflow", 10.0, 20_000, 900),
               dict(contender="torch:compile", status="FAILED", reason="x")]
    compare._add_ratios(entries)
    jit = entries[0]
    assert jit["vs_torch_best"] == {"sec_per_epoch": 5 / 16, "inference_img_per_s": 30_000 / 9_000,
                                    "peak_rss_mb": 200 / 700}
    assert jit["vs_torch_best_names"]["sec_per_epoch"] == "torch:channels_last"
    assert jit["vs_torch_best_names"]["peak_rss_mb"] == "torch:nchw"
    assert jit["vs_fastest_framework"]["sec_per_epoch"] == 0.5
    assert jit["vs_fastest_framework_names"]["inference_img_per_s"] == "keras:tensorflow"


def test_compare_passes_a_data_error_through(tmp_path):
    with pytest.raises(NumbaCNNError, match="missing"):
        compare.compare_training(["im2col"], steps=1, rounds=1, data=str(tmp_path / "missing"), log=lambda *a: None)


@pytest.mark.skipif(baselines.missing_packages("torch") != [], reason="torch not installed (.[baselines] extra)")
def test_torch_model_matches_ours_and_compares():
    from numba_cnn.model import Model

    torch_model = baselines.TorchCNN(seed=0, threads=1)
    assert sum(p.numel() for p in torch_model.net.parameters()) == Model("im2col").num_params == 34_826
    conv1 = torch_model.net[0]
    assert float(conv1.weight.detach().abs().max()) <= np.sqrt(6 / (9 + 32 * 9)) and not conv1.bias.any()
    assert torch_model.optimizer.defaults["eps"] == 1e-7 and torch_model.optimizer.defaults["lr"] == 1e-3

    assert baselines.expand("torch") == ["torch:nchw", "torch:channels_last", "torch:flush_denormal"]
    report = compare.compare_training(["im2col", "torch"], steps=2, warmup_steps=1, batch_size=32, rounds=1,
                                      threads=1, random_data=True, limit=256, log=lambda *a: None)
    entries = {e["contender"]: e for e in report["contenders"]}
    assert list(entries) == ["im2col", "torch:nchw", "torch:channels_last", "torch:flush_denormal"]
    assert all(e["status"] == "ok" for e in entries.values()), entries
    torch_best = min((e for name, e in entries.items() if name.startswith("torch")), key=lambda e: e["sec_per_epoch"])
    assert torch_best["vs_torch_best"]["sec_per_epoch"] == 1.0
    ours = entries["im2col"]
    assert ours["vs_torch_best"]["sec_per_epoch"] == pytest.approx(ours["sec_per_epoch"] / torch_best["sec_per_epoch"])
    assert ours["vs_torch_best_names"]["sec_per_epoch"] == torch_best["contender"]
    assert "channels last" in entries["torch:channels_last"]["version"]
    assert "x torch*" in format_compare_table(report)


@pytest.mark.slow
@pytest.mark.skipif(baselines.missing_packages("keras") != [], reason="keras/tensorflow not installed (.[baselines])")
def test_keras_model_trains_in_a_subprocess():
    report = compare.compare_training(["keras"], steps=2, warmup_steps=1, batch_size=32, rounds=1, threads=1,
                                    random_data=True, limit=128, log=lambda *a: None)
    (entry,) = report["contenders"]
    assert entry["status"] == "ok", entry
    assert 0 <= entry["test_accuracy"] <= 1 and entry["peak_rss_mb"] > entry["rss_after_data_mb"]


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


def test_bench_refuses_an_unwritable_out_folder_before_running(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(bench, "bench_ops", lambda *a, **k: pytest.fail("the bench ran before the check"))
    with pytest.raises(NumbaCNNError, match="not a writable folder"):
        bench.run(parse_bench(["--out", str(blocker / "results")]))
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"], "nothing created"
