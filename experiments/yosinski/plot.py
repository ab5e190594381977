"""Figure 2 of Yosinski et al. 2014 from a sweep's results.csv (`finetune sweep` over configs/cifar10_yosinski.py).

    python experiments/yosinski/plot.py /tmp/yosinski_sweep/results.csv /tmp/yosinski_sweep/figure2.png [PER_SPLIT.png]

Test accuracy on B (y) against the number n of layer groups copied from a base network (x): baseB at n = 0, then
BnB, BnB+, AnB and AnB+ at each n; one marker per condition and n at the mean over the random class splits (each
split's seeds averaged first; bars: sample standard deviation between splits), each split's mean as a faint dot
(for a split kind with one class split, such as man-made, over its seeds and each seed's value). The man-made vs
natural split is a different experiment from the random 5/5 splits (the paper's Figure 3 vs Figure 2), so each
split kind in the file (the `:split` column) gets its own panel. A third argument also writes the same results
with one panel per class split, whose bars and dots are over that split's seeds only. `figure2` and `summarize` are
meant for notebooks too.

results.csv is written by `finetune.sweep.aggregate`: columns `point`, the swept keys (`:split`, `:split_seed`,
`seed`), `status`, then one `<stage>/<metric>` column per stage and metric, e.g. `AnB_plus_3/test/accuracy`.
"""

from __future__ import annotations

import collections
import re
import sys
from typing import NamedTuple

from finetune import reporting
from finetune.sweep import mean_std, number, read_results

# Conditions in the paper's notation -> (source base, fine-tuned); their stages are `<prefix>_<n>`.
CONDITIONS = {"BnB": "BnB", "BnB+": "BnB_plus", "AnB": "AnB", "AnB+": "AnB_plus"}
# The paper's colours: B-sourced blue, A-sourced red; the fine-tuned (+) variants lighter.
STYLE = {"baseB": dict(color="black", markerfacecolor="white", marker="o"),
         "BnB": dict(color="#1f4e9c", marker="o"), "BnB+": dict(color="#7fa7e0", marker="P"),
         "AnB": dict(color="#b22222", marker="D"), "AnB+": dict(color="#f08080", marker="X")}
SPLIT_COLUMNS = (":split", "split")
SPLIT_SEED_COLUMNS = (":split_seed", "split_seed")


class Stat(NamedTuple):
  """Mean and sample standard deviation (0 for one value) of `values`, one per finished point."""

  mean: float
  std: float
  count: int
  values: tuple[float, ...]

  @classmethod
  def of(cls, values) -> "Stat":
    values = tuple(values)
    return cls(*mean_std(values), len(values), values)


