"""One device vs 8 fake CPU devices on the data axis and on the fsdp axis: same loss and parameters (1e-5)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import tiny_config
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays

STEPS = 6
# The same tiny CNN run, as code for a fresh interpreter that sees 8 CPU devices.
RUN = '''
import json, sys
import jax
from conftest import tiny_config
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays
from finetune.sharding import describe
assert jax.device_count() == 8, jax.devices()
mesh = json.loads(sys.argv[1]); workdir = sys.argv[2]
config = tiny_config(mesh=mesh, train={{"steps": {steps}, "log_every": 1, "checkpoint_every": 0}},
                     data={{"batch_size": 32, "eval_batch_size": 64}})
stage = train_lib.build_stage(config)
print(json.dumps(describe(stage.params_sharding)))
train_lib.train_and_evaluate(config, workdir)
'''.format(steps=STEPS)


def _losses(workdir):
  return [json.loads(line)["loss"] for line in open(f"{workdir}/metrics.jsonl") if '"train"' in line]


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  assert jax.device_count() == 1
  workdir = tmp_path_factory.mktemp("one_device")
  config = tiny_config(train={"steps": STEPS, "log_every": 1, "checkpoint_every": 0},
                       data={"batch_size": 32, "eval_batch_size": 64})
  train_lib.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.mark.parametrize("mesh", [{"data": 8, "fsdp": 1}, {"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 4}])
def test_eight_fake_devices_match_one_device(mesh, single_device_run, tmp_path):
  result = run_python_with_args(RUN, [json.dumps(mesh), str(tmp_path)])
  assert result.returncode == 0, result.stderr[-3000:]
  shardings = json.loads(result.stdout.strip().splitlines()[0])
  if mesh["fsdp"] > 1:  # parameters really are split over fsdp (kernels with channels divisible by it)
    assert shardings["stages/1/blocks/0/conv/kernel"] == "P(None, None, None, 'fsdp')"
    assert shardings["head/kernel"] == "P('fsdp', None)" and shardings["head/bias"] == "P(None,)"  # 10 classes
  else:
    assert all(set(spec[2:-1].replace(",", " ").split()) <= {"None"} for spec in shardings.values()), shardings
  np.testing.assert_allclose(_losses(tmp_path), _losses(single_device_run), rtol=1e-5, atol=1e-6)
  ours = read_checkpoint_arrays(f"{tmp_path}/checkpoints/{STEPS}")
  reference = read_checkpoint_arrays(f"{single_device_run}/checkpoints/{STEPS}")
  for collection in ("params", "model_state"):
    for path, value in reference[collection].items():
      np.testing.assert_allclose(ours[collection][path], value, rtol=1e-5, atol=1e-5, err_msg=path)


def run_python_with_args(code, args):
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-import
  from conftest import REPO, fake_devices_env  # pylint: disable=g-import-not-at-top
  env = {**fake_devices_env(8),
         "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
  # The timeout only guards against a hang: a slow machine may take several minutes for the larger meshes.
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=1200)


PEFT_RUN = '''
import json, sys
import jax
from conftest import tiny_config
from finetune import train as train_lib
from finetune.sharding import describe
mesh = json.loads(sys.argv[1]); workdir = sys.argv[2]; peft = json.loads(sys.argv[3])
config = tiny_config(mesh=mesh, model={vit}, peft=peft,
                     train={{"steps": {steps}, "log_every": 1, "checkpoint_every": 0}},
                     data={{"batch_size": 32, "eval_batch_size": 64}})
stage = train_lib.build_stage(config)
print(json.dumps({{**describe(stage.params_sharding), **describe(stage.model_state_sharding)}}))
train_lib.train_and_evaluate(config, workdir)
'''
VIT = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
PEFTS = {
    "dora": {"method": "lora", "targets": ["query", "value", "mlp_in"], "rank": 2, "dora": True, "dropout": 0.1,
             "modules_to_save": ["^head/"]},
    "qlora": {"method": "lora", "targets": ["query", "mlp_in"], "rank": 2, "quantize": "nf4", "quant_block_size": 8,
              "modules_to_save": ["^head/"]},
}


@pytest.mark.parametrize("name,mesh", [("dora", {"data": 2, "fsdp": 4}), ("qlora", {"data": 1, "fsdp": 8})])
def test_lora_on_a_sharded_model_matches_one_device(name, mesh, tmp_path):
  """Adapters are created sharded along their base kernel's axes, and the run equals the one-device run."""
  config = tiny_config(model=VIT, peft=PEFTS[name], train={"steps": STEPS, "log_every": 1, "checkpoint_every": 0},
                       data={"batch_size": 32, "eval_batch_size": 64})
  train_lib.train_and_evaluate(config, str(tmp_path / "one"))
  code = PEFT_RUN.format(vit=repr(VIT), steps=STEPS)
  result = run_python_with_args(code, [json.dumps(mesh), str(tmp_path / "eight"), json.dumps(PEFTS[name])])
  assert result.returncode == 0, result.stderr[-3000:]
  shardings = json.loads(result.stdout.strip().splitlines()[0])
  assert shardings["blocks/0/attention/query/lora_a"] == "P('fsdp', None)"
  if name == "qlora":
    assert shardings["blocks/0/attention/query/kernel_codes"] == "P('fsdp', None)"
  np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
  ours = read_checkpoint_arrays(f"{tmp_path}/eight/checkpoints/{STEPS}")
  reference = read_checkpoint_arrays(f"{tmp_path}/one/checkpoints/{STEPS}")
  for collection in ("params", "model_state"):
    for path, value in reference[collection].items():
      np.testing.assert_allclose(ours[collection][path], value, rtol=1e-5, atol=1e-5, err_msg=path)


