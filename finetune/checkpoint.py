"""Checkpoints (orbax) and initialisation from earlier runs: `init_from` + `dont_load`.

Layout of a run directory: `checkpoints/<step>/state/` holds the whole train state (params, model_state,
opt_state, step, rng), written by an `ocp.CheckpointManager` every `train.checkpoint_every` steps and at the end,
keeping the last `train.keep_checkpoints`. orbax writes each step to a temporary folder and renames it when
complete, so a run killed mid-save never leaves a half-written checkpoint behind; saving runs off the training
thread (async), and the last good checkpoint is never touched by a later failure. Once a step is complete,
`checksums.json` in its folder records every file's size and CRC-32, and every read of the step checks them first
(`verify_checksums`), so a file altered or truncated after saving is an error naming it, not weights that load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import json
import re
import sys
import zlib
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from finetune import files, interrupts, scan
from finetune.errors import FinetuneError
from finetune import models
from finetune.models import hf
from finetune.partition import flatten, map_with_path

STATE_ITEM = "state"
# Written into a run folder when its stage stops on a non-finite loss: {"weights_from_step": s, "error": ...};
# checkpoints from step s on hold the weights that diverged. `finetune export/eval --unfinished` take the newest
# checkpoint before s.
DIVERGED_FILE = "diverged.json"
# In each step folder: {"crc32": {file path relative to the step folder: [bytes, CRC-32]}}.
CHECKSUM_FILE = "checksums.json"


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one run directory's train state."""

  def __init__(self, directory: str, keep: int | None, async_save: bool = True, checksums: bool = True):
    """`keep`: how many of the latest steps to keep (None: all of them). While a run trains, orbax keeps at least
    two: the newest checkpoint's weights are checked only by the next step's loss, so with `keep=1` a divergence
    right after a save would leave nothing good. `prune` drops the extra one once the stage's end checked it.
    `checksums`: write CHECKSUM_FILE into each step once orbax has finished it (config.train.checkpoint_checksums;
    steps are verified on restore whenever they have one)."""
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=None if keep is None else max(keep, 2), create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM,))
    self.keep = keep
    self._checksums = checksums
    self._unsummed: list[int] = []  # saved steps whose checksums wait for orbax to finish writing them

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  # Writing, deleting and finalising hold Ctrl-C / SIGTERM back until orbax is done (finetune/interrupts.py).

  @contextlib.contextmanager
  def _writing(self):
    """A failed write (a full disk: orbax's background threads raise it as a ValueError at the next save or wait,
    after ~470 lines of logged tracebacks) becomes one FinetuneError naming the folder; checkpoints written before
    it stay intact, so the same command resumes once the cause is fixed."""
    _quiet_orbax_error_logs()
    with interrupts.deferred():
      try:
        yield
      except Exception as e:  # pylint: disable=broad-except  (tensorstore's I/O errors arrive as ValueErrors)
        if not (isinstance(e, OSError) or _STORAGE_ERROR.search(str(e))):
          raise  # (a programming error is not a full disk)
        raise FinetuneError(f"writing checkpoints under {self.directory} failed: {type(e).__name__}: {_short(e)}; "
                            "those written before are intact: free space (or fix the folder's permissions) and run "
                            "the same command again to resume") from e

  def save(self, step: int, state: dict[str, Any]) -> None:
    with self._writing():
      if self._unsummed:  # (orbax would wait for the previous save here anyway)
        self._manager.wait_until_finished()
        self._sum_finished()
      self._manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}), force=True)
    if self._checksums:
      self._unsummed.append(step)

  def sum_finished_saves(self) -> bool:
    """Checksums for the saved steps orbax has finished since, without waiting for a save in progress; True when it
    took any (process 0 writes them). Called at every log step, so that the newest step of a run killed before its
    next save (the step a resume starts from) has them too."""
    if not self._unsummed or self._manager.is_saving_in_progress():
      return False
    with self._writing():
      self._manager.wait_until_finished()  # (returns at once; raises a failed save's error)
      self._sum_finished()
    return True

  def _sum_finished(self) -> None:
    """Checksums for the steps saved since the last call, all of which orbax has finished. Process 0 writes them (it
    finalises each step, after every process's files are in place); the others only forget the steps."""
    steps, self._unsummed = self._unsummed, []
    if jax.process_index() == 0:
      for step in steps:
        step_dir = os.path.join(self.directory, str(step))
        if os.path.isdir(step_dir):  # (unless deleted since)
          write_checksums(step_dir)

  def restore(self, step: int, abstract_state: dict[str, Any],
              fix: str = "use a new --workdir, or delete that step folder to resume from the one before"
              ) -> dict[str, Any]:
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`), once the step's files
    match their checksums. `fix`: what an error tells the user to do."""
    _silence_abandoned_reads()
    verify_checksums_together(os.path.join(self.directory, str(step)), fix)
    _refuse_changed_layout(flatten(abstract_state["params"]), self.directory)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    except Exception as e:  # orbax/tensorstore raise many types for damaged or mismatched checkpoints
      raise FinetuneError(f"cannot restore checkpoint {self.directory}/{step}: {type(e).__name__}: {_short(e)}; the "
                          f"config may have changed since it was written, or the checkpoint is damaged: {fix}"
                          ) from None
    return restored[STATE_ITEM]

  def delete(self, step: int) -> None:
    with self._writing():
      self._manager.delete(step)
    if step in self._unsummed:
      self._unsummed.remove(step)

  def prune(self) -> None:
    """Down to the latest `keep` steps, once the newest is known good (the stage's final evaluation was finite)."""
    self.wait()
    if self.keep is not None:
      for step in self.all_steps()[:-self.keep]:
        self.delete(step)

  def wait(self) -> None:
    with self._writing():
      self._manager.wait_until_finished()
      self._sum_finished()

  def close(self) -> None:
    with self._writing():
      self._manager.wait_until_finished()
      self._sum_finished()
      self._manager.close()


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_checksums(step_dir: str) -> None:
  """Records the size and CRC-32 of every file of a finished checkpoint step in its CHECKSUM_FILE.

  Written by hand: orbax and tensorstore checksum only the index of each array file (zarr3's crc32c index codec),
  not the data, so a flipped bit in a weight reads back as another weight (measured: orbax 0.12.8 restored an
  array with one byte changed, without a word). CRC-32 catches storage faults and partial copies, not tampering;
  zlib's runs at 2.3-4.2 GB/s on the 2-core development machine (SHA-256: 0.8-1.8)."""
  entries = {}
  for root, _, names in os.walk(step_dir):
    for name in sorted(names):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if relative != CHECKSUM_FILE and not name.startswith(f".{CHECKSUM_FILE}-"):  # (nor atomic_path's temp)
        entries[relative] = [os.path.getsize(path), _crc32(path)]
  files.write_text(os.path.join(step_dir, CHECKSUM_FILE), json.dumps({"crc32": dict(sorted(entries.items()))}))


class ChecksumMismatch(Exception):
  """What is wrong with a step folder's files against its CHECKSUM_FILE, without what to do about it (that depends
  on who reads: a resume, an init_from, `finetune verify`)."""


def verify_checksums(step_dir: str, fix: str) -> int:
  """Raises, naming the file and saying `fix`, unless every file a step's CHECKSUM_FILE lists is there with its
  recorded size and CRC-32; returns how many it checked. 0 for a step without one (written with
  config.train.checkpoint_checksums off, before checksums existed, or by a run killed between orbax finishing the
  step and the file being written)."""
  try:
    return _check_step(step_dir)
  except ChecksumMismatch as e:
    raise FinetuneError(f"{e}; {fix}") from None


def verify_checksums_together(step_dir: str, fix: str) -> None:
  """`verify_checksums` by every process of a multi-host run at once, each reading its share of the files
  (`_share`), and all raising the same error, naming what any of them found: each host restores only its own
  shards, so a whole-step check on every host would read the checkpoint once per host."""
  if jax.process_count() == 1:
    verify_checksums(step_dir, fix)
    return
  # Process 0 may have written the table just before (early stopping's best step, checksummed as it closes).
  multihost_utils.sync_global_devices("finetune.checkpoint.verify_checksums_together")
  try:
    table, finding = _read_table(step_dir), ""
  except ChecksumMismatch as e:
    table, finding = None, str(e)
  # The files are split between the processes that see the table: a file system that shows it to some hosts later
  # than to others (attribute caching) must not leave their shares unread.
  checkers = [i for i, seen in enumerate(_gather_text("seen" if table or finding else "")) if seen]
  if table and not finding:
    try:
      _check_files(step_dir, table, _share(table, checkers.index(jax.process_index()), len(checkers)))
    except ChecksumMismatch as e:
      finding = str(e)
  findings = list(dict.fromkeys(text for text in _gather_text(finding) if text))  # (distinct, in process order)
  if findings:
    raise FinetuneError(f"{'; '.join(findings)}; {fix}")


def _gather_text(text: str, limit: int = 4096) -> list[str]:
  """Every process's `text` (a collective: all processes call it), through process_allgather, which moves arrays
  only: UTF-8 bytes, zero-padded to `limit`."""
  encoded = text.encode("utf-8")[:limit].ljust(limit, b"\0")
  gathered = multihost_utils.process_allgather(np.frombuffer(encoded, np.uint8))  # (processes, limit)
  return [bytes(row).rstrip(b"\0").decode("utf-8", "replace") for row in np.asarray(gathered)]


def _share(entries: dict[str, list[int]], index: int, count: int) -> list[str]:
  """The files process `index` of `count` checks: largest first, each to the process with the fewest bytes so far
  (ties to the lower index). Every process computes the same split from the same table."""
  loads = [0] * count
  mine = []
  for relative, (size, _) in sorted(entries.items(), key=lambda item: (-item[1][0], item[0])):
    owner = loads.index(min(loads))
    loads[owner] += size
    if owner == index:
      mine.append(relative)
  return mine


def _check_step(step_dir: str) -> int:
  """What verify_checksums checks, raising ChecksumMismatch. The number of files the table lists; 0 without one."""
  table = _read_table(step_dir)
  if table:
    _check_files(step_dir, table, list(table))
  return len(table or ())


def _read_table(step_dir: str) -> dict[str, list[int]] | None:
  """A step's CHECKSUM_FILE table, {file relative to the step: [bytes, CRC-32]}, validated; None without one."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.isfile(path):
    return None
  try:
    record = files.parse_json(path)
  except files.DamagedJSON as e:
    raise ChecksumMismatch(str(e)) from None
  except OSError as e:  # (a failing disk: the CLI's generic line would not say which step or what to do)
    raise ChecksumMismatch(f"cannot read {path} ({e.strerror})") from None
  entries = record.get("crc32") if isinstance(record, dict) else None
  if not isinstance(entries, dict) or not entries:
    raise ChecksumMismatch(f"{path} is damaged (no crc32 table)")
  for relative, entry in entries.items():
    if not (isinstance(entry, list) and len(entry) == 2 and all(type(v) is int for v in entry)) or \
        os.path.isabs(relative) or os.path.normpath(relative).startswith(".."):
      raise ChecksumMismatch(f"{path} is damaged (its entry {relative!r} is not a file of the step with [bytes, "
                             "CRC-32])")
  return entries


def _check_files(step_dir: str, entries: dict[str, list[int]], relatives: Sequence[str]) -> None:
  """Raises ChecksumMismatch for the first of `relatives` that is missing or differs from its entry."""
  for relative in relatives:
    size, crc = entries[relative]
    file = os.path.join(step_dir, relative)
    try:
      if not os.path.isfile(file):
        raise ChecksumMismatch(f"checkpoint {step_dir} is incomplete: {relative} is missing")
      if os.path.getsize(file) != size:
        raise ChecksumMismatch(f"checkpoint {step_dir} is damaged: {relative} has {os.path.getsize(file)} bytes, "
                               f"{size} when it was written")
      if _crc32(file) != crc:
        raise ChecksumMismatch(f"checkpoint {step_dir} is damaged: {relative} changed since it was written (its "
                               f"CRC-32 differs from {CHECKSUM_FILE}'s)")
    except OSError as e:
      raise ChecksumMismatch(f"checkpoint {step_dir}: {relative} cannot be read ({e.strerror})") from None


def verify_folder(folder: str) -> list[tuple[str, int | str]]:
  """(step folder, files checked or the damage found) for every checkpoint step under `folder`: a workdir, a
  stage's run folder or a sweep's, each `checkpoints/` and early stopping's `best/` (`finetune verify`). 0 files:
  the step has no checksums."""
  folder = os.path.normpath(folder)
  if not os.path.isdir(folder):
    raise FinetuneError(f"{folder} is not a folder; give a workdir or run folder")

  def check(step_dir: str) -> tuple[str, int | str]:
    try:
      return step_dir, _check_step(step_dir)
    except ChecksumMismatch as e:
      return step_dir, str(e)

  if os.path.basename(folder).isdigit() and os.path.isdir(os.path.join(folder, STATE_ITEM)):  # one step folder
    return [check(folder)]
  found: list[tuple[str, int | str]] = []
  visited: set[str] = set()  # real paths: symbolic links are followed (a sweep's points may be links), once
  for root, dirs, _ in os.walk(folder, followlinks=True):
    if os.path.realpath(root) in visited:
      dirs[:] = []
      continue
    visited.add(os.path.realpath(root))
    dirs.sort()
    if os.path.basename(root) in ("checkpoints", "best"):
      found.extend(check(os.path.join(root, step)) for step in sorted((d for d in dirs if d.isdigit()), key=int))
    if os.path.basename(root) == "checkpoints":
      try:
        final = final_step(os.path.dirname(root))
      except FinetuneError as e:  # (a damaged summary.json: a finding like the others, not the end of the listing)
        found.append((root, str(e)))
        final = None
      if final is not None and str(final) not in dirs:  # (the step every reader of a finished stage takes)
        found.append((os.path.join(root, str(final)), f"{os.path.join(root, str(final))} is missing: the stage "
                      f"finished at step {final} (summary.json) and that step holds its result"))
    # Not into step folders (orbax's files) nor the folders orbax writes a step into before renaming it.
    dirs[:] = [d for d in dirs if not d.isdigit() and ".orbax-checkpoint-tmp" not in d]
  return found


# tensorstore's status codes and the OS's messages for a write the storage refused.
_STORAGE_ERROR = re.compile(r"RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DATA_LOSS|No space left|Permission "
                            r"denied|Read-only file system|Disk quota exceeded|Input/output error")


class _OrbaxErrorLogs(logging.Filter):
  """Drops orbax's ERROR records (each with a traceback, one per background thread of a failed save): the failure
  reaches the caller as one FinetuneError that carries orbax's message (`Checkpointer._writing`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_orbax_error_logs() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxErrorLogs) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxErrorLogs())


def _is_abandoned_read(unraisable: Any) -> bool:
  """An 'Event loop is closed' raised by asyncio's call_soon_threadsafe: a tensorstore read finishing after orbax
  closed the event loop it was started from."""
  if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
    return False
  frame = unraisable.exc_traceback
  while frame is not None and frame.tb_frame.f_code.co_name != "call_soon_threadsafe":
    frame = frame.tb_next
  return frame is not None


def _silence_abandoned_reads() -> None:
  """Keeps a damaged checkpoint's error to its one line. When one of several concurrent tensorstore reads fails,
  orbax's `asyncio.gather` raises at once and orbax closes its per-call event loop (orbax 0.12,
  asyncio_utils._run_sync_via_new_loop) while the other reads are still in flight; each of them then reports
  'Event loop is closed' through sys.unraisablehook as it finishes, a traceback per array. Installed before the
  first read, since such a read may finish before orbax's error reaches us (printed ahead of our one line: seen
  under load); every other unraisable exception still goes to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "_finetune_filter", False):
    return

  def hook(unraisable: Any) -> None:
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook._finetune_filter = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _short(error: Exception, limit: int = 200) -> str:
  """The first line of a storage library's message, cut to `limit` characters (tensorstore's messages carry the
  whole JSON spec of the array, kilobytes long)."""
  text = (str(error).strip().splitlines() or [""])[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _step_dirs(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def resolve_checkpoint(source: str, workdir: str, unfinished: bool = False) -> str:
  """The checkpoint step folder that `init_from=source` names.

  Accepted: 'stage:NAME' (the final checkpoint of an earlier stage of this run), a finished run directory (with a
  `checkpoints/` folder), its `checkpoints/` folder (latest step), one step folder (`.../checkpoints/1200`), or a
  Hugging Face checkpoint directory (config.json + safetensors). `unfinished`: a run directory's latest step even
  before the run finished (`finetune export --unfinished`).
  """
  if source.startswith("stage:"):
    source = os.path.join(workdir, source[len("stage:"):])
  path = os.path.abspath(os.path.expanduser(source))
  if hf.is_hf_checkpoint(path):
    return path
  if not os.path.exists(path):
    raise FinetuneError(f"init_from {source!r} does not exist; give a run directory, its checkpoints/ folder or "
                        "one checkpoint step folder")
  if os.path.isfile(os.path.join(path, "config.json")) and any(
      os.path.isfile(os.path.join(path, name)) for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
    raise FinetuneError(f"init_from {source!r} is a Hugging Face folder with PyTorch weights only "
                        "(pytorch_model.bin), and only safetensors are read: save it again with transformers, e.g. "
                        "`AutoModel.from_pretrained(DIR).save_pretrained(DIR)` (safetensors is its default)")
  if os.path.isdir(os.path.join(path, STATE_ITEM)):
    return path
  for candidate in (os.path.join(path, "checkpoints"), path):
    steps = _step_dirs(candidate)
    if steps:
      # A run's latest checkpoint is its result only once it finished: an unfinished run's may be mid-training or
      # the weights that diverged (as `finetune export` refuses it). A step folder named outright is taken as is.
      run_dir = path if candidate != path else os.path.dirname(path)
      final = final_step(run_dir)
      if final is not None:  # a finished stage's result is its final step, whatever else the folder holds
        check_final_step(run_dir, final)
        return os.path.join(candidate, str(final))
      if not unfinished:  # (no summary.json: final_step said so)
        first_bad = diverged_from(run_dir)
        if first_bad is not None:  # (its latest checkpoint holds the diverged weights: not one to suggest)
          good = [step for step in steps if step < first_bad]
          start = (f"name its last good checkpoint ({os.path.join(candidate, str(good[-1]))}) to start from there"
                   if good else "it has no checkpoint before then")
          raise FinetuneError(f"init_from {source!r}: that run stopped on diverged weights from step {first_bad} "
                              f"({os.path.join(run_dir, DIVERGED_FILE)}); train it again with the fix that file "
                              f"names, or {start}")
        raise FinetuneError(f"init_from {source!r}: that run has not finished (no summary.json in {run_dir}); "
                            f"finish it with `finetune train` on its --workdir, or name one of its step folders "
                            f"({os.path.join(candidate, str(steps[-1]))}) to start from that checkpoint")
      return os.path.join(candidate, str(steps[-1]))
  stages = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d, "checkpoints"))] \
      if os.path.isdir(path) else []
  hint = f"; it holds stages {', '.join(stages)}: use {source.rstrip('/')}/<stage>" if stages else ""
  raise FinetuneError(f"init_from {source!r} holds no checkpoint{hint or '; train that run first, or point at one'}"
                      f"{'' if hint else ' that has a checkpoints/<step> folder'}")


def final_step(run_dir: str) -> int | None:
  """The step of a finished stage's final checkpoint (its summary.json's `steps`: train saves that step last, early
  stopping its best state there); None for a stage that has not finished."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.isfile(path):
    return None
  steps = files.read_json(path, "train that stage again").get("steps")
  if not isinstance(steps, int) or isinstance(steps, bool):
    raise FinetuneError(f"{path} is damaged (no integer steps), so which checkpoint is the stage's result is "
                        "unknown: train that stage again")
  return steps


def check_final_step(run_dir: str, final: int) -> None:
  """Raises unless a finished stage still has its final checkpoint: without it, the newest step kept was read as
  the stage's result, silently (a step folder deleted after `finetune verify` named it damaged)."""
  checkpoints = os.path.join(run_dir, "checkpoints")
  if os.path.isdir(os.path.join(checkpoints, str(final))):
    return
  kept = _step_dirs(checkpoints)
  others = (f"; its other steps ({', '.join(map(str, kept))}) are intermediate checkpoints, which `finetune eval` "
            "and `export` read with --step N, and init_from as a step folder") if kept else ""
  raise FinetuneError(f"{run_dir} finished at step {final} (summary.json), but its final checkpoint "
                      f"{os.path.join(checkpoints, str(final))} is missing: copy that step folder back, or train the "
                      f"stage again (delete {run_dir}){others}")


def diverged_from(run_dir: str) -> int | None:
  """The first step whose checkpoint holds weights `run_dir`'s stage stopped on as diverged (its DIVERGED_FILE), or
  None; a damaged marker is one line (a KeyError or TypeError traceback before)."""
  path = os.path.join(run_dir, DIVERGED_FILE)
  if not os.path.isfile(path):
    return None
  marker = files.read_json(path, "train that run again, or name a step folder you know is good")
  first_bad = marker.get("weights_from_step") if isinstance(marker, dict) else None
  if not isinstance(first_bad, int) or isinstance(first_bad, bool):
    raise FinetuneError(f"{path} is damaged (no weights_from_step), so which checkpoints hold the diverged weights "
                        "is unknown: train that run again, or name a step folder you know is good")
  return first_bad


def read_checkpoint_arrays(step_dir: str) -> dict[str, dict[str, np.ndarray]]:
  """{'params': {path: array}, 'model_state': {path: array}} from a checkpoint step folder, on the host."""
  step_dir = os.path.abspath(os.path.expanduser(step_dir))  # orbax finds no metadata under a relative path
  if hf.is_hf_checkpoint(step_dir):
    return hf.read_params(step_dir)
  item = os.path.join(step_dir, STATE_ITEM)
  if not os.path.isdir(item):
    raise FinetuneError(f"cannot read checkpoint {step_dir}: it has no {STATE_ITEM}/ folder; give a run directory, "
                        "its checkpoints/ folder or one of its step folders")
  verify_checksums(step_dir, "use another step folder, or re-run the stage that wrote it")
  # orbax warns that the item folder has no _CHECKPOINT_METADATA: the CheckpointManager keeps that file one level
  # up, in the step folder. Harmless, and it would print on every init_from, so it is silenced here only.
  _silence_abandoned_reads()
  absl_logger = logging.getLogger("absl")
  previous_level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(item)
      metadata = getattr(metadata, "item_metadata", metadata)
      if metadata is None:  # orbax's answer when the folder's index files are gone
        raise FinetuneError(f"cannot read checkpoint {step_dir}: it is damaged or incomplete (orbax finds no "
                            "metadata); use another step folder, or re-run the stage that wrote it")
      tree = metadata.tree
      wanted = {k: tree[k] for k in ("params", "model_state") if k in tree}
      _refuse_changed_layout(flatten(wanted.get("params", {})), os.path.dirname(step_dir))  # (before reading)
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
      restored = checkpointer.restore(
          item, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True))
  except FinetuneError:
    raise
  except Exception as e:  # orbax raises many types for unreadable folders; the user needs one line.
    raise FinetuneError(f"cannot read checkpoint {step_dir}: {type(e).__name__}: {_short(e)}; check the path, or "
                        "use another step folder if this one is damaged") from None
  finally:
    absl_logger.setLevel(previous_level)
  # A scanned run's checkpoint holds stacked layers; every reader gets the unrolled layout (finetune/scan.py).
  arrays = {k: flatten(v) for k, v in restored.items()}
  return scan.unroll_checkpoint(arrays, os.path.dirname(os.path.abspath(step_dir)))


def _refuse_changed_layout(paths: Any, checkpoints_dir: str) -> None:
  if os.path.isfile(os.path.join(checkpoints_dir, scan.LAYOUT_FILE)):  # (recorded: that format is the run's)
    fix = (f"train that stage again: delete {os.path.dirname(checkpoints_dir)} (its checkpoints cannot be resumed) "
           "or use a new --workdir")
  else:  # (a run before formats were recorded, or a step folder copied away from its run's record)
    fix = (f"train that stage again, or if {checkpoints_dir} was copied from a newer run's checkpoints/ folder, copy "
           f"that folder's {scan.LAYOUT_FILE} (which gives the format) next to it")
  models.refuse_changed_layout(paths, scan.stored_format(checkpoints_dir), checkpoints_dir, fix)


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise FinetuneError(f"config.dont_load: {pattern!r} is not a valid regex ({e})") from None
  return compiled


def load_into(tree: Any, loaded: dict[str, np.ndarray], dont_load: Sequence[str], what: str,
              source: str, new: frozenset[str] = frozenset()) -> tuple[Any, list[str], list[str]]:
  """Replaces leaves of `tree` (sharded arrays) by `loaded[path]`, except paths matching `dont_load`. Paths in `new`
  (parameters only an adapted model has, such as LoRA factors) load when the checkpoint has them and otherwise
  keep their initial values.

  Returns (new tree, loaded paths, freshly initialised paths). A path missing from the checkpoint must be listed in
  `dont_load`; a shape mismatch names the parameter and both shapes.
  """
  patterns = _compile(dont_load)
  loaded_paths, fresh_paths = [], []

  def replace(path: str, leaf: jax.Array) -> jax.Array:
    if any(p.search(path) for p in patterns) or (path in new and path not in loaded):
      fresh_paths.append(path)
      return leaf
    if path not in loaded:
      parts = path.split("/")
      stacked = "/".join(parts[:1] + parts[2:]) if len(parts) > 2 and parts[1].isdigit() else ""
      if stacked in loaded:  # e.g. 'blocks/attention/...' for 'blocks/0/attention/...'
        raise FinetuneError(f"checkpoint {source} holds scanned (stacked) layers, such as {stacked!r}, but no "
                            f"{scan.LAYOUT_FILE} beside it says how to unroll them; copy the {scan.LAYOUT_FILE} of "
                            "the run's checkpoints/ folder next to that step folder")
      raise FinetuneError(f"{what} {path!r} is not in checkpoint {source}; add a regex matching it to "
                          "config.dont_load to initialise it fresh")
    value = loaded[path]
    if tuple(value.shape) != tuple(leaf.shape):
      raise FinetuneError(f"shape mismatch for {what} {path!r}: checkpoint {source} has {tuple(value.shape)}, "
                          f"the model has {tuple(leaf.shape)}; add it to config.dont_load or fix config.model")
    loaded_paths.append(path)
    return jax.device_put(np.asarray(value, dtype=leaf.dtype), leaf.sharding)

  new_tree = map_with_path(replace, tree)
  return new_tree, loaded_paths, fresh_paths
