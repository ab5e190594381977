"""Sentence classification from text files (`<integer label> <sentence>` per line, as in ../shared/data/text, or
local json/jsonl/csv/parquet tables read with `datasets`), tokenised once with the checkpoint's own tokenizer
(transformers `AutoTokenizer`, a fast Rust tokenizer, batched); and language-model text cut into token blocks.

Options: `train_file` (required), `test_file` and `validation_file` (optional), relative to `config.data.path`;
`tokenizer`: a Hugging Face checkpoint directory (or hub id) with tokenizer files; `max_length`: every sequence is
padded or truncated to it, with an attention mask. A source-provided validation split is the validation split:
`config.data.validation_fraction` then carves nothing from 'train'.
"""

from __future__ import annotations

import os
import re

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset
from finetune.data.tables import (class_label_names, class_names_and_labels, file_format, load_tables,
                                   require_scalar_column)
from finetune.errors import FinetuneError


def read_labelled_lines(filename: str) -> tuple[list[str], np.ndarray]:
  """(sentences, integer labels) from `<label> <sentence>` lines; blank lines are skipped."""
  sentences, labels = [], []
  # errors="replace": real corpora carry stray bytes (../shared/data/text/TREC.train.all has a Latin-1 byte in an
  # otherwise ASCII file); one replaced character in a sentence is better than refusing the dataset. utf-8-sig:
  # a byte-order mark (Windows editors write one) made the first line's label unreadable.
  with open(filename, encoding="utf-8-sig", errors="replace") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      label, _, sentence = line.partition(" ")
      # (lstrip("-") let '--1' through to int(); '+1', as ±1-labelled corpora write it, is an integer too)
      if not re.fullmatch(r"[-+]?\d+", label) or not sentence:
        raise FinetuneError(f"{filename}:{number} is not '<integer label> <sentence>': {line[:60]!r}")
      sentences.append(sentence)
      labels.append(int(label))
  if not sentences:
    raise FinetuneError(f"{filename} has no examples")
  return sentences, np.asarray(labels, np.int64)


def data_file(folder: str, name: str, split: str) -> str:
  """`name` inside `folder` (config.data.path), which must exist."""
  filename = os.path.join(folder, name) if folder else name
  if not os.path.isfile(filename):
    raise FinetuneError(f"data file {filename!r} does not exist; check config.data.path and "
                        f"config.data.options.{split}_file")
  return filename


