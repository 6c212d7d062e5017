"""The data loader: IDX and npz reading, validation, source order, the shipped MNIST copy and its hashes,
Fashion-MNIST by name, the verified download, the run's data record, and fuzzing.

Every file is written by the test into tmp_path, except the shipped MNIST copy, which the package holds; the download
tests use a local HTTP server on 127.0.0.1. The one test on a separate copy of MNIST reads $NUMBA_CNN_DATA and is
skipped when that is not set.
"""

import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import threading
import urllib.parse
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numba_cnn.data import (FASHION_MNIST, MNIST, Download, LoadedData, get_dataset, idx_sha256, load_dataset,
                            load_for_run, load_mnist, read_idx_images, read_idx_labels, read_mnist_npz)
from numba_cnn.errors import DataError

# Read before the autouse fixture below clears it for every test.
REAL_DATA = os.environ.get("NUMBA_CNN_DATA")

N_TRAIN, N_TEST = 12, 5
IMAGES, LABELS = "images", "labels"


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """No test sees the user's data settings or keras cache, and none can reach beyond 127.0.0.1."""
    monkeypatch.delenv("NUMBA_CNN_DATA", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    real_urlopen = urllib.request.urlopen

    def local_only_urlopen(url, *args, **kwargs):
        host = urllib.parse.urlsplit(url if isinstance(url, str) else url.full_url).hostname
        assert host == "127.0.0.1", f"test tried to reach the network: {url}"
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only_urlopen)


# ---------------------------------------------------------------------------------------------------------------
# building small valid data sets


