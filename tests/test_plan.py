"""`finetune plan`: compiled from abstract shapes on 8 fake devices; FSDP divides parameter bytes; LoRA costs less."""

from __future__ import annotations

import json

import pytest

from conftest import fake_devices_env, run_python

SMALL = ["model.hidden_size=256", "model.intermediate_size=512", "model.num_attention_heads=4",
         "model.num_key_value_heads=2", "model.vocab_size=1024", "data.options.vocab_size=1024"]

CODE = '''
import json

import pytest
from finetune import cli
from finetune.config import load_config
from finetune.plan import plan
small = {small}
full = plan(load_config("configs/llama_plan.py:layers=2,length=64", small + ["mesh.data=1", "mesh.fsdp=8"]))
lora = plan(load_config("configs/llama_plan.py:layers=2,length=64,peft=lora", small + ["mesh.data=1", "mesh.fsdp=8"]))
one = plan(load_config("configs/llama_plan.py:layers=2,length=64", small + ["mesh.data=1", "mesh.fsdp=1",
                                                                             "mesh.tensor=-1"]))
print(json.dumps([full["train"], lora["train"], one["train"]]))
assert cli.main(["plan", "--config", "configs/llama_plan.py:layers=2,length=64,peft=lora", "--mesh", "data=2,fsdp=4",
                 *["--config." + o for o in small]]) == 0
'''


def test_plan_reports_sharded_bytes_and_lora_savings():
  result = run_python(CODE.format(small=repr(SMALL)), fake_devices_env(8))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  full, lora, tensor = json.loads(lines[0])
  assert full["devices"] == 8 and full["mesh"]["fsdp"] == 8
  total_bytes = 4 * full["params"]
  # FSDP: every weight matrix is split 8 ways; only the small norm scales stay replicated.
  assert total_bytes / 8 <= full["param_bytes_per_device"] < 1.02 * total_bytes / 8
  assert full["optimizer_bytes_per_device"] >= 2 * total_bytes / 8  # Adam's two moments, sharded the same way
  assert lora["trainable"] < 0.1 * lora["params"]  # r=16 on every projection of a 256-wide model: 7%
  # Adam moments of the adapters only (B factors, whose output axis is a tensor-parallel axis, stay replicated
  # under pure FSDP: at most the unsharded moments), far below the full model's.
  assert lora["optimizer_bytes_per_device"] <= 2 * 4 * lora["trainable"] + 64
  assert lora["optimizer_bytes_per_device"] < 0.5 * full["optimizer_bytes_per_device"]
  assert lora["argument_bytes"] + lora["temporary_bytes"] < full["argument_bytes"] + full["temporary_bytes"]
  assert full["flops_per_step"] > lora["flops_per_step"] > 0  # no weight gradients for the frozen base
  assert tensor["mesh"]["tensor"] == 8 and tensor["param_bytes_per_device"] < 0.6 * total_bytes
  header = next(l for l in lines if l.startswith("stage"))
  assert "params/dev GiB" in header and any(l.startswith("train  data=2,fsdp=4") for l in lines)


