"""LoRA and its family: exact initial equivalence, scaling, dropout, merging, DoRA, QLoRA, LoRA+, adapters."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conftest import tiny_config
from finetune import adapters
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays
from finetune.config import defaults
from finetune.errors import FinetuneError
from finetune.methods import lora, nf4
from finetune.models import build_model
from finetune.partition import flatten, map_with_path

BERT = {"name": "bert", "vocab_size": 50, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 32, "dropout": 0.0}
VIT = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}


def peft_config(**values) -> ConfigDict:
  cfg = defaults().peft
  cfg.update({"method": "lora", "targets": ("query", "value"), "rank": 4, "alpha": 8.0, **values})
  return cfg


def ids():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, 50, (3, 7))), jnp.ones((3, 7), jnp.int32)


def adapted(peft_cfg, model_cfg=BERT, seed=0):
  return adapters.apply(build_model(ConfigDict(model_cfg), 3, nnx.Rngs(params=seed)), peft_cfg,
                        nnx.Rngs(params=seed + 1))


def randomize(model, pattern=r"lora_b$|lora_magnitude$", scale=0.5, seed=1):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  import re
  params = map_with_path(lambda p, x: x + scale * rng.normal(size=x.shape).astype(x.dtype) if re.search(pattern, p)
                         else x, params.to_pure_dict())
  return nnx.merge(graphdef, params, rest.to_pure_dict())


def plain_with(params_flat, model_cfg=BERT, model_state=None):
  model = build_model(ConfigDict(model_cfg), 3, nnx.Rngs(params=0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = map_with_path(lambda p, x: jnp.asarray(params_flat[p]), params.to_pure_dict())
  return nnx.merge(graphdef, params, rest.to_pure_dict())


def flat_params(model):
  return jax.device_get(flatten(nnx.state(model, nnx.Param).to_pure_dict()))


def flat_rest(model):
  _, _, rest = nnx.split(model, nnx.Param, ...)
  return jax.device_get(flatten(rest.to_pure_dict()))


@pytest.mark.parametrize("options", [{}, {"dora": True}, {"init": "gaussian"}, {"rslora": True}])
def test_adapted_model_equals_the_base_at_step_zero(options):
  base = build_model(ConfigDict(BERT), 3, nnx.Rngs(params=0))
  model = adapted(peft_config(**options))
  np.testing.assert_array_equal(np.asarray(model(*ids())), np.asarray(base(*ids())))
  assert not np.any(flat_params(model)["layers/0/attention/query/lora_b"])
  a = flat_params(model)["layers/0/attention/query/lora_a"]
  if options.get("init") == "gaussian":  # PEFT: normal(std=1/r)
    assert abs(a.std() - 1 / 4) < 0.1
  else:  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(a).max() <= 1 / math.sqrt(16) and np.abs(a).max() > 0.8 / math.sqrt(16)


def test_qlora_dora_starts_from_the_norms_of_the_nf4_kernel():
  """Without a checkpoint, DoRA's magnitude is the column norm of the kernel the layer computes with (the NF4 one
  under QLoRA), so the model equals plain QLoRA at step 0; the float kernel's norms would rescale every column."""
  base = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
  with nnx.use_eager_sharding(False):
    qdora, qlora = (lora.LoRALinear(base, rank=2, alpha=4.0, dora=dora, quantize="nf4", block_size=16,
                                    rngs=nnx.Rngs(1)) for dora in (True, False))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32)), jnp.float32)
  np.testing.assert_allclose(np.asarray(qdora(x)), np.asarray(qlora(x)), atol=1e-5)


@pytest.mark.parametrize("rslora,expected", [(False, 8.0 / 4), (True, 8.0 / 2)])
def test_scaling_alpha_over_r_or_sqrt_r(rslora, expected):
  rng = np.random.default_rng(0)
  base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  with nnx.use_eager_sharding(False):
    layer = lora.LoRALinear(base, rank=4, alpha=8.0, rslora=rslora, rngs=nnx.Rngs(1))
  layer.lora_b[...] = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  assert layer.scaling == expected
  update = layer(x) - (x @ base.kernel[...] + base.bias[...])
  np.testing.assert_allclose(update, expected * (x @ layer.lora_a[...] @ layer.lora_b[...]), atol=1e-5)


