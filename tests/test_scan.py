"""Scanned layers (config.train.scan_layers): the same training as the unrolled model, for every strategy, on one
device and on a sharded mesh; checkpoints convert between the two layouts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_config
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays
from finetune.config import build_config, stage_configs
from finetune.errors import FinetuneError
from finetune.export import export
from finetune.partition import flatten
from test_multidevice import _losses, run_python_with_args, transformer_config

STEPS = 4
STAGES = ("full", "frozen_n", "discriminative", "lora", "gradual")


def scan_config(kind: str, mesh: dict, scanned: bool, remat: str = ""):
  """The BERT/Llama strategy stages of test_multidevice plus gradual unfreezing, scanned or unrolled."""
  raw = transformer_config(kind, mesh).to_dict()
  raw["stages"]["frozen_n"] = {"freeze": {"first_n": 2}}  # the embeddings and the first layer
  raw["stages"]["gradual"] = {"unfreeze": {"mode": "gradual", "every_steps": 1}, "optimizer": {"lr_factor": 2.0}}
  raw["train"].update(steps=STEPS, scan_layers=scanned, remat=remat)
  return build_config(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{(kind, scanned): workdir} on one device; the scanned runs also rematerialise each layer."""
  root = tmp_path_factory.mktemp("scan")
  result = {}
  for kind in ("bert", "llama"):
    for scanned in (False, True):
      workdir = root / f"{kind}-{scanned}"
      train_lib.train_and_evaluate(scan_config(kind, {"data": 1}, scanned, "block" if scanned else ""), str(workdir))
      result[kind, scanned] = workdir
  return result


def _assert_same_run(ours, reference, what):
  np.testing.assert_allclose(_losses(ours), _losses(reference), rtol=1e-5, atol=1e-6, err_msg=what)
  mine = read_checkpoint_arrays(f"{ours}/checkpoints/{STEPS}")["params"]
  theirs = read_checkpoint_arrays(f"{reference}/checkpoints/{STEPS}")["params"]
  assert set(mine) == set(theirs), what
  for path, value in theirs.items():
    np.testing.assert_allclose(mine[path], value, rtol=1e-5, atol=1e-5, err_msg=f"{what} {path}")


def test_scanned_llama_with_frozen_first_layer_trains_like_unrolled(tmp_path):
  """The fast suite's scan check (the slow tests below cover every strategy, BERT and a sharded mesh): Llama with
  its embeddings and first layer frozen, scanned and rematerialised vs unrolled, equal losses and parameters. A
  clipping norm small enough to bind: the frozen layer's share of a stacked gradient must not count in it. The
  Llama options of Qwen2, Qwen3, Ministral and Gemma 2 on (biases, query/key norms, a window shorter than the rows
  in the first layer only, norms offset by one and after each sub-layer, scaled embeddings, GeGLU, soft-capping,
  Gemma 3's rotary base per layer kind): their parameters stack and each layer's mask and rotary tables are
  sliced inside the scan."""
  for scanned in (False, True):
    raw = scan_config("llama", {"data": 1}, scanned, "block" if scanned else "").to_dict()
    raw["model"].update(qkv_bias=True, qk_norm=True, sliding_window=6, norm_unit_offset=True, scale_embeddings=True,
                        hidden_act="gelu_pytorch_tanh", layer_types=("sliding_attention", "full_attention"),
                        sandwich_norms=True, query_pre_attn_scalar=12.0, attn_logit_softcapping=1.0,
                        final_logit_softcapping=5.0, rope_local_theta=100.0, rope_type="llama3",
                        rope_factor=2.0, rope_original_max_position_embeddings=8)
    raw["stages"] = {"frozen_n": {**raw["stages"]["frozen_n"], "optimizer": {"grad_clip_norm": 1e-3}}}
    train_lib.train_and_evaluate(build_config(raw), str(tmp_path / str(scanned)))
  _assert_same_run(tmp_path / "True" / "frozen_n", tmp_path / "False" / "frozen_n", "llama frozen_n")


