"""Class names and labels across splits (finetune/data/tables.py): the train split's naming rules every split."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.data.tables import class_names_and_labels
from finetune.errors import FinetuneError

WHERE = {"train": "the train file", "test": "the test file"}


def _labels(train, test, train_names=None):
  raw = {"train": np.asarray(train, object if isinstance(train[0], str) else None),
         "test": np.asarray(test, object if isinstance(test[0], str) else None)}
  return class_names_and_labels(raw, {"train": train_names, "test": None}, WHERE)


def test_string_labels_of_a_split_are_read_as_the_train_class_label_names():
  """(Train a ClassLabel, test plain strings: a TypeError from np.mod on the strings.)"""
  names, labels = _labels([0, 1, 1], ["pos", "neg"], train_names=("neg", "pos"))
  assert names == ("neg", "pos") and labels["test"].tolist() == [1, 0]
  with pytest.raises(FinetuneError, match=r"labels in the test file include 'neutral', not among the train "
                                          r"split's ClassLabel names \('neg', 'pos'\)"):
    _labels([0, 1], ["neutral"], train_names=("neg", "pos"))


def test_a_number_beyond_the_train_class_label_is_refused():
  """(Accepted: the label's one-hot was all zeros, a zero loss and an example always counted wrong.)"""
  with pytest.raises(FinetuneError, match=r"labels in the test file include 7, but the train split's ClassLabel "
                                          r"has 2 classes"):
    _labels([0, 1], [1, 7], train_names=("neg", "pos"))


def test_class_names_in_one_split_and_numbers_in_another_are_refused():
  """(Train 'neg'/'pos' and test 0/1 became four classes '0', '1', 'neg', 'pos', none of test's ever trained.)"""
  with pytest.raises(FinetuneError, match=r"labels in the train file are class names but those in the test file "
                                          r"are numbers"):
    _labels(["neg", "pos"], [0, 1])
  names, labels = _labels(["0", "1", "2"], [2, 0])  # the same classes written as text in one file: matched
  assert names == ("0", "1", "2") and labels["train"].tolist() == [0, 1, 2] and labels["test"].tolist() == [2, 0]


def test_a_label_only_another_split_has_is_refused_not_made_a_class():
  """(Classes came from every split: a typo 'dgo' in the test file became a class and renumbered 'dog'; a test
  label 7 over train's 0/1 made eight classes.)"""
  with pytest.raises(FinetuneError, match=r"labels in the test file include 'dgo', which the train split does not "
                                          r"have \(its classes: 'cat', 'dog'\)"):
    _labels(["cat", "dog"], ["cat", "dgo"])
  with pytest.raises(FinetuneError, match=r"labels in the test file include 7, but the train split's largest label "
                                          r"is 1"):
    _labels([0, 1], [0, 7])
  names, labels = _labels(["cat", "dog", "eel"], ["dog"])  # a test file with fewer classes is fine
  assert names == ("cat", "dog", "eel") and labels["test"].tolist() == [1]


def test_numbers_written_as_text_are_classes_in_numeric_order():
  """(Sorted as text: '10' came before '2', so class 1 was the examples labelled "10".)"""
  names, labels = _labels(["2", "10", "1"], ["10"])
  assert names == ("1", "2", "10") and labels["train"].tolist() == [1, 2, 0] and labels["test"].tolist() == [2]
  names, _ = _labels(["b", "a10", "a2"], ["b"])  # names that are not numbers keep text order
  assert names == ("a10", "a2", "b")