def sample_split(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the pixel range present
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


TRAIN = sample_split(N_TRAIN, 1)
TEST = sample_split(N_TEST, 2)


def idx_images(images, magic=0x803):
    n, rows, cols = images.shape
    return struct.pack(">IIII", magic, n, rows, cols) + images.tobytes()


def idx_labels(labels, magic=0x801):
    return struct.pack(">II", magic, len(labels)) + labels.tobytes()


def idx_file_bytes():
    """The four IDX files of the sample set, by standard name, uncompressed."""
    return {
        "train-images-idx3-ubyte": idx_images(TRAIN[0]),
        "train-labels-idx1-ubyte": idx_labels(TRAIN[1]),
        "t10k-images-idx3-ubyte": idx_images(TEST[0]),
        "t10k-labels-idx1-ubyte": idx_labels(TEST[1]),
    }


def write_idx_folder(folder, gz, replace=None):
    """Write the sample set as IDX files (gzipped or raw); replace maps a base name to other (raw) bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, content in {**idx_file_bytes(), **(replace or {})}.items():
        path = folder / (name + ".gz" if gz else name)
        path.write_bytes(gzip.compress(content) if gz else content)
        paths[name] = path
    return paths


def npz_bytes(compressed=True, **overrides):
    """A keras-style mnist.npz of the sample set; overrides replace (or, with None, drop) arrays."""
    arrays = {"x_train": TRAIN[0], "y_train": TRAIN[1], "x_test": TEST[0], "y_test": TEST[1], **overrides}
    buffer = io.BytesIO()
    save = np.savez_compressed if compressed else np.savez
    save(buffer, **{k: v for k, v in arrays.items() if v is not None})
    return buffer.getvalue()


def assert_is_sample_set(result, normalize=True):
    (x_train, y_train), (x_test, y_test) = result
    for x, y, (images, labels) in ((x_train, y_train, TRAIN), (x_test, y_test, TEST)):
        assert x.shape == (len(images), 1, 28, 28)
        assert y.shape == (len(labels),) and y.dtype == np.uint8
        np.testing.assert_array_equal(y, labels)
        if normalize:
            assert x.dtype == np.float32
            assert x.min() == 0.0 and x.max() == 1.0
            np.testing.assert_array_equal(x[:, 0], images.astype(np.float32) / np.float32(255))
        else:
            assert x.dtype == np.uint8
            np.testing.assert_array_equal(x[:, 0], images)


# ---------------------------------------------------------------------------------------------------------------
# good loads


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_idx_folder_loads_scaled_images_and_labels(tmp_path, gz):
    write_idx_folder(tmp_path, gz)
    result = load_mnist(tmp_path, download=False)
    assert_is_sample_set(result)
    assert isinstance(result, LoadedData)
    assert (result.source.format, result.source.path, result.source.origin) == ("idx", tmp_path, "path")
    assert str(tmp_path) in str(result.source)
    copy = pickle.loads(pickle.dumps(result))  # e.g. handed to a worker process
    assert (copy.dataset, copy.source, copy.sha256) == (result.dataset, result.source, result.sha256)
    assert_is_sample_set(copy)


def test_idx_folder_may_mix_gzipped_and_raw_files(tmp_path):
    paths = write_idx_folder(tmp_path, gz=True)
    raw_labels = paths["t10k-labels-idx1-ubyte"].with_suffix("")
    raw_labels.write_bytes(gzip.decompress(paths["t10k-labels-idx1-ubyte"].read_bytes()))
    paths["t10k-labels-idx1-ubyte"].unlink()
    assert_is_sample_set(load_mnist(str(tmp_path), download=False))


def test_normalize_false_keeps_uint8_pixels(tmp_path):
    write_idx_folder(tmp_path, gz=True)
    result = load_mnist(tmp_path, normalize=False, download=False)
    assert_is_sample_set(result, normalize=False)
    assert result[0][0].flags.writeable  # the trainer may work in place


def test_npz_file_loads(tmp_path):
    path = tmp_path / "digits.npz"
    path.write_bytes(npz_bytes())
    result = load_mnist(path, download=False)
    assert_is_sample_set(result)
    assert (result.source.format, result.source.path) == ("npz", path)


def test_folder_holding_only_mnist_npz_loads(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(npz_bytes())
    result = load_mnist(tmp_path, download=False)
    assert_is_sample_set(result, normalize=True)
    assert result.source.path == tmp_path / "mnist.npz"


def test_env_var_is_used_when_no_path_is_given(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "idx", gz=False)
    monkeypatch.setenv("NUMBA_CNN_DATA", str(tmp_path / "idx"))
    result = load_mnist(cache_dir=tmp_path / "cache", download=False)
    assert_is_sample_set(result)
    assert result.source.origin == "env"


def test_explicit_path_wins_over_env_var(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "idx", gz=True)
    monkeypatch.setenv("NUMBA_CNN_DATA", str(tmp_path / "missing"))
    assert load_mnist(tmp_path / "idx", download=False).source.origin == "path"


def test_keras_cache_is_read_when_no_path(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(npz_bytes())
    result = load_mnist(cache_dir=tmp_path, download=False)
    assert_is_sample_set(result)
    assert result.source.origin == "cache"


def test_keras_home_locates_the_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    (tmp_path / "kh" / "datasets").mkdir(parents=True)
    (tmp_path / "kh" / "datasets" / "mnist.npz").write_bytes(npz_bytes())
    result = load_mnist(download=False)
    assert result.source.path == tmp_path / "kh" / "datasets" / "mnist.npz"


# ---------------------------------------------------------------------------------------------------------------
# explicit paths that cannot be used are errors, never a fall-through


def test_missing_explicit_path_is_an_error_even_with_a_cache(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "mnist.npz").write_bytes(npz_bytes())
    with pytest.raises(DataError, match="does not exist") as info:
        load_mnist(tmp_path / "nowhere", cache_dir=tmp_path / "cache", download=False)
    assert str(tmp_path / "nowhere") in str(info.value)
    assert "NUMBA_CNN_DATA" in str(info.value)  # says how to fix it


def test_unusable_env_var_is_an_error_even_with_a_cache(tmp_path, monkeypatch):
    (tmp_path / "mnist.npz").write_bytes(npz_bytes())
    monkeypatch.setenv("NUMBA_CNN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"\$NUMBA_CNN_DATA does not exist"):
        load_mnist(cache_dir=tmp_path, download=False)


def test_folder_missing_some_idx_files_names_them(tmp_path):
    paths = write_idx_folder(tmp_path, gz=True)
    paths["t10k-images-idx3-ubyte"].unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte") as info:
        load_mnist(tmp_path, download=False)
    assert "train-images" not in str(info.value).split("IDX file(s)")[1].split("(")[0]


# ---------------------------------------------------------------------------------------------------------------
# corrupt IDX files


def corrupt_gzip(content):
    """Valid gzip framing around a damaged deflate stream."""
    packed = bytearray(gzip.compress(content))
    for i in range(12, len(packed) - 8, 3):
        packed[i] ^= 0xA5
    return bytes(packed)


IDX_CORRUPTIONS = {
    # case: (file base name, (raw bytes) -> bytes written instead, gzip the result?, expected message)
    "images bad magic": ("train-images-idx3-ubyte", lambda b: b"\x00\x00\x08\x04" + b[4:], True,
                         "bad magic number 0x00000804"),
    "labels file as images": ("t10k-images-idx3-ubyte", lambda b: idx_labels(TEST[1]), False,
                              r"bad magic number 0x00000801.*this is an IDX labels file"),
    "labels bad magic": ("train-labels-idx1-ubyte", lambda b: b"\x00\x00\x09\x01" + b[4:], True,
                         "bad magic number 0x00000901"),
    "images not 28x28": ("train-images-idx3-ubyte",
                         lambda b: idx_images(TRAIN[0].reshape(N_TRAIN, 28, 28)[:, :, :27].copy()), True,
                         "images are 28x27, expected 28x28"),
    "raw images truncated": ("train-images-idx3-ubyte", lambda b: b[:-1], False, "truncated"),
    "raw images overlong": ("train-images-idx3-ubyte", lambda b: b + b"\x00", False, "overlong"),
    "gzipped labels truncated content": ("t10k-labels-idx1-ubyte", lambda b: b[:-2], True, "truncated"),
    "gzipped labels overlong content": ("t10k-labels-idx1-ubyte", lambda b: b + b"\x07", True, "overlong"),
    "header cut short": ("train-labels-idx1-ubyte", lambda b: b[:6], False, "shorter than the 8-byte"),
    "label above 9": ("train-labels-idx1-ubyte", lambda b: b[:-1] + b"\x0a", True, "label 10 at index 11"),
    "fewer labels than images": ("train-labels-idx1-ubyte", lambda b: idx_labels(TRAIN[1][:-1]), True,
                                 "holds 12 images but .*train-labels-idx1-ubyte.* holds 11 labels"),
    "no images": ("t10k-images-idx3-ubyte", lambda b: idx_images(TEST[0][:0]), True, "holds no images"),
}


@pytest.mark.parametrize("case", IDX_CORRUPTIONS)
def test_corrupt_idx_file_raises_data_error_naming_it(tmp_path, case):
    name, mutate, gz, message = IDX_CORRUPTIONS[case]
    write_idx_folder(tmp_path, gz=True)
    (tmp_path / (name + ".gz")).unlink()
    bad = tmp_path / (name + ".gz" if gz else name)
    content = mutate(idx_file_bytes()[name])
    bad.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(DataError, match=message) as info:
        load_mnist(tmp_path, download=False)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("damage, message", [
    (lambda packed: b"not gzip at all, just text", "named .gz but is not gzip data"),
    (lambda packed: packed[: len(packed) // 2], "truncated gzip data"),
    (lambda packed: corrupt_gzip(gzip.decompress(packed)), "corrupt gzip data"),
    (lambda packed: packed[:-8] + bytes(a ^ 1 for a in packed[-8:-4]) + packed[-4:], "corrupt gzip data.*CRC"),
], ids=["not gzip", "truncated gzip", "corrupt deflate", "bad crc"])
def test_damaged_gzip_raises_data_error_naming_the_file(tmp_path, damage, message):
    paths = write_idx_folder(tmp_path, gz=True)
    bad = paths["train-images-idx3-ubyte"]
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DataError, match=message) as info:
        load_mnist(tmp_path, download=False)
    assert str(bad) in str(info.value)


def test_idx_readers_return_the_file_contents(tmp_path):
    (tmp_path / "img").write_bytes(idx_images(TRAIN[0]))
    (tmp_path / "lab.gz").write_bytes(gzip.compress(idx_labels(TRAIN[1])))
    np.testing.assert_array_equal(read_idx_images(tmp_path / "img"), TRAIN[0])
    np.testing.assert_array_equal(read_idx_labels(tmp_path / "lab.gz"), TRAIN[1])


def test_header_claiming_huge_count_is_reported_without_allocating_it(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 0xFFFFFFFF, 28, 28) + bytes(784 * 3)))
    with pytest.raises(DataError, match="truncated: the header declares 4294967295 images"):
        read_idx_images(path)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_spanning_several_buffers_and_chunks_keep_every_byte(tmp_path, monkeypatch, gz):
    """read_exactly with buffers and reads far smaller than the file: the pieces joined in order, and a file
    that ends inside a buffer still reported by its size."""
    from numba_cnn.data import files

    monkeypatch.setattr(files, "READ_BUFFER_BYTES", 1000)
    monkeypatch.setattr(files, "READ_CHUNK", 300)
    body = idx_images(TRAIN[0])
    path = tmp_path / ("img.gz" if gz else "img")
    path.write_bytes(gzip.compress(body) if gz else body)
    np.testing.assert_array_equal(read_idx_images(path), TRAIN[0])
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if gz else raw
        got = files.read_exactly(stream, len(body) + 2500, path, "test")
    assert bytes(got) == body
    path.write_bytes(gzip.compress(body[:-1]) if gz else body[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx_images(path)


# ---------------------------------------------------------------------------------------------------------------
# corrupt npz files


NPZ_CORRUPTIONS = {
    "missing key": (dict(y_test=None), "missing key.*y_test"),
    "float images": (dict(x_train=TRAIN[0].astype(np.float32)), "x_train has dtype float32, expected uint8"),
    "int64 labels": (dict(y_test=TEST[1].astype(np.int64)), "y_test has dtype int64, expected uint8"),
    "flat images": (dict(x_test=TEST[0].reshape(N_TEST, 784)), r"x_test has shape \(5, 784\)"),
    "2-d labels": (dict(y_train=TRAIN[1].reshape(N_TRAIN, 1)), r"y_train has shape \(12, 1\)"),
    "count mismatch": (dict(y_train=TRAIN[1][:-3]), "x_train holds 12 images but y_train holds 9 labels"),
    "label above 9": (dict(y_test=np.full(N_TEST, 200, np.uint8)), "label 200 at index 0"),
    "pickled object": (dict(x_train=np.array([{"a": 1}], dtype=object)), "x_train has dtype object"),
    "no images": (dict(x_test=TEST[0][:0], y_test=TEST[1][:0]), "x_test holds no images"),
}


@pytest.mark.parametrize("case", NPZ_CORRUPTIONS)
def test_invalid_npz_raises_data_error_naming_it(tmp_path, case):
    overrides, message = NPZ_CORRUPTIONS[case]
    path = tmp_path / "mnist.npz"
    path.write_bytes(npz_bytes(**overrides))
    with pytest.raises(DataError, match=message) as info:
        load_mnist(path, download=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, message", [
    (b"", "not an npz file"),
    (b"x_train,y_train\n1,2\n", "not an npz file"),
    (npz_bytes()[:-30], "corrupt npz archive"),
    (npz_bytes()[:200], "corrupt npz archive"),
], ids=["empty", "text", "cut end", "cut early"])
def test_broken_npz_archive_raises_data_error(tmp_path, content, message):
    path = tmp_path / "mnist.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_mnist_npz(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# nothing available


MNIST_NOT_SHIPPED = replace(MNIST, shipped=None)


def test_nothing_available_lists_what_was_tried_and_the_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(MNIST_NOT_SHIPPED, cache_dir=tmp_path / "cache", download=False)
    message = str(info.value)
    assert message.startswith("MNIST data not found. Tried:")
    assert "path argument: not given" in message
    assert "$NUMBA_CNN_DATA: not set" in message
    assert f"{tmp_path / 'cache' / 'mnist.npz'}: the keras cache does not exist" in message
    assert "download=False" in message
    assert "--data DIR" in message and "set NUMBA_CNN_DATA" in message and "allow the download" in message


def test_corrupt_cache_without_download_is_reported_in_the_list(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="Tried:") as info:
        load_dataset(MNIST_NOT_SHIPPED, cache_dir=tmp_path, download=False)
    assert f"keras cache: {tmp_path / 'mnist.npz'}: not an npz file" in str(info.value)


def test_requested_download_that_fails_does_not_fall_back_to_the_shipped_copy(tmp_path):
    unreachable = mnist_served_at(f"http://127.0.0.1:{free_port()}/mnist.npz")
    with pytest.raises(DataError, match="cannot connect") as info:
        load_dataset(unreachable, cache_dir=tmp_path, download=True)
    assert "leave out --download to use the copy shipped with numba_cnn" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# the download, against a local server


class FileServer:
    """An HTTP server on 127.0.0.1 serving fixed bodies by path, counting requests; other paths are 404."""

    def __init__(self):
        self.routes = {}  # path -> (body, declared length)
        self.hits = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, length = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def serve(self, path, body, declared_length=None):
        self.routes[path] = (body, len(body) if declared_length is None else declared_length)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


SAMPLE_NPZ = npz_bytes()
SAMPLE_SHA256 = hashlib.sha256(SAMPLE_NPZ).hexdigest()


def mnist_served_at(url, sha256=SAMPLE_SHA256):
    """MNIST with its download pointed at url (the local server)."""
    return replace(MNIST, downloads=(Download(url, "mnist.npz", sha256),), address=url)


def free_port():
    """A port that was free a moment ago and now has no listener."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_writes_the_cache_then_the_cache_is_used(tmp_path, server):
    url = server.serve("/mnist.npz", SAMPLE_NPZ)
    cache = tmp_path / "cache"
    first = load_dataset(mnist_served_at(url), cache_dir=cache, download=True)
    assert_is_sample_set(first)
    assert first.source.origin == "download" and url in str(first.source)
    assert sorted(os.listdir(cache)) == ["mnist.npz"]  # no temporary file left beside it
    assert (cache / "mnist.npz").read_bytes() == SAMPLE_NPZ
    assert server.hits == ["/mnist.npz"]

    second = load_dataset(mnist_served_at(url), cache_dir=cache, download=True)
    assert_is_sample_set(second)
    assert second.source.origin == "cache"
    assert server.hits == ["/mnist.npz"]  # the server was not asked again


def test_hash_mismatch_leaves_no_file(tmp_path, server):
    url = server.serve("/mnist.npz", SAMPLE_NPZ)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_dataset(mnist_served_at(url, "0" * 64), cache_dir=cache, download=True)
    assert "Tried:" in str(info.value) and SAMPLE_SHA256 in str(info.value)
    assert os.listdir(cache) == []


def test_body_cut_short_leaves_no_file(tmp_path, server):
    url = server.serve("/mnist.npz", SAMPLE_NPZ[:1000], declared_length=len(SAMPLE_NPZ))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=f"download cut short: received 1000 of {len(SAMPLE_NPZ)} bytes"):
        load_dataset(mnist_served_at(url), cache_dir=cache, download=True)
    assert os.listdir(cache) == []