def test_dropout_applies_to_the_lora_input_in_training_only():
  def hidden(model, **kw):  # token states: larger than the tiny classifier's logits
    return np.asarray(model.encode(*ids(), **kw))

  model = randomize(adapted(peft_config(dropout=0.5)))
  eval_out = hidden(model)
  no_dropout = randomize(adapted(peft_config(dropout=0.0)))
  np.testing.assert_allclose(eval_out, hidden(no_dropout), atol=1e-6)  # evaluation: no dropout at all
  with adapters.call_context(model, True, nnx.Rngs(dropout=0)):
    train_a = hidden(model, train=True, rngs=nnx.Rngs(dropout=0))
  with adapters.call_context(model, True, nnx.Rngs(dropout=1)):
    train_b = hidden(model, train=True, rngs=nnx.Rngs(dropout=1))
  assert np.abs(train_a - eval_out).max() > 1e-2 and np.abs(train_a - train_b).max() > 1e-2
  # Outside the context the layers are back in inference mode.
  np.testing.assert_array_equal(hidden(model), eval_out)
  # With B = 0 the dropped-out branch contributes nothing: dropout never touches the base path.
  fresh = adapted(peft_config(dropout=0.5))
  with adapters.call_context(fresh, True, nnx.Rngs(dropout=0)):
    np.testing.assert_allclose(hidden(fresh, train=True), hidden(fresh), atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"dora": True}, {"rslora": True, "bias": "lora_only"},
                                     {"rank_pattern": (("layers/1/", 2),), "alpha_pattern": (("value", 3.0),)}])
def test_merged_model_equals_the_adapted_one_and_unmerge_restores_the_base(options):
  cfg = peft_config(**options)
  model = randomize(adapted(cfg))
  merged, _ = lora.merge(model, flat_params(model), flat_rest(model))
  assert not any("lora" in p for p in merged)
  np.testing.assert_allclose(np.asarray(plain_with(merged)(*ids())), np.asarray(model(*ids())), atol=1e-5)
  if options.get("rank_pattern"):
    assert flat_params(model)["layers/1/attention/query/lora_a"].shape == (16, 2)
    assert lora.lora_modules(model)["layers/0/attention/value"].scaling == 3.0 / 4
  if not options.get("dora"):
    base = lora.unmerge(model, merged, flat_params(model))
    for path, value in flat_params(adapted(cfg)).items():
      if "lora" not in path:
        np.testing.assert_allclose(base[path], value, atol=1e-6)
  else:
    with pytest.raises(FinetuneError, match="DoRA"):
      lora.unmerge(model, merged, flat_params(model))


def test_nf4_base_is_dequantized_on_the_fly_and_merges():
  cfg = peft_config(quantize="nf4", quant_block_size=16, targets=("query", "value", "intermediate"))
  model = randomize(adapted(cfg))
  rest = flat_rest(model)
  assert rest["layers/0/attention/query/kernel_codes"].dtype == np.uint8
  assert "layers/0/attention/query/kernel" not in flat_params(model)
  float_model = adapted(peft_config(targets=("query", "value", "intermediate")))
  float_model = randomize(float_model)
  # 4-bit storage changes outputs by quantisation error only.
  difference = np.abs(np.asarray(model(*ids())) - np.asarray(float_model(*ids()))).max()
  assert 0 < difference < 0.05
  merged, state = lora.merge(model, flat_params(model), rest)
  assert not any("kernel_" in p for p in state)
  np.testing.assert_allclose(np.asarray(plain_with(merged)(*ids())), np.asarray(model(*ids())), atol=1e-5)
  report = nf4.memory_report([(16, 16)] * 4 + [(16, 32)] * 2, block_size=16)
  assert report["nf4"] < report["bfloat16"] < report["float32"]


@pytest.mark.parametrize("modules_to_save", [("^head/",), ("head",), ("head/",)])
def test_modules_to_save_get_no_adapter_even_when_a_target_matches_them(modules_to_save):
  model = adapted(peft_config(targets=(r"(query|value|head)$",), rank=2, modules_to_save=modules_to_save))
  assert not isinstance(model.head, lora.LoRALinear)  # trained in full instead
  assert isinstance(model.layers[0].attention.query, lora.LoRALinear)


