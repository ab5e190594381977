"""LoRA adapters exchanged with Hugging Face PEFT (PyTorch) both ways, logits equal within 1e-4.

Export: our adapted model -> `adapter_config.json` + `adapter_model.safetensors` -> `PeftModel.from_pretrained` on
the transformers model of the same base checkpoint. Import: an adapter PEFT made in PyTorch (non-zero B) -> our
model. BERT (classification, DoRA and rsLoRA), GPT-2 (Conv1D, fused c_attn), Llama (GQA), Qwen2 and ViT (whose module
names differ between checkpoint files and transformers 5 classes).
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters, peft_format
from finetune.config import defaults
from finetune.errors import FinetuneError
from finetune.partition import flatten, map_with_path

torch = pytest.importorskip("torch", reason="torch is the reference (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="PEFT is the reference (pip install peft)")


def peft_config(**values) -> ConfigDict:
  cfg = defaults().peft
  cfg.update(values)
  return cfg


def save_base(kind: str, path) -> tuple[torch.nn.Module, dict]:
  """A tiny random transformers model saved to `path`; returns (torch model, our model config)."""
  torch.manual_seed(0)
  if kind == "bert":
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     vocab_size=120, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
  elif kind == "gpt2":
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=120, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
  elif kind == "llama":
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, vocab_size=120,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
  elif kind == "qwen2":  # (our Llama with query/key/value biases)
    config = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, vocab_size=120,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.Qwen2ForCausalLM(config)
  elif kind in ("gemma", "gemma2", "gemma3"):  # (our Llama with Gemma's norms, scaled tied embeddings and GeGLU)
    gemma2 = {"gemma2": dict(sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
              "gemma3": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])}.get(kind, {})
    config = getattr(transformers, f"{kind.capitalize()}{'Text' if kind == 'gemma3' else ''}Config")(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, vocab_size=120, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, **gemma2)
    model = getattr(transformers, f"{kind.capitalize()}ForCausalLM")(config)
    with torch.no_grad():  # (zeros at initialisation: a scale loaded without its offset would pass)
      for name, parameter in model.named_parameters():
        if "norm" in name:
          parameter.uniform_(-0.5, 0.5)
  else:
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=16, patch_size=4, num_channels=3, num_labels=3)
    model = transformers.ViTForImageClassification(config)
  model.save_pretrained(path)
  return model.eval(), {"name": "llama" if kind in ("qwen2", "gemma", "gemma2", "gemma3") else kind,
                        "hf_config": str(path),
                        **({"dropout": 0.0} if kind in ("bert", "gpt2") else {})}


def inputs(kind: str):
  rng = np.random.default_rng(1)
  if kind == "vit":
    pixels = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    return {"pixel_values": torch.tensor(pixels)}, (pixels.transpose(0, 2, 3, 1),)
  ids = rng.integers(1, 120, size=(2, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  return ({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}, (ids, mask))


def torch_logits(model, kind):
  torch_inputs, _ = inputs(kind)
  with torch.no_grad():
    return model(**torch_inputs).logits.numpy()


def our_logits(model, kind):
  _, ours = inputs(kind)
  return np.asarray(model(*ours))


def randomize_adapters(model: nnx.Module, trained: list[str], seed: int = 3) -> nnx.Module:
  """Non-zero B (and perturbed magnitudes / head) so that a wrong key name or transpose cannot pass."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = map_with_path(lambda path, leaf: leaf + 0.3 * rng.normal(size=leaf.shape).astype(leaf.dtype)
                         if path in trained else leaf, params.to_pure_dict())
  return nnx.merge(graphdef, params, rest.to_pure_dict())


def mask(logits, kind):
  return logits[0] if kind in ("gpt2", "llama", "qwen2", "gemma", "gemma2", "gemma3") else logits  # padded positions of example 1 are not compared


