"""Llama-family parity with transformers (PyTorch): RMSNorm, rotary embeddings, grouped-query attention, SwiGLU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conftest import model_from_hf
from finetune.models import build_model, hf
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
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
  kwargs = CONFIGS[name]
  torch.manual_seed(0)
  reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
  reference.save_pretrained(tmp_path)
  ours, _, fresh = model_from_hf("llama", str(tmp_path))
  loaded = nnx.split(ours, nnx.Param, ...)[1].to_pure_dict()
  assert fresh == [] and (("lm_head/kernel" in flatten(loaded)) != kwargs.get("tie_word_embeddings", False))
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


def test_a_checkpoint_s_attention_dropout_is_named_as_not_applied(tmp_path):
  """(Read by nothing, silently: this Llama has no dropout.)"""
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS["mqa-head-dim"], attention_dropout=0.1)
                                ).save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match=r"attention_dropout=0.1 is not applied: this framework's Llama has no "
                                       r"dropout"):
    hf.model_kwargs(str(tmp_path))
