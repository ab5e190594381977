"""ViT parity with transformers (PyTorch) image classification on tiny random models built offline."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import model_from_hf

torch = pytest.importorskip("torch", reason="torch is the parity reference (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "rgb-32-p8": dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=48, num_labels=5),
    "gray-28-p7": dict(image_size=28, patch_size=7, num_channels=1, hidden_size=24, num_hidden_layers=3,
                       num_attention_heads=3, intermediate_size=40, num_labels=10, layer_norm_eps=1e-6),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_image_classification_logits_match_transformers(name, tmp_path):
  kwargs = CONFIGS[name]
  torch.manual_seed(0)
  reference = transformers.ViTForImageClassification(transformers.ViTConfig(**kwargs)).eval()
  reference.save_pretrained(tmp_path)
  ours, _, fresh = model_from_hf("vit", str(tmp_path), kwargs["num_labels"])
  assert fresh == []
  images = np.random.default_rng(0).normal(size=(2, kwargs["image_size"], kwargs["image_size"],
                                                 kwargs["num_channels"])).astype(np.float32)
  with torch.no_grad():
    expected = reference(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).logits.numpy()  # NHWC -> NCHW
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(images))), expected, atol=1e-4, rtol=1e-4)
