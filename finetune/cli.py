"""`finetune <command>`: parses flags and calls the library; nothing here that a notebook could not call.

    finetune train --config configs/<file>.py[:arg] --workdir DIR [--config.key=value ...]
    finetune eval --workdir DIR [--stage NAME] [--unfinished | --step N] [--out FILE.json] [--config.data.key=value ...]
    finetune export --workdir DIR --format hf|peft --out OUT [--stage NAME] [--unfinished | --step N] [--dtype bfloat16]
                    [--config.model.hf_config=DIR] [--config.data.options.tokenizer=DIR]
    finetune plan --config configs/<file>.py[:arg] [--mesh data=4,fsdp=2] [--devices N] [--config.key=value ...]
    finetune verify --workdir DIR [--strict]
    finetune sweep --config configs/<file>.py[:arg] --workdir DIR [--parallel N] [--vmap K]
                   [--only NAME ...] [--dry-run | --aggregate-only] [--metric split/key ...]
                   [--seed-key KEY] [--wandb-sweep OUT.yaml] [--config.key=value ...]

A `FinetuneError` (any user error) prints one line `finetune: error: ...` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
import warnings
from typing import Sequence

from finetune import host_devices, interrupts
from finetune.errors import FinetuneError


class _Parser(argparse.ArgumentParser):
  """argparse, but usage errors become the same one-line `finetune: error:` as every other user error, and no
  abbreviated flags (`--conf B` read as a second `--config`)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, allow_abbrev=False, **kwargs)

  def error(self, message: str):
    raise FinetuneError(f"{message} (see `{self.prog} --help`)")


def _path(text: str) -> str:
  """A path flag's value: an empty one (an unset shell variable) would mean the current folder, where `train` wrote
  its stages into the source tree."""
  if not text.strip():
    raise argparse.ArgumentTypeError("is empty; give a path")
  return text


class _Once(argparse.Action):
  """Stores a flag's value, refusing a second one: argparse keeps the last silently (`--config A --config B`
  trained B)."""

  def __call__(self, parser, namespace, values, option_string=None):
    given = vars(namespace).setdefault("_given", set())
    if self.dest in given:
      parser.error(f"{option_string} is given twice; give it once")
    given.add(self.dest)
    setattr(namespace, self.dest, values)


class _AppendDistinct(argparse.Action):
  """A repeatable flag's values, each at most once (`--metric m --metric m` made two equal columns)."""

  def __call__(self, parser, namespace, values, option_string=None):
    items = list(getattr(namespace, self.dest) or [])  # (a copy: the default list is shared)
    if values in items:
      parser.error(f"{option_string} {values} is given twice; give it once")
    setattr(namespace, self.dest, [*items, values])


