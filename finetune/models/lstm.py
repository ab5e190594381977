"""An AWD-LSTM-style recurrent network (Merity et al. 2018) as used by ULMFiT (Howard & Ruder 2018): one class
that is a language model or a classifier, so a classifier stage loads a language-model stage's weights.

    token embedding (embedding dropout: whole words) -> locked input dropout
      -> LSTM layer 1 -> locked hidden dropout -> ... -> LSTM layer n        (weight-dropped recurrent matrices)
    language model (`output='lm'`, or `num_classes == 0`): locked output dropout -> decoder tied to the embedding
        (+ a per-word bias), (B, L, vocab) float32 logits for task 'causal_lm';
    classifier (`num_classes > 0`): concat pooling [last state, max-pool, mean-pool] of the last layer over the
        non-padding positions -> head (BatchNorm, dropout, Linear(3E -> head_hidden), ReLU, BatchNorm, dropout,
        Linear(-> classes)), all under `head/`.

Kept from AWD-LSTM: a stack of LSTM layers whose last one has the embedding width so the decoder can be tied
(`tie_weights`); embedding dropout (a word's whole embedding row dropped, `embed_dropout`); variational ("locked")
dropout with one mask per sequence on the embeddings (`input_dropout`), between layers (`hidden_dropout`) and on the
last layer's output (`output_dropout`, language model only); DropConnect on the hidden-to-hidden matrices
(`weight_dropout`, one mask per batch, shared by every time step); fastai's `drop_mult` scaling all of them.
Dropped: NT-ASGD (ULMFiT itself trains with Adam; the optimizer is config), activation and temporal activation
regularisation (AR/TAR need the model to return a loss term besides logits, which the task contract has no slot
for), and continuous BPTT with the hidden state carried across batches (the pipeline serves independent, shuffled
blocks and the train state holds no recurrent state, so every block/sentence starts from a zero state).

The recurrence is written here with `jax.lax.scan`, not `nnx.RNN`/`nnx.OptimizedLSTMCell`: (1) the input-to-gate
projection of the whole sequence is one (B*L, in) x (in, 4H) matmul before the scan, leaving only h @ W_hh inside it
(the library cell recomputes the input projection per step inside its scan); (2) weight drop needs the recurrent
matrix masked once per forward pass before the scan, which the library cell, owning its kernel, cannot do without
mutating the module inside the train step; (3) the padding mask freezes the carry at padded steps, so outputs at real
positions do not depend on padding on either side, and a packed row's next segment (attention_mask numbering
conversations 1, 2, ...) starts from a zero state. The parameters are plain `nnx.Linear`/`nnx.Param` with logical
axes: 'vocab'/'embed' for the embedding, ('embed', 'mlp') for the input kernels (input width x fused gates) and
('recurrent', 'mlp') for the recurrent ones ('recurrent' replicated by default), 'mlp' for gate biases, 'vocab'
for the decoder bias, ('embed' | 'mlp', 'classes') in the classifier head and its BatchNorms' feature axis ('embed'
on the pooled features, 'mlp' on the hidden layer).

Layer groups (fastai's `awd_lstm_clas_split` / `awd_lstm_lm_split`): the classifier's are `embedding`,
`lstm_1..n`, `head`; the language model's are `lstm_1..n`, then `head` = the tied embedding with the decoder (the
embedding is the decoder too, so it trains at the top group's rate). Both cover every parameter exactly once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import FinetuneError
from finetune.models import MODELS
from finetune.models.layers import (batch_norm, embedding, linear, normalize, numbered_groups, run_blocks,
                                    segment_starts)

OUTPUTS = ("auto", "lm", "classifier")


def _symmetric_uniform(scale: float):
  """U(-scale, scale), PyTorch's LSTM initialisation with scale = 1/sqrt(hidden)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


