"""Atomic file writes: every file the framework writes appears whole or not at all (and `read_json`, which
reports a damaged JSON file in one line).

A temp file with a unique name beside the target, renamed onto it (`os.replace` is atomic within one file
system): a crash never leaves a half-written file, and processes writing the same file at once (sweep points
sharing a source run, two sweeps tabulating one folder) never move each other's half-written temp into place.
Written by hand because the standard library has no atomic replace-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
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


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A unique temp path beside `path` to write to; renamed onto `path` when the block succeeds, removed if not."""
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  try:
    yield tmp
    make_readable(tmp)  # after the block: a writer may have replaced the file (safetensors writes 0600)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def read_json(path: str, fix: str) -> Any:
  """A JSON file; a damaged one (not UTF-8, not JSON) is a one-line error naming it and saying `fix`."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FinetuneError(f"{path} is damaged (not valid JSON: {e}); {fix}") from None