def test_plan_takes_the_peak_over_unfreezing_phases_and_runs_cached_probes_as_train_does():
  """Gradual unfreezing: phase 0 trains the head only, the last phase everything, and the plan reports the last
  phase's optimizer state and FLOPs. A cached-feature probe compiles the head on features, as `finetune train`
  runs it, not the backbone."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune.plan import plan_stage, table  # pylint: disable=g-import-not-at-top
  gradual = plan_stage(tiny_config(unfreeze={"mode": "gradual", "every_steps": 3}))
  phases = gradual["phases"]
  assert len(phases) > 2 and phases[0]["trainable"] < phases[-1]["trainable"] == gradual["params"]
  assert gradual["trainable"] == gradual["params"] and gradual["trainable_percent"] == 100.0
  for key in ("optimizer_bytes_per_device", "temporary_bytes", "flops_per_step"):
    assert gradual[key] == max(p[key] for p in phases) > phases[0][key]
  assert "(peak of" in table({"train": gradual})
  probe = {"freeze": {"patterns": ("^(?!head/)",)}}
  uncached = plan_stage(tiny_config(**probe))
  cached = plan_stage(tiny_config(**probe, features={"cache": True}))
  assert cached["trainable"] == uncached["trainable"]
  # A 16 -> 10 head on 32 rows: ~2 x 32 x 16 x 10 FLOPs forward, a few times that with the backward pass.
  assert 0 < cached["flops_per_step"] < 10 * 2 * 32 * 16 * 10 < uncached["flops_per_step"]


def test_plan_of_a_regularised_stage_holds_its_anchors():
  """EWC keeps the earlier task's weights and Fisher information (2 copies of the parameters) as step arguments,
  L2-SP its weights (1 copy); planned before that earlier task has run."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune.config import stage_configs  # pylint: disable=g-import-not-at-top
  from finetune.plan import plan_stage  # pylint: disable=g-import-not-at-top
  after = {"init_from": "stage:pretrain"}
  config = tiny_config(stages={"pretrain": {}, "plain": after,
                               "ewc": {**after, "regularize": {"ewc": {"weight": 10.0}}},
                               "l2sp": {**after, "regularize": {"l2sp": {"alpha": 0.1}}}})
  plans = {name: plan_stage(stage_cfg) for name, stage_cfg in stage_configs(config)}
  assert plans["ewc"]["regularizers"] == ["ewc"] and plans["plain"]["regularizers"] == []
  param_bytes = 4 * plans["plain"]["params"]  # float32 parameters (the BatchNorm statistics are not anchored)
  for name, copies in (("ewc", 2), ("l2sp", 1)):
    extra = plans[name]["argument_bytes"] - plans["plain"]["argument_bytes"]
    assert copies * param_bytes <= extra < copies * param_bytes + 64, name  # + a few scalars (weights, alpha)


def test_plan_gives_offline_ewc_one_anchor_per_earlier_task_of_the_stage_chain():
  """(Plan assumed one earlier task: offline EWC after two stages keeps two (weights, Fisher) terms, online EWC one,
  so plan undercounted the offline stage's arguments by two copies of the parameters.)"""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune.plan import plan  # pylint: disable=g-import-not-at-top
  ewc = {"weight": 10.0}
  config = tiny_config(stages={"first": {}, "second": {"init_from": "stage:first"},
                               "plain": {"init_from": "stage:second"},
                               "offline": {"init_from": "stage:second", "regularize": {"ewc": ewc}},
                               "online": {"init_from": "stage:second",
                                          "regularize": {"ewc": {**ewc, "online": True}}},
                               "after_first": {"init_from": "stage:first", "regularize": {"ewc": ewc}}})
  plans = plan(config)
  param_bytes = 4 * plans["plain"]["params"]
  for name, copies in (("offline", 4), ("online", 2), ("after_first", 2)):
    extra = plans[name]["argument_bytes"] - plans["plain"]["argument_bytes"]
    assert copies * param_bytes <= extra < copies * param_bytes + 64, (name, extra / param_bytes)


