"""Image classification data from local JSON / JSON Lines / CSV / Parquet files, read with Hugging Face `datasets`
(offline, compressed files too; see `tables`).

Splits: a folder `config.data.path` supplies its train* / test* / validation* (or valid*, val*, dev*) files, or the
train_files / test_files / validation_files options name them by glob. A validation split from files is the
validation split: `config.data.validation_fraction` then carves nothing from 'train'.

Images arrive in many shapes, all turned into one numpy array (N, H, W, C):
- nested lists or arrays of numbers (H, W) or (H, W, C), e.g. a JSON list of rows;
- flat lists of H*W*C numbers, reshaped by the `image_shape` option;
- strings of numbers ("0 12 255 ..." or "[0, 12, 255]"), as nested lists come out of a CSV cell;
- `image_key='*'`: every column except the label is one pixel, in column order (the common CSV layout);
- decoded images of a `datasets.Image` feature.
Integer pixels in [0, 255] become uint8; anything else float32.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Sequence

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset
from finetune.data.tables import (class_label_names, class_names_and_labels, file_format, load_tables,
                                   require_scalar_column)
from finetune.errors import FinetuneError

ALL_OTHER_COLUMNS = "*"
# File-name prefixes of each split in a folder, as Hugging Face `datasets` names splits of local data files; a
# prefix counts when the name goes on with a separator, a digit or the extension (so 'values.csv' is no split).
_SPLIT_PREFIXES = {"train": ("train", "training"), "test": ("test", "testing"),
                   "validation": ("validation", "valid", "val", "dev")}


def _expand(patterns: str | Sequence[str], folder: str, option: str) -> list[str]:
  """Files matching each glob (relative globs are relative to `folder`), sorted so the example order is fixed."""
  files = []
  for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
    full_pattern = os.path.join(folder, pattern) if folder and not os.path.isabs(pattern) else pattern
    matched = sorted(f for f in glob.glob(os.path.expanduser(full_pattern), recursive=True) if os.path.isfile(f))
    if not matched:
      raise FinetuneError(f"no file matches {full_pattern!r} ({option}); fix the glob or the path, "
                          "or set config.data.path to the folder that holds the data files")
    files.extend(matched)
  return files


def _files_in_folder(folder: str, split: str) -> list[str]:
  def is_split_file(name: str) -> bool:
    return bool(file_format(name)) and any(re.match(re.escape(prefix) + r"([-_.0-9]|$)", name.lower())
                                           for prefix in _SPLIT_PREFIXES[split])
  return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                if is_split_file(name) and os.path.isfile(os.path.join(folder, name)))


def _split_files(path: str, train_files: str | Sequence[str], test_files: str | Sequence[str],
                 validation_files: str | Sequence[str]) -> dict[str, list[str]]:
  """{'train': [...], 'test': [...], 'validation': [...]} (the splits that have files) from the options; a folder
  `path` supplies its train* / test* / validation* files by default."""
  folder = path if path and os.path.isdir(path) else ""
  if path and not folder and train_files:
    raise FinetuneError(f"both config.data.path ({path!r}, not a folder) and train_files are set; make path the "
                        "folder that train_files/test_files are relative to, or drop train_files")
  if train_files:
    train = _expand(train_files, folder, "train_files")
  elif folder:
    train = _files_in_folder(folder, "train")
    if not train:
      raise FinetuneError(f"no train* file (.json, .jsonl, .csv, .parquet) in folder {folder!r}; add one or set "
                          "the train_files option to a glob of training files")
  elif path:
    train = _expand(path, "", "config.data.path")
  else:
    raise FinetuneError("the hf_files source needs data files: set config.data.path to a folder with train.* / "
                        "test.* files, or set the train_files option to a glob")
  files = {"train": train}
  for split, patterns in (("test", test_files), ("validation", validation_files)):
    found = _expand(patterns, folder, f"{split}_files") if patterns else (
        _files_in_folder(folder, split) if folder else [])
    if found:
      files[split] = found
  return files


def _infer_format(files: list[str]) -> str:
  formats = {file_format(f) for f in files}
  if len(formats) != 1 or None in formats:
    raise FinetuneError(f"cannot tell the file format of {files[:3]}{' ...' if len(files) > 3 else ''} from their "
                        "extensions; set the format option to 'json', 'csv' or 'parquet'")
  return formats.pop()


def _parse_numbers(text: str, where: str) -> np.ndarray:
  """'1 2 3', '1,2,3' or '[[1, 2], [3]]' -> a flat array (int64 when every number is an integer)."""
  tokens = [token for token in re.split(r"[\s,\[\]()]+", text) if token]
  try:
    return np.array(tokens, np.int64)
  except ValueError:
    pass
  try:
    return np.array(tokens, np.float64)
  except ValueError as error:
    raise FinetuneError(f"{where} is a string that is not a list of numbers ({text[:40]!r}...); store pixels as "
                        "numbers, or set image_key to the column that holds them") from error


def _to_images(values: np.ndarray, image_shape: tuple[int, ...], where: str) -> np.ndarray:
  """Column values (numeric array, or object array of per-example arrays / strings / images) -> (N, H, W, C)."""
  if values.dtype.kind in "OUS":  # Per-example arrays of different shapes, strings, or images.
    examples = []
    for index, value in enumerate(values):
      if value is None:
        raise FinetuneError(f"{where} row {index} has no image; remove the row or fill it in")
      examples.append(_parse_numbers(value, f"{where} row {index}") if isinstance(value, str) else np.asarray(value))
    if image_shape:
      examples = [_reshape(example, image_shape, f"{where} row {index}") for index, example in enumerate(examples)]
    shapes = {example.shape for example in examples}
    if len(shapes) > 1:
      raise FinetuneError(f"images in {where} have different shapes {sorted(shapes)[:3]}; resize them to one "
                          "shape, or set image_shape if they are flat lists of the same length")
    images = np.stack(examples) if examples else np.zeros((0, *image_shape))
  else:
    images = values
    if image_shape:
      images = _reshape(images, (len(values), *image_shape), where)
  if images.ndim == 2 and not image_shape:
    raise FinetuneError(f"images in {where} are flat lists of {images.shape[1]} numbers; set image_shape, "
                        "e.g. (28, 28, 1)")
  if images.ndim == 3:  # (N, H, W) grayscale -> (N, H, W, 1)
    images = images[..., None]
  if images.ndim != 4:
    raise FinetuneError(f"images in {where} have shape {images.shape[1:]} per example, not (H, W) or (H, W, C); "
                        "set image_shape to the (H, W, C) to reshape them to")
  if images.dtype == bool:  # black and white: True is full intensity (as 1, it read as 1/255)
    return images.astype(np.uint8) * 255
  if np.issubdtype(images.dtype, np.integer) and (images.size == 0 or (images.min() >= 0 and images.max() <= 255)):
    return images.astype(np.uint8)
  return images.astype(np.float32)


def _reshape(array: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
  if array.size != int(np.prod(shape)):
    raise FinetuneError(f"{where} has {array.size} pixel values, which do not fit image_shape {shape[-3:]}; "
                        "set image_shape to the true (H, W, C) of the images")
  return array.reshape(shape)


def _nested_lists_to_array(column: Any, where: str) -> np.ndarray | None:
  """An Arrow column of equal-length nested number lists -> (N, d1, d2, ...) without Python objects, else None.

  `datasets`' numpy formatting builds a Python list per row, which takes ~30 s for 10k 32x32x3 images; walking the
  Arrow list levels directly takes milliseconds.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top

  values = column.combine_chunks()
  num_rows, dims = len(values), []
  while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(
      values.type):
    if values.null_count:
      raise FinetuneError(f"{where} has missing (null) images or pixel values; fill them in or drop those rows")
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if lengths.size and (lengths != lengths[0]).any():
      return None  # Ragged: the slow path below reports the shapes.
    dims.append(int(lengths[0]) if lengths.size else 0)
    values = values.flatten()
  if not dims or not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
    return None
  if values.null_count:
    raise FinetuneError(f"{where} has missing (null) pixel values; fill them in or drop those rows")
  return values.to_numpy(zero_copy_only=False).reshape(num_rows, *dims)


