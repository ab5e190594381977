"""BERT-family encoder (BERT, MiniLM; RoBERTa-style position offsets) with Hugging Face-compatible structure.

Parameter paths mirror transformers' `BertModel` module names (see `finetune/models/hf.py` for the exact mapping),
so a checkpoint maps one tensor to one parameter. Sequence classification pools the [CLS] token through the
pooler (as `BertForSequenceClassification`) or averages the token states over the attention mask (as
sentence-transformers models such as all-MiniLM-L6-v2 do).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import FinetuneError
from finetune.models import MODELS
from finetune.models.layers import (attend, check_length, embedding, layer_norm, numbered_groups, padding_bias,
                                     run_blocks, transformer_dense)


class Attention(nnx.Module):
  def __init__(self, hidden: int, num_heads: int, dropout: float, rngs: nnx.Rngs):
    if hidden % num_heads:
      raise FinetuneError(f"config.model.hidden_size={hidden} is not divisible by config.model.num_heads={num_heads}")
    self.num_heads = num_heads
    self.query = transformer_dense(hidden, hidden, ("embed", "heads"), rngs)
    self.key = transformer_dense(hidden, hidden, ("embed", "heads"), rngs)
    self.value = transformer_dense(hidden, hidden, ("embed", "heads"), rngs)
    self.output = transformer_dense(hidden, hidden, ("heads", "embed"), rngs)
    self.dropout = nnx.Dropout(dropout)
    self.prefix = None  # prefix tuning sets trainable keys/values here

  def __call__(self, x: jax.Array, mask_bias: jax.Array, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    batch, length, hidden = x.shape
    head_dim = hidden // self.num_heads

    def heads(y):  # (B, L, heads*head_dim) -> (B, L, heads, head_dim)
      return y.reshape(batch, length, self.num_heads, head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    context = attend(q, k, v, mask_bias, self.dropout, train, rngs, self.prefix).reshape(batch, length, hidden)
    return self.output(context)


class Layer(nnx.Module):
  """Post-norm transformer layer, as in BERT: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  def __init__(self, hidden: int, num_heads: int, intermediate: int, eps: float, dropout: float, rngs: nnx.Rngs):
    self.attention = Attention(hidden, num_heads, dropout, rngs)
    self.attention_norm = layer_norm(hidden, rngs, eps)
    self.intermediate = transformer_dense(hidden, intermediate, ("embed", "mlp"), rngs)
    self.output = transformer_dense(intermediate, hidden, ("mlp", "embed"), rngs)
    self.output_norm = layer_norm(hidden, rngs, eps)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, mask_bias, train, rngs):
    attended = self.dropout(self.attention(x, mask_bias, train, rngs), deterministic=not train, rngs=rngs)
    x = self.attention_norm(x + attended)
    hidden = jax.nn.gelu(self.intermediate(x), approximate=False)  # BERT's "gelu" is the exact erf form
    return self.output_norm(x + self.dropout(self.output(hidden), deterministic=not train, rngs=rngs))


class Embeddings(nnx.Module):
  def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int, eps: float,
               position_offset: int, dropout: float, rngs: nnx.Rngs):
    self.position_offset = position_offset
    self.word_embeddings = embedding(vocab_size, hidden, ("vocab", "embed"), rngs)
    self.position_embeddings = embedding(max_positions, hidden, ("position", "embed"), rngs)
    self.token_type_embeddings = embedding(type_vocab_size, hidden, ("position", "embed"), rngs)
    self.layer_norm = layer_norm(hidden, rngs, eps)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, input_ids, token_type_ids, attention_mask, train, rngs):
    if self.position_offset:
      # RoBERTa numbers the real tokens from padding_idx + 1 and gives padding padding_idx (transformers'
      # create_position_ids_from_input_ids), so left padding shifts them; BERT numbers every slot.
      real = (attention_mask > 0).astype(jnp.int32)
      positions = jnp.cumsum(real, axis=1) * real + self.position_offset - 1
    else:
      positions = jnp.arange(input_ids.shape[1])[None, :]
    x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
        self.token_type_embeddings(token_type_ids)
    return self.dropout(self.layer_norm(x), deterministic=not train, rngs=rngs)


@MODELS.register("bert")
class Bert(nnx.Module):
  """Encoder + pooling + classification head. `encode` gives the token states (for parity with transformers)."""

  scan_blocks = "layers"  # the stack of identical blocks that config.train.scan_layers stacks
  input_keys = ("input_ids", "attention_mask")

  def __init__(self, *, num_classes: int, vocab_size: int = 30522, hidden_size: int = 768, num_layers: int = 12,
               num_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 512,
               type_vocab_size: int = 2, layer_norm_eps: float = 1e-12, position_offset: int = 0,
               dropout: float = 0.1, pooling: str = "cls", hf_config: str = "", rngs: nnx.Rngs):
    del hf_config  # read by finetune.models.hf before construction; kept here so configs may name it
    if pooling not in ("cls", "mean"):
      raise FinetuneError(f"config.model.pooling={pooling!r}; valid: 'cls', 'mean'")
    self.pooling = pooling
    self.embeddings = Embeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size, layer_norm_eps,
                                 position_offset, dropout, rngs)
    self.layers = nnx.List([Layer(hidden_size, num_heads, intermediate_size, layer_norm_eps, dropout, rngs)
                            for _ in range(num_layers)])
    self.pooler = (transformer_dense(hidden_size, hidden_size, ("embed", "embed_out"), rngs)
                   if pooling == "cls" else None)
    self.dropout = nnx.Dropout(dropout)
    self.head = transformer_dense(hidden_size, num_classes, ("embed", "classes"), rngs)

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, token_type_ids=None, *,
             train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Last hidden states (B, L, hidden)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    table = self.embeddings
    check_length(input_ids.shape[1], table.position_embeddings.num_embeddings - table.position_offset,
                 getattr(self, "prompt_tokens", 0), "config.data.options.max_length")
    x = self.embeddings(input_ids, token_type_ids, attention_mask, train, rngs)
    mask_bias = padding_bias(attention_mask, x.dtype)
    x = run_blocks(self, self.layers, x, mask_bias, train, rngs)
    return x

  def pool(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    if self.pooling == "cls":
      return jnp.tanh(self.pooler(hidden[:, 0]))
    weights = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)

  def embed(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False,
            rngs: nnx.Rngs | None = None) -> jax.Array:
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    pooled = self.pool(self.encode(input_ids, attention_mask, train=train, rngs=rngs), attention_mask)
    return self.dropout(pooled, deterministic=not train, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.head(self.embed(input_ids, attention_mask, train=train, rngs=rngs)).astype(jnp.float32)

  def layer_groups(self) -> list[tuple[str, str]]:
    return ([("embeddings", r"^embeddings/")] + numbered_groups("layers", len(self.layers), "layer") +
            [("head", r"^(pooler|head)/")])
