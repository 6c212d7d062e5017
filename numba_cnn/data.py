"""MNIST loader: the four IDX files (gzipped or raw) or a keras-style mnist.npz, with a verified download.

load_mnist() returns ((x_train, y_train), (x_test, y_test)): images float32 (N, 1, 28, 28) in [0, 1] (or the raw
uint8 pixels with normalize=False), labels uint8 (N,). The result also carries `.source`, saying where it came from.

Sources, in order: an explicit path (else $NUMBA_CNN_DATA), the keras cache file, a download into that cache.
Every problem with a file is a DataError naming the file; when nothing is available the DataError lists each
source tried, why it failed, and how to fix it. Standard library and numpy only.
"""

import gzip
import hashlib
import http.client
import math
import os
import struct
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from numba_cnn.atomic import atomic_write
from numba_cnn.errors import DataError
from numba_cnn.layers import as_float_images

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
# The hash keras checks for that file.
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
ENV_VAR = "NUMBA_CNN_DATA"
NPZ_NAME = "mnist.npz"
ROWS = COLS = 28
PIXELS = ROWS * COLS

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

DOWNLOAD_TIMEOUT_S = 30  # per connect / per read
DOWNLOAD_DEADLINE_S = 600  # whole transfer; a server trickling bytes must not hang training forever
DOWNLOAD_MAX_BYTES = 100 * 2**20  # the real file is 11.5 MB; refuse to fill the disk from a misbehaving server
CHUNK = 1 << 20

FIX_HINT = ("To fix: pass --data DIR (a folder with the four MNIST IDX files, .gz or raw, or a keras mnist.npz), "
            f"set {ENV_VAR} to one, or allow the download (network access to {MNIST_URL}).")

EXPLICIT_FIX_HINT = ("Point --data (or $NUMBA_CNN_DATA) at a folder with the four MNIST IDX files, .gz or raw, or at a "
                     "keras mnist.npz; or leave both unset to use the keras cache or the download.")

# What a corrupt gzip or zip can raise from deep inside the standard library; all become DataError.
# (NotImplementedError: an unsupported compression method; RuntimeError: an encrypted member.)
_DECODE_ERRORS = (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile, struct.error, NotImplementedError,
                  RuntimeError, OverflowError)


@dataclass(frozen=True)
class MnistSource:
    """Where the data came from. format: "idx" (a folder of IDX files) or "npz"; origin: "path" (the argument),
    "env" ($NUMBA_CNN_DATA), "cache" (keras cache file) or "download" (fetched into the cache just now)."""

    format: str
    path: Path
    origin: str
    url: str | None = None  # for origin "download"

    def __str__(self):
        what = f"IDX files in {self.path}" if self.format == "idx" else str(self.path)
        how = {"path": "given path", "env": f"${ENV_VAR}", "cache": "keras cache",
               "download": f"downloaded from {self.url}"}[self.origin]
        return f"{what} ({how})"


class MnistData(tuple):
    """((x_train, y_train), (x_test, y_test)), unpacks like the plain pair; `.source` is the MnistSource read."""

    def __new__(cls, train, test, source):
        self = super().__new__(cls, (train, test))
        self.source = source
        return self

    def __getnewargs__(self):  # so that pickle (multiprocessing) rebuilds it with its source
        return (*self, self.source)


