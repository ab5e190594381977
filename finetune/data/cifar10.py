"""CIFAR-10 from a folder with `train.tar` and `test.tar` of JPEGs (`<split>/<class>/NNNN.jpg`), as in ../shared/data.

Decoding 60,000 JPEGs takes seconds, not milliseconds, so the decoded arrays are cached as one `.npz` per tar under
`cache_dir`. The cache key is the tar's name, size and modification time: replacing the tar makes a new key, so a
stale cache is never read. The cache is written to a temporary file and renamed into place, so a run killed midway
leaves either no cache or a complete one.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import zipfile

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset
from finetune.errors import FinetuneError

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
# Part of the cache key: bump it when the decoding below changes, so old caches are not reused.
_CACHE_VERSION = 1


def _cache_file(tar_path: str, cache_dir: str) -> str:
  """Keyed by the tar's contents (about 0.3 s for the 77 MB train tar): keyed by its size and modification time,
  every fresh copy of the same tar (a re-provisioned data folder) added another 147 MB decoded copy, never removed,
  and an edit that kept both would have read the stale one."""
  digest = hashlib.blake2b(digest_size=16)
  with open(tar_path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  stem = os.path.basename(tar_path).removesuffix(".tar")
  return os.path.join(cache_dir, f"cifar10-{stem}-{digest.hexdigest()}-v{_CACHE_VERSION}.npz")


def _decode_tar(tar_path: str) -> tuple[np.ndarray, np.ndarray]:
  """All images and labels of one tar, ordered by member name so every run sees the same order."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  label_of = {name: index for index, name in enumerate(CLASS_NAMES)}
  members = []
  try:
    with tarfile.open(tar_path) as archive:
      for member in archive:
        if not member.isfile():
          continue
        parts = member.name.split("/")
        class_name = parts[-2] if len(parts) >= 2 else ""
        if class_name not in label_of:
          raise FinetuneError(f"{tar_path} member {member.name!r} is not under a CIFAR-10 class folder "
                              f"({' '.join(CLASS_NAMES)}); set config.data.path to the original CIFAR-10 JPEG tars")
        members.append((member.name, label_of[class_name], archive.extractfile(member).read()))
  except tarfile.TarError as error:
    raise FinetuneError(f"{tar_path} is not a readable tar file ({error}); re-copy it, or set config.data.path to "
                        "a folder with the original CIFAR-10 train.tar and test.tar") from error
  members.sort(key=lambda item: item[0])

  images = np.empty((len(members), *IMAGE_SHAPE), np.uint8)
  labels = np.array([label for _, label, _ in members], np.int64)
  for index, (name, _, data) in enumerate(members):
    try:
      with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    except OSError as error:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors.
      raise FinetuneError(f"{tar_path} member {name!r} is not a readable image ({error}); re-copy the tar, or set "
                          "config.data.path to a folder with the original CIFAR-10 train.tar and test.tar") from error
    if pixels.shape != IMAGE_SHAPE:
      raise FinetuneError(f"{tar_path} member {name!r} is {pixels.shape[1]}x{pixels.shape[0]}, not 32x32; "
                          "set config.data.path to the original CIFAR-10 JPEG tars")
    images[index] = pixels
  return images, labels


def _load_cache(cache_file: str) -> tuple[np.ndarray, np.ndarray] | None:
  """The cached arrays, or None when there is no cache yet or it is unreadable (then it is decoded and rewritten)."""
  try:
    with np.load(cache_file) as cached:
      return cached["image"], cached["label"]
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    return None


def _write_cache(cache_file: str, images: np.ndarray, labels: np.ndarray) -> None:
  cache_dir = os.path.dirname(cache_file)
  try:
    os.makedirs(cache_dir, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".npz")
  except OSError as error:
    raise FinetuneError(f"cannot write the CIFAR-10 cache in {cache_dir} ({error.strerror}); set cache_dir to a "
                        "writable folder, or to '' to decode the tars on every run") from error
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, image=images, label=labels)
    os.replace(temp_path, cache_file)
  except BaseException:
    os.unlink(temp_path)
    raise


def read_tar(tar_path: str, cache_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 (N, 32, 32, 3) and labels int64 (N,) of one CIFAR-10 tar, through the cache when `cache_dir`."""
  if not os.path.isfile(tar_path):
    raise FinetuneError(f"CIFAR-10 file {tar_path} does not exist; set config.data.path to a folder with "
                        "train.tar and test.tar (e.g. ../shared/data/cifar10)")
  if not cache_dir:
    return _decode_tar(tar_path)
  cache_file = _cache_file(tar_path, cache_dir)
  cached = _load_cache(cache_file)
  if cached is not None:
    return cached
  images, labels = _decode_tar(tar_path)
  _write_cache(cache_file, images, labels)
  return images, labels


@SOURCES.register("cifar10")
def cifar10(path: str = "", cache_dir: str = "") -> Dataset:
  """CIFAR-10; `path` is the folder with train.tar and test.tar, `cache_dir` (optional) keeps decoded arrays."""
  if not path:
    raise FinetuneError("the cifar10 source needs a folder: set config.data.path to a folder with train.tar and "
                        "test.tar (e.g. ../shared/data/cifar10)")
  splits = {}
  for split in ("train", "test"):
    images, labels = read_tar(os.path.join(path, f"{split}.tar"), cache_dir)
    splits[split] = ArraySplit({"image": images, "label": labels})
  return Dataset("cifar10", splits, CLASS_NAMES)
