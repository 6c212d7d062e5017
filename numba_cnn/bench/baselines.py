"""The network in PyTorch (torch.nn) and in Keras 3, for `bench --compare`; optional (pip install -e ".[baselines]").

Both are built from the network's description by numba_cnn.interop (each layer's torch_modules / keras_layers, in
order) and start from numba_cnn's own initial weights (model.init_state with the same seed: Glorot-uniform
weights, zero biases), trained under softmax cross-entropy with Adam(lr 1e-3, beta1 0.9, beta2 0.999, eps 1e-7).
Differences left as each library has them: PyTorch adds eps to the bias-corrected sqrt(v), Keras (and
numba_cnn.optim) to the raw sqrt(v), which only matters while v is tiny; the dropout masks are each library's own
draws; PyTorch's BatchNorm keeps the unbiased batch variance in its running variance. Every contender holds the
images as uint8 and scales each batch (numba_cnn.kernels.host.as_float_images), so peak memory compares the frameworks,
not the data format.

Every contender, ours included (compare.NumbaCNNContender), has the same two methods and a `version` string, so one
loop trains and times them all on identical batches:
    train_step(x[N, C, H, W] uint8, y[N] int64) -> loss (float; reading it waits for the step to finish)
    predict(x[N, C, H, W] uint8) -> predicted class, int[N]
torch and keras are imported only inside these classes: the core package never needs them.
"""

import importlib
import importlib.util
import os
import sys
import time

import numpy as np

from numba_cnn.errors import NumbaCNNError
from numba_cnn.kernels.host import as_float_images
from numba_cnn.model import init_state

LEARNING_RATE = 1e-3
ADAM_EPSILON = 1e-7  # Keras's default, which numba_cnn.optim uses too; PyTorch's own default is 1e-8
INSTALL_HINT = ('pip install -e ".[baselines]" (torch==2.13.0 and keras; tensorflow-cpu==2.21.0 for Keras\'s '
                'default backend)')

# PyTorch's CPU settings worth trying: eager NCHW (its default), channels_last memory format, flush-denormal
# (denormal floats slow x86 arithmetic), and torch.compile. "torch" runs the three eager ones and the comparison
# takes the fastest; "torch:compile" is tried by name (on 2 cores it was slower than eager, and its compile adds
# tens of seconds). "torch:cuda" runs eager NCHW on the GPU, the peer of the cuda backend.
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


def make_baseline(name, network, seed, threads):
    fam, _, option = name.partition(":")
    if fam == "torch":
        return TorchCNN(network, seed=seed, threads=threads, variant=option or "nchw")
    return KerasCNN(network, seed=seed, threads=threads, backend=option or "tensorflow")


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
    """The network in torch.nn (interop.torch.to_torch), trained with torch.optim.Adam and CrossEntropyLoss on its
    logits, in one of TORCH_VARIANTS. Images arrive as uint8 and are scaled a batch at a time, as numba_cnn's
    trainer does."""

    def __init__(self, network, seed=0, threads=None, variant="nchw"):
        if variant not in TORCH_VARIANTS:
            raise NumbaCNNError(f"unknown torch variant {variant!r}: choose from {', '.join(TORCH_VARIANTS)}")
        torch = self.torch = _import("torch")
        from numba_cnn.interop.torch import to_torch

        self.name, self.variant = f"torch:{variant}", variant
        self.version = f"torch {torch.__version__} ({variant.replace('_', ' ')})"
        nn = torch.nn
        _set_torch_threads(torch, threads)
        torch.set_flush_denormal(variant == "flush_denormal")
        torch.manual_seed(seed)  # dropout's masks
        self.net = to_torch(network, init_state(network, seed))
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
    """The network as a keras.Sequential (interop.keras.to_keras) on one of KERAS_BACKENDS (TensorFlow, Keras's
    default, or torch), channels-last as Keras expects, trained with train_on_batch (Keras's own per-step call)
    under sparse categorical cross-entropy (on probabilities where the last layer keeps its softmax, on logits
    otherwise). Images arrive as uint8 and are scaled a batch at a time."""

    def __init__(self, network, seed=0, threads=None, backend="tensorflow"):
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
        from numba_cnn.interop.keras import to_keras

        self.name = f"keras:{backend}"
        self.version = f"keras {keras.__version__} on {backend} {engine.__version__}"
        keras.utils.set_random_seed(seed)  # dropout's masks
        self.model = to_keras(network, init_state(network, seed))
        probabilities = getattr(network.layers[-1], "activation", None) == "softmax"
        self.model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE, epsilon=ADAM_EPSILON),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities))

    @staticmethod
    def _channels_last(x):
        images = as_float_images(x)
        return np.ascontiguousarray(np.moveaxis(images, 1, -1)) if images.ndim == 4 else images  # NCHW -> NHWC

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
