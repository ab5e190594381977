"""Llama-family parity with transformers (PyTorch): RMSNorm, rotary embeddings, grouped-query attention, SwiGLU;
Qwen2 (query/key/value biases), Qwen3 (query/key norms), Mistral and Ministral (sliding-window attention, in
every layer or in those layer_types name) and Gemma (norms offset by one, scaled embeddings, GeGLU) load into the
same model; Gemma 2 adds norms after each sub-layer, soft-capping and alternating windows, Gemma 3 query/key
norms and a rotary base per layer kind."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conftest import model_from_hf
from finetune.errors import FinetuneError
from finetune.models import build_model, hf
from finetune.models.layers import causal_bias
from finetune.partition import assign_groups, flatten

torch = pytest.importorskip("torch", reason="torch is the parity reference (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa-4to2-untied": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=90, max_position_embeddings=64),
    "mha-tied-theta": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                           num_key_value_heads=6, vocab_size=70, tie_word_embeddings=True, rope_theta=500000.0,
                           rms_norm_eps=1e-5, max_position_embeddings=64),
    "mqa-head-dim": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=16, vocab_size=50, max_position_embeddings=64),
    "attention-bias": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, attention_bias=True),
    "qwen2-tied": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, tie_word_embeddings=True,
                       rope_theta=1000000.0, rms_norm_eps=1e-6),
    # Query/key norms; heads of 16 features, not hidden / heads = 8.
    "qwen3-head-dim": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=50, max_position_embeddings=64,
                           rope_theta=1000000.0),
    # A window of 5 over 17 tokens: most queries lose keys to it.
    "mistral-window": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, sliding_window=5),
    # Layers of both kinds (window 5 over 17 tokens): Qwen2's from max_window_layers on, Qwen3's and Ministral's
    # named by layer_types.
    "qwen2-window-layers": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=50, max_position_embeddings=64,
                                use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3-window-layers": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, vocab_size=50, max_position_embeddings=64,
                                use_sliding_window=True, sliding_window=5, attention_bias=True,
                                layer_types=["sliding_attention", "full_attention"]),
    "ministral-window-layers": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=50, max_position_embeddings=64,
                                    sliding_window=5,
                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Gemma 2: sandwich norms, windowed layers 0 and 2 (its default alternation), scores scaled by 1/sqrt(20)
    # rather than 1/sqrt(head_dim), caps low enough to bend the scores and logits.
    "gemma2-capped": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=50, max_position_embeddings=64,
                          sliding_window=5, query_pre_attn_scalar=20, attn_logit_softcapping=1.0,
                          final_logit_softcapping=2.0),
    "gemma2-uncapped": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=8, vocab_size=50, max_position_embeddings=64,
                            sliding_window=5, query_pre_attn_scalar=8, attn_logit_softcapping=None,
                            final_logit_softcapping=None, layer_types=["full_attention", "sliding_attention"]),
    # Gemma 3: Gemma 2's layer with query/key norms; windowed layers rotate with base 1e4, the full one with 1e6
    # and positions scaled down 4x (rope_type 'linear'), its larger models' setting.
    "gemma3-local-rope": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, vocab_size=50, max_position_embeddings=64,
                              sliding_window=5, query_pre_attn_scalar=12,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # Every layer windowed (one mask for all), and so rotating with the local base.
    "gemma3-all-windowed": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, vocab_size=50, max_position_embeddings=64,
                                sliding_window=5, query_pre_attn_scalar=8,
                                layer_types=["sliding_attention", "sliding_attention"],
                                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
    "llama-linear-rope": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=50, max_position_embeddings=64,
                              rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}),
    # Llama 3.1's scaling; heads of 8 features: wavelengths 6.3, 63, 628 and 6283 tokens against an original length
    # of 64 put one frequency in each regime (kept, interpolated, divided by the factor).
    "llama3-rope": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=50, max_position_embeddings=256,
                        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                         "rope_theta": 10000.0}),
    # Gemma's own defaults: tied, GeGLU (tanh); heads of 16 features (hidden / heads = 8), as Gemma's 256 vs 3072/16.
    "gemma-tied": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=50, max_position_embeddings=64),
    "gemma-bias-untied-silu": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=8, vocab_size=50, max_position_embeddings=64,
                                   attention_bias=True, tie_word_embeddings=False, hidden_act="silu"),
}


def reference_model(name: str, **overrides):
  """transformers' model for case `name` (Llama, Qwen2, Qwen3, Mistral or Gemma), seeded, its biases and norm scales
  random (zeros and ones at initialisation, which would hide one loaded into the wrong place)."""
  family = name.split("-")[0] if name.startswith(("qwen2", "qwen3", "mistral", "ministral", "gemma")) else "llama"
  classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
             "ministral": (transformers.MinistralConfig, transformers.MinistralForCausalLM),
             "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
             "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
             "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[family]
  torch.manual_seed(0)
  model = classes[1](classes[0](**{**CONFIGS[name], **overrides})).eval()
  with torch.no_grad():
    for parameter_name, parameter in model.named_parameters():
      if parameter_name.endswith(".bias"):
        parameter.normal_(0.0, 0.5)
      elif "norm" in parameter_name:
        parameter.uniform_(0.5, 1.5)
  return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
  kwargs = CONFIGS[name]
  reference = reference_model(name)
  reference.save_pretrained(tmp_path)
  ours, _, fresh = model_from_hf("llama", str(tmp_path))
  loaded = flatten(nnx.split(ours, nnx.Param, ...)[1].to_pure_dict())
  assert fresh == [] and (("lm_head/kernel" in loaded) != reference.config.tie_word_embeddings)
  biases = sorted(path.split("/")[-2] for path in loaded if path.startswith("layers/0/") and path.endswith("/bias"))
  assert biases == {"attention-bias": ["k_proj", "o_proj", "q_proj", "v_proj"],
                    "gemma-bias-untied-silu": ["k_proj", "o_proj", "q_proj", "v_proj"],
                    "qwen3-window-layers": ["k_proj", "o_proj", "q_proj", "v_proj"],
                    "qwen2-tied": ["k_proj", "q_proj", "v_proj"],
                    "qwen2-window-layers": ["k_proj", "q_proj", "v_proj"]}.get(name, [])
  windowed = {"qwen2-window-layers": (0, 1, 1), "qwen3-window-layers": (1, 0), "ministral-window-layers": (1, 0, 1),
              "gemma2-capped": (1, 0, 1), "gemma2-uncapped": (0, 1), "gemma3-local-rope": (1, 1, 0),
              "gemma3-all-windowed": None}
  assert ours.attention_kinds == windowed.get(name)  # (None: the same attention in every layer)
  assert ("layers/0/self_attn/q_norm/scale" in loaded) == name.startswith(("qwen3", "gemma3"))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, kwargs["vocab_size"], size=(2, 17))
  mask = np.ones_like(ids)
  mask[1, 12:] = 0
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(logits[mask.astype(bool)], expected[mask.astype(bool)], atol=1e-4, rtol=1e-4)


def test_llama_layer_groups_cover_every_parameter():
  model = build_model(ConfigDict({"name": "llama", "hidden_size": 16, "intermediate_size": 24,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 30}), 0,
                      nnx.Rngs(0))
  params = flatten(nnx.split(model, nnx.Param, ...)[1].to_pure_dict())
  group_of = assign_groups(list(params), model.layer_groups(), "llama")
  assert group_of["lm_head/kernel"] == "head" and group_of["layers/1/mlp/gate_proj/kernel"] == "layer_2"


def test_the_window_counts_the_token_itself_and_stays_inside_a_packed_segment():
  """A window of w lets a token see itself and the w - 1 tokens before it."""
  allowed = np.asarray(causal_bias(jnp.ones((1, 5), jnp.int32), jnp.float32, window=2))[0, 0] == 0
  np.testing.assert_array_equal(allowed, np.eye(5, dtype=bool) | np.eye(5, k=-1, dtype=bool))
  packed = np.asarray(causal_bias(jnp.asarray([[1, 1, 1, 2, 2, 0]]), jnp.float32, window=2))[0, 0] == 0
  assert packed[3].tolist() == [False, False, False, True, False, False]  # (a segment's first token: itself only)
  assert packed[2].tolist() == [False, True, True, False, False, False]


@pytest.mark.parametrize("fields,window", [
    ({}, 4096),  # (MistralConfig's default where config.json leaves the key out)
    ({"sliding_window": None}, 0),  # Mistral v0.2 and later: full attention
    ({"sliding_window": 8, "layer_types": ["sliding_attention"] * 2}, 8),
    ({"sliding_window": 8, "layer_types": ["full_attention"] * 2}, 0),
    # (Ministral's mix, which transformers' Auto classes read a Mistral config with layer_types as)
    ({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}, 8),
    # (No window: full attention, where transformers' Ministral fails in its forward pass.)
    ({"sliding_window": None, "layer_types": ["full_attention", "sliding_attention"]}, 0),
])
def test_mistral_configs_give_the_window_transformers_applies(fields, window, tmp_path):
  config = {key: value for key, value in CONFIGS["mistral-window"].items() if key != "sliding_window"}
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", **config, **fields}))
  kwargs = hf.model_kwargs(str(tmp_path))[1]
  assert kwargs["sliding_window"] == window
  mixed = window and len(set(fields.get("layer_types", ()))) > 1
  assert kwargs.get("layer_types") == (tuple(fields["layer_types"]) if mixed else None)


def test_a_qwen3_config_without_head_dim_means_transformers_default(tmp_path):
  config = {key: value for key, value in CONFIGS["qwen3-head-dim"].items() if key != "head_dim"}
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", **config}))
  assert hf.model_kwargs(str(tmp_path))[1]["head_dim"] == transformers.Qwen3Config().head_dim == 128


@pytest.mark.parametrize("fields,window,layer_types", [
    ({"max_window_layers": 2}, 0, None),  # (from max_window_layers on: at or past the depth, none)
    ({"max_window_layers": 1}, 4, ("full_attention", "sliding_attention")),
    ({"max_window_layers": 0}, 4, None),  # (every layer: one window for all)
    ({"max_window_layers": 0, "use_sliding_window": False}, 0, None),  # (off: the window is ignored)
])
def test_qwen2_configs_window_the_layers_transformers_windows(fields, window, layer_types, tmp_path):
  config = {"model_type": "qwen2", **CONFIGS["qwen2-tied"], "use_sliding_window": True, "sliding_window": 4}
  (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
  kwargs = hf.model_kwargs(str(tmp_path))[1]
  assert (kwargs["sliding_window"], kwargs.get("layer_types")) == (window, layer_types)
  reference = transformers.Qwen2Config(**{key: value for key, value in {**config, **fields}.items()
                                          if key != "model_type"})
  assert [kind == "sliding_attention" for kind in reference.layer_types] == \
      [bool(window) and (layer_types is None or kind == "sliding_attention") for kind in layer_types or ["x"] * 2]


def test_a_checkpoint_s_layer_types_follow_the_layers_loaded(tmp_path):
  """config.model may keep a checkpoint's first layers; their attention kinds come with them. A config.json
  whose layer_types do not fit its layers is named."""
  reference_model("qwen2-window-layers").save_pretrained(tmp_path)
  for depth, kinds in ((3, (0, 1, 1)), (2, (0, 1)), (1, None)):
    model = build_model(ConfigDict({"name": "llama", "hf_config": str(tmp_path), "num_hidden_layers": depth}), 0,
                        nnx.Rngs(0))
    assert (len(model.layers), model.attention_kinds, model.sliding_window) == (depth, kinds, 5 if depth > 1 else 0)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "layer_types": ["full_attention"] * 2}))
  with pytest.raises(FinetuneError, match=r"config.json's layer_types must give each of its num_hidden_layers "
                                          "layers 'full_attention' or 'sliding_attention'; fix config.json"):
    hf.model_kwargs(str(tmp_path))


def test_layer_types_must_name_each_layer_and_need_a_window():
  base = {"name": "llama", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
          "num_attention_heads": 2, "vocab_size": 30}
  with pytest.raises(FinetuneError, match=r"must name 2 layers' attention \(num_hidden_layers\), each one of "
                                          "full_attention, sliding_attention"):
    build_model(ConfigDict({**base, "layer_types": ("full_attention",), "sliding_window": 4}), 0, nnx.Rngs(0))
  with pytest.raises(FinetuneError, match=r"has sliding_attention layers but config.model.sliding_window is 0; set "
                                          r"the window's length in tokens, or config.model.layer_types=\(\) as well"):
    build_model(ConfigDict({**base, "layer_types": ("full_attention", "sliding_attention")}), 0, nnx.Rngs(0))


def test_a_checkpoint_s_attention_dropout_is_named_as_not_applied(tmp_path):
  """(Read by nothing, silently: this Llama has no dropout.)"""
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS["mqa-head-dim"], attention_dropout=0.1)
                                ).save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match=r"attention_dropout=0.1 is not applied: this framework's Llama has no "
                                       r"dropout"):
    hf.model_kwargs(str(tmp_path))


@pytest.mark.parametrize("fields,expected", [
    ({}, dict(hidden_act="gelu_pytorch_tanh", head_dim=256, tie_word_embeddings=True)),  # (GemmaConfig's defaults)
    # Released Gemma configs say "gelu" and meant the tanh approximation; transformers reads it so.
    ({"hidden_act": "gelu", "head_dim": 8, "tie_word_embeddings": False},
     dict(hidden_act="gelu_pytorch_tanh", head_dim=8, tie_word_embeddings=False)),
    ({"use_bidirectional_attention": True}, "bidirectional attention"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
])
def test_gemma_configs_give_the_model_transformers_builds(fields, expected, tmp_path):
  config = {key: value for key, value in CONFIGS["gemma-tied"].items() if key != "head_dim"}
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", **config, **fields}))
  if isinstance(expected, str):
    with pytest.raises(FinetuneError, match=expected):
      hf.model_kwargs(str(tmp_path))
    return
  name, kwargs = hf.model_kwargs(str(tmp_path))
  assert name == "llama" and kwargs["norm_unit_offset"] and kwargs["scale_embeddings"]
  assert {key: kwargs[key] for key in expected} == expected
  reference = transformers.GemmaConfig(**{**config, **fields})
  assert (reference.hidden_act, reference.head_dim, reference.tie_word_embeddings) == tuple(expected.values())


def test_gemma2_configs_give_the_model_transformers_builds(tmp_path):
  """Gemma2Config's defaults where config.json leaves keys out (transformers 5 writes them all; hub files from
  older versions may not); its MLP reads hidden_activation, not hidden_act."""
  config = {key: value for key, value in CONFIGS["gemma2-capped"].items()
            if key not in ("head_dim", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                           "sliding_window")}
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", **config, "hidden_act": "relu"}))
  _, kwargs = hf.model_kwargs(str(tmp_path))
  reference = transformers.Gemma2Config(**config)
  assert (kwargs["head_dim"], kwargs["query_pre_attn_scalar"], kwargs["attn_logit_softcapping"],
          kwargs["final_logit_softcapping"], kwargs["sliding_window"], kwargs["tie_word_embeddings"],
          kwargs["hidden_act"]) == (reference.head_dim, reference.query_pre_attn_scalar,
                                    reference.attn_logit_softcapping, reference.final_logit_softcapping,
                                    reference.sliding_window, reference.tie_word_embeddings,
                                    reference.hidden_activation) == (256, 256, 50, 30, 4096, True, "gelu_pytorch_tanh")
  assert list(kwargs["layer_types"]) == reference.layer_types
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", **config,
                                                    "hidden_activation": "relu"}))
  with pytest.raises(FinetuneError, match="hidden_activation 'relu' is not supported"):
    hf.model_kwargs(str(tmp_path))


@pytest.mark.parametrize("fields", [
    {},  # (Gemma3TextConfig's defaults: bases 1e6 and 1e4, no scaling, every sixth layer full)
    # Files written before transformers 5: top-level rope_theta, rope_local_base_freq, and rope_scaling for the
    # full-attention layers.
    {"rope_theta": 5e5, "rope_local_base_freq": 2e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 3e3}}},
    {"sliding_window_pattern": 3},  # (every third layer full)
    # (A "type" key in rope_scaling leaves Gemma 3's rope_type 'default': transformers does not scale.)
    {"rope_scaling": {"type": "linear", "factor": 8.0}},
])
def test_gemma3_configs_give_the_rotary_settings_transformers_reads(fields, tmp_path):
  config = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=50)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", **config, **fields}))
  _, kwargs = hf.model_kwargs(str(tmp_path))
  reference = transformers.Gemma3TextConfig(**config, **json.loads(json.dumps(fields)))
  full, local = reference.rope_parameters["full_attention"], reference.rope_parameters["sliding_attention"]
  assert (kwargs["rope_theta"], kwargs.get("rope_factor", 1.0), kwargs["rope_local_theta"]) == (
      full["rope_theta"], full.get("factor", 1.0) if full["rope_type"] != "default" else 1.0, local["rope_theta"])
  assert list(kwargs["layer_types"]) == reference.layer_types and kwargs["qk_norm"] and kwargs["sandwich_norms"]
  assert (kwargs["attn_logit_softcapping"], kwargs["final_logit_softcapping"]) == (0.0, 0.0)


def test_a_gemma3_attention_cap_is_not_applied_as_transformers_does_not(tmp_path):
  config = {"model_type": "gemma3_text", **CONFIGS["gemma3-local-rope"], "attn_logit_softcapping": 50.0}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.warns(UserWarning, match="attn_logit_softcapping=50.0 in a gemma3_text config.json is not applied"):
    assert hf.model_kwargs(str(tmp_path))[1]["attn_logit_softcapping"] == 0.0


def test_llama3_rope_scaling_reads_transformers_defaults_and_other_scalings_are_refused(tmp_path):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
  config = {"model_type": "llama", **CONFIGS["mqa-head-dim"], "max_position_embeddings": 1024}
  (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling, "rope_theta": 5e5}))
  kwargs = hf.model_kwargs(str(tmp_path))[1]
  # (A pre-5 file: rope_scaling beside rope_theta; the original length defaults to max_position_embeddings.)
  assert {key: kwargs[key] for key in kwargs if key.startswith("rope_")} == {
      "rope_theta": 5e5, "rope_type": "llama3", "rope_factor": 8.0, "rope_low_freq_factor": 1.0,
      "rope_high_freq_factor": 4.0, "rope_original_max_position_embeddings": 1024}
  (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn",
                                                                                   "factor": 4.0}}))
  with pytest.raises(FinetuneError, match="only plain rotary embeddings and the 'linear' and 'llama3' scalings"):
    hf.model_kwargs(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3",
                                                                                   "factor": 4.0}}))
  with pytest.raises(FinetuneError, match="lacks low_freq_factor, high_freq_factor, which rope_type 'llama3' needs"):
    hf.model_kwargs(str(tmp_path))
  with pytest.raises(FinetuneError, match=r"rope_factor=2.0 must be positive \(1 with rope_type 'default'\)"):
    build_model(ConfigDict({"name": "llama", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "vocab_size": 30, "rope_factor": 2.0}), 0, nnx.Rngs(0))


def test_an_unknown_activation_names_the_valid_ones():
  with pytest.raises(FinetuneError, match=r"config.model.hidden_act='gelu' is not supported; valid: silu, "
                                          "gelu_pytorch_tanh"):
    build_model(ConfigDict({"name": "llama", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "vocab_size": 30, "hidden_act": "gelu"}), 0, nnx.Rngs(0))
