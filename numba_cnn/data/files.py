"""The files MNIST-style data sets come in: IDX files (raw or gzipped) and keras-style npz archives, read with every
size and header checked; the SHA-256 that identifies IDX content whatever held it; and the bounded reading and the
label check that the other readers share."""

import gzip
import hashlib
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from numba_cnn.errors import DataError

ROWS = COLS = 28
PIXELS = ROWS * COLS

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
READ_CHUNK = 1 << 20  # bytes per read of a compressed file
READ_BUFFER_BYTES = 1 << 30  # the most one read buffer holds (see read_exactly)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# What a corrupt gzip or zip can raise from deep inside the standard library; all become DataError.
# (NotImplementedError: an unsupported compression method; RuntimeError: an encrypted member.)
DECODE_ERRORS = (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile, struct.error, NotImplementedError,
                 RuntimeError, OverflowError)


def idx_sha256(array):
    """The SHA-256 of uint8 images (N, 28, 28) or labels (N,) written as an IDX file: the hash of the uncompressed
    IDX file they were read from, and the same for the same data read from an npz."""
    if array.ndim == 3:
        header = struct.pack(">IIII", IMAGES_MAGIC, *array.shape)
    else:
        header = struct.pack(">II", LABELS_MAGIC, len(array))
    digest = hashlib.sha256(header)
    digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()




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
    check_labels(labels, path)
    return labels


def check_labels(labels, where, num_classes=10):
    """A DataError naming the first label that is not a class number 0..num_classes-1."""
    if labels.size and labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(f"{where}: label {int(labels[bad])} at index {bad} is not a class number "
                        f"0..{num_classes - 1}")


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
        header = read_exactly(stream, header_size, path, container)
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
        data = read_exactly(stream, nbytes + 1, path, container)  # one byte more tells an overlong file
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


def read_exactly(stream, nbytes, where, container):
    """Up to nbytes from stream (fewer only at its end) as a writable memoryview of uint8. Read in chunks into
    buffers allocated once: numpy leaves an allocation's pages unmapped until they are written, so a bogus header
    that claims terabytes costs address space, not memory, and a file read whole leaves no freed copies behind (a
    growing bytearray left about its own size of freed heap, which the training run's malloc settings keep).
    Buffers hold at most READ_BUFFER_BYTES each. Decoding errors become DataError."""
    buffers, filled = [], 0
    try:
        while filled < nbytes:
            buffer = np.empty(min(READ_BUFFER_BYTES, nbytes - filled), np.uint8)
            buffers.append(buffer)
            got = _read_into(stream, memoryview(buffer))
            filled += got
            if got < len(buffer):
                buffers[-1] = buffer[:got]
                break
    except EOFError:
        raise DataError(f"{where}: truncated {container} data (the compressed stream ends early)") from None
    except (OSError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: corrupt {container} data ({exc})") from None
    if len(buffers) == 1:
        return memoryview(buffers[0])
    return memoryview(np.concatenate(buffers) if buffers else np.empty(0, np.uint8))


def _read_into(stream, view):
    """Fill view from stream in READ_CHUNK reads -> the bytes read (fewer than len(view) only at the end)."""
    filled = 0
    while filled < len(view):
        got = stream.readinto(view[filled:filled + READ_CHUNK])
        if not got:
            break
        filled += got
    return filled


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
    except DECODE_ERRORS as exc:
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
        check_labels(labels, f"{path} (y_{split})")
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
        data = read_exactly(member, nbytes + 1, f"{path} ({key})", "zip")
        if len(data) != nbytes:
            state = "truncated" if len(data) < nbytes else "overlong"
            raise DataError(f"{path}: {key} is {state}: its header declares shape {shape} ({nbytes} bytes)")
    array = np.frombuffer(data, dtype=np.uint8)
    return array.reshape(shape, order="F" if fortran_order else "C")