def read_tokenizer(name_or_path: str):
  """The tokenizer as its files define it (what an export ships with the model)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  if not name_or_path:
    raise FinetuneError("config.data.options.tokenizer is empty; set it to the checkpoint directory of the model")
  try:
    return AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
  except Exception as e:  # missing files, offline hub id, corrupt tokenizer.json
    raise FinetuneError(f"cannot load a tokenizer from {name_or_path!r} ({type(e).__name__}); point "
                        "config.data.options.tokenizer at a checkpoint directory with tokenizer files") from None


def load_tokenizer(name_or_path: str):
  """`read_tokenizer`, set up for our batches: a pad token and right padding."""
  tokenizer = read_tokenizer(name_or_path)
  # Decoder tokenizers (GPT-2, Llama) often have no pad token; padded positions are masked out anyway. Right
  # padding keeps positions 0..n-1 for the real tokens and the last real token at mask.sum() - 1.
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
  tokenizer.padding_side = "right"
  return tokenizer


def require_length(option: str, value: int, minimum: int) -> None:
  """A sequence-length option must leave room for the special tokens and some text (0 divided by zero or was
  taken as it came; 1 failed inside the tokenizer)."""
  if value < minimum:
    raise FinetuneError(f"config.data.options.{option}={value} is too short: it must be at least {minimum} tokens "
                        "(the special tokens and some text); raise it")


def tokenize(tokenizer, sentences: list[str], max_length: int) -> dict[str, np.ndarray]:
  if tokenizer.pad_token is None:  # (transformers' ValueError came as a traceback)
    raise FinetuneError(f"the tokenizer {tokenizer.name_or_path!r} has no pad, end-of-text or unknown token to pad "
                        "rows with; add a pad token to it (tokenizer.add_special_tokens({'pad_token': '[PAD]'}), "
                        "then save_pretrained) or use the model's own tokenizer")
  encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
  return {"input_ids": encoded["input_ids"].astype(np.int32),
          "attention_mask": encoded["attention_mask"].astype(np.int32)}


def read_table(filename: str, split: str, text_key: str, label_key: str,
               cache_dir: str = "") -> tuple[list[str], np.ndarray, tuple[str, ...] | None]:
  """(texts, raw label column, ClassLabel names or None) of `split` from a local json/jsonl/csv/parquet file (also
  compressed), read with `datasets` (offline; its Arrow cache under `cache_dir` when given)."""
  table = load_tables({split: [filename]}, file_format(filename), cache_dir)[split]
  for key in (text_key, label_key):
    if key not in table.column_names:
      raise FinetuneError(f"{filename} has no column {key!r} (columns: {', '.join(table.column_names)}); set "
                          "config.data.options.text_key / label_key")
  require_scalar_column(table, text_key, filename, "text")
  require_scalar_column(table, label_key, filename, "label")
  arrow = table.with_format("arrow")[:]  # A pyarrow.Table, rows in file order.
  texts = arrow.column(text_key).to_pylist()
  if None in texts:
    raise FinetuneError(f"row {texts.index(None)} of {filename} has no {text_key!r} text; drop the row or fill it in")
  blank = next((row for row, text in enumerate(texts) if not text.strip()), None)
  if blank is not None:  # (as a '<label> <sentence>' line without its sentence is; it became [CLS] [SEP] alone)
    raise FinetuneError(f"row {blank} of {filename}: its {text_key!r} is blank; drop the row or fill it in")
  return (texts, arrow.column(label_key).to_numpy(zero_copy_only=False),
          class_label_names(table, label_key))


@SOURCES.register("text_classification")
def text_classification(path: str = "", cache_dir: str = "", train_file: str = "", test_file: str = "",
                        validation_file: str = "", tokenizer: str = "", max_length: int = 64, text_key: str = "text",
                        label_key: str = "label") -> Dataset:
  """Files are `<label> <sentence>` lines, or json/jsonl/csv/parquet tables with `text_key` and `label_key`
  columns (labels: integers; or strings, numbered in sorted order, numbers written as text in numeric order; or a
  ClassLabel feature's names)."""
  if not train_file:
    raise FinetuneError("config.data.options.train_file is empty; name the training file (e.g. stsa.binary.train)")
  files = {"train": train_file, "test": test_file, "validation": validation_file}
  tok = load_tokenizer(tokenizer)
  require_length("max_length", max_length, tok.num_special_tokens_to_add() + 1)
  texts, raw_labels, where, names = {}, {}, {}, {}
  for split, name in files.items():
    if not name:
      continue
    filename = data_file(path, name, split)
    if file_format(filename):
      texts[split], raw_labels[split], names[split] = read_table(filename, split, text_key, label_key, cache_dir)
      where[split] = f"column {label_key!r} of {filename}"
    else:
      texts[split], raw_labels[split] = read_labelled_lines(filename)
      where[split] = filename
  class_names, labels = class_names_and_labels(raw_labels, names, where)
  splits = {split: ArraySplit({**tokenize(tok, texts[split], max_length), "label": labels[split]})
            for split in texts}
  return Dataset(os.path.basename(train_file).split(".")[0], splits, class_names)


@SOURCES.register("lm_text")
def lm_text(path: str = "", cache_dir: str = "", train_file: str = "", test_file: str = "", tokenizer: str = "",
            block_size: int = 128) -> Dataset:
  """Language-model corpora from plain text (e.g. ../shared/data/lm): the whole file is tokenised once and cut
  into consecutive blocks of `block_size` tokens (the remainder is dropped); every token of a block is predicted
  from the ones before it (task 'causal_lm')."""
  del cache_dir
  if not train_file:
    raise FinetuneError("config.data.options.train_file is empty; name the text file (e.g. tinyshakespeare.txt)")
  require_length("block_size", block_size, 2)  # (a token to predict and one before it)
  tok = load_tokenizer(tokenizer)
  splits = {}
  for split, name in (("train", train_file), ("test", test_file)):
    if not name:
      continue
    filename = data_file(path, name, split)
    with open(filename, encoding="utf-8-sig", errors="replace") as f:  # (a byte-order mark is no text)
      lines = f.read().splitlines(keepends=True)
    # Tokenised line by line (batched, fast) with each line's newline kept, so byte-level tokenizers see line breaks;
    # joined with no special tokens inside the stream. This is what transformers' run_clm does with its text loader
    # (a row per line, keep_linebreaks) then group_texts for tokenizers that add no special tokens (GPT-2's), so
    # perplexities compare with it; run_clm keeps them, so a Llama tokenizer there puts a BOS before every line,
    # which this stream does not. Tokenising the file as one string differs slightly (byte-level BPE merges
    # whitespace runs across line breaks: about 0.4% fewer tokens on WikiText-2). verbose=False: a line longer than
    # the model's maximum is fine here (the stream is cut into blocks), and transformers would warn of indexing
    # errors.
    ids = np.concatenate([np.asarray(t, np.int32) for t in tok(lines, add_special_tokens=False, verbose=False)[
        "input_ids"] if t] or [np.zeros(0, np.int32)])
    num_blocks = len(ids) // block_size
    if num_blocks == 0:
      raise FinetuneError(f"{filename} has {len(ids)} tokens, fewer than one block of {block_size}; lower "
                          "config.data.options.block_size")
    blocks = ids[:num_blocks * block_size].reshape(num_blocks, block_size)  # (N * T,) -> (N, T)
    splits[split] = ArraySplit({"input_ids": blocks, "attention_mask": np.ones_like(blocks)})
  return Dataset(os.path.basename(train_file).split(".")[0], splits, ())
