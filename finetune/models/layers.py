"""Layers with logical axis names on every parameter.

Logical names used across the zoo: 'embed' (model width), 'mlp' (MLP hidden width), 'heads' (attention heads x
head dim, fused), 'conv_in' / 'conv_out' (convolution channels), 'classes' (classifier outputs), 'norm' (norm
scales/biases), 'patch' / 'position' (ViT positions), 'recurrent' (the LSTM's recurrent input width).
`finetune.sharding` maps them to mesh axes; model code never names a mesh axis.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import FinetuneError

LogicalAxes = tuple[str | None, ...]


def check_input(x: jax.Array, expected: tuple[int, ...], settings: str, flattened: bool = False) -> None:
  """Data of another shape than the model was built for fails deep inside XLA with a shape traceback: name both
  shapes and the settings instead. (At trace time: shapes are static, so this costs nothing per step.)
  `flattened`: only the number of values per example must match."""
  given = (math.prod(x.shape[1:]),) if flattened else tuple(x.shape[1:])
  if given != tuple(expected):
    raise FinetuneError(f"the model expects inputs of shape {tuple(expected)} ({settings}) but the data gives "
                        f"{tuple(x.shape[1:])}; set config.model to the data's shape, or resize the data")


def check_length(length: int, positions: int, prompt_tokens: int, data_setting: str) -> None:
  """Sequences longer than a learned position table: an out-of-range embedding lookup gives NaN, not an error.
  `prompt_tokens`: virtual tokens prompt tuning prepended (counted in `length`), which the fix may be to shorten."""
  if length <= positions:
    return
  if prompt_tokens:
    raise FinetuneError(f"sequences of {length} tokens ({prompt_tokens} of them prompt tuning's virtual tokens) "
                        f"exceed the model's {positions} positions; lower config.peft.num_virtual_tokens or "
                        f"{data_setting}")
  raise FinetuneError(f"sequences of {length} tokens exceed the model's {positions} positions; lower {data_setting}")


def linear(in_features: int, out_features: int, axes: tuple[str, str], rngs: nnx.Rngs,
           use_bias: bool = True, kernel_init=nnx.initializers.lecun_normal()) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=use_bias, rngs=rngs,
                    kernel_init=nnx.with_partitioning(kernel_init, axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)))


def embedding(num: int, features: int, axes: tuple[str, str], rngs: nnx.Rngs,
              init=nnx.initializers.normal(0.02)) -> nnx.Embed:
  """A token or position table that looks up and attends in its own dtype. (flax's nnx.Embed fixes `dtype` to the
  table's dtype when built, float32, so a table cast to bfloat16 for compute (train.compute_dtype) was cast back:
  every text model's residual stream, and so every matmul, stayed float32.)"""
  table = nnx.Embed(num, features, rngs=rngs, embedding_init=nnx.with_partitioning(init, axes))
  table.dtype = None
  return table


def conv(in_features: int, out_features: int, kernel_size: Sequence[int], rngs: nnx.Rngs,
         strides: int | Sequence[int] = 1, padding: str = "SAME", use_bias: bool = True) -> nnx.Conv:
  return nnx.Conv(in_features, out_features, tuple(kernel_size), strides=strides, padding=padding,
                  use_bias=use_bias, rngs=rngs,
                  kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                    (None,) * len(kernel_size) + ("conv_in", "conv_out")),
                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))


def batch_norm(features: int, rngs: nnx.Rngs, axis_name: str = "conv_out") -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (axis_name,)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axis_name,)))


def normalize(norm: nnx.BatchNorm, x, train: bool):
  """Applies BatchNorm: batch statistics when training, running statistics otherwise or when the strategy froze
  this layer (`finetune.step.inference_mode_batch_norm` sets `use_running_average` on it). Models call this
  rather than `norm(x, use_running_average=...)`, which would override the frozen flag. The result keeps `x`'s
  dtype: flax promotes it with the float32 statistics, so under train.compute_dtype='bfloat16' every layer after
  the first BatchNorm computed in float32. (The statistics themselves are computed and kept in float32.)"""
  return norm(x, use_running_average=not train or norm.use_running_average).astype(x.dtype)


