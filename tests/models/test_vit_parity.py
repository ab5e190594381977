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


# google/vit-* processors normalise with 0.5 / 0.5; ImageNet's statistics and a processor that does not rescale
# (it normalises 0..255 pixels directly) are the other layouts found on the Hub.
PROCESSORS = {
    "half": dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    "imagenet": dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "unscaled": dict(do_rescale=False, image_mean=[127.5, 120.0, 110.0], image_std=[60.0, 64.0, 58.0]),
}


@pytest.mark.parametrize("processor", list(PROCESSORS))
def test_pipeline_images_get_the_checkpoint_s_normalisation(processor, tmp_path):
  """uint8 images through our pipeline's scaling and the model equal transformers' image processor + model: a
  pretrained ViT was fed [0, 1] images where it was trained on normalised ones."""
  from finetune.data.pipeline import _prepare  # pylint: disable=g-import-not-at-top
  kwargs = CONFIGS["rgb-32-p8"]
  torch.manual_seed(0)
  reference = transformers.ViTForImageClassification(transformers.ViTConfig(**kwargs)).eval()
  reference.save_pretrained(tmp_path)
  image_processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, **PROCESSORS[processor])
  image_processor.save_pretrained(tmp_path)
  ours, _, _ = model_from_hf("vit", str(tmp_path), kwargs["num_labels"])
  images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3)).astype(np.uint8)
  with torch.no_grad():
    pixel_values = image_processor(list(images), return_tensors="pt")["pixel_values"]
    expected = reference(pixel_values=pixel_values).logits.numpy()
  got = ours(jnp.asarray(_prepare({"image": images})["image"]))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


def test_exported_vit_carries_its_image_processor(tmp_path):
  """Export writes preprocessor_config.json, so transformers' processor + the exported model compute our logits
  from raw pixels (also for a model trained without normalisation)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top

  from finetune.data.pipeline import _prepare  # pylint: disable=g-import-not-at-top
  from finetune.models import build_model, full_model_kwargs, hf  # pylint: disable=g-import-not-at-top
  from finetune.partition import flatten  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(1).integers(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)
  for name, normalisation in (("plain", {}), ("normalised", {"pixel_mean": [0.4, 0.5, 0.6],
                                                             "pixel_std": [0.2, 0.25, 0.3]})):
    model_cfg = ConfigDict({"name": "vit", "image_size": 16, "in_channels": 3, "patch_size": 4, "width": 24,
                            "depth": 1, "num_heads": 3, "mlp_dim": 32, **normalisation})
    model = build_model(model_cfg, 3, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    params["head"]["kernel"] = np.random.default_rng(2).normal(size=(24, 3)).astype(np.float32)  # (zero-initialised)
    nnx.update(model, nnx.State(params))
    out = tmp_path / name
    hf.export_params("vit", {k: np.asarray(v) for k, v in flatten(params).items()}, full_model_kwargs(model_cfg, 3),
                     ["a", "b", "c"], str(out))
    exported = transformers.ViTForImageClassification.from_pretrained(out).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    with torch.no_grad():
      expected = exported(**processor(list(images), return_tensors="pt")).logits.numpy()
    got = model(jnp.asarray(_prepare({"image": images})["image"]))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)
    # ... and importing the export back gives the same normalisation
    assert hf.model_kwargs(str(out))[1].get("pixel_mean", ()) == pytest.approx(normalisation.get("pixel_mean", ()))
