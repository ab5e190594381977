"""Mesh construction, logical-name -> PartitionSpec rules, and parameter shardings of a real model.

Multi-device checks run in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax starts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P
from ml_collections import ConfigDict

from conftest import fake_devices_env
from finetune.errors import FinetuneError
from finetune.sharding import (BATCH_AXES, DEFAULT_RULES, logical_to_spec, make_mesh, rules_from_config)

RULES = dict(DEFAULT_RULES)

_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json
    import jax
    from flax import nnx
    from ml_collections import ConfigDict
    from finetune.errors import FinetuneError
    from finetune.models import build_model
    from finetune.sharding import (batch_sharding, data_parallel_size, describe, make_mesh, rules_from_config,
                                   state_shardings)

    out = {"devices": len(jax.devices())}

    def mesh_or_error(cfg):
      try:
        mesh = make_mesh(ConfigDict(cfg))
      except Exception as e:  # The test checks the type name.
        return {"error": type(e).__name__, "message": str(e)}
      return {"shape": dict(mesh.shape), "names": list(mesh.axis_names)}

    out["default"] = mesh_or_error({"data": -1, "fsdp": 1, "tensor": 1})
    out["fill_fsdp"] = mesh_or_error({"data": 2, "fsdp": -1})
    out["fill_tensor"] = mesh_or_error({"data": 2, "fsdp": 2, "tensor": -1})
    out["exact"] = mesh_or_error({"data": 1, "fsdp": 8})
    out["not_dividing"] = mesh_or_error({"data": 3, "fsdp": -1})
    out["wrong_total"] = mesh_or_error({"data": 2, "fsdp": 2})
    out["negative"] = mesh_or_error({"data": -2, "fsdp": -4})

    rules = rules_from_config(())
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 8, "tensor": 1}))
    out["data_parallel_size"] = data_parallel_size(mesh)
    out["batch_spec"] = str(batch_sharding(mesh).spec)

    def shardings(model_cfg):
      abstract = nnx.eval_shape(lambda: build_model(ConfigDict(model_cfg), 10, nnx.Rngs(0)))
      _, params, rest = nnx.split(abstract, nnx.Param, ...)
      return describe(state_shardings(params, mesh, rules)), describe(state_shardings(rest, mesh, rules))

    out["cnn_params"], out["cnn_rest"] = shardings({"name": "cnn"})
    out["cnn_odd_params"], _ = shardings({"name": "cnn", "stem_width": 12})
    out["vit_params"], _ = shardings({"name": "vit"})
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def multi() -> dict:
  env = dict(fake_devices_env(8), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  result = json.loads(line[len("RESULT"):])
  assert result["devices"] == 8
  return result


def _one_device():
  return jax.devices()[:1]


# ------------------------------------------------------------------------------------------------------- mesh


def test_make_mesh_single_device_default_is_all_data():
  mesh = make_mesh(ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}), _one_device())
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_make_mesh_axis_order_follows_mesh_axes_not_config_order():
  mesh = make_mesh(ConfigDict({"tensor": 1, "data": -1}), _one_device())
  assert mesh.axis_names == ("data", "tensor")


def test_make_mesh_too_many_devices_requested():
  with pytest.raises(FinetuneError, match=r"needs 2 devices but 1 are available; set one axis to -1 or change the "
                                          r"sizes \(e.g. --config.mesh.data=-1, which makes it 1; a run may "
                                          r"resume, and be evaluated or exported, on another mesh\)"):
    make_mesh(ConfigDict({"data": 2, "fsdp": 1}), _one_device())


def test_make_mesh_two_fill_axes():
  with pytest.raises(FinetuneError, match=r"config.mesh.data and config.mesh.fsdp are all -1.*data is -1 by default.*"
                                          r"config.mesh.data=1"):
    make_mesh(ConfigDict({"data": -1, "fsdp": -1}), _one_device())


def test_make_mesh_zero_axis_with_fill():
  with pytest.raises(FinetuneError, match=r"config.mesh.fsdp=0: a mesh axis size must be -1 .* or >= 1"):
    make_mesh(ConfigDict({"data": -1, "fsdp": 0}), _one_device())


def test_make_mesh_default_puts_all_devices_on_data(multi):
  assert multi["default"] == {"shape": {"data": 8, "fsdp": 1, "tensor": 1}, "names": ["data", "fsdp", "tensor"]}


def test_make_mesh_fill_axis(multi):
  assert multi["fill_fsdp"]["shape"] == {"data": 2, "fsdp": 4}
  assert multi["fill_tensor"]["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert multi["exact"]["shape"] == {"data": 1, "fsdp": 8}


def test_make_mesh_bad_sizes(multi):
  assert multi["not_dividing"]["error"] == "FinetuneError"
  assert "does not divide 8 devices" in multi["not_dividing"]["message"]
  assert multi["wrong_total"]["error"] == "FinetuneError"
  assert "needs 4 devices but 8 are available" in multi["wrong_total"]["message"]
  # (It suggested --config.mesh.fsdp=1 whatever the sizes, even where fsdp was 1 already.)
  assert "e.g. --config.mesh.data=-1, which makes it 4;" in multi["wrong_total"]["message"]


def test_make_mesh_negative_sizes(multi):
  assert multi["negative"].get("error") == "FinetuneError"
  assert "a mesh axis size must be -1 (all remaining devices) or >= 1" in multi["negative"]["message"]


# ------------------------------------------------------------------------------------------------------ rules


def test_rules_from_config_overrides_by_name():
  rules = rules_from_config((("embed", None), ("classes", "tensor"), ("mlp", ["data", "fsdp"])))
  assert rules["embed"] is None
  assert rules["classes"] == "tensor"
  assert rules["mlp"] == ("data", "fsdp")
  assert rules["conv_out"] == "fsdp"  # Untouched defaults stay.
  assert rules["batch"] == BATCH_AXES


def test_sharding_rules_must_name_axes_the_model_has(monkeypatch):
  """A misspelt logical name (or a rule for the batch) would otherwise be accepted and change nothing."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  cnn = {"name": "cnn", "widths": (8,), "stem_width": 8}
  assert train_lib.build_stage(tiny_config(model=cnn, sharding_rules=(("conv_out", None),)))
  for rules, message in [((("conv_ot", None),), r"names logical axis 'conv_ot', which no parameter of this model "
                                                 r"has; its parameters' axes: classes, conv_in, conv_out"),
                         ((("batch", "data"),), r"cannot place the batch: batches are always split over the "
                                                r"data-parallel mesh axes \(data, fsdp\)"),
                         # (an activation axis was "no parameter has it", not where it goes)
                         ((("activation_embed", "tensor"),), r"names 'activation_embed', an activation axis: place "
                                                             r"it in config.activation_rules")]:
    with pytest.raises(FinetuneError, match=message):
      train_lib.build_stage(tiny_config(model=cnn, sharding_rules=rules))
  # The stacked axis of scanned layers stays whole (a rule for it failed inside jax once a layer-dependent strategy
  # cut the stack into segments smaller than the mesh axis).
  with pytest.raises(FinetuneError, match=r"config.sharding_rules cannot split 'layers', the stacked axis of scanned "
                                          r"layers"):
    train_lib.build_stage(tiny_config(model={"name": "vit", "depth": 2, "width": 16, "num_heads": 2,
                                             "mlp_dim": 16, "patch_size": 4},
                                      train={"steps": 1, "scan_layers": True}, sharding_rules=(("layers", None),)))
  # Every process feeds its own slice of the batch: the data-parallel axes must split over the processes.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(FinetuneError, match=r"has 1 data-parallel devices \(data x fsdp\) for 2 processes"):
    train_lib.build_stage(tiny_config(model=cnn))