def layer_norm(features: int, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


def numbered_groups(prefix: str, count: int, group_prefix: str) -> list[tuple[str, str]]:
  """[('block_1', '^blocks/0/'), ...]: one layer group per element of a numbered sub-module list."""
  return [(f"{group_prefix}_{i + 1}", rf"^{prefix}/{i}/") for i in range(count)]


def transformer_dense(in_features: int, out_features: int, axes: tuple[str, str], rngs: nnx.Rngs,
                      use_bias: bool = True) -> nnx.Linear:
  """A Linear initialised as the transformer checkpoints we load are (normal, std 0.02)."""
  return linear(in_features, out_features, axes, rngs, use_bias=use_bias,
                kernel_init=nnx.initializers.normal(0.02))


def padding_bias(attention_mask: jax.Array, dtype) -> jax.Array:
  """(B, L) 0/1 mask -> (B, 1, 1, L) additive bias: masked keys get the most negative float, as transformers does."""
  return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def causal_bias(attention_mask: jax.Array, dtype, window: int = 0) -> jax.Array:
  """(B, L) mask -> (B, 1, L, L) additive bias allowing each position its unmasked past and itself.

  The mask is 0 for padding and, for packed rows, the segment (conversation) number 1, 2, ... of each token: a
  token then sees only earlier tokens of its own segment. A 0/1 mask is the one-segment case. Padding queries see
  every real past key as before (their outputs are ignored; a row with nothing to attend to would be a uniform
  average over masked scores). `window` > 0: only the keys fewer than `window` places back (sliding-window
  attention, as transformers' Mistral: key index > query index - window); padding queries then see the real keys
  inside their window, or none (a uniform row, ignored as well).
  """
  length = attention_mask.shape[1]
  keys, queries = attention_mask[:, None, None, :], attention_mask[:, None, :, None]
  same_segment = (keys == queries) | (queries == 0)
  causal = jnp.tril(jnp.ones((length, length), bool))
  if window:
    causal &= ~jnp.tril(jnp.ones((length, length), bool), -window)  # (drops keys `window` or more places back)
  allowed = causal[None, None] & (keys > 0) & same_segment
  return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def segment_starts(attention_mask: jax.Array) -> jax.Array:
  """(B, L) bool: True where a packed row's next segment begins (a nonzero segment number right after another
  one). Padding never starts a segment, so a 0/1 mask, padded left or right, has no starts."""
  previous = jnp.pad(attention_mask[:, :-1], ((0, 0), (1, 0)))
  return (attention_mask > 0) & (previous > 0) & (attention_mask != previous)


def positions(attention_mask: jax.Array) -> jax.Array:
  """(B, L) position of each token: 0, 1, ... along the row, restarting at 0 where a packed segment starts, so a
  conversation in a packed row is numbered as if it were alone (a 0/1 mask gives arange(L) in every row)."""
  index = jnp.broadcast_to(jnp.arange(attention_mask.shape[1]), attention_mask.shape)
  start = jax.lax.cummax(jnp.where(segment_starts(attention_mask), index, 0), axis=1)  # latest start so far
  return index - start


def last_token(attention_mask: jax.Array) -> jax.Array:
  """(B,) index of each row's last real token, wherever the padding is (its count less one was a pad's index in a
  left-padded row)."""
  length = attention_mask.shape[1]
  return length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap): x bent smoothly into (-cap, cap) (Gemma 2's attention scores and output logits)."""
  return jnp.tanh(x / cap) * cap


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
           dropout: nnx.Dropout | None = None, train: bool = False, rngs: nnx.Rngs | None = None,
           prefix: nnx.Module | None = None, scale: float = 0.0, softcap: float = 0.0) -> jax.Array:
  """Scaled dot-product attention over (B, L, heads, head_dim) queries/keys/values -> (B, L, heads, head_dim).

  `prefix` (prefix tuning, `finetune/methods/prefix_tuning.py`) holds trainable keys and values that every query
  may attend to, prepended to k and v; attention modules keep it as their `prefix` attribute (None otherwise).
  `scale`: the scores' factor, 1 / sqrt(head_dim) when 0; `softcap` > 0: scores become softcap * tanh(scores /
  softcap) before the mask is added (Gemma 2).
  """
  if prefix is not None:
    k, v, bias = prefix.extend(k, v, bias)
  scores = jnp.einsum("blhd,bmhd->bhlm", q, k)
  if scale:  # (multiplied in float32: a bfloat16 scale is off by up to 0.4%, on every score, as 144 ** -0.5 is)
    scores = (scores.astype(jnp.float32) * scale).astype(scores.dtype)
  else:
    scores = scores / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
  if softcap:
    scores = soft_cap(scores, softcap)
  if bias is not None:
    scores = scores + bias
  weights = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    weights = dropout(weights, deterministic=not train, rngs=rngs)
  return jnp.einsum("bhlm,bmhd->blhd", weights, v)


# Rematerialisation policies for `run_block` (config.train.remat): what a block keeps for the backward pass.
REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input; recompute everything inside
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


def run_block(owner: nnx.Module, block: nnx.Module, *args):
  """`block(*args)`, rematerialised per block when the model's `remat` attribute names a policy (set from
  config.train.remat): activations inside the block are recomputed in the backward pass instead of stored, so
  activation memory grows with the number of blocks by one block input each. Python values among `args` (the
  `train` flag, a missing `rngs`) are static."""
  policy = getattr(owner, "remat", "")
  if not policy:
    return block(*args)
  static = tuple(i + 1 for i, a in enumerate(args) if isinstance(a, bool) or a is None)
  return nnx.remat(lambda module, *inputs: module(*inputs), policy=REMAT_POLICIES[policy],
                   static_argnums=static)(block, *args)


