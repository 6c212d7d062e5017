"""The same CNN in PyTorch (torch.nn) and in Keras 3, for `bench --compare`; optional (pip install -e ".[baselines]").

Both are built from numba_cnn.model.LAYERS (Conv2D(32, 3x3)+ReLU -> MaxPool 2x2 -> Conv2D(64, 3x3)+ReLU ->
MaxPool 2x2 -> Flatten -> Dropout(0.5) -> Dense(10)), softmax cross-entropy, Glorot-uniform weights and zero biases, Adam(lr 1e-3,
beta1 0.9, beta2 0.999, eps 1e-7). One difference is left as each library has it: PyTorch adds eps to the
bias-corrected sqrt(v), Keras (and numba_cnn.optim) to the raw sqrt(v); it only matters while v is tiny. Every
contender holds the images as uint8 and scales each batch (numba_cnn.layers.as_float_images), so peak memory
compares the frameworks, not the data format.

Every contender, ours included (compare.NumbaCNNContender), has the same two methods and a `version` string, so one
loop trains and times them all on identical batches:
    train_step(x[N, 1, 28, 28] uint8, y[N] int64) -> loss (float; reading it waits for the step to finish)
    predict(x[N, 1, 28, 28] uint8) -> predicted class, int[N]
torch and keras are imported only inside these classes: the core package never needs them.
"""

import importlib
import importlib.util
import os
import sys
import time

import numpy as np

from numba_cnn.errors import NumbaCNNError
from numba_cnn.layers import as_float_images
from numba_cnn.model import DROPOUT_RATE, INPUT_SHAPE, LAYERS

LEARNING_RATE = 1e-3
ADAM_EPSILON = 1e-7  # Keras's default, which numba_cnn.optim uses too; PyTorch's own default is 1e-8
INSTALL_HINT = ('pip install -e ".[baselines]" (torch==2.13.0 and keras; tensorflow-cpu==2.21.0 for Keras\'s '
                'default backend)')

# PyTorch's CPU settings worth trying: eager NCHW (its default), channels_last memory format, flush-denormal
# (denormal floats slow x86 arithmetic), and torch.compile. "torch" runs the three eager ones and the comparison
# takes the fastest; "torch:compile" is tried by name (on 2 cores it was slower than eager and compiles for
# 10-40 s). "torch:cuda" runs eager NCHW on the GPU, the peer of the cuda backend.
TORCH_VARIANTS = ("nchw", "channels_last", "flush_denormal", "compile", "cuda")
TORCH_DEFAULT_VARIANTS = ("nchw", "channels_last", "flush_denormal")
KERAS_BACKENDS = ("tensorflow", "torch")


def baseline_names():
    """Every contender name a baseline answers to, family first: torch, torch:<variant>, keras, keras:<backend>."""
    return (("torch",) + tuple(f"torch:{v}" for v in TORCH_VARIANTS)
            + ("keras",) + tuple(f"keras:{b}" for b in KERAS_BACKENDS))


def expand(name):
    """A contender name -> the runs it stands for: "torch" -> its eager variants; "keras" -> Keras on its default
    backend, TensorFlow, where tensorflow is installed, else on torch; full names stay as they are."""
    if name == "torch":
        return [f"torch:{v}" for v in TORCH_DEFAULT_VARIANTS]
    if name == "keras":
        return ["keras:tensorflow" if importlib.util.find_spec("tensorflow") else "keras:torch"]
    return [name]


def family(name):
    """The framework a contender belongs to: "torch:nchw" -> "torch"."""
    return name.split(":")[0]


def missing_packages(name):
    """The packages baseline `name` ("torch[:variant]" or "keras[:backend]") needs that are not installed,
    found without importing them."""
    fam, _, option = name.partition(":")
    needs = ("torch",) if fam == "torch" else ("keras", option or "tensorflow")
    return [package for package in needs if importlib.util.find_spec(package) is None]


def make_baseline(name, seed, threads):
    fam, _, option = name.partition(":")
    if fam == "torch":
        return TorchCNN(seed=seed, threads=threads, variant=option or "nchw")
    return KerasCNN(seed=seed, threads=threads, backend=option or "tensorflow")


def _import(package):
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise NumbaCNNError(f"the {package} baseline needs {package}, which is not installed ({exc}); "
                            f"install it with {INSTALL_HINT}") from None


def _set_torch_threads(torch, threads):
    if threads is not None:
        torch.set_num_threads(threads)