def summarize(csv_path: str, metric: str = "test/accuracy", per_split_seed: bool = False) -> dict[str, dict]:
  """{split kind: {'baseA': Stat, 'baseB': Stat, 'BnB': {n: Stat}, 'BnB+': ..., 'AnB': ..., 'AnB+': ...}} over
  the finished rows of results.csv, per value of its `:split` column ('all' when it has none); with
  `per_split_seed`, per split and `:split_seed` ('random split_seed=0', ..., 'manmade'), so the Stats are over
  seeds only. Without it, a split kind with several class splits (`:split_seed` values) gets Stats over the
  splits' seed means (each split counts once); one with a single split, over its seeds. A stage's value is
  `<stage>/<metric>`; rows where it is empty are left out of that stage's Stat, and conditions or bases with no
  value at all are left out of the result."""
  rows = read_results(csv_path)
  columns = list(rows[0])
  split_column = next((c for c in SPLIT_COLUMNS if c in columns), None)
  split_seed_column = next((c for c in SPLIT_SEED_COLUMNS if c in columns), None) if per_split_seed else None
  suffix = "/" + metric
  pattern = re.compile(r"^(?P<prefix>AnB_plus|BnB_plus|AnB|BnB)_(?P<n>\d+)$")
  stage_columns = {}  # column -> (condition, n) or (base, None)
  for column in columns:
    if not column.endswith(suffix):
      continue
    stage = column[:-len(suffix)]
    if stage in ("baseA", "baseB"):
      stage_columns[column] = (stage, None)
    elif (match := pattern.match(stage)):
      condition = next(k for k, v in CONDITIONS.items() if v == match["prefix"])
      stage_columns[column] = (condition, int(match["n"]))
  if not any(key == "baseB" for key, _ in stage_columns.values()):
    raise ValueError(f"{csv_path} has no baseB/{metric} column; is it the results.csv of a "
                     f"configs/cifar10_yosinski.py sweep (and was --metric {metric} among its metrics)?")
  all_split_seeds_column = next((c for c in SPLIT_SEED_COLUMNS if c in columns), None)
  by_split = collections.defaultdict(lambda: collections.defaultdict(list))  # group -> split seed -> rows
  for row in rows:
    group = row[split_column] if split_column else "all"
    split_seed = (row.get(all_split_seeds_column) or "") if all_split_seeds_column else ""
    if split_seed_column and split_seed:
      group += f" split_seed={split_seed}"
    by_split[group][split_seed].append(row)
  result = {}
  for split, members_by_split_seed in by_split.items():
    # With several class splits in a group, each split counts once (its seeds averaged first), so a split that
    # ran more seeds does not outweigh the others and the spread is between splits.
    values = collections.defaultdict(list)  # (key, n) -> values
    for members in members_by_split_seed.values():
      split_values = collections.defaultdict(list)
      for row in members:
        for column, key in stage_columns.items():
          value = number(row.get(column))
          if value is not None:
            split_values[key].append(value)
      for key, found in split_values.items():
        values[key].extend([sum(found) / len(found)] if len(members_by_split_seed) > 1 else found)
    summary: dict = {}
    for (key, n), found in sorted(values.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
      if n is None:
        summary[key] = Stat.of(found)
      else:
        summary.setdefault(key, {})[n] = Stat.of(found)
    result[split] = summary
  return result


def table(summary: dict[str, dict]) -> str:
  """The summary as text: a block per split kind, a row per condition, a column per n (mean ± std (count))."""
  lines = []
  for split, conditions in summary.items():
    ns = sorted({n for key in CONDITIONS for n in conditions.get(key, {})})
    lines.append(f"split {split}: " + ", ".join(f"{base} {conditions[base].mean:.4f} ± {conditions[base].std:.4f} "
                                                 f"({conditions[base].count})"
                                                 for base in ("baseA", "baseB") if base in conditions))
    lines.append("  " + "n".ljust(6) + "".join(str(n).ljust(24) for n in ns))
    for key in CONDITIONS:
      cells = [conditions.get(key, {}).get(n) for n in ns]
      lines.append("  " + key.ljust(6) + "".join(
          (f"{c.mean:.4f} ± {c.std:.4f} ({c.count})" if c else "-").ljust(24) for c in cells))
  return "\n".join(lines)


def markdown(summary: dict[str, dict]) -> str:
  """The README's table: a block of rows per group (split), a column per n; cells `mean ± std` over the group's
  Stat values (seeds, or a pooled group's class splits; just the mean for one), the bases' in its first cell."""
  def cell(stat: Stat) -> str:
    return f"{stat.mean:.4f}" if stat.count == 1 else f"{stat.mean:.4f} ± {stat.std:.4f}"
  ns = sorted({n for conditions in summary.values() for key in CONDITIONS for n in conditions.get(key, {})})
  lines = ["| split | network | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
  for group, conditions in summary.items():
    bases = ", ".join(f"{base} {cell(conditions[base])}" for base in ("baseA", "baseB") if base in conditions)
    counts = {conditions[base].count for base in ("baseA", "baseB") if base in conditions}
    label = f"{group} ({bases}; runs: {'/'.join(str(c) for c in sorted(counts))})"  # ("n" names the columns)
    for index, key in enumerate(CONDITIONS):
      stats = conditions.get(key, {})
      lines.append(f"| {label if index == 0 else ''} | {key} | " +
                   " | ".join(cell(stats[n]) if n in stats else "-" for n in ns) + " |")
  return "\n".join(lines)


def figure2(csv_path: str, png_path: str | None = None, title: str = "", metric: str = "test/accuracy",
            per_split_seed: bool = False):
  """Draws the Figure 2-style plot (one panel per split kind; with `per_split_seed`, one per class split, whose
  bars and dots are over its seeds only: `summarize`); saves it to `png_path` when given. Returns the matplotlib
  figure."""
  plt = reporting.pyplot(to_file=bool(png_path))
  summary = summarize(csv_path, metric, per_split_seed)
  fig, axes = plt.subplots(1, len(summary), figsize=(6.4 * len(summary), 4.8), squeeze=False)
  offsets = {"baseB": 0.0, "BnB": -0.15, "BnB+": -0.05, "AnB": 0.05, "AnB+": 0.15}  # side by side at each n
  for ax, (split, conditions) in zip(axes[0], summary.items()):
    base = conditions["baseB"]
    ax.axhline(base.mean, color="gray", linestyle="--", linewidth=1)
    ax.errorbar([0], [base.mean], yerr=[base.std], capsize=3, linestyle="none", label="baseB",
                **STYLE["baseB"])
    ax.plot([0] * base.count, base.values, linestyle="none", marker=".", color="black", alpha=0.25)
    for key in CONDITIONS:
      stats = conditions.get(key, {})
      if not stats:
        continue
      ns = sorted(stats)
      xs = [n + offsets[key] for n in ns]
      ax.errorbar(xs, [stats[n].mean for n in ns], yerr=[stats[n].std for n in ns], capsize=3, label=key,
                  **STYLE[key])
      for x, n in zip(xs, ns):
        ax.plot([x] * stats[n].count, stats[n].values, linestyle="none", marker=".", color=STYLE[key]["color"],
                alpha=0.3)
    all_ns = sorted({n for key in CONDITIONS for n in conditions.get(key, {})})
    ax.set_xticks([0, *all_ns])
    ax.set_xlabel("layer groups n copied from the base network (0: baseB)")
    ax.set_ylabel(f"{metric} on B")
    name = {"random": "random 5/5 class splits", "manmade": "man-made (A) vs natural (B)"}.get(
        split, split.replace(" split_seed=", " class split "))
    ax.set_title(f"{title} — {name}" if title else name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
  return reporting.save_figure(fig, png_path)


if __name__ == "__main__":
  if len(sys.argv) not in (3, 4):
    sys.exit(__doc__.splitlines()[2].strip())
  print(markdown(summarize(sys.argv[1], per_split_seed=True)))  # the README's table: each split over seeds
  print(table(summarize(sys.argv[1])))  # the figure's panels: all random splits together
  figure2(sys.argv[1], sys.argv[2])
  print(f"wrote {sys.argv[2]}")
  if len(sys.argv) == 4:  # the same results with one panel per class split, over its seeds
    figure2(sys.argv[1], sys.argv[3], per_split_seed=True)
    print(f"wrote {sys.argv[3]}")
