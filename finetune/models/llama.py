"""Llama-family decoder: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU (or GeGLU) MLP.

Parameter paths mirror transformers' `LlamaForCausalLM` (`finetune/models/hf.py` maps them one to one). Rotary
embeddings use the "rotate half" layout of the transformers implementation, so imported q/k projections need no
permutation. The same module is transformers' Qwen2 (`qkv_bias`: biases on the query, key and value projections),
Qwen3 (`qk_norm`: RMSNorm over each head's queries and keys before the rotation), Mistral (`sliding_window`: each
token attends to itself and the window - 1 tokens before it) and Gemma (`norm_unit_offset`: RMSNorm multiplies by
1 + its stored scale; `scale_embeddings`: input embeddings times sqrt(hidden_size); `hidden_act='gelu_pytorch_tanh'`:
GeGLU; Gemma 2 adds `sandwich_norms`, soft-capped scores and logits, and alternating `layer_types`; Gemma 3
query/key norms and a rotary base of its own in windowed layers, `rope_local_theta`): their
checkpoints differ from Llama's in nothing else that this model computes, so they are arguments here (as RoBERTa
is an argument of BERT), and `hf.py` reads them from the checkpoint's model_type.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import FinetuneError
from finetune.models import MODELS
from finetune.models.layers import (attend, causal_bias, embedding, last_token, numbered_groups, positions,
                                    run_blocks, soft_cap, transformer_dense)


# The gated MLP's activation, by transformers' `hidden_act` name: SwiGLU (Llama, Qwen, Mistral) or GeGLU with
# the tanh approximation of GELU (Gemma).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class UnitOffsetRMSNorm(nnx.Module):
  """Gemma's RMSNorm: x / rms(x) * (1 + scale), with `scale` as checkpoints store it (zeros at initialisation),
  computed in float32 and cast back to x's dtype, as transformers' GemmaRMSNorm does. By hand: nnx.RMSNorm
  multiplies by its scale as stored, and loading 1 + scale into it would change what the parameter means to
  weight decay, L2-SP and exported checkpoints."""

  def __init__(self, features: int, eps: float, rngs: nnx.Rngs):
    del rngs  # (deterministic initialisation)
    self.eps = eps
    self.scale = nnx.Param(jnp.zeros((features,), jnp.float32), sharding=("norm",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def _rms_norm(features: int, eps: float, rngs: nnx.Rngs, unit_offset: bool = False) -> nnx.Module:
  if unit_offset:
    return UnitOffsetRMSNorm(features, eps, rngs)
  return nnx.RMSNorm(features, epsilon=eps, rngs=rngs,
                     scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)))


ROPE_TYPES = ("default", "linear", "llama3")  # (transformers' rope_type names)


@dataclasses.dataclass(frozen=True)
class Rope:
  """One rotary-embedding setting, as transformers' rope_parameters hold it: the base `theta` and a scaling of the
  frequencies: none ('default'), all divided by `factor` ('linear'), or Llama 3.1's ('llama3': wavelengths longer
  than original_max_positions / low_freq_factor divided by `factor`, shorter than original_max_positions /
  high_freq_factor kept, those between interpolated)."""
  theta: float
  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192

  def inverse_frequency(self, head_dim: int) -> jax.Array:
    """(head_dim / 2,) frequencies theta^(-2i/d), scaled."""
    frequency = 1.0 / (self.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if self.kind == "linear":
      return frequency / self.factor
    if self.kind != "llama3":
      return frequency
    wavelength = 2 * jnp.pi / frequency
    scaled = jnp.where(wavelength > self.original_max_positions / self.low_freq_factor, frequency / self.factor,
                       frequency)
    smooth = ((self.original_max_positions / wavelength - self.low_freq_factor) /
              (self.high_freq_factor - self.low_freq_factor))
    medium = ((wavelength >= self.original_max_positions / self.high_freq_factor) &
              (wavelength <= self.original_max_positions / self.low_freq_factor))
    return jnp.where(medium, (1 - smooth) * scaled / self.factor + smooth * scaled, scaled)


def rotary(positions: jax.Array, head_dim: int, rope: Rope) -> tuple[jax.Array, jax.Array]:
  """(B, L) positions -> cos, sin of shape (B, L, head_dim): `rope`'s frequencies repeated for both halves."""
  inverse_frequency = rope.inverse_frequency(head_dim)
  angles = positions[..., None].astype(jnp.float32) * inverse_frequency  # (B, L, d/2)
  angles = jnp.concatenate([angles, angles], axis=-1)  # (B, L, d/2) -> (B, L, d)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: (B, L, heads, d), cos/sin (B, L, d). Rotates pairs (i, i + d/2): x * cos + rotate_half(x) * sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
  def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool,
               qk_norm: bool, eps: float, unit_offset: bool, scale: float, softcap: float, rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise FinetuneError(f"config.model.num_attention_heads={num_heads} is not a multiple of "
                          f"config.model.num_key_value_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.scale, self.softcap = scale, softcap  # (0: 1 / sqrt(head_dim), and no cap)
    self.q_proj = transformer_dense(hidden, num_heads * head_dim, ("embed", "heads"), rngs, use_bias=qkv_bias)
    self.k_proj = transformer_dense(hidden, num_kv_heads * head_dim, ("embed", "kv_heads"), rngs, use_bias=qkv_bias)
    self.v_proj = transformer_dense(hidden, num_kv_heads * head_dim, ("embed", "kv_heads"), rngs, use_bias=qkv_bias)
    self.o_proj = transformer_dense(num_heads * head_dim, hidden, ("heads", "embed"), rngs, use_bias=o_bias)
    # Qwen3's: one scale per feature of a head, shared by the heads.
    self.q_norm = _rms_norm(head_dim, eps, rngs, unit_offset) if qk_norm else None
    self.k_norm = _rms_norm(head_dim, eps, rngs, unit_offset) if qk_norm else None
    self.prefix = None  # prefix tuning sets trainable keys/values here (per query head, after the GQA repeat)

  def __call__(self, x, cos, sin, mask_bias):
    batch, length, _ = x.shape
    q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    groups = self.num_heads // self.num_kv_heads
    # Grouped-query attention: each key/value head serves `groups` query heads. (B, L, kv, d) -> (B, L, heads, d)
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    context = attend(q, k, v, mask_bias, prefix=self.prefix, scale=self.scale, softcap=self.softcap)
    return self.o_proj(context.reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nnx.Module):
  def __init__(self, hidden: int, intermediate: int, activation: str, rngs: nnx.Rngs):
    self.activation = ACTIVATIONS[activation]
    self.gate_proj = transformer_dense(hidden, intermediate, ("embed", "mlp"), rngs, use_bias=False)
    self.up_proj = transformer_dense(hidden, intermediate, ("embed", "mlp"), rngs, use_bias=False)
    self.down_proj = transformer_dense(intermediate, hidden, ("mlp", "embed"), rngs, use_bias=False)

  def __call__(self, x):
    return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU or GeGLU


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP sub-layers. With `sandwich_norms` (Gemma 2), each sub-layer's output is normed too
  before it joins the residual stream: post_attention_layernorm then norms the attention's output (transformers'
  name for it), and pre_/post_feedforward_layernorm surround the MLP."""

  def __init__(self, hidden, num_heads, num_kv_heads, head_dim, intermediate, eps, qkv_bias, o_bias, qk_norm,
               activation, unit_offset, sandwich_norms, attention_scale, attention_softcap, rngs):
    self.input_layernorm = _rms_norm(hidden, eps, rngs, unit_offset)
    self.self_attn = Attention(hidden, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias, qk_norm, eps,
                               unit_offset, attention_scale, attention_softcap, rngs)
    self.post_attention_layernorm = _rms_norm(hidden, eps, rngs, unit_offset)
    self.pre_feedforward_layernorm = _rms_norm(hidden, eps, rngs, unit_offset) if sandwich_norms else None
    self.post_feedforward_layernorm = _rms_norm(hidden, eps, rngs, unit_offset) if sandwich_norms else None
    self.mlp = MLP(hidden, intermediate, activation, rngs)

  def __call__(self, x, cos, sin, mask_bias, attention_kind=None):
    if attention_kind is not None:  # layers of two kinds: (full, windowed) masks and rotary tables, ours by index
      cos, sin, mask_bias = cos[attention_kind], sin[attention_kind], mask_bias[attention_kind]
    attended = self.self_attn(self.input_layernorm(x), cos, sin, mask_bias)
    if self.pre_feedforward_layernorm is None:
      x = x + attended
      return x + self.mlp(self.post_attention_layernorm(x))
    x = x + self.post_attention_layernorm(attended)
    return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


ATTENTION_KINDS = ("full_attention", "sliding_attention")  # (transformers' layer_types names)


def _windowed_layers(layer_types: tuple[str, ...], num_layers: int, sliding_window: int) -> tuple[bool, ...]:
  """Whether each layer attends through the sliding window: `layer_types`' word for it, or every layer when
  `sliding_window` is set and no layer_types are given."""
  if not layer_types:
    return (bool(sliding_window),) * num_layers
  if len(layer_types) != num_layers or not set(layer_types) <= set(ATTENTION_KINDS):
    raise FinetuneError(f"config.model.layer_types={layer_types!r} must name {num_layers} layers' attention "
                        f"(num_hidden_layers), each one of {', '.join(ATTENTION_KINDS)}")
  if "sliding_attention" in layer_types and not sliding_window:
    raise FinetuneError("config.model.layer_types (or the checkpoint's) has sliding_attention layers but "
                        "config.model.sliding_window is 0; set the window's length in tokens, or "
                        "config.model.layer_types=() as well for full attention in every layer")
  return tuple(kind == "sliding_attention" for kind in layer_types)


@MODELS.register("llama")
class Llama(nnx.Module):
  """Embeddings -> decoder layers -> RMSNorm -> LM head (tied to the embeddings or not). (B, L, vocab) logits.

  `attention_bias`: biases on all four attention projections (transformers' Llama option); `qkv_bias`: on the
  query, key and value projections only (Qwen2); `qk_norm`: RMSNorm over each head's queries and keys (Qwen3);
  `sliding_window`: 0 for full causal attention, else each token sees itself and the sliding_window - 1 tokens
  before it (Mistral; prefix-tuning's prefix stays visible); `layer_types`: empty for the same attention in every
  layer, else one "full_attention" or "sliding_attention" per layer (Ministral, Qwen2 and Qwen3 with
  use_sliding_window), the latter with `sliding_window`; `hidden_act`: the gated MLP's activation (a key of
  ACTIVATIONS); `norm_unit_offset`: every RMSNorm multiplies by 1 + its scale (Gemma); `scale_embeddings`: the
  input embeddings are multiplied by sqrt(hidden_size), the tied output layer uses them unscaled (Gemma);
  `sandwich_norms`: each sub-layer's output normed too (Gemma 2, `DecoderLayer`); `query_pre_attn_scalar`: scores
  scaled by its inverse square root instead of head_dim's (0: head_dim); `attn_logit_softcapping` and
  `final_logit_softcapping`: attention scores and output logits become c * tanh(x / c) (0: uncapped; Gemma 2);
  `rope_type` ('default', 'linear' or 'llama3'), `rope_factor`, `rope_low_freq_factor`, `rope_high_freq_factor`
  and `rope_original_max_position_embeddings`: the rotary scaling (`Rope`); `rope_local_theta` > 0:
  sliding-window layers' rotary base, unscaled, while full-attention layers keep rope_theta and its scaling
  (Gemma 3)."""

  scan_blocks = "layers"  # the stack of identical blocks that config.train.scan_layers stacks
  input_keys = ("input_ids", "attention_mask")

  def __init__(self, *, num_classes: int = 0, vocab_size: int = 32000, hidden_size: int = 4096,
               intermediate_size: int = 11008, num_hidden_layers: int = 32, num_attention_heads: int = 32,
               num_key_value_heads: int = 0, head_dim: int = 0, rms_norm_eps: float = 1e-6,
               rope_theta: float = 10000.0, tie_word_embeddings: bool = False, attention_bias: bool = False,
               qkv_bias: bool = False, qk_norm: bool = False, sliding_window: int = 0,
               layer_types: tuple[str, ...] = (), hidden_act: str = "silu",
               norm_unit_offset: bool = False, scale_embeddings: bool = False, sandwich_norms: bool = False,
               query_pre_attn_scalar: float = 0.0, attn_logit_softcapping: float = 0.0,
               final_logit_softcapping: float = 0.0, rope_type: str = "default", rope_factor: float = 1.0,
               rope_low_freq_factor: float = 1.0, rope_high_freq_factor: float = 4.0,
               rope_original_max_position_embeddings: int = 8192, rope_local_theta: float = 0.0,
               hf_config: str = "", rngs: nnx.Rngs):
    del num_classes, hf_config  # a language model predicts tokens; hf_config is read before construction
    if rope_type not in ROPE_TYPES:
      raise FinetuneError(f"config.model.rope_type={rope_type!r} is not supported; valid: {', '.join(ROPE_TYPES)}")
    if rope_factor <= 0 or rope_local_theta < 0 or (rope_type == "default" and rope_factor != 1.0) or (
        rope_type == "llama3" and not 0 < rope_low_freq_factor < rope_high_freq_factor):
      raise FinetuneError(f"config.model.rope_factor={rope_factor} must be positive (1 with rope_type 'default'), "
                          f"rope_local_theta={rope_local_theta} positive or 0 (windowed layers use rope_theta), and "
                          f"with rope_type 'llama3' 0 < rope_low_freq_factor={rope_low_freq_factor} < "
                          f"rope_high_freq_factor={rope_high_freq_factor}")
    self.rope = Rope(rope_theta, rope_type, rope_factor, rope_low_freq_factor, rope_high_freq_factor,
                     rope_original_max_position_embeddings)
    self.local_rope = Rope(rope_local_theta) if rope_local_theta else self.rope
    if not head_dim and hidden_size % num_attention_heads:  # (failed in the first step as a shape mismatch)
      raise FinetuneError(f"config.model.hidden_size={hidden_size} is not a multiple of "
                          f"config.model.num_attention_heads={num_attention_heads}; change one, or set "
                          "config.model.head_dim")
    self.head_dim = head_dim or hidden_size // num_attention_heads
    if self.head_dim % 2:  # rotary embeddings rotate pairs of features
      raise FinetuneError(f"the attention head size {self.head_dim} (config.model.head_dim, or hidden_size / "
                          "num_attention_heads) must be even for rotary position embeddings")
    kv_heads = num_key_value_heads or num_attention_heads
    if sliding_window < 0:
      raise FinetuneError(f"config.model.sliding_window={sliding_window} must be 0 (full attention) or the number "
                          "of tokens each token sees, itself included")
    if hidden_act not in ACTIVATIONS:
      raise FinetuneError(f"config.model.hidden_act={hidden_act!r} is not supported; valid: "
                          f"{', '.join(ACTIVATIONS)}")
    for key, value in (("query_pre_attn_scalar", query_pre_attn_scalar),
                       ("attn_logit_softcapping", attn_logit_softcapping),
                       ("final_logit_softcapping", final_logit_softcapping)):
      if value < 0:
        raise FinetuneError(f"config.model.{key}={value} must be positive, or 0 for none")
    self.final_logit_softcapping = final_logit_softcapping
    windowed = _windowed_layers(tuple(layer_types), num_hidden_layers, sliding_window)
    self.sliding_window = sliding_window if any(windowed) else 0
    # Per layer, 0 (full) or 1 (windowed) where the layers differ; None where every layer attends alike.
    self.attention_kinds = tuple(int(w) for w in windowed) if len(set(windowed)) > 1 else None
    # transformers rounds the factor to the embedding's dtype (GemmaTextScaledWordEmbedding); applied in the stream's.
    self.embedding_multiplier = float(hidden_size) ** 0.5 if scale_embeddings else None
    self.embed_tokens = embedding(vocab_size, hidden_size, ("vocab", "embed"), rngs)
    self.layers = nnx.List([DecoderLayer(hidden_size, num_attention_heads, kv_heads, self.head_dim,
                                         intermediate_size, rms_norm_eps, qkv_bias or attention_bias, attention_bias,
                                         qk_norm, hidden_act, norm_unit_offset, sandwich_norms,
                                         query_pre_attn_scalar ** -0.5 if query_pre_attn_scalar else 0.0,
                                         attn_logit_softcapping, rngs)
                             for _ in range(num_hidden_layers)])
    self.norm = _rms_norm(hidden_size, rms_norm_eps, rngs, norm_unit_offset)
    self.lm_head = None if tie_word_embeddings else transformer_dense(hidden_size, vocab_size, ("embed", "vocab"),
                                                                      rngs, use_bias=False)

  def hidden_states(self, input_ids, attention_mask=None):
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x = self.embed_tokens(input_ids)
    if self.embedding_multiplier is not None:  # (a prompt-tuning soft prompt, drawn from rows of the embedding
      x = x * jnp.asarray(self.embedding_multiplier, x.dtype)  # table, is scaled as the tokens it began as)
    # Rotary attention depends on position differences only, so restarting positions at packed segments changes
    # nothing within a segment in exact arithmetic; it keeps a packed conversation's numbers those of its own row.
    # Computed in float32 and used in the stream's dtype, as transformers does: float32 tables turned bfloat16
    # queries and keys (train.compute_dtype) back into float32.
    def rotary_tables(windowed: bool) -> tuple[jax.Array, jax.Array]:
      cos, sin = rotary(positions(attention_mask), self.head_dim, self.local_rope if windowed else self.rope)
      return cos.astype(x.dtype), sin.astype(x.dtype)

    if self.attention_kinds is None:
      cos, sin = rotary_tables(bool(self.sliding_window))
      mask_bias = causal_bias(attention_mask, x.dtype, self.sliding_window)
      x = run_blocks(self, self.layers, x, cos, sin, mask_bias)
    else:  # (2, ...): full and windowed masks and rotary tables, each layer indexing its own (one block program)
      (full_cos, full_sin), (window_cos, window_sin) = rotary_tables(False), rotary_tables(True)
      mask_bias = jnp.stack([causal_bias(attention_mask, x.dtype),
                             causal_bias(attention_mask, x.dtype, self.sliding_window)])
      x = run_blocks(self, self.layers, x, jnp.stack([full_cos, window_cos]), jnp.stack([full_sin, window_sin]),
                     mask_bias, per_layer=jnp.asarray(self.attention_kinds, jnp.int32))
    return self.norm(x)

  def embed(self, input_ids, attention_mask=None, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """Features for probes: the last non-padding token's state (B, hidden)."""
    del train, rngs
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    states = self.hidden_states(input_ids, attention_mask)
    return states[jnp.arange(states.shape[0]), last_token(attention_mask)]

  def __call__(self, input_ids, attention_mask=None, *, train: bool = False, rngs: nnx.Rngs | None = None):
    del train, rngs  # Llama has no dropout
    states = self.hidden_states(input_ids, attention_mask)
    logits = self.embed_tokens.attend(states) if self.lm_head is None else self.lm_head(states)
    logits = logits.astype(jnp.float32)
    if self.final_logit_softcapping:
      logits = soft_cap(logits, self.final_logit_softcapping)
    return logits

  def layer_groups(self) -> list[tuple[str, str]]:
    return ([("embeddings", r"^embed_tokens/")] + numbered_groups("layers", len(self.layers), "layer") +
            [("head", r"^(norm|lm_head)/")])
