"""Export of GPT-2, Llama (and its Qwen2, Qwen3, Mistral, Ministral and Gemma 1-3 forms) and ViT: transformers
loads what we write and computes the same logits."""

from __future__ import annotations

import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from finetune.checkpoint import load_into, read_checkpoint_arrays
from finetune.errors import FinetuneError
from finetune.models import MODELS, build_model, hf, model_kwargs
from finetune.partition import flatten

torch = pytest.importorskip("torch", reason="torch is the reference (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")

CASES = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=60, n_positions=32)), 0, "ids"),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=60, max_position_embeddings=64)), 0, "ids"),
    # Our Llama with query/key/value biases is written as Qwen2, with query/key norms as Qwen3, with a sliding window
    # as Mistral.
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=60, max_position_embeddings=64, tie_word_embeddings=True)), 0, "ids"),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=60, max_position_embeddings=64, attention_bias=True)), 0, "ids"),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=60, max_position_embeddings=64, sliding_window=4)), 0, "ids"),
    # Layers of both kinds: Ministral without biases, Qwen2 with query/key/value biases, Qwen3 with query/key norms.
    "ministral": (lambda: transformers.MinistralForCausalLM(transformers.MinistralConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=60, max_position_embeddings=64, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention"])), 0, "ids"),
    "qwen2-window-layers": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=60, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
        max_window_layers=1)), 0, "ids"),
    "qwen3-window-layers": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=60, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])), 0, "ids"),
    # With RMSNorm scales offset by one, scaled embeddings and GeGLU, as Gemma.
    "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=60, max_position_embeddings=64)), 0, "ids"),
    # And with norms after each sub-layer, soft-capping and windows in alternate layers, as Gemma 2.
    "gemma2": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=60, max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=20,
        attn_logit_softcapping=1.0, final_logit_softcapping=2.0)), 0, "ids"),
    # And with query/key norms and windowed layers' own rotary base, the full layer's scaled, as Gemma 3.
    "gemma3": (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=60, max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})), 0, "ids"),
    # Linear rotary scaling, as some long-context Llama fine-tunes.
    "llama-linear-rope": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=60, max_position_embeddings=64,
        rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0})), 0, "ids"),
    "llama-llama3-rope": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=60, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_theta": 10000.0})), 0, "ids"),
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=32, num_labels=3)), 3, "images"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_import_export_round_trip_keeps_logits(name, tmp_path):
  make_reference, num_classes, inputs = CASES[name]
  # (our model of that checkpoint)
  name = "llama" if name.startswith(("llama", "qwen2", "qwen3", "mistral", "ministral", "gemma")) else name
  torch.manual_seed(0)
  reference = make_reference().eval()
  with torch.no_grad():  # (zeros at initialisation: they would hide a bias exported to the wrong place)
    for parameter_name, parameter in reference.named_parameters():
      if parameter_name.endswith(".bias"):
        parameter.normal_(0.0, 0.5)
      # (Gemma's norm scales are zeros, the same offset by one or not)
      elif "q_norm" in parameter_name or "k_norm" in parameter_name or (
          "norm" in parameter_name and reference.config.model_type.startswith("gemma")):
        parameter.uniform_(0.5, 1.5)
  reference.save_pretrained(tmp_path / "in")
  model_cfg = ConfigDict({"name": name, "hf_config": str(tmp_path / "in")})
  model = build_model(model_cfg, num_classes, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loaded, _, _ = load_into(params.to_pure_dict(), read_checkpoint_arrays(str(tmp_path / "in"))["params"], (),
                           "parameter", "in")
  signature = inspect.signature(MODELS.get(name).__init__).parameters
  kwargs = {**{k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty},
            **model_kwargs(model_cfg, num_classes)}
  classes = [f"c{i}" for i in range(num_classes)]
  base = hf.read_config(str(tmp_path / "in"))
  base["problem_type"] = "multi_label_classification"  # (kept before: sigmoid scores for our softmax head)
  if base["model_type"] == "mistral":  # (uniform layer_types, as some Mistral configs carry: not to be kept)
    base["layer_types"] = ["sliding_attention"] * 2
  hf.export_params(name, {k: np.asarray(v) for k, v in flatten(loaded).items()}, kwargs, classes, str(tmp_path / "out"),
                   base)
  exported = type(reference).from_pretrained(tmp_path / "out").eval()
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["model_type"] == reference.config.model_type
  if written["model_type"] == "mistral":  # (with layer_types, transformers' Auto classes would read Ministral)
    assert "layer_types" not in written and written["sliding_window"] == 4
  if "rope_parameters" in written:  # (transformers 5's; older versions read the legacy keys written beside them)
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(
        {key: value for key, value in written.items() if key != "rope_parameters"}))
    legacy = type(reference.config).from_pretrained(tmp_path / "legacy")
    assert legacy.rope_parameters == exported.config.rope_parameters == reference.config.rope_parameters
    assert hf.model_kwargs(str(tmp_path / "legacy")) == hf.model_kwargs(str(tmp_path / "out"))
  if written.get("layer_types"):  # (and the Auto classes read the same model back)
    assert written["layer_types"] == reference.config.layer_types
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")) is type(reference)
  rng = np.random.default_rng(0)
  if inputs == "ids":
    x = rng.integers(0, 60, size=(2, 9))
    with torch.no_grad():
      expected = reference(input_ids=torch.tensor(x)).logits.numpy()
      got = exported(input_ids=torch.tensor(x)).logits.numpy()
  else:
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
      expected = reference(pixel_values=torch.tensor(x)).logits.numpy()
      got = exported(pixel_values=torch.tensor(x)).logits.numpy()
    assert exported.config.id2label == {0: "c0", 1: "c1", 2: "c2"}
  # (A causal LM has no classifier: the base's problem_type goes.)
  assert exported.config.problem_type == ("single_label_classification" if num_classes else None)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  ours = nnx.merge(graphdef, loaded, rest.to_pure_dict())
  our_input = jnp.asarray(x) if inputs == "ids" else jnp.asarray(x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(ours(our_input)), expected, atol=1e-4, rtol=1e-4)