def test_rules_from_config_errors():
  with pytest.raises(FinetuneError, match=r"unknown mesh axis 'model'"):
    rules_from_config((("embed", "model"),))
  with pytest.raises(FinetuneError, match=r"must be \(logical_name, mesh_axis_or_axes_or_None\)"):
    rules_from_config((("embed",),))


MESH = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("logical,shape,expected", [
    (("embed", "mlp"), (16, 32), P("fsdp", "tensor")),
    (("mlp", "embed"), (32, 16), P("tensor", "fsdp")),
    (("embed", "kv_heads"), (16, 8), P("fsdp", "tensor")),  # (Llama's k/v projections were replicated)
    ((None, None, "conv_in", "conv_out"), (3, 3, 8, 64), P(None, None, None, "fsdp")),
    (("batch", None), (16, 5), P(("data", "fsdp"), None)),
    (("classes",), (10,), P(None)),  # No rule for 'classes': replicated.
    (("norm",), (64,), P(None)),
    ((None, "position", "embed"), (1, 17, 64), P(None, None, "fsdp")),
])
def test_logical_to_spec_default_rules(logical, shape, expected):
  assert logical_to_spec(logical, shape, MESH, RULES) == expected


def test_logical_to_spec_replicates_indivisible_axis():
  assert logical_to_spec(("embed", "mlp"), (10, 32), MESH, RULES) == P(None, "tensor")  # 10 % 4
  assert logical_to_spec(("embed", "mlp"), (16, 7), MESH, RULES) == P("fsdp", None)  # 7 % 2
  assert logical_to_spec(("batch",), (12,), MESH, RULES) == P(None)  # 12 % (2*4)