def default_cache_dir():
    """The folder keras keeps mnist.npz in: $KERAS_HOME/datasets, else ~/.keras/datasets."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "datasets"


def load_mnist(path=None, *, cache_dir=None, url=MNIST_URL, sha256=MNIST_SHA256, download=True, normalize=True,
               timeout=DOWNLOAD_TIMEOUT_S):
    """Load MNIST as ((x_train, y_train), (x_test, y_test)); the result's `.source` says where it came from.

    path: a folder of the four IDX files (.gz or raw) or a keras mnist.npz; default $NUMBA_CNN_DATA. If either is
    set and unusable, that is the error (no fall-through). Otherwise cache_dir/mnist.npz (default: the keras cache),
    else download url into it, checked against sha256 (None skips the check). normalize=False keeps uint8 pixels.
    """
    tried = []
    if path is not None:
        return _read_source(_explicit_source(path, "path"), normalize)
    tried.append("path argument: not given")
    env_path = os.environ.get(ENV_VAR)
    if env_path:
        return _read_source(_explicit_source(env_path, "env"), normalize)
    tried.append(f"${ENV_VAR}: not set")

    cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / NPZ_NAME
    if cache_file.is_file():
        try:
            return _read_source(MnistSource("npz", cache_file, "cache"), normalize)
        except DataError as exc:  # a damaged cache is replaced by a fresh download below
            tried.append(f"keras cache: {exc}")
    else:
        tried.append(f"keras cache {cache_file}: no such file")

    if not download:
        tried.append(f"download from {url}: disabled (download=False)")
    else:
        try:
            download_file(url, cache_file, sha256=sha256, timeout=timeout)
            return _read_source(MnistSource("npz", cache_file, "download", url), normalize)
        except DataError as exc:
            tried.append(f"download: {exc}")
    raise DataError("MNIST data not found. Tried:\n" + "".join(f"  - {t}\n" for t in tried) + FIX_HINT)


def _explicit_source(path, origin):
    """Resolve a user-given path to a MnistSource, or raise a DataError saying why it cannot be used."""
    label = "the data path" if origin == "path" else f"${ENV_VAR}"
    p = Path(path).expanduser()
    if p.is_dir():
        missing = [n for n in IDX_NAMES.values() if _idx_file(p, n) is None]
        if not missing:
            return MnistSource("idx", p, origin)
        if len(missing) == len(IDX_NAMES) and (p / NPZ_NAME).is_file():
            return MnistSource("npz", p / NPZ_NAME, origin)
        raise DataError(f"{p}: {label} is a folder without the MNIST IDX file(s) {', '.join(missing)} "
                        f"(each may be raw or .gz). {EXPLICIT_FIX_HINT}")
    if p.is_file():
        return MnistSource("npz", p, origin)  # anything other than a folder must be an npz; the reader says if not
    raise DataError(f"{p}: {label} does not exist. {EXPLICIT_FIX_HINT}")


def _idx_file(folder, name):
    """The raw or gzipped file for one IDX name in folder, raw preferred (faster), or None."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_source(source, normalize):
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
    return MnistData((_to_model_images(x_train, normalize), y_train),
                     (_to_model_images(x_test, normalize), y_test), source)


def _check_same_count(images, labels, images_path, labels_path):
    if len(images) != len(labels):
        raise DataError(f"{images_path}: holds {len(images)} images but {labels_path} holds {len(labels)} labels")


def _to_model_images(images, normalize):
    """(N, 28, 28) uint8 -> (N, 1, 28, 28), float32 pixel/255 or left uint8."""
    images = images.reshape(len(images), 1, ROWS, COLS)
    return as_float_images(images) if normalize else images


# ---------------------------------------------------------------------------------------------------------------
# IDX files


def read_idx_images(path):
    """An IDX image file (raw, or gzip if named .gz) -> uint8 (N, 28, 28); DataError if anything is off."""
    path = Path(path)

    def body_size(header):
        count, rows, cols = struct.unpack(">III", header[4:16])
        if (rows, cols) != (ROWS, COLS):
            raise DataError(f"{path}: images are {rows}x{cols}, expected {ROWS}x{COLS}")
        if count == 0:
            raise DataError(f"{path}: holds no images (the header count is 0)")
        return count * PIXELS, f"{count} images of {ROWS}x{COLS}"

    pixels = _read_idx(path, IMAGES_MAGIC, 16, "images", body_size)
    return pixels.reshape(-1, ROWS, COLS)


