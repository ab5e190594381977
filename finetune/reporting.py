"""Where metrics go: `metrics.jsonl` (one JSON object per line), a progress bar, and wandb.

Only process 0 writes. The progress bar is shown only when stderr is a terminal. wandb is off by default
(`config.wandb.mode='disabled'`); 'online' without an API key, or without a connection, falls back to 'offline' with
one line on stderr, so a run never needs the network. A stage keeps its wandb run across restarts: the run's id is
kept in `<run dir>/wandb_run_id`, and a resumed stage logs into the same run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from typing import Any, Iterator

import jax
from ml_collections import ConfigDict

from finetune import files, interrupts
from finetune.errors import FinetuneError


def _number(value: Any) -> Any:
  return float(value) if hasattr(value, "item") or isinstance(value, float) else value


def _clean(value: Any) -> Any:
  value = _number(value)
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the information as text.
  return value


WANDB_RUN_ID_FILE = "wandb_run_id"


def require_wandb(configs: list[ConfigDict]) -> None:
  """Refuses, before anything is built, a run that logs to wandb where wandb is not installed (a traceback after
  the data and model were built, and the run folder written, before)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if any(cfg.wandb.mode != "disabled" for cfg in configs) and importlib.util.find_spec("wandb") is None:
    raise FinetuneError("config.wandb.mode logs to wandb, which is not installed: `pip install wandb`, or set "
                        "config.wandb.mode=disabled")


# The run a wandb agent started this process for (`wandb agent` runs one command per sweep run and names the run in
# WANDB_RUN_ID, with WANDB_SWEEP_ID): every stage of the point logs into it, keys prefixed by the stage's name,
# each stage on an x-axis of its own (`<stage>/step`: stages count their steps from 0). One wandb.init per stage,
# as outside an agent, gave every stage the agent's id, so each stage's run replaced the one before. Process-wide
# because the agent's run is; wandb finishes it at exit.
_AGENT_RUNS: dict[str, Any] = {}


def _agent_run_id() -> str:
  return os.environ.get("WANDB_RUN_ID", "") if os.environ.get("WANDB_SWEEP_ID") else ""