def test_server_404_lists_what_was_tried(tmp_path, server):
    url = server.serve("/mnist.npz", SAMPLE_NPZ).replace("/mnist.npz", "/elsewhere.npz")
    with pytest.raises(DataError, match="HTTP error 404") as info:
        load_dataset(mnist_served_at(url), cache_dir=tmp_path / "cache", download=True)
    message = str(info.value)
    assert "Tried:" in message and "does not exist" in message and "--data DIR" in message
    assert os.listdir(tmp_path / "cache") == []


def test_refused_connection_lists_what_was_tried(tmp_path):
    with pytest.raises(DataError, match="cannot connect") as info:
        load_dataset(mnist_served_at(f"http://127.0.0.1:{free_port()}/mnist.npz"), cache_dir=tmp_path / "cache",
                     download=True)
    assert "Tried:" in str(info.value) and "NUMBA_CNN_DATA" in str(info.value)


def test_corrupt_cache_is_replaced_by_a_download(tmp_path, server):
    url = server.serve("/mnist.npz", SAMPLE_NPZ)
    (tmp_path / "mnist.npz").write_bytes(SAMPLE_NPZ[:-40])
    result = load_dataset(mnist_served_at(url), cache_dir=tmp_path, download=True)
    assert_is_sample_set(result)
    assert result.source.origin == "download"
    assert (tmp_path / "mnist.npz").read_bytes() == SAMPLE_NPZ


