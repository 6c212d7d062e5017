"""The bench's reports: the op table, its chart and roofline, the training comparison's table. Ops are named by
step ("conv1+pool1 bwd"), whatever the network."""

import numpy as np

from numba_cnn.kernels.reference import FLOAT32_TOL
from numba_cnn.plots import pyplot, save_png

SPARSE_BACKWARD = "conv2d_relu_maxpool2d_backward"
DENSE_EQUIVALENT = ("jit's fused conv+ReLU+pool backward runs over the nonzero conv-output gradients only (pooling, "
                    "ReLU and dropout zero the rest; docs/kernels.md): its GFLOP/s and % peak count the dense FLOPs "
                    "it skips, a dense-equivalent rate; exec GFLOP/s and exec % count the multiply-adds its kernels "
                    "executed.")
EXECUTED = ("exec GFLOP/s, exec %: 2 FLOPs per multiply-add the kernels executed (where the backend counts them: "
            "jit; products with stored zeros included, skipped zeros not), else the dense count; the roofline "
            "places ops by these.")
ROOF = ("GB/s: the bytes moved (below) per second; % roof: the op's own bound, the larger of its executed FLOPs at "
        "the sgemm peak and its bytes at the streaming bandwidth, as a share of its time (host backends; none for an "
        "op that only returns views of its inputs). Over 100%: its arrays came from cache, faster than the bandwidth "
        "measured on arrays larger than the cache.")


def _network_line(settings):
    network = settings["network"]
    return (f"network: {network.get('name', 'unnamed')}, {len(network['layers'])} layers, input "
            f"{network['input_shape']}")


def _op_width(report):
    return max([10] + [len(r["op"]) for r in report["results"]])


def format_ops_table(report):
    """The op bench as text: the network, one line per op (a step of its plan, forward or backward) and backend,
    then the speedups."""
    peak = report["calibration"]["peak_gflops"]
    width = _op_width(report)
    lines = [_network_line(report["settings"]),
             f"{'op':<{width}} {'backend':<8} {'batch':>5} {'check err':>9} {'1st call s':>10} {'median ms':>10} "
             f"{'min-max ms':>17} {'ms/image':>9} {'GFLOP/s':>8} {'% peak':>7} {'exec GFLOP/s':>12} {'exec %':>7} "
             f"{'GB/s':>7} {'% roof':>7}"]
    skipped = {}
    for r in report["results"]:
        if r["status"] == "skipped":
            skipped[r["backend"]] = r["reason"]
            continue
        head = f"{r['op']:<{width}} {r['backend']:<8} {r['batch']:>5} "
        if r["status"] != "ok":
            lines.append(f"{head}{r['status']:>9}  {r['reason']}")
            continue
        spread = f"{1e3 * r['min_s']:.3f}-{1e3 * r['max_s']:.3f}"
        gflops = f"{r['gflops']:.3g}" if "gflops" in r else "-"
        share = f"{100 * r['peak_share']:.1f}%" if "peak_share" in r else "-"
        executed = f"{r['executed_gflops']:.3g}" if "executed_gflops" in r else "-"
        executed_share = f"{100 * r['executed_peak_share']:.1f}%" if "executed_peak_share" in r else "-"
        roof = f"{100 * r['roofline_share']:.0f}%" if "roofline_share" in r else "-"
        lines.append(f"{head}{max(r['check_errors'].values()):>9.1e} {r['first_call_s']:>10.3f} "
                     f"{1e3 * r['median_s']:>10.3f} {spread:>17} {1e3 * r['median_per_image_s']:>9.4f} "
                     f"{gflops:>8} {share:>7} {executed:>12} {executed_share:>7} {r['gbytes_per_s']:>7.3g} {roof:>7}")
    lines.extend(f"{backend} skipped: {reason}" for backend, reason in skipped.items())
    lines.append(f"check err: largest max|got - oracle| / max|oracle| over the op's outputs (FAILED above "
                 f"{FLOAT32_TOL:g}); batch: images per call")
    for step, reason in report["settings"].get("not_timed", {}).items():
        lines.append(f"{step}: {reason}")
    cal, m = report["calibration"], report["machine"]
    blas = ", ".join(f"{b['internal_api']} {b['version']} {b['num_threads']} thread(s)" for b in m["blas"])
    lines.append(f"machine: {m['processor']}, {m['usable_cpus']} usable CPU(s); numba {m['numba']} "
                 f"{m['threads']['numba_threads']} thread(s) ({m['numba_threading_layer']}); BLAS {blas}; "
                 f"load average {m['load_average_1_5_15min'][0]:.2f} at the end (this run included)")
    lines.append("first calls (compile or cache load, first touch), summed over the ops: " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in report["first_call_total_s"].items()))
    lines.append(f"peak: sgemm {cal['sgemm_size']}^3 float32 {peak:.1f} GFLOP/s (median; before "
                 f"{np.median(cal['before_gflops']):.1f}, after {np.median(cal['after_gflops']):.1f})")
    lines.append(f"FLOPs: {report['flop_formula']}")
    if any(r["backend"] == "jit" and SPARSE_BACKWARD in r.get("kernels", ()) for r in report["results"]):
        lines.append(DENSE_EQUIVALENT)
    lines.append(EXECUTED)
    lines.append(f"bandwidth: {cal['stream_gbs']:.1f} GB/s (median; {cal['stream_method']}); "
                 f"{report['bytes_formula']}")
    lines.append(ROOF)
    if report["speedups"]:
        pairs = list(dict.fromkeys(s["pair"] for s in report["speedups"]))
        by_key = {(s["op"], s["pair"]): s["speedup"] for s in report["speedups"]}
        lines.append("")
        lines.append("speedup per image (median vs median; >1: the first is faster; training plan: each backend's "
                     "own steps, fused ones included, forward and backward summed)")
        lines.append(f"{'op':<{width}}" + "".join(f"{p:>17}" for p in pairs))
        for op in dict.fromkeys(s["op"] for s in report["speedups"]):
            cells = (f"{by_key[(op, p)]:.1f}x" if (op, p) in by_key else "-" for p in pairs)
            lines.append(f"{op:<{width}}" + "".join(f"{c:>17}" for c in cells))
    with_paths = [r for r in report["results"] if r.get("paths")]
    if with_paths:
        lines.append("")
        lines.append("kernel paths taken (chosen from the shapes and the target's tiles; executed multiply-adds per "
                     "call)")
        for r in with_paths:
            macs = f" [{r['executed_macs'] / 1e6:.1f} M MACs]" if "executed_macs" in r else ""
            lines.append(f"{r['op']:<{width}} {r['backend']:<8} {'; '.join(r['paths'])}{macs}")
    return "\n".join(lines)


