"""Local json / jsonl / csv / parquet tables read with Hugging Face `datasets`, and their class labels: what the
hf_files (images) and text_classification (sentences) sources share.

`datasets.load_dataset(<format>, data_files=...)` reads local files without the Hub, so this works offline. It
also handles compressed files (`.jsonl.gz`, `.csv.gz`, ...) and the `ClassLabel` feature that `datasets` writes
into Parquet metadata.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import os
from typing import Any, Sequence

import numpy as np

from finetune.errors import FinetuneError

_FORMAT_OF_EXTENSION = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst")
FORMATS = ("json", "csv", "parquet")


def file_format(filename: str) -> str | None:
  """'json' / 'csv' / 'parquet' from the extension (after any compression extension), or None."""
  stem = filename
  for compression in _COMPRESSION_EXTENSIONS:
    stem = stem.removesuffix(compression)
  return _FORMAT_OF_EXTENSION.get(os.path.splitext(stem)[1].lower())


def load_tables(files: dict[str, list[str]], format: str,  # pylint: disable=redefined-builtin
                cache_dir: str = "") -> Any:
  """{split: files} -> a `datasets.DatasetDict` with those splits; unreadable files are one FinetuneError."""
  import datasets  # pylint: disable=g-import-not-at-top

  if format not in FORMATS:
    raise FinetuneError(f"unsupported format {format!r}; set the format option to 'json', 'csv' or 'parquet' "
                        "(or to '' to infer it from the file extensions)")
  tables = {}
  for split, split_files in files.items():
    # One split at a time: loaded together, every split takes the first one's features, so a ClassLabel numbered
    # per split (`class_encode_column` on each file) kept its own numbers under the train split's names.
    if format == "csv":
      for path in split_files:
        _check_csv_fields(path)
    try:
      tables[split] = datasets.load_dataset(format, data_files={split: split_files}, split=split,
                                            cache_dir=os.path.join(cache_dir, "hf_datasets") if cache_dir else None)
    except FinetuneError:
      raise
    except (ValueError, StopIteration) as error:
      if isinstance(error, StopIteration) or "corresponds to no data" in str(error):  # (an empty JSON file: the former)
        raise FinetuneError(f"the {split} files {split_files} hold no rows; fill them in or leave that split's file "
                            "option empty") from None
      raise _unreadable(split_files, format, error) from error
    except Exception as error:  # pylint: disable=broad-except  (pyarrow, gzip, EOF: a damaged file, however it fails)
      raise _unreadable(split_files, format, error) from error
  return datasets.DatasetDict(tables)


def _unreadable(split_files: list[str], fmt: str, error: Exception) -> FinetuneError:
  cause = error.__cause__ or error
  reason = str(cause).splitlines()[0] if str(cause) else ""
  return FinetuneError(f"could not read {split_files} as {fmt}: {type(cause).__name__}"
                       f"{': ' + reason if reason else ''}; fix the files or set the format option")


def _check_csv_fields(path: str) -> None:
  """Refuses a CSV row with more fields than its header: pandas (under `datasets`) then reads the first column as
  the index and shifts every other one left, silently (the label column held the last text field)."""
  # (The compressions `datasets` reads; .zst needs the zstandard package: left to datasets' own read to name.)
  openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}
  opener = next((o for extension, o in openers.items() if path.endswith(extension)), open)
  if opener is None:
    return
  try:
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
      rows = csv.reader(f)
      header = next(rows, None)
      for number, row in enumerate(rows, start=2):
        if header is not None and len(row) > len(header):
          raise FinetuneError(f"{path}: row {number} has {len(row)} fields but the header has {len(header)} "
                              f"({', '.join(header)}); quote fields that hold commas, or fix the row")
  except (OSError, EOFError, csv.Error, UnicodeError):
    return  # (unreadable here: datasets' own read names the problem)


def require_scalar_column(table: Any, key: str, filename: str, what: str) -> None:
  """Column `key` holds one `what` ('text': strings; 'label': integers, strings, booleans, floats or a ClassLabel)
  per row. `datasets` types a JSON column whose rows mix types as Json and hands back each value's JSON text
  ('"good movie"', quotes included; labels "pos" and 1 became classes '"pos"' and '1'), and a column of lists as a
  list column (one row's three sentences became one text, "['a', 'b', 'c']"): both were read as they came."""
  import datasets  # pylint: disable=g-import-not-at-top

  feature = table.features[key]
  if what == "label" and isinstance(feature, datasets.ClassLabel):
    return
  dtype = getattr(feature, "dtype", None) if isinstance(feature, datasets.Value) else None
  allowed = ("string", "large_string") if what == "text" else (
      "string", "large_string", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
      "float16", "float32", "float64")
  if dtype in allowed:
    return
  kind = "a string" if what == "text" else "an integer, string or ClassLabel"
  if type(feature).__name__ == "Json":  # (rows of different JSON types)
    values = table.with_format("python")[key]
    first = type(values[0])
    row = next((i for i, value in enumerate(values) if type(value) is not first), 0)
    raise FinetuneError(f"{filename}: column {key!r} mixes value types (row 0: {values[0]!r}, row {row}: "
                        f"{values[row]!r}); write every {what} as {kind}")
  raise FinetuneError(f"{filename}: column {key!r} holds {feature} values; each row's {what} must be {kind}"
                      + (" (one example per row, not a list)" if "List" in type(feature).__name__ else ""))


def class_label_names(table: Any, label_key: str) -> tuple[str, ...] | None:
  """The names of a `datasets.ClassLabel` column, or None for a plain column."""
  import datasets  # pylint: disable=g-import-not-at-top

  feature = table.features.get(label_key)
  return tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _renumbered(values: np.ndarray, own_names: Sequence[str] | None, train_names: Sequence[str] | None,
                where: str) -> np.ndarray:
  """A split's ClassLabel indices in the train split's numbering. `class_encode_column` run on each split alone
  numbers each split's own classes (a test file without 'neu' has 'pos' = 1 where train has 'pos' = 2): read
  against train's names, its labels were silently wrong."""
  if own_names is None or train_names is None or tuple(own_names) == tuple(train_names):
    return values
  train_index = {name: i for i, name in enumerate(train_names)}
  unknown = sorted(set(own_names) - set(train_index))
  if unknown:
    raise FinetuneError(f"{where} has classes the train split does not have ({', '.join(map(repr, unknown))}; train "
                        f"has {', '.join(map(repr, train_names))}); give every split the same ClassLabel names")
  mapping = np.array([train_index[name] for name in own_names], np.int64)
  out_of_range = (values < 0) | (values >= len(own_names))
  if out_of_range.any():
    raise FinetuneError(f"{where} holds label {values[np.argmax(out_of_range)]}, outside its ClassLabel's "
                        f"{len(own_names)} names; drop unlabelled rows (-1) or fix the column")
  return mapping[values.astype(np.int64)]


def _missing(values: np.ndarray) -> np.ndarray:
  """Which rows hold no value: None in an object column, NaN in a float one (how a CSV's empty cell arrives)."""
  if values.dtype == object:
    return np.array([value is None for value in values], bool)
  if values.dtype.kind == "f":
    return np.isnan(values)
  return np.zeros(len(values), bool)


def class_names_and_labels(raw: dict[str, np.ndarray], names: dict[str, Sequence[str] | None],
                           where: dict[str, str]) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
  """Class names and int64 labels per split: the train split's ClassLabel names (`names[split]`, None for a plain
  column), else the sorted string labels (numbers written as text in numeric order), else str(0..max).
  `where[split]` says where that split's labels come from, for the error messages."""
  for split, values in raw.items():
    missing = _missing(values)
    if missing.any():
      raise FinetuneError(f"row {int(np.argmax(missing))} of {where[split]} has no label ({int(missing.sum())} "
                          "such rows); drop those rows or label them")
  if names.get("train") is None and "train" in raw and raw["train"].dtype.kind in "OUS":
    # Train's labels are class names: a split with a ClassLabel gives its names too (its integers, read as names
    # "0", "1", ..., became classes of their own).
    raw = {split: np.array([names[split][int(v)] for v in values], object) if names.get(split) and
           values.dtype.kind in "iu" else values for split, values in raw.items()}
  raw = {split: _renumbered(values, names.get(split), names.get("train"), where[split])
         for split, values in raw.items()}
  names = names.get("train")
  named = {split for split, values in raw.items() if values.dtype.kind in "OUS"}
  if names is not None:  # train's ClassLabel: another split's string labels are its names
    raw = {split: _indices(values, names, where[split]) if split in named else values
           for split, values in raw.items()}
  elif named and len(named) < len(raw):
    if not all(_is_whole_number(value) for split in named for value in raw[split]):
      numbered = sorted(set(raw) - named)
      raise FinetuneError(f"labels in {where[sorted(named)[0]]} are class names but those in {where[numbered[0]]} "
                          "are numbers, so they cannot be matched; give every split the same kind of label column")
    raw = {split: np.array([int(v) for v in values], np.int64) if split in named else values
           for split, values in raw.items()}  # "3" in one file, 3 in another: the same class
  elif named:
    # The classes are the train split's: a label found only in a test file (a typo, say) would otherwise become a
    # class of its own and renumber the others.
    names = _sorted_names({str(value) for value in raw["train"]} if "train" in raw else
                          {str(value) for values in raw.values() for value in values})
    index = {name: i for i, name in enumerate(names)}
    for split, values in raw.items():
      unknown = sorted({str(v) for v in values} - set(index))
      if unknown:
        raise FinetuneError(f"labels in {where[split]} include {', '.join(map(repr, unknown[:3]))}, which the train "
                            f"split does not have (its classes: {', '.join(map(repr, names[:10]))}"
                            f"{', ...' if len(names) > 10 else ''}); fix the labels or the file")
    return tuple(names), {split: np.array([index[str(v)] for v in values], np.int64) for split, values in raw.items()}
  labels = {}
  for split, values in raw.items():
    if values.dtype.kind not in "iub" and not np.all(np.equal(np.mod(values, 1), 0)):
      example = values[np.argmax(np.mod(values, 1) != 0)]
      raise FinetuneError(f"labels in {where[split]} are not whole numbers (e.g. {example}); labels are class "
                          "indices 0..K-1 or class names: point the label option at the class column")
    labels[split] = values.astype(np.int64)
    if labels[split].size and labels[split].min() < 0:
      raise FinetuneError(f"labels in {where[split]} include {labels[split].min()}; labels are class indices "
                          "0..K-1 (or class names), so renumber them (-1/+1 as 0/1), drop unlabelled rows, or "
                          "point a table's label option at its class column")
    if names is not None and labels[split].size and labels[split].max() >= len(names):
      raise FinetuneError(f"labels in {where[split]} include {labels[split].max()}, but the train split's ClassLabel "
                          f"has {len(names)} classes ({', '.join(map(repr, names))}); fix the column or its file")
  if names is None:  # classes 0..the train split's largest label (as for names: train's, not the union)
    counted = {"train": labels["train"]} if "train" in labels else labels
    num_classes = max((int(values.max()) + 1 for values in counted.values() if values.size), default=0)
    names = [str(i) for i in range(num_classes)]
    for split, values in labels.items():
      if values.size and values.max() >= num_classes:
        raise FinetuneError(f"labels in {where[split]} include {values.max()}, but the train split's largest label "
                            f"is {num_classes - 1}; fix the labels or the file")
  return tuple(names), labels


def _indices(values: np.ndarray, names: Sequence[str], where: str) -> np.ndarray:
  """String labels as indices of the train split's ClassLabel names."""
  index = {name: i for i, name in enumerate(names)}
  unknown = sorted({str(v) for v in values} - set(index))
  if unknown:
    raise FinetuneError(f"labels in {where} include {', '.join(map(repr, unknown[:3]))}, not among the train "
                        f"split's ClassLabel names ({', '.join(map(repr, names))}); fix the column or its file")
  return np.array([index[str(v)] for v in values], np.int64)


def _sorted_names(names: set[str]) -> list[str]:
  """Class names in sorted order; numbers written as text ("2", "10") in numeric order, not text order ("10" before
  "2" renumbered the classes against the numbers they are)."""
  if all(_is_whole_number(name) for name in names):
    return sorted(names, key=lambda name: (int(name), name))
  return sorted(names)


def _is_whole_number(value: Any) -> bool:
  try:
    return str(int(str(value))) == str(value).strip()
  except ValueError:
    return False
