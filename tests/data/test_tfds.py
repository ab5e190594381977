"""The tfds source, without TensorFlow: a tiny dataset really built on disk, plus `tfds.testing.mock_data`.

The on-disk dataset exercises the real path (array_record files, `tfds.data_source`, PIL decoding) with known
pixels. It is built by a builder that is not registered, so loading it goes through the prepared files only, as
for a dataset built elsewhere with `tfds build` and copied here.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

import finetune.data.tfds  # noqa: F401  (registers the source)
from finetune.data import SOURCES
from finetune.errors import FinetuneError

tfds_lib = pytest.importorskip("tensorflow_datasets")

NAME = "finetune_tiny_images"
CLASSES = ["cat", "dog", "eel"]


def _image(offset: int, index: int) -> np.ndarray:
  image = np.full((4, 5, 3), offset + index, np.uint8)
  image[0, 0] = (index * 7, 200, 3)
  return image


class FinetuneTinyImages(tfds_lib.core.GeneratorBasedBuilder, skip_registration=True):
  """6 train + 3 test 4x5 RGB images with known pixels; image i of a split has label i % 3."""

  name = NAME
  VERSION = tfds_lib.core.Version("1.0.0")

  def _info(self):
    return tfds_lib.core.DatasetInfo(builder=self, features=tfds_lib.features.FeaturesDict({
        "image": tfds_lib.features.Image(shape=(4, 5, 3)),
        "label": tfds_lib.features.ClassLabel(names=CLASSES),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(6, 0), "test": self._generate_examples(3, 100)}

  def _generate_examples(self, count: int, offset: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    for index in range(count):
      # PNG bytes, not arrays: TFDS encodes arrays with TensorFlow, bytes it stores as they are.
      png = io.BytesIO()
      Image.fromarray(_image(offset, index)).save(png, format="PNG")
      yield index, {"image": png.getvalue(), "label": index % 3}


class FinetuneTinyAnySize(FinetuneTinyImages, skip_registration=True):
  """The same images, declared of any size (as e.g. oxford_flowers102 declares its own)."""

  name = "finetune_tiny_any_size"

  def _info(self):
    return tfds_lib.core.DatasetInfo(builder=self, features=tfds_lib.features.FeaturesDict({
        "image": tfds_lib.features.Image(shape=(None, None, 3)),
        "label": tfds_lib.features.ClassLabel(names=CLASSES),
    }))


class FinetuneTinyThreeSplits(FinetuneTinyImages, skip_registration=True):
  """train, validation and test (4 + 3 + 2); with `unlabelled_test`, the test labels are -1 (no label)."""

  name = "finetune_tiny_three_splits"
  unlabelled_test = False

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(4, 0), "validation": self._generate_examples(3, 50),
            "test": self._generate_examples(2, 100, -1 if self.unlabelled_test else None)}

  def _generate_examples(self, count: int, offset: int, label: int | None = None):
    for key, example in super()._generate_examples(count, offset):
      yield key, {**example, "label": example["label"] if label is None else label}


class FinetuneTinyUnlabelledTest(FinetuneTinyThreeSplits, skip_registration=True):
  name = "finetune_tiny_unlabelled_test"
  unlabelled_test = True


class FinetuneTinyText(tfds_lib.core.GeneratorBasedBuilder, skip_registration=True):
  name = "finetune_tiny_text"
  VERSION = tfds_lib.core.Version("1.0.0")

  def _info(self):
    return tfds_lib.core.DatasetInfo(builder=self, features=tfds_lib.features.FeaturesDict({
        "text": tfds_lib.features.Text(), "label": tfds_lib.features.ClassLabel(names=["neg", "pos"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for index in range(4):
      yield index, {"text": f"review {index}", "label": index % 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tfds"))
  FinetuneTinyImages(data_dir=directory, file_format="array_record").download_and_prepare()
  return directory


def _generated_index(image: np.ndarray) -> int:
  return int(image[0, 0, 0]) // 7  # See `_image`: TFDS stores examples shuffled, so find each one by its pixels.


def test_reads_prepared_dataset_by_random_access(data_dir):
  dataset = SOURCES.get("tfds")(name=NAME, data_dir=data_dir)
  assert dataset.name == NAME and dataset.class_names == tuple(CLASSES)
  assert sorted(dataset.splits) == ["test", "train"]
  train, test = dataset.splits["train"], dataset.splits["test"]
  assert (len(train), len(test)) == (6, 3)

  everything = train.take(np.arange(6))
  assert everything["image"].shape == (6, 4, 5, 3) and everything["image"].dtype == np.uint8
  generated = [_generated_index(image) for image in everything["image"]]
  assert sorted(generated) == list(range(6))
  np.testing.assert_array_equal(everything["image"], np.stack([_image(0, index) for index in generated]))
  np.testing.assert_array_equal(everything["label"], [index % 3 for index in generated])
  assert everything["label"].dtype == np.int64
  np.testing.assert_array_equal(train.labels(), everything["label"])

  batch = train.take(np.array([4, 1, 4]))
  np.testing.assert_array_equal(batch["image"], everything["image"][[4, 1, 4]])
  np.testing.assert_array_equal(batch["label"], everything["label"][[4, 1, 4]])

  test_images = test.take(np.arange(3))["image"]
  for position, image in enumerate(test_images):
    index = int(image[0, 0, 0]) // 7
    np.testing.assert_array_equal(image, _image(100, index))
    assert test.labels()[position] == index % 3

  empty = train.take(np.array([], np.int64))
  assert empty["image"].shape == (0, 4, 5, 3) and empty["label"].shape == (0,)


def test_path_is_the_data_dir_and_splits_take_tfds_slices(data_dir):
  full = SOURCES.get("tfds")(name=NAME, data_dir=data_dir).splits["train"]
  dataset = SOURCES.get("tfds")(path=data_dir, name=NAME, splits={"train": "train[2:5]", "test": "train[:2]"})
  assert sorted(dataset.splits) == ["test", "train"]
  np.testing.assert_array_equal(dataset.splits["train"].labels(), full.labels()[2:5])
  np.testing.assert_array_equal(dataset.splits["test"].take(np.array([1]))["image"],
                                full.take(np.array([1]))["image"])


@pytest.mark.parametrize("options, message", [
    ({}, "set the name option"),
    ({"name": "no_such_dataset_xyz"}, "tfds build no_such_dataset_xyz"),
    ({"name": NAME, "splits": {"train": "validation"}}, "set the splits option"),
    ({"name": NAME, "splits": {"test": "test"}}, "no 'train' entry"),
    ({"name": NAME, "label_key": "class"}, "set the label_key option"),
    # (A traceback from the split's length, and one from array_record, before.)
    ({"name": NAME, "splits": {"train": "train[5:2]"}}, r"split 'train\[5:2\]': .*non-empty slices"),
    ({"name": NAME, "splits": {"train": "train", "test": "test[3:]"}}, r"split 'test\[3:\]'.*non-empty"),
    # (Read by nothing: validation was carved from train while the user thought it was the dataset's own.)
    ({"name": NAME, "splits": {"train": "train", "val": "test"}}, r"keys are this run's splits, train, validation "
                                                                 r"and test; got 'val'"),
    # (Another version than the installed TFDS expects was said to be 'not prepared in array_record format'.)
    ({"name": NAME + ":2.0.0"}, r"but the data_dir holds version 1.0.0 \(name one, e.g. 'finetune_tiny_images:"
                                r"1.0.0'\)"),
], ids=["no-name", "unknown", "bad-split", "no-train", "label-key", "reversed", "empty", "unknown-key", "version"])
def test_user_errors_say_how_to_fix(data_dir, options, message):
  with pytest.raises(FinetuneError, match=message):
    SOURCES.get("tfds")(data_dir=data_dir, **options)


def test_catalog_dataset_not_prepared_says_tfds_build(tmp_path):
  with pytest.raises(FinetuneError, match=r"not prepared.*tfds build mnist --data_dir=DIR --file_format=array_record"):
    SOURCES.get("tfds")(name="mnist", data_dir=str(tmp_path))


def test_mock_data_without_tensorflow(monkeypatch):
  """`mock_data` (policy AUTO, which falls back to USE_CODE here) gives random examples of a catalog dataset."""
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top

  # TFDS 4.9.10 bug: the mock's `__getitems__` is a plain partial set on a MagicMock, so it is not bound to the
  # data source and misses an argument. Batched reads are what `take` uses; make the mock answer them.
  monkeypatch.setattr(mocking, "_getitems", lambda keys, generator, serialized=False: [generator[k] for k in keys])
  with tfds_lib.testing.mock_data(num_examples=5):
    dataset = SOURCES.get("tfds")(name="cifar10", splits={"train": "train", "test": "test"})
  # USE_CODE knows only what cifar10's builder code declares, ClassLabel(num_classes=10): the real names are read
  # from the downloaded files, so the mock's names are '0'..'9'.
  assert dataset.name == "cifar10" and dataset.class_names == tuple(str(i) for i in range(10))
  train = dataset.splits["train"]
  assert len(train) == 5 and len(dataset.splits["test"]) == 5
  batch = train.take(np.array([3, 0]))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int64 and all(0 <= label < 10 for label in batch["label"])
  # The mock's examples are a pure function of the index: the same record reads the same twice.
  np.testing.assert_array_equal(train.take(np.array([0]))["image"][0], batch["image"][1])


def test_mock_data_default_splits_are_train_only_when_tfds_knows_no_splits():
  # Under USE_CODE, TFDS does not know which splits exist, so only the always-present 'train' is opened.
  with tfds_lib.testing.mock_data(num_examples=3):
    dataset = SOURCES.get("tfds")(name="mnist")
  assert list(dataset.splits) == ["train"] and len(dataset.splits["train"]) == 3
  assert dataset.class_names == tuple(str(i) for i in range(10))


def test_images_of_any_size_are_refused_when_loading(tmp_path):
  """(Refused only when a batch happened to mix image sizes: after compiling, perhaps deep into training.)"""
  FinetuneTinyAnySize(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  with pytest.raises(FinetuneError, match=r"TFDS dataset 'finetune_tiny_any_size' declares 'image' of any size "
                                          r"\(None, None, 3\); the tfds source needs one image size: use a resized"):
    SOURCES.get("tfds")(data_dir=str(tmp_path), name="finetune_tiny_any_size")


def test_the_dataset_s_own_validation_split_is_used(tmp_path):
  """(Only train and test were opened: validation was carved from train and the dataset's own went unused.)"""
  FinetuneTinyThreeSplits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  dataset = SOURCES.get("tfds")(data_dir=str(tmp_path), name="finetune_tiny_three_splits")
  assert {split: len(data) for split, data in dataset.splits.items()} == {"train": 4, "validation": 3, "test": 2}
  # The validation images are the dataset's own (`_image(50, i)`: every pixel but the first is 50 + i).
  pixels = sorted(int(image[1, 1, 0]) for image in dataset.splits["validation"].take(np.arange(3))["image"])
  assert pixels == [50, 51, 52]


def test_unlabelled_splits_and_text_features_are_refused_when_loading(tmp_path):
  """(A test split of -1 labels scored loss 0 and accuracy 0 with no warning; a text feature was accepted, then
  training failed converting the first batch's strings to numbers.)"""
  FinetuneTinyUnlabelledTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  with pytest.raises(FinetuneError, match=r"TFDS finetune_tiny_unlabelled_test test has label -1, outside its 3 "
                                          r"classes .* leave that split out with the splits option"):
    SOURCES.get("tfds")(data_dir=str(tmp_path), name="finetune_tiny_unlabelled_test")
  train_only = SOURCES.get("tfds")(data_dir=str(tmp_path), name="finetune_tiny_unlabelled_test",
                                   splits={"train": "train", "validation": "validation"})
  assert sorted(train_only.splits) == ["train", "validation"]
  FinetuneTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  with pytest.raises(FinetuneError, match=r"feature 'text' is Text, but the tfds source reads images"):
    SOURCES.get("tfds")(data_dir=str(tmp_path), name="finetune_tiny_text", image_key="text")