def _op_bars(ax, report, value, xlabel):
    """Horizontal bars on a log scale: one group per op, one bar per backend that ran it, value(row) long;
    FAILED rows say so in the group."""
    ops = list(dict.fromkeys(r["op"] for r in report["results"]))
    backends = _backends(report)
    by_key = {(r["op"], r["backend"]): r for r in report["results"]}
    width = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        ys, values = [], []
        for j, op in enumerate(ops):
            r = by_key.get((op, backend))
            y = j + (i - (len(backends) - 1) / 2) * width
            if r and r["status"] == "ok":
                ys.append(y)
                values.append(value(r))
            elif r:
                ax.text(0.01, y, f"{backend}: {r['status']}", transform=ax.get_yaxis_transform(), va="center",
                        fontsize=7, color="crimson")
        batch = next((r["batch"] for r in report["results"] if r["backend"] == backend and "batch" in r), "?")
        ax.barh(ys, values, height=width, label=f"{backend} (batch {batch})", color=_colour(report, backend))
    ax.set_xscale("log")
    ax.set_yticks(range(len(ops)), ops)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", which="both", alpha=0.3)


def _backends(report):
    return list(dict.fromkeys(r["backend"] for r in report["results"] if r["status"] != "skipped"))


def _colour(report, backend):
    """The same colour for a backend in every chart of the report."""
    return f"C{report['settings']['backends'].index(backend)}"


def _title(report, what):
    machine = report["machine"]
    skipped = list(dict.fromkeys(r["backend"] for r in report["results"] if r["status"] == "skipped"))
    note = f"; not run: {', '.join(skipped)}" if skipped else ""
    network = report["settings"].get("network", {}).get("name")
    of = f" of {network}" if network else ""
    return (f"numba_cnn {what}{of}, {machine['processor']}, {machine['threads']['numba_threads']} thread(s)"
            f"{note}")