def test_mnist_download_is_keras_copy_and_shipped_copy_is_not_downloaded(tmp_path, server):
    (download,) = MNIST.downloads
    assert download.url == "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    assert download.sha256 == "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
    url = server.serve("/mnist.npz", SAMPLE_NPZ)
    assert load_dataset(mnist_served_at(url), cache_dir=tmp_path, normalize=False).source.origin == "shipped"
    assert server.hits == []  # MNIST is downloaded only when asked for


# ---------------------------------------------------------------------------------------------------------------
# the MNIST copy shipped in the package


def test_shipped_mnist_is_the_default_and_holds_the_standard_files():
    result = load_dataset(normalize=False)  # no path, no $NUMBA_CNN_DATA, an empty keras cache (the fixture)
    (x_train, y_train), (x_test, y_test) = result
    assert result.source.origin == "shipped" and result.source.path == MNIST.shipped
    assert result.dataset is MNIST and "shipped with numba_cnn" in str(result.source)
    assert result.sha256 == MNIST.idx_sha256
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert len(y_train) == 60000 and len(y_test) == 10000
    assert sorted(p.name for p in MNIST.shipped.iterdir()) == sorted(
        [f"{name}.gz" for name in MNIST.idx_sha256] + ["README.md"])
    notes = (MNIST.shipped / "README.md").read_text()
    assert "CC BY-SA 3.0" in notes and "Yann LeCun" in notes and "Corinna Cortes" in notes
    assert all(sha256 in notes for sha256 in MNIST.idx_sha256.values())