class MetricsLog:
  """Appends records {'step', 'split', ...metrics} to `<run dir>/metrics.jsonl` (and wandb when on: one run per
  stage, or under a wandb agent the agent's run, shared by the stages)."""

  def __init__(self, run_dir: str, wandb_cfg: ConfigDict | None = None, run_name: str = "",
               config: dict | None = None, display_name: str = "", resuming: bool = False):
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    self._wandb, self._prefix = None, ""
    if self.enabled and wandb_cfg is not None and wandb_cfg.mode != "disabled":
      agent_run = _agent_run_id()
      if not agent_run:
        self._wandb = _start_wandb(wandb_cfg, run_dir, display_name or run_name, config, resuming=resuming)
        return
      if agent_run not in _AGENT_RUNS:
        _AGENT_RUNS[agent_run] = _start_wandb(wandb_cfg, run_dir, "", None, run_id=agent_run)
      self._wandb, self._prefix = _AGENT_RUNS[agent_run], f"{run_name or 'train'}/"
      self._wandb.config.update({run_name or "train": config}, allow_val_change=True)
      self._wandb.define_metric(f"{self._prefix}step")
      self._wandb.define_metric(f"{self._prefix}*", step_metric=f"{self._prefix}step")

  def truncate_after(self, step: int, drop_evaluations_at: int | None = None) -> None:
    """On (re)start, drops records of steps after `step` (the restored checkpoint; 0 for a fresh start), and
    evaluation records at `drop_evaluations_at` (the final evaluation, which always runs again).

    A last line cut short by a crash is dropped too."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        final_evaluation = record.get("split") != "train" and record.get("step") == drop_evaluations_at
        if record.get("step", 0) <= step and not final_evaluation:
          kept.append(json.dumps(record) + "\n")
    files.write_text(self.path, "".join(kept))

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._wandb is not None:
      # (Numbers, NaN and inf included, which wandb charts; the text form is only JSON's lack of them.)
      values = {f"{self._prefix}{split}/{k}": _number(v) for k, v in metrics.items()}
      if self._prefix:
        self._wandb.log({**values, f"{self._prefix}step": int(step)})
      else:
        self._wandb.log(values, step=int(step))

  def close(self) -> None:
    if self._wandb is not None and not self._prefix:  # (an agent's run outlives the stage)
      self._wandb.finish()
    self._wandb = None


def _wandb_base_url() -> str:
  """The server wandb talks to: WANDB_BASE_URL, else the one `wandb login --host` saved in its settings file."""
  if os.environ.get("WANDB_BASE_URL"):
    return os.environ["WANDB_BASE_URL"]
  import configparser  # pylint: disable=g-import-not-at-top
  settings = configparser.ConfigParser()
  folder = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
  try:
    settings.read(os.path.join(folder, "settings"))
  except configparser.Error:
    pass
  return settings.get("default", "base_url", fallback="") or "https://api.wandb.ai"


def _has_api_key() -> bool:
  """Whether wandb will find an API key: WANDB_API_KEY, or a netrc entry for its server's host (with or without
  its port, as `wandb login` writes it; a ~/.netrc with other hosts' entries only is no key). Asked before
  wandb.init, which would otherwise prompt for a key on a terminal."""
  if os.environ.get("WANDB_API_KEY"):
    return True
  import netrc  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top
  url = urllib.parse.urlparse(_wandb_base_url())
  path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
  try:
    entries = netrc.netrc(path) if os.path.isfile(path) else None
  except (OSError, netrc.NetrcParseError):
    return False
  return entries is not None and any(entries.authenticators(host) is not None
                                     for host in {url.hostname or "", url.netloc} if host)


def _offline(reason: str) -> str:
  print(f"finetune: wandb {reason}; logging offline (sync later with `wandb sync`)", file=sys.stderr)
  return "offline"


def _start_wandb(cfg: ConfigDict, run_dir: str, run_name: str, config: dict | None, run_id: str | None = None,
                 resuming: bool = False):
  import wandb  # pylint: disable=g-import-not-at-top

  mode = cfg.mode
  if mode == "online" and not _has_api_key():
    mode = _offline("has no API key")
  resume = None
  if run_id is None:
    # One wandb run per stage across restarts: the id is kept beside the stage's checkpoints, and a stage resumed
    # from one logs into it (a second run of the same name, holding the steps after the checkpoint, before). Steps
    # it logs again after the restored checkpoint are the ones it had logged: wandb keeps the first (training is
    # deterministic given the checkpoint), as metrics.jsonl keeps the recomputed ones. A fresh start (no
    # checkpoint: perhaps another config, after an attempt that diverged before its first) is a run of its own.
    id_path = os.path.join(run_dir, WANDB_RUN_ID_FILE)
    if resuming and os.path.isfile(id_path):
      with open(id_path) as f:
        run_id, resume = f.read().strip(), "allow"
    else:
      run_id = uuid.uuid4().hex[:12]  # (wandb's own generator is not public API)
      files.write_text(id_path, run_id + "\n")
  # create_new: points trained together (vmap.py) hold one run each at once, logged through the returned objects;
  # each stage finishes its own run (MetricsLog.close), so none is left open. `run_id`: given explicitly (the
  # agent's too, as wandb reads its environment once per process).
  kwargs = dict(project=cfg.project, entity=cfg.entity or None, name=cfg.name or run_name or None,
                tags=list(cfg.tags), dir=run_dir, config=config, reinit="create_new", id=run_id, resume=resume)
  try:
    return wandb.init(mode=mode, **kwargs)
  except (wandb.errors.CommError, wandb.errors.UsageError) as e:  # no connection, a key the server refuses
    if mode != "online":
      raise
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return wandb.init(mode=_offline(f"could not start online ({reason})"), **kwargs)


class Progress:
  """A tqdm bar over training steps, quiet when stderr is not a terminal."""

  def __init__(self, total: int, initial: int, description: str):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    self._bar = tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                     disable=not sys.stderr.isatty() or jax.process_index() != 0, leave=False)

  def update(self, steps: int, metrics: dict[str, float] | None = None) -> None:
    self._bar.update(steps)
    if metrics:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

  def close(self) -> None:
    self._bar.close()


def write_json(path: str, payload: dict[str, Any]) -> None:
  """Writes JSON atomically (finetune/files.py), on process 0."""
  if jax.process_index() != 0:
    return
  files.write_text(path, json.dumps(payload, indent=2, default=_clean) + "\n")


def read_json(path: str) -> dict[str, Any]:
  """A JSON file this framework wrote (always an object); a damaged one is a one-line error naming it."""
  fix = "restore it, or delete its run folder to redo that run"
  value = files.read_json(path, fix)
  if not isinstance(value, dict):  # (valid JSON of another kind was a TypeError traceback further on)
    raise FinetuneError(f"{path} is damaged (a JSON {type(value).__name__}, not the object this framework writes); "
                        f"{fix}")
  return value


EXPORT_MARKER = ".finetune-export"  # marks a folder that staged_directory wrote, so a later export may replace it


def _relative_files(folder: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), folder)
                for root, _, names in os.walk(folder) for name in names if name != EXPORT_MARKER)


def _added_since_export(out: str) -> list[str]:
  """Files under an earlier export `out` that it did not write (its marker lists what it wrote; an empty marker is
  an export from before the list was kept, taken as all its own)."""
  with open(os.path.join(out, EXPORT_MARKER)) as f:
    written = set(f.read().splitlines())
  return [path for path in _relative_files(out) if written and path not in written]


@contextlib.contextmanager
def staged_directory(out: str) -> Iterator[str]:
  """Yields an empty sibling folder of `out` to write into; on success it replaces `out`, on any failure it is
  removed, so an export never leaves a half-written folder (nor destroys the previous one before it is done).

  Only an empty folder or an earlier export (it holds EXPORT_MARKER, which lists the files it wrote) is replaced:
  `--out` pointing at anything else by mistake (a run, a home folder), or an export the user added files to since
  (a model card, a git checkout for the Hub), is an error, not a deletion. A symbolic link is followed: the export
  replaces the folder it points to."""
  # (Renaming onto the link itself failed with 'Is a directory' and left an empty '-old-' folder behind.)
  out = os.path.realpath(os.path.expanduser(out))
  if os.path.exists(out) and not os.path.isdir(out):
    raise FinetuneError(f"--out {out} is a file; give a folder to write the export into")
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, EXPORT_MARKER)):
    raise FinetuneError(f"--out {out} is a non-empty folder that no earlier export wrote; it would be replaced: "
                        "choose a new folder, or delete this one first")
  added = _added_since_export(out) if os.path.isfile(os.path.join(out, EXPORT_MARKER)) else []
  if added:
    raise FinetuneError(f"--out {out} is an earlier export with files it did not write ({', '.join(added[:3])}"
                        f"{', ...' if len(added) > 3 else ''}), which replacing it would delete: move them out, or "
                        "export to another folder")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=os.path.dirname(out))
  try:
    yield staging
    files.write_text(os.path.join(staging, EXPORT_MARKER), "".join(f"{path}\n" for path in _relative_files(staging)))
    files.make_readable(staging)  # (mkdtemp's folder is private, safetensors' files too)
    # Two renames, then the old copy's deletion: at every moment a complete export exists under `out` or beside
    # it (deleting the old one first would leave none if the process died before the rename).
    with interrupts.deferred():
      previous = None
      if os.path.exists(out):
        previous = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-old-", dir=os.path.dirname(out))
        try:
          os.replace(out, previous)  # (onto the empty folder just made: a rename, nothing copied)
        except BaseException:
          os.rmdir(previous)
          raise
      try:
        os.replace(staging, out)
      except BaseException:
        if previous:
          os.replace(previous, out)
        raise
    if previous:
      shutil.rmtree(previous, ignore_errors=True)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(e, FinetuneError):  # (a failed write inside named the staging folder, not --out)
      raise files.naming_final(e, staging, out) from e.__cause__
    raise


def pyplot(to_file: bool):
  """matplotlib.pyplot for the experiments' plot scripts: the non-interactive Agg backend when the figure goes to a
  file (scripts, CI), the notebook's own backend otherwise. matplotlib is imported here, not at module import,
  because training never needs it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  if to_file:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, png_path: str | None):
  """Lays `fig` out and, when `png_path` is given, writes it there (120 dpi, the committed plots' resolution)."""
  fig.tight_layout()
  if png_path:
    fig.savefig(png_path, dpi=120)
  return fig


