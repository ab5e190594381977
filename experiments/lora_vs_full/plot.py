"""LoRA vs full fine-tuning vs linear probe: table and plot from a sweep's results.csv (configs/minilm_sst2.py
`get_sweep`).

    python experiments/lora_vs_full/plot.py experiments/lora_vs_full/results.csv \
        experiments/lora_vs_full/lora_vs_full.png

Each point of that sweep runs one stage, named after its variant (linear_probe, full, lora, dora); LoRA points
differ in `stages.lora.peft.rank`. `summarize` returns one row per (task, method) with the mean and sample std over
seeds of test accuracy, the trainable parameters and optimizer-state bytes, and the training examples/s of the
fastest run: seeds run at different times on a shared machine, and a busy host only ever slows a run down, so the
fastest is the best estimate of the method's own speed (as `timeit` takes the minimum time).
"""

from __future__ import annotations

import collections
import sys

from finetune import reporting
from finetune.sweep import mean_std, number, read_results

STAGES = ("linear_probe", "full", "lora", "dora")
RANK_KEY = "stages.lora.peft.rank"


def _mean_std(values):
  values = [v for v in values if v is not None]
  return mean_std(values) if values else (None, None)


def summarize(csv_path: str) -> list[dict]:
  """[{task, method, accuracy: (mean, std), trainable_params, optimizer_state_bytes, examples_per_s, n}, ...];
  examples_per_s is the fastest run's."""
  rows = read_results(csv_path)
  groups = collections.defaultdict(list)
  for row in rows:
    stage = row[":variant"]
    method = f"LoRA r={int(float(row[RANK_KEY]))}" if stage == "lora" else {
        "linear_probe": "linear probe (cached features)", "full": "full fine-tuning", "dora": "DoRA r=8"}[stage]
    groups[row[":task"], method, stage].append(row)
  result = []
  for (task, method, stage), members in groups.items():
    def column(metric, members=members, stage=stage):
      return [number(r.get(f"{stage}/{metric}")) for r in members]
    result.append({"task": task, "method": method, "accuracy": _mean_std(column("test/accuracy")),
                   "trainable_params": _mean_std(column("trainable_params"))[0],
                   "optimizer_state_bytes": _mean_std(column("optimizer_state_bytes"))[0],
                   "examples_per_s": max((v for v in column("train_examples_per_s") if v is not None),
                                         default=None),
                   "n": len(members)})
  order = {name: i for i, name in enumerate(["linear probe (cached features)", "LoRA r=1", "LoRA r=4", "LoRA r=8",
                                             "LoRA r=16", "DoRA r=8", "full fine-tuning"])}
  return sorted(result, key=lambda r: (r["task"], order.get(r["method"], 99)))


def table(csv_path: str) -> str:
  """The markdown table of `summarize`."""
  lines = ["| task | method | test accuracy | trainable params | optimizer state | train examples/s | n |",
           "|---|---|---|---|---|---|---|"]
  for row in summarize(csv_path):
    mean, std = row["accuracy"]
    accuracy = f"{mean:.4f}" + (f" ± {std:.4f}" if row["n"] > 1 else "")
    state = row["optimizer_state_bytes"]
    speed = row["examples_per_s"]
    lines.append(f"| {row['task']} | {row['method']} | {accuracy} | {row['trainable_params']:,.0f} | "
                 f"{state / 2**20:,.2f} MiB | {'-' if speed is None else f'{speed:,.1f}'} | {row['n']} |")
  return "\n".join(lines)


def plot(csv_path: str, png_path: str | None = None):
  """Test accuracy against trainable parameters (log scale), one panel per task. Returns the figure."""
  plt = reporting.pyplot(to_file=bool(png_path))
  rows = summarize(csv_path)
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for row in (r for r in rows if r["task"] == task):
      mean, std = row["accuracy"]
      ax.errorbar([row["trainable_params"]], [mean], yerr=[std], marker="o", capsize=3, label=row["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MiniLM-L6 on {task.upper()}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return reporting.save_figure(fig, png_path)


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: python experiments/lora_vs_full/plot.py RESULTS_CSV OUTPUT_PNG")
  plot(sys.argv[1], sys.argv[2])
  print(table(sys.argv[1]))
  print(f"wrote {sys.argv[2]}")