def test_our_adapter_loads_only_under_the_settings_it_was_trained_with(tmp_path):
  """Same tensors, other alpha / rsLoRA / DoRA: another model. Refused, as a PEFT folder's are."""
  from finetune import peft_format  # pylint: disable=g-import-not-at-top
  trained_with = peft_config(alpha=8.0)
  flat = {k: np.asarray(v) for k, v in flatten(nnx.state(adapted(trained_with), nnx.Param).to_pure_dict()).items()}
  adapters.save_adapter(str(tmp_path / "adapter"), flat, [k for k in flat if "lora_" in k], trained_with,
                        ConfigDict(BERT))
  read = lambda cfg: peft_format.read_any_adapter(str(tmp_path), ConfigDict(BERT), cfg,
                                                  adapters.abstract_model(ConfigDict(BERT), cfg, 3), 3)
  assert read(peft_config(alpha=8.0))[0]  # the same settings load
  for changed, key in [({"alpha": 32.0}, "alpha"), ({"rslora": True}, "rslora"), ({"dora": True}, "dora")]:
    with pytest.raises(FinetuneError, match=rf"trained with peft.{key}=.* set config.peft.{key} to the adapter's"):
      read(peft_config(**{"alpha": 8.0, **changed}))
  (tmp_path / "adapter" / adapters.ADAPTER_CONFIG).write_text('{"name": ')  # cut short
  with pytest.raises(FinetuneError, match=r"adapter/adapter.json is damaged \(not valid JSON"):
    read(trained_with)


def test_a_plain_stage_from_a_lora_run_starts_from_its_merged_weights(tmp_path):
  """init_from a LoRA run into a stage without LoRA folds the adapters in: kernel + alpha/r * A @ B. (Loading only
  the base kernels would silently drop what the adapters learned.)"""
  from finetune.config import stage_configs  # pylint: disable=g-import-not-at-top
  config = tiny_config(model=VIT, peft={"method": "lora", "targets": ("query", "value"), "rank": 2, "alpha": 8.0,
                                        "modules_to_save": ("^head/",)},  # (ViT's zero head must train)
                       stages={"lora": {}, "full": {"init_from": "stage:lora", "peft": {"method": ""}}},
                       train={"steps": 4, "log_every": 4, "checkpoint_every": 0})
  train_lib.train_and_evaluate(config, str(tmp_path))
  source = read_checkpoint_arrays(str(tmp_path / "lora" / "checkpoints" / "4"))["params"]
  full_cfg = dict(stage_configs(config))["full"]
  state, report = train_lib.initial_state(train_lib.build_stage(full_cfg), full_cfg, str(tmp_path))
  start = flatten(jax.device_get(state.params))
  for module in ("blocks/0/attention/query", "blocks/1/attention/value"):
    update = 4.0 * source[f"{module}/lora_a"] @ source[f"{module}/lora_b"]
    assert np.abs(update).max() > 1e-4, "the premise: the adapter learned something"
    np.testing.assert_allclose(start[f"{module}/kernel"], source[f"{module}/kernel"] + update, atol=1e-6)
  assert report["fresh"] == []
  (tmp_path / "lora" / "config.json").write_text('{"model": ')  # the source run's config, cut short
  with pytest.raises(FinetuneError, match=r"lora/config.json is damaged \(not valid JSON"):
    train_lib.initial_state(train_lib.build_stage(full_cfg), full_cfg, str(tmp_path))


QLORA = {"quantize": "nf4", "quant_block_size": 16}


QLORA_HEAD = {**QLORA, "targets": ("query", "value", "head"), "modules_to_save": ()}  # the head NF4 codes too


@pytest.mark.parametrize("first, second", [({}, {"targets": ("query",)}), ({}, {"alpha": 32.0}), ({}, {"dora": True}),
                                           (QLORA, {"quantize": ""}), (QLORA, {"quant_block_size": 8}),
                                           (QLORA_HEAD, {"quantize": ""})])
