"""Packed rows (attention_mask numbering conversations 1, 2, ...): each conversation computes as if alone."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from finetune.models import build_model
from finetune.models.layers import causal_bias, positions, segment_starts
from finetune.tasks import TASKS

VOCAB = 40
TINY = {
    "gpt2": dict(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, dropout=0.0),
    "llama": dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "lstm": dict(vocab_size=VOCAB, embed_size=8, hidden_size=12, num_layers=2),
}
LENGTHS = (3, 5, 4)  # three conversations packed into one row of 14, then 2 padding tokens


def _packed_row(rng: np.random.Generator) -> tuple[jnp.ndarray, jnp.ndarray]:
  ids = rng.integers(0, VOCAB, (1, sum(LENGTHS) + 2))
  segments = np.concatenate([np.full(n, number + 1) for number, n in enumerate(LENGTHS)] + [np.zeros(2, int)])
  return jnp.asarray(ids, jnp.int32), jnp.asarray(segments[None], jnp.int32)


@pytest.mark.parametrize("name", list(TINY))
def test_a_packed_conversation_gets_the_logits_it_gets_alone(name):
  model = build_model(ConfigDict({"name": name, **TINY[name]}), 0, nnx.Rngs(0))
  ids, mask = _packed_row(np.random.default_rng(1))
  packed = np.asarray(model(ids, mask))
  start = 0
  for n in LENGTHS:
    alone = np.asarray(model(ids[:, start:start + n], jnp.ones((1, n), jnp.int32)))
    np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
    start += n
  # Not vacuous: with a 0/1 mask (the segments attend to each other) the later conversations' logits change.
  spanning = np.asarray(model(ids, (mask > 0).astype(jnp.int32)))
  assert not np.allclose(spanning[:, LENGTHS[0]:sum(LENGTHS)], packed[:, LENGTHS[0]:sum(LENGTHS)], atol=1e-4)


def test_a_zero_one_mask_keeps_the_unpacked_positions_and_causal_mask():
  mask = jnp.asarray([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], jnp.int32)  # right and left padding
  np.testing.assert_array_equal(positions(mask), np.tile(np.arange(5), (2, 1)))
  assert not np.asarray(segment_starts(mask)).any()
  allowed = np.asarray(causal_bias(mask, jnp.float32)) == 0
  np.testing.assert_array_equal(allowed, np.tril(np.ones((5, 5), bool))[None, None] & (mask > 0)[:, None, None, :])


def test_packed_positions_restart_and_segments_do_not_see_each_other():
  mask = jnp.asarray([[1, 1, 2, 2, 2, 3, 0]], jnp.int32)
  np.testing.assert_array_equal(positions(mask), [[0, 1, 0, 1, 2, 0, 1]])
  np.testing.assert_array_equal(segment_starts(mask), [[False, False, True, False, False, True, False]])
  allowed = np.asarray(causal_bias(mask, jnp.float32))[0, 0] == 0
  assert allowed[4].tolist() == [False, False, True, True, True, False, False]
  assert allowed[6].tolist() == [True] * 6 + [False]  # a padding query: every real past key, as unpacked


def test_the_loss_skips_each_packed_conversations_first_token():
  batch = {"input_ids": jnp.zeros((1, 7), jnp.int32), "attention_mask": jnp.asarray([[1, 1, 2, 2, 2, 3, 0]]),
           "loss_mask": jnp.asarray([[0, 1, 1, 1, 1, 1, 0]])}
  # Targets are tokens 1..6: token 2 and token 5 open conversations 2 and 3, predicted from another conversation.
  np.testing.assert_array_equal(TASKS.get("causal_lm").weights(batch), [[1, 0, 1, 1, 0, 0]])
  del batch["loss_mask"]  # LM text without a loss mask: every real token but the openings
  np.testing.assert_array_equal(TASKS.get("causal_lm").weights(batch), [[1, 0, 1, 1, 0, 0]])
