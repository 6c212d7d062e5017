"""python -m numba_cnn train | evaluate | predict | export | bench | report

Problems the user can fix end as one line on stderr and a non-zero exit (2; 130 after Ctrl-C; 3 when training
diverges); --debug shows the traceback as well.
"""

import argparse
import sys

from numba_cnn.errors import NumbaCNNError, check_int_flag

EXIT_USER_ERROR = 2


def _add_common(p):
    p.add_argument("--data", metavar="PATH", help="mnist, fashion-mnist: a folder of the four IDX files (.gz or not) "
                   "or an npz; cifar10: cifar-10-binary.tar.gz or the cifar-10-batches-bin folder; folder: DIR with "
                   "train/<class>/*.png and test/<class>/*.png. Default: $NUMBA_CNN_DATA, then the keras cache "
                   "(~/.keras/datasets), then the MNIST copy shipped with numba_cnn or, for a data set not shipped, "
                   "a checked download (a folder needs --data or $NUMBA_CNN_DATA)")
    p.add_argument("--dataset", metavar="NAME", help="mnist, fashion-mnist, cifar10 (3x32x32 colour, downloaded) or "
                   "folder (your PNGs in a folder per class, grey or RGB, one size; give the folder with --data). "
                   "Default: the checkpoint's with --resume and evaluate, else mnist")
    p.add_argument("--download", action="store_true", default=None, help="download the data set into the keras "
                   "cache (checked SHA-256) rather than use the copy shipped with numba_cnn")
    p.add_argument("--allow-data-mismatch", action="store_true", help="use data that differs from what the "
                   "checkpoint's run read (its recorded SHA-256)")
    p.add_argument("--threads", type=int, metavar="N", help="Numba and BLAS threads for the whole run")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser():
    from numba_cnn import bench, report
    from numba_cnn.kernels import BACKENDS
    from numba_cnn.model import DEFAULT_BACKEND
    from numba_cnn.network import DEFAULT_PRESET, PRESETS
    from numba_cnn.plots import MISCLASSIFIED_SHOWN

    parser = argparse.ArgumentParser(prog="python -m numba_cnn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a network (a preset or a JSON description) on a data set")
    t.add_argument("--model", metavar="NAME|FILE.json", help=f"the network: a preset ({', '.join(PRESETS)}; default "
                   f"{DEFAULT_PRESET}) or a JSON description file (docs/networks.md); with --resume, the "
                   "checkpoint's network (a --model given must match it)")
    t.add_argument("--backend", "--kernels", dest="backend", default=DEFAULT_BACKEND, metavar="NAME",
                   help=f"kernel backend: {', '.join(BACKENDS)} (default {DEFAULT_BACKEND})")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, metavar="N", help="train on the first N images (and test on the first N, "
                   "unless --test-limit says otherwise)")
    t.add_argument("--test-limit", type=int, metavar="N", help="evaluate on the first N test images")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps (a checkpoint is always written after each epoch)")
    t.add_argument("--out", metavar="DIR", help="run folder (default runs/<time>-<backend>)")
    t.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    t.add_argument("--init-from", metavar="FILE", help="start a new run from these weights: a numba_cnn checkpoint "
                   "or run folder, a PyTorch state_dict (.pt, .pth) with its network description (.json) beside it, "
                   "or a .keras file; the network is the file's (a --model given must compute the same)")
    t.add_argument("--no-divergence-stop", dest="divergence_stop", action="store_false",
                   help="keep training when the loss turns NaN or explodes (default: stop, exit 3)")
    t.add_argument("--profile", action="store_true", help="write a pyinstrument profile into profiles/")
    _add_common(t)

    e = sub.add_parser("evaluate", help="test accuracy and confusion matrix of a checkpoint")
    e.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a checkpoint file, or the run folder that "
                   "train printed (its checkpoint.npz)")
    e.add_argument("--backend", "--kernels", dest="backend", default=DEFAULT_BACKEND, metavar="NAME",
                   help=f"kernel backend for inference (default {DEFAULT_BACKEND})")
    e.add_argument("--test-limit", type=int, metavar="N", help="evaluate on the first N test images")
    e.add_argument("--misclassified", metavar="PATH.png", help=f"also draw the first {MISCLASSIFIED_SHOWN} "
                   "misclassified test images, each with its true and predicted class, into PATH.png")
    _add_common(e)

    pr = sub.add_parser("predict", help="classify image files (PNG, JPEG) with a trained network")
    pr.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a checkpoint file, or the run folder that "
                    "train printed")
    pr.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or JPEG files, grey or RGB")
    pr.add_argument("--backend", "--kernels", dest="backend", default=DEFAULT_BACKEND, metavar="NAME",
                    help=f"kernel backend for inference (default {DEFAULT_BACKEND})")
    pr.add_argument("--json", action="store_true", help="print the results as JSON")
    pr.add_argument("--resize", action="store_true", help="stretch an image of another size to the network's and "
                    "convert grey to RGB or RGB to grey as the network needs (default: refuse it)")
    pr.add_argument("--threads", type=int, metavar="N", help="Numba and BLAS threads")
    pr.add_argument("--debug", action="store_true", help="show the traceback of an error")

    x = sub.add_parser("export", help="write a trained network as ONNX, a PyTorch state_dict or a .keras file")
    x.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a checkpoint file, or the run folder that "
                   "train printed")
    x.add_argument("--format", required=True, metavar="FORMAT", help="onnx (needs the export extra), torch "
                   "(state_dict + description .json beside it) or keras (a .keras file); torch and keras need the "
                   "baselines extra")
    x.add_argument("--out", required=True, metavar="PATH", help="the file to write (keras: ending in .keras)")
    x.add_argument("--force", action="store_true", help="replace files already at --out")
    x.add_argument("--debug", action="store_true", help="show the traceback of an error")

    b = sub.add_parser("bench", help="check, then time every kernel of every backend; --compare trains against "
                       "PyTorch and Keras")
    bench.add_arguments(b)

    r = sub.add_parser("report", help="compare training runs: a table and one figure of their curves and times")
    report.add_arguments(r)
    return parser


