"""The image data readers of lab/images.py: the official CIFAR-10 archive (MD5 before unpickling,
download), image folders and archives of them, and their errors; on the real CIFAR-10 copy."""
import hashlib
import io
import pickle
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CIFAR
from lab import files, images


def test_real_data_is_read_in_official_class_order(data_dir):
    data = images.load_cifar10(CIFAR, data_dir)
    assert data["train_x"].shape == (46000, 3, 32, 32) and data["train_x"].dtype == np.uint8
    assert data["test_x"].shape == (10000, 3, 32, 32)
    assert list(data["classes"]) == list(images.CLASSES)
    assert np.array_equal(np.bincount(data["test_y"]), np.full(10, 1000))
    assert 100 < data["train_x"].mean() < 140  # real images, not blank


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _fake_official(path: Path, payload=None) -> Path:
    def batch(n, seed):
        rng = np.random.default_rng(seed)
        return pickle.dumps(payload if payload is not None else
                            {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))})
    members = {f"cifar-10-batches-py/data_batch_{i}": batch(4, i) for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = batch(3, 9)
    return _tar_gz(path, members)


class _Trap:
    """Unpickling this object creates a file: proof that pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_bad_checksum_is_refused_before_anything_is_unpickled(tmp_path):
    marker = tmp_path / "pickle-ran"
    archive = _fake_official(tmp_path / "cifar-10-python.tar.gz", payload=_Trap(str(marker)))
    with pytest.raises(files.DataError, match="MD5"):
        images.load_cifar10(archive, tmp_path / "cache")
    assert not marker.exists() and not list((tmp_path / "cache").iterdir())   # no cache written


def test_official_archive_is_read_when_its_checksum_matches(tmp_path, monkeypatch):
    archive = _fake_official(tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setattr(images, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    data = images.load_cifar10(archive, tmp_path / "cache")
    assert data["train_x"].shape == (20, 3, 32, 32) and data["test_x"].shape == (3, 3, 32, 32)
    first = pickle.loads(tarfile.open(archive).extractfile("cifar-10-batches-py/data_batch_1").read())
    assert np.array_equal(data["train_x"][:4].reshape(4, -1), first[b"data"])  # channel-first layout kept


def test_missing_path_names_the_option(tmp_path):
    with pytest.raises(files.DataError, match="--data .*no such file"):
        images.load_cifar10(tmp_path / "nowhere.tar.gz", tmp_path / "cache")


def test_corrupt_archive_gets_a_clear_error_and_leaves_no_cache(tmp_path):
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)  # a gzip magic number, then garbage
    with pytest.raises(files.DataError, match="cannot read the archive"):
        images.load_cifar10(bad, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())   # no cache written


def test_image_folder_without_train_and_test_is_refused(tmp_path):
    archive = _tar_gz(tmp_path / "imgs.tar.gz", {"photos/cat/1.png": b"x"})
    with pytest.raises(files.DataError, match="train/<class>"):
        images.load_cifar10(archive, tmp_path / "cache")


def test_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
    def fail(url, dest):
        Path(dest).write_bytes(b"partial")
        raise OSError("network unreachable")
    monkeypatch.setattr(images.urllib.request, "urlretrieve", fail)
    with pytest.raises(files.DataError, match="could not download"):
        images.load_cifar10(None, tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


def test_download_with_wrong_checksum_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(images.urllib.request, "urlretrieve", lambda url, dest: Path(dest).write_bytes(b"evil"))
    with pytest.raises(files.DataError, match="MD5"):
        images.load_cifar10(None, tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


def test_pixel_variance_is_exact_and_independent_of_the_memory_layout():
    x = torch.randint(0, 256, (40, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    values = [Fraction(int(v), 255) for v in x.flatten()]
    mean = sum(values) / len(values)
    exact = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    assert images.pixel_variance(x) == float(exact)
    assert images.pixel_variance(x.permute(3, 1, 0, 2)) == images.pixel_variance(x.clone()) == float(exact)