CASES = {
    "bert": dict(targets=("query", "value"), modules_to_save=("^head/",), dora=True, rank=4, alpha=8.0),
    "gpt2": dict(targets=("c_attn", "attn_proj"), rank=4, alpha=16.0, rslora=True),
    "llama": dict(targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0,
                  rank_pattern=(("mlp/down_proj", 2),)),
    "vit": dict(targets=("query", "value"), modules_to_save=("^head/",), rank=4, alpha=8.0),
    # Trained biases: PEFT keeps a wrapped layer's under '<module>.base_layer.bias' and ignores '<module>.bias'.
    "bert-lora_only_bias": dict(targets=("query", "value"), modules_to_save=("^head/",), rank=4, alpha=8.0,
                                bias="lora_only"),
    "gpt2-all_bias": dict(targets=("c_attn", "attn_proj"), rank=4, alpha=16.0, rslora=True, bias="all"),
    # The embedding is the output layer too: PEFT wraps a copy of it, so lm_head is saved beside it (it kept the
    # base's output layer, logits further off than the base's).
    "gpt2-tied_embedding": dict(targets=("c_attn",), rank=4, alpha=8.0, modules_to_save=("^wte/",)),
    # c_attn's outputs are head-major here: lora_B and the magnitudes are reordered to transformers' order.
    "gpt2-dora": dict(targets=("c_attn",), rank=4, alpha=8.0, dora=True, bias="lora_only"),
    # Qwen2's q/k/v biases, trained under their adapted layers.
    "qwen2-lora_only_bias": dict(targets=("q_proj", "k_proj", "up_proj"), rank=4, alpha=8.0, bias="lora_only"),
    "gemma3": dict(targets=("q_proj", "o_proj", "down_proj"), rank=4, alpha=8.0, rslora=True),
    # Gemma's input embeddings are scaled and tied to the output layer: both saved, as for GPT-2.
    "gemma-dora_tied_embedding": dict(targets=("q_proj", "gate_proj"), rank=4, alpha=8.0, dora=True,
                                      modules_to_save=("^embed_tokens/",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_peft_with_equal_logits(case, tmp_path):
  kind = case.split("-")[0]
  torch_model, model_cfg = save_base(kind, tmp_path / "base")
  model_cfg = ConfigDict(model_cfg)
  cfg = peft_config(method="lora", **CASES[case])
  num_classes = 3 if kind in ("bert", "vit") else 0
  model = adapters.load_model(model_cfg, cfg, num_classes, checkpoint=str(tmp_path / "base"))
  params = flatten(nnx.state(model, nnx.Param).to_pure_dict())
  base_paths = set(flatten(nnx.state(adapters.abstract_model(model_cfg, defaults().peft, num_classes),
                                     nnx.Param).to_pure_dict()))
  trained = sorted(adapters.trainable_paths(cfg, list(params), base_paths))
  model = randomize_adapters(model, trained)
  params = jax.device_get(flatten(nnx.state(model, nnx.Param).to_pure_dict()))
  config = peft_format.export_peft(model_cfg, cfg, model, params, trained, num_classes, str(tmp_path / "adapter"),
                                   base_model=str(tmp_path / "base"))
  on_disk = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
  assert on_disk == config and on_disk["r"] == 4 and on_disk["lora_alpha"] == CASES[case]["alpha"]
  assert on_disk["use_dora"] == CASES[case].get("dora", False)
  assert on_disk["use_rslora"] == CASES[case].get("rslora", False)
  assert on_disk["bias"] == CASES[case].get("bias", "none")
  assert on_disk["fan_in_fan_out"] == (kind == "gpt2")
  if kind == "llama":
    assert on_disk["rank_pattern"] and list(on_disk["rank_pattern"].values()) == [2, 2]
  loaded = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
  expected = mask(torch_logits(loaded, kind), kind)
  np.testing.assert_allclose(mask(our_logits(model, kind), kind), expected, atol=1e-4, rtol=1e-4)
  # The adapter changed the outputs: a key PEFT failed to load would leave B = 0 and the base logits.
  base_only = mask(torch_logits(type(torch_model).from_pretrained(str(tmp_path / "base")).eval(), kind), kind)
  assert np.abs(expected - base_only).max() > 1e-2


def test_vit_export_names_follow_the_installed_transformers(tmp_path):
  """transformers 5 names ViT modules vit.layers.N.attention.q_proj although its checkpoints say
  vit.encoder.layer.N.attention.attention.query; an adapter must use the names the loading classes have."""
  _, model_cfg = save_base("vit", tmp_path / "base")
  model_cfg = ConfigDict(model_cfg)
  cfg = peft_config(method="lora", targets=("query",), rank=2)
  model = adapters.load_model(model_cfg, cfg, 3, checkpoint=str(tmp_path / "base"))
  params = flatten(nnx.state(model, nnx.Param).to_pure_dict())
  trained = [p for p in params if "lora" in p]
  installed = peft_format.export_peft(model_cfg, cfg, model, params, trained, 3, str(tmp_path / "new"))
  old = peft_format.export_peft(model_cfg, cfg, model, params, trained, 3, str(tmp_path / "old"),
                                naming="checkpoint")
  from safetensors.numpy import load_file
  new_keys, old_keys = sorted(load_file(tmp_path / "new" / "adapter_model.safetensors")), \
      sorted(load_file(tmp_path / "old" / "adapter_model.safetensors"))
  assert new_keys[0] == "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight"
  assert old_keys[0] == "base_model.model.vit.encoder.layer.0.attention.attention.query.lora_A.weight"
  assert installed["target_modules"] == ["q_proj"] and old["target_modules"] == ["query"]
  # Both namings import back to the same parameters.
  for folder in ("new", "old"):
    arrays = peft_format.read_peft_adapter(str(tmp_path / folder), model_cfg, cfg, model, 3)
    assert sorted(arrays) == sorted(trained)
    for path in trained:
      np.testing.assert_array_equal(arrays[path], params[path])


def test_vit_rank_and_alpha_patterns_import_back_in_either_naming(tmp_path):
  """(The patterns were checked against both namings' module names: the other naming's alias matched no pattern,
  fell back to r, and our own export could not be read back, blaming settings that were right.)"""
  _, model_cfg = save_base("vit", tmp_path / "base")
  model_cfg = ConfigDict(model_cfg)
  cfg = peft_config(method="lora", targets=("query", "value"), rank=4, alpha=8.0, rank_pattern=(("value", 2),),
                    alpha_pattern=(("query", 2.0),))
  model = adapters.load_model(model_cfg, cfg, 3, checkpoint=str(tmp_path / "base"))
  trained = [p for p in flatten(nnx.state(model, nnx.Param).to_pure_dict()) if "lora" in p]
  model = randomize_adapters(model, trained)  # B non-zero: a transposed or misplaced tensor cannot pass
  params = flatten(nnx.state(model, nnx.Param).to_pure_dict())
  assert {params[p].shape for p in trained if "/value/" in p} == {(32, 2), (2, 32)}  # rank_pattern's r = 2
  for naming in ("installed", "checkpoint"):
    peft_format.export_peft(model_cfg, cfg, model, params, trained, 3, str(tmp_path / naming), naming=naming)
    arrays = peft_format.read_peft_adapter(str(tmp_path / naming), model_cfg, cfg, model, 3)
    assert sorted(arrays) == sorted(trained)
    for path in trained:
      np.testing.assert_array_equal(arrays[path], params[path], err_msg=f"{naming} {path}")
  # The check still bites: the same adapter under another alpha for the queries.
  other = peft_config(method="lora", targets=("query", "value"), rank=4, alpha=8.0, rank_pattern=(("value", 2),))
  with pytest.raises(FinetuneError, match=r"attention.* has r=4, lora_alpha=2.0 but this model's LoRA layer "
                                          r"blocks/0/attention/query has rank=4, alpha=8.0"):
    peft_format.read_peft_adapter(str(tmp_path / "installed"), model_cfg, other,
                                  adapters.load_model(model_cfg, other, 3, checkpoint=str(tmp_path / "base")), 3)


PEFT_MADE = {
    "bert": (dict(target_modules=["query", "value"], r=4, lora_alpha=8, task_type="SEQ_CLS"),
             dict(targets=("query", "value"), rank=4, alpha=8.0, modules_to_save=("^head/",))),
    # bias='all' also saves the classifier's frozen original (classifier.original_module.bias): it was refused as
    # a tensor of another architecture.
    "bert-bias_all": (dict(target_modules=["query", "value"], r=4, lora_alpha=8, task_type="SEQ_CLS", bias="all"),
                      dict(targets=("query", "value"), rank=4, alpha=8.0, modules_to_save=("^head/",), bias="all")),
    "gpt2": (dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                  task_type="CAUSAL_LM"),
             dict(targets=("c_attn",), rank=4, alpha=8.0, dora=True)),
    "llama": (dict(target_modules=["q_proj", "k_proj", "o_proj"], r=4, lora_alpha=4, use_rslora=True,
                   task_type="CAUSAL_LM"),
              dict(targets=("q_proj", "k_proj", "o_proj"), rank=4, alpha=4.0, rslora=True)),
    "qwen2": (dict(target_modules=["q_proj", "v_proj", "gate_proj"], r=4, lora_alpha=8, task_type="CAUSAL_LM"),
              dict(targets=("q_proj", "v_proj", "gate_proj"), rank=4, alpha=8.0)),
    "gemma": (dict(target_modules=["k_proj", "o_proj", "down_proj"], r=4, lora_alpha=8, task_type="CAUSAL_LM"),
              dict(targets=("k_proj", "o_proj", "down_proj"), rank=4, alpha=8.0)),
    "gemma2": (dict(target_modules=["q_proj", "up_proj"], r=4, lora_alpha=8, use_dora=True, task_type="CAUSAL_LM"),
               dict(targets=("q_proj", "up_proj"), rank=4, alpha=8.0, dora=True)),
    "vit": (dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=8, modules_to_save=["classifier"]),
            dict(targets=("query", "value"), rank=2, alpha=8.0, modules_to_save=("^head/",))),
    # A saved Conv2d (torch (out, in, kh, kw)) must come back in flax's (kh, kw, in, out).
    "vit-patch_embed": (dict(target_modules=["q_proj"], r=2, lora_alpha=8,
                             modules_to_save=["classifier", "projection"]),
                        dict(targets=("query",), rank=2, alpha=8.0, modules_to_save=("^head/", "^patch_embed/"))),
}


@pytest.mark.parametrize("case", list(PEFT_MADE))
def test_adapter_made_by_peft_imports_with_equal_logits(case, tmp_path):
  kind = case.split("-")[0]
  torch_model, model_cfg = save_base(kind, tmp_path / "base")
  theirs, ours = PEFT_MADE[case]
  torch.manual_seed(1)
  peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(init_lora_weights=False, **theirs))
  with torch.no_grad():  # DoRA magnitudes and the saved head away from their initial values too
    for name, parameter in peft_model.named_parameters():
      if parameter.requires_grad:
        parameter.add_(0.1 * torch.randn_like(parameter))
  peft_model.save_pretrained(tmp_path / "adapter")
  expected = mask(torch_logits(peft_model.eval(), kind), kind)
  num_classes = 3 if kind in ("bert", "vit") else 0
  model = adapters.load_model(ConfigDict(model_cfg), peft_config(method="lora", **ours), num_classes,
                              checkpoint=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
  np.testing.assert_allclose(mask(our_logits(model, kind), kind), expected, atol=1e-4, rtol=1e-4)


def test_a_tied_embedding_saved_alone_is_refused_and_our_export_of_one_imports_back(tmp_path):
  """PEFT's modules_to_save=['wte'] wraps a copy of the embedding and leaves lm_head as it was: an untied model,
  which GPT-2 here cannot be (read as it was, the logits differed from PEFT's by 3.8). Our export saves both."""
  torch_model, model_cfg = save_base("gpt2", tmp_path / "base")
  torch.manual_seed(1)
  peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(
      target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True, modules_to_save=["wte"],
      task_type="CAUSAL_LM"))
  peft_model.save_pretrained(tmp_path / "alone")
  ours = peft_config(method="lora", targets=("c_attn",), rank=4, alpha=8.0, modules_to_save=("^wte/",))
  model_cfg = ConfigDict(model_cfg)
  with pytest.raises(FinetuneError, match=r"transformer.wte.weight is saved without the layer this model ties it "
                                          r"to \(the input embedding and lm_head are one parameter here"):
    adapters.load_model(model_cfg, ours, 0, checkpoint=str(tmp_path / "base"), adapter=str(tmp_path / "alone"))
  model = adapters.load_model(model_cfg, ours, 0, checkpoint=str(tmp_path / "base"))
  trained = ["wte/embedding"] + [p for p in flatten(nnx.state(model, nnx.Param).to_pure_dict()) if "lora_" in p]
  model = randomize_adapters(model, trained)
  params = jax.device_get(flatten(nnx.state(model, nnx.Param).to_pure_dict()))
  config = peft_format.export_peft(model_cfg, ours, model, params, trained, 0, str(tmp_path / "ours"))
  assert config["modules_to_save"] == ["lm_head", "transformer.wte"]
  back = adapters.load_model(model_cfg, ours, 0, checkpoint=str(tmp_path / "base"), adapter=str(tmp_path / "ours"))
  np.testing.assert_allclose(our_logits(back, "gpt2"), our_logits(model, "gpt2"), atol=1e-5)