def _read_split(table: Any, image_key: str, label_key: str, image_shape: tuple[int, ...],
                where: str) -> tuple[np.ndarray, np.ndarray]:
  """(images, raw label column) of one `datasets.Dataset`."""
  columns = table.column_names
  if label_key not in columns:
    raise FinetuneError(f"{where} has no label column {label_key!r} (columns: {', '.join(columns)}); "
                        "set the label_key option to the label column")
  if image_key != ALL_OTHER_COLUMNS and image_key not in columns:
    raise FinetuneError(f"{where} has no image column {image_key!r} (columns: {', '.join(columns)}); set the "
                        f"image_key option to the image column, or to '{ALL_OTHER_COLUMNS}' when every other "
                        "column is one pixel")
  require_scalar_column(table, label_key, where, "label")
  arrow = table.with_format("arrow")[:]  # A pyarrow.Table, rows in dataset order.
  labels = arrow.column(label_key).to_numpy(zero_copy_only=False)
  if image_key == ALL_OTHER_COLUMNS:
    pixel_columns = [column for column in columns if column != label_key]
    empty = [column for column in pixel_columns if arrow.column(column).null_count]
    if empty:  # (an empty CSV cell: the column became float with NaN, and its split would skip the /255 scaling)
      raise FinetuneError(f"{where} has missing (empty) pixel values in column {empty[0]!r}"
                          f"{f' and {len(empty) - 1} more' if len(empty) > 1 else ''}; fill them in or drop those rows")
    values = np.stack([arrow.column(column).to_numpy(zero_copy_only=False) for column in pixel_columns], axis=1)
  else:
    values = _nested_lists_to_array(arrow.column(image_key), where)
    if values is None:  # Strings, ragged lists, `datasets.Image` / `ArrayND` features: let `datasets` convert.
      values = table.with_format("numpy", columns=[image_key])[:][image_key]
  return _to_images(values, image_shape, where), labels


