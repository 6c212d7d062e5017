"""Training loop, evaluation, checkpoints and resume.

One training step: take a mini-batch -> Model.forward_backward -> the divergence check (divergence.py) ->
Adam.step. Every layer runs inside the LayerTimer, so each epoch ends with a table of where its time went. The kernels are compiled
(jit) or first touched (other backends) by a warm-up pass before the first timed epoch, and those seconds are
reported apart.

Exact resume: a checkpoint holds the parameters, the Adam state, the epoch and step, the data-order RNG state at the
start of the current epoch (so the epoch's permutation can be drawn again) and the dropout RNG state now.
"""

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from numba_cnn import checkpoint as ckpt
from numba_cnn.atomic import write_json
from numba_cnn.console import EXIT_INTERRUPTED, InterruptFlag, Progress
from numba_cnn.divergence import DivergenceMonitor, stop_message
from numba_cnn.errors import CheckpointError, NumbaCNNError, check_int_flag
from numba_cnn.estimate import RunSize, long_run_note, time_per_image
from numba_cnn.kernels import get_backend
from numba_cnn.model import DEFAULT_BACKEND, Model, default_network
from numba_cnn.network import from_dict
from numba_cnn.optim import Adam
from numba_cnn.report import RUN_PNG, draw_run
from numba_cnn.runtime import machine_record, set_threads, threading_layer
from numba_cnn.timing import LayerTimer, NullTimer, format_table

EVAL_BATCH = 256
WARMUP_IMAGES = 2
EXIT_DIVERGED = 3
NETWORK_JSON = "network.json"  # the run folder's copy of the description, loadable with --model


@dataclass
class TrainConfig:
    backend: str = DEFAULT_BACKEND
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    limit: int | None = None  # train on the first `limit` images
    test_limit: int | None = None  # evaluate on the first `test_limit` test images (defaults to `limit`)
    checkpoint_every: int = 0  # also checkpoint every N steps; 0: at the end of each epoch only
    threads: int | None = None
    data: dict | None = None  # which data set, read from where, with the SHA-256 of what was read: numba_cnn.data's record
    divergence_stop: bool = True  # stop when the loss turns non-finite or explodes (numba_cnn/divergence.py)
    network: dict | None = None  # the network's description, input shape included (None: mnist-cnn on MNIST)
    init_from: str | None = None  # the file the weights started from (train --init-from); None: seeded init

    def validate(self):
        for name in ("epochs", "batch_size"):
            check_int_flag(name, getattr(self, name))
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise NumbaCNNError(f"--lr must be a positive number, got {self.lr!r}")
        for name in ("limit", "test_limit", "threads"):
            check_int_flag(name, getattr(self, name), optional=True)
        check_int_flag("checkpoint_every", self.checkpoint_every, least=0)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    status: str  # "finished" | "interrupted" | "diverged"
    out_dir: Path
    history: list
    checkpoint: Path | None
    model: Model

    @property
    def exit_code(self):
        return {"finished": 0, "interrupted": EXIT_INTERRUPTED, "diverged": EXIT_DIVERGED}[self.status]