def test_lora_on_a_sequence_classifier_s_head_is_refused_by_the_peft_format(tmp_path):
  """(Written with 'classifier' in both target_modules and modules_to_save, which PEFT failed to load; with
  bias='none' refused for a head bias that never trained.)"""
  _, model_cfg = save_base("bert", tmp_path / "base")
  model_cfg, cfg = ConfigDict(model_cfg), peft_config(method="lora", targets=("query", "head"), rank=2)
  model = adapters.load_model(model_cfg, cfg, 3, checkpoint=str(tmp_path / "base"))
  params = jax.device_get(flatten(nnx.state(model, nnx.Param).to_pure_dict()))
  trained = sorted(p for p in params if "lora_" in p)
  with pytest.raises(FinetuneError, match=r"LoRA on the classifier .* PEFT's sequence-classification format cannot "
                                          r"hold .*; use --format hf"):
    peft_format.peft_adapter(model_cfg, cfg, model, params, trained, 3)


def test_an_adapter_made_on_the_bare_base_model_imports_into_the_task_model(tmp_path):
  """PEFT on BertModel names the layers `encoder.layer.0...`, our classifier's BERT (BertForSequenceClassification)
  `bert.encoder.layer.0...`: the same layers, which were refused as having no LoRA layer."""
  _, model_cfg = save_base("bert", tmp_path / "base")
  torch.manual_seed(1)
  peft_model = peft.get_peft_model(transformers.BertModel.from_pretrained(str(tmp_path / "base")), peft.LoraConfig(
      target_modules=["query", "value"], r=4, lora_alpha=8, init_lora_weights=False, task_type="FEATURE_EXTRACTION"))
  peft_model.save_pretrained(tmp_path / "adapter")
  torch_inputs, (ids, attention) = inputs("bert")
  with torch.no_grad():
    expected = peft_model.eval()(**torch_inputs).last_hidden_state.numpy()
  model = adapters.load_model(ConfigDict(model_cfg), peft_config(method="lora", targets=("query", "value"), rank=4,
                                                                 alpha=8.0), 3, checkpoint=str(tmp_path / "base"),
                              adapter=str(tmp_path / "adapter"))
  np.testing.assert_allclose(np.asarray(model.encode(ids, attention)), expected, atol=1e-4, rtol=1e-4)
  with pytest.raises(FinetuneError, match=r"adapts module 'encoder.layer.0.attention.self.query', which has no LoRA "
                                          r"layer in this model \(config.peft.targets puts LoRA on "
                                          r"layers/0/attention/key, layers/1/attention/key\)"):
    adapters.load_model(ConfigDict(model_cfg), peft_config(method="lora", targets=("key",), rank=4, alpha=8.0), 3,
                        checkpoint=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))


