"""scikit-learn's 8x8 handwritten digits (1,797 images): the smallest real image set, for quick tests."""

from __future__ import annotations

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset, refuse_path


@SOURCES.register("digits")
def digits(path: str = "", cache_dir: str = "") -> Dataset:
  """All 1,797 images as 'train' (pixel values 0..16 rescaled to 0..255); carve evaluation data from it."""
  del cache_dir
  refuse_path("digits", path)
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8) -> (N, 8, 8, 1)
  split = ArraySplit({"image": images, "label": bunch.target.astype(np.int64)})
  return Dataset("digits", {"train": split}, tuple(str(d) for d in range(10)))