def test_plan_follows_the_stage_chain_to_a_run_or_a_hugging_face_checkpoint(tmp_path):
  """L2-SP after a Hugging Face checkpoint is planned; EWC there is refused as `finetune train` refuses it."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune.config import stage_configs  # pylint: disable=g-import-not-at-top
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  from finetune.plan import _lineage, plan_stage  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text("{}")
  (hf_dir / "model.safetensors").write_bytes(b"")
  for root, expected in ((str(hf_dir), (True, False)), (str(tmp_path / "an_earlier_run"), (True, True)), ("", (True,))):
    config = tiny_config(stages={"first": {"init_from": root}, "second": {"init_from": "stage:first"}})
    stages = dict(stage_configs(config))
    assert _lineage(stages["second"], stages) == expected, root
    assert _lineage(stages["first"], stages) == expected[1:], root
  after_hf = dict(stage_configs(tiny_config(init_from=str(hf_dir), regularize={"l2sp": {"alpha": 0.1}})))["train"]
  assert plan_stage(after_hf, (False,))["regularizers"] == ["l2sp"]
  after_hf.unlock()
  after_hf.regularize.ewc.weight, after_hf.regularize.l2sp.alpha = 1.0, 0.0
  with pytest.raises(FinetuneError, match="EWC needs the earlier task's data"):
    plan_stage(after_hf, (False,))


def test_plan_of_a_rehearsal_stage_is_the_program_the_run_compiles(tmp_path):
  """(Plan compiled the rehearsal stage's step without the batch's source_mask: another program than the run's.)"""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  from finetune.config import stage_configs  # pylint: disable=g-import-not-at-top
  from finetune.plan import plan  # pylint: disable=g-import-not-at-top
  config = tiny_config(train={"steps": 2}, stages={"pretrain": {}, "rehearsal": {
      "init_from": "stage:pretrain", "rehearsal": {"fraction": 0.25}}})
  planned = plan(config)["rehearsal"]
  (_, pretrain_cfg), (_, rehearsal_cfg) = stage_configs(config)
  train_lib.run_stage(pretrain_cfg, str(tmp_path / "pretrain"), str(tmp_path), "pretrain")
  opened = train_lib.open_stage(rehearsal_cfg, str(tmp_path / "rehearsal"), str(tmp_path), "rehearsal")
  try:
    memory = opened.stage.train_step(0).memory_analysis()
  finally:
    opened.close()
  assert planned["argument_bytes"] == memory.argument_size_in_bytes


def test_plan_follows_the_chain_into_runs_that_exist(tmp_path):
  """(A link out of the config was planned as one task: offline EWC after a run that itself came from an earlier
  stage keeps two (weights, Fisher) terms, as `finetune train` finds through that run's config.json.)"""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  from finetune.plan import plan  # pylint: disable=g-import-not-at-top
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2}, stages={
      "first": {}, "second": {"init_from": "stage:first"}}), str(tmp_path / "earlier"))
  after = {"init_from": str(tmp_path / "earlier" / "second")}
  plans = plan(tiny_config(stages={"plain": after, "offline": {**after, "regularize": {"ewc": {"weight": 10.0}}}}))
  param_bytes = 4 * plans["plain"]["params"]
  extra = plans["offline"]["argument_bytes"] - plans["plain"]["argument_bytes"]
  assert 4 * param_bytes <= extra < 4 * param_bytes + 64, extra / param_bytes


def test_flops_count_every_layer_and_micro_batch_and_say_when_a_loop_remains():
  """XLA's cost analysis counts a loop's body once: scanned layers reported one block's FLOPs (7x low at 8 layers)
  and gradient accumulation one micro-batch's. The plan counts the same step without those loops; a loop it cannot
  remove (the LSTM's recurrence over time) makes the figure a lower bound, shown as '>='."""
  from finetune.config import build_config, load_config  # pylint: disable=g-import-not-at-top
  from finetune.plan import plan, table  # pylint: disable=g-import-not-at-top
  small = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=4",
           "model.num_key_value_heads=2", "model.vocab_size=256", "data.options.vocab_size=256"]
  flops = {}
  for name, extra in (("plain", []), ("scan", ["train.scan_layers=True"]), ("accum", ["train.grad_accum_steps=4"])):
    result = plan(load_config("configs/llama_plan.py:layers=4,length=32", small + extra))["train"]
    flops[name] = result["flops_per_step"]
    assert not result["flops_lower_bound"], name
  assert flops["scan"] == pytest.approx(flops["plain"], rel=0.02)
  assert flops["accum"] == pytest.approx(flops["plain"], rel=0.02)
  lstm = build_config({"model": dict(name="lstm", vocab_size=64, embed_size=8, hidden_size=16, num_layers=1),
                       "data": dict(name="synthetic", batch_size=4, eval_batch_size=4,
                                    options=dict(length=6, vocab_size=64, num_examples=8)),
                       "train": dict(steps=1)})
  plans = plan(lstm)
  assert plans["train"]["flops_lower_bound"] and ">=" in table(plans).splitlines()[-1]


def test_only_a_loop_of_matrix_products_makes_the_flops_a_lower_bound():
  """(Dropout's random bits come from a loop too: every figure of a model with dropout was marked '>=' though all
  its matrix products were counted.)"""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from finetune.plan import _loop_with_matmuls  # pylint: disable=g-import-not-at-top

  def dropped(x, w, key):
    return (x @ w) * jax.random.bernoulli(key, 0.5, x.shape)

  def recurrent(x, w, key):
    return dropped(jax.lax.fori_loop(0, 5, lambda i, h: jnp.tanh(h @ w), x), w, key)

  args = (jnp.ones((4, 8)), jnp.ones((8, 8)), jax.random.key(0))
  texts = {f.__name__: jax.jit(f).lower(*args).compile().as_text() for f in (dropped, recurrent)}
  assert " while(" in texts["dropped"]  # (the generator's loop, which holds no product)
  assert not _loop_with_matmuls(texts["dropped"]) and _loop_with_matmuls(texts["recurrent"])