def read_idx_labels(path):
    """An IDX label file (raw, or gzip if named .gz) -> uint8 (N,) with values 0..9; DataError otherwise."""
    path = Path(path)

    def body_size(header):
        (count,) = struct.unpack(">I", header[4:8])
        if count == 0:
            raise DataError(f"{path}: holds no labels (the header count is 0)")
        return count, f"{count} labels"

    labels = _read_idx(path, LABELS_MAGIC, 8, "labels", body_size)
    _check_labels(labels, path)
    return labels


def _check_labels(labels, where):
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{where}: label {int(labels[bad])} at index {bad} is not a digit 0..9")


def _read_idx(path, magic, header_size, kind, body_size):
    """The body of an IDX file as a writable uint8 array, after checking the magic number, and through
    body_size(header) -> (nbytes, description) the dimensions, and that the file holds exactly that many bytes."""
    gzipped = path.suffix == ".gz"
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with raw:
        if gzipped and raw.read(2) != b"\x1f\x8b":
            raise DataError(f"{path}: named .gz but is not gzip data")
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        container = "gzip" if gzipped else "IDX file"
        header = _read_exactly(stream, header_size, path, container)
        if len(header) >= 4:  # the magic first: a file of the wrong kind is the likelier mistake than truncation
            found = struct.unpack(">I", header[:4])[0]
            if found != magic:
                other = {IMAGES_MAGIC: "an IDX images file", LABELS_MAGIC: "an IDX labels file"}.get(found)
                hint = f" (this is {other})" if other else ""
                raise DataError(f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x} for IDX "
                                f"{kind}{hint}")
        if len(header) < header_size:
            raise DataError(f"{path}: truncated: {len(header)} bytes, shorter than the {header_size}-byte IDX "
                            f"{kind} header")
        nbytes, what = body_size(header)
        expected = header_size + nbytes
        if not gzipped:  # the size is known up front: do not read a file that cannot match
            size = os.fstat(raw.fileno()).st_size
            if size != expected:
                _size_error(path, what, expected, size)
        data = _read_exactly(stream, nbytes + 1, path, container)  # one byte more tells an overlong file
        if len(data) > nbytes:
            _size_error(path, what, expected, None)
        if len(data) < nbytes:
            _size_error(path, what, expected, header_size + len(data))
    return np.frombuffer(data, dtype=np.uint8)


def _size_error(path, what, expected, found):
    if found is None:
        raise DataError(f"{path}: overlong: extra data after the {what} ({expected} bytes) the header declares")
    if found < expected:
        raise DataError(f"{path}: truncated: the header declares {what} ({expected} bytes) but the file holds "
                        f"{found} bytes")
    raise DataError(f"{path}: overlong: {found} bytes, but the header declares {what} ({expected} bytes)")


