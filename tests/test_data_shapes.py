"""Data sets of other shapes: CIFAR-10 (its binary archive, downloaded from a local server, or the extracted folder)
and a folder of PNG images per class, grey or RGB; what a run records about them; and fuzzing of both readers.

Every file is written by the test into tmp_path; the downloads come from the local server of test_data.py, whose
fixtures keep every test off the network and away from the user's data settings.
"""

import hashlib
import io
import os
import tarfile
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from numba_cnn import data as data_module
from numba_cnn.data import CIFAR10, IMAGE_FOLDER, Download, get_dataset, load_dataset, load_for_run
from numba_cnn.data.cifar import ARCHIVE, BATCHES, FOLDER, TEST_BATCH, TRAIN_BATCHES, read_cifar
from numba_cnn.data.folder import read_image_folder
from numba_cnn.errors import DataError

from test_data import isolated_environment, server  # noqa: F401 (fixtures)

PER_TRAIN_BATCH, PER_TEST_BATCH = 24, 30
KNOWN_BATCH, KNOWN_AT, KNOWN_LABEL = "data_batch_2.bin", 2, 7
LINK = object()


# ---------------------------------------------------------------------------------------------------------------
# a small CIFAR-10 in the real format


def cifar_batch(n, seed):
    """n random records: (images uint8 (n, 3, 32, 32), labels uint8 (n,), the batch file's bytes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels, np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1).tobytes()


def known_record():
    """(image (3, 32, 32), its record's bytes): written byte by byte in the order the format documents (the label,
    then the red, green and blue planes, each row after row), independently of any reshape."""
    image = np.random.default_rng(99).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    pixels = bytes(int(image[c, h, w]) for c in range(3) for h in range(32) for w in range(32))
    return image, bytes([KNOWN_LABEL]) + pixels


def sample_batches():
    """{batch name: bytes} of the small set, with the known record at KNOWN_AT in KNOWN_BATCH."""
    batches = {}
    for seed, name in enumerate(BATCHES):
        content = cifar_batch(PER_TEST_BATCH if name == TEST_BATCH else PER_TRAIN_BATCH, seed)[2]
        if name == KNOWN_BATCH:
            at = KNOWN_AT * 3073
            content = content[:at] + known_record()[1] + content[at + 3073:]
        batches[name] = content
    return batches


def tar_gz(members):
    """A .tar.gz of the members, (name, bytes or LINK) pairs in order; LINK makes a symbolic link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is LINK:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def cifar_archive(batches=None, extra=()):
    """The archive of the small set laid out as the real one, with its text file, then the extra members."""
    members = [(f"{FOLDER}/{name}", content) for name, content in (batches or SAMPLE_BATCHES).items()]
    members.append((f"{FOLDER}/batches.meta.txt", "\n".join(CIFAR10.class_names).encode()))
    return tar_gz([*members, *extra])


SAMPLE_BATCHES = sample_batches()
SAMPLE_ARCHIVE = cifar_archive(extra=[("../outside.txt", b"never extracted")])


def write_cifar_folder(folder, batches=None):
    (folder / FOLDER).mkdir(parents=True)
    for name, content in (batches or SAMPLE_BATCHES).items():
        (folder / FOLDER / name).write_bytes(content)
    return folder / FOLDER


def assert_is_small_cifar(result, normalize=False):
    (x_train, y_train), (x_test, y_test) = result
    assert x_train.shape == (5 * PER_TRAIN_BATCH, 3, 32, 32) and x_test.shape == (PER_TEST_BATCH, 3, 32, 32)
    assert x_train.dtype == (np.float32 if normalize else np.uint8) and y_train.dtype == y_test.dtype == np.uint8
    assert x_train.flags.writeable and x_train.flags.c_contiguous
    known_image, _ = known_record()
    at = TRAIN_BATCHES.index(KNOWN_BATCH) * PER_TRAIN_BATCH + KNOWN_AT
    assert y_train[at] == KNOWN_LABEL
    scale = np.float32(255) if normalize else 1
    np.testing.assert_array_equal(x_train[at] * scale, known_image)  # red plane, then green, then blue, rows
    np.testing.assert_array_equal(np.delete(y_train, at), np.delete(np.tile(np.arange(PER_TRAIN_BATCH) % 10, 5), at))
    np.testing.assert_array_equal(x_test * scale, cifar_batch(PER_TEST_BATCH, BATCHES.index(TEST_BATCH))[0])
    assert result.sha256 == {name: hashlib.sha256(content).hexdigest() for name, content in SAMPLE_BATCHES.items()}
    assert result.dataset.shape == (3, 32, 32) and result.dataset.num_classes == 10


