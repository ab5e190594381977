"""The model contract (finetune/models/__init__.py) checked for every registered model."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from finetune.errors import FinetuneError
from finetune.models import MODELS, build_model, hf, model_kwargs
from finetune.partition import flatten
from finetune.sharding import logical_axes

NUM_CLASSES = 7
BATCH = 4
EMBED_WIDTH = {"mlp": 256, "cnn": 64, "vit": 64}
GROUP_NAMES = {
    "mlp": ["layer_1", "layer_2", "head"],
    "cnn": ["stem", "stage_1", "stage_2", "head"],
    "vit": ["embedding", "block_1", "block_2", "block_3", "block_4", "head"],
}
ALL_MODELS = ["cnn", "mlp", "vit"]


def _build(name: str, seed: int = 0, **kwargs) -> nnx.Module:
  return build_model(ConfigDict({"name": name, **kwargs}), NUM_CLASSES, nnx.Rngs(seed))


def _images(seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(BATCH, 28, 28, 1)), jnp.float32)


def _param_paths(model: nnx.Module) -> list[str]:
  return list(flatten(nnx.split(model, nnx.Param, ...)[1].to_pure_dict()))


@pytest.fixture(scope="module")
def models() -> dict[str, nnx.Module]:
  return {name: _build(name) for name in ALL_MODELS}


def test_registered_models():
  # Image models are tested here; the text models in test_bert_parity.py, test_gpt2_parity.py and test_ulmfit.py.
  assert MODELS.names() == sorted(ALL_MODELS + ["bert", "gpt2", "llama", "lstm"])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_and_embed_shapes(models, name):
  model = models[name]
  x = _images()
  for train in (False, True):
    logits = model(x, train=train, rngs=nnx.Rngs(dropout=1))
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
  features = model.embed(x)
  assert features.shape == (BATCH, EMBED_WIDTH[name])
  # The head reads embed's features: checked with a random head (ViT's starts at zero, where any features agree).
  model = nnx.clone(model)
  _, head_params = nnx.split(model.head, nnx.Param)
  rng = np.random.default_rng(0)
  nnx.update(model.head, jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), head_params))
  logits = model(x)
  assert float(jnp.abs(logits).max()) > 0.1
  np.testing.assert_allclose(logits, model.head(model.embed(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_layer_groups_cover_every_parameter_once_head_last(models, name):
  model = models[name]
  groups = model.layer_groups()
  assert [g for g, _ in groups] == GROUP_NAMES[name]
  assert groups[-1][0] == "head"
  paths = _param_paths(model)
  assert paths
  for path in paths:
    owners = [group for group, regex in groups if re.search(regex, path)]
    assert len(owners) == 1, f"{path} is in groups {owners}"
  for group, regex in groups:  # No empty group.
    assert any(re.search(regex, path) for path in paths), group
  head_paths = [p for p in paths if re.search(dict(groups)["head"], p)]
  assert {"head/kernel", "head/bias"} <= set(head_paths)


def test_layer_groups_numbering_does_not_collide_past_ten_blocks():
  model = _build("mlp", hidden=(4,) * 12)
  groups = model.layer_groups()
  assert len(groups) == 13
  for path in _param_paths(model):
    assert len([g for g, regex in groups if re.search(regex, path)]) == 1, path


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameters_have_logical_axes(models, name):
  params = nnx.split(models[name], nnx.Param, ...)[1]
  axes = logical_axes(params)
  shapes = {path: leaf.shape for path, leaf in flatten(params.to_pure_dict()).items()}
  assert set(axes) == set(shapes)
  for path, shape in shapes.items():
    assert len(axes[path]) == len(shape), path
    if len(shape) >= 2:
      assert any(a is not None for a in axes[path]), f"{path} {shape} has no logical axis names"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_dropout_only_in_train_mode(name):
  # Compared on `embed` (the ViT head starts at zero, so its logits are all 0 whatever dropout does).
  model = _build(name, dropout=0.5)
  x = _images()
  train_a = model.embed(x, train=True, rngs=nnx.Rngs(dropout=1))
  train_a_again = model.embed(x, train=True, rngs=nnx.Rngs(dropout=1))
  train_b = model.embed(x, train=True, rngs=nnx.Rngs(dropout=2))
  np.testing.assert_allclose(train_a, train_a_again, rtol=1e-6)  # The rng passed at call time decides.
  assert not np.allclose(train_a, train_b)
  eval_a = model.embed(x, train=False, rngs=nnx.Rngs(dropout=1))
  eval_b = model.embed(x, train=False, rngs=nnx.Rngs(dropout=2))
  eval_none = model.embed(x)
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(eval_a, eval_none)


def test_mlp_without_dropout_train_equals_eval():
  model = _build("mlp")
  x = _images()
  np.testing.assert_allclose(model(x, train=True, rngs=nnx.Rngs(dropout=3)), model(x), rtol=1e-6)


def test_cnn_batch_norm_stats_change_only_in_train_mode():
  model = _build("cnn")
  x = _images()

  def stats():
    return {k: np.asarray(v) for k, v in flatten(nnx.state(model, nnx.BatchStat).to_pure_dict()).items()}

  before = stats()
  assert sorted(before) == ["stages/0/blocks/0/norm/mean", "stages/0/blocks/0/norm/var",
                            "stages/1/blocks/0/norm/mean", "stages/1/blocks/0/norm/var",
                            "stem/norm/mean", "stem/norm/var"]
  model(x, train=False)
  after_eval = stats()
  for key in before:
    np.testing.assert_array_equal(after_eval[key], before[key])
  model(x, train=True, rngs=nnx.Rngs(dropout=0))
  after_train = stats()
  for key in before:
    assert not np.allclose(after_train[key], before[key]), key


def test_models_differ_by_seed():
  a, b = _build("mlp", seed=0), _build("mlp", seed=1)
  assert not np.allclose(a.layers[0].kernel[...], b.layers[0].kernel[...])
  c = _build("mlp", seed=0)
  np.testing.assert_array_equal(a.layers[0].kernel[...], c.layers[0].kernel[...])


def test_model_kwargs_are_passed_and_lists_become_tuples():
  kwargs = model_kwargs(ConfigDict({"name": "mlp", "hidden": [32, 16], "dropout": 0.1}), NUM_CLASSES)
  assert kwargs == {"hidden": (32, 16), "dropout": 0.1, "num_classes": NUM_CLASSES}
  model = _build("mlp", hidden=[32, 16])
  assert [layer.kernel.shape for layer in model.layers] == [(784, 32), (32, 16)]
  assert model.head.kernel.shape == (16, NUM_CLASSES)


def test_non_default_cnn_and_vit_shapes():
  # Shapes only (nnx.eval_shape): nothing is computed, so bigger inputs stay cheap.
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  cnn = nnx.eval_shape(lambda: _build("cnn", in_channels=3, stem_width=8, widths=(8, 16, 24)))
  assert nnx.eval_shape(lambda m, x: m(x), cnn, x).shape == (2, NUM_CLASSES)
  assert nnx.eval_shape(lambda m, x: m.embed(x), cnn, x).shape == (2, 24)
  assert [g for g, _ in cnn.layer_groups()] == ["stem", "stage_1", "stage_2", "stage_3", "head"]
  vit = nnx.eval_shape(lambda: _build("vit", image_size=32, in_channels=3, patch_size=8, width=16, depth=1,
                                      num_heads=2, mlp_dim=32, pool="mean"))
  assert nnx.eval_shape(lambda m, x: m(x), vit, x).shape == (2, NUM_CLASSES)
  assert nnx.eval_shape(lambda m, x: m.embed(x), vit, x).shape == (2, 16)
  assert vit.position_embedding.shape == (1, 17, 16)


@pytest.mark.parametrize("name,shape,settings", [
    ("mlp", (28, 28, 3), r"\(784,\) \(config.model.input_size"),
    ("cnn", (28, 28, 3), r"\(28, 28, 1\) \(config.model.in_channels"),
    ("vit", (32, 32, 1), r"\(28, 28, 1\) \(config.model.image_size, in_channels"),
])
def test_inputs_of_another_shape_are_a_one_line_error(models, name, shape, settings):
  """(Before, XLA stopped on a broadcasting or convolution shape error deep in the forward pass.)"""
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  with pytest.raises(FinetuneError, match=rf"the model expects inputs of shape {settings}.* but the data gives "
                     rf"\({shape[0]}, {shape[1]}, {shape[2]}\); set config.model"):
    nnx.eval_shape(lambda m, x: m(x), models[name], x)


def test_unknown_model_kwarg_lists_valid_kwargs():
  with pytest.raises(FinetuneError) as info:
    _build("cnn", widht=(8,))
  message = str(info.value)
  assert "config.model.widht is not an argument of model 'cnn'" in message
  assert "valid: in_channels, stem_width, widths, blocks_per_stage, dropout" in message
  assert "num_classes" not in message.split("valid:")[1]
  assert "rngs" not in message
  with pytest.raises(FinetuneError, match=r"valid: input_size, hidden, dropout$"):
    model_kwargs(ConfigDict({"name": "mlp", "hiden": (3,)}), NUM_CLASSES)


def test_num_classes_mismatch():
  with pytest.raises(FinetuneError, match=r"config.model.num_classes=5 but the data has 7 classes"):
    _build("mlp", num_classes=5)
  model = _build("mlp", num_classes=NUM_CLASSES)  # Agreeing is fine.
  assert model.head.kernel.shape[-1] == NUM_CLASSES


def test_unknown_model_name():
  with pytest.raises(FinetuneError, match=r"unknown model 'cnnn' \(did you mean 'cnn'\?\); valid model names: "
                     r"bert, cnn, gpt2, llama, lstm, mlp, vit"):
    _build("cnnn")


@pytest.mark.parametrize("model, message", [
    ({"name": "vit", "width": 10, "num_heads": 4},
     r"config.model.width=10 is not divisible by config.model.num_heads=4"),
    ({"name": "vit", "image_size": 28, "patch_size": 5}, r"config.model.image_size=28 is not divisible by "
                                                         r"config.model.patch_size=5"),
    ({"name": "vit", "pool": "max"}, r"config.model.pool='max'; valid: 'cls', 'mean'"),
    # (TypeError / ZeroDivisionError tracebacks from inside the model, or a shape mismatch in the first step.)
    ({"name": "cnn", "dropout": "abc"}, r"config.model.dropout='abc' is not float \(model 'cnn'\)"),
    ({"name": "cnn", "widths": (32.5, 64)}, r"config.model.widths=\(32.5, 64\) is not tuple\[int, ...\]"),
    ({"name": "cnn", "stem_width": 0}, r"model 'cnn' cannot be built from config.model \(.*stem_width=0.*\): "
                                       r"ZeroDivisionError: .*; check those values"),
])
def test_bad_model_arguments_are_one_line_errors_even_inside_eval_shape(model, message):
  """(They were ValueErrors raised inside nnx.eval_shape: a multi-frame traceback instead of one line.)"""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(FinetuneError, match=message):
    train_lib.build_stage(tiny_config(model=model))


def test_llama_head_sizes_that_cannot_work_are_refused():
  """(A shape mismatch in the first train step, after the model was built.)"""
  llama = dict(vocab_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
  with pytest.raises(FinetuneError, match=r"config.model.hidden_size=15 is not a multiple of config.model.num_"):
    _build("llama", hidden_size=15, **llama)
  with pytest.raises(FinetuneError, match=r"the attention head size 7 .* must be even for rotary position"):
    _build("llama", hidden_size=14, **llama)
  assert _build("llama", hidden_size=16, **llama).head_dim == 8


def test_config_json_defaults_are_transformers_own(tmp_path):
  """(A ViT config.json without layer_norm_eps got our 1e-6, not transformers' 1e-12, silently; a RoBERTa one with
  "pad_token_id": null was a TypeError.)"""
  import json  # pylint: disable=g-import-not-at-top
  vit = {"model_type": "vit", "image_size": 8, "patch_size": 4, "hidden_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 16}
  (tmp_path / "vit").mkdir()
  (tmp_path / "vit" / "config.json").write_text(json.dumps(vit))
  assert hf.model_kwargs(str(tmp_path / "vit"))[1]["layer_norm_eps"] == 1e-12
  # (Every other key a ViT config.json left out took our toy model's default: 28x28x1, width 64.)
  (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit", "num_labels": 2}))
  assert hf.model_kwargs(str(tmp_path / "vit"))[1] == {
      "pool": "cls", "image_size": 224, "patch_size": 16, "in_channels": 3, "width": 768, "depth": 12,
      "num_heads": 12, "mlp_dim": 3072, "layer_norm_eps": 1e-12}
  roberta = {"model_type": "roberta", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 16, "vocab_size": 30, "pad_token_id": None}
  (tmp_path / "roberta").mkdir()
  (tmp_path / "roberta" / "config.json").write_text(json.dumps(roberta))
  assert hf.model_kwargs(str(tmp_path / "roberta"))[1]["position_offset"] == 2


@pytest.mark.parametrize("heads", [None, 32], ids=["class-defaults", "32-heads"])
@pytest.mark.parametrize("model_type", sorted(hf.ARCHITECTURES))
def test_every_architecture_key_a_config_json_leaves_out_is_transformers_default(model_type, heads, tmp_path):
  """Hub files from older versions leave out keys whose defaults were the architecture's, and those differ by
  model_type: a Gemma with 32 query heads has GemmaConfig's 16 key/value heads (ours were as many as the queries,
  a shape error on load), a Gemma 2 without any keys 4 of 8, a Qwen3 128-wide heads."""
  import json  # pylint: disable=g-import-not-at-top
  transformers = pytest.importorskip("transformers")
  fields = {"model_type": model_type}
  if heads:
    fields["n_head" if model_type == "gpt2" else "num_attention_heads"] = heads
  (tmp_path / "config.json").write_text(json.dumps(fields))
  _, kwargs = hf.model_kwargs(str(tmp_path))
  reference = transformers.AutoConfig.for_model(**fields)
  # (None: a key computed from others, GPT-2's n_inner as 4 * n_embd, Qwen2's head_dim as hidden / heads)
  expected = {ours: getattr(reference, theirs, None) for theirs, ours in hf.ARCHITECTURES[model_type][1].items()}
  expected = {ours: value for ours, value in expected.items() if value is not None}
  assert {key: kwargs[key] for key in expected} == expected
  if model_type == "gemma2" or (model_type == "gemma" and heads):  # (the cases our old fallback got wrong)
    assert kwargs["num_key_value_heads"] == {"gemma": 16, "gemma2": 4}[model_type] != kwargs["num_attention_heads"]


TEXT_MODELS = {
    "bert": {"vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 40,
             "max_position_embeddings": 20},
    "gpt2": {"vocab_size": 50, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 20},
    "llama": {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "lstm": {"vocab_size": 50, "embed_size": 16, "hidden_size": 24, "num_layers": 2},
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "vit", *TEXT_MODELS])
def test_bfloat16_compute_runs_every_matmul_in_bfloat16(name, train):
  """train.compute_dtype='bfloat16' casts the parameters and the batch's floats (step.to_compute_dtype). (Every
  text model computed in float32 anyway: nnx.Embed fixes its dtype to float32 when built, so the bfloat16 table was
  cast back, and Llama's float32 rotary tables did the same to queries and keys; BatchNorm's float32 statistics
  turned the CNN, and the LSTM classifier's head, float32 after their first BatchNorm.)"""
  from finetune.step import to_compute_dtype  # pylint: disable=g-import-not-at-top
  model = _build(name, **TEXT_MODELS.get(name, {}))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if name in TEXT_MODELS:
    ids = jnp.ones((2, 9), jnp.int32)
    inputs = (ids, ids)
  else:
    inputs = (_images().astype(jnp.bfloat16),)
  jaxpr = jax.make_jaxpr(lambda p, r: nnx.merge(graphdef, p, r)(*inputs, train=train, rngs=nnx.Rngs(dropout=0)))(
      to_compute_dtype(params.to_pure_dict(), "bfloat16"), rest.to_pure_dict())
  products = [eqn for eqn in _equations(jaxpr.jaxpr)
              if eqn.primitive.name in ("dot_general", "conv_general_dilated")]
  assert products
  assert [str(eqn.outvars[0].aval.dtype) for eqn in products] == ["bfloat16"] * len(products)