def _gate_bias(hidden: int):
  """Zero gate biases except the forget gate's (gate order i, f, g, o), which starts at 1."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(1.0)
  return init


class LSTMLayer(nnx.Module):
  """One unidirectional LSTM over (B, L, in) -> (B, L, hidden), then locked dropout on its output."""

  def __init__(self, in_features: int, hidden: int, *, weight_dropout: float, output_dropout: float,
               rngs: nnx.Rngs):
    self.hidden = hidden
    scale = 1.0 / math.sqrt(hidden)
    self.wi = nnx.Linear(in_features, 4 * hidden, rngs=rngs,
                         kernel_init=nnx.with_partitioning(_symmetric_uniform(scale), ("embed", "mlp")),
                         bias_init=nnx.with_partitioning(_gate_bias(hidden), ("mlp",)))
    # The recurrent kernel's input axis, 'recurrent', has no default rule (replicated), not fsdp's 'embed': every
    # time step inside the scan multiplies by it, and a chain of matmuls with weights all sharded (fsdp, tensor) got
    # wrong gradients from XLA (jax 0.10) on a data x fsdp x tensor mesh (docs/architecture.md, "Decisions
    # (scale-out)"). It is small next to the embedding.
    self.wh = nnx.Param(_symmetric_uniform(scale)(rngs.params(), (hidden, 4 * hidden)),
                        sharding=("recurrent", "mlp"))
    self.weight_dropout = nnx.Dropout(weight_dropout)  # DropConnect on W_hh: one mask for all time steps
    self.dropout = nnx.Dropout(output_dropout, broadcast_dims=(1,))  # locked: one mask per sequence

  def __call__(self, x: jax.Array, mask: jax.Array, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    batch = x.shape[0]
    gates_x = self.wi(x)  # (B, L, 4H): the input projection of every step at once
    wh = self.weight_dropout(self.wh[...].astype(gates_x.dtype), deterministic=not train, rngs=rngs)
    keep = (mask > 0)[..., None]  # (B, L, 1)
    fresh = segment_starts(mask)[..., None]  # (B, L, 1): a packed row's next conversation starts from zeros

    def step(carry, inputs):
      h, c = carry
      gx, m, start = inputs
      h, c = jnp.where(start, 0.0, h), jnp.where(start, 0.0, c)
      i, f, g, o = jnp.split(gx + h @ wh, 4, axis=-1)
      c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
      # Padded steps leave the state unchanged, so real positions never see padding (left or right).
      h_new, c_new = jnp.where(m, h_new, h), jnp.where(m, c_new, c)
      return (h_new, c_new), h_new

    zeros = jnp.zeros((batch, self.hidden), gates_x.dtype)
    time_major = [jnp.swapaxes(a, 0, 1) for a in (gates_x, keep, fresh)]  # (B, L, .) -> (L, B, .)
    _, outputs = jax.lax.scan(step, (zeros, zeros), time_major)
    return self.dropout(jnp.swapaxes(outputs, 0, 1), deterministic=not train, rngs=rngs)


class PoolingHead(nnx.Module):
  """ULMFiT's classifier on concat-pooled features: [BatchNorm -> dropout -> Linear -> ReLU] -> BatchNorm ->
  dropout -> Linear (fastai's PoolingLinearClassifier with lin_ftrs=[hidden]); `hidden=0`: one linear block.
  `head(features)` (feature caching, LwF) runs it in inference mode."""

  def __init__(self, features: int, hidden: int, num_classes: int, dropouts: tuple[float, float], rngs: nnx.Rngs):
    self.norm_1 = batch_norm(features, rngs, "embed")
    self.dropout_1 = nnx.Dropout(dropouts[0])
    if hidden:
      self.hidden = linear(features, hidden, ("embed", "mlp"), rngs)
      self.norm_2 = batch_norm(hidden, rngs, "mlp")
      self.dropout_2 = nnx.Dropout(dropouts[1])
      self.out = linear(hidden, num_classes, ("mlp", "classes"), rngs)
    else:
      self.hidden = None
      self.out = linear(features, num_classes, ("embed", "classes"), rngs)

  def __call__(self, x: jax.Array, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = self.dropout_1(normalize(self.norm_1, x, train), deterministic=not train, rngs=rngs)
    if self.hidden is not None:
      x = jax.nn.relu(self.hidden(x))
      x = self.dropout_2(normalize(self.norm_2, x, train), deterministic=not train, rngs=rngs)
    return self.out(x)


class TiedDecoder(nnx.Module):
  """The language model's output layer: logits = h @ E^T + b with E the token embedding (tied), or a Linear."""

  def __init__(self, embed_size: int, vocab_size: int, tied: bool, rngs: nnx.Rngs):
    self.tied = tied
    if tied:
      self.bias = nnx.Param(jnp.zeros((vocab_size,)), sharding=("vocab",))
    else:
      self.decoder = linear(embed_size, vocab_size, ("embed", "vocab"), rngs)

  def __call__(self, x: jax.Array, embedding: nnx.Embed) -> jax.Array:
    if self.tied:
      return embedding.attend(x) + self.bias[...].astype(x.dtype)
    return self.decoder(x)


@MODELS.register("lstm")
class LSTM(nnx.Module):
  """AWD-LSTM-style language model / ULMFiT classifier (see the module docstring). Defaults are AWD-LSTM's sizes
  (embedding 400, hidden 1152, 3 layers) and fastai's dropouts; experiments shrink them."""

  input_keys = ("input_ids", "attention_mask")

  def __init__(self, *, num_classes: int = 0, vocab_size: int = 30522, embed_size: int = 400,
               hidden_size: int = 1152, num_layers: int = 3, tie_weights: bool = True, output: str = "auto",
               embed_dropout: float = 0.02, input_dropout: float = 0.25, weight_dropout: float = 0.2,
               hidden_dropout: float = 0.15, output_dropout: float = 0.1, drop_mult: float = 1.0,
               head_hidden: int = 50, head_dropout: tuple[float, float] = (0.4, 0.1), rngs: nnx.Rngs):
    if output not in OUTPUTS:
      raise FinetuneError(f"config.model.output={output!r}; valid: {', '.join(OUTPUTS)}")
    if num_layers < 1:
      raise FinetuneError(f"config.model.num_layers={num_layers} must be >= 1")
    self.is_lm = output == "lm" or (output == "auto" and num_classes == 0)
    if not self.is_lm and num_classes < 1:
      raise FinetuneError("config.model.output='classifier' needs data with classes (num_classes > 0)")
    self.embed_dropout = embed_dropout * drop_mult
    self.embedding = embedding(vocab_size, embed_size, ("vocab", "embed"), rngs, _symmetric_uniform(0.1))
    self.input_dropout = nnx.Dropout(input_dropout * drop_mult, broadcast_dims=(1,))
    # The last layer has the embedding's width, so the decoder can be tied to the embedding (AWD-LSTM).
    sizes = [embed_size] + [hidden_size] * (num_layers - 1) + [embed_size]
    self.layers = nnx.List([
        LSTMLayer(sizes[i], sizes[i + 1], weight_dropout=weight_dropout * drop_mult,
                  output_dropout=hidden_dropout * drop_mult if i < num_layers - 1 else 0.0, rngs=rngs)
        for i in range(num_layers)])
    if self.is_lm:
      self.output_dropout = nnx.Dropout(output_dropout * drop_mult, broadcast_dims=(1,))
      self.head = TiedDecoder(embed_size, vocab_size, tie_weights, rngs)
    else:
      self.head = PoolingHead(3 * embed_size, head_hidden, num_classes,
                              (head_dropout[0] * drop_mult, head_dropout[1] * drop_mult), rngs)

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False,
                    rngs: nnx.Rngs | None = None) -> jax.Array:
    """The last LSTM layer's outputs (B, L, embed_size)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x = self.embedding(input_ids)
    if train and self.embed_dropout > 0 and rngs is not None:
      # Embedding dropout: a dropped word loses its whole vector wherever it occurs in the batch.
      keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.embed_dropout, (self.embedding.num_embeddings,))
      x = x * (keep[input_ids][..., None] / (1.0 - self.embed_dropout)).astype(x.dtype)
    x = self.input_dropout(x, deterministic=not train, rngs=rngs)
    return run_blocks(self, self.layers, x, attention_mask, train, rngs)

  def embed(self, input_ids, attention_mask=None, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """Concat pooling over the non-padding positions: [last state, max, mean] of the last layer, (B, 3E)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    states = self.hidden_states(input_ids, attention_mask, train=train, rngs=rngs)
    real = (attention_mask > 0)[..., None]
    count = jnp.maximum(real.sum(1), 1).astype(states.dtype)
    # The state after the last real token: the carry is frozen at padded steps, so the final position holds it
    # whichever side the padding is on.
    last = states[:, -1]
    maximum = jnp.where(real, states, jnp.finfo(states.dtype).min).max(1)
    maximum = jnp.where(real.any(1), maximum, 0.0)  # an all-padding row pools to zeros, not -inf
    mean = jnp.where(real, states, 0.0).sum(1) / count
    return jnp.concatenate([last, maximum, mean], axis=-1)

  def __call__(self, input_ids, attention_mask=None, *, train: bool = False, rngs: nnx.Rngs | None = None):
    if self.is_lm:
      states = self.hidden_states(input_ids, attention_mask, train=train, rngs=rngs)
      states = self.output_dropout(states, deterministic=not train, rngs=rngs)
      return self.head(states, self.embedding).astype(jnp.float32)
    features = self.embed(input_ids, attention_mask, train=train, rngs=rngs)
    return self.head(features, train=train, rngs=rngs).astype(jnp.float32)

  def layer_groups(self) -> list[tuple[str, str]]:
    lstm = numbered_groups("layers", len(self.layers), "lstm")
    if self.is_lm:
      return lstm + [("head", r"^(embedding|head)/")]
    return [("embedding", r"^embedding/")] + lstm + [("head", r"^head/")]
