"""TensorFlow Datasets prepared on disk, read by random access through `tfds.data_source` (no TensorFlow needed).

`tfds.data_source` reads the `array_record` files that `tfds build <name> --file_format=array_record` writes and
decodes examples with numpy and PIL, so TensorFlow never has to be installed. Nothing is downloaded here
(`download=False`): machines that train are often offline, so a dataset that is not prepared is a user error that
says how to prepare it, not a silent multi-hour download.

Examples stay on disk: `take` reads only the requested records, so datasets larger than memory work. `labels` reads
every label once (skipping image decoding) and keeps them, because class filtering needs all of them.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import Dataset
from finetune.errors import FinetuneError

_LABEL_READ_CHUNK = 4096  # Records per batched read when collecting all labels.


class TfdsSplit:
  """One TFDS split as a `Split`: a lazy view over a `tfds.data_source` sequence of example dicts."""

  def __init__(self, source: Sequence[dict[str, Any]], open_labels_source: Callable[[], Sequence[dict[str, Any]]],
               image_key: str, label_key: str, empty_image: np.ndarray, where: str, num_classes: int | None = None):
    self._source = source
    self._num_classes = num_classes  # (a ClassLabel's; None: checked against the train split by the source)
    self._open_labels_source = open_labels_source
    self._image_key = image_key
    self._label_key = label_key
    self._empty_image = empty_image  # What `take([])` returns: shape (0, H, W, C) of the image dtype.
    self._where = where
    self._labels: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self._source)

  def labels(self) -> np.ndarray:
    if self._labels is None:
      source = self._open_labels_source()
      labels = np.empty(len(source), np.int64)
      for start in range(0, len(labels), _LABEL_READ_CHUNK):
        keys = list(range(start, min(start + _LABEL_READ_CHUNK, len(labels))))
        labels[start:start + len(keys)] = [record[self._label_key] for record in source.__getitems__(keys)]
      self._check_labels(labels)
      self._labels = labels
    return self._labels

  def _check_labels(self, labels: np.ndarray) -> None:
    if self._num_classes is None or not labels.size:
      return
    bad = labels[(labels < 0) | (labels >= self._num_classes)]
    if bad.size:
      raise FinetuneError(f"{self._where} has label {int(bad[0])}, outside its {self._num_classes} classes (-1: "
                          "examples without a label, as some datasets' test splits): leave that split out with the "
                          "splits option, e.g. {'train': 'train[:90%]', 'test': 'train[90%:]'}")

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    keys = [int(index) for index in np.asarray(indices).reshape(-1)]
    # `__getitems__` is the batched read: array_record fetches the records of each shard file together.
    records = self._source.__getitems__(keys) if keys else []
    images = [np.asarray(record[self._image_key]) for record in records]
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
      raise FinetuneError(f"{self._where} has images of different sizes {sorted(shapes)[:2]}; the tfds source "
                          "needs one image size: use a resized variant of the dataset (e.g. imagenet_resized/32x32)")
    labels = np.array([record[self._label_key] for record in records], np.int64)
    self._check_labels(labels)
    return {"image": np.stack(images) if images else self._empty_image, "label": labels}


def _not_found_hint(name: str, data_dir: str) -> str:
  where = data_dir or "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  return (f"prepare it on a machine with internet access with `tfds build {name} --data_dir=DIR "
          f"--file_format=array_record`, copy DIR here and set the data_dir option to it (looked in {where})")


def _open(name: str, split: str, data_dir: str, decoders: Mapping[str, Any] | None = None) -> Sequence[dict]:
  """`tfds.data_source` for one split, with TFDS's errors turned into FinetuneErrors that say how to fix them."""
  import tensorflow_datasets as tfds_lib  # pylint: disable=g-import-not-at-top

  try:
    source = tfds_lib.data_source(name, split=split, data_dir=data_dir or None, download=False, decoders=decoders)
    size = len(source)  # (a reversed slice, 'train[5:2]', fails here)
  except tfds_lib.core.DatasetNotFoundError as error:
    raise FinetuneError(f"TFDS dataset {name!r} not found (neither a TFDS catalog name nor prepared under the "
                        f"data_dir){_other_versions(name, data_dir)}; check the name option, or "
                        f"{_not_found_hint(name, data_dir)}") from error
  except NotImplementedError as error:  # What TFDS raises for a registered dataset with no array_record files.
    raise FinetuneError(f"TFDS dataset {name!r} is not prepared in array_record format"
                        f"{_other_versions(name, data_dir)}; {_not_found_hint(name, data_dir)}") from error
  except ValueError as error:  # a split or slice TFDS cannot read (an empty slice fails in array_record)
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    raise FinetuneError(f"TFDS dataset {name!r} split {split!r}: {reason}; set the splits option to TFDS split "
                        "names or non-empty slices, e.g. {'train': 'train', 'test': 'test'} or "
                        "{'train': 'train[:90%]', 'test': 'test'}") from error
  if not size:
    raise FinetuneError(f"TFDS dataset {name!r} split {split!r} holds no examples; choose a non-empty split or slice "
                        "with the splits option")
  return source