RESUME = '''
import json, shutil, sys, os
import jax
from conftest import tiny_config
from finetune import train as train_lib
mesh = json.loads(sys.argv[1]); workdir = sys.argv[2]
assert jax.device_count() == int(sys.argv[3]), jax.devices()
config = tiny_config(mesh=mesh, train={{"steps": {steps}, "log_every": 1, "checkpoint_every": 3,
                                       "keep_checkpoints": 3}}, data={{"batch_size": 32,
                                                                      "eval_batch_size": int(sys.argv[4])}})
summary = train_lib.train_and_evaluate(config, workdir)["train"]
print(json.dumps(summary["init"]))
'''.format(steps=STEPS)


def test_checkpoint_restores_onto_another_mesh(single_device_run, tmp_path):
  """Written on 8 devices (data=8), resumed on 4 (fsdp=4): orbax reshards; the run equals one device's. The
  evaluation batch may change with the devices (a batch that splits over 1 device need not over 8)."""
  import os, shutil, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-import
  from conftest import REPO, fake_devices_env  # pylint: disable=g-import-not-at-top

  def run(devices, mesh, eval_batch_size):
    env = {**fake_devices_env(devices),
           "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", RESUME, json.dumps(mesh), str(tmp_path), str(devices),
                           str(eval_batch_size)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

  first = run(8, {"data": 8, "fsdp": 1}, 64)
  assert first.returncode == 0, first.stderr[-3000:]
  shutil.rmtree(tmp_path / "checkpoints" / str(STEPS))  # as if stopped after step 3
  (tmp_path / "summary.json").unlink()
  second = run(4, {"data": 1, "fsdp": 4}, 20)
  assert second.returncode == 0, second.stderr[-3000:]
  assert json.loads(second.stdout.strip().splitlines()[-1])["resumed_from_step"] == 3
  ours = read_checkpoint_arrays(f"{tmp_path}/checkpoints/{STEPS}")
  reference = read_checkpoint_arrays(f"{single_device_run}/checkpoints/{STEPS}")
  for collection in ("params", "model_state"):
    for path, value in reference[collection].items():
      np.testing.assert_allclose(ours[collection][path], value, rtol=1e-5, atol=1e-5, err_msg=path)


EVAL_RUN = '''
import json, sys
from finetune.evaluation import evaluate_run
print(json.dumps(evaluate_run(sys.argv[1], overrides=["mesh.data=2", "mesh.fsdp=4", "data.eval_batch_size=40"])))
'''


def test_finetune_eval_scores_a_one_device_run_on_eight_devices_as_it_ended(single_device_run):
  """`finetune eval` reads the checkpoint per layer onto another mesh (data 2 x fsdp 4) and another evaluation batch
  (40 splits over 8 devices; 64 need not on every mesh): the scores equal the run's own final evaluation."""
  result = run_python_with_args(EVAL_RUN, [str(single_device_run)])
  assert result.returncode == 0, result.stderr[-3000:]
  scores = json.loads(result.stdout.strip().splitlines()[-1])
  final = json.loads((single_device_run / "summary.json").read_text())["final"]
  assert scores.keys() == final.keys() == {"validation"}
  assert scores["validation"]["accuracy"] == final["validation"]["accuracy"]
  assert scores["validation"]["loss"] == pytest.approx(final["validation"]["loss"], rel=1e-5)


def test_finetune_eval_on_eight_devices_of_a_run_whose_training_batch_does_not_split_over_them(tmp_path):
  """(A batch of 36 in 2 micro-batches trained on one device; evaluating it on 8 was refused because that training
  batch does not split over them, though nothing trains.)"""
  config = tiny_config(train={"steps": 2, "log_every": 1, "checkpoint_every": 0, "grad_accum_steps": 2},
                       data={"batch_size": 36, "eval_batch_size": 64})
  train_lib.train_and_evaluate(config, str(tmp_path))
  result = run_python_with_args(EVAL_RUN, [str(tmp_path)])
  assert result.returncode == 0, result.stderr[-3000:]
  scores = json.loads(result.stdout.strip().splitlines()[-1])
  final = json.loads((tmp_path / "summary.json").read_text())["final"]
  assert scores["validation"]["accuracy"] == final["validation"]["accuracy"]


TRANSFORMERS = {
    "bert": dict(task="classification", model={"name": "bert", "vocab_size": 64, "hidden_size": 16, "num_layers": 2,
                                               "num_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32,
                                               "dropout": 0.0}),
    "llama": dict(task="causal_lm", model={"name": "llama", "vocab_size": 64, "hidden_size": 16,
                                           "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                           "num_key_value_heads": 2}),
}
STRATEGIES = {
    "full": {},
    "frozen_n": {"freeze": {"first_n": 1}},
    "discriminative": {"optimizer": {"lr_factor": 2.0}},
    "lora": {"peft": {"method": "lora", "targets": ["query", "value", "q_proj", "v_proj"], "rank": 2,
                      "modules_to_save": ["^head/", "^lm_head/"]}},
}
MESH_RUN = '''
import json, sys
from finetune import train as train_lib
from finetune.config import build_config
sys.path.insert(0, "tests")
from test_multidevice import transformer_config
mesh = json.loads(sys.argv[1]); workdir = sys.argv[2]
for kind in ("bert", "llama"):
  train_lib.train_and_evaluate(transformer_config(kind, mesh), f"{workdir}/{kind}")
'''


def transformer_config(kind, mesh):
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  spec = TRANSFORMERS[kind]
  stages = {}
  for name, overrides in STRATEGIES.items():
    overrides = json.loads(json.dumps(overrides))
    if "peft" in overrides:  # each model has its own projection names
      names = ("query", "value") if kind == "bert" else ("q_proj", "v_proj")
      overrides["peft"]["targets"] = list(names)
      overrides["peft"]["modules_to_save"] = ["^head/"] if kind == "bert" else []
    stages[name] = overrides
  return build_config({
      "task": spec["task"], "model": spec["model"], "mesh": mesh, "stages": stages,
      "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "validation_fraction": 0.0,
               "eval_splits": ("test",), "options": {"kind": "tokens", "length": 16, "vocab_size": 64,
                                                       "num_classes": 3, "num_examples": 32}},
      "train": {"steps": 3, "log_every": 1, "checkpoint_every": 0},
  })


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["fsdp8", "data2-fsdp2-tensor2"])
def test_transformers_with_every_strategy_match_across_meshes(mesh, tmp_path):
  """BERT- and Llama-shaped models with full fine-tuning, frozen-n, discriminative rates and LoRA: the same losses
  and parameters on 1 device and on 8. (One test per mesh so that xdist spreads them; the one-device reference
  runs again in each, mostly from the compilation cache. Pure data parallelism, where every parameter is
  replicated, is left to test_eight_fake_devices_match_one_device: 75 s of CI saved.)"""
  for kind in ("bert", "llama"):
    train_lib.train_and_evaluate(transformer_config(kind, {"data": 1}), str(tmp_path / "one" / kind))
  result = run_python_with_args(MESH_RUN, [json.dumps(mesh), str(tmp_path / "eight")])
  assert result.returncode == 0, result.stderr[-3000:]
  for kind in ("bert", "llama"):
    for stage in STRATEGIES:
      ours, reference = tmp_path / "eight" / kind / stage, tmp_path / "one" / kind / stage
      np.testing.assert_allclose(_losses(ours), _losses(reference), rtol=1e-5, atol=1e-6, err_msg=f"{mesh} {stage}")
      mine = read_checkpoint_arrays(f"{ours}/checkpoints/3")["params"]
      for path, value in read_checkpoint_arrays(f"{reference}/checkpoints/3")["params"].items():
        np.testing.assert_allclose(mine[path], value, rtol=1e-5, atol=1e-5, err_msg=f"{mesh} {kind} {stage} {path}")


# Every model of the zoo, tiny, on synthetic inputs of its kind: (task, model, data options).
_TOKENS = {"kind": "tokens", "length": 16, "vocab_size": 64, "num_classes": 3, "num_examples": 32}
_IMAGES = {"kind": "images", "image_shape": (8, 8, 1), "num_classes": 4, "num_examples": 32}
ZOO = {
    "mlp": ("classification", {"name": "mlp", "input_size": 64, "hidden": (32, 32), "dropout": 0.0}, _IMAGES),
    # (Weights all sharded (fsdp, tensor) in a chain of three matmuls got wrong gradients from XLA at these sizes:
    # the MLP's layers alternate their axes, the LSTM shards its recurrent kernel over tensor only.)
    "mlp_narrow": ("classification", {"name": "mlp", "input_size": 64, "hidden": (8, 8, 8), "dropout": 0.0},
                   _IMAGES),
    "lstm": ("causal_lm", {"name": "lstm", "vocab_size": 64, "embed_size": 8, "hidden_size": 12, "num_layers": 2,
                           "output": "lm", "drop_mult": 0.0}, _TOKENS),
    "cnn": ("classification", {"name": "cnn", "in_channels": 1, "stem_width": 8, "widths": (8, 16)}, _IMAGES),
    "vit": ("classification", {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2,
                               "num_heads": 2, "mlp_dim": 32}, _IMAGES),
    "bert": ("classification", TRANSFORMERS["bert"]["model"], _TOKENS),
    "gpt2": ("causal_lm", {"name": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 16, "n_layer": 2,
                           "n_head": 2, "dropout": 0.0}, _TOKENS),
    "llama": ("causal_lm", TRANSFORMERS["llama"]["model"], _TOKENS),
}


def zoo_config(name, mesh):
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  task, model, options = ZOO[name]
  return build_config({
      "task": task, "model": model, "mesh": mesh,
      "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "validation_fraction": 0.0,
               "eval_splits": ("test",), "options": options},
      "train": {"steps": 3, "log_every": 1, "checkpoint_every": 0},
  })


