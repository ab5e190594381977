"""The hf_files source on JSON Lines, CSV and Parquet files written here, read offline through `datasets`."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest

import finetune.data.hf_files  # noqa: F401  (registers the source)
from finetune.data import SOURCES
from finetune.errors import FinetuneError


def _images(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def _load(tmp_path: pathlib.Path, **options):
  # The Arrow cache `datasets` writes goes under tmp_path too, not into ~/.cache.
  return SOURCES.get("hf_files")(cache_dir=str(tmp_path / "cache"), **options)


def _write_jsonl(filename: pathlib.Path, rows: list[dict]) -> None:
  filename.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_jsonl_folder_with_nested_grayscale_lists(tmp_path):
  train, test = _images(5, (3, 4), 0), _images(2, (3, 4), 1)
  data = tmp_path / "data"
  data.mkdir()
  _write_jsonl(data / "train.jsonl", [{"image": image.tolist(), "label": int(label)}
                                      for image, label in zip(train, [0, 2, 1, 2, 0])])
  _write_jsonl(data / "test.jsonl", [{"image": image.tolist(), "label": 1} for image in test])
  dataset = _load(tmp_path, path=str(data))
  assert dataset.name == "hf_files" and dataset.class_names == ("0", "1", "2")
  assert sorted(dataset.splits) == ["test", "train"]
  batch = dataset.splits["train"].take(np.arange(5))
  assert batch["image"].shape == (5, 3, 4, 1) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"][..., 0], train)
  np.testing.assert_array_equal(batch["label"], [0, 2, 1, 2, 0])
  assert batch["label"].dtype == np.int64
  np.testing.assert_array_equal(dataset.splits["test"].take(np.arange(2))["image"][..., 0], test)
  np.testing.assert_array_equal(dataset.splits["test"].labels(), [1, 1])



def test_splits_must_store_pixels_alike_and_boolean_pixels_are_full_intensity(tmp_path):
  """(Each split was typed on its own: integer train pixels were scaled to [0, 1], float test pixels of the same
  image stayed 0..255; and True read as 1/255.)"""
  _write_jsonl(tmp_path / "train.jsonl", [{"image": [[200, 100], [50, 0]], "label": 0}])
  _write_jsonl(tmp_path / "test.jsonl", [{"image": [[200.0, 100.5], [50.0, 0.0]], "label": 0}])
  with pytest.raises(FinetuneError, match=r"the splits' pixels are stored differently: train: integers 0..255 "
                                          r"\(scaled to \[0, 1\]\); test: floats \(used as they are\)"):
    _load(tmp_path, path=str(tmp_path))
  boolean = tmp_path / "boolean"
  boolean.mkdir()
  _write_jsonl(boolean / "train.jsonl", [{"image": [[True, False], [False, True]], "label": 0}])
  images = _load(tmp_path, path=str(boolean)).splits["train"].take(np.arange(1))["image"]
  assert images.dtype == np.uint8 and images[0, ..., 0].tolist() == [[255, 0], [0, 255]]


def test_a_split_with_its_own_class_label_numbering_is_renumbered(tmp_path):
  """(Loaded in one `load_dataset` call, every split took the train split's features, so a test file whose own
  ClassLabel lacks a class kept its numbers under train's names.)"""
  import datasets  # pylint: disable=g-import-not-at-top
  for name, names, labels in (("train", ["no", "maybe", "yes"], [2, 0, 1]), ("test", ["no", "yes"], [1, 0])):
    features = datasets.Features({"image": datasets.Array3D((4, 4, 3), "uint8"),
                                  "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"image": _images(len(labels), (4, 4, 3), 5), "label": labels},
                               features=features).to_parquet(str(tmp_path / f"{name}.parquet"))
  dataset = _load(tmp_path, path=str(tmp_path), train_files="train.parquet", test_files="test.parquet")
  np.testing.assert_array_equal(dataset.splits["test"].labels(), [2, 0])  # yes, no


def test_json_flat_float_pixels_reshaped_by_image_shape(tmp_path):
  pixels = np.random.default_rng(2).random((3, 2 * 2 * 3)).astype(np.float32)
  _write_jsonl(tmp_path / "all.json", [{"pixels": row.tolist(), "y": i % 2} for i, row in enumerate(pixels)])
  dataset = _load(tmp_path, train_files=str(tmp_path / "*.json"), image_key="pixels", label_key="y",
                  image_shape=[2, 2, 3])
  images = dataset.splits["train"].take(np.arange(3))["image"]
  assert list(dataset.splits) == ["train"] and images.dtype == np.float32
  np.testing.assert_array_equal(images, pixels.reshape(3, 2, 2, 3))
  assert dataset.class_names == ("0", "1")


def test_csv_pixel_columns_and_string_labels(tmp_path):
  images = _images(4, (2, 2), 3)
  with open(tmp_path / "train.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["species", *(f"p{i}" for i in range(4))])
    for image, species in zip(images, ["owl", "cat", "owl", "ant"]):
      writer.writerow([species, *image.reshape(-1)])
  dataset = _load(tmp_path, path=str(tmp_path / "train.csv"), image_key="*", label_key="species",
                  image_shape=(2, 2, 1))
  assert dataset.class_names == ("ant", "cat", "owl")
  batch = dataset.splits["train"].take(np.arange(4))
  np.testing.assert_array_equal(batch["image"][..., 0], images)
  np.testing.assert_array_equal(batch["label"], [2, 1, 2, 0])


def test_csv_cells_holding_lists(tmp_path):
  images = _images(2, (2, 3), 4)
  with open(tmp_path / "train.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["label", "image"])
    writer.writerow([1, json.dumps(images[0].tolist())])  # "[[1, 2, 3], [4, 5, 6]]"
    writer.writerow([0, " ".join(map(str, images[1].reshape(-1)))])  # "1 2 3 4 5 6"
  dataset = _load(tmp_path, path=str(tmp_path), image_shape=(2, 3))
  batch = dataset.splits["train"].take(np.arange(2))
  assert batch["image"].shape == (2, 2, 3, 1) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"][..., 0], images)
  np.testing.assert_array_equal(batch["label"], [1, 0])
  assert dataset.class_names == ("0", "1")


def test_parquet_with_class_label_feature(tmp_path):
  import datasets  # pylint: disable=g-import-not-at-top

  features = datasets.Features({"image": datasets.Array3D((4, 4, 3), "uint8"),
                                "label": datasets.ClassLabel(names=["no", "maybe", "yes"])})
  train, test = _images(3, (4, 4, 3), 5), _images(2, (4, 4, 3), 6)
  datasets.Dataset.from_dict({"image": train, "label": [2, 0, 2]}, features=features).to_parquet(
      str(tmp_path / "train-00000.parquet"))
  datasets.Dataset.from_dict({"image": test, "label": [1, 1]}, features=features).to_parquet(
      str(tmp_path / "held_out.parquet"))
  dataset = _load(tmp_path, path=str(tmp_path), test_files="held_out.parquet")
  assert dataset.class_names == ("no", "maybe", "yes")
  batch = dataset.splits["train"].take(np.array([2, 0]))
  assert batch["image"].shape == (2, 4, 4, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"], train[[2, 0]])
  np.testing.assert_array_equal(batch["label"], [2, 2])
  np.testing.assert_array_equal(dataset.splits["test"].take(np.arange(2))["image"], test)
  np.testing.assert_array_equal(dataset.splits["test"].labels(), [1, 1])


@pytest.mark.parametrize("options, message", [
    ({"path": ""}, "set config.data.path to a folder"),
    ({"path": "nowhere/*.jsonl"}, r"no file matches 'nowhere/\*\.jsonl'"),
    ({"train_files": "missing.json"}, r"no file matches .*missing\.json.*train_files"),
    ({"format": "xml"}, "set the format option to 'json', 'csv' or 'parquet'"),
    ({"image_key": "pixels"}, r"no image column 'pixels' \(columns: image, label\); set the image_key option"),
    ({"label_key": "y"}, "no label column 'y'.*set the label_key option"),
    ({"image_shape": (2, 2)}, "do not fit image_shape"),
])
def test_user_errors_say_how_to_fix(tmp_path, options, message):
  _write_jsonl(tmp_path / "train.jsonl", [{"image": [[1, 2, 3]], "label": 0}])
  with pytest.raises(FinetuneError, match=message):
    _load(tmp_path, **{"path": str(tmp_path), **options})


def test_ragged_and_flat_images_without_image_shape_are_user_errors(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", [{"image": [[1, 2]], "label": 0}, {"image": [[1, 2, 3]], "label": 0}])
  with pytest.raises(FinetuneError, match="different shapes"):
    _load(tmp_path, path=str(tmp_path))
  _write_jsonl(tmp_path / "train.jsonl", [{"image": [1, 2, 3, 4], "label": 0}])
  with pytest.raises(FinetuneError, match="flat lists of 4 numbers; set image_shape"):
    _load(tmp_path, path=str(tmp_path))


def test_validation_files_become_the_validation_split(tmp_path):
  images = _images(5, (2, 2), 8)
  _write_jsonl(tmp_path / "train.jsonl", [{"image": images[i].tolist(), "label": i % 2} for i in range(3)])
  _write_jsonl(tmp_path / "dev.jsonl", [{"image": images[3].tolist(), "label": 1}])
  _write_jsonl(tmp_path / "values.jsonl", [{"image": images[4].tolist(), "label": 0}])  # 'val' + letters: no split
  dataset = _load(tmp_path, path=str(tmp_path))
  assert sorted(dataset.splits) == ["train", "validation"]
  np.testing.assert_array_equal(dataset.splits["validation"].take(np.array([0]))["image"][..., 0], images[3:4])
  dataset = _load(tmp_path, path=str(tmp_path), validation_files="values.jsonl")
  np.testing.assert_array_equal(dataset.splits["validation"].labels(), [0])
  # The pipeline keeps the source's validation split and carves nothing from 'train'.
  from finetune.config import defaults  # pylint: disable=g-import-not-at-top
  from finetune.data.pipeline import build_pipeline  # pylint: disable=g-import-not-at-top
  data = defaults().data
  data.name, data.path, data.validation_fraction, data.batch_size = "hf_files", str(tmp_path), 0.5, 1
  data.cache_dir = str(tmp_path / "cache")
  pipeline = build_pipeline(data, seed=0)
  assert len(pipeline.train) == 3 and len(pipeline.eval_splits["validation"]) == 1


@pytest.mark.parametrize("split, labels, message", [
    ("test", [0, None], r"row 1 of label column 'label' of the test files has no label \(1 such rows\)"),
    ("test", [0, -1], r"labels in label column 'label' of the test files include -1"),
    # Alone, since `datasets` gives all splits the train files' schema (int64 labels would refuse 1.5 itself).
    ("train", [0, 1.5], r"labels in label column 'label' of the train files are not whole numbers \(e.g. 1.5\)"),
    # (classes '"cat"' and '1', JSON text with its quotes)
    ("train", ["cat", 1], r"train files: column 'label' mixes value types \(row 0: 'cat', row 1: 1\)"),
], ids=["null", "negative", "fraction", "mixed-types"])
def test_bad_labels_name_their_split(tmp_path, split, labels, message):
  _write_jsonl(tmp_path / "train.jsonl", [{"image": [[1]], "label": 0}, {"image": [[2]], "label": 1}])
  _write_jsonl(tmp_path / f"{split}.jsonl", [{"image": [[1]], "label": label} for label in labels])
  with pytest.raises(FinetuneError, match=message):
    _load(tmp_path, path=str(tmp_path))


def test_empty_csv_label_cell_is_a_missing_label(tmp_path):
  (tmp_path / "train.csv").write_text("label,p0,p1\n1,0,255\n,3,4\n")
  with pytest.raises(FinetuneError, match=r"row 1 of label column 'label' of the train files has no label"):
    _load(tmp_path, path=str(tmp_path), image_key="*", image_shape=(1, 2, 1))


def test_an_empty_pixel_cell_is_refused(tmp_path):
  """(With image_key='*' the column became float with NaN, so the whole split skipped the /255 scaling.)"""
  (tmp_path / "train.csv").write_text("label,p0,p1\n1,0,255\n0,3,4\n")
  (tmp_path / "test.csv").write_text("label,p0,p1\n1,0,\n0,3,4\n")
  with pytest.raises(FinetuneError, match=r"test files has missing \(empty\) pixel values in column 'p1'"):
    _load(tmp_path, path=str(tmp_path), image_key="*", image_shape=(1, 2, 1))
