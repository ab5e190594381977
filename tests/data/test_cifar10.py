"""The cifar10 source: tar layout, labels and order, the decoded-array cache, and the real test.tar."""

from __future__ import annotations

import io
import os
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

import finetune.data.cifar10 as cifar10_module
from finetune.data import SOURCES
from finetune.errors import FinetuneError

SHARED_CIFAR10 = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"


def _jpeg(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _decoded(jpeg: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def _write_tar(filename: pathlib.Path, members: dict[str, bytes]) -> None:
  with tarfile.open(filename, "w") as archive:
    split = next(iter(members)).split("/")[0]
    directory = tarfile.TarInfo(split)  # Real tars list folders too; the reader must skip them.
    directory.type = tarfile.DIRTYPE
    archive.addfile(directory)
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def folder(tmp_path) -> tuple[pathlib.Path, dict[str, bytes], dict[str, bytes]]:
  """A tiny CIFAR-10 folder whose members are deliberately stored out of name order."""
  train = {"train/truck/0000.jpg": _jpeg(1), "train/airplane/0001.jpg": _jpeg(2),
           "train/cat/0000.jpg": _jpeg(3), "train/airplane/0000.jpg": _jpeg(4)}
  test = {"test/ship/0000.jpg": _jpeg(5), "test/bird/0000.jpg": _jpeg(6)}
  _write_tar(tmp_path / "train.tar", train)
  _write_tar(tmp_path / "test.tar", test)
  return tmp_path, train, test


def test_decodes_in_member_name_order_with_fixed_class_indices(folder):
  path, train, test = folder
  dataset = SOURCES.get("cifar10")(path=str(path))
  assert dataset.name == "cifar10"
  assert dataset.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                 "truck")
  batch = dataset.splits["train"].take(np.arange(4))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  order = ["train/airplane/0000.jpg", "train/airplane/0001.jpg", "train/cat/0000.jpg", "train/truck/0000.jpg"]
  np.testing.assert_array_equal(batch["image"], np.stack([_decoded(train[name]) for name in order]))
  np.testing.assert_array_equal(batch["label"], [0, 0, 3, 9])
  assert batch["label"].dtype == np.int64
  np.testing.assert_array_equal(dataset.splits["test"].labels(), [2, 8])
  np.testing.assert_array_equal(dataset.splits["test"].take(np.array([1]))["image"][0],
                                _decoded(test["test/ship/0000.jpg"]))


def test_cache_is_reused_and_keyed_by_the_tar_file(folder, tmp_path_factory, monkeypatch):
  path, _, _ = folder
  cache_dir = tmp_path_factory.mktemp("cache")
  first = SOURCES.get("cifar10")(path=str(path), cache_dir=str(cache_dir))
  cached = sorted(os.listdir(cache_dir))
  assert len(cached) == 2 and all(name.startswith("cifar10-") and name.endswith(".npz") for name in cached)

  def no_decoding(tar_path):
    raise AssertionError(f"decoded {tar_path} although it is cached")

  monkeypatch.setattr(cifar10_module, "_decode_tar", no_decoding)
  second = SOURCES.get("cifar10")(path=str(path), cache_dir=str(cache_dir))
  for split in ("train", "test"):
    for key in ("image", "label"):
      np.testing.assert_array_equal(second.splits[split].features[key], first.splits[split].features[key])

  # A copy of the same tar (a new modification time) reads the same cache: each fresh copy of the data folder
  # added a decoded copy of its own, 147 MB for the real train tar.
  stat = os.stat(path / "test.tar")
  os.utime(path / "test.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  SOURCES.get("cifar10")(path=str(path), cache_dir=str(cache_dir))
  assert sorted(os.listdir(cache_dir)) == cached
  # A tar whose contents changed gets a new key, so the stale cache is not read.
  with open(path / "test.tar", "ab") as f:
    f.write(b"\0" * 1024)  # (tar end-of-archive padding: the members are the same, the bytes are not)
  with pytest.raises(AssertionError, match="test.tar although it is cached"):
    SOURCES.get("cifar10")(path=str(path), cache_dir=str(cache_dir))


def test_interrupted_cache_write_leaves_no_cache_file(folder, tmp_path_factory, monkeypatch):
  path, _, _ = folder
  cache_dir = tmp_path_factory.mktemp("cache")
  real_savez = np.savez

  def interrupted_savez(file, **arrays):
    file.write(b"PK\x03\x04 half of a zip")
    raise KeyboardInterrupt  # As if the run were stopped in the middle of writing.

  monkeypatch.setattr(cifar10_module.np, "savez", interrupted_savez)
  with pytest.raises(KeyboardInterrupt):
    cifar10_module.read_tar(str(path / "train.tar"), str(cache_dir))
  assert os.listdir(cache_dir) == []

  monkeypatch.setattr(cifar10_module.np, "savez", real_savez)
  images, labels = cifar10_module.read_tar(str(path / "train.tar"), str(cache_dir))
  (cache_file,) = os.listdir(cache_dir)
  # A damaged cache file (e.g. from a bad copy) is decoded again and replaced, never returned.
  (cache_dir / cache_file).write_bytes(b"not an npz")
  again_images, again_labels = cifar10_module.read_tar(str(path / "train.tar"), str(cache_dir))
  np.testing.assert_array_equal(again_images, images)
  np.testing.assert_array_equal(again_labels, labels)
  with np.load(cache_dir / cache_file) as repaired:
    np.testing.assert_array_equal(repaired["image"], images)


def test_missing_files_name_the_file_and_the_fix(folder, tmp_path):
  path, _, _ = folder
  os.remove(path / "test.tar")
  with pytest.raises(FinetuneError, match=r"test\.tar does not exist; set config\.data\.path to a folder with "
                                          r"train\.tar and test\.tar"):
    SOURCES.get("cifar10")(path=str(path))
  with pytest.raises(FinetuneError, match=r"nowhere/train\.tar does not exist"):
    SOURCES.get("cifar10")(path=str(tmp_path / "nowhere"))
  with pytest.raises(FinetuneError, match=r"set config\.data\.path"):
    SOURCES.get("cifar10")()


def test_member_outside_a_class_folder_is_a_user_error(tmp_path):
  _write_tar(tmp_path / "train.tar", {"train/lion/0000.jpg": _jpeg(0)})
  with pytest.raises(FinetuneError, match="'train/lion/0000.jpg' is not under a CIFAR-10 class folder"):
    cifar10_module.read_tar(str(tmp_path / "train.tar"))


def test_real_test_tar():
  tar_path = SHARED_CIFAR10 / "test.tar"
  if not tar_path.is_file():
    pytest.skip(f"real CIFAR-10 not available at {tar_path} (../shared/data/cifar10 exists on dev machines and CI)")
  images, labels = cifar10_module.read_tar(str(tar_path))
  assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
  # Member names sort class by class, and CIFAR-10's class order happens to be alphabetical.
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 1000))
  with tarfile.open(tar_path) as archive:
    first_ship = archive.extractfile("test/ship/0000.jpg").read()
  np.testing.assert_array_equal(images[8000], _decoded(first_ship))
  assert 100 < images.mean() < 140  # Natural images, not blank or saturated decodes.