ZOO_RUN = '''
import json, sys
sys.path.insert(0, "tests")
from finetune import train as train_lib
from finetune.sharding import describe
from test_multidevice import ZOO, zoo_config
workdir = sys.argv[1]
specs = {}
for name in ZOO:
  config = zoo_config(name, {"data": 2, "fsdp": 2, "tensor": 2})
  specs[name] = describe(train_lib.build_stage(config).params_sharding)
  train_lib.train_and_evaluate(config, f"{workdir}/{name}")
print(json.dumps(specs))
'''


@pytest.mark.slow
def test_every_model_of_the_zoo_shards_and_matches_one_device(tmp_path):
  """MLP, CNN, ViT, BERT, GPT-2, Llama and the LSTM on data=2 x fsdp=2 x tensor=2: parameters split over fsdp (and
  tensor where a model has hidden/head axes), and 3 steps give the one-device losses and parameters."""
  for name in ZOO:
    train_lib.train_and_evaluate(zoo_config(name, {"data": 1}), str(tmp_path / "one" / name))
  result = run_python_with_args(ZOO_RUN, [str(tmp_path / "eight")])
  assert result.returncode == 0, result.stderr[-3000:]
  specs = json.loads(result.stdout.strip().splitlines()[-1])
  for name in ZOO:
    axes = " ".join(specs[name].values())
    assert "'fsdp'" in axes, (name, specs[name])
    if name in ("vit", "bert", "gpt2", "llama", "mlp_narrow", "lstm"):
      assert "'tensor'" in axes, (name, specs[name])
    ours, reference = tmp_path / "eight" / name, tmp_path / "one" / name
    np.testing.assert_allclose(_losses(ours), _losses(reference), rtol=1e-5, atol=1e-6, err_msg=name)
    mine = read_checkpoint_arrays(f"{ours}/checkpoints/3")["params"]
    for path, value in read_checkpoint_arrays(f"{reference}/checkpoints/3")["params"].items():
      np.testing.assert_allclose(mine[path], value, rtol=1e-5, atol=1e-5, err_msg=f"{name} {path}")


