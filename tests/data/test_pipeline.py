"""The input pipeline on real data (sklearn's 8x8 digits) and on id-encoded splits that make coverage exact."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from finetune.config import defaults
from ml_collections import ConfigDict
from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset
from finetune.data.pipeline import (augment, augment_params, build_pipeline, epoch_permutation, stratified_order,
                                    with_rehearsal)
from finetune.errors import FinetuneError

NUM_DIGITS = 1797
ANIMALS = ("cat", "dog", "bird")
_ANIMAL_SOURCE = "test_pipeline_animals"


def _animals(path: str = "", cache_dir: str = "") -> Dataset:
  """12 train / 6 test examples; the image's one pixel holds the example's id, the label its class."""
  del path, cache_dir
  train_labels = np.arange(12) % 3
  test_labels = np.array([2, 2, 1, 0, 1, 2])
  train = ArraySplit({"image": np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1), "label": train_labels})
  test = ArraySplit({"image": (100 + np.arange(6, dtype=np.uint8)).reshape(6, 1, 1, 1), "label": test_labels})
  return Dataset("animals", {"train": train, "test": test}, ANIMALS)


if _ANIMAL_SOURCE not in SOURCES:
  SOURCES.register(_ANIMAL_SOURCE)(_animals)

_VALIDATING_SOURCE = "test_pipeline_animals_with_validation"


def _animals_with_validation(path: str = "", cache_dir: str = "") -> Dataset:
  """The animals, plus a 'validation' split of their own (as text_classification's validation_file gives)."""
  animals = _animals(path, cache_dir)
  validation = ArraySplit({"image": (200 + np.arange(3, dtype=np.uint8)).reshape(3, 1, 1, 1),
                           "label": np.arange(3)})
  return Dataset("animals", {**animals.splits, "validation": validation}, ANIMALS)


if _VALIDATING_SOURCE not in SOURCES:
  SOURCES.register(_VALIDATING_SOURCE)(_animals_with_validation)


def test_a_sources_validation_split_is_used_and_nothing_is_carved_from_train():
  cfg = _data_cfg(name=_VALIDATING_SOURCE, batch_size=4, eval_splits=("validation",))
  assert cfg.validation_fraction > 0  # the default
  pipeline = build_pipeline(cfg, seed=0)
  assert len(pipeline.train) == 12  # every training example trains
  assert pipeline.eval_splits["validation"].take(np.arange(3))["image"].ravel().tolist() == [200, 201, 202]


def _data_cfg(**overrides):
  cfg = defaults().data
  cfg.name = "digits"
  cfg.batch_size = 32
  cfg.eval_batch_size = 64
  for key, value in overrides.items():
    if key in ("crop_padding", "flip"):
      cfg.augment[key] = value
    else:
      cfg[key] = value
  return cfg


@pytest.fixture(scope="module")
def digits_data():
  return SOURCES.get("digits")()


@pytest.fixture(scope="module")
def pipe():
  return build_pipeline(_data_cfg(), seed=0)


def _id_split(n: int) -> ArraySplit:
  """Float32 images whose only pixel is the example id (float input is passed through unscaled)."""
  return ArraySplit({"image": np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), "label": np.arange(n) % 10})


def _ids(batch) -> np.ndarray:
  return batch["image"].reshape(len(batch["image"])).astype(np.int64)


# ------------------------------------------------------------------------------------------ splits and classes


def test_digits_pipeline_basics(pipe):
  assert pipe.dataset_name == "digits"
  assert pipe.class_names == tuple(str(d) for d in range(10))
  assert pipe.num_classes == 10
  assert list(pipe.eval_splits) == ["validation"]  # digits has no 'test'; the default asks for both.
  assert len(pipe.eval_splits["validation"]) == 180  # round(0.1 * 1797)
  assert len(pipe.train) == NUM_DIGITS - 180
  assert pipe.steps_per_epoch == (NUM_DIGITS - 180) // 32
  batch = pipe.train_batch(0)
  assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["image"].max() == 1.0  # uint8 255 -> 1.0


