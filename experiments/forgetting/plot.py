"""The forgetting trade-off plot from a sweep's results.csv (`finetune sweep` over configs/*_forgetting.py).

    python experiments/forgetting/plot.py experiments/forgetting/mnist_results.csv \
        experiments/forgetting/mnist_tradeoff.png [--title "MNIST 0-4 -> 5-9: forgetting trade-off"]

prints the README's table (`table`) and draws the plot (`tradeoff`). One curve per regularizer: target-task test
accuracy (x) against source-task test accuracy after fine-tuning (y), one marker per strength (mean over seeds,
bars: sample std), plain fine-tuning as a single point and the source accuracy before fine-tuning as a dashed
line. The notebook notebooks/forgetting.ipynb calls `summarize`, `table` and `tradeoff` too.
"""

from __future__ import annotations

import argparse
import collections
import fractions

from finetune import reporting
from finetune.sweep import mean_std, read_results

METHODS = {"ewc": ":ewc_weight", "l2sp": ":l2sp_alpha", "lwf": ":lwf_weight", "rehearsal": ":rehearsal_fraction"}
LABELS = {"ewc": "EWC (λ)", "l2sp": "L2-SP (α)", "lwf": "LwF (weight)", "rehearsal": "rehearsal (fraction)"}
TABLE_NAMES = {"ewc": ("EWC", "λ"), "l2sp": ("L2-SP", "α"), "lwf": ("LwF", "w"), "rehearsal": ("rehearsal", "f")}


def summarize(csv_path: str) -> dict:
  """{method: [(strength, (target mean, std), (source mean, std), n), ...]} plus 'finetune' and 'before' entries,
  from the finished rows of a forgetting sweep's results.csv."""
  rows = read_results(csv_path)
  result = {}
  for method, key in METHODS.items():
    by_strength = collections.defaultdict(list)
    for row in rows:
      by_strength[float(row[key])].append(row)
    result[method] = [(strength,
                       mean_std([float(r[f"{method}/test/accuracy"]) for r in members]),
                       mean_std([float(r[f"{method}/forgetting/pretrain/test/after"]) for r in members]),
                       len(members))
                      for strength, members in sorted(by_strength.items())]
  # Plain fine-tuning and the source network do not depend on the strengths: the points of one seed rerun them
  # identically (or share one stage folder), so rows with equal values count once, as one run, and are averaged
  # over runs, not over points. The same seed rerun elsewhere (another host or install: XLA's CPU results are
  # not bit-identical across them) can differ slightly; such a rerun counts as a run of its own.
  runs = list({(row["seed"], row["pretrain/test/accuracy"], row["finetune/test/accuracy"],
                row["finetune/forgetting/pretrain/test/after"]): row for row in rows}.values())
  result["finetune"] = (mean_std([float(r["finetune/test/accuracy"]) for r in runs]),
                        mean_std([float(r["finetune/forgetting/pretrain/test/after"]) for r in runs]),
                        len(runs))
  result["before"] = mean_std([float(r["pretrain/test/accuracy"]) for r in runs])
  return result


def table(summary: dict) -> str:
  """The README's markdown: the source accuracy before and plain fine-tuning's line, then one row per method and
  strength (mean ± sample std over seeds, n = seeds, for plain fine-tuning n = runs; one seed shows its value
  alone, having no spread)."""
  def cell(mean_and_std, n):
    return f"{mean_and_std[0]:.4f}" if n == 1 else f"{mean_and_std[0]:.4f} ± {mean_and_std[1]:.4f}"
  (target, source, n) = summary["finetune"]
  lines = [f"Source test accuracy before fine-tuning: {cell(summary['before'], n)}. Plain fine-tuning: target "
           f"{cell(target, n)}, source after {cell(source, n)} (n = {n}).", "",
           "| method | strength | target accuracy | source accuracy after | n |", "|---|---|---|---|---|"]
  for method, (name, symbol) in TABLE_NAMES.items():
    for strength, target, source, n in summary[method]:
      lines.append(f"| {name} | {symbol} = {strength:g} | {cell(target, n)} | {cell(source, n)} | {n} |")
  return "\n".join(lines)


def tradeoff(csv_path: str, png_path: str | None = None, title: str = ""):
  """Draws the trade-off plot; saves it to `png_path` when given. Returns the matplotlib figure."""
  plt = reporting.pyplot(to_file=bool(png_path))
  summary = summarize(csv_path)
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  for method in METHODS:
    points = summary[method]
    xs, ys = [p[1][0] for p in points], [p[2][0] for p in points]
    curve = ax.errorbar(xs, ys, xerr=[p[1][1] for p in points], yerr=[p[2][1] for p in points], marker="o",
                        capsize=2, label=LABELS[method])
    for index, (strength, x, y) in enumerate(zip((p[0] for p in points), xs, ys)):
      if method == "rehearsal":
        # Rehearsal's points sit close together (their target accuracies within about 0.03): fractions as 1/16,
        # 1/8, ..., staggered below the points so that neighbouring labels do not overprint each other.
        label, offset = str(fractions.Fraction(strength).limit_denominator(64)), (-4, -11 - 9 * (index % 2))
      else:
        label, offset = f"{strength:g}", (4, 3)
      ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=7,
                  color=curve[0].get_color() if method == "rehearsal" else "black")
  (target, target_std), (source, source_std), _ = summary["finetune"]
  ax.errorbar([target], [source], xerr=[target_std], yerr=[source_std], marker="*", markersize=12, color="black",
              linestyle="none", label="plain fine-tuning")
  ax.axhline(summary["before"][0], color="gray", linestyle="--", linewidth=1, label="source accuracy before")
  ax.set_xlabel("target task test accuracy (after fine-tuning)")
  ax.set_ylabel("source task test accuracy (after fine-tuning)")
  ax.set_title(title or "Forgetting vs. learning: regularizer strength sweep")
  ax.legend(fontsize=8, loc="lower left")
  ax.grid(alpha=0.3)
  return reporting.save_figure(fig, png_path)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results_csv")
  parser.add_argument("png")
  parser.add_argument("--title", default="", help="the plot's title (default: a generic one)")
  args = parser.parse_args()
  print(table(summarize(args.results_csv)))
  tradeoff(args.results_csv, args.png, title=args.title)
  print(f"wrote {args.png}")