# (EWC's Fisher from 64 examples in batches of 50: the second batch partial, each padded to 56 rows for 8 devices.)
FORGETTING_TARGET = dict(model={"name": "mlp", "input_size": 64, "hidden": (16,)}, data={"classes": (5, 6, 7, 8, 9)},
                         dont_load=("^head/",), regularize={"ewc": {"weight": 10.0, "num_examples": 64}},
                         train={"steps": 4, "log_every": 2, "checkpoint_every": 0})
FORGETTING_RUN = f'''
import json, sys
import jax
from conftest import tiny_config
from finetune import train as train_lib
assert jax.device_count() == 8, jax.devices()  # (the default mesh would take any count)
config = tiny_config(init_from=sys.argv[1], **{FORGETTING_TARGET!r})
print(json.dumps(train_lib.train_and_evaluate(config, sys.argv[2])["train"]["forgetting"]))
'''


def test_an_earlier_task_trained_on_one_device_is_evaluated_and_its_fisher_taken_on_eight(tmp_path):
  """(The source's Fisher and its forgetting evaluation rebuilt the source's own batch size, 30, on the stage's 8
  devices: the stage failed after training, and every re-run the same way.)"""
  source = tmp_path / "source"
  train_lib.train_and_evaluate(tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)},
                                           data={"classes": (0, 1, 2, 3, 4), "batch_size": 30, "eval_batch_size": 30},
                                           train={"steps": 6, "log_every": 3, "checkpoint_every": 0}), str(source))
  result = run_python_with_args(FORGETTING_RUN, [str(source), str(tmp_path / "target")])
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])[str(source)]["validation"]
  source_validation = json.loads((source / "summary.json").read_text())["final"]["validation"]
  before = source_validation["accuracy"]
  assert report["before"] == before
  # EWC's Fisher, computed on 8 devices with the examples split over them (it ran on one device, whole model and
  # all), equals one device's.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  fisher_file, = (path for path in source.iterdir()
                  if path.name.startswith("fisher-") and path.suffix == ".safetensors")
  eight = load_file(fisher_file)
  fisher_file.unlink()
  one_device = train_lib.train_and_evaluate(tiny_config(init_from=str(source), **FORGETTING_TARGET),
                                            str(tmp_path / "one"))["train"]["forgetting"][str(source)]["validation"]
  # The source task scored after training on 8 devices as after training on one (float sums in another order:
  # the same to within two examples).
  assert report["after"] == pytest.approx(one_device["after"], abs=2 / source_validation["num_examples"] + 1e-9)
  one = load_file(fisher_file)
  assert sorted(one) == sorted(eight)
  for path in one:
    np.testing.assert_allclose(eight[path], one[path], rtol=1e-5, atol=1e-10, err_msg=path)