def test_class_filter_keeps_and_relabels(digits_data):
  pipe = build_pipeline(_data_cfg(classes=(0, 1, 2)), seed=0)
  assert pipe.class_names == ("0", "1", "2")
  assert pipe.num_classes == 3
  original = digits_data.splits["train"].labels()
  total = len(pipe.train) + len(pipe.eval_splits["validation"])
  assert total == int(np.isin(original, [0, 1, 2]).sum())
  for split in (pipe.train, pipe.eval_splits["validation"]):
    labels = split.labels()
    assert set(labels.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(split.take(np.arange(len(split)))["label"], labels)


def test_class_filter_order_given_is_label_order(digits_data):
  pipe = build_pipeline(_data_cfg(classes=(7, 3), validation_fraction=0.2, batch_size=8), seed=0)
  assert pipe.class_names == ("7", "3")
  base = digits_data.splits["train"].take(np.arange(NUM_DIGITS))
  for split in (pipe.train, pipe.eval_splits["validation"]):
    batch = split.take(np.arange(len(split)))
    for image, label in zip(batch["image"], batch["label"]):
      # The same image exists in the original data with label 7 (new 0) or 3 (new 1).
      matches = np.flatnonzero((base["image"] == image).all(axis=(1, 2, 3)))
      assert {7: 0, 3: 1}[int(base["label"][matches[0]])] == label
  assert len(pipe.train) + len(pipe.eval_splits["validation"]) == int(np.isin(base["label"], [7, 3]).sum())


def test_class_names_as_strings(digits_data):
  pipe = build_pipeline(_data_cfg(classes=("3", "5")), seed=0)
  assert pipe.class_names == ("3", "5")
  original = digits_data.splits["train"].labels()
  assert len(pipe.train) + len(pipe.eval_splits["validation"]) == int(np.isin(original, [3, 5]).sum())
  animals = build_pipeline(_data_cfg(name=_ANIMAL_SOURCE, classes=("bird", "cat"), batch_size=2,
                                     validation_fraction=0.25), seed=0)
  assert animals.class_names == ("bird", "cat")
  train_and_val = [animals.train, animals.eval_splits["validation"]]
  for split in train_and_val:
    batch = split.take(np.arange(len(split)))
    ids = batch["image"].reshape(-1).astype(int)
    np.testing.assert_array_equal(batch["label"], np.where(ids % 3 == 2, 0, 1))  # bird (2) -> 0, cat (0) -> 1
    assert not np.any(ids % 3 == 1)  # No dogs.
  assert sum(len(s) for s in train_and_val) == 8
  test = animals.eval_splits["test"].take(np.arange(len(animals.eval_splits["test"])))
  np.testing.assert_array_equal(test["image"].reshape(-1), [100, 101, 103, 105])  # The test split is filtered.
  np.testing.assert_array_equal(test["label"], [0, 0, 1, 0])
  assert list(animals.eval_splits) == ["validation", "test"]


def test_validation_disjoint_and_same_across_seeds():
  a = build_pipeline(_data_cfg(), seed=0)
  b = build_pipeline(_data_cfg(), seed=123)
  val_a, val_b = a.eval_splits["validation"], b.eval_splits["validation"]
  np.testing.assert_array_equal(val_a.indices, val_b.indices)
  np.testing.assert_array_equal(val_a.take(np.arange(180))["image"], val_b.take(np.arange(180))["image"])
  assert set(val_a.indices.tolist()).isdisjoint(a.train.indices.tolist())
  assert sorted([*val_a.indices, *a.train.indices]) == list(range(NUM_DIGITS))
  # A random subset, not the first 10% of the file.
  assert val_a.indices.max() > 1000 and val_a.indices.min() < 100


def test_validation_fraction_sets_size():
  pipe = build_pipeline(_data_cfg(validation_fraction=0.25), seed=0)
  assert len(pipe.eval_splits["validation"]) == round(0.25 * NUM_DIGITS)


@pytest.mark.parametrize("kind", ["skewed", "many_rare", "zipf"])
def test_every_cut_of_a_stratified_order_holds_each_class_in_its_share(kind):
  """(Sorting rows by rank within class over class size bunched rare classes, which tie at the same fractions:
  45 rows off for the 900-row class beside 100 single rows.)"""
  rng = np.random.default_rng(0)
  labels = {"skewed": rng.choice(6, size=900, p=[0.5, 0.2, 0.15, 0.1, 0.04, 0.01]),
            "many_rare": np.r_[np.zeros(900, np.int64), np.arange(1, 101)],
            "zipf": np.unique(rng.zipf(1.5, 3000), return_inverse=True)[1]}[kind]
  order = stratified_order(rng.permutation(len(labels)), labels)
  assert sorted(order.tolist()) == list(range(len(labels)))
  onehot = np.eye(labels.max() + 1)[labels[order]]  # (N, classes): row m is the class of place m
  share = onehot.sum(0) / len(labels)
  cut = np.arange(1, len(labels) + 1)[:, None]
  for counts in (np.cumsum(onehot, 0), np.cumsum(onehot[::-1], 0)):  # every prefix, every suffix
    assert np.abs(counts - cut * share).max() < 1.05, kind


def test_stratify_carves_validation_class_by_class_and_smaller_subsets_nest_in_larger():
  """A small labelled subset ('train' at a large validation fraction) keeps every class in its share; the train
  rows of a larger fraction are inside those of a smaller one, and every seed sees the same ones."""
  labels = SOURCES.get("digits")().splits["train"].labels()
  share = np.bincount(labels) / NUM_DIGITS

  def train_rows(fraction, stratify, seed=0):
    pipe = build_pipeline(_data_cfg(validation_fraction=fraction, stratify=stratify, batch_size=8), seed=seed)
    assert len(pipe.eval_splits["validation"]) == round(fraction * NUM_DIGITS)
    return pipe.train.indices

  for fraction in (0.5, 0.95, 0.98):
    rows = train_rows(fraction, True)
    assert np.abs(np.bincount(labels[rows], minlength=10) - len(rows) * share).max() < 2, fraction
  # The premise: 36 rows drawn plainly are off by more (here digit 2 has 8 rows, 0 and 1 one each; shares 3.5-3.7).
  plain = train_rows(0.98, False)
  assert np.abs(np.bincount(labels[plain], minlength=10) - len(plain) * share).max() > 2
  assert set(train_rows(0.98, True)) <= set(train_rows(0.95, True)) <= set(train_rows(0.5, True))
  np.testing.assert_array_equal(train_rows(0.95, True, seed=7), train_rows(0.95, True))


def test_stratify_without_a_carved_split_or_labels_is_refused():
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(FinetuneError, match=r"config.data.stratify carves the validation split class by class, and "
                                          r"config.data.validation_fraction is 0"):
    build_config({"data": {"name": "digits", "validation_fraction": 0.0, "stratify": True,
                           "eval_splits": ("test",)}, "train": {"steps": 1}})
  with pytest.raises(FinetuneError, match=r"config.data.stratify carves validation class by class, and "
                                          r"'test_pipeline_unlabelled' has no classes"):
    build_pipeline(_data_cfg(name=_UNLABELLED_SOURCE, stratify=True, batch_size=2), seed=0)
  with pytest.warns(UserWarning, match=r"config.data.stratify does nothing here: .* has a validation split of its own"):
    build_pipeline(_data_cfg(name=_VALIDATING_SOURCE, stratify=True, batch_size=2), seed=0)
  with pytest.raises(FinetuneError, match=r"stage 'b' carves its validation split with config.data.stratify=True "
                                          r"from the data its source 'stage:a' carved with False"):
    build_config({"data": {"name": "digits"}, "train": {"steps": 1},
                  "stages": {"a": {}, "b": {"init_from": "stage:a", "data": {"stratify": True}}}})


# ------------------------------------------------------------------------------------------- training order


def test_train_batch_deterministic_per_seed():
  a = build_pipeline(_data_cfg(), seed=7)
  b = build_pipeline(_data_cfg(), seed=7)
  c = build_pipeline(_data_cfg(), seed=8)
  for step in (0, 1, a.steps_per_epoch + 3):
    np.testing.assert_array_equal(a.train_batch(step)["image"], b.train_batch(step)["image"])
    np.testing.assert_array_equal(a.train_batch(step)["label"], b.train_batch(step)["label"])
    assert not np.array_equal(a.train_batch(step)["image"], c.train_batch(step)["image"])
  assert not np.array_equal(a.train_batch(0)["image"], a.train_batch(1)["image"])


def test_train_batches_cover_each_example_at_most_once_per_epoch(pipe):
  ids = dataclasses.replace(pipe, train=_id_split(100), batch_size=8)
  assert ids.steps_per_epoch == 12  # 100 // 8: the last partial batch is dropped.
  for epoch in range(2):
    seen = np.concatenate([_ids(ids.train_batch(epoch * 12 + s)) for s in range(12)])
    assert len(seen) == 96
    assert len(set(seen.tolist())) == 96
    assert set(seen.tolist()) <= set(range(100))
  epoch0 = np.concatenate([_ids(ids.train_batch(s)) for s in range(12)])
  epoch1 = np.concatenate([_ids(ids.train_batch(12 + s)) for s in range(12)])
  assert not np.array_equal(epoch0, epoch1)  # A new permutation each epoch.
  assert ids.train_batch(5)["label"].tolist() == (_ids(ids.train_batch(5)) % 10).tolist()


def test_train_batches_of_real_epoch_are_disjoint(pipe):
  # Identify examples by their position in pipe.train through a split whose pixels are the ids.
  ids = dataclasses.replace(pipe, train=_id_split(len(pipe.train)))
  seen = np.concatenate([_ids(ids.train_batch(s)) for s in range(pipe.steps_per_epoch)])
  assert len(set(seen.tolist())) == len(seen) == pipe.steps_per_epoch * 32


# ---------------------------------------------------------------------------------------------- evaluation


def test_eval_batches_visit_every_example_once(pipe):
  batches = list(pipe.eval_batches("validation"))
  assert len(batches) == 3  # 180 examples in batches of 64
  for batch in batches:
    assert batch["image"].shape == (64, 8, 8, 1)
    assert batch["label"].shape == (64,) and batch["mask"].shape == (64,)
  assert sum(int(b["mask"].sum()) for b in batches) == 180
  assert batches[-1]["mask"].tolist() == [1] * 52 + [0] * 12
  validation = pipe.eval_splits["validation"]
  real_labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(real_labels, validation.labels())

  ids = dataclasses.replace(pipe, eval_splits={"validation": _id_split(150)}, eval_batch_size=40)
  batches = list(ids.eval_batches("validation"))
  assert [len(b["mask"]) for b in batches] == [40, 40, 40, 40]
  seen = np.concatenate([_ids(b)[b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(seen, np.arange(150))


def test_eval_batches_exact_multiple_has_no_padding(pipe):
  ids = dataclasses.replace(pipe, eval_splits={"validation": _id_split(120)}, eval_batch_size=40)
  batches = list(ids.eval_batches("validation"))
  assert len(batches) == 3
  assert all(b["mask"].all() for b in batches)


# -------------------------------------------------------------------------------------------- multi-process


def test_train_batch_rows_follow_the_epoch_permutation(pipe):
  """Not sorted by index: with data stored by class, sorted rows made each micro-batch of gradient accumulation
  (and each process's slice) nearly one class."""
  ids = dataclasses.replace(pipe, train=_id_split(100), batch_size=8, seed=3)
  order = np.random.default_rng([3, 0]).permutation(100)
  np.testing.assert_array_equal(_ids(ids.train_batch(1)), order[8:16])
  np.testing.assert_array_equal(ids.train_batch(1)["label"], order[8:16] % 10)


def test_an_epochs_permutation_is_drawn_once_not_at_every_step(pipe):
  """(Each step drew its epoch's whole permutation again: 27 ms of host time per step at 1.28 M rows.)"""
  ids = dataclasses.replace(pipe, train=_id_split(100), batch_size=8, seed=5)  # 12 steps per epoch
  epoch_permutation.cache_clear()
  batches = [_ids(ids.train_batch(step)) for step in range(24)]
  assert epoch_permutation.cache_info().misses == 2  # epochs 0 and 1
  for epoch in (0, 1):
    order = np.random.default_rng([5, epoch]).permutation(100)
    np.testing.assert_array_equal(np.concatenate(batches[12 * epoch:12 * epoch + 12]), order[:96])


def test_process_parts_concatenate_to_global_train_batch(pipe):
  single = dataclasses.replace(pipe, train=_id_split(100), batch_size=8)
  parts = [dataclasses.replace(single, process_index=i, process_count=2) for i in range(2)]
  for step in range(4):
    whole = single.train_batch(step)
    halves = [p.train_batch(step) for p in parts]
    assert all(len(h["label"]) == 4 for h in halves)
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), whole["label"])


def test_process_parts_concatenate_to_global_augmented_batch(pipe):
  single = dataclasses.replace(pipe, crop_padding=2, flip=True)
  parts = [dataclasses.replace(single, process_index=i, process_count=2) for i in range(2)]
  whole = single.train_batch(1)
  halves = [p.train_batch(1) for p in parts]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])