def plot_ops(report, path):
    """Bar chart, log-scale milliseconds per image, one group of bars per op, one bar per backend."""
    plt = pyplot()
    n_ops = len({r["op"] for r in report["results"]})
    fig, ax = plt.subplots(figsize=(10, 1 + 0.5 * n_ops * max(1, len(_backends(report))) / 2))
    _op_bars(ax, report, lambda r: 1e3 * r["median_per_image_s"], "milliseconds per image (median, log scale)")
    ax.set_title(_title(report, "ops"), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def plot_roofline(report, path):
    """Left, the roofline: each op with counted FLOPs as a point at its arithmetic intensity (FLOPs per byte
    moved) and its GFLOP/s, one colour per backend, under the two roofs measured in the run (sgemm peak, streaming
    bandwidth x intensity). Right, every op's achieved GB/s against the streaming bandwidth: pooling has no FLOPs
    counted, so it shows there only."""
    plt = pyplot()
    cal = report["calibration"]
    peak, bandwidth = cal["peak_gflops"], cal["stream_gbs"]
    n_ops = len({r["op"] for r in report["results"]})
    fig, (ax, ax_bw) = plt.subplots(1, 2, figsize=(15, max(6.5, 0.28 * n_ops * len(_backends(report)) + 2)),
                                    width_ratios=(1.25, 1), layout="constrained")
    points = [r for r in report["results"] if r["status"] == "ok" and "flops_per_byte" in r and r["on_host"]]
    intensities = [r["flops_per_byte"] for r in points] + [peak / bandwidth]
    x = np.geomspace(min(intensities) / 3, max(intensities) * 3, 200)
    ax.plot(x, np.minimum(peak, bandwidth * x), "k-", lw=2)
    ax.text(x[0], bandwidth * x[0] * 1.3, f"streaming memory {bandwidth:.1f} GB/s x intensity", fontsize=8,
            va="bottom")
    ax.text(x[-1], peak * 1.1, f"sgemm peak {peak:.1f} GFLOP/s", fontsize=8, ha="right", va="bottom")
    ax.axvline(peak / bandwidth, color="grey", ls=":", lw=1)
    ax.text(peak / bandwidth, 0.01, f" ridge {peak / bandwidth:.1f} FLOP/B", fontsize=7, color="grey",
            transform=ax.get_xaxis_transform())
    for where, ha, text in ((0.97, "right", "memory-bound  "), (1.03, "left", "  arithmetic-bound")):
        ax.text(peak / bandwidth * where, 0.97, text, transform=ax.get_xaxis_transform(), ha=ha, va="top",
                fontsize=8, color="grey")
    clusters = []  # clusters: [point, op names] of points that would print over each other
    for r in points:
        xy = (r["flops_per_byte"], r.get("executed_gflops", r["gflops"]))
        ax.plot(*xy, "o", color=_colour(report, r["backend"]), ms=6)
        cluster = next((c for c in clusters if _near(xy, c[0])), None)
        if cluster is None:
            clusters.append((xy, [r["op"]]))
        elif r["op"] not in cluster[1]:
            cluster[1].append(r["op"])
    for xy, names in clusters:
        ax.annotate(", ".join(names), xy, xytext=(5, 3), textcoords="offset points", fontsize=7)
    for backend in _backends(report):  # the legend of both panels
        rows = [r for r in report["results"] if r["backend"] == backend and r["status"] == "ok"]
        where = "" if not rows or rows[0]["on_host"] else ", GPU: right only"
        batch = rows[0]["batch"] if rows else "?"
        ax.plot([], [], "o", color=_colour(report, backend), label=f"{backend} (batch {batch}{where})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved, log scale)")
    ax.set_ylabel("GFLOP/s (median, log scale)")
    ax.set_title("roofline: below the slanted roof bound by memory, below the flat one by arithmetic", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(which="both", alpha=0.2)
    _op_bars(ax_bw, report, lambda r: r["gbytes_per_s"], "GB/s moved (bytes as on the left / median time, log scale)")
    ax_bw.axvline(bandwidth, color="k", lw=2)
    ax_bw.text(bandwidth, 0.5, f"streaming memory {bandwidth:.1f} GB/s ", transform=ax_bw.get_xaxis_transform(),
               fontsize=8, va="center", ha="right", rotation=90)
    ax_bw.set_title("achieved bandwidth of every op, colours as on the left (pooling: no FLOPs, bytes only)",
                    fontsize=9)
    on_device = sorted({r["backend"] for r in report["results"] if r["status"] == "ok" and not r["on_host"]})
    apart = f" ({', '.join(on_device)} on a GPU: bandwidth bars only, the roofs are the CPU's)" if on_device else ""
    fig.suptitle(_title(report, "roofline") + apart, fontsize=10)
    fig.supxlabel("FLOPs: 2 per multiply-add executed (jit's kernels count them; skipped zeros not), else of each "
                  "layer's dense count (bench's FLOP formula). "
             "Bytes: each input read once, each output written once, float32 4 B, argmax 1 B (a lower bound).\n"
             f"Roofs measured in this run: {cal['stream_method']}; sgemm {cal['sgemm_size']}^3 float32 via numpy.",
             fontsize=8)
    save_png(fig, path)


def _near(a, b, factor=1.25):
    """Two points of a log-log chart within `factor` of each other on both axes."""
    return all(max(p, q) / min(p, q) < factor for p, q in zip(a, b))


def format_compare_table(report):
    """The training comparison as text: one line per contender (each PyTorch setting and Keras backend its own),
    medians over rounds with their range, ratios to PyTorch's best setting and to the fastest framework."""
    s, cal = report["settings"], report["calibration"]
    lines = [_network_line(s), f"training comparison: batch {s['batch_size']}, {s['threads']} thread(s), {s['rounds']} round(s) taken "
             f"in turn, data {s['data']}; s/epoch {s['measure']}; medians over rounds (range), peak memory the "
             f"largest; every contender holds uint8 pixels and scales each batch",
             f"{'contender':<22} {'s/epoch':>7} {'range':>13} {'x torch*':>8} {'x fastest':>9} {'GFLOP/s':>7} "
             f"{'% peak':>6} {'infer img/s':>11} {'x fastest':>9} {'peak MB':>7} {'x torch*':>8} {'own MB':>6} "
             f"{'x torch*':>8} {'test acc':>8}"]
    for e in report["contenders"]:
        if e["status"] != "ok":
            lines.append(f"{e['contender']:<22} {e['status']}: {e['reason']}")
            continue

        def x(key, metric):
            return f"{e[key][metric]:.2f}" if metric in e.get(key, {}) else "-"

        low, high = e["sec_per_epoch_range"]
        lines.append(f"{e['contender']:<22} {e['sec_per_epoch']:>7.2f} {f'{low:.2f}-{high:.2f}':>13} "
                     f"{x('vs_torch_best', 'sec_per_epoch'):>8} {x('vs_fastest_framework', 'sec_per_epoch'):>9} "
                     f"{e['gflops']:>7.1f} {100 * e['peak_share']:>5.1f}% {e['inference_img_per_s']:>11.0f} "
                     f"{x('vs_fastest_framework', 'inference_img_per_s'):>9} {e['peak_rss_mb']:>7.0f} "
                     f"{x('vs_torch_best', 'peak_rss_mb'):>8} {e['own_memory_mb']:>6.0f} "
                     f"{x('vs_torch_best', 'own_memory_mb'):>8} {e['test_accuracy']:>8.4f}")
    best = next((e for e in report["contenders"] if "vs_torch_best_names" in e), None)
    if best is not None:
        torch_names, fastest = best["vs_torch_best_names"], best.get("vs_fastest_framework_names", {})
        lines.append(f"torch* = PyTorch's best setting in this run, per metric: {torch_names['sec_per_epoch']} for "
                     f"s/epoch, {torch_names['peak_rss_mb']} for memory, {torch_names.get('own_memory_mb', '-')} "
                     f"for own memory (the peak less what the process held with the data loaded, before any "
                     f"framework or Numba was imported). fastest = the best framework per metric: "
                     f"{fastest.get('sec_per_epoch', '-')} for s/epoch, {fastest.get('inference_img_per_s', '-')} "
                     f"for inference. Ratios: contender / best (s/epoch, MB: below 1 is better; img/s: above 1).")
    lines.append(f"GFLOP/s: {cal['training_flops_per_image'] / 1e6:.2f} MFLOP per training image (bench's FLOP "
                 f"formula) x images per epoch / s per epoch; % peak: of sgemm {cal['peak_gflops']:.1f} GFLOP/s "
                 f"measured in this run (before {np.median(cal['sgemm_before_gflops']):.1f}, after "
                 f"{np.median(cal['sgemm_after_gflops']):.1f}).")
    if any(e["contender"] == "jit" and e["status"] == "ok" for e in report["contenders"]):
        lines.append(DENSE_EQUIVALENT)
    for e in report["contenders"]:
        if e["status"] == "ok" and "executed_gflops" in e:
            lines.append(f"{e['contender']} executed: {e['executed_flops_per_image'] / 1e6:.2f} MFLOP per training "
                         f"image (2 per multiply-add its kernels reported, skipped zeros not counted; dense count "
                         f"{cal['training_flops_per_image'] / 1e6:.2f}), {e['executed_gflops']:.1f} GFLOP/s, "
                         f"{100 * e['executed_peak_share']:.1f}% of the sgemm peak")
    lines.append("versions: " + "; ".join(f"{e['contender']}: {e['version']}" for e in report["contenders"]
                                          if e["status"] == "ok"))
    loads = [run["load_average_1min"] for e in report["contenders"] for run in e["runs"] if "error" not in run]
    if loads:
        lines.append(f"load average (1 min) at the end of each run: {min(loads):.2f} to {max(loads):.2f} on "
                     f"{report['machine']['usable_cpus']} usable CPU(s), each run's own threads included")
    return "\n".join(lines)
