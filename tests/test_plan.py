"""`finetune plan`: compiled from abstract shapes on 8 fake devices; FSDP divides parameter bytes; LoRA costs less."""

from __future__ import annotations

import json

from conftest import run_python

SMALL = ["model.hidden_size=256", "model.intermediate_size=512", "model.num_attention_heads=4",
         "model.num_key_value_heads=2", "model.vocab_size=1024", "data.options.vocab_size=1024"]

CODE = '''
import json
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
  result = run_python(CODE.format(small=repr(SMALL)), {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
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
