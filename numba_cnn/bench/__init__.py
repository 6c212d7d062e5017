"""`python -m numba_cnn bench`: the op bench (ops.py), or with --compare the training comparison against PyTorch
and Keras (compare.py, baselines.py), of the network `--model` names (networks.py); report.py prints and draws
their records.
"""

import argparse
import os
import time
from pathlib import Path

from numba_cnn.atomic import write_json
from numba_cnn.bench.compare import compare_training
from numba_cnn.bench.networks import bench_network, parse_input_shape
from numba_cnn.bench.ops import DEFAULT_OP_BACKENDS, bench_ops
from numba_cnn.bench.report import format_compare_table, format_ops_table, plot_ops, plot_roofline
from numba_cnn.errors import NumbaCNNError
from numba_cnn.kernels import BACKENDS
from numba_cnn.network import DEFAULT_PRESET, PRESETS

DEFAULT_COMPARE_BACKENDS = ("jit", "im2col")
DEFAULT_OUT = "bench-results"


def _names(text):
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _input_shape(text):
    try:
        return parse_input_shape(text)
    except NumbaCNNError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser):
    """The flags of `python -m numba_cnn bench`."""
    parser.add_argument("--backend", "--kernels", dest="backend", type=_names, metavar="LIST",
                        help=f"comma-separated backends from {', '.join(BACKENDS)} (default "
                             f"{','.join(DEFAULT_OP_BACKENDS)}; with --compare {','.join(DEFAULT_COMPARE_BACKENDS)})")
    parser.add_argument("--model", metavar="NAME|FILE.json",
                        help=f"the network: a preset ({', '.join(PRESETS)}; default {DEFAULT_PRESET}) or a JSON "
                             f"description file (docs/networks.md)")
    parser.add_argument("--input-shape", type=_input_shape, metavar="C,H,W",
                        help="the images' shape (default: --dataset's, else the description's input_shape, else "
                             "3,32,32 for the vgg-small presets and 1,28,28 for the rest)")
    parser.add_argument("--layers", "--ops", dest="layers", type=_names, metavar="LIST",
                        help="names of the layers whose steps to time (a fused step counts when one of its layers "
                             "is named; default: every layer)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="Numba and BLAS threads (torch's too with --compare); default: all usable CPUs")
    parser.add_argument("--repeats", type=int, default=7, metavar="N", help="timed calls per op and backend (default 7)")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N", help="images per call / per step (default 128)")
    parser.add_argument("--naive-batch", type=int, default=1, metavar="N",
                        help="images per call for naive, which takes seconds per image (default 1)")
    parser.add_argument("--naive-repeats", type=int, default=3, metavar="N",
                        help="timed calls per op for naive (default 3)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for the JSON record, the PNG chart and the roofline PNG (default {DEFAULT_OUT}/)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the weights, inputs and data order (default 0)")
    parser.add_argument("--profile", action="store_true",
                        help="write a pyinstrument profile into profiles/ (with --compare, one per contender run)")
    parser.add_argument("--compare", type=_names, metavar="LIST",
                        help="train against baselines instead: torch (its eager settings, the best one counts), "
                             "torch:<nchw|channels_last|flush_denormal|compile>, keras (its default backend, "
                             "TensorFlow where installed), keras:<tensorflow|torch>; our --backend and each baseline "
                             "in its own process, same data, batch and threads")
    parser.add_argument("--steps", type=int, default=50, metavar="N", help="--compare: timed training steps (default 50)")
    parser.add_argument("--warmup-steps", type=int, default=3, metavar="N", help="--compare: untimed steps first (default 3)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="--compare: contenders take turns N times; medians and ranges over them (default 3)")
    parser.add_argument("--epochs", type=int, default=0, metavar="N",
                        help="--compare: train N full epochs instead of --steps, and report test accuracy")
    parser.add_argument("--dataset", metavar="NAME", help="the data set (mnist, fashion-mnist, cifar10, folder): "
                        "--compare trains on it (default mnist); it also sets the input shape and the classes")
    parser.add_argument("--data", metavar="PATH", help="--compare: where the data set is (default: "
                        "$NUMBA_CNN_DATA, then numba_cnn.data's own search)")
    parser.add_argument("--random-data", action="store_true",
                        help="--compare: random images of the network's input shape instead of a data set "
                             "(timing only; accuracy meaningless)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="--compare: train and test on the first N images only (quick checks)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _check_writable(folder):
    """Refuse an output folder that cannot be written before the bench runs, not after; create nothing yet."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise NumbaCNNError(f"cannot write the bench results into {folder}: {existing} is not a writable folder")


def write_result(path, record):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)  # atomic: an interrupted bench leaves no half-written record
    except OSError as exc:
        raise NumbaCNNError(f"cannot write {path}: {exc.strerror or exc}") from None


def run(args):
    """`python -m numba_cnn bench`: the op bench, or the training comparison with --compare -> exit code."""
    from numba_cnn.profiling import maybe_profile

    out = Path(args.out)
    _check_writable(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    network = bench_network(args.model, args.input_shape, args.dataset)
    print(f"network: {network.name or args.model}, {len(network.layers)} layers, {network.num_params():,} "
          f"parameters, input {list(network.input_shape)}")
    if args.compare is not None:
        backends = args.backend or DEFAULT_COMPARE_BACKENDS
        report = compare_training(backends + args.compare, network=network, steps=args.steps,
                                  warmup_steps=args.warmup_steps, batch_size=args.batch_size, threads=args.threads,
                                  rounds=args.rounds, epochs=args.epochs, seed=args.seed, dataset=args.dataset,
                                  data=args.data, random_data=args.random_data, limit=args.limit,
                                  profile=args.profile)
        print(format_compare_table(report))
        path = out / f"compare-{stamp}.json"
        write_result(path, report)
        print(f"written: {path}")
        return 0 if all(e["status"] != "FAILED" for e in report["contenders"]) else 1
    backends = args.backend or DEFAULT_OP_BACKENDS
    with maybe_profile(args.profile, "bench", "+".join(backends)):
        report = bench_ops(backends, network=network, layers=args.layers, batch_size=args.batch_size,
                           naive_batch=args.naive_batch, repeats=args.repeats, naive_repeats=args.naive_repeats,
                           threads=args.threads, seed=args.seed)
    json_path, png_path = out / f"ops-{stamp}.json", out / f"ops-{stamp}.png"
    roofline_path = out / f"roofline-{stamp}.png"
    report["files"] = {"json": str(json_path), "chart": str(png_path), "roofline": str(roofline_path)}
    print(format_ops_table(report))
    write_result(json_path, report)
    plot_ops(report, png_path)
    plot_roofline(report, roofline_path)
    print(f"written: {json_path}, {png_path} and {roofline_path}")
    return 0 if all(r["status"] != "FAILED" for r in report["results"]) else 1