def test_process_parts_concatenate_to_global_eval_batch(pipe):
  single = dataclasses.replace(pipe, eval_splits={"validation": _id_split(50)}, eval_batch_size=20)
  parts = [dataclasses.replace(single, process_index=i, process_count=2) for i in range(2)]
  whole = list(single.eval_batches("validation"))
  halves = [list(p.eval_batches("validation")) for p in parts]
  assert len(whole) == len(halves[0]) == len(halves[1]) == 3
  for k, batch in enumerate(whole):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), batch[key])
  assert halves[1][2]["mask"].sum() == 0  # Examples 40..49 all live in process 0's half of the last batch.


# -------------------------------------------------------------------------------------------------- augment


def _shifts(original: np.ndarray, cropped: np.ndarray, pad: int) -> list[tuple[int, int]]:
  """Every (dy, dx) with |dy|, |dx| <= pad for which `cropped` is `original` shifted with zero fill."""
  height, width = original.shape[:2]
  padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
  return [(top - pad, left - pad) for top in range(2 * pad + 1) for left in range(2 * pad + 1)
          if np.array_equal(padded[top:top + height, left:left + width], cropped)]


def test_augment_crop_is_a_shifted_copy():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.1, 1.0, size=(16, 10, 12, 3)).astype(np.float32)  # No zeros: shifts are unique.
  out = augment(images, augment_params(np.random.default_rng(1), 16, 2), crop_padding=2, flip=False)
  assert out.shape == images.shape and out.dtype == images.dtype
  shifts = [_shifts(images[i], out[i], 2) for i in range(16)]
  assert all(len(s) == 1 for s in shifts)
  assert len({s[0] for s in shifts}) > 1  # Not every example gets the same shift.
  assert any(s[0] != (0, 0) for s in shifts)


