"""The ULMFiT ablation table and the low-data plot (the paper's Figure 3) from a sweep's results.csv
(`finetune sweep --config configs/ulmfit.py ... --metric test/accuracy`).

    python experiments/ulmfit/plot.py /tmp/ulmfit_sweep/results.csv /tmp/ulmfit_sweep/figure3.png \
      [--all-examples 5452] [--title "ULMFiT ablation on TREC-6 (small scale)"]

Classifier stages are named `<variant>_<n>` (n labelled examples, `all` for the whole training split), so both sweep
layouts of configs/ulmfit.py read the same: one point per seed with every stage (`:share=True`), or one point per
variant x label count x seed (`:share=False`, the other stages' cells empty). Test error = 1 - test accuracy, in
percent, mean ± sample std over the finished rows (seeds).
"""

from __future__ import annotations

import argparse
import collections
import math
import re

from finetune import reporting
from finetune.sweep import mean_std, read_results

VARIANTS = ("scratch", "full", "discr", "stlr", "ulmfit")
LABELS = {"scratch": "from scratch", "full": "full", "discr": "full + discr", "stlr": "full + discr + stlr",
          "ulmfit": "ULMFiT (+ gradual unfreezing)"}
_COLUMN = re.compile(r"^(?P<variant>[a-z]+)_(?P<labels>\d+|all)/test/accuracy$")
ALL = 0  # the label count of `<variant>_all` stages


def summarize(csv_path: str) -> dict[str, list[tuple[int, tuple[float, float], int]]]:
  """{variant: [(labelled examples (0 = all), (test error % mean, std), n), ...] sorted by count, all last}, from the
  finished rows of an ulmfit sweep's results.csv."""
  rows = read_results(csv_path)
  errors = collections.defaultdict(list)  # (variant, labels) -> [error %, one per row]
  for row in rows:
    for column, value in row.items():
      match = _COLUMN.match(column or "")
      if match and match["variant"] in VARIANTS and value not in ("", None):
        labels = ALL if match["labels"] == "all" else int(match["labels"])
        errors[match["variant"], labels].append(100.0 * (1.0 - float(value)))
  if not errors:
    raise ValueError(f"{csv_path} has no <variant>_<n>/test/accuracy columns; sweep with --metric test/accuracy")
  result = {}
  for variant in VARIANTS:
    counts = sorted((n for v, n in errors if v == variant), key=lambda n: math.inf if n == ALL else n)
    if counts:
      result[variant] = [(n, mean_std(errors[variant, n]), len(errors[variant, n])) for n in counts]
  return result


def table(csv_path: str) -> str:
  """A markdown table in the paper's layout: a row per variant, a column per label count, test error (%)."""
  summary = summarize(csv_path)
  counts = sorted({n for points in summary.values() for n, _, _ in points}, key=lambda n: math.inf if n == ALL else n)
  header = [f"{n} labels" if n != ALL else "all labels" for n in counts]
  lines = ["| variant | " + " | ".join(header) + " |", "|---|" + "---|" * len(counts)]
  for variant, points in summary.items():
    cells = {n: (f"{mean:.2f} ± {std:.2f} (n={k})" if k > 1 else f"{mean:.2f}") for n, (mean, std), k in points}
    lines.append(f"| {LABELS[variant]} | " + " | ".join(cells.get(n, "-") for n in counts) + " |")
  return "\n".join(lines)


def figure3(csv_path: str, png_path: str | None = None, title: str = "", all_examples: int | None = None):
  """Test error (%) against the number of labelled training examples (log scale), one curve per variant, as the
  paper's Figure 3; saved to `png_path` when given. `all_examples`: where to put the `all` point on the x axis
  (default: one step right of the largest count, labelled 'all'). Returns the matplotlib figure."""
  plt = reporting.pyplot(to_file=bool(png_path))
  summary = summarize(csv_path)
  counts = sorted({n for points in summary.values() for n, _, _ in points if n != ALL})
  all_x = all_examples or (counts[-1] * 3 if counts else 1)
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  for variant, points in summary.items():
    xs = [all_x if n == ALL else n for n, _, _ in points]
    ax.errorbar(xs, [m for _, (m, _), _ in points], yerr=[s for _, (_, s), _ in points], marker="o", capsize=2,
                label=LABELS[variant], linestyle="--" if variant == "scratch" else "-")
  ticks = counts + ([all_x] if any(n == ALL for p in summary.values() for n, _, _ in p) else [])
  ax.set_xscale("log")
  ax.set_xticks(ticks)
  ax.set_xticklabels([str(n) for n in counts] + (["all" if not all_examples else f"{all_examples} (all)"]
                                                 if len(ticks) > len(counts) else []))
  ax.minorticks_off()
  ax.set_xlabel("number of labelled training examples")
  ax.set_ylabel("test error (%)")
  ax.set_title(title or "ULMFiT ablation: test error vs. labelled examples")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return reporting.save_figure(fig, png_path)


def main(argv: list[str] | None = None):
  """Prints the table; with a PNG path also draws Figure 3 (the committed figures: `--all-examples` = the task's
  training-set size, 5452 for TREC-6 and 6920 for SST-2, and a `--title` naming the task) and returns it."""
  parser = argparse.ArgumentParser(description="The ULMFiT ablation table and Figure 3 from a sweep's results.csv.")
  parser.add_argument("csv", help="the sweep's results.csv")
  parser.add_argument("png", nargs="?", help="where to write Figure 3 (left out: the table only)")
  parser.add_argument("--all-examples", type=int, default=None,
                      help="the x position and label of the 'all labels' point (the training-set size)")
  parser.add_argument("--title", default="", help="the figure's title")
  args = parser.parse_args(argv)
  if args.all_examples is not None and args.all_examples < 1:
    parser.error(f"--all-examples {args.all_examples}: give the training-set size (a positive count)")
  print(table(args.csv))
  if args.png:
    fig = figure3(args.csv, args.png, title=args.title, all_examples=args.all_examples)
    print(f"wrote {args.png}")
    return fig
  return None


if __name__ == "__main__":
  main()