def test_a_mean_pooled_bert_adapter_does_not_adapt_the_pooler_it_lacks(tmp_path):
  """(target_modules=['dense'] picked our attention and MLP outputs, and in BertModel its pooler too: PEFT gave
  the pooler an untrained LoRA and warned of missing adapter keys.)"""
  _, model_cfg = save_base("bert", tmp_path / "base")
  model_cfg = ConfigDict({**model_cfg, "pooling": "mean"})
  cfg = peft_config(method="lora", targets=("output", "intermediate"), rank=2)
  model = adapters.load_model(model_cfg, cfg, 3, checkpoint=str(tmp_path / "base"))
  params = jax.device_get(flatten(nnx.state(model, nnx.Param).to_pure_dict()))
  _, config = peft_format.peft_adapter(model_cfg, cfg, model, params, sorted(p for p in params if "lora_" in p), 3)
  assert config["target_modules"] != ["dense"] and len(config["target_modules"]) == 6, config["target_modules"]
  peft_format.export_peft(model_cfg, cfg, model, params, sorted(p for p in params if "lora_" in p), 3,
                          str(tmp_path / "adapter"))
  loaded = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(str(tmp_path / "base")),
                                          str(tmp_path / "adapter"))
  adapted = {name.split(".lora_")[0] for name, _ in loaded.named_parameters() if ".lora_A." in name}
  assert not any("pooler" in name for name in adapted)
  assert len(adapted) == 6 and all(".output.dense" in name or ".intermediate.dense" in name for name in adapted)


