"""Prompt tuning (Lester et al. 2021): `num_virtual_tokens` trainable embeddings prepended to every input.

Implemented as extra vocabulary: the token-embedding layer gets a `soft_prompt` table (n, width) read for ids
>= the vocabulary size, and the forward pass (`prompted_inputs`) prepends ids vocab .. vocab+n-1 and n ones to the
attention mask. The model itself is unchanged, positions count the virtual tokens as PEFT's prompt tuning does
(it concatenates them to `inputs_embeds`), and a causal LM's outputs for the virtual positions are dropped, so
token-level losses line up with the labels. Tied output layers score the real vocabulary only.

The prompt starts from the embeddings of randomly drawn vocabulary tokens, which Lester et al. found better than
random vectors. Only token models (BERT, GPT-2, Llama) have an input vocabulary to extend.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters
from finetune.errors import FinetuneError

TOKEN_EMBEDDINGS = ("word_embeddings", "wte", "embed_tokens")


class PromptedEmbed(nnx.Module):
  def __init__(self, base: nnx.Embed, num_virtual_tokens: int, rngs: nnx.Rngs):
    self.embedding = base.embedding
    self.num_embeddings, self.features = base.num_embeddings, base.features
    table = base.embedding.get_value()
    drawn = jax.random.randint(rngs.params(), (num_virtual_tokens,), 0, self.num_embeddings)
    self.soft_prompt = nnx.Param(table[drawn], sharding=(None, adapters.logical_axes_of(base.embedding)[1]))

  def __call__(self, ids: jax.Array) -> jax.Array:
    vocab = self.num_embeddings
    real = jnp.take(self.embedding[...], jnp.clip(ids, 0, vocab - 1), axis=0)
    virtual = jnp.take(self.soft_prompt[...], jnp.clip(ids - vocab, 0, self.soft_prompt.shape[0] - 1), axis=0)
    return jnp.where((ids >= vocab)[..., None], virtual, real)

  def attend(self, query: jax.Array) -> jax.Array:
    return query @ self.embedding[...].T


def inject(model: nnx.Module, peft_cfg: ConfigDict, rngs: nnx.Rngs) -> None:
  if getattr(model, "input_keys", ()) != ("input_ids", "attention_mask"):
    raise FinetuneError("prompt tuning prepends tokens: it needs a token model (bert, gpt2, llama)")
  if peft_cfg.targets:
    embeds = adapters.select_modules(model, peft_cfg.targets, kind=nnx.Embed)
  else:
    embeds = [(p, m) for p, m in adapters.module_paths(model, nnx.Embed) if p.rsplit("/", 1)[-1] in TOKEN_EMBEDDINGS]
  if len(embeds) != 1:
    raise FinetuneError(f"prompt tuning extends one token-embedding layer; config.peft.targets picks "
                        f"{[p for p, _ in embeds]}: name exactly one")
  path, embed = embeds[0]
  if re.search(r"position|token_type|wpe", path.rsplit("/", 1)[-1]):
    # (the virtual ids, numbered past this table, went into the real word embedding as ordinary tokens: the soft
    # prompt was never read and its gradient was 0)
    raise FinetuneError(f"config.peft.targets picks {path}, a position or segment embedding; prompt tuning extends "
                        f"the token embedding: name it ({', '.join(TOKEN_EMBEDDINGS)}) or leave targets empty")
  adapters.replace_module(model, path, PromptedEmbed(embed, peft_cfg.num_virtual_tokens, rngs))
  model.prompt_vocab, model.prompt_tokens = embed.num_embeddings, peft_cfg.num_virtual_tokens


def prompted_inputs(model: nnx.Module, inputs: list[jax.Array]) -> tuple[list[jax.Array], int]:
  """(inputs with the virtual tokens prepended, how many) for a prompt-tuned model; unchanged otherwise."""
  count = getattr(model, "prompt_tokens", 0)
  if not count:
    return inputs, 0
  ids, mask = inputs
  batch = ids.shape[0]
  virtual = jnp.broadcast_to(model.prompt_vocab + jnp.arange(count, dtype=ids.dtype), (batch, count))
  return [jnp.concatenate([virtual, ids], axis=1),
          jnp.concatenate([jnp.ones((batch, count), mask.dtype), mask], axis=1)], count


def from_base_checkpoint(arrays: dict, param_paths: list[str], state_paths: list[str], peft_cfg: ConfigDict,
                         seed: int) -> dict:
  """The initial prompt from the *loaded* vocabulary (the embeddings of randomly drawn tokens), as at construction
  from a random model: otherwise it would hold random-init rows no pretrained model has seen. The tokens depend
  on the stage's seed (they were drawn with seed 0 for every seed, so a seed sweep under-reported the spread)."""
  del state_paths
  params = dict(arrays["params"])
  for path in param_paths:
    table = params.get(path[:-len("soft_prompt")] + "embedding")
    if path.endswith("/soft_prompt") and path not in params and table is not None:
      # A numpy stream of its own: (seed, 0, 3) is none of the input pipeline's (data/pipeline.py `*_seed`).
      drawn = np.random.default_rng((seed, 0, 3)).integers(0, table.shape[0], peft_cfg.num_virtual_tokens)
      params[path] = np.asarray(table)[drawn]
  return {**arrays, "params": params}


adapters.PEFT_METHODS.register("prompt")(adapters.PeftMethod(inject=inject, convert_checkpoint=from_base_checkpoint,
                                                               settings=("num_virtual_tokens",), targets="optional"))
