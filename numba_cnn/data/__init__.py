"""Data sets by name: MNIST and Fashion-MNIST (1x28x28, 10 classes), CIFAR-10 (3x32x32, 10 classes), and "folder",
PNG images of any one size in a folder per class. Each Dataset declares its shape (C, H, W) and its class names.

load_dataset(name) returns ((x_train, y_train), (x_test, y_test)): images float32 (N, C, H, W) in [0, 1] (or the raw
uint8 pixels with normalize=False), labels uint8 (N,) below the number of classes. The result also carries
`.dataset` (which data set; for a folder, with the shape and class names found there), `.source` (where it came
from) and `.sha256`, the SHA-256 of each of the data set's parts: for MNIST-style sets each of the four parts written
as an uncompressed IDX file, whatever held it (raw, gzip or npz); for CIFAR-10 each batch file, from the archive or
the extracted folder; for a folder each split's decoded images and labels. `.record()` is what a run keeps.

Sources, in order: an explicit path (else $NUMBA_CNN_DATA), the keras cache, then the copy shipped with the package
(MNIST) or a download into the keras cache (a data set not shipped, or when asked for); a folder of images has only
the first two. Every problem with a file is a DataError naming the file; when nothing is available the DataError
lists each source tried, why it failed, and how to fix it.
"""

import os
from dataclasses import dataclass, replace
from pathlib import Path

from numba_cnn.data import cifar
from numba_cnn.data.cifar import read_cifar
from numba_cnn.data.download import DOWNLOAD_TIMEOUT_S, download_file
from numba_cnn.data.files import (COLS, NPZ_KEYS, ROWS, idx_sha256, read_idx_images, read_idx_labels,
                                  read_mnist_npz)
from numba_cnn.data.folder import SPLITS, read_image_folder
from numba_cnn.errors import DataError
from numba_cnn.kernels.host import as_float_images

ENV_VAR = "NUMBA_CNN_DATA"
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Download:
    """One file of a data set's download: fetched from url into <keras cache>/name, checked against sha256."""

    url: str
    name: str
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """A data set: its images' shape (C, H, W), its class names (label k is class_names[k]), and how it is stored.

    storage: "idx" (the four IDX files of IDX_NAMES, or an npz), "cifar" (CIFAR-10's binary batches, archived or
    extracted) or "folder" (PNG images per class: shape and class names are None and () until a folder is read; the
    LoadedData's dataset holds them). cache_name: its file or folder in the keras cache, None for none; downloads:
    the files that fetch it there, from `address` (a URL, or the folder they share); shipped: the folder of the copy
    inside this package, or None; idx_sha256: {IDX name: SHA-256 of the uncompressed IDX file} of the standard
    release where known (the shipped copy is checked against it; data loaded under another data set's name that
    matches it is refused)."""

    name: str
    title: str
    class_names: tuple
    shape: tuple | None
    storage: str
    cache_name: str | None = None
    downloads: tuple = ()
    address: str | None = None
    shipped: Path | None = None
    idx_sha256: dict | None = None

    @property
    def num_classes(self):
        return len(self.class_names)


SHIPPED_DIR = Path(__file__).parent.parent / "datasets"

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST = Dataset(
    name="mnist", title="MNIST", class_names=tuple(str(digit) for digit in range(10)), shape=(1, ROWS, COLS),
    storage="idx", cache_name="mnist.npz",
    # keras's copy, checked against the SHA-256 keras checks it against
    downloads=(Download(MNIST_URL, "mnist.npz", "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"),),
    address=MNIST_URL,
    shipped=SHIPPED_DIR / "mnist",
    # The four files shipped in numba_cnn/datasets/mnist/; their README.md gives the same table and the provenance.
    idx_sha256={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    })