def _bert_lora_classifier_run(tmp_path, num_classes: int) -> None:
  """tmp_path/run: 2 LoRA steps of a tiny 3-label BERT checkpoint (tmp_path/base) with a new `num_classes` head."""
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  _, model_cfg = save_base("bert", tmp_path / "base")
  train_lib.train_and_evaluate(build_config({
      "model": model_cfg, "init_from": str(tmp_path / "base"), "dont_load": ("^head/",),
      "data": {"name": "synthetic", "batch_size": 4, "eval_batch_size": 4, "validation_fraction": 0.25,
               "options": {"kind": "tokens", "length": 8, "vocab_size": 120, "num_examples": 40,
                           "num_classes": num_classes}},
      "train": {"steps": 2, "log_every": 2, "checkpoint_every": 0},
      "peft": {"method": "lora", "targets": ("query",), "rank": 2, "modules_to_save": ("^head/",)}}),
      str(tmp_path / "run"))


def test_peft_export_of_a_classifier_says_the_base_needs_room_for_its_classes(tmp_path, capsys):
  """(A 5-class adapter on a 3-label checkpoint: PEFT's load failed on the classifier's shape, with no hint.)"""
  from finetune import cli  # pylint: disable=g-import-not-at-top
  _bert_lora_classifier_run(tmp_path, 5)
  capsys.readouterr()
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", "peft", "--out",
                   str(tmp_path / "peft")]) == 0
  out = capsys.readouterr().out
  assert (f"the classifier has 5 classes and {tmp_path / 'base'} 3: load it with num_labels=5, "
          "ignore_mismatched_sizes=True") in out
  # (PEFT loads the base's config, whose label names are not the run's classes; the note was about counts alone.)
  mapping = {i: str(i) for i in range(5)}
  assert f"the base's config names its labels otherwise: pass id2label={mapping}, label2id=" in out
  base = transformers.BertForSequenceClassification.from_pretrained(
      str(tmp_path / "base"), num_labels=5, ignore_mismatched_sizes=True, id2label=mapping,
      label2id={name: i for i, name in mapping.items()})
  loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))  # loads as the notes say
  assert loaded.config.id2label == mapping


def test_peft_export_names_a_moved_base_where_it_is_now(tmp_path, capsys):
  """(With the base checkpoint moved, `--config.model.hf_config=NEW` was not read by --format peft: the export
  wrote a whole base_model/ copy instead of naming the base.)"""
  from finetune import cli  # pylint: disable=g-import-not-at-top
  _bert_lora_classifier_run(tmp_path, 3)
  (tmp_path / "base").rename(tmp_path / "moved")
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", "peft", "--out", str(tmp_path / "peft"),
                   f"--config.model.hf_config={tmp_path / 'moved'}"]) == 0, capsys.readouterr().err
  adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert adapter_config["base_model_name_or_path"] == str(tmp_path / "moved")
  assert not (tmp_path / "peft" / "base_model").exists()


def test_import_of_an_adapter_with_lora_bias_names_that_setting(tmp_path):
  """(PEFT's lora_bias=True adds lora_B.bias tensors; they were reported as belonging to another architecture.)"""
  torch_model, model_cfg = save_base("llama", tmp_path / "base")
  peft.get_peft_model(torch_model, peft.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8, lora_bias=True)
                      ).save_pretrained(tmp_path / "adapter")
  with pytest.raises(FinetuneError, match=r"trained with PEFT's lora_bias=True .* import adapters trained with "
                                          r"lora_bias=False"):
    adapters.load_model(ConfigDict(model_cfg), peft_config(method="lora", targets=("q_proj",), rank=4, alpha=8.0), 0,
                        checkpoint=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))