def test_unexportable_model_is_an_error(tmp_path):
  with pytest.raises(FinetuneError, match="model 'cnn' cannot be exported to Hugging Face format; exportable: bert"):
    hf.export_params("cnn", {}, {}, [], str(tmp_path))
  with pytest.raises(FinetuneError, match="no transformers model class has both a sliding window and biases on all "
                                          "four attention projections without query/key norms"):
    hf.export_params("llama", {}, {"sliding_window": 4, "attention_bias": True}, [], str(tmp_path))
  with pytest.raises(FinetuneError, match=r"Qwen3 \(qk_norm\) exports with biases on all four attention projections "
                                          "or none"):
    hf.export_params("llama", {}, {"qk_norm": True, "qkv_bias": True}, [], str(tmp_path))
  with pytest.raises(FinetuneError, match=r"only Gemma has RMSNorm scales offset by one \(norm_unit_offset\) and "
                                          r"scaled embeddings \(scale_embeddings\), both"):
    hf.export_params("llama", {}, {"norm_unit_offset": True}, [], str(tmp_path))
  with pytest.raises(FinetuneError, match=r"only Gemma 3 \(norm_unit_offset, scale_embeddings, sandwich_norms and "
                                          r"qk_norm\) has a rotary base of its own in windowed layers"):
    hf.export_params("llama", {}, {"rope_local_theta": 1e4, "sliding_window": 4}, [], str(tmp_path))
  with pytest.raises(FinetuneError, match=r"only Gemma 2 \(with sandwich_norms\) has soft-capping"):
    hf.export_params("llama", {}, {"norm_unit_offset": True, "scale_embeddings": True, "sliding_window": 4}, [],
                     str(tmp_path))


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_a_gemma_without_a_window_exports_a_model_transformers_runs(kind, tmp_path):
  """Gemma 2/3 build their windowed mask whether any layer uses it: the export writes a window (unused by its
  all-full layer_types), since a null one fails transformers' forward pass. Gemma 3 ignores an attention cap."""
  reference = CASES[kind][0]()
  reference.save_pretrained(tmp_path / "in")
  model_cfg = ConfigDict({"name": "llama", "hf_config": str(tmp_path / "in"), "sliding_window": 0,
                          "layer_types": (), "attn_logit_softcapping": 0.0})
  kwargs = {**{k: p.default for k, p in inspect.signature(MODELS.get("llama").__init__).parameters.items()
               if p.default is not inspect.Parameter.empty}, **model_kwargs(model_cfg, 0)}
  params = read_checkpoint_arrays(str(tmp_path / "in"))["params"]
  hf.export_params("llama", params, kwargs, [], str(tmp_path / "out"), hf.read_config(str(tmp_path / "in")))
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["sliding_window"] == 4096 and set(written["layer_types"]) == {"full_attention"}
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids = np.random.default_rng(0).integers(0, 60, size=(1, 9))
  ours = build_model(model_cfg, 0, nnx.Rngs(0))
  graphdef, own, rest = nnx.split(ours, nnx.Param, ...)
  loaded, _, _ = load_into(own.to_pure_dict(), params, (), "parameter", "in")
  with torch.no_grad():
    expected = exported(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, loaded, rest.to_pure_dict())(jnp.asarray(ids))),
                             expected, atol=1e-4, rtol=1e-4)
  if kind == "gemma3":
    with pytest.raises(FinetuneError, match="transformers' Gemma 3 does not soft-cap attention scores"):
      hf.export_params("llama", params, {**kwargs, "attn_logit_softcapping": 50.0}, [], str(tmp_path / "out2"))