def _read_exactly(stream, nbytes, where, container):
    """Up to nbytes from stream (fewer only at its end) as a writable bytearray; in chunks, because a bogus header
    may claim terabytes and a single read(n) would try to allocate them. Decoding errors become DataError."""
    out = bytearray()
    try:
        while len(out) < nbytes:
            chunk = stream.read(min(CHUNK, nbytes - len(out)))
            if not chunk:
                break
            out += chunk
    except EOFError:
        raise DataError(f"{where}: truncated {container} data (the compressed stream ends early)") from None
    except (OSError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: corrupt {container} data ({exc})") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# keras-style npz


def read_mnist_npz(path):
    """A keras-style mnist.npz -> (x_train, y_train, x_test, y_test), uint8, images (N, 28, 28), labels (N,).

    Read through zipfile and the .npy header rather than np.load, so that shapes and dtypes are checked before any
    array is allocated (a corrupt header could claim an enormous one) and no pickle is ever loaded."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise DataError(f"{path}: not an npz file (no zip signature); expected a keras-style mnist.npz or "
                                "a folder of IDX files")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name[:-4] if name.endswith(".npy") else name: name for name in archive.namelist()}
            missing = [k for k in NPZ_KEYS if k not in members]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(members) or 'none'}; "
                                f"needs {', '.join(NPZ_KEYS)})")
            arrays = {k: _read_npy_member(archive, members[k], path, k) for k in NPZ_KEYS}
    except DataError:
        raise
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: corrupt npz archive ({type(exc).__name__}: {exc})") from None

    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or images.shape[1:] != (ROWS, COLS):
            raise DataError(f"{path}: x_{split} has shape {images.shape}, expected (N, {ROWS}, {COLS})")
        if labels.ndim != 1:
            raise DataError(f"{path}: y_{split} has shape {labels.shape}, expected (N,)")
        if len(images) == 0:
            raise DataError(f"{path}: x_{split} holds no images")
        if len(images) != len(labels):
            raise DataError(f"{path}: x_{split} holds {len(images)} images but y_{split} holds {len(labels)} labels")
        _check_labels(labels, f"{path} (y_{split})")
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def _read_npy_member(archive, name, path, key):
    """One uint8 array from an .npy inside the zip, header checked before the data is read."""
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise DataError(f"{path}: {key} uses .npy format version {version}, expected 1.0 or 2.0")
        if dtype != np.uint8:
            raise DataError(f"{path}: {key} has dtype {dtype}, expected uint8")
        if len(shape) not in (1, 3):
            raise DataError(f"{path}: {key} has shape {shape}, expected (N, {ROWS}, {COLS}) or (N,)")
        nbytes = math.prod(shape)  # Python ints: a bogus header must not overflow
        data = _read_exactly(member, nbytes + 1, f"{path} ({key})", "zip")
        if len(data) != nbytes:
            state = "truncated" if len(data) < nbytes else "overlong"
            raise DataError(f"{path}: {key} is {state}: its header declares shape {shape} ({nbytes} bytes)")
    array = np.frombuffer(data, dtype=np.uint8)
    return array.reshape(shape, order="F" if fortran_order else "C")


# ---------------------------------------------------------------------------------------------------------------
# download


def download_file(url, dest, *, sha256=None, timeout=DOWNLOAD_TIMEOUT_S):
    """Fetch url into dest atomically: streamed into a temporary file beside dest, checked against sha256 (if
    given), flushed and fsynced, then renamed over dest. On any failure no file (final or temporary) is left."""
    dest = Path(dest)

    def fetch_and_check(out):
        digest = _stream_to(url, out, timeout)
        if sha256 is not None and digest != sha256.lower():
            raise DataError(f"{url}: SHA-256 mismatch: got {digest}, expected {sha256} (nothing saved)")

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, fetch_and_check)
    except OSError as exc:  # a local write error: disk full, permissions
        raise DataError(f"{dest}: cannot save the download ({exc})") from None


def _stream_to(url, out, timeout):
    """Copy the body at url into the open file out; returns its SHA-256 hex digest. Network errors -> DataError;
    write errors on out are left as OSError for the caller."""
    digest = hashlib.sha256()
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    received = 0
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: HTTP error {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"{url}: cannot connect ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"{url}: cannot connect ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:  # a malformed URL
        raise DataError(f"{url}: bad URL ({exc})") from None
    with response:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a body cut short
                raise DataError(f"{url}: download failed after {received} bytes "
                                f"({type(exc).__name__}: {exc})") from None
            if not chunk:
                break
            received += len(chunk)
            if received > DOWNLOAD_MAX_BYTES:
                raise DataError(f"{url}: more than {DOWNLOAD_MAX_BYTES} bytes, too large for an MNIST npz")
            if time.monotonic() > deadline:
                raise DataError(f"{url}: download took longer than {DOWNLOAD_DEADLINE_S} s")
            digest.update(chunk)
            out.write(chunk)
        # read(n) just returns b"" when the connection drops early, so the declared length is checked here.
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != received:
            raise DataError(f"{url}: download cut short: received {received} of {declared} bytes")
    return digest.hexdigest()
