"""CIFAR-10's binary version: the archive cifar-10-binary.tar.gz, or the folder cifar-10-batches-bin/ extracted
from it. Each batch file is a run of 3073-byte records, one label byte then 32x32 pixels of red, of green, then of
blue (row-major); data_batch_1..5.bin are the training set, test_batch.bin the test set.

The archive is read in memory, by exact member name, in one pass; nothing is extracted to disk and no other member
is read (the python version's pickles are never involved). Every size is checked before the bytes are used.
"""

import gzip
import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np

from numba_cnn.data.files import DECODE_ERRORS, READ_CHUNK, check_labels, read_exactly
from numba_cnn.errors import DataError

SHAPE = (3, 32, 32)
NUM_CLASSES = 10
RECORD_BYTES = 1 + SHAPE[0] * SHAPE[1] * SHAPE[2]  # the label byte, then the pixels
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BATCH = "test_batch.bin"
BATCHES = TRAIN_BATCHES + (TEST_BATCH,)
FOLDER = "cifar-10-batches-bin"  # the archive's one folder, holding the batch files
ARCHIVE = "cifar-10-binary.tar.gz"
MAX_BATCH_RECORDS = 60_000  # the real batches hold 10,000 records; a file of more is not CIFAR-10


def read_cifar(path, format):
    """The CIFAR-10 data at path, format "cifar-tar" (the archive) or "cifar-bin" (the extracted folder) ->
    (x_train, y_train, x_test, y_test, sha256): images uint8 (N, 3, 32, 32), labels uint8 (N,), and
    {batch file name: SHA-256 of its bytes}, the same whether read from the archive or the folder."""
    contents = _read_archive(path) if format == "cifar-tar" else _read_folder(path)
    sha256 = {name: hashlib.sha256(contents[name]).hexdigest() for name in BATCHES}
    splits = []
    for names in (TRAIN_BATCHES, (TEST_BATCH,)):
        images = np.empty((sum(len(contents[name]) for name in names) // RECORD_BYTES, *SHAPE), dtype=np.uint8)
        labels = np.empty(len(images), dtype=np.uint8)
        start = 0
        for name in names:  # each batch straight into its place in the split, then let go of its bytes
            where = Path(path) / name if format == "cifar-bin" else f"{path}: {FOLDER}/{name}"
            check_batch_size(len(contents[name]), where)
            records = np.frombuffer(contents.pop(name), dtype=np.uint8).reshape(-1, RECORD_BYTES)
            end = start + len(records)
            labels[start:end] = records[:, 0]
            check_labels(labels[start:end], where, NUM_CLASSES)
            images[start:end] = records[:, 1:].reshape(-1, *SHAPE)
            start = end
        splits += [images, labels]
    return (*splits, sha256)


def check_batch_size(nbytes, where):
    """A DataError unless nbytes is a whole number of records, at least one and at most MAX_BATCH_RECORDS."""
    if nbytes == 0:
        raise DataError(f"{where}: holds no records (0 bytes)")
    if nbytes % RECORD_BYTES:
        raise DataError(f"{where}: {nbytes} bytes is not a whole number of {RECORD_BYTES}-byte records (1 label "
                        f"byte and {RECORD_BYTES - 1} pixel bytes each): truncated or not a CIFAR-10 batch file")
    if nbytes > MAX_BATCH_RECORDS * RECORD_BYTES:
        raise DataError(f"{where}: {nbytes // RECORD_BYTES} records, more than the {MAX_BATCH_RECORDS} a CIFAR-10 "
                        f"batch file can hold")


def _read_folder(folder):
    """{batch name: bytes} of the six batch files in folder (the extracted cifar-10-batches-bin/)."""
    contents = {}
    for name in BATCHES:
        path = Path(folder) / name
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            check_batch_size(size, path)  # before reading: a file that cannot be a batch is not read at all
            contents[name] = read_exactly(f, size, path, "CIFAR-10 batch file")
    return contents


def _read_archive(path):
    """{batch name: bytes} of the six batch files in the archive at path, each read by its exact member name in
    one pass over the archive; other members are skipped unread. The gzip stream is then read to its end, so that
    its checksum and length are checked too."""
    wanted = {f"{FOLDER}/{name}": name for name in BATCHES}
    contents = {}
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        with raw:
            if raw.read(2) != b"\x1f\x8b":
                raise DataError(f"{path}: not a gzip file; expected {ARCHIVE} (the binary version of CIFAR-10) or "
                                f"the {FOLDER} folder extracted from it")
            raw.seek(0)
            unzipped = gzip.GzipFile(fileobj=raw, mode="rb")
            with unzipped, tarfile.open(fileobj=unzipped, mode="r:") as archive:
                for member in archive:
                    name = wanted.get(member.name)
                    if name is None:
                        continue
                    where = f"{path}: {member.name}"
                    if not member.isreg():
                        raise DataError(f"{where}: not a regular file in the archive")
                    if name in contents:
                        raise DataError(f"{where}: appears twice in the archive")
                    check_batch_size(member.size, where)
                    content = read_exactly(archive.extractfile(member), member.size, where, "archive")
                    if len(content) != member.size:
                        raise DataError(f"{where}: truncated: {len(content)} of its {member.size} bytes")
                    contents[name] = content
                while unzipped.read(READ_CHUNK):  # the end of the archive: checks the gzip CRC and length
                    pass
    except DataError:
        raise
    except (tarfile.TarError, *DECODE_ERRORS) as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from None
    missing = [name for name in BATCHES if name not in contents]
    if missing:
        raise DataError(f"{path}: the archive has no {', '.join(f'{FOLDER}/{name}' for name in missing)} "
                        f"(truncated, or not {ARCHIVE})")
    return contents