def test_augment_flip_flips_horizontally():
  images = np.random.default_rng(0).uniform(size=(32, 5, 6, 2)).astype(np.float32)
  out = augment(images, augment_params(np.random.default_rng(3), 32, 0), crop_padding=0, flip=True)
  flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
  kept = [np.array_equal(o, i) for o, i in zip(out, images)]
  assert all(f != k for f, k in zip(flipped, kept))  # Each example is exactly one of the two.
  assert 4 <= sum(flipped) <= 28


def test_augment_in_pipeline_is_deterministic_and_per_step(pipe):
  plain = pipe
  cropped = dataclasses.replace(pipe, crop_padding=2)
  for step in (0, 3):
    base, aug = plain.train_batch(step), cropped.train_batch(step)
    assert aug["image"].shape == base["image"].shape == (32, 8, 8, 1)
    np.testing.assert_array_equal(aug["label"], base["label"])  # Same examples, only moved.
    for original, moved in zip(base["image"], aug["image"]):
      assert _shifts(original, moved, 2), "not a shifted copy"
    np.testing.assert_array_equal(cropped.train_batch(step)["image"], aug["image"])
  assert not np.array_equal(cropped.train_batch(0)["image"], plain.train_batch(0)["image"])
  flipping = build_pipeline(_data_cfg(flip=True), seed=0)
  base, aug = pipe.train_batch(2), flipping.train_batch(2)
  flips = [np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b) for a, b in zip(aug["image"], base["image"])]
  same = [np.array_equal(a, b) for a, b in zip(aug["image"], base["image"])]
  assert all(f or s for f, s in zip(flips, same))
  assert any(flips) and any(same)