class TorchCNN:
    """The model in torch.nn, trained with torch.optim.Adam and CrossEntropyLoss (log-softmax folded in), in one of
    TORCH_VARIANTS. Images arrive as uint8 and are scaled a batch at a time, as numba_cnn's trainer does."""

    def __init__(self, seed=0, threads=None, variant="nchw"):
        if variant not in TORCH_VARIANTS:
            raise NumbaCNNError(f"unknown torch variant {variant!r}: choose from {', '.join(TORCH_VARIANTS)}")
        torch = self.torch = _import("torch")
        self.name, self.variant = f"torch:{variant}", variant
        self.version = f"torch {torch.__version__} ({variant.replace('_', ' ')})"
        nn = torch.nn
        _set_torch_threads(torch, threads)
        torch.set_flush_denormal(variant == "flush_denormal")
        torch.manual_seed(seed)
        by_kind = {
            "conv2d_relu": lambda k, c, r, s: [nn.Conv2d(c, k, (r, s)), nn.ReLU()],
            "maxpool2d": lambda: [nn.MaxPool2d(2)],
            "dropout": lambda: [nn.Flatten(), nn.Dropout(DROPOUT_RATE)],
            "dense": lambda d, m: [nn.Linear(d, m)],
        }
        self.net = nn.Sequential(*(module for layer in LAYERS
                                   for module in by_kind[layer.kind](*layer.params.get("w", ()))))
        for layer in self.net:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                # PyTorch's default init is Kaiming-uniform; Keras's is Glorot-uniform with zero bias. torch's
                # fans for a (K, C, R, S) kernel are C*R*S and K*R*S, the same as Keras's.
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.memory_format = torch.channels_last if variant == "channels_last" else torch.contiguous_format
        if variant == "cuda" and not torch.cuda.is_available():
            raise NumbaCNNError(f"torch:cuda needs a CUDA build of torch and a GPU; torch {torch.__version__} sees none")
        self.device = torch.device("cuda" if variant == "cuda" else "cpu")
        self.net = self.net.to(self.device, memory_format=self.memory_format)
        self.forward = torch.compile(self.net) if variant == "compile" else self.net
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=LEARNING_RATE, eps=ADAM_EPSILON)
        self.loss_fn = nn.CrossEntropyLoss()

    def _images(self, x):
        images = self.torch.from_numpy(as_float_images(x)).to(self.device)
        return images.contiguous(memory_format=self.memory_format)

    def train_step(self, x, y):
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.forward(self._images(x)), self.torch.from_numpy(y).to(self.device))
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def predict(self, x):
        self.net.eval()
        with self.torch.inference_mode():
            return self.forward(self._images(x)).argmax(dim=1).cpu().numpy()


class KerasCNN:
    """The model as a keras.Sequential on one of KERAS_BACKENDS (TensorFlow, Keras's default, or torch),
    channels-last as Keras expects, trained with train_on_batch (Keras's own per-step call) under sparse
    categorical cross-entropy. Images arrive as uint8 and are scaled a batch at a time."""

    def __init__(self, seed=0, threads=None, backend="tensorflow"):
        if backend not in KERAS_BACKENDS:
            raise NumbaCNNError(f"unknown keras backend {backend!r}: choose from {', '.join(KERAS_BACKENDS)}")
        # Keras picks its backend once, at import: this process is the contender's own, so set it first.
        if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
            raise NumbaCNNError(f"keras was already imported with the {sys.modules['keras'].backend.backend()} "
                                f"backend; the keras:{backend} baseline needs a fresh process")
        os.environ["KERAS_BACKEND"] = backend
        engine = _import(backend)
        if backend == "tensorflow" and threads is not None:
            engine.config.threading.set_intra_op_parallelism_threads(threads)
            engine.config.threading.set_inter_op_parallelism_threads(threads)
        elif backend == "torch":
            _set_torch_threads(engine, threads)
        keras = _import("keras")
        self.name = f"keras:{backend}"
        self.version = f"keras {keras.__version__} on {backend} {engine.__version__}"
        keras.utils.set_random_seed(seed)
        layers = keras.layers
        by_kind = {
            "conv2d_relu": lambda k, c, r, s: [layers.Conv2D(k, (r, s), activation="relu")],
            "maxpool2d": lambda: [layers.MaxPooling2D(2)],
            "dropout": lambda: [layers.Flatten(), layers.Dropout(DROPOUT_RATE)],
            "dense": lambda d, m: [layers.Dense(m, activation="softmax")],
        }
        channels, height, width = INPUT_SHAPE
        self.model = keras.Sequential([keras.Input(shape=(height, width, channels))] + [
            module for layer in LAYERS for module in by_kind[layer.kind](*layer.params.get("w", ()))])
        self.model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE, epsilon=ADAM_EPSILON),
                           loss="sparse_categorical_crossentropy")

    @staticmethod
    def _channels_last(x):
        return np.ascontiguousarray(np.moveaxis(as_float_images(x), 1, -1))  # (N, 1, 28, 28) -> (N, 28, 28, 1)

    def train_step(self, x, y):
        return float(self.model.train_on_batch(self._channels_last(x), y))

    def predict(self, x):
        return np.asarray(self.model.predict_on_batch(self._channels_last(x))).argmax(axis=1)


def batch_stream(n, batch_size, rng):
    """Index arrays of mini-batches, epoch after epoch, each epoch a fresh permutation of range(n) drawn from
    `rng`; an epoch's last batch holds the remainder (as Keras's fit does), so an epoch is ceil(n / batch_size)
    steps."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def train_steps(contender, x, y, batches, steps):
    """Train `contender` for `steps` steps on the next index arrays of `batches` -> (seconds, mean loss).
    Batch gathering is timed too: it is part of every training loop, and the same for every contender."""
    loss_sum = 0.0
    start = time.perf_counter()
    for _, idx in zip(range(steps), batches):
        loss_sum += contender.train_step(x[idx], y[idx])
    return time.perf_counter() - start, loss_sum / steps


def train_epochs(contender, x, y, batch_size, epochs, rng):
    """Train for full epochs over (x, y) -> list of (seconds, mean loss), one per epoch."""
    batches = batch_stream(len(x), batch_size, rng)
    steps_per_epoch = -(-len(x) // batch_size)
    return [train_steps(contender, x, y, batches, steps_per_epoch) for _ in range(epochs)]


def evaluate(contender, x, y, batch_size):
    """Predict every image of x in order, batch by batch -> (accuracy, seconds)."""
    start = time.perf_counter()
    predicted = np.concatenate([contender.predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    seconds = time.perf_counter() - start
    return float((predicted == y).mean()), seconds
