"""Every benchmark script runs at its smallest size and prints its table (figures are not asserted: speed targets
are the benchmarks' to print, not the tests'). Two broke unnoticed once: a config check refused their data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

CASES = {
    "bert_throughput.py --steps 1 --no-torch": ["full fine-tuning", "frozen backbone", "LoRA r=8 query/value"],
    "peft_memory.py --layers 1 --length 16 --batch 1": ["full fine-tuning", "LoRA r=8 q,v", "QLoRA r=16 all linear"],
    "scan_compile.py --depths 2 --width 32": ["full       2", "lora       2"],
    "strategies.py --steps 2": ["linear probe", "cached features"],
    "vmap_sweep.py --points 2 --step-only": ["2 points together"],
    "xla_sharded_chain.py": ["(fsdp, tensor) x 3, 8 x 8", "alternating, 8 x 8"],
}


@pytest.mark.parametrize("command", list(CASES))
def test_benchmark_runs_and_prints_its_rows(command):
  script, *args = command.split()
  result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  for row in CASES[command]:
    assert row in result.stdout, (row, result.stdout)