def test_no_two_random_streams_of_a_pipeline_share_a_seed_sequence(pipe):
  """Training order, crops and flips, and the rehearsed source order each draw from a stream of their own. (The
  source order once drew from (seed, 2, epoch): the flips of step 2 for epoch 1, target epoch 2 for epoch 0.)"""
  rehearsing = with_rehearsal(dataclasses.replace(pipe, flip=True), pipe.train, 0.25)
  for seed in (0, 1, 2):
    plain, mixed = dataclasses.replace(pipe, seed=seed), dataclasses.replace(rehearsing, seed=seed)
    for pipeline, extra in ((plain, []), (mixed, [mixed.source_order_seed(e) for e in range(70)])):
      streams = [pipeline.order_seed(e) for e in range(70)] + [pipeline.augment_seed(s) for s in range(70)] + extra
      states = {tuple(np.random.SeedSequence(stream).generate_state(4)) for stream in streams}
      assert len(states) == len(streams)
  # The flips a rehearsal batch gets are the ones drawn from its augmentation stream.
  unflipped = dataclasses.replace(rehearsing, flip=False)
  for step in (1, 2):
    flips = augment_params(np.random.default_rng(rehearsing.augment_seed(step)), 32, 0)["flip"]
    expected = augment(unflipped.train_batch(step)["image"], {"flip": flips}, 0, True)
    np.testing.assert_array_equal(rehearsing.train_batch(step)["image"], expected)


