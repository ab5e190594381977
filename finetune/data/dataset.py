"""The contract every data source meets, and the in-memory implementation most of them use.

A source is a function registered in `finetune.data.SOURCES`:

    @SOURCES.register('name')
    def name(path: str = '', cache_dir: str = '', **options) -> Dataset

It returns a `Dataset`: named splits ('train', and 'test' when the source has one) of random-access examples.
Random access (rather than an iterator) is what makes shuffling, resumption and per-process sharding exact: the
batch of training step `s` is a pure function of `(seed, s)`, so a resumed run sees the same examples in the same
order as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Protocol

import numpy as np

from finetune.errors import FinetuneError


class Split(Protocol):
  """Random-access examples of one split. Features are numpy arrays with a leading example axis."""

  def __len__(self) -> int:
    ...

  def labels(self) -> np.ndarray:
    """All integer labels, shape (N,): used for class filtering without decoding the inputs."""
    ...

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices` as a batch: {'image': (B, H, W, C), 'label': (B,)}."""
    ...


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """A split held in memory as numpy arrays (all the small research datasets)."""

  features: Mapping[str, np.ndarray]

  def __post_init__(self):
    sizes = {key: len(value) for key, value in self.features.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"features have different numbers of examples: {sizes}")

  def __len__(self) -> int:
    return len(next(iter(self.features.values())))

  def labels(self) -> np.ndarray:
    if "label" not in self.features:  # language-model text has tokens, not labels
      raise FinetuneError("this data has no labels, so config.data.classes cannot filter it; leave it empty")
    return np.asarray(self.features["label"], np.int64)

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value[indices] for key, value in self.features.items()}


@dataclasses.dataclass(frozen=True)
class SubsetSplit:
  """A view of `base` restricted to `indices`, with labels renumbered through `label_map` (old -> new)."""

  base: Split
  indices: np.ndarray
  label_map: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.indices)

  def labels(self) -> np.ndarray:
    labels = self.base.labels()[self.indices]
    return labels if self.label_map is None else self.label_map[labels]

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    batch = dict(self.base.take(self.indices[indices]))
    if self.label_map is not None:
      batch["label"] = self.label_map[batch["label"]]
    return batch


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What a source returns: named splits plus the class names (index = label)."""

  name: str
  splits: Mapping[str, Split]
  class_names: tuple[str, ...]
  # Builds the split that trains from the rows of splits['train'] that train (after validation is carved from them),
  # for sources whose training examples are not those rows: packed instruction data concatenates the kept
  # conversations into blocks, and a block carved into validation would hold parts of trained conversations.
  # None: the rows themselves train.
  train_from_rows: Callable[[np.ndarray], Split] | None = None
  # Checks the rows carved into validation, where the source could not check splits['train']'s rows as examples
  # (packed instruction data: its rows are conversations cut at max_length, which only validation scores). Raises
  # or warns; None: nothing to check.
  check_validation_rows: Callable[[np.ndarray], None] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def refuse_path(source: str, path: str) -> None:
  """For sources that read no files: a config.data.path would be ignored (a run meant for a data folder trained on
  the built-in data instead)."""
  if path:
    raise FinetuneError(f"data source {source!r} reads no files, but config.data.path={path!r}; drop the path, or "
                        "name the source that reads it (config.data.name)")