def test_import_into_a_model_without_a_transformers_counterpart_is_a_one_line_error(tmp_path):
  """(It was a KeyError from the name mapping.)"""
  from finetune import peft_format  # pylint: disable=g-import-not-at-top
  (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
  with pytest.raises(FinetuneError, match=r"model 'mlp' has no transformers counterpart, so a PEFT adapter cannot "
                                          r"name its layers; PEFT import supports bert"):
    peft_format.read_peft_adapter(str(tmp_path), ConfigDict({"name": "mlp"}), peft_config(method="lora"), None, 2)


def test_import_refuses_an_adapter_for_other_settings(tmp_path):
  torch_model, model_cfg = save_base("llama", tmp_path / "base")
  peft.get_peft_model(torch_model, peft.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8)).save_pretrained(
      tmp_path / "adapter")
  model_cfg = ConfigDict(model_cfg)
  for ours, message in [(dict(targets=("q_proj",), rank=4, alpha=16.0), "lora_alpha=8"),
                        (dict(targets=("q_proj",), rank=4, alpha=8.0, rslora=True), "use_rslora"),
                        (dict(targets=("v_proj",), rank=4, alpha=8.0), "no LoRA layer"),
                        (dict(targets=("q_proj",), rank=2, alpha=8.0), "rank=2")]:
    with pytest.raises(FinetuneError, match=message):
      adapters.load_model(model_cfg, peft_config(method="lora", **ours), 0, checkpoint=str(tmp_path / "base"),
                          adapter=str(tmp_path / "adapter"))
  # Damaged files are one-line errors naming them (the config was a JSONDecodeError traceback).
  ours = peft_config(method="lora", targets=("q_proj",), rank=4, alpha=8.0)
  weights = tmp_path / "adapter" / "adapter_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:40])
  with pytest.raises(FinetuneError, match=r"adapter_model.safetensors is damaged .*save or download the adapter"):
    adapters.load_model(model_cfg, ours, 0, checkpoint=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
  (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LO')
  with pytest.raises(FinetuneError, match=r"adapter_config.json is damaged \(not valid JSON"):
    adapters.load_model(model_cfg, ours, 0, checkpoint=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))


@pytest.mark.parametrize("variant", [{"dora": True}, {"quantize": "nf4", "quant_block_size": 16},
                                     {"quantize": "nf4", "quant_block_size": 16, "modules_to_save": (),
                                      "targets": ("query", "value", "mlp_in", "head")}],
                         ids=["dora", "qlora", "qlora_head"])
def test_cli_exports_a_lora_run_merged_and_as_a_peft_adapter(variant, tmp_path):
  """`finetune export` of a LoRA run: --format hf writes the merged model, --format peft the adapter (plus the base
  it belongs to, since this run did not start from a Hugging Face checkpoint: for QLoRA its NF4 kernels
  dequantised); both give the run's logits. (qlora_head: the head's kernel is NF4 codes in the model state, so the
  class count comes from its LoRA B; it was read from head/kernel as 0 and export failed.)"""
  from conftest import tiny_config
  from finetune import cli, train as train_lib
  config = tiny_config(model={"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2,
                              "num_heads": 2, "mlp_dim": 32},
                       peft={"method": "lora", "targets": ("query", "value", "mlp_in"), "rank": 2, "alpha": 4.0,
                             "modules_to_save": ("^head/",), **variant},
                       train={"steps": 10, "log_every": 5, "checkpoint_every": 0})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", "peft", "--out",
                   str(tmp_path / "peft")]) == 0
  ours = adapters.load_model(config.model, config.peft, 10, checkpoint=str(tmp_path / "run"))
  images = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
  expected = np.asarray(ours(images))
  pixels = torch.tensor(images.transpose(0, 3, 1, 2))
  with torch.no_grad():
    merged = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    np.testing.assert_allclose(merged(pixel_values=pixels).logits.numpy(), expected, atol=1e-4, rtol=1e-4)
    base = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "peft" / "base_model")).eval()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    np.testing.assert_allclose(adapted(pixel_values=pixels).logits.numpy(), expected, atol=1e-4, rtol=1e-4)
  head = ["classifier"] if "head" in variant.get("targets", ()) else []
  assert json.load(open(tmp_path / "peft" / "adapter_config.json"))["target_modules"] == sorted(
      ["fc1", "q_proj", "v_proj"] + head)


def test_dora_gradients_equal_peft(tmp_path):
  """Training, not only inference, matches PEFT: gradients of every adapter tensor (A, B, magnitude) agree."""
  torch_model, model_cfg = save_base("bert", tmp_path / "base")
  model_cfg = ConfigDict(model_cfg)
  cfg = peft_config(method="lora", targets=("query", "value"), rank=4, alpha=8.0, dora=True)
  model = adapters.load_model(model_cfg, cfg, 3, checkpoint=str(tmp_path / "base"))
  params = flatten(nnx.state(model, nnx.Param).to_pure_dict())
  trained = [p for p in params if "lora_" in p]
  model = randomize_adapters(model, trained)
  params = jax.device_get(flatten(nnx.state(model, nnx.Param).to_pure_dict()))
  peft_format.export_peft(model_cfg, cfg, model, params, trained, 3, str(tmp_path / "adapter"))
  reference = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter"), is_trainable=True).eval()
  torch_inputs, ours = inputs("bert")
  reference(**torch_inputs).logits.pow(2).sum().backward()
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)

  def loss(state):
    return (nnx.merge(graphdef, state, rest)(*ours) ** 2).sum()

  grads = flatten(jax.grad(loss)(state.to_pure_dict()))
  torch_grads = {name: p.grad.numpy() for name, p in reference.named_parameters() if p.grad is not None}
  compared = 0
  for path in trained:
    module, leaf = path.rsplit("/", 1)
    layer, kind = module.split("/")[1], module.split("/")[-1]
    suffix = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight",
              "lora_magnitude": "lora_magnitude_vector.default.weight"}[leaf]
    name = next(n for n in torch_grads if f"layer.{layer}.attention.self.{kind}." in n and n.endswith(suffix))
    want = torch_grads[name] if leaf == "lora_magnitude" else torch_grads[name].T
    np.testing.assert_allclose(np.asarray(grads[path]), want, rtol=1e-3, atol=1e-5)
    compared += 1
  assert compared == 12