# ----------------------------------------------------------------------------------------------- scanned layers
# A model's stack of identical blocks (`nnx.List`) may be replaced by one block whose variables carry a leading
# layer axis (`stack_blocks`, applied by finetune/scan.py when config.train.scan_layers is set). `run_blocks` then
# runs it with `jax.lax.scan`: the block is traced and compiled once, whatever the depth.

SCAN_LENGTH = "scan_length"  # attribute marking a stacked block: the number of layers it holds
LAYER_AXIS = "layers"  # logical name of the stacked layer axis (replicated by default: every device holds all layers)


def stack_blocks(blocks: Sequence[nnx.Module]) -> nnx.Module:
  """One module holding `blocks` (identical in structure) with every variable stacked along a new leading axis."""
  splits = [nnx.split(block) for block in blocks]
  graphdef = splits[0][0]
  for index, (other, _) in enumerate(splits[1:], start=1):
    if other != graphdef:
      raise FinetuneError(f"block {index} differs in structure from block 0 (a per-layer LoRA rank_pattern or "
                          "targets covering only some layers?); scanned layers need identical blocks")
  flat_states = [nnx.to_flat_state(state) for _, state in splits]
  stacked = []
  for entries in zip(*flat_states):
    path, variable = entries[0]
    value = jnp.stack([v.get_value() for _, v in entries])
    variable = variable.replace(value)
    metadata = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      if metadata.get(key):
        variable.set_metadata(key, (LAYER_AXIS, *metadata[key]))
    stacked.append((path, variable))
  module = nnx.merge(graphdef, nnx.from_flat_state(stacked))
  setattr(module, SCAN_LENGTH, len(blocks))
  return module


def run_blocks(owner: nnx.Module, blocks, x: jax.Array, *args, per_layer: Any = None) -> jax.Array:
  """x through every block in order: `x = block(x, *args)`; `blocks` is an `nnx.List` or a stacked block.
  `per_layer`: arrays with a leading axis of one entry per block (which attention a layer uses); block i then gets
  its entry as one more argument, `block(x, *args, entry_i)`, sliced inside the scan when stacked.

  The stacked form runs under `jax.lax.scan` (rematerialised per block with the owner's `remat` policy). Its dropout
  keys are split per layer from one draw of `rngs`, so with dropout the random masks differ from the unrolled
  model's; without dropout the two compute the same function.

  At every block boundary x is constrained to the owner's `activation_sharding` (`sharding.ActivationSharding`, set
  from config.activation_rules by the train stage), so the layout of the residual stream between blocks is chosen
  by config rather than left to the compiler's propagation.
  """
  activations = getattr(owner, "activation_sharding", None)
  constrain = activations.constrain if activations is not None else (lambda y: y)
  x = constrain(x)
  length = getattr(blocks, SCAN_LENGTH, None)
  if length is None:
    for index, block in enumerate(blocks):
      own = () if per_layer is None else (jax.tree.map(lambda entries: entries[index], per_layer),)
      x = constrain(run_block(owner, block, x, *args, *own))
    return x
  rngs = next((a for a in args if isinstance(a, nnx.Rngs)), None)
  keys = jax.random.split(rngs.dropout(), length) if rngs is not None and "dropout" in rngs else None
  # Adapter layers read their dropout rngs from attributes set for the call (adapters.call_context); clear them
  # while splitting (an Rngs object is state, not a stacked array) and set per-layer ones inside the scan.
  contexts = [node for _, node in nnx.iter_graph(blocks) if hasattr(node, "context_rngs")]
  context_train = any(node.context_train for node in contexts)
  for node in contexts:
    node.context_train, node.context_rngs = False, None
  graphdef, state = nnx.split(blocks)

  def body(carry: jax.Array, layer: tuple[Any, jax.Array | None, Any]) -> tuple[jax.Array, None]:
    layer_state, key, own = layer
    block = nnx.merge(graphdef, layer_state)
    layer_rngs = nnx.Rngs(dropout=key) if key is not None else None
    for _, node in nnx.iter_graph(block):
      if hasattr(node, "context_rngs"):
        node.context_train, node.context_rngs = context_train, layer_rngs
    call_args = [layer_rngs if isinstance(a, nnx.Rngs) else a for a in args]
    return constrain(block(carry, *call_args, *(() if own is None else (own,)))), None

  policy = getattr(owner, "remat", "")
  if policy:
    body = jax.checkpoint(body, policy=REMAT_POLICIES[policy])
  # A block may return another dtype than it takes (bfloat16 compute with a float32 parameter inside it, from
  # train.float32_params, promotes the residual stream), which a scan's carry cannot: enter the scan in the dtype
  # a block returns, as the unrolled model's later blocks do.
  layer = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), (state, keys, per_layer))
  x = x.astype(jax.eval_shape(lambda carry, one: body(carry, one)[0], x, layer).dtype)
  try:
    x, _ = jax.lax.scan(body, x, (state, keys, per_layer))
  finally:
    for node in contexts:
      node.context_train, node.context_rngs = context_train, rngs
  return x
