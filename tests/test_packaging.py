"""The package as pip installs it: a wheel and an sdist built from this tree carry the shipped MNIST files, and the
installed package (the wheel unpacked, as `pip install .` lays it out) finds and checks them.

Both are built through setuptools' PEP 517 hooks (setuptools is in the test extra), from a copy of the tree, with no
network and nothing written into the tree.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from numba_cnn.data import IDX_NAMES

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_FILES = [f"numba_cnn/datasets/mnist/{name}.gz" for name in IDX_NAMES.values()] + [
    "numba_cnn/datasets/mnist/README.md"]
# One PEP 517 hook per process, as build frontends call them (a second build in the same process writes nothing).
BUILD = "import sys; from setuptools import build_meta; getattr(build_meta, sys.argv[1])(sys.argv[2])"


def run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """-> (the wheel, the sdist) built from a copy of this tree."""
    pytest.importorskip("setuptools.build_meta")
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "source"
    shutil.copytree(ROOT / "numba_cnn", source / "numba_cnn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for hook in ("build_sdist", "build_wheel"):
        run([sys.executable, "-c", BUILD, hook, str(tmp / "out")], cwd=source)
    (wheel,), (sdist,) = (tmp / "out").glob("*.whl"), (tmp / "out").glob("*.tar.gz")
    return wheel, sdist


def sha256(content):
    return hashlib.sha256(content).hexdigest()


def test_wheel_and_sdist_carry_the_shipped_mnist_files(dist):
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {name: sha256(z.read(name)) for name in SHIPPED_FILES if name in z.namelist()}
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1]: m for m in t.getmembers() if "/" in m.name}
        in_sdist = {name: sha256(t.extractfile(members[name]).read()) for name in SHIPPED_FILES if name in members}
    expected = {name: sha256((ROOT / name).read_bytes()) for name in SHIPPED_FILES}
    assert in_wheel == expected
    assert in_sdist == expected


def test_installed_package_reads_its_own_copy(dist, tmp_path):
    wheel, _ = dist
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CNN_DATA", "KERAS_HOME")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(site))
    result = run([sys.executable, "-c", "from numba_cnn.data import load_dataset; d = load_dataset(normalize=False); "
                  "print(d.source.origin, d.source.path, d.sha256 == d.dataset.idx_sha256)"], env=env, cwd=tmp_path)
    assert result.stdout.split() == ["shipped", str(site / "numba_cnn" / "datasets" / "mnist"), "True"]