def cifar_served_by(server, body=SAMPLE_ARCHIVE, sha256=None):
    """CIFAR-10 with its archive served by the local server; sha256 overrides the expected hash."""
    url = server.serve(f"/{ARCHIVE}", body)
    sha256 = sha256 or hashlib.sha256(body).hexdigest()
    return replace(CIFAR10, address=url, downloads=(Download(url, ARCHIVE, sha256),))


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_declares_its_shape_classes_and_published_download():
    assert get_dataset("cifar10") is CIFAR10 and (CIFAR10.title, CIFAR10.shape) == ("CIFAR-10", (3, 32, 32))
    assert CIFAR10.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                   "truck") and CIFAR10.num_classes == 10
    (download,) = CIFAR10.downloads
    assert download.url == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" and download.name == ARCHIVE
    # tensorflow/datasets, tensorflow_datasets/url_checksums/cifar10.txt
    assert download.sha256 == "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
    assert CIFAR10.shipped is None  # never in the package


def test_cifar10_is_downloaded_by_name_then_read_from_the_cache(tmp_path, server, monkeypatch):
    monkeypatch.setitem(data_module.DATASETS, "cifar10", cifar_served_by(server))
    cache = tmp_path / "cache"
    first, line = load_for_run("cifar10", cache_dir=cache, normalize=False)
    assert_is_small_cifar(first)
    assert first.source.origin == "download" and line.startswith("data: CIFAR-10 (--dataset), ")
    assert os.listdir(cache) == [ARCHIVE] and (cache / ARCHIVE).read_bytes() == SAMPLE_ARCHIVE
    assert not (tmp_path / "outside.txt").exists() and not (cache.parent / "outside.txt").exists()
    record = first.record()
    assert record["dataset"] == "cifar10" and record["format"] == "cifar-tar" and record["shape"] == [3, 32, 32]
    assert record["class_names"] == list(CIFAR10.class_names) and set(record["sha256"]) == set(BATCHES)

    second, _ = load_for_run(recorded=record, cache_dir=cache)
    assert_is_small_cifar(second, normalize=True)
    assert second.source.origin == "cache" and server.hits == [f"/{ARCHIVE}"]


def test_cifar10_download_with_another_hash_is_refused_and_nothing_kept(tmp_path, server):
    dataset = cifar_served_by(server, sha256="0" * 64)
    with pytest.raises(DataError, match=f"{ARCHIVE}: SHA-256 mismatch: got "
                                        f"{hashlib.sha256(SAMPLE_ARCHIVE).hexdigest()}, expected 0000") as info:
        load_dataset(dataset, cache_dir=tmp_path)
    assert str(info.value).startswith("CIFAR-10 data not found. Tried:")
    assert "allow the download (network access to http://127.0.0.1" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_cifar10_extracted_folder_and_archive_read_the_same(tmp_path):
    batches = write_cifar_folder(tmp_path / "extracted")
    (tmp_path / ARCHIVE).write_bytes(SAMPLE_ARCHIVE)
    sources = {tmp_path / "extracted": "cifar-bin", batches: "cifar-bin", tmp_path / ARCHIVE: "cifar-tar"}
    for path, format in sources.items():
        result = load_dataset("cifar10", path, normalize=False)
        assert_is_small_cifar(result)
        assert (result.source.format, result.source.origin) == (format, "path")


def test_cifar10_folder_missing_a_batch_names_it(tmp_path):
    (write_cifar_folder(tmp_path) / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match=rf"without {ARCHIVE} or the CIFAR-10 batch file\(s\) data_batch_4.bin in "):
        load_dataset("cifar10", tmp_path)


def damaged(name, content):
    return {**SAMPLE_BATCHES, name: content}