def _version() -> str:
  try:
    return importlib.metadata.version("finetune")
  except importlib.metadata.PackageNotFoundError:  # (run from a checkout that was never installed)
    return "(not installed)"


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="finetune", description=__doc__.splitlines()[0])
  parser.add_argument("--version", action="version", version=f"finetune {_version()}")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  train = commands.add_parser("train", help="run an experiment config (all its stages)",
                              description="Run an experiment config. Config keys are overridden with "
                              "--config.<key>=<value> (e.g. --config.train.steps=100); the README lists every key.")
  train.add_argument("--config", action=_Once, required=True, type=_path, help="configs/<file>.py[:arg]")
  train.add_argument("--workdir", action=_Once, required=True, type=_path,
                     help="output folder; re-running the same command resumes")
  evaluate = commands.add_parser("eval", help="evaluate a finished run's final weights again, on its own or other data",
                                 description="Evaluate a finished stage's final weights on its evaluation splits, "
                                 "after --config.data.<key>=<value> / --config.mesh.<key>=<value> overrides (another "
                                 "test file, other splits, another mesh); prints a table and writes nothing into "
                                 "the run.")
  _add_run_selection(evaluate, "evaluate")
  evaluate.add_argument("--out", action=_Once, default=None, type=_path, metavar="FILE.json",
                        help="also write {split: metrics} to this file (a class task's with "
                        "per_class: each class's support, recall, precision and F1)")
  export = commands.add_parser("export", help="write a run's parameters as a Hugging Face checkpoint",
                               description="Write a finished run's latest checkpoint as a Hugging Face checkpoint "
                               "(BERT, ViT, GPT-2, Llama; PEFT runs merged) or as a PEFT LoRA adapter.")
  _add_run_selection(export, "export")
  export.add_argument("--format", action=_Once, default="hf",
                      help="hf (config.json + model.safetensors + tokenizer; PEFT runs merged) or peft "
                      "(a LoRA adapter for peft.PeftModel)")
  export.add_argument("--out", action=_Once, required=True, type=_path,
                      help="output folder (an earlier export there is replaced; any other non-empty folder is refused)")
  export.add_argument("--dtype", action=_Once, default="float32", choices=("float32", "bfloat16", "float16"),
                      help="the written model's tensors (default float32: the trained weights exactly; bfloat16 "
                      "halves the files; a PEFT adapter stays float32, its base_model/ takes this)")
  plan = commands.add_parser("plan", help="per-device memory and FLOPs of a config's train step, from shapes only",
                             description="Compile every stage's train step from abstract shapes (nothing is "
                             "allocated) and print per-device parameter / optimizer bytes, XLA's memory analysis "
                             "and FLOPs per step. Config keys are overridden with --config.<key>=<value>, as in "
                             "`finetune train`.")
  plan.add_argument("--config", action=_Once, required=True, type=_path, help="configs/<file>.py[:arg]")
  plan.add_argument("--mesh", action=_Once, default="",
                    help="mesh axes, e.g. data=4,fsdp=2 (overrides config.mesh)")
  plan.add_argument("--devices", action=_Once, type=int, default=None,
                    help="fake this many host devices (CPU) to stand in for the target accelerators")
  verify = commands.add_parser("verify", help="check every checkpoint under a folder against its checksums",
                               description="Check every checkpoint step under a workdir (each stage's checkpoints/ "
                               "and best/, sweep points too) against its checksums.json: a file changed, cut short "
                               "or lost since it was written is named. Exit status 2 when one is damaged.")
  verify.add_argument("--workdir", action=_Once, required=True, type=_path, help="a workdir, run or sweep folder")
  verify.add_argument("--strict", action="store_true",
                      help="a step without checksums.json (lost in a copy, or written without checksums) fails too")
  sweep = commands.add_parser("sweep", help="run every point of a config's get_sweep() and tabulate the results",
                              description="Run each point of the config file's get_sweep(arg) (a list of "
                              "{config key: value}) as `finetune train` in DIR/<point>, skipping points finished "
                              "earlier; write DIR/points.json, results.csv and results.md. --config.key=value "
                              "overrides apply to every point.")
  sweep.add_argument("--config", action=_Once, required=True, type=_path,
                     help="configs/<file>.py[:arg], a file defining get_sweep")
  sweep.add_argument("--workdir", action=_Once, required=True, type=_path,
                     help="sweep folder: one run folder per point, plus the results")
  sweep.add_argument("--parallel", action=_Once, type=int, default=1,
                     help="points run at once (CPU, or a GPU with memory for several runs; a TPU holds one)")
  sweep.add_argument("--vmap", action=_Once, type=int, default=1, metavar="K",
                     help="train up to K points that differ only in seed, learning rate or regularizer strength "
                          "together, in one process and one jitted program (vmap over points; finetune/vmap.py)")
  sweep.add_argument("--together", action=_AppendDistinct, default=[], metavar="NAME",
                     help="train just the named points (repeat the flag) together in this process (what --vmap "
                          "launches)")
  sweep.add_argument("--only", action=_AppendDistinct, default=[], metavar="NAME",
                     help="run just the named points (repeat the flag), one by one as the sweep would; with "
                          "--dry-run, print just their commands (what a wandb agent of a --wandb-sweep runs)")
  run_none = sweep.add_mutually_exclusive_group()
  run_none.add_argument("--dry-run", action="store_true",
                        help="print one `finetune train` command per point (with --vmap: one per group); run none")
  run_none.add_argument("--aggregate-only", action="store_true",
                        help="write results.csv and results.md from the points finished so far and run none (e.g. "
                             "after copying point folders made elsewhere, such as more seeds, into DIR)")
  sweep.add_argument("--metric", action=_AppendDistinct, default=[],
                     help="a path into each stage's summary.json, e.g. test/accuracy, test/loss, "
                     "forgetting/pretrain/test/drop; repeatable (default: every split's accuracy)")
  sweep.add_argument("--seed-key", action=_Once, default="seed",
                     help="the config key results.md averages over (default: seed)")
  sweep.add_argument("--wandb-sweep", action=_Once, default=None, type=_path, metavar="OUT.yaml",
                     help="write the points as a wandb grid sweep definition instead of running them")
  return parser