def predict(model, images, batch_size=EVAL_BATCH):
    """-> the predicted class of each image, int64[N] on the host."""
    to_device, as_float = model.backend.to_device, model.backend.as_float_images
    return np.concatenate([model.predict(as_float(to_device(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def evaluate(model, images, labels, batch_size=EVAL_BATCH, predictions=None):
    """-> (accuracy, confusion[classes, classes] with rows = true class, columns = predicted class);
    `predictions` from predict() where already made."""
    predictions = predict(model, images, batch_size) if predictions is None else predictions
    labels = np.asarray(labels)
    classes = model.network.output_shape[0]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels.astype(np.intp), predictions), 1)
    return float((predictions == labels).mean()), confusion


def build_network(description, input_shape, num_classes):
    """The Network a run trains: `description` (a document; None for mnist-cnn) built for the data's (C, H, W),
    its output size checked against the data set's classes."""
    if description is None:
        return default_network(tuple(input_shape), 10 if num_classes is None else num_classes)
    return from_dict(description, tuple(input_shape), num_classes)


def _num_classes(data):
    """The data set's number of classes, or None for plain arrays (then nothing is checked)."""
    dataset = getattr(data, "dataset", None)
    return None if dataset is None else len(dataset.class_names)


def _prepare_out_dir(out_dir):
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise NumbaCNNError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
    return out_dir


def default_out_dir(backend):
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{backend}"


def train(config, data, out_dir=None, resume=None, log=print, on_step=None, init=None):
    """Train per `config` on data = ((x_train, y_train), (x_test, y_test)); returns a TrainResult.

    Images may be float (N, C, H, W) in [0, 1] or the raw uint8 pixels, which are scaled a batch at a time. The
    network is config.network's description (mnist-cnn when None), built for the images' shape.

    resume: a checkpoint path to continue from (its config and network are used, except backend, epochs and
    threads, which `config` may change). init: {name: host array} for every parameter and buffer of the network,
    the weights a new run starts from in place of the seeded initialisation (train --init-from; not with resume).
    on_step(global_step): called after every step (tests use it to interrupt).
    """
    if resume is not None and init is not None:
        raise NumbaCNNError("a resumed run continues from its checkpoint's weights: init is for a new run")
    state = None
    if resume is not None:
        params, adam_state, meta, network = ckpt.load_checkpoint(resume)
        if config.network is not None:
            difference = network.first_difference(from_dict(config.network, network.input_shape))
            if difference:
                raise CheckpointError(f"checkpoint {resume} holds another network than the one asked for: "
                                      f"{difference}")
        saved = TrainConfig.from_dict(meta["config"])
        saved.network = network.to_dict()
        saved.backend, saved.epochs, saved.threads = config.backend, config.epochs, config.threads
        saved.data = config.data  # what this run read (the CLI has checked it against the checkpoint's record)
        saved.divergence_stop = config.divergence_stop
        config = saved
        state = (params, adam_state, meta)
        out_dir = Path(resume).parent if out_dir is None else out_dir
    config.validate()
    (x_train, y_train), (x_test, y_test) = data
    network = build_network(config.network, x_train.shape[1:], _num_classes(data))
    config.network = network.to_dict()
    if config.limit is not None:
        if config.limit > len(x_train):
            raise NumbaCNNError(f"--limit {config.limit} is larger than the {len(x_train)} training images")
        x_train, y_train = x_train[:config.limit], y_train[:config.limit]
    test_limit = config.test_limit if config.test_limit is not None else config.limit
    if test_limit is not None:
        x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    out_dir = _prepare_out_dir(out_dir or default_out_dir(config.backend))
    backend = get_backend(config.backend)
    threads = set_threads(config.threads, backend)

    model = Model(backend, seed=config.seed, params=init if state is None else state[0], network=network)
    optimizer = Adam(model.params, backend, lr=config.lr)
    order_rng = np.random.default_rng([config.seed, 1])
    dropout_rng = backend.make_dropout_rng([config.seed, 2])
    history, start_epoch, start_step, partial = [], 0, 0, None
    if state is not None:
        _, adam_state, meta = state
        try:
            optimizer.load_state_dict(adam_state, backend.to_device)
            order_rng.bit_generator.state = meta["order_rng_epoch_start"]
            dropout_rng = backend.restore_dropout_rng(meta["dropout_rng"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {resume} has an unusable optimizer or RNG state: {exc}") from None
        history, start_epoch, start_step = meta["history"], meta["epoch"], meta["step"]
        partial = meta.get("partial")
        log(f"resuming from {resume}: epoch {start_epoch + 1}, step {start_step}")
    monitor = DivergenceMonitor(config.divergence_stop, None if state is None else state[2].get("divergence"))
    write_json(out_dir / "config.json", asdict(config))
    write_json(out_dir / NETWORK_JSON, network.to_dict())

    n = len(x_train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    x_dev, y_dev = backend.to_device(x_train), backend.to_device(y_train)
    record = {"machine": machine_record(), "threads": threads, "backend": config.backend}

    # Warm-up: a forward/backward and an inference pass on a couple of images with a throwaway RNG, no update,
    # so the compile (jit) or first-touch cost stays out of the timed epochs. Numba compiles per dtype and
    # layout, not per batch size, so two images compile everything a full batch uses, and cost naive seconds
    # rather than minutes.
    warm = min(WARMUP_IMAGES, n)
    start = time.perf_counter()
    if backend.precompile is not None:
        backend.precompile(network)
    model.forward_backward(backend.as_float_images(x_dev[:warm]), y_dev[:warm], backend.make_dropout_rng(0))
    model.predict(backend.as_float_images(backend.to_device(x_test[:WARMUP_IMAGES])))
    record["warmup_seconds"] = time.perf_counter() - start
    record["threading_layer"] = threading_layer()
    log(f"backend {config.backend}: warm-up (compile or cache load) {record['warmup_seconds']:.2f} s; "
        f"threads {threads['numba_threads']} ({record['threading_layer'] or 'no parallel kernels'})")
    size = RunSize(n, len(x_test), config.epochs - start_epoch, test_limited=config.test_limit is not None)
    note = long_run_note(size, config.backend, record["warmup_seconds"] / warm, lambda: time_per_image(
        model, backend.as_float_images(x_dev[:warm]), y_dev[:warm],
        backend.as_float_images(backend.to_device(x_test[:warm])), backend.make_dropout_rng(0)))
    if note:
        log(note)

    timer = LayerTimer(sync=backend.synchronize, device_event=backend.device_event)
    model.timer = timer
    checkpoint_path = out_dir / ckpt.CHECKPOINT_NAME
    status = "finished"

    def save(epoch, step, epoch_start_state, partial_stats):
        meta = {"config": asdict(config), "network": network.to_dict(), "epoch": epoch, "step": step,
                "order_rng_epoch_start": epoch_start_state, "dropout_rng": backend.dropout_rng_state(dropout_rng),
                "history": history, "partial": partial_stats, "divergence": monitor.state_dict()}
        ckpt.save_checkpoint(checkpoint_path, model.state_dict(), optimizer.state_dict(backend.to_host), meta)

    with InterruptFlag() as interrupt:
        for epoch in range(start_epoch, config.epochs):
            epoch_start_state = order_rng.bit_generator.state
            perm = order_rng.permutation(n)
            perm_dev = backend.to_device(perm)
            first_step = start_step if epoch == start_epoch else 0
            loss_sum, correct, seen = (partial or (0.0, 0, 0)) if first_step else (0.0, 0, 0)
            timer.reset()
            progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}")
            timer.on_enter = progress.set_phase
            epoch_start = time.perf_counter()
            for step in range(first_step, steps_per_epoch):
                with timer.section("data", "other"):
                    idx = perm_dev[step * config.batch_size:(step + 1) * config.batch_size]
                    xb, yb = backend.as_float_images(backend.take_rows(x_dev, idx)), backend.take_rows(y_dev, idx)
                loss, batch_correct = model.forward_backward(xb, yb, dropout_rng)
                stop, reason = monitor.check(loss)
                if reason is not None:
                    log(stop_message(reason, epoch, step, checkpoint_path, stopping=stop))
                if stop:
                    status = "diverged"
                    break
                with timer.section("optimizer", "other"):
                    optimizer.step(model.grads)
                batch = len(idx)
                loss_sum += loss * batch
                correct += batch_correct
                seen += batch
                progress.update(step + 1, loss_sum / seen, correct / seen, batch)
                global_step = epoch * steps_per_epoch + step + 1
                if on_step is not None:
                    on_step(global_step)
                # The epoch's last step is checkpointed by the end-of-epoch save below, after its evaluation.
                if step + 1 < steps_per_epoch and (
                        interrupt.set or (config.checkpoint_every and global_step % config.checkpoint_every == 0)):
                    save(epoch, step + 1, epoch_start_state, (loss_sum, correct, seen))
                    if interrupt.set:
                        break
            if status == "diverged" or (interrupt.set and step + 1 < steps_per_epoch):
                break
            epoch_seconds = time.perf_counter() - epoch_start
            table = timer.table(epoch_seconds)
            model.timer = NullTimer()  # evaluation is timed as a whole, apart from the epoch
            eval_start = time.perf_counter()
            test_accuracy, _ = evaluate(model, x_test, y_test)
            eval_seconds = time.perf_counter() - eval_start
            model.timer = timer
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                            "test_accuracy": test_accuracy, "test_images": len(x_test), "seconds": epoch_seconds,
                            "ms_per_batch": 1000 * epoch_seconds / max(1, steps_per_epoch - first_step),
                            "steps": steps_per_epoch - first_step, "eval_seconds": eval_seconds, "layers": table})
            log(f"epoch {epoch + 1}/{config.epochs}: loss {loss_sum / seen:.4f}, train acc {correct / seen:.4f}, "
                f"test acc {test_accuracy:.4f} ({len(x_test)} images), {epoch_seconds:.2f} s "
                f"(+{eval_seconds:.2f} s eval)")
            log(format_table(table, epoch_seconds))
            save(epoch + 1, 0, order_rng.bit_generator.state, None)
            write_json(out_dir / "metrics.json", {"run": record, "epochs": history})
            if interrupt.set:
                break
        if interrupt.set and status == "finished":
            status = "interrupted"
            log(f"interrupted; the last completed step is in {checkpoint_path}. "
                f"Resume with: python -m numba_cnn train --resume {checkpoint_path}")
    write_json(out_dir / "metrics.json", {"run": record, "epochs": history, "status": status,
                                          "divergence": monitor.state_dict()})
    try:
        picture = draw_run(out_dir)
    except OSError as exc:  # a picture that cannot be written costs the run nothing else
        log(f"could not draw {out_dir / RUN_PNG}: {exc.strerror or exc}")
    else:
        log(f"picture: {picture}" if picture else "no finished epoch to draw")
    if status == "finished" and history:
        final = history[-1]
        total = sum(h["seconds"] for h in history)
        log(f"done: test accuracy {final['test_accuracy']:.4f} after {len(history)} epochs, {total:.1f} s of "
            f"training; run folder {out_dir}")
    return TrainResult(status, out_dir, history, checkpoint_path if checkpoint_path.exists() else None, model)