def test_a_lora_stage_with_other_settings_starts_from_the_source_runs_function(tmp_path, monkeypatch, first,
                                                                                  second):
  """(A LoRA stage from a LoRA run loaded A and B as they were: with other targets an adapter was dropped, with
  another alpha rescaled, with DoRA the magnitudes were taken from the bare base kernels, and a QLoRA source with
  other quantisation settings was refused with advice to re-initialise the base. Now the source's adapters are
  folded into its (dequantised) base and the stage's own adapters start at zero, unless the settings are the same.
  With the head quantized too, folding read the class count from head/kernel, absent, as 0: a ZeroDivisionError.)"""
  from finetune.config import stage_configs  # pylint: disable=g-import-not-at-top
  lora_cfg = {"method": "lora", "targets": ("query", "value"), "rank": 2, "alpha": 8.0, "modules_to_save": ("^head/",),
              **first}
  common = {"model": VIT, "peft": lora_cfg, "train": {"steps": 4, "log_every": 4, "checkpoint_every": 0}}
  train_lib.train_and_evaluate(tiny_config(**common, stages={"lora": {}}), str(tmp_path))
  stages = dict(stage_configs(tiny_config(**common, stages={"lora": {}, "again": {"init_from": "stage:lora",
                                                                                  "peft": second}})))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  checkpoint = str(tmp_path / "lora" / "checkpoints" / "4")
  expected = np.asarray(adapters.load_model(stages["lora"].model, stages["lora"].peft, 10, checkpoint)(images))
  stage = train_lib.build_stage(stages["again"])
  folded = []
  real_fold = adapters.fold_source_adapters
  monkeypatch.setattr(adapters, "fold_source_adapters", lambda *args, **kwargs: folded.append(
      real_fold(*args, **kwargs)) or folded[-1])
  state, _ = train_lib.initial_state(stage, stages["again"], str(tmp_path))
  start = nnx.merge(stage.graphdef, state.params, state.model_state)
  # NF4 re-quantises the folded kernels: 4-bit levels, a few percent of the logits
  atol = 0.1 * np.abs(expected).max() if stages["again"].peft.quantize else 1e-5
  np.testing.assert_allclose(np.asarray(start(images)), expected, atol=atol)
  if first.get("quantize"):  # the logits cannot see a fold's error below NF4's: the folded float kernel, before
    source = read_checkpoint_arrays(checkpoint)  # re-quantisation, is the source's dequantised base + s A B
    layer = "blocks/0/attention/query"
    codes = {key[len(f"{layer}/kernel_"):]: value for key, value in source["model_state"].items()
             if key.startswith(f"{layer}/kernel_")}
    base = np.asarray(nf4.dequantize(codes, (16, 16)))
    update = (8.0 / 2) * source["params"][f"{layer}/lora_a"] @ source["params"][f"{layer}/lora_b"]
    assert np.abs(update).max() > 1e-3  # the source's adapters moved
    np.testing.assert_allclose(folded[-1]["params"][f"{layer}/kernel"], base + update, atol=1e-6)
  plain = adapters.load_model(stages["lora"].model, ConfigDict({**defaults().peft.to_dict(), "method": ""}), 10,
                              checkpoint)
  np.testing.assert_allclose(np.asarray(plain(images)), expected, atol=1e-5)  # load_model folds them too


