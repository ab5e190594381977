"""experiments/lora_vs_full/plot.py: the LoRA vs full fine-tuning vs probe table from a hand-written results.csv."""

from __future__ import annotations

import csv

import pytest

from conftest import REPO, load_script, shared_data
from finetune import cli

CONFIG = str(REPO / "configs" / "minilm_sst2.py")
METRICS = ("--metric", "test/accuracy", "--metric", "trainable_params", "--metric", "optimizer_state_bytes",
           "--metric", "train_examples_per_s")

HEADER = ("point,:task,:variant,seed,stages.lora.peft.rank,status,full/test/accuracy,full/trainable_params,"
          "full/optimizer_state_bytes,full/train_examples_per_s,lora/test/accuracy,lora/trainable_params,"
          "lora/optimizer_state_bytes,lora/train_examples_per_s")
RESULTS = "\n".join([
    HEADER,
    '"task=sst2,variant=full,seed=1",sst2,full,1,,finished,0.86,1000,8000,10.0,,,,',
    '"task=sst2,variant=full,seed=0",sst2,full,0,,finished,0.88,1000,8000,42.0,,,,',
    # A LoRA rank listed after full fine-tuning in the file: the table still orders methods by size.
    '"task=sst2,variant=lora,rank=8,seed=0",sst2,lora,0,8,finished,,,,,0.85,75,600,56.0',
    '"task=sst2,variant=lora,rank=8,seed=1",sst2,lora,1,8,incomplete,,,,,,,,',
    '"task=trec,variant=lora,rank=1,seed=0",trec,lora,0,1,finished,,,,,0.91,11,88,61.5',
]) + "\n"


def test_summarize_averages_accuracy_over_seeds_and_keeps_the_fastest_throughput(tmp_path):
  plot = load_script("experiments/lora_vs_full/plot.py")
  path = tmp_path / "results.csv"
  path.write_text(RESULTS)
  rows = plot.summarize(str(path))
  assert [(r["task"], r["method"], r["n"]) for r in rows] == [
      ("sst2", "LoRA r=8", 1), ("sst2", "full fine-tuning", 2), ("trec", "LoRA r=1", 1)]  # incomplete row left out
  full = rows[1]
  assert full["accuracy"] == pytest.approx((0.87, 0.02 / 2 ** 0.5))  # sample std of two runs: |difference| / sqrt(2)
  # A seed run on a busy machine (10 examples/s, first in the file) does not set the method's speed: the fastest does.
  assert full["examples_per_s"] == 42.0
  assert (full["trainable_params"], full["optimizer_state_bytes"]) == (1000, 8000)
  table = plot.table(str(path)).splitlines()
  assert table[2] == "| sst2 | LoRA r=8 | 0.8500 | 75 | 0.00 MiB | 56.0 | 1 |"
  assert table[3] == "| sst2 | full fine-tuning | 0.8700 ± 0.0141 | 1,000 | 0.01 MiB | 42.0 | 2 |"


@pytest.mark.slow
def test_the_sweep_trains_every_method_end_to_end_and_plot_reads_it(tiny_checkpoint, tmp_path, capsys):
  """configs/minilm_sst2.py's TREC sweep (probe, full, LoRA r = 1/4/8/16, DoRA) through `finetune sweep`, each point
  a real `finetune train` run, on a tiny BERT and every 90th TREC question: then the table and plot read it."""
  trec, data = shared_data("text"), tmp_path / "text"
  data.mkdir()
  for name, every in (("TREC.train.all", 90), ("TREC.test.all", 10)):  # 61 and 50 questions, all 6 classes
    lines = (trec / name).read_bytes().splitlines(keepends=True)[::every]
    (data / name).write_bytes(b"".join(lines))
  workdir = tmp_path / "sweep"
  status = cli.main(["sweep", "--config", f"{CONFIG}:task=trec,steps=2,checkpoint={tiny_checkpoint},data_path={data}",
                     "--workdir", str(workdir), *METRICS])
  assert status == 0, capsys.readouterr()
  with open(workdir / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 7 and {row["status"] for row in rows} == {"finished"}
  summary = {row["method"]: row for row in load_script("experiments/lora_vs_full/plot.py").summarize(
      str(workdir / "results.csv"))}
  params = [summary[m]["trainable_params"] for m in ("linear probe (cached features)", "LoRA r=1", "LoRA r=4",
                                                      "LoRA r=8", "LoRA r=16", "full fine-tuning")]
  assert params == sorted(params) and len(set(params)) == 6, params
  # DoRA = LoRA r=8 plus one magnitude per output feature of the 4 adapted kernels (hidden 16).
  assert summary["DoRA r=8"]["trainable_params"] == summary["LoRA r=8"]["trainable_params"] + 4 * 16
  assert summary["full fine-tuning"]["optimizer_state_bytes"] > 10 * summary["LoRA r=16"]["optimizer_state_bytes"]
  for row in summary.values():  # one seed each, scored on all 50 test questions: right answers / 50
    correct = row["accuracy"][0] * 50
    assert 0 <= round(correct) <= 50 and correct == pytest.approx(round(correct)), row
    assert row["examples_per_s"] > 0 and row["n"] == 1
  plot = load_script("experiments/lora_vs_full/plot.py")
  plot.plot(str(workdir / "results.csv"), str(tmp_path / "lora_vs_full.png"))
  assert (tmp_path / "lora_vs_full.png").stat().st_size > 0
