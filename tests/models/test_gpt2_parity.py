"""GPT-2 parity with transformers (PyTorch) on tiny random models built offline."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conftest import model_from_hf
from finetune.models import build_model
from finetune.partition import assign_groups, flatten

torch = pytest.importorskip("torch", reason="torch is the parity reference (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=32),
    dict(n_embd=48, n_layer=3, n_head=6, vocab_size=64, n_positions=20, n_inner=80, layer_norm_epsilon=1e-6),
    # (refused before: the same tanh approximation as gelu_new)
    dict(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16, activation_function="gelu_pytorch_tanh"),
]


def _ours(path):
  model, arrays, fresh = model_from_hf("gpt2", path, dropout=0.0)
  assert fresh == []
  return model, arrays


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["2x32", "3x48-inner80", "gelu_pytorch_tanh"])
def test_logits_match_transformers(kwargs, tmp_path):
  torch.manual_seed(0)
  reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
  reference.save_pretrained(tmp_path)
  ours, arrays = _ours(str(tmp_path))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, kwargs["vocab_size"], size=(3, 13))
  mask = np.ones_like(ids)
  mask[1, 9:] = 0  # right padding
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  valid = mask.astype(bool)
  np.testing.assert_allclose(logits[valid], expected[valid], atol=1e-4, rtol=1e-4)
  assert set(arrays["unused"]) <= {"lm_head.weight"}  # tied to wte


def test_gpt2_layer_groups_cover_every_parameter():
  model = build_model(ConfigDict({"name": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "vocab_size": 30,
                                  "n_positions": 8}), 0, nnx.Rngs(0))
  params = flatten(nnx.split(model, nnx.Param, ...)[1].to_pure_dict())
  group_of = assign_groups(list(params), model.layer_groups(), "gpt2")
  assert group_of["wte/embedding"] == "embeddings" and group_of["ln_f/scale"] == "head"
  assert group_of["blocks/1/c_attn/kernel"] == "block_2"
