"""scikit-learn's 8x8 handwritten digits (1,797 images): the smallest real image set, for quick tests."""

from __future__ import annotations

import numpy as np

from finetune.data import SOURCES
from finetune.errors import FinetuneError
from finetune.data.dataset import ArraySplit, Dataset


@SOURCES.register("digits")
def digits(path: str = "", cache_dir: str = "") -> Dataset:
  """All 1,797 images as 'train' (pixel values 0..16 rescaled to 0..255); carve evaluation data from it."""
  del cache_dir
  if path:  # (it was ignored: a run meant for a data folder trained on these instead)
    raise FinetuneError(f"data source 'digits' reads no files, but config.data.path={path!r}; drop the path, or "
                        "name the source that reads it (config.data.name)")
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8) -> (N, 8, 8, 1)
  split = ArraySplit({"image": images, "label": bunch.target.astype(np.int64)})
  return Dataset("digits", {"train": split}, tuple(str(d) for d in range(10)))