def test_target_errors_are_one_clear_line():
  with pytest.raises(FinetuneError, match=r"'qkv' matches no Linear layer .* named like head, layers/0/"):
    adapted(peft_config(targets=("qkv",)))
  with pytest.raises(FinetuneError, match="matches no Linear"):
    adapted(peft_config(targets=(r"layers/9/",)))
  with pytest.raises(FinetuneError, match=r"rank=32 .* between 1 and 16"):
    adapted(peft_config(rank=32))
  with pytest.raises(FinetuneError, match="config.peft.targets is empty"):
    adapted(peft_config(targets=()))
  # (A layer modules_to_save trains fully was said not to exist.)
  with pytest.raises(FinetuneError, match=r"config.peft.targets: 'head' names only head, which "
                                          r"config.peft.modules_to_save trains fully \(no adapter there\)"):
    adapted(peft_config(targets=("query", "head"), modules_to_save=("^head/",)))
  # (A CNN's only Linear layer is its head, which modules_to_save trains whole: the list of names was empty.)
  with pytest.raises(FinetuneError, match=r"config.peft.targets: this model has no Linear layer to adapt outside "
                                          r"config.peft.modules_to_save"):
    adapted(peft_config(targets=("conv",), modules_to_save=("^head/",)), {"name": "cnn", "stem_width": 8,
                                                                          "widths": (8, 16)})
  # rank_pattern / alpha_pattern: a regex naming no adapted layer is an error (a typo trained silently), a bad rank
  # names the entry that set it, and an invalid regex is one line from the config check.
  with pytest.raises(FinetuneError, match=r"config.peft.rank_pattern regex 'querry' matches no adapted layer; the "
                                          r"adapted layers: layers/0/attention/query"):
    adapted(peft_config(rank_pattern=(("querry", 2),)))
  with pytest.raises(FinetuneError, match=r"config.peft.alpha_pattern regex 'intermediate' matches no adapted"):
    adapted(peft_config(alpha_pattern=(("intermediate", 64.0),)))
  # (A later entry that only earlier ones' layers match set nothing, silently: the first matching entry wins.)
  with pytest.raises(FinetuneError, match=r"config.peft.rank_pattern entry 'layers/0/attention/query' sets no "
                                          r"layer: the earlier entry 'query' takes every layer it matches "
                                          r"\(layers/0/attention/query; .*put the more specific entry first"):
    adapted(peft_config(rank_pattern=(("query", 4), ("layers/0/attention/query", 8))))
  assert adapted(peft_config(rank_pattern=(("layers/0/attention/query", 8), ("query", 4)))) is not None
  with pytest.raises(FinetuneError, match=r"config.peft.rank_pattern entry \('value', 64\) for layers/0/attention/"
                                          r"value of shape \(16, 16\): the rank must be between 1 and 16; lower "
                                          r"that entry's rank"):
    adapted(peft_config(rank=2, rank_pattern=(("value", 64),)))
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(FinetuneError, match=r"config.peft.rank_pattern: '\(query' is not a valid regex"):
    build_config({"train": {"steps": 1}, "peft": {"rank_pattern": (("(query", 4),)}})


def test_trainable_set_bias_modes_and_modules_to_save():
  model = adapted(peft_config())
  paths = list(flat_params(model))
  base_paths = set(flat_params(build_model(ConfigDict(BERT), 3, nnx.Rngs(0))))
  lora_paths = {p for p in paths if "lora_" in p}

  def trained(**options):
    return adapters.trainable_paths(peft_config(**options), paths, base_paths)

  assert trained() == lora_paths
  assert trained(bias="lora_only") == lora_paths | {f"layers/{i}/attention/{m}/bias" for i in (0, 1)
                                                    for m in ("query", "value")}
  assert trained(bias="all") == lora_paths | {p for p in paths if p.endswith("/bias")}
  assert trained(modules_to_save=("^head/",)) == lora_paths | {"head/kernel", "head/bias"}
  with pytest.raises(FinetuneError, match=r"modules_to_save: pattern '\^nothing/' matches no parameter"):
    trained(modules_to_save=("^nothing/",))


def lora_run(tmp_path, name="run", **peft):
  config = tiny_config(model=VIT, peft={"method": "lora", "targets": ("query", "value"), "rank": 4, "alpha": 8.0,
                                        "modules_to_save": ("^head/",), **peft},
                       stages={"pretrain": {"peft": {"method": ""}, "train": {"steps": 8}},
                               "lora": {"init_from": "stage:pretrain"}},
                       train={"steps": 12, "log_every": 4, "checkpoint_every": 0})
  return train_lib.train_and_evaluate(config, str(tmp_path / name))


def test_lora_stage_trains_adapters_only_and_saves_a_small_adapter(tmp_path):
  summaries = lora_run(tmp_path, lora_plus_ratio=16.0, dropout=0.1)
  run = tmp_path / "run"
  before = read_checkpoint_arrays(str(run / "pretrain" / "checkpoints" / "8"))["params"]
  after = read_checkpoint_arrays(str(run / "lora" / "checkpoints" / "12"))["params"]
  for path, value in before.items():  # every base parameter outside modules_to_save: bit-identical
    if not path.startswith("head/"):
      assert np.array_equal(after[path], value), path
  assert np.abs(after["blocks/0/attention/query/lora_b"]).max() > 0
  assert not np.array_equal(after["head/kernel"], before["head/kernel"])
  info = summaries["lora"]["peft"]
  trainable = sum(v.size for p, v in after.items() if "lora_" in p or p.startswith("head/"))
  assert info["trainable_params"] == trainable and info["total_params"] == sum(v.size for v in after.values())
  assert info["trainable_percent"] == pytest.approx(100 * trainable / info["total_params"])
  # Optimizer state exists for the trained tensors only (adamw: two moments each).
  assert summaries["lora"]["optimizer_state_bytes"] <= 2 * 4 * trainable + 64
  # LoRA+: B's rate is 16x A's, through its own partition label.
  record = json.loads(open(run / "lora" / "metrics.jsonl").readline())
  assert record["learning_rate/block_1*16"] == pytest.approx(16 * record["learning_rate/block_1"])
  # The adapter folder holds the trained tensors only.
  meta, arrays = adapters.load_adapter(str(run / "lora" / "adapter"))
  assert sorted(arrays) == sorted(p for p in after if "lora_" in p or p.startswith("head/"))
  size = os.path.getsize(run / "lora" / "adapter" / "adapter.safetensors")
  assert size < 4 * trainable + 4096 and meta["peft"]["rank"] == 4