@pytest.mark.parametrize("kept", [r"^blocks/\d+/mlp_in/", r"norm/"])
def test_a_float32_parameter_inside_scanned_bfloat16_blocks_trains_like_unrolled(kept, tmp_path):
  """(It promotes the residual stream to float32, which a scan's carry refused: a TypeError when the step traced.)
  The same losses as unrolled to bfloat16's precision, over 12 steps that move them by about 0.3 (the zero-initialised
  head leaves the first two at ln 10 whatever the blocks compute). The scan enters in the dtype a block returns
  (float32 here), so its first block reads a float32 stream where the unrolled first block reads bfloat16: not the
  same program, and the losses were 0.004 apart at most (jax 0.10.2)."""
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 3, "num_heads": 2, "mlp_dim": 32}
  losses = {}
  for scanned in (False, True):
    config = tiny_config(model=vit, optimizer={"learning_rate": 1e-2},
                         train={"steps": 12, "log_every": 1, "checkpoint_every": 0, "scan_layers": scanned,
                                "compute_dtype": "bfloat16", "float32_params": (kept,)})
    train_lib.train_and_evaluate(config, str(tmp_path / str(scanned)))
    losses[scanned] = _losses(tmp_path / str(scanned))
  assert losses[False][0] - losses[False][-1] > 0.2  # training moved them far beyond the tolerance below
  np.testing.assert_allclose(losses[True], losses[False], rtol=0, atol=0.01)