def _add_run_selection(parser: argparse.ArgumentParser, verb: str) -> None:
  """--workdir, --stage and --unfinished: which finished run's final checkpoint `eval` and `export` read."""
  parser.add_argument("--workdir", action=_Once, required=True, type=_path,
                      help="a run directory made by `finetune train`")
  parser.add_argument("--stage", action=_Once, default="", help="stage of a multi-stage run (default: the last)")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--unfinished", action="store_true",
                     help=f"{verb} the latest checkpoint of a stage that has not finished (default: refuse)")
  which.add_argument("--step", action=_Once, type=_step, default=None,
                     help=f"{verb} the stage's checkpoint of this step instead of its final one (finished or not)")


def _step(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"a checkpoint step is a whole number >= 0, not {text!r}")
  return int(text)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:
        # (a flag after it was taken as its value: another override lost, or --workdir said to be missing)
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
          raise FinetuneError(f"override {arg} has no value; write {arg}=VALUE")
        body, i = f"{body}={args[i + 1]}", i + 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def run_train(config_spec: str, workdir: str, overrides: Sequence[str]) -> int:
  # Imported here so `finetune --help` and argument errors do not wait for jax.
  from finetune import compile_cache, distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()  # before anything queries devices
  compile_cache.enable()  # before the first compilation
  from finetune.config import load_config  # pylint: disable=g-import-not-at-top
  from finetune.train import results_table, train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = load_config(config_spec, overrides)
  summaries = train_and_evaluate(config, workdir)
  print(results_table(summaries))
  print(f"outputs: {os.path.abspath(workdir)}")
  return 0


def run_plan(config_spec: str, mesh: str, devices: int | None, overrides: Sequence[str]) -> int:
  if devices is not None and devices < 1:
    raise FinetuneError(f"--devices {devices}: give a number of devices >= 1 (or leave it out: the real ones)")
  if devices:
    # Must precede jax's backend initialisation (the first device query), which nothing has triggered yet.
    os.environ.update(host_devices.environment(devices))
    import jax  # pylint: disable=g-import-not-at-top
    # jax read JAX_NUM_CPU_DEVICES when it was imported, and prefers it to the flag: set it to the same number.
    jax.config.update("jax_num_cpu_devices", devices)
  mesh_overrides = []
  for item in filter(None, mesh.split(",")):
    axis, sep, size = item.partition("=")
    if not sep or not re.fullmatch(r"-?\d+", size.strip()):
      raise FinetuneError(f"--mesh {mesh!r}: write axis=size pairs such as data=4,fsdp=2")
    mesh_overrides.append(f"mesh.{axis.strip()}={int(size)}")
  both = sorted({o.partition("=")[0] for o in mesh_overrides} & {o.partition("=")[0].strip() for o in overrides})
  if both:  # (--mesh is applied last: the --config.mesh value the error message suggested was silently replaced)
    raise FinetuneError(f"--mesh and --config.{both[0]} both set {both[0]}; give each mesh axis once")
  from finetune.config import load_config  # pylint: disable=g-import-not-at-top
  from finetune.plan import plan, table  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if devices and jax.device_count() != devices:
    raise FinetuneError(f"--devices {devices}: jax already sees {jax.device_count()} devices (XLA_FLAGS is read "
                        "once per process); run `finetune plan` in a fresh process")
  config = load_config(config_spec, [*overrides, *mesh_overrides])
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  try:
    print(table(plan(config)))
  except FinetuneError as e:
    if mesh and str(e).startswith("config.mesh "):
      # What is wrong, without the fix it suggested (--config.mesh.X, which --mesh, applied last, replaced).
      fix = "change --mesh" + (" or --devices" if devices else
                               "; to plan for N accelerators on this machine, add --devices N")
      raise FinetuneError(f"--mesh {mesh}: {str(e).split(';')[0]}; {fix}") from None
    if devices or "devices" not in str(e):
      raise
    # (planning for a machine other than this one is what --devices is for)
    raise FinetuneError(f"{e}; to plan for N accelerators on this machine, add --devices N") from None
  return 0