def cmd_train(args):
    from numba_cnn import checkpoint as ckpt
    from numba_cnn.data import load_for_run
    from numba_cnn.network import resolve_description
    from numba_cnn.profiling import maybe_profile
    from numba_cnn.runtime import keep_freed_heap
    from numba_cnn.train import TrainConfig, build_network, train

    config = TrainConfig(backend=args.backend, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, limit=args.limit, test_limit=args.test_limit,
                         checkpoint_every=args.checkpoint_every, threads=args.threads,
                         divergence_stop=args.divergence_stop)
    config.validate()
    if args.resume and args.init_from:
        raise NumbaCNNError("--init-from starts a new run from other weights, --resume continues a run: give one")
    if args.resume:
        args.resume = ckpt.checkpoint_path(args.resume)
    recorded = ckpt.load_checkpoint(args.resume)[2]["config"].get("data") if args.resume else None
    # uint8 in memory; the trainer scales a batch at a time
    data, data_line = load_for_run(args.dataset, args.data, recorded=recorded, download=args.download,
                                   allow_mismatch=args.allow_data_mismatch, normalize=False)
    print(data_line)
    config.data = data.record()
    image_shape, classes = data[0][0].shape[1:], len(data.dataset.class_names)
    init = None
    if args.model is not None or not args.resume:
        network = None
        if args.model is not None or not args.init_from:
            config.network, where = resolve_description(args.model, classes)
            # built here too, so that a bad description stops before any training
            network = build_network(config.network, image_shape, classes)
        if args.init_from:
            from numba_cnn.interop.files import read_weights

            network, init = read_weights(args.init_from, network)
            network = build_network(network.to_dict(), image_shape, classes)  # the data must fit it
            config.network, config.init_from = network.to_dict(), str(args.init_from)
            if args.model is None:
                where = f"--init-from {args.init_from}"
            print(f"initial weights: {args.init_from}")
        print(f"network: {network.name or where} ({where}), {len(network.layers)} layers, "
              f"{network.num_params():,} parameters, input {list(network.input_shape)}")
    keep_freed_heap()  # process-wide malloc settings: the CLI's choice, not the library's (numba_cnn/runtime.py)
    with maybe_profile(args.profile, "train", args.backend):
        result = train(config, data, out_dir=args.out, resume=args.resume, init=init)
    return result.exit_code