def test_adapter_loads_onto_the_base_and_adapters_switch_and_combine(tmp_path):
  lora_run(tmp_path, "a")
  config = json.load(open(tmp_path / "a" / "lora" / "config.json"))
  model_cfg, peft_cfg = ConfigDict(config["model"]), ConfigDict(config["peft"])
  base = str(tmp_path / "a" / "pretrain")
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  run_model = adapters.load_model(model_cfg, peft_cfg, 10, checkpoint=str(tmp_path / "a" / "lora"))
  loaded = adapters.load_model(model_cfg, peft_cfg, 10, checkpoint=base, adapter=str(tmp_path / "a" / "lora"))
  np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(run_model(images)))
  bank = adapters.AdapterBank(model_cfg, peft_cfg, 10, checkpoint=base)
  _, first = adapters.load_adapter(str(tmp_path / "a" / "lora" / "adapter"))
  second = {p: v * (0.5 if "lora_b" in p else 1.0) + (0.1 if p.startswith("head/") else 0.0)
            for p, v in first.items()}
  bank.add("first", str(tmp_path / "a" / "lora"))
  bank.add("second", second)
  np.testing.assert_array_equal(np.asarray(bank.model("first")(images)), np.asarray(run_model(images)))
  assert np.abs(np.asarray(bank.model("second")(images)) - np.asarray(run_model(images))).max() > 1e-4
  np.testing.assert_allclose(np.asarray(bank.combined({"first": 1.0})(images)), np.asarray(run_model(images)),
                             atol=1e-5)
  # w * (first) + (1 - w) * (second): B is linear in the update, so 0.5/0.5 equals B scaled by 0.75.
  blend = {p: v * (0.75 if "lora_b" in p else 1.0) + (0.05 if p.startswith("head/") else 0.0)
           for p, v in first.items()}
  bank.add("blend", blend)
  np.testing.assert_allclose(np.asarray(bank.combined({"first": 0.5, "second": 0.5})(images)),
                             np.asarray(bank.model("blend")(images)), atol=1e-5)
  with pytest.raises(FinetuneError, match="no adapter named 'third'; loaded: first, second, blend"):
    bank.model("third")
  # The same through a stage's config: peft.load_adapter after init_from.
  stage_cfg = tiny_config(model=VIT, peft={**peft_cfg.to_dict(), "load_adapter": str(tmp_path / "a" / "lora")},
                          init_from=base)
  state, report = train_lib.initial_state(train_lib.build_stage(stage_cfg), stage_cfg, str(tmp_path))
  assert report["adapter"]["loaded"] == len(first)
  loaded_params = jax.device_get(flatten(state.params))
  for path, value in first.items():
    np.testing.assert_array_equal(loaded_params[path], value)
  wrong = {**first, "blocks/0/attention/query/lora_a": np.zeros((16, 2), np.float32)}
  with pytest.raises(FinetuneError, match="different base model or rank"):
    bank.add("wrong", wrong)