def test_adapter_values_derived_from_the_base_use_the_loaded_weights(tmp_path):
  """DoRA magnitudes start at the loaded kernels' column norms (the adapted model equals the loaded base at step
  0, with QLoRA too), and a prompt starts from loaded vocabulary rows, not from the random initial weights."""
  _, model_cfg = save_base("bert", tmp_path / "base")
  model_cfg, base_dir = ConfigDict(model_cfg), str(tmp_path / "base")
  _, (ids, mask) = inputs("bert")

  def hidden(model):
    return np.asarray(model.encode(ids, mask))

  plain = hidden(adapters.load_model(model_cfg, peft_config(), 3, checkpoint=base_dir))
  lora = dict(method="lora", targets=("query", "value", "intermediate"), rank=4)
  dora = hidden(adapters.load_model(model_cfg, peft_config(**lora, dora=True), 3, checkpoint=base_dir))
  np.testing.assert_allclose(dora, plain, atol=1e-5)
  quantized = dict(lora, quantize="nf4", quant_block_size=16)
  qlora = hidden(adapters.load_model(model_cfg, peft_config(**quantized), 3, checkpoint=base_dir))
  qdora = hidden(adapters.load_model(model_cfg, peft_config(**quantized, dora=True), 3, checkpoint=base_dir))
  np.testing.assert_allclose(qdora, qlora, atol=1e-5)
  assert np.abs(qlora - plain).max() > 1e-4  # (NF4 storage does change the base)
  prompted = adapters.load_model(model_cfg, peft_config(method="prompt", num_virtual_tokens=6), 3, checkpoint=base_dir)
  params = flatten(nnx.state(prompted, nnx.Param).to_pure_dict())
  vocabulary = np.asarray(params["embeddings/word_embeddings/embedding"])
  for row in np.asarray(params["embeddings/word_embeddings/soft_prompt"]):
    assert np.any(np.all(vocabulary == row, axis=1))


def _llama_logits_after_peft(adapter_dir, base_dir, ids):
  with torch.no_grad():
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=torch.tensor(ids)).logits.numpy()


