"""Atomic file writes: every file the framework writes appears whole or not at all (and `read_json`, which
reports a damaged JSON file in one line).

A temp file with a unique name beside the target, renamed onto it (`os.replace` is atomic within one file
system): a crash never leaves a half-written file, and processes writing the same file at once (sweep points
sharing a source run, two sweeps tabulating one folder) never move each other's half-written temp into place.
Written by hand because the standard library has no atomic replace-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import warnings
from typing import Any, Iterator

from finetune.errors import FinetuneError


def _read_umask() -> int:
  mask = os.umask(0)  # (the only way to read it is to set it; done once, at import, before any writer thread)
  os.umask(mask)
  return mask


_UMASK = _read_umask()


def make_readable(path: str) -> None:
  """Gives `path` (and, for a folder, everything in it) the modes a plain `open`/`mkdir` would have: mkstemp,
  mkdtemp and safetensors' writer make files 0600 and folders 0700, which others on a shared cluster cannot read."""
  mask = _UMASK
  if not os.path.isdir(path):
    os.chmod(path, 0o666 & ~mask)
    return
  for root, _, names in os.walk(path):
    os.chmod(root, 0o777 & ~mask)
    for name in names:
      os.chmod(os.path.join(root, name), 0o666 & ~mask)


LOCK_NAME = ".lock"


def _held_above(workdir: str) -> tuple[str, str] | None:
  """(folder, holder) of the nearest folder above `workdir` whose lock another run holds, else None: a run inside
  another's workdir (`--workdir W/finetune` while a run in W trains that stage there) would mix its files with that
  stage's. Probed with a shared lock, let go at once. The real path is walked, so a symlink into a held workdir is
  found too; only locks a finetune process wrote (`pid ...`, or not yet written) count, not another program's
  `.lock`. (The caller must not hold a lock above `workdir` itself: flock would see its own as another's.)"""
  folder = os.path.dirname(os.path.realpath(workdir))
  while True:
    lock_path = os.path.join(folder, LOCK_NAME)
    if os.path.isfile(lock_path):
      try:
        fd = os.open(lock_path, os.O_RDONLY)
      except OSError:  # (not ours to read: no run of ours holds it)
        fd = None
      if fd is not None:
        try:
          fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
          fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
          holder = os.read(fd, 200).decode(errors="replace").strip()
          if not holder or holder.startswith("pid "):
            return folder, holder
        except OSError:  # a file system without locks
          pass
        finally:
          os.close(fd)
    if os.path.dirname(folder) == folder:
      return None
    folder = os.path.dirname(folder)


@contextlib.contextmanager
def exclusive_workdir(workdir: str, enabled: bool = True, check_above: bool = True,
                      if_in_use: str = "wait for it to end or stop it, or use another --workdir") -> Iterator[None]:
  """Holds an advisory lock on `<workdir>/.lock` for the block: a second run in the same folder (a double launch, a
  requeued job while the first is still closing, two sweeps over one folder) fails at once instead of mixing its
  checkpoints, metrics and summary with the first's. The operating system drops the lock when the process ends,
  however it ends; the file stays (deleting it would race with a process about to lock it). `enabled=False` for the
  processes of a multi-host run, which share their workdir by design. A folder inside another run's held workdir is
  refused too (`check_above`; a run's own stage folders, locked while their stage runs, skip it). `if_in_use`: what
  the refusal tells the user to do. Written by hand: the standard library's fcntl is the whole mechanism, and no
  dependency offers more."""
  if not enabled:
    yield
    return
  held = _held_above(workdir) if check_above else None
  if held:
    raise FinetuneError(f"{workdir} is inside {held[0]}, which another finetune process holds "
                        f"({held[1] or 'unknown'}): wait for it to end or stop it, or use a --workdir outside it")
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
  try:
    locked = True
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another process
      holder = os.read(fd, 200).decode(errors="replace").strip()
      raise FinetuneError(f"{workdir} is in use by another finetune process ({holder or 'unknown'}): "
                          f"{if_in_use}") from None
    except OSError as e:  # a file system without locks (Lustre mounted noflock, some network mounts): run unlocked
      warnings.warn(f"{workdir}: the file system refuses locks ({e.strerror}), so nothing stops a second run from "
                    "using this workdir at the same time", stacklevel=3)
      locked = False
    if locked:
      os.ftruncate(fd, 0)
      os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    yield
  finally:
    os.close(fd)  # (releases the lock)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A unique temp path beside `path` to write to; renamed onto `path` when the block succeeds, removed if not."""
  # An OSError names `path`, not the temp file (or nothing: a full disk's write has no filename), so the one-line
  # message says which of the user's paths failed.
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=os.path.dirname(os.path.abspath(path)))
  except OSError as e:
    raise _naming(e, path) from e
  os.close(fd)
  try:
    yield tmp
    make_readable(tmp)  # after the block: a writer may have replaced the file (safetensors writes 0600)
    os.replace(tmp, path)
  except OSError as e:
    raise _naming(e, path) from e
  except FinetuneError as e:  # (save_safetensors' one line named the temp file)
    raise naming_final(e, tmp, path) from e.__cause__
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _naming(error: OSError, path: str) -> OSError:
  """`error` with `path` as its filename: the same type and message (one without an errno, such as
  io.UnsupportedOperation, is returned as it is)."""
  if error.errno is None or error.filename == path:
    return error
  try:
    return type(error)(error.errno, error.strerror, path)
  except TypeError:  # (a subclass with another constructor)
    return error


def naming_final(error: FinetuneError, temp: str, final: str) -> FinetuneError:
  """`error` with the temp path in its message replaced by the user's path, the one the write was for (`error`
  itself when it does not name the temp path)."""
  return FinetuneError(str(error).replace(temp, final)) if temp in str(error) else error


def save_safetensors(tensors: dict[str, Any], path: str, metadata: dict[str, str] | None = None) -> None:
  """safetensors' `save_file`, with a failed write (a full disk: its SafetensorError, not an OSError) one line
  naming the file."""
  import safetensors  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  try:
    save_file(tensors, path, metadata=metadata)
  except (OSError, safetensors.SafetensorError) as e:
    raise FinetuneError(f"writing {path} failed ({e}); free space or fix the folder's permissions, then run the "
                        "command again") from None


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


class DamagedJSON(ValueError):
  """A JSON file that is not UTF-8 or not JSON: the message names it, and says nothing about what to do (the
  caller knows: `read_json` adds its `fix`; a checkpoint's checksum table reports it among other findings)."""


def parse_json(path: str) -> Any:
  """A JSON file's contents; DamagedJSON for a damaged one (OSError as open raises it)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DamagedJSON(f"{path} is damaged (not valid JSON: {e})") from None


def read_json(path: str, fix: str) -> Any:
  """A JSON file; a damaged one (not UTF-8, not JSON) is a one-line error naming it and saying `fix`."""
  try:
    return parse_json(path)
  except DamagedJSON as e:
    raise FinetuneError(f"{e}; {fix}") from None