def experiment_plot(experiment: str, start: str | None = None):
  """`experiments/<experiment>/plot.py` of the repository that holds `start` (default: the working directory),
  imported for a notebook. The plot scripts sit beside the results they draw, outside the installed package, so
  they are found by walking up from `start` (a notebook runs in notebooks/, the repository root or a copy's folder)
  and imported under a name of their own, `<experiment>_plot`: two experiments' scripts in one kernel do not shadow
  each other as a bare `import plot` after `sys.path.insert` would."""
  first = folder = os.path.abspath(start or os.getcwd())
  while not os.path.isfile(path := os.path.join(folder, "experiments", experiment, "plot.py")):
    if os.path.dirname(folder) == folder:
      raise FinetuneError(f"no experiments/{experiment}/plot.py in {first} or any folder above it: run the "
                          f"notebook inside a finetune checkout, or pass start= a folder inside one")
    folder = os.path.dirname(folder)
  spec = importlib.util.spec_from_file_location(f"{experiment}_plot", path)
  module = importlib.util.module_from_spec(spec)
  # Registered while it runs, as an import would: dataclasses and pickling look the module up by name. (A script
  # that fails leaves the one an earlier call loaded in place.)
  earlier = sys.modules.get(spec.name)
  sys.modules[spec.name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    if earlier is None:
      del sys.modules[spec.name]
    else:
      sys.modules[spec.name] = earlier
    raise
  return module