@SOURCES.register("hf_files")
def hf_files(path: str = "", cache_dir: str = "", format: str = "",  # pylint: disable=redefined-builtin
             train_files: str | Sequence[str] = "", test_files: str | Sequence[str] = "",
             validation_files: str | Sequence[str] = "", image_key: str = "image", label_key: str = "label",
             image_shape: Sequence[int] = ()) -> Dataset:
  """Local json/jsonl/csv/parquet files; `cache_dir` (optional) holds the Arrow cache `datasets` writes."""
  files = _split_files(path, train_files, test_files, validation_files)
  if not format:
    format = _infer_format([f for split_files in files.values() for f in split_files])
  loaded = load_tables(files, format, cache_dir)
  image_shape = tuple(int(size) for size in image_shape)
  images, raw_labels = {}, {}
  for split, table in loaded.items():
    images[split], raw_labels[split] = _read_split(table, image_key, label_key, image_shape, f"{split} files")
  kinds = {split: "integers 0..255 (scaled to [0, 1])" if value.dtype == np.uint8 else "floats (used as they are)"
           for split, value in images.items() if len(value)}
  if len(set(kinds.values())) > 1:  # (each split was typed on its own: train in [0, 1], test in 0..255, silently)
    raise FinetuneError(f"the splits' pixels are stored differently: {'; '.join(f'{k}: {v}' for k, v in kinds.items())}"
                        "; store every split's pixels the same way (all integers 0..255, or all floats)")
  class_names, labels = class_names_and_labels(
      raw_labels, {split: class_label_names(table, label_key) for split, table in loaded.items()},
      {split: f"label column {label_key!r} of the {split} files" for split in loaded})
  splits = {split: ArraySplit({"image": images[split], "label": labels[split]}) for split in loaded}
  return Dataset("hf_files", splits, class_names)