def test_no_decay_naming_a_layer_applies_to_that_layer_when_scanned():
  """config.optimizer.no_decay is written for layer paths ('layers/1/...'); under scan_layers the optimizer sees
  segments ('layers/0-1/...'), which must split where decay changes. One AdamW update with zero gradients leaves
  only the decay: layer 0 shrinks, layer 1 does not, scanned as unrolled."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  after = {}
  for scanned in (False, True):
    raw = scan_config("llama", {"data": 1}, scanned).to_dict()
    raw["optimizer"].update(weight_decay=0.5, learning_rate=1.0, schedule="constant", warmup_steps=0,
                            no_decay=(r"^layers/1/",))
    stage = train_lib.build_stage(build_config({k: v for k, v in raw.items() if k != "stages"}))
    tx, _ = stage.optimizer(0)
    params = stage.layout.opt_view(jax.tree.map(jnp.ones_like, stage.abstract_params))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = stage.layout.view(stage.layout.opt_unview(optax.apply_updates(params, updates)))
    after[scanned] = {p: float(v.reshape(-1)[0]) for p, v in flatten(new).items()}
  assert after[True] == after[False]
  assert after[True]["layers/0/self_attn/q_proj/kernel"] == 0.5 and after[True]["layers/1/self_attn/q_proj/kernel"] == 1


def test_lwf_on_scanned_layers_trains_like_unrolled(tmp_path):
  """LwF embeds the batch with its anchored weights, which are kept unrolled; on scanned layers they are stacked
  again before the model reads them (before, the step stopped on a missing parameter path)."""
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
  train = {"steps": STEPS, "log_every": 1, "checkpoint_every": 0}
  train_lib.train_and_evaluate(tiny_config(model=vit, data={"classes": (0, 1, 2, 3, 4)}, train=train),
                               str(tmp_path / "pretrain"))
  for scanned in (False, True):  # both from the one source run (Adam would amplify float-level differences in it)
    config = tiny_config(model=vit, data={"classes": (5, 6, 7, 8, 9)}, init_from=str(tmp_path / "pretrain"),
                         dont_load=("^head/",), regularize={"lwf": {"weight": 1.0}},
                         train={**train, "scan_layers": scanned})
    train_lib.train_and_evaluate(config, str(tmp_path / str(scanned)))
  np.testing.assert_allclose(_losses(tmp_path / "True"), _losses(tmp_path / "False"), rtol=1e-5)
  scanned, unrolled = (read_checkpoint_arrays(str(tmp_path / name / "checkpoints" / str(STEPS)))["params"]
                       for name in ("True", "False"))
  for path, value in unrolled.items():  # (the key biases, which get no gradient, differ by Adam-amplified noise)
    np.testing.assert_allclose(scanned[path], value, atol=1e-4, err_msg=path)


# The `runs` fixture trains 20 small stages (two models x scanned/unrolled x five strategies): the tests that read
# it are slow.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_scanned_layers_train_like_unrolled_for_every_strategy(kind, runs):
  """Full FT, frozen first layer, per-layer learning rates, LoRA and gradual unfreezing: equal losses and
  parameters, the same partition table, and optimizer state only for what trains (as unrolled)."""
  for stage in STAGES:
    scanned, unrolled = runs[kind, True] / stage, runs[kind, False] / stage
    _assert_same_run(scanned, unrolled, f"{kind} {stage}")
    assert (scanned / "partition.tsv").read_text() == (unrolled / "partition.tsv").read_text()
    ours, reference = (json.loads((d / "summary.json").read_text()) for d in (scanned, unrolled))
    assert ours["optimizer_state_bytes"] == reference["optimizer_state_bytes"], stage
    assert ours["trainable_params"] == reference["trainable_params"]
  # The stored parameters really are stacked, with the layer axis first.
  stored = flatten(train_lib.build_stage(scan_config(kind, {"data": 1}, True)).abstract_params)
  name = "layers/attention/query/kernel" if kind == "bert" else "layers/self_attn/q_proj/kernel"
  assert stored[name].shape == (2, 16, 16)
  assert not any(path.startswith("layers/0/") for path in stored)
  # The optimizer sees one segment per run of identically treated layers: the whole stack for full fine-tuning
  # and LoRA (its update does not grow with depth), one per layer where rates or phases differ per layer.
  stage_cfgs = dict(stage_configs(scan_config(kind, {"data": 1}, True)))
  expected = {"full": ((0, 2),), "lora": ((0, 2),), "frozen_n": ((0, 1), (1, 2)), "discriminative": ((0, 1), (1, 2)),
              "gradual": ((0, 1), (1, 2))}
  for stage_name, bounds in expected.items():
    assert train_lib.build_stage(stage_cfgs[stage_name]).layout.segments == (("layers", bounds),), stage_name
  # The frozen first layer stays bit-identical inside the stacked arrays; the second one trains.
  stage_cfg = stage_cfgs["frozen_n"]
  stage = train_lib.build_stage(stage_cfg)
  before = flatten(stage.layout.view(train_lib.initial_state(stage, stage_cfg, "")[0].params))
  after = read_checkpoint_arrays(f"{runs[kind, True]}/frozen_n/checkpoints/{STEPS}")["params"]
  first_layer = [p for p in after if p.startswith("layers/0/")]
  assert first_layer and all(np.array_equal(np.asarray(before[p]), after[p]) for p in first_layer)
  assert not any(np.array_equal(np.asarray(before[p]), after[p]) for p in after if p.startswith("layers/1/"))


SHARDED_RUN = '''
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "tests")
from finetune import train as train_lib
from finetune.sharding import describe
from test_scan import scan_config
from finetune.config import build_config, stage_configs
workdir = sys.argv[1]
mesh = {"data": 2, "fsdp": 2, "tensor": 2}
shardings = {}
for kind in ("bert", "llama"):
  config = scan_config(kind, mesh, True)
  shardings.update(describe(train_lib.build_stage(config).params_sharding))
  train_lib.train_and_evaluate(config, f"{workdir}/{kind}")
# The residual stream between blocks split over 'tensor' instead of replicated: a layout choice, same numbers.
config = scan_config("llama", mesh, True).to_dict()
config["stages"] = {"full": {}}
config["activation_rules"] = [["activation_embed", "tensor"]]
config = build_config(config)
stage = train_lib.build_stage(dict(stage_configs(config))["full"])
activations = stage.abstract_model.activation_sharding  # what run_blocks applies between blocks
x = jax.ShapeDtypeStruct((8, 16, 16), jnp.float32)
lowered = jax.jit(activations.constrain).lower(x)
constraint = {"spec": str(lowered.compile().output_shardings.spec),
              "constraint_in_program": "sharding_constraint" in lowered.as_text() or "@Sharding" in lowered.as_text()}
train_lib.train_and_evaluate(config, f"{workdir}/embed_on_tensor")
print(json.dumps(constraint))
print(json.dumps(shardings))
'''


@pytest.mark.slow
def test_scanned_layers_on_a_sharded_mesh_match_one_unrolled_device(runs, tmp_path):
  """data=2 x fsdp=2 x tensor=2 on 8 fake devices: stacked parameters shard along their logical axes (the layer
  axis replicated), and every strategy trains as the unrolled model on one device."""
  result = run_python_with_args(SHARDED_RUN, [str(tmp_path)])
  assert result.returncode == 0, result.stderr[-3000:]
  shardings = json.loads(result.stdout.strip().splitlines()[-1])
  assert shardings["layers/self_attn/q_proj/kernel"] == "P(None, 'fsdp', 'tensor')"
  assert shardings["layers/intermediate/kernel"] == "P(None, 'fsdp', 'tensor')"
  for kind in ("bert", "llama"):
    for stage in STAGES:
      _assert_same_run(tmp_path / kind / stage, runs[kind, False] / stage, f"{kind} {stage} on 8 devices")
  # config.activation_rules moves the block-boundary activations onto the tensor axis; the result is unchanged.
  assert json.loads(result.stdout.strip().splitlines()[-2]) == {
      "spec": "P(('data', 'fsdp'), None, 'tensor')", "constraint_in_program": True}
  _assert_same_run(tmp_path / "embed_on_tensor" / "full", runs["llama", False] / "full", "activations on tensor")


# The stage that hung when its programs came from the persistent compilation cache (finetune/host_devices.py): the
# scanned Llama with its residual stream split over 'tensor', started as `finetune train` starts (cache, then jit).
CACHED_RUN = '''
import sys
sys.path.insert(0, "tests")
from finetune import compile_cache, train as train_lib
from finetune.config import build_config
from test_scan import scan_config
print("cache", compile_cache.enable())
config = scan_config("llama", {"data": 2, "fsdp": 2, "tensor": 2}, True).to_dict()
config["stages"] = {"full": {}}
config["activation_rules"] = [["activation_embed", "tensor"]]
train_lib.train_and_evaluate(build_config(config), sys.argv[1])
'''


@pytest.mark.slow
def test_a_sharded_cpu_run_never_loads_programs_from_the_compilation_cache(tmp_path):
  """Run twice with a cache folder: before, the second run loaded every program and hung in its first train steps
  (9 of 9 tries); now the cache stays off on several CPU devices and nothing is stored."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-import
  from conftest import REPO, fake_devices_env  # pylint: disable=g-import-not-at-top
  cache = tmp_path / "cache"
  env = {**fake_devices_env(8), "JAX_COMPILATION_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO / "tests"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  env.pop("JAX_ENABLE_COMPILATION_CACHE")  # what a user's shell has: only the library keeps the cache off
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("seconds=300", "seconds=60")  # the hang aborted within a minute
  for attempt in range(2):
    result = subprocess.run([sys.executable, "-c", CACHED_RUN, str(tmp_path / str(attempt))], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"run {attempt}: {result.stderr[-3000:]}"
    assert "cache None" in result.stdout
  assert not cache.exists() or not os.listdir(cache)


@pytest.mark.slow
def test_checkpoints_convert_between_scanned_and_unrolled(runs, tmp_path):
  """A scanned run's checkpoint initialises an unrolled model and vice versa; exports are the same files."""
  scanned_run, unrolled_run = runs["bert", True] / "full", runs["bert", False] / "full"
  for source, scanned in ((scanned_run, False), (unrolled_run, True)):
    raw = scan_config("bert", {"data": 1}, scanned).to_dict()
    del raw["stages"]
    config = build_config({**raw, "init_from": str(source)})
    stage = train_lib.build_stage(config)
    state, report = train_lib.initial_state(stage, config, str(tmp_path))
    assert report["loaded"] == len(flatten(stage.view_params))
    loaded = flatten(stage.layout.view(state.params))
    for path, value in read_checkpoint_arrays(f"{source}/checkpoints/{STEPS}")["params"].items():
      np.testing.assert_array_equal(np.asarray(loaded[path]), value, err_msg=path)
  for run in (scanned_run, unrolled_run):
    export(str(run), str(tmp_path / run.parent.name), "hf")
  ours, reference = (load_file(str(tmp_path / run.parent.name / "model.safetensors"))
                     for run in (scanned_run, unrolled_run))
  assert set(ours) == set(reference)
  for name, value in reference.items():
    np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_scanned_checkpoints_away_from_their_layout_file(tmp_path):
  """(A copied step folder of a scanned run failed with advice to add its layers to dont_load; an early-stopping
  best/<step> folder could not be loaded at all; and the layout.json of a scanned attempt that failed before its
  first checkpoint made the unscanned run finished in the same workdir unreadable.)"""
  raw = scan_config("bert", {"data": 1}, True).to_dict()
  del raw["stages"]
  # Early stopping keeps its best state in best/<step>: a source like any checkpoint.
  train = {**raw["train"], "eval_every": 2}
  train["early_stopping"] = {**train["early_stopping"], "metric": "test/loss", "mode": "min", "patience": 5}
  train_lib.train_and_evaluate(build_config({**raw, "train": train}), str(tmp_path / "stopped"))
  config = build_config({**raw, "init_from": str(tmp_path / "stopped" / "best")})
  stage = train_lib.build_stage(config)
  assert train_lib.initial_state(stage, config, str(tmp_path / "b"))[1]["loaded"] == len(flatten(stage.view_params))
  # A step folder copied away from checkpoints/layout.json.
  shutil.copytree(tmp_path / "stopped" / "checkpoints" / str(STEPS), tmp_path / "copied" / str(STEPS))
  copied = build_config({**raw, "init_from": str(tmp_path / "copied" / str(STEPS))})
  with pytest.raises(FinetuneError, match=r"holds scanned \(stacked\) layers.*copy the layout.json"):
    train_lib.initial_state(train_lib.build_stage(copied), copied, str(tmp_path / "a"))
  # A scanned attempt that failed before any checkpoint, then the unscanned run in the same workdir.
  with pytest.raises(FinetuneError, match="does not exist"):
    train_lib.train_and_evaluate(build_config({**raw, "init_from": str(tmp_path / "nope")}), str(tmp_path / "w"))
  unscanned = {**raw, "train": {**raw["train"], "scan_layers": False}}
  train_lib.train_and_evaluate(build_config(unscanned), str(tmp_path / "w"))
  assert json.loads((tmp_path / "w" / "checkpoints" / "layout.json").read_text())["stacks"] == []
  export(str(tmp_path / "w"), str(tmp_path / "w_export"), "hf")


def test_scanning_needs_identical_blocks():
  with pytest.raises(FinetuneError, match="has no stack of identical blocks to scan"):
    train_lib.build_stage(tiny_config(train={"scan_layers": True}))
  raw = scan_config("llama", {"data": 1}, True).to_dict()
  del raw["stages"]
  raw["peft"] = {"method": "lora", "targets": ["q_proj"], "rank": 2, "rank_pattern": [[r"^layers/0/", 4]]}
  with pytest.raises(FinetuneError, match="block 1 differs in structure from block 0"):
    train_lib.build_stage(build_config(raw))