def run_verify(workdir: str, strict: bool = False) -> int:
  """`finetune verify`: one line per checkpoint step; an error (exit 2) when any is damaged, or with `strict` has no
  checksums."""
  from finetune.checkpoint import verify_folder  # pylint: disable=g-import-not-at-top
  root = os.path.expanduser(workdir)
  found = verify_folder(root)
  if not found:
    raise FinetuneError(f"{root} holds no checkpoint step (no checkpoints/<step> or best/<step> folder under it)")
  for step_dir, result in found:
    status = result if isinstance(result, str) else f"ok, {result} files" if result else "no checksums"
    print(f"{os.path.relpath(step_dir, root) if step_dir != os.path.normpath(root) else step_dir}: {status}")
  damaged = [(step_dir, result) for step_dir, result in found if isinstance(result, str)]
  if damaged:
    raise FinetuneError(f"{len(damaged)} of {len(found)} checkpoint steps are damaged; the first: {damaged[0][1]}; "
                        "copy it again from where it was written, or delete a damaged step folder of an unfinished "
                        "stage (it resumes from the step before; a finished stage's final step holds its result)")
  unchecked = sum(1 for _, result in found if result == 0)
  if strict and unchecked:
    first = next(step_dir for step_dir, result in found if result == 0)
    raise FinetuneError(f"{unchecked} of {len(found)} checkpoint steps have no checksums.json (--strict), the first "
                        f"{first}: copy it again with its checksums.json, or leave out --strict for steps written "
                        "without checksums")
  verb = "has" if unchecked == 1 else "have"
  print(f"{len(found) - unchecked} of {len(found)} checkpoint steps match their checksums"
        f"{f'; {unchecked} {verb} none (written without them)' if unchecked else ''}")
  return 0


def run_eval(workdir: str, stage: str, unfinished: bool, out: str, overrides: Sequence[str],
             step: int | None = None) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from finetune import compile_cache, distributed, evaluation  # pylint: disable=g-import-not-at-top
  from finetune.reporting import write_json  # pylint: disable=g-import-not-at-top
  # Real paths: through a symbolic link, --out still replaced the run's summary.json.
  out = os.path.realpath(os.path.expanduser(out)) if out else ""
  run_root = os.path.realpath(os.path.expanduser(workdir))
  if out and (out == run_root or out.startswith(run_root.rstrip(os.sep) + os.sep)):
    # (--out workdir/summary.json replaced the run's summary; the next `finetune train` there crashed)
    raise FinetuneError(f"--out {out} is inside the run folder {run_root}, and eval writes nothing into a run: "
                        "choose a path outside it")
  if out and (os.path.isdir(out) or not os.path.isdir(os.path.dirname(out))):  # found before evaluating, not after
    raise FinetuneError(f"--out {out} is a folder; name a file such as {os.path.join(out, 'eval.json')}"
                        if os.path.isdir(out) else
                        f"--out {out}: the folder {os.path.dirname(out)} does not exist; create it or choose another")
  # As `finetune train`: a launcher's processes (a TPU pod's workers, srun's tasks) evaluate as one job over all
  # devices, each reading its part of every batch; before, each evaluated the whole split alone on its own devices.
  distributed.initialize()
  compile_cache.enable()
  per_class: dict = {}
  results = evaluation.evaluate_run(workdir, stage, overrides, unfinished, step, per_class)
  print(evaluation.results_table(results))
  if out and jax.process_index() == 0:  # (one writer, as train's summaries)
    # (a class task's per-class scores beside each split's metrics, as per_class.json holds a training run's)
    write_json(out, {split: {**metrics, **({"per_class": per_class[split]} if split in per_class else {})}
                     for split, metrics in results.items()})
  return 0