# --------------------------------------------------------------------------------------------------- errors


def test_unknown_class_name():
  with pytest.raises(FinetuneError, match=r"config.data.classes names 'cat', which digits does not have; "
                     r"valid: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"):
    build_pipeline(_data_cfg(classes=("cat",)), seed=0)
  with pytest.raises(FinetuneError, match=r"names 'horse', which animals does not have; valid: cat, dog, bird"):
    build_pipeline(_data_cfg(name=_ANIMAL_SOURCE, classes=("cat", "horse"), batch_size=2), seed=0)


@pytest.mark.parametrize("bad", [10, -1])
def test_class_index_out_of_range(bad):
  with pytest.raises(FinetuneError, match=r"config.data.classes has -?\d+, but digits has classes 0..9"):
    build_pipeline(_data_cfg(classes=(1, bad)), seed=0)


def test_string_classes_are_names_even_when_they_look_like_numbers():
  with pytest.raises(FinetuneError, match=r"config.data.classes names '12', which digits does not have"):
    build_pipeline(_data_cfg(classes=(1, "12")), seed=0)
  by_name = build_pipeline(_data_cfg(classes=("7", "3")), seed=0)
  assert by_name.class_names == ("7", "3")


def test_no_eval_split_available():
  with pytest.raises(FinetuneError) as info:
    build_pipeline(_data_cfg(validation_fraction=0.0), seed=0)
  message = str(info.value)
  assert "none of config.data.eval_splits ('validation', 'test') exists for 'digits'" in message
  # (It advised pointing config.data.path at a test set: digits reads no files.)
  assert message.endswith("(available: none); set config.data.validation_fraction > 0")
  with pytest.raises(FinetuneError, match=r"available: validation"):
    build_pipeline(_data_cfg(eval_splits=("test",)), seed=0)