def test_qlora_gradients_equal_those_through_the_dequantized_kernel():
  """The hand-written VJP of the NF4 matmul (no float kernel kept between passes) is the exact gradient."""
  rng = np.random.default_rng(0)
  stored = nf4.quantize(jnp.asarray(rng.normal(size=(16, 24)), jnp.float32), 8)
  kernel = nf4.dequantize(stored, (16, 24))
  x = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((16, 4), (4, 24)))
  magnitude = jnp.asarray(rng.uniform(0.5, 2.0, size=24), jnp.float32)
  for dora in (None, magnitude):
    def loss(x, a, b, source, magnitude=dora):
      y = lora._apply(x, x, source, a, b, magnitude, None, scaling=0.5, shape=(16, 24), dropped=False)
      return jnp.sum(jnp.sin(y))
    quantized = jax.grad(loss, argnums=(0, 1, 2))(x, a, b, stored)
    reference = jax.grad(loss, argnums=(0, 1, 2))(x, a, b, kernel)
    for got, want in zip(quantized, reference):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_qlora_run_with_dropout_resumes_to_the_same_parameters(tmp_path):
  """Quantized base kernels (model state) and LoRA dropout keys come back exactly from a checkpoint."""
  import shutil
  config = tiny_config(model=VIT, peft={"method": "lora", "targets": ("query", "value", "mlp_in"), "rank": 2,
                                        "quantize": "nf4", "quant_block_size": 16, "dropout": 0.2,
                                        "modules_to_save": ("^head/",)},
                       train={"steps": 8, "log_every": 4, "checkpoint_every": 4, "keep_checkpoints": 3})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  final = read_checkpoint_arrays(str(tmp_path / "run" / "checkpoints" / "8"))
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "8")
  (tmp_path / "run" / "summary.json").unlink()
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))["train"]
  assert summary["init"]["resumed_from_step"] == 4
  # The 4-bit base kernels are parameters too (they were left out of num_params and frozen_params).
  assert summary["num_params"] == summary["peft"]["total_params"] > summary["trainable_params"]
  assert summary["frozen_params"] == summary["num_params"] - summary["trainable_params"]
  again = read_checkpoint_arrays(str(tmp_path / "run" / "checkpoints" / "8"))
  for part in ("params", "model_state"):
    assert sorted(again[part]) == sorted(final[part])
    for path in final[part]:
      np.testing.assert_array_equal(again[part][path], final[part][path])
  assert any(p.endswith("kernel_codes") for p in final["model_state"])


def test_combining_adapters_refuses_other_methods_and_reads_missing_layers_from_the_base():
  """(An IA3 bank combined to the plain base silently; an adapter lacking one LoRA layer's factors, which
  model(name) takes from the base, raised a KeyError in combined.)"""
  mlp = ConfigDict({"name": "mlp", "input_size": 6, "hidden": (5, 4)})
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)
  ia3 = adapters.AdapterBank(mlp, peft_config(method="ia3", targets=("layers/0",)), 3)
  ia3.add("a", {"layers/0/ia3_scale": np.full((5,), 3.0, np.float32)})
  with pytest.raises(FinetuneError, match=r"combining adapters adds weighted LoRA updates; this bank holds 'ia3' "
                                          r"adapters: use model\(name\) for each"):
    ia3.combined({"a": 1.0})
  bank = adapters.AdapterBank(mlp, peft_config(method="lora", targets=("layers/0", "layers/1"), rank=2), 3)
  bank.add("only_first", {"layers/0/lora_b": np.ones((2, 5), np.float32)})
  np.testing.assert_allclose(np.asarray(bank.combined({"only_first": 1.0})(x)),
                             np.asarray(bank.model("only_first")(x)), atol=1e-5)


def test_the_reported_trainable_count_leaves_out_what_freeze_rules_keep_frozen():
  """(PEFT's report counted every adapter and modules_to_save tensor, also those a freeze rule or `first_n` keeps
  frozen: the "trainable %" a paper's table quotes disagreed with summary.json's trainable_params.)"""
  peft = {"method": "lora", "targets": ("query", "value"), "rank": 4, "modules_to_save": ("^head/",)}
  unfrozen = train_lib.build_stage(tiny_config(model=VIT, peft=peft))
  frozen = train_lib.build_stage(tiny_config(model=VIT, peft=peft, freeze={"patterns": (r"^blocks/0/.*/lora_a$",)}))
  shapes = {p: x.shape for p, x in flatten(frozen.abstract_params).items()}
  lora_a = sum(math.prod(s) for p, s in shapes.items() if p.startswith("blocks/0/") and p.endswith("lora_a"))
  assert lora_a > 0
  assert frozen.peft_info["trainable_params"] == unfrozen.peft_info["trainable_params"] - lora_a
  assert frozen.peft_info["trainable_params"] == frozen.strategy.counts(len(frozen.strategy.phases) - 1)["trainable"]
  assert frozen.peft_info["trainable_percent"] < unfrozen.peft_info["trainable_percent"]