def run_sweep(config_spec: str, workdir: str, parallel: int, dry_run: bool, metrics: Sequence[str], seed_key: str,
              wandb_out: str, overrides: Sequence[str], vmap: int = 1, together: Sequence[str] = (),
              aggregate_only: bool = False, only: Sequence[str] = ()) -> int:
  from finetune import sweep  # pylint: disable=g-import-not-at-top

  if aggregate_only and (wandb_out or together):
    # Each of those returns before tabulating: the flag would be silently ignored.
    raise FinetuneError("--aggregate-only only tabulates finished points; run --wandb-sweep / --together without it")
  if together and (dry_run or wandb_out):  # --together trains its points at once: the other flag would be ignored
    raise FinetuneError("--together trains the named points now; --dry-run and --wandb-sweep go without it (with "
                        "--vmap N, --dry-run prints the --together commands)")
  if only and (together or wandb_out or aggregate_only):  # each of those covers points of its own: refuse the mix
    raise FinetuneError("--only picks points to run or print; --together, --wandb-sweep and --aggregate-only go "
                        "without it")
  if parallel < 1:  # (checked only when points ran: --dry-run took any number)
    raise FinetuneError(f"--parallel {parallel}: run at least one point at a time; pass --parallel 1 or more")
  # Flags the mode never reads would be ignored silently: --wandb-sweep and --together neither run points side by
  # side nor tabulate them. (--dry-run previews the same command, so it takes them.)
  mode = "--together" if together else "--wandb-sweep" if wandb_out and not dry_run else ""
  if mode and (parallel != 1 or metrics):
    raise FinetuneError(f"{mode} neither runs points side by side nor tabulates them: drop "
                        f"{'--parallel' if parallel != 1 else '--metric'}")
  # (--vmap: wandb agents and --together's named group train as they do whatever it says, --aggregate-only trains
  # nothing; --vmap 0 passed there unchecked)
  mode = mode or ("--aggregate-only" if aggregate_only else "")
  if mode and vmap != 1:
    raise FinetuneError(f"{mode} does not group points into programs, so --vmap {vmap} would be ignored: drop it")
  points = sweep.load_sweep(config_spec, overrides)
  sweep.check_seed_key(points, seed_key)  # before any point runs, not after the sweep
  for flag, names in (("--together", together), ("--only", only)):
    sweep.check_point_names(points, names, flag)
  if together:
    from finetune import compile_cache, distributed, vmap as vmap_lib  # pylint: disable=g-import-not-at-top
    distributed.initialize()  # as `finetune train` does: a launcher's processes train the group as one job
    compile_cache.enable()
    by_name = {point.name: point for point in points}
    chosen = [by_name[name] for name in together]
    vmap_lib.train_points([p.config for p in chosen], [os.path.join(workdir, p.name) for p in chosen])
    return 0
  if dry_run:
    listed = [point for point in points if point.name in only] if only else points
    print("\n".join(sweep.dry_run_commands(listed, workdir, vmap)))
  if wandb_out:
    sweep.write_wandb_sweep(wandb_out, points, workdir)
    print(f"wrote {wandb_out}: `wandb sweep {wandb_out}` creates the sweep, `wandb agent <sweep id>` runs it",
          file=sys.stderr if dry_run else sys.stdout)  # (stdout stays one command per line)
  if dry_run or wandb_out:
    return 0
  if aggregate_only and not os.path.isdir(workdir):
    what = "is not a folder" if os.path.exists(workdir) else "does not exist"
    raise FinetuneError(f"--aggregate-only: {workdir} {what}; run the sweep first (without the flag)")
  if aggregate_only:  # (another config's runs would be tabulated as incomplete, over the results of their own)
    sweep.check_workdir(points, workdir)
  if os.path.isdir(workdir):  # a mistyped --metric fails now when some point has finished, not after the sweep
    sweep.collect(points, workdir, metrics)
  outcomes = [] if aggregate_only else sweep.run_sweep(points, workdir, parallel, vmap, only)
  failed = [o for o in outcomes if o.status == "failed"]
  try:
    print(sweep.aggregate(points, workdir, metrics, seed_key))
    print(f"results: {os.path.join(os.path.abspath(workdir), 'results.csv')} and results.md")
  finally:  # the failed points are named even when tabulating fails
    for outcome in failed:
      print(f"failed: {outcome.point.name} (exit status {outcome.returncode}); see {outcome.log_path}",
            file=sys.stderr)
  return 1 if failed else 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
  """The framework's own warnings as one line, like its errors (Python's format adds the warning's source line);
  other libraries' keep Python's format, which says where they come from."""
  if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
    return f"finetune: warning: {message}\n"
  return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  warnings.formatwarning = _one_line_warning
  host_devices.size_client_threads()  # before jax creates its CPU client, which reads it
  with interrupts.termination_as_interrupt():  # a preempted job ends like Ctrl-C: files closed, one line
    return _main(argv)