# Zalando Research's address for the four .gz files (github.com/zalandoresearch/fashion-mnist), and the SHA-256 of
# each .gz as published in tensorflow/datasets, tensorflow_datasets/url_checksums/fashion_mnist.txt. Plain http:
# the hashes are what make the files trustworthy.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST = Dataset(
    name="fashion-mnist", title="Fashion-MNIST",
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
    shape=(1, ROWS, COLS), storage="idx",
    cache_name="fashion-mnist",  # keras keeps the four .gz files in this folder of its cache
    downloads=tuple(Download(f"{FASHION_MNIST_URL}{name}.gz", f"fashion-mnist/{name}.gz", sha256) for name, sha256 in (
        ("train-images-idx3-ubyte", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        ("train-labels-idx1-ubyte", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        ("t10k-images-idx3-ubyte", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        ("t10k-labels-idx1-ubyte", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    )),
    address=FASHION_MNIST_URL)

# Alex Krizhevsky's binary version of CIFAR-10 (www.cs.toronto.edu/~kriz/cifar.html), kept in the keras cache as the
# archive itself, and its SHA-256 as published in tensorflow/datasets, tensorflow_datasets/url_checksums/cifar10.txt
# (170,052,171 bytes). The python version is never used: its batches are pickles.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10 = Dataset(
    name="cifar10", title="CIFAR-10",
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    shape=cifar.SHAPE, storage="cifar", cache_name=cifar.ARCHIVE,
    downloads=(Download(CIFAR10_URL, cifar.ARCHIVE,
                        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),),
    address=CIFAR10_URL)

# The user's own images; only --data (or $NUMBA_CNN_DATA) says where they are.
IMAGE_FOLDER = Dataset(name="folder", title="image folder", class_names=(), shape=None, storage="folder")

DATASETS = {dataset.name: dataset for dataset in (MNIST, FASHION_MNIST, CIFAR10, IMAGE_FOLDER)}

# How each origin of a DataSource reads in messages.
ORIGINS = {"path": "the data path", "env": f"${ENV_VAR}", "cache": "the keras cache",
           "shipped": "the copy shipped with numba_cnn", "download": "the download"}

# What a DataSource of each format is, in messages: "{}" is its path.
FORMATS = {"idx": "IDX files in {}", "npz": "{}", "cifar-tar": "{}", "cifar-bin": "CIFAR-10 batch files in {}",
           "png": "PNG images in {}"}

# What --data may point at for each storage: (the placeholder, what it is).
ACCEPTED_PATHS = {
    "idx": ("DIR", "a folder with the four {title} IDX files, .gz or raw, or an npz with " + ", ".join(NPZ_KEYS)),
    "cifar": ("PATH", f"{cifar.ARCHIVE}, or the {cifar.FOLDER} folder extracted from it"),
    "folder": ("DIR", "a folder with train/<class>/*.png and test/<class>/*.png"),
}


def get_dataset(name):
    """The Dataset called name; a DataError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        *names, last = DATASETS
        raise DataError(f"unknown data set {name!r}: choose {', '.join(names)} or {last}") from None


@dataclass(frozen=True)
class DataSource:
    """Where the data came from. format: a key of FORMATS ("idx": a folder of IDX files, "npz", "cifar-tar":
    CIFAR-10's archive, "cifar-bin": the folder extracted from it, "png": a folder of images per class); origin: a
    key of ORIGINS; url: where origin "download" fetched it from."""

    format: str
    path: Path
    origin: str
    url: str | None = None

    def __str__(self):
        what = FORMATS[self.format].format(self.path)
        frm = f" from {self.url}" if self.url else ""
        return f"{what} ({ORIGINS[self.origin]}{frm})"


class LoadedData(tuple):
    """((x_train, y_train), (x_test, y_test)), unpacks like the plain pair; `.dataset` is the Dataset, `.source`
    the DataSource read, `.sha256` {part name: SHA-256 of that part} (see the module's docstring)."""

    def __new__(cls, train, test, dataset, source, sha256):
        self = super().__new__(cls, (train, test))
        self.dataset, self.source, self.sha256 = dataset, source, sha256
        return self

    def __getnewargs__(self):  # so that pickle (multiprocessing) rebuilds it with its attributes
        return (*self, self.dataset, self.source, self.sha256)

    def record(self):
        """What a run keeps about its data (config.json and the checkpoint): which data set, read from where, the
        SHA-256 of what was read, and the images' shape (C, H, W) and class names, from which a run can rebuild its
        model's input and output."""
        return {"dataset": self.dataset.name, "origin": self.source.origin, "format": self.source.format,
                "path": str(self.source.path), "sha256": dict(self.sha256), "shape": list(self.dataset.shape),
                "class_names": list(self.dataset.class_names)}


def default_cache_dir():
    """The folder keras keeps its data sets in: $KERAS_HOME/datasets, else ~/.keras/datasets."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "datasets"


def load_mnist(path=None, **options):
    """load_dataset(MNIST, path, **options)."""
    return load_dataset(MNIST, path, **options)


def load_dataset(dataset=MNIST.name, path=None, *, cache_dir=None, download=None, normalize=True,
                 timeout=DOWNLOAD_TIMEOUT_S):
    """Load a data set (a name in DATASETS, or a Dataset) as ((x_train, y_train), (x_test, y_test)), a LoadedData.

    path: where the data set is (ACCEPTED_PATHS says what, for each storage); default $NUMBA_CNN_DATA. If either is
    set and unusable, that is the error (no fall-through). Otherwise the data set's file or folder in cache_dir
    (default: the keras cache); then, if download, a download into it, each file checked against its SHA-256; else
    the copy shipped with the package, checked against its SHA-256. download=None: only for a data set that is not
    shipped. A folder of images is read from path or $NUMBA_CNN_DATA only. normalize=False keeps uint8 pixels.
    """
    dataset = get_dataset(dataset) if isinstance(dataset, str) else dataset
    if download is None:
        download = dataset.shipped is None
    if path is not None:
        return _read_source(dataset, _explicit_source(dataset, path, "path"), normalize)
    tried = ["path argument: not given"]
    env_path = os.environ.get(ENV_VAR)
    if env_path:
        return _read_source(dataset, _explicit_source(dataset, env_path, "env"), normalize)
    tried.append(f"${ENV_VAR}: not set")

    if dataset.cache_name is not None:
        cache_dir = Path(cache_dir if cache_dir is not None else default_cache_dir())
        cached = cache_dir / dataset.cache_name
        try:
            return _read_source(dataset, _source_at(dataset, cached, "cache"), normalize)
        except DataError as exc:  # a missing or damaged cache is replaced by the download below
            tried.append(f"keras cache: {exc}")

        if download:
            try:
                for file in dataset.downloads:
                    download_file(file.url, cache_dir / file.name, sha256=file.sha256, timeout=timeout)
                return _read_source(dataset, _source_at(dataset, cached, "download", dataset.address),
                                    normalize)
            except DataError as exc:
                tried.append(f"download: {exc}")
        elif dataset.shipped is not None:
            return _read_shipped(dataset, normalize)
        else:
            tried.append("download: disabled (download=False)")
    raise DataError(f"{dataset.title} data not found. Tried:\n" + "".join(f"  - {t}\n" for t in tried)
                    + _fix_hint(dataset))


def load_for_run(name=None, path=None, *, recorded=None, allow_mismatch=False, **options):
    """The data for a run: the data set `name`, else the one in `recorded`, else MNIST, loaded by load_dataset.

    recorded: the LoadedData.record() of the checkpoint's run (resume, evaluate), or None. The data must be the data
    set it names (checked before anything is read or downloaded) with the SHA-256, shape and class names it lists
    (a record from an older run may lack the last two), unless allow_mismatch.
    -> (LoadedData, a line saying which data set was read from where, and why that one)."""
    if name is not None:
        why = "--dataset"
    elif recorded is not None:
        name, why = recorded.get("dataset"), "as recorded in the checkpoint"
    else:
        name, why = MNIST.name, "the default"
    dataset = get_dataset(name)
    problem = None
    if recorded is not None and recorded.get("dataset") != dataset.name:
        problem = f"the checkpoint's run used data set {recorded.get('dataset')!r}, not {dataset.name!r}"
        _refuse_unless_allowed(problem, allow_mismatch)
    data = load_dataset(dataset, path, **options)
    if recorded is not None and problem is None:
        problem = _difference_from_record(data, recorded)
        _refuse_unless_allowed(problem, allow_mismatch)
    line = f"data: {dataset.title} ({why}), {data.source}"
    if problem:
        line += f"\nwarning: {problem} (--allow-data-mismatch)"
    return data, line


def _refuse_unless_allowed(problem, allow_mismatch):
    if problem and not allow_mismatch:
        raise DataError(f"{problem}; pass --allow-data-mismatch to use it anyway")


def _difference_from_record(data, recorded):
    """How data differs from the data the run that wrote `recorded` read, or None when it does not: its shape, its
    class names (where recorded), then the SHA-256 of each of its parts."""
    differs = f"{data.source} is not the data the checkpoint's run read from {recorded.get('path')}"
    shape = tuple(data.dataset.shape)
    if "shape" in recorded and tuple(recorded["shape"]) != shape:
        return f"{differs}: its images are {shape}, recorded {tuple(recorded['shape'])}"
    names = list(data.dataset.class_names)
    if "class_names" in recorded and list(recorded["class_names"]) != names:
        old = list(recorded["class_names"])
        if len(old) != len(names):
            return f"{differs}: it has {len(names)} classes, recorded {len(old)}"
        k = next(k for k, (new, was) in enumerate(zip(names, old)) if new != was)
        return f"{differs}: class {k} is {names[k]!r}, recorded {old[k]!r}"
    expected = recorded.get("sha256") or {}
    differing = [name for name in data.sha256 if expected.get(name) != data.sha256[name]]
    if not differing:
        return None
    name = differing[0]
    return (f"{differs}: {', '.join(differing)} differ ({name}: SHA-256 {data.sha256[name]}, recorded "
            f"{expected.get(name)})")


def _fix_hint(dataset):
    placeholder, accepted = ACCEPTED_PATHS[dataset.storage]
    accepted = accepted.format(title=dataset.title)
    if dataset.cache_name is None:
        return f"To fix: pass --data {placeholder} ({accepted}), or set {ENV_VAR} to one."
    otherwise = ("leave out --download to use the copy shipped with numba_cnn" if dataset.shipped is not None
                 else f"allow the download (network access to {dataset.address})")
    return f"To fix: pass --data {placeholder} ({accepted}), set {ENV_VAR} to one, or {otherwise}."


def _explicit_source(dataset, path, origin):
    """Resolve a user-given path to a DataSource, or raise a DataError saying why it cannot be used and what can."""
    try:
        return _source_at(dataset, Path(path).expanduser(), origin)
    except DataError as exc:
        accepted = ACCEPTED_PATHS[dataset.storage][1].format(title=dataset.title)
        if dataset.cache_name is None:
            raise DataError(f"{exc}. Point --data (or ${ENV_VAR}) at {accepted}.") from None
        fallback = "the copy shipped with numba_cnn" if dataset.shipped is not None else "the download"
        raise DataError(f"{exc}. Point --data (or ${ENV_VAR}) at {accepted}; or leave both unset to use the keras "
                        f"cache or {fallback}.") from None


def _source_at(dataset, path, origin, url=None):
    """The DataSource at path (a folder, or a file: an npz, or CIFAR-10's archive); a DataError saying why not."""
    where = f"{path}: {ORIGINS[origin]}"
    if path.is_dir():
        format, found = _find_in_folder(dataset, path, where)
        return DataSource(format, found, origin, url)
    if path.is_file():
        if dataset.storage == "folder":
            raise DataError(f"{where} is a file, not a folder with train/ and test/")
        # a file must be the data set's one-file form; its reader says if it is not
        return DataSource("npz" if dataset.storage == "idx" else "cifar-tar", path, origin, url)
    raise DataError(f"{where} does not exist")


def _find_in_folder(dataset, folder, where):
    """(format, path) of the data set in folder; a DataError (starting with `where`) naming what is missing.

    idx: the four IDX files, or only <name>.npz; cifar: the six batch files, in folder or in its
    cifar-10-batches-bin/, or else the archive; folder: train/ and test/."""
    if dataset.storage == "folder":
        missing = [f"{split}/" for split in SPLITS if not (folder / split).is_dir()]
        if missing:
            raise DataError(f"{where} is a folder without {' or '.join(missing)}; expected "
                            f"{folder}/train/<class>/*.png and {folder}/test/<class>/*.png")
        return "png", folder
    if dataset.storage == "cifar":
        batches = folder / cifar.FOLDER if (folder / cifar.FOLDER).is_dir() else folder
        missing = [name for name in cifar.BATCHES if not (batches / name).is_file()]
        if not missing:
            return "cifar-bin", batches
        if (folder / cifar.ARCHIVE).is_file():
            return "cifar-tar", folder / cifar.ARCHIVE
        raise DataError(f"{where} is a folder without {cifar.ARCHIVE} or the CIFAR-10 batch file(s) "
                        f"{', '.join(missing)}" + (f" in {batches}" if batches != folder else ""))
    missing = [name for name in IDX_NAMES.values() if _idx_file(folder, name) is None]
    if not missing:
        return "idx", folder
    npz = folder / f"{dataset.name}.npz"
    if len(missing) == len(IDX_NAMES) and npz.is_file():
        return "npz", npz
    raise DataError(f"{where} is a folder without the {dataset.title} IDX file(s) {', '.join(missing)} (each may "
                    f"be raw or .gz)")


def _idx_file(folder, name):
    """The raw or gzipped file for one IDX name in folder, raw preferred (faster), or None."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_shipped(dataset, normalize):
    """The copy inside the package; each file's content is checked against dataset.idx_sha256 before use."""
    try:
        data = _read_source(dataset, _source_at(dataset, dataset.shipped, "shipped"), normalize)
        for name, expected in dataset.idx_sha256.items():
            if data.sha256[name] != expected:
                raise DataError(f"{_idx_file(dataset.shipped, name)}: damaged: the SHA-256 of its content is "
                                f"{data.sha256[name]}, expected {expected}")
    except DataError as exc:
        raise DataError(f"the {dataset.title} copy shipped with numba_cnn is damaged: {exc}. Reinstall numba_cnn, "
                        f"or pass --data DIR") from None
    return data


def _read_source(dataset, source, normalize):
    """The data at source read as dataset -> LoadedData, images (N, C, H, W); a folder's shape and class names go
    into the LoadedData's dataset."""
    if dataset.storage == "idx":
        x_train, y_train, x_test, y_test, sha256 = _read_idx_source(dataset, source)
    elif dataset.storage == "cifar":
        x_train, y_train, x_test, y_test, sha256 = read_cifar(source.path, source.format)
    else:
        x_train, y_train, x_test, y_test, class_names, sha256 = read_image_folder(source.path)
        dataset = replace(dataset, class_names=class_names, shape=x_train.shape[1:])
    return LoadedData((_to_model_images(x_train, normalize), y_train),
                      (_to_model_images(x_test, normalize), y_test), dataset, source, sha256)


def _read_idx_source(dataset, source):
    """The four IDX files or the npz at source -> (x_train, y_train, x_test, y_test, {IDX name: SHA-256}), images
    (N, 1, 28, 28); refused when the hashes say it is another data set."""
    if source.format == "idx":
        files = {key: _idx_file(source.path, name) for key, name in IDX_NAMES.items()}
        x_train = read_idx_images(files["train_images"])
        y_train = read_idx_labels(files["train_labels"])
        x_test = read_idx_images(files["test_images"])
        y_test = read_idx_labels(files["test_labels"])
        _check_same_count(x_train, y_train, files["train_images"], files["train_labels"])
        _check_same_count(x_test, y_test, files["test_images"], files["test_labels"])
    else:
        x_train, y_train, x_test, y_test = read_mnist_npz(source.path)
    parts = (x_train, y_train, x_test, y_test)
    sha256 = {name: idx_sha256(array) for name, array in zip(IDX_NAMES.values(), parts)}
    for other in DATASETS.values():
        if other.name != dataset.name and other.idx_sha256 == sha256:
            raise DataError(f"{source.path}: holds {other.title}, not {dataset.title} (the SHA-256 of its files are "
                            f"{other.title}'s); use --dataset {other.name}, or point --data at {dataset.title}")
    return (x_train.reshape(-1, 1, ROWS, COLS), y_train, x_test.reshape(-1, 1, ROWS, COLS), y_test, sha256)


def _check_same_count(images, labels, images_path, labels_path):
    if len(images) != len(labels):
        raise DataError(f"{images_path}: holds {len(images)} images but {labels_path} holds {len(labels)} labels")


def _to_model_images(images, normalize):
    """(N, C, H, W) uint8 -> float32 pixel/255, or left uint8."""
    return as_float_images(images) if normalize else images