ARCHIVE_DAMAGE = {
    # case: (the archive's bytes, expected message)
    "cut in half": (SAMPLE_ARCHIVE[:len(SAMPLE_ARCHIVE) // 2], r"data_batch_\d.bin: truncated archive data"),
    "cut at the end": (SAMPLE_ARCHIVE[:-9], "corrupt or truncated archive"),
    "not gzip": (b"PK\x03\x04 a zip, say", "not a gzip file; expected cifar-10-binary.tar.gz"),
    "gzip but not tar": (tar_gz([])[:10] + b"\x00" * 40, "corrupt or truncated archive"),
    "a batch missing": (cifar_archive({n: c for n, c in SAMPLE_BATCHES.items() if n != TEST_BATCH}),
                        f"the archive has no {FOLDER}/test_batch.bin"),
    "a partial record": (cifar_archive(damaged("data_batch_3.bin", SAMPLE_BATCHES["data_batch_3.bin"][:-5])),
                         r"data_batch_3.bin: 73747 bytes is not a whole number of 3073-byte records"),
    "an empty batch": (cifar_archive(damaged(TEST_BATCH, b"")), "test_batch.bin: holds no records"),
    "a label above 9": (cifar_archive(damaged("data_batch_1.bin", b"\x0a" + SAMPLE_BATCHES["data_batch_1.bin"][1:])),
                        "data_batch_1.bin: label 10 at index 0 is not a class number 0..9"),
    "a batch as a link": (cifar_archive(damaged("data_batch_5.bin", LINK)),
                          "data_batch_5.bin: not a regular file in the archive"),
    "a batch twice": (cifar_archive(extra=[(f"{FOLDER}/{TEST_BATCH}", SAMPLE_BATCHES[TEST_BATCH])]),
                      "test_batch.bin: appears twice in the archive"),
}


@pytest.mark.parametrize("case", ARCHIVE_DAMAGE)
def test_damaged_cifar10_archive_is_one_line_naming_it(tmp_path, case):
    content, message = ARCHIVE_DAMAGE[case]
    path = tmp_path / ARCHIVE
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("cifar10", path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_damaged_cifar10_cache_is_replaced_by_the_download(tmp_path, server):
    (tmp_path / ARCHIVE).write_bytes(SAMPLE_ARCHIVE[:1000])
    result = load_dataset(cifar_served_by(server), cache_dir=tmp_path, normalize=False)
    assert_is_small_cifar(result)
    assert result.source.origin == "download" and (tmp_path / ARCHIVE).read_bytes() == SAMPLE_ARCHIVE


# ---------------------------------------------------------------------------------------------------------------
# a folder of images per class


def write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_image_folder(root, shape=(1, 6, 5), classes=("cat", "ant", "bee"), per_class=(3, 2), seed=0):
    """PNGs of random pixels in root/<split>/<class>/; -> {split: (images (N, C, H, W), labels)} in the order the
    loader reads them (classes sorted, then files by name)."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, count in zip(("train", "test"), per_class):
        images, labels = [], []
        for label, name in enumerate(sorted(classes)):
            for i in range(count):
                image = rng.integers(0, 256, shape, dtype=np.uint8)
                write_png(root / split / name / f"{i:02d}.png", image[0] if shape[0] == 1 else image.transpose(1, 2, 0))
                images.append(image)
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels, np.uint8))
    return expected


@pytest.mark.parametrize("shape", [(1, 6, 5), (3, 4, 7)], ids=["grey", "rgb"])
def test_image_folder_loads_with_its_shape_and_sorted_class_names(tmp_path, shape):
    expected = write_image_folder(tmp_path, shape)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    result = load_dataset("folder", path=tmp_path, normalize=False)
    (x_train, y_train), (x_test, y_test) = result
    assert result.dataset.class_names == ("ant", "bee", "cat") and result.dataset.shape == shape
    assert result.dataset.num_classes == 3 and result.dataset.name == "folder"
    for (x, y), split in (((x_train, y_train), "train"), ((x_test, y_test), "test")):
        assert x.dtype == np.uint8 and y.dtype == np.uint8
        np.testing.assert_array_equal(x, expected[split][0])
        np.testing.assert_array_equal(y, expected[split][1])
    record = result.record()
    assert (record["dataset"], record["format"], record["shape"]) == ("folder", "png", list(shape))
    assert record["class_names"] == ["ant", "bee", "cat"] and set(record["sha256"]) == {"train", "test"}
    scaled = load_dataset("folder", path=tmp_path)
    assert scaled[0][0].dtype == np.float32 and scaled.sha256 == result.sha256
    np.testing.assert_array_equal(scaled[0][0] * np.float32(255), x_train)


def test_image_folder_and_its_record_in_a_run(tmp_path):
    write_image_folder(tmp_path / "a")
    write_image_folder(tmp_path / "b", seed=1)
    write_image_folder(tmp_path / "c", classes=("ant", "bee", "cow"))
    recorded = load_dataset("folder", tmp_path / "a").record()
    data, line = load_for_run(path=tmp_path / "a", recorded=recorded)
    assert line.startswith("data: image folder (as recorded in the checkpoint), PNG images in ")
    with pytest.raises(DataError, match="not the data the checkpoint's run read from .*/a: train, test differ"):
        load_for_run(path=tmp_path / "b", recorded=recorded)
    with pytest.raises(DataError, match="class 2 is 'cow', recorded 'cat'; pass --allow-data-mismatch"):
        load_for_run(path=tmp_path / "c", recorded=recorded)
    with pytest.raises(DataError, match="(?s)data not found.*To fix: pass --data DIR \\(a folder with train/<class>"):
        load_for_run(recorded=recorded)


def test_a_record_from_before_shapes_were_kept_still_resumes(tmp_path):
    write_cifar_folder(tmp_path)
    recorded = load_dataset("cifar10", tmp_path).record()
    old = {key: value for key, value in recorded.items() if key not in ("shape", "class_names")}
    data, line = load_for_run(path=tmp_path, recorded=old)
    assert data.dataset is CIFAR10 and "warning" not in line
    with pytest.raises(DataError, match=r"its images are \(3, 32, 32\), recorded \(1, 28, 28\)"):
        load_for_run(path=tmp_path, recorded={**recorded, "shape": [1, 28, 28]})


def make_mixed_sizes(root):
    write_image_folder(root)
    write_png(root / "train" / "bee" / "01.png", np.zeros((6, 4), np.uint8))
    return root / "train" / "bee" / "01.png"


def make_mixed_grey_and_rgb(root):
    write_image_folder(root)
    write_png(root / "test" / "cat" / "00.png", np.zeros((6, 5, 3), np.uint8))
    return root / "test" / "cat" / "00.png"


def make_rgba(root):
    write_image_folder(root, shape=(3, 4, 4))
    write_png(root / "train" / "ant" / "00.png", np.zeros((4, 4, 4), np.uint8))
    return root / "train" / "ant" / "00.png"


def make_broken_png(root):
    write_image_folder(root)
    path = root / "train" / "cat" / "02.png"
    path.write_bytes(path.read_bytes()[:60])
    return path


def make_jpeg_named_png(root):
    write_image_folder(root)
    path = root / "test" / "bee" / "01.png"
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(path, format="JPEG")
    return path


def make_other_test_classes(root):
    write_image_folder(root)
    (root / "test" / "bee").rename(root / "test" / "wasp")
    return root / "test"


def make_empty_class(root):
    write_image_folder(root)
    for png in (root / "train" / "bee").iterdir():
        png.unlink()
    return root / "train" / "bee"


def make_no_test(root):
    write_image_folder(root)
    (root / "test").rename(root / "tests")
    return root


FOLDER_DAMAGE = {
    # case: (makes the bad folder -> the path the message names, expected message)
    "mixed sizes": (make_mixed_sizes, r"4x6 grey, but the first image, .*ant/00.png, is 5x6 grey: all images must "
                                      "be one size, and all grey or all RGB"),
    "mixed grey and rgb": (make_mixed_grey_and_rgb, "5x6 RGB, but the first image, .* is 5x6 grey"),
    "alpha": (make_rgba, r"has an alpha channel \(mode RGBA\)"),
    "broken png": (make_broken_png, "cannot read as a PNG image"),
    "jpeg named png": (make_jpeg_named_png, "cannot read as a PNG image"),
    "other test classes": (make_other_test_classes, r"class folders differ from those of train/ \(missing bee; "
                                                    r"not in train/: wasp\)"),
    "empty class": (make_empty_class, r"no PNG images \(\*.png\) in this class folder"),
    "no test folder": (make_no_test, "is a folder without test/"),
}


@pytest.mark.parametrize("case", FOLDER_DAMAGE)
def test_bad_image_folder_is_one_line_naming_the_file(tmp_path, case):
    make, message = FOLDER_DAMAGE[case]
    named = make(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("folder", tmp_path)
    assert str(info.value).startswith(f"{named}: ") and "\n" not in str(info.value)


def test_image_folder_without_a_path_says_how_to_give_one(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="image folder data not found. Tried:") as info:
        load_dataset(IMAGE_FOLDER)
    assert "--data DIR (a folder with train/<class>/*.png and test/<class>/*.png), or set NUMBA_CNN_DATA to one" \
        in str(info.value) and "keras cache" not in str(info.value)
    expected = write_image_folder(tmp_path)
    monkeypatch.setenv("NUMBA_CNN_DATA", str(tmp_path))
    result = load_dataset("folder", normalize=False)
    assert result.source.origin == "env"
    np.testing.assert_array_equal(result[1][0], expected["test"][0])


# ---------------------------------------------------------------------------------------------------------------
# property-based: random and mutated bytes either load or raise DataError


def png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


SMALL_BATCHES = {name: cifar_batch(2, seed)[2] for seed, name in enumerate(BATCHES)}
FUZZ_SEEDS = {  # kind: a valid file of that kind, which the test damages
    "cifar-tar": cifar_archive(SMALL_BATCHES),
    "cifar-bin": SMALL_BATCHES["data_batch_1.bin"],
    "png": png_bytes(np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3)),
}


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    """A CIFAR-10 folder of small batches and an image folder of 3x4 RGB images, which the test damages a file of."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "cifar").mkdir()
    for name, content in SMALL_BATCHES.items():
        (root / "cifar" / name).write_bytes(content)
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / "images" / split / name).mkdir(parents=True)
            (root / "images" / split / name / "0.png").write_bytes(FUZZ_SEEDS["png"])
    return root


def read_damaged(root, kind, content):
    """Write content where a file of `kind` is read from, read it: arrays of the declared form, or a DataError."""
    target = {"cifar-tar": root / ARCHIVE, "cifar-bin": root / "cifar" / "data_batch_1.bin",
              "png": root / "images" / "train" / "b" / "0.png"}[kind]
    target.write_bytes(content)
    try:
        if kind == "png":
            x_train, y_train, x_test, y_test, class_names, _ = read_image_folder(root / "images")
            assert class_names == ("a", "b") and x_train.shape[1:] == x_test.shape[1:] == (3, 3, 4)
        else:
            x_train, y_train, x_test, y_test, _ = read_cifar(target if kind == "cifar-tar" else root / "cifar", kind)
            assert x_train.shape[1:] == x_test.shape[1:] == (3, 32, 32) and max(y_train.max(), y_test.max()) < 10
    except DataError as exc:
        assert str(target) in str(exc) and "\n" not in str(exc)
    finally:
        target.write_bytes(FUZZ_SEEDS["cifar-tar"] if kind == "cifar-tar" else
                           SMALL_BATCHES["data_batch_1.bin"] if kind == "cifar-bin" else FUZZ_SEEDS["png"])


@st.composite
def damaged_files(draw):
    kind = draw(st.sampled_from(sorted(FUZZ_SEEDS)))
    seed = FUZZ_SEEDS[kind]
    how = draw(st.sampled_from(["random", "cut", "mutated"]))
    if how == "random":
        return kind, draw(st.binary(max_size=4000))
    if how == "cut":
        return kind, seed[:draw(st.integers(0, len(seed) - 1))]
    content = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        content[draw(st.integers(0, len(content) - 1))] = draw(st.integers(0, 255))
    return kind, bytes(content)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged=damaged_files())
def test_random_and_damaged_files_load_or_raise_data_error(fuzz_root, damaged):
    read_damaged(fuzz_root, *damaged)