def test_a_misspelt_eval_split_or_augmenting_tokens_is_an_error():
  """(Before: the misspelt split was silently not evaluated; augmenting token data stopped on a KeyError.)"""
  with pytest.raises(FinetuneError, match=r"eval_splits names 'tset', which 'digits' does not have \(available: "
                                          r"validation\)"):
    build_pipeline(_data_cfg(eval_splits=("validation", "tset")), seed=0)
  tokens = ConfigDict({**_data_cfg().to_dict(), "name": "synthetic", "eval_splits": ("test",),
                       "options": {"kind": "tokens", "length": 8, "vocab_size": 50, "num_examples": 64},
                       "batch_size": 8, "augment": {"crop_padding": 0, "flip": True}})
  with pytest.raises(FinetuneError, match=r"augment \(crop_padding, flip\) applies to images, and 'synthetic'"):
    build_pipeline(tokens, seed=0)


def test_batch_bigger_than_dataset():
  with pytest.raises(FinetuneError, match=rf"only {NUM_DIGITS - 180} training examples but "
                     r"config.data.batch_size=2000"):
    build_pipeline(_data_cfg(batch_size=2000), seed=0)
  # After filtering to two classes, a batch that fits all of digits no longer fits.
  with pytest.raises(FinetuneError, match=r"config.data.batch_size=400"):
    build_pipeline(_data_cfg(classes=(0, 1), batch_size=400), seed=0)


def test_unknown_source():
  with pytest.raises(FinetuneError, match=r"unknown data source 'digit' \(did you mean 'digits'\?\)"):
    build_pipeline(_data_cfg(name="digit"), seed=0)


def test_class_given_twice_or_of_the_wrong_type():
  with pytest.raises(FinetuneError, match="names class\\(es\\) 5 more than once"):
    build_pipeline(_data_cfg(classes=(5, "5")), seed=0)
  with pytest.raises(FinetuneError, match="give class indices \\(int\\) or class names \\(str\\)"):
    build_pipeline(_data_cfg(classes=(1.5, 2)), seed=0)


def test_unknown_source_option_is_an_error():
  cfg = _data_cfg()
  cfg.options = ConfigDict({"foo": 1})
  with pytest.raises(FinetuneError, match="config.data.options.foo is not an option of data source 'digits'"):
    build_pipeline(cfg, seed=0)


def test_a_path_given_to_a_source_that_reads_no_files_is_an_error():
  """(digits and synthetic ignored config.data.path: a run meant for a data folder trained on digits.)"""
  with pytest.raises(FinetuneError, match=r"data source 'digits' reads no files, but config.data.path='/no/such'"):
    build_pipeline(_data_cfg(path="/no/such"), seed=0)


def test_source_options_take_the_type_of_the_source_s_default():
  """("64" failed inside numpy with a UFuncTypeError; pack="False", a truthy string, would pack.)"""
  cfg = _data_cfg(name="synthetic", options=ConfigDict({"kind": "images", "num_examples": "64"}))
  with pytest.raises(FinetuneError, match=r"config key 'data.options.num_examples' expects int \(like 64\), got '64'"):
    build_pipeline(cfg, seed=0)


_RECORDING_SOURCE = "test_pipeline_recording"
_RECEIVED: dict = {}


def _recording(path: str = "", cache_dir: str = "", shape: tuple[int, ...] = (), key: str = "",
               scale: float = 1.0) -> Dataset:
  """Digits-like data that records the options it was given."""
  del path, cache_dir
  _RECEIVED.update(shape=shape, key=key, scale=scale)
  return Dataset("recorded", {"train": ArraySplit({"image": np.zeros((8, 2, 2, 1), np.float32),
                                                   "label": np.arange(8) % 2})}, ("0", "1"))


if _RECORDING_SOURCE not in SOURCES:
  SOURCES.register(_RECORDING_SOURCE)(_recording)


