"""Random data of a given shape: for the planner, benchmarks and smoke tests of large configs, where only the shapes
of batches matter (no download, nothing to tokenise). Deterministic in `seed`.

`kind='tokens'`: 'input_ids' (N, length) in [0, vocab_size) with all-ones 'attention_mask' (for task='causal_lm'
or token classifiers) and a 'label'; `kind='images'`: 'image' (N, height, width, channels) uint8 and a 'label'.
"""

from __future__ import annotations

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset, refuse_path
from finetune.errors import FinetuneError


@SOURCES.register("synthetic")
def synthetic(path: str = "", cache_dir: str = "", kind: str = "tokens", num_examples: int = 64,
              num_classes: int = 2, length: int = 128, vocab_size: int = 32000, image_shape: tuple = (32, 32, 3),
              seed: int = 0) -> Dataset:
  del cache_dir
  refuse_path("synthetic", path)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_examples).astype(np.int64)
  if kind == "tokens":
    ids = rng.integers(0, vocab_size, (num_examples, length)).astype(np.int32)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "label": labels}
  elif kind == "images":
    features = {"image": rng.integers(0, 256, (num_examples, *image_shape)).astype(np.uint8), "label": labels}
  else:
    raise FinetuneError(f"config.data.options.kind={kind!r}; valid: tokens, images")
  split = ArraySplit(features)
  return Dataset("synthetic", {"train": split, "test": split}, tuple(str(c) for c in range(num_classes)))