# What re-running a command after Ctrl-C or SIGTERM does (eval, verify and plan wrote nothing: they start over).
_AFTER_INTERRUPT = {
    "train": "re-run the same command to resume from the last checkpoint",
    "sweep": "re-run the same command: finished points are skipped, the others resume from their last checkpoints",
    "export": "nothing was written (an export is written whole or not at all); re-run the same command",
}


def _main(argv: list[str]) -> int:
  try:
    rest, overrides = split_overrides(argv)
    parser = _parser()
    args, unknown = parser.parse_known_args(rest)
    if unknown:  # (argparse's own message sent the user to the top-level help)
      raise FinetuneError(f"unrecognized arguments: {' '.join(unknown)} (see `finetune {args.command} --help`)")
    if args.command == "train":
      return run_train(args.config, args.workdir, overrides)
    if args.command == "plan":
      return run_plan(args.config, args.mesh, args.devices, overrides)
    if args.command == "sweep":
      return run_sweep(args.config, args.workdir, args.parallel, args.dry_run, args.metric, args.seed_key,
                       args.wandb_sweep, overrides, args.vmap, args.together, args.aggregate_only, args.only)
    if args.command == "verify":
      return run_verify(args.workdir, args.strict)
    if args.command == "eval":
      return run_eval(args.workdir, args.stage, args.unfinished, args.out, overrides, args.step)
    if args.command == "export":
      from finetune import distributed  # pylint: disable=g-import-not-at-top
      from finetune.export import export  # pylint: disable=g-import-not-at-top
      rank = distributed.launched_process_index()
      if rank:  # (export reads and writes files only: one process of a multi-host launch does it)
        print(f"export: process {rank} of a multi-process launch; process 0 writes "
              f"{os.path.abspath(os.path.expanduser(args.out))}")
        return 0
      architecture = export(args.workdir, args.out, args.format, args.stage, args.unfinished, overrides,
                            args.dtype, args.step)
      print(f"wrote {architecture} to {os.path.abspath(os.path.expanduser(args.out))}")
      return 0
    raise AssertionError(args.command)
  except FinetuneError as e:
    # One line: drop anything a library appended (jax adds a traceback-filtering note to errors it re-raises).
    message = str(e).split("\n--------------------")[0].replace("\n", " ")
    print(f"finetune: error: {message}", file=sys.stderr)
    return 2
  except BrokenPipeError:
    # Output piped into `head` and the like: the reader left, which is not an error (Python's documented recipe:
    # point stdout at devnull so the interpreter's final flush does not raise again).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  except KeyboardInterrupt:
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    print(f"finetune: interrupted; {_AFTER_INTERRUPT.get(command, 're-run the same command')}", file=sys.stderr)
    return 130
  except OSError as e:  # a path that is a file where a folder is needed, no permission, a full disk: name it
    where = f": {e.filename}" if e.filename else ""
    print(f"finetune: error: {e.strerror or e}{where}; check that path (--workdir, --out, the config's paths)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
