"""python -m numba_cnn train | evaluate | bench

Problems the user can fix end as one line on stderr and a non-zero exit (2; 130 after Ctrl-C; 3 when training
diverges); --debug shows the traceback as well.
"""

import argparse
import sys

from numba_cnn.errors import NumbaCNNError

EXIT_USER_ERROR = 2


def _add_common(p):
    p.add_argument("--data", metavar="PATH", help="MNIST folder of the four IDX files (.gz or not) or a keras "
                   "mnist.npz; default: $NUMBA_CNN_DATA, then ~/.keras/datasets/mnist.npz, then a checked download")
    p.add_argument("--threads", type=int, metavar="N", help="Numba and BLAS threads for the whole run")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser():
    from numba_cnn import bench
    from numba_cnn.kernels import BACKENDS

    parser = argparse.ArgumentParser(prog="python -m numba_cnn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the CNN on MNIST")
    t.add_argument("--kernels", default="jit", metavar="NAME", help=f"kernel backend: {', '.join(BACKENDS)} (default jit)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, metavar="N", help="train on the first N images (and test on the first N, "
                   "unless --test-limit says otherwise)")
    t.add_argument("--test-limit", type=int, metavar="N", help="evaluate on the first N test images")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps (a checkpoint is always written after each epoch)")
    t.add_argument("--out", metavar="DIR", help="run folder (default runs/<time>-<kernels>)")
    t.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    t.add_argument("--no-divergence-stop", dest="divergence_stop", action="store_false",
                   help="keep training when the loss turns NaN or explodes (default: stop, exit 3)")
    t.add_argument("--profile", action="store_true", help="write a pyinstrument profile into profiles/")
    _add_common(t)

    e = sub.add_parser("evaluate", help="test accuracy and confusion matrix of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--kernels", default="im2col", metavar="NAME", help="kernel backend for inference (default im2col)")
    e.add_argument("--test-limit", type=int, metavar="N", help="evaluate on the first N test images")
    _add_common(e)

    b = sub.add_parser("bench", help="check, then time every kernel of every backend; --compare trains against "
                       "PyTorch and Keras")
    bench.add_arguments(b)
    return parser


def cmd_train(args):
    from numba_cnn.data import load_mnist
    from numba_cnn.profiling import maybe_profile
    from numba_cnn.train import TrainConfig, train

    config = TrainConfig(kernels=args.kernels, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, limit=args.limit, test_limit=args.test_limit,
                         checkpoint_every=args.checkpoint_every, threads=args.threads,
                         divergence_stop=args.divergence_stop)
    config.validate()
    data = load_mnist(args.data, normalize=False)  # uint8 in memory; the trainer scales a batch at a time
    print(f"data: {data.source}")
    with maybe_profile(args.profile, "train", args.kernels):
        result = train(config, data, out_dir=args.out, resume=args.resume)
    return result.exit_code


def cmd_evaluate(args):
    from numba_cnn import checkpoint as ckpt
    from numba_cnn.data import load_mnist
    from numba_cnn.model import Model
    from numba_cnn.train import evaluate, set_threads

    params, _, meta = ckpt.load_checkpoint(args.checkpoint)
    _, (x_test, y_test) = load_mnist(args.data, normalize=False)
    if args.test_limit is not None:
        if args.test_limit < 1:
            raise NumbaCNNError(f"--test-limit must be a positive integer, got {args.test_limit}")
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    set_threads(args.threads, args.kernels)
    model = Model(args.kernels, params=params)
    accuracy, confusion = evaluate(model, x_test, y_test)
    print(f"checkpoint {args.checkpoint} (epoch {meta['epoch']}, step {meta['step']}), kernels {args.kernels}")
    print(f"test accuracy {accuracy:.4f} on {len(x_test)} images")
    print("confusion matrix (rows: true digit, columns: predicted digit)")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d in range(10):
        print(f"{d:>6}" + "".join(f"{c:>6}" for c in confusion[d]))
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
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
