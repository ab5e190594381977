"""GPT-2 decoder (causal language model) with Hugging Face-compatible structure and a tied output embedding.

Pre-norm blocks: x += Attn(LN(x)) with a causal mask; x += MLP(LN(x)) with GPT-2's tanh-approximated GELU; final
LayerNorm; logits = x @ wte^T. Parameter paths follow transformers' `GPT2LMHeadModel` (`finetune/models/hf.py`).

One layout differs: the fused query/key/value projection `c_attn` orders its 3 * n_embd outputs head by head
([q k v of head 0 | q k v of head 1 | ...]), where transformers has [all q | all k | all v]. Tensor parallelism
splits that axis into contiguous pieces, which then hold whole heads when the tensor axis divides n_head; in
transformers' order a piece held parts of q, k and v, and XLA gathered the whole activation before attention in
every layer (as it still does when n_head does not divide: GPT-2 XL's 25 heads). `hf.py` permutes on import and
export (and PEFT adapters' lora_B and magnitude, `peft_format.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import FinetuneError
from finetune.models import MODELS
from finetune.models.layers import (attend, causal_bias, check_length, embedding, last_token, layer_norm,
                                    numbered_groups, positions, run_blocks, transformer_dense)


class Block(nnx.Module):
  def __init__(self, hidden: int, num_heads: int, inner: int, eps: float, dropout: float, rngs: nnx.Rngs):
    if hidden % num_heads:
      raise FinetuneError(f"config.model.n_embd={hidden} is not divisible by config.model.n_head={num_heads}")
    self.num_heads = num_heads
    self.ln_1 = layer_norm(hidden, rngs, eps)
    self.c_attn = transformer_dense(hidden, 3 * hidden, ("embed", "heads"), rngs)  # fused q, k, v; head-major
    self.attn_proj = transformer_dense(hidden, hidden, ("heads", "embed"), rngs)
    self.ln_2 = layer_norm(hidden, rngs, eps)
    self.c_fc = transformer_dense(hidden, inner, ("embed", "mlp"), rngs)
    self.mlp_proj = transformer_dense(inner, hidden, ("mlp", "embed"), rngs)
    self.dropout = nnx.Dropout(dropout)
    self.prefix = None  # prefix tuning sets trainable keys/values here

  def __call__(self, x, mask_bias, train, rngs):
    batch, length, hidden = x.shape
    head_dim = hidden // self.num_heads
    qkv = self.c_attn(self.ln_1(x)).reshape(batch, length, self.num_heads, 3, head_dim)  # (B, L, H, 3, D)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # each (B, L, H, D)
    context = attend(q, k, v, mask_bias, self.dropout, train, rngs, self.prefix).reshape(batch, length, hidden)
    x = x + self.dropout(self.attn_proj(context), deterministic=not train, rngs=rngs)
    hidden_states = jax.nn.gelu(self.c_fc(self.ln_2(x)), approximate=True)  # GPT-2's "gelu_new"
    return x + self.dropout(self.mlp_proj(hidden_states), deterministic=not train, rngs=rngs)


@MODELS.register("gpt2")
class GPT2(nnx.Module):
  """Token + position embeddings -> blocks -> LayerNorm -> tied LM head. Outputs (B, L, vocab) logits."""

  scan_blocks = "blocks"  # the stack of identical blocks that config.train.scan_layers stacks
  input_keys = ("input_ids", "attention_mask")
  # Format 1 held transformers' [q | k | v] order, which a tensor axis splits between heads (module docstring).
  layout_changes = ((2, r"(^|/)c_attn/", "stored c_attn's outputs head by head"),)

  def __init__(self, *, num_classes: int = 0, vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768,
               n_layer: int = 12, n_head: int = 12, n_inner: int = 0, layer_norm_epsilon: float = 1e-5,
               dropout: float = 0.1, hf_config: str = "", rngs: nnx.Rngs):
    del num_classes, hf_config  # a language model predicts tokens; hf_config is read before construction
    self.wte = embedding(vocab_size, n_embd, ("vocab", "embed"), rngs)
    self.wpe = embedding(n_positions, n_embd, ("position", "embed"), rngs, nnx.initializers.normal(0.01))
    self.blocks = nnx.List([Block(n_embd, n_head, n_inner or 4 * n_embd, layer_norm_epsilon, dropout, rngs)
                            for _ in range(n_layer)])
    self.ln_f = layer_norm(n_embd, rngs, layer_norm_epsilon)
    self.dropout = nnx.Dropout(dropout)

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False,
                    rngs: nnx.Rngs | None = None) -> jax.Array:
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    length = input_ids.shape[1]
    check_length(length, self.wpe.num_embeddings, getattr(self, "prompt_tokens", 0),
                 "config.data.options.block_size / max_length")
    x = self.wte(input_ids) + self.wpe(positions(attention_mask))  # restarting at each packed conversation
    x = self.dropout(x, deterministic=not train, rngs=rngs)
    mask_bias = causal_bias(attention_mask, x.dtype)
    x = run_blocks(self, self.blocks, x, mask_bias, train, rngs)
    return self.ln_f(x)

  def embed(self, input_ids, attention_mask=None, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """Features for probes: the last non-padding token's state (B, n_embd)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    states = self.hidden_states(input_ids, attention_mask, train=train, rngs=rngs)
    return states[jnp.arange(states.shape[0]), last_token(attention_mask)]

  def __call__(self, input_ids, attention_mask=None, *, train: bool = False, rngs: nnx.Rngs | None = None):
    states = self.hidden_states(input_ids, attention_mask, train=train, rngs=rngs)
    return self.wte.attend(states).astype(jnp.float32)  # tied output embedding

  def layer_groups(self) -> list[tuple[str, str]]:
    # The output layer is tied to wte, so the top group holds the final LayerNorm only.
    return ([("embeddings", r"^(wte|wpe)/")] + numbered_groups("blocks", len(self.blocks), "block") +
            [("head", r"^ln_f/")])