def test_llama_export_writes_float32_and_the_rope_it_computes_with(tmp_path):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                    num_attention_heads=4, vocab_size=40, max_position_embeddings=32)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "in")
  base = hf.read_config(str(tmp_path / "in"))
  base["dtype"] = "bfloat16"  # a checkpoint published in bf16
  model_cfg = ConfigDict({"name": "llama", "hf_config": str(tmp_path / "in"), "rope_theta": 500000.0})
  kwargs = {**{k: p.default for k, p in inspect.signature(MODELS.get("llama").__init__).parameters.items()
               if p.default is not inspect.Parameter.empty}, **model_kwargs(model_cfg, 0)}
  params = read_checkpoint_arrays(str(tmp_path / "in"))["params"]
  hf.export_params("llama", params, kwargs, [], str(tmp_path / "out"), base)
  exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
  assert exported.dtype == torch.float32
  import json  # pylint: disable=g-import-not-at-top
  written = json.load(open(tmp_path / "out" / "config.json"))
  assert written["rope_parameters"]["rope_theta"] == 500000.0 and written["dtype"] == "float32"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_export_loads_in_that_dtype_with_close_logits(dtype, tmp_path):
  torch.manual_seed(0)
  reference = CASES["gpt2"][0]().eval()
  reference.save_pretrained(tmp_path / "in")
  model_cfg = ConfigDict({"name": "gpt2", "hf_config": str(tmp_path / "in")})
  kwargs = {**{k: p.default for k, p in inspect.signature(MODELS.get("gpt2").__init__).parameters.items()
               if p.default is not inspect.Parameter.empty}, **model_kwargs(model_cfg, 0)}
  params = read_checkpoint_arrays(str(tmp_path / "in"))["params"]
  hf.export_params("gpt2", params, kwargs, [], str(tmp_path / "out"), hf.read_config(str(tmp_path / "in")), dtype)
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
  assert exported.dtype == getattr(torch, dtype)
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
    assert {f.get_tensor(name).dtype for name in f.keys()} == {getattr(torch, dtype)}
  ids = torch.tensor(np.random.default_rng(0).integers(0, 60, size=(2, 9)))
  with torch.no_grad():
    expected, got = reference(input_ids=ids).logits, exported(input_ids=ids).logits.float()
  # Rounded weights: about 3 significant digits (bfloat16 moved these logits by 0.002 of their 0.57 at most; a block's
  # attention or MLP output projection zeroed moves them by 0.07-0.09).
  np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=0.02 * float(np.abs(expected.numpy()).max()))
  with pytest.raises(FinetuneError, match="unknown export dtype 'int8'; valid: float32, bfloat16, float16"):
    hf.export_params("gpt2", params, kwargs, [], str(tmp_path / "bad"), None, "int8")


def test_too_long_inputs_are_an_error_not_nan():
  model = build_model(ConfigDict({"name": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10,
                                  "n_positions": 8}), 0, nnx.Rngs(0))
  with pytest.raises(FinetuneError, match="sequences of 12 tokens exceed the model's 8 positions"):
    model(jnp.zeros((1, 12), jnp.int32))
  # Prompt tuning's virtual tokens count too, and may be what to shorten (the message blamed the data alone).
  from finetune import adapters  # pylint: disable=g-import-not-at-top
  from finetune.config import defaults  # pylint: disable=g-import-not-at-top
  from finetune.methods.prompt_tuning import prompted_inputs  # pylint: disable=g-import-not-at-top
  for name, settings in (("gpt2", {"n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 8}),
                         ("bert", {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "intermediate_size": 16,
                                   "max_position_embeddings": 8})):
    base = build_model(ConfigDict({"name": name, "vocab_size": 10, **settings}), 2 if name == "bert" else 0,
                       nnx.Rngs(0))
    prompted = adapters.apply(base, ConfigDict({**defaults().peft.to_dict(), "method": "prompt",
                                                "num_virtual_tokens": 6}), nnx.Rngs(1))
    with pytest.raises(FinetuneError, match=r"sequences of 10 tokens \(6 of them prompt tuning's virtual tokens\) "
                                            r"exceed the model's 8 positions; lower config.peft.num_virtual_tokens"):
      prompted(*prompted_inputs(prompted, [jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)])[0])