def test_logical_to_spec_replicates_axis_whose_mesh_axis_is_used():
  assert logical_to_spec(("embed", "embed"), (16, 16), MESH, RULES) == P("fsdp", None)
  assert logical_to_spec(("conv_out", "embed"), (16, 16), MESH, RULES) == P("fsdp", None)
  # An earlier indivisible dimension does not use the axis, so a later one may take it.
  assert logical_to_spec(("embed", "embed"), (6, 16), MESH, RULES) == P(None, "fsdp")


def test_logical_to_spec_ignores_mesh_axes_not_in_mesh_and_size_one_axes():
  no_tensor = AbstractMesh((2, 4), ("data", "fsdp"))
  assert logical_to_spec(("embed", "mlp"), (16, 32), no_tensor, RULES) == P("fsdp", None)
  fsdp_one = AbstractMesh((8, 1), ("data", "fsdp"))
  assert logical_to_spec(("embed", "mlp"), (16, 32), fsdp_one, RULES) == P(None, None)
  # Size-one axes that divide are kept: the spec is equivalent to P('data').
  assert logical_to_spec(("batch",), (16,), fsdp_one, RULES) == P(("data", "fsdp"))


def test_logical_to_spec_with_overridden_rules():
  rules = rules_from_config((("embed", None), ("classes", "tensor")))
  assert logical_to_spec(("embed", "classes"), (16, 10), MESH, rules) == P(None, "tensor")


# ------------------------------------------------------------------------------------------- model shardings


def test_batch_sharding_and_data_parallel_size(multi):
  assert multi["data_parallel_size"] == 8
  assert multi["batch_spec"] == str(P(("data", "fsdp")))


def test_cnn_conv_kernels_are_fsdp_sharded(multi):
  params = multi["cnn_params"]
  conv_kernels = [p for p in params if p.endswith("conv/kernel")]
  assert sorted(conv_kernels) == ["stages/0/blocks/0/conv/kernel", "stages/1/blocks/0/conv/kernel",
                                  "stem/conv/kernel"]
  for path in conv_kernels:
    assert params[path] == str(P(None, None, None, "fsdp")), path
  assert params["stem/norm/scale"] == str(P("fsdp"))
  assert params["head/kernel"] == str(P("fsdp", None))  # 64 input channels divide 8.


def test_cnn_small_head_and_batch_stats_are_replicated(multi):
  assert multi["cnn_params"]["head/bias"] == str(P(None))  # 10 classes: no rule, replicated.
  rest = multi["cnn_rest"]
  assert sorted(rest) == ["stages/0/blocks/0/norm/mean", "stages/0/blocks/0/norm/var",
                          "stages/1/blocks/0/norm/mean", "stages/1/blocks/0/norm/var",
                          "stem/norm/mean", "stem/norm/var"]
  assert set(rest.values()) == {str(P(None))}


def test_cnn_indivisible_width_is_replicated(multi):
  params = multi["cnn_odd_params"]
  assert params["stem/conv/kernel"] == str(P(None, None, None, None))  # 12 channels % 8.
  assert params["stages/0/blocks/0/conv/kernel"] == str(P(None, None, None, "fsdp"))  # 12 -> 32 channels.


def test_vit_shardings(multi):
  params = multi["vit_params"]
  assert params["blocks/0/mlp_in/kernel"] == str(P("fsdp", None))  # No tensor axis on this mesh.
  assert params["blocks/0/attention/out/kernel"] == str(P(None, "fsdp"))
  assert params["cls_token"] == str(P(None, None, "fsdp"))
  assert params["position_embedding"] == str(P(None, None, "fsdp"))
  assert params["head/kernel"] == str(P("fsdp", None))
  assert params["norm/scale"] == str(P(None))