def test_keras_cache_comes_before_the_shipped_copy(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(npz_bytes())
    assert load_dataset(cache_dir=tmp_path).source.origin == "cache"


def test_damaged_keras_cache_falls_back_to_the_shipped_copy(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"garbage")
    assert load_dataset(cache_dir=tmp_path, normalize=False).source.origin == "shipped"


def sample_shipped(folder):
    """MNIST whose shipped copy is the sample set in folder, with the sample's hashes as the expected ones."""
    write_idx_folder(folder, gz=True)
    return replace(MNIST, shipped=folder, idx_sha256={name: hashlib.sha256(content).hexdigest()
                                                      for name, content in idx_file_bytes().items()})


def relabel(content):
    """IDX label bytes with the first label changed: still a valid file, other content."""
    return content[:8] + bytes([(content[8] + 1) % 10]) + content[9:]


SHIPPED_DAMAGE = {
    # case: (file, what is written instead of its .gz, expected message)
    "other content": ("t10k-labels-idx1-ubyte", lambda raw, packed: gzip.compress(relabel(raw)),
                      "damaged: the SHA-256 of its content is"),
    "cut short": ("train-images-idx3-ubyte", lambda raw, packed: packed[:len(packed) // 2], "truncated"),
    "bit flip": ("train-labels-idx1-ubyte", lambda raw, packed: packed[:20] + bytes([packed[20] ^ 1]) + packed[21:],
                 "corrupt gzip data|CRC"),
}


@pytest.mark.parametrize("case", SHIPPED_DAMAGE)
def test_damaged_shipped_file_is_named_and_never_used(tmp_path, case):
    name, damage, message = SHIPPED_DAMAGE[case]
    dataset = sample_shipped(tmp_path / "shipped")
    assert_is_sample_set(load_dataset(dataset))
    path = tmp_path / "shipped" / f"{name}.gz"
    path.write_bytes(damage(idx_file_bytes()[name], path.read_bytes()))
    with pytest.raises(DataError, match=message) as info:
        load_dataset(dataset)
    text = str(info.value)
    assert text.startswith("the MNIST copy shipped with numba_cnn is damaged: ") and str(path) in text
    assert "Reinstall numba_cnn, or pass --data DIR" in text and "\n" not in text


def test_missing_shipped_file_is_named(tmp_path):
    dataset = sample_shipped(tmp_path / "shipped")
    (tmp_path / "shipped" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="shipped with numba_cnn is damaged: .*without the MNIST IDX file"
                                        r"\(s\) t10k-images-idx3-ubyte "):
        load_dataset(dataset)


# ---------------------------------------------------------------------------------------------------------------
# data sets by name, and the hashes a run records


def test_unknown_data_set_name_is_one_line_naming_the_choices():
    with pytest.raises(DataError, match=r"^unknown data set 'cifar100': choose mnist, fashion-mnist, cifar10 or "
                                        r"folder$"):
        load_dataset("cifar100")
    assert get_dataset("fashion-mnist") is FASHION_MNIST


def test_fashion_mnist_folder_loads_with_its_class_names(tmp_path):
    write_idx_folder(tmp_path, gz=True)
    result = load_dataset("fashion-mnist", tmp_path)
    assert_is_sample_set(result)
    assert result.dataset is FASHION_MNIST and result.record()["dataset"] == "fashion-mnist"
    assert FASHION_MNIST.class_names[0] == "T-shirt/top" and FASHION_MNIST.class_names[9] == "Ankle boot"
    assert FASHION_MNIST.shipped is None  # never in the package


def test_fashion_mnist_is_read_from_the_keras_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    write_idx_folder(tmp_path / "kh" / "datasets" / "fashion-mnist", gz=True)
    result = load_dataset("fashion-mnist", download=False)
    assert_is_sample_set(result)
    assert (result.source.origin, result.source.path) == ("cache", tmp_path / "kh" / "datasets" / "fashion-mnist")


def test_mnist_files_are_refused_as_fashion_mnist():
    with pytest.raises(DataError, match="holds MNIST, not Fashion-MNIST .*--dataset mnist"):
        load_dataset("fashion-mnist", MNIST.shipped)


def test_fashion_mnist_download_hashes_are_the_published_ones():
    # tensorflow/datasets, tensorflow_datasets/url_checksums/fashion_mnist.txt
    assert {d.url.rsplit("/", 1)[1]: d.sha256 for d in FASHION_MNIST.downloads} == {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    }
    assert FASHION_MNIST.address == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert all(d.name == "fashion-mnist/" + d.url.rsplit("/", 1)[1] for d in FASHION_MNIST.downloads)


SAMPLE_GZ = {name: gzip.compress(content, mtime=0) for name, content in idx_file_bytes().items()}


def fashion_served_by(server, sha256=None):
    """Fashion-MNIST with its four files served by the local server; sha256 overrides the expected hashes."""
    return replace(FASHION_MNIST, address=server.serve("/fashion/", b""), downloads=tuple(
        Download(server.serve(f"/fashion/{name}.gz", body), f"fashion-mnist/{name}.gz",
                 (sha256 or {}).get(name, hashlib.sha256(body).hexdigest()))
        for name, body in SAMPLE_GZ.items()))


def test_fashion_mnist_is_downloaded_when_not_found_then_read_from_the_cache(tmp_path, server):
    dataset = fashion_served_by(server)
    first = load_dataset(dataset, cache_dir=tmp_path)
    assert_is_sample_set(first)
    assert first.source.origin == "download" and "/fashion/" in str(first.source)
    assert sorted(os.listdir(tmp_path / "fashion-mnist")) == sorted(f"{name}.gz" for name in SAMPLE_GZ)
    assert len(server.hits) == 4
    second = load_dataset(dataset, cache_dir=tmp_path)
    assert second.source.origin == "cache" and len(server.hits) == 4
    assert second.sha256 == first.sha256


def test_fashion_mnist_download_with_a_wrong_hash_keeps_nothing_of_that_file(tmp_path, server):
    dataset = fashion_served_by(server, sha256={"t10k-images-idx3-ubyte": "0" * 64})
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: SHA-256 mismatch") as info:
        load_dataset(dataset, cache_dir=tmp_path)
    assert str(info.value).startswith("Fashion-MNIST data not found. Tried:")
    assert "t10k-images-idx3-ubyte.gz" not in os.listdir(tmp_path / "fashion-mnist")


def test_fashion_mnist_not_found_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", cache_dir=tmp_path, download=False)
    message = str(info.value)
    assert f"{tmp_path / 'fashion-mnist'}: the keras cache does not exist" in message
    assert "four Fashion-MNIST IDX files" in message
    assert "allow the download (network access to http://fashion-mnist.s3-website" in message


def test_record_hashes_are_those_of_the_uncompressed_idx_files_whatever_the_format(tmp_path):
    write_idx_folder(tmp_path / "gz", gz=True)
    (tmp_path / "mnist.npz").write_bytes(npz_bytes())
    from_gz, from_npz = load_dataset("mnist", tmp_path / "gz"), load_dataset("mnist", tmp_path / "mnist.npz")
    expected = {name: hashlib.sha256(content).hexdigest() for name, content in idx_file_bytes().items()}
    assert from_gz.sha256 == from_npz.sha256 == expected
    assert idx_sha256(TRAIN[0]) == expected["train-images-idx3-ubyte"]
    record = from_npz.record()
    assert record == {"dataset": "mnist", "origin": "path", "format": "npz", "path": str(tmp_path / "mnist.npz"),
                      "sha256": expected, "shape": [1, 28, 28], "class_names": list(MNIST.class_names)}


def test_load_for_run_uses_the_recorded_data_set_and_checks_its_hashes(tmp_path):
    write_idx_folder(tmp_path / "same", gz=True)
    write_idx_folder(tmp_path / "other", gz=False, replace={"t10k-labels-idx1-ubyte": relabel(idx_labels(TEST[1]))})
    recorded = load_dataset("fashion-mnist", tmp_path / "same").record()

    data, line = load_for_run(path=tmp_path / "same", recorded=recorded)
    assert data.dataset is FASHION_MNIST and line.startswith("data: Fashion-MNIST (as recorded in the checkpoint)")
    with pytest.raises(DataError, match="is not the data the checkpoint's run read from .*same: "
                                        "t10k-labels-idx1-ubyte differ .*pass --allow-data-mismatch"):
        load_for_run(path=tmp_path / "other", recorded=recorded)
    data, line = load_for_run(path=tmp_path / "other", recorded=recorded, allow_mismatch=True)
    assert "warning: " in line and "t10k-labels-idx1-ubyte differ" in line
    with pytest.raises(DataError, match="the checkpoint's run used data set 'fashion-mnist', not 'mnist'"):
        load_for_run("mnist", tmp_path / "nowhere", recorded=recorded)  # refused before looking for data
    data, line = load_for_run("mnist", tmp_path / "same", recorded=recorded, allow_mismatch=True)
    assert data.dataset is MNIST and "warning: the checkpoint's run used data set 'fashion-mnist'" in line
    assert load_for_run(path=tmp_path / "same")[1].startswith("data: MNIST (the default)")


# ---------------------------------------------------------------------------------------------------------------
# property-based: any bytes either load as valid data or raise DataError


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


VALID_FILES = {
    "images": idx_images(TRAIN[0][:3]),
    "labels": idx_labels(TRAIN[1][:3]),
    # deflated members mostly fail their CRC when damaged; stored ones expose the .npy headers to the fuzzing
    "npz": npz_bytes(x_train=TRAIN[0][:2], y_train=TRAIN[1][:2], x_test=TEST[0][:1], y_test=TEST[1][:1]),
    "npz-stored": npz_bytes(False, x_train=TRAIN[0][:2], y_train=TRAIN[1][:2], x_test=TEST[0][:1],
                            y_test=TEST[1][:1]),
}
READERS = {"images": read_idx_images, "labels": read_idx_labels, "npz": read_mnist_npz,
           "npz-stored": read_mnist_npz}


def check_reader(fuzz_dir, kind, gz, stored):
    """Read the bytes `stored` as `kind` (from a file named .gz if gz): they must give well-formed arrays or a
    DataError naming the file; returns whether they loaded."""
    path = fuzz_dir / (f"{kind}.npz" if kind.startswith("npz") else f"{kind}-idx" + (".gz" if gz else ""))
    path.write_bytes(stored)
    try:
        result = READERS[kind](path)
    except DataError as exc:
        assert str(path) in str(exc)
        return False
    arrays = result if kind.startswith("npz") else (result,)
    for array in arrays:
        assert array.dtype == np.uint8 and len(array) > 0
    if kind == "images":
        assert result.shape[1:] == (28, 28)
    if kind == "labels":
        assert result.max() <= 9
    return True


def stored_form(kind, gz, content):
    """How a valid file of `kind` is stored: gzipped when named .gz (npz files are never gzipped)."""
    return gzip.compress(content, mtime=0) if gz and not kind.startswith("npz") else content


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
kinds = st.sampled_from(sorted(VALID_FILES))


@FUZZ
@given(kind=kinds, gz=st.booleans(), compress=st.booleans(), content=st.binary(max_size=600))
def test_random_bytes_load_or_raise_data_error(fuzz_dir, kind, gz, compress, content):
    check_reader(fuzz_dir, kind, gz, gzip.compress(content, mtime=0) if compress else content)


@FUZZ
@given(kind=kinds, gz=st.booleans(), data=st.data())
def test_truncated_valid_files_raise_data_error(fuzz_dir, kind, gz, data):
    stored = stored_form(kind, gz, VALID_FILES[kind])
    cut = data.draw(st.integers(0, len(stored) - 1), label="cut")
    assert not check_reader(fuzz_dir, kind, gz, stored[:cut])  # no prefix of a valid file is a complete file


@FUZZ
@given(kind=kinds, gz=st.booleans(), data=st.data())
def test_mutated_valid_files_load_or_raise_data_error(fuzz_dir, kind, gz, data):
    stored = bytearray(stored_form(kind, gz, VALID_FILES[kind]))
    for _ in range(data.draw(st.integers(1, 4), label="changes")):
        at = data.draw(st.integers(0, len(stored) - 1), label="at")
        stored[at] = data.draw(st.integers(0, 255), label="value")
    check_reader(fuzz_dir, kind, gz, bytes(stored))


def test_valid_fuzz_seeds_load(fuzz_dir):
    for kind in VALID_FILES:
        for gz in (False, True):
            assert check_reader(fuzz_dir, kind, gz, stored_form(kind, gz, VALID_FILES[kind]))


# ---------------------------------------------------------------------------------------------------------------
# the real data set


@pytest.mark.skipif(not REAL_DATA, reason="set NUMBA_CNN_DATA to the MNIST folder or mnist.npz to run this test")
def test_full_mnist_from_env(monkeypatch):
    monkeypatch.setenv("NUMBA_CNN_DATA", REAL_DATA)
    result = load_mnist(download=False)
    (x_train, y_train), (x_test, y_test) = result
    assert result.source.origin == "env"
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert x_train.dtype == np.float32 and y_train.dtype == np.uint8
    assert x_train.min() == 0.0 and x_train.max() == 1.0 and x_test.min() == 0.0 and x_test.max() == 1.0
    train_counts, test_counts = np.bincount(y_train, minlength=10), np.bincount(y_test, minlength=10)
    assert len(train_counts) == 10 and train_counts.sum() == 60000 and test_counts.sum() == 10000
    assert train_counts.min() > 5000 and test_counts.min() > 850  # every digit well represented
    assert abs(float(x_train.mean()) * 255 - 33.318) < 0.01  # the published training-pixel mean