def test_a_source_is_given_its_options_as_the_check_typed_them():
  """(The check accepted a scalar for a tuple option and a number for a text one, then gave the source the raw
  value: hf_files' image_shape=4 failed inside it with "TypeError: 'int' object is not iterable".)"""
  cfg = _data_cfg(name=_RECORDING_SOURCE, batch_size=4, options=ConfigDict({"shape": 4, "key": 7, "scale": 2}))
  build_pipeline(cfg, seed=0)
  assert _RECEIVED == {"shape": (4,), "key": "7", "scale": 2.0}
  assert type(_RECEIVED["scale"]) is float


def test_options_typed_as_a_glob_or_a_list_of_globs_take_a_list():
  """(hf_files' train_files: str | Sequence[str] was typed by its default '', so a list was refused.)"""
  from finetune.data.pipeline import check_options  # pylint: disable=g-import-not-at-top
  check_options(ConfigDict({"name": "hf_files", "options": {"train_files": ("a/*.json", "b.json")}}))
  with pytest.raises(FinetuneError, match="data.options.train_files"):
    check_options(ConfigDict({"name": "hf_files", "options": {"train_files": (1, 2)}}))


_UNLABELLED_SOURCE = "test_pipeline_unlabelled"


def _unlabelled(path: str = "", cache_dir: str = "") -> Dataset:
  """Token blocks with no labels, as lm_text gives."""
  del path, cache_dir
  return Dataset("blocks", {"train": ArraySplit({"input_ids": np.zeros((8, 4), np.int32)})}, ())


if _UNLABELLED_SOURCE not in SOURCES:
  SOURCES.register(_UNLABELLED_SOURCE)(_unlabelled)


def test_classes_of_a_source_without_labels_are_refused():
  """(It said "config.data.classes has 0, but blocks has classes 0..-1".)"""
  with pytest.raises(FinetuneError, match=r"config.data.classes=\(0,\) but blocks has no classes \(its examples have "
                                          r"no labels\); set config.data.classes=\(\)"):
    build_pipeline(_data_cfg(name=_UNLABELLED_SOURCE, classes=(0,), batch_size=2), seed=0)


_ONE_BASED_SOURCE = "test_pipeline_one_based"


def _one_based(path: str = "", cache_dir: str = "") -> Dataset:
  """Integer labels 1..3, as a file numbering its classes from 1 gives: classes '0'..'3', '0' never used."""
  del path, cache_dir
  labels = np.arange(12) % 3 + 1
  split = ArraySplit({"image": np.zeros((12, 1, 1, 1), np.uint8), "label": labels})
  return Dataset("one_based", {"train": split}, ("0", "1", "2", "3"))


if _ONE_BASED_SOURCE not in SOURCES:
  SOURCES.register(_ONE_BASED_SOURCE)(_one_based)


def test_a_class_without_training_examples_warns_unless_data_classes_drops_it():
  """(1-based integer labels trained a 4-way head whose output 0 never trained, silently.)"""
  config = _data_cfg(name=_ONE_BASED_SOURCE, batch_size=2, validation_fraction=0.25)
  with pytest.warns(UserWarning, match=r"the training data of one_based has no example of class '0' \(of 4\): the "
                                       r"model's output for it never trains; labels that start at 1 leave class 0 "
                                       r"empty: subtract 1 from them"):
    build_pipeline(config, seed=0)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    build_pipeline(_data_cfg(name=_ONE_BASED_SOURCE, classes=(1, 2, 3), batch_size=2, validation_fraction=0.25),
                   seed=0)  # (data.classes keeps only trained classes: nothing to say)
  from finetune.data.pipeline import _warn_untrained_classes  # pylint: disable=g-import-not-at-top
  with pytest.warns(UserWarning, match=r"no example of class 'b' \(of 3\): .*keep only trained classes with "
                                       r"config.data.classes"):
    _warn_untrained_classes(ArraySplit({"label": np.array([0, 2, 2])}), ("a", "b", "c"), "abc")