def _equations(jaxpr):
  """Every equation of `jaxpr`, those of the jaxprs it calls (pjit, scan, remat, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for inner in (value if isinstance(value, (list, tuple)) else [value]):
        if hasattr(inner, "jaxpr") and hasattr(inner.jaxpr, "eqns"):
          yield from _equations(inner.jaxpr)
        elif hasattr(inner, "eqns"):
          yield from _equations(inner)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_decoder_s_features_are_its_last_real_token_s_wherever_the_padding_is(name):
  """(`embed` took the token at index (real tokens - 1): in a left-padded row, a pad's state.)"""
  model = _build(name, **TEXT_MODELS[name])
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, size=(1, 6)), jnp.int32)
  for padding, last in [((3, 0), 8), ((0, 3), 5)]:  # left, right
    padded, mask = jnp.pad(ids, ((0, 0), padding)), jnp.pad(jnp.ones_like(ids), ((0, 0), padding))
    np.testing.assert_array_equal(model.embed(padded, mask), model.hidden_states(padded, mask)[:, last])


def test_vit_drops_out_its_embedded_tokens_as_transformers_does():
  """(transformers' ViTEmbeddings applies dropout after the position embeddings; ours did not.) With no blocks, the
  features differ between training and evaluation through that dropout alone."""
  model = _build("vit", image_size=8, patch_size=4, width=16, depth=0, num_heads=2, mlp_dim=32, dropout=0.5)
  images = jnp.ones((2, 8, 8, 1))
  trained = model.embed(images, train=True, rngs=nnx.Rngs(dropout=1))
  assert not np.allclose(trained, model.embed(images, train=False))
  assert not np.allclose(trained, model.embed(images, train=True, rngs=nnx.Rngs(dropout=2)))