def test_peft_export_names_the_hf_base_only_when_the_frozen_weights_are_its(tmp_path, capsys, monkeypatch):
  """A LoRA stage straight from a Hugging Face checkpoint names it as the base; a LoRA stage after a full
  fine-tuning stage writes its own base_model/ (naming the original checkpoint would apply the adapter to other
  weights), as does one that changed the architecture. Either way PEFT computes the run's logits. An interrupted run
  exports from its latest checkpoint."""
  import shutil  # pylint: disable=g-import-not-at-top
  from finetune import cli, train as train_lib  # pylint: disable=g-import-not-at-top
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  _, model_cfg = save_base("llama", tmp_path / "hf")
  lora = {"method": "lora", "targets": ("q_proj", "v_proj"), "rank": 2, "alpha": 4.0}
  config = build_config({
      "task": "causal_lm", "model": model_cfg,
      "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "validation_fraction": 0.0,
               "eval_splits": ("test",), "options": {"kind": "tokens", "length": 16, "vocab_size": 120,
                                                     "num_examples": 16}},
      "train": {"steps": 4, "log_every": 4, "checkpoint_every": 0},
      "optimizer": {"name": "adamw", "learning_rate": 3e-2, "warmup_steps": 0},
      "stages": {"full": {"init_from": str(tmp_path / "hf")},
                 "lora_after_full": {"init_from": "stage:full", "peft": lora},
                 "lora_from_hf": {"init_from": str(tmp_path / "hf"), "peft": lora},
                 # One of the checkpoint's two layers: the checkpoint is not this run's base (it was named, and
                 # PEFT applied the adapter to both layers, warning only of missing adapter keys).
                 "lora_from_hf_one_layer": {"init_from": str(tmp_path / "hf"), "peft": lora,
                                            "model": {"num_hidden_layers": 1}},
                 "qlora_from_hf": {"init_from": str(tmp_path / "hf"),
                                   "peft": {**lora, "quantize": "nf4", "quant_block_size": 16}}}})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  ids = np.random.default_rng(0).integers(1, 120, size=(2, 10))
  logits = {}
  for stage, named_base in (("lora_after_full", None), ("lora_from_hf", tmp_path / "hf"),
                            ("lora_from_hf_one_layer", None)):
    out = tmp_path / f"peft_{stage}"
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--stage", stage, "--format", "peft", "--out",
                     str(out)]) == 0
    written = json.load(open(out / "adapter_config.json"))["base_model_name_or_path"]
    assert written == str(named_base or out / "base_model")  # (a relative 'base_model' PEFT looked up on the Hub)
    assert (out / "base_model").is_dir() == (named_base is None)
    stage_cfg = ConfigDict(json.load(open(tmp_path / "run" / stage / "config.json")))
    model = adapters.load_model(stage_cfg.model, stage_cfg.peft, 0, checkpoint=str(tmp_path / "run" / stage))
    logits[stage] = np.asarray(model(ids, np.ones_like(ids)))
    np.testing.assert_allclose(_llama_logits_after_peft(out, named_base or out / "base_model", ids), logits[stage],
                               atol=1e-4, rtol=1e-4)
  # PEFT's own loader finds the written base from any folder (a relative name sent it to the Hub).
  monkeypatch.chdir(tmp_path / "run")
  auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft_lora_after_full")).eval()
  with torch.no_grad():
    auto_logits = auto(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits
  np.testing.assert_allclose(auto_logits.numpy(), logits["lora_after_full"], atol=1e-4, rtol=1e-4)
  # QLoRA names the float checkpoint, as PEFT's QLoRA adapters do, and says the adapter trained on rounded kernels.
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--stage", "qlora_from_hf", "--format", "peft",
                   "--out", str(tmp_path / "peft_qlora")]) == 0
  assert f"QLoRA: the base named is the float checkpoint {tmp_path / 'hf'}" in capsys.readouterr().out
  assert json.load(open(tmp_path / "peft_qlora" / "adapter_config.json"))["base_model_name_or_path"] == \
      str(tmp_path / "hf")
  # Interrupted: no adapter/ folder and no summary.json yet; the adapter comes from the latest checkpoint.
  stage_dir = tmp_path / "run" / "lora_after_full"
  shutil.rmtree(stage_dir / "adapter")
  (stage_dir / "summary.json").unlink()
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--stage", "lora_after_full", "--unfinished",
                   "--format", "peft", "--out", str(tmp_path / "unfinished")]) == 0
  np.testing.assert_allclose(_llama_logits_after_peft(tmp_path / "unfinished", tmp_path / "unfinished" / "base_model",
                                                      ids), logits["lora_after_full"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method, options, message", [
    ("bottleneck", {"bottleneck_size": 4, "targets": ("mlp_out",)},
     r"its adapter is .*/run/adapter, loaded with finetune.adapters.load_model"),
    ("ia3", {"targets": ("value", "mlp_out")}, r"use --format hf, which folds it into the weights"),
])
def test_peft_export_of_another_method_says_what_to_do_and_writes_nothing(method, options, message, tmp_path,
                                                                           capsys):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune import cli, train as train_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(model={"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 1,
                              "num_heads": 2, "mlp_dim": 32},
                       peft={"method": method, "modules_to_save": ("^head/",), **options},
                       train={"steps": 2, "log_every": 2, "checkpoint_every": 0})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  before = sorted(p.name for p in tmp_path.iterdir())
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", "peft", "--out",
                   str(tmp_path / "out")]) != 0
  assert re.search(message, capsys.readouterr().err)
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no staging folder beside it
  if method == "bottleneck":
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", "hf", "--out",
                     str(tmp_path / "out")]) != 0
    assert "has no --format hf export; its adapter is" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["hf", "peft"])
def test_export_of_a_model_without_a_hugging_face_format_says_so_in_either_format(fmt, tmp_path, capsys):
  """(An MLP run exported with --format peft was told to use --format hf, which cannot export an MLP either.)"""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune import cli, train as train_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)},
                       train={"steps": 2, "log_every": 2, "checkpoint_every": 0})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", fmt, "--out",
                   str(tmp_path / "out")]) != 0
  err = capsys.readouterr().err
  assert "model 'mlp' cannot be exported to Hugging Face format; exportable: bert, gpt2, llama, vit" in err, err
  assert "use --format" not in err
  assert not (tmp_path / "out").exists()


def test_peft_export_refuses_a_roberta_style_classifier(tmp_path):
  """(It wrote BERT names and a one-layer classifier, which PEFT failed to load onto RobertaForSequenceClassification
  with a KeyError; --format hf refused such models already.)"""
  config = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=48, vocab_size=120, max_position_embeddings=70, num_labels=3)
  transformers.RobertaForSequenceClassification(config).save_pretrained(tmp_path / "base")
  lora = peft_config(method="lora", targets=("query", "value"), rank=2, alpha=4.0)
  for pooling, refused in (("cls", True), ("mean", False)):
    model_cfg = ConfigDict({"name": "bert", "hf_config": str(tmp_path / "base"), "pooling": pooling})
    model = adapters.load_model(model_cfg, lora, 3)
    params = flatten(nnx.state(model, nnx.Param).to_pure_dict())
    trained = [path for path in params if "lora" in path]
    if refused:
      with pytest.raises(FinetuneError, match=r"PEFT export of a RoBERTa-style classifier \(position offsets\) is "
                                              r"not supported yet"):
        peft_format.peft_adapter(model_cfg, lora, model, params, trained, 3, base_model=str(tmp_path / "base"))
    else:  # the encoder alone: names PEFT finds on RobertaModel
      tensors, _ = peft_format.peft_adapter(model_cfg, lora, model, params, trained, 3, base_model="b")
      assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in tensors