GPT2_TENSOR_RUN = """
import re
from finetune import train as train_lib
from finetune.config import build_config
from test_multidevice import zoo_config
config = zoo_config("gpt2", {"data": 2, "tensor": 4}).to_dict()
config["model"] = {**config["model"], "n_embd": 32, "n_head": 4}  # c_attn: 96 outputs, 24 (one head's q, k, v) a device
stage = train_lib.build_stage(build_config(config))
for name, program in (("eval", stage.eval_step()), ("train", stage.train_step(0))):
  print(name, " ".join(re.findall(r"= (\\S+) all-gather\\(", program.as_text())) or "-")
"""


def test_gpt2_attention_under_tensor_parallelism_gathers_no_query_key_value_activations():
  """GPT-2's c_attn stores its outputs head by head, so a tensor shard of them holds whole heads: attention runs on
  the shard. (In transformers' [q | k | v] order XLA gathered the (batch, length, 3 * n_embd) activation before
  attention in every layer, forward and backward.)"""
  result = run_python_with_args(GPT2_TENSOR_RUN, [])
  assert result.returncode == 0, result.stderr[-3000:]
  gathered = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines()[-2:])
  for name in ("eval", "train"):
    shapes = [shape.split("{")[0] for shape in gathered[name].split()]  # ('f32[4,16,96]{1,0,2}': its layout cut)
    qkv = [shape for shape in shapes if shape.endswith(",96]") or shape.endswith(",3,4,8]")]
    assert not qkv, (name, gathered[name])