def _other_versions(name: str, data_dir: str) -> str:
  """', prepared here: 3.0.0 (name it 'mnist:3.0.0')' when the data_dir holds other versions of the dataset than
  the one the installed TFDS expects (it reads only its own unless the name pins one)."""
  base = name.split(":")[0]
  folder = os.path.join(os.path.expanduser(data_dir), *base.split("/")) if data_dir else ""
  if not folder or not os.path.isdir(folder):
    return ""
  versions = sorted(entry for entry in os.listdir(folder)
                    if entry[:1].isdigit() and os.path.isdir(os.path.join(folder, entry)))
  return (f", but the data_dir holds version{'s' if len(versions) > 1 else ''} {', '.join(versions)} (name one, e.g. "
          f"'{base}:{versions[-1]}')" if versions else "")


@SOURCES.register("tfds")
def tfds(path: str = "", cache_dir: str = "", name: str = "", data_dir: str = "",
         splits: Mapping[str, str] | None = None, image_key: str = "image", label_key: str = "label") -> Dataset:
  """A prepared TFDS dataset; `data_dir` defaults to `path`, then to TFDS's default. `cache_dir` is unused."""
  del cache_dir  # The array_record files are already random access: there is nothing to cache.
  import tensorflow_datasets as tfds_lib  # pylint: disable=g-import-not-at-top

  if not name:
    raise FinetuneError("the tfds source needs a dataset: set the name option to a TFDS name, e.g. 'cifar10' or "
                        "'mnist:3.0.1'")
  data_dir = data_dir or path
  split_names = dict(splits) if splits else {"train": "train"}
  if "train" not in split_names:
    raise FinetuneError(f"the splits option {split_names} has no 'train' entry; add one, e.g. "
                        "{'train': 'train', 'test': 'test'}")
  unknown = sorted(set(split_names) - {"train", "validation", "test"})
  if unknown:  # (read by nothing: a 'val' key left validation carved from train)
    raise FinetuneError(f"the splits option's keys are this run's splits, train, validation and test; got "
                        f"{', '.join(map(repr, unknown))}: e.g. {{'train': 'train', 'validation': 'validation'}}")
  sources = {split: _open(name, tfds_split, data_dir) for split, tfds_split in split_names.items()}
  info = sources["train"].dataset_info
  if not splits:
    # The dataset's own validation and test splits, as the other sources use theirs (data.validation_fraction
    # carves a validation split from train only when the dataset has none).
    for split in ("validation", "test"):
      if split in info.splits:
        split_names[split] = split
        sources[split] = _open(name, split, data_dir)

  features = info.features
  for option, key in (("image_key", image_key), ("label_key", label_key)):
    if key not in features:
      raise FinetuneError(f"TFDS dataset {name!r} has no feature {key!r} (features: {', '.join(features)}); set the "
                          f"{option} option to one of them")
  image_feature = features[image_key]
  if not isinstance(image_feature, (tfds_lib.features.Image, tfds_lib.features.Tensor)) or isinstance(
      image_feature, tfds_lib.features.Text) or not np.issubdtype(np.dtype(image_feature.np_dtype), np.number):
    # (Accepted before, then training failed converting the first batch's strings to numbers.)
    raise FinetuneError(f"TFDS dataset {name!r}: feature {image_key!r} is {type(image_feature).__name__}, but the tfds "
                        "source reads images (or numeric tensors) only; set image_key to one, or for text use the "
                        "text_classification source on the dataset's files")
  if None in tuple(getattr(image_feature, "shape", ())):
    # (Caught only when a batch happened to mix sizes: after compiling, perhaps deep into training.)
    raise FinetuneError(f"TFDS dataset {name!r} declares {image_key!r} of any size {tuple(image_feature.shape)}; the "
                        "tfds source needs one image size: use a resized variant of the dataset (e.g. "
                        "imagenet_resized/32x32) or resize the images when preparing it")
  # Reading labels only: skip decoding the images, by far the costliest part of a record.
  label_decoders = {image_key: tfds_lib.decode.SkipDecoding()} if isinstance(
      image_feature, tfds_lib.features.Image) else None
  empty_image = np.zeros((0, *(size or 0 for size in image_feature.shape)), getattr(image_feature, "np_dtype", None))
  label_feature = features[label_key]
  num_classes = label_feature.num_classes if isinstance(label_feature, tfds_lib.features.ClassLabel) else None
  dataset_splits = {}
  for split, source in sources.items():
    open_labels = functools.partial(_open, name, split_names[split], data_dir, decoders=label_decoders)
    dataset_splits[split] = TfdsSplit(source, open_labels, image_key, label_key, empty_image,
                                      f"TFDS {name} {split_names[split]}", num_classes)

  if num_classes is not None:
    class_names = tuple(label_feature.names)
    for split in ("validation", "test"):
      if split in dataset_splits:
        # An unlabelled split (-1 throughout) found now by its first records, not at the end of training (every
        # batch read is checked too). (Reading only labels needs TensorFlow under tfds.testing.mock_data.)
        dataset_splits[split].take(np.arange(min(16, len(dataset_splits[split]))))
  else:  # A plain integer feature: classes are 0..the train split's largest label.
    train = dataset_splits.get("train")
    num_classes = int(train.labels().max()) + 1 if train is not None and len(train) else 0
    for split, data in dataset_splits.items():
      if len(data) and int(data.labels().max()) >= num_classes:
        raise FinetuneError(f"TFDS {name} {split_names[split]} has label {int(data.labels().max())}, but the train "
                            f"split's largest is {num_classes - 1}; its classes must be the train split's")
    class_names = tuple(str(i) for i in range(num_classes))
  return Dataset(name, dataset_splits, class_names)