def cmd_evaluate(args):
    from numba_cnn import checkpoint as ckpt
    from numba_cnn.data import load_for_run
    from numba_cnn.model import Model
    from numba_cnn.kernels import get_backend
    from numba_cnn.runtime import set_threads
    from numba_cnn.plots import plot_misclassified
    from numba_cnn.train import evaluate, predict

    args.checkpoint = ckpt.checkpoint_path(args.checkpoint)
    params, _, meta, network = ckpt.load_checkpoint(args.checkpoint)
    data, data_line = load_for_run(args.dataset, args.data, recorded=meta["config"].get("data"),
                                   download=args.download, allow_mismatch=args.allow_data_mismatch, normalize=False)
    print(data_line)
    _, (x_test, y_test) = data
    if args.test_limit is not None:
        check_int_flag("test_limit", args.test_limit)
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    backend = get_backend(args.backend)
    set_threads(args.threads, backend)
    if tuple(x_test.shape[1:]) != tuple(network.input_shape):
        raise NumbaCNNError(f"the checkpoint's network takes images of shape {list(network.input_shape)}, the data "
                            f"has {list(x_test.shape[1:])}")
    model = Model(backend, params=params, network=network)
    predictions = predict(model, x_test)
    accuracy, confusion = evaluate(model, x_test, y_test, predictions=predictions)
    print(f"checkpoint {args.checkpoint} (epoch {meta['epoch']}, step {meta['step']}), backend {args.backend}")
    print(f"test accuracy {accuracy:.4f} on {len(x_test)} images")
    print(format_confusion(confusion, data.dataset.class_names))
    if args.misclassified:
        try:
            shown, wrong = plot_misclassified(x_test, y_test, predictions, data.dataset.class_names,
                                              args.misclassified)
        except OSError as exc:
            raise NumbaCNNError(f"cannot write {args.misclassified}: {exc.strerror or exc}") from None
        print(f"written: {args.misclassified} ({shown} of the {wrong} misclassified images)")
    return 0


def cmd_predict(args):
    from numba_cnn import checkpoint as ckpt
    from numba_cnn.kernels import get_backend
    from numba_cnn.model import Model
    from numba_cnn.predict import classify, format_json, format_results, run_preprocessing
    from numba_cnn.runtime import set_threads

    check_int_flag("threads", args.threads, optional=True)
    path = ckpt.checkpoint_path(args.checkpoint)
    params, _, meta, network = ckpt.load_checkpoint(path)
    preprocessing = run_preprocessing(meta, network)
    backend = get_backend(args.backend)
    set_threads(args.threads, backend)
    results = classify(Model(backend, params=params, network=network), args.images, preprocessing, args.resize)
    if args.json:
        print(format_json(results))
    else:
        print(f"checkpoint {path} (epoch {meta['epoch']}, step {meta['step']}), backend {args.backend}; the "
              f"network takes {preprocessing.describe()}")
        print(format_results(results))
    return 0


def cmd_export(args):
    from numba_cnn.interop.files import export

    paths, what = export(args.checkpoint, args.format, args.out, force=args.force)
    print(f"written: {', '.join(map(str, paths))} ({what})")
    return 0


def format_confusion(confusion, class_names):
    """The confusion matrix as text: a row per true class, labelled with its number and name (just the number
    where the name is the number), a column per predicted class, headed by its number."""
    labels = [name if name == str(k) else f"{k} {name}" for k, name in enumerate(class_names)]
    width = max(6, *(len(label) + 1 for label in labels))
    lines = ["confusion matrix (rows: true class, columns: predicted class)",
             " " * width + "".join(f"{k:>6}" for k in range(len(labels)))]
    lines += [f"{label:>{width}}" + "".join(f"{c:>6}" for c in row) for label, row in zip(labels, confusion)]
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "report":
            from numba_cnn import report
            return report.run(args)
        from numba_cnn import bench
        return bench.run(args)
    except NumbaCNNError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
